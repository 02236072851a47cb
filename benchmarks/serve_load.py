"""Load benchmark of `worldgen serve`: N concurrent clients for D seconds each.

    python benchmarks/serve_load.py --checkpoint CKPT --device cpu --clients 8 32 64 --seconds 60
    python benchmarks/serve_load.py --checkpoint default --device cuda --clients 8 32 64 --seconds 60

On CUDA the server runs compiled (`worldgen serve --compile`, its default there): it compiles and
warms every padded batch size (1, 2, 4, ..., --max-sessions) on its engine thread before it
listens, which takes minutes; --no-compile measures the eager server.

One server process (`worldgen serve --port 0`, started here) serves every round in turn; each
round connects N Python clients (one asyncio process, seeds 0..N-1) that play like people:
held keys change every second or so and actions go out at random moments, about one per frame
time, so the echoed timestamps measure action-to-frame latency including the wait for the next
tick. Per round: per-client frames/s (mean and slowest) once it plays, the stepped frames it
received from its first to its last (a frame the server dropped counts against it), the slowest client's
join (connect to first stepped frame: every client of a round joins at once and sessions start
on the engine thread between ticks), latency p50/p99 over every frame that
echoed an action, frames the server dropped for slow readers (its stats) and id gaps the
clients saw, the server's mean batched-step time and batch size, and the server's resident
memory idle before the round, at its peak and idle after it (growth across rounds = a leak).

The CPU figures in RESULTS.md use the tests' tiny trained model (fixture ``tiny_checkpoint``,
32x24 frames); this makes it in the folder given, in about 20 s:

    python -m pytest -q tests/test_server.py -k http --basetemp /tmp/wg-tiny   # -> /tmp/wg-tiny/dyn0/ckpt

Prints a Markdown table for benchmarks/RESULTS.md; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import time

import numpy as np

from worldgen.actions import KEYS
from worldgen.clients.client import Client, LocalServer
from worldgen.provenance import git_commit
from worldgen.server.app import rss_bytes

MB = 2**20


async def player(url: str, seed: int, seconds: float, fps: float, stats: dict) -> None:
    """One client: random held keys and mouse, actions at random moments, every frame counted."""
    rng = random.Random(seed)
    c = await Client.connect(url, seed=seed, client="serve_load")
    latencies, frames, gaps, last_id = [], 0, 0, None
    start = time.monotonic()
    first = last = None  # arrival of its first and last stepped frame (id 0 is the start frame)
    stepped = 0  # stepped frames received: one the server dropped is not, so it counts against the rate

    async def act() -> None:
        keys: list[str] = []
        while True:
            if rng.random() < 1 / fps:  # about once a second: press something else
                keys = rng.sample(KEYS[:6], rng.randint(0, 2))
            await c.act(keys, yaw=rng.uniform(-5, 5), pitch=rng.uniform(-1, 1))
            await asyncio.sleep(rng.uniform(0.5, 1.5) / fps)

    actor = asyncio.create_task(act())
    try:
        while time.monotonic() - start < seconds:
            f = await c.next_frame()
            frames += 1
            if f.id >= 1:
                first, last, stepped = first or time.monotonic(), time.monotonic(), stepped + 1
            if last_id is not None:
                gaps += f.id - last_id - 1
            last_id = f.id
            if f.latency_ms is not None:
                latencies.append(f.latency_ms)
    finally:
        actor.cancel()
        await c.close()
    stats.update(
        frames=frames,
        seconds=time.monotonic() - start,
        join_s=(first or time.monotonic()) - start,
        steady_fps=(stepped - 1) / (last - first) if first and last > first else 0.0,
        latencies=latencies,
        gaps=gaps,
        dropped=(c.stats or {}).get("dropped", 0),
        gen_ms=(c.stats or {}).get("gen_ms"),
        batch=(c.stats or {}).get("batch"),
        server_fps=(c.stats or {}).get("fps"),
    )


async def round_(url: str, n: int, seconds: float, fps: float, server_pid: int) -> dict:
    per = [dict() for _ in range(n)]
    peak = rss_bytes(server_pid)

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes(server_pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(player(url, i, seconds, fps, per[i]) for i in range(n)))
    sampler.cancel()
    lat = np.concatenate([p["latencies"] for p in per]) if any(p["latencies"] for p in per) else np.zeros(1)
    fps_each = [p["frames"] / p["seconds"] for p in per]
    steady = [p["steady_fps"] for p in per]
    return {
        "clients": n,
        "seconds": seconds,
        "fps_mean": float(np.mean(steady)),
        "fps_min": float(np.min(steady)),
        "fps_with_join_mean": float(np.mean(fps_each)),
        "join_s_max": float(np.max([p["join_s"] for p in per])),
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "latency_samples": int(sum(len(p["latencies"]) for p in per)),
        "dropped": int(sum(p["dropped"] for p in per)),
        "id_gaps": int(sum(p["gaps"] for p in per)),
        "frames": int(sum(p["frames"] for p in per)),
        "gen_ms": float(np.mean([p["gen_ms"] for p in per if p["gen_ms"] is not None] or [0])),
        "batch": float(np.mean([p["batch"] for p in per if p["batch"] is not None] or [0])),
        "rss_peak_mb": peak / MB,
    }


def idle_rss(pid: int, settle: float = 3.0) -> float:
    time.sleep(settle)  # sessions close on the engine thread after their clients leave
    return rss_bytes(pid) / MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=None, help="server --fps (default: the model's)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="server --threads (default: 1 on cpu, where the clients need a core too; torch's choice otherwise)",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="server --compile / --no-compile (default: the server's, on for CUDA)",
    )
    ap.add_argument(
        "--start-timeout",
        type=float,
        default=1800.0,
        help="seconds the server may take to load and compile before it listens",
    )
    ap.add_argument("--json", default=None, help="write all numbers here")
    args = ap.parse_args()

    # Every client of a round connects at once: all of them may wait for their hello together.
    server_args = [
        "--device",
        args.device,
        "--max-sessions",
        str(max(args.clients)),
        "--idle-timeout",
        "600",
        "--max-pending",
        str(max(args.clients)),
        "--log-level",
        "WARNING",
    ] + (["--fps", str(args.fps)] if args.fps else [])
    threads = args.threads or (1 if args.device == "cpu" else None)
    server_args += ["--threads", str(threads)] if threads else []
    server_args += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    rows = []
    t0 = time.monotonic()
    with LocalServer(args.checkpoint, *server_args, timeout=args.start_timeout) as srv:
        print(f"server up in {time.monotonic() - t0:.0f} s: {srv.lines[-2] if len(srv.lines) > 1 else ''}", flush=True)
        fps = asyncio.run(_probe_fps(srv.ws_url))
        print(
            f"server pid {srv.pid} at {srv.url}, {fps:g} fps target; {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        for n in args.clients:
            before = idle_rss(srv.pid)
            load0 = os.getloadavg()[0]
            r = asyncio.run(round_(srv.ws_url, n, args.seconds, fps, srv.pid))
            r.update(
                target_fps=fps,
                rss_before_mb=before,
                rss_after_mb=idle_rss(srv.pid),
                load_avg=max(load0, os.getloadavg()[0]),
            )
            rows.append(r)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)

    commit = git_commit()
    print(
        f"\n{args.checkpoint} on {args.device} ({threads or 'default'} torch threads), "
        f"{platform.processor() or platform.machine()}, {datetime.date.today()}, commit {commit}\n"
    )
    print(
        "| clients | target fps | fps per client (mean / slowest) | join s (slowest) | latency p50 / p99 ms "
        "| dropped (server) / id gaps | model step ms (batch) | server RSS MB before / peak / after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['target_fps']:g} | {r['fps_mean']:.2f} / {r['fps_min']:.2f} "
            f"| {r['join_s_max']:.2f} | {r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f} "
            f"| {r['dropped']} / {r['id_gaps']} "
            f"| {r['gen_ms']:.1f} ({r['batch']:.0f}) | {r['rss_before_mb']:.0f} / {r['rss_peak_mb']:.0f} / "
            f"{r['rss_after_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "checkpoint": args.checkpoint,
                    "device": args.device,
                    "commit": commit,
                    "compile": args.compile,
                    "date": str(datetime.date.today()),
                    "threads": threads,
                    "rounds": rows,
                },
                f,
                indent=1,
            )


async def _probe_fps(url: str) -> float:
    async with await Client.connect(url, client="serve_load") as c:
        return float(c.welcome["fps"])


if __name__ == "__main__":
    main()
