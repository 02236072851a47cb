"""Weights on disk: safetensors shards plus a JSON config, written atomically, checked on load.

A checkpoint folder holds named parts, e.g. ``tokenizer`` and ``dynamics``::

    <dir>/<part>.json                      config, shard names and their SHA-256 (written last)
    <dir>/<part>-00000.safetensors ...     tensors, shards of at most MAX_SHARD_BYTES

Loading trusts nothing in the folder: shard names must be plain file names inside it, each
shard must match the SHA-256 its JSON lists, and every floating tensor must be finite.

Weights may be stored in fp8 (``float8_e4m3fn``) to fit a larger model in the weight budget:
each such tensor ``name`` has its per-tensor scale beside it as ``name.fp8_scale`` (a float32
scalar, the tensor's absolute maximum over 448), and :func:`load` hands back ``q * scale`` in
float32, so nothing that loads a checkpoint needs to know how it was stored.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from worldgen.files import atomic_write, sha256_file

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 16 * 2**20  # the project's limit per committed file
FP8 = torch.float8_e4m3fn  # 4 exponent bits: the range per-tensor-scaled weights need, 3 mantissa bits
FP8_SCALE = ".fp8_scale"  # suffix of an fp8 tensor's scale
STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8}  # what weights can be stored as
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


def to_fp8(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for fp8 storage: every floating matrix or kernel (2-D and up) as ``float8_e4m3fn``
    with one float32 scale per tensor, its other floating tensors (biases, norms, embeddings of
    one row) in bf16, the rest unchanged. :func:`load` undoes it; see the module docstring."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(FP8_SCALE):
            raise ValueError(f"tensor name {name!r} ends in {FP8_SCALE!r}, which fp8 storage reserves for scales")
        if t.is_floating_point() and t.dim() >= 2 and t.dtype != FP8:
            t = t.detach().float()
            scale = (t.abs().max() / torch.finfo(FP8).max).clamp(min=torch.finfo(torch.float32).tiny)
            out[name] = (t / scale).to(FP8)
            out[name + FP8_SCALE] = scale.reshape(())
        else:
            out[name] = t.to(torch.bfloat16) if t.is_floating_point() and t.dtype != FP8 else t
    return out


def stored_as(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` ready to be stored in ``dtype`` (one of :data:`STORAGE`): floating tensors cast,
    or for fp8 :func:`to_fp8`; integer tensors unchanged."""
    if dtype == FP8:
        return to_fp8(tensors)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _from_fp8(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Undo :func:`to_fp8`: each fp8 tensor times its scale, in float32; a scale without its
    tensor or a tensor without its scale is a CheckpointError."""
    scales = {k[: -len(FP8_SCALE)]: v for k, v in tensors.items() if k.endswith(FP8_SCALE)}
    out = {k: v for k, v in tensors.items() if not k.endswith(FP8_SCALE)}
    for name, scale in scales.items():
        t = out.get(name)
        if t is None or t.dtype != FP8:
            raise CheckpointError(f"{where}: {name}{FP8_SCALE} scales no fp8 tensor {name}")
        if scale.numel() != 1 or not scale.is_floating_point() or not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"{where}: {name}{FP8_SCALE} must be one finite number, got {scale.flatten()[:4]}")
        out[name] = t.float() * scale.float()
    unscaled = [k for k, v in out.items() if v.dtype == FP8]
    if unscaled:
        raise CheckpointError(f"{where}: fp8 tensors without a {FP8_SCALE} scale: {unscaled[:5]}")
    return out


def stored_dtype(folder: str | os.PathLike, part: str) -> torch.dtype | None:
    """The dtype ``part``'s weights (its floating tensors of 2-D and up) are stored in, read from
    the shards' headers without loading them: ``float8_e4m3fn`` for fp8 storage; None for a part
    without floating matrices."""
    folder = resolve(folder)
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": FP8}
    for fname in _read_json(folder / f"{part}.json").get("files", []):
        try:
            with safe_open(folder / fname, framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    if sl.get_dtype() in names and len(sl.get_shape()) >= 2:
                        return names[sl.get_dtype()]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / fname}: unreadable safetensors shard: {e}") from None
    return None


def save(folder: str | os.PathLike, part: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Save ``tensors`` and ``config`` as ``part`` in ``folder``. Readers never see half a part:
    shards are written first under fresh names, the JSON that lists them last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tensors:
        if name.endswith(FP8_SCALE) and name[: -len(FP8_SCALE)] in tensors:
            continue  # goes with its tensor: a shard loads on its own
        group = {k: tensors[k].detach().to("cpu").contiguous() for k in (name, name + FP8_SCALE) if k in tensors}
        nbytes = sum(v.numel() * v.element_size() for v in group.values())
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1].update(group)
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
        shard = _from_fp8(shard, path)  # scales sit in the shard of their tensor (save keeps them together)
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
    :func:`load` verifies, written as :func:`save` writes (tensors, their storage and config
    unchanged)."""
    tensors, cfg = load(src, part)
    save(dst, part, stored_as(tensors, FP8) if stored_dtype(src, part) == FP8 else tensors, cfg)


def shard_files(folder: str | os.PathLike, part: str) -> list[Path]:
    """The shard files of ``part`` in ``folder`` (or a packaged name), as its JSON lists them."""
    folder = resolve(folder)
    return [folder / f for f in _read_json(folder / f"{part}.json").get("files", [])]


def parts(folder: str | os.PathLike) -> list[str]:
    """The parts of checkpoint folder ``folder`` (or a packaged name): its JSON files that list
    shards (``eval.json`` and other reports are not parts)."""
    folder = resolve(folder)
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("files"), list) and "config" in meta:
            found.append(path.stem)
    return found


def recast(src: str | os.PathLike, dst: str | os.PathLike, dtype: str) -> list[str]:
    """Copy every part of checkpoint folder ``src`` into ``dst``, the weights of its models (parts
    whose config has a ``model``: tokenizer, dynamics, heads) stored as ``dtype`` (``fp32``,
    ``bf16`` or ``fp8``), other parts (start contexts) as they are. ``src``'s reports (eval.json)
    stay behind: they measured ``src``'s weights. Returns the parts copied."""
    if dtype not in STORAGE:
        raise ValueError(f"dtype must be one of {sorted(STORAGE)}, got {dtype!r}")
    if Path(dst).resolve() == resolve(src).resolve():
        raise ValueError(f"{dst}: recast writes a new folder, not its source")
    copied = parts(src)
    if not copied:
        raise CheckpointError(f"{resolve(src)}: no checkpoint parts (no JSON listing shards)")
    for part in copied:
        tensors, cfg = load(src, part)
        save(dst, part, stored_as(tensors, STORAGE[dtype]) if "model" in cfg else tensors, cfg)
    return copied


def stored_head(model_folder: Path | None, part: str, packaged_heads: Mapping[str, Path]) -> Path | None:
    """Where the head ``part`` of the world model in ``model_folder`` is: the model folder itself,
    or for a packaged model its folder in ``packaged_heads`` (packaged model name -> folder; heads
    ship beside the code that reads them, not with the model); None if neither holds one."""
    packaged = model_folder is not None and model_folder.resolve().parent == PACKAGED.resolve()
    for folder in (model_folder, packaged_heads.get(model_folder.name) if packaged else None):
        if has_part(folder, part):
            return folder
    return None
