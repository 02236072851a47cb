"""Train a PPO agent inside the world model, the same agent in the real game, and score both
against a uniform-random policy in the real ViZDoom game.

A single-file, CleanRL-style PPO (https://docs.cleanrl.dev, ppo_atari.py): read it top to bottom.

1. Imagination: ``gymnasium.make_vec("worldgen/Doom-v0", vectorization_mode="vector_entry_point")``
   steps N agents inside the world model with one batched forward per step, starting like a
   real game (``start="doom"``: a fresh E1M1 game's first frames; ``--start dataset``: windows of a
   recording, for short ``--horizon`` episodes bootstrapped from the value, as DIAMOND). Rewards
   and terminations come from the model's learned reward head (kills, health, pickups, death).
2. Reality, the same agent and PPO settings for the same number of steps in N real games
   (:class:`worldgen.env.gym.real_game.RealDoomEnv`, one process each): the comparison that says
   what imagination costs.
3. Scoring: each trained agent and a uniform-random policy over the same action space play
   ``--eval-episodes`` real episodes from game seeds no training saw; the return is the same
   weighted sum of the real game variables (``reward_from_variables``) the head predicts.
   Each agent is reported beside random with the difference in standard errors.

The agent acts in the env's ``--action-space`` (default "discrete": the named key combinations of
``worldgen.env.gym.action_spaces.DISCRETE_ACTIONS``).

Examples:
    # GPU, the headline (about 15 minutes on one H100; see docs/agents.md)
    python examples/ppo_doom.py --device cuda --compile --steps 250000 --num-envs 64 --eval-episodes 128
    python examples/ppo_doom.py --device cpu --steps 2048 --num-envs 8 --eval-episodes 8  # a CPU taste

Writes ``--out``/result.json (training curves, real-game returns of every policy, the
comparisons) and ``--out``/agent-<where>.pt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gymnasium
import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

import worldgen.env  # noqa: F401  (registers worldgen/Doom-v0)
from worldgen.env.learned.reward import DEFAULT_WEIGHTS, LearnedReward


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="default", help="world model folder or packaged name")
    p.add_argument("--reward", default="learned", help="'learned' (the model's head) or a folder with a reward head")
    p.add_argument(
        "--reward-weights",
        default="",
        metavar="NAME=W,...",
        help="the task: weight of each game variable and of 'death', in imagination, real training and "
        "scoring alike (default: the head's stored ones; 'killcount=1,itemcount=0.1': kills and pickups)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--compile", action="store_true", help="compile the engine's step (GPU: CUDA graphs)")
    p.add_argument(
        "--train-in",
        default="imagination,real",
        help="where to train the agent: 'imagination', 'real' or both (the same PPO, the same steps)",
    )
    p.add_argument(
        "--action-space",
        default="discrete",
        choices=("discrete", "multidiscrete"),
        help="the env's action space (a categorical policy per discrete axis)",
    )
    p.add_argument("--steps", type=int, default=20_000, help="total agent steps of training, in each place")
    p.add_argument("--num-envs", type=int, default=16, help="games stepped together (imagined or real)")
    p.add_argument("--num-steps", type=int, default=32, help="steps per env per PPO rollout")
    p.add_argument("--horizon", type=int, default=256, help="training episodes are truncated after this")
    p.add_argument("--maps", default="E1M1", help="comma-separated maps every episode starts on")
    p.add_argument(
        "--start",
        default="doom",
        choices=("doom", "dataset"),
        help="where imagined episodes start: a fresh game on --maps, or windows of a recording "
        "(--data; states all over its maps, for short --horizon episodes, as DIAMOND's imagination)",
    )
    p.add_argument("--data", default=None, help="a recording for --start dataset (record it on --maps)")
    p.add_argument("--lr", type=float, default=2.5e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--gae-lambda", type=float, default=0.95)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--update-epochs", type=int, default=4)
    p.add_argument("--clip-coef", type=float, default=0.1)
    p.add_argument("--ent-coef", type=float, default=0.01)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    p.add_argument("--eval-episodes", type=int, default=100, help="real-game episodes per policy")
    p.add_argument("--eval-steps", type=int, default=300, help="steps per real-game episode at most")
    p.add_argument(
        "--eval-envs",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="real games (processes) playing the scoring episodes together",
    )
    p.add_argument(
        "--processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one process per real game (--no-processes: all in this one, for tiny runs)",
    )
    p.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="WHERE=PATH",
        help="score a saved agent (an earlier run's agent-WHERE.pt) instead of training one there: "
        "train on a GPU, score on any machine with ViZDoom",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="runs/ppo_doom")
    return p.parse_args()


def layer_init(layer: nn.Module, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """A small CNN with a value head and one categorical head per discrete action axis. Frames
    are pooled to at most 80 pixels wide first, and the convs end in an adaptive pool, so one
    net serves 160x120 and 32x24 models."""

    def __init__(self, frame_shape: tuple[int, int, int], nvec: list[int]):
        super().__init__()
        self.pool = max(1, frame_shape[1] // 80)
        self.nvec = list(nvec)
        self.body = nn.Sequential(
            layer_init(nn.Conv2d(3, 32, 5, stride=2, padding=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 3, stride=2, padding=1)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=2, padding=1)),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((4, 4)),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 16, 256)),
            nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(256, sum(self.nvec)), std=0.01)
        self.critic = layer_init(nn.Linear(256, 1), std=1.0)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float() / 255.0  # uint8 (B, H, W, 3) -> (B, 3, H, W) in [0, 1]
        if self.pool > 1:
            x = nn.functional.avg_pool2d(x, self.pool)
        return self.body(x)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.features(obs)).squeeze(-1)

    def act(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action (B, axes), log-prob (B,), entropy (B,), value (B,)); samples when ``action`` is None."""
        h = self.features(obs)
        dists = [Categorical(logits=lg) for lg in self.actor(h).split(self.nvec, -1)]
        if action is None:
            action = torch.stack([d.sample() for d in dists], -1)
        logp = sum(d.log_prob(a) for d, a in zip(dists, action.unbind(-1)))
        entropy = sum(d.entropy() for d in dists)
        return action, logp, entropy, self.critic(h).squeeze(-1)


def action_axes(space: gymnasium.Space) -> list[int]:
    """Choices per axis of a Discrete or MultiDiscrete space."""
    return [int(space.n)] if isinstance(space, gymnasium.spaces.Discrete) else [int(n) for n in space.nvec]


def to_env_actions(action: torch.Tensor, space: gymnasium.Space) -> np.ndarray:
    """Agent actions (N, axes) -> the vector env's batched action: (N,) for Discrete."""
    a = action.cpu().numpy()
    return a[:, 0] if isinstance(space, gymnasium.spaces.Discrete) else a


def parse_weights(text: str) -> dict[str, float] | None:
    """``"killcount=1,itemcount=0.1"`` -> {"killcount": 1.0, "itemcount": 0.1}; "" -> None (the head's own)."""
    if not text.strip():
        return None
    try:
        return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        example = "killcount=1,itemcount=0.1"
        raise SystemExit(f"--reward-weights takes NAME=WEIGHT,... (e.g. {example}), got {text!r}") from None


def make_real_envs(
    n: int,
    frame_size: Sequence[int],
    args: argparse.Namespace,
    horizon: int,
    weights: dict,
    mouse_range: Sequence[float],
) -> gymnasium.vector.VectorEnv:
    """``n`` real ViZDoom games (one process each unless ``--no-processes``), next-step autoreset
    like the world-model env."""
    from worldgen.env.gym.real_game import RealDoomEnv

    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    kwargs = dict(
        frame_size=tuple(frame_size),
        action_space=args.action_space,
        mouse_range=tuple(mouse_range),
        reward_weights=weights,
        maps=maps,
        horizon=horizon,
    )
    if not args.processes:
        return gymnasium.vector.SyncVectorEnv([lambda: RealDoomEnv(**kwargs)] * n)
    return gymnasium.vector.AsyncVectorEnv([lambda: RealDoomEnv(**kwargs)] * n, context="spawn")


def train_ppo(
    envs: gymnasium.vector.VectorEnv, args: argparse.Namespace, device: torch.device, where: str, save_to: Path
) -> tuple[Agent, dict]:
    """CleanRL's PPO on a vector env with next-step autoreset (Gymnasium's default). The agent is
    saved to ``save_to`` after every update, so a run cut short still leaves its latest agent."""
    frame_shape = envs.single_observation_space.shape
    torch.manual_seed(args.seed)
    agent = Agent(frame_shape, action_axes(envs.single_action_space)).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)

    n, t_len, axes = args.num_envs, args.num_steps, len(agent.nvec)
    obs_buf = torch.zeros((t_len, n, *frame_shape), dtype=torch.uint8, device=device)
    act_buf = torch.zeros((t_len, n, axes), dtype=torch.long, device=device)
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
            obs, reward, term, trunc, _ = envs.step(to_env_actions(action, envs.single_action_space))
            rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            # A truncated episode's future is not zero: its last frame's value stands in for it
            # (short imagined episodes would otherwise teach the agent that the world ends).
            cut = trunc & ~term & ~resetting
            if cut.any():
                with torch.no_grad():
                    rew_buf[t, torch.as_tensor(cut, device=device)] += args.gamma * agent.value(
                        torch.as_tensor(obs[cut], device=device)
                    )
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

        b_obs, b_act = obs_buf.reshape(-1, *frame_shape), act_buf.reshape(-1, axes)
        b_logp, b_adv, b_ret, b_val = logp_buf.reshape(-1), adv.reshape(-1), returns.reshape(-1), val_buf.reshape(-1)
        b_valid = valid_buf.reshape(-1) > 0
        idx_all = torch.nonzero(b_valid).flatten()
        mb_size = max(1, len(idx_all) // args.minibatches)
        for _ in range(args.update_epochs):
            perm = idx_all[torch.randperm(len(idx_all), device=device)]
            for s in range(0, len(perm), mb_size):
                mb = perm[s : s + mb_size]
                _, new_logp, entropy, new_value = agent.act(b_obs[mb], b_act[mb])
                ratio = (new_logp - b_logp[mb]).exp()
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std(unbiased=False) + 1e-8)
                pg_loss = torch.max(
                    -mb_adv * ratio, -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
                ).mean()
                # Clipped value loss, as CleanRL's default.
                v_clipped = b_val[mb] + (new_value - b_val[mb]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = 0.5 * torch.max((new_value - b_ret[mb]) ** 2, (v_clipped - b_ret[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

        recent = episodes[-20:]
        curve.append(
            {
                "update": update + 1,
                "steps": (update + 1) * n * t_len,
                "seconds": round(time.time() - t0, 1),
                "episodes": len(episodes),
                "mean_return_last20": float(np.mean([e["return"] for e in recent])) if recent else None,
                "mean_reward_rollout": float(rew_buf[valid_buf > 0].mean()),
            }
        )
        print(
            f"[{where}] update {update + 1}/{updates}: {curve[-1]['steps']} steps, {curve[-1]['seconds']} s, "
            f"reward/step {curve[-1]['mean_reward_rollout']:+.4f}, episodes {len(episodes)}, "
            f"return(last 20) {curve[-1]['mean_return_last20']}",
            flush=True,
        )
        torch.save(agent.state_dict(), save_to.with_suffix(".tmp"))
        save_to.with_suffix(".tmp").replace(save_to)  # atomic: never half an agent
    seconds = time.time() - t0
    return agent, {
        "steps": updates * n * t_len,
        "seconds": round(seconds, 1),
        "steps_per_s": round(updates * n * t_len / seconds, 2),
        "curve": curve,
        "episodes": len(episodes),
        "mean_return_all": float(np.mean([e["return"] for e in episodes])) if episodes else None,
    }


def play_real_game(
    policy: Callable[[np.ndarray], np.ndarray], envs: gymnasium.vector.VectorEnv, episodes: int, seed: int
) -> dict:
    """``policy(obs (N, ...)) -> actions`` plays ``episodes`` real episodes, the same number on
    every game (counting the first to finish would favour short episodes, deaths); returns per-episode
    returns and events, and the mean with its standard error."""
    n = envs.num_envs
    quota = np.full(n, episodes // n) + (np.arange(n) < episodes % n)
    obs, _ = envs.reset(seed=seed)
    ret, out = np.zeros(n), []
    resetting = np.zeros(n, bool)
    while (quota > 0).any():
        obs, reward, term, trunc, info = envs.step(policy(obs))
        ret += np.where(resetting, 0.0, reward)
        for i in np.flatnonzero((term | trunc) & ~resetting):
            if quota[i] > 0:
                quota[i] -= 1
                out.append(
                    {
                        "return": round(float(ret[i]), 4),
                        "steps": int(info["steps"][i]),
                        "died": bool(term[i]),
                        **{k: float(v[i]) for k, v in info["events"].items() if not k.startswith("_")},
                    }
                )
            ret[i] = 0.0
        resetting = term | trunc
    returns = np.array([o["return"] for o in out])
    return {
        "mean_return": float(returns.mean()),
        "se_return": float(returns.std(ddof=1) / np.sqrt(len(returns))) if len(returns) > 1 else None,
        "mean_steps": float(np.mean([o["steps"] for o in out])),
        "deaths": sum(o["died"] for o in out),
        "events": {k: float(np.sum([o[k] for o in out])) for k in out[0] if k not in ("return", "steps", "died")},
        "episodes": out,
    }


def versus(a: dict, b: dict) -> dict:
    """``a`` against ``b``: the difference of mean returns and how many standard errors it is."""
    diff = a["mean_return"] - b["mean_return"]
    se = float(np.hypot(a["se_return"] or 0.0, b["se_return"] or 0.0))
    return {"difference": round(diff, 4), "se": round(se, 4), "z": round(diff / se, 2) if se > 0 else None}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where_all = [w.strip() for w in args.train_in.split(",") if w.strip()]
    if not where_all or set(where_all) - {"imagination", "real"}:
        raise SystemExit(f"--train-in names 'imagination' and/or 'real', got {args.train_in!r}")
    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    loads = dict(item.split("=", 1) for item in args.load if "=" in item)
    if len(loads) != len(args.load) or set(loads) - set(where_all):
        raise SystemExit(f"--load takes WHERE=PATH with WHERE in --train-in ({where_all}), got {args.load}")

    # The model env fixes what every agent sees and does: frame size, action space, mouse range,
    # reward weights. Imagined episodes start like real ones (a fresh game on the same maps) or from
    # recorded play (--start dataset).
    envs = gymnasium.make_vec(
        "worldgen/Doom-v0",
        num_envs=args.num_envs,
        vectorization_mode="vector_entry_point",
        model=args.checkpoint,
        device=str(device),
        reward=args.reward,
        reward_weights=parse_weights(args.reward_weights),
        start=args.start,
        data=args.data,
        split="all",  # --start dataset: every episode of the agent's recording gives starts
        maps=maps,
        max_episode_steps=args.horizon,
        compile=args.compile,
        action_space=args.action_space,
    )
    world = envs.unwrapped.world
    weights = dict(world.reward.weights) if isinstance(world.reward, LearnedReward) else dict(DEFAULT_WEIGHTS)
    frame_size, mouse_range = envs.single_observation_space.shape[:2], world.codec.mouse_range.tolist()
    space = envs.single_action_space

    model_envs = envs
    trained, agents = {}, {}
    for where in where_all:
        if where in loads:
            agents[where] = Agent(model_envs.single_observation_space.shape, action_axes(space)).to(device)
            agents[where].load_state_dict(torch.load(loads[where], map_location=device))
            trained[where] = {"loaded": loads[where]}
            continue
        envs = (
            model_envs
            if where == "imagination"
            else make_real_envs(args.num_envs, frame_size, args, args.horizon, weights, mouse_range)
        )
        agents[where], trained[where] = train_ppo(envs, args, device, where, out / f"agent-{where}.pt")
        envs.close()
    if "imagination" not in where_all or "imagination" in loads:
        model_envs.close()

    gen = torch.Generator(device=device).manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def agent_policy(agent: Agent) -> Callable[[np.ndarray], np.ndarray]:
        @torch.no_grad()
        def act(obs: np.ndarray) -> np.ndarray:
            logits = agent.actor(agent.features(torch.as_tensor(obs, device=device)))
            picks = [torch.multinomial(lg.softmax(-1), 1, generator=gen)[:, 0] for lg in logits.split(agent.nvec, -1)]
            return to_env_actions(torch.stack(picks, -1), space)

        return act

    def random_policy(obs: np.ndarray) -> np.ndarray:  # uniform over the same action space
        return (
            np.stack([space.sample() for _ in range(len(obs))])
            if isinstance(space, gymnasium.spaces.MultiDiscrete)
            else rng.integers(space.n, size=len(obs))
        )

    space.seed(args.seed)
    eval_envs = make_real_envs(
        min(args.eval_envs, args.eval_episodes), frame_size, args, args.eval_steps, weights, mouse_range
    )
    eval_seed = 1_000_000 + args.seed  # game seeds drawn from a stream no training env uses
    real = {"random": play_real_game(random_policy, eval_envs, args.eval_episodes, eval_seed)}
    for where, agent in agents.items():
        real[f"agent_{where}"] = play_real_game(agent_policy(agent), eval_envs, args.eval_episodes, eval_seed)
    eval_envs.close()
    comparisons = {f"{k}_vs_random": versus(v, real["random"]) for k, v in real.items() if k != "random"}
    if len(agents) == 2:
        comparisons["agent_imagination_vs_agent_real"] = versus(real["agent_imagination"], real["agent_real"])
    result = {
        "args": vars(args),
        "device": str(device),
        "reward_weights": weights,
        "mouse_range": mouse_range,
        "trained": trained,
        "real_game": real,
        "comparisons": comparisons,
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")  # atomic: a reader never sees half a result
    print(f"real game, {args.eval_episodes} episodes of at most {args.eval_steps} steps on {args.maps}, unseen seeds:")
    for k, v in real.items():
        print(
            f"  {k:18s} return {v['mean_return']:+.3f} +- {v['se_return'] or 0:.3f} (SE)  deaths {v['deaths']}  "
            f"events {v['events']}"
        )
    for k, c in comparisons.items():
        print(f"  {k}: {c['difference']:+.3f} = {c['z']} standard errors")
    print(f"wrote {out / 'result.json'}")


if __name__ == "__main__":
    main()
