"""Calibrate the reward/termination head on the world model's own frames, the game as the label.

A head trained on real play reads generated frames differently: the model's blur and flicker look
like pickup and damage flashes to it (the first packaged head predicted pickups ~48 times as often on
generated frames as real play has them). The fix is to show it generated frames with true labels:

1. **Rollouts.** From real states of a ViZDoom recording (windows of its frames, at the model's
   resolution) the model plays K steps of actions: an agent's (uniform over the env's discrete
   actions, each held a few steps) or the recording's own.
2. **Labels from the game.** The game replays the recorded episode to the same frame (checked:
   its game variables must equal the recorded ones there), then plays the same K actions; the
   variables after each step (and whether the player died) label the model's transitions.
3. **Training.** ``worldgen train reward`` on the real transitions plus these
   (``--generated ROLLOUTS``), with the usual held-out metrics on real play; then the head's
   prior correction is refitted so that its event rates on these generated transitions are the
   game's (:func:`fit_rates`; ``--no-fit-rates`` keeps the trainer's).
4. **Report.** On held-out rollouts (from episodes neither saw), per event, how often the head
   predicts it against how often the game has it: before (the head given), trained (before the
   refit) and after.

One command does all four (``--out`` gets ``rollouts-train.npz``, ``rollouts-heldout.npz``,
``head/`` (the run; ``head/ckpt`` is the calibrated head to use) and ``report.json``)::

    python -m worldgen.env.learned.reward_calibrate --model default --data data/reward-doom-320k --out runs/calibrate

Event rates: ``predicted`` is the mean probability (the expected count per step, what an
expected reward sums), ``decided`` the share of steps where the event is the most probable
class (P(death) > 0.5 for death), ``actual`` the game's share; ``ratio`` = predicted / actual.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldgen.actions import Action
from worldgen.env.gym.action_spaces import DISCRETE_ACTIONS
from worldgen.training.config import add_config_args, config_from_args, opt

ACTION_SOURCES = ("discrete", "recorded")


@dataclass
class CalibrateConfig:
    data: str = opt("", "a ViZDoom recording with game variables at the model's resolution (worldgen record)")
    out: str = opt("", "folder for the rollouts, the calibrated head's run and report.json")
    model: str = opt("default", "world model: checkpoint folder or packaged name")
    head: str = opt("learned", "the head to start from and compare with: 'learned' (the model's) or a folder")
    rollouts: int = opt(
        2048,
        "train rollouts; events are rare (~2% of steps), so thousands of steps "
        "are needed before a few hundred events are seen",
    )
    heldout_rollouts: int = opt(512, "held-out rollouts, from the held-out episodes, for the report")
    length: int = opt(16, "steps per rollout: long enough for the model's drift to show, as in an agent's episode")
    context: int = opt(0, "real frames before each rollout (0: as long as the model's stored starts)")
    actions: str = opt(
        "discrete",
        "'discrete': uniform over the env's discrete actions, each held for --hold "
        "steps (what an agent does); 'recorded': the recording's own",
        choices=ACTION_SOURCES,
    )
    hold: int = opt(4, "steps each random discrete action is held: agents commit to moves for a while")
    spawn_share: float = opt(
        0.0,
        "share of rollouts from an episode's first frames (a fresh game's spawn room, where "
        "start='doom' episodes begin; the model's frames there read as damage to a head without them)",
    )
    batch: int = opt(64, "rollouts the model steps together (one batched forward)")
    workers: int = opt(0, "game processes labelling rollouts (0: one per CPU, at most 16)")
    fit_rates: bool = opt(
        True,
        "then refit the head's prior correction so its event rates on the train rollouts are the "
        "game's (fit_rates: the env reads only generated frames)",
    )
    train_steps: int = opt(
        2500,
        "reward-head training steps (the packaged head's schedule); 0: keep --head's weights, refit its rates only",
    )
    train_args: str = opt("", "more `worldgen train reward` settings, NAME=VALUE,... (e.g. batch_size=128)")
    device: str = opt("auto", "where the model and head run: auto, cuda or cpu")
    seed: int = opt(0, "seed of windows, actions and sampling")


# --- rollouts --------------------------------------------------------------------------------
def plan(
    ds: Any,
    episodes: list[int],
    n: int,
    context: int,
    length: int,
    recorded: bool,
    rng: np.random.Generator,
    spawn: float = 0.0,
) -> list[tuple[int, int]]:
    """``n`` (episode, t): rollouts starting after real frame ``t`` with ``context`` real frames
    before; with recorded actions the recording must go on ``length`` more steps. A ``spawn``
    share starts at an episode's first ``context`` frames: a fresh game, where the env's
    ``start="doom"`` sessions begin."""
    extra = length if recorded else 0  # recorded actions t .. t + length - 1 must exist
    eligible = [e for e in episodes if ds.episodes[e].length >= context + extra]
    if not eligible:
        raise ValueError(
            f"{ds.root}: no episode of these has {context + extra} frames (context {context}"
            f"{f' + {length} recorded steps' if recorded else ''})"
        )
    eps = rng.choice(eligible, n)
    # Drawn only when asked for, so spawn=0 keeps the starts earlier calibrations drew.
    at_spawn = rng.random(n) < spawn if spawn > 0 else np.zeros(n, bool)
    last = [ds.episodes[e].length - extra + (1 if recorded else 0) for e in eps]  # exclusive
    return [
        (int(e), context - 1 if first else int(rng.integers(context - 1, hi)))
        for e, first, hi in zip(eps, at_spawn, last)
    ]


def random_actions(n: int, length: int, hold: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n, length, 8), mouse (n, length, 2)): discrete actions held ``hold`` steps each."""
    picks = rng.integers(len(DISCRETE_ACTIONS), size=(n, -(-length // hold))).repeat(hold, 1)[:, :length]
    keys = np.stack([a.keys for _, a in DISCRETE_ACTIONS])[picks]
    mouse = np.stack([a.mouse for _, a in DISCRETE_ACTIONS])[picks]
    return keys, mouse


def _label(job: tuple[str, str, int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, int, bool]:
    """In a game process: replay ``source`` to frame ``t``, play ``keys``/``mouse``. Returns the
    variables at frame t and after each step (K + 1, V; frozen after a death), the step (1-based)
    whose action killed the player (0: none), and whether the replay reached the recording's
    variables at t."""
    from worldgen.env.sources.record import load_replay

    source, _, t, keys, mouse = job
    spec = load_replay(source)
    ds, i = spec.reference
    recorded = ds.read(i, "variables", t, t + 1)[0]
    game = _game(spec.config, spec.map)
    obs = game.reset(spec.map, spec.seed)
    for s in range(t):
        obs = game.step(spec.keys[s], spec.mouse[s])
        if obs is None:
            return np.repeat(recorded[None], len(keys) + 1, 0), 0, False
    matched = bool(np.array_equal(obs.variables, recorded))
    out, died = [obs.variables], 0
    for k, (kk, mm) in enumerate(zip(keys, mouse), 1):
        nxt = game.step(kk, mm) if not died else None
        if nxt is None and not died:
            died = k if game.end == "death" else -k  # -k: left the map at step k
        out.append(out[-1] if nxt is None else nxt.variables)
    return np.stack(out), died, matched


_GAMES: dict[str, Any] = {}


def _game(config: Any, first_map: str) -> Any:
    """One ViZDoom engine per worker process, reused across rollouts."""
    from worldgen.env.sources.doom import DoomEnv

    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _GAMES:
        _GAMES[key] = DoomEnv(config, first_map)
    return _GAMES[key]


def make_rollouts(
    wm: Any,
    ds: Any,
    starts: list[tuple[int, int]],
    keys: np.ndarray,
    mouse: np.ndarray,
    context: int,
    batch: int,
    workers: int,
    seed: int,
) -> dict[str, Any]:
    """The model's rollouts from ``starts`` under ``keys``/``mouse`` (N, K, ...), labelled by the game."""
    n, length = keys.shape[:2]
    jobs = [(f"{ds.root}::{ds.episodes[e].id}", "", t, keys[r], mouse[r]) for r, (e, t) in enumerate(starts)]
    # Game processes label while the model generates; one worker labels here, afterwards (no
    # process to start: what tiny runs want).
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        labels = pool.map_async(_label, jobs, chunksize=max(1, n // (4 * workers))) if pool else None
        frames = np.zeros((n, length + 1, *wm.frame_shape), np.uint8)
        sessions: list[Any] = []
        for lo in range(0, n, batch):
            rows = range(lo, min(lo + batch, n))
            windows = [ds.read(starts[r][0], "frames", starts[r][1] - context + 1, starts[r][1] + 1) for r in rows]
            acts = [context_actions(ds, *starts[r], context) for r in rows]
            if not sessions:  # the first batch opens the sessions; later ones start them again, batched
                sessions = [wm.session(w, a, seed=seed + r) for r, w, a in zip(rows, windows, acts)]
            else:
                wm.reset_many(sessions[: len(rows)], windows, acts, [seed + r for r in rows])
            frames[lo : lo + len(rows), 0] = np.stack([w[-1] for w in windows])
            for k in range(length):
                out = wm.step_many(sessions[: len(rows)], [Action(keys[r, k], mouse[r, k]) for r in rows])
                frames[lo : lo + len(rows), k + 1] = out
            print(f"[calibrate] generated {min(lo + batch, n)}/{n} rollouts", file=sys.stderr, flush=True)
        for s in sessions:
            s.close()
        got = labels.get() if labels is not None else [_label(j) for j in jobs]
    variables = np.stack([g[0] for g in got]).astype(np.float32)
    died = np.array([g[1] for g in got])
    # A death at step k: frames g_0..g_{k-1} are play, the transition into g_{k-1} the last one,
    # labelled death (the head's "the next step kills"); leaving the map ends the rollout alike.
    valid = np.where(died == 0, length, np.abs(died) - 1)
    return {
        "frames": frames,
        "keys": keys.astype(np.uint8),
        "mouse": mouse.astype(np.float32),
        "variables": variables,
        "variables_names": list(ds.variable_names),
        "valid": valid.astype(np.int64),
        "died": (died > 0),
        "matched": np.array([g[2] for g in got]),
        "starts": np.array([[e, t] for e, t in starts], np.int64),
    }


def context_actions(ds: Any, e: int, t: int, context: int) -> list[Action]:
    """The actions that produced frames t-context+1..t (the dataset's previous steps; no-op for
    an episode's first frame), as :class:`~worldgen.data.WindowDataset` aligns them."""
    lo = t - context + 1
    keys, mouse = ds.read(e, "keys", max(lo - 1, 0), t), ds.read(e, "mouse", max(lo - 1, 0), t)
    acts = [Action(k, m) for k, m in zip(keys, mouse)]
    return [Action.noop()] * (context - len(acts)) + acts


def save_rollouts(path: str | Path, r: dict[str, Any]) -> None:
    """Write a rollouts file atomically (numpy .npz; variable names as a string array)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: (np.array(v) if k == "variables_names" else v) for k, v in r.items()})
    tmp.replace(path)


def load_rollouts(path: str | Path) -> dict[str, Any]:
    with np.load(path) as z:
        r = {k: z[k] for k in z.files}
    r["variables_names"] = [str(v) for v in r["variables_names"]]
    return r


# --- the report ------------------------------------------------------------------------------
@torch.no_grad()
def head_outputs(head: Any, t: Any, batch: int = 512) -> dict[str, torch.Tensor]:
    """The head's raw outputs over transitions ``t`` (:class:`~worldgen.env.learned.reward_train.Transitions`),
    on its device: class ``logits`` ``(M, targets, 3)`` and ``death`` logits ``(M,)``, before its
    prior correction (:meth:`~worldgen.env.learned.reward.RewardHead.probs` applies it)."""
    device = next(head.parameters()).device
    parts = []
    for s in range(0, len(t), batch):
        i = torch.arange(s, min(s + batch, len(t)))
        parts.append(head(t.frames[t.prev[i]].to(device), t.frames[t.prev[i] + 1].to(device), t.action[i].to(device)))
    return {k: torch.cat([o[k].float() for o in parts]) for k in ("logits", "death")}


@torch.no_grad()
def fit_rates(head: Any, t: Any, iterations: int = 200) -> None:
    """Set the head's prior correction (``logit_bias``, ``death_bias``) so that its mean
    probability of each event over transitions ``t`` is the event's rate there.

    The trainer's correction gives the class frequencies of the training mix, mostly real play.
    But the env reads only the model's frames, where pickups barely show (docs/agents.md): a
    head that reads them right on real frames misses most of them there, and an expected
    reward undercounts them. Fitted on generated transitions labelled by the game, the
    correction matches the game's event rates on the model's frames. Each class's logit moves
    by one offset: what the head reads in a frame stays, its base rates change. Classes the
    game never has in ``t`` keep theirs.
    Iterative proportional fitting: each offset moves by log(actual / predicted) (logits for death)."""
    out = {k: v.double().cpu() for k, v in head_outputs(head, t).items()}
    actual = torch.nn.functional.one_hot(t.classes.cpu(), 3).double().mean(0)  # (targets, 3)
    bias = head.logit_bias.detach().double().cpu()
    for _ in range(iterations):
        p = (out["logits"] + bias).softmax(-1).mean(0)
        bias += torch.where(actual > 0, actual.clamp_min(1e-12).log() - p.clamp_min(1e-12).log(), 0.0)
    head.logit_bias.copy_(bias - bias.mean(-1, keepdim=True))  # softmax ignores a shared offset
    rate = (t.death.cpu() > 0).double().mean()
    if rate > 0:
        d = head.death_bias.detach().double().cpu()
        for _ in range(iterations):
            d += torch.logit(rate) - torch.logit(torch.sigmoid(out["death"] + d).mean(), eps=1e-12)
        head.death_bias.copy_(d)


@torch.no_grad()
def event_rates(head: Any, t: Any, batch: int = 512) -> dict[str, dict[str, float | None]]:
    """Per event (``<target>_down``/``_up``, ``death``): predicted (mean probability), decided
    (share of steps where it is the most probable class) and actual (the labels') rates per step,
    and ratio = predicted / actual, over transitions ``t`` (:class:`~worldgen.env.learned.reward_train.Transitions`)."""
    p, d = (x.cpu() for x in head.probs(head_outputs(head, t, batch)))  # (M, targets, 3), (M,)
    classes = t.classes.cpu()

    def rates(prob: torch.Tensor, decided: torch.Tensor, actual: torch.Tensor) -> dict[str, float | None]:
        a = float(actual.float().mean())
        pr = float(prob.mean())
        return {
            "predicted": pr,
            "decided": float(decided.float().mean()),
            "actual": a,
            "ratio": pr / a if a > 0 else None,
            "events": int(actual.sum()),
        }

    res = {}
    for j, name in enumerate(head.cfg.targets):
        for c, label in ((0, "down"), (2, "up")):
            res[f"{name}_{label}"] = rates(p[:, j, c], p[:, j].argmax(-1) == c, classes[:, j] == c)
    res["death"] = rates(d, d > 0.5, t.death.cpu() > 0)
    res["transitions"] = {"count": len(t)}
    return res


def _print_rates(title: str, before: dict, after: dict) -> None:
    print(f"\n{title}: events per 1000 steps, predicted (mean probability) / actual, before -> after", file=sys.stderr)
    for k in before:
        if k == "transitions":
            continue
        b, a = before[k], after[k]
        print(
            f"  {k:24s} actual {1000 * b['actual']:7.2f}   before {1000 * b['predicted']:7.2f} "
            f"(x{b['ratio'] or float('nan'):.2f})   after {1000 * a['predicted']:7.2f} "
            f"(x{a['ratio'] or float('nan'):.2f})",
            file=sys.stderr,
        )


def _train_overrides(text: str) -> dict[str, Any]:
    from worldgen.env.learned.reward_train import RewardTrainConfig

    fields = {f.name: f for f in dataclasses.fields(RewardTrainConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in fields:
            raise ValueError(f"--train-args: {item!r} is not NAME=VALUE of a `worldgen train reward` setting")
        kind = type(fields[name.strip()].default)
        out[name.strip()] = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
    return out


_OWN_KEYS = ("model", "action_schema", "reward_weights")  # a head's config keys that save_head writes itself


def calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """Rollouts, labels, training and the report (module docstring); returns the report."""
    from worldgen import checkpoint
    from worldgen.data import Dataset
    from worldgen.env.gym.world_model_env import load_model
    from worldgen.env.learned.reward import PACKAGED_HEADS, LearnedReward, load_head, make_reward_model, save_head
    from worldgen.env.learned.reward_train import RewardTrainConfig, rollout_transitions, train

    if not cfg.data or not cfg.out:
        raise ValueError("--data and --out are required")
    if cfg.train_steps == 0 and not cfg.fit_rates:
        raise ValueError("--train-steps 0 keeps the head as it is: it needs --fit-rates, or there is nothing to do")
    if min(cfg.rollouts, cfg.heldout_rollouts, cfg.hold, cfg.batch) < 1 or cfg.length < 2 or cfg.train_steps < 0:
        raise ValueError("need --rollouts, --heldout-rollouts, --hold, --batch >= 1, --length >= 2, --train-steps >= 0")
    if not 0.0 <= cfg.spawn_share <= 1.0:
        raise ValueError(f"--spawn-share is a share of the rollouts, in [0, 1], got {cfg.spawn_share}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = None if cfg.device == "auto" else cfg.device
    wm = load_model(cfg.model, device)
    ds = Dataset(cfg.data)
    w, h = ds.resolution
    if (h, w) != tuple(wm.frame_shape[:2]):
        raise ValueError(f"{cfg.data}: frames are {w}x{h}, the model's are {wm.frame_shape[1]}x{wm.frame_shape[0]}")
    if not ds.variable_names:
        raise ValueError(f"{cfg.data}: no game variables recorded; nothing to label with")
    context = cfg.context or (len(wm.start(0)[0]) if wm.num_starts else wm.stream.sinks + wm.stream.window)
    workers = cfg.workers or min(16, os.cpu_count() or 1)
    rng = np.random.default_rng(cfg.seed)
    train_eps, held_eps = ds.split()
    t0 = time.time()
    for split, eps, n in (("train", train_eps, cfg.rollouts), ("heldout", held_eps or train_eps, cfg.heldout_rollouts)):
        path = out / f"rollouts-{split}.npz"
        if path.exists():
            print(f"[calibrate] reusing {path}", file=sys.stderr)
            continue
        starts = plan(ds, eps, n, context, cfg.length, cfg.actions == "recorded", rng, cfg.spawn_share)
        if cfg.actions == "recorded":
            keys = np.stack([ds.read(e, "keys", t, t + cfg.length) for e, t in starts])
            mouse = np.stack([ds.read(e, "mouse", t, t + cfg.length) for e, t in starts])
        else:
            keys, mouse = random_actions(n, cfg.length, cfg.hold, rng)
        save_rollouts(
            path,
            make_rollouts(
                wm, ds, starts, keys, mouse, context, cfg.batch, workers, cfg.seed + (0 if split == "train" else 10**6)
            ),
        )
    seconds_rollouts = time.time() - t0

    folder = None if not isinstance(cfg.model, str) else checkpoint.resolve(cfg.model)
    before = make_reward_model(cfg.head, folder, wm.device)
    if not isinstance(before, LearnedReward):
        raise ValueError(f"--head must name a learned reward head, got {cfg.head!r}")
    settings = {
        "data": cfg.data,
        "out": str(out / "head"),
        "generated": str(out / "rollouts-train.npz"),
        "steps": cfg.train_steps,
        "device": cfg.device,
        "seed": cfg.seed,
        "targets": ",".join(before.head.cfg.targets),
        "weights": ",".join(f"{k}={v:g}" for k, v in before.weights.items()),
        "channels": ",".join(map(str, before.head.cfg.channels)),
        "downsample": before.head.cfg.downsample,
        **_train_overrides(cfg.train_args),
    }
    ckpt = out / "head" / "ckpt"
    if cfg.train_steps > 0:
        summary, source = train(RewardTrainConfig(**settings)), ckpt
    else:  # the head as it is: its rates alone are refitted (--train-steps 0 needs --fit-rates)
        summary = {}
        source = checkpoint.stored_head(folder, "reward", PACKAGED_HEADS) if cfg.head == "learned" else cfg.head
    head, stored = load_head(source, wm.device)
    # One head config, so one set of held-out transitions serves the head before and after the refit.
    held = rollout_transitions(out / "rollouts-heldout.npz", head)
    trained_rates = event_rates(head, held)
    if cfg.fit_rates:
        fitted_on = rollout_transitions(out / "rollouts-train.npz", head)
        fit_rates(head, fitted_on)
        extra = {k: v for k, v in stored.items() if k not in _OWN_KEYS}
        if "metrics" in extra:  # measured on real play with the trainer's rates: not this head's any more
            extra["metrics_before_rate_fit"] = extra.pop("metrics")
        extra["rate_fit"] = {"rollouts": settings["generated"], "transitions": len(fitted_on)}
        save_head(ckpt, head, stored["reward_weights"], extra)

    matched = load_rollouts(out / "rollouts-heldout.npz")["matched"]
    held_before = rollout_transitions(out / "rollouts-heldout.npz", before.head)
    report = {
        "config": dataclasses.asdict(cfg),
        "context": context,
        "seconds_rollouts": round(seconds_rollouts, 1),
        "heldout_replays_matched": f"{int(matched.sum())}/{len(matched)}",
        "generated_heldout": {
            "before": event_rates(before.head, held_before),
            "trained": trained_rates,
            "after": event_rates(head, held) if cfg.fit_rates else trained_rates,
        },
        "real_heldout_metrics_after": {k: v for k, v in summary.items() if k.startswith("heldout")},
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "report.json")
    _print_rates(
        "held-out generated rollouts", report["generated_heldout"]["before"], report["generated_heldout"]["after"]
    )
    print(f"[calibrate] calibrated head: {out / 'head' / 'ckpt'}; report: {out / 'report.json'}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m worldgen.env.learned.reward_calibrate", description=__doc__.split("\n")[0]
    )
    add_config_args(p, CalibrateConfig, required=("data", "out"))
    cfg, _ = config_from_args(CalibrateConfig, p.parse_args(argv))
    return calibrate(cfg)


if __name__ == "__main__":
    main()
