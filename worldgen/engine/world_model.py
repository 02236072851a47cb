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
session gives the same frames whether stepped alone or in a batch.

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
from worldgen.models import DiT, Tokenizer, autocast, frames_to_tensor, load_dit, load_tokenizer, tensor_to_frames
from worldgen.models.dit import Memory
from worldgen.models.world_cache import check_rgbd

ActionLike = Action | Mapping[str, Any]


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
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Weights in float32 on the CPU (no fast bf16 there); bf16 autocast on CUDA.
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
        model = cls(tok, dit, StreamConfig(**stream), starts, fps, trained, device, memory, world)
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
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("a session appears twice in one step_many call")
        for i, s in enumerate(sessions):
            if s.model is not self or s.closed:
                raise ValueError(f"session {i} is closed or belongs to another WorldModel")
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
        with torch.no_grad(), self._autocast():
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
    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

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

    def _prefill(
        self,
        session: Session,
        z: torch.Tensor,
        acts: torch.Tensor,
        poses: torch.Tensor | None,
        cond: torch.Tensor | None = None,
    ) -> None:
        """Write context latents (T, C, h, w) with their actions (T, A) (and world-cache views
        ``cond`` (T, C', h, w)) into the session's cache, and with memory into its bank at
        ``poses`` (T, 5) (None: dead-reckoned from the origin)."""
        _, eps = self._noise([session.generator], len(z), sample=False)
        k, v = prefill(self.dit, self.stream, z[None], acts[None], eps, None if cond is None else cond[None])
        session.cache.clear()
        session.cache.write(k[:, 0], v[:, 0])
        if session.bank is not None:
            session.bank.clear()
            pose = torch.zeros(1, 5, device=self.device)
            for i in range(len(z)):
                pose = poses[i : i + 1] if poses is not None else dead_reckon(pose, acts[i : i + 1])
                session.bank.add(z[i], pose[0], i)
            session.pose, session.clock = pose[0], len(z)

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
        m = self.model
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else int(seed)
        if context_frames is None and context_actions is None:
            if m.num_starts == 0:
                raise ValueError("this model stores no start contexts: pass context_frames and context_actions")
            i = int(np.random.default_rng(seed).integers(m.num_starts))
            context_frames, context_actions = m.start(i)
            if m.world is not None and context_depth is None and context_poses is None:
                context_depth, context_poses = m.start_geometry(i) or (None, None)
        frames, acts = _check_context(m, context_frames, context_actions)
        if m.world is not None:
            context_depth = _check_depth(m, frames, context_depth, context_poses)
        if context_poses is not None:
            context_poses = np.asarray(context_poses, np.float32)
            if context_poses.shape != (len(frames), 5) or not np.isfinite(context_poses).all():
                raise ValueError(
                    f"context_poses must be finite ({len(frames)}, 5), one camera per context frame, "
                    f"got {context_poses.shape}"
                )
        keep = m.stream.sinks + m.stream.window  # a longer context keeps its latest frames
        frames, acts = frames[-keep:], acts[-keep:]
        poses = None if context_poses is None else torch.from_numpy(context_poses[-keep:]).to(m.device)
        self.generator.manual_seed(seed)
        with torch.no_grad(), m._autocast():
            acts_t, cond = torch.from_numpy(acts).to(m.device), None
            if m.world is None:
                z = m.tokenizer.encode(frames_to_tensor(frames, m.device))
            else:  # RGB-D latents; the views of the context frames and the cloud they leave
                depth = context_depth[-keep:]
                z = m.tokenizer.encode(frames_to_tensor(np.concatenate([frames, depth[..., None]], -1), m.device))
                rgb_t, depth_t = torch.from_numpy(frames).to(m.device), torch.from_numpy(depth).to(m.device).float()
                cond = m.world.start(self.slot, m.tokenizer, rgb_t, depth_t, poses, acts_t)
                self.depth = depth[-1].copy()
            m._prefill(self, z, acts_t, poses, cond)
        self.frame, self.steps, self.seed = frames[-1].copy(), 0, seed
        return self.frame

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
