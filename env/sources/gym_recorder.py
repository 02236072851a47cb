"""Record any Gymnasium environment with RGB frames into a worldgen dataset.

Frames come from the observation when it is an ``(H, W, 3)`` uint8 image, else from
``env.render()`` with ``render_mode="rgb_array"``; they are resized to ``resolution``. The
policy is uniform random over the env's action space, seeded per episode, so an episode can
be replayed from its recorded seed alone (``env.reset(seed=s)``, ``env.action_space.seed(s)``).

Actions: the env's own action is always stored, flattened by ``gymnasium.spaces.flatten``
(``env_actions``, e.g. one-hot for ``Discrete``); the index's ``source.env_action_space`` says
which space it came from. It is also mapped into the schema where that means something:
``Discrete(n)`` with n <= 8 holds key ``i`` for action ``start + i``, ``MultiBinary(n)`` with
n <= 8 holds keys ``[:n]``; any other space leaves keys and mouse at zero. Key names (forward,
back, ...) are only slots here; they say nothing about what the env does with them.

Each episode's ``map`` is the env id (the world it was played in) and its ``seed`` the seed
that reset it. Each episode's last step carries the no-op (zero keys, mouse and env action): nothing
followed it. An episode that the env ends (terminated or truncated) records its final
observation as that last step; ``terminal`` is True when the env *terminated* it.

Example:
    >>> record_gym("CartPole-v1", Path("data/cartpole"), steps=1000)   # doctest: +SKIP
    PosixPath('data/cartpole')

or ``worldgen record --env gym:CartPole-v1 --steps 1000 --out data/cartpole``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image
from tqdm import tqdm

from worldgen import actions
from worldgen.data import DatasetIndex, Episode, EpisodeInfo, write_episode_shards

DEFAULT_RESOLUTION = (160, 120)  # (width, height): the ViZDoom default, so models transfer as is
SHARD_STEPS = 512  # steps per shard, as write_episode_shards does by default


def _is_rgb(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[2] == 3
    )


def key_mapping(space: gym.Space) -> tuple[str, Callable[[Any], np.ndarray]]:
    """How an env action becomes schema keys: ``(description, action -> (8,) uint8 keys)``.

    Example:
        >>> desc, to_keys = key_mapping(gym.spaces.Discrete(3))
        >>> desc, to_keys(2).tolist()
        ('Discrete: action start+i holds keys[i]', [0, 0, 1, 0, 0, 0, 0, 0])
    """
    if isinstance(space, gym.spaces.Discrete) and space.n <= actions.NUM_KEYS:

        def discrete(a: Any) -> np.ndarray:
            keys = np.zeros(actions.NUM_KEYS, np.uint8)
            keys[int(a) - int(space.start)] = 1
            return keys

        return "Discrete: action start+i holds keys[i]", discrete
    if isinstance(space, gym.spaces.MultiBinary) and space.shape[0] <= actions.NUM_KEYS and len(space.shape) == 1:

        def multibinary(a: Any) -> np.ndarray:
            keys = np.zeros(actions.NUM_KEYS, np.uint8)
            keys[: space.shape[0]] = np.asarray(a, np.uint8)
            return keys

        return "MultiBinary: action[j] holds keys[j]", multibinary
    return "none: keys and mouse are zero; see env_actions", lambda a: np.zeros(actions.NUM_KEYS, np.uint8)


def episode_seed(seed: int, k: int) -> int:
    """The seed of episode ``k`` of a recording seeded ``seed``: distinct for every (seed, k)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


class _FrameGrabber:
    """RGB frames of one env, from its observation or its render(), resized to ``size``."""

    def __init__(self, env: gym.Env, env_id: str, size: tuple[int, int] | None):
        self.env, self.env_id, self.size = env, env_id, size
        self.source = "observation" if _is_rgb(env.observation_space) else "render"
        self.native: tuple[int, int] | None = None  # (width, height) of the first frame

    def __call__(self, obs: Any) -> np.ndarray:
        try:
            frame = obs if self.source == "observation" else self.env.render()
        except NotImplementedError:  # gymnasium.Env's default render()
            frame = None
        if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8):
            got = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(
                f"{self.env_id}: no RGB frames: the observation space is "
                f"{self.env.observation_space} and render() gave {got}, not (H, W, 3) uint8"
            )
        native = (frame.shape[1], frame.shape[0])
        if self.native is None:
            self.native = native
        elif native != self.native:
            raise ValueError(f"{self.env_id}: frame size changed from {self.native} to {native} (width, height)")
        if self.size is None or native == self.size:
            return frame
        return np.asarray(Image.fromarray(frame).resize(self.size, Image.Resampling.BILINEAR))


def _make(env_id: str) -> gym.Env:
    """The env, asked to render RGB arrays unless its observations already are RGB images."""
    try:
        env = gym.make(env_id)
        if _is_rgb(env.observation_space):
            return env
        env.close()
        return gym.make(env_id, render_mode="rgb_array")
    except gym.error.Error as e:
        raise ValueError(f"cannot make Gymnasium env {env_id!r}: {e}") from None


def record_gym(
    env_id: str,
    out: Path,
    steps: int,
    seed: int = 0,
    episode_steps: int | None = None,
    overwrite: bool = False,
    *,
    resolution: tuple[int, int] | None = DEFAULT_RESOLUTION,
) -> Path:
    """Record ``steps`` steps of uniform-random play in Gymnasium env ``env_id`` into dataset ``out``.

    Args:
        env_id: a registered Gymnasium id, e.g. ``"CartPole-v1"``.
        out: the dataset folder to create.
        steps: total steps over all episodes.
        seed: seeds every episode (see :func:`episode_seed`) and its action sampling.
        episode_steps: cut episodes at this many steps (the env's own time limit also applies).
        overwrite: replace a dataset already at ``out``.
        resolution: (width, height) to resize frames to; None keeps the env's size.

    Returns ``out``. Finished episodes are listed in the index as they complete, so an
    interrupted recording leaves a valid dataset of those.
    """
    if steps < 1 or (episode_steps is not None and episode_steps < 1):
        raise ValueError(f"steps and episode_steps must be >= 1, got {steps}, {episode_steps}")
    out = Path(out)
    env = _make(env_id)
    try:
        space = env.action_space
        try:
            env_dim = gym.spaces.flatdim(space)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(f"{env_id}: cannot store actions of space {space}: {e}") from None
        mapping, to_keys = key_mapping(space)
        grab = _FrameGrabber(env, env_id, resolution)
        # The first frame fixes the dataset's resolution; episode 0 starts from this same reset.
        obs, _ = env.reset(seed=episode_seed(seed, 0))
        first = grab(obs)
        index = DatasetIndex(
            out,
            resolution=(first.shape[1], first.shape[0]),
            frame_skip=1,
            has_depth=False,
            has_pose=False,
            has_env_actions=True,
            overwrite=overwrite,
            source={
                "kind": "gymnasium",
                "env_id": env_id,
                "gymnasium_version": gym.__version__,
                "frames_from": grab.source,
                "native_resolution": list(grab.native),
                "seed": seed,
                "fps": env.metadata.get("render_fps"),
                "policy": "uniform random: action_space.sample(), seeded with the episode seed",
                "key_mapping": mapping,
                "env_action_space": {
                    "repr": str(space),
                    "flatdim": env_dim,
                    "encoding": "gymnasium.spaces.flatten, float32",
                },
            },
        )
        done, k = 0, 0
        with tqdm(total=steps, desc=f"record {env_id}", unit="step", disable=None) as bar:
            while done < steps:
                if k > 0:
                    obs, _ = env.reset(seed=episode_seed(seed, k))
                limit = min(steps - done, episode_steps or math.inf)
                info = _record_episode(env, obs, episode_seed(seed, k), grab, to_keys, env_dim, out, f"e{k:05d}", limit)
                index.add(info)
                done += info.length
                bar.update(info.length)
                k += 1
    finally:
        env.close()
    return out


def _record_episode(
    env: gym.Env,
    obs: Any,
    seed: int,
    grab: _FrameGrabber,
    to_keys: Callable[[Any], np.ndarray],
    env_dim: int,
    root: Path,
    name: str,
    limit: int | float,
) -> EpisodeInfo:
    """Play one episode from ``obs``, what ``env.reset(seed=seed)`` gave; write shards as they fill."""
    env.action_space.seed(seed)
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (frame, keys, env action)
    shards: list[dict[str, Any]] = []
    noop = (np.zeros(actions.NUM_KEYS, np.uint8), np.zeros(env_dim, np.float32))
    length, terminal, t = 0, False, 0

    def flush() -> None:
        nonlocal length
        if steps:
            frames, keys, env_actions = (np.stack(a) for a in zip(*steps))
            ep = Episode(
                frames=frames,
                keys=keys,
                mouse=np.zeros((len(steps), actions.NUM_MOUSE), np.float32),
                env_actions=env_actions,
            )
            shards.extend(write_episode_shards(root, name, ep, SHARD_STEPS, first=len(shards)))
            length += len(steps)
            steps.clear()

    while True:
        frame = grab(obs)
        if t == limit - 1:  # the step budget ends here: nothing follows this frame
            steps.append((frame, *noop))
            break
        action = env.action_space.sample()
        steps.append((frame, to_keys(action), gym.spaces.flatten(env.action_space, action).astype(np.float32)))
        obs, _, terminated, truncated, _ = env.step(action)
        t += 1
        if len(steps) == SHARD_STEPS:
            flush()
        if terminated or truncated:  # keep the end state: it shows what the last action did
            steps.append((grab(obs), *noop))
            terminal = bool(terminated)
            break
    flush()
    return EpisodeInfo(
        id=name, length=length, shards=shards, map=env.spec.id if env.spec else None, seed=seed, terminal=terminal
    )
