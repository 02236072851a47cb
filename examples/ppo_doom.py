"""Train a PPO agent inside the world model, then play it in the real ViZDoom game.

A single-file, CleanRL-style PPO (https://docs.cleanrl.dev, ppo_atari.py): read it top to bottom.

1. Imagination: ``gymnasium.make_vec("worldgen/Doom-v0", vectorization_mode="vector_entry_point")``
   steps N agents inside the world model with one batched forward per step. Rewards and
   terminations come from the model's learned reward head (kills, health, pickups, death).
2. Reality: the trained agent and a uniform-random policy over the same actions play the real
   game (``worldgen.env.doom``, ViZDoom, freedoom1.wad) from the same maps and seeds; their
   returns are the same weighted sum of the real game variables (``reward_from_variables``).

The agent picks one of a few schema actions (``ACTIONS``): the env's action space is the full
schema (8 keys + mouse degrees), which a discrete policy covers well enough for Doom.

Examples:
    python examples/ppo_doom.py --device cuda --compile --steps 200000 --num-envs 64   # GPU, default model
    python examples/ppo_doom.py --device cpu --steps 2048 --num-envs 8 --eval-episodes 5  # a CPU taste

Writes ``--out``/result.json (training curve, real-game returns of agent and random policy)
and ``--out``/agent.pt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

import worldgen.env  # noqa: F401  (registers worldgen/Doom-v0)
from worldgen.actions import Action
from worldgen.env.reward import DEFAULT_WEIGHTS, LearnedReward, reward_from_variables
from worldgen.env.starts import resize_frames

# The agent's action set: each entry is one schema action (keys held, no mouse).
ACTIONS = [
    Action.from_keys(["forward"]),
    Action.from_keys(["forward", "turn_left"]),
    Action.from_keys(["forward", "turn_right"]),
    Action.from_keys(["turn_left"]),
    Action.from_keys(["turn_right"]),
    Action.from_keys(["attack"]),
    Action.from_keys(["forward", "attack"]),
    Action.from_keys(["back"]),
]
KEYS = np.stack([a.keys for a in ACTIONS])  # (A, 8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default", help="world model folder or packaged name")
    p.add_argument("--reward", default="learned", help="'learned' (the model's head) or a folder with a reward head")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="compile the engine's step (GPU: CUDA graphs)")
    p.add_argument("--steps", type=int, default=20_000, help="total agent steps in imagination")
    p.add_argument("--num-envs", type=int, default=16, help="imagined games stepped together")
    p.add_argument("--num-steps", type=int, default=32, help="steps per env per PPO rollout")
    p.add_argument("--horizon", type=int, default=256, help="imagined episodes are truncated after this")
    p.add_argument("--lr", type=float, default=2.5e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--update-epochs", type=int, default=4)
    p.add_argument("--clip-coef", type=float, default=0.1)
    p.add_argument("--ent-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--eval-episodes", type=int, default=10, help="real-game episodes per policy")
    p.add_argument("--eval-steps", type=int, default=500, help="steps per real-game episode at most")
    p.add_argument("--eval-maps", default="E1M1", help="comma-separated maps of the real-game episodes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="runs/ppo_doom")
    return p.parse_args()


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """A small CNN with policy and value heads. Frames are pooled to at most 80 pixels wide
    first, and the convs end in an adaptive pool, so one net serves 160x120 and 32x24 models."""

    def __init__(self, frame_shape: tuple[int, int, int], n_actions: int):
        super().__init__()
        self.pool = max(1, frame_shape[1] // 80)
        self.body = nn.Sequential(
            layer_init(nn.Conv2d(3, 32, 5, stride=2, padding=2)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 3, stride=2, padding=1)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=2, padding=1)), nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
            layer_init(nn.Linear(64 * 16, 256)), nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(256, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(256, 1), std=1.0)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float() / 255.0  # uint8 (B, H, W, 3) -> (B, 3, H, W) in [0, 1]
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        return self.body(x)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def act(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        h = self.features(obs)
        dist = Categorical(logits=self.actor(h))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(h).squeeze(-1)


def to_env_actions(idx: np.ndarray) -> dict[str, np.ndarray]:
    """Agent action indices (N,) -> the vector env's batched schema action."""
    return {"keys": KEYS[idx], "mouse": np.zeros((len(idx), 2), np.float32)}


def train_in_imagination(args: argparse.Namespace, device: torch.device) -> tuple[Agent, dict, dict]:
    envs = gymnasium.make_vec("worldgen/Doom-v0", num_envs=args.num_envs, vectorization_mode="vector_entry_point",
                              model=args.checkpoint, device=str(device), reward=args.reward,
                              max_episode_steps=args.horizon, compile=args.compile)
    reward_model = envs.unwrapped.world.reward
    weights = dict(reward_model.weights) if isinstance(reward_model, LearnedReward) else dict(DEFAULT_WEIGHTS)
    frame_shape = envs.single_observation_space.shape
    agent = Agent(frame_shape, len(ACTIONS)).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)

    n, t_len = args.num_envs, args.num_steps
    obs_buf = torch.zeros((t_len, n, *frame_shape), dtype=torch.uint8, device=device)
    act_buf = torch.zeros((t_len, n), dtype=torch.long, device=device)
    logp_buf, rew_buf, done_buf, val_buf, valid_buf = (torch.zeros((t_len, n), device=device) for _ in range(5))

    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, device=device)
    next_done = torch.zeros(n, device=device)
    # Next-step autoreset: the step after an episode ends only resets that env (its action is
    # ignored, reward 0). Such steps carry no transition, so they are left out of the loss.
    resetting = np.zeros(n, bool)
    ep_return, ep_len = np.zeros(n), np.zeros(n, int)
    episodes: list[dict] = []
    curve: list[dict] = []
    updates = max(1, args.steps // (n * t_len))
    t0 = time.time()
    for update in range(updates):
        frac = 1.0 - update / updates  # linear LR annealing, as CleanRL
        optimizer.param_groups[0]["lr"] = frac * args.lr

        for t in range(t_len):
            obs_buf[t], done_buf[t] = next_obs, next_done
            valid_buf[t] = torch.as_tensor(~resetting, dtype=torch.float32, device=device)
            with torch.no_grad():
                action, logp, _, value = agent.act(next_obs)
            act_buf[t], logp_buf[t], val_buf[t] = action, logp, value
            obs, reward, term, trunc, _ = envs.step(to_env_actions(action.cpu().numpy()))
            rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            ep_return += np.where(resetting, 0.0, reward)
            ep_len += ~resetting
            done = term | trunc
            for i in np.flatnonzero(done):
                episodes.append({"return": float(ep_return[i]), "length": int(ep_len[i]), "terminated": bool(term[i])})
                ep_return[i], ep_len[i] = 0.0, 0
            resetting = done
            next_obs = torch.as_tensor(obs, device=device)
            next_done = torch.as_tensor(done, dtype=torch.float32, device=device)

        # Generalised advantage estimation, bootstrapped from the value of the next observation.
        with torch.no_grad():
            next_value = agent.value(next_obs)
            adv = torch.zeros_like(rew_buf)
            last = torch.zeros(n, device=device)
            for t in reversed(range(t_len)):
                nonterminal = 1.0 - (next_done if t == t_len - 1 else done_buf[t + 1])
                nxt = next_value if t == t_len - 1 else val_buf[t + 1]
                delta = rew_buf[t] + args.gamma * nxt * nonterminal - val_buf[t]
                last = delta + args.gamma * args.gae_lambda * nonterminal * last
                adv[t] = last
            returns = adv + val_buf

        b_obs, b_act = obs_buf.reshape(-1, *frame_shape), act_buf.reshape(-1)
        b_logp, b_adv, b_ret, b_val = logp_buf.reshape(-1), adv.reshape(-1), returns.reshape(-1), val_buf.reshape(-1)
        b_valid = valid_buf.reshape(-1) > 0
        idx_all = torch.nonzero(b_valid).flatten()
        mb_size = max(1, len(idx_all) // args.minibatches)
        for _ in range(args.update_epochs):
            perm = idx_all[torch.randperm(len(idx_all), device=device)]
            for s in range(0, len(perm), mb_size):
                mb = perm[s:s + mb_size]
                _, new_logp, entropy, new_value = agent.act(b_obs[mb], b_act[mb])
                ratio = (new_logp - b_logp[mb]).exp()
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std(unbiased=False) + 1e-8)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                # Clipped value loss, as CleanRL's default.
                v_clipped = b_val[mb] + (new_value - b_val[mb]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((new_value - b_ret[mb]) ** 2, (v_clipped - b_ret[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

        recent = episodes[-20:]
        curve.append({"update": update + 1, "steps": (update + 1) * n * t_len, "seconds": round(time.time() - t0, 1),
                      "episodes": len(episodes), "mean_return_last20": float(np.mean([e["return"] for e in recent])) if recent else None,
                      "mean_reward_rollout": float(rew_buf[valid_buf > 0].mean())})
        print(f"update {update + 1}/{updates}: {curve[-1]['steps']} steps, {curve[-1]['seconds']} s, "
              f"reward/step {curve[-1]['mean_reward_rollout']:+.4f}, episodes {len(episodes)}, "
              f"return(last 20) {curve[-1]['mean_return_last20']}", flush=True)
    envs.close()
    imagination = {"steps": updates * n * t_len, "seconds": round(time.time() - t0, 1),
                   "steps_per_s": round(updates * n * t_len / (time.time() - t0), 2), "curve": curve,
                   "episodes": len(episodes), "mean_return_all": float(np.mean([e["return"] for e in episodes])) if episodes else None}
    return agent, imagination, {"weights": weights, "frame_shape": list(frame_shape)}


def play_real_game(policy, episodes: int, max_steps: int, maps: list[str], weights: dict, frame_shape, seed: int) -> dict:
    """Play ``policy(frame) -> action index`` in ViZDoom; returns per-episode returns and stats."""
    from worldgen.env.doom import VARIABLE_NAMES, DoomConfig, DoomEnv

    out = []
    with DoomEnv(DoomConfig(), maps[0]) as game:
        for e in range(episodes):
            map_, game_seed = maps[e % len(maps)], seed + e
            obs = game.reset(map_, game_seed)
            total, steps, died = 0.0, 0, False
            start_vars = obs.variables.copy()
            while steps < max_steps:
                a = ACTIONS[policy(resize_frames(obs.frame, tuple(frame_shape[:2])))]
                nxt = game.step(a.keys, a.mouse)
                total += reward_from_variables(obs.variables, None if nxt is None else nxt.variables, VARIABLE_NAMES, weights)
                steps += 1
                if nxt is None:
                    died = game.end == "death"
                    break
                obs = nxt
            col = {n: i for i, n in enumerate(VARIABLE_NAMES)}
            out.append({"map": map_, "seed": game_seed, "return": round(total, 4), "steps": steps, "died": died,
                        "kills": int(obs.variables[col["killcount"]] - start_vars[col["killcount"]]),
                        "health_end": None if died else float(obs.variables[col["health"]])})
    returns = [o["return"] for o in out]
    return {"mean_return": float(np.mean(returns)), "std_return": float(np.std(returns)),
            "mean_steps": float(np.mean([o["steps"] for o in out])), "deaths": sum(o["died"] for o in out),
            "kills": sum(o["kills"] for o in out), "episodes": out}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    agent, imagination, meta = train_in_imagination(args, device)
    torch.save(agent.state_dict(), out / "agent.pt")

    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def agent_policy(frame: np.ndarray) -> int:
        logits = agent.actor(agent.features(torch.as_tensor(frame[None], device=device)))
        return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen))

    rng = np.random.default_rng(args.seed)
    maps = [m.strip() for m in args.eval_maps.split(",") if m.strip()]
    common = dict(episodes=args.eval_episodes, max_steps=args.eval_steps, maps=maps, weights=meta["weights"],
                  frame_shape=meta["frame_shape"], seed=10_000 + args.seed)  # game seeds the model never saw
    real = {"agent": play_real_game(agent_policy, **common),
            "random": play_real_game(lambda frame: int(rng.integers(len(ACTIONS))), **common)}
    result = {"args": vars(args), "device": str(device), "reward_weights": meta["weights"],
              "imagination": imagination, "real_game": real}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    a, r = real["agent"], real["random"]
    print(f"real game, {args.eval_episodes} episodes of at most {args.eval_steps} steps on {','.join(maps)}: "
          f"agent return {a['mean_return']:+.3f} +- {a['std_return']:.3f} (kills {a['kills']}, deaths {a['deaths']}), "
          f"random {r['mean_return']:+.3f} +- {r['std_return']:.3f} (kills {r['kills']}, deaths {r['deaths']})")
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
