"""Long-horizon stability of a world model: does a session stay in the range of real frames?

Two measurements on one recording REC (record it with new seeds, so no frame was trained on):

1. Stability (``worldgen.evaluation.stability``). ``--sessions`` streaming sessions, each from a
   real context of REC, stepped together for ``--frames`` frames with REC's real actions played
   in a loop. The mean and standard deviation of each generated frame's uint8 RGB values against
   the same over every frame of REC (min / max and the 0.5 / 99.5 percentiles): a model that
   drifts (fades to grey, saturates, blurs to one colour) leaves that range.
2. Settings table. For each ``--settings`` entry ``window,sinks,ctx_noise`` (the KV cache: the
   ``sinks`` first frames kept for ever plus the ``window`` latest; the stabilisation noise of
   cached frames), rollout PSNR against the real frames at ``--horizons`` on ``--windows``
   windows of REC (``--context`` real frames + their actions, then the real actions), all
   windows stepped as one batch, next to the repeat-last-context-frame baseline. The best
   setting (highest PSNR averaged over the horizons) is marked: a candidate for the defaults.

Prints markdown tables; ``--json`` holds everything (per-frame series included), ``--plot``
draws mean and std against the frame index over the real band, and PSNR against horizon.

Examples:
    worldgen record --env doom --out data/heldout --steps 16000 --seed 1000      # unseen seeds
    python benchmarks/long_horizon.py --checkpoint default --data data/heldout --device cuda \\
        --frames 10000 --compile --json long_horizon.json --plot long_horizon.png
    python benchmarks/long_horizon.py --checkpoint default --data data/heldout --device cpu \\
        --threads 1 --frames 200 --sessions 1 --windows 2 --horizons 16 64        # CPU smoke run
    python benchmarks/long_horizon.py --checkpoint default --data data/heldout --device cpu \
        --frames 400 --starts s1000-w15-e0000:992 --seed 3 --steps 6 --settings   # session 3 of a run, again
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldgen.data import Dataset
from worldgen.engine.world_model import StreamConfig, WorldModel
from worldgen.evaluation import EvaluationError
from worldgen.evaluation.metrics import psnr
from worldgen.evaluation.stability import (
    PERCENTILES,
    frames_per_s,
    in_range,
    open_sessions,
    pick_windows,
    play,
    session_fields,
    stability,
    starts_of,
)
from worldgen.provenance import hardware

# The table of the issue: the shipped cache (15 frames, no sink), without stabilisation noise,
# with 1 or 2 sinks, and a shorter window. Every entry needs sinks + window + 1 <= the trained
# window (16).
DEFAULT_SETTINGS = ("15,0,0.1", "15,0,0.0", "14,1,0.1", "13,2,0.1", "7,0,0.1")


class BenchmarkError(ValueError):
    """Bad input for this benchmark (a setting the model cannot run, a recording too short)."""


@dataclass(frozen=True)
class Setting:
    """One engine configuration: what the KV cache keeps and how cached frames are noised."""

    window: int  # latest frames attended to
    sinks: int  # first frames kept for ever
    ctx_noise: float  # stabilisation noise level of cached frames (0 = exact conditioning)

    @property
    def label(self) -> str:
        return f"{self.window},{self.sinks},{self.ctx_noise:g}"


def parse_setting(text: str) -> Setting:
    """``"14,1,0.1"`` -> Setting(window=14, sinks=1, ctx_noise=0.1).

    Example:
        >>> parse_setting("6,0,0.05")
        Setting(window=6, sinks=0, ctx_noise=0.05)
    """
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return Setting(int(parts[0]), int(parts[1]), float(parts[2]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is window,sinks,ctx_noise (e.g. 14,1,0.1), got {text!r}") from None


def parse_start(text: str) -> tuple[str, int]:
    """``"s1000-w15-e0000:992"`` -> ("s1000-w15-e0000", 992): episode id and first context frame."""
    episode, _, frame = text.rpartition(":")
    if not episode or not frame.isdigit():
        raise argparse.ArgumentTypeError(f"a start is EPISODE_ID:FRAME (e.g. s1000-w15-e0000:992), got {text!r}")
    return episode, int(frame)


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--checkpoint", default="default", help="model folder or 'default'")
    p.add_argument("--data", required=True, help="recording REC: real range, contexts, actions, ground truth")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--frames", type=positive_int, default=10_000, help="frames per stability session")
    p.add_argument("--sessions", type=positive_int, default=8, help="stability sessions, batched (cheap on a GPU)")
    p.add_argument(
        "--starts",
        type=parse_start,
        nargs="+",
        default=None,
        metavar="EPISODE:FRAME",
        help="the stability sessions' contexts (one session each; default: --sessions spread "
        "evenly), e.g. a session of an earlier JSON's starts again with its --seed + index",
    )
    p.add_argument(
        "--stability-setting",
        type=parse_setting,
        default=None,
        help="window,sinks,ctx_noise of the stability sessions (default: the checkpoint's)",
    )
    p.add_argument("--segment", type=positive_int, default=1000, help="frames per segment of the drift table")
    p.add_argument(
        "--settings",
        type=parse_setting,
        nargs="*",
        default=[parse_setting(s) for s in DEFAULT_SETTINGS],
        help="window,sinks,ctx_noise entries of the PSNR table (none: skip the table)",
    )
    p.add_argument("--horizons", type=positive_int, nargs="+", default=[16, 64, 256])
    p.add_argument("--windows", type=positive_int, default=16, help="rollout windows per setting, one batch")
    p.add_argument("--context", type=positive_int, default=8, help="real frames before each rollout/session")
    p.add_argument("--seed", type=int, default=0, help="session i draws its sampler noise from seed + i")
    p.add_argument("--steps", type=positive_int, default=None, help="sampler Euler steps (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="sampler timestep shift (default: the checkpoint's)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="wm.compile() for the stability sessions (one CUDA graph per step, GPU); the table's "
        "short runs stay eager: compiling each setting would cost more than it saves",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (1 is fastest on a small shared CPU)"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    return p, p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(args: argparse.Namespace, setting: Setting, compile: bool = False) -> WorldModel:
    wm = WorldModel.load(
        args.checkpoint,
        args.device,
        window=setting.window,
        sinks=setting.sinks,
        ctx_noise=setting.ctx_noise,
        steps=args.steps,
        shift=args.shift,
    )
    return wm.compile() if compile else wm


# --- 2. settings table ---------------------------------------------------------------------------


def rollout_psnr(
    wm: WorldModel, items: list[dict[str, Any]], context: int, horizons: list[int], seed: int
) -> dict[str, Any]:
    """PSNR of generated vs real frames at each horizon (h = 1 is the first generated frame),
    averaged over the windows, all stepped as one batch."""
    real = np.stack([it["frames"] for it in items])  # (B, C + H, H_px, W_px, 3)
    keys = np.stack([it["keys"][context:] for it in items])  # (B, H, 8)
    mouse = np.stack([it["mouse"][context:] for it in items])
    scores: dict[str, float] = {}

    def visit(t: int, frames: np.ndarray) -> None:
        if t + 1 in horizons:
            scores[str(t + 1)] = round(float(psnr(frames, real[:, context + t]).mean()), 3)

    sessions = open_sessions(wm, items, context, seed)
    times = play(wm, sessions, keys[:, : max(horizons)], mouse[:, : max(horizons)], visit)
    for s in sessions:
        s.close()
    return {
        "psnr": scores,
        "seconds": round(float(times.sum()), 3),
        "frames_per_s": round(frames_per_s(times, len(items)), 2),
    }


def baseline_psnr(items: list[dict[str, Any]], context: int, horizons: list[int]) -> dict[str, float]:
    """The last context frame held: what a model that changes nothing scores."""
    real = np.stack([it["frames"] for it in items])
    return {str(h): round(float(psnr(real[:, context - 1], real[:, context + h - 1]).mean()), 3) for h in horizons}


# --- checks and output -----------------------------------------------------------------------------


def check(wm: WorldModel, ds: Dataset, args: argparse.Namespace) -> None:
    """Fail before any long run: every setting must fit the model, REC must fit the model."""
    if wm.dit.cfg.frames_per_block != 1:
        raise BenchmarkError(
            f"the model generates {wm.dit.cfg.frames_per_block} frames per step; this "
            f"benchmark scores one frame per step"
        )
    h, w, _ = wm.frame_shape
    if tuple(ds.resolution) != (w, h):
        raise BenchmarkError(f"{ds.root} has {ds.resolution[0]}x{ds.resolution[1]} frames, the model makes {w}x{h}")
    for s in [*args.settings, *([args.stability_setting] if args.stability_setting else [])]:
        try:
            StreamConfig(
                steps=wm.stream.steps, shift=wm.stream.shift, ctx_noise=s.ctx_noise, sinks=s.sinks, window=s.window
            ).check(wm.dit, wm.trained_window)
        except ValueError as e:
            raise BenchmarkError(f"setting {s.label} (window,sinks,ctx_noise): {e}") from None


def markdown(result: dict[str, Any]) -> str:
    st, lines = result["stability"], []
    lo_p, hi_p = (f"p{q:g}" for q in PERCENTILES)
    lines += [
        f"Stability: {st['sessions']} session(s) x {st['frames']} frames, setting {st['setting']}, "
        f"{st['frames_per_s']} frames/s on {result['device_name']}",
        "",
        f"| per-frame | real min | real {lo_p} | real {hi_p} | real max | generated min | generated max | "
        f"outside real [min, max] | outside real [{lo_p}, {hi_p}] |",
        "|---|" + "---:|" * 8,
    ]
    for stat in ("mean", "std"):
        r, g = st["real"][stat], st["generated"][stat]
        lines.append(
            f"| {stat} | {r['min']:.1f} | {r[lo_p]:.1f} | {r[hi_p]:.1f} | {r['max']:.1f} | {g['min']:.1f} | "
            f"{g['max']:.1f} | {g['outside_minmax']:.2%} | {g['outside_percentiles']:.2%} |"
        )
    lines += [
        "",
        f"Session by session (real frames outside [{lo_p}, {hi_p}]: {st['real_outside_percentiles']:.2%}; "
        f"in range: {in_range(st)}):",
        "",
        f"| start | std mean | outside real [min, max] | outside real [{lo_p}, {hi_p}] | "
        f"the start episode's real frames outside [{lo_p}, {hi_p}] |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {e}:{f} | {np.mean(std):.1f} | {r:.2%} | {p:.2%} | {q:.2%} |"
        for (e, f), std, r, p, q in zip(
            st["starts"],
            st["series"]["std"],
            st["session_outside_minmax"],
            st["session_outside_percentiles"],
            st["start_episode_outside_percentiles"],
        )
    ]
    lines += ["", f"| frames | mean | std | outside [{lo_p}, {hi_p}] (mean or std) |", "|---|---:|---:|---:|"]
    lines += [
        f"| {s['frames'][0]}-{s['frames'][1]} | {s['mean']:.1f} | {s['std']:.1f} | {s['outside_percentiles']:.2%} |"
        for s in st["segments"]
    ]
    if result["settings"]:
        hs = result["horizons"]
        lines += [
            "",
            f"Rollout PSNR (dB), {result['windows']} windows, context {result['context']}, "
            f"steps {result['sampler']['steps']}, shift {result['sampler']['shift']}",
            "",
            "| window | sinks | ctx_noise | " + " | ".join(f"PSNR@{h}" for h in hs) + " | frames/s | |",
            "|---:|---:|---:|" + "---:|" * (len(hs) + 1) + "---|",
        ]
        for r in result["settings"]:
            mark = "**best**" if r["setting"] == result["best"] else ""
            lines.append(
                f"| {r['window']} | {r['sinks']} | {r['ctx_noise']:g} | "
                + " | ".join(f"{r['psnr'][str(h)]:.2f}" for h in hs)
                + f" | {r['frames_per_s']} | {mark} |"
            )
        lines.append(
            "| repeat last context frame | | | "
            + " | ".join(f"{result['baseline'][str(h)]:.2f}" for h in hs)
            + " | | |"
        )
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["stability"]
    panels = 3 if result["settings"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for ax, stat in zip(axes, ("mean", "std")):
        r = st["real"][stat]
        ax.axhspan(r["min"], r["max"], color="tab:green", alpha=0.12, label="real min-max")
        ax.axhspan(
            r[f"p{PERCENTILES[0]:g}"],
            r[f"p{PERCENTILES[1]:g}"],
            color="tab:green",
            alpha=0.25,
            label=f"real p{PERCENTILES[0]:g}-p{PERCENTILES[1]:g}",
        )
        for i, series in enumerate(st["series"][stat]):
            ax.plot(np.arange(1, len(series) + 1), series, lw=0.6, alpha=0.8, label=f"session {i}" if i < 8 else None)
        ax.set(xlabel="generated frame", ylabel=f"per-frame {stat} (uint8 RGB)", title=f"frame {stat}")
        ax.legend(fontsize=7, loc="best")
    if result["settings"]:
        ax, hs = axes[2], result["horizons"]
        for r in result["settings"]:
            ax.plot(hs, [r["psnr"][str(h)] for h in hs], marker="o", label=f"W,S,c = {r['setting']}")
        ax.plot(hs, [result["baseline"][str(h)] for h in hs], "k--", marker="x", label="repeat last context frame")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="horizon (frames)", ylabel="PSNR (dB)", title=f"rollout, {result['windows']} windows")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['checkpoint']} on {Path(result['data']).name}: {st['sessions']} x {st['frames']} frames, "
        f"setting {st['setting']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.horizons = sorted(set(args.horizons))
    ds = Dataset(args.data)
    base = WorldModel.load(args.checkpoint, args.device, steps=args.steps, shift=args.shift)
    try:
        check(base, ds, args)
        longest = args.context + max(args.horizons)
        items = (
            pick_windows(
                ds,
                longest,
                args.windows,
                f"a context of {args.context} + {max(args.horizons)} frames",
                fields=session_fields(base),
            )
            if args.settings
            else []
        )
    except (BenchmarkError, EvaluationError) as e:
        p.error(str(e))
    defaults = Setting(base.stream.window, base.stream.sinks, base.stream.ctx_noise)
    result: dict[str, Any] = {
        "version": 1,
        "checkpoint": str(base.checkpoint),
        "data": str(ds.root),
        "device": str(base.device),
        "device_name": hardware(base.device),
        "torch": torch.__version__,
        "compile": args.compile,
        "sampler": {"steps": base.stream.steps, "shift": base.stream.shift},
        "trained_window": base.trained_window,
        "defaults": defaults.label,
        "context": args.context,
        "horizons": args.horizons,
        "seed": args.seed,
    }

    # 1. Stability: the per-frame statistics of long sessions against every real frame's.
    setting = args.stability_setting or defaults
    wm = load(args, setting, compile=args.compile)
    log(
        f"stability: {len(args.starts) if args.starts else args.sessions} session(s) x {args.frames} frames, "
        f"setting {setting.label}"
    )
    try:
        run = stability(
            wm,
            ds,
            args.frames,
            args.sessions,
            args.context,
            args.seed,
            segment=args.segment,
            log=log,
            starts=args.starts,
        )
    except EvaluationError as e:
        p.error(str(e))
    result["stability"] = {"setting": setting.label, **run}
    del wm, base  # free the first model's memory before the table's

    # 2. Settings table: rollout PSNR at each horizon, every window of a setting in one batch.
    result["windows"], result["window_starts"] = len(items), starts_of(ds, items)
    result["baseline"] = baseline_psnr(items, args.context, args.horizons) if items else {}
    result["settings"] = []
    for s in args.settings:
        log(f"setting {s.label}: {len(items)} windows x {max(args.horizons)} frames")
        result["settings"].append(
            {
                "setting": s.label,
                **asdict(s),
                **rollout_psnr(load(args, s), items, args.context, args.horizons, args.seed),
            }
        )
    mean_psnr = lambda r: np.mean(list(r["psnr"].values()))
    result["best"] = max(result["settings"], key=mean_psnr)["setting"] if result["settings"] else None

    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        write_plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
