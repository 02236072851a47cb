"""Windows of T consecutive steps for training and evaluation, never across an episode end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from worldgen.data.dataset import ARRAY_FIELDS, Dataset, DatasetError

# Arrays holding the action taken at a step; a window aligns them with the frame they produced.
ACTION_FIELDS = ("keys", "mouse", "env_actions")


class WindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of windows of ``window`` consecutive frames of one episode.

    Each item is a dict of numpy arrays (the default collate turns them into tensors):

    * ``frames`` (T, H, W, 3) uint8; ``depth`` (T, H, W) and ``pose`` (T, 5) when recorded;
    * ``keys`` (T, 8) uint8 and ``mouse`` (T, 2) float32: the action that *produced* frame t
      (the dataset's action of step t-1); for the first frame of an episode, the no-op (zeros);
      ``env_actions`` (T, A), when asked for, is aligned the same way;
    * ``episode``, ``start``: where the window comes from.

    Windows start every ``stride`` steps and lie wholly inside one episode; episodes shorter
    than ``window`` give none. All shards of the chosen episodes are verified here, once, in
    the constructing process, so DataLoader workers (``num_workers > 0``, fork or spawn) inherit
    the result and only read.

    Args:
        dataset: a :class:`Dataset` or its folder.
        window: T, frames per window.
        episodes: episode indices to draw from (e.g. one side of ``dataset.split()``); all if None.
        stride: steps between window starts.
        fields: optional arrays to include besides frames and actions, if the dataset has them
            (any of ``depth``, ``pose``, ``variables``, ``env_actions``).
        verify: hash every shard now; False leaves it to the first read in each process.

    Example:
        >>> ds = Dataset("data/doom")                                   # doctest: +SKIP
        >>> train, held = ds.split()                                    # doctest: +SKIP
        >>> windows = WindowDataset(ds, 16, episodes=train, stride=8)   # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(windows, batch_size=8, shuffle=True,
        ...                                      num_workers=2)         # doctest: +SKIP
        >>> next(iter(loader))["frames"].shape                          # doctest: +SKIP
        torch.Size([8, 16, 120, 160, 3])
    """

    def __init__(
        self,
        dataset: Dataset | str,
        window: int,
        episodes: Sequence[int] | None = None,
        stride: int = 1,
        fields: Sequence[str] = ("depth", "pose"),
        verify: bool = True,
    ):
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        if window < 1 or stride < 1:
            raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
        if unknown := [f for f in fields if f not in ARRAY_FIELDS]:
            raise ValueError(f"unknown fields {unknown}; arrays are {', '.join(ARRAY_FIELDS)}")
        self.window = window
        self.fields = [f for f in fields if f in self.dataset.fields and f not in ("frames", "keys", "mouse")]
        eps = list(range(len(self.dataset)) if episodes is None else episodes)
        if bad := [e for e in eps if not 0 <= e < len(self.dataset)]:
            raise IndexError(f"episodes {bad[:5]} not in {self.dataset.root} ({len(self.dataset)} episodes)")
        # (episode, start) of every window; an episode of L steps has starts 0 .. L - T.
        starts = [(e, s) for e in eps for s in range(0, self.dataset.episodes[e].length - window + 1, stride)]
        if not starts:
            raise DatasetError(
                f"{self.dataset.root}: no episode among the {len(eps)} chosen has {window} steps for one window"
            )
        self._index = np.array(starts, dtype=np.int64)  # (num_windows, 2)
        if verify:
            self.dataset.validate(sorted(set(eps)))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray | int]:
        ep, start = (int(v) for v in self._index[i])
        stop = start + self.window
        item = {"frames": self.dataset.read(ep, "frames", start, stop), "episode": ep, "start": start}
        for f in ("keys", "mouse", *self.fields):
            item[f] = self._actions(ep, f, start, stop) if f in ACTION_FIELDS else self.dataset.read(ep, f, start, stop)
        return item

    def _actions(self, ep: int, name: str, start: int, stop: int) -> np.ndarray:
        """The actions that produced frames ``start..stop-1``: the dataset's ``start-1..stop-2``."""
        a = self.dataset.read(ep, name, max(start - 1, 0), stop - 1)  # (T or T-1, ...)
        if start == 0:  # nothing produced an episode's first frame: the no-op (all zeros)
            a = np.concatenate([np.zeros((1, *a.shape[1:]), a.dtype), a])
        return a

    def loader(
        self, batch_size: int, shuffle: bool = True, num_workers: int = 0, seed: int | None = None, **kwargs: Any
    ) -> torch.utils.data.DataLoader:
        """A DataLoader over these windows with :func:`collate`; ``seed`` fixes the shuffle order.

        Items come as tensors ``(B, T, ...)``; extra ``kwargs`` go to the DataLoader. Workers
        hand each batch over through fresh shared memory, which costs more CPU per frame than
        reading in-process: they pay off only with cores to spare (benchmarks/RESULTS.md).
        """
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            self,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            collate_fn=collate,
            generator=gen,
            persistent_workers=num_workers > 0,
            **kwargs,
        )


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack window dicts into one batch: arrays ``(B, T, ...)``, ints ``(B,)``.

    Same result as torch's default collate, faster on CPU. torch.stack of ``(T, H, W, 3)``
    uint8 takes a strided path about 5x slower than stacking the same bytes as flat rows, and
    its threaded kernels stall when the cores are busy (the loader's workers keep them busy).
    In a worker, the default collate stacks flat rows straight into shared memory (nothing is
    copied again on the way to the main process); in the main process numpy stacks.

    Example:
        >>> b = collate([{"keys": np.zeros((4, 8), np.uint8), "start": 0}] * 2)
        >>> b["keys"].shape, b["start"].tolist()
        (torch.Size([2, 4, 8]), [0, 0])
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    batch: dict[str, torch.Tensor] = {}
    for key, first in items[0].items():
        if not isinstance(first, np.ndarray):
            batch[key] = torch.tensor([item[key] for item in items])
        elif in_worker:
            flat = default_collate([torch.from_numpy(item[key]).reshape(-1) for item in items])  # (B, T*...)
            batch[key] = flat.view(len(items), *first.shape)
        else:
            batch[key] = torch.from_numpy(np.stack([item[key] for item in items]))  # (B, T, ...)
    return batch
