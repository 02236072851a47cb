"""On-disk dataset of recorded play: safetensors shards plus a JSON index.

Layout of a dataset folder::

    index.json            what is in it (below); rewritten atomically after each episode
    shards/<name>.safetensors   consecutive steps of one episode

Each shard holds the arrays of :class:`Episode` for a run of steps of one episode. The
index lists, per episode, its shards in order with their byte size and SHA-256, so a
truncated or corrupted shard is an error that names the file; a shard the index does
not list (a recorder killed mid-episode) is never read.

Step alignment: ``keys[i]``/``mouse[i]`` is the action taken *after* observing
``frames[i]``; it produced ``frames[i + 1]``. The last step's action produced nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from worldgen import actions

FORMAT = "worldgen-dataset"
FORMAT_VERSION = 1
POSE_FIELDS = ("x", "y", "z", "yaw", "pitch")  # map units and degrees, from game variables


class DatasetError(RuntimeError):
    """A dataset that cannot be read as it is; the message names the file and the problem."""


@dataclass
class Episode:
    """The arrays of one episode (or of a run of its steps). N = number of steps."""

    frames: np.ndarray                     # (N, H, W, 3) uint8 RGB
    keys: np.ndarray                       # (N, 8) uint8, actions.KEYS multi-hot
    mouse: np.ndarray                      # (N, 2) float32, actions.MOUSE degrees
    depth: np.ndarray | None = None        # (N, H, W) uint8/uint16/float, larger = farther
    pose: np.ndarray | None = None         # (N, 5) float32, POSE_FIELDS
    variables: np.ndarray | None = None    # (N, V) float32, names in the index

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        actions.validate(self.keys, self.mouse, (n,))
        for name in ("depth", "pose", "variables"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} steps, frames have {n}")

    def __len__(self) -> int:
        return len(self.frames)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def slice(self, start: int, stop: int) -> "Episode":
        return Episode(**{k: v[start:stop] for k, v in self.arrays().items()})


ARRAY_FIELDS = tuple(f.name for f in fields(Episode))


@dataclass
class EpisodeInfo:
    """One episode's entry in the index."""

    id: str                      # unique within the dataset, e.g. "w03-e0007"
    length: int                  # steps
    shards: list[dict[str, Any]]  # [{"file", "steps", "bytes", "sha256"}] in step order
    map: str | None = None
    seed: int | None = None
    terminal: bool = False       # ended by the game (death, exit), not by a step limit
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, fsync, rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_episode_shards(root: str | Path, name: str, episode: Episode,
                         shard_steps: int = 512) -> list[dict[str, Any]]:
    """Write ``episode`` as shards ``shards/<name>-<k>.safetensors``; return their index entries.

    Safe to call from worker processes: it touches only its own files. The episode becomes
    visible to readers once :meth:`DatasetIndex.add` lists the returned entries.
    """
    root = Path(root)
    entries = []
    for k, start in enumerate(range(0, max(len(episode), 1), shard_steps)):
        part = episode.slice(start, start + shard_steps)
        rel = f"shards/{name}-{k:04d}.safetensors"
        tensors = {key: np.ascontiguousarray(v) for key, v in part.arrays().items()}
        _atomic_write(root / rel, lambda tmp: save_file(tensors, tmp, metadata={"episode": name}))
        entries.append({"file": rel, "steps": len(part), "bytes": (root / rel).stat().st_size,
                        "sha256": _sha256(root / rel)})
    return entries


class DatasetIndex:
    """The index of a dataset being written. Call :meth:`add` as each episode completes."""

    def __init__(self, root: str | Path, *, resolution: tuple[int, int], frame_skip: int,
                 source: dict[str, Any], variables: list[str] = (), has_depth: bool = True,
                 has_pose: bool = True):
        self.root = Path(root)
        if (self.root / "index.json").exists():
            raise DatasetError(f"{self.root}: a dataset is already here; choose a new folder")
        self.data: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "action_schema": actions.schema(),
            "resolution": list(resolution), "frame_skip": frame_skip, "source": source,
            "variables": list(variables), "pose": list(POSE_FIELDS) if has_pose else [],
            "has_depth": has_depth, "episodes": [],
        }
        self.save()

    def add(self, info: EpisodeInfo) -> None:
        if any(e["id"] == info.id for e in self.data["episodes"]):
            raise DatasetError(f"{self.root}: episode id {info.id!r} is already in the index")
        self.data["episodes"].append(info.__dict__.copy())
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=1)
        _atomic_write(self.root / "index.json", lambda tmp: Path(tmp).write_text(text))


class Dataset:
    """A recorded dataset, read lazily and validated shard by shard.

    Example:
        >>> ds = Dataset("data/doom")                  # doctest: +SKIP
        >>> ep = ds.episode(0)                         # doctest: +SKIP
        >>> ep.frames.shape                            # doctest: +SKIP
        (2000, 120, 160, 3)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise DatasetError(f"{index_path}: no dataset index here (is {self.root} a dataset folder?)")
        try:
            self.index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{index_path}: index is not valid JSON: {e}") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{index_path}: not a {FORMAT} v{FORMAT_VERSION} index")
        try:
            actions.check_schema(self.index["action_schema"], str(index_path))
        except actions.ActionError as e:
            raise DatasetError(str(e)) from None
        self.episodes = [EpisodeInfo(**e) for e in self.index["episodes"]]
        self._verified: set[str] = set()
        self._open: dict[str, Any] = {}
        self._pid = os.getpid()

    # --- metadata ---------------------------------------------------------------------------
    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.index["resolution"])

    @property
    def frame_skip(self) -> int:
        return self.index["frame_skip"]

    @property
    def variable_names(self) -> list[str]:
        return list(self.index["variables"])

    @property
    def num_steps(self) -> int:
        return sum(e.length for e in self.episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def split(self, heldout_fraction: float = 0.1) -> tuple[list[int], list[int]]:
        """Deterministic (train, held-out) episode indices, by a hash of each episode id.

        The same id is always on the same side, whatever else the dataset holds.
        """
        train, held = [], []
        for i, e in enumerate(self.episodes):
            u = int(hashlib.sha256(e.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (held if u < heldout_fraction else train).append(i)
        return train, held

    # --- reading ----------------------------------------------------------------------------
    def _shard(self, entry: dict[str, Any]):
        """An open, verified shard. Verification (size + SHA-256) runs once per process."""
        if os.getpid() != self._pid:  # forked DataLoader worker: mmaps must not be shared
            self._open, self._pid = {}, os.getpid()
        rel = entry["file"]
        if rel in self._open:
            return self._open[rel]
        path = self.root / rel
        if not path.is_file():
            raise DatasetError(f"{path}: shard listed in the index is missing")
        if rel not in self._verified:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise DatasetError(f"{path}: shard is {size} bytes, the index says {entry['bytes']} "
                                   f"(truncated or overwritten)")
            if _sha256(path) != entry["sha256"]:
                raise DatasetError(f"{path}: shard content does not match its SHA-256 in the index (corrupt)")
            self._verified.add(rel)
        try:
            handle = safe_open(str(path), framework="np")
        except (SafetensorError, OSError, ValueError) as e:
            raise DatasetError(f"{path}: unreadable shard: {e}") from None
        self._open[rel] = handle
        return handle

    def read(self, episode: int, field_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Steps ``[start, stop)`` of one array of episode ``episode``, across its shards."""
        info = self.episodes[episode]
        stop = info.length if stop is None else stop
        if not 0 <= start <= stop <= info.length:
            raise IndexError(f"steps [{start}, {stop}) outside episode {info.id} of {info.length} steps")
        parts, offset = [], 0
        for entry in info.shards:
            lo, hi = max(start - offset, 0), min(stop - offset, entry["steps"])
            if lo < hi:
                handle = self._shard(entry)
                if field_name not in handle.keys():
                    raise DatasetError(f"{self.root / entry['file']}: has no array {field_name!r}")
                parts.append(handle.get_slice(field_name)[lo:hi])
            offset += entry["steps"]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @property
    def fields(self) -> list[str]:
        """The arrays every episode of this dataset has, in :data:`ARRAY_FIELDS` order."""
        optional = {"depth": self.index["has_depth"], "pose": bool(self.index["pose"]),
                    "variables": bool(self.index["variables"])}
        return [f for f in ARRAY_FIELDS if optional.get(f, True)]

    def episode(self, episode: int, start: int = 0, stop: int | None = None) -> Episode:
        return Episode(**{f: self.read(episode, f, start, stop) for f in self.fields})

    def validate(self) -> None:
        """Verify every shard of every episode now (size, SHA-256, readable arrays)."""
        for i, info in enumerate(self.episodes):
            if sum(s["steps"] for s in info.shards) != info.length:
                raise DatasetError(f"{self.root / 'index.json'}: episode {info.id} shards hold "
                                   f"{sum(s['steps'] for s in info.shards)} steps, index says {info.length}")
            for entry in info.shards:
                handle = self._shard(entry)
                for key in handle.keys():
                    if handle.get_slice(key).get_shape()[0] != entry["steps"]:
                        raise DatasetError(f"{self.root / entry['file']}: array {key} has the wrong length")

    def iter_episodes(self) -> Iterator[Episode]:
        for i in range(len(self)):
            yield self.episode(i)
