"""Point-cloud world cache: what a batch of sessions has seen of their worlds, as coloured points.

Each session's frames (RGB + depth at a camera pose) are unprojected with the world's
:class:`~worldgen.memory.camera.Camera` and fused into a world-space cloud with Voyager's update
rule (DESIGN.md section 7):

* a pixel adds its point only where the cloud does not already explain it: no cached point
  renders there within ``depth_tol`` of the observed depth, or the one that does has a stored
  normal facing away from the camera (> 90 degrees: that surface's other side);
* a cached point that lands in view *in front of* the observed surface (by more than
  ``depth_tol``) is contradicted by the view (a moved monster, the weapon sprite, a wrong
  generated depth) and is removed.

Memory per session is bounded by ``max_points``: when a frame adds more points than there are
free slots, the oldest points give theirs up. :meth:`WorldCache.render` draws RGB, planar depth
and a validity mask at any pose by z-buffered square splats, sized from each point's footprint
when it was seen. Every operation runs over the whole batch of sessions at once in torch (one
scatter, one sort); no Python loop grows with the batch.

Example:
    >>> from worldgen.memory.camera import DOOM
    >>> cam = DOOM.resized(32, 24)
    >>> cache = WorldCache(cam, CacheConfig(max_points=2048), batch=2)
    >>> rgb = torch.zeros(2, 24, 32, 3, dtype=torch.uint8)
    >>> depth = torch.full((2, 24, 32), 20.0)
    >>> pose = torch.tensor([[0.0, 0, 41, 0, 0], [0.0, 0, 41, 90, 0]])
    >>> cache.update(rgb, depth, pose)
    >>> cache.num_points().tolist()
    [768, 768]
    >>> view = cache.render(pose)
    >>> view.rgb.shape, view.depth.shape, bool(view.mask.all())
    (torch.Size([2, 24, 32, 3]), torch.Size([2, 24, 32]), True)
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .camera import POSE_DIM, Camera


@dataclass(frozen=True)
class CacheConfig:
    """Settings of a :class:`WorldCache` (the same for every session of a batch)."""

    max_points: int = 65536  # per session: 85 frames of 160x120 if nothing were shared; ~2.6 MB a session
    depth_tol_levels: float = 2.0  # a cached point within this many depth levels (+ depth_tol_rel) explains a pixel
    depth_tol_rel: float = 0.05  # ... plus this share of the depth: far levels are coarse and splats slant
    max_splat: int = 2  # splats are at most (2 * max_splat + 1)^2 pixels: bounds the render's work near walls
    splat_scale: float = 1.0  # splat side = this x the point's footprint: 1 tiles a surface seen from where it was seen
    blend_sigma: float = 0.5  # pixels: Gaussian blending of a surface's points, about bilinear resampling

    def __post_init__(self) -> None:
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if self.max_splat < 0 or self.splat_scale <= 0 or self.blend_sigma <= 0:
            raise ValueError(
                f"max_splat must be >= 0, splat_scale and blend_sigma > 0, got "
                f"{self.max_splat}, {self.splat_scale}, {self.blend_sigma}"
            )


class View(NamedTuple):
    """A cache rendered at a batch of poses."""

    rgb: torch.Tensor  # (B, H, W, 3) uint8; 0 where not mask
    depth: torch.Tensor  # (B, H, W) float planar depth in world units; 0 where not mask
    mask: torch.Tensor  # (B, H, W) bool: a cached point covers the pixel


class WorldCache:
    """Point clouds of ``batch`` sessions, each at most ``config.max_points`` points.

    State, all ``(B, P, ...)`` with ``P = max_points`` (a fixed-size pool: memory never grows):
    ``xyz`` world positions, ``rgb`` colours (uint8), ``normal`` unit normals facing the camera
    that saw them, ``size`` world-space footprint (side of the pixel they came from), ``stamp``
    when they were added (frame counter; -1 = free slot).
    """

    def __init__(
        self, camera: Camera, config: CacheConfig = CacheConfig(), batch: int = 1, device: torch.device | str = "cpu"
    ):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.camera, self.config = camera, config
        b, p = batch, config.max_points
        self.xyz = torch.zeros(b, p, 3, device=device)
        self.rgb = torch.zeros(b, p, 3, dtype=torch.uint8, device=device)
        self.normal = torch.zeros(b, p, 3, device=device)
        self.size = torch.zeros(b, p, device=device)
        self.stamp = torch.full((b, p), -1, dtype=torch.long, device=device)
        self.frames = torch.zeros(b, dtype=torch.long, device=device)  # frames fused per session

    @property
    def batch(self) -> int:
        return self.xyz.shape[0]

    @property
    def device(self) -> torch.device:
        return self.xyz.device

    def alive(self) -> torch.Tensor:
        """(B, P) bool: which slots hold a point."""
        return self.stamp >= 0

    def num_points(self) -> torch.Tensor:
        """(B,) points held per session."""
        return self.alive().sum(1)

    def nbytes(self) -> int:
        """Bytes of the whole batch's state (fixed by ``batch`` and ``max_points``)."""
        return sum(t.numel() * t.element_size() for t in (self.xyz, self.rgb, self.normal, self.size, self.stamp))

    def reset(self, sessions: torch.Tensor | None = None) -> None:
        """Forget everything of ``sessions`` ((B,) bool or indices; None = all)."""
        sel = slice(None) if sessions is None else sessions
        self.stamp[sel] = -1
        self.frames[sel] = 0

    _STATE = ("xyz", "rgb", "normal", "size", "stamp", "frames")  # all per-session state, batch first

    def select(self, sessions: torch.Tensor) -> WorldCache:
        """A new cache holding a copy of ``sessions``' clouds ((S,) indices, in that order):
        a pool's sessions of one step, rendered and updated together, then :meth:`assign`-ed back."""
        out = WorldCache.__new__(WorldCache)
        out.camera, out.config = self.camera, self.config
        for name in self._STATE:
            setattr(out, name, getattr(self, name)[sessions])
        return out

    def assign(self, sessions: torch.Tensor, other: WorldCache) -> None:
        """Write ``other``'s clouds (a cache of ``len(sessions)``) into ``sessions`` ((S,) indices)."""
        if other.batch != len(sessions) or other.config.max_points != self.config.max_points:
            raise ValueError(
                f"need a cache of {len(sessions)} sessions of {self.config.max_points} points, got "
                f"{other.batch} of {other.config.max_points}"
            )
        for name in self._STATE:
            getattr(self, name)[sessions] = getattr(other, name)

    def grow(self, extra: int) -> None:
        """Add ``extra`` empty sessions at the end of the batch (the others keep their indices)."""
        fresh = WorldCache(self.camera, self.config, batch=extra, device=self.device)
        for name in self._STATE:
            setattr(self, name, torch.cat([getattr(self, name), getattr(fresh, name)]))

    # rendering -------------------------------------------------------------------------------

    def _splat(self, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Z-buffer the cached points at ``pose (B, 5)``.

        Returns ``zbuf (B, H, W)`` (nearest covering point's planar depth, inf where empty),
        ``winner (B, H, W)`` (its slot, -1 where empty) and ``rgb (B, H, W, 3)`` float: the colours
        of the covering points within the depth tolerance of the nearest, weighted by a Gaussian of
        their distance to the pixel centre. That resamples a surface as bilinear interpolation
        would, where taking the nearest point's colour would alias Doom's pixel-sharp textures.
        """
        cam, cfg = self.camera, self.config
        b, p = self.stamp.shape
        h, w = cam.height, cam.width
        uv, z = cam.project(self.xyz, pose)  # (B, P, 2), (B, P)
        k = cfg.max_splat
        # Only points whose splat can reach the image go on: the rest would only cost memory.
        ok = (
            self.alive()
            & (z > cam.near)
            & (uv[..., 0] > -k - 1)
            & (uv[..., 0] < w + k + 1)
            & (uv[..., 1] > -k - 1)
            & (uv[..., 1] < h + k + 1)
        )
        session, slot = ok.nonzero(as_tuple=True)  # (M,), (M,)
        uv, z = uv[session, slot], z[session, slot]  # (M, 2), (M,)
        # Splat half-side in pixels: the footprint seen from here, never less than the half
        # diagonal of a pixel, so a surface seen at the same scale leaves no cracks.
        half = (cfg.splat_scale * 0.5 * self.size[session, slot] * cam.fx / z).clamp(0.71, k + 0.5)  # (M,)
        # A splat under 3 pixels wide covers only the 3x3 pixels around its own (a pixel two away
        # is 1.5 or more from the point): most points are seen about as far as they were, so
        # testing only those 9 rather than (2k + 1)^2 saves most of the render's work.
        if k > 1:
            small = half < 1.5
            tiers = ((small, 1), (~small, k))
            parts = [self._cover(uv[m], z[m], half[m], session[m], slot[m], r) for m, r in tiers]
        else:
            parts = [self._cover(uv, z, half, session, slot, k)]
        pix, zz, session, slot, d2 = (torch.cat(x) for x in zip(*parts))  # (K,) flat over the batch
        flat_slot = session * p + slot  # (K,) in the (B*P) pool
        zbuf = torch.full((b * h * w,), math.inf, device=self.device).scatter_reduce(0, pix, zz, "amin")
        # Ties at the nearest depth go to the lowest slot: the render is deterministic.
        front = zz <= zbuf[pix]
        winner = torch.full((b * h * w,), p, device=self.device, dtype=torch.long)
        winner = winner.scatter_reduce(0, pix[front], slot[front], "amin")
        winner = torch.where(winner == p, -1, winner)
        # Colour: the front surface's points, blended by their distance to the pixel centre.
        surface = zz <= zbuf[pix] + self._tolerance(zbuf[pix])
        weight = torch.exp(-d2[surface] / (2 * cfg.blend_sigma**2))  # one per (point, pixel) on the surface
        colour = self.rgb.view(-1, 3)[flat_slot[surface]].float() * weight[:, None]
        acc = torch.zeros(b * h * w, 3, device=self.device).index_add_(0, pix[surface], colour)
        norm = torch.zeros(b * h * w, device=self.device).index_add_(0, pix[surface], weight)
        rgb = acc / norm.clamp_min(1e-12)[:, None]
        return zbuf.view(b, h, w), winner.view(b, h, w), rgb.view(b, h, w, 3)

    def _cover(
        self,
        uv: torch.Tensor,
        z: torch.Tensor,
        half: torch.Tensor,
        session: torch.Tensor,
        slot: torch.Tensor,
        radius: int,
    ) -> tuple[torch.Tensor, ...]:
        """The pixels whose centres lie within each point's splat half-side ``half (M,)``, among
        the ``(2 radius + 1)^2`` around its pixel: flat ``(K,)`` pixel index over the batch, depth,
        session, slot and squared distance from the point to the pixel centre."""
        h, w = self.camera.height, self.camera.width
        offsets = torch.arange(-radius, radius + 1, device=self.device, dtype=uv.dtype)
        du, dv = torch.meshgrid(offsets, offsets, indexing="xy")  # (S, S)
        du, dv = du.reshape(-1), dv.reshape(-1)  # (S2,)
        col = uv[:, 0, None].floor() + du  # (M, S2)
        row = uv[:, 1, None].floor() + dv
        dx, dy = col + 0.5 - uv[:, 0, None], row + 0.5 - uv[:, 1, None]
        cover = (
            (dx.abs() <= half[:, None]) & (dy.abs() <= half[:, None]) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        )  # (M, S2)
        pix = session[:, None] * (h * w) + row.clamp(0, h - 1).long() * w + col.clamp(0, w - 1).long()
        return (
            pix[cover],
            z[:, None].expand_as(cover)[cover],
            session[:, None].expand_as(cover)[cover],
            slot[:, None].expand_as(cover)[cover],
            (dx**2 + dy**2)[cover],
        )

    def _tolerance(self, z: torch.Tensor) -> torch.Tensor:
        """How far (world units) a depth may be from another at planar depth ``z`` and still be
        the same surface: a few stored levels plus a share of the depth."""
        return self.config.depth_tol_levels * self.camera.depth_scale + self.config.depth_tol_rel * z

    def render(self, pose: torch.Tensor) -> View:
        """RGB, planar depth and validity of every session's cloud seen from ``pose (B, 5)``."""
        return self.render_front(pose)[0]

    def render_front(self, pose: torch.Tensor) -> tuple[View, torch.Tensor]:
        """:meth:`render`, and the world position ``(B, H, W, 3)`` of the point in front at each
        pixel (zero where not mask): the cloud's own points, free of the splats' spread, for
        aligning a new frame with the cloud (:func:`~worldgen.memory.align.refine_pose`)."""
        self._check_pose(pose)
        zbuf, winner, rgb = self._splat(pose.to(self.device).float())
        mask = winner >= 0
        rgb = torch.where(
            mask[..., None], rgb.round().clamp(0, 255).to(torch.uint8), torch.zeros((), dtype=torch.uint8)
        )
        depth = torch.where(mask, zbuf, torch.zeros_like(zbuf))
        b, h, w = winner.shape
        front = self.xyz.gather(1, winner.clamp_min(0).view(b, h * w, 1).expand(-1, -1, 3)).view(b, h, w, 3)
        return View(rgb, depth, mask), front * mask[..., None]

    # fusion ----------------------------------------------------------------------------------

    def update(
        self, rgb: torch.Tensor, depth: torch.Tensor, pose: torch.Tensor, active: torch.Tensor | None = None
    ) -> None:
        """Fuse one frame per session: ``rgb (B, H, W, 3)`` uint8, ``depth (B, H, W)`` in the
        camera's stored levels, ``pose (B, 5)``; ``active (B,)`` bool leaves the other sessions as
        they are (None = all)."""
        cam = self.camera
        b, p = self.stamp.shape
        h, w = cam.height, cam.width
        self._check_pose(pose)
        if rgb.shape != (b, h, w, 3) or depth.shape != (b, h, w) or rgb.dtype != torch.uint8:
            raise ValueError(
                f"need rgb ({b}, {h}, {w}, 3) uint8 and depth ({b}, {h}, {w}), got "
                f"{tuple(rgb.shape)} {rgb.dtype} and {tuple(depth.shape)}"
            )
        rgb, depth, pose = rgb.to(self.device), depth.to(self.device).float(), pose.to(self.device).float()
        active = torch.ones(b, dtype=torch.bool, device=self.device) if active is None else active.to(self.device)

        points, valid = cam.unproject(depth, pose)  # (B, H, W, 3), (B, H, W)
        normal = _normals(points, pose)  # (B, H, W, 3)
        z_obs = cam.depth_to_world(depth)  # (B, H, W)
        tol = self._tolerance(z_obs)

        # 1. Remove cached points the view contradicts: in view, in front of the observed surface.
        uv, z = cam.project(self.xyz, pose)  # (B, P, 2), (B, P)
        seen = self.alive() & cam.in_view(self.xyz, pose)
        flat = uv[..., 1].floor().clamp(0, h - 1).long() * w + uv[..., 0].floor().clamp(0, w - 1).long()
        z_there = z_obs.flatten(1).gather(1, flat)  # (B, P)
        valid_there = valid.flatten(1).gather(1, flat)
        tol_there = tol.flatten(1).gather(1, flat)
        contradicted = seen & valid_there & (z < z_there - tol_there) & active[:, None]
        self.stamp[contradicted] = -1

        # 2. Which pixels the remaining cloud explains: a point at the observed depth facing the camera.
        zbuf, winner, _ = self._splat(pose)
        idx = winner.clamp_min(0).flatten(1)  # (B, HW)
        front_normal = self.normal.gather(1, idx[..., None].expand(-1, -1, 3)).view(b, h, w, 3)
        to_camera = pose[:, None, None, :3] - points  # (B, H, W, 3)
        facing = (front_normal * to_camera).sum(-1) > 0
        explained = (winner >= 0) & ((zbuf - z_obs).abs() <= tol) & facing
        add = valid & ~explained & active[:, None, None]  # (B, H, W)

        # 3. Put the new points in free slots, then in the oldest ones (bounded memory).
        add = add.flatten(1)  # (B, HW)
        rank = add.cumsum(1) - 1  # (B, HW) order among the added
        add &= rank < p
        # Slots in the order they are given up: free ones (stamp -1) first, then oldest first.
        order = self.stamp.argsort(dim=1, stable=True)  # (B, P)
        rows = torch.arange(b, device=self.device)[:, None].expand_as(add)[add]
        slots = order[rows, rank[add]]
        pixel_size = z_obs / cam.fx  # (B, H, W) world side of a pixel
        self.xyz[rows, slots] = points.flatten(1, 2)[add]
        self.rgb[rows, slots] = rgb.flatten(1, 2)[add]
        self.normal[rows, slots] = normal.flatten(1, 2)[add]
        self.size[rows, slots] = pixel_size.flatten(1)[add]
        self.stamp[rows, slots] = self.frames[rows]
        self.frames += active.long()

    def _check_pose(self, pose: torch.Tensor) -> None:
        if pose.shape != (self.batch, POSE_DIM):
            raise ValueError(f"need pose ({self.batch}, {POSE_DIM}) (x, y, z, yaw, pitch), got {tuple(pose.shape)}")

    # export ----------------------------------------------------------------------------------

    def points(self, session: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One session's cloud as numpy: ``xyz (N, 3)`` float32, ``rgb (N, 3)`` uint8, ``normal (N, 3)``."""
        keep = self.alive()[session]
        return (
            self.xyz[session][keep].cpu().numpy(),
            self.rgb[session][keep].cpu().numpy(),
            self.normal[session][keep].cpu().numpy(),
        )

    def save_ply(self, path: str | os.PathLike, session: int = 0) -> Path:
        """Write one session's cloud as a binary ``.ply`` (positions, normals, colours)."""
        return write_ply(path, *self.points(session))


def _normals(points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """Unit normals ``(B, H, W, 3)`` of an unprojected depth image ``(B, H, W, 3)`` from its
    neighbours (central differences, one-sided at the border), turned to face the camera."""
    pad = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    du = pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2]  # along u (right)
    dv = pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1]  # along v (down)
    n = F.normalize(torch.cross(du, dv, dim=-1), dim=-1)
    flip = (n * (pose[:, None, None, :3] - points)).sum(-1, keepdim=True) < 0
    return torch.where(flip, -n, n)


def write_ply(path: str | os.PathLike, xyz: np.ndarray, rgb: np.ndarray, normal: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY of a coloured cloud, written through a temp file and a rename."""
    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    rgb = np.asarray(rgb, np.uint8).reshape(-1, 3)
    if len(rgb) != len(xyz) or (normal is not None and np.shape(normal) != xyz.shape):
        raise ValueError(
            f"xyz, rgb and normal must have the same number of points, got "
            f"{xyz.shape}, {rgb.shape}, {None if normal is None else np.shape(normal)}"
        )
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normal is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.empty(len(xyz), fields)
    rows["x"], rows["y"], rows["z"] = xyz.T
    if normal is not None:
        rows["nx"], rows["ny"], rows["nz"] = np.asarray(normal, np.float32).T
    rows["red"], rows["green"], rows["blue"] = rgb.T
    kinds = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(xyz)}"]
    header += [f"property {kinds[t]} {name}" for name, t in fields] + ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.ply")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(rows.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
