"""What every training run shares: the run folder, configs and their command-line flags, the
device and DDP setup, the LR schedule, EMA, atomic resumable state, the loss log, and the
training loop itself (:func:`fit`), which drives a :class:`Task` (tokenizer or dynamics).

A run folder ``RUN/`` holds::

    config.json        the run's config, written once; a resume uses it, not new flags
    state/             resume state (model, EMA, optimizer, step, schedule), safetensors + JSON
    ckpt/              the exported model folder (EMA weights), loadable by worldgen.models
    log.jsonl          one line per logged step: step, loss, lr, tokens/s, ...
    loss.png           the loss curve, redrawn at each checkpoint and at the end
    samples/           sample images, every ``sample_every`` steps
    summary.json       the final figures: steps, wall time, tokens/s, MFU, final loss, params

Reproducibility: every random draw of step ``s`` (which windows, which noise) comes from a
generator seeded by ``(seed, s)``, so a run resumed at step ``s`` draws exactly what the
uninterrupted run would have; nothing but weights, optimizer moments and the schedule needs
saving.

Several GPUs (``torchrun --nproc-per-node N``): DDP, one process per GPU. ``--batch-size`` is the
global batch, split evenly over the ranks. The step's generator is the same on every rank: a
task draws the whole global batch with it and keeps its own rows (:meth:`Dist.shard`), so the
N ranks together train on exactly the batch one process would, and a run stopped at N GPUs
resumes at any other N (dividing the batch) as the same run. Randomness inside a model (a VAE's
posterior sample) and a rank's own draws (:func:`rank_generator`: a rollout's sampler noise)
are seeded by ``(seed, rank, s)``. Rank 0 alone writes the run folder. docs/multi-gpu.md has
the details and the commands.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from worldgen import checkpoint
from worldgen.checkpoint import CheckpointError
from worldgen.files import atomic_write
from worldgen.models import autocast  # noqa: F401  (was defined here; trainers import it from here)
from worldgen.provenance import PEAK_BF16_FLOPS, hardware, peak_flops  # noqa: F401  (were defined here)

STATE_FORMAT = "worldgen-train-state"
STATE_VERSION = 1


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field whose ``help`` is both its flag's help and the why of its default."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Flags every training run has. Subclasses add the model- and data-specific ones."""

    data: str = opt("", "dataset folder (worldgen record); only the train side of ds.split() is trained on")
    out: str = opt(
        "",
        "run folder: state, checkpoints, logs, samples; an existing one is resumed "
        "(alias --run, except under torchrun, which reads --run as its --run-path)",
        aliases=("--run",),
    )
    steps: int | None = opt(None, "optimizer steps: fixes the LR schedule (with --minutes: an upper bound)")
    minutes: float | None = opt(
        None,
        "wall-clock budget: the step count is fixed from the measured speed "
        "after the first steps and stored, so a resume finishes the same schedule",
    )
    batch_size: int = opt(
        32,
        "samples per step over all GPUs (the global batch); torchrun splits it evenly over "
        "the ranks, so the same run resumes on another number of GPUs",
    )
    lr: float = opt(3e-4, "peak AdamW learning rate")
    weight_decay: float = opt(0.01, "AdamW decay on matrices only (never on norms/biases)")
    warmup: int = opt(200, "linear LR warmup steps; long enough that early Adam moments settle")
    min_lr_ratio: float = opt(0.1, "cosine decays to lr * this, not to 0, so the last steps still learn")
    grad_clip: float = opt(1.0, "global grad-norm clip; guards against the odd bad batch at high LR")
    ema_decay: float = opt(0.999, "EMA of weights; ~1000-step horizon suits runs of 5k-50k steps")
    ckpt_every: int = opt(1000, "save resume state and export every N steps")
    ckpt_minutes: float = opt(5.0, "... and at least every M minutes, so a killed run loses little")
    log_every: int = opt(10, "log loss/throughput every N steps (each log syncs the GPU once)")
    sample_every: int = opt(1000, "write sample images every N steps (0: only at the end)")
    seed: int = opt(0, "seeds init and every draw; the same seed gives the same run")
    heldout_fraction: float = opt(0.1, "share of episodes held out (by hash of episode id)")
    device: str = opt("auto", "auto (cuda if available), cuda or cpu; torchrun uses cuda:LOCAL_RANK")
    compile: bool = opt(False, "torch.compile the model (faster on GPU after a compile of ~1 min)")
    export_dtype: str = opt("fp32", "dtype of the exported ckpt/ weights", choices=("fp32", "bf16"))
    stop_at: int | None = opt(
        None,
        "stop this process at step S, state saved, to resume later (with any number "
        "of GPUs); the schedule stays --steps. Not stored: a resume runs to the end",
    )


# --- config <-> command line ----------------------------------------------------------------
def add_config_args(parser: argparse.ArgumentParser, cls: type[TrainConfig], required: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (``batch_size`` -> ``--batch-size``); all default to None so
    :func:`config_from_args` can tell the flags given from the defaults."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        help_ = f.metadata.get("help", "")
        if f.name not in required and f.default is not None:  # None: unset, its help says what that means
            help_ += f" (default: {f.default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(
                flag,
                *f.metadata.get("aliases", ()),
                type=base,
                default=None,
                help=help_,
                required=f.name in required,
                choices=f.metadata.get("choices"),
                metavar=None if f.metadata.get("choices") else f.name.upper(),
            )


def config_from_args(cls: type[TrainConfig], args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, given)``: defaults overridden by the flags given, and those flags alone."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    cfg = cls(**given)
    for f in dataclasses.fields(cls):
        if f.metadata.get("choices") and getattr(cfg, f.name) not in f.metadata["choices"]:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {f.metadata['choices']}")
    return cfg, given


# --- devices, precision, distributed ---------------------------------------------------------
@dataclass
class Dist:
    """Where this process runs. ``world_size == 1`` is the plain single-device path."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``x``, drawn for the whole global batch with the step's generator
        (the same on every rank): every ``world_size``-th row from ``rank`` on, so the ranks'
        rows together are the global batch, whatever its make-up (e.g. events last).

        Example:
            >>> Dist(rank=1, world_size=2).shard(torch.arange(6))
            tensor([1, 3, 5])
        """
        if len(x) % self.world_size:
            raise ValueError(f"a global batch of {len(x)} does not split evenly over {self.world_size} ranks")
        return x[self.rank :: self.world_size]


def setup(device: str = "auto") -> Dist:
    """Pick the device; under torchrun (WORLD_SIZE > 1) join the process group (NCCL on GPUs,
    gloo on CPU) on ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    if device == "cuda":
        # TF32 matmuls for whatever runs outside bf16 autocast (the loss, EMA): free speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return Dist(device=torch.device(device))
    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Rank 0 joins the ranks' latent parts while the others wait: allow that more than the default.
    torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), device=dev)


def teardown(d: Dist) -> None:
    if d.world_size > 1 and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        torch_dist.barrier()


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """The seed of ``step``'s draws on ``rank``. Rank 0's stream 0 is what one process has always
    used; ranks (shifted by 2^40) and streams (2^56) do not collide for seeds below ~10^6."""
    return (seed * 1_000_003 + step + (rank << 40) + (stream << 56)) % 2**63


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw of ``step`` on ``rank``: a resumed run redraws the same.
    Also reseeds torch's global RNG the same way, for randomness inside models (a VAE's sample).
    :func:`fit` hands tasks rank 0's, on every rank (see the module docstring)."""
    s = step_seed(seed, rank, step)
    torch.manual_seed(s)
    g = torch.Generator(device)
    g.manual_seed(s)
    return g


def rank_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """A generator of ``step``'s draws that are this rank's own, not rows of the global batch
    (e.g. the sampler noise of a rollout over this rank's rows), apart from the step's stream."""
    return torch.Generator(device).manual_seed(step_seed(seed, rank, step, stream=1))


# --- schedule and EMA ------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine to ``cfg.lr * min_lr_ratio`` at ``total``.

    Example:
        >>> c = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
        >>> lr_at(4, 100, c), lr_at(10, 100, c), round(lr_at(100, 100, c), 6)
        (0.5, 1.0, 0.1)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(total - cfg.warmup, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's weights, kept as a frozen copy of the model.

    ``decay`` ramps up as ``(1 + n) / (10 + n)`` early on, so the average is not dominated by
    the random init during the first thousand steps.

    Example:
        >>> m = nn.Linear(2, 2); ema = EMA(m, 0.9)
        >>> ema.update(m); ema.module(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings; never norms, biases or other vectors (nanoGPT's rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- resume state ----------------------------------------------------------------------------
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


# --- run folder, logs ------------------------------------------------------------------------
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


# --- the loop --------------------------------------------------------------------------------
class Task(Protocol):
    """What :func:`fit` trains. The task owns its model, data and loss; fit owns the rest."""

    model: nn.Module  # the trained module, unwrapped (fit wraps it for DDP/compile)
    tokens_per_sample: int  # for tokens/s: e.g. frames x latent tokens per frame

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        """The training loss of ``step``; ``model`` may be DDP-wrapped or compiled; every random
        draw comes from ``generator``, the same on every rank: draw the global batch
        (``cfg.batch_size``) and keep this rank's rows, :meth:`Dist.shard`."""

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) per sample, for MFU; None if unknown."""

    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        """Cheap held-out metrics logged at checkpoints (rank 0, EMA weights)."""

    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """Write sample images for ``step`` into ``folder`` (rank 0, EMA weights)."""

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        """Write the model folder ``folder`` (ckpt/) from the EMA weights."""

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        """Final metrics for summary.json (rank 0, EMA weights)."""


# Steps before timing starts (compile, allocator warmup) and steps timed to fix a --minutes schedule.
CALIB_SKIP = 3
CALIB_STEPS = 20
# Share of a --minutes budget kept for the end: final evaluation, samples, export.
BUDGET_RESERVE = 0.08


def _check_ranks_differ(loss: torch.Tensor, d: Dist) -> None:
    """Fail at the first step if every rank computed the same loss: the task drew the same rows on
    each (it must keep only its own, :meth:`Dist.shard`), so N GPUs would train on one GPU's batch."""
    losses = torch.zeros(d.world_size, device=d.device)
    losses[d.rank] = loss.detach().float()
    torch_dist.all_reduce(losses)
    if bool((losses == losses[0]).all()):
        raise RuntimeError(
            f"all {d.world_size} ranks computed the same loss {losses[0].item():.6g}: the task drew the "
            "same batch on every rank; draw the global batch and keep Dist.shard(rows)"
        )


def _broadcast_int(value: int, d: Dist) -> int:
    if d.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=d.device)
    torch_dist.broadcast(t, 0)
    return int(t.item())


def fit(task: Task, cfg: TrainConfig, run: Run, d: Dist, resuming: bool, t_start: float) -> dict[str, Any]:
    """Train ``task.model`` by ``cfg`` into ``run``; resume from ``run.state`` when ``resuming``.

    ``t_start`` is when this process started (``time.time()``): a ``--minutes`` budget covers
    setup and data encoding too. Returns the summary (also written to ``summary.json``).
    """
    model = task.model.to(d.device)
    torch.manual_seed(cfg.seed)
    # A task with several trained parts may give its own groups, each with an "lr_scale" (distill's critic).
    groups = (
        task.param_groups(cfg.weight_decay) if hasattr(task, "param_groups") else param_groups(model, cfg.weight_decay)
    )
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=d.device.type == "cuda")
    ema = EMA(model, cfg.ema_decay)
    step, total, wall_before = 0, cfg.steps, 0.0
    if cfg.steps is None and cfg.minutes is None:
        raise ValueError("give --steps N, --minutes M or both")
    if cfg.batch_size % d.world_size:
        raise ValueError(
            f"--batch-size {cfg.batch_size} (the global batch) does not split evenly over {d.world_size} GPUs"
        )
    if resuming:
        clean_orphans(run.state)
        meta = load_state(run.state, model, ema, optimizer)
        step, total, wall_before = meta["step"], meta["total_steps"], meta["train_wall_s"]
        run.truncate_log(step)
        if d.main:
            print(f"[train] resumed {run.root} at step {step} of {total}", file=sys.stderr)
    fixed = resuming or cfg.minutes is None  # else the budget fixes `total` after CALIB_STEPS
    resumed_at = step

    train_model: nn.Module = model
    if d.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    params = count_params(model)
    flops = task.flops_per_sample()
    peak = peak_flops(d.device)
    samples_per_step = cfg.batch_size
    cap = cfg.steps if cfg.steps is not None else 10**9

    def save(at: int, t_loop: float) -> None:
        if not d.main:
            return
        save_state(
            run.state,
            model,
            ema,
            optimizer,
            {
                "step": at,
                "total_steps": total if fixed else None,
                "train_wall_s": wall_before + t_loop,
                "config": dataclasses.asdict(cfg),
            },
        )
        task.export(ema.module, run.ckpt, torch.bfloat16 if cfg.export_dtype == "bf16" else torch.float32, at)

    from tqdm import tqdm

    bar = tqdm(
        total=total if fixed else cap,
        initial=step,
        disable=not d.main,
        dynamic_ncols=True,
        desc=run.root.name,
        unit="step",
    )
    loss_sum = torch.zeros((), device=d.device)
    n_sum, t_log, step_log = 0, time.perf_counter(), step
    t_loop0 = time.perf_counter()
    t_ckpt = t_loop0
    t_calib = 0.0
    rates: list[float] = []  # tokens/s of each log window after the first
    first_window = True
    last_loss = float("nan")
    stopped_by_budget = False
    model.train()
    while step < (total if fixed else cap):
        lr = lr_at(step, total if fixed else cap, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        gen = step_generator(cfg.seed, 0, step, d.device)  # the global batch's draws: the same on every rank
        torch.manual_seed(step_seed(cfg.seed, d.rank, step))  # randomness inside the model: this rank's own
        with autocast(d.device):
            loss = task.loss(train_model, step, gen)
        if d.world_size > 1 and step == resumed_at:
            _check_ranks_differ(loss, d)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.main:
            ema.update(model)
        loss_sum += loss.detach().float()
        n_sum += 1
        step += 1
        bar.update(1)

        if not fixed:  # time the steady state, then fix the schedule for good
            if step == CALIB_SKIP:
                _sync(d.device)
                t_calib = time.perf_counter()
            elif step == CALIB_SKIP + CALIB_STEPS:
                _sync(d.device)
                sec_per_step = (time.perf_counter() - t_calib) / CALIB_STEPS
                left = cfg.minutes * 60 * (1 - BUDGET_RESERVE) - (time.time() - t_start)
                total = _broadcast_int(min(cap, step + max(int(left / sec_per_step), 0)), d)
                fixed = True
                bar.total = total
                bar.refresh()
                if d.main:
                    print(
                        f"[train] budget {cfg.minutes} min at {sec_per_step * 1e3:.1f} ms/step: {total} steps",
                        file=sys.stderr,
                    )

        is_last = fixed and step >= total
        if step % cfg.log_every == 0 or is_last:
            last_loss = (loss_sum / max(n_sum, 1)).item()  # one GPU sync per log
            if d.world_size > 1:
                t = torch.tensor([last_loss], device=d.device)
                torch_dist.all_reduce(t)
                last_loss = t.item() / d.world_size
            now = time.perf_counter()
            steps_done = step - step_log
            tok_s = steps_done * samples_per_step * task.tokens_per_sample / (now - t_log)
            if not first_window:  # the first window holds compile and warmup
                rates.append(tok_s)
            first_window = False
            entry = {
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "tokens_per_s": tok_s,
                "samples_per_s": steps_done * samples_per_step / (now - t_log),
                "time_s": wall_before + now - t_loop0,
            }
            if flops and peak:
                entry["mfu"] = flops * entry["samples_per_s"] / (peak * d.world_size)
            run.log(entry)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            loss_sum.zero_()
            n_sum, t_log, step_log = 0, now, step
            # The budget guard: never run past --minutes (the state is saved; a resume finishes).
            over = int(cfg.minutes is not None and time.time() - t_start > cfg.minutes * 60)
            if d.world_size > 1:
                t = torch.tensor([over], device=d.device)
                torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
                over = int(t.item())
            if over and not is_last:
                stopped_by_budget = True
                break
        if cfg.stop_at is not None and fixed and step >= cfg.stop_at and not is_last:
            break  # the state is saved below; a resume (any number of GPUs) goes on from here

        t_aside = time.perf_counter()  # samples and checkpoints do not count against throughput
        if d.main and cfg.sample_every and step % cfg.sample_every == 0 and not is_last:
            task.sample(ema.module, step, run.samples)
        if (
            d.main
            and (step % cfg.ckpt_every == 0 or t_aside - t_ckpt > cfg.ckpt_minutes * 60)
            and fixed
            and not is_last
        ):
            save(step, t_aside - t_loop0)
            run.log({"step": step, **task.evaluate(ema.module)})
            run.plot()
            t_ckpt = time.perf_counter()
        t_log += time.perf_counter() - t_aside
    bar.close()

    t_loop = time.perf_counter() - t_loop0
    summary: dict[str, Any] = {}
    if d.main:
        if not fixed:  # a --minutes run that ended before its schedule was fixed (tiny cap)
            total = step
            fixed = True
        metrics = {**task.evaluate(ema.module), **task.finish(ema.module)}  # before export: it stores them
        save(step, t_loop)
        run.log({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        task.sample(ema.module, step, run.samples)
        run.plot()
        tok_s = sum(rates) / len(rates) if rates else float("nan")
        summary = {
            "kind": type(cfg).__name__,
            "steps": step,
            "total_steps": total,
            "finished": step >= total,
            "stopped_by_budget": stopped_by_budget,
            "wall_s": time.time() - t_start,
            "train_wall_s": wall_before + t_loop,
            "tokens_per_s": tok_s,
            "samples_per_s": tok_s / task.tokens_per_sample if rates else float("nan"),
            "mfu": flops * tok_s / task.tokens_per_sample / (peak * d.world_size)
            if flops and peak and rates
            else "n/a",
            "model_flops_per_sample": flops,
            "final_loss": last_loss,
            "params": params,
            "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
            "world_size": d.world_size,
            "batch_size_total": samples_per_step,
            **metrics,
        }
        run.write_json("summary.json", summary)
        print(json.dumps(summary, indent=1))
    barrier(d)
    return summary


def train(
    kind: str, cfg: TrainConfig, given: dict[str, Any] | None, make_task: Callable[[TrainConfig, Run, Dist], Task]
) -> dict[str, Any]:
    """Run (or resume) one training run in ``cfg.out``: device/DDP setup, the run folder, the
    task ``make_task(cfg, run, dist)`` builds, :func:`fit`, teardown. Returns the summary."""
    t_start = time.time()
    d = setup(cfg.device)
    run = Run(cfg.out, write=d.main)
    try:
        if d.main:  # rank 0 creates (or reopens) the run folder before the others read it
            started = run.start(kind, cfg, given or {})
        barrier(d)
        cfg, resuming = started if d.main else run.start(kind, cfg, given or {})
        return fit(make_task(cfg, run, d), cfg, run, d, resuming, t_start)
    finally:
        run.close()
        teardown(d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
