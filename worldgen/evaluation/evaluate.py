"""Evaluate a checkpoint (tokenizer + dynamics) on held-out play: one function, one JSON.

Every metric is computed on the same N windows of ``context + horizon`` consecutive frames,
picked deterministically (seeded, in episode-id order) from held-out episodes, or taken from an
earlier eval.json (``windows_from``) to pair two evaluations window by window. Generated frames
are decoded and rounded to uint8, exactly what a player would see, and compared with the
recorded uint8 frames (:mod:`worldgen.evaluation.metrics`; PSNR is capped at ``psnr_cap_db``). Only RGB is
scored; a tokenizer that also encodes depth gets it as input, and the depth it decodes is
reported beside (``depth``).

Rollouts play exactly as streaming sessions do (the sampler's cache backend,
:func:`worldgen.engine.stream.rollout_latents`; docs/sampling.md), window i with the seed
:func:`rollout_seed` ``(seed, i)``: a session started on that window's context with that seed
shows the frames scored. Teacher-forced predictions recompute over the real context.

A world-cache model (``worldgen train dynamics --world-cache H``; docs/world_cache.md) needs
windows with recorded depth and camera poses. Teacher-forced, every frame, context and target,
sees its view as training builds it: the cloud of its H predecessors in the episode (real
frames, recorded depth, true poses) rendered at its true pose, without pose noise. A rollout
plays as a session does, through the same :class:`~worldgen.engine.world_cache.CachePool`: the
cloud starts from the context's RGB-D at its true poses, each new frame's pose is *predicted*
by the model's motion model from the actions (as in a player's session; no true pose is given),
the cloud is rendered there, and every generated RGB-D frame corrects that pose
(``pose_correction``) and is fused into it.

What it costs: with N windows, horizon H and K sampler steps, N H teacher-forced predictions,
each K DiT passes over ``context + 1`` frames, and 2 N H rollout frames (real and shuffled
actions), each K + 1 passes of one frame over a cache of ``context``, batched ``batch`` at a time.

The JSON (``evaluate(...)`` returns it as a dict). Keys are stable; a new key may be added,
an existing one never changes meaning without bumping ``version``. Means are over windows
(and over frames where stated); a value is ``null`` when the data is too short to measure it.

* ``version``: 1.
* ``checkpoint``, ``data``: the folders evaluated.
* ``split``: ``"heldout"`` (the held-out side of ``Dataset.split()``) or ``"all"`` (every
  episode; for data recorded with seeds never used in training). ``heldout_fraction``: the
  share ``Dataset.split`` held out (the trainer's unless overridden; null for ``"all"``).
  ``episodes``: how many episodes the windows were drawn from.
* ``windows``: N, windows evaluated. ``window_starts``: ``[[episode id, first frame], ...]``.
* ``context``: real frames given as context. ``horizon``: frames predicted after the context:
  64, or where episodes are shorter the longest horizon at which two windows still fit.
* ``sampler``: ``{"steps", "shift", "ctx_noise", "guidance", "window", "seed"}`` as used by
  ``worldgen.sampling`` (``window`` = context + one block: frames one prediction attends to).
* ``tokenizer``: ``{"psnr", "ssim"}`` of encode-decode over every frame of the windows; the
  ceiling for everything below. ``frames``: how many frames.
* ``teacher_forced``: next-frame prediction with the real previous ``context`` frames as
  context, for every frame of the horizon. ``psnr``, ``ssim``: the model.
  ``baseline_psnr``, ``baseline_ssim``: the real previous frame taken as the prediction.
  ``gain_db`` = ``psnr - baseline_psnr``. ``frames``: predictions made.
* ``rollout``: autoregressive generation from the real context with the real actions.
  ``psnr@1``, ``psnr@16``, ``psnr@64``: PSNR of the frame h steps after the context.
  ``baseline_psnr@1``, ``@16``, ``@64``: the last context frame held still.
  ``curve``, ``baseline_curve``, ``shuffled_curve``: PSNR at h = 1 .. horizon (lists), the
  last one with shuffled actions (below).
* ``controllability``: ``psnr@16_real``, ``psnr@16_shuffled``: rollout PSNR at h = 16 with
  the real actions and with the actions of another window (a seeded permutation without fixed
  points; same context, same sampler noise); ``delta_db`` = real - shuffled. A model that
  ignores actions scores 0. Per window (in ``window_starts`` order; absent when the horizon is
  shorter than 16): ``windows_real``, ``windows_shuffled``, the two PSNRs at h = 16, and
  ``shuffled_from``, the window whose actions the shuffled rollout took.
* ``per_map``: where the model is weak, by the map of each window's episode (recordings that
  name their maps): ``{map: {"windows", "teacher_forced_psnr", "teacher_forced_baseline_psnr",
  "rollout_psnr@16", "rollout_baseline_psnr@16"}}`` (``@horizon`` when it is shorter than 16).
  E1M1 is GameNGen's map: its ``teacher_forced_psnr`` is the number to put beside its 29.4 dB.
* ``depth``: null unless the tokenizer decodes depth (RGB-D models, every world-cache model):
  the mean absolute error, in uint8 depth levels, of the depth the model made against the
  recorded depth: ``teacher_forced_mae``; ``rollout_mae@1``, ``@16``, ``@64`` (real actions;
  null past the horizon) and ``rollout_curve`` at h = 1 .. horizon.
* ``world_cache``: null unless the model plays with a world cache: ``history`` (H),
  ``max_points`` (a session's cloud cap), ``rollout_pose``: ``"corrected"`` (each predicted pose
  corrected from the frame made there, as a player's session does) or ``"predicted"``
  (``pose_correction`` off), and ``pose``: the real-action rollouts' cameras against the
  recorded poses (:func:`~worldgen.memory.motion.pose_error`).
* ``psnr_cap_db``: PSNR of identical frames (metrics.PSNR_CAP_DB).
* ``device``, ``seconds``: where it ran and the wall time.
* ``files``: ``{"plot", "video"}`` paths written, or null.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldgen import actions, checkpoint, sampling
from worldgen.data import Dataset, DatasetError, WindowDataset
from worldgen.data.dataset import DOOM_TICS_PER_SECOND, depth_to_uint8
from worldgen.engine.stream import StreamConfig, rollout_latents
from worldgen.engine.world_cache import CachePool, PlayCache
from worldgen.evaluation.metrics import PSNR_CAP_DB, by_map, psnr, ssim
from worldgen.files import atomic_write, write_mp4
from worldgen.memory.motion import pose_error
from worldgen.models import (
    DiT,
    DiTConfig,
    Tokenizer,
    autocast,
    frames_to_tensor,
    load_dit,
    load_tokenizer,
    tensor_to_frames,
)
from worldgen.models.world_cache import window_condition

VERSION = 1
HORIZONS = (1, 16, 64)  # rollout horizons reported by name (issue 3)
CONTROL_HORIZON = 16  # horizon of the action-controllability test


class EvaluationError(RuntimeError):
    """Evaluation cannot run as asked; the message names the data, checkpoint or option."""


@dataclass
class EvalConfig:
    # Real context frames; None = the trained window minus one block, so every prediction sees
    # exactly as many frames as a training window holds (positions beyond it were never trained).
    context: int | None = None
    horizon: int = 64  # longest rollout reported; shorter if episodes are shorter
    windows: int = 64  # held-out windows; ~64 puts a PSNR mean's standard error near 0.3 dB
    steps: int | None = None  # sampler steps; None = the checkpoint's, else sampling.STEPS
    ctx_noise: float | None = None  # context noise level; None = the checkpoint's, else 0
    shift: float | None = None  # schedule shift; None = the checkpoint's, else sampling.SHIFT
    guidance: float | None = None  # action guidance; None = the checkpoint's, else sampling.GUIDANCE
    batch: int = 32  # windows (or next-frame predictions) per forward; more if memory allows
    split: str = "heldout"  # "heldout": Dataset.split()'s held-out side; "all": every episode
    # Held-out share for split="heldout"; None = the trainer's (stored in the checkpoint), else 0.1,
    # so the held-out episodes are exactly those the dynamics model never trained on.
    heldout_fraction: float | None = None
    seed: int = 0  # picks windows, shuffles actions, seeds sampler noise
    video_windows: int = 4  # windows shown in the side-by-side video
    # An eval.json whose windows (and shuffled actions) to score instead of drawing new ones, so
    # two evaluations pair up window by window; its context and horizon come with them.
    windows_from: str | Path | None = None
    # A world-cache model's rollouts correct each predicted camera pose from the frame made there
    # (WorldModel.load's pose_correction), as sessions play by default.
    pose_correction: bool = True
    progress: bool = True  # a progress bar with an ETA over the frames predicted (stderr)


def evaluate(
    checkpoint_dir: str | Path,
    data: str | Path | Dataset,
    cfg: EvalConfig | None = None,
    device: str | torch.device | None = None,
    media: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every metric of the module docstring; write the plot and video under ``media``
    (``psnr_vs_horizon.png``, ``real_vs_generated.mp4``; the video only where ffmpeg is).

    Example:
        >>> r = evaluate("default", "data/doom-heldout", EvalConfig(split="all"))  # doctest: +SKIP
        >>> r["teacher_forced"]["gain_db"], r["controllability"]["delta_db"]        # doctest: +SKIP
        (3.1, 2.4)
    """
    t0 = time.perf_counter()
    cfg = cfg or EvalConfig()
    video = media is not None and cfg.video_windows > 0 and has_ffmpeg()
    if media is not None and cfg.video_windows > 0 and not video:  # say so now, not after the work
        log("warning: imageio-ffmpeg is not installed here; writing the plot but no video")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = checkpoint.resolve(checkpoint_dir)
    tokenizer = load_tokenizer(folder, device=device).eval()
    dit = load_dit(folder, device=device).eval()
    stored = _stored_windows(cfg.windows_from) if cfg.windows_from is not None else None
    if stored is not None and cfg.context is None:
        cfg = dataclasses.replace(cfg, context=stored["context"])
    c, sampler = _sampler_settings(folder, cfg, dit.cfg)
    if stored is not None and c != stored["context"]:
        raise EvaluationError(
            f"--windows-from {cfg.windows_from}: its windows have {stored['context']} context frames, not {c}"
        )

    ds = data if isinstance(data, Dataset) else Dataset(data)
    train = checkpoint.config(folder, "dynamics").get("train", {})
    if cfg.split == "all" and train.get("data") and Path(train["data"]).resolve() == ds.root.resolve():
        log(f"warning: {folder} was trained on {ds.root}; --split all scores frames it trained on")
    fraction = trainer_heldout_fraction(folder) if cfg.heldout_fraction is None else cfg.heldout_fraction
    depth = tokenizer.cfg.in_channels == 4  # a tokenizer trained on RGB + depth (train --depth)
    world = _play_cache(folder, dit.cfg, cfg.pose_correction)  # a world-cache model's cloud and motion model, else None
    items, horizon, n_episodes = _load_windows(ds, cfg, c, fraction, depth, stored, world is not None)
    frames, acts, starts = _window_arrays(ds, items, depth)
    fraction = fraction if cfg.split == "heldout" else None
    expected = tuple(tokenizer.cfg.image_size)
    if tuple(frames.shape[2:4]) != expected:
        raise EvaluationError(
            f"{ds.root}: frames are {tuple(frames.shape[2:4])} (H, W) but the "
            f"tokenizer of {folder} was trained on {expected}"
        )
    n = len(frames)
    log(
        f"evaluating {folder} on {n} windows of {c} + {horizon} frames from {n_episodes} "
        f"{cfg.split} episodes of {ds.root} ({device})"
    )

    inputs = frames.to(device)  # (N, L, H, W, 3 or 4) uint8
    frames_d = inputs[..., :3]  # (N, L, H, W, 3): what is scored
    acts_d = acts.to(device)  # (N, L, 10)
    run = _Runner(tokenizer, dit, sampler, c, cfg.seed, cfg.batch, device, world)
    # Every frame the DiT makes: teacher-forced, then rollouts with real and shuffled actions.
    run.bar = tqdm(total=3 * n * horizon, unit="frame", desc="eval", disable=not cfg.progress)

    with torch.no_grad(), run.bar:
        latents, recon = run.encode(inputs)  # (N, L, C, h, w), RGB uint8
        tok_psnr, tok_ssim = psnr(recon, frames_d), ssim(recon, frames_d)

        # Teacher forcing: target frame t of every window from the real frames t-c .. t-1, each
        # frame of a world-cache model with its view as training builds it.
        pairs = [(i, t) for i in range(n) for t in range(c, c + horizon)]
        views = None if world is None else run.teacher_views(ds, items)  # (N, L, C', h, w)
        tf_made = run.next_frames(latents, acts_d, pairs, c, views)  # (P, H, W, 3 or 4)
        tf_pred = tf_made[..., :3]
        idx_n = torch.tensor([p[0] for p in pairs], device=device)
        idx_t = torch.tensor([p[1] for p in pairs], device=device)
        target, previous = frames_d[idx_n, idx_t], frames_d[idx_n, idx_t - 1]
        tf = {
            "psnr": psnr(tf_pred, target),
            "ssim": ssim(tf_pred, target),
            "baseline_psnr": psnr(previous, target),
            "baseline_ssim": ssim(previous, target),
        }

        # Rollouts from the real context: real actions, another window's actions, a still frame.
        # A world-cache model's sessions start from the context's RGB-D at its true poses.
        future = frames_d[:, c : c + horizon]  # (N, horizon, H, W, 3)
        window_poses = None if world is None else _window_poses(items).to(device)  # (N, L, 5)
        geometry = None if world is None else (inputs[:, :c], window_poses[:, :c])
        cameras: list[torch.Tensor] = []  # the cameras the sessions' cloud put the real-action frames at
        real_made = run.rollout(latents[:, :c], acts_d[:, :c], acts_d[:, c : c + horizon], geometry, cameras)
        real = real_made[..., :3]
        perm = (
            _derangement(n, cfg.seed)
            if stored is None or stored["shuffled_from"] is None
            else torch.tensor(stored["shuffled_from"])
        ).to(device)
        shuffled = run.rollout(latents[:, :c], acts_d[:, :c], acts_d[perm, c : c + horizon], geometry)[..., :3]
        still = frames_d[:, c - 1 : c].expand_as(future)
        per_window = {"curve": psnr(real, future), "shuffled_curve": psnr(shuffled, future)}  # each (N, horizon)
        curves = {
            **{k: v.mean(0) for k, v in per_window.items()},
            "baseline_curve": psnr(still, future).mean(0),
        }  # each (horizon,)

    result = _report(
        folder,
        ds,
        cfg,
        c,
        fraction,
        {**sampler.settings(), "window": c + dit.cfg.frames_per_block, "seed": cfg.seed},
        device,
        starts,
        n_episodes,
        horizon,
        tok_psnr,
        tok_ssim,
        tf,
        {k: v.tolist() for k, v in curves.items()},
    )
    if depth:  # the depth a model makes against the recorded depth levels
        rollout_depth = _depth_error(real_made, inputs[:, c : c + horizon]).mean(0)  # (horizon,)
        result["depth"] = {
            "teacher_forced_mae": _mean(_depth_error(tf_made, inputs[idx_n, idx_t])),
            **{f"rollout_mae@{h}": round(float(rollout_depth[h - 1]), 4) if h <= horizon else None for h in HORIZONS},
            "rollout_curve": [round(v, 4) for v in rollout_depth.tolist()],
        }
    if world is not None:
        made_pose = torch.cat(cameras)  # (N, horizon, 5)
        result["world_cache"] = {
            "history": world.history,
            "max_points": world.cache.max_points,
            "rollout_pose": "corrected" if world.align is not None else "predicted",
            # against the recorded poses: the game replaying the same actions
            "pose": pose_error(made_pose, window_poses[:, c : c + horizon], window_poses[:, c - 1]),
        }

    # Where the model is weak: the headline numbers per map of the windows' episodes.
    def window_mean(v: torch.Tensor) -> torch.Tensor:  # teacher-forced frames (P,) -> their windows' means (N,)
        return torch.zeros(n, device=device).index_add_(0, idx_n, v) / torch.bincount(idx_n, minlength=n)

    h = min(CONTROL_HORIZON, horizon)
    result["per_map"] = by_map(
        [ds.episodes[it["episode"]].map for it in items],
        {
            "teacher_forced_psnr": window_mean(tf["psnr"]),
            "teacher_forced_baseline_psnr": window_mean(tf["baseline_psnr"]),
            f"rollout_psnr@{h}": per_window["curve"][:, h - 1],
            f"rollout_baseline_psnr@{h}": psnr(still[:, h - 1], future[:, h - 1]),
        },
    )
    if horizon >= CONTROL_HORIZON:  # which windows the actions matter in (benchmarks/control_by_turn.py)
        result["controllability"].update(
            {
                f"windows_{name}": [round(v, 4) for v in per_window[key][:, CONTROL_HORIZON - 1].tolist()]
                for name, key in (("real", "curve"), ("shuffled", "shuffled_curve"))
            },
            shuffled_from=perm.tolist(),
        )

    if media is not None:
        media, v = Path(media), cfg.video_windows
        write_plot(result, media / "psnr_vs_horizon.png")
        result["files"]["plot"] = str(media / "psnr_vs_horizon.png")
        if video:
            write_video(
                frames[:v, c : c + horizon, ..., :3],
                real[:v].cpu(),
                frames[:v, c - 1, ..., :3],
                media / "real_vs_generated.mp4",
                fps=clip_fps(ds),
            )
            result["files"]["video"] = str(media / "real_vs_generated.mp4")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# --- pieces ------------------------------------------------------------------------------------


def rollout_seed(seed: int, window: int) -> int:
    """The sampler seed of eval window ``window`` (its index in ``window_starts``): a session
    started on that window's context with this seed plays exactly the frames eval scores, and
    the numbers do not depend on how windows are batched.

    Example:
        >>> rollout_seed(0, 3), rollout_seed(1, 0)
        (3, 100003)
    """
    return seed * 100_003 + window


def _sampler_settings(folder: Path, cfg: EvalConfig, dit_cfg: DiTConfig) -> tuple[int, sampling.SamplerConfig]:
    """Context length and sampler settings: the command line's, else what the trainer stored
    (``"sampler"`` in the dynamics config), else the sampler's defaults.

    Rollouts play as sessions do, on a cache of ``context`` frames: every generated frame sees
    exactly ``context`` earlier frames, as each teacher-forced prediction does.
    """
    stored = checkpoint.config(folder, "dynamics").get("sampler", {})
    pick = lambda given, key, default: given if given is not None else stored.get(key, default)
    sampler = sampling.SamplerConfig(
        steps=int(pick(cfg.steps, "steps", sampling.STEPS)),
        shift=float(pick(cfg.shift, "shift", sampling.SHIFT)),
        ctx_noise=float(pick(cfg.ctx_noise, "ctx_noise", 0.0)),
        guidance=float(pick(cfg.guidance, "guidance", sampling.GUIDANCE)),
    )
    block = dit_cfg.frames_per_block
    context = cfg.context if cfg.context is not None else stored.get("window", dit_cfg.max_frames) - block
    if sampler.steps < 1:
        raise EvaluationError(f"--steps must be >= 1, got {sampler.steps}")
    if not 0.0 <= sampler.ctx_noise < 1.0:
        raise EvaluationError(f"--ctx-noise must lie in [0, 1), got {sampler.ctx_noise}")
    if not sampler.shift > 0:
        raise EvaluationError(f"--shift must be > 0, got {sampler.shift}")
    if sampler.guidance != 1 and (not sampler.guidance > 0 or not dit_cfg.null_action):
        raise EvaluationError(
            f"--guidance {sampler.guidance}: needs > 0 and a model trained with action dropout "
            f"(null_action={dit_cfg.null_action}); 1 = no guidance"
        )
    if not 1 <= context <= dit_cfg.max_frames - block:
        raise EvaluationError(
            f"--context must lie in [1, {dit_cfg.max_frames - block}]: the model of {folder} "
            f"takes at most max_frames={dit_cfg.max_frames} frames, context plus a block "
            f"of {block}; got {context}"
        )
    if context % block:
        raise EvaluationError(
            f"--context must be a multiple of the model's {block}-frame blocks (a session's cache "
            f"holds whole blocks), got {context}"
        )
    return context, sampler


def trainer_heldout_fraction(folder: str | Path) -> float:
    """The share of episodes ``Dataset.split()`` held out when the checkpoint's DiT was trained
    (0.1 where its config does not say): what ``split="heldout"`` scores."""
    return checkpoint.config(folder, "dynamics").get("train", {}).get("config", {}).get("heldout_fraction", 0.1)


def _play_cache(folder: Path, dit_cfg: DiTConfig, pose_correction: bool = True) -> PlayCache | None:
    """A world-cache model's play settings (the dynamics config's ``world_cache`` entry, read as
    ``WorldModel.load`` reads it, at the sessions' default point cap); None for other models."""
    if not dit_cfg.cond_channels:
        return None
    entry = checkpoint.config(folder, "dynamics").get("world_cache")
    if entry is None:
        raise EvaluationError(
            f"{folder}: its DiT takes {dit_cfg.cond_channels} conditioning channels but its dynamics config has "
            f"no 'world_cache' entry (how its sessions build and render their cache)"
        )
    if dit_cfg.frames_per_block != 1:
        raise EvaluationError(f"{folder}: a world-cache model plays one frame per step, this one makes blocks")
    return PlayCache.from_dict(entry, pose_correction=pose_correction)


def by_id(ds: Dataset, episodes: Iterable[int]) -> list[int]:
    """Episode indices in episode-id order. A parallel recorder indexes episodes as its workers
    finish them, so the same play recorded twice can list them in another order; what is drawn
    or played from a recording must not follow that."""
    return sorted(episodes, key=lambda e: ds.episodes[e].id)


def select_windows(
    ds: Dataset, episodes: list[int], length: int, n: int, seed: int, fields: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """``n`` windows of ``length`` frames from ``episodes``, the same ones for the same seed.

    Non-overlapping tiles first, so no frame counts twice; only when the episodes hold fewer
    than ``n`` tiles do windows start at any frame (and may overlap). Items are
    :class:`WindowDataset` items (actions aligned to the frames they produced), in episode id
    order (:func:`by_id`).
    """
    episodes = by_id(ds, episodes)
    pool = WindowDataset(ds, length, episodes, stride=length, fields=fields)
    if len(pool) < n:
        pool = WindowDataset(ds, length, episodes, stride=1, fields=fields)
    picks = np.random.default_rng(seed).choice(len(pool), min(n, len(pool)), replace=False)
    return [pool[int(i)] for i in np.sort(picks)]


def windows_at(
    ds: Dataset, starts: list[tuple[str, int]], length: int, fields: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The windows of ``length`` frames at ``[(episode id, first frame), ...]`` (an eval.json's
    ``window_starts``), as :class:`WindowDataset` items, in that order; a window this recording
    does not hold is an :class:`EvaluationError` naming it."""
    try:
        index = [ds.episode_index(e) for e, _ in starts]
    except DatasetError as err:
        raise EvaluationError(f"a window's episode is not in this recording: {err}") from None
    if outside := [(e, s) for (e, s), i in zip(starts, index) if not 0 <= s <= ds.episodes[i].length - length]:
        raise EvaluationError(
            f"{ds.root}: window {list(outside[0])} does not fit its episode ({length} frames from that start)"
        )
    ds.validate(sorted(set(index)))
    return [WindowDataset(ds, length, [i], fields=fields, verify=False)[s] for (_, s), i in zip(starts, index)]


def _stored_windows(path: str | Path) -> dict[str, Any]:
    """``context``, ``horizon``, ``window_starts`` and ``shuffled_from`` of an eval.json, checked."""
    try:
        r = json.loads(Path(path).read_text())
        starts = [(str(e), int(s)) for e, s in r["window_starts"]]
        context, horizon = int(r["context"]), int(r["horizon"])
        perm = (r.get("controllability") or {}).get("shuffled_from")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluationError(
            f"--windows-from {path}: not an eval.json with window_starts, context and horizon ({type(e).__name__}: {e})"
        ) from None
    if len(starts) < 2 or context < 1 or horizon < 1:
        raise EvaluationError(f"--windows-from {path}: needs 2 or more windows and context, horizon >= 1")
    if perm is not None and sorted(perm) != list(range(len(starts))):
        raise EvaluationError(f"--windows-from {path}: shuffled_from is not a permutation of its windows")
    return {"path": path, "context": context, "horizon": horizon, "starts": starts, "shuffled_from": perm}


def _load_windows(
    ds: Dataset,
    cfg: EvalConfig,
    context: int,
    heldout_fraction: float,
    depth: bool,
    stored: dict[str, Any] | None = None,
    geometry: bool = False,
) -> tuple[list[dict[str, Any]], int, int]:
    """The evaluation windows as :class:`WindowDataset` items (with depth for an RGB-D tokenizer,
    and poses with ``geometry``, for a world-cache model), the effective horizon and the number
    of episodes drawn from: ``stored``'s windows (:func:`_stored_windows`), else drawn."""
    if cfg.batch < 1:
        raise EvaluationError(f"need --batch >= 1, got {cfg.batch}")
    if geometry and (missing := [f for f in ("depth", "pose") if f not in ds.fields]):
        raise EvaluationError(
            f"{ds.root}: the model plays with a world cache, built from each frame's depth at its camera "
            f"pose, but this dataset has no {' and no '.join(missing)}; evaluate it on a recording with "
            f"depth and poses (`worldgen record --env doom`)"
        )
    if depth and "depth" not in ds.fields:
        raise EvaluationError(f"{ds.root}: the tokenizer encodes RGB + depth, but this dataset has no depth")
    fields = ("depth", "pose") if geometry else ("depth",) if depth else ()
    if stored is not None:
        try:
            items = windows_at(ds, stored["starts"], context + stored["horizon"], fields)
        except EvaluationError as e:
            raise EvaluationError(f"--windows-from {stored['path']}: {e}") from None
        return items, stored["horizon"], len({e for e, _ in stored["starts"]})
    if cfg.split not in ("heldout", "all"):
        raise EvaluationError(f"--split must be 'heldout' or 'all', got {cfg.split!r}")
    if cfg.horizon < 1 or cfg.windows < 2:
        raise EvaluationError(
            f"need --horizon >= 1 and --windows >= 2 (shuffled actions come from another "
            f"window), got {cfg.horizon}, {cfg.windows}"
        )
    episodes = ds.split(heldout_fraction)[1] if cfg.split == "heldout" else list(range(len(ds)))
    if not episodes:
        raise EvaluationError(
            f"{ds.root}: no held-out episodes among its {len(ds)} (Dataset.split() "
            f"holds out {heldout_fraction:.0%} by episode id); record a separate "
            f"held-out dataset with new seeds and pass --split all"
        )
    lengths = np.array([ds.episodes[e].length for e in episodes])
    # The longest horizon at which two windows still fit (shuffling needs two), at most cfg.horizon.
    fits = lambda h: np.maximum(lengths - (context + h) + 1, 0).sum() >= 2
    horizon = next((h for h in range(cfg.horizon, 0, -1) if fits(h)), 0)
    if horizon < 1:
        raise EvaluationError(
            f"{ds.root}: the {cfg.split} episodes (longest {lengths.max()} frames) hold "
            f"fewer than 2 windows of {context} context frames plus one to predict "
            f"(lower --context)"
        )
    items = select_windows(ds, episodes, context + horizon, cfg.windows, cfg.seed, fields)
    return items, horizon, len(episodes)


def _window_arrays(ds: Dataset, items: list[dict[str, Any]], depth: bool) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Frames (N, L, H, W, 3 or 4) and actions (N, L, 10) of window items, and their starts."""
    frames = np.stack([it["frames"] for it in items])  # (N, L, H, W, 3)
    if depth:  # as the trainer feeds it
        frames = np.concatenate([frames, depth_to_uint8(np.stack([it["depth"] for it in items]))[..., None]], -1)
    frames = torch.from_numpy(frames)
    acts = torch.from_numpy(np.stack([actions.to_vector(it["keys"], it["mouse"]) for it in items]))
    starts = [[ds.episodes[it["episode"]].id, int(it["start"])] for it in items]
    return frames, acts, starts


def _window_poses(items: list[dict[str, Any]]) -> torch.Tensor:
    """The camera poses (N, L, 5) of window items read with poses."""
    return torch.from_numpy(np.stack([it["pose"] for it in items]))


def _depth_error(made: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in depth levels per frame of made against recorded RGB-D frames
    ``(..., H, W, 4)`` uint8: ``(...)``."""
    return (made[..., 3].float() - recorded[..., 3].float()).abs().mean((-2, -1))


def _derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation with no fixed point: each window gets another window's actions."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)  # cycle through a random order: i -> next in the cycle
    return perm


class _Runner:
    """Batched tokenizer and sampler calls, each window's noise seeded by :func:`rollout_seed`.

    The DiT runs under bf16 autocast on CUDA (where its FLOPs are), as sessions run it. The
    tokenizer runs in float32: bf16 outputs are rounded to ~half a uint8 level near +-1, an
    error that would be charged to the model but is the number format's.

    ``world``: a world-cache model's play settings. Its rollouts then keep a
    :class:`~worldgen.engine.world_cache.CachePool` of their own (a slot per window of a batch)
    and render, predict and fuse through it exactly as a session's steps do.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        dit: DiT,
        sampler: sampling.SamplerConfig,
        context: int,
        seed: int,
        batch: int,
        device: torch.device,
        world: PlayCache | None = None,
    ):
        self.tokenizer, self.dit, self.sampler, self.batch, self.device = tokenizer, dit, sampler, batch, device
        # A session's cache: the context, rolling as frames are made (no sinks: the default's).
        self.stream = StreamConfig(**sampler.settings(), sinks=0, window=context)
        self.seed = seed
        self.bar: tqdm | None = None  # advanced by the frames each call makes
        self.world = None if world is None else CachePool(world, actions.ACTION_DIM, device, slots=batch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    def _generators(self, windows: Iterable[int]) -> list[torch.Generator]:
        # One stream per window: the real- and shuffled-action rollouts see the same noise, and a
        # window's frames do not depend on the others in its batch.
        return [torch.Generator(self.device).manual_seed(rollout_seed(self.seed, int(i))) for i in windows]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(..., C, h, w)`` latents -> ``(..., H, W, 3 or 4)`` uint8 frames: RGB, then the depth
        levels of an RGB-D tokenizer."""
        # tensor_to_frames returns host memory; the metrics run back on the device.
        frames = torch.cat(
            [
                torch.from_numpy(tensor_to_frames(self.tokenizer.decode(c))).to(self.device)
                for c in z.reshape(-1, *z.shape[-3:]).split(self.batch * 4)
            ]
        )
        return frames.reshape(*z.shape[:-3], *frames.shape[1:])

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., H, W, 3 or 4)`` uint8 -> latents ``(..., C, h, w)`` and their decoded RGB frames."""
        z = torch.cat(
            [
                self.tokenizer.encode(frames_to_tensor(c)).float()
                for c in frames.reshape(-1, *frames.shape[-3:]).split(self.batch * 4)
            ]
        )
        z = z.reshape(*frames.shape[:-3], *z.shape[1:])
        return z, self.decode(z)[..., :3]

    def teacher_views(self, ds: Dataset, items: list[dict[str, Any]]) -> torch.Tensor:
        """Every frame's world-cache view as training builds it (``encode_episodes``): the cloud
        of its ``history`` predecessors in its episode (real frames, recorded depth, true poses),
        rendered at its true pose, without pose noise; a window's first frames take their
        predecessors from before it. Window items -> ``(N, L, C + 1, h, w)``."""
        history, out = self.world.settings.history, []
        for it in items:
            start, stop = int(it["start"]), int(it["start"]) + len(it["frames"])
            lo = max(0, start - history)
            rgb, depth, pose = (
                torch.from_numpy(x).to(self.device)[None]
                for x in (
                    ds.read(it["episode"], "frames", lo, stop),
                    depth_to_uint8(ds.read(it["episode"], "depth", lo, stop)),
                    ds.read(it["episode"], "pose", lo, stop),
                )
            )
            with self._autocast():
                view = window_condition(
                    self.tokenizer, self.world.settings.camera, rgb, depth.float(), pose, history, start - lo
                )
            out.append(view.float())
        return torch.cat(out)

    def next_frames(
        self,
        latents: torch.Tensor,
        acts: torch.Tensor,
        pairs: list[tuple[int, int]],
        context: int,
        views: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced prediction of frame t of window i for each ``(i, t)``: (P, H, W, 3 or 4),
        by recompute over the real context, with window i's noise (:func:`rollout_seed`);
        ``views`` (N, L, C', h, w): every frame's world-cache view (:meth:`teacher_views`)."""
        out = []
        for k in range(0, len(pairs), self.batch):
            i = torch.tensor([p[0] for p in pairs[k : k + self.batch]], device=self.device)
            t = torch.tensor([p[1] for p in pairs[k : k + self.batch]], device=self.device)
            span = t[:, None] + torch.arange(-context, 0, device=self.device)  # (b, context)
            cond = None if views is None else views[i[:, None], torch.cat([span, t[:, None]], 1)]  # context, target
            with self._autocast():
                z = sampling.predict_next(
                    self.dit,
                    latents[i[:, None], span],
                    acts[i[:, None], span],
                    acts[i, t],
                    self.sampler,
                    self._generators(i.tolist()),
                    cond,
                )
            out.append(self.decode(z.float()))
            self._advance(len(i))
        return torch.cat(out)

    def _advance(self, frames: int) -> None:
        if self.bar is not None:
            self.bar.update(frames)

    def rollout(
        self,
        ctx: torch.Tensor,
        ctx_acts: torch.Tensor,
        future_acts: torch.Tensor,
        geometry: tuple[torch.Tensor, torch.Tensor] | None = None,
        cameras: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Frames after the context played as sessions play them (the sampler's cache backend),
        window i seeded with :func:`rollout_seed`: ``(N, horizon, H, W, 3 or 4)`` uint8.
        ``geometry``: a world-cache model's context, RGB-D frames (N, c, H, W, 4) uint8 and their
        camera poses (N, c, 5): the sessions' clouds start from them and grow with every frame
        played, each frame's view rendered at the pose the motion model predicts; ``cameras`` then
        gets each batch's frame poses (b, horizon, 5), as the sessions' clouds hold them."""
        block, horizon = self.dit.cfg.frames_per_block, future_acts.shape[1]
        pad = -horizon % block  # a session plays whole blocks: the last one's extra frames are dropped
        future_acts = torch.cat([future_acts, future_acts[:, -1:].expand(-1, pad, -1)], 1)
        out = []
        for k in range(0, len(ctx), self.batch):
            sl = slice(k, k + self.batch)
            slots: list[int] = []
            try:
                with self._autocast():
                    world = {}
                    if geometry is not None:  # as Session.reset starts each one, then as step_many plays them
                        slots = [self.world.acquire() for _ in range(len(ctx[sl]))]
                        rgbd, pose = (g[sl] for g in geometry)
                        ctx_cond = torch.stack(
                            [
                                self.world.start(s, self.tokenizer, x[..., :3].contiguous(), x[..., 3].float(), p, a)
                                for s, x, p, a in zip(slots, rgbd, pose, ctx_acts[sl])
                            ]
                        )
                        slot_t = torch.tensor(slots, device=self.device)
                        poses: list[torch.Tensor] = []
                        views = self.world.rollout_views(slot_t, self.tokenizer, future_acts[sl], poses)
                        world = {"ctx_cond": ctx_cond, "views": views}
                    z = rollout_latents(
                        self.dit,
                        self.stream,
                        ctx[sl],
                        ctx_acts[sl],
                        future_acts[sl],
                        self._generators(range(k, k + len(ctx[sl]))),
                        **world,
                    )[:, :horizon]
                if geometry is not None and cameras is not None:
                    cameras.append(torch.stack(poses, 1)[:, :horizon])
            finally:
                for s in slots:
                    self.world.release(s)
            out.append(self.decode(z.float()))
            self._advance(z.shape[0] * z.shape[1])
        return torch.cat(out)


def _mean(x: torch.Tensor) -> float:
    return round(float(x.float().mean()), 4)


def _report(
    folder: Path,
    ds: Dataset,
    cfg: EvalConfig,
    context: int,
    fraction: float | None,
    sampler: dict[str, Any],
    device: torch.device,
    starts: list[list],
    n_episodes: int,
    horizon: int,
    tok_psnr: torch.Tensor,
    tok_ssim: torch.Tensor,
    tf: dict[str, torch.Tensor],
    curves: dict[str, list[float]],
) -> dict[str, Any]:
    def at(curve: list[float], h: int) -> float | None:
        return round(curve[h - 1], 4) if h <= len(curve) else None

    rollout: dict[str, Any] = {f"psnr@{h}": at(curves["curve"], h) for h in HORIZONS}
    rollout.update({f"baseline_psnr@{h}": at(curves["baseline_curve"], h) for h in HORIZONS})
    rollout.update({k: [round(v, 4) for v in curve] for k, curve in curves.items()})
    real, shuf = at(curves["curve"], CONTROL_HORIZON), at(curves["shuffled_curve"], CONTROL_HORIZON)
    teacher = {k: _mean(v) for k, v in tf.items()}
    teacher["gain_db"] = round(teacher["psnr"] - teacher["baseline_psnr"], 4)
    teacher["frames"] = int(tf["psnr"].numel())
    return {
        "version": VERSION,
        "checkpoint": str(folder),
        "data": str(ds.root),
        "split": cfg.split,
        "heldout_fraction": fraction,
        "episodes": n_episodes,
        "windows": len(starts),
        "window_starts": starts,
        "context": context,
        "horizon": horizon,
        "sampler": sampler,
        "tokenizer": {"psnr": _mean(tok_psnr), "ssim": _mean(tok_ssim), "frames": int(tok_psnr.numel())},
        "teacher_forced": teacher,
        "rollout": rollout,
        "controllability": {
            f"psnr@{CONTROL_HORIZON}_real": real,
            f"psnr@{CONTROL_HORIZON}_shuffled": shuf,
            "delta_db": None if real is None else round(real - shuf, 4),
        },
        "per_map": None,
        "depth": None,
        "world_cache": None,
        "psnr_cap_db": round(PSNR_CAP_DB, 4),
        "device": str(device),
        "seconds": None,
        "files": {"plot": None, "video": None},
    }


# --- outputs -----------------------------------------------------------------------------------


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write the result atomically: a reader never sees half a JSON."""
    text = json.dumps(result, indent=1)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def clip_fps(ds: Dataset) -> float:
    """Real-time playback: the source's fps if recorded, else Doom's tic rate over the frame skip."""
    return ds.index["source"].get("fps") or DOOM_TICS_PER_SECOND / max(ds.frame_skip, 1)


def write_plot(result: dict[str, Any], path: Path) -> None:
    """PSNR versus horizon: model with real and shuffled actions, the held frame, the tokenizer's
    ceiling. Needs only the result, so ``write_plot(json.load(open("eval.json")), path)`` works too."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    ro, h = result["rollout"], np.arange(1, result["horizon"] + 1)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(h, ro["curve"], label="model, real actions")
    ax.plot(h, ro["shuffled_curve"], ls=":", label="model, shuffled actions")  # dotted: often on top of real
    ax.plot(h, ro["baseline_curve"], label="last context frame held")
    ax.axhline(result["tokenizer"]["psnr"], ls="--", c="gray", label="tokenizer reconstruction")
    ax.set(
        xlabel="frames after the context",
        ylabel="PSNR (dB)",
        xlim=(1, max(h[-1], 2)),
        title=f"rollout, {result['windows']} windows, context {result['context']}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, bbox_inches="tight"))
    plt.close(fig)


def has_ffmpeg() -> bool:
    """Whether imageio can write mp4 here (imageio-ffmpeg bundles a binary; some images lack it)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def write_video(real: torch.Tensor, generated: torch.Tensor, last: torch.Tensor, path: Path, fps: float) -> None:
    """Side-by-side H.264 video: real | generated | last context frame held.

    ``real``, ``generated``: ``(V, horizon, H, W, 3)`` uint8, the first V windows after their
    context; ``last``: ``(V, H, W, 3)`` their last context frames. The windows play one after
    another, the panels separated by white bars.
    """
    still = last[:, None].expand_as(real)  # what the repeat baseline shows: nothing moves
    gap = torch.full((*real.shape[:3], 2, 3), 255, dtype=torch.uint8)
    panels = torch.cat([real, gap, generated, gap, still], dim=3).flatten(0, 1).numpy()  # (V T, H, 3W + 4, 3)
    write_mp4(path, panels, fps)


def summary(result: dict[str, Any]) -> str:
    """A short table of the headline numbers, for the terminal."""
    tf, ro, ctl = result["teacher_forced"], result["rollout"], result["controllability"]

    def f(v: float | None, fmt: str = "6.2f") -> str:
        return "     -" if v is None else format(v, fmt)

    rows = [
        ("tokenizer recon", f(result["tokenizer"]["psnr"]), f(result["tokenizer"]["ssim"], "6.3f"), ""),
        (
            "teacher-forced next",
            f(tf["psnr"]),
            f(tf["ssim"], "6.3f"),
            f"{f(tf['baseline_psnr'])}  (gain {tf['gain_db']:+.2f} dB)",
        ),
    ]
    rows += [(f"rollout @{h}", f(ro[f"psnr@{h}"]), "", f(ro[f"baseline_psnr@{h}"])) for h in HORIZONS]
    rows.append(
        (
            f"shuffled actions @{CONTROL_HORIZON}",
            f(ctl[f"psnr@{CONTROL_HORIZON}_shuffled"]),
            "",
            f"controllability {f(ctl['delta_db'], '+.2f')} dB",
        )
    )
    lines = [f"{'metric':<24}{'PSNR':>8}{'SSIM':>8}  baseline (last frame) PSNR"]
    lines += [f"{a:<24}{b:>8}{c:>8}  {d}" for a, b, c, d in rows]
    if result.get("per_map"):
        h = min(CONTROL_HORIZON, result["horizon"])
        lines.append(f"{'per map':<12}{'windows':>8}  teacher-forced (last frame)  rollout @{h} (last frame)")
        for m, v in result["per_map"].items():
            tf_m = f"{f(v['teacher_forced_psnr'])} ({f(v['teacher_forced_baseline_psnr'])})"
            ro_m = f"{f(v[f'rollout_psnr@{h}'])} ({f(v[f'rollout_baseline_psnr@{h}'])})"
            lines.append(f"{m:<12}{v['windows']:>8}  {tf_m:<27}  {ro_m}")
    lines.append(
        f"{result['windows']} windows, context {result['context']}, horizon {result['horizon']}, "
        f"{result['sampler']['steps']} steps, {result['seconds']} s on {result['device']}"
    )
    return "\n".join(lines)


__all__ = [
    "EvalConfig",
    "EvaluationError",
    "HORIZONS",
    "CONTROL_HORIZON",
    "VERSION",
    "evaluate",
    "rollout_seed",
    "select_windows",
    "summary",
    "write_json",
    "write_plot",
    "write_video",
]
