"""Pick a checkpoint's sampler settings (Euler steps, context noise, guidance, cache sinks) on validation windows.

Runs ``worldgen eval`` for every combination on held-out episodes of the *training* recording
(the trainer's own split: never trained on, but not the unseen-seed test data), or with
``--split all`` on every episode of a validation recording made with other unseen seeds than
the test's (when the training recording is not at hand), and plays ``--stability-sessions``
long sessions of ``--stability-frames`` frames each from those episodes
(``worldgen.evaluation.stability``). It prints the table and, with ``--apply``, stores the best
settings as the checkpoint's sampler defaults (its final eval and every session then use them).
``--sinks`` (the frames a session's KV cache keeps for ever; its window holds the rest of the
trained window) changes the long sessions alone: eval's windows fit in the trained window.

Every setting (with its sinks) also plays the play suite (``worldgen.evaluation.play``) on
``--play-windows`` windows of the same episodes: the game's own answers to each action branch
from each window, replayed in ViZDoom once (``worldgen.env.sources.play_suite.record_branches``, kept
in ``--branches``) and scored for every setting: the own-versus-other gap and the branch
identification accuracy at 16 steps, and the revisits' PSNR against the game's frame on return.

Best, in this order. First, a game runs for hours: only settings whose long sessions stay in
the range of real frames qualify (``stability.in_range``; all of them if none does, or with
``--stability-frames 0``). Of those, the ones that clear the two PSNR bars of a useful model
(teacher-forced at least ``--min-gain`` dB over repeating the last frame, rollout@16 above
holding it), the most controllable: the play suite's own-versus-other gap at 16 (real minus
shuffled actions at 16 with ``--play-windows 0``, a measure the issue-21 review found to be
noise); if none clears them,
the highest teacher-forced + rollout@16 PSNR + controllability; between settings that differ in
their sinks alone, the one whose worst long session stays furthest inside the band. PSNR alone
rewards blurry means that ignore the action and flatten over a long session: a game has to
follow its player and keep its look. The sinks' effect on PSNR beyond the trained window is not
scored here: ``long_horizon.py``'s settings table shows it (horizons 16, 64, 256).

    python benchmarks/sampler_sweep.py --checkpoint runs/dyn/ckpt --data data/doom_train \\
        --steps 5 6 --ctx-noise 0.1 --sinks 0 1 --compile --json sweep.json --apply
    python benchmarks/sampler_sweep.py --checkpoint runs/dyn/ckpt --data data/doom_train \\
        --steps 2 4 --stability-frames 0 --device cpu          # PSNR only: a CPU is too slow for it
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from worldgen import WorldModel, checkpoint
from worldgen.data import Dataset
from worldgen.evaluation.evaluate import EvalConfig, evaluate, trainer_heldout_fraction
from worldgen.evaluation.stability import in_range, stability


def choose(rows: list[dict], min_gain: float) -> dict:
    """The best sweep row by the rule of the module docstring.

    Example:
        >>> sharp = {"in_range": True, "tf_gain_db": 1.3, "rollout_psnr": 16.2, "rollout_baseline": 15.1,
        ...          "control_db": 0.1, "score": 36.3}
        >>> flat = {**sharp, "in_range": False, "tf_gain_db": 2.0, "score": 37.0}
        >>> choose([flat, sharp], min_gain=2.0) is sharp
        True
    """
    pool = [r for r in rows if r.get("in_range", True)] or rows  # none stays in range: rank them all
    useful = [r for r in pool if r["tf_gain_db"] >= min_gain and r["rollout_psnr"] > r["rollout_baseline"]]

    def margin(r: dict) -> float:  # eval's windows fit the trained window: the sinks change only this
        return -r.get("worst_session_band", 0.0)

    def control(r: dict) -> float:  # the play suite's gap where it ran
        return r["play_gap_db"] if r.get("play_gap_db") is not None else (r["control_db"] or 0.0)

    if useful:
        return max(useful, key=lambda r: (control(r), r["score"], margin(r)))
    return max(pool, key=lambda r: (r["score"], margin(r)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the training recording (its held-out split is used), or see --split")
    p.add_argument(
        "--split",
        choices=["heldout", "all"],
        default="heldout",
        help="all: every episode, for a validation recording of seeds neither training nor the test used",
    )
    p.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ctx-noise", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0])
    p.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[1.0],
        help="action guidance scales (> 1 needs a model trained with action dropout)",
    )
    p.add_argument(
        "--sinks",
        type=int,
        nargs="+",
        default=[None],
        help="cache sink frames of the long sessions (default: the checkpoint's)",
    )
    p.add_argument("--min-gain", type=float, default=2.0, help="teacher-forced dB over repeat-last-frame to qualify")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument(
        "--stability-frames", type=int, default=10_000, help="frames per long session (0: skip the stability check)"
    )
    p.add_argument(
        "--stability-sessions",
        type=int,
        default=8,
        help="long sessions, stepped as one batch (four missed a flat start: docs/history/results-2026-12.md)",
    )
    p.add_argument(
        "--play-windows",
        type=int,
        default=16,
        help="windows of the play suite per setting (0: skip it; controllability is then eval's "
        "real-minus-shuffled PSNR)",
    )
    p.add_argument(
        "--branches",
        type=Path,
        default=None,
        help="the play suite's branch recording: made here from --data if missing (default: "
        "<json stem>_branches, or sweep_branches without --json)",
    )
    p.add_argument("--workers", type=int, default=None, help="ViZDoom replay processes (default: one per core)")
    p.add_argument("--batch", type=int, default=64, help="play-suite sessions stepped together")
    p.add_argument("--compile", action="store_true", help="wm.compile() the long sessions (GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--apply", action="store_true", help="store the best settings in the checkpoint")
    args = p.parse_args(argv)

    rows = []
    rec = _branch_recording(args) if args.play_windows > 0 else None
    grid = [
        (steps, noise, shift, g)
        for steps in args.steps
        for noise in args.ctx_noise
        for shift in args.shift
        for g in args.guidance
    ]
    ds = Dataset(args.data)
    episodes = (
        ds.split(trainer_heldout_fraction(args.checkpoint))[1] if args.split == "heldout" else list(range(len(ds)))
    )  # the episodes eval scores
    for steps, noise, shift, g in tqdm(grid, desc="sampler sweep", unit="setting"):
        r = evaluate(
            args.checkpoint,
            ds,
            EvalConfig(
                steps=steps,
                ctx_noise=noise,
                shift=shift,
                guidance=g,
                windows=args.windows,
                split=args.split,
                horizon=args.horizon,
                video_windows=0,
                progress=False,
            ),
            device=args.device,
            log=lambda *_: None,
        )
        tf, ro = r["teacher_forced"], r["rollout"]
        h = min(16, r["horizon"])
        scored = {
            "steps": steps,
            "ctx_noise": noise,
            "shift": shift,
            "guidance": g,
            "tf_psnr": tf["psnr"],
            "tf_gain_db": tf["gain_db"],
            "rollout_psnr": ro["curve"][h - 1],
            "rollout_baseline": ro["baseline_curve"][h - 1],
            "control_db": r["controllability"]["delta_db"],
            "seconds": r["seconds"],
        }
        control = scored["control_db"] if scored["control_db"] is not None else 0.0  # None: horizon < 16
        scored["score"] = round(scored["tf_psnr"] + scored["rollout_psnr"] + control, 3)
        for sinks in args.sinks:  # the window keeps what the sinks leave of the trained window
            wm = WorldModel.load(
                args.checkpoint, args.device, steps=steps, ctx_noise=noise, shift=shift, guidance=g, sinks=sinks
            )
            row = {**scored, "sinks": wm.stream.sinks}
            if rec is not None:
                row.update(play_scores(rec, wm, args.batch))
            if args.stability_frames > 0:
                st = stability(
                    wm.compile() if args.compile else wm,
                    ds,
                    args.stability_frames,
                    args.stability_sessions,
                    episodes=episodes,
                )
                row.update(
                    in_range=in_range(st),
                    outside_minmax=st["outside_minmax"],
                    real_frames=st["real_frames"],
                    outside_band=st["outside_percentiles"],
                    real_outside_band=st["real_outside_percentiles"],
                    worst_session_band=max(st["session_outside_percentiles"]),
                    std_mean=round(float(np.mean(st["series"]["std"])), 2),
                    stability_seconds=st["seconds"],
                )
            del wm
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = choose(rows, args.min_gain)
    print(
        "| steps | ctx_noise | shift | guidance | sinks | teacher-forced dB (gain) | rollout@16 dB (baseline) "
        "| controllability dB | play: gap dB, identified (chance), revisit dB | long sessions: std mean, outside "
        "real [min, max] / band, worst session (real) | score |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mark = " **best**" if r is best else ""
        long = (
            f"{r['std_mean']:.1f}, {r['outside_minmax']:.2%} / {r['outside_band']:.2%}, {r['worst_session_band']:.2%} "
            f"({r['real_outside_band']:.2%})"
            f"{'' if r['in_range'] else ': out of range'}"
            if "in_range" in r
            else "not run"
        )
        print(
            f"| {r['steps']} | {r['ctx_noise']} | {r['shift']} | {r['guidance']} | {r['sinks']} | {r['tf_psnr']:.2f} "
            f"({r['tf_gain_db']:+.2f}) | {r['rollout_psnr']:.2f} ({r['rollout_baseline']:.2f}) | "
            f"{r['control_db'] if r['control_db'] is None else format(r['control_db'], '+.2f')} | "
            f"{_play_cell(r)} | {long} | "
            f"{r['score']:.2f} |{mark}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "best": best}, indent=1))
    if args.apply:
        sampler = checkpoint.config(args.checkpoint, "dynamics").get("sampler", {})
        checkpoint.update_config(
            args.checkpoint,
            "dynamics",
            {
                "sampler": {
                    **sampler,
                    **{k: best[k] for k in ("steps", "ctx_noise", "shift", "guidance", "sinks")},
                    "chosen_by": "benchmarks/sampler_sweep.py",
                }
            },
        )
        print(
            f"stored steps={best['steps']} ctx_noise={best['ctx_noise']} shift={best['shift']} "
            f"guidance={best['guidance']} sinks={best['sinks']} in {args.checkpoint}"
        )
    return {"rows": rows, "best": best}


def _branch_recording(args: argparse.Namespace):
    """The play suite's branch recording of --data's scored episodes: reused if it is at --branches."""
    from worldgen.data import Dataset as _Dataset
    from worldgen.env.sources.play_suite import record_branches
    from worldgen.evaluation.play import load_recording

    out = args.branches or (args.json.with_name(f"{args.json.stem}_branches") if args.json else Path("sweep_branches"))
    if not (out / "index.json").is_file():
        wm = WorldModel.load(args.checkpoint, "cpu")  # its context and frame size; replays fork before GPU work
        h, w, _ = wm.frame_shape
        record_branches(
            args.data,
            out,
            windows=args.play_windows,
            context=wm.stream.sinks + wm.stream.window,
            split=args.split,
            heldout_fraction=trainer_heldout_fraction(args.checkpoint),
            workers=args.workers,
            size=(w, h),
        )
        del wm
    elif _Dataset(out).index["source"].get("of") != str(_Dataset(args.data).root):
        raise SystemExit(f"--branches {out}: was made from another recording; remove it or pick another folder")
    return load_recording(out)


def play_scores(rec, wm, batch: int) -> dict:
    """The play suite's headline numbers for one setting (no media, no camera: seconds matter)."""
    from worldgen.evaluation.play import EnginePlayer, PlayConfig, evaluate_play

    r = evaluate_play(
        rec, EnginePlayer(wm, batch), cfg=PlayConfig(video_windows=0, progress=False), log=lambda *_: None
    )
    h = max(r["horizons"])
    model = r["branches"]["model"]["mean"]
    revisit = [v["model"]["psnr_vs_game"] for v in r["revisits"].values()]
    return {
        "play_horizon": h,
        "play_gap_db": model[f"gap_db@{h}"],
        "play_accuracy": model[f"accuracy@{h}"],
        "play_chance": r["branches"][f"chance@{h}"],
        "play_psnr": model[f"psnr@{h}"],
        "play_revisit_psnr": round(float(np.mean(revisit)), 4) if revisit else None,
        "play_seconds": r["seconds"],
    }


def _play_cell(r: dict) -> str:
    if "play_gap_db" not in r:
        return "not run"
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    return (
        f"{f(r['play_gap_db'], '+.2f')}, {f(r['play_accuracy'], '.2f')} ({f(r['play_chance'], '.2f')}), "
        f"{f(r['play_revisit_psnr'], '.2f')}"
    )


if __name__ == "__main__":
    main()
