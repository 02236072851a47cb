"""Training on several GPUs (docs/multi-gpu.md), run here on the CPU: ``torchrun`` with 2
processes and the gloo backend, through the real command line.

The global batch is split over the ranks and every draw is made for the whole batch, so 2
processes train exactly the run 1 process does (up to the order of float sums in the gradient
all-reduce). The test stops a 2-process run half way and finishes it with 1 process, and the
other way round, and checks both against the run that never stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script

from worldgen import checkpoint
from worldgen.training.distributed import Dist
from worldgen.training.dynamics import DynamicsTrainConfig
from worldgen.training.dynamics import train as train_dynamics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores

# A global batch of 8 windows: 4 a rank under 2 processes. lr 1e-3 over 8 steps moves weights by
# ~1e-3 or more; a rank training on the wrong rows would miss by that much, float order by ~1e-6.
STEPS, HALF = 8, 4
CLOSE = dict(rtol=1e-4, atol=2e-5)


def torchrun(n: int, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node n -m worldgen.cli <args>`` on the CPU (gloo)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "worldgen.cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def flags(cfg: dict) -> list[str]:
    return [a for k, v in cfg.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


def state(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(run / "state", "train")[0]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], **CLOSE, msg=lambda m, k=k: f"{what}, {k}: {m}")


def test_shard_splits_the_global_batch():
    x = torch.arange(12)
    parts = [Dist(rank=r, world_size=3).shard(x) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == x.tolist()
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks"):
        Dist(rank=0, world_size=5).shard(x)


def test_two_processes_train_the_one_process_run_and_resume_across_counts(tiny_tokenizer_run, doom_recording, tmp_path):
    cfg = dict(
        data=str(doom_recording),
        tokenizer=str(tiny_tokenizer_run[0]),
        model="tiny",
        window=4,
        steps=STEPS,
        batch_size=8,
        lr=1e-3,
        warmup=2,
        log_every=2,
        ckpt_every=1000,
        sample_every=0,
        sample_steps=2,
        sample_frames=4,
        eval_windows=8,
        starts=2,
        start_frames=4,
        device="cpu",
    )
    straight, a, b = tmp_path / "straight", tmp_path / "two-then-one", tmp_path / "one-then-two"

    # A: 2 processes to the half-way step (a fresh run: rank 0 encodes, the other waits and reads);
    # B: 1 process to the same step. The same state.
    first = torchrun(2, ["train", "dynamics", *flags({**cfg, "out": str(a), "stop_at": HALF})])
    assert "encoded" in first.stderr
    half = json.loads((a / "summary.json").read_text())
    assert (half["steps"], half["total_steps"], half["finished"]) == (HALF, STEPS, False)
    assert (half["world_size"], half["batch_size_total"]) == (2, 8)
    train_dynamics(DynamicsTrainConfig(**cfg, out=str(b), stop_at=HALF))
    assert_same_tensors(state(a), state(b), f"state at step {HALF}, 2 processes vs 1")

    # B goes on with 2 processes, A with 1. Both end where the run that never stopped ends.
    second = torchrun(2, ["train", "dynamics", *flags({**cfg, "out": str(b)})])
    assert f"resumed {b} at step {HALF} of {STEPS}" in second.stderr
    assert "encoded" not in second.stderr  # the cached latents are read, not encoded again
    train_dynamics(DynamicsTrainConfig(**cfg, out=str(a)))
    train_dynamics(DynamicsTrainConfig(**cfg, out=str(straight)))
    for run, what in ((a, "2 then 1 processes"), (b, "1 then 2 processes")):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["finished"]
        assert_same_tensors(state(run), state(straight), f"state at the end, {what}")
        assert_same_tensors(
            checkpoint.load(run / "ckpt", "dynamics")[0],
            checkpoint.load(straight / "ckpt", "dynamics")[0],
            f"exported EMA weights, {what}",
        )
        steps = [e["step"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in e]
        assert steps == list(range(2, STEPS + 1, 2)), what  # none lost, none repeated across the resume
    assert json.loads((b / "summary.json").read_text())["world_size"] == 2


def test_scaling_benchmark_runs_torchrun_and_tabulates(doom_recording, tmp_path, capsys):
    """benchmarks/scaling.py on the CPU: the tokenizer trainer with 2 processes (gloo), the batch
    per process fixed; a finished count is read back, not rerun. (One count: a launch costs ~10 s.)"""
    scaling = benchmark_script("scaling")
    argv = [
        "--what",
        "tokenizer",
        "--data",
        str(doom_recording),
        "--out",
        str(tmp_path / "scaling"),
        "--gpus",
        "2",
        "--steps",
        "4",
        "--log-every",
        "1",
        "--batch-per-gpu",
        "4",
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "scaling.json"),
        "--",
        "--channels",
        "8,8,8,8",
        "--latent-channels",
        "4",
        "--eval-frames",
        "8",
        "--warmup",
        "1",
    ]
    rows = scaling.main(argv)
    assert [(r["gpus"], r["global_batch"], r["steps"], r["scaling_efficiency"]) for r in rows] == [(2, 8, 4, 1.0)]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["mfu"] is None  # no MFU on a CPU
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"] == rows
    assert "| 2 | 8 |" in capsys.readouterr().out
    stamp = (tmp_path / "scaling" / "gpus-2" / "summary.json").stat().st_mtime_ns
    assert scaling.main(argv) == rows
    assert (tmp_path / "scaling" / "gpus-2" / "summary.json").stat().st_mtime_ns == stamp

    # The table: per-GPU rates against the smallest count.
    one = {
        "tokens_per_s": 1000.0,
        "samples_per_s": 10.0,
        "batch_size_total": 4,
        "mfu": 0.2,
        "steps": 4,
        "wall_s": 1.0,
        "device": "H100",
    }
    rows = scaling.scaling_rows({8: {**one, "tokens_per_s": 6800.0, "batch_size_total": 32}, 1: one})
    assert [r["gpus"] for r in rows] == [1, 8]
    assert rows[1]["tokens_per_s_per_gpu"] == 850.0 and rows[1]["scaling_efficiency"] == 0.85

    # Dynamics runs share the first run's latent caches (linked, not encoded again).
    first, later = tmp_path / "gpus-1", tmp_path / "gpus-2"
    first.mkdir()
    for name in scaling.LATENT_CACHES:
        (first / name).write_bytes(b"latents")
    scaling.share_latents([first], later)
    assert all((later / name).samefile(first / name) for name in scaling.LATENT_CACHES)
