"""Frame memory bank: a session remembers every frame it made and recalls the ones that saw
what the camera is about to see (DESIGN.md section 7, after WorldMem).

Per session the bank holds, for up to ``cap`` frames, the frame's *latent* (C, h, w), the camera
pose it was made from (x, y, z, yaw, pitch: ``worldgen.data.dataset.POSE_FIELDS``) and its time
step. Latents, not the DiT's keys and values: a memory frame is re-embedded at every step with
its pose *relative to the camera of the frame being made* and its age, both of which change from
step to step, so keys computed once would be stale; and a latent is ~16 x 15 x 20 numbers against
depth x 2 x tokens x dim (~450k for the default model), ~100x less to keep per frame.

Eviction: when full, a new frame replaces the held frame whose view is most redundant: the one
with the most neighbours in the bank that face the same way from nearby (frustum overlap
>= ``evict_overlap``), the oldest of those on a tie; frames with no such twin are only replaced
once every frame is unique, and then the oldest goes. Memory stays fixed at ``cap`` frames for
any length of play, and a place seen once is not pushed out by a long walk elsewhere that
keeps seeing the same corridor.

Retrieval (:func:`retrieve`, batched over sessions): ``samples`` fixed points spread through the
view frustum of the camera about to be used (``near``..``far`` map units deep, ``hfov`` wide
at ``aspect``) are tested against every held frame's frustum; then k greedy rounds each take
the frame that sees the most points no earlier pick saw, scored
``overlap - recency * age / now`` (WorldMem's 0.2: among equally good views the newer wins), and
mark its points as covered. A pick that sees no new point is returned masked: the model gets
fewer memory frames rather than useless ones. Frames younger than ``min_age`` steps are never
picked (the rolling window already holds them). Walls do not occlude here: the frusta are cones
in free space, as in WorldMem.

The camera model is the small function :func:`in_frustum`; the field of view is a parameter
(ViZDoom: 90 degrees horizontal at 4:3, ``worldgen.env.sources.doom.HFOV_DEG``).

Example:
    >>> bank = FrameBank(BankConfig(cap=4), latent_shape=(2, 3, 4))
    >>> for step, yaw in enumerate([0.0, 90.0, 180.0, 270.0]):
    ...     _ = bank.add(torch.zeros(2, 3, 4), torch.tensor([0.0, 0.0, 41.0, yaw, 0.0]), step)
    >>> idx, ok = retrieve(*stack([bank]), torch.tensor([[0.0, 0.0, 41.0, 85.0, 0.0]]),
    ...                    torch.tensor([10]), k=1, cfg=bank.cfg)
    >>> bank.time[idx[0, 0]].item(), ok.tolist()     # the frame that faced the same way
    (1, [[True]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

POSE_DIM = 5  # x, y, z, yaw (degrees, counter-clockwise from +x), pitch (degrees, > 0 up)
REL_POSE_DIM = 6  # relative_pose: forward, left, up (scaled), sin dyaw, cos dyaw, dpitch (rad)


@dataclass
class BankConfig:
    """What a session's bank keeps and how it recalls; stored with a memory-trained checkpoint."""

    k: int = 4  # frames recalled per step: WorldMem uses 8; 4 keeps the step ~2x a no-memory step
    cap: int = 256  # frames held per session: 256 latents of 16x15x20 in bf16 = 2.5 MB
    hfov: float = 90.0  # horizontal field of view, degrees (ViZDoom's CAMERA_FOV default)
    aspect: float = 4 / 3  # width / height of the frame (160x120): sets the vertical field of view
    near: float = 16.0  # frustum depth range in map units: the player's radius ...
    far: float = 768.0  # ... to about a large room across: farther views are mostly other rooms
    samples: int = 256  # points per frustum: overlap resolves to 1/256 of a view, plenty to rank views
    recency: float = 0.2  # age penalty weight (WorldMem): a tie-break, never beats real overlap
    min_age: int = 0  # frames younger than this are in the KV window already: never recalled
    evict_overlap: float = 0.7  # two frames overlapping this much are twins: one can go when full

    def check(self) -> None:
        if self.k < 0 or self.cap < max(1, self.k):
            raise ValueError(f"memory needs 0 <= k <= cap and cap >= 1, got k={self.k}, cap={self.cap}")
        if not 0 < self.hfov < 180 or self.aspect <= 0 or not 0 < self.near < self.far or self.samples < 1:
            raise ValueError(
                f"bad frustum: hfov={self.hfov} (0..180), aspect={self.aspect}, "
                f"near={self.near} < far={self.far}, samples={self.samples}"
            )


def _rotation(pose: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) camera-to-world rotation; camera axes are (forward, left, up)."""
    angles = torch.deg2rad(pose[..., 3:5])
    (cy, cp), (sy, sp) = angles.cos().unbind(-1), angles.sin().unbind(-1)
    # Columns: forward (cy cp, sy cp, sp), left (-sy, cy, 0), up (-cy sp, -sy sp, cp).
    return torch.stack([cy * cp, -sy, -cy * sp, sy * cp, cy, -sy * sp, sp, torch.zeros_like(cy), cp], -1).unflatten(
        -1, (3, 3)
    )


def _times(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Row vectors ``v`` (..., P, 3) times matrices ``m`` (..., 3, 3), written out elementwise: a
    batched matmul may round differently at another batch size, and a session must recall the
    same frames alone or in a batch."""
    m = m[..., None, :, :]  # (..., 1, 3, 3)
    x, y, z = v.unbind(-1)
    return torch.stack([x * m[..., 0, j] + y * m[..., 1, j] + z * m[..., 2, j] for j in range(3)], -1)


def to_camera(points: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """World points (..., P, 3) in the camera frame of ``pose`` (..., 5): (forward, left, up)."""
    return _times(points - pose[..., None, :3], _rotation(pose))


def in_frustum(points: torch.Tensor, pose: torch.Tensor, cfg: BankConfig) -> torch.Tensor:
    """(..., P) bool: which world points (..., P, 3) the camera at ``pose`` (..., 5) sees
    (free-space frustum: no occlusion)."""
    c = to_camera(points, pose)
    depth = c[..., 0]
    tan_h = math.tan(math.radians(cfg.hfov) / 2)
    tan_v = tan_h / cfg.aspect
    return (
        (depth >= cfg.near)
        & (depth <= cfg.far)
        & (c[..., 1].abs() <= depth * tan_h)
        & (c[..., 2].abs() <= depth * tan_v)
    )


def frustum_points(cfg: BankConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(samples, 3) fixed points filling the frustum in camera coordinates, uniform in volume
    (depth ~ cube root: far slices hold more space). Fixed, so retrieval is deterministic."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(cfg.samples, 3, generator=g)
    n3, f3 = cfg.near**3, cfg.far**3
    depth = (n3 + u[:, 0] * (f3 - n3)) ** (1 / 3)
    tan_h = math.tan(math.radians(cfg.hfov) / 2)
    left = (2 * u[:, 1] - 1) * depth * tan_h
    up = (2 * u[:, 2] - 1) * depth * tan_h / cfg.aspect
    return torch.stack([depth, left, up], -1).to(device)


def view_points(pose: torch.Tensor, cfg: BankConfig, cam: torch.Tensor | None = None) -> torch.Tensor:
    """(..., samples, 3) world points of the frustum of ``pose`` (..., 5); ``cam``: the
    :func:`frustum_points` of ``cfg`` if already made."""
    cam = (frustum_points(cfg, pose.device) if cam is None else cam).to(pose.dtype)
    return _times(cam.expand(*pose.shape[:-1], -1, -1), _rotation(pose).transpose(-1, -2)) + pose[..., None, :3]


def relative_pose(pose: torch.Tensor, ref: torch.Tensor, scale: float = 256.0) -> torch.Tensor:
    """(..., 6) pose ``pose`` (..., 5) seen from camera ``ref`` (..., 5): its position in ref's
    (forward, left, up) axes / ``scale`` map units, sin and cos of its yaw minus ref's, and its
    pitch minus ref's in radians. What the DiT embeds for a memory frame; invariant to where in
    the map both stand."""
    d = to_camera(pose[..., None, :3], ref)[..., 0, :] / scale
    dyaw = torch.deg2rad(pose[..., 3] - ref[..., 3])
    dpitch = torch.deg2rad(pose[..., 4] - ref[..., 4])
    return torch.cat([d, dyaw.sin()[..., None], dyaw.cos()[..., None], dpitch[..., None]], -1)


def retrieve(
    poses: torch.Tensor,
    times: torch.Tensor,
    valid: torch.Tensor,
    query: torch.Tensor,
    now: torch.Tensor,
    k: int,
    cfg: BankConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` held frames that best cover each session's next view, batched over sessions.

    Args:
        poses: (B, M, 5) held frames' poses; times: (B, M) their time steps; valid: (B, M) bool.
        query: (B, 5) pose of the frame about to be made; now: (B,) its time step.
    Returns:
        idx (B, k) long: bank slots in pick order; ok (B, k) bool: picks that add coverage
        (the others point at slot 0 and must be masked).
    """
    b, m = valid.shape
    if k == 0 or m == 0:
        return torch.zeros(b, k, dtype=torch.long, device=poses.device), torch.zeros(
            b, k, dtype=torch.bool, device=poses.device
        )
    pts = view_points(query.float(), cfg)  # (B, P, 3)
    seen = in_frustum(pts[:, None], poses.float(), cfg)  # (B, M, P)
    age = (now[:, None] - times).float()
    usable = valid & (age >= max(cfg.min_age, 1))
    seen = seen & usable[..., None]
    penalty = cfg.recency * age / now.clamp(min=1)[:, None].float()  # (B, M)
    covered = torch.zeros(b, pts.shape[1], dtype=torch.bool, device=poses.device)  # (B, P)
    idx, ok = [], []
    for _ in range(k):
        gain = (seen & ~covered[:, None]).float().mean(-1)  # (B, M)
        score = torch.where(usable & (gain > 0), gain - penalty, -math.inf)
        best = score.argmax(-1)  # (B,)
        good = torch.isfinite(score.gather(1, best[:, None]))[:, 0]
        covered |= seen[torch.arange(b, device=poses.device), best] & good[:, None]
        idx.append(torch.where(good, best, 0))
        ok.append(good)
    return torch.stack(idx, 1), torch.stack(ok, 1)


class FrameBank:
    """One session's memory: fixed-size tensors from the start (so banks of sessions of any age
    stack into one batch), ``cap`` slots of latent, pose and time step; see the module docstring
    for the eviction rule."""

    def __init__(
        self,
        cfg: BankConfig,
        latent_shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        cfg.check()
        self.cfg = cfg
        self.z = torch.zeros(cfg.cap, *latent_shape, device=device, dtype=dtype)  # (cap, C, h, w)
        self.pose = torch.zeros(cfg.cap, POSE_DIM, device=device)  # (cap, 5)
        self.time = torch.full((cfg.cap,), -1, dtype=torch.long, device=device)  # (cap,) -1 = empty
        # overlap[i, j]: share of slot i's frustum points that slot j sees; kept up to date on
        # every add (2 x cap x samples tests), so eviction reads it instead of testing cap^2 x samples.
        self._overlap = torch.zeros(cfg.cap, cfg.cap, device=device)
        self._cam = frustum_points(cfg, device)  # (samples, 3)
        self._pts = torch.zeros(cfg.cap, cfg.samples, 3, device=device)  # each slot's view points
        self.added = 0  # frames added since the last clear, evicted ones included

    def __len__(self) -> int:
        return int((self.time >= 0).sum())

    @property
    def valid(self) -> torch.Tensor:
        return self.time >= 0

    def clear(self) -> None:
        self.time.fill_(-1)
        self.added = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.z, self.pose, self.time, self._overlap, self._pts))

    def add(self, z: torch.Tensor, pose: torch.Tensor, time: int) -> int:
        """Keep latent ``z`` (C, h, w) made from ``pose`` (5,) at step ``time``; returns its slot."""
        if tuple(z.shape) != tuple(self.z.shape[1:]) or tuple(pose.shape) != (POSE_DIM,):
            raise ValueError(
                f"a bank frame is a latent {tuple(self.z.shape[1:])} and a pose (5,), got "
                f"{tuple(z.shape)} and {tuple(pose.shape)}"
            )
        if not torch.isfinite(pose).all():
            raise ValueError(f"pose must be finite, got {pose.tolist()}")
        pose = pose.to(self.pose.device, torch.float32)
        pts = view_points(pose, self.cfg, self._cam)  # (P, 3)
        slot = self._free_slot()
        self.z[slot] = z.to(self.z.device, self.z.dtype)
        self.pose[slot], self.time[slot], self._pts[slot] = pose, int(time), pts
        # Both directions in one test: the new view's points in every frame's frustum, then
        # every frame's points in the new frustum.
        cap = self.cfg.cap
        seen = (
            in_frustum(
                torch.cat([pts.expand(cap, -1, -1), self._pts]), torch.cat([self.pose, pose.expand(cap, -1)]), self.cfg
            )
            .float()
            .mean(-1)
        )  # (2 cap,)
        if self.added < cap:  # empty slots see nothing
            seen = seen * self.valid.repeat(2)
        self._overlap[slot], self._overlap[:, slot] = seen[:cap], seen[cap:]
        self.added += 1
        return slot

    def _free_slot(self) -> int:
        if self.added < self.cfg.cap:  # slots fill in order and only clear() empties them
            return self.added
        # Full: the frame with the most twins (mutual overlap >= evict_overlap), the oldest on a tie.
        twin = (self._overlap >= self.cfg.evict_overlap) & (self._overlap.T >= self.cfg.evict_overlap)
        twins = twin.sum(1) - 1  # minus itself
        age_rank = (self.time.max() - self.time).float() / (self.time.max() - self.time.min() + 1).float()
        return int((twins.float() + age_rank).argmax())


def stack(banks: Sequence[FrameBank]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(poses (B, cap, 5), times (B, cap), valid (B, cap))`` of banks of one config."""
    return (
        torch.stack([b.pose for b in banks]),
        torch.stack([b.time for b in banks]),
        torch.stack([b.valid for b in banks]),
    )


def recall(
    banks: Sequence[FrameBank], query: torch.Tensor, now: torch.Tensor, k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retrieve and gather for several sessions at once: latents (B, k, C, h, w), their poses
    relative to ``query`` (B, k, 6) (:func:`relative_pose`), ages (B, k) in steps and the mask
    (B, k) of real picks. ``query`` (B, 5) is each session's next camera, ``now`` (B,) its step."""
    cfg = banks[0].cfg
    k = cfg.k if k is None else k
    poses, times, valid = stack(banks)
    idx, ok = retrieve(poses, times, valid, query, now, k, cfg)  # (B, k) each
    zs = torch.stack([bk.z for bk in banks])  # (B, cap, C, h, w)
    rows = torch.arange(len(banks), device=idx.device)[:, None]
    z = zs[rows, idx]  # (B, k, C, h, w)
    rel = relative_pose(poses[rows, idx], query[:, None].float())  # (B, k, 6)
    age = (now[:, None] - times[rows, idx]).float()
    return z, rel, torch.where(ok, age, 0.0), ok
