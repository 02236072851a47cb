"""Streaming inference: sessions on a rolling KV cache (docs/architecture.md, streaming).

>>> from worldgen import WorldModel                      # doctest: +SKIP
>>> wm = WorldModel.load("default")                      # doctest: +SKIP
>>> s = wm.session(seed=0)                               # doctest: +SKIP
>>> s.step({"keys": ["forward"], "mouse": [0.0, 0.0]}).shape   # doctest: +SKIP
(120, 160, 3)
"""

from worldgen.engine.cache import KVCache
from worldgen.engine.stream import StreamConfig, rollout_latents
from worldgen.engine.world_model import Session, WorldModel, save_starts

__all__ = ["KVCache", "Session", "StreamConfig", "WorldModel", "rollout_latents", "save_starts"]
