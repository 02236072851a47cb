"""Depth and camera pose for agents inside a world model: what the model itself does not make.

The world model generates RGB frames. An agent that maps, plans paths or builds a point cloud
also wants each frame's depth and where the camera is. A :class:`GeometryHead` reads both off
the frames, trained on recorded play where both are ground truth (``worldgen train geometry``,
:mod:`worldgen.env.learned.geometry_train`):

* depth: one frame -> the depth buffer the recorder stores (ViZDoom's uint8, larger = farther,
  ~7 map units a level; :mod:`worldgen.env.sources.doom`), by a small encoder-decoder (a U-Net) at a
  quarter of the frame's size, upsampled;
* odometry: one transition (frame, action, next frame) -> the camera's motion in the first
  camera's frame: forward, left, up (map units), yaw, pitch (degrees), by the same kind of trunk
  as the reward head (:class:`~worldgen.env.learned.reward.TransitionEncoder`).

:func:`integrate` adds the odometry up into a pose ``(x, y, z, yaw, pitch)`` (the recorder's
:data:`~worldgen.data.dataset.POSE_FIELDS` and conventions: yaw counter-clockwise from +x); the
env's pose is relative to where an episode starts: the start's last frame at the origin, looking
along +x.
Odometry drifts as any does; ``benchmarks/RESULTS.md`` has the head's held-out depth error and
its drift over held-out paths.

Example:
    >>> head = GeometryHead(GeometryHeadConfig(frame_size=(24, 32), downsample=1, depth_downsample=1))
    >>> f = np.zeros((2, 24, 32, 3), np.uint8)
    >>> predict_depth(head, f).shape, predict_motion(
    ...     head, f, np.zeros((2, 8), np.uint8), np.zeros((2, 2), np.float32), f
    ... ).shape
    ((2, 24, 32), (2, 5))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import actions, checkpoint, models
from worldgen.checkpoint import CheckpointError
from worldgen.env.learned.reward import PACKAGED_HEADS, TransitionEncoder, pool_frames

PART = "geometry"  # checkpoint part name: <folder>/geometry.json + geometry-*.safetensors
MOTION_FIELDS = ("forward", "left", "up", "yaw", "pitch")  # map units and degrees, per step
# Bounds of the pose observation: Doom maps lie within +-32768 map units, so a start-relative
# position within twice that; yaw is wrapped, pitch clamped to looking straight up or down.
POSE_LOW = np.array([-65536.0, -65536.0, -65536.0, -180.0, -90.0], np.float32)
POSE_HIGH = np.array([65536.0, 65536.0, 65536.0, 180.0, 90.0], np.float32)


@dataclass
class GeometryHeadConfig:
    """Architecture of a :class:`GeometryHead` (stored in its checkpoint part)."""

    frame_size: tuple[int, int] = (120, 160)  # (H, W) of the frames it reads: the world model's
    downsample: int = 2  # average-pool frames by this first (the odometry's input, as the reward head's)
    depth_downsample: int = 4  # depth is read and made at frame size / this (walls are smooth), then upsampled
    depth_channels: tuple[int, ...] = (32, 64, 128)  # encoder widths, each halving; the decoder mirrors them
    odometry_channels: tuple[int, ...] = (32, 64, 64, 128)  # transition trunk widths, as the reward head's
    hidden: int = 256

    def __post_init__(self) -> None:
        if self.downsample < 1 or any(s % self.downsample for s in self.frame_size):
            raise ValueError(f"downsample={self.downsample} must be >= 1 and divide frame_size {self.frame_size}")
        if self.depth_downsample % self.downsample or any(s % self.depth_downsample for s in self.frame_size):
            raise ValueError(
                f"depth_downsample={self.depth_downsample} must be a multiple of downsample="
                f"{self.downsample} and divide frame_size {self.frame_size}"
            )


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out), nn.SiLU()
    )


class GeometryHead(nn.Module):
    """Depth of a frame and camera motion of a transition (see the module docstring).

    Inputs are frames prepared by :meth:`prepare` (pooled uint8 ``(B, 3, h, w)``). Outputs are in
    normalised units: depth in [0, 1] (level / 255), motion divided by ``motion_scale`` (the
    per-field std of the training data, a buffer the trainer sets); :func:`predict_depth` and
    :func:`predict_motion` return the recorder's units.
    """

    def __init__(self, cfg: GeometryHeadConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.depth_channels
        self.down = nn.ModuleList(_conv(c_in, c, 2) for c_in, c in zip((3, *widths[:-1]), widths))
        # Decoder: upsample, concatenate the encoder's map of that size (a U-Net), convolve.
        skips = (3, *widths[:-1])[::-1]
        self.up = nn.ModuleList(
            _conv(c_in + s, s if s > 3 else widths[0]) for c_in, s in zip((widths[-1], *skips[:-1]), skips)
        )
        self.depth_out = nn.Conv2d(widths[0], 1, 3, padding=1)
        self.odometry = TransitionEncoder(cfg.odometry_channels, cfg.hidden)
        self.motion_out = nn.Linear(cfg.hidden, len(MOTION_FIELDS))
        self.register_buffer("motion_scale", torch.ones(len(MOTION_FIELDS)))

    def prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` frames -> uint8 ``(B, 3, h, w)`` pooled by ``downsample``."""
        return pool_frames(frames, self.cfg.frame_size, self.cfg.downsample, "geometry head")

    def depth(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared frames ``(B, 3, h, w)`` -> depth ``(B, H / depth_downsample, W / depth_downsample)`` in [0, 1]."""
        h = x.float().div(127.5).sub(1.0)
        if self.cfg.depth_downsample > self.cfg.downsample:
            h = F.avg_pool2d(h, self.cfg.depth_downsample // self.cfg.downsample)
        maps = [h]
        for layer in self.down:
            h = layer(h)
            maps.append(h)
        for layer, skip in zip(self.up, maps[-2::-1]):  # (B, C, h', w') back to the input size
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = layer(torch.cat([h, skip], 1))
        return torch.sigmoid(self.depth_out(h)).squeeze(1)

    def motion(self, prev: torch.Tensor, nxt: torch.Tensor, action_vec: torch.Tensor) -> torch.Tensor:
        """Prepared frames and ``(B, 10)`` action vectors -> normalised motion ``(B, 5)``."""
        return self.motion_out(self.odometry.features(prev, nxt, action_vec))

    def forward(
        self, frames: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor, action_vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both at once, as training wants them (one call, so DDP sees every parameter):
        ``depth(frames)`` and ``motion(prev, nxt, action_vec)``."""
        return self.depth(frames), self.motion(prev, nxt, action_vec)


@torch.no_grad()
def predict_depth(head: GeometryHead, frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` frames -> uint8 ``(B, H, W)`` depth (the recorder's levels)."""
    device = head.motion_scale.device
    d = head.depth(head.prepare(torch.as_tensor(frames).to(device)))[:, None]  # (B, 1, h, w)
    d = F.interpolate(d, size=tuple(head.cfg.frame_size), mode="bilinear", align_corners=False)
    return d[:, 0].mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def predict_motion(
    head: GeometryHead, prev_frames: np.ndarray, keys: np.ndarray, mouse: np.ndarray, frames: np.ndarray
) -> np.ndarray:
    """``(B, 5)`` float64 camera motion (:data:`MOTION_FIELDS`) of B transitions."""
    device = head.motion_scale.device
    prev = head.prepare(torch.as_tensor(prev_frames).to(device))
    nxt = head.prepare(torch.as_tensor(frames).to(device))
    act = torch.as_tensor(actions.to_vector(keys, mouse)).to(device)
    return (head.motion(prev, nxt, act) * head.motion_scale).double().cpu().numpy()


# --- pose <-> motion: the one place the conventions live ---------------------------------------
def wrap_degrees(a: np.ndarray) -> np.ndarray:
    """Angles to [-180, 180)."""
    return (np.asarray(a) + 180.0) % 360.0 - 180.0


def motion_between(pose: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Camera motion ``(..., 5)`` from poses ``pose`` to ``nxt`` (``(..., 5)``, POSE_FIELDS), in the
    frame of the first camera: what the odometry head learns, what :func:`integrate` undoes.

    Example:
        >>> motion_between(np.array([0, 0, 41, 90, 0.0]), np.array([0, 10, 41, 100, -5.0])).round(6).tolist()
        [10.0, 0.0, 0.0, 10.0, -5.0]
    """
    pose, nxt = np.asarray(pose, np.float64), np.asarray(nxt, np.float64)
    yaw = np.radians(pose[..., 3])
    dx, dy = nxt[..., 0] - pose[..., 0], nxt[..., 1] - pose[..., 1]
    return np.stack(
        [
            dx * np.cos(yaw) + dy * np.sin(yaw),
            -dx * np.sin(yaw) + dy * np.cos(yaw),
            nxt[..., 2] - pose[..., 2],
            wrap_degrees(nxt[..., 3] - pose[..., 3]),
            nxt[..., 4] - pose[..., 4],
        ],
        -1,
    )


def integrate(pose: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """The pose after ``motion`` (see :func:`motion_between`), yaw wrapped, pitch and position
    kept within :data:`POSE_LOW`/:data:`POSE_HIGH`.

    Example:
        >>> integrate(np.array([0, 0, 41, 90, 0.0]), np.array([10.0, 0, 0, 10, -5])).round(6).tolist()
        [0.0, 10.0, 41.0, 100.0, -5.0]
    """
    pose, motion = np.asarray(pose, np.float64), np.asarray(motion, np.float64)
    yaw = np.radians(pose[..., 3])
    forward, side = motion[..., 0], motion[..., 1]
    out = np.stack(
        [
            pose[..., 0] + forward * np.cos(yaw) - side * np.sin(yaw),
            pose[..., 1] + forward * np.sin(yaw) + side * np.cos(yaw),
            pose[..., 2] + motion[..., 2],
            wrap_degrees(pose[..., 3] + motion[..., 3]),
            pose[..., 4] + motion[..., 4],
        ],
        -1,
    )
    return np.clip(out, POSE_LOW, POSE_HIGH)


# --- checkpoints --------------------------------------------------------------------------------
def save_head(
    folder: str | os.PathLike,
    head: GeometryHead,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``head`` as the ``geometry`` part of checkpoint folder ``folder`` (atomically)."""
    tensors = {
        k: v.to(dtype) if dtype is not None and v.is_floating_point() and k != "motion_scale" else v
        for k, v in head.state_dict().items()
    }
    config = {"model": dataclasses.asdict(head.cfg), "action_schema": actions.schema(), **dict(extra or {})}
    checkpoint.save(folder, PART, tensors, config)


def load_head(
    folder: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[GeometryHead, dict[str, Any]]:
    """The geometry head of checkpoint folder ``folder`` in eval mode, and its stored config
    (``metrics``, ``train``). Raises :class:`CheckpointError` naming the problem."""
    return models.load_part(folder, PART, GeometryHead, GeometryHeadConfig, device)


def find_head(geometry: Any, model_folder: Path | None, device: torch.device | str | None) -> GeometryHead:
    """What the env's ``geometry`` argument names: ``"learned"`` (the head stored in the model's
    folder, or for the packaged default model the one packaged in ``env/heads/``), a checkpoint
    folder holding one, or a :class:`GeometryHead`."""
    if isinstance(geometry, GeometryHead):
        return geometry.to(device).eval()
    if isinstance(geometry, str) and geometry == "learned":
        folder = checkpoint.stored_head(model_folder, PART, PACKAGED_HEADS)
        if folder is not None:
            return load_head(folder, device)[0]
        raise CheckpointError(
            f"depth and pose observations need a geometry head, and the model folder "
            f"{model_folder} has none ({PART}.json); train one with `worldgen train geometry "
            f"--data DATASET --out RUN` and pass geometry='RUN/ckpt'"
        )
    if isinstance(geometry, (str, os.PathLike)):
        return load_head(geometry, device)[0]
    raise TypeError(f"geometry must be 'learned', a checkpoint folder or a GeometryHead, got {geometry!r}")
