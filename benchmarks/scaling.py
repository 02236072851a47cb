"""Data-parallel scaling of ``worldgen train`` on one host: the same trainer for the same number
of steps at 1, 2, 4 and 8 GPUs (one ``torchrun`` each), the batch per GPU fixed (weak scaling),
and a table of tokens/s per GPU, scaling efficiency and MFU.

    python benchmarks/scaling.py --data WORK/doom_train --tokenizer WORK/tok --out WORK/scaling \\
        --gpus 1 2 4 8 --steps 300 --batch-per-gpu 128 --json WORK/scaling.json -- --model M --window 16 --compile
    python benchmarks/scaling.py --what tokenizer --data WORK/doom_train --out WORK/scaling-tok \\
        --gpus 1 2 4 8 --steps 300 --batch-per-gpu 64 -- --compile

Each count N trains in its own run folder ``OUT/gpus-N`` with ``--batch-size`` = batch per GPU x
N (``--batch-size`` is the global batch; docs/multi-gpu.md). Flags after ``--`` go to every run.
Dynamics runs share one latent cache: the first run encodes the dataset, the others get its
``latents-*.safetensors`` linked in (the trainer checks they fit the data and tokenizer).

Rates are the trainer's own (``summary.json``): the mean tokens/s of the log windows after the
first (which holds compile and warmup); checkpoints and samples are left out (``--ckpt-every``
and ``--sample-every`` past the run). Scaling efficiency at N is the per-GPU rate at N over the
per-GPU rate at the smallest count measured. A finished run folder is read, not trained again,
so a lease cut short goes on where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from worldgen.files import atomic_write
from worldgen.provenance import hardware

LATENT_CACHES = ("latents-train.safetensors", "latents-heldout.safetensors")


def train_command(what: str, n: int, args: argparse.Namespace, run: Path, extra: list[str]) -> list[str]:
    """The ``torchrun`` command of ``n`` processes training ``what`` into ``run``."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "worldgen.cli",
        "train",
        what,
        "--data",
        args.data,
        "--out",
        str(run),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_per_gpu * n),
        "--log-every",
        str(args.log_every),
        "--ckpt-every",
        str(10**9),
        "--ckpt-minutes",
        str(10**6),
        "--sample-every",
        "0",
        "--device",
        args.device,
    ]
    if what == "dynamics":
        cmd += ["--tokenizer", args.tokenizer]
    return cmd + extra


def share_latents(runs: list[Path], run: Path) -> None:
    """Link the latent caches of an earlier run into ``run`` (copy where links cannot be made), so
    the dataset is encoded once for the whole table."""
    run.mkdir(parents=True, exist_ok=True)
    for name in LATENT_CACHES:
        src = next((r / name for r in runs if (r / name).is_file()), None)
        if src is None or (run / name).exists():
            continue
        try:
            os.link(src, run / name)
        except OSError:
            atomic_write(run / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def finished(run: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``run``, or None."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("finished") else None


def scaling_rows(summaries: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per GPU count from the runs' summaries: rates per GPU and the efficiency against the
    smallest count."""
    base_n = min(summaries)
    base = summaries[base_n]["tokens_per_s"] / base_n
    rows = []
    for n, s in sorted(summaries.items()):
        per_gpu = s["tokens_per_s"] / n
        rows.append(
            {
                "gpus": n,
                "global_batch": s["batch_size_total"],
                "tokens_per_s": s["tokens_per_s"],
                "tokens_per_s_per_gpu": per_gpu,
                "scaling_efficiency": per_gpu / base,
                "step_ms": 1e3 * s["batch_size_total"] / s["samples_per_s"],
                "mfu": s["mfu"] if isinstance(s["mfu"], float) else None,
                "steps": s["steps"],
                "wall_s": s["wall_s"],
                "device": s["device"],
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| GPUs | global batch | tokens/s | tokens/s per GPU | scaling efficiency | MFU | ms/step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['gpus']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {r['scaling_efficiency']:.1%} | {mfu} | {r['step_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("dynamics", "tokenizer"), default="dynamics")
    p.add_argument("--data", required=True, help="dataset folder (worldgen record)")
    p.add_argument("--tokenizer", default="", help="dynamics: the trained tokenizer (run or model folder)")
    p.add_argument("--out", required=True, help="folder of the run folders gpus-N")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="process counts, one run each")
    p.add_argument("--steps", type=int, default=300, help="steps per run: enough log windows after the first")
    p.add_argument("--batch-per-gpu", type=int, default=128, help="samples per GPU per step (the recipe's 128)")
    p.add_argument("--log-every", type=int, default=20, help="steps per rate window")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: gloo, to try the path")
    p.add_argument("--json", default=None, help="write the rows and the setting here")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.what == "dynamics" and not args.tokenizer:
        p.error("--what dynamics needs --tokenizer")
    if args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps} leaves no log window after the first (--log-every {args.log_every})")
    if args.device == "cuda" and max(args.gpus) > torch.cuda.device_count():
        p.error(f"--gpus {max(args.gpus)}: this host has {torch.cuda.device_count()} CUDA devices")

    out = Path(args.out)
    runs, summaries = [], {}
    for n in sorted(set(args.gpus)):
        run = out / f"gpus-{n}"
        summary = finished(run)
        if summary is None:
            if args.what == "dynamics":
                share_latents(runs, run)
            cmd = train_command(args.what, n, args, run, extra)
            print(f"[scaling] {n} GPU(s): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            if subprocess.run(cmd, env=env).returncode != 0:
                raise SystemExit(f"[scaling] the run with {n} GPU(s) failed; its folder is {run}")
            summary = finished(run)
            if summary is None:
                raise SystemExit(f"[scaling] {run}: the run ended without finishing (out of --minutes?)")
        runs.append(run)
        summaries[n] = summary

    rows = scaling_rows(summaries)
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or "?"
    )
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    setting = {
        "what": args.what,
        "steps": args.steps,
        "batch_per_gpu": args.batch_per_gpu,
        "flags": extra,
        "hardware": hardware(device),
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "torch": torch.__version__,
    }
    print(
        f"\n`worldgen train {args.what}` {' '.join(extra)}, {args.steps} steps, {args.batch_per_gpu} a GPU; "
        f"{setting['hardware']}; torch {torch.__version__}; {setting['date']}, commit {commit}\n"
    )
    print(markdown(rows))
    if args.json:
        text = json.dumps({"setting": setting, "rows": rows}, indent=1)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))
    return rows


if __name__ == "__main__":
    main()
