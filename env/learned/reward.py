"""Rewards and terminations for agents acting inside a world model.

A world model makes frames, not game scores, so the Gymnasium env asks a *reward model*
what each step was worth. Three kinds, all with one batched call (the vector env asks once
for all its sub-envs)::

    reward_model(prev_frames, keys, mouse, frames) -> RewardOutput(reward (B,), terminated (B,), terms)

* :class:`ZeroReward`: 0 and never terminated.
* :class:`FunctionReward`: your function of one transition,
  ``fn(prev_frame, action, frame) -> reward`` or ``-> (reward, terminated)``.
* :class:`LearnedReward`: a :class:`RewardHead`, a small conv net trained on recorded play
  (``worldgen train reward``, :mod:`worldgen.env.learned.reward_train`) to predict from a transition
  (frame, action, next frame) how the recorded game variables change (health, kills, items by
  default) and whether the player dies at the next step. The reward is a weighted sum of the
  predicted changes (:data:`DEFAULT_WEIGHTS`), the same sum :func:`reward_from_variables`
  takes of the real game's variables, so a return in imagination and one in the real game
  measure the same thing.

The head reads frames, not tokenizer latents: the env sees only what the engine's public API
gives (uint8 frames), and a head that reads pixels outlives a retrained tokenizer; it only
has to match the model's frame size.

Why "dies at the next step": ViZDoom ends an episode the moment the player dies, so no
recording holds a frame of the player dead (the recorder's death episodes end on the last
frame before death). The head therefore learns the hazard ``P(the step after frame t+1 kills
the player)`` from the last transition of each death episode, and the env ends an episode on
the frame where the recording would have ended. Health is not on screen (frames are recorded
without the HUD), so this can only be read from damage flashes and what is in view; its
held-out accuracy says how well that works.

Example:
    >>> import numpy as np
    >>> from worldgen.actions import Action
    >>> r = FunctionReward(lambda prev, action, frame: float(action.keys[0]))  # reward moving forward
    >>> f = np.zeros((2, 24, 32, 3), np.uint8)
    >>> out = r(f, np.array([[1] + [0] * 7, [0] * 8], np.uint8), np.zeros((2, 2), np.float32), f)
    >>> out.reward.tolist(), out.terminated.tolist()
    ([1.0, 0.0], [False, False])
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import actions, checkpoint, models
from worldgen.actions import Action
from worldgen.checkpoint import CheckpointError

PART = "reward"  # checkpoint part name: <folder>/reward.json + reward-*.safetensors
# Recorded game variables whose per-step change the head predicts by default.
DEFAULT_TARGETS = ("health", "killcount", "itemcount")
# Reward = sum of weight x change, plus "death" x (1 if the player dies). A kill is worth a
# point, 100 health (a full life) one point, a pickup a tenth, dying one point off.
DEFAULT_WEIGHTS = {"killcount": 1.0, "health": 0.01, "itemcount": 0.1, "death": -1.0}
CLASSES = ("down", "same", "up")  # the sign of a variable's change, one 3-way head per target


@dataclass
class RewardHeadConfig:
    """Architecture of a :class:`RewardHead` (stored in its checkpoint part)."""

    frame_size: tuple[int, int] = (120, 160)  # (H, W) of the frames it reads: the world model's
    downsample: int = 2  # average-pool frames by this first: flashes and sprites survive 2x
    targets: tuple[str, ...] = DEFAULT_TARGETS
    channels: tuple[int, ...] = (32, 64, 64, 128)  # conv widths, each conv halves the resolution
    hidden: int = 256

    def __post_init__(self) -> None:
        if self.downsample < 1 or any(s % self.downsample for s in self.frame_size):
            raise ValueError(f"downsample={self.downsample} must be >= 1 and divide frame_size {self.frame_size}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct variable names, got {self.targets}")

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.frame_size[0] // self.downsample, self.frame_size[1] // self.downsample)


class TransitionEncoder(nn.Module):
    """A transition (frame, action, next frame) -> ``hidden`` features: strided convs over both
    frames and their difference (a flash, a fall or a turn is in the difference), mean and max
    pooled (a whole-screen flash moves the mean, a small sprite the max), with the action
    embedded. The trunk of :class:`RewardHead` and of the geometry head's odometry."""

    def __init__(self, channels: Sequence[int], hidden: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 9  # frame, next frame and their difference
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.action = nn.Sequential(nn.Linear(actions.ACTION_DIM, 64), nn.SiLU())
        self.mlp = nn.Sequential(nn.Linear(2 * c_in + 64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())

    def features(self, prev: torch.Tensor, nxt: torch.Tensor, action_vec: torch.Tensor) -> torch.Tensor:
        """``prev``, ``nxt``: uint8 ``(B, 3, h, w)``; ``action_vec``: ``(B, 10)`` -> ``(B, hidden)``."""
        a = prev.float().div(127.5).sub(1.0)
        b = nxt.float().div(127.5).sub(1.0)
        h = self.convs(torch.cat([a, b, b - a], 1))
        return self.mlp(torch.cat([h.mean((2, 3)), h.amax((2, 3)), self.action(action_vec.float())], 1))


def pool_frames(frames: torch.Tensor, frame_size: Sequence[int], downsample: int, what: str) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` frames of ``frame_size`` -> uint8 ``(B, 3, h, w)`` average-pooled by
    ``downsample``; anything else is a ValueError naming ``what`` reads which frames."""
    if frames.dtype != torch.uint8 or tuple(frames.shape[1:]) != (*frame_size, 3):
        raise ValueError(
            f"{what} reads uint8 frames (B, {frame_size[0]}, {frame_size[1]}, 3), "
            f"got {tuple(frames.shape)} {frames.dtype}"
        )
    x = frames.movedim(-1, 1)
    if downsample > 1:
        x = F.avg_pool2d(x.float(), downsample).round_().to(torch.uint8)
    return x


def pool_factor(width: int, height: int, asked: int, base: int = 1) -> int:
    """The largest multiple of ``base`` at most ``asked`` that divides both sides of a frame: a
    trainer's pooling factor.

    Example:
        >>> pool_factor(160, 120, 3), pool_factor(160, 120, 4, base=2)
        (2, 4)
    """
    f = max(base, asked - asked % base)
    while width % f or height % f:
        f -= base
    return f


class RewardHead(TransitionEncoder):
    """Transition (frame, action, next frame) -> per target the sign of its change (3 logits)
    and its size (log1p of the absolute change), plus the logit that the player dies next step.

    Inputs are frames already prepared by :meth:`prepare` (pooled uint8, as stored by the
    trainer's pool); :meth:`predict` takes raw frames and does it all.

    Example:
        >>> head = RewardHead(RewardHeadConfig(frame_size=(24, 32), downsample=1))
        >>> f = torch.zeros(4, 24, 32, 3, dtype=torch.uint8)
        >>> out = head(head.prepare(f), head.prepare(f), torch.zeros(4, 10))
        >>> out["logits"].shape, out["size"].shape, out["death"].shape
        (torch.Size([4, 3, 3]), torch.Size([4, 3]), torch.Size([4]))
    """

    def __init__(self, cfg: RewardHeadConfig):
        super().__init__(cfg.channels, cfg.hidden)
        self.cfg = cfg
        n = len(cfg.targets)
        self.out = nn.Linear(cfg.hidden, 4 * n + 1)
        # Prior correction, set by the trainer: it over-samples rare changes, so the raw logits
        # fit the sampled class frequencies; adding log(true prior / sampled prior) gives
        # probabilities of the game's own frequencies (Bayes' rule), which expected rewards need.
        self.register_buffer("logit_bias", torch.zeros(n, 3))
        self.register_buffer("death_bias", torch.zeros(()))

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` frames -> uint8 ``(B, 3, h, w)`` pooled by ``downsample``."""
        return pool_frames(frames, self.cfg.frame_size, self.cfg.downsample, "reward head")

    def forward(self, prev: torch.Tensor, nxt: torch.Tensor, action_vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``prev``, ``nxt``: prepared uint8 ``(B, 3, h, w)``; ``action_vec``: ``(B, 10)``
        (:func:`worldgen.actions.to_vector`). Returns ``logits`` (B, targets, 3), ``size``
        (B, targets) (predicted log1p |change|) and ``death`` (B,) logits."""
        out = self.out(self.features(prev, nxt, action_vec))
        n = len(self.cfg.targets)
        return {"logits": out[:, : 3 * n].reshape(-1, n, 3), "size": out[:, 3 * n : 4 * n], "death": out[:, -1]}

    def probs(self, out: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior-corrected ``P(down, same, up)`` (B, targets, 3) and ``P(death next step)`` (B,)."""
        return (
            (out["logits"].float() + self.logit_bias).softmax(-1),
            torch.sigmoid(out["death"].float() + self.death_bias),
        )

    def expected_change(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, targets) expected change of each variable: ``(P(up) - P(down)) x size``."""
        p = self.probs(out)[0]
        return (p[..., 2] - p[..., 0]) * torch.expm1(out["size"].float().clamp(0.0, 10.0))


def save_head(
    folder: str | os.PathLike,
    head: RewardHead,
    weights: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``head`` as the ``reward`` part of checkpoint folder ``folder`` (atomically): its
    weights, config, the reward weights and whatever ``extra`` holds (training data, metrics)."""
    unknown = set(weights) - set(head.cfg.targets) - {"death"}
    if unknown:
        raise ValueError(
            f"reward weights {sorted(unknown)} name no target of the head ({head.cfg.targets}) nor 'death'"
        )
    tensors = {
        k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in head.state_dict().items()
    }
    config = {
        "model": dataclasses.asdict(head.cfg),
        "action_schema": actions.schema(),
        "reward_weights": dict(weights),
        **dict(extra or {}),
    }
    checkpoint.save(folder, PART, tensors, config)


def has_head(folder: str | os.PathLike) -> bool:
    """Whether checkpoint folder ``folder`` (or a packaged name) holds a reward head."""
    return checkpoint.has_part(folder, PART)


def load_head(folder: str | os.PathLike, device: torch.device | str | None = None) -> tuple[RewardHead, dict[str, Any]]:
    """The reward head of checkpoint folder ``folder`` in eval mode, and its stored config
    (``reward_weights``, ``metrics``, ``train``). Raises :class:`CheckpointError` naming the problem."""
    return models.load_part(folder, PART, RewardHead, RewardHeadConfig, device)


# --- reward models: what the env calls --------------------------------------------------------
@dataclass
class RewardOutput:
    """The reward model's answer for a batch of B transitions."""

    reward: np.ndarray  # (B,) float32
    terminated: np.ndarray  # (B,) bool
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B,) float32: what the reward is made of


class ZeroReward:
    """Reward 0, never terminated: pure imagination, for planning or data collection."""

    def __call__(
        self, prev_frames: np.ndarray, keys: np.ndarray, mouse: np.ndarray, frames: np.ndarray
    ) -> RewardOutput:
        n = len(frames)
        return RewardOutput(np.zeros(n, np.float32), np.zeros(n, bool))


class FunctionReward:
    """A user function of one transition, called per sub-env.

    ``fn(prev_frame, action, frame)`` gets uint8 ``(H, W, 3)`` frames and the validated
    :class:`~worldgen.actions.Action`, and returns a reward or ``(reward, terminated)``.
    """

    def __init__(self, fn: Callable[[np.ndarray, Action, np.ndarray], Any]):
        if not callable(fn):
            raise TypeError(f"reward must be a function (prev_frame, action, frame) -> reward, got {type(fn).__name__}")
        self.fn = fn

    def __call__(
        self, prev_frames: np.ndarray, keys: np.ndarray, mouse: np.ndarray, frames: np.ndarray
    ) -> RewardOutput:
        n = len(frames)
        reward, terminated = np.zeros(n, np.float32), np.zeros(n, bool)
        for i in range(n):
            out = self.fn(prev_frames[i], Action(keys[i], mouse[i]), frames[i])
            r, t = out if isinstance(out, tuple) else (out, False)
            try:
                reward[i], terminated[i] = float(r), bool(t)
            except (TypeError, ValueError):
                raise TypeError(
                    f"reward function {getattr(self.fn, '__name__', self.fn)!r} must return a number or "
                    f"(number, bool), got {out!r}"
                ) from None
            if not math.isfinite(reward[i]):
                raise ValueError(f"reward function returned {r!r}; rewards must be finite")
        return RewardOutput(reward, terminated)


class LearnedReward:
    """A trained :class:`RewardHead` as a reward model.

    Args:
        head: the head, or a checkpoint folder holding one (:func:`load_head`).
        weights: reward weight per target and ``"death"``; default: those stored with the head.
        death_threshold: terminate when ``P(death next step)`` exceeds this.
        device: where the head runs (the world model's device keeps frames off the bus twice).
    """

    def __init__(
        self,
        head: RewardHead | str | os.PathLike,
        weights: Mapping[str, float] | None = None,
        death_threshold: float = 0.5,
        device: torch.device | str | None = None,
    ):
        stored: dict[str, Any] = {}
        if not isinstance(head, RewardHead):
            head, stored = load_head(head, device)
        self.head = head.to(device).eval()
        self.device = next(self.head.parameters()).device
        self.weights = dict(stored.get("reward_weights", DEFAULT_WEIGHTS) if weights is None else weights)
        unknown = set(self.weights) - set(head.cfg.targets) - {"death"}
        if unknown:
            raise ValueError(
                f"reward weights {sorted(unknown)} name no target of the head "
                f"({', '.join(head.cfg.targets)}) nor 'death'"
            )
        self.death_threshold = death_threshold
        self.metrics = stored.get("metrics", {})
        w = [self.weights.get(t, 0.0) for t in head.cfg.targets]
        self._w = torch.tensor(w, dtype=torch.float32, device=self.device)

    @property
    def frame_size(self) -> tuple[int, int]:
        return tuple(self.head.cfg.frame_size)

    @torch.no_grad()
    def __call__(
        self, prev_frames: np.ndarray, keys: np.ndarray, mouse: np.ndarray, frames: np.ndarray
    ) -> RewardOutput:
        h = self.head
        prev = h.prepare(torch.as_tensor(prev_frames).to(self.device))
        nxt = h.prepare(torch.as_tensor(frames).to(self.device))
        act = torch.as_tensor(actions.to_vector(keys, mouse)).to(self.device)
        out = h(prev, nxt, act)
        change = h.expected_change(out)  # (B, targets)
        p_death = h.probs(out)[1]  # (B,)
        reward = change @ self._w + self.weights.get("death", 0.0) * p_death
        terms = {t: change[:, i].cpu().numpy() for i, t in enumerate(h.cfg.targets)}
        terms["p_death"] = p_death.cpu().numpy()
        return RewardOutput(
            reward.cpu().numpy().astype(np.float32), (p_death > self.death_threshold).cpu().numpy(), terms
        )


RewardModel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], RewardOutput]


def reward_from_variables(
    prev: np.ndarray, now: np.ndarray | None, names: Sequence[str], weights: Mapping[str, float] = DEFAULT_WEIGHTS
) -> float:
    """The real game's reward for one step, the sum :class:`LearnedReward` predicts.

    ``prev``/``now``: game variables before and after the step (``names`` their columns, e.g.
    :data:`worldgen.env.sources.doom.VARIABLE_NAMES`); ``now=None`` means the player died on this step.

    Example:
        >>> names = ["health", "killcount", "itemcount"]
        >>> reward_from_variables(np.array([100.0, 0.0, 2.0]), np.array([90.0, 1.0, 2.0]), names)
        0.9
        >>> reward_from_variables(np.array([10.0, 3.0, 2.0]), None, names)
        -1.0
    """
    if now is None:
        return float(weights.get("death", 0.0))
    col = {n: i for i, n in enumerate(names)}
    missing = [k for k in weights if k != "death" and k not in col]
    if missing:
        raise KeyError(f"reward weights name variables {missing} that are not recorded (variables: {list(names)})")
    return round(float(sum(w * (now[col[k]] - prev[col[k]]) for k, w in weights.items() if k != "death")), 6)


def make_reward_model(
    reward: Any,
    model_folder: Path | None,
    device: torch.device | str | None,
    weights: Mapping[str, float] | None = None,
) -> RewardModel:
    """What the env's ``reward`` argument names, as a reward model.

    ``"learned"``: the head stored in the world model's folder (``<model>/reward.json``), or for
    the packaged default model the one packaged in ``env/heads/``; ``"zero"``; a checkpoint
    folder path holding a head; a :class:`RewardHead`; a reward model of this module (e.g.
    ``LearnedReward(folder, death_threshold=0.2)``); or a function of one transition.
    """
    if isinstance(reward, str) and reward == "zero" or reward is None:
        return ZeroReward()
    if isinstance(reward, (ZeroReward, FunctionReward, LearnedReward)):  # a batched reward model already
        return reward
    if isinstance(reward, RewardHead):
        return LearnedReward(reward, weights, device=device)
    if isinstance(reward, str) and reward == "learned":
        folder = checkpoint.stored_head(model_folder, PART, PACKAGED_HEADS)
        if folder is not None:
            return LearnedReward(folder, weights, device=device)
        raise CheckpointError(
            f"reward='learned': the model folder {model_folder} has no reward head ({PART}.json); "
            f"train one with `worldgen train reward --data DATASET --out RUN` and pass "
            f"reward='RUN/ckpt', or use reward='zero' or a function"
        )
    if isinstance(reward, (str, os.PathLike)):
        return LearnedReward(reward, weights, device=device)
    if callable(reward):
        if weights is not None:
            raise ValueError("reward_weights apply to a learned reward head, not to a reward function")
        return FunctionReward(reward)
    raise TypeError(
        f"reward must be 'learned', 'zero', a checkpoint folder, a RewardHead or a function, got {reward!r}"
    )


# Heads that ship with worldgen, by the name of the packaged model they belong to.
PACKAGED_HEADS = {"default": Path(__file__).parents[1] / "heads" / "default"}  # env/heads/
