"""Gymnasium environments over a world model: an agent acts inside the learned game.

:class:`WorldModelEnv` is one player in one engine session; :class:`WorldModelVectorEnv` is N of
them stepped together by one batched forward (``wm.step_many``). Both are registered as
``worldgen/Doom-v0`` (``import worldgen.env`` registers them):

    >>> import gymnasium, worldgen.env                                            # doctest: +SKIP
    >>> env = gymnasium.make("worldgen/Doom-v0")           # the default model    # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)                                             # doctest: +SKIP
    >>> obs, reward, terminated, truncated, info = env.step(
    ...     {"keys": [1, 0, 0, 0, 0, 0, 0, 0], "mouse": [5.0, 0.0]})              # doctest: +SKIP
    >>> envs = gymnasium.make_vec("worldgen/Doom-v0", num_envs=16,
    ...                           vectorization_mode="vector_entry_point")        # doctest: +SKIP

Spaces (docs/agents.md has the full reference):

* action: ``action_space=`` ``"dict"`` (default; the schema of :mod:`worldgen.actions`,
  ``Dict(keys=MultiBinary(8), mouse=Box(-range, range, (2,), float32))``, mouse in degrees per
  step, yaw > 0 turning right), ``"discrete"``, ``"multidiscrete"`` or ``"box"``
  (:mod:`worldgen.env.gym.action_spaces`). The mouse range of every space is what the model's
  training data covers (``mouse_range=`` overrides); a Dict action beyond it is clipped to it. The
  Dict space also accepts a :class:`~worldgen.actions.Action` or the wire form with key names,
  ``{"keys": ["forward"], "mouse": [5.0, 0.0]}``. A bad action raises
  :class:`~worldgen.actions.ActionError` naming the problem, and the env is unchanged.
* observation: the frame, ``Box(0, 255, (H, W, 3), uint8)``, (120, 160, 3) for the default
  model. ``observations=("rgb", "depth", "pose")`` (any of them) gives a ``Dict`` instead:
  ``depth`` ``Box(0, 255, (H, W, 1), uint8)`` in the recorder's depth levels (larger = farther) and
  ``pose`` ``Box(POSE_LOW, POSE_HIGH, (5,), float32)``, x, y, z (map units), yaw, pitch (degrees)
  relative to where the episode started (its start frame at the origin, looking along +x). A
  world-cache model (docs/world_cache.md) generates both itself: its depth, and the camera its
  frame's cache view was rendered at, in the map's coordinates (not start-relative). An RGB-only
  model's are read off its frames by a learned geometry head
  (:mod:`worldgen.env.learned.geometry`: depth per frame, odometry per step, integrated): ``geometry=``
  the head stored with the model (default; the default model's ships with worldgen) or a folder.
  ``preset="atari"``: the last 4 frames in grayscale at 84x84, ``(4, 84, 84)`` uint8.

Episodes: ``reset(seed=...)`` draws a real start context (:mod:`worldgen.env.gym.starts`: the
checkpoint's stored starts by default, else a fresh ViZDoom game; or ``start="dataset"`` with
``data=``) and the session's sampler seed from ``self.np_random``, so the same seed
gives the same episode for the same actions. ``reset(options={"start": i})`` picks stored
start ``i``; ``options={"context_frames": F, "context_actions": A}`` starts from your frames.
Reward and termination come from a reward model (:mod:`worldgen.env.learned.reward`): the learned head
by default, ``reward="zero"``, or your function. Episodes are truncated after ``horizon`` steps
(``gymnasium.make`` leaves that to its ``TimeLimit`` of the registered ``max_episode_steps``).
``info``: ``start`` (reset), ``steps``, and ``reward_terms`` (a learned head's parts of the reward).
On a CPU of at most 4 cores torch gets one thread (``torch_threads=`` overrides).

The vector env follows Gymnasium 1.x next-step autoreset (``AutoresetMode.NEXT_STEP``): the step
after a sub-env terminates or truncates resets it (its action is ignored, reward 0), and
``reset(seed=s)`` seeds sub-env i with ``s + i``, exactly as ``SyncVectorEnv`` over
:class:`WorldModelEnv` would, only with one forward for all sub-envs. ``autoreset_mode=SAME_STEP``
resets in the step that ended the episode (``final_obs``/``final_info``), Stable-Baselines3's
convention (:mod:`worldgen.env.gym.sb3` wraps it in SB3's ``VecEnv`` API).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from worldgen import checkpoint
from worldgen.actions import Action, ActionError
from worldgen.env import DEFAULT_HORIZON
from worldgen.env.gym.action_spaces import ActionCodec, check_mouse_range, to_action, trained_mouse_range
from worldgen.env.gym.starts import DatasetStarts, DoomStarts, Start, StartSource, StoredStarts, resize_frames
from worldgen.env.learned.geometry import POSE_HIGH, POSE_LOW, find_head, integrate, predict_depth, predict_motion
from worldgen.env.learned.reward import LearnedReward, RewardModel, make_reward_model

OBSERVATION_KEYS = ("rgb", "depth", "pose")
PRESETS = (None, "atari")
ATARI_SIZE = 84  # DQN's (Mnih et al. 2015) grayscale frame side, what Atari-tuned nets and hyperparameters expect
ATARI_STACK = 4  # frames per observation in that preset: enough to see motion
# On this many cores or fewer, torch's intra-op threads fight each other (and the env's own
# work) more than they help: measured 6-9x slower than one thread on a 2-core machine.
SMALL_CPU = 4

_models: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()


def load_model(model: Any = "default", device: Any = None, compile: bool = False, **stream: Any) -> Any:
    """A :class:`~worldgen.WorldModel` for ``model`` (a checkpoint folder, a packaged name, or a
    WorldModel, returned as is). Loaded models are shared while anyone holds them, so the
    envs that ``gymnasium.make`` and ``check_env`` build load the weights once. ``compile``:
    ``wm.compile()`` (CUDA graphs of the step; each batch size compiles once, on first use)."""
    from worldgen.engine import WorldModel

    if isinstance(model, WorldModel):
        if stream or compile:
            raise ValueError(
                "stream settings and compile apply when loading a model; this WorldModel is "
                "loaded already (call its compile() yourself)"
            )
        return model
    folder = checkpoint.resolve(model).resolve()
    key = (str(folder), str(device), compile, tuple(sorted(stream.items())))
    wm = _models.get(key)
    if wm is None:
        wm = WorldModel.load(folder, device=device, **stream)
        _models[key] = wm.compile() if compile else wm
    return wm


class _World:
    """What every env over one model shares: the model, the reward model, the start source,
    the spaces. A vector env builds one for all its sub-envs."""

    def __init__(
        self,
        model: Any = "default",
        *,
        device: Any = None,
        reward: Any = "learned",
        reward_weights: Mapping[str, float] | None = None,
        horizon: int | None = DEFAULT_HORIZON,
        start: str = "auto",
        data: str | os.PathLike | None = None,
        split: str = "heldout",
        maps: Sequence[str] = ("E1M1",),
        context: int | None = None,
        observations: Sequence[str] = ("rgb",),
        geometry: Any = "learned",
        stream: Mapping[str, Any] | None = None,
        compile: bool = False,
        action_space: str = "dict",
        mouse_range: Sequence[float] | None = None,
        preset: str | None = None,
        torch_threads: int | None = None,
    ):
        from worldgen.engine import WorldModel

        set_torch_threads(torch_threads, device)
        self.wm = load_model(model, device, compile, **dict(stream or {}))
        folder = None if isinstance(model, WorldModel) else checkpoint.resolve(model)
        self.reward: RewardModel = make_reward_model(reward, folder, self.wm.device, reward_weights)
        if isinstance(self.reward, LearnedReward) and self.reward.frame_size != tuple(self.wm.frame_shape[:2]):
            raise ValueError(
                f"the reward head reads {self.reward.frame_size} frames, the model makes "
                f"{tuple(self.wm.frame_shape[:2])}; train a head on data at the model's resolution"
            )
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 steps or None (never truncate), got {horizon}")
        self.horizon = horizon
        self.starts = self._starts(start, data, split, maps, context)
        self.observations = tuple(observations)
        bad = [k for k in self.observations if k not in OBSERVATION_KEYS]
        if bad or not self.observations or len(set(self.observations)) != len(self.observations):
            raise ValueError(f"observations must be distinct keys of {OBSERVATION_KEYS}, got {observations!r}")
        h, w, _ = self.wm.frame_shape
        self.geometry = None
        # A world-cache model generates depth and pose itself; an RGB-only one needs the geometry head.
        if {"depth", "pose"} & set(self.observations) and self.wm.world is None:
            self.geometry = find_head(geometry, folder, self.wm.device)
            if tuple(self.geometry.cfg.frame_size) != (h, w):
                raise ValueError(
                    f"the geometry head reads {tuple(self.geometry.cfg.frame_size)} frames, the model "
                    f"makes {(h, w)}; train a head on data at the model's resolution"
                )
        boxes = {
            "rgb": spaces.Box(0, 255, (h, w, 3), np.uint8),
            "depth": spaces.Box(0, 255, (h, w, 1), np.uint8),
            "pose": spaces.Box(POSE_LOW, POSE_HIGH, (5,), np.float32),
        }
        self.observation_space = (
            boxes["rgb"] if self.observations == ("rgb",) else spaces.Dict({k: boxes[k] for k in self.observations})
        )
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if preset == "atari":
            if self.observations != ("rgb",):
                raise ValueError(
                    f"preset='atari' observes stacked grayscale frames; it takes observations=('rgb',), "
                    f"got {observations!r}"
                )
            self.observation_space = spaces.Box(0, 255, (ATARI_STACK, ATARI_SIZE, ATARI_SIZE), np.uint8)
        self.preset = preset
        if mouse_range is None:
            mouse_range = trained_mouse_range(folder)
        self.codec = ActionCodec(action_space, check_mouse_range(mouse_range))
        self.action_space = self.codec.space

    def _starts(self, start: str, data: Any, split: str, maps: Sequence[str], context: int | None) -> StartSource:
        if start == "auto":  # the model's own starts; a model without them starts in a fresh game
            start = "stored" if self.wm.num_starts else "dataset" if data is not None else "doom"
        if start == "stored":
            if data is not None:
                raise ValueError("data= is for start='dataset'; the stored starts come with the model")
            return StoredStarts(self.wm)
        if context is None:  # as long as the stored starts, else what the cache holds
            context = len(self.wm.start(0)[0]) if self.wm.num_starts else self.wm.stream.sinks + self.wm.stream.window
        if start == "dataset":
            if data is None:
                raise ValueError("start='dataset' needs data=DATASET_FOLDER recorded at the model's resolution")
            return DatasetStarts(data, self.wm.frame_shape, context, split)
        if start == "doom":
            return DoomStarts(self.wm.frame_shape, context, maps)
        raise ValueError(f"start must be 'auto', 'stored', 'dataset' or 'doom', got {start!r}")

    def observe(self, env: WorldModelEnv) -> Any:
        """The observation of ``env``'s last frame (fresh arrays: users may keep or change them)."""
        if self.preset == "atari":
            return env.stack.copy()
        if self.observations == ("rgb",):
            return env.frame.copy()
        parts = {
            "rgb": lambda: env.frame,
            "depth": lambda: env.depth[..., None],
            "pose": lambda: env.pose.astype(np.float32),
        }
        return {k: np.array(parts[k]()) for k in self.observations}

    def look(self, envs: Sequence[WorldModelEnv], step: tuple[np.ndarray, ...] | None = None) -> None:
        """Depth and pose of ``envs``' new frames by the geometry head, one batch for all: after a
        reset (``step`` None: the pose starts at the origin) or after the step ``(prev_frames,
        keys, mouse)``, whose odometry moves the pose. The atari preset's frame stacks move too."""
        if self.preset == "atari":
            small = atari_frames(np.stack([e.frame for e in envs]))
            for e, f in zip(envs, small):  # a reset fills the stack with its first frame, as Gymnasium's FrameStack
                e.stack = np.repeat(f[None], ATARI_STACK, 0) if step is None else np.concatenate([e.stack[1:], f[None]])
        if self.wm.world is not None:  # the model's own depth and camera
            for e in envs:
                e.depth, e.pose = e.session.depth, e.session.camera_pose
                e.pose[3] = (e.pose[3] + 180.0) % 360.0 - 180.0  # yaw in the Box's [-180, 180)
            return
        if self.geometry is None:
            return
        frames = np.stack([e.frame for e in envs])
        depth = predict_depth(self.geometry, frames) if "depth" in self.observations else None
        motion = (
            predict_motion(self.geometry, *step[:3], frames)
            if step is not None and "pose" in self.observations
            else None
        )
        for i, e in enumerate(envs):
            if depth is not None:
                e.depth = depth[i]
            if step is None:
                e.pose = np.zeros(5)
            elif motion is not None:
                e.pose = integrate(e.pose, motion[i])

    def close(self) -> None:
        self.starts.close()


def atari_frames(frames: np.ndarray) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` frames -> uint8 ``(B, 84, 84)`` grayscale (ITU-R 601 luma, as
    ALE's and OpenCV's), resized bilinearly first."""
    small = resize_frames(frames, (ATARI_SIZE, ATARI_SIZE)).astype(np.float32)
    return (small @ np.array([0.299, 0.587, 0.114], np.float32)).round().clip(0, 255).astype(np.uint8)


def set_torch_threads(threads: int | None, device: Any) -> None:
    """``torch.set_num_threads``: ``threads`` if given, else 1 when the model runs on a CPU of at
    most :data:`SMALL_CPU` cores (see there), else torch's own choice. Process-wide, as torch's
    setting is."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None (automatic), got {threads}")
        torch.set_num_threads(int(threads))
        return
    on_cpu = str(device).startswith("cpu") if device is not None else not torch.cuda.is_available()
    if on_cpu and (os.cpu_count() or 1) <= SMALL_CPU:
        torch.set_num_threads(1)


class WorldModelEnv(gymnasium.Env):
    """One agent inside a world model (see the module docstring for spaces and episodes).

    Args:
        model: checkpoint folder, packaged name (``"default"``) or a loaded ``WorldModel``.
        device: where the model runs; None: CUDA if available, else CPU.
        render_mode: ``"rgb_array"`` (``render()`` returns the frame) or ``"human"`` (a pygame
            window, updated every step; ``SDL_VIDEODRIVER=dummy`` runs it headless).
        reward: ``"learned"`` (the reward head stored with the model; the default model's ships
            with worldgen), ``"zero"``, a checkpoint folder holding a head, a reward model of
            :mod:`worldgen.env.learned.reward` (``LearnedReward(folder, death_threshold=0.2)``), or a
            function ``fn(prev_frame, action, frame) -> reward | (reward, terminated)``.
        reward_weights: for a learned head, the weight of each predicted change and of
            ``"death"`` (default: those stored with the head).
        horizon: steps after which an episode is truncated; None never truncates.
        start: ``"stored"``, ``"dataset"`` (with ``data``, ``split``), ``"doom"`` (with ``maps``), or
            ``"auto"``: stored if the model has start contexts, else dataset if ``data`` is given,
            else doom.
        context: frames in a dataset or ViZDoom start (default: as long as the stored starts).
        observations: ``("rgb",)`` (a Box), or any of ``"rgb"``, ``"depth"``, ``"pose"`` (a Dict; see
            the module docstring).
        geometry: the depth and odometry head for ``"depth"``/``"pose"``: ``"learned"`` (stored
            with the model; the default model's ships with worldgen), a checkpoint folder, or a
            :class:`~worldgen.env.learned.geometry.GeometryHead`.
        stream: engine settings for loading (``steps``, ``ctx_noise``, ``window``, ...).
        compile: ``wm.compile()`` the engine (GPU: the step as one CUDA graph; the first step
            compiles, seconds to a minute).
        action_space: ``"dict"``, ``"discrete"``, ``"multidiscrete"`` or ``"box"``
            (:mod:`worldgen.env.gym.action_spaces`).
        mouse_range: (yaw, pitch) degrees per step every action space stays within (default:
            what the model's training data covers, :func:`~worldgen.env.gym.action_spaces.trained_mouse_range`).
        preset: None, or ``"atari"``: observations are the last 4 frames, grayscale, 84x84.
        torch_threads: torch intra-op threads (default: 1 on a CPU of at most 4 cores, else torch's).

    Example:
        >>> env = WorldModelEnv("default", reward="zero", horizon=100)   # doctest: +SKIP
        >>> obs, info = env.reset(seed=1)                                # doctest: +SKIP
        >>> obs, r, term, trunc, info = env.step(env.action_space.sample())   # doctest: +SKIP
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 35 / 4}

    def __init__(self, model: Any = "default", *, render_mode: str | None = None, **kwargs: Any):
        self._setup(_World(model, **kwargs), render_mode, owns_world=True)

    @classmethod
    def _on(cls, world: _World, render_mode: str | None = None) -> WorldModelEnv:
        """A sub-env sharing ``world`` (the vector env's)."""
        env = cls.__new__(cls)
        env._setup(world, render_mode, owns_world=False)
        return env

    def _setup(self, world: _World, render_mode: str | None, owns_world: bool) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.world, self._owns_world = world, owns_world
        self.metadata = {**type(self).metadata, "render_fps": world.wm.fps}
        self.render_mode = render_mode
        self.observation_space = world.observation_space
        self.action_space = world.action_space
        self.session: Any = None
        self.frame: np.ndarray | None = None  # the last frame shown
        self.depth: np.ndarray | None = None  # its depth (H, W), when observed
        self.stack: np.ndarray | None = None  # (4, 84, 84) the last grayscale frames, in the atari preset
        self.pose = np.zeros(5)  # start-relative x, y, z, yaw, pitch, when observed
        self.steps = 0
        self._window: Any = None

    @property
    def model(self) -> Any:
        """The :class:`~worldgen.WorldModel` this env plays."""
        return self.world.wm

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        info = _restart(self.world, [self], [seed], options or {})[0]
        if self.render_mode == "human":
            self._show()
        return self.world.observe(self), info

    def _draw_start(self, options: Mapping[str, Any]) -> Start:
        unknown = set(options) - {"start", "context_frames", "context_actions"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; known: start, context_frames, context_actions")
        if "context_frames" in options or "context_actions" in options:
            frames, acts = options.get("context_frames"), options.get("context_actions")
            if frames is None or acts is None:
                raise ValueError("reset options need both context_frames and context_actions")
            return Start(np.asarray(frames), [to_action(a) for a in acts], "options")
        if "start" in options:
            i = int(options["start"])
            frames, acts = self.world.wm.start(i)
            return Start(frames, list(acts), f"stored:{i}", *(self.world.wm.start_geometry(i) or ()))
        return self.world.starts.draw(self.np_random)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.session is None:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        act = self.world.codec.decode(action)
        frame = self.session.step(act)
        return _advance(self.world, [self], [act], frame[None])[0]

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return None if self.frame is None else self.frame.copy()
        if self.render_mode == "human":
            self._show()
        return None

    def _show(self) -> None:
        """Draw the last frame in the pygame window (made on first use), scaled to >= 480 wide,
        at the model's playback rate."""
        if self.frame is None:
            return
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame

        h, w = self.frame.shape[:2]
        if self._window is None:
            pygame.display.init()
            scale = max(1, -(-480 // w))
            self._window = pygame.display.set_mode((w * scale, h * scale))
            pygame.display.set_caption("worldgen")
            self._clock = pygame.time.Clock()
        surface = pygame.surfarray.make_surface(self.frame.swapaxes(0, 1))
        self._window.blit(pygame.transform.scale(surface, self._window.get_size()), (0, 0))
        pygame.event.pump()  # keeps the window responsive; input is the agent's, not the keyboard's
        pygame.display.flip()
        self._clock.tick(self.metadata["render_fps"])

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = None
        if self._owns_world:
            self.world.close()


def _advance(
    world: _World, envs: Sequence[WorldModelEnv], acts: Sequence[Action], frames: np.ndarray
) -> list[tuple[Any, float, bool, bool, dict[str, Any]]]:
    """After the model made ``frames`` (B, H, W, 3) for ``envs`` under ``acts``: ask the reward
    model once for all of them, advance each env; its ``step`` results, in order."""
    prev = np.stack([e.frame for e in envs])
    keys, mouse = np.stack([a.keys for a in acts]), np.stack([a.mouse for a in acts])
    out = world.reward(prev, keys, mouse, frames)
    for i, e in enumerate(envs):
        e.frame = np.array(frames[i])
    world.look(envs, (prev, keys, mouse))
    results = []
    for i, e in enumerate(envs):
        e.steps += 1
        truncated = world.horizon is not None and e.steps >= world.horizon
        info: dict[str, Any] = {"steps": e.steps}
        if out.terms:
            info["reward_terms"] = {k: float(v[i]) for k, v in out.terms.items()}
        results.append((world.observe(e), float(out.reward[i]), bool(out.terminated[i]), truncated, info))
        if e.render_mode == "human":
            e._show()
    return results


def _restart(
    world: _World, envs: Sequence[WorldModelEnv], seeds: Sequence[int | None], options: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Reset ``envs`` together: each seeds its RNG and draws its start and session seed from it,
    as a lone ``reset`` does, then their sessions start in one batched encode and prefill (a
    sub-env's first reset opens its session). Returns each env's reset info."""
    if not envs:
        return []
    starts = []
    for e, seed in zip(envs, seeds):
        gymnasium.Env.reset(e, seed=seed)
        starts.append((e._draw_start(options), int(e.np_random.integers(2**31))))
    # A world-cache model's session needs the start's depth and cameras.
    geometry = world.wm.world is not None
    again = [i for i, e in enumerate(envs) if e.session is not None]
    for e, (start, session_seed) in zip(envs, starts):
        if e.session is None:  # the first reset opens the session
            extra = {"context_depth": start.depth, "context_poses": start.pose} if geometry else {}
            e.session = world.wm.session(start.frames, start.actions, seed=session_seed, **extra)
    if again:
        picked = [starts[i] for i in again]
        world.wm.reset_many(
            [envs[i].session for i in again],
            [start.frames for start, _ in picked],
            [start.actions for start, _ in picked],
            [session_seed for _, session_seed in picked],
            [start.pose if geometry else None for start, _ in picked],
            [start.depth if geometry else None for start, _ in picked],
        )
    for e, (start, _) in zip(envs, starts):
        e.frame, e.steps = np.array(start.frames[-1]), 0
    world.look(envs)
    return [{"start": start.label, "steps": 0} for start, _ in starts]


class WorldModelVectorEnv(VectorEnv):
    """``num_envs`` :class:`WorldModelEnv` sub-envs over one model, stepped by one batched forward.

    Takes :class:`WorldModelEnv`'s arguments (``max_episode_steps``, which ``gymnasium.make_vec``
    passes, sets ``horizon``). Actions: the batched action space, ``{"keys": (N, 8), "mouse":
    (N, 2)}``, or a sequence of N single actions. ``render()`` (``render_mode="rgb_array"``)
    returns a tuple of the N frames, as ``SyncVectorEnv`` does.

    Example:
        >>> envs = WorldModelVectorEnv(16, "default", reward="zero")      # doctest: +SKIP
        >>> obs, infos = envs.reset(seed=0)                               # obs: (16, 120, 160, 3)  # doctest: +SKIP
        >>> obs, rewards, terms, truncs, infos = envs.step(envs.action_space.sample())  # doctest: +SKIP
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35 / 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        model: Any = "default",
        *,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        **kwargs: Any,
    ):
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"the vector env renders 'rgb_array' (a tuple of frames) only, got {render_mode!r}")
        autoreset_mode = AutoresetMode(autoreset_mode)
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or SAME_STEP, got {autoreset_mode}")
        if max_episode_steps is not None:
            kwargs["horizon"] = None if max_episode_steps == -1 else max_episode_steps  # -1: make_vec's "no limit"
        self.world = _World(model, **kwargs)
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self.metadata = {**type(self).metadata, "render_fps": self.world.wm.fps, "autoreset_mode": autoreset_mode}
        self.envs = [WorldModelEnv._on(self.world, render_mode) for _ in range(self.num_envs)]
        self.single_observation_space = self.world.observation_space
        self.single_action_space = self.world.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, bool)

    @property
    def model(self) -> Any:
        return self.world.wm

    def reset(
        self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-env (or those in ``options["reset_mask"]``); ``seed``: None, an int
        (sub-env i gets ``seed + i``) or one seed per sub-env."""
        seeds = (
            [None] * self.num_envs
            if seed is None
            else [seed + i for i in range(self.num_envs)]
            if isinstance(seed, (int, np.integer))
            else list(seed)
        )
        if len(seeds) != self.num_envs:
            raise ValueError(f"seed must be None, an int or {self.num_envs} seeds, got {len(seeds)}")
        options = dict(options or {})
        mask = options.pop("reset_mask", None)
        if mask is None:
            mask = np.ones(self.num_envs, bool)
        elif not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},)")
        infos: dict[str, Any] = {}
        idx = np.flatnonzero(mask)
        for i, info in zip(idx, _restart(self.world, [self.envs[i] for i in idx], [seeds[i] for i in idx], options)):
            infos = self._add_info(infos, info, i)
        self._autoreset[mask] = False
        return self._observations(), infos

    def step(self, actions_: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        acts = self._unbatch(actions_)
        if any(e.session is None for e in self.envs):
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        rewards = np.zeros(self.num_envs, np.float64)
        terms, truncs = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        infos: dict[str, Any] = {}
        step_infos: dict[int, dict[str, Any]] = {}
        stepping = np.flatnonzero(~self._autoreset)
        # Every session steps, those about to be reset too (with a no-op, frame discarded: the
        # reset re-seeds and refills their cache), so the batch always has one shape and a
        # compiled engine replays one graph.
        frames = self.world.wm.step_many(
            [e.session for e in self.envs], [Action.noop() if r else a for a, r in zip(acts, self._autoreset)]
        )
        if len(stepping):
            envs = [self.envs[i] for i in stepping]
            for i, (_, r, term, trunc, info) in zip(
                stepping, _advance(self.world, envs, [acts[i] for i in stepping], frames[stepping])
            ):
                rewards[i], terms[i], truncs[i] = r, term, trunc
                infos = self._add_info(infos, info, i)
                step_infos[i] = info
        idx = np.flatnonzero(self._autoreset)  # next-step autoreset: this step only resets them
        for i, info in zip(idx, _restart(self.world, [self.envs[i] for i in idx], [None] * len(idx), {})):
            infos = self._add_info(infos, info, i)
        if self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP:
            # Same-step autoreset (Stable-Baselines3's convention): a finished sub-env starts its
            # next episode now; its last observation and info go in final_obs / final_info.
            idx = np.flatnonzero(terms | truncs)
            for i in idx:
                final = {"final_obs": self.world.observe(self.envs[i]), "final_info": step_infos[i]}
                infos = self._add_info(infos, final, i)
            for i, info in zip(idx, _restart(self.world, [self.envs[i] for i in idx], [None] * len(idx), {})):
                infos = self._add_info(infos, info, i)
        else:
            self._autoreset = terms | truncs
        return self._observations(), rewards, terms, truncs, infos

    def _unbatch(self, a: Any) -> list[Action]:
        """The batched action (or a sequence of single actions) as N validated Actions; a bad one
        is an :class:`ActionError` naming its sub-env, before any sub-env moves."""
        n = self.num_envs
        codec = self.world.codec
        if codec.kind != "dict" and isinstance(a, np.ndarray):  # the batched space: (N,) or (N, D)
            if a.shape[:1] != (n,):
                raise ActionError(f"a batched {codec.kind} action has {n} rows, one per sub-env, got shape {a.shape}")
            rows: Sequence[Any] = list(a)
        elif isinstance(a, Mapping):
            unknown = set(a) - {"keys", "mouse"}
            if unknown or "keys" not in a or "mouse" not in a:
                raise ActionError(
                    f"a batched action is {{'keys': ({n}, 8), 'mouse': ({n}, 2)}}; got keys {sorted(map(str, a))}"
                )
            keys, mouse = np.asarray(a["keys"]), np.asarray(a["mouse"])
            if keys.shape[:1] != (n,) or mouse.shape[:1] != (n,):
                raise ActionError(
                    f"a batched action needs keys ({n}, 8) and mouse ({n}, 2) for {n} sub-envs, "
                    f"got {keys.shape} and {mouse.shape}"
                )
            rows = [{"keys": keys[i], "mouse": mouse[i]} for i in range(n)]
        elif isinstance(a, Sequence) and not isinstance(a, (str, bytes)):
            if len(a) != n:
                raise ActionError(f"{len(a)} actions for {n} sub-envs")
            rows = a
        else:
            raise ActionError(
                f"actions must be the batched dict {{'keys', 'mouse'}} or a sequence of {n} actions, "
                f"got {type(a).__name__}"
            )
        out = []
        for i, row in enumerate(rows):
            try:
                out.append(codec.decode(row))
            except ActionError as e:
                raise ActionError(f"action of sub-env {i}: {e}") from None
        return out

    def _observations(self) -> Any:
        obs = [self.world.observe(e) for e in self.envs]
        if isinstance(obs[0], dict):
            return {k: np.stack([o[k] for o in obs]) for k in obs[0]}
        return np.stack(obs)

    def render(self) -> tuple[np.ndarray | None, ...] | None:
        if self.render_mode != "rgb_array":
            return None
        return tuple(e.render() for e in self.envs)

    def close_extras(self, **kwargs: Any) -> None:
        for e in self.envs:
            e.close()
        self.world.close()
