"""The camera of a world: poses, pinhole projection, depth units and the view frustum.

A pose is ``(x, y, z, yaw, pitch)`` (:data:`worldgen.data.dataset.POSE_FIELDS`): the eye in
world units, ``z`` up, ``yaw`` in degrees counter-clockwise from +x, ``pitch`` in degrees with
> 0 looking up. The camera looks along ``(cos yaw, sin yaw, 0)``; image ``u`` grows to the
right, ``v`` downwards, pixel ``(i, j)`` has its centre at ``(u, v) = (j + 0.5, i + 0.5)``.

Pitch is a vertical *shear*, not a rotation: Doom's software renderer looks up and down by moving
the horizon row (``cy``) by ``fy * tan(pitch)``, so walls stay vertical on screen. A world whose
renderer rotates the camera would need another model; ViZDoom's fits this one (below).

Depth in a dataset is a stored level (ViZDoom: uint8, larger = farther, see
:mod:`worldgen.data.dataset`); :class:`Camera` maps it to *planar* depth (distance along the view
axis, not along the ray) as ``depth_scale * level + depth_offset`` and marks levels at or above
``max_level`` (sky and the far clip saturate there) or below ``min_level`` invalid.

ViZDoom (:data:`DOOM`, measured with ``benchmarks/fit_camera.py``, ViZDoom 1.3.2): a pinhole
from the 90-degree horizontal field of view, ``fx = 80``, ``cx, cy = 80, 60`` at 160x120, and
``fy = 88`` (free fits of fx land at 80.2-80.9, of fy at 87-88 on explore play over E1M1-E1M8);
the depth buffer is *planar* depth (a floor row reads one level across), ``6.7 * level + 8`` map
units (free fits on explore play: 6.68-6.72 and 7.8-8.2; scripted E1M1 walking alone fitted
6.25 and 10: on explore play its next-frame render from the cloud is 0.12 dB lower and the pose
correction drifts more, docs/world_cache.md), 255 = sky/far, 0 = the weapon sprite (nothing in the world is
nearer than the player's radius, 16 units); looking up moves the horizon by ``96 * tan(pitch)``
pixels: Doom's 1.2 pixel aspect (a free fit gives 95.9). Reprojection error (each frame's depth
reprojected into the next frame's, compared with what that frame sees) on 120 frames of each of
two explore-play episodes: median 0.36 and 0.44 levels, 87% and 83% within 2 levels (the
6.25-and-10 preset: 0.41 and 0.47 levels).
Frames recorded at another resolution (the tests' 32x24) use :meth:`Camera.resized`.

Everything is batched torch: poses ``(..., 5)``, points ``(..., 3)``; nothing loops in Python.

Example:
    >>> cam = DOOM.resized(32, 24)
    >>> pose = torch.tensor([[0.0, 0.0, 41.0, 90.0, 0.0]])          # at the origin, looking along +y
    >>> depth = torch.full((1, 24, 32), 20.0)                        # a wall 20 levels away
    >>> points, valid = cam.unproject(depth, pose)                   # (1, 24, 32, 3), (1, 24, 32)
    >>> uv, z = cam.project(points.flatten(1, 2), pose)
    >>> torch.allclose(uv.view(1, 24, 32, 2)[0, 3, 5], torch.tensor([5.5, 3.5]), atol=1e-3)
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

POSE_DIM = 5  # x, y, z, yaw, pitch


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics at one resolution plus the world's depth units."""

    width: int
    height: int
    fx: float  # pixels per unit of (right / forward)
    fy: float  # pixels per unit of (up / forward)
    cx: float  # principal point, in pixels from the left edge (not a pixel index)
    cy: float  # horizon row at pitch 0, in pixels from the top edge
    depth_scale: float = 1.0  # world units per stored depth level
    depth_offset: float = 0.0  # world units at level 0
    max_level: float = math.inf  # levels >= this are not geometry (sky, far clip)
    min_level: float = -math.inf  # levels < this are not geometry (ViZDoom draws the weapon sprite at 0)
    pitch_shear: float | None = None  # pixels the horizon moves per tan(pitch); None = fy
    near: float = 1e-3  # points closer than this (in world units) do not project

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"camera size must be positive, got {self.width}x{self.height}")
        if self.fx <= 0 or self.fy <= 0 or self.depth_scale <= 0:
            raise ValueError(f"fx, fy and depth_scale must be > 0, got {self.fx}, {self.fy}, {self.depth_scale}")

    @classmethod
    def from_hfov(cls, width: int, height: int, hfov_deg: float, **depth) -> Camera:
        """Square pixels, principal point at the centre, ``hfov_deg`` across the width."""
        if not 0 < hfov_deg < 180:
            raise ValueError(f"hfov_deg must be in (0, 180), got {hfov_deg}")
        f = width / 2 / math.tan(math.radians(hfov_deg) / 2)
        return cls(width, height, f, f, width / 2, height / 2, **depth)

    def resized(self, width: int, height: int) -> Camera:
        """The same camera for frames resized to ``width x height`` (same field of view)."""
        sx, sy = width / self.width, height / self.height
        return dataclasses.replace(
            self,
            width=width,
            height=height,
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=self.cx * sx,
            cy=self.cy * sy,
            pitch_shear=None if self.pitch_shear is None else self.pitch_shear * sy,
        )

    @property
    def hfov_deg(self) -> float:
        return math.degrees(2 * math.atan(self.width / 2 / self.fx))

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(self).items()
        }  # JSON has no infinity

    @classmethod
    def from_dict(cls, d: dict) -> Camera:
        d = dict(d)
        if d.get("max_level") is None:
            d["max_level"] = math.inf
        if d.get("min_level") is None:
            d["min_level"] = -math.inf
        return cls(**d)

    # depth units -----------------------------------------------------------------------------

    def depth_to_world(self, level: torch.Tensor) -> torch.Tensor:
        """Stored depth levels -> planar depth in world units (same shape)."""
        return level.float() * self.depth_scale + self.depth_offset

    def world_to_depth(self, z: torch.Tensor) -> torch.Tensor:
        """Planar depth in world units -> (fractional) stored levels."""
        return (z - self.depth_offset) / self.depth_scale

    # geometry --------------------------------------------------------------------------------

    def unproject(self, depth: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth levels ``(..., H, W)`` seen from ``pose (..., 5)`` -> world points ``(..., H, W, 3)``
        and their validity ``(..., H, W)`` (False where the level is sky/far or non-positive)."""
        self._check_image(depth)
        h, w = depth.shape[-2:]
        z = self.depth_to_world(depth)  # (..., H, W) planar depth
        valid = (depth >= self.min_level) & (depth < self.max_level) & (z > self.near)
        u = torch.arange(w, device=depth.device, dtype=z.dtype) + 0.5  # (W,)
        v = torch.arange(h, device=depth.device, dtype=z.dtype) + 0.5  # (H,)
        cy = self.horizon(pose)[..., None, None]  # (..., 1, 1)
        right = (u - self.cx) / self.fx * z  # (..., H, W)
        up = (cy - v[:, None]) / self.fy * z  # (..., H, W)
        points = self.camera_to_world(torch.stack([z, right, up], -1), pose)
        return points, valid

    def project(self, points: torch.Tensor, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World points ``(..., N, 3)`` -> pixel coordinates ``(..., N, 2)`` as ``(u, v)`` and planar
        depth in world units ``(..., N)`` in the camera at ``pose (..., 5)``. A point is in view
        where ``z > near`` and ``0 <= u < width``, ``0 <= v < height`` (see :meth:`in_view`)."""
        cam = self.world_to_camera(points, pose)  # (..., N, 3) forward, right, up
        z = cam[..., 0]
        zs = z.clamp_min(self.near)
        u = self.cx + self.fx * cam[..., 1] / zs
        v = self.horizon(pose)[..., None] - self.fy * cam[..., 2] / zs
        return torch.stack([u, v], -1), z

    def in_view(self, points: torch.Tensor, pose: torch.Tensor, max_depth: float = math.inf) -> torch.Tensor:
        """Whether each world point ``(..., N, 3)`` lies in the view frustum of ``pose (..., 5)``:
        in front of the camera (and nearer than ``max_depth`` world units) and inside the image."""
        uv, z = self.project(points, pose)
        return (
            (z > self.near)
            & (z < max_depth)
            & (uv[..., 0] >= 0)
            & (uv[..., 0] < self.width)
            & (uv[..., 1] >= 0)
            & (uv[..., 1] < self.height)
        )

    def horizon(self, pose: torch.Tensor) -> torch.Tensor:
        """Row of the horizon ``(...,)``: ``cy`` moved down by ``pitch_shear * tan(pitch)`` when looking up."""
        shear = self.fy if self.pitch_shear is None else self.pitch_shear
        return self.cy + shear * torch.tan(torch.deg2rad(pose[..., 4].float()))

    def _check_image(self, image: torch.Tensor) -> None:
        if image.shape[-2:] != (self.height, self.width):
            raise ValueError(
                f"image is {tuple(image.shape[-2:])} (H, W) but the camera is "
                f"{self.height}x{self.width}; use Camera.resized"
            )

    # frames ----------------------------------------------------------------------------------

    @staticmethod
    def axes(pose: torch.Tensor) -> torch.Tensor:
        """Camera axes in world coordinates ``(..., 3, 3)``: rows forward, right, up (yaw only:
        pitch is a shear, see the module docstring)."""
        yaw = torch.deg2rad(pose[..., 3].float())
        c, s = torch.cos(yaw), torch.sin(yaw)
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        return torch.stack(
            [torch.stack([c, s, zero], -1), torch.stack([s, -c, zero], -1), torch.stack([zero, zero, one], -1)], -2
        )

    @classmethod
    def world_to_camera(cls, points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """World points ``(..., N, 3)`` -> camera coordinates (forward, right, up) ``(..., N, 3)``;
        ``pose (..., 5)`` broadcasts over N (points may also be ``(..., H, W, 3)``)."""
        return cls._rotate(points - cls._eye(points, pose), pose, inverse=False)

    @classmethod
    def camera_to_world(cls, cam: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """Camera coordinates (forward, right, up) ``(..., N, 3)`` -> world points ``(..., N, 3)``."""
        return cls._eye(cam, pose) + cls._rotate(cam, pose, inverse=True)

    @staticmethod
    def _eye(vectors: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        """The camera position of ``pose (..., 5)``, shaped to broadcast over ``vectors (..., N, 3)``."""
        extra = vectors.dim() - pose.dim()
        return pose[..., :3].float().reshape(pose.shape[:-1] + (1,) * extra + (3,))

    @classmethod
    def _rotate(cls, vectors: torch.Tensor, pose: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``vectors (..., N, 3)`` (or ``(..., H, W, 3)``) into the axes of ``pose (..., 5)``, or
        back with ``inverse``: one (points, 3) x (3, 3) matmul per pose, which is several times
        faster on a CPU than broadcasting a (..., N, 3, 3) product."""
        extra = vectors.dim() - pose.dim()
        shape = torch.broadcast_shapes(vectors.shape, pose.shape[:-1] + (1,) * extra + (3,))
        lead = shape[: pose.dim() - 1]
        r = cls.axes(pose).expand(*lead, 3, 3)  # rows forward, right, up
        flat = vectors.expand(shape).reshape(*lead, -1, 3)
        with torch.autocast(vectors.device.type, enabled=False):  # geometry stays float32 in bf16 sessions
            return (flat.float() @ (r if inverse else r.mT)).reshape(shape)

    @classmethod
    def view_dir(cls, pose: torch.Tensor) -> torch.Tensor:
        """Unit forward direction ``(..., 3)`` of the camera at ``pose``."""
        return cls.axes(pose)[..., 0, :]


def relative_pose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pose ``b`` in the frame of pose ``a`` ``(..., 5)``: forward, right, up (world units), yaw and
    pitch differences in degrees (yaw wrapped to [-180, 180))."""
    d = Camera.world_to_camera(b[..., None, :3].float(), a)[..., 0, :]
    dyaw = torch.remainder(b[..., 3] - a[..., 3] + 180.0, 360.0) - 180.0
    return torch.cat([d, dyaw[..., None], (b[..., 4] - a[..., 4])[..., None]], -1)


# ViZDoom at its 160x120 recording resolution, as fitted (module docstring).
DOOM = dataclasses.replace(
    Camera.from_hfov(160, 120, 90.0, depth_scale=6.7, depth_offset=8.0, min_level=1, max_level=255, pitch_shear=96.0),
    fy=88.0,
)


# fitting ---------------------------------------------------------------------------------------


def reprojection_error(camera: Camera, depth: torch.Tensor, pose: torch.Tensor, gap: int = 1) -> dict:
    """How well ``camera`` explains a recording: every frame's depth ``(N, H, W)`` (levels) is
    unprojected at its pose ``(N, 5)`` and projected into the frame ``gap`` steps later; where a
    point lands in view on valid depth, its predicted planar depth is compared with the depth
    that frame observed at that pixel.

    Occlusion and disocclusion make some comparisons wrong whatever the camera, so the summary is
    robust: ``median_levels`` / ``median_units`` (median absolute error in stored levels / world
    units), ``inliers`` (share within 2 levels) and ``count`` (compared points).
    """
    depth, pose = depth.float(), pose.float()
    if depth.dim() != 3 or pose.shape != (depth.shape[0], POSE_DIM):
        raise ValueError(f"need depth (N, H, W) and pose (N, 5), got {tuple(depth.shape)} and {tuple(pose.shape)}")
    if depth.shape[0] <= gap:
        raise ValueError(f"need more than gap={gap} frames, got {depth.shape[0]}")
    points, valid = camera.unproject(depth[:-gap], pose[:-gap])  # (N-g, H, W, 3), (N-g, H, W)
    uv, z = camera.project(points.flatten(1, 2), pose[gap:])  # (N-g, HW, 2), (N-g, HW)
    seen = valid.flatten(1) & camera.in_view(points.flatten(1, 2), pose[gap:])
    ij = uv.floor().long()
    col = ij[..., 0].clamp(0, camera.width - 1)
    row = ij[..., 1].clamp(0, camera.height - 1)
    target = depth[gap:].flatten(1).gather(1, row * camera.width + col)  # (N-g, HW) levels
    seen &= (target >= camera.min_level) & (target < camera.max_level)
    err = (camera.world_to_depth(z) - target.float())[seen].abs()
    if err.numel() == 0:
        raise ValueError("no point of any frame lands in view of the next: are the poses right?")
    return {
        "median_levels": float(err.median()),
        "median_units": float(err.median() * camera.depth_scale),
        "inliers": float((err < 2).float().mean()),
        "count": int(err.numel()),
    }


def fit_camera(
    depth: torch.Tensor, pose: torch.Tensor, start: Camera, gap: int = 1, rounds: int = 4
) -> tuple[Camera, dict]:
    """Fit ``fx``, ``fy``, ``pitch_shear``, ``depth_scale`` and ``depth_offset`` of ``start`` to a recording (see
    :func:`reprojection_error`) by coordinate search on the mean absolute error of the inliers of
    the start camera's comparison, narrowing the steps each round. Returns the fitted camera and
    its :func:`reprojection_error`."""

    def loss(cam: Camera) -> float:
        r = reprojection_error(cam, depth, pose, gap)
        return r["median_levels"] * cam.depth_scale / (r["inliers"] + 1e-6)  # units, penalising outliers

    best, best_loss = start, loss(start)
    if best.pitch_shear is None:
        best = dataclasses.replace(best, pitch_shear=best.fy)
    # relative steps, but the depth offset's in world units
    steps = {"fx": 0.1, "fy": 0.1, "pitch_shear": 0.1, "depth_scale": 0.1, "depth_offset": 4.0}
    for _ in range(rounds):
        for name, step in steps.items():
            for k in (-3, -2, -1, 1, 2, 3):
                value = getattr(best, name)
                value = value + k * step if name == "depth_offset" else value * (1 + k * step)
                cam = dataclasses.replace(best, **{name: value})
                cam_loss = loss(cam)
                if cam_loss < best_loss:
                    best, best_loss = cam, cam_loss
        steps = {k: v / 3 for k, v in steps.items()}
    return best, reprojection_error(best, depth, pose, gap)
