"""The run folder of a training run, its logs and loss plot, and sample image grids.

A run folder ``RUN/`` holds::

    config.json        the run's config, written once; a resume uses it, not new flags
    state/             resume state (model, EMA, optimizer, step, schedule), safetensors + JSON
    ckpt/              the exported model folder (EMA weights), loadable by worldgen.models
    log.jsonl          one line per logged step: step, loss, lr, tokens/s, ...
    loss.png           the loss curve, redrawn at each checkpoint and at the end
    samples/           sample images, every ``sample_every`` steps
    summary.json       the final figures: steps, wall time, tokens/s, MFU, final loss, params
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from worldgen.files import atomic_write
from worldgen.training.config import TrainConfig
from worldgen.training.state import has_state


class Run:
    """The run folder (see the module docstring) and its logs. Only rank 0 writes."""

    def __init__(self, root: str | os.PathLike, write: bool = True):
        self.root = Path(root)
        self.write = write
        self.state = self.root / "state"
        self.ckpt = self.root / "ckpt"
        self.samples = self.root / "samples"
        self.log_path = self.root / "log.jsonl"

    def start(self, kind: str, cfg: TrainConfig, given: dict[str, Any]) -> tuple[TrainConfig, bool]:
        """Create the folder, or reopen it to resume. Returns ``(config, resuming)``: a resume keeps
        the stored config (it fixes the schedule); flags that differ from it are ignored, loudly."""
        if self.write:
            self._lock()
        cfg_path = self.root / "config.json"
        if cfg_path.is_file():
            stored = json.loads(cfg_path.read_text())
            if stored.get("kind") != kind:
                raise ValueError(f"{cfg_path}: this run folder trains {stored.get('kind')!r}, not {kind!r}")
            fields = {f.name for f in dataclasses.fields(type(cfg))}
            old = type(cfg)(**{k: v for k, v in stored["config"].items() if k in fields})
            # The budget and device are about this process, not the schedule: take them anew.
            keep_new = {"minutes", "device", "compile", "stop_at"}
            changed = {k: (getattr(old, k), v) for k, v in given.items() if k not in keep_new and getattr(old, k) != v}
            if changed and self.write:
                print(
                    f"[train] resuming {self.root}: ignoring flags that differ from its config.json: "
                    + ", ".join(f"{k}={new!r} (run has {was!r})" for k, (was, new) in changed.items()),
                    file=sys.stderr,
                )
            cfg = dataclasses.replace(old, **{"stop_at": None, **{k: v for k, v in given.items() if k in keep_new}})
            return cfg, has_state(self.state)
        if self.write:
            self.root.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"kind": kind, "config": dataclasses.asdict(cfg)}, indent=1)
            atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(text))
        return cfg, False

    def _lock(self) -> None:
        """Hold ``RUN/.lock`` while this process lives (the OS drops it on any exit, kill -9 too):
        two trainers writing one run folder would interleave their state and logs."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = self._lock_file.read().strip() or "?"
            self._lock_file.close()
            self._lock_file = None
            raise RuntimeError(f"{self.root}: another process (pid {owner}) is training in this run folder") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def close(self) -> None:
        """Release the run folder (the end of :func:`train`)."""
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    def log(self, entry: dict[str, Any]) -> None:
        if self.write:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        # A line cut by a kill mid-write is dropped; every complete line is one JSON object.
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def truncate_log(self, step: int) -> None:
        """On resume: drop entries after the restored step (the killed run logged past it)."""
        if self.write and self.log_path.is_file():
            text = "".join(json.dumps(e) + "\n" for e in self.read_log() if e.get("step", 0) <= step)
            atomic_write(self.log_path, lambda tmp: Path(tmp).write_text(text))

    def plot(self) -> None:
        """Redraw ``loss.png`` from ``log.jsonl`` (loss on a log scale, LR on the right axis)."""
        entries = self.read_log()
        train = [e for e in entries if "loss" in e]
        if not self.write or not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        steps = [e["step"] for e in train]
        ax.plot(steps, [e["loss"] for e in train], lw=1, label="train loss")
        evals = [e for e in entries if "heldout_loss" in e]
        if evals:
            ax.plot([e["step"] for e in evals], [e["heldout_loss"] for e in evals], "o-", ms=3, label="held-out loss")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center")
        ax2 = ax.twinx()
        ax2.plot(steps, [e["lr"] for e in train], color="gray", lw=0.8, alpha=0.6)
        ax2.set_ylabel("learning rate", color="gray")
        ax.set_title(self.root.name)
        fig.subplots_adjust(left=0.1, right=0.87, top=0.92, bottom=0.12)  # tight_layout: 2x the time
        atomic_write(self.root / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.write:
            text = json.dumps(data, indent=1)
            atomic_write(self.root / name, lambda tmp: Path(tmp).write_text(text))


def save_image_rows(rows: list[np.ndarray], path: Path, gap: int = 2) -> None:
    """Write rows of uint8 frames ``(N, H, W, 3)`` as one PNG grid, atomically (e.g. real over generated)."""
    from PIL import Image

    n, h, w = max(len(r) for r in rows), rows[0].shape[1], rows[0].shape[2]
    grid = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, frame in enumerate(row):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = frame
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
