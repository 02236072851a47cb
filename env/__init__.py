"""The world outside the model: where its data comes from, what agents read off its frames, and
the Gymnasium env agents play it through. Three rooms:

* :mod:`worldgen.env.sources`: data sources (the ViZDoom game and recorder, its policies, the
  generic Gymnasium recorder, the play suite's branch recordings).
* :mod:`worldgen.env.learned`: learned heads read off frames (reward and termination, depth and
  pose) and their trainers; the heads of packaged models ship in ``env/heads/``.
* :mod:`worldgen.env.gym`: Gymnasium envs for agents (inside a world model, its action spaces and
  start sources, Stable-Baselines3's ``VecEnv``, the real game behind the same interface).

The envs import from here (lazily: ``import worldgen.env`` loads no model code)::

    from worldgen.env import RealDoomEnv, SB3VecEnv, WorldModelEnv, WorldModelVectorEnv

Importing this package registers the Gymnasium ids (entry points are strings, so nothing heavy
loads until an env is made):

* ``worldgen/Doom-v0``: :class:`worldgen.env.gym.world_model_env.WorldModelEnv` over the default
  model, with the native vector env
  :class:`~worldgen.env.gym.world_model_env.WorldModelVectorEnv` as its ``vector_entry_point``;
  episodes end after ``max_episode_steps`` = 1000 steps (Gymnasium's ``TimeLimit``; the vector
  env truncates by itself).
* ``worldgen/DoomAtari-v0``: the same with the Atari-style preset (stacked grayscale 84x84
  frames) and the discrete action space, what DQN-style agents expect.

Example:
    >>> import gymnasium
    >>> import worldgen.env
    >>> "worldgen/Doom-v0" in gymnasium.registry
    True
"""

import importlib
from typing import Any

import gymnasium

__all__ = ["DEFAULT_HORIZON", "RealDoomEnv", "SB3VecEnv", "WorldModelEnv", "WorldModelVectorEnv", "register_envs"]

DEFAULT_HORIZON = 1000  # steps per episode, ~2 minutes of play at 8.75 steps/s


def register_envs() -> None:
    """Register worldgen's Gymnasium ids; idempotent."""
    # horizon=None: the TimeLimit wrapper of max_episode_steps truncates, so the spec tells the truth.
    for env_id, kwargs in (
        ("worldgen/Doom-v0", {}),
        ("worldgen/DoomAtari-v0", {"preset": "atari", "action_space": "discrete"}),
    ):
        if env_id not in gymnasium.registry:
            gymnasium.register(
                id=env_id,
                entry_point="worldgen.env.gym.world_model_env:WorldModelEnv",
                vector_entry_point="worldgen.env.gym.world_model_env:WorldModelVectorEnv",
                max_episode_steps=DEFAULT_HORIZON,
                kwargs={"model": "default", "horizon": None, **kwargs},
            )


register_envs()


# Public names -> the module that defines them, imported on first use (PEP 562): the envs pull in
# torch and the model, which registering the ids must not.
_LAZY = {
    "WorldModelEnv": "worldgen.env.gym.world_model_env",
    "WorldModelVectorEnv": "worldgen.env.gym.world_model_env",
    "SB3VecEnv": "worldgen.env.gym.sb3",
    "RealDoomEnv": "worldgen.env.gym.real_game",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
