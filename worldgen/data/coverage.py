"""How much of a map recorded play covers: distinct map cells visited, per 10,000 frames, and plots.

Coverage is counted on a grid of ``cell`` x ``cell`` map units (default 64: one Doom floor
tile; the player is 32 wide). A *track* is one episode's ``(map, pose)``, pose ``(N, >=2)``
with x, y first. Cells are told apart by map, so two maps never share a cell.

Map geometry for plots lives in the dataset folder as ``maps/<MAP>.json`` (written by the
recorder, :func:`save_map_lines`): line segments ``x1, y1, x2, y2, blocking``.

Example:
    >>> import numpy as np
    >>> xy = np.array([[0, 0], [10, 10], [70, 0], [130, 200]], np.float32)
    >>> cells_visited(xy, cell=64)
    3
    >>> coverage([("E1M1", xy)], per=2)["cells_per_block"]  # blocks of 2 frames: 1 and 2 cells
    1.5
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worldgen.data.dataset import Dataset, DatasetError
from worldgen.files import atomic_write

CELL = 64.0  # map units; one floor tile, two player widths
PER = 10_000  # frames per coverage block: the unit of comparison
LINE_FIELDS = ("x1", "y1", "x2", "y2", "blocking")

Track = tuple[str | None, np.ndarray]  # (map, pose (N, >=2))


def cells(xy: np.ndarray, cell: float = CELL) -> np.ndarray:
    """The distinct cells ``(K, 2)`` int64 that positions ``xy`` ``(N, >=2)`` fall in."""
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"positions must be (N, >=2) with x, y first, got shape {xy.shape}")
    return np.unique(np.floor(xy[:, :2] / cell).astype(np.int64), axis=0)


def cells_visited(xy: np.ndarray, cell: float = CELL) -> int:
    """Number of distinct ``cell`` x ``cell`` map cells that positions ``xy`` visit."""
    return len(cells(xy, cell))


def tracks(dataset: Dataset) -> list[Track]:
    """Each episode's ``(map, pose)`` in index order."""
    if "pose" not in dataset.fields:
        raise DatasetError(f"{dataset.root}: dataset has no camera poses; coverage needs them")
    return [(e.map, dataset.read(i, "pose")) for i, e in enumerate(dataset.episodes)]


def _as_tracks(source: Dataset | np.ndarray | Sequence[Any]) -> list[Track]:
    if isinstance(source, Dataset):
        return tracks(source)
    if isinstance(source, np.ndarray):
        return [(None, source)]
    return [t if isinstance(t, tuple) else (None, np.asarray(t)) for t in source]


def coverage(source: Dataset | Sequence[Track], cell: float = CELL, per: int = PER) -> dict[str, Any]:
    """Distinct cells visited per ``per`` frames, over the frames in order.

    The frames are cut into consecutive blocks of ``per``; ``cells_per_block`` is the mean count
    of distinct (map, cell) pairs per full block, or None when there are fewer than ``per``
    frames (``cells`` still counts the distinct cells of all frames).
    """
    ts = _as_tracks(source)
    maps = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in ts))}
    if not ts or sum(len(p) for _, p in ts) == 0:
        return {"frames": 0, "cells": 0, "per": per, "cells_per_block": None, "blocks": 0, "cell": cell}
    # (N, 3): map id, cell x, cell y
    keyed = np.concatenate(
        [np.column_stack([np.full(len(p), maps[m]), np.floor(np.asarray(p)[:, :2] / cell)]) for m, p in ts if len(p)]
    ).astype(np.int64)
    blocks = [len(np.unique(keyed[s : s + per], axis=0)) for s in range(0, len(keyed) - per + 1, per)]
    return {
        "frames": len(keyed),
        "cells": len(np.unique(keyed, axis=0)),
        "per": per,
        "cells_per_block": float(np.mean(blocks)) if blocks else None,
        "blocks": len(blocks),
        "cell": cell,
    }


def save_map_lines(root: str | Path, map: str, lines: np.ndarray, **meta: Any) -> Path:
    """Write a map's line segments ``(L, 5)`` to ``<root>/maps/<map>.json`` atomically."""
    path = Path(root) / "maps" / f"{map}.json"
    data = {
        "map": map,
        **meta,
        "fields": list(LINE_FIELDS),
        "lines": np.asarray(lines, np.float32).reshape(-1, 5).tolist(),
    }
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))
    return path


def load_map_lines(root: str | Path, map: str) -> np.ndarray | None:
    """A map's line segments ``(L, 5)`` float32 from a dataset folder; None when not stored."""
    path = Path(root) / "maps" / f"{map}.json"
    if not path.is_file():
        return None
    try:
        lines = np.asarray(json.loads(path.read_text())["lines"], np.float32)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: not a map geometry file ({type(e).__name__}: {e})") from None
    if lines.size and (lines.ndim != 2 or lines.shape[1] not in (4, 5)):
        raise DatasetError(f"{path}: lines must be rows of x1, y1, x2, y2[, blocking], got shape {lines.shape}")
    return lines.reshape(-1, lines.shape[1] if lines.size else 5)


def plot_coverage(
    dataset_or_poses: Dataset | np.ndarray | Sequence[Any],
    out_png: str | Path,
    map_lines: np.ndarray | Mapping[str, np.ndarray] | None = None,
    cell: float = CELL,
) -> Path:
    """Draw each map's walls, the visited cells (shaded by visits) and the trajectories.

    Args:
        dataset_or_poses: a :class:`Dataset` (one panel per map; walls read from its
            ``maps/`` folder), a pose array ``(N, >=2)``, or a list of ``(map, pose)`` tracks.
        out_png: where to write the PNG.
        map_lines: walls ``(L, 4 or 5)`` for a single map, or ``{map: lines}``; overrides
            what the dataset folder holds.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    ts = _as_tracks(dataset_or_poses)
    by_map: dict[str | None, list[np.ndarray]] = {}
    for m, p in ts:
        by_map.setdefault(m, []).append(np.asarray(p, np.float64))
    if not by_map:
        raise ValueError("nothing to plot: no episodes")
    root = dataset_or_poses.root if isinstance(dataset_or_poses, Dataset) else None

    def walls(m: str | None) -> np.ndarray | None:
        if isinstance(map_lines, Mapping):
            return None if map_lines.get(m) is None else np.asarray(map_lines[m], np.float32)
        if map_lines is not None:
            return np.asarray(map_lines, np.float32)
        return load_map_lines(root, m) if root is not None and m is not None else None

    cols = min(len(by_map), 4)
    rows = -(-len(by_map) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows), dpi=80)
    for k, (m, poses) in enumerate(by_map.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        xy = np.concatenate([p[:, :2] for p in poses])  # (N, 2)
        lines = walls(m)
        c = np.floor(xy / cell).astype(np.int64)
        if len(c):  # visited cells as an image of visit counts, log-shaded, empty cells clear
            lo, hi = c.min(0), c.max(0)
            grid = np.zeros((hi[1] - lo[1] + 1, hi[0] - lo[0] + 1))
            np.add.at(grid, (c[:, 1] - lo[1], c[:, 0] - lo[0]), 1)
            ax.imshow(
                np.ma.masked_equal(np.log1p(grid), 0),
                origin="lower",
                cmap="viridis",
                alpha=0.75,
                extent=(lo[0] * cell, (hi[0] + 1) * cell, lo[1] * cell, (hi[1] + 1) * cell),
                interpolation="nearest",
            )
        if lines is not None and len(lines):
            blocking = lines[:, 4] > 0 if lines.shape[1] == 5 else np.ones(len(lines), bool)
            for mask, color, width in ((~blocking, "0.7", 0.4), (blocking, "black", 0.7)):
                segs = lines[mask, :4].reshape(-1, 2, 2)
                ax.add_collection(LineCollection(segs, colors=color, linewidths=width))
            ax.update_datalim(lines[:, :4].reshape(-1, 2))
        for p in poses:
            ax.plot(p[:, 0], p[:, 1], lw=0.3, alpha=0.5, color="tab:red")
        ax.autoscale_view()
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{m or 'poses'}: {len(cells(xy, cell)) if len(xy) else 0} cells, {len(xy):,} frames", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    return out_png
