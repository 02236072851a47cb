"""``worldgen record``: record real play into a dataset, or replay actions in the real game.

Examples::

    worldgen record --env doom --out data/doom --steps 100000                # one worker per core
    worldgen record --env doom --out data/doom-heldout --steps 16000 --workers 16 --seed 1000  # unseen seeds
    worldgen record --env doom --out data/e1m1 --steps 5000 --maps E1M1 --policy random
    worldgen record --replay data/doom::s0-w01-e0003 --out data/replay       # re-render an episode
    worldgen record --replay actions.json --out data/replay                  # or a hand-written one
    worldgen record --env gym:CartPole-v1 --out data/cartpole --steps 1000   # any Gymnasium env

Recording: ``--workers`` processes (default: one per core) each run their own ViZDoom game and
record their share of ``--steps`` as episodes of at most ``--episode-steps`` steps (the
player's death or the map's exit ends one sooner: ``terminal``). Each episode gets its own
seed, drawn from ``--seed``, the worker and the episode number (:func:`episode_seed`) and
stored in the index, and its map round-robin from ``--maps``; its id is
``s<seed>-w<worker>-e<episode>``. Workers write their shards; the parent lists each episode
in the index as it completes, so a killed recorder leaves a valid dataset of the finished ones.
The dataset folder also gets ``maps/<MAP>.json``, the map's walls, for coverage plots.

Replay: the same map, seed, settings and actions reproduce the same frames exactly. The
source is either ``DATASET::EPISODE_ID`` (the recorded episode; the frames, depth and poses of
the replay are checked against it) or a JSON action file::

    {"map": "E1M1", "seed": 7, "frame_skip": 4, "resolution": "160x120", "skill": 2,
     "actions": [{"keys": ["forward"], "mouse": [5.0, 0.0]}, {"keys": [], "mouse": [0, 0]}]}

``map`` and ``actions`` are required; the rest default to :class:`DoomConfig`'s, seed to 0.
``keys`` are names from :data:`worldgen.actions.KEYS`, ``mouse`` is (yaw, pitch) in degrees
per step. One step is recorded per action: frame i is what the player saw when taking
action i, so the last action's effect is not in the episode (end with a no-op to see it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from worldgen import actions
from worldgen.data.coverage import PER, coverage, save_map_lines
from worldgen.data.dataset import Dataset, DatasetError, DatasetIndex, EpisodeInfo, write_episode_shards
from worldgen.env.sources.doom import VARIABLE_NAMES, DoomConfig, DoomEnv, DoomError, check_maps, map_lines, rollout
from worldgen.env.sources.policies import POLICIES, make_policy

DEFAULT_MAPS = ("E1M1", "E1M2", "E1M3", "E1M4", "E1M5", "E1M6", "E1M7", "E1M8")  # Freedoom episode 1
DEFAULT_EPISODE_STEPS = 2000  # ~4 minutes of game time at frame skip 4: deep into a map
SHARD_STEPS = 512  # steps per shard and per flush from a worker (~30 MB at 160x120)
DEFAULT_CONFIG = DoomConfig()


class RecordError(RuntimeError):
    """A recording that could not finish; finished episodes stay in the dataset."""


def episode_seed(seed: int, worker: int, episode: int) -> int:
    """The game and policy seed of one episode: a hash of (seed, worker, episode).

    Different ``seed`` values give unrelated episode seeds, so a held-out set recorded with
    another ``--seed`` shares no episode seed with the training set.

    Example:
        >>> episode_seed(0, 0, 0) == episode_seed(0, 0, 0) != episode_seed(1, 0, 0)
        True
    """
    return int(np.random.SeedSequence([seed, worker, episode]).generate_state(1)[0] & 0x7FFFFFFF)


def _source(config: DoomConfig, **extra: Any) -> dict[str, Any]:
    """The index's ``source``: enough to replay any episode (with its map and seed)."""
    import vizdoom

    return {
        "env": "doom",
        "doom": config.to_dict(),
        "vizdoom": vizdoom.__version__,
        "pose": "camera; yaw deg counter-clockwise from +x, pitch deg > 0 up (worldgen.env.sources.doom)",
        "depth": "vizdoom depth buffer, uint8, larger = farther, ~7 map units per level",
        **extra,
    }


# --- recording -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What one worker records."""

    out: str
    worker: int
    workers: int
    steps: int  # this worker's share of the total
    episode_steps: int
    maps: tuple[str, ...]
    seed: int
    policy: str
    config: DoomConfig


def _work(job: _Job, messages: Any, stop: Any) -> None:
    """Worker process: record episodes, write their shards, report each to the parent."""

    def terminate(*_: Any) -> None:  # run `finally` (close the engine); don't wait on a dead parent
        messages.cancel_join_thread()
        sys.exit(1)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it sets `stop`
    parent = os.getppid()
    env = None
    try:
        env = DoomEnv(job.config, job.maps[job.worker % len(job.maps)])
        policy = make_policy(job.policy, VARIABLE_NAMES)
        done, e = 0, 0
        while done < job.steps and not stop.is_set():
            map_ = job.maps[(e * job.workers + job.worker) % len(job.maps)]
            seed = episode_seed(job.seed, job.worker, e)
            eid = f"s{job.seed}-w{job.worker:02d}-e{e:04d}"
            policy.reset(seed)
            shards: list[dict[str, Any]] = []
            poses = []
            for chunk in rollout(env, policy, map_, seed, min(job.episode_steps, job.steps - done), SHARD_STEPS):
                shards += write_episode_shards(job.out, eid, chunk, SHARD_STEPS, first=len(shards))
                poses.append(chunk.pose)
                messages.put(("steps", len(chunk)))
                if stop.is_set() or os.getppid() != parent:
                    messages.cancel_join_thread()  # nobody may be reading any more
                    return  # the unfinished episode's shards stay unlisted: never read
            info = EpisodeInfo(
                id=eid,
                length=sum(s["steps"] for s in shards),
                shards=shards,
                map=map_,
                seed=seed,
                terminal=env.end is not None,
                extra={"end": env.end or "steps", "worker": job.worker, "policy": job.policy},
            )
            messages.put(("episode", asdict(info), np.concatenate(poses)))
            done += info.length
            e += 1
        messages.put(("done", job.worker))
    except BaseException:
        messages.put(("error", job.worker, traceback.format_exc()))
    finally:
        if env is not None:
            env.close()


def record_doom(
    out: str | Path,
    steps: int,
    *,
    workers: int | None = None,
    episode_steps: int = DEFAULT_EPISODE_STEPS,
    maps: tuple[str, ...] | list[str] = DEFAULT_MAPS,
    config: DoomConfig = DEFAULT_CONFIG,
    seed: int = 0,
    policy: str = "explore",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Record ``steps`` steps of ViZDoom play into dataset ``out``; return a summary.

    Example:
        >>> s = record_doom("data/demo", 2000, workers=2, maps=["E1M1"])    # doctest: +SKIP
        >>> s["frames"], s["coverage"]["cells"]                             # doctest: +SKIP
        (2000, 143)
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if steps < 1 or episode_steps < 1 or workers < 1 or seed < 0:
        raise ValueError(
            f"steps, episode_steps, workers must be >= 1 and seed >= 0; got {steps}, {episode_steps}, {workers}, {seed}"
        )
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    maps = tuple(check_maps(list(maps), config.wad))
    workers = min(workers, steps)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecordError(f"{out}: exists and is not a folder")
    index = DatasetIndex(
        out,
        resolution=config.resolution,
        frame_skip=config.frame_skip,
        source=_source(config, maps=list(maps), policy=policy, seed=seed, workers=workers, episode_steps=episode_steps),
        variables=VARIABLE_NAMES,
        overwrite=overwrite,
    )
    shutil.rmtree(out / "maps", ignore_errors=True)  # an overwritten dataset's walls
    # Fork where it exists: a spawned worker re-imports worldgen (torch: seconds per worker).
    # Nothing is forked mid-flight: no engine runs in this process yet, and the progress bar's
    # thread starts after the workers.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_work,
            name=f"worldgen-record-w{w:02d}",
            daemon=True,
            args=(
                _Job(
                    str(out),
                    w,
                    workers,
                    steps // workers + (w < steps % workers),
                    episode_steps,
                    maps,
                    seed,
                    policy,
                    config,
                ),
                messages,
                stop,
            ),
        )
        for w in range(workers)
    ]
    tracks: list[tuple[str, np.ndarray]] = []
    ends: Counter[str] = Counter()
    finished: set[int] = set()
    t0 = time.perf_counter()
    bar = None
    try:
        for p in procs:
            p.start()
        bar = tqdm(total=steps, unit="frame", disable=not progress, desc=f"record {out.name}")
        while len(finished) < workers:
            try:
                msg = messages.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [w for w, p in enumerate(procs) if w not in finished and not p.is_alive()]
                if dead:
                    raise RecordError(
                        f"worker {dead[0]} died (exit code {procs[dead[0]].exitcode}) without a report"
                    ) from None
                continue
            if msg[0] == "steps":
                bar.update(msg[1])
            elif msg[0] == "episode":
                index.add(EpisodeInfo(**msg[1]))
                if not (out / "maps" / f"{msg[1]['map']}.json").is_file():  # walls of the maps played
                    save_map_lines(out, msg[1]["map"], map_lines(msg[1]["map"], config.wad), wad=config.wad)
                tracks.append((msg[1]["map"], msg[2]))
                ends[msg[1]["extra"]["end"]] += 1
            elif msg[0] == "done":
                finished.add(msg[1])
            elif msg[0] == "error":
                raise RecordError(f"worker {msg[1]} failed:\n{msg[2]}")
    finally:
        if bar is not None:
            bar.close()
        stop.set()
        for p in procs:
            if p.pid is None:
                continue  # never started
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
    seconds = time.perf_counter() - t0
    frames = sum(len(p) for _, p in tracks)
    return {
        "out": str(out),
        "frames": frames,
        "episodes": len(tracks),
        "seconds": seconds,
        "frames_per_s": frames / seconds,
        "workers": workers,
        "ends": dict(ends),
        "coverage": coverage(tracks),
    }


# --- replay ----------------------------------------------------------------------------------
@dataclass
class ReplaySpec:
    """Everything a replay needs; ``reference`` is the recorded episode, when there is one."""

    map: str
    seed: int
    config: DoomConfig
    keys: np.ndarray  # (N, 8) uint8
    mouse: np.ndarray  # (N, 2) float32
    id: str
    origin: str
    reference: tuple[Dataset, int] | None = None


def _resolution(text: Any) -> tuple[int, int]:
    """``"160x120"`` or ``[160, 120]`` -> ``(160, 120)``."""
    if isinstance(text, (list, tuple)) and len(text) == 2 and all(isinstance(v, int) for v in text):
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"resolution must look like 160x120, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def load_replay(source: str | Path) -> ReplaySpec:
    """Parse ``DATASET::EPISODE_ID`` or a JSON action file (module docstring)."""
    text = str(source)
    if "::" in text:
        root, eid = text.rsplit("::", 1)
        ds = Dataset(root)
        i = ds.episode_index(eid)
        info, src = ds.episodes[i], ds.index["source"]
        if src.get("env") != "doom" or "doom" not in src or info.map is None or info.seed is None:
            raise DatasetError(
                f"{ds.index_path}: episode {eid!r} was not recorded from ViZDoom by "
                f"worldgen record (source env {src.get('env')!r}); cannot replay it"
            )
        d = src["doom"]
        config = DoomConfig(
            wad=d["wad"],
            resolution=tuple(d["resolution"]),
            frame_skip=d["frame_skip"],
            skill=d["skill"],
            render_hud=d["render_hud"],
        )
        return ReplaySpec(info.map, info.seed, config, ds.read(i, "keys"), ds.read(i, "mouse"), eid, text, (ds, i))
    path = Path(text)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise DoomError(f"{path}: no such action file (or use DATASET::EPISODE_ID)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DoomError(f"{path}: action file is not valid JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("map"), str) or not isinstance(spec.get("actions"), list):
        raise DoomError(f"{path}: action file must be an object with 'map' (string) and 'actions' (list)")
    if not spec["actions"]:
        raise DoomError(f"{path}: 'actions' is empty; nothing to replay")
    unknown = set(spec) - {"map", "seed", "frame_skip", "resolution", "skill", "render_hud", "wad", "actions"}
    if unknown:
        raise DoomError(f"{path}: unknown fields {sorted(unknown)}")
    defaults = DoomConfig()
    try:
        config = DoomConfig(
            wad=spec.get("wad", defaults.wad),
            resolution=_resolution(spec.get("resolution", defaults.resolution)),
            frame_skip=int(spec.get("frame_skip", defaults.frame_skip)),
            skill=int(spec.get("skill", defaults.skill)),
            render_hud=bool(spec.get("render_hud", defaults.render_hud)),
        )
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise DoomError(f"{path}: {e}") from None
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise DoomError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    keys, mouse = [], []
    for i, a in enumerate(spec["actions"]):
        try:
            act = actions.Action.from_dict(a)
        except actions.ActionError as e:
            raise DoomError(f"{path}: actions[{i}]: {e}") from None
        keys.append(act.keys)
        mouse.append(act.mouse)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip("_.-") or "replay"  # it names shard files
    return ReplaySpec(
        check_maps([spec["map"]], config.wad)[0], seed, config, np.stack(keys), np.stack(mouse), name, text
    )


def replay(source: str | Path, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Play a recorded or hand-written action sequence in the real game into dataset ``out``.

    Returns a summary; for a recorded episode, ``identical`` says whether the replay's frames,
    depth and poses equal the recording's, and ``mismatch`` names the first difference.
    """
    spec = load_replay(source)
    out = Path(out)
    index = DatasetIndex(
        out,
        resolution=spec.config.resolution,
        frame_skip=spec.config.frame_skip,
        source=_source(spec.config, policy="replay", replay_of=spec.origin),
        variables=VARIABLE_NAMES,
        overwrite=overwrite,
    )
    save_map_lines(out, spec.map, map_lines(spec.map, spec.config.wad), wad=spec.config.wad)
    steps = iter(zip(spec.keys, spec.mouse))
    shards: list[dict[str, Any]] = []
    mismatch: str | None = None
    t0 = time.perf_counter()
    with (
        DoomEnv(spec.config, spec.map) as env,
        tqdm(total=len(spec.keys), unit="frame", disable=not progress, desc=f"replay {spec.id}") as bar,
    ):
        for chunk in rollout(env, lambda obs: next(steps), spec.map, spec.seed, len(spec.keys), SHARD_STEPS):
            start = sum(s["steps"] for s in shards)
            shards += write_episode_shards(out, spec.id, chunk, SHARD_STEPS, first=len(shards))
            if spec.reference is not None and mismatch is None:
                mismatch = _compare(spec.reference, chunk, start)
            bar.update(len(chunk))
        end = env.end
    n = sum(s["steps"] for s in shards)
    index.add(
        EpisodeInfo(
            id=spec.id,
            length=n,
            shards=shards,
            map=spec.map,
            seed=spec.seed,
            terminal=end is not None,
            extra={"end": end or "steps", "replay_of": spec.origin},
        )
    )
    if spec.reference is not None and mismatch is None and n != len(spec.keys):
        mismatch = f"the game ended after {n} of {len(spec.keys)} steps"
    return {
        "out": str(out),
        "frames": n,
        "actions": len(spec.keys),
        "end": end or "steps",
        "seconds": time.perf_counter() - t0,
        "identical": None if spec.reference is None else mismatch is None,
        "mismatch": mismatch,
    }


def branch(source: str | Path, at: int, keys: np.ndarray, mouse: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The game's answer to "what if the player had done this from here": replay a recorded
    episode (``DATASET::EPISODE_ID``) to its frame ``at``, then play ``keys`` (K, 8) and ``mouse``
    (K, 2) instead of what was recorded.

    Returns the K frames (K, H, W, 3) and camera poses (K, 5) those actions make (a death freezes
    the last ones) and whether the replay's frame ``at`` equals the recording's.
    """
    spec = load_replay(source)
    if spec.reference is None or not 0 <= at < len(spec.keys):
        raise DoomError(f"{source}: need a recorded episode and a frame in [0, {len(spec.keys)}), got {at}")
    ds, i = spec.reference
    with DoomEnv(spec.config, spec.map) as env:
        obs = env.reset(spec.map, spec.seed)
        for t in range(at):
            obs = env.step(spec.keys[t], spec.mouse[t])
        matched = obs is not None and np.array_equal(obs.frame, ds.read(i, "frames", at, at + 1)[0])
        frames, poses = [], []
        for k, m in zip(keys, mouse):
            obs = env.step(k, m) if obs is not None else None
            frames.append(frames[-1] if obs is None else obs.frame)
            poses.append(poses[-1] if obs is None else obs.pose)
    return np.stack(frames), np.stack(poses), matched


def _compare(reference: tuple[Dataset, int], chunk: Any, start: int) -> str | None:
    """The first array and step where a replayed chunk differs from the recording, or None."""
    ds, i = reference
    for name in ("frames", "depth", "pose"):
        if name not in ds.fields:
            continue
        ref = ds.read(i, name, start, min(start + len(chunk), ds.episodes[i].length))
        mine = getattr(chunk, name)[: len(ref)]
        if not np.array_equal(ref, mine):
            bad = int(np.flatnonzero([not np.array_equal(a, b) for a, b in zip(ref, mine)])[0])
            return f"{name} differ from step {start + bad}"
    return None


# --- command line ----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="doom", help="'doom' (ViZDoom, freedoom1.wad) or 'gym:<ID>', e.g. gym:CartPole-v1")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to create")
    p.add_argument("--steps", type=int, help="frames to record, over all workers and episodes")
    p.add_argument("--replay", metavar="FILE", help="replay DATASET::EPISODE_ID or a JSON action file instead")
    p.add_argument("--workers", type=int, help="worker processes, one game each (default: one per core)")
    p.add_argument(
        "--episode-steps",
        type=int,
        help=f"cut episodes at this many steps (doom default {DEFAULT_EPISODE_STEPS}; gym: the env's own limit)",
    )
    p.add_argument("--maps", help=f"comma-separated maps, round-robin over episodes (default {','.join(DEFAULT_MAPS)})")
    p.add_argument("--frame-skip", type=int, help=f"game tics per step (default {DoomConfig.frame_skip})")
    p.add_argument("--resolution", type=_resolution, help="frame size WxH (default 160x120)")
    p.add_argument("--skill", type=int, help=f"Doom skill 1-5 (default {DoomConfig.skill})")
    p.add_argument("--seed", type=int, default=0, help="base seed; each episode's seed is derived from it")
    p.add_argument("--policy", choices=sorted(POLICIES), help="who plays (default explore)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


DOOM_ONLY = ("workers", "maps", "frame_skip", "skill", "policy")


def run(args: argparse.Namespace) -> int:
    try:
        if args.replay:
            given = [
                f"--{k.replace('_', '-')}"
                for k in (*DOOM_ONLY, "steps", "episode_steps", "resolution")
                if getattr(args, k) is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)}: not used with --replay (the replay source sets them)")
            s = replay(args.replay, args.out, args.overwrite, progress=not args.quiet)
            print(
                f"replayed {s['frames']} of {s['actions']} actions into {s['out']} (end: {s['end']}, "
                f"{s['frames'] / s['seconds']:.0f} frames/s)"
            )
            if s["identical"] is not None:
                print("frames identical to the recording" if s["identical"] else f"NOT identical: {s['mismatch']}")
                return 0 if s["identical"] else 1
            return 0
        if args.steps is None:
            raise ValueError("--steps is required to record (or give --replay)")
        if args.env.startswith("gym:"):
            given = [f"--{k.replace('_', '-')}" for k in DOOM_ONLY if getattr(args, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: apply to --env doom only")
            from worldgen.env.sources.gym_recorder import record_gym

            kw = {} if args.resolution is None else {"resolution": args.resolution}
            path = record_gym(
                args.env[4:],
                args.out,
                args.steps,
                seed=args.seed,
                episode_steps=args.episode_steps,
                overwrite=args.overwrite,
                **kw,
            )
            print(f"recorded {args.steps} steps of {args.env[4:]} into {path}")
            return 0
        if args.env != "doom":
            raise ValueError(f"--env {args.env!r}: use 'doom' or 'gym:<ID>'")
        config = DoomConfig()
        config = replace(
            config,
            **{
                k: v
                for k, v in (("resolution", args.resolution), ("frame_skip", args.frame_skip), ("skill", args.skill))
                if v is not None
            },
        )
        s = record_doom(
            args.out,
            args.steps,
            workers=args.workers,
            episode_steps=args.episode_steps or DEFAULT_EPISODE_STEPS,
            maps=args.maps.split(",") if args.maps else DEFAULT_MAPS,
            config=config,
            seed=args.seed,
            policy=args.policy or "explore",
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, DoomError, DatasetError, RecordError) as e:
        print(f"worldgen record: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"worldgen record: interrupted; {args.out} holds the episodes finished so far", file=sys.stderr)
        return 130
    cov = s["coverage"]
    rate = (
        f"{cov['cells_per_block']:.0f} cells per {PER:,} frames"
        if cov["cells_per_block"] is not None
        else f"{cov['cells']} cells in {cov['frames']:,} frames"
    )
    print(
        f"recorded {s['frames']:,} frames in {s['episodes']} episodes into {s['out']} with {s['workers']} "
        f"workers: {s['frames_per_s']:.0f} frames/s; episode ends {s['ends']}; coverage {rate} "
        f"({cov['cells']} distinct {cov['cell']:.0f}-unit cells)"
    )
    return 0
