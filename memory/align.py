"""Correct a predicted camera pose from the frame made there: its depth and colour aligned with the cloud.

The motion model (:mod:`~worldgen.memory.motion`) predicts where the next frame's camera is from
the actions and the last motion, before the frame exists. It cannot see walls: a walk into one,
a door, a step or a slide along a wall moves the camera less (or elsewhere) than the keys say,
and integrated over a session the error grows without bound (hundreds of map units after 64
frames of explore play, ``benchmarks/pose_drift.py``). Once the frame is there (generated with
its depth, or recorded), its depth and colour say where the camera really was: the cloud's
surfaces must land on the frame's. :func:`refine_pose` takes the cloud's front points seen from
the predicted pose (:meth:`~worldgen.memory.cloud.WorldCache.render_front`: the points
themselves, not their splats), projects them into candidate cameras around it (forward, right
and, optionally, yaw offsets) and keeps the one where they best match the frame's depth and
colour, coarse to fine on a grid, batched over sessions. This is projective alignment (as in
KinectFusion's tracking), with a grid search in place of Gauss-Newton: the cost has plateaus and
jumps at depth edges, and a few hundred candidates per session are cheap next to a DiT step.

Example:
    >>> from worldgen.memory.camera import DOOM
    >>> from worldgen.memory.cloud import WorldCache
    >>> cam = DOOM.resized(32, 24)
    >>> cache = WorldCache(cam)
    >>> wall = torch.full((1, 24, 32), 100.0)                      # planar depth in map units
    >>> start = torch.tensor([[0.0, 0, 41, 0, 0]])
    >>> cache.update(torch.zeros(1, 24, 32, 3, dtype=torch.uint8), cam.world_to_depth(wall), start)
    >>> guess = torch.tensor([[14.0, 0, 41, 0, 0]])                # the keys said 14 units forward ...
    >>> seen = cam.world_to_depth(wall - 6)                         # ... the frame shows 6
    >>> view, front = cache.render_front(guess)
    >>> fixed, cover = refine_pose(cam, view, front, view.rgb, seen, guess)
    >>> [round(float(v), 1) for v in fixed[0, :2]], float(cover)
    ([6.0, 0.0], 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .camera import Camera
from .cloud import View
from .motion import compose


@dataclass(frozen=True)
class AlignConfig:
    """The search of :func:`refine_pose`."""

    step: float = 8.0  # map units between forward and right candidates at the first level (a step is ~11)
    yaw_step: float = 0.0  # degrees between yaw candidates; 0: not searched (searched, yaw came out worse)
    levels: int = 4  # each halves the spacings: the last level's is step / 8 (1 unit)
    radius: int = 2  # candidates per axis per level: 2 * radius + 1 (25 per level for 2 axes)
    stride: int = 4  # every stride-th pixel of each row and column is scored (1,200 at 160x120)
    trunc: float = 16.0  # map units: the robust cap of a pixel's depth residual ...
    trunc_rel: float = 0.1  # ... plus this share of its depth (far levels are coarse)
    color: float = 0.3  # map units of cost per level of colour difference (0-255, mean over RGB): depth
    # alone cannot tell a slide along a bare wall; its texture can
    color_trunc: float = 48.0  # colour levels: the robust cap of a pixel's colour difference
    min_overlap: float = 0.25  # share of the view's scored points that must land on the frame, else no change
    min_gain: float = 0.5  # map units of mean residual the best fit must beat the prediction by, else no change
    # (chosen on seed-7 validation play: drift after 16 and 64 steps 33 and 99 units, 43 and 107 at 0)
    prior: float = 0.01  # map units of cost per first-level spacing of offset: among equal fits (a bare
    # wall says nothing of sliding along it) the one nearest the prediction wins

    def __post_init__(self) -> None:
        if self.levels < 1 or self.radius < 1 or self.stride < 1:
            raise ValueError(f"levels, radius and stride must be >= 1, got {self.levels}, {self.radius}, {self.stride}")
        if self.step <= 0 or self.yaw_step < 0 or self.trunc <= 0:
            raise ValueError(
                f"step and trunc must be > 0 and yaw_step >= 0, got {self.step}, {self.yaw_step}, {self.trunc}"
            )


def _grid(radius: int, yaw: bool, device: torch.device) -> torch.Tensor:
    """The (K, 3) integer offsets of a level: forward, right (and yaw) in [-radius, radius]."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    axes = (r, r, r if yaw else torch.zeros(1, device=device))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _cost(
    camera: Camera,
    depth: torch.Tensor,
    rgb: torch.Tensor,
    points: torch.Tensor,
    colors: torch.Tensor,
    valid: torch.Tensor,
    candidates: torch.Tensor,
    cfg: AlignConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean truncated depth residual and cover of each candidate pose ``(B, K, 5)``.

    ``points (B, N, 3)``: cloud points in world space (``valid (B, N)``), each projected into the
    frame's camera at the candidate; where it lands on the frame's geometry, its residual is its
    planar depth against the frame's depth there (world units ``depth (B, H, W)``, NaN where not
    geometry). Points that land off the image or off the geometry do not count: walking forward
    loses the edges of the last view, and charging them would pull the pose back."""
    b, k = candidates.shape[:2]
    h, w = depth.shape[-2:]
    uv, z = camera.project(points[:, None], candidates)  # (B, K, N, 2), (B, K, N)
    col, row = uv[..., 0].floor().long(), uv[..., 1].floor().long()
    inside = (z > camera.near) & (col >= 0) & (col < w) & (row >= 0) & (row < h) & valid[:, None]
    flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(b, -1)  # (B, K * N)
    there = depth.reshape(b, -1).gather(1, flat).view_as(z)
    cover = inside & ~there.isnan()
    residual = (z - there).abs().minimum(cfg.trunc + cfg.trunc_rel * there.nan_to_num())
    if cfg.color > 0:
        seen = rgb.reshape(b, -1, 3).gather(1, flat[..., None].expand(-1, -1, 3)).view(*z.shape, 3)
        residual = residual + cfg.color * (seen - colors[:, None]).abs().mean(-1).clamp_max(cfg.color_trunc)
    residual = torch.where(cover, residual, torch.zeros_like(residual))
    n = cover.sum(-1)  # (B, K)
    return residual.sum(-1) / n.clamp_min(1), n / valid.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def refine_pose(
    camera: Camera,
    view: View,
    front: torch.Tensor,
    rgb: torch.Tensor,
    depth: torch.Tensor,
    pose: torch.Tensor,
    cfg: AlignConfig = AlignConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pose ``(B, 5)`` near the predicted ``pose`` at which the frame ``rgb (B, H, W, 3)``
    uint8 with depth levels ``depth (B, H, W)`` best fits the cloud, whose view from ``pose`` is
    ``view`` with its front points ``front (B, H, W, 3)``
    (:meth:`~worldgen.memory.cloud.WorldCache.render_front`); and each session's cover ``(B,)``:
    the share of those points that land on the frame's geometry. Height and pitch stay as
    predicted (the recorded height includes Doom's view bob, which the motion model learns).
    Where the cover is under ``cfg.min_overlap`` (a new room, an empty cloud), or the best fit is
    not ``cfg.min_gain`` better than the prediction's, the prediction stands."""
    pose = pose.float()
    s = cfg.stride
    points = front[:, s // 2 :: s, s // 2 :: s].flatten(1, 2).float()  # (B, N, 3): a fixed subsample
    colors = view.rgb[:, s // 2 :: s, s // 2 :: s].flatten(1, 2).float()
    valid = view.mask[:, s // 2 :: s, s // 2 :: s].flatten(1)
    # A 3x3 blur of the frame: Doom's pixel-sharp textures would make the colour cost a comb.
    seen = F.avg_pool2d(rgb.permute(0, 3, 1, 2).float(), 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1)
    level = depth.float()
    z = camera.depth_to_world(level)
    geometry = (level >= camera.min_level) & (level < camera.max_level) & (z > camera.near)
    z = torch.where(geometry, z, torch.full_like(z, float("nan")))

    grid = _grid(cfg.radius, cfg.yaw_step > 0, pose.device)  # (K, 3)
    first = torch.tensor([cfg.step, cfg.step, max(cfg.yaw_step, 1e-6)], device=pose.device)
    rows = torch.arange(len(pose), device=pose.device)
    best = torch.zeros(len(pose), 3, device=pose.device)  # forward, right, yaw offsets
    cover = torch.zeros(len(pose), device=pose.device)
    for level_i in range(cfg.levels):
        offsets = best[:, None] + grid * first / 2**level_i  # (B, K, 3)
        candidates = compose(pose[:, None].expand(-1, len(grid), -1), _step(offsets))  # (B, K, 5)
        cost, share = _cost(camera, z, seen, points, colors, valid, candidates, cfg)
        if level_i == 0:
            predicted = cost[:, len(grid) // 2]  # the grid's centre: no offset
        cost = cost + cfg.prior * (offsets / first).abs().sum(-1)
        pick = cost.argmin(1)
        best, cover, found = offsets[rows, pick], share[rows, pick], cost[rows, pick]
    fixed = compose(pose, _step(best))
    keep = (cover < cfg.min_overlap) | (predicted - found < cfg.min_gain)
    return torch.where(keep[:, None], pose, fixed), cover


def _step(offsets: torch.Tensor) -> torch.Tensor:
    """Forward, right, yaw offsets ``(..., 3)`` as motions ``(..., 5)`` (height and pitch unchanged)."""
    zero = torch.zeros_like(offsets[..., :1])
    return torch.cat([offsets[..., :2], zero, offsets[..., 2:], zero], -1)
