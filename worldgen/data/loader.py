"""Windows of T consecutive steps for training and evaluation, never across an episode end."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from worldgen import actions
from worldgen.data.dataset import Dataset


class WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of windows of ``window`` consecutive frames of one episode.

    Each item is a dict of numpy arrays (the default collate turns them into tensors):

    * ``frames`` (T, H, W, 3) uint8; ``depth`` (T, H, W) and ``pose`` (T, 5) when recorded;
    * ``keys`` (T, 8) uint8 and ``mouse`` (T, 2) float32: the action that *produced* frame t
      (the dataset's action of step t-1); for the first frame of an episode, the no-op;
    * ``episode``, ``start``: where the window comes from.

    Args:
        dataset: a :class:`Dataset` or its folder.
        window: T, frames per window.
        episodes: episode indices to draw from (e.g. one side of ``dataset.split()``); all if None.
        stride: steps between window starts.
        fields: optional arrays to include besides frames and actions.

    Example:
        >>> ds = Dataset("data/doom")                                   # doctest: +SKIP
        >>> train, held = ds.split()                                    # doctest: +SKIP
        >>> windows = WindowDataset(ds, 16, episodes=train, stride=8)   # doctest: +SKIP
    """

    def __init__(self, dataset: Dataset | str, window: int, episodes: Sequence[int] | None = None,
                 stride: int = 1, fields: Sequence[str] = ("depth", "pose")):
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        if window < 1 or stride < 1:
            raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
        self.window = window
        self.fields = [f for f in fields if f in self.dataset.fields]
        eps = range(len(self.dataset)) if episodes is None else episodes
        starts = [(e, s) for e in eps for s in range(0, self.dataset.episodes[e].length - window + 1, stride)]
        self._index = np.array(starts, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | int]:
        ep, start = (int(v) for v in self._index[i])
        ds, stop = self.dataset, start + self.window
        # Actions that produced frames start..stop-1 are the dataset's actions start-1..stop-2.
        a_lo = max(start - 1, 0)
        keys = ds.read(ep, "keys", a_lo, stop - 1)
        mouse = ds.read(ep, "mouse", a_lo, stop - 1)
        if start == 0:
            keys = np.concatenate([np.zeros((1, actions.NUM_KEYS), np.uint8), keys])
            mouse = np.concatenate([np.zeros((1, actions.NUM_MOUSE), np.float32), mouse])
        item = {"frames": ds.read(ep, "frames", start, stop), "keys": keys, "mouse": mouse,
                "episode": ep, "start": start}
        for f in self.fields:
            item[f] = ds.read(ep, f, start, stop)
        return item
