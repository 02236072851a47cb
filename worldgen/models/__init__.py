"""The learned parts of a world model: the per-frame tokenizer and the block-causal DiT.

This file also holds what every user of the models shares: the image <-> tensor
conversion and the checkpoint helpers. A checkpoint folder (see :mod:`worldgen.checkpoint`)
has the parts ``"tokenizer"`` and ``"dynamics"``; each part's config JSON is::

    {"model": dataclasses.asdict(cfg), "action_schema": worldgen.actions.schema(), ...extra}

where ``extra`` is whatever the trainer adds (data, steps, metrics).

Example:
    >>> import tempfile
    >>> from worldgen.models import DiT, MODELS, save_part, load_dit
    >>> dit = DiT(MODELS["tiny"])
    >>> folder = tempfile.mkdtemp()
    >>> save_part(folder, "dynamics", dit, {"steps": 0})
    >>> load_dit(folder).cfg == dit.cfg
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from worldgen import actions, checkpoint
from worldgen.checkpoint import CheckpointError
from worldgen.models.dit import MODELS, DiT, DiTConfig, flops_per_frame, flops_per_token
from worldgen.models.tokenizer import Tokenizer, TokenizerConfig

__all__ = [
    "MODELS",
    "CheckpointError",
    "DiT",
    "DiTConfig",
    "Tokenizer",
    "TokenizerConfig",
    "autocast",
    "flops_per_frame",
    "flops_per_token",
    "frames_to_tensor",
    "load_dit",
    "load_part",
    "load_tokenizer",
    "save_part",
    "tensor_to_frames",
    "tensor_to_uint8",
]

PARTS: dict[str, tuple[type, type]] = {"tokenizer": (Tokenizer, TokenizerConfig), "dynamics": (DiT, DiTConfig)}


def frames_to_tensor(frames: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 frames ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)`` in [-1, 1].

    Example:
        >>> frames_to_tensor(np.full((2, 120, 160, 3), 255, np.uint8)).shape
        torch.Size([2, 3, 120, 160])
    """
    x = torch.as_tensor(frames, device=device)
    if x.dtype != torch.uint8 or x.ndim < 3:
        raise ValueError(f"frames must be uint8 (..., H, W, C), got {tuple(x.shape)} {x.dtype}")
    # Convert after the move so only uint8 crosses to the device (4x less traffic).
    return x.movedim(-1, -3).float().div_(127.5).sub_(1.0)


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float ``(..., C, H, W)`` in [-1, 1] -> uint8 ``(..., H, W, C)`` on the same device (clamped,
    rounded): frames, or RGB-D frames with depth in levels as their 4th channel."""
    u8 = ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return u8.movedim(-3, -1)


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float ``(..., 3, H, W)`` in [-1, 1] -> uint8 numpy ``(..., H, W, 3)`` (clamped, rounded).

    Example:
        >>> tensor_to_frames(torch.zeros(3, 2, 2))[0, 0].tolist()
        [128, 128, 128]
    """
    return tensor_to_uint8(x).cpu().numpy()


def autocast(device: torch.device | str, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """How the models run: bf16 autocast on CUDA; float32 on the CPU (training and evaluation
    there want exactness), unless ``bf16`` asks for it (streaming sessions on a CPU with native
    bf16 matmuls: :func:`native_bf16`)."""
    device = torch.device(device)
    if bf16 if bf16 is not None else device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: CUDA, or a CPU with AVX512-BF16 or
    AMX (there bf16 sessions ran up to 40% faster than float32; elsewhere bf16 is emulated and slow)."""
    if torch.device(device).type == "cuda":
        return True
    return torch.device(device).type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


C = TypeVar("C")


def config_from_dict(cls: type[C], d: Mapping[str, Any], where: str) -> C:
    """Build dataclass ``cls`` from its ``asdict`` form (JSON turns tuples into lists).
    An unknown or missing field is a :class:`CheckpointError` naming it and ``where``."""
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{where}: 'model' config must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} fields {unknown} (checkpoint from a newer worldgen?)")
    missing = sorted(
        n
        for n, f in fields.items()
        if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise CheckpointError(f"{where}: {cls.__name__} fields {missing} are missing")
    kwargs = {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from None


def save_part(
    folder: str | os.PathLike,
    part: str,
    module: Tokenizer | DiT,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``module`` (its weights and ``cfg``) as checkpoint ``part`` of ``folder``, atomically.

    Args:
        part: ``"tokenizer"`` or ``"dynamics"``.
        extra: more config entries (data, steps, metrics); may not override "model"/"action_schema".
        dtype: cast floating tensors to this (e.g. ``torch.bfloat16`` halves the file);
            ``torch.float8_e4m3fn`` stores the weights in fp8 with per-tensor scales
            (:func:`worldgen.checkpoint.stored_as`: a quarter of fp32). Loading casts back to
            the model's dtype.
    """
    if part not in PARTS or not isinstance(module, PARTS[part][0]):
        raise ValueError(
            f"part {part!r} must be one of {list(PARTS)} holding its model type, got {type(module).__name__}"
        )
    extra = dict(extra or {})
    clash = {"model", "action_schema"} & set(extra)
    if clash:
        raise ValueError(f"extra may not set {sorted(clash)}; save_part writes them")
    tensors = module.state_dict() if dtype is None else checkpoint.stored_as(module.state_dict(), dtype)
    config = {"model": dataclasses.asdict(module.cfg), "action_schema": actions.schema(), **extra}
    checkpoint.save(folder, part, tensors, config)


def _load(folder_or_name: str | os.PathLike, part: str, device: torch.device | str | None) -> nn.Module:
    cls, cfg_cls = PARTS[part]
    tensors, config = checkpoint.load(folder_or_name, part)
    where = f"{checkpoint.resolve(folder_or_name) / part}.json"
    if "action_schema" in config:
        try:
            actions.check_schema(config["action_schema"], where)
        except actions.ActionError as e:
            raise CheckpointError(str(e)) from None
    elif part == "dynamics":  # the DiT's action input is meaningless without knowing its schema
        raise CheckpointError(f"{where}: no 'action_schema' in the config")
    if "model" not in config:
        raise CheckpointError(f"{where}: no 'model' entry in the config")
    model = cls(config_from_dict(cfg_cls, config["model"], where))
    checkpoint.load_state(model, tensors, where)
    return model.to(device).eval()


def load_part(
    folder: str | os.PathLike, part: str, cls: type, cfg_cls: type, device: torch.device | str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The head ``cls(cfg_cls(...))`` stored as ``part`` of checkpoint folder ``folder``, in eval
    mode (float32), and its stored config. Raises :class:`CheckpointError` naming the problem."""
    tensors, config = checkpoint.load(folder, part)
    where = f"{checkpoint.resolve(folder) / part}.json"
    try:
        actions.check_schema(config.get("action_schema", {}), where)
    except actions.ActionError as e:
        raise CheckpointError(str(e)) from None
    head = cls(config_from_dict(cfg_cls, config.get("model"), where))
    checkpoint.load_state(head, {k: v.float() for k, v in tensors.items()}, where)
    return head.to(device).eval(), config


def load_tokenizer(folder_or_name: str | os.PathLike, device: torch.device | str | None = None) -> Tokenizer:
    """The ``"tokenizer"`` part of a checkpoint folder (or packaged name such as ``"default"``),
    in eval mode on ``device``. Raises :class:`CheckpointError` naming what does not fit."""
    return _load(folder_or_name, "tokenizer", device)


def load_dit(folder_or_name: str | os.PathLike, device: torch.device | str | None = None) -> DiT:
    """The ``"dynamics"`` part of a checkpoint folder (or packaged name), in eval mode on ``device``."""
    return _load(folder_or_name, "dynamics", device)
