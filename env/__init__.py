"""Data sources (ViZDoom recorder, generic Gymnasium recorder) and the Gymnasium env over a model.

Importing this package registers the Gymnasium ids (entry points are strings, so nothing heavy
loads until an env is made):

* ``worldgen/Doom-v0``: :class:`worldgen.env.world_model_env.WorldModelEnv` over the default
  model, with the native vector env
  :class:`~worldgen.env.world_model_env.WorldModelVectorEnv` as its ``vector_entry_point``;
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

import gymnasium

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
                entry_point="worldgen.env.world_model_env:WorldModelEnv",
                vector_entry_point="worldgen.env.world_model_env:WorldModelVectorEnv",
                max_episode_steps=DEFAULT_HORIZON,
                kwargs={"model": "default", "horizon": None, **kwargs},
            )


register_envs()
