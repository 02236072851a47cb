"""Where an episode inside a world model starts: real frames, never generated ones.

A start is a context of real frames with the actions that produced them; the engine encodes it
into a session's cache, and the agent's first observation is its last frame. Three sources:

* :class:`StoredStarts`: the start contexts stored with the checkpoint (held-out play the model
  never trained on), ``wm.start(i)``;
* :class:`DatasetStarts`: windows of a recorded dataset (by default its held-out episodes);
* :class:`DoomStarts`: a fresh ViZDoom game on a random map and seed, played for a few no-op
  steps to fill the context.

Each draws with the env's ``np_random``, so a seeded reset picks the same start.

Example:
    >>> import numpy as np
    >>> frames = np.zeros((3, 120, 160, 3), np.uint8)
    >>> resize_frames(frames, (24, 32)).shape
    (3, 24, 32, 3)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from worldgen.actions import Action


@dataclass
class Start:
    """A real context: frames uint8 (T, H, W, 3), the T actions that produced them, and where
    it comes from (``info["start"]`` of the reset)."""

    frames: np.ndarray
    actions: list[Action]
    label: str
    depth: np.ndarray | None = None  # (T, H, W) uint8 levels: a world-cache model's starts carry them
    pose: np.ndarray | None = None  # (T, 5) cameras, with depth


class StartSource(Protocol):
    def draw(self, rng: np.random.Generator) -> Start: ...

    def close(self) -> None: ...


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 frames ``(..., H, W, 3)`` resized to ``size`` = (h, w) with bilinear filtering, as the
    test recordings downscale real ViZDoom frames; unchanged if they already have that size."""
    if frames.shape[-3:-1] == tuple(size):
        return frames
    from PIL import Image

    flat = frames.reshape(-1, *frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.BILINEAR)) for f in flat])
    return out.reshape(*frames.shape[:-3], *size, 3)


class StoredStarts:
    """The model's own start contexts (``wm.start(i)``), drawn uniformly."""

    def __init__(self, wm: Any):
        if not wm.num_starts:
            raise ValueError(
                "this model stores no start contexts; use start='dataset' with data=DATASET, "
                "or start='doom' for a fresh ViZDoom game"
            )
        self.wm = wm

    def draw(self, rng: np.random.Generator) -> Start:
        i = int(rng.integers(self.wm.num_starts))
        frames, acts = self.wm.start(i)
        return Start(frames, list(acts), f"stored:{i}", *(self.wm.start_geometry(i) or ()))

    def close(self) -> None:
        pass


class DatasetStarts:
    """Windows of ``context`` frames of a recorded dataset at the model's frame size.

    Args:
        data: a dataset folder (``worldgen record``).
        frame_shape: the model's (H, W, 3); the dataset must be recorded at that size.
        context: frames per start.
        split: ``"heldout"`` (default: play the model never trained on, if it was trained on this
            dataset), ``"train"`` or ``"all"``, by ``Dataset.split(heldout_fraction)``.
    """

    def __init__(
        self,
        data: str | os.PathLike,
        frame_shape: Sequence[int],
        context: int,
        split: str = "heldout",
        heldout_fraction: float = 0.1,
    ):
        from worldgen.data import Dataset, WindowDataset

        ds = Dataset(data)
        w, h = ds.resolution
        if (h, w) != tuple(frame_shape[:2]):
            raise ValueError(
                f"{data}: frames are {w}x{h}, the model's are {frame_shape[1]}x{frame_shape[0]}; "
                f"record the dataset at the model's resolution"
            )
        train, held = ds.split(heldout_fraction)
        eps = {"heldout": held, "train": train, "all": list(range(len(ds)))}.get(split)
        if eps is None:
            raise ValueError(f"split must be 'heldout', 'train' or 'all', got {split!r}")
        self.windows = WindowDataset(ds, context, eps, fields=(), verify=False)

    def draw(self, rng: np.random.Generator) -> Start:
        w = self.windows[int(rng.integers(len(self.windows)))]
        ds = self.windows.dataset
        acts = [Action(k, m) for k, m in zip(w["keys"], w["mouse"])]
        return Start(w["frames"], acts, f"{ds.root}::{ds.episodes[w['episode']].id}@{w['start']}")

    def close(self) -> None:
        self.windows.dataset.close()


class DoomStarts:
    """A fresh ViZDoom game (``freedoom1.wad``, the recorder's settings) on a map drawn from
    ``maps`` with a drawn seed, played for ``context - 1`` no-op steps; frames resized to the
    model's. One engine process, started at the first draw, serves every reset."""

    def __init__(self, frame_shape: Sequence[int], context: int, maps: Sequence[str] = ("E1M1",), config: Any = None):
        from worldgen.env.sources.doom import DoomConfig, check_maps

        self.config = config or DoomConfig()
        self.maps = check_maps(list(maps), self.config.wad)
        self.size = tuple(frame_shape[:2])
        self.context = context
        self.env = None

    def draw(self, rng: np.random.Generator) -> Start:
        from worldgen.env.sources.doom import DoomEnv

        if self.env is None:
            self.env = DoomEnv(self.config, self.maps[0])
        noop = Action.noop()
        for _ in range(8):  # a monster can kill the player within the context: draw again
            map_, seed = self.maps[int(rng.integers(len(self.maps)))], int(rng.integers(2**31))
            frames = [self.env.reset(map_, seed).frame]
            while len(frames) < self.context:
                obs = self.env.step(noop.keys, noop.mouse)
                if obs is None:
                    break
                frames.append(obs.frame)
            if len(frames) == self.context:
                return Start(resize_frames(np.stack(frames), self.size), [noop] * self.context, f"doom:{map_}:{seed}")
        raise RuntimeError(f"ViZDoom ended 8 games within {self.context} no-op steps; cannot make a start")

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
