"""The real ViZDoom game behind the same Gymnasium interface as the world-model env.

:class:`RealDoomEnv` has :class:`~worldgen.env.gym.world_model_env.WorldModelEnv`'s action spaces
(:mod:`worldgen.env.gym.action_spaces`, same mouse range), observations (frames resized to the
model's size, or the atari preset) and reward: the weighted change of the game's own variables
(:func:`~worldgen.env.learned.reward.reward_from_variables`, the sum the learned head predicts), so an
agent trained in imagination plays the real game unchanged, and the same agent can be trained
in the real game for comparison. It is a plain ``gymnasium.Env``: Gymnasium's
``AsyncVectorEnv`` runs one game per process.

Episodes start on a map of ``maps`` (drawn with the env's RNG) with a game seed drawn from it, so
``reset(seed=s)`` replays the same game for the same actions. They end when the player dies or
leaves the map (``terminated``) or after ``horizon`` steps (``truncated``).

``info``: ``steps``; ``map`` and ``game_seed`` (reset); ``events``: the change since the episode
started of each weighted variable (``killcount``, ``itemcount``, ``health``), and ``end``
(``"death"``/``"exit"``) on the last step.

Example:
    >>> env = RealDoomEnv((120, 160), action_space="discrete", horizon=300)      # doctest: +SKIP
    >>> obs, info = env.reset(seed=10_000)                                        # doctest: +SKIP
    >>> obs, r, term, trunc, info = env.step(1)   # forward                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from worldgen.env.gym.action_spaces import RECORDER_MOUSE_RANGE, ActionCodec
from worldgen.env.gym.starts import resize_frames
from worldgen.env.gym.world_model_env import ATARI_SIZE, ATARI_STACK, PRESETS, atari_frames
from worldgen.env.learned.reward import DEFAULT_WEIGHTS, reward_from_variables
from worldgen.env.sources.doom import VARIABLE_NAMES, DoomConfig, DoomEnv, check_maps


class RealDoomEnv(gymnasium.Env):
    """One real ViZDoom game (see the module docstring).

    Args:
        frame_size: (H, W) of observed frames: the world model's, so its agents see alike.
        action_space, mouse_range, preset: as :class:`~worldgen.env.gym.world_model_env.WorldModelEnv`'s
            (pass the model env's ``world.codec.mouse_range`` to match it exactly).
        reward_weights: weight per game variable and ``"death"`` (default: the reward head's defaults).
        maps: maps episodes start on.
        horizon: steps after which an episode is truncated; None never truncates.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35 / 4}

    def __init__(
        self,
        frame_size: Sequence[int] = (120, 160),
        *,
        action_space: str = "discrete",
        mouse_range: Sequence[float] = RECORDER_MOUSE_RANGE,
        preset: str | None = None,
        reward_weights: Mapping[str, float] | None = None,
        maps: Sequence[str] = ("E1M1",),
        horizon: int | None = 1000,
        render_mode: str | None = None,
        config: DoomConfig | None = None,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1 steps or None (never truncate), got {horizon}")
        self.config = config or DoomConfig()
        self.maps = check_maps(list(maps), self.config.wad)
        self.size = (int(frame_size[0]), int(frame_size[1]))
        self.codec = ActionCodec(action_space, tuple(mouse_range))
        self.action_space = self.codec.space
        self.preset, self.horizon, self.render_mode = preset, horizon, render_mode
        self.weights = dict(DEFAULT_WEIGHTS if reward_weights is None else reward_weights)
        self.observation_space = (
            spaces.Box(0, 255, (ATARI_STACK, ATARI_SIZE, ATARI_SIZE), np.uint8)
            if preset == "atari"
            else spaces.Box(0, 255, (*self.size, 3), np.uint8)
        )
        self.game: DoomEnv | None = None  # started at the first reset
        self.frame: np.ndarray | None = None
        self.stack: np.ndarray | None = None
        self.variables = self.start_variables = np.zeros(len(VARIABLE_NAMES), np.float32)
        self.steps = 0

    def _observe(self, frame: np.ndarray, first: bool) -> np.ndarray:
        self.frame = resize_frames(frame, self.size)
        if self.preset != "atari":
            return self.frame.copy()
        small = atari_frames(self.frame[None])
        self.stack = np.repeat(small, ATARI_STACK, 0) if first else np.concatenate([self.stack[1:], small])
        return self.stack.copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if self.game is None:
            self.game = DoomEnv(self.config, self.maps[0])
        map_ = self.maps[int(self.np_random.integers(len(self.maps)))]
        game_seed = int(self.np_random.integers(2**31))
        obs = self.game.reset(map_, game_seed)
        self.variables = self.start_variables = obs.variables.copy()
        self.steps = 0
        return self._observe(obs.frame, first=True), {"steps": 0, "map": map_, "game_seed": game_seed}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.game is None:
            raise gymnasium.error.ResetNeeded("call reset() before step()")
        act = self.codec.decode(action)
        nxt = self.game.step(act.keys, act.mouse)
        reward = reward_from_variables(
            self.variables, None if nxt is None else nxt.variables, VARIABLE_NAMES, self.weights
        )
        self.steps += 1
        info: dict[str, Any] = {"steps": self.steps}
        if nxt is None:  # died or left the map: the last frame stays the observation
            obs = self.stack.copy() if self.preset == "atari" else self.frame.copy()
            info["end"] = self.game.end
        else:
            self.variables = nxt.variables.copy()
            obs = self._observe(nxt.frame, first=False)
        col = {n: i for i, n in enumerate(VARIABLE_NAMES)}
        info["events"] = {
            k: float(self.variables[col[k]] - self.start_variables[col[k]]) for k in self.weights if k != "death"
        }
        truncated = nxt is not None and self.horizon is not None and self.steps >= self.horizon
        return obs, float(reward), nxt is None, truncated, info

    def render(self) -> np.ndarray | None:
        return None if self.render_mode != "rgb_array" or self.frame is None else self.frame.copy()

    def close(self) -> None:
        if self.game is not None:
            self.game.close()
            self.game = None
