"""The optimisation schedule: the learning rate per step, the EMA of the weights, and which
parameters get weight decay."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from worldgen.training.config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine to ``cfg.lr * min_lr_ratio`` at ``total``.

    Example:
        >>> c = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
        >>> lr_at(4, 100, c), lr_at(10, 100, c), round(lr_at(100, 100, c), 6)
        (0.5, 1.0, 0.1)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(total - cfg.warmup, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's weights, kept as a frozen copy of the model.

    ``decay`` ramps up as ``(1 + n) / (10 + n)`` early on, so the average is not dominated by
    the random init during the first thousand steps.

    Example:
        >>> m = nn.Linear(2, 2); ema = EMA(m, 0.9)
        >>> ema.update(m); ema.module(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never norms, biases or other vectors (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
