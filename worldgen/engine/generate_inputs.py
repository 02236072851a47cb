"""The input files of ``worldgen generate``: action files (.npz, .json, .jsonl) and context
(an .npz of frames and actions, or steps of a recorded episode), checked with errors that name
the file, line or entry at fault."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worldgen.actions import ACTION_DIM, Action, ActionError
from worldgen.data import Dataset
from worldgen.engine.generate import GenerateError


def _vectors(acts: Sequence[Any], where: str, line: Sequence[int] | None = None) -> np.ndarray:
    """Action vectors (N, A) of wire-form actions or (keys, mouse) pairs; an error names the entry."""
    out = []
    for i, a in enumerate(acts):
        try:
            out.append(Action.from_dict(a).vector() if isinstance(a, dict) else Action(*a).vector())
        except (ActionError, TypeError) as e:
            at = f"line {line[i]}" if line else f"action {i}"
            raise GenerateError(f"{where}: {at}: {e}") from None
    return np.stack(out) if out else np.zeros((0, ACTION_DIM), np.float32)


def _npz(path: Path, fields: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            missing = [k for k in fields if k not in f]
            if missing:
                raise GenerateError(f"{path}: no {', '.join(missing)} array (has {', '.join(f.files) or 'none'})")
            return {k: f[k] for k in fields}
    except (OSError, ValueError) as e:
        raise GenerateError(f"{path}: not a readable .npz: {e}") from None


def load_actions(path: str | Path) -> np.ndarray:
    """Action vectors (N, A) from an .npz (``keys`` (N, 8), ``mouse`` (N, 2)), a .json list of wire
    actions ``{"keys": [names], "mouse": [yaw, pitch]}`` (or an object with such an ``"actions"``
    list, as ``worldgen record --replay`` takes) or a .jsonl file of one wire action a line."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: no such actions file")
    if path.suffix == ".npz":
        a = _npz(path, ("keys", "mouse"))
        if a["keys"].ndim != 2 or len(a["keys"]) != len(a["mouse"]):
            raise GenerateError(
                f"{path}: keys must be (N, 8) and mouse (N, 2), got {a['keys'].shape} and {a['mouse'].shape}"
            )
        return _vectors(list(zip(a["keys"], a["mouse"])), str(path))
    if path.suffix not in (".json", ".jsonl"):
        raise GenerateError(f"{path}: actions must be a .npz, .json or .jsonl file (or the word 'dataset')")
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [(i + 1, s) for i, s in enumerate(text.splitlines()) if s.strip()]
        acts = []
        for line, s in rows:
            try:
                acts.append(json.loads(s))
            except json.JSONDecodeError as e:
                raise GenerateError(f"{path}: line {line}: not JSON: {e}") from None
        return _vectors(acts, str(path), [line for line, _ in rows])
    try:
        acts = json.loads(text)
    except json.JSONDecodeError as e:
        raise GenerateError(f"{path}: not JSON: {e}") from None
    if isinstance(acts, dict) and "actions" in acts:
        acts = acts["actions"]
    if not isinstance(acts, list) or not all(isinstance(a, dict) for a in acts):
        raise GenerateError(f'{path}: expected a list of {{"keys": [...], "mouse": [yaw, pitch]}} actions')
    return _vectors(acts, str(path))


def load_context(
    path: str | Path, frames: int, episode: int | str = 0, start: int = 0, future: int | None = 0
) -> dict[str, np.ndarray]:
    """Context frames (T, H, W, 3) uint8 and their action vectors (T, A): the last ``frames`` of an
    .npz (``frames``, ``keys``, ``mouse``: the action that produced each frame), or ``frames``
    steps of a recording's ``episode`` (id or index) from ``start``. From a recording, ``future``
    more steps (None: the rest of the episode) come as ``real`` (N, H, W, 3) and ``real_actions``
    (N, A), and ``episode_id`` names the episode."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise GenerateError(f"{path}: no such context file")
        a = _npz(path, ("frames", "keys", "mouse"))
        f = a["frames"]
        if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise GenerateError(f"{path}: frames must be uint8 (T, H, W, 3), got {f.dtype} {f.shape}")
        if not len(f) == len(a["keys"]) == len(a["mouse"]):
            raise GenerateError(
                f"{path}: {len(f)} frames but {len(a['keys'])} keys and {len(a['mouse'])} mouse rows "
                f"(one action per frame: the one that produced it)"
            )
        if len(f) < frames:
            raise GenerateError(f"{path}: {len(f)} context frames; clips are conditioned on {frames}")
        return {"frames": f[-frames:], "actions": _vectors(list(zip(a["keys"], a["mouse"])), str(path))[-frames:]}
    from worldgen.data import WindowDataset

    ds = Dataset(path)
    episode = ds.episode_index(episode)
    length = ds.episodes[episode].length
    future = length - start - frames if future is None else future
    if start < 0 or future < 0 or start + frames + future > length:
        raise GenerateError(
            f"{path}: episode {ds.episodes[episode].id} has {length} steps; {frames} context frames "
            f"from step {start} plus {future} more do not fit"
        )
    item = WindowDataset(ds, frames + future, [episode], fields=())[start]  # actions aligned to their frames
    vecs = _vectors(list(zip(item["keys"], item["mouse"])), str(path))
    return {
        "frames": item["frames"][:frames],
        "actions": vecs[:frames],
        "episode_id": ds.episodes[episode].id,
        "real": item["frames"][frames:],
        "real_actions": vecs[frames:],
    }
