"""Loader throughput: frames/s of T-frame windows through a torch DataLoader.

Windows of ``--window`` frames (with actions, depth and pose) from ``WindowDataset``, shuffled,
batched by ``WindowDataset.loader`` (its numpy/flat collate) and, for comparison, by torch's
default collate; for each ``--workers`` count. Frames/s counts every frame of every window.

    # a recorded dataset (e.g. `worldgen record --env doom --steps 20000 --out data/doom20k`)
    python benchmarks/loader_bench.py --data data/doom20k
    # or real-size random arrays (160x120 RGB, uint8 depth, pose, 12 variables)
    python benchmarks/loader_bench.py --synthetic /tmp/synth --steps 20000

The first pass over a fresh dataset also hashes every shard once (WindowDataset verifies up
front); that is timed separately as "verify". Reads come from the page cache when the data
fits in memory, as they do in training after the first epoch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from worldgen.data import Dataset, DatasetIndex, Episode, EpisodeInfo, WindowDataset, write_episode_shards
from worldgen.provenance import git_commit


def build_synthetic(root: Path, steps: int, episode_steps: int = 2000, seed: int = 0) -> None:
    """Random arrays with the shapes and dtypes of a 160x120 ViZDoom recording."""
    rng = np.random.default_rng(seed)
    index = DatasetIndex(
        root,
        resolution=(160, 120),
        frame_skip=4,
        source={"kind": "synthetic", "seed": seed},
        variables=[f"v{i}" for i in range(12)],
        overwrite=True,
    )
    for k, start in enumerate(range(0, steps, episode_steps)):
        n = min(episode_steps, steps - start)
        ep = Episode(
            frames=rng.integers(0, 256, (n, 120, 160, 3), np.uint8),
            keys=rng.integers(0, 2, (n, 8), np.uint8),
            mouse=rng.normal(0, 5, (n, 2)).astype(np.float32),
            depth=rng.integers(0, 256, (n, 120, 160), np.uint8),
            pose=rng.normal(0, 500, (n, 5)).astype(np.float32),
            variables=rng.normal(size=(n, 12)).astype(np.float32),
        )
        index.add(
            EpisodeInfo(
                id=f"e{k:04d}", length=n, shards=write_episode_shards(root, f"e{k:04d}", ep), map="E1M1", seed=k
            )
        )


def memcpy_gb_per_s(mb: int = 64) -> float:
    """This machine's copy bandwidth right now (best of 5, buffers reused): what a loader,
    which mostly copies bytes, can at most approach. A busy shared machine shows it here."""
    src, dst = np.ones(mb << 20, np.uint8), np.zeros(mb << 20, np.uint8)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return round(mb / 1024 / best, 2)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(windows: WindowDataset, batch_size: int, workers: int, collate: str, frames: int) -> dict:
    """Wall-clock frames/s after a warm-up, and frames per CPU-second over the whole run.

    The second does not depend on what else the machine runs; on an idle machine a loader
    that keeps every core busy approaches (cores x frames per CPU-second).
    """
    loader = (
        windows.loader(batch_size, shuffle=True, num_workers=workers, seed=0)
        if collate == "worldgen"
        else torch.utils.data.DataLoader(windows, batch_size=batch_size, shuffle=True, num_workers=workers)
    )
    cpu0, warmup, n, n_all, nbytes, t0 = _cpu_seconds(), 3, 0, 0, 0, None
    it = iter(loader)
    while n < frames:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        n_all += batch["frames"].shape[0] * batch["frames"].shape[1]
        warmup -= 1
        if warmup == 0:  # worker start-up and first reads are not throughput
            t0 = time.perf_counter()
        elif warmup < 0:
            n += batch["frames"].shape[0] * batch["frames"].shape[1]
            nbytes += sum(v.numel() * v.element_size() for v in batch.values())
    dt = time.perf_counter() - t0
    del it, batch, loader  # joins the workers (persistent ones live in the loader), counting their CPU time
    gc.collect()
    cpu = _cpu_seconds() - cpu0
    return {
        "workers": workers,
        "collate": collate,
        "batch_size": batch_size,
        "frames": n,
        "seconds": round(dt, 2),
        "frames_per_s": round(n / dt),
        "windows_per_s": round(n / windows.window / dt, 1),
        "MB_per_s": round(nbytes / dt / 1e6),
        "frames_per_cpu_s": round(n_all / cpu),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="a recorded dataset")
    p.add_argument("--synthetic", type=Path, help="build real-size random data here (replaced if present)")
    p.add_argument("--steps", type=int, default=20_000, help="steps of synthetic data")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--collate", default="worldgen,default", help="worldgen, default (torch's), or both")
    p.add_argument("--frames", type=int, default=40_000, help="frames timed per configuration")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if (args.data is None) == (args.synthetic is None):
        p.error("give exactly one of --data and --synthetic")
    if args.synthetic:
        t = time.perf_counter()
        build_synthetic(args.synthetic, args.steps)
        print(f"built {args.steps:,} synthetic steps in {args.synthetic} in {time.perf_counter() - t:.1f} s")
    ds = Dataset(args.data or args.synthetic)
    t = time.perf_counter()
    windows = WindowDataset(ds, args.window)
    verify = time.perf_counter() - t
    size = sum(s["bytes"] for e in ds.episodes for s in e.shards)
    commit = git_commit()
    header = {
        "dataset": str(ds.root),
        "source": ds.index["source"].get("kind") or ds.index["source"].get("env"),
        "steps": ds.num_steps,
        "episodes": len(ds),
        "resolution": ds.resolution,
        "fields": windows.fields,
        "bytes": size,
        "verify_s": round(verify, 2),
        "verify_MB_per_s": round(size / verify / 1e6),
        "window": args.window,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "commit": commit,
        "load_avg_before": round(os.getloadavg()[0], 1),
        "memcpy_GB_per_s": memcpy_gb_per_s(),
    }
    print(json.dumps(header))
    rows = []
    for collate in args.collate.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            row = measure(windows, args.batch_size, workers, collate, args.frames)
            row["load_avg"] = round(os.getloadavg()[0], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| workers | collate | batch | frames/s | MB/s | frames per CPU-s | load avg |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['workers']} | {r['collate']} | {r['batch_size']}x{args.window} | {r['frames_per_s']:,} | "
            f"{r['MB_per_s']} | {r['frames_per_cpu_s']:,} | {r['load_avg']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
