"""The public engine: a trained world model run as a game, one frame per action, for hours.

``WorldModel`` owns the tokenizer and the DiT; each :class:`Session` owns a rolling KV cache
(:mod:`worldgen.engine.cache`) and its own noise generator. One step of a session:

1. denoise the new frame's latent on the cache and write the finished frame's stabilised keys
   and values to it: the sampler's cache backend (:func:`worldgen.engine.stream.denoise`,
   docs/sampling.md), the same that ``worldgen eval`` scores;
2. decode the latent to an RGB frame.

A model trained with frame memory (``memory_frames`` > 0) also gives each session a
:class:`~worldgen.memory.bank.FrameBank`: every frame's latent with its camera pose (the game's
when the caller passes it, else :func:`~worldgen.engine.memory.dead_reckon`), and at every step
the ``k`` frames whose view best covers the next camera enter the DiT as non-causal context.

``WorldModel.step_many`` steps many sessions in one batched forward (sessions of any age: the
caches are fixed-size and masked) with each session's noise drawn from its own generator, so a
session gives the same frames whether stepped alone or in a batch. ``WorldModel.reset_many``
starts many sessions again in one batched encode and prefill (agents' episodes ending together).

Example:
    >>> wm = WorldModel.load("default")                                  # doctest: +SKIP
    >>> s = wm.session(seed=0)           # a real start context stored with the model  # doctest: +SKIP
    >>> frame = s.step({"keys": ["forward"], "mouse": [5.0, 0.0]})      # doctest: +SKIP
    >>> frame.shape, frame.dtype                                         # doctest: +SKIP
    ((120, 160, 3), dtype('uint8'))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldgen import actions, checkpoint, sampling
from worldgen.actions import Action, ActionError
from worldgen.checkpoint import CheckpointError
from worldgen.data.dataset import DOOM_TICS_PER_SECOND
from worldgen.engine.cache import KVCache
from worldgen.engine.memory import dead_reckon, recalled
from worldgen.engine.stream import StreamConfig, denoise, prefill
from worldgen.engine.world_cache import CachePool, PlayCache
from worldgen.memory.bank import BankConfig, FrameBank
from worldgen.models import (
    DiT,
    Tokenizer,
    autocast,
    frames_to_tensor,
    load_dit,
    load_tokenizer,
    native_bf16,
    tensor_to_frames,
)
from worldgen.models.dit import Memory
from worldgen.models.world_cache import check_rgbd

ActionLike = Action | Mapping[str, Any]
PRECISIONS = ("auto", "fp32", "bf16")  # how sessions compute: WorldModel.load's precision


class WorldModel:
    """A tokenizer + DiT ready to play. Build it with :meth:`load`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        dit: DiT,
        stream: StreamConfig | None = None,
        starts: dict[str, torch.Tensor] | None = None,
        fps: float = DOOM_TICS_PER_SECOND / 4,
        trained_window: int | None = None,
        device: torch.device | str | None = None,
        memory: BankConfig | None = None,
        world_cache: PlayCache | None = None,
        precision: str = "auto",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        # Weights stay float32; each step runs under bf16 autocast where matmuls are natively
        # bf16 (auto), or as asked: frames of the two differ by about one uint8 level.
        self.bf16 = precision == "bf16" or (precision == "auto" and native_bf16(self.device))
        self.tokenizer = tokenizer.float().to(self.device).eval()
        self.dit = dit.float().to(self.device).eval()
        self.trained_window = trained_window or dit.cfg.max_frames
        self.stream = stream or StreamConfig()
        self.stream.check(self.dit, self.trained_window)
        self.fps = fps
        self._starts = starts
        self.checkpoint: os.PathLike | None = None  # the folder it was loaded from, if any
        if (
            tuple(tokenizer.cfg.latent_size) != tuple(dit.cfg.latent_size)
            or tokenizer.cfg.latent_channels != dit.cfg.latent_channels
        ):
            raise CheckpointError(
                f"tokenizer latents {tokenizer.cfg.latent_channels}x{tokenizer.cfg.latent_size} "
                f"do not fit the DiT's {dit.cfg.latent_channels}x{dit.cfg.latent_size}"
            )
        self.cache_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # Frame memory: None (or k = 0) plays on the rolling window alone, exactly as before.
        if memory is not None and memory.k and not 1 <= memory.k <= self.dit.cfg.memory_frames:
            raise ValueError(
                f"memory k={memory.k}: this model takes 1..{self.dit.cfg.memory_frames} recalled frames"
                if self.dit.cfg.memory_frames
                else "this model was trained without memory (memory_frames=0): it takes no memory settings; "
                "train one with --memory-frames"
            )
        if memory is not None:
            memory.check()
        self.memory = memory if memory is not None and memory.k else None
        # World cache (models trained with --world-cache): every session's cloud in one pool.
        self.world: CachePool | None = None
        if world_cache is not None or dit.cfg.cond_channels:
            if world_cache is not None:
                check_rgbd(tokenizer.cfg)  # a model without depth cannot keep a cloud
            if world_cache is None or not dit.cfg.cond_channels:
                raise ValueError(
                    "world-cache settings need a DiT trained with the world cache (cond_channels > 0, "
                    "`worldgen train dynamics --world-cache H`)"
                    if world_cache is not None
                    else f"this DiT takes {dit.cfg.cond_channels} conditioning channels: it needs its world-cache "
                    "settings (the dynamics config's 'world_cache' entry; WorldModel.load reads them)"
                )
            if dit.cfg.frames_per_block != 1:
                raise ValueError(
                    f"the world cache plays one frame per step (a view per frame): this DiT generates "
                    f"{dit.cfg.frames_per_block} frames per block"
                )
            cam = world_cache.camera
            if (cam.height, cam.width) != tuple(tokenizer.cfg.image_size):
                raise ValueError(
                    f"world-cache camera is {cam.height}x{cam.width}, frames are {tokenizer.cfg.image_size}"
                )
            self.world = CachePool(world_cache, actions.ACTION_DIM, self.device)
        self._pending: tuple | None = None  # a step's slots and what CachePool.render left, from views to fuse
        self._step, self._decode = self._denoise, self.tokenizer.decode  # compile() swaps these
        self._compiled = False  # compile() swapped them
        self._graphs = False  # compiled into CUDA graphs: each call's outputs live until the next call

    def compile(self, mode: str | None = "reduce-overhead") -> WorldModel:
        """torch.compile the per-frame hot path: a whole step's DiT passes, and the decoder.
        Every step at a given batch size has the same shapes (fixed-size caches), so each batch
        size compiles once (the first step at a new size takes seconds to a minute), and the
        default mode replays the step as one CUDA graph: no per-kernel launch cost."""
        # The batch dimension is marked dynamic at each call (:meth:`_graph_call`), every other
        # size is fixed: one compile serves every batch of 2 or more (a compile takes minutes on a
        # GPU, a server would otherwise compile once per batch size), batch 1 compiles its own.
        self._step = torch.compile(self._denoise, mode=mode)
        self._decode = torch.compile(self.tokenizer.decode, mode=mode)
        self._compiled = True
        self._graphs = mode == "reduce-overhead" and self.device.type == "cuda"
        return self

    def eager(self) -> WorldModel:
        """Undo :meth:`compile`: the step and the decoder run eagerly again (a fallback when
        compiling fails on a machine)."""
        self._step, self._decode = self._denoise, self.tokenizer.decode
        self._compiled = self._graphs = False
        return self

    def _graph_call(self, fn: Callable, *args: Any, batch_dims: Sequence[int | None] = ()) -> Any:
        """``fn(*args)``, marked as a new CUDA-graph step when compiled: CUDA graph trees reuse an
        output's memory at the next replay, so its outputs are valid until the next compiled call
        and whatever must outlive that is cloned by the caller. ``batch_dims``: each tensor
        argument's batch dimension (default 0; None: none), marked dynamic for the compiler."""
        if self._compiled:
            for i, a in enumerate(args):
                d = batch_dims[i] if i < len(batch_dims) else 0
                if isinstance(a, torch.Tensor) and d is not None and a.shape[d] > 1:
                    torch._dynamo.mark_dynamic(a, d)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        checkpoint_dir: str | os.PathLike = "default",
        device: torch.device | str | None = None,
        memory_k: int | None = None,
        memory_cap: int | None = None,
        cache_points: int | None = None,
        pose_correction: bool | None = None,
        precision: str = "auto",
        **stream: Any,
    ) -> WorldModel:
        """A checkpoint folder (or ``"default"``, the model that ships with worldgen).

        ``stream`` overrides :class:`StreamConfig` fields (``steps``, ``ctx_noise``, ``sinks``,
        ``window``, ``shift``, ``guidance``; None keeps the checkpoint's, and the window keeps what
        the sinks leave of the trained window). Raises :class:`~worldgen.checkpoint.CheckpointError` naming
        what is missing or does not fit.

        ``memory_k`` (frames recalled per step; 0 = off) and ``memory_cap`` (frames a session's bank
        holds) set the frame memory of a model trained with it (None: the checkpoint's); a model
        trained without memory refuses them with a ValueError.

        ``cache_points``: the point cap of each session's world-cache cloud, the per-session
        memory bound (None: :class:`~worldgen.memory.cloud.CacheConfig`'s); ``pose_correction``:
        whether each generated frame's depth corrects the camera pose the motion model predicted
        (:func:`~worldgen.memory.align.refine_pose`; None: on).
        Both only for models trained with the world cache.

        ``precision``: ``"auto"`` runs sessions under bf16 autocast where the device multiplies
        bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX) and in float32 elsewhere; ``"fp32"``
        and ``"bf16"`` force one. Evaluation and training on a CPU stay float32.
        """
        folder = checkpoint.resolve(checkpoint_dir)
        tok, dit = load_tokenizer(folder), load_dit(folder)
        dyn = checkpoint.config(folder, "dynamics")
        sampler = dyn.get("sampler", {})
        trained = int(sampler.get("window", dit.cfg.max_frames))
        defaults = {k: sampler[k] for k in ("steps", "ctx_noise", "shift", "sinks", "guidance") if k in sampler}
        stream = {**defaults, **{k: v for k, v in stream.items() if v is not None}}
        unknown = set(stream) - {f.name for f in dataclasses.fields(StreamConfig)}
        if unknown:
            raise TypeError(f"unknown stream settings {sorted(unknown)}; see StreamConfig")
        # The window keeps what the sinks leave of the trained window.
        stream.setdefault("window", trained - stream.get("sinks", StreamConfig.sinks) - dit.cfg.frames_per_block)
        starts = None
        if (folder / "starts.json").is_file():
            starts, _ = checkpoint.load(folder, "starts")
        fps = DOOM_TICS_PER_SECOND / (dyn.get("frame_skip") or 4)
        memory = None
        if memory_k is not None or memory_cap is not None or dit.cfg.memory_frames:
            if not dit.cfg.memory_frames:
                raise ValueError(
                    f"{folder}: this model was trained without memory (memory_frames=0): it takes no "
                    f"memory settings (memory_k={memory_k}, memory_cap={memory_cap})"
                )
            saved = dyn.get("memory", {})
            k = saved.get("k", dit.cfg.memory_frames) if memory_k is None else memory_k
            cap = saved.get("cap", BankConfig.cap) if memory_cap is None else memory_cap
            # Frames of ages 1..window are in the rolling KV window: recall only older ones.
            memory = BankConfig(k=int(k), cap=int(cap), min_age=int(stream["window"]) + 1)
        world = None
        if "world_cache" in dyn:
            world = PlayCache.from_dict(dyn["world_cache"], cache_points, pose_correction is not False)
        elif cache_points is not None or pose_correction is not None:
            raise ValueError(
                f"{folder}: cache_points and pose_correction are for models trained with the world cache; "
                f"this one was not"
            )
        model = cls(tok, dit, StreamConfig(**stream), starts, fps, trained, device, memory, world, precision)
        model.checkpoint = folder
        return model

    # --- what it is ------------------------------------------------------------------------------
    @property
    def frame_shape(self) -> tuple[int, int, int]:
        h, w = self.tokenizer.cfg.image_size
        return h, w, 3

    @property
    def num_starts(self) -> int:
        return 0 if self._starts is None else len(self._starts["frames"])

    def start(self, i: int) -> tuple[np.ndarray, list[Action]]:
        """Stored start context ``i``: real frames (T, H, W, 3) uint8 and the T actions that made them."""
        if not 0 <= i < self.num_starts:
            raise IndexError(f"start {i} out of range: this model stores {self.num_starts} start contexts")
        s = self._starts
        return s["frames"][i].numpy(), [Action(k, m) for k, m in zip(s["keys"][i].numpy(), s["mouse"][i].numpy())]

    def start_geometry(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Stored start ``i``'s depth (T, H, W) uint8 levels and camera poses (T, 5), where the
        model stores them (world-cache models do); else None."""
        self.start(i)  # the range check
        if "depth" not in self._starts:
            return None
        return self._starts["depth"][i].numpy(), self._starts["pose"][i].numpy()

    # --- sessions ----------------------------------------------------------------------------
    def session(
        self,
        context_frames: np.ndarray | None = None,
        context_actions: Sequence[ActionLike] | None = None,
        seed: int | None = None,
        context_poses: np.ndarray | None = None,
        context_depth: np.ndarray | None = None,
    ) -> Session:
        """A new play session from real context frames (or a stored start chosen with ``seed``);
        ``context_poses`` (T, 5): their cameras, for the frame memory, if known. A world-cache
        model needs ``context_depth`` (T, H, W) uint8 levels and ``context_poses`` with given frames."""
        return Session(self, context_frames, context_actions, seed, context_poses, context_depth)

    def step_many(
        self, sessions: Sequence[Session], actions_: Sequence[ActionLike], poses: np.ndarray | None = None
    ) -> np.ndarray:
        """Advance every session by one chunk with its action, in one batched forward.

        Returns uint8 ``(B, H, W, 3)`` (the chunk's last frame per session). A bad action raises
        :class:`~worldgen.actions.ActionError` naming its index; then no session has advanced.
        ``poses`` (B, 5): the true camera (x, y, z, yaw, pitch) of each new frame, where known
        (a replay against the game); with memory, recall and the bank use it instead of the
        dead-reckoned one. Ignored without memory.
        """
        if len(sessions) != len(actions_):
            raise ValueError(f"{len(sessions)} sessions but {len(actions_)} actions")
        self._check_sessions(sessions, "step_many")
        vecs = _action_vectors(actions_, "action")
        if not sessions:
            return np.zeros((0, *self.frame_shape), np.uint8)
        chunk = self.dit.cfg.frames_per_block
        acts = torch.from_numpy(vecs).to(self.device)[:, None].expand(-1, chunk, -1)  # (B, c, A)
        if poses is not None:
            poses = np.asarray(poses, np.float32)
            if poses.shape != (len(sessions), 5) or not np.isfinite(poses).all():
                raise ValueError(
                    f"poses must be finite (B, 5) = ({len(sessions)}, 5) x, y, z, yaw, pitch, got {poses.shape}"
                )
        with torch.no_grad(), self.autocast():
            z = self._advance(sessions, acts, None if poses is None else torch.from_numpy(poses).to(self.device))
            frames = tensor_to_frames(self._graph_call(self._decode, z[:, -1].float()))
        if self.world is not None:  # RGB-D: the depth joins the clouds and is the session's depth
            self._fuse(sessions, frames, acts[:, -1])
            frames, depth = np.ascontiguousarray(frames[..., :3]), frames[..., 3]
            for s, d in zip(sessions, depth):
                s.depth = d
        for s, f in zip(sessions, frames):
            s.frame, s.steps = f, s.steps + chunk
        return frames

    def reset_many(
        self,
        sessions: Sequence[Session],
        context_frames: Sequence[np.ndarray | None],
        context_actions: Sequence[Sequence[ActionLike] | None],
        seeds: Sequence[int | None],
        context_poses: Sequence[np.ndarray | None] | None = None,
        context_depth: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """Start every session again from its context, as :meth:`Session.reset` does one, with
        the contexts of one length encoded and prefilled in one batch (what many agents' episodes
        ending together cost). Per session: context frames and actions (or both None: a stored
        start picked by the seed), the seed, and where :meth:`Session.reset` takes them, context
        poses and depth. Returns uint8 ``(B, H, W, 3)``, each session's last context frame. A bad
        context raises naming its index; then no session has changed.
        """
        n = len(sessions)
        context_poses = [None] * n if context_poses is None else context_poses
        context_depth = [None] * n if context_depth is None else context_depth
        lengths = {len(x) for x in (context_frames, context_actions, seeds, context_poses, context_depth)}
        if lengths != {n}:
            raise ValueError(f"reset_many takes one context, action list, seed, pose and depth per session ({n})")
        self._check_sessions(sessions, "reset_many")
        contexts = []
        for i, args in enumerate(zip(context_frames, context_actions, seeds, context_poses, context_depth)):
            try:
                contexts.append(_context(self, *args))
            except ValueError as e:  # ActionError too, as itself
                raise type(e)(f"session {i}: {e}") from None
        return self._begin(sessions, contexts) if sessions else np.zeros((0, *self.frame_shape), np.uint8)

    def _check_sessions(self, sessions: Sequence[Session], call: str) -> None:
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError(f"a session appears twice in one {call} call")
        for i, s in enumerate(sessions):
            if s.model is not self or s.closed:
                raise ValueError(f"session {i} is closed or belongs to another WorldModel")

    def rollout(
        self,
        context_frames: np.ndarray,
        context_actions: Sequence[ActionLike],
        actions_: Sequence[ActionLike],
        seed: int | None = None,
    ) -> np.ndarray:
        """Play ``actions_`` from the context: uint8 ``(N, H, W, 3)``, one frame per action."""
        s = self.session(context_frames, context_actions, seed)
        try:
            return (
                np.stack([s.step(a) for a in actions_]) if len(actions_) else np.zeros((0, *self.frame_shape), np.uint8)
            )
        finally:
            s.close()

    # --- the hot path ----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision this model's sessions compute in (``precision`` of :meth:`load`)."""
        return autocast(self.device, self.bf16)

    def _new_cache(self) -> KVCache:
        cfg = self.dit.cfg
        return KVCache(
            cfg.depth,
            cfg.heads,
            cfg.dim // cfg.heads,
            cfg.tokens_per_frame,
            self.stream.sinks,
            self.stream.window,
            self.device,
            self.cache_dtype,
        )

    def _past(
        self, caches: list[KVCache]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The caches as one batch: unrotated keys and values (depth, B, H, L, d), RoPE cos/sin of
        their window-relative positions, the key mask (B, L) and the new frames' first position (B,)."""
        pos = torch.stack([c.positions() for c in caches]).to(self.device)  # (B, slots)
        rope = self.dit.rope(pos, pos.shape[1])  # (B, 1, L, d/2) each
        k = torch.stack([c.k for c in caches], 1)
        v = torch.stack([c.v for c in caches], 1)
        mask = torch.stack([c.valid() for c in caches]).to(self.device)  # (B, L)
        nxt = torch.tensor([c.next_position() for c in caches], device=self.device)
        return k, v, rope, mask, nxt

    def _denoise(
        self,
        x: torch.Tensor,
        eps_ctx: torch.Tensor | None,
        acts: torch.Tensor,
        frame_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        memory: Memory | None = None,
        cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of B sessions (:func:`denoise` with this model's DiT and settings): what
        :meth:`compile` captures whole."""
        return denoise(
            self.dit, self.stream, x, eps_ctx, acts, frame_pos, k, v, cos, sin, mask, memory=memory, cond=cond
        )

    def _noise(
        self, gens: list[torch.Generator], frames: int, sample: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each session's sampler noise (if ``sample``) and, with ctx_noise > 0, stabilisation
        noise, from its own generator in a fixed order: the same numbers alone or in a batch."""
        # Row by row, so each generator draws its sampler noise, then its stabilisation noise.
        shape = (len(gens), frames, self.dit.cfg.latent_channels, *self.dit.cfg.latent_size)
        x = sampling.randn(shape, gens, self.device) if sample else None
        ctx = sampling.randn(shape, gens, self.device) if self.stream.ctx_noise > 0 else None
        return x, ctx

    def _begin(self, sessions: Sequence[Session], contexts: Sequence[_Context]) -> np.ndarray:
        """Start ``sessions`` from validated contexts: those whose contexts have the same length
        encode and prefill in one batch. Returns their last context frames (B, H, W, 3)."""
        same_length: dict[int, list[int]] = {}
        for i, c in enumerate(contexts):
            same_length.setdefault(len(c.frames), []).append(i)
        with torch.no_grad(), self.autocast():
            for idx in same_length.values():
                group, ctx = [sessions[i] for i in idx], [contexts[i] for i in idx]
                for s, c in zip(group, ctx):
                    s.generator.manual_seed(c.seed)
                frames = np.stack([c.frames for c in ctx])  # (B, T, H, W, 3)
                acts = torch.from_numpy(np.stack([c.acts for c in ctx])).to(self.device)  # (B, T, A)
                poses = [None if c.poses is None else torch.from_numpy(c.poses).to(self.device) for c in ctx]
                if self.world is not None:  # RGB-D latents
                    pixels = np.concatenate([frames, np.stack([c.depth for c in ctx])[..., None]], -1)
                else:
                    pixels = frames
                z = self.tokenizer.encode(frames_to_tensor(pixels.reshape(-1, *pixels.shape[2:]), self.device))
                z = z.unflatten(0, frames.shape[:2])  # (B, T, C, h, w)
                cond = None
                if self.world is not None:  # the views of the context frames and the clouds they leave
                    rgb = torch.from_numpy(frames).to(self.device)
                    depth = torch.from_numpy(pixels[..., 3]).to(self.device).float()
                    cond = torch.stack(
                        [
                            self.world.start(s.slot, self.tokenizer, rgb[b], depth[b], poses[b], acts[b])
                            for b, s in enumerate(group)
                        ]
                    )
                    for s, c in zip(group, ctx):
                        s.depth = c.depth[-1].copy()
                self._prefill(group, z, acts, poses, cond)
        for s, c in zip(sessions, contexts):
            s.frame, s.steps, s.seed = c.frames[-1].copy(), 0, c.seed
        return np.stack([s.frame for s in sessions])

    def _prefill(
        self,
        sessions: Sequence[Session],
        z: torch.Tensor,
        acts: torch.Tensor,
        poses: Sequence[torch.Tensor | None],
        cond: torch.Tensor | None = None,
    ) -> None:
        """Write context latents (B, T, C, h, w) with their actions (B, T, A) (and world-cache
        views ``cond`` (B, T, C', h, w)) into the sessions' caches, and with memory into their
        banks at each session's ``poses`` (T, 5) (None: dead-reckoned from the origin)."""
        _, eps = self._noise([s.generator for s in sessions], z.shape[1], sample=False)
        k, v = prefill(self.dit, self.stream, z, acts, eps, cond)
        for b, s in enumerate(sessions):
            s.cache.clear()
            s.cache.write(k[:, b], v[:, b])
            if s.bank is not None:
                s.bank.clear()
                pose = torch.zeros(1, 5, device=self.device)
                for i in range(z.shape[1]):
                    pose = poses[b][i : i + 1] if poses[b] is not None else dead_reckon(pose, acts[b, i : i + 1])
                    s.bank.add(z[b, i], pose[0], i)
                s.pose, s.clock = pose[0], z.shape[1]

    def _advance(
        self, sessions: Sequence[Session], acts: torch.Tensor, poses: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoise the next chunk of every session, write it to the caches (and banks): latents
        (B, c, C, h, w). ``poses`` (B, 5): the new frames' true cameras, if known."""
        caches = [s.cache for s in sessions]
        k, v, (cos, sin), mask, nxt = self._past(caches)
        frame_pos = nxt[:, None] + torch.arange(acts.shape[1], device=self.device)  # (B, c)
        x, eps_ctx = self._noise([s.generator for s in sessions], acts.shape[1])
        memory = cond = None
        if self.world is not None:  # the new frames' cameras and their views of the clouds, before the step
            slots = torch.tensor([s.slot for s in sessions], device=self.device)
            cond, rendered = self.world.views(slots, acts[:, -1], self.tokenizer, poses)
            self._pending = slots, rendered
            cond = cond[:, None]  # (B, 1, C', h, w): one frame per block
        if self.memory is not None:
            if poses is None:
                poses = dead_reckon(torch.stack([s.pose for s in sessions]), acts[:, -1])
            now = torch.tensor([s.clock for s in sessions], device=self.device)
            memory = recalled([s.bank for s in sessions], poses, now)
        x, k_new, v_new = self._graph_call(
            self._step,
            x,
            eps_ctx,
            acts,
            frame_pos,
            k,
            v,
            cos,
            sin,
            mask,
            memory,
            *(() if cond is None else (cond,)),
            batch_dims=(0, 0, 0, 0, 1, 1),  # keys and values: (depth, B, ...)
        )
        for b, c in enumerate(caches):  # copied into the caches before the next compiled call
            c.write(k_new[:, b], v_new[:, b])
        if self._graphs:
            x = x.clone()  # decoded (another compiled call) and kept in banks after this one
        if memory is not None:
            for b, s in enumerate(sessions):
                s.bank.add(x[b, -1], poses[b], s.clock)
                s.pose, s.clock = poses[b], s.clock + acts.shape[1]
        return x

    def _fuse(self, sessions: Sequence[Session], rgbd: np.ndarray, action: torch.Tensor) -> None:
        """The generated RGB-D frames (B, H, W, 4) correct the poses their views were rendered at
        and join the sessions' clouds there."""
        slots, rendered = self._pending
        self._pending = None
        self.world.fuse(slots, rendered, rgbd, action)


class Session:
    """One player's stream: a KV cache, a noise generator and the last frame shown.

    Made by :meth:`WorldModel.session`; see there and :meth:`step`.
    """

    def __init__(
        self,
        model: WorldModel,
        context_frames: np.ndarray | None,
        context_actions: Sequence[ActionLike] | None,
        seed: int | None,
        context_poses: np.ndarray | None = None,
        context_depth: np.ndarray | None = None,
    ):
        self.model = model
        self.cache = model._new_cache()
        # World cache (models trained with it): the slot of this session's cloud in the model's pool,
        # and the depth (H, W) uint8 levels of the last frame, generated with it.
        self.slot = model.world.acquire() if model.world is not None else None
        self.depth: np.ndarray | None = None
        # Frame memory (models trained with it): the bank, the last frame's camera and step.
        self.bank = (
            FrameBank(
                model.memory,
                (model.dit.cfg.latent_channels, *model.dit.cfg.latent_size),
                model.device,
                model.cache_dtype,
            )
            if model.memory is not None
            else None
        )
        self.pose = torch.zeros(5, device=model.device)
        self.clock = 0
        self.closed = False
        self.generator = torch.Generator(model.device)
        self.frame: np.ndarray = np.zeros(model.frame_shape, np.uint8)
        self.steps = 0
        try:
            self.reset(context_frames, context_actions, seed, context_poses, context_depth)
        except BaseException:
            self.close()
            raise

    def reset(
        self,
        context_frames: np.ndarray | None = None,
        context_actions: Sequence[ActionLike] | None = None,
        seed: int | None = None,
        context_poses: np.ndarray | None = None,
        context_depth: np.ndarray | None = None,
    ) -> np.ndarray:
        """Start again from real context (or a stored start chosen with ``seed``); returns the
        last context frame, now :attr:`frame`. Bad input raises and leaves the session as it was.
        ``context_poses`` (T, 5): the context frames' cameras, for the frame memory, if known.
        A world-cache model needs them and ``context_depth`` (T, H, W) uint8 levels (stored
        starts of such a model carry both)."""
        context = _context(self.model, context_frames, context_actions, seed, context_poses, context_depth)
        return self.model._begin([self], [context])[0]

    def step(self, action: ActionLike, pose: np.ndarray | None = None) -> np.ndarray:
        """Generate the next frame for ``action``: uint8 (H, W, 3).

        ``action``: an :class:`~worldgen.actions.Action` or the wire form
        ``{"keys": [names] or 8 x 0/1, "mouse": [yaw, pitch]}`` (degrees). A bad action raises
        :class:`~worldgen.actions.ActionError` and the session stays as it was. ``pose`` (5,):
        the new frame's true camera, if known (see :meth:`WorldModel.step_many`).
        """
        if pose is None:
            return self.model.step_many([self], [action])[0]
        return self.model.step_many([self], [action], np.asarray(pose)[None])[0]

    @property
    def camera_pose(self) -> np.ndarray | None:
        """The last frame's camera (5,) x, y, z, yaw, pitch of a world-cache model (None without
        the cache): the pose its view was rendered at and its RGB-D joined the cloud at."""
        if self.slot is None:
            return None
        return self.model.world.pose[self.slot].cpu().numpy().copy()

    def save_cloud(self, path: str | os.PathLike) -> Path:
        """Write this session's world-cache cloud (what it has generated of the world, in world
        space) as a binary ``.ply``: positions, normals, colours; open3d and MeshLab read it."""
        if self.slot is None:
            raise ValueError(
                "this session keeps no point cloud: only models trained with the world cache "
                "(`worldgen train dynamics --world-cache H`) build one"
            )
        if self.closed:
            raise ValueError("this session is closed: its cloud was released")
        return self.model.world.clouds.save_ply(path, self.slot)

    def close(self) -> None:
        """Release the cache's memory; the session cannot step afterwards."""
        if self.closed:
            return
        self.closed = True
        self.cache.k = self.cache.v = torch.zeros(0)
        self.bank = None
        if self.slot is not None:
            self.model.world.release(self.slot)

    def cache_bytes(self) -> int:
        """Memory this session holds: its KV cache, frame bank and world-cache cloud (all fixed-size)."""
        own = self.cache.nbytes() + (self.bank.nbytes() if self.bank is not None else 0)
        return own + (self.model.world.nbytes_per_session() if self.slot is not None else 0)


def _action_vector(a: ActionLike) -> np.ndarray:
    if isinstance(a, Action):
        return a.vector()
    if isinstance(a, Mapping):
        return Action.from_dict(a).vector()
    raise ActionError(f"an action must be an Action or a mapping with 'keys' and 'mouse', got {type(a).__name__}")


def _action_vectors(acts: Sequence[ActionLike], what: str) -> np.ndarray:
    """Model vectors (N, A) of N actions; an :class:`ActionError` names the index of a bad one."""
    vecs = []
    for i, a in enumerate(acts):
        try:
            vecs.append(_action_vector(a))
        except ActionError as e:
            raise ActionError(f"{what} {i}: {e}") from None
    return np.stack(vecs) if vecs else np.zeros((0, actions.ACTION_DIM), np.float32)


@dataclasses.dataclass
class _Context:
    """A validated start for one session: the latest ``sinks + window`` context frames (T, H, W, 3)
    uint8, their action vectors (T, A), the session's seed, and where known their cameras (T, 5)
    and a world-cache model's depth (T, H, W) uint8 levels."""

    frames: np.ndarray
    acts: np.ndarray
    seed: int
    poses: np.ndarray | None
    depth: np.ndarray | None


def _context(
    m: WorldModel,
    frames: Any,
    acts: Any,
    seed: int | None,
    poses: Any = None,
    depth: Any = None,
) -> _Context:
    """Checks a session's start (raises naming the problem) and picks a stored one when no frames
    are given; see :meth:`Session.reset`."""
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else int(seed)
    if frames is None and acts is None:
        if m.num_starts == 0:
            raise ValueError("this model stores no start contexts: pass context_frames and context_actions")
        i = int(np.random.default_rng(seed).integers(m.num_starts))
        frames, acts = m.start(i)
        if m.world is not None and depth is None and poses is None:
            depth, poses = m.start_geometry(i) or (None, None)
    frames, acts = _check_context(m, frames, acts)
    if m.world is not None:
        depth = _check_depth(m, frames, depth, poses)
    if poses is not None:
        poses = np.asarray(poses, np.float32)
        if poses.shape != (len(frames), 5) or not np.isfinite(poses).all():
            raise ValueError(
                f"context_poses must be finite ({len(frames)}, 5), one camera per context frame, got {poses.shape}"
            )
    keep = m.stream.sinks + m.stream.window  # a longer context keeps its latest frames
    return _Context(
        frames[-keep:],
        acts[-keep:],
        seed,
        None if poses is None else poses[-keep:],
        None if depth is None else depth[-keep:],
    )


def _check_context(m: WorldModel, frames: Any, acts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated context: frames uint8 (T, H, W, 3) and action vectors (T, A)."""
    if frames is None or acts is None:
        raise ValueError("give both context_frames and context_actions, or neither (a stored start)")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != m.frame_shape or len(frames) < 1:
        raise ValueError(
            f"context_frames must be uint8 (T >= 1, {', '.join(map(str, m.frame_shape))}), "
            f"got {frames.dtype} {frames.shape}"
        )
    if len(acts) != len(frames):
        raise ValueError(
            f"{len(frames)} context frames but {len(acts)} context actions (one per frame: the action that produced it)"
        )
    return frames, _action_vectors(acts, "context action")


def _check_depth(m: WorldModel, frames: np.ndarray, depth: Any, poses: Any) -> np.ndarray:
    """A world-cache model's context depth (T, H, W) uint8 levels, checked with its poses."""
    if depth is None or poses is None:
        raise ValueError(
            "this model plays with the world cache: a context needs context_depth (T, H, W) uint8 depth "
            "levels and context_poses (T, 5) cameras, as recorded by `worldgen record` (missing: "
            f"{', '.join(n for n, v in (('context_depth', depth), ('context_poses', poses)) if v is None)})"
        )
    depth = np.asarray(depth)
    if depth.dtype != np.uint8 or depth.shape != frames.shape[:3]:
        raise ValueError(f"context_depth must be uint8 {frames.shape[:3]}, got {depth.dtype} {depth.shape}")
    return depth


def save_starts(
    folder: str | os.PathLike,
    frames: np.ndarray,
    keys: np.ndarray,
    mouse: np.ndarray,
    source: Mapping[str, Any] | None = None,
    depth: np.ndarray | None = None,
    pose: np.ndarray | None = None,
) -> None:
    """Store real start contexts with a checkpoint: frames uint8 (S, T, H, W, 3), keys (S, T, 8),
    mouse (S, T, 2), the action that produced each frame; ``source`` says where they come from.
    A world-cache model's starts also need ``depth`` uint8 (S, T, H, W) levels and ``pose`` (S, T, 5)."""
    s, t = frames.shape[:2]
    k, m = actions.validate(keys, mouse, (s, t))
    if frames.dtype != np.uint8 or frames.ndim != 5:
        raise ValueError(f"frames must be uint8 (S, T, H, W, 3), got {frames.dtype} {frames.shape}")
    geometry = {}
    if (depth is None) != (pose is None):
        raise ValueError("give both depth and pose with the starts, or neither")
    if depth is not None:
        if depth.dtype != np.uint8 or depth.shape != frames.shape[:4]:
            raise ValueError(f"depth must be uint8 {frames.shape[:4]}, got {depth.dtype} {depth.shape}")
        pose = np.asarray(pose, np.float32)
        if pose.shape != (s, t, 5) or not np.isfinite(pose).all():
            raise ValueError(f"pose must be finite ({s}, {t}, 5), got {pose.shape}")
        geometry = {"depth": torch.from_numpy(np.ascontiguousarray(depth)), "pose": torch.from_numpy(pose)}
    checkpoint.save(
        folder,
        "starts",
        {
            "frames": torch.from_numpy(np.ascontiguousarray(frames)),
            "keys": torch.from_numpy(k),
            "mouse": torch.from_numpy(m),
            **geometry,
        },
        {"source": dict(source or {}), "action_schema": actions.schema()},
    )
