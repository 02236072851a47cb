"""Weights on disk: safetensors shards plus a JSON config, written atomically, checked on load.

A checkpoint folder holds named parts, e.g. ``tokenizer`` and ``dynamics``::

    <dir>/<part>.json                      config, shard names and their SHA-256 (written last)
    <dir>/<part>-00000.safetensors ...     tensors, shards of at most MAX_SHARD_BYTES

Loading trusts nothing in the folder: shard names must be plain file names inside it, each
shard must match the SHA-256 its JSON lists, and every floating tensor must be finite.

``"default"`` names the model that ships with worldgen (``worldgen/checkpoints/default``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldgen.files import atomic_write, sha256_file

log = logging.getLogger(__name__)

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


def save(folder: str | os.PathLike, part: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
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
    meta = {"config": dict(config), "files": files, "sha256": {f: sha256_file(folder / f) for f in files}}
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
    """A part's JSON, its shape checked: every problem is a CheckpointError naming the file."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a checkpoint with this part?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: must be a JSON object, got {type(meta).__name__}")
    files, hashes = meta.get("files", []), meta.get("sha256", {})
    if not isinstance(meta.get("config", {}), dict):
        raise CheckpointError(f"{path}: 'config' must be an object")
    if not isinstance(files, list) or not all(isinstance(f, str) and _SHARD_NAME.fullmatch(f) for f in files):
        raise CheckpointError(
            f"{path}: 'files' must list shard file names inside the checkpoint folder "
            f"(*.safetensors, no folders), got {str(files)[:200]}"
        )
    if not isinstance(hashes, dict) or not all(
        isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values()
    ):
        raise CheckpointError(f"{path}: 'sha256' must map file names to 64 hex digits")
    return meta


# A shard is a plain file name in the checkpoint folder: never a path, never hidden (temp files).
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors")


def _check_finite(tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise CheckpointError(
                f"{where}: tensor {name} holds {nan} NaN and {inf} infinite values; "
                f"refusing weights that would produce garbage"
            )


def load(folder: str | os.PathLike, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, config)`` of ``part`` in ``folder`` (a path or a packaged name).
    Each shard is checked against its SHA-256 before it is parsed, and every float tensor
    must be finite; a part saved before hashes existed loads with a warning."""
    folder = resolve(folder)
    meta = _read_json(folder / f"{part}.json")
    hashes = meta.get("sha256")
    if hashes is None:
        log.warning(
            "%s: no SHA-256 of its shards (saved by an older worldgen); loading them unverified",
            folder / f"{part}.json",
        )
    elif set(hashes) != set(meta.get("files", [])):
        raise CheckpointError(
            f"{folder / part}.json: 'sha256' lists {sorted(hashes)}, 'files' lists {sorted(meta.get('files', []))}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for fname in meta.get("files", []):
        path = folder / fname
        try:
            if hashes is not None and sha256_file(path) != hashes[fname]:
                raise CheckpointError(f"{path}: content does not match its SHA-256 in {part}.json (corrupt or altered)")
            shard = load_file(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard listed in {part}.json is missing") from None
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors shard: {e}") from None
        _check_finite(shard, path)
        tensors.update(shard)
    return tensors, meta.get("config", {})


def config(folder: str | os.PathLike, part: str) -> dict[str, Any]:
    """Only the config of ``part``, without reading its tensors."""
    return _read_json(resolve(folder) / f"{part}.json").get("config", {})


def load_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` into ``module`` strictly; name every missing, extra or misshapen tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tensors[k].shape != own[k].shape
    ]
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


def has_part(folder: str | os.PathLike | None, part: str) -> bool:
    """Whether checkpoint folder ``folder`` (or a packaged name) holds a part stored as ``part``."""
    try:
        return folder is not None and (resolve(folder) / f"{part}.json").is_file()
    except CheckpointError:
        return False


def copy_part(src: str | os.PathLike, dst: str | os.PathLike, part: str) -> None:
    """Copy ``part`` of checkpoint folder ``src`` (or a packaged name) into ``dst``: verified as
    :func:`load` verifies, written as :func:`save` writes (tensors and config unchanged)."""
    save(dst, part, *load(src, part))


def stored_head(model_folder: Path | None, part: str, packaged_heads: Mapping[str, Path]) -> Path | None:
    """Where the head ``part`` of the world model in ``model_folder`` is: the model folder itself,
    or for a packaged model its folder in ``packaged_heads`` (packaged model name -> folder; heads
    ship beside the code that reads them, not with the model); None if neither holds one."""
    packaged = model_folder is not None and model_folder.resolve().parent == PACKAGED.resolve()
    for folder in (model_folder, packaged_heads.get(model_folder.name) if packaged else None):
        if has_part(folder, part):
            return folder
    return None
