"""Weights on disk: safetensors shards plus a JSON config, written atomically, checked on load.

A checkpoint folder holds named parts, e.g. ``tokenizer`` and ``dynamics``::

    <dir>/<part>.json                      config and metadata (written last)
    <dir>/<part>-00000.safetensors ...     tensors, shards of at most MAX_SHARD_BYTES

``"default"`` names the model that ships with worldgen (``worldgen/checkpoints/default``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldgen.files import atomic_write

MAX_SHARD_BYTES = 16 * 2**20  # the project's limit per committed file
PACKAGED = Path(__file__).parent / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file and the problem."""


def resolve(name_or_path: str | os.PathLike) -> Path:
    """``"default"`` (or another packaged name) or a folder path -> the checkpoint folder."""
    p = Path(name_or_path)
    if not p.exists() and (PACKAGED / str(name_or_path)).is_dir():
        p = PACKAGED / str(name_or_path)
    if not p.is_dir():
        known = sorted(d.name for d in PACKAGED.iterdir() if d.is_dir() and not d.name.startswith("_"))
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder (packaged: {', '.join(known) or 'none'})")
    return p


def save(folder: str | os.PathLike, part: str, tensors: Mapping[str, torch.Tensor],
         config: Mapping[str, Any]) -> None:
    """Save ``tensors`` and ``config`` as ``part`` in ``folder``. Readers never see half a part:
    shards are written first under fresh names, the JSON that lists them last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    # A generation stamp keeps the previous shards intact until the new JSON points elsewhere.
    stamp = f"{os.getpid():x}{torch.randint(0, 2**31, ()).item():08x}"
    files = []
    for i, shard in enumerate(shards):
        fname = f"{part}-{stamp}-{i:05d}.safetensors"
        atomic_write(folder / fname, lambda tmp, s=shard: save_file(s, tmp))
        files.append(fname)
    old = _read_json(folder / f"{part}.json").get("files", []) if (folder / f"{part}.json").exists() else []
    meta = {"config": dict(config), "files": files}
    atomic_write(folder / f"{part}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    for f in set(old) - set(files):
        (folder / f).unlink(missing_ok=True)


def update_config(folder: str | os.PathLike, part: str, changes: Mapping[str, Any]) -> None:
    """Merge ``changes`` into the config of ``part`` (e.g. sampler settings chosen after
    training), rewriting only its JSON, atomically."""
    path = resolve(folder) / f"{part}.json"
    meta = _read_json(path)
    meta["config"] = {**meta.get("config", {}), **changes}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a checkpoint with this part?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def load(folder: str | os.PathLike, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, config)`` of ``part`` in ``folder`` (a path or a packaged name)."""
    folder = resolve(folder)
    meta = _read_json(folder / f"{part}.json")
    tensors: dict[str, torch.Tensor] = {}
    for fname in meta.get("files", []):
        try:
            tensors.update(load_file(folder / fname))
        except FileNotFoundError:
            raise CheckpointError(f"{folder / fname}: shard listed in {part}.json is missing") from None
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / fname}: unreadable safetensors shard: {e}") from None
    return tensors, meta.get("config", {})


def config(folder: str | os.PathLike, part: str) -> dict[str, Any]:
    """Only the config of ``part``, without reading its tensors."""
    return _read_json(resolve(folder) / f"{part}.json").get("config", {})


def load_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``module`` strictly; name every missing, extra or misshapen tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"wrong shapes {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
        raise CheckpointError(f"{where}: checkpoint does not fit the model: {'; '.join(parts)}")
    module.load_state_dict(tensors, strict=True)
