"""The training loop (:func:`fit`), which drives a :class:`Task` (tokenizer, dynamics, distill,
the env heads), and :func:`train`, one whole run: setup, run folder, fit, teardown.

Reproducibility: every random draw of step ``s`` (which windows, which noise) comes from a
generator seeded by ``(seed, s)``, so a run resumed at step ``s`` draws exactly what the
uninterrupted run would have; nothing but weights, optimizer moments and the schedule needs
saving.

Several GPUs (``torchrun --nproc-per-node N``): DDP, one process per GPU. ``--batch-size`` is the
global batch, split evenly over the ranks. The step's generator is the same on every rank: a
task draws the whole global batch with it and keeps its own rows
(:meth:`~worldgen.training.distributed.Dist.shard`), so the N ranks together train on exactly
the batch one process would, and a run stopped at N GPUs resumes at any other N (dividing the
batch) as the same run. Randomness inside a model (a VAE's posterior sample) and a rank's own
draws (:func:`~worldgen.training.distributed.rank_generator`: a rollout's sampler noise) are
seeded by ``(seed, rank, s)``. Rank 0 alone writes the run folder. docs/multi-gpu.md has the
details and the commands.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn

from worldgen import checkpoint
from worldgen.models import autocast
from worldgen.provenance import peak_flops
from worldgen.training.config import TrainConfig
from worldgen.training.distributed import (
    Dist,
    barrier,
    broadcast_int,
    check_ranks_differ,
    mean_over_ranks,
    setup,
    step_generator,
    step_seed,
    teardown,
)
from worldgen.training.run import Run
from worldgen.training.schedule import EMA, count_params, lr_at, param_groups
from worldgen.training.state import clean_orphans, load_state, save_state


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


def fit(task: Task, cfg: TrainConfig, run: Run, d: Dist, resuming: bool, t_start: float) -> dict[str, Any]:
    """Train ``task.model`` by ``cfg`` into ``run``; resume from ``run.state`` when ``resuming``.

    ``t_start`` is when this process started (``time.time()``): a ``--minutes`` budget covers
    setup and data encoding too. Returns the summary (also written to ``summary.json``).
    """
    model = task.model.to(d.device)
    torch.manual_seed(cfg.seed)
    optimizer = _optimizer(task, model, cfg, d)
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

    train_model = _wrap(model, cfg, d)

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
        task.export(ema.module, run.ckpt, checkpoint.STORAGE[cfg.export_dtype], at)

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
            check_ranks_differ(loss, d)
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
                total = broadcast_int(_budget_total(cfg, step, sec_per_step, t_start, cap), d)
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
            last_loss = mean_over_ranks((loss_sum / max(n_sum, 1)).item(), d)  # one GPU sync per log
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
            if _over_budget(cfg, t_start, d) and not is_last:
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
        summary = _summary(
            task,
            cfg,
            d,
            steps=step,
            total=total,
            stopped_by_budget=stopped_by_budget,
            wall_s=time.time() - t_start,
            train_wall_s=wall_before + t_loop,
            rates=rates,
            flops=flops,
            peak=peak,
            final_loss=last_loss,
            params=params,
            metrics=metrics,
        )
        run.write_json("summary.json", summary)
        print(json.dumps(summary, indent=1))
    barrier(d)
    return summary


def _optimizer(task: Task, model: nn.Module, cfg: TrainConfig, d: Dist) -> torch.optim.Optimizer:
    """AdamW over the task's parameter groups: a task with several trained parts may give its own,
    each with an "lr_scale" (distill's critic); else :func:`param_groups` of the model."""
    groups = (
        task.param_groups(cfg.weight_decay) if hasattr(task, "param_groups") else param_groups(model, cfg.weight_decay)
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=d.device.type == "cuda")


def _wrap(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    """The module the loss runs through: DDP over several ranks, compiled with ``--compile``."""
    train_model: nn.Module = model
    if d.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def _budget_total(cfg: TrainConfig, step: int, sec_per_step: float, t_start: float, cap: int) -> int:
    """The step count a ``--minutes`` budget allows at the measured speed, less the end's reserve."""
    left = cfg.minutes * 60 * (1 - BUDGET_RESERVE) - (time.time() - t_start)
    return min(cap, step + max(int(left / sec_per_step), 0))


def _over_budget(cfg: TrainConfig, t_start: float, d: Dist) -> bool:
    """Whether this process is past ``--minutes``; any rank past it stops them all."""
    over = int(cfg.minutes is not None and time.time() - t_start > cfg.minutes * 60)
    if d.world_size > 1:
        t = torch.tensor([over], device=d.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        over = int(t.item())
    return bool(over)


def _summary(
    task: Task,
    cfg: TrainConfig,
    d: Dist,
    *,
    steps: int,
    total: int,
    stopped_by_budget: bool,
    wall_s: float,
    train_wall_s: float,
    rates: list[float],
    flops: float | None,
    peak: float | None,
    final_loss: float,
    params: int,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """summary.json: the run's figures; throughput is the mean over log windows after the first."""
    tok_s = sum(rates) / len(rates) if rates else float("nan")
    return {
        "kind": type(cfg).__name__,
        "steps": steps,
        "total_steps": total,
        "finished": steps >= total,
        "stopped_by_budget": stopped_by_budget,
        "wall_s": wall_s,
        "train_wall_s": train_wall_s,
        "tokens_per_s": tok_s,
        "samples_per_s": tok_s / task.tokens_per_sample if rates else float("nan"),
        "mfu": flops * tok_s / task.tokens_per_sample / (peak * d.world_size) if flops and peak and rates else "n/a",
        "model_flops_per_sample": flops,
        "final_loss": final_loss,
        "params": params,
        "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "world_size": d.world_size,
        "batch_size_total": cfg.batch_size,
        # What sizes the next run's batch: the most this rank's GPU held at once (None on the CPU).
        "peak_memory_gib": torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None,
        **metrics,
    }


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
