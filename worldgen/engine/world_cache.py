"""Sessions of a world-cache model: each owns a point cloud in one batched pool.

A model trained with ``--world-cache H`` (docs/world_cache.md) generates RGB-D frames, each
conditioned on the cache rendered at its camera pose. In play (Voyager's loop), per step and for
all stepping sessions at once:

1. predict the new frame's pose from the last pose, its momentum and the action
   (:class:`~worldgen.memory.motion.MotionModel`, stored with the model), before the frame exists;
2. render every session's cloud at its predicted pose (one batched splat) and encode the view as
   the DiT's conditioning channels, exactly as training does
   (:func:`~worldgen.models.world_cache.view_condition`);
3. after the DiT step, correct the pose from the decoded frame's depth against the view
   (:func:`~worldgen.memory.align.refine_pose`: the motion model cannot see walls) and fuse the
   frame's RGB-D into the cloud at the corrected pose
   (:meth:`~worldgen.memory.cloud.WorldCache.update`); the corrected pose is the session's.

:class:`CachePool` holds the clouds and the pose state of all sessions of one ``WorldModel`` in
fixed-size tensors indexed by a session's slot: a step gathers its sessions' slots, renders and
updates them as one batch, and writes them back; memory per session is the cloud's point cap.
:meth:`CachePool.rollout_views` drives the same steps for a rollout on latents
(:func:`~worldgen.engine.stream.rollout_latents`): how ``worldgen eval`` plays a world-cache
model exactly as its sessions do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from worldgen.memory.align import AlignConfig, refine_pose
from worldgen.memory.camera import POSE_DIM, Camera
from worldgen.memory.cloud import CacheConfig, View, WorldCache
from worldgen.memory.motion import MotionModel, momentum
from worldgen.memory.views import history_views
from worldgen.models import tensor_to_frames
from worldgen.models.tokenizer import Tokenizer
from worldgen.models.world_cache import view_condition


@dataclass
class PlayCache:
    """A world-cache model's play settings: the dynamics config's ``world_cache`` entry plus the bound."""

    history: int  # predecessors each training frame's view was built from: the context views use as many
    camera: Camera  # the world's camera at the model's resolution
    motion: MotionModel  # predicts where the next frame's view is rendered
    cache: CacheConfig = field(default_factory=CacheConfig)  # max_points: the per-session memory bound
    # The pose correction; None: the prediction stands (docs/world_cache.md measures both).
    align: AlignConfig | None = field(default_factory=AlignConfig)

    @classmethod
    def from_dict(cls, d: dict, max_points: int | None = None, pose_correction: bool = True) -> PlayCache:
        cache = CacheConfig() if max_points is None else CacheConfig(max_points=int(max_points))
        align = AlignConfig() if pose_correction else None
        return cls(int(d["history"]), Camera.from_dict(d["camera"]), MotionModel.from_dict(d["motion"]), cache, align)


class Rendered(NamedTuple):
    """What :meth:`CachePool.render` leaves for :meth:`CachePool.fuse`: the new frames' poses
    (B, 5), whether they were predicted, the stepping sessions' clouds and the view rendered there."""

    pose: torch.Tensor
    clouds: WorldCache
    view: View
    front: torch.Tensor  # (B, H, W, 3) the view's front points (WorldCache.render_front)
    predicted: bool


class CachePool:
    """Clouds and camera state of a model's sessions, one slot each; grows by doubling."""

    def __init__(self, settings: PlayCache, action_dim: int, device: torch.device, slots: int = 4):
        self.settings = dataclasses.replace(settings, motion=settings.motion.to(device))
        self.clouds = WorldCache(settings.camera, settings.cache, batch=slots, device=device)
        self.pose = torch.zeros(slots, POSE_DIM, device=device)  # the last frame's camera
        self.momentum = torch.zeros(slots, POSE_DIM, device=device)  # its last motion (memory.motion.momentum)
        self.last_action = torch.zeros(slots, action_dim, device=device)  # the action that made it
        self.free = list(range(slots))

    def acquire(self) -> int:
        if not self.free:
            n = self.clouds.batch
            self.clouds.grow(n)
            self.pose, self.momentum, self.last_action = (
                torch.cat([t, torch.zeros_like(t)]) for t in (self.pose, self.momentum, self.last_action)
            )
            self.free = list(range(n, 2 * n))
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        self.clouds.reset(torch.tensor([slot], device=self.clouds.device))
        self.free.append(slot)

    def _exact(self) -> torch.autocast:
        """Geometry in float32 even inside the engine's bf16 autocast: map units run to thousands."""
        return torch.autocast(self.clouds.device.type, enabled=False)

    def nbytes_per_session(self) -> int:
        return self.clouds.nbytes() // self.clouds.batch

    def start(
        self,
        slot: int,
        tokenizer: Tokenizer | None,
        rgb: torch.Tensor,
        depth: torch.Tensor,
        pose: torch.Tensor,
        acts: torch.Tensor,
    ) -> torch.Tensor | None:
        """A session's context ``rgb (T, H, W, 3)`` uint8, ``depth (T, H, W)`` levels, ``pose (T, 5)``,
        ``acts (T, A)``: its conditioning ``(T, C + 1, h, w)`` (each frame's view of its
        ``history`` predecessors, as in training, without pose noise; None without a
        ``tokenizer``), and the slot's cloud fused from all context frames, its pose state at the
        last one."""
        s = self.settings
        cond = None
        if tokenizer is not None:
            view = history_views(s.camera, rgb[None], depth[None], pose[None], s.history)
            cond = view_condition(tokenizer, view, s.camera)[0]
        idx = torch.tensor([slot], device=self.clouds.device)
        self.clouds.reset(idx)
        one = self.clouds.select(idx)
        with self._exact():
            for t in range(len(rgb)):  # the context is short (the KV window): oldest first, as play goes on
                one.update(rgb[t : t + 1], depth[t : t + 1], pose[t : t + 1])
        self.clouds.assign(idx, one)
        self.pose[slot] = pose[-1]
        self.momentum[slot] = momentum(pose[-2:])[0] if len(pose) >= 2 else 0.0
        self.last_action[slot] = acts[-1]
        return cond

    def render(self, slots: torch.Tensor, action: torch.Tensor, pose: torch.Tensor | None = None) -> Rendered:
        """Before a step of the sessions in ``slots`` (B,) with ``action`` (B, A): the new frames'
        poses (B, 5) (``pose`` if given: the true cameras, else predicted) and the sessions'
        clouds rendered there, for :meth:`fuse`."""
        with self._exact():
            predicted = pose is None
            if predicted:
                pose = self.settings.motion.predict(
                    self.pose[slots], self.momentum[slots], action.float(), self.last_action[slots]
                )
            clouds = self.clouds.select(slots)
            view, front = clouds.render_front(pose)
        return Rendered(pose, clouds, view, front, predicted)

    def views(
        self, slots: torch.Tensor, action: torch.Tensor, tokenizer: Tokenizer, pose: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Rendered]:
        """The view as the DiT's conditioning (B, C + 1, h, w), and :meth:`render`'s result."""
        rendered = self.render(slots, action, pose)
        return view_condition(tokenizer, rendered.view, self.settings.camera), rendered

    def fuse(
        self,
        slots: torch.Tensor,
        rendered: Rendered,
        rgbd: np.ndarray | torch.Tensor,
        action: torch.Tensor,
    ) -> torch.Tensor:
        """After the step: the new frames ``rgbd (B, H, W, 4)`` uint8 (depth in levels), made at
        ``rendered.pose``, correct a predicted pose (``settings.align``) and join the clouds there
        (Voyager's update rule); the pose state moves on. Returns the frames' poses (B, 5)."""
        frames = torch.as_tensor(rgbd).to(self.clouds.device)
        clouds, pose = rendered.clouds, rendered.pose
        with self._exact():
            if rendered.predicted and self.settings.align is not None:
                pose, _ = refine_pose(
                    self.settings.camera,
                    rendered.view,
                    rendered.front,
                    frames[..., :3],
                    frames[..., 3].float(),
                    pose,
                    self.settings.align,
                )
            clouds.update(frames[..., :3].contiguous(), frames[..., 3].float(), pose)
            self.clouds.assign(slots, clouds)
            # Momentum of old -> new per session: momentum() of the interleaved sequence
            # (old_0, new_0, old_1, new_1, ...) at its even steps.
            pair = torch.stack([self.pose[slots], pose], 1).reshape(-1, POSE_DIM)
            self.momentum[slots] = momentum(pair)[0::2]
            self.pose[slots], self.last_action[slots] = pose, action.float()
        return pose

    def rollout_views(
        self, slots: torch.Tensor, tokenizer: Tokenizer, actions: torch.Tensor, poses: list | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``views`` callback of :func:`~worldgen.engine.stream.rollout_latents` for the
        sessions in ``slots`` (B,), started with :meth:`start`, playing ``actions`` (B, n, A), one
        frame a step: each call first fuses the frame played last (its latent decoded to RGB-D as
        ``WorldModel.step_many`` decodes it), then predicts the next pose and renders its view
        (:meth:`views`): step for step what the sessions' steps do. Returns (B, 1, C + 1, h, w).
        ``poses``: a list that gets each played frame's camera (B, 5), corrected once it is fused."""
        pending: list[Rendered] = []  # the last view, until its frame is fused

        def views(generated: torch.Tensor) -> torch.Tensor:
            i = generated.shape[1]
            if pending:
                rgbd = tensor_to_frames(tokenizer.decode(generated[:, -1].float()))
                fused = self.fuse(slots, pending.pop(), rgbd, actions[:, i - 1])
                if poses is not None:
                    poses[-1] = fused
            cond, rendered = self.views(slots, actions[:, i], tokenizer)
            pending.append(rendered)
            if poses is not None:
                poses.append(rendered.pose)
            return cond[:, None]

        return views
