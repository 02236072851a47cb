"""Stable-Baselines3's ``VecEnv`` over the world model: N agents, one batched forward per step.

SB3 takes a ``VecEnv`` of its own API, not Gymnasium's vector env: ``step`` returns
``(obs, rewards, dones, infos)`` with a list of per-env info dicts, and a finished sub-env
starts its next episode at once (same-step autoreset), its last observation in
``infos[i]["terminal_observation"]`` and ``infos[i]["TimeLimit.truncated"]`` saying whether a
time limit, not the game, ended it. :class:`SB3VecEnv` is that API over
:class:`~worldgen.env.gym.world_model_env.WorldModelVectorEnv` in its same-step autoreset mode, so
the model still steps all sub-envs with one forward. Needs the ``rl`` extra
(``pip install -e ".[rl]"``).

Example:
    >>> from stable_baselines3 import PPO                                            # doctest: +SKIP
    >>> from worldgen.env.gym.sb3 import SB3VecEnv                                         # doctest: +SKIP
    >>> venv = SB3VecEnv(16, "default", action_space="discrete", preset="atari")      # doctest: +SKIP
    >>> PPO("CnnPolicy", venv).learn(100_000)                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode

from worldgen.env.gym.world_model_env import WorldModelVectorEnv

try:
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError(
        'worldgen.env.gym.sb3 needs Stable-Baselines3: pip install -e ".[rl]" (or pip install stable-baselines3)'
    ) from e


class SB3VecEnv(VecEnv):
    """``num_envs`` world-model envs as an SB3 ``VecEnv``; takes
    :class:`~worldgen.env.gym.world_model_env.WorldModelEnv`'s keyword arguments (``action_space``,
    ``preset``, ``reward``, ``horizon``, ...). ``seed(s)`` before ``reset()`` seeds sub-env i with
    ``s + i``, as SB3's own vector envs do."""

    def __init__(self, num_envs: int, model: Any = "default", **kwargs: Any):
        self.venv = WorldModelVectorEnv(num_envs, model, autoreset_mode=AutoresetMode.SAME_STEP, **kwargs)
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)
        self._actions: Any = None

    @property
    def model(self) -> Any:
        """The :class:`~worldgen.WorldModel` the sub-envs play."""
        return self.venv.model

    def reset(self) -> Any:
        options = self._options[0] if all(o == self._options[0] for o in self._options) else None
        if options is None:
            raise ValueError("SB3VecEnv resets every sub-env with the same options; set_options() gave different ones")
        seeds = None if all(s is None for s in self._seeds) else self._seeds
        obs, infos = self.venv.reset(seed=seeds, options=options or None)
        self.reset_infos = [_info_of(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[Any, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rewards, terms, truncs, infos = self.venv.step(self._actions)
        out = []
        for i in range(self.num_envs):
            info = _info_of(infos, i)
            if terms[i] or truncs[i]:  # the finished episode's info; the new one's start beside it
                final_obs, final_info = info.pop("final_obs"), info.pop("final_info")
                info = {
                    **final_info,
                    "start": info["start"],
                    "terminal_observation": final_obs,
                    "TimeLimit.truncated": bool(truncs[i] and not terms[i]),
                }
            out.append(info)
        return obs, rewards.astype(np.float32), terms | truncs, out

    def close(self) -> None:
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [e.frame for e in self.venv.envs]

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv.envs[i], attr_name) for i in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        for i in self._get_indices(indices):
            setattr(self.venv.envs[i], attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: Any = None, **method_kwargs: Any) -> list[Any]:
        return [
            getattr(self.venv.envs[i], method_name)(*method_args, **method_kwargs) for i in self._get_indices(indices)
        ]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]  # sub-envs are bare WorldModelEnvs


def _info_of(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """Sub-env ``i``'s entries of Gymnasium's batched ``infos`` (``key`` with its ``_key`` mask)."""
    return {
        k: _info_of(v, i) if isinstance(v, dict) else (v[i].item() if isinstance(v[i], np.generic) else v[i])
        for k, v in infos.items()
        if not k.startswith("_") and infos[f"_{k}"][i]
    }
