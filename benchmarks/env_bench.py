"""Vector-env steps/s: N agents inside a world model, stepped by one batched forward per step.

Builds :class:`worldgen.env.gym.world_model_env.WorldModelVectorEnv` for each N in ``--envs``,
resets it, takes ``--warmup`` untimed steps, then times ``--steps`` steps of seeded random
actions from the action space. Reports agent steps/s (N x vector steps / s) and milliseconds
per vector step, with the reward model in the loop (``--reward``). On a shared CPU, agent
steps per CPU-second (process time over all threads) is the steadier figure. ``--horizon``
truncates episodes, so the timed steps include the autoresets (with ``--start dataset --data
REC``: DIAMOND-style short episodes from recorded states, as ``examples/ppo_doom.py`` trains).

Examples:
    python benchmarks/env_bench.py --device cuda --envs 1,16,64 --steps 50 --compile       # GPU, default model
    python benchmarks/env_bench.py --device cpu --envs 1,16,64 --steps 3 --warmup 1        # CPU, default model
    python benchmarks/env_bench.py --device cpu --checkpoint PATH/ckpt --reward zero       # CPU, a tiny model
    python benchmarks/env_bench.py --device cuda --envs 64 --steps 68 --start dataset --data REC --horizon 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from worldgen.env.gym.world_model_env import WorldModelVectorEnv
from worldgen.provenance import hardware


def bench(n: int, args: argparse.Namespace) -> dict:
    envs = WorldModelVectorEnv(
        n,
        args.checkpoint,
        device=args.device,
        reward=args.reward,
        horizon=args.horizon,
        start=args.start,
        data=args.data,
        split="all",
        compile=args.compile,
        torch_threads=args.threads,
    )
    envs.action_space.seed(0)
    envs.reset(seed=0)
    for _ in range(args.warmup):
        envs.step(envs.action_space.sample())
    sync = torch.cuda.synchronize if envs.model.device.type == "cuda" else (lambda: None)
    sync()
    times = []
    cpu0 = time.process_time()
    for _ in range(args.steps):
        a = envs.action_space.sample()
        t = time.perf_counter()
        envs.step(a)
        sync()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    envs.close()
    total = sum(times)
    return {
        "envs": n,
        "vector_steps": args.steps,
        "steps_per_s": n * args.steps / total,
        "steps_per_cpu_s": n * args.steps / cpu,
        "ms_per_vector_step": 1e3 * total / args.steps,
        "ms_p50": 1e3 * float(np.median(times)),
        "ms_max": 1e3 * max(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--envs", default="1,16,64", help="comma-separated numbers of sub-envs")
    p.add_argument("--steps", type=int, default=20, help="timed vector steps per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed vector steps first (allocator, caches)")
    p.add_argument("--reward", default="learned", help="'learned', 'zero' or a folder with a reward head")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (CPU; default: the env's, one on a CPU of <= 4 cores)",
    )
    p.add_argument("--compile", action="store_true", help="wm.compile() the engine (GPU; warmup steps compile)")
    p.add_argument("--horizon", type=int, default=None, help="truncate episodes after this many steps (default never)")
    p.add_argument("--start", default="auto", help="where episodes start: auto, stored, dataset (--data) or doom")
    p.add_argument("--data", default=None, help="a recording for --start dataset")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device)
    rows = [bench(int(n), args) for n in args.envs.split(",")]
    head = {
        "checkpoint": args.checkpoint,
        "device": str(device),
        "machine": hardware(device),
        "reward": args.reward,
        "compile": args.compile,
        "start": args.start,
        "horizon": args.horizon,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    print(json.dumps(head))
    print(f"{'envs':>5} {'steps/s':>10} {'steps/CPU-s':>12} {'ms/vector step':>15} {'p50 ms':>9} {'max ms':>9}")
    for r in rows:
        print(
            f"{r['envs']:>5} {r['steps_per_s']:>10.2f} {r['steps_per_cpu_s']:>12.2f} {r['ms_per_vector_step']:>15.1f} "
            f"{r['ms_p50']:>9.1f} {r['ms_max']:>9.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
