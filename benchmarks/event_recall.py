"""Does the model show what actions cause? From real states a few steps before a game event in
held-out play (damage taken, a kill, a pickup), and before quiet stretches, the model plays on
with the recording's own actions; the reward head reads the generated transitions and the real
ones over the same steps. The same contexts played on with another sample's actions are the
control: events that come from the actions appear with the true actions only.

An agent trained in imagination can only learn what the model shows: if generated frames show
damage no more often before real damage than before quiet play, or as often with the wrong
actions, no agent learns from the model what costs health (docs/agents.md).

    python benchmarks/event_recall.py --data HELDOUT3K --lead 4 --per-event 32 --device cpu --json recall.json

Per event type, the mean over samples of each target's change summed over the ``--lead + 1``
steps: the game's own, the head on the real frames, the head on the generated frames with the
recorded actions, and with shuffled ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from worldgen import WorldModel, checkpoint
from worldgen.actions import Action
from worldgen.data import Dataset
from worldgen.env.learned.reward import LearnedReward, make_reward_model
from worldgen.env.learned.reward_calibrate import context_actions


def pick(
    ds: Dataset,
    episodes: list[int],
    targets: tuple[str, ...],
    context: int,
    lead: int,
    n: int,
    rng: np.random.Generator,
) -> dict[str, list[tuple[int, int]]]:
    """Up to ``n`` (episode, s) per event type ("health down", "killcount up", ..., and "quiet"):
    ``s`` is the last context frame, the event the change into frame ``s + lead``; quiet: no
    target changes in frames s+1 .. s+lead+1. Types that never happen are left out."""
    col = {name: i for i, name in enumerate(ds.variable_names)}
    missing = [t for t in targets if t not in col]
    if missing:
        raise ValueError(f"{ds.root}: variables {missing} are not recorded (variables: {ds.variable_names})")
    found: dict[str, list[tuple[int, int]]] = {f"{t} {way}": [] for t in targets for way in ("down", "up")}
    found["quiet"] = []
    for e in episodes:
        d = np.diff(ds.read(e, "variables")[:, [col[t] for t in targets]], axis=0)  # d[u - 1]: into frame u
        for s in range(context - 1, len(d) - lead):
            if not d[s : s + lead + 1].any():  # changes into frames s+1 .. s+lead+1
                found["quiet"].append((e, s))
            for t, change in zip(targets, d[s + lead - 1]):
                if change:
                    found[f"{t} {'up' if change > 0 else 'down'}"].append((e, s))
    return {k: [v[i] for i in sorted(rng.choice(len(v), min(n, len(v)), replace=False))] for k, v in found.items() if v}


@torch.no_grad()
def play(wm: WorldModel, ds: Dataset, samples: list[tuple[int, int]], actions: list[list[Action]], seed: int):
    """Generated frames (N, L + 1, H, W, 3) from each sample's real context, the first its last
    real frame, played on with ``actions`` (N lists of L)."""
    context = wm.stream.sinks + wm.stream.window
    windows = [ds.read(e, "frames", s - context + 1, s + 1) for e, s in samples]
    acts = [context_actions(ds, e, s, context) for e, s in samples]
    sessions = [wm.session(w, a, seed=seed + i) for i, (w, a) in enumerate(zip(windows, acts))]
    frames = [np.stack([w[-1] for w in windows])]
    for k in range(len(actions[0])):
        frames.append(wm.step_many(sessions, [a[k] for a in actions]))
    for s in sessions:
        s.close()
    return np.stack(frames, 1)


def read(head: LearnedReward, frames: np.ndarray, actions: list[list[Action]]) -> np.ndarray:
    """(N, targets): the head's predicted change of each of its targets summed over the transitions."""
    n, steps = frames.shape[0], frames.shape[1] - 1
    keys = np.array([[a.keys for a in row] for row in actions], np.uint8).reshape(n * steps, -1)
    mouse = np.array([[a.mouse for a in row] for row in actions], np.float32).reshape(n * steps, -1)
    prev, nxt = (
        frames[:, :-1].reshape(n * steps, *frames.shape[2:]),
        frames[:, 1:].reshape(n * steps, *frames.shape[2:]),
    )
    terms = head(prev, keys, mouse, nxt).terms
    return np.stack([terms[t].reshape(n, steps).sum(1) for t in head.head.cfg.targets], -1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--reward", default="learned", help="'learned' (the model's head) or a reward-head folder")
    p.add_argument("--data", required=True, help="a recording at the model's resolution (unseen play)")
    p.add_argument("--split", default="heldout", choices=("heldout", "all"), help="its episodes to sample")
    p.add_argument("--lead", type=int, default=4, help="steps from the last real frame to the event")
    p.add_argument("--per-event", type=int, default=32, help="samples per event type (fewer if rarer)")
    p.add_argument("--batch", type=int, default=64, help="sessions stepped together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.lead < 1:
        p.error(f"--lead must be >= 1 step, got {args.lead}")

    wm = WorldModel.load(args.checkpoint, device=args.device)
    head = make_reward_model(args.reward, checkpoint.resolve(args.checkpoint), wm.device, None)
    if not isinstance(head, LearnedReward):
        p.error(f"--reward must be a learned head (predicted events), got {type(head).__name__}")
    targets = tuple(head.head.cfg.targets)
    ds = Dataset(args.data)
    train, held = ds.split(0.1)
    episodes = held if args.split == "heldout" else train + held
    context, steps = wm.stream.sinks + wm.stream.window, args.lead + 1
    rng = np.random.default_rng(args.seed)
    picked = pick(ds, episodes, targets, context, args.lead, args.per_event, rng)
    samples = [x for kind in picked for x in picked[kind]]
    if not samples:
        raise SystemExit(f"{args.data}: no episode of the {args.split} split is long enough for context {context}")
    col = {name: i for i, name in enumerate(ds.variable_names)}
    recorded, real_frames, game = [], [], []
    for e, s in samples:
        keys, mouse = ds.read(e, "keys", s, s + steps), ds.read(e, "mouse", s, s + steps)  # produce frames s+1..
        recorded.append([Action(k, m) for k, m in zip(keys, mouse)])
        real_frames.append(ds.read(e, "frames", s, s + steps + 1))
        v = ds.read(e, "variables", s, s + steps + 1)[:, [col[t] for t in targets]]
        game.append(v[-1] - v[0])
    shuffled = [recorded[i] for i in rng.permutation(len(samples))]
    generated = {"recorded": [], "shuffled": []}
    for lo in range(0, len(samples), args.batch):
        part = slice(lo, lo + args.batch)
        for name, acts in (("recorded", recorded), ("shuffled", shuffled)):
            frames = play(wm, ds, samples[part], acts[part], args.seed + lo)
            generated[name].append(read(head, frames, acts[part]))
    sums = {
        "game": np.array(game, np.float64),
        "head_on_real": read(head, np.stack(real_frames), recorded),
        "generated": np.concatenate(generated["recorded"]),
        "generated_shuffled": np.concatenate(generated["shuffled"]),
    }
    rows, at = {}, 0
    for kind, chosen in picked.items():
        part = slice(at, at + len(chosen))
        at += len(chosen)
        rows[kind] = {
            "samples": len(chosen),
            **{name: dict(zip(targets, x[part].mean(0).round(4).tolist())) for name, x in sums.items()},
        }
    print(f"{len(samples)} samples, lead {args.lead}: each target's change summed over {steps} steps, mean per sample")
    print(
        "| before | samples | " + " | ".join(f"{t}: game / head on real / generated / shuffled" for t in targets) + " |"
    )
    print("|---|---:|" + "---:|" * len(targets))
    for kind, row in rows.items():
        cells = [" / ".join(f"{row[name][t]:+.3f}" for name in sums) for t in targets]
        print(f"| {kind} | {row['samples']} | {' | '.join(cells)} |")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "events": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
