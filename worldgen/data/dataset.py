"""On-disk dataset of recorded play: safetensors shards plus a JSON index.

Layout of a dataset folder::

    index.json                  what is in it (below); rewritten atomically after each episode
    shards/<name>.safetensors   consecutive steps of one episode

Each shard holds the arrays of :class:`Episode` for a run of steps of one episode. The
index lists, per episode, its shards in order with their step count, byte size and SHA-256,
so a truncated or corrupted shard is an error that names the file; a shard the index does
not list (a recorder killed mid-episode) is never read. Every file is written through a temp
file and a rename, so a killed writer leaves either the old file or the new one, never half.

``index.json`` fields::

    format, version      "worldgen-dataset", 1
    action_schema        worldgen.actions.schema() of the recorder
    resolution           [width, height] of every frame, e.g. [160, 120]
    frame_skip           game tics per step
    source               free-form description of the recorder (env, maps, policy, action space)
    variables            names of the columns of ``variables``; [] if none
    pose                 POSE_FIELDS if poses were recorded, else []
    has_depth            whether ``depth`` was recorded
    has_env_actions      whether ``env_actions`` was recorded (optional, default false)
    episodes             [EpisodeInfo as a dict], in recording order

Step alignment: ``keys[i]``/``mouse[i]`` is the action taken *after* observing ``frames[i]``;
it produced ``frames[i + 1]``. The last step's action produced nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from worldgen import actions
from worldgen.files import atomic_write, sha256_file

FORMAT = "worldgen-dataset"
FORMAT_VERSION = 1
POSE_FIELDS = ("x", "y", "z", "yaw", "pitch")  # map units and degrees, from game variables
DOOM_TICS_PER_SECOND = 35  # ViZDoom's fixed tic rate: a recording plays at 35 / frame_skip steps per second
SHARD_DIR = "shards"


class DatasetError(RuntimeError):
    """A dataset that cannot be read as it is; the message names the file and the problem."""


@dataclass
class Episode:
    """The arrays of one episode (or of a run of its steps). N = number of steps.

    Arrays are checked and brought to their stored dtypes on construction.

    Example:
        >>> n = 4
        >>> ep = Episode(np.zeros((n, 120, 160, 3), np.uint8), np.zeros((n, 8), np.uint8),
        ...              np.zeros((n, 2), np.float32))
        >>> len(ep), sorted(ep.arrays())
        (4, ['frames', 'keys', 'mouse'])
    """

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    keys: np.ndarray  # (N, 8) uint8, actions.KEYS multi-hot
    mouse: np.ndarray  # (N, 2) float32, actions.MOUSE degrees
    depth: np.ndarray | None = None  # (N, H, W) uint8/uint16/float, larger = farther
    pose: np.ndarray | None = None  # (N, 5) float32, POSE_FIELDS
    variables: np.ndarray | None = None  # (N, V) float32, names in the index
    env_actions: np.ndarray | None = None  # (N, A) float32, the source env's own action, flattened

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        self.keys, self.mouse = actions.validate(self.keys, self.mouse, (n,))
        for name in ("depth", "pose", "variables", "env_actions"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} steps, frames have {n}")
        if self.depth is not None and (
            self.depth.shape[1:] != self.frames.shape[1:3] or self.depth.dtype.name not in DEPTH_DTYPES
        ):
            raise ValueError(
                f"depth must be (N, H, W) = (N, {self.frames.shape[1]}, {self.frames.shape[2]}) "
                f"of {'/'.join(DEPTH_DTYPES)}, got {self.depth.shape} {self.depth.dtype}"
            )
        for name, width in (("pose", len(POSE_FIELDS)), ("variables", None), ("env_actions", None)):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr, np.float32)
            if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
                raise ValueError(f"{name} must be (N, {width or 'columns'}), got {arr.shape}")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return len(self.frames)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def slice(self, start: int, stop: int) -> Episode:
        return Episode(**{k: v[start:stop] for k, v in self.arrays().items()})


ARRAY_FIELDS = tuple(f.name for f in fields(Episode))
DEPTH_DTYPES = ("uint8", "uint16", "float16", "float32")
# What each array must be on disk; depth may be any of DEPTH_DTYPES.
_FIXED_DTYPE = {
    "frames": "uint8",
    "keys": "uint8",
    "mouse": "float32",
    "pose": "float32",
    "variables": "float32",
    "env_actions": "float32",
}
# safetensors dtype names (the format's header) -> numpy; only what the format above can hold.
_ST_DTYPES = {"U8": np.dtype("uint8"), "U16": np.dtype("uint16"), "F16": np.dtype("<f2"), "F32": np.dtype("<f4")}
MAX_OPEN_SHARDS = 128  # open files per process; well under the usual limit of 1024


@dataclass
class EpisodeInfo:
    """One episode's entry in the index."""

    id: str  # unique within the dataset, e.g. "w03-e0007"
    length: int  # steps
    shards: list[dict[str, Any]]  # [{"file", "steps", "bytes", "sha256"}] in step order
    map: str | None = None
    seed: int | None = None
    terminal: bool = False  # ended by the game (death, exit), not by a step limit
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> EpisodeInfo:
        """Parse and check one index entry; ``where`` names it in errors (file and episode)."""
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: episode entry must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        if missing := {"id", "length", "shards"} - set(d):
            raise DatasetError(f"{where}: episode entry lacks {sorted(missing)}")
        if unknown := set(d) - known:
            raise DatasetError(f"{where}: episode entry has unknown fields {sorted(unknown)}")
        info = cls(**d)
        where = f"{where} (episode {info.id!r})"
        if not isinstance(info.id, str) or not info.id:
            raise DatasetError(f"{where}: id must be a non-empty string")
        if not _is_int(info.length) or info.length < 1:
            raise DatasetError(f"{where}: length must be an integer >= 1, got {info.length!r}")
        if info.seed is not None and not _is_int(info.seed):
            raise DatasetError(f"{where}: seed must be an integer or null, got {info.seed!r}")
        if (
            not (info.map is None or isinstance(info.map, str))
            or not isinstance(info.terminal, bool)
            or not isinstance(info.extra, dict)
        ):
            raise DatasetError(f"{where}: map must be a string or null, terminal a bool, extra an object")
        if not isinstance(info.shards, list) or not info.shards:
            raise DatasetError(f"{where}: shards must be a non-empty list")
        for s in info.shards:
            _check_shard_entry(s, where)
        if (total := sum(s["steps"] for s in info.shards)) != info.length:
            raise DatasetError(f"{where}: its shards hold {total} steps, length says {info.length}")
        return info


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shard_entry(s: Any, where: str) -> None:
    """A shard entry must name a file inside ``shards/``: the index never points elsewhere."""
    if not isinstance(s, dict) or not {"file", "steps", "bytes", "sha256"} <= set(s):
        raise DatasetError(f"{where}: shard entry must have file, steps, bytes, sha256; got {s!r}")
    f = s["file"]
    if (
        not isinstance(f, str)
        or not f.startswith(f"{SHARD_DIR}/")
        or ".." in f.split("/")
        or not f.endswith(".safetensors")
        or "\\" in f
    ):
        raise DatasetError(f"{where}: shard file {f!r} is not a {SHARD_DIR}/*.safetensors path")
    if not (_is_int(s["steps"]) and s["steps"] > 0 and _is_int(s["bytes"]) and s["bytes"] > 0):
        raise DatasetError(f"{where}: shard {f}: steps and bytes must be positive integers")
    if not (isinstance(s["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", s["sha256"])):
        raise DatasetError(f"{where}: shard {f}: sha256 must be 64 hex digits")


# The old private name of files.atomic_write, for code that imports it from here.
_atomic_write = atomic_write


def depth_to_uint8(depth: np.ndarray) -> np.ndarray:
    """A recorded depth buffer (uint8 or uint16, larger = farther) as uint8, so it rides along
    the RGB frames as a 4th channel."""
    if depth.dtype == np.uint8:
        return depth
    if depth.dtype == np.uint16:
        return (depth.astype(np.float32) / 257.0).round().astype(np.uint8)
    raise ValueError(f"--depth needs an integer depth buffer, this dataset stores {depth.dtype}")


def write_episode_shards(
    root: str | Path, name: str, episode: Episode, shard_steps: int = 512, first: int = 0
) -> list[dict[str, Any]]:
    """Write ``episode`` as shards ``shards/<name>-<k>.safetensors``; return their index entries.

    ``first`` numbers the shards from ``k = first``, so a recorder can flush a long episode in
    parts (``first=len(entries_so_far)``) and concatenate the entries. Safe to call from worker
    processes: it touches only its own files. The episode becomes visible to readers once
    :meth:`DatasetIndex.add` lists the returned entries.

    Example:
        >>> ep = Episode(np.zeros((3, 2, 2, 3), np.uint8), np.zeros((3, 8), np.uint8),
        ...              np.zeros((3, 2), np.float32))
        >>> [e["file"] for e in write_episode_shards(tmp_path, "e0", ep, shard_steps=2)]  # doctest: +SKIP
        ['shards/e0-0000.safetensors', 'shards/e0-0001.safetensors']
    """
    if len(episode) == 0:
        raise ValueError(f"episode {name!r} has no steps; there is nothing to write")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"episode name {name!r} must be letters, digits, '_', '.', '-' (it names files)")
    root = Path(root)
    entries = []
    for k, start in enumerate(range(0, len(episode), shard_steps), start=first):
        part = episode.slice(start, start + shard_steps)
        rel = f"{SHARD_DIR}/{name}-{k:04d}.safetensors"
        tensors = {key: np.ascontiguousarray(v) for key, v in part.arrays().items()}
        atomic_write(root / rel, lambda tmp, t=tensors: save_file(t, tmp, metadata={"episode": name}))
        entries.append(
            {"file": rel, "steps": len(part), "bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        )
    return entries


class DatasetIndex:
    """The index of a dataset being written. Call :meth:`add` as each episode completes.

    Args:
        root: the dataset folder (created if missing).
        resolution: (width, height) of every frame.
        frame_skip: game tics per recorded step.
        source: JSON-able description of the recorder, stored as is.
        variables: names of the ``variables`` columns.
        has_depth, has_pose, has_env_actions: which optional arrays every episode has.
        overwrite: replace a dataset already at ``root`` (its index goes first, so an interrupted
            overwrite never leaves the old episodes readable as the new dataset).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        resolution: tuple[int, int],
        frame_skip: int,
        source: dict[str, Any],
        variables: Sequence[str] = (),
        has_depth: bool = True,
        has_pose: bool = True,
        has_env_actions: bool = False,
        overwrite: bool = False,
    ):
        self.root = Path(root)
        if (self.root / "index.json").exists():
            if not overwrite:
                raise DatasetError(f"{self.root}: a dataset is already here; choose a new folder or overwrite it")
            remove_dataset(self.root)
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "action_schema": actions.schema(),
            "resolution": [int(r) for r in resolution],
            "frame_skip": int(frame_skip),
            "source": source,
            "variables": list(variables),
            "pose": list(POSE_FIELDS) if has_pose else [],
            "has_depth": has_depth,
            "has_env_actions": has_env_actions,
            "episodes": [],
        }
        self.save()

    def add(self, info: EpisodeInfo) -> None:
        """List a finished episode, whose shards are on disk; it is readable once this returns."""
        d = asdict(info)
        if isinstance(d["seed"], np.integer):  # recorders often draw seeds with numpy
            d["seed"] = int(d["seed"])
        EpisodeInfo.from_dict(d, str(self.root / "index.json"))  # never write an index we'd refuse
        if any(e["id"] == info.id for e in self.data["episodes"]):
            raise DatasetError(f"{self.root}: episode id {info.id!r} is already in the index")
        for s in info.shards:
            if not (self.root / s["file"]).is_file():
                raise DatasetError(f"{self.root / s['file']}: shard of episode {info.id!r} was not written")
        self.save({**self.data, "episodes": [*self.data["episodes"], d]})

    def save(self, data: dict[str, Any] | None = None) -> None:
        """Write ``data`` (default: the current index) and make it the current index."""
        data = self.data if data is None else data
        text = json.dumps(data, indent=1)  # fails on a non-JSON value before anything changes
        atomic_write(self.root / "index.json", lambda tmp: Path(tmp).write_text(text))
        self.data = data


def remove_dataset(root: str | Path) -> None:
    """Delete the dataset at ``root``: its index first (the dataset stops existing at once), then
    its shards. Refuses a folder without ``index.json``: it may not be a dataset."""
    root = Path(root)
    if not (root / "index.json").is_file():
        raise DatasetError(f"{root}: no index.json; refusing to delete a folder that is not a dataset")
    (root / "index.json").unlink()
    shutil.rmtree(root / SHARD_DIR, ignore_errors=True)


def _read_index(path: Path) -> dict[str, Any]:
    """Load and check ``index.json``; every problem is a DatasetError naming the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: no dataset index here (is {path.parent} a dataset folder?)")
    try:
        index = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise DatasetError(f"{path}: index is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(index, dict):
        raise DatasetError(f"{path}: index must be a JSON object, got {type(index).__name__}")
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: not a {FORMAT} v{FORMAT_VERSION} index "
            f"(format={index.get('format')!r}, version={index.get('version')!r})"
        )
    index.setdefault("has_env_actions", False)  # written by newer recorders only
    expect = {
        "action_schema": dict,
        "resolution": list,
        "frame_skip": int,
        "source": dict,
        "variables": list,
        "pose": list,
        "has_depth": bool,
        "has_env_actions": bool,
        "episodes": list,
    }
    for key, typ in expect.items():
        if not isinstance(index.get(key), typ):
            raise DatasetError(f"{path}: field {key!r} must be a {typ.__name__}, got {index.get(key)!r:.80}")
    res = index["resolution"]
    if len(res) != 2 or not all(_is_int(r) and r > 0 for r in res):
        raise DatasetError(f"{path}: resolution must be [width, height], got {res}")
    if index["pose"] not in ([], list(POSE_FIELDS)):
        raise DatasetError(f"{path}: pose must be [] or {list(POSE_FIELDS)}, got {index['pose']}")
    try:
        actions.check_schema(index["action_schema"], str(path))
    except actions.ActionError as e:
        raise DatasetError(str(e)) from None
    return index


class _Shard:
    """One open shard file: its safetensors header parsed, arrays read with ``pread``.

    ``pread`` copies straight from the page cache into the destination array: no memory map
    to fault in page by page in every DataLoader worker, and no second copy. An open file
    descriptor is safe to share with forked workers, as ``pread`` has no file position.
    """

    def __init__(self, path: Path, size: int):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.arrays = self._parse_header(size)  # name -> (dtype, shape, byte offset)
        except BaseException:
            os.close(self.fd)
            raise

    def _parse_header(self, size: int) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
        """safetensors layout: u64 little-endian header length n, n bytes of JSON, then data."""
        head = os.pread(self.fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise DatasetError(f"{self.path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
            arrays = {}
            for name, a in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (begin, end) = _ST_DTYPES[a["dtype"]], tuple(a["shape"]), a["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
                    raise ValueError(f"array {name!r} does not fit its shape or the file")
                arrays[name] = (dtype, shape, 8 + n + begin)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise DatasetError(f"{self.path}: unreadable safetensors header: {e!r}") from None
        return arrays

    def read_into(self, name: str, lo: int, out: np.ndarray) -> None:
        """Rows ``[lo, lo + len(out))`` of array ``name`` into ``out`` (contiguous)."""
        if out.nbytes:
            _, _, offset = self.arrays[name]
            got = os.preadv(self.fd, [out], offset + lo * (out.nbytes // len(out)))
            if got != out.nbytes:
                raise DatasetError(f"{self.path}: short read of {name!r} (file changed while open?)")

    def close(self) -> None:
        os.close(self.fd)


class Dataset:
    """A recorded dataset, read lazily and validated shard by shard.

    A shard is checked (size and SHA-256 against the index, then its arrays' shapes and dtypes)
    the first time this object opens it; later reads go straight to the file. Forked and
    spawned (pickled) copies keep what was verified, so DataLoader workers never hash a shard
    that their parent already checked; see :meth:`validate`.

    Example:
        >>> ds = Dataset("data/doom")                  # doctest: +SKIP
        >>> ep = ds.episode(0)                         # doctest: +SKIP
        >>> ep.frames.shape                            # doctest: +SKIP
        (2000, 120, 160, 3)
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index_path = self.root / "index.json"
        self.index = _read_index(self.index_path)
        self.episodes = [
            EpisodeInfo.from_dict(e, f"{self.index_path}: episodes[{i}]") for i, e in enumerate(self.index["episodes"])
        ]
        ids = [e.id for e in self.episodes]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{self.index_path}: episode ids are not unique")
        files = [s["file"] for e in self.episodes for s in e.shards]
        if len(set(files)) != len(files):
            raise DatasetError(f"{self.index_path}: a shard file is listed twice")
        self._verified: set[str] = set()
        self._open: OrderedDict[str, _Shard] = OrderedDict()  # least recently used first

    def __getstate__(self) -> dict[str, Any]:
        # File descriptors do not pickle; a spawned worker reopens (verified shards unhashed).
        return {**self.__dict__, "_open": OrderedDict()}

    def close(self) -> None:
        """Close the open shard files (reading reopens them)."""
        while self._open:
            self._open.popitem()[1].close()

    def __del__(self) -> None:
        if getattr(self, "_open", None):
            self.close()

    # --- metadata ---------------------------------------------------------------------------
    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) of every frame."""
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

    def episode_index(self, ref: int | str) -> int:
        """The index of an episode named by its id (stable: the same play recorded twice gives
        the same ids, while a parallel recorder lists them in the order its workers finished)
        or by its index (an int or a string of digits).

        Example:
            >>> ds.episode_index("s1000-w15-e0000"), ds.episode_index("3")   # doctest: +SKIP
            (41, 3)
        """
        if not isinstance(ref, str) or ref.isdigit():
            if not 0 <= int(ref) < len(self):
                raise DatasetError(
                    f"{self.index_path}: no episode {ref}; episodes are 0..{len(self) - 1} "
                    f"(or an episode id, see `worldgen data info`)"
                )
            return int(ref)
        ids = [e.id for e in self.episodes]
        if ref not in ids:
            raise DatasetError(
                f"{self.index_path}: no episode {ref!r} (it has {', '.join(ids[:5]) or 'none'}"
                f"{' ...' if len(ids) > 5 else ''})"
            )
        return ids.index(ref)

    @property
    def fields(self) -> list[str]:
        """The arrays every episode of this dataset has, in :data:`ARRAY_FIELDS` order."""
        optional = {
            "depth": self.index["has_depth"],
            "pose": bool(self.index["pose"]),
            "variables": bool(self.index["variables"]),
            "env_actions": self.index["has_env_actions"],
        }
        return [f for f in ARRAY_FIELDS if optional.get(f, True)]

    def split(self, heldout_fraction: float = 0.1) -> tuple[list[int], list[int]]:
        """Deterministic (train, held-out) episode indices, by a hash of each episode id.

        The same id is always on the same side, whatever else the dataset holds. With two or
        more episodes and ``0 < heldout_fraction < 1``, neither side is empty: if the hash puts
        every episode on one side, the one whose hash lies nearest the cut moves across.
        """
        if not 0 <= heldout_fraction <= 1:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        u = np.array([int(hashlib.sha256(e.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for e in self.episodes])
        held = u < heldout_fraction
        if len(u) >= 2 and 0 < heldout_fraction < 1:
            if not held.any():
                held[u.argmin()] = True
            elif held.all():
                held[u.argmax()] = False
        return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()

    # --- reading ----------------------------------------------------------------------------
    def _shard(self, entry: dict[str, Any]) -> _Shard:
        """The open shard; checked the first time this object (or its parent) opens it."""
        shard = self._open.get(entry["file"])
        if shard is None:
            shard = self._open[entry["file"]] = self._open_shard(entry)
            if len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(entry["file"])
        return shard

    def _open_shard(self, entry: dict[str, Any]) -> _Shard:
        rel, path = entry["file"], self.root / entry["file"]
        if not path.is_file():
            raise DatasetError(f"{path}: shard listed in the index is missing")
        size = path.stat().st_size  # cheap, so checked on every open, verified or not
        if size != entry["bytes"]:
            raise DatasetError(
                f"{path}: shard is {size} bytes, the index says {entry['bytes']} (truncated or overwritten)"
            )
        if rel not in self._verified and sha256_file(path) != entry["sha256"]:
            raise DatasetError(f"{path}: shard content does not match its SHA-256 in the index (corrupt)")
        shard = _Shard(path, size)
        if rel not in self._verified:
            try:
                self._check_arrays(shard, entry)
            except DatasetError:
                shard.close()
                raise
            self._verified.add(rel)
        return shard

    def _check_arrays(self, shard: _Shard, entry: dict[str, Any]) -> None:
        """Every array this dataset promises, with the step count, shape and dtype the index implies."""
        w, h = self.resolution
        width = {
            "keys": (actions.NUM_KEYS,),
            "mouse": (actions.NUM_MOUSE,),
            "pose": (len(POSE_FIELDS),),
            "variables": (len(self.variable_names),),
            "frames": (h, w, 3),
            "depth": (h, w),
        }
        for name in self.fields:
            if name not in shard.arrays:
                raise DatasetError(f"{shard.path}: has no array {name!r}, which the index promises")
            dtype, shape, _ = shard.arrays[name]
            want = (entry["steps"], *width[name]) if name in width else None
            if (want is not None and shape != want) or (
                want is None and (len(shape) != 2 or shape[0] != entry["steps"])
            ):
                raise DatasetError(
                    f"{shard.path}: array {name!r} has shape {shape}, expected "
                    f"{want or (entry['steps'], 'A')} from the index"
                )
            if dtype.name not in (DEPTH_DTYPES if name == "depth" else (_FIXED_DTYPE[name],)):
                raise DatasetError(f"{shard.path}: array {name!r} has dtype {dtype.name}, not what the format stores")

    def read(self, episode: int, field_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Steps ``[start, stop)`` of one array of episode ``episode``, across its shards.

        Every shard the range touches is checked first, so nothing partial is ever returned.
        """
        if field_name not in self.fields:
            raise DatasetError(
                f"{self.index_path}: this dataset has no {field_name!r} (it has {', '.join(self.fields)})"
            )
        info = self.episodes[episode]
        stop = info.length if stop is None else stop
        if not 0 <= start <= stop <= info.length:
            raise IndexError(f"steps [{start}, {stop}) outside episode {info.id} of {info.length} steps")
        parts, offset = [], 0  # (shard, rows lo..hi of it) covering the range
        for entry in info.shards:
            lo, hi = max(start - offset, 0), min(stop - offset, entry["steps"])
            if lo < hi or not parts and offset + entry["steps"] >= stop:  # an empty range still needs a shape
                parts.append((self._shard(entry), lo, max(lo, hi)))
            offset += entry["steps"]
            if offset >= stop:
                break
        dtype, shape, _ = parts[0][0].arrays[field_name]
        out = np.empty((stop - start, *shape[1:]), dtype)
        row = 0
        for shard, lo, hi in parts:
            shard.read_into(field_name, lo, out[row : row + hi - lo])
            row += hi - lo
        return out

    def episode(self, episode: int, start: int = 0, stop: int | None = None) -> Episode:
        return Episode(**{f: self.read(episode, f, start, stop) for f in self.fields})

    def validate(self, episodes: Sequence[int] | None = None) -> None:
        """Verify every shard of ``episodes`` (all if None) not yet checked by this object: size,
        SHA-256, arrays and their shapes. Raises :class:`DatasetError` naming the first bad file."""
        for i in range(len(self)) if episodes is None else episodes:
            for entry in self.episodes[i].shards:
                self._shard(entry)

    def stray_files(self) -> list[Path]:
        """Files under ``shards/`` that the index does not list (left by an interrupted recorder).
        They are never read; listed so ``worldgen data info`` can say they are there."""
        listed = {s["file"] for e in self.episodes for s in e.shards}
        folder = self.root / SHARD_DIR
        return sorted(p for p in folder.iterdir() if f"{SHARD_DIR}/{p.name}" not in listed) if folder.is_dir() else []

    def iter_episodes(self) -> Iterator[Episode]:
        for i in range(len(self)):
            yield self.episode(i)
