"""``worldgen train reward``: fit a :class:`~worldgen.env.learned.reward.RewardHead` to recorded play.

Every step of every train episode (``Dataset.split()``) is a transition ``(frame t, action t,
frame t+1)`` with targets from the recorded game variables:

* per target variable (``--targets``, default health, killcount, itemcount): the sign of its
  change (down / same / up, a 3-way class) and its size (``log1p |change|``, regressed on the
  steps where it changed);
* ``death``: 1 on the last transition of an episode that the player's death ended (its next
  step killed the player; see :mod:`worldgen.env.learned.reward` for why it is framed so).

Changes are rare (in the recorder's exploration play ~1% of steps lose health, 0.2% kill, 0.2% pick up),
so a share ``--event-fraction`` of every batch is drawn from the transitions where something
changed. The head then learns the sampled class frequencies; its stored prior correction
(``logit_bias``, ``death_bias``: log true prior - log sampled prior) turns its outputs back
into probabilities at the game's own frequencies, which expected rewards need. Frames are
average-pooled (``--downsample``, auto: to at most 80 pixels wide) once and held on
the device as uint8, like the tokenizer trainer's pool; batches are drawn there with the
step's generator, so a resumed run is exact. The run folder is the usual one
(:mod:`worldgen.training.common`): ``ckpt/reward.json`` plus shards is the head to use; put it
beside a model with ``--out`` pointing at a run and ``reward="RUN/ckpt"`` in the env.

Held-out metrics (``summary.json`` and the head's config ``metrics``), per target: accuracy,
balanced accuracy (mean recall of the three classes), the accuracy of always answering "same",
recall per class and class counts (decisions by the most probable class at the game's own
frequencies, so rare changes need confident evidence), and the ROC AUC of ``P(down)`` and
``P(up)`` (ranking, whatever the threshold); for death: recall, precision, balanced accuracy
and ROC AUC; for the reward: Pearson correlation and mean absolute error against the real one.

Example:
    worldgen record --env doom --steps 160000 --out data/reward-doom --seed 7
    worldgen train reward --data data/reward-doom --out runs/reward --minutes 10
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import actions
from worldgen.data import Dataset
from worldgen.env.learned.reward import (
    CLASSES,
    DEFAULT_TARGETS,
    DEFAULT_WEIGHTS,
    RewardHead,
    RewardHeadConfig,
    pool_factor,
    save_head,
)
from worldgen.training import common
from worldgen.training.common import Dist, Run, TrainConfig, autocast, opt, save_image_rows


@dataclass
class RewardTrainConfig(TrainConfig):
    batch_size: int = opt(64, "transitions per step over all GPUs; the head is small, a GPU wants more")
    lr: float = opt(1e-3, "peak AdamW LR; a small conv net with GroupNorm trains stably at this")
    warmup: int = opt(100, "linear LR warmup steps")
    ema_decay: float = opt(0.995, "EMA of weights; a ~200-step horizon suits runs of a few thousand steps")
    ckpt_every: int = opt(500, "save resume state and export every N steps")
    sample_every: int = opt(0, "write sample images every N steps (0: only at the end)")
    targets: str = opt(",".join(DEFAULT_TARGETS), "recorded variables whose change per step the head predicts")
    weights: str = opt(
        ",".join(f"{k}={v:g}" for k, v in DEFAULT_WEIGHTS.items()),
        "reward = sum of weight x change (and 'death' x dying), stored with the head",
    )
    downsample: int = opt(0, "average-pool frames by this before the convs (0: auto, to at most 80 pixels wide)")
    channels: str = opt("32,64,64,128", "conv widths, each conv halving the resolution")
    event_fraction: float = opt(
        0.25,
        "share of each batch drawn from transitions where something changed "
        "(or the player died): they are ~2% of play; the head's prior "
        "correction undoes the over-sampling at inference",
    )
    balance: float = opt(
        0.0,
        "class loss weights = class frequency ** -balance (0: none; with event "
        "over-sampling, weights would bias the corrected probabilities)",
    )
    eval_transitions: int = opt(4096, "held-out transitions scored at checkpoints (all of them at the end)")
    generated: str = opt(
        "",
        "the world model's own transitions labelled by the game (a rollouts file of "
        "`python -m worldgen.env.learned.reward_calibrate`), trained on beside the real ones: "
        "a head that only saw real frames mistakes the model's artefacts for events",
    )


def parse_weights(text: str) -> dict[str, float]:
    """``"killcount=1,health=0.01"`` -> ``{"killcount": 1.0, "health": 0.01}``.

    Example:
        >>> parse_weights("killcount=1, death=-1")
        {'killcount': 1.0, 'death': -1.0}
    """
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--weights: {item!r} is not NAME=NUMBER")
    return out


@dataclass
class Transitions:
    """Transitions over a pool of prepared frames: transition i is ``frames[prev[i]] ->
    frames[prev[i] + 1]`` under ``action[i]``."""

    frames: torch.Tensor  # (F, 3, h, w) uint8, pooled
    prev: torch.Tensor  # (M,) int64 index into frames
    action: torch.Tensor  # (M, 10) float32, actions.to_vector
    change: torch.Tensor  # (M, targets) float32 change of each target variable
    death: torch.Tensor  # (M,) float32, 1 = the step after frame prev+1 killed the player

    def __len__(self) -> int:
        return len(self.prev)

    def to(self, device: torch.device) -> Transitions:
        return Transitions(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list[Transitions]) -> Transitions:
        """One set of transitions holding ``parts`` (frame indices shifted to the joined pool)."""
        offsets = np.cumsum([0] + [len(p.frames) for p in parts[:-1]])
        return Transitions(
            torch.cat([p.frames for p in parts]),
            torch.cat([p.prev + int(o) for p, o in zip(parts, offsets)]),
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("action", "change", "death")),
        )

    @property
    def classes(self) -> torch.Tensor:
        """(M, targets) int64: 0 down, 1 same, 2 up."""
        return self.change.sign().long() + 1

    @property
    def events(self) -> torch.Tensor:
        """(M,) bool: a target changed or the player died."""
        return (self.change != 0).any(1) | (self.death > 0)


def build_transitions(ds: Dataset, episodes: list[int], head: RewardHead) -> Transitions:
    """The transitions of ``episodes`` of ``ds``, frames pooled by ``head.prepare`` (CPU)."""
    names = ds.variable_names
    missing = [t for t in head.cfg.targets if t not in names]
    if missing:
        raise ValueError(f"{ds.root}: targets {missing} are not recorded variables (it has {names or 'none'})")
    cols = [names.index(t) for t in head.cfg.targets]
    frames, prev, acts, change, death = [], [], [], [], []
    offset = 0
    for e in episodes:
        info = ds.episodes[e]
        if info.length < 2:
            continue
        f = head.prepare(torch.from_numpy(ds.read(e, "frames")))
        v = ds.read(e, "variables")[:, cols]
        n = info.length - 1
        frames.append(f)
        prev.append(torch.arange(offset, offset + n))
        acts.append(torch.from_numpy(actions.to_vector(ds.read(e, "keys")[:n], ds.read(e, "mouse")[:n])))
        change.append(torch.from_numpy(np.diff(v, axis=0)))
        d = torch.zeros(n)
        d[-1] = float(info.extra.get("end") == "death")
        death.append(d)
        offset += info.length
    if not frames:
        raise ValueError(f"{ds.root}: no episode of 2 or more steps among {len(episodes)}: nothing to learn from")
    return Transitions(
        torch.cat(frames), torch.cat(prev), torch.cat(acts).float(), torch.cat(change).float(), torch.cat(death)
    )


def rollout_transitions(path: str | Path, head: RewardHead) -> Transitions:
    """The transitions of a rollouts file (:func:`worldgen.env.learned.reward_calibrate.save_rollouts`):
    rollout r's frames ``g_0 .. g_K`` (g_0 real, the rest the model's), the actions between them
    and the game's variables after each; only its first ``valid[r]`` transitions count (a death
    in the game ends the rollout there, the last of them labelled death)."""
    from worldgen.env.learned.reward_calibrate import load_rollouts

    r = load_rollouts(path)
    names = r["variables_names"]
    missing = [t for t in head.cfg.targets if t not in names]
    if missing:
        raise ValueError(f"{path}: targets {missing} are not among its variables ({names})")
    cols = [names.index(t) for t in head.cfg.targets]
    n, k1 = r["frames"].shape[:2]
    frames = head.prepare(torch.from_numpy(r["frames"].reshape(-1, *r["frames"].shape[2:])))
    prev, acts, change, death = [], [], [], []
    for i in range(n):
        m = int(r["valid"][i])
        if m == 0:
            continue
        prev.append(torch.arange(i * k1, i * k1 + m))
        acts.append(torch.from_numpy(actions.to_vector(r["keys"][i, :m], r["mouse"][i, :m])))
        change.append(torch.from_numpy(np.diff(r["variables"][i, : m + 1][:, cols], axis=0)))
        d = torch.zeros(m)
        d[-1] = float(r["died"][i])
        death.append(d)
    if not prev:
        raise ValueError(f"{path}: no rollout has a transition")
    return Transitions(frames, torch.cat(prev), torch.cat(acts).float(), torch.cat(change).float(), torch.cat(death))


def class_weights(t: Transitions, balance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, 3) class weights ``frequency ** -balance`` (mean 1 over the data) and the death
    positive weight ``(negatives / positives) ** balance``."""
    counts = F.one_hot(t.classes, 3).sum(0).double().clamp_min(1)  # (targets, 3)
    freq = counts / counts.sum(-1, keepdim=True)
    w = freq**-balance
    w = w / (w * freq).sum(-1, keepdim=True)
    pos = t.death.sum().clamp_min(1).double()
    return w.float(), ((len(t) - pos) / pos).clamp_min(1).pow(balance).float().reshape(())


def prior_bias(t: Transitions, event_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit corrections ``log P_true - log P_sampled`` for the class heads (targets, 3) and the
    death logit, when a share ``event_fraction`` of each batch comes from event transitions."""

    def freq(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = F.one_hot(t.classes[mask], 3).double().mean(0) if mask.any() else torch.zeros(t.change.shape[1], 3).double()
        return c, t.death[mask].double().mean() if mask.any() else torch.zeros((), dtype=torch.float64)

    (c_all, d_all), (c_ev, d_ev) = freq(torch.ones(len(t), dtype=torch.bool)), freq(t.events)
    c_s, d_s = (
        (1 - event_fraction) * c_all + event_fraction * c_ev,
        (1 - event_fraction) * d_all + event_fraction * d_ev,
    )
    eps = 1e-9
    bias = torch.where(c_all > 0, c_all.clamp_min(eps).log() - c_s.clamp_min(eps).log(), torch.zeros_like(c_all))

    def logit(p: torch.Tensor) -> torch.Tensor:
        return p.clamp(eps, 1 - eps).log() - (1 - p).clamp(eps, 1 - eps).log()

    death = logit(d_all) - logit(d_s) if d_all > 0 else torch.zeros((), dtype=torch.float64)
    return bias.float(), death.float()


def head_loss(
    out: dict[str, torch.Tensor],
    classes: torch.Tensor,
    change: torch.Tensor,
    death: torch.Tensor,
    cw: torch.Tensor,
    pos_weight: torch.Tensor,
) -> torch.Tensor:
    """Weighted cross-entropy of each target's sign, MSE of log1p |change| where it changed,
    weighted BCE of death."""
    n = classes.shape[1]
    ce = sum(F.cross_entropy(out["logits"][:, i].float(), classes[:, i], weight=cw[i]) for i in range(n))
    moved = classes != 1
    size = (
        F.mse_loss(out["size"].float()[moved], torch.log1p(change.abs())[moved])
        if moved.any()
        else out["size"].sum() * 0.0
    )
    bce = F.binary_cross_entropy_with_logits(out["death"].float(), death, pos_weight=pos_weight)
    return ce + size + bce


def roc_auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes.

    Example:
        >>> roc_auc(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0]))
        1.0
    """
    pos, neg = score[label > 0], score[label <= 0]
    if not len(pos) or not len(neg):
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks over ties
        m = allv == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class RewardTask:
    """The :class:`~worldgen.training.common.Task` of fitting a reward head to transitions."""

    def __init__(
        self,
        cfg: RewardTrainConfig,
        model: RewardHead,
        train_set: Transitions,
        eval_set: Transitions,
        d: Dist,
        eval_split: str = "heldout",
    ):
        self.cfg, self.model, self.device, self.dist = cfg, model, d.device, d
        self.train_set, self.eval_set, self.eval_split = train_set.to(d.device), eval_set.to(d.device), eval_split
        self.cw, self.pos_weight = (x.to(d.device) for x in class_weights(train_set, cfg.balance))
        if not 0 <= cfg.event_fraction < 1:
            raise ValueError(f"--event-fraction must lie in [0, 1), got {cfg.event_fraction}")
        self.event_idx = torch.nonzero(self.train_set.events).flatten()
        self.n_events = round(cfg.batch_size * cfg.event_fraction) if len(self.event_idx) else 0
        bias, death_bias = prior_bias(train_set, self.n_events / cfg.batch_size)
        model.logit_bias.copy_(bias)
        model.death_bias.copy_(death_bias)
        self.weights = parse_weights(cfg.weights)
        self.tokens_per_sample = 1  # "tokens/s" in the log are transitions/s
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_run(cls, cfg: RewardTrainConfig, run: Run, d: Dist) -> RewardTask:
        from worldgen.training.tokenizer import open_dataset

        ds, train, held = open_dataset(cfg)
        w, h = ds.resolution
        down = pool_factor(w, h, cfg.downsample or max(1, w // 80))
        torch.manual_seed(cfg.seed)
        head = RewardHead(
            RewardHeadConfig(
                frame_size=(h, w),
                downsample=down,
                targets=tuple(t.strip() for t in cfg.targets.split(",") if t.strip()),
                channels=tuple(int(c) for c in cfg.channels.split(",")),
            )
        )
        t0 = time.time()
        train_set = build_transitions(ds, train, head)
        eval_set = build_transitions(ds, held or train, head)
        if cfg.generated:
            generated = rollout_transitions(cfg.generated, head)
            if d.main:
                print(
                    f"[train] reward head: + {len(generated)} generated transitions of {cfg.generated}", file=sys.stderr
                )
            train_set = Transitions.cat([train_set, generated])
        if d.main:
            print(
                f"[train] reward head: {len(train_set)} train transitions ({int(train_set.death.sum())} deaths, "
                f"changes {dict(zip(head.cfg.targets, (train_set.classes != 1).sum(0).tolist()))}), "
                f"{len(eval_set)} {'heldout' if held else 'train'} for metrics, frames pooled "
                f"{down}x to {head.cfg.input_size} ({time.time() - t0:.1f} s)",
                file=sys.stderr,
            )
        return cls(cfg, head, train_set, eval_set, d, "heldout" if held else "train")

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        t = self.train_set
        i = torch.randint(len(t), (self.cfg.batch_size - self.n_events,), generator=generator, device=self.device)
        if self.n_events:
            j = torch.randint(len(self.event_idx), (self.n_events,), generator=generator, device=self.device)
            i = torch.cat([i, self.event_idx[j]])
        i = self.dist.shard(i)  # this rank's transitions of the global batch (events spread over the ranks)
        out = model(t.frames[t.prev[i]], t.frames[t.prev[i] + 1], t.action[i])
        return head_loss(out, t.classes[i], t.change[i], t.death[i], self.cw, self.pos_weight)

    def flops_per_sample(self) -> float | None:
        return None  # MFU of a head this small says nothing; transitions/s is logged

    @torch.no_grad()
    def predict(self, model: nn.Module, n: int | None = None, batch: int = 512) -> dict[str, torch.Tensor]:
        """Outputs over the first ``n`` eval transitions (all if None), concatenated."""
        t = self.eval_set
        n = len(t) if n is None else min(n, len(t))
        outs = []
        for s in range(0, n, batch):
            i = torch.arange(s, min(s + batch, n), device=self.device)
            with autocast(self.device):
                outs.append(model(t.frames[t.prev[i]], t.frames[t.prev[i] + 1], t.action[i]))
        return {k: torch.cat([o[k].float() for o in outs]) for k in outs[0]}

    def _metrics(self, model: nn.Module, n: int | None) -> dict[str, Any]:
        t, split = self.eval_set, self.eval_split
        out = self.predict(model, n)
        m = len(out["death"])
        classes, change, death = t.classes[:m], t.change[:m], t.death[:m]
        loss = head_loss(out, classes, change, death, self.cw, self.pos_weight).item()
        res: dict[str, Any] = {"heldout_loss": loss, f"{split}_transitions": m}
        probs, p_death_t = model.probs(out)
        pred = probs.argmax(-1)
        for i, name in enumerate(self.model.cfg.targets):
            c, p = classes[:, i], pred[:, i]
            recall = {
                k: (float((p[c == j] == j).float().mean()) if (c == j).any() else None) for j, k in enumerate(CLASSES)
            }
            present = [r for r in recall.values() if r is not None]
            score = probs[:, i].cpu().numpy()
            truth = c.cpu().numpy()
            res[f"{split}_{name}"] = {
                "accuracy": float((p == c).float().mean()),
                "balanced_accuracy": sum(present) / len(present),
                "always_same_accuracy": float((c == 1).float().mean()),
                "recall": recall,
                "counts": {k: int((c == j).sum()) for j, k in enumerate(CLASSES)},
                # How well P(class) ranks the steps of that class above the rest, whatever the threshold.
                "auc": {
                    k: roc_auc(score[:, j], (truth == j).astype(float)) for j, k in enumerate(CLASSES) if k != "same"
                },
            }
        p_death = p_death_t.cpu().numpy()
        label = death.cpu().numpy()
        said = p_death > 0.5
        pos = label > 0
        res[f"{split}_death"] = {
            "recall": float(said[pos].mean()) if pos.any() else None,
            "precision": float(pos[said].mean()) if said.any() else None,
            "balanced_accuracy": float((said[pos].mean() + (~said[~pos]).mean()) / 2) if pos.any() else None,
            "auc": roc_auc(p_death, label),
            "positives": int(pos.sum()),
            "predicted": int(said.sum()),
        }
        w = torch.tensor([self.weights.get(k, 0.0) for k in self.model.cfg.targets], device=self.device)
        r_pred = model.expected_change(out) @ w + self.weights.get("death", 0.0) * p_death_t
        r_true = change @ w + self.weights.get("death", 0.0) * death
        corr = torch.corrcoef(torch.stack([r_pred, r_true]))[0, 1]
        res[f"{split}_reward"] = {
            "pearson": float(corr) if torch.isfinite(corr) else None,
            "mae": float((r_pred - r_true).abs().mean()),
            "mae_zero_baseline": float(r_true.abs().mean()),
        }
        return res

    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        self.metrics = self._metrics(ema_model, self.cfg.eval_transitions)
        # The log and loss plot take numbers; the nested metrics go to summary.json at the end.
        flat = {"heldout_loss": self.metrics["heldout_loss"]}
        for k, v in self.metrics.items():
            if isinstance(v, dict) and v.get("balanced_accuracy") is not None:
                flat[f"{k}_balanced_accuracy"] = v["balanced_accuracy"]
        return flat

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        self.metrics = self._metrics(ema_model, None)
        return self.metrics

    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """The 8 eval transitions the head finds most rewarding or deadly: frame over next frame."""
        out = self.predict(ema_model, self.cfg.eval_transitions)
        w = torch.tensor([abs(self.weights.get(k, 0.0)) for k in self.model.cfg.targets], device=self.device)
        score = ema_model.expected_change(out).abs() @ w + ema_model.probs(out)[1]
        top = score.topk(min(8, len(score))).indices
        t = self.eval_set
        rows = [t.frames[t.prev[top] + k].movedim(1, -1).cpu().numpy() for k in (0, 1)]
        save_image_rows(rows, folder / f"step-{step:07d}.png")

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        save_head(
            folder,
            ema_model,
            self.weights,
            {
                "train": {"data": str(self.cfg.data), "steps": step, "config": dataclasses.asdict(self.cfg)},
                "metrics": self.metrics,
            },
            dtype=dtype,
        )


def train(cfg: RewardTrainConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a reward-head training run in ``cfg.out``; returns its summary.

    Example:
        >>> train(RewardTrainConfig(data="data/reward-doom", out="runs/reward", minutes=5))  # doctest: +SKIP
    """
    parse_weights(cfg.weights)  # a typo fails now, not after the data is pooled
    return common.train("reward", cfg, given, RewardTask.from_run)
