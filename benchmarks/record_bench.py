"""Recorder benchmarks: recording frames/s, and map coverage of the explore vs the random policy.

    python benchmarks/record_bench.py speed --workers 2 --steps 20000
    python benchmarks/record_bench.py coverage --steps 10000 --workers 2 --plots benchmarks

``speed`` times ``worldgen record`` end to end (worker start-up, play, shard writes, index)
with the explore policy and prints frames/s, and frames per CPU-second (this process, the
workers and their game engines), which a machine shared with other jobs changes less.
``coverage`` records the same number of frames with each policy, same maps and seeds, and
prints distinct 64-unit map cells per 10,000 frames; with ``--plots`` it writes
``coverage_<policy>.png`` there. Datasets go to a temp folder, deleted afterwards. Each prints
a markdown table row for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from datetime import date
from pathlib import Path

from worldgen.data import Dataset
from worldgen.data.coverage import plot_coverage
from worldgen.env.sources.record import DEFAULT_EPISODE_STEPS, DEFAULT_MAPS, record_doom
from worldgen.provenance import git_commit


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the workers and their engines)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["speed", "coverage"])
    p.add_argument("--steps", type=int, default=None, help="frames (speed: 20000, coverage: 10000)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--maps", default=",".join(DEFAULT_MAPS))
    p.add_argument("--episode-steps", type=int, default=DEFAULT_EPISODE_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plots", type=Path, help="folder for coverage_<policy>.png")
    args = p.parse_args()
    maps = args.maps.split(",")
    steps = args.steps or (20_000 if args.what == "speed" else 10_000)
    policies = ["explore"] if args.what == "speed" else ["explore", "random"]
    print(
        f"# {' '.join(sys.argv)}\n# {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}, "
        f"{date.today()}, commit {git_commit() or 'unknown'}"
    )
    print(
        "| policy | workers | frames | episodes | wall | frames/s | frames/CPU-s | cells per 10k frames "
        "| distinct cells | episode ends |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="record-bench-") as tmp:
            cpu0 = _cpu()
            s = record_doom(
                Path(tmp) / policy,
                steps,
                workers=args.workers,
                episode_steps=args.episode_steps,
                maps=maps,
                seed=args.seed,
                policy=policy,
                progress=False,
            )
            cpu = _cpu() - cpu0
            cov = s["coverage"]
            if args.plots:
                png = plot_coverage(Dataset(s["out"]), args.plots / f"coverage_{policy}.png")
                print(f"# plot {png} ({png.stat().st_size / 1024:.0f} KB)")
        per10k = "n/a" if cov["cells_per_block"] is None else f"{cov['cells_per_block']:.0f}"
        print(
            f"| {policy} | {args.workers} | {s['frames']:,} | {s['episodes']} | {s['seconds']:.1f} s | "
            f"{s['frames_per_s']:.0f} | {s['frames'] / cpu:.0f} | {per10k} | {cov['cells']} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(s['ends'].items()))} |"
        )


if __name__ == "__main__":
    main()
