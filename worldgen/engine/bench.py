"""``worldgen bench``: how fast the streaming engine plays, alone and batched.

For each batch size B it opens B sessions from the model's start contexts, warms up (compiling
when asked), then times ``--frames`` calls of ``WorldModel.step_many`` (each a frame for every
session, decoded to uint8 on the host: what a player receives). It reports aggregate frames/s,
per-frame latency p50/p99 (the wall time of one step: every session waits for it), model FLOPs
utilisation of the DiT passes, cache memory per session, and the warm-up: the first step's time
at each batch size and the graphs torch.compile traced for it (one for the step whatever the
number of denoising steps, one for the decoder); prints a table and writes JSON.

Example:
    worldgen bench --checkpoint default --batch 1 8 32 64 --json bench.json --compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from worldgen.actions import Action
from worldgen.checkpoint import CheckpointError
from worldgen.engine.world_model import PRECISIONS, WorldModel
from worldgen.models import DiTConfig
from worldgen.provenance import git_commit, hardware, peak_flops

# A fixed, varied input: walking, turning by key and by mouse, strafing.
PLAY = [
    Action.from_keys(["forward"]),
    Action.from_keys(["forward", "turn_left"]),
    Action.from_keys([], yaw=6.0),
    Action.from_keys(["strafe_right"]),
    Action.from_keys(["forward"], yaw=-3.0),
]


def stream_flops_per_frame(cfg: DiTConfig, steps: int, cache_frames: int) -> float:
    """DiT FLOPs of one streamed frame: ``steps`` denoising passes plus the cache-writing pass,
    each over one frame's tokens attending to ``cache_frames`` cached frames and itself."""
    n, d, p, c = cfg.tokens_per_frame, cfg.dim, cfg.patch_size, cfg.latent_channels
    hidden = int(d * cfg.mlp_ratio)
    per_token = 2 * (c * p * p * d + cfg.depth * (4 * d * d + 2 * d * hidden) + d * p * p * c)
    per_frame = 2 * (256 * d + 2 * d * d + cfg.action_dim * d + cfg.depth * 6 * d * d + 2 * d * d)
    attention = cfg.depth * 4 * d * n * n * (cache_frames + 1)
    return (steps + 1) * (n * per_token + per_frame + attention)


def bench(wm: WorldModel, batches: list[int], frames: int, warmup: int) -> list[dict]:
    rows = []
    cache_frames = wm.stream.sinks + wm.stream.window
    flops = stream_flops_per_frame(wm.dit.cfg, wm.stream.steps, cache_frames)
    peak = peak_flops(wm.device) if wm.device.type == "cuda" else None
    for b in batches:
        sessions = [wm.session(seed=i) for i in range(b)]
        # Fill the caches first: the steady state of a long session is a full window. The first
        # step at a batch size compiles (when compiled): its time is the warm-up a server pays.
        graphs = compiled_graphs()
        for i in range(max(warmup, cache_frames)):
            t0 = time.perf_counter()
            wm.step_many(sessions, [PLAY[(i + j) % len(PLAY)] for j in range(b)])
            if i == 0:
                first_step_s = time.perf_counter() - t0
        graphs = compiled_graphs() - graphs
        times = []
        for i in range(frames):
            acts = [PLAY[(i + j) % len(PLAY)] for j in range(b)]
            t0 = time.perf_counter()
            wm.step_many(sessions, acts)  # returns host uint8 frames: synchronised
            times.append(time.perf_counter() - t0)
        t = np.array(times)
        fps = b * len(t) / t.sum()
        rows.append(
            {
                "batch": b,
                "frames_per_s": round(fps, 1),
                "latency_ms_p50": round(1e3 * np.percentile(t, 50), 2),
                "latency_ms_p99": round(1e3 * np.percentile(t, 99), 2),
                "mfu": round(flops * fps / peak, 4) if peak else None,
                "cache_mib_per_session": round(sessions[0].cache_bytes() / 2**20, 2),
                "first_step_s": round(first_step_s, 2),
                "new_graphs": graphs,
            }
        )
        for s in sessions:
            s.close()
        print(
            f"batch {b:3d}: {fps:8.1f} frames/s, latency p50 {rows[-1]['latency_ms_p50']:.2f} ms "
            f"p99 {rows[-1]['latency_ms_p99']:.2f} ms"
            + (f", MFU {rows[-1]['mfu']:.1%}" if peak else "")
            + f"; first step {first_step_s:.2f} s, {graphs} graphs compiled",
            flush=True,
        )
    return rows


def compiled_graphs() -> int:
    """Graphs torch.compile has traced in this process so far (dynamo's own counter): with the
    noise levels as tensors, one per batch size for the step and one for the decoder; a number
    that grows with the steps means recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="default", help="model folder or packaged name (default: default)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64], help="sessions stepped together")
    p.add_argument("--frames", type=int, default=200, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (at least a full window)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps K (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 autocast where the device has native bf16 (CUDA, AVX512-BF16 or AMX CPUs), else fp32",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the DiT and decoder (default: on CUDA)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    try:
        wm = WorldModel.load(args.checkpoint, device=args.device, steps=args.steps, precision=args.precision)
    except (CheckpointError, ValueError) as e:  # ValueError: --steps out of range
        print(f"worldgen bench: {e}", file=sys.stderr)
        return 1
    compile_ = wm.device.type == "cuda" if args.compile is None else args.compile
    if compile_:
        # Compile errors surface at the first call: report them and fall back (CUDA graphs, then
        # plain compile, then eager), so a bench always measures something and says what.
        for mode in ("reduce-overhead", None):
            try:
                wm.compile(mode)
                t0 = time.perf_counter()
                wm.step_many([wm.session(seed=0)], [PLAY[0]])
                print(
                    f"torch.compile(mode={mode}): first step {time.perf_counter() - t0:.1f} s, "
                    f"{compiled_graphs()} graphs",
                    flush=True,
                )
                compile_ = mode or "default"
                break
            except Exception as e:  # noqa: BLE001 - any compiler failure
                print(f"torch.compile(mode={mode}) failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
                wm = WorldModel.load(args.checkpoint, device=args.device, steps=args.steps, precision=args.precision)
        else:
            compile_ = False
    hw = hardware(wm.device)
    print(
        f"worldgen bench: {wm.checkpoint} on {hw}; K={wm.stream.steps} steps + 1 cache pass per frame, "
        f"cache {wm.stream.sinks} sink + {wm.stream.window} window frames, compile={compile_}, "
        f"{'bf16 autocast' if wm.bf16 else 'float32'}",
        flush=True,
    )
    rows = bench(wm, sorted(set(args.batch)), args.frames, args.warmup)
    commit = git_commit()
    result = {
        "checkpoint": str(wm.checkpoint),
        "device": hw,
        "compile": compile_,
        "precision": "bf16" if wm.bf16 else "fp32",
        "stream": vars(wm.stream),
        "compiled_graphs": compiled_graphs(),
        "date": datetime.date.today().isoformat(),
        "commit": commit or None,
        "torch": torch.__version__,
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0
