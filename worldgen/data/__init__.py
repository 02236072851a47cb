"""Recorded play on disk: the dataset format and the window loader."""

from worldgen.data.dataset import Dataset, DatasetError, DatasetIndex, Episode, EpisodeInfo, write_episode_shards
from worldgen.data.loader import WindowDataset, collate

__all__ = ["Dataset", "DatasetError", "DatasetIndex", "Episode", "EpisodeInfo", "WindowDataset", "collate",
           "write_episode_shards"]
