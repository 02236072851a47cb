"""Resume state: model, EMA, optimizer moments and the loop's meta (step, schedule), written
atomically as safetensors shards plus a ``train.json`` pointer, and checked tensor by tensor on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worldgen import checkpoint
from worldgen.checkpoint import CheckpointError
from worldgen.training.schedule import EMA

STATE_FORMAT = "worldgen-train-state"
STATE_VERSION = 1
STATE_PART = "train"


def save_state(
    folder: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    """Write the resume state atomically: new safetensors shards first, then ``train.json``
    (the pointer, swapped in by ``os.replace``), then the old shards go (worldgen.checkpoint.save).

    ``meta`` holds the step, the schedule and whatever else the task needs back.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    opt_state = optimizer.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"optim.{i}.{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in s.items()})
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    checkpoint.save(
        folder,
        STATE_PART,
        tensors,
        {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            **meta,
            "ema_updates": ema.updates,
            "optimizer_groups": groups,
        },
    )


def has_state(folder: Path) -> bool:
    return (folder / f"{STATE_PART}.json").is_file()


def load_state(folder: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns its ``meta``. A missing, extra or misshapen
    tensor is a :class:`CheckpointError` naming it."""
    where = str(folder / f"{STATE_PART}.json")
    tensors, meta = checkpoint.load(folder, STATE_PART)
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{where}: not a {STATE_FORMAT} v{STATE_VERSION} resume state")
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    for name, t in tensors.items():
        head, _, rest = name.partition(".")
        if head not in parts:
            raise CheckpointError(f"{where}: unexpected tensor {name!r} in the resume state")
        parts[head][rest] = t
    checkpoint.load_state(model, parts["model"], f"{where} (model)")
    checkpoint.load_state(ema.module, parts["ema"], f"{where} (ema)")
    ema.updates = meta["ema_updates"]

    # Adam moments must match their parameters one for one: check before torch silently broadcasts.
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = meta["optimizer_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(
            f"{where}: optimizer groups hold {[len(g['params']) for g in groups]} "
            f"parameters, the model has {[len(g['params']) for g in optimizer.param_groups]}"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in parts["optim"].items():
        i, _, key = name.partition(".")
        if not i.isdigit() or int(i) >= len(params):
            raise CheckpointError(f"{where}: unexpected tensor 'optim.{name}' in the resume state")
        state.setdefault(int(i), {})[key] = t
    for i, p in enumerate(params):
        s = state.get(i)
        if s is None and p.requires_grad and meta["step"] > 0:
            raise CheckpointError(f"{where}: missing tensors 'optim.{i}.*' (Adam moments of parameter {i})")
        for key in ("exp_avg", "exp_avg_sq"):
            if s is not None and key in s and s[key].shape != p.shape:
                raise CheckpointError(
                    f"{where}: tensor 'optim.{i}.{key}' has shape {tuple(s[key].shape)}, its parameter {tuple(p.shape)}"
                )
            if s is not None and key not in s:
                raise CheckpointError(f"{where}: missing tensor 'optim.{i}.{key}'")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta


def clean_orphans(folder: Path) -> None:
    """Delete shards a killed save left behind (written, but never listed by ``train.json``)."""
    if not has_state(folder):
        return
    listed = set(json.loads((folder / f"{STATE_PART}.json").read_text()).get("files", []))
    for f in folder.glob(f"{STATE_PART}-*.safetensors"):
        if f.name not in listed:
            f.unlink(missing_ok=True)
