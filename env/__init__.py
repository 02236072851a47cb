"""Data sources (ViZDoom recorder, generic Gymnasium recorder) and the Gymnasium env over a model.

Importing this package registers the Gymnasium ids (entry points are strings, so nothing heavy
loads until an env is made):

* ``worldgen/Doom-v0``: :class:`worldgen.env.world_model_env.WorldModelEnv` over the default
  model, with the native vector env
  :class:`~worldgen.env.world_model_env.WorldModelVectorEnv` as its ``vector_entry_point``.

Example:
    >>> import gymnasium
    >>> import worldgen.env
    >>> "worldgen/Doom-v0" in gymnasium.registry
    True
"""

import gymnasium


def register_envs() -> None:
    """Register worldgen's Gymnasium ids; idempotent."""
    if "worldgen/Doom-v0" not in gymnasium.registry:
        gymnasium.register(
            id="worldgen/Doom-v0",
            entry_point="worldgen.env.world_model_env:WorldModelEnv",
            vector_entry_point="worldgen.env.world_model_env:WorldModelVectorEnv",
            kwargs={"model": "default"},
        )


register_envs()
