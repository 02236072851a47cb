"""The game's side of the play suite (:mod:`worldgen.evaluation.play`): branch recordings, camera
motion read off frames (:class:`FrameOdometry`), and ``worldgen eval --suite play``.

:func:`record_branches` picks windows from a ViZDoom recording (episode-id order, seeded, as
``worldgen eval`` does), replays each episode in the real game to the window's last context
frame, and from there plays every case of a :class:`~worldgen.evaluation.play.PlayScript`: the
branches and the revisits. It writes what the game showed as a *branch recording*, a worldgen
dataset (checksummed shards, an index rewritten atomically after every window; layout in
:mod:`worldgen.evaluation.play`). ViZDoom is deterministic given map, seed and actions; each
replay checks that it reproduced the recorded departure frame (``replay_matched``), and each
window's longest case is played twice (``repeat_identical``).

Windows replay in parallel processes (``workers``, one game each); a window costs one replay of
its episode's prefix per case and one more (ViZDoom's save and load do not reproduce a replay
frame for frame), at a few hundred steps/s a game on one core.

Examples::

    worldgen eval --suite play --checkpoint default --data HELDOUT --split all --json play.json
    python -c "from worldgen.env.sources.play_suite import record_branches as rb; rb('HELDOUT', 'BRANCHES', windows=64)"
    worldgen eval --suite play --checkpoint default --data BRANCHES --json play.json   # a branch recording
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from worldgen.data import Dataset, DatasetError
from worldgen.data.dataset import DatasetIndex, Episode, EpisodeInfo, depth_to_uint8, write_episode_shards
from worldgen.env.learned.geometry import find_head, motion_between
from worldgen.env.sources.doom import HFOV_DEG, DoomConfig, DoomEnv, DoomError
from worldgen.evaluation.evaluate import EvaluationError, select_windows, trainer_heldout_fraction, write_json
from worldgen.evaluation.play import KIND, PlayScript

DEFAULT_SCRIPT = PlayScript()

# What a case episode's last step holds: no action follows the last frame.
_NOOP_KEYS, _NOOP_MOUSE = np.zeros((1, 8), np.uint8), np.zeros((1, 2), np.float32)


@dataclasses.dataclass(frozen=True)
class _Window:
    """One window's replay job (picklable for the process pool)."""

    w: int
    config: DoomConfig
    map: str
    seed: int
    keys: np.ndarray  # (at, 8) the recorded actions up to the departure frame
    mouse: np.ndarray  # (at, 2)
    departure: np.ndarray  # (H, W, 3) the recorded departure frame, to check the replay against
    cases: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> keys (K, 8), mouse (K, 2)


def _play_window(job: _Window) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]], bool]:
    """Replay to the departure frame once per case, then play the case: name -> frames (K, H, W, 3),
    depth (K, H, W), poses (K + 1, 5) from the departure on, and whether the replay matched the recording; and
    whether the longest case, played once more, came out identical (the game's determinism,
    checked rather than assumed). A death or the map's exit mid-case freezes the last frame, as
    ``worldgen.env.sources.record.branch`` does."""
    with DoomEnv(job.config, job.map) as env:
        out = {name: _play_case(env, job, keys, mouse) for name, (keys, mouse) in job.cases.items()}
        longest = max(job.cases, key=lambda n: len(job.cases[n][0]))
        again = _play_case(env, job, *job.cases[longest])
    same = all(np.array_equal(a, b) for a, b in zip(again[:3], out[longest][:3]))
    return out, same


def _play_case(
    env: DoomEnv, job: _Window, keys: np.ndarray, mouse: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One case of :func:`_play_window`: replay to the departure, then play ``keys``, ``mouse``."""
    obs = env.reset(job.map, job.seed)
    for k, m in zip(job.keys, job.mouse):
        obs = env.step(k, m)
    if obs is None:
        raise DoomError(f"window {job.w}: the game ended before the departure frame on replay")
    # At the recording's resolution: a recording may store the game's frames downscaled.
    h, w = job.departure.shape[:2]
    matched = bool(np.array_equal(_resize(obs.frame[None], (w, h))[0], job.departure))
    frames, depth, poses = [], [], [obs.pose]
    for k, m in zip(keys, mouse):
        obs = env.step(k, m) if obs is not None else None
        frames.append(frames[-1] if obs is None else obs.frame)
        depth.append(depth[-1] if obs is None else obs.depth)
        poses.append(poses[-1] if obs is None else obs.pose)
    return np.stack(frames), np.stack(depth), np.stack(poses).astype(np.float32), matched


def _resize(frames: np.ndarray, size: tuple[int, int] | None, resample: int = Image.BILINEAR) -> np.ndarray:
    """(N, H, W, 3) uint8 to ``size`` (W, H) by bilinear filtering, as a model trained on
    downscaled frames saw them; unchanged without a size or at that size already. Depth (N, H, W)
    goes with ``Image.NEAREST``: a level blended across an edge is a surface nobody saw."""
    if size is None or tuple(frames.shape[2:0:-1]) == tuple(size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize(tuple(size), resample)) for f in frames])


def record_branches(
    data: str | Path,
    out: str | Path,
    *,
    windows: int = 32,
    context: int = 15,
    script: PlayScript = DEFAULT_SCRIPT,
    split: str = "all",
    heldout_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    size: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Make a branch recording of ``windows`` windows of ViZDoom recording ``data`` into ``out``.

    ``split``: ``"all"`` (every episode: play recorded with seeds never used in training) or
    ``"heldout"`` (``Dataset.split(heldout_fraction)``'s held-out side of a training recording).
    ``size``: (W, H) to store frames at, for a model trained on downscaled frames (default: the
    recording's resolution, which may itself be the game's frames downscaled).
    Where ``data`` has depth, every episode keeps it (uint8 levels): the context's is what a
    world-cache model's sessions start from.
    Returns a summary: ``out``, ``windows``, ``replay_matched`` (share of replays),
    ``deterministic`` (share of windows whose longest case replayed twice came out identical).
    """
    ds = Dataset(data)
    src = ds.index["source"]
    if src.get("env") != "doom" or "doom" not in src:
        raise EvaluationError(
            f"{ds.root}: the play suite replays play in ViZDoom, but this recording's source "
            f"is {src.get('env')!r} without game settings (record it with `worldgen record --env doom`)"
        )
    if split not in ("all", "heldout"):
        raise EvaluationError(f"split must be 'all' or 'heldout', got {split!r}")
    if windows < 1 or context < 1:
        raise EvaluationError(f"need windows >= 1 and context >= 1, got {windows}, {context}")
    episodes = list(range(len(ds))) if split == "all" else ds.split(heldout_fraction)[1]
    replayable = [e for e in episodes if ds.episodes[e].map is not None and ds.episodes[e].seed is not None]
    if not replayable:
        raise EvaluationError(f"{ds.root}: none of its {split} episodes names its map and seed; cannot replay")
    d = src["doom"]
    config = DoomConfig(
        wad=d["wad"],
        resolution=tuple(d["resolution"]),
        frame_skip=d["frame_skip"],
        skill=d["skill"],
        render_hud=d["render_hud"],
    )
    # One frame before the context: it carries the action that produced the first context frame.
    if "pose" not in ds.fields:
        raise EvaluationError(f"{ds.root}: has no camera poses; record it with `worldgen record --env doom`")
    depth = "depth" in ds.fields  # the context's depth, for models that play with a world cache
    items = select_windows(ds, replayable, context + 1, windows, seed, fields=("pose", "depth") if depth else ("pose",))
    if not items:
        raise EvaluationError(f"{ds.root}: its {split} episodes hold no window of {context + 1} frames")
    cases = {
        name: (np.stack([a.keys for a in acts]), np.stack([a.mouse for a in acts]))
        for name, acts in script.cases().items()
    }
    size = tuple(size) if size is not None else ds.resolution  # the game renders at its own resolution
    index = DatasetIndex(
        out,
        resolution=size,
        frame_skip=ds.frame_skip,
        variables=(),
        has_depth=depth,
        overwrite=overwrite,
        source={
            "env": "doom",
            "kind": KIND,
            "of": str(ds.root),
            "doom": d,
            "context": context,
            "windows": len(items),
            "windows_asked": windows,
            "split": split,
            "heldout_fraction": heldout_fraction if split == "heldout" else None,
            "seed": seed,
            "script": dataclasses.asdict(script),
        },
    )
    jobs = []
    for w, it in enumerate(items):
        info = ds.episodes[it["episode"]]
        at = int(it["start"]) + context  # the departure: the last context frame
        jobs.append(
            _Window(
                w,
                config,
                info.map,
                int(info.seed),
                ds.read(it["episode"], "keys", 0, at),
                ds.read(it["episode"], "mouse", 0, at),
                it["frames"][-1],
                cases,
            )
        )
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    matched, identical = [], []
    bar = tqdm(total=len(jobs), unit="window", desc=f"replay branches into {Path(out).name}", disable=not progress)
    # Fork where it exists (no torch import per worker); nothing is mid-flight in this process.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers > 1 else None
    try:
        done = pool.map(_play_window, jobs) if pool else map(_play_window, jobs)
        for job, it, (played, same) in zip(jobs, items, done):  # in window order: the index lists them so
            eid = ds.episodes[it["episode"]].id
            _write_window(index, job, it, played, same, eid, context, size)
            matched += [m for *_, m in played.values()]
            identical.append(same)
            bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    return {
        "out": str(out),
        "windows": len(jobs),
        "replay_matched": float(np.mean(matched)),
        "deterministic": float(np.mean(identical)),
    }


def _write_window(
    index: DatasetIndex,
    job: _Window,
    item: dict[str, Any],
    played: dict,
    same: bool,
    eid: str,
    context: int,
    size: tuple[int, int],
) -> None:
    """The window's context episode and one episode per case, in the dataset's alignment."""
    first = int(item["start"]) + 1  # the first context frame (item frame 0 is the lead-in)
    extra = {"window": job.w, "of": [eid, first]}
    # WindowDataset items hold the actions that produced each frame; the dataset stores each
    # after its frame: shift by one, the last context frame followed by nothing recorded here.
    depth = "depth" in item  # then every episode holds it (the index says has_depth)
    ctx = Episode(
        frames=_resize(item["frames"], size),
        keys=np.concatenate([item["keys"][1:], _NOOP_KEYS]),
        mouse=np.concatenate([item["mouse"][1:], _NOOP_MOUSE]),
        depth=_resize(depth_to_uint8(item["depth"]), size, Image.NEAREST) if depth else None,
        pose=item["pose"],
    )
    name = f"w{job.w:03d}-context"
    index.add(
        EpisodeInfo(
            id=name,
            length=len(ctx),
            shards=write_episode_shards(index.root, name, ctx),
            map=job.map,
            seed=job.seed,
            extra={**extra, "case": "context", "replay_matched": True, "repeat_identical": same},
        )
    )
    for case, (frames, case_depth, poses, matched) in played.items():
        keys, mouse = job.cases[case]
        ep = Episode(
            frames=np.concatenate([_resize(item["frames"][-1:], size), _resize(frames, size)]),
            keys=np.concatenate([keys, _NOOP_KEYS]),
            mouse=np.concatenate([mouse, _NOOP_MOUSE]),
            depth=np.concatenate([ctx.depth[-1:], _resize(case_depth, size, Image.NEAREST)]) if depth else None,
            pose=poses,
        )
        name = f"w{job.w:03d}-{case}"
        index.add(
            EpisodeInfo(
                id=name,
                length=len(ep),
                shards=write_episode_shards(index.root, name, ep),
                map=job.map,
                seed=job.seed,
                extra={**extra, "case": case, "replay_matched": matched},
            )
        )


class FrameOdometry:
    """Camera motion read off two frames alone: the play suite's
    :class:`~worldgen.evaluation.play.Odometry`, true motion from the game's poses by the
    recorder's convention (:func:`~worldgen.env.learned.geometry.motion_between`).

    No action goes in. The geometry head's odometry also reads the action, and given it credits
    a frame held still with the action's motion (measured: yaw sign right on 100% of the held
    frame's steps); given a no-op instead it cannot read a turn off the frames (37% on the game's
    own frames). So:

    * yaw by registration: Doom projects columns on a plane, column x at bearing
      ``atan((x - cx) / f)``; resampled to bearings, a turn by theta is a shift by theta. The
      shift (within ``max_yaw``) that best matches the two frames' column profiles (the mean
      grey of ``bands`` bands of rows) is the yaw, > 0 counter-clockwise as the pose's;
    * forward from the geometry head's depth, when there is one: Doom's depth is planar, so a
      step forward by d brings every static point d nearer; the median change over the centre
      of the view (where points move least across the image), in map units.

    Left, up and pitch are not measured (NaN).
    """

    def __init__(
        self,
        head: Any | None = None,
        hfov_deg: float = HFOV_DEG,
        max_yaw: float = 30.0,
        step_deg: float = 0.5,
        bands: int = 6,
        rows: tuple[float, float] = (0.1, 0.6),
        centre_deg: float = 25.0,
        depth_units: float = 7.0,
        batch: int = 512,
    ):
        self.head, self.hfov, self.max_yaw, self.step, self.bands = head, hfov_deg, max_yaw, step_deg, bands
        self.rows, self.centre = rows, centre_deg
        self.depth_units, self.batch = depth_units, batch
        self.name = "yaw: column registration; forward: " + ("geometry head depth" if head is not None else "none")

    def _profiles(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, bands, J) mean grey of row bands at bearings -hfov/2 .. hfov/2."""
        b, h, w, _ = frames.shape
        # Rows from the ceiling to below the horizon: the weapon sprite below does not turn with the world.
        top, bottom = int(h * self.rows[0]), int(h * self.rows[1])
        grey = frames[:, top:bottom].float().mean(-1)  # (B, h', W)
        grey = grey[:, : max(len(grey[0]) // self.bands, 1) * self.bands]
        rows = grey.reshape(b, min(self.bands, grey.shape[1]), -1, w).mean(2)  # (B, bands, W)
        f = (w / 2) / np.tan(np.radians(self.hfov / 2))
        bearing = np.arange(-self.hfov / 2, self.hfov / 2 + 1e-9, self.step)
        x = torch.as_tensor((w - 1) / 2 + f * np.tan(np.radians(bearing)), dtype=torch.float32).clamp(0, w - 1)
        lo = x.floor().long().clamp(max=w - 2)
        frac = x - lo  # (J,)
        return rows[..., lo] * (1 - frac) + rows[..., lo + 1] * frac

    def yaw(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """(B,) degrees counter-clockwise from ``prev`` to ``nxt``."""
        a, b = self._profiles(torch.from_numpy(prev)), self._profiles(torch.from_numpy(nxt))
        n = int(self.max_yaw / self.step)
        shifts = range(-n, n + 1)
        # A left turn by theta moves what was at bearing phi to phi + theta: nxt[j] = prev[j - k].
        # Only nxt's central bearings are matched: walking forward spreads the view outwards, least
        # at the centre, and every shift then compares the same number of bearings.
        mid, half = a.shape[-1] // 2, min(int(self.centre / self.step), a.shape[-1] // 2 - n)
        err = torch.stack(
            [
                (b[..., mid - half : mid + half] - a[..., mid - half - k : mid + half - k]).square().mean((1, 2))
                for k in shifts
            ],
            1,
        )  # (B, S)
        best = err.argmin(1)
        # Sub-step: the vertex of the parabola through the best shift and its neighbours.
        i = best.clamp(1, err.shape[1] - 2)
        e0, e1, e2 = (err.gather(1, (i + d)[:, None])[:, 0] for d in (-1, 0, 1))
        denom = e0 - 2 * e1 + e2
        frac = torch.where(denom > 0, 0.5 * (e0 - e2) / denom.clamp(min=1e-9), torch.zeros_like(denom)).clamp(-1, 1)
        return ((i - len(shifts) // 2).double() + frac.double()).numpy() * self.step

    def forward(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """(B,) map units walked forward (NaN without a geometry head)."""
        if self.head is None:
            return np.full(len(prev), np.nan)
        device = self.head.motion_scale.device
        with torch.no_grad():
            d0, d1 = (self.head.depth(self.head.prepare(torch.from_numpy(f).to(device))) * 255 for f in (prev, nxt))
        h, w = d0.shape[-2:]
        centre = (slice(None), slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))
        d0, d1 = d0[centre].flatten(1), d1[centre].flatten(1)
        change = torch.where((d0 < 250) & (d1 < 250), d0 - d1, torch.nan)  # saturated: nothing in range
        return (change.nanmedian(1).values * self.depth_units).double().cpu().numpy()

    def estimate(self, prev: np.ndarray, keys: np.ndarray, mouse: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        out = np.full((len(prev), 5), np.nan)
        for i in range(0, len(prev), self.batch):
            p, n = prev[i : i + self.batch], nxt[i : i + self.batch]
            out[i : i + self.batch, 0], out[i : i + self.batch, 3] = self.forward(p, n), self.yaw(p, n)
        return out

    def truth(self, pose: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return motion_between(pose, nxt)


# --- `worldgen eval --suite play` ------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """``worldgen eval --suite play`` (its options: ``worldgen.evaluation.cli``)."""
    from worldgen.checkpoint import CheckpointError
    from worldgen.engine import WorldModel
    from worldgen.evaluation.play import EnginePlayer, PlayConfig, evaluate_play, summary

    unused = [f"--{k.replace('_', '-')}" for k in ("context", "windows_from") if getattr(args, k) is not None]
    if unused:
        print(
            f"worldgen eval --suite play: {', '.join(unused)}: not used by the play suite (the context is the "
            f"model's streaming window)",
            file=sys.stderr,
        )
        return 2
    try:
        stream = dict(steps=args.steps, ctx_noise=args.ctx_noise, shift=args.shift, guidance=args.guidance)
        # The game's replays fork worker processes: make them before any GPU work starts here
        # (a forked CUDA context is undefined); the model on the CPU tells the context and size.
        recording = _recording_for(args, WorldModel.load(args.checkpoint, device="cpu", **stream))
        wm = WorldModel.load(args.checkpoint, device=args.device, **stream)
        head = None
        if args.geometry != "none":
            try:
                head = find_head(args.geometry, wm.checkpoint, wm.device)
            except CheckpointError as e:
                if args.geometry != "learned":
                    raise
                print(f"warning: no forward-motion scores (yaw is measured without it): {e}", file=sys.stderr)
        odometry = FrameOdometry(head)
        media = None if args.no_media else (args.out or args.json.with_name(f"{args.json.stem}_media"))
        cfg = PlayConfig(seed=args.seed, video_windows=min(args.video_windows, 2))
        result = evaluate_play(
            recording,
            EnginePlayer(wm, args.batch),
            odometry=odometry,
            cfg=cfg,
            media=media,
            checkpoint=str(wm.checkpoint),
            device=wm.device,
        )
    except (EvaluationError, DatasetError, CheckpointError, DoomError, ValueError) as e:
        print(f"worldgen eval --suite play: {e}", file=sys.stderr)
        return 2
    write_json(result, args.json)
    print(summary(result))
    print("wrote " + ", ".join([str(args.json)] + [f for f in result["files"].values() if f]))
    return 0


def _recording_for(args: argparse.Namespace, wm: Any) -> Path:
    """``--data`` itself if it is a branch recording, else one made from it at ``--branches``
    (default: ``<json stem>_branches`` next to the JSON; reused when its settings match)."""
    data = Path(args.data)
    if Dataset(data).index["source"].get("kind") == KIND:
        return data
    out = args.branches or args.json.with_name(f"{args.json.stem}_branches")
    context = wm.stream.sinks + wm.stream.window
    fraction = args.heldout_fraction
    if fraction is None:
        fraction = trainer_heldout_fraction(wm.checkpoint)
    script = PlayScript(
        horizon=PlayScript.horizon if args.horizon is None else args.horizon,
        yaw_step=args.yaw_step,
        walks=tuple(args.walks),
    )
    h, w, _ = wm.frame_shape
    wanted = {
        "of": str(Dataset(data).root),
        "context": context,
        "split": args.split,
        "seed": args.seed,
        "heldout_fraction": fraction if args.split == "heldout" else None,
        "script": dataclasses.asdict(script),
        "windows_asked": args.windows,
    }
    wanted = json.loads(json.dumps(wanted))  # tuples as the index gives them back: lists
    if (Path(out) / "index.json").is_file():
        old = Dataset(out)
        src = old.index["source"]
        if src.get("kind") != KIND:
            raise EvaluationError(
                f"--branches {out}: holds a dataset that is not a branch recording; choose another folder"
            )
        # A world-cache model starts from the context's depth: a recording made without it is made again.
        depth_ok = old.index["has_depth"] or wm.world is None
        if all(src.get(k) == v for k, v in wanted.items()) and old.resolution == (w, h) and depth_ok:
            print(f"reusing the branch recording {out} (same windows, context and script)")
            return Path(out)
    s = record_branches(
        data,
        out,
        windows=args.windows,
        context=context,
        script=script,
        split=args.split,
        heldout_fraction=fraction,
        seed=args.seed,
        workers=args.workers,
        size=(w, h),
        overwrite=True,
    )
    print(
        f"recorded {s['windows']} windows of branches into {s['out']}; replays matched the recording in "
        f"{s['replay_matched']:.0%}, a case played twice came out identical in {s['deterministic']:.0%}"
    )
    return Path(out)
