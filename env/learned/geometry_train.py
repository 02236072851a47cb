"""``worldgen train geometry``: fit a :class:`~worldgen.env.learned.geometry.GeometryHead` to recorded play.

The recorder stores, per step, the depth buffer and the camera pose; they are the targets:

* depth: each frame's depth buffer, average-pooled to the head's depth resolution
  (``--depth-downsample``, auto: to at most 40 pixels wide), L1 in [0, 1];
* odometry: each transition ``(frame t, action t, frame t+1)`` of an episode, the camera motion
  from pose t to pose t+1 in camera t's frame (:func:`~worldgen.env.learned.geometry.motion_between`),
  divided by its per-field std over the train transitions (stored with the head), smooth L1.

Frames and depth are held on the device as pooled uint8, batches drawn there with the step's
generator, so a resumed run is exact. The run folder is the usual one
(:mod:`worldgen.training.common`); ``ckpt/geometry.json`` plus shards is the head to use, with
``geometry="RUN/ckpt"`` in the env.

Held-out metrics (``summary.json`` and the head's config ``metrics``): depth mean absolute error
in depth levels, against predicting the train frames' mean depth map; the share of pixels within
25% of the true depth (delta < 1.25); per motion field the mean absolute error against
predicting no motion; and drift: the head's odometry integrated over held-out paths of
``--drift-steps`` steps from their true start pose, its final position and yaw error against the
distance really walked.

Example:
    worldgen record --env doom --steps 60000 --out data/geometry-doom --seed 11
    worldgen train geometry --data data/geometry-doom --out runs/geometry --minutes 10
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import actions
from worldgen.data import Dataset
from worldgen.env.learned.geometry import (
    MOTION_FIELDS,
    GeometryHead,
    GeometryHeadConfig,
    integrate,
    motion_between,
    save_head,
)
from worldgen.env.learned.reward import pool_factor
from worldgen.training import common
from worldgen.training.common import Dist, Run, TrainConfig, autocast, opt, save_image_rows


@dataclass
class GeometryTrainConfig(TrainConfig):
    batch_size: int = opt(64, "frames (depth) and transitions (odometry) per step over all GPUs")
    lr: float = opt(1e-3, "peak AdamW LR; small conv nets with GroupNorm train stably at this")
    warmup: int = opt(100, "linear LR warmup steps")
    ema_decay: float = opt(0.995, "EMA of weights; a ~200-step horizon suits runs of a few thousand steps")
    ckpt_every: int = opt(500, "save resume state and export every N steps")
    sample_every: int = opt(0, "write sample images every N steps (0: only at the end)")
    downsample: int = opt(0, "average-pool frames by this first (0: auto, to at most 80 pixels wide)")
    depth_downsample: int = opt(0, "read and make depth at frame size / this (0: auto, at most 40 pixels wide)")
    depth_weight: float = opt(
        10.0,
        "weight of the depth L1 (levels / 255, ~0.05 when trained) against the "
        "odometry's smooth L1 in std units (~0.3): comparable gradients",
    )
    eval_transitions: int = opt(4096, "held-out frames and transitions scored at checkpoints (all at the end)")
    drift_steps: int = opt(32, "steps of the held-out paths the odometry is integrated over (drift metric)")


@dataclass
class GeometrySet:
    """Pooled frames with their depth, and the transitions between them: transition i is
    ``frames[prev[i]] -> frames[prev[i] + 1]`` under ``action[i]``, the camera moving ``motion[i]``."""

    frames: torch.Tensor  # (F, 3, h, w) uint8
    depth: torch.Tensor  # (F, h, w) uint8
    pose: torch.Tensor  # (F, 5) float64, the recorded pose of each frame
    prev: torch.Tensor  # (M,) int64
    action: torch.Tensor  # (M, 10) float32
    motion: torch.Tensor  # (M, 5) float32, MOTION_FIELDS

    def to(self, device: torch.device) -> GeometrySet:
        return GeometrySet(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def build_set(ds: Dataset, episodes: list[int], head: GeometryHead) -> GeometrySet:
    """Frames, depth and transitions of ``episodes`` of ``ds``, pooled by ``head`` (CPU)."""
    missing = [f for f in ("depth", "pose") if f not in ds.fields]
    if missing:
        raise ValueError(
            f"{ds.root}: the geometry head learns from recorded {' and '.join(missing)}, which this "
            f"dataset does not have (`worldgen record --env doom` records both)"
        )
    frames, depth, pose, prev, acts, motion = [], [], [], [], [], []
    offset = 0
    for e in episodes:
        n = ds.episodes[e].length
        frames.append(head.prepare(torch.from_numpy(ds.read(e, "frames"))))
        d = torch.from_numpy(ds.read(e, "depth")).float()[:, None]
        if head.cfg.depth_downsample > 1:
            d = F.avg_pool2d(d, head.cfg.depth_downsample)
        depth.append(d[:, 0].round().to(torch.uint8))
        p = ds.read(e, "pose").astype(np.float64)
        pose.append(torch.from_numpy(p))
        prev.append(torch.arange(offset, offset + n - 1))
        acts.append(torch.from_numpy(actions.to_vector(ds.read(e, "keys")[: n - 1], ds.read(e, "mouse")[: n - 1])))
        motion.append(torch.from_numpy(motion_between(p[:-1], p[1:])).float())
        offset += n
    if not frames or offset < 2:
        raise ValueError(f"{ds.root}: no frames in the {len(episodes)} episodes given")
    return GeometrySet(
        torch.cat(frames),
        torch.cat(depth),
        torch.cat(pose),
        torch.cat(prev),
        torch.cat(acts).float(),
        torch.cat(motion),
    )


def geometry_loss(
    model: nn.Module,
    s: GeometrySet,
    frames: torch.Tensor,
    trans: torch.Tensor,
    motion_scale: torch.Tensor,
    depth_weight: float,
) -> torch.Tensor:
    """Depth L1 on frames ``frames`` plus odometry smooth L1 on transitions ``trans`` (indices),
    motion in units of ``motion_scale``."""
    depth, motion = model(s.frames[frames], s.frames[s.prev[trans]], s.frames[s.prev[trans] + 1], s.action[trans])
    return depth_weight * F.l1_loss(depth.float(), s.depth[frames].float() / 255.0) + F.smooth_l1_loss(
        motion.float(), s.motion[trans] / motion_scale
    )


def drift_windows(prev: torch.Tensor, steps: int) -> torch.Tensor:
    """First transitions of non-overlapping runs of ``steps`` consecutive transitions (one episode).

    Example:
        >>> drift_windows(torch.tensor([0, 1, 2, 3, 5, 6, 7]), 2).tolist()   # frame 4 ends an episode
        [0, 2, 4]
    """
    out, i = [], 0
    p = prev.tolist()
    while i + steps <= len(p):
        if p[i + steps - 1] - p[i] == steps - 1:
            out.append(i)
            i += steps
        else:
            i += 1
    return torch.tensor(out, dtype=torch.long)


class GeometryTask:
    """The :class:`~worldgen.training.common.Task` of fitting a geometry head."""

    def __init__(
        self,
        cfg: GeometryTrainConfig,
        model: GeometryHead,
        train_set: GeometrySet,
        eval_set: GeometrySet,
        d: Dist,
        eval_split: str = "heldout",
    ):
        self.cfg, self.model, self.device, self.dist = cfg, model, d.device, d
        self.train_set, self.eval_set, self.eval_split = train_set.to(d.device), eval_set.to(d.device), eval_split
        model.motion_scale.copy_(train_set.motion.std(0).clamp_min(1e-3))
        # The baseline a depth map must beat: the train frames' mean depth, pixel by pixel.
        self.mean_depth = train_set.depth.float().mean(0).to(d.device)
        self.tokens_per_sample = 1  # "tokens/s" in the log are samples (a frame and a transition) per second
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_run(cls, cfg: GeometryTrainConfig, run: Run, d: Dist) -> GeometryTask:
        from worldgen.training.tokenizer import open_dataset

        ds, train, held = open_dataset(cfg)
        w, h = ds.resolution
        down = pool_factor(w, h, cfg.downsample or max(1, w // 80))
        torch.manual_seed(cfg.seed)
        head = GeometryHead(
            GeometryHeadConfig(
                frame_size=(h, w),
                downsample=down,
                depth_downsample=pool_factor(w, h, cfg.depth_downsample or max(1, w // 40), down),
            )
        )
        t0 = time.time()
        train_set, eval_set = build_set(ds, train, head), build_set(ds, held or train, head)
        if d.main:
            print(
                f"[train] geometry head: {len(train_set.frames)} train frames, {len(train_set.prev)} transitions; "
                f"{len(eval_set.frames)} {'heldout' if held else 'train'} frames for metrics; frames pooled {down}x, "
                f"depth {head.cfg.depth_downsample}x ({time.time() - t0:.1f} s)",
                file=sys.stderr,
            )
        return cls(cfg, head, train_set, eval_set, d, "heldout" if held else "train")

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        s, b = self.train_set, self.cfg.batch_size
        frames = torch.randint(len(s.frames), (b,), generator=generator, device=self.device)
        trans = torch.randint(len(s.prev), (b,), generator=generator, device=self.device)
        frames, trans = self.dist.shard(frames), self.dist.shard(trans)  # this rank's rows of the global batch
        return geometry_loss(model, s, frames, trans, self.model.motion_scale, self.cfg.depth_weight)

    def flops_per_sample(self) -> float | None:
        return None  # MFU of a head this small says nothing; samples/s is logged

    @torch.no_grad()
    def _metrics(self, model: nn.Module, n: int | None, batch: int = 256) -> dict[str, Any]:
        s, split = self.eval_set, self.eval_split
        nf = len(s.frames) if n is None else min(n, len(s.frames))
        nt = len(s.prev) if n is None else min(n, len(s.prev))
        err, base, close = 0.0, 0.0, 0.0
        for a in range(0, nf, batch):
            i = torch.arange(a, min(a + batch, nf), device=self.device)
            with autocast(self.device):
                pred = model.depth(s.frames[i]).float() * 255.0
            true = s.depth[i].float()
            err += (pred - true).abs().sum().item()
            base += (self.mean_depth - true).abs().sum().item()
            ratio = torch.maximum(pred.clamp_min(1) / true.clamp_min(1), true.clamp_min(1) / pred.clamp_min(1))
            close += (ratio < 1.25).float().sum().item()
        pixels = nf * s.depth[0].numel()
        motion = torch.cat(
            [self._motion(model, torch.arange(a, min(a + batch, nt), device=self.device)) for a in range(0, nt, batch)]
        )  # (nt, 5)
        true_m = s.motion[:nt].double()
        res: dict[str, Any] = {
            f"{split}_depth": {
                "mae_levels": err / pixels,
                "mean_map_mae_levels": base / pixels,
                "delta_1.25": close / pixels,
                "frames": nf,
            },
            f"{split}_motion": {
                f: {
                    "mae": float((motion[:, k] - true_m[:, k]).abs().mean()),
                    "zero_motion_mae": float(true_m[:, k].abs().mean()),
                }
                for k, f in enumerate(MOTION_FIELDS)
            },
        }
        res[f"{split}_motion"]["transitions"] = nt
        i = torch.randperm(nt, generator=torch.Generator().manual_seed(0))[: min(nt, 1024)].to(self.device)
        with autocast(self.device):
            loss = geometry_loss(model, s, i.remainder(nf), i, model.motion_scale, self.cfg.depth_weight).item()
        res["heldout_loss"] = loss
        res[f"{split}_drift"] = self._drift(model)
        return res

    def _motion(self, model: nn.Module, i: torch.Tensor) -> torch.Tensor:
        s = self.eval_set
        with autocast(self.device):
            m = model.motion(s.frames[s.prev[i]], s.frames[s.prev[i] + 1], s.action[i]).float()
        return (m * model.motion_scale).double()

    @torch.no_grad()
    def _drift(self, model: nn.Module) -> dict[str, Any]:
        """Odometry integrated over held-out paths of ``drift_steps`` steps from their true start."""
        s, k = self.eval_set, self.cfg.drift_steps
        starts = drift_windows(s.prev.cpu(), k)
        if not len(starts):
            return {"paths": 0}
        idx = (starts[:, None] + torch.arange(k)).to(self.device)  # (P, k) transitions
        motion = self._motion(model, idx.flatten()).reshape(*idx.shape, 5).cpu().numpy()
        pose = s.pose.cpu().numpy()
        first = s.prev[idx[:, 0]].cpu().numpy()
        est = pose[first]
        for t in range(k):
            est = integrate(est, motion[:, t])
        true_end = pose[first + k]
        steps = np.linalg.norm(np.diff(pose[first[:, None] + np.arange(k + 1)][..., :2], axis=1), axis=-1)
        yaw_err = np.abs((est[:, 3] - true_end[:, 3] + 180) % 360 - 180)
        return {
            "paths": len(first),
            "steps": k,
            "position_error": float(np.linalg.norm(est[:, :2] - true_end[:, :2], axis=1).mean()),
            "distance_walked": float(steps.sum(1).mean()),
            "displacement": float(np.linalg.norm(true_end[:, :2] - pose[first][:, :2], axis=1).mean()),
            "yaw_error_deg": float(yaw_err.mean()),
        }

    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        self.metrics = self._metrics(ema_model, self.cfg.eval_transitions)
        split = self.eval_split
        return {
            "heldout_loss": self.metrics["heldout_loss"],
            "depth_mae_levels": self.metrics[f"{split}_depth"]["mae_levels"],
            "drift_position_error": self.metrics[f"{split}_drift"].get("position_error", float("nan")),
        }

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        self.metrics = self._metrics(ema_model, None)
        return self.metrics

    @torch.no_grad()
    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """8 held-out frames over their recorded depth over the predicted depth."""
        s = self.eval_set
        i = torch.linspace(0, len(s.frames) - 1, min(8, len(s.frames))).long().to(self.device)
        pred = ema_model.depth(s.frames[i]).float() * 255

        def gray(d: torch.Tensor) -> np.ndarray:  # at the frames' size, to stack the rows
            d = F.interpolate(d.float()[:, None], size=s.frames.shape[-2:], mode="nearest")[:, 0]
            return d.round().clamp(0, 255).to(torch.uint8)[..., None].expand(*d.shape, 3).cpu().numpy()

        save_image_rows(
            [s.frames[i].movedim(1, -1).cpu().numpy(), gray(s.depth[i]), gray(pred)], folder / f"step-{step:07d}.png"
        )

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        save_head(
            folder,
            ema_model,
            {
                "train": {"data": str(self.cfg.data), "steps": step, "config": dataclasses.asdict(self.cfg)},
                "metrics": self.metrics,
            },
            dtype=dtype,
        )


def train(cfg: GeometryTrainConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a geometry-head training run in ``cfg.out``; returns its summary.

    Example:
        >>> train(GeometryTrainConfig(data="data/geometry-doom", out="runs/geometry", minutes=5))  # doctest: +SKIP
    """
    return common.train("geometry", cfg, given, GeometryTask.from_run)
