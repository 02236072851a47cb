"""How often does the reward head see game events in imagined play, step by step, against the
real game under the same policy? Uniform-random discrete actions play imagined episodes in the
world-model env (a fresh game's first frames, ``start="doom"``) and real ViZDoom episodes on the
same maps; the head's predicted events (each change it predicts, such as kills, items and health,
and P(death)) are averaged per step over bins of the episode's step, beside the real game's rates,
their ratio, and the same head on the real game's transitions (which tells the head's own error
from the model's frames).

An agent trained in imagination optimises exactly these predictions: a ratio that grows with the
step is the model's drift, read by the head as events (``examples/ppo_doom.py``, docs/agents.md).

    python benchmarks/imagined_events.py --episodes 8 --steps 128 --real-episodes 128 --device cpu --json events.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch

import worldgen.env  # noqa: F401  (registers worldgen/Doom-v0)
from worldgen.env.gym.real_game import RealDoomEnv
from worldgen.env.learned.reward import LearnedReward


def imagined(args: argparse.Namespace) -> tuple[np.ndarray, Any, tuple[int, int], list[str]]:
    """(episodes, steps, events) predicted per step, NaN after an imagined episode ends; the
    env's reward model; the model's frame size; the events: the head's targets, then death."""
    env = gymnasium.make(
        "worldgen/Doom-v0",
        model=args.checkpoint,
        reward=args.reward,
        device=args.device,
        start="doom",
        maps=args.maps,
        action_space="discrete",
        max_episode_steps=args.steps,
    )
    head = env.unwrapped.world.reward
    if not isinstance(head, LearnedReward):
        env.close()
        raise SystemExit(f"--reward must be a learned head (predicted events), got {type(head).__name__}")
    events = [*head.head.cfg.targets, "death"]
    out = np.full((args.episodes, args.steps, len(events)), np.nan)
    for ep in range(args.episodes):
        env.reset(seed=args.seed + ep)
        env.action_space.seed(args.seed + ep)
        for t in range(args.steps):
            _, _, term, trunc, info = env.step(env.action_space.sample())
            terms = info["reward_terms"]
            out[ep, t] = [terms[k] for k in events[:-1]] + [terms["p_death"]]
            if term or trunc:
                break
    frame_size = tuple(env.unwrapped.world.wm.frame_shape[:2])
    env.close()
    return out, head, frame_size, events


def real(
    args: argparse.Namespace, head: Any, frame_size: tuple[int, int], events: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(episodes, steps, events) of the real game per step, and the head's predictions on the
    same transitions; NaN after the player dies."""
    changes = events[:-1]  # the game reports the change of each variable it weighs
    env = RealDoomEnv(
        frame_size,
        action_space="discrete",
        maps=args.maps,
        horizon=args.steps,
        reward_weights=dict.fromkeys(changes, 1.0),
    )
    out = np.full((args.real_episodes, args.steps, len(events)), np.nan)
    read = out.copy()
    for ep in range(args.real_episodes):
        frame, _ = env.reset(seed=args.seed + ep)
        env.action_space.seed(args.seed + ep)
        before = dict.fromkeys(changes, 0.0)
        for t in range(args.steps):
            action = env.action_space.sample()
            act = env.codec.decode(action)
            nxt, _, term, trunc, info = env.step(action)
            terms = head(frame[None], np.asarray(act.keys)[None], np.asarray(act.mouse)[None], nxt[None]).terms
            read[ep, t] = [terms[k][0] for k in changes] + [terms["p_death"][0]]
            frame, now = nxt, info["events"]
            out[ep, t] = [now[k] - before[k] for k in changes] + [float(term)]
            before = {k: now[k] for k in changes}
            if term or trunc:
                break
    env.close()
    return out, read


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--reward", default="learned", help="'learned' (the model's head) or a reward-head folder")
    p.add_argument("--episodes", type=int, default=8, help="imagined episodes")
    p.add_argument("--real-episodes", type=int, default=128, help="real episodes (rare events need many)")
    p.add_argument("--steps", type=int, default=128, help="steps per episode")
    p.add_argument("--bins", type=int, nargs="+", default=[0, 16, 64], help="first step of each bin")
    p.add_argument("--maps", nargs="+", default=["E1M1"])
    p.add_argument("--seed", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if sorted(args.bins) != args.bins or args.bins[0] != 0 or args.bins[-1] >= args.steps:
        p.error(f"--bins must rise from 0 and stay below --steps {args.steps}, got {args.bins}")

    imag, head, frame_size, events = imagined(args)
    game, read = real(args, head, frame_size, events)
    edges = [*args.bins, args.steps]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        i, r, h = (np.nanmean(x[:, lo:hi], axis=(0, 1)) for x in (imag, game, read))
        rows.append(
            {
                "steps": [lo, hi - 1],
                "imagined": dict(zip(events, i.round(6).tolist())),
                "real": dict(zip(events, r.round(6).tolist())),
                "head_on_real": dict(zip(events, h.round(6).tolist())),
                "ratio": {k: (round(float(a / b), 2) if b != 0 else None) for k, a, b in zip(events, i, r)},
            }
        )
    print(f"| steps | {' | '.join(f'{k}: imagined / real (ratio) / head on real' for k in events)} |")
    print("|---|" + "---:|" * len(events))
    for row in rows:
        ratio = {k: "-" if v is None else f"{v}x" for k, v in row["ratio"].items()}
        cells = [
            f"{row['imagined'][k]:.2e} / {row['real'][k]:.2e} ({ratio[k]}) / {row['head_on_real'][k]:.2e}"
            for k in events
        ]
        print(f"| {row['steps'][0]}-{row['steps'][1]} | {' | '.join(cells)} |")
    result = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "bins": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
