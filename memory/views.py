"""Cache views for training: each frame of a window seen through the cloud of the frames before it.

A model conditioned on the world cache sees, with every frame, the cache rendered at that
frame's camera pose (DESIGN.md section 7). In play the cache holds what the session generated;
in training :func:`history_views` builds it from the window's own earlier frames (their recorded
depth and true poses) and renders it at the frame's pose plus :class:`PoseNoise`, so the model
meets the holes, the stale sprites and the misaligned edges a played cache has, and learns to
repair the view rather than copy it.

All frames of all windows render at once: the cloud of frame ``t`` of window ``b`` is session
``b * T + t`` of one :class:`~worldgen.memory.cloud.WorldCache`, fused from its ``history``
predecessors (newest first, so the newest observation of a surface is the one kept); the only
Python loop is over ``history``.

Example:
    >>> from worldgen.memory.camera import DOOM
    >>> cam = DOOM.resized(32, 24)
    >>> rgb = torch.zeros(2, 4, 24, 32, 3, dtype=torch.uint8)
    >>> depth = torch.full((2, 4, 24, 32), 20.0)
    >>> pose = torch.zeros(2, 4, 5)
    >>> view = history_views(cam, rgb, depth, pose, history=2)
    >>> view.rgb.shape, view.mask[:, 0].any().item(), view.mask[:, 1:].all().item()
    (torch.Size([2, 4, 24, 32, 3]), False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .camera import Camera
from .cloud import CacheConfig, View, WorldCache


@dataclass(frozen=True)
class PoseNoise:
    """Gaussian error added to the pose a training view is rendered at (standard deviations).

    In play the pose comes from a prediction, so the cache view is a little off; trained on exact
    poses a model would trust misaligned views."""

    position: float = 2.0  # world units: a third of a ViZDoom depth level
    yaw: float = 1.0  # degrees: a sixth of a typical mouse turn per step
    pitch: float = 0.25  # degrees: pitch rarely moves in play

    def sample(
        self, shape: torch.Size, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Noise ``(*shape, 5)`` for poses ``(x, y, z, yaw, pitch)``."""
        scale = torch.tensor([self.position] * 3 + [self.yaw, self.pitch], device=device)
        return torch.randn(*shape, 5, generator=generator, device=device) * scale


def history_views(
    camera: Camera,
    rgb: torch.Tensor,
    depth: torch.Tensor,
    pose: torch.Tensor,
    history: int,
    config: CacheConfig | None = None,
    noise: PoseNoise | None = None,
    generator: torch.Generator | None = None,
) -> View:
    """For windows ``rgb (B, T, H, W, 3)`` uint8, ``depth (B, T, H, W)`` levels and ``pose (B, T, 5)``:
    each frame's view of the cloud of its ``history`` predecessors in the window, rendered at its
    pose (plus ``noise``). Returns a :class:`View` of ``(B, T, ...)`` tensors; frame 0 of each
    window has nothing before it, so its mask is all False."""
    if rgb.dim() != 5 or depth.shape != rgb.shape[:-1] or pose.shape != (*rgb.shape[:2], 5):
        raise ValueError(
            f"need rgb (B, T, H, W, 3), depth (B, T, H, W), pose (B, T, 5); got "
            f"{tuple(rgb.shape)}, {tuple(depth.shape)}, {tuple(pose.shape)}"
        )
    if history < 1:
        raise ValueError(f"history must be >= 1, got {history}")
    b, t = rgb.shape[:2]
    config = config or CacheConfig(max_points=history * camera.width * camera.height)
    cache = WorldCache(camera, config, batch=b * t, device=rgb.device)
    steps = torch.arange(t, device=rgb.device).repeat(b)  # (B*T,) frame index of each session
    flat = lambda x: x.reshape(b * t, *x.shape[2:])  # noqa: E731  (B, T, ...) -> (B*T, ...)
    rgb_f, depth_f, pose_f = flat(rgb), flat(depth), flat(pose).float()
    for k in range(1, history + 1):  # newest predecessor first
        src = torch.arange(b * t, device=rgb.device) - k  # session of frame t - k
        active = steps >= k
        src = torch.where(active, src, torch.arange(b * t, device=rgb.device))
        cache.update(rgb_f[src], depth_f[src], pose_f[src], active=active)
    at = pose_f if noise is None else pose_f + noise.sample(pose_f.shape[:1], generator, rgb.device)
    view = cache.render(at)
    return View(*(x.reshape(b, t, *x.shape[1:]) for x in view))
