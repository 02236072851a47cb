"""Recorded play on disk: the dataset format and the window loader.

The loader (``WindowDataset``, ``collate``) imports torch, so it loads on first use: recorder
processes and ``worldgen data info`` that only read and write datasets start without torch.
"""

from typing import Any

from worldgen.data.dataset import Dataset, DatasetError, DatasetIndex, Episode, EpisodeInfo, write_episode_shards

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetIndex",
    "Episode",
    "EpisodeInfo",
    "WindowDataset",
    "collate",
    "write_episode_shards",
]


def __getattr__(name: str) -> Any:
    if name in ("WindowDataset", "collate"):
        from worldgen.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'worldgen.data' has no attribute {name!r}")
