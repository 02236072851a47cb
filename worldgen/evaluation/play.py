"""The play suite: what a player feels, scored against the game itself.

``worldgen eval`` scores a rollout against the one future that was recorded, which cannot tell
a model that follows the keys from one that blurs towards an average. ViZDoom can answer "what
if the player had done X from here" exactly, so this suite scores a model against the game's
own answers (docs/evaluation.md tells the whole story):

* **branches**: from the real context of each window, every action of :data:`BRANCHES` held for
  ``horizon`` steps. Per branch and horizon: PSNR and SSIM against the game's frame for the same
  action; the own-versus-other gap (PSNR to the game's frame for the same action minus the mean
  PSNR to the game's frames for the other actions: 0 dB = the actions are ignored); branch
  identification (is the game's frame nearest the model's the one for the same action, among
  the branches the game tells apart at that step, :func:`told_apart`), chance beside it.
* **revisits**: a 360-degree turn in mouse-yaw steps and out-and-back walks (forward k, turn 180
  degrees, forward k, turn 180 degrees): the frame on return against the departure frame and
  against the game's own frame on return.
* **camera**: per step, the camera motion an odometry measures on the model's frames against
  the game's true pose change on the same case: yaw error (degrees), forward error (map units)
  and the share of turns and walks whose direction agrees.

Each is reported for the model, for the last context frame held still (the floor: it ignores
every action, so its gap is 0 and its identification accuracy is chance) and for the game's own
frames (the ceiling: ViZDoom replays are deterministic, and the recorder checks that every
replay reproduces the recorded frame it starts from).

The game's side is a *branch recording* (:func:`load_recording`), made on the env side by
``worldgen.env.sources.play_suite.record_branches``; this module imports nothing of the env, so a
recording made with seeds nobody else has seen scores any model the same way. A branch
recording is a worldgen dataset (checksummed shards, atomic index) whose episodes are, per
window ``w``: ``w003-context``, the recorded frames ``start - 1 .. start + context - 1`` in the
dataset's alignment (its first frame only carries the action that produced the second), and
one episode per case, ``w003-forward`` ..., holding the last context frame (the departure) then
the game's K frames, ``keys[i]``/``mouse[i]`` the case's action i (the last one a no-op). Every
episode has the camera poses and, where the recording it was made from has depth, the depth in
uint8 levels: a model that plays with a world cache starts its sessions from the context's depth
and poses. The index's ``source`` (``kind: "play-branches"``) holds the script and where the
windows came from.

Keys of the JSON (:func:`evaluate_play`; stable: a key is only ever added, never changes meaning
without bumping ``version``). ``P`` below is one of ``model``, ``hold_last``, ``game``:

* ``suite``: ``"play"``; ``version``: 1; ``checkpoint``, ``recording``, ``recording_of``: the
  model, the branch recording and the recording its windows came from; ``split``.
* ``windows``, ``window_starts`` (``[[episode id, first context frame], ...]``, episode-id order),
  ``context``, ``horizon``, ``horizons`` (those reported by name), ``yaw_step_deg``, ``walks``.
* ``sampler``: the model's settings as the player reported them.
* ``replay_matched``: share of the game's replays that reproduced the recorded departure frame.
  ``game_deterministic``: share of windows whose longest case, replayed a second time, gave the
  same frames and poses: where it is 1 the game's own frames are the ceiling; below 1 the game
  is not deterministic there and the ceiling is lower than the ``game`` rows say.
* ``branches``: ``names``; ``distinct_db`` (two game frames closer than this PSNR count as the
  same, :func:`told_apart`); ``told_apart@h``: mean share of branches the game tells apart at
  step h; ``chance@h``: the identification accuracy of a guess (``chance_curve``: at h = 1 ..
  horizon); and per ``P``:
  ``P.mean`` = ``{"psnr@h", "ssim@h", "gap_db@h", "accuracy@h"}`` (means over windows and
  branches; accuracy over the branches told apart), ``P.per_branch`` = ``{name: {"psnr@h",
  "ssim@h", "gap_db@h", "accuracy@h"}}`` (accuracy null where the game never told the branch
  apart), ``P.curves`` = ``{"psnr", "gap_db", "accuracy"}`` at h = 1 .. horizon (lists).
* ``revisits``: per case (``turn360``, ``out_back_8``, ...): ``steps``, and per ``P``
  ``psnr_vs_departure``, ``ssim_vs_departure`` (the frame on return against the last context
  frame) and, for ``model`` and ``hold_last``, ``psnr_vs_game``, ``ssim_vs_game`` (against the
  game's own frame on return).
* ``per_map``: where the model is weak, by the map of each window (recordings that name their
  maps): ``{map: {"windows", P: {...}}}``; for ``model`` and ``hold_last`` ``psnr@1``,
  ``psnr@H`` (H the last reported horizon), ``accuracy@4``, ``gap_db@8`` (the last horizon where
  shorter), and for every ``P`` ``{case}_vs_departure`` per revisit case (PSNR of the return).
* ``camera``: null without an odometry, else ``odometry`` (what measured it) and per ``P``
  ``{case: {"yaw_err_deg", "forward_err", "yaw_sign_agreement", "forward_sign_agreement"},
  "all": {...}}``: mean absolute errors per step against the game's true motion, and the share
  of steps with a true turn (|yaw| >= 1 degree) or walk (|forward| >= 1 map unit) whose sign
  the measure on the frames got right (a measured motion under those counts as none). ``game``
  is the measure on the game's own frames: its own error, the ceiling.
* ``psnr_cap_db``, ``device``, ``seconds``, ``files`` (``{"dashboard", "video"}``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from worldgen.actions import Action
from worldgen.data import Dataset
from worldgen.evaluation.evaluate import EvaluationError, has_ffmpeg, write_json
from worldgen.evaluation.metrics import PSNR_CAP_DB, by_map, psnr, ssim
from worldgen.files import atomic_write

VERSION = 1
KIND = "play-branches"  # the ``source.kind`` of a branch recording's index
HORIZONS = (1, 4, 8, 16)  # branch horizons reported by name (issue 21)
PREDICTORS = ("model", "hold_last", "game")

# The branches: one action held for the whole horizon. Mouse yaw by YAW_STEP_DEG, a brisk turn
# the explorer makes all the time (it steers at up to 15 degrees a step) and the unit the model
# sees mouse deltas in (actions.MOUSE_SCALE_DEG).
YAW_STEP_DEG = 10.0
BRANCHES: dict[str, Action] = {
    "noop": Action.noop(),
    "forward": Action.from_keys(["forward"]),
    "back": Action.from_keys(["back"]),
    "strafe_left": Action.from_keys(["strafe_left"]),
    "strafe_right": Action.from_keys(["strafe_right"]),
    "turn_left": Action.from_keys(["turn_left"]),
    "turn_right": Action.from_keys(["turn_right"]),
    "yaw_left": Action.from_keys(yaw=-YAW_STEP_DEG),
    "yaw_right": Action.from_keys(yaw=YAW_STEP_DEG),
    "attack": Action.from_keys(["attack"]),
    "use": Action.from_keys(["use"]),
}


@dataclass(frozen=True)
class PlayScript:
    """What the game and the model play from every window: the branches, then the revisits."""

    horizon: int = 16  # steps each branch is held: the longest horizon reported
    yaw_step: float = YAW_STEP_DEG  # degrees per mouse-yaw step of the yaw branches and of every turn
    walks: tuple[int, ...] = (8, 16)  # k of the out-and-back walks (forward k, turn 180, forward k, turn 180)

    def __post_init__(self) -> None:
        if self.horizon < 1 or any(k < 1 for k in self.walks):
            raise ValueError(f"horizon and walks must be >= 1, got {self.horizon}, {self.walks}")
        if not 0 < self.yaw_step <= 90 or (180.0 / self.yaw_step) % 1:
            raise ValueError(f"yaw_step must divide 180 degrees and lie in (0, 90], got {self.yaw_step}")

    def cases(self) -> dict[str, list[Action]]:
        """Case name -> its actions, branches first (in :data:`BRANCHES` order), then revisits.
        Every turn of a revisit is to the right, by mouse, ``yaw_step`` degrees a step."""
        right = Action.from_keys(yaw=self.yaw_step)
        held = {**BRANCHES, "yaw_left": Action.from_keys(yaw=-self.yaw_step), "yaw_right": right}
        cases = {name: [a] * self.horizon for name, a in held.items()}
        half = int(round(180.0 / self.yaw_step))  # steps of a 180-degree turn
        cases["turn360"] = [right] * (2 * half)
        forward = Action.from_keys(["forward"])
        for k in self.walks:
            cases[f"out_back_{k}"] = ([forward] * k + [right] * half) * 2
        return cases


def is_revisit(name: str) -> bool:
    return name not in BRANCHES


# --- the game's side: a branch recording -----------------------------------------------------
@dataclass
class PlayRecording:
    """A branch recording in memory. N windows, c context frames, K_case steps per case."""

    root: Path
    source: dict[str, Any]
    starts: list[list]  # [[episode id, first context frame], ...] in window order
    context: np.ndarray  # (N, c, H, W, 3) uint8, the real context
    context_keys: np.ndarray  # (N, c, 8) the actions that produced the context frames
    context_mouse: np.ndarray  # (N, c, 2)
    context_pose: np.ndarray  # (N, c, 5)
    context_depth: np.ndarray | None = None  # (N, c, H, W) uint8 levels, where the recording has depth
    maps: list[str | None] = field(default_factory=list)  # each window's map, where the recording names it
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # case -> (N, K, H, W, 3) the game's frames
    pose: dict[str, np.ndarray] = field(default_factory=dict)  # case -> (N, K, 5) the game's camera poses
    keys: dict[str, np.ndarray] = field(default_factory=dict)  # case -> (K, 8) its actions
    mouse: dict[str, np.ndarray] = field(default_factory=dict)  # case -> (K, 2)
    matched: float = 1.0  # share of replays that reproduced the recorded departure frame
    deterministic: float | None = None  # share of windows whose longest case replayed twice came out identical

    @property
    def cases(self) -> list[str]:
        return list(self.frames)


def load_recording(path: str | Path) -> PlayRecording:
    """Read a branch recording (module docstring); a folder that is not one is an
    :class:`EvaluationError` naming what is wrong."""
    ds = Dataset(path)
    src = ds.index["source"]
    if src.get("kind") != KIND:
        raise EvaluationError(
            f"{ds.root}: not a branch recording (its index source has kind "
            f"{src.get('kind')!r}, not {KIND!r}); make one with `worldgen eval --suite play "
            f"--data RECORDING` or worldgen.env.sources.play_suite.record_branches"
        )
    by_window: dict[int, dict[str, int]] = {}
    for i, e in enumerate(ds.episodes):
        if not {"window", "case", "of", "replay_matched"} <= set(e.extra):
            raise EvaluationError(f"{ds.root}: episode {e.id!r} does not say which window and case it is")
        by_window.setdefault(int(e.extra["window"]), {})[e.extra["case"]] = i
    windows = [by_window[w] for w in sorted(by_window)]
    cases = [c for c in windows[0] if c != "context"] if windows else []
    if not cases or "context" not in windows[0] or any(sorted(w) != sorted(windows[0]) for w in windows):
        raise EvaluationError(f"{ds.root}: every window must hold a context and the same cases")
    ds.validate()
    c = int(src["context"])

    def ctx(w: dict[str, int], name: str) -> np.ndarray:
        return ds.read(w["context"], name)

    rec = PlayRecording(
        root=ds.root,
        source=src,
        starts=[list(ds.episodes[w["context"]].extra["of"]) for w in windows],
        context=np.stack([ctx(w, "frames")[1:] for w in windows]),
        # Dataset alignment: keys[i] follows frame i, so keys[0..c-1] made frames 1..c.
        context_keys=np.stack([ctx(w, "keys")[:c] for w in windows]),
        context_mouse=np.stack([ctx(w, "mouse")[:c] for w in windows]),
        context_pose=np.stack([ctx(w, "pose")[1:] for w in windows]),
        context_depth=np.stack([ctx(w, "depth")[1:] for w in windows]) if "depth" in ds.fields else None,
        maps=[ds.episodes[w["context"]].map for w in windows],
    )
    matched = [ds.episodes[w[k]].extra["replay_matched"] for w in windows for k in cases]
    rec.matched = float(np.mean(matched))
    repeats = [ds.episodes[w["context"]].extra.get("repeat_identical") for w in windows]
    rec.deterministic = None if None in repeats else float(np.mean(repeats))
    for name in cases:
        rec.frames[name] = np.stack([ds.read(w[name], "frames")[1:] for w in windows])
        rec.pose[name] = np.stack([ds.read(w[name], "pose")[1:] for w in windows])
        rec.keys[name] = ds.read(windows[0][name], "keys")[:-1]
        rec.mouse[name] = ds.read(windows[0][name], "mouse")[:-1]
    if rec.context.shape[1] != c:
        raise EvaluationError(f"{ds.root}: context episodes hold {rec.context.shape[1]} frames, index says {c}")
    return rec


# --- the players ---------------------------------------------------------------------------------
class Player(Protocol):
    """What the suite plays: N contexts, each continued by the same K actions."""

    def play(
        self,
        context: np.ndarray,
        context_keys: np.ndarray,
        context_mouse: np.ndarray,
        keys: np.ndarray,
        mouse: np.ndarray,
        seeds: list[int],
        progress: Callable[[int], None] | None = None,
        context_depth: np.ndarray | None = None,
        context_pose: np.ndarray | None = None,
    ) -> np.ndarray:
        """context (N, c, H, W, 3) uint8 with the actions that produced it (N, c, 8), (N, c, 2);
        keys (K, 8), mouse (K, 2): the actions to play; ``seeds``: one per context (the same
        window gets the same noise in every case); ``progress`` is called with the number of
        frames made as they are made; ``context_depth`` (N, c, H, W) uint8 levels (None where the
        recording has no depth) and ``context_pose`` (N, c, 5): the context's geometry, for a
        player that needs it -> (N, K, H, W, 3) uint8."""
        ...


class EnginePlayer:
    """A :class:`~worldgen.engine.WorldModel` played as a player plays it: a streaming session
    per context (its rolling cache, its sampler settings), all stepped together by ``step_many``
    in batches of ``batch`` sessions. A world-cache model's sessions start from the context's
    depth and true poses (their clouds), and play on predicted poses as any session does."""

    def __init__(self, wm: Any, batch: int = 64):
        if batch < 1:
            raise EvaluationError(f"need --batch >= 1, got {batch}")
        self.wm, self.batch = wm, batch

    @property
    def sampler(self) -> dict[str, Any]:
        s = self.wm.stream
        return {
            "steps": s.steps,
            "ctx_noise": s.ctx_noise,
            "shift": s.shift,
            "guidance": s.guidance,
            "sinks": s.sinks,
            "window": s.window,
            "batch": self.batch,
        }

    def play(
        self,
        context: np.ndarray,
        context_keys: np.ndarray,
        context_mouse: np.ndarray,
        keys: np.ndarray,
        mouse: np.ndarray,
        seeds: list[int],
        progress: Callable[[int], None] | None = None,
        context_depth: np.ndarray | None = None,
        context_pose: np.ndarray | None = None,
    ) -> np.ndarray:
        acts = [Action(k, m) for k, m in zip(keys, mouse)]
        world = self.wm.world is not None
        if world and (context_depth is None or context_pose is None):
            raise EvaluationError(
                "the model plays with a world cache: its sessions start from the context's depth and camera "
                "poses, and this branch recording has no depth; record it again from a recording with depth"
            )
        out = []
        for lo in range(0, len(context), self.batch):
            hi = min(lo + self.batch, len(context))
            sessions = [
                self.wm.session(
                    context[i],
                    [Action(k, m) for k, m in zip(context_keys[i], context_mouse[i])],
                    seed=seeds[i],
                    **({"context_depth": context_depth[i], "context_poses": context_pose[i]} if world else {}),
                )
                for i in range(lo, hi)
            ]
            try:
                steps = []
                for a in acts:
                    steps.append(self.wm.step_many(sessions, [a] * len(sessions)))  # (b, H, W, 3)
                    if progress is not None:
                        progress(len(sessions))
                out.append(np.stack(steps, 1))  # (b, K, H, W, 3)
            finally:
                for s in sessions:
                    s.close()
        return np.concatenate(out)


class HoldLast:
    """The floor: the last context frame, held still whatever the actions."""

    def play(
        self,
        context: np.ndarray,
        context_keys: np.ndarray,
        context_mouse: np.ndarray,
        keys: np.ndarray,
        mouse: np.ndarray,
        seeds: list[int],
        progress: Callable[[int], None] | None = None,
        context_depth: np.ndarray | None = None,
        context_pose: np.ndarray | None = None,
    ) -> np.ndarray:
        return np.repeat(context[:, -1:], len(keys), 1)


class Odometry(Protocol):
    """Camera motion per step, ``(B, 5)`` = forward, left, up (map units), yaw, pitch (degrees)."""

    name: str

    def estimate(self, prev: np.ndarray, keys: np.ndarray, mouse: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Measured on frames: prev, nxt (B, H, W, 3) uint8 with the action between (B, 8), (B, 2)."""
        ...

    def truth(self, pose: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """The true motion between camera poses (B, 5) and (B, 5)."""
        ...


# --- scoring -------------------------------------------------------------------------------------
@dataclass
class PlayConfig:
    # Two game frames closer than this count as the same view. 30 dB is an RMS error of ~8 of 255
    # levels: below it a player sees no difference (weapon bob and monsters moving a little).
    distinct_db: float = 30.0
    seed: int = 0  # the model's sampler noise: window w plays with seed * 100_003 + w
    video_windows: int = 2  # windows shown in the mp4 (each: every branch, then the revisits)
    progress: bool = True  # a progress bar with an ETA over the frames the model makes


def told_apart(game: torch.Tensor, distinct_db: float) -> torch.Tensor:
    """Which branches the game tells apart at one step: ``game`` (B, H, W, 3) uint8, one frame per
    branch -> bool (B,), True where the branch's frame differs from every other branch's by more
    than ``distinct_db`` (PSNR below it).

    Example:
        >>> f = torch.zeros(3, 4, 4, 3, dtype=torch.uint8); f[2] = 255
        >>> told_apart(f, 30.0).tolist()   # branches 0 and 1 look the same; 2 stands apart
        [False, False, True]
    """
    b = len(game)
    q = psnr(game[:, None].expand(b, b, *game.shape[1:]), game[None].expand(b, b, *game.shape[1:]))  # (B, B)
    q.fill_diagonal_(-1.0)
    return (q < distinct_db).all(1)


def _psnr_matrix(pred: torch.Tensor, game: torch.Tensor) -> torch.Tensor:
    """(N, B, H, W, 3) each -> (N, B, B): PSNR of predicted branch b against the game's branch b'."""
    # One game branch at a time: N B images in memory, not N B B.
    return torch.stack([psnr(pred, game[:, j : j + 1].expand_as(pred)) for j in range(game.shape[1])], 2)


def score_branches(pred: torch.Tensor, game: torch.Tensor, apart: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per window, branch and step: ``psnr``, ``ssim``, ``gap_db`` (N, B, K) and ``correct``
    (N, B, K; NaN where the branch is not told apart), for predictions ``pred`` and the game's
    frames ``game`` (N, B, K, H, W, 3) uint8 and ``apart`` (N, B, K) bool (:func:`told_apart`)."""
    n, b, k = pred.shape[:3]
    out = {name: torch.zeros(n, b, k, device=pred.device) for name in ("psnr", "ssim", "gap_db", "correct")}
    off = ~torch.eye(b, dtype=torch.bool, device=pred.device)
    for t in range(k):
        p = _psnr_matrix(pred[:, :, t], game[:, :, t])  # (N, B, B)
        own = p.diagonal(dim1=1, dim2=2)  # (N, B)
        out["psnr"][..., t] = own
        out["gap_db"][..., t] = own - (p * off).sum(2) / max(b - 1, 1)
        out["ssim"][..., t] = ssim(pred[:, :, t], game[:, :, t])
        # Nearest game frame among the branches told apart; a branch not told apart is not scored.
        masked = p.masked_fill(~apart[:, None, :, t], float("-inf"))
        nearest = masked.argmax(2)  # (N, B)
        hit = (nearest == torch.arange(b, device=pred.device)).float()
        out["correct"][..., t] = hit.masked_fill(~apart[..., t], float("nan"))
    return out


def _nanmean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    valid = ~x.isnan()
    return torch.where(valid, x, 0).sum(dims) / valid.sum(dims).clamp(min=1)


def _r(x: Any) -> float | None:
    v = float(x)
    return None if np.isnan(v) else round(v, 4)


def _branch_report(scores: dict[str, torch.Tensor], names: list[str], horizons: list[int]) -> dict[str, Any]:
    per = {"psnr": scores["psnr"], "ssim": scores["ssim"], "gap_db": scores["gap_db"], "accuracy": scores["correct"]}
    mean_curves = {m: _nanmean(v, (0, 1)) for m, v in per.items()}  # (K,)
    per_branch_curves = {m: _nanmean(v, (0,)) for m, v in per.items()}  # (B, K)
    told = ~scores["correct"].isnan()
    return {
        "mean": {f"{m}@{h}": _r(mean_curves[m][h - 1]) for m in per for h in horizons},
        "per_branch": {
            name: {
                f"{m}@{h}": (_r(per_branch_curves[m][i, h - 1]) if m != "accuracy" or told[:, i, h - 1].any() else None)
                for m in per
                for h in horizons
            }
            for i, name in enumerate(names)
        },
        "curves": {m: [_r(v) for v in mean_curves[m].tolist()] for m in ("psnr", "gap_db", "accuracy")},
    }


def _per_map(
    maps: list[str | None],
    scores: dict[str, dict[str, torch.Tensor]],
    returned: dict[str, dict[str, torch.Tensor]],
    horizons: list[int],
) -> dict[str, Any]:
    """The headline numbers per map of the windows: for ``model`` and ``hold_last`` the branches'
    PSNR at the first and last reported step, identification at step 4 and the gap at step 8 (or
    the last step where the horizon is shorter), and for every predictor each revisit's return
    against its departure."""
    last, ident, gap = horizons[-1], min(4, horizons[-1]), min(8, horizons[-1])
    out: dict[str, Any] = {}
    for p in PREDICTORS:
        per = {f"{case}_vs_departure": v for case, v in returned[p].items()}
        if p != "game":  # the game against itself is the cap
            s = scores[p]
            per = {
                "psnr@1": s["psnr"][..., 0],
                f"psnr@{last}": s["psnr"][..., last - 1],
                f"accuracy@{ident}": s["correct"][..., ident - 1],
                f"gap_db@{gap}": s["gap_db"][..., gap - 1],
                **per,
            }
        for m, entry in by_map(maps, per).items():
            out.setdefault(m, {"windows": entry.pop("windows")})[p] = entry
    return out


def _camera(odometry: Odometry, rec: PlayRecording, frames: dict[str, np.ndarray]) -> dict[str, Any]:
    """Odometry on ``frames`` (case -> (N, K, H, W, 3)) against the game's pose changes."""
    report, errs = {}, []
    for name, f in frames.items():
        n, k = f.shape[:2]
        prev = np.concatenate([rec.context[:, -1:], f[:, :-1]], 1)  # (N, K, H, W, 3)
        poses = np.concatenate([rec.context_pose[:, -1:], rec.pose[name]], 1)  # (N, K + 1, 5)
        est = odometry.estimate(
            prev.reshape(-1, *f.shape[2:]),
            np.tile(rec.keys[name], (n, 1)),
            np.tile(rec.mouse[name], (n, 1)),
            f.reshape(-1, *f.shape[2:]),
        )  # (N K, 5)
        true = odometry.truth(poses[:, :-1].reshape(-1, 5), poses[:, 1:].reshape(-1, 5))  # (N K, 5)
        errs.append((est, true))
        report[name] = _motion_scores(est, true)
    report["all"] = _motion_scores(np.concatenate([e for e, _ in errs]), np.concatenate([t for _, t in errs]))
    return report


def _motion_scores(est: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """Mean absolute yaw (degrees) and forward (map units) error per step, and sign agreement."""
    yaw_err = np.abs((est[:, 3] - true[:, 3] + 180.0) % 360.0 - 180.0)

    def agree(col: int, least: float) -> float | None:  # a motion under `least` counts as none
        moving = np.abs(true[:, col]) >= least
        sign = np.sign(est[moving, col]) * (np.abs(est[moving, col]) >= least)
        return _r(np.mean(sign == np.sign(true[moving, col]))) if moving.any() else None

    return {
        "yaw_err_deg": _r(yaw_err.mean()),
        "forward_err": _r(np.abs(est[:, 0] - true[:, 0]).mean()),
        "yaw_sign_agreement": agree(3, 1.0),
        "forward_sign_agreement": agree(0, 1.0),
    }


def evaluate_play(
    recording: str | Path | PlayRecording,
    player: Player,
    *,
    odometry: Odometry | None = None,
    cfg: PlayConfig | None = None,
    media: str | Path | None = None,
    checkpoint: str | None = None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Play every case of a branch recording with ``player`` and score it (module docstring);
    write ``play_dashboard.png`` and ``play.mp4`` under ``media`` (the video where ffmpeg is)."""
    t0 = time.perf_counter()
    cfg = cfg or PlayConfig()
    rec = recording if isinstance(recording, PlayRecording) else load_recording(recording)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, c = rec.context.shape[:2]
    names = [k for k in rec.cases if not is_revisit(k)]
    revisits = [k for k in rec.cases if is_revisit(k)]
    if len(names) < 2:
        raise EvaluationError(f"{rec.root}: needs 2 or more branches to compare, has {names}")
    horizon = min(len(rec.keys[k]) for k in names)
    horizons = [h for h in HORIZONS if h <= horizon] or [horizon]
    seeds = [cfg.seed * 100_003 + w for w in range(n)]
    total = n * sum(len(rec.keys[k]) for k in rec.cases)
    log(f"play suite: {n} windows x {len(rec.cases)} cases ({total} frames to make) from {rec.root}")

    made: dict[str, dict[str, np.ndarray]] = {"model": {}, "hold_last": {}, "game": rec.frames}
    with tqdm(total=total, unit="frame", desc="play suite", disable=not cfg.progress) as bar:
        geometry = {"context_depth": rec.context_depth, "context_pose": rec.context_pose}
        for name in rec.cases:
            args = (rec.context, rec.context_keys, rec.context_mouse, rec.keys[name], rec.mouse[name], seeds)
            made["model"][name] = player.play(*args, progress=bar.update, **geometry)
            made["hold_last"][name] = HoldLast().play(*args)
    expect = rec.frames[names[0]].shape
    if made["model"][names[0]].shape != expect or made["model"][names[0]].dtype != np.uint8:
        raise EvaluationError(
            f"the player made {made['model'][names[0]].shape} {made['model'][names[0]].dtype} "
            f"frames for {expect} uint8 (does the model's frame size match the recording's?)"
        )

    def stack(frames: dict[str, np.ndarray]) -> torch.Tensor:  # (N, B, K, H, W, 3)
        return torch.from_numpy(np.stack([frames[k][:, :horizon] for k in names], 1)).to(device)

    game = stack(rec.frames)
    apart = torch.stack(
        [torch.stack([told_apart(game[i, :, t], cfg.distinct_db) for t in range(horizon)], -1) for i in range(n)]
    )  # (N, B, K)
    apart &= apart.sum(1, keepdim=True) >= 2  # identification needs two branches to choose from
    share = apart.float().mean((0, 1))  # (K,)
    chance = _nanmean(torch.where(apart, 1.0 / apart.sum(1, keepdim=True).clamp(min=1), torch.nan), (0, 1))
    branches: dict[str, Any] = {
        "names": names,
        "distinct_db": cfg.distinct_db,
        **{f"told_apart@{h}": _r(share[h - 1]) for h in horizons},
        **{f"chance@{h}": _r(chance[h - 1]) for h in horizons},
        "chance_curve": [_r(v) for v in chance.tolist()],
    }
    scores = {p: score_branches(stack(made[p]), game, apart) for p in PREDICTORS}
    for p in PREDICTORS:
        branches[p] = _branch_report(scores[p], names, horizons)

    departure = torch.from_numpy(rec.context[:, -1]).to(device)
    revisit_report, returned = {}, {p: {} for p in PREDICTORS}  # returned: P -> case -> (N,) PSNR
    for name in revisits:
        ret = {p: torch.from_numpy(made[p][name][:, -1]).to(device) for p in PREDICTORS}
        entry: dict[str, Any] = {"steps": len(rec.keys[name])}
        for p in PREDICTORS:
            returned[p][name] = psnr(ret[p], departure)
            entry[p] = {
                "psnr_vs_departure": _r(returned[p][name].mean()),
                "ssim_vs_departure": _r(ssim(ret[p], departure).mean()),
            }
            if p != "game":
                entry[p].update(
                    psnr_vs_game=_r(psnr(ret[p], ret["game"]).mean()), ssim_vs_game=_r(ssim(ret[p], ret["game"]).mean())
                )
        revisit_report[name] = entry

    camera = None
    if odometry is not None:
        camera = {"odometry": odometry.name, **{p: _camera(odometry, rec, made[p]) for p in PREDICTORS}}

    result = {
        "suite": "play",
        "version": VERSION,
        "checkpoint": checkpoint,
        "recording": str(rec.root),
        "recording_of": rec.source.get("of"),
        "split": rec.source.get("split"),
        "windows": n,
        "window_starts": rec.starts,
        "context": c,
        "horizon": horizon,
        "horizons": horizons,
        "yaw_step_deg": rec.source.get("script", {}).get("yaw_step"),
        "walks": rec.source.get("script", {}).get("walks"),
        "sampler": getattr(player, "sampler", None),
        "replay_matched": _r(rec.matched),
        "game_deterministic": None if rec.deterministic is None else _r(rec.deterministic),
        "branches": branches,
        "revisits": revisit_report,
        "per_map": _per_map(rec.maps, scores, returned, horizons),
        "camera": camera,
        "psnr_cap_db": round(PSNR_CAP_DB, 4),
        "device": str(device),
        "seconds": None,
        "files": {"dashboard": None, "video": None},
    }
    if media is not None:
        media = Path(media)
        write_dashboard(result, rec, made, media / "play_dashboard.png")
        result["files"]["dashboard"] = str(media / "play_dashboard.png")
        if cfg.video_windows > 0 and has_ffmpeg():
            write_play_video(rec, made, media / "play.mp4", cfg.video_windows)
            result["files"]["video"] = str(media / "play.mp4")
        elif cfg.video_windows > 0:
            log("warning: imageio-ffmpeg is not installed here; writing the dashboard but no video")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# --- outputs -------------------------------------------------------------------------------------
def write_dashboard(
    result: dict[str, Any], rec: PlayRecording, made: dict[str, dict[str, np.ndarray]], path: Path
) -> None:
    """One PNG: per branch the game's frame above the model's (first window, steps 4 and the
    horizon); the mean PSNR, gap and identification curves; the revisit pairs."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    br = result["branches"]
    names, horizon = br["names"], result["horizon"]
    revisits = list(result["revisits"])
    steps = sorted({min(4, horizon), horizon})
    cols = max(len(names), 3 * len(revisits), 3)
    rows = 2 * len(steps) + 1 + (2 if revisits else 0)  # frames, curves, a spacer for their labels, revisits
    fig = plt.figure(figsize=(1.6 * cols, 1.5 * rows + 1.5), dpi=110)
    grid = fig.add_gridspec(
        rows, cols, hspace=0.45, height_ratios=[1] * (2 * len(steps)) + [2.2] + ([0.3, 1] if revisits else [])
    )

    def show(r: int, col: int, img: np.ndarray, title: str = "", label: str = "") -> None:
        ax = fig.add_subplot(grid[r, col])
        ax.imshow(img)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title, fontsize=7)
        if label:
            ax.set_ylabel(label, fontsize=7)

    for j, t in enumerate(steps):
        for i, name in enumerate(names):
            show(2 * j, i, rec.frames[name][0, t - 1], f"{name} @{t}", "game" if i == 0 else "")
            show(2 * j + 1, i, made["model"][name][0, t - 1], "", "model" if i == 0 else "")

    h = np.arange(1, horizon + 1)
    # The game's own PSNR sits at the cap and its gap some 40 dB up: named in the title, not
    # drawn, so the model and the held frame are not squashed flat at the bottom.
    game = br["game"]["mean"]
    panels = [
        ("psnr", f"PSNR vs the game's frame (dB; game: {result['psnr_cap_db']:.1f})"),
        ("gap_db", f"own - other gap (dB; game: {game[f'gap_db@{horizon}'] or 0:+.1f} at {horizon})"),
        ("accuracy", "branch identification"),
    ]
    span = cols // 3
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(grid[2 * len(steps), k * span : (k + 1) * span])
        for p, style in (("model", "-"), ("hold_last", "--"), ("game", ":")):
            if p == "game" and key != "accuracy":
                continue
            ax.plot(h, [np.nan if v is None else v for v in br[p]["curves"][key]], style, label=p)
        if key == "accuracy":
            ax.plot(h, [np.nan if v is None else v for v in br["chance_curve"]], c="gray", lw=0.8, label="chance")
        ax.set(title=title, xlabel="steps after the context")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)

    for k, name in enumerate(revisits):
        r = result["revisits"][name]
        show(rows - 1, 3 * k, rec.context[0, -1], f"{name}: departure", "revisit" if k == 0 else "")
        show(rows - 1, 3 * k + 1, rec.frames[name][0, -1], f"game return ({r['game']['psnr_vs_departure']:.1f} dB)")
        show(
            rows - 1, 3 * k + 2, made["model"][name][0, -1], f"model return ({r['model']['psnr_vs_departure']:.1f} dB)"
        )
    fig.suptitle(
        f"play suite: {result['checkpoint']} on {result['windows']} windows of {result['recording']}", fontsize=9
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, bbox_inches="tight"))
    plt.close(fig)


def write_play_video(rec: PlayRecording, made: dict[str, dict[str, np.ndarray]], path: Path, windows: int) -> None:
    """H.264 video: for each of the first ``windows`` windows, every case with the game's frames
    above the model's, the cases side by side (the shorter ones hold their last frame)."""
    import imageio.v2 as imageio

    clips = []
    for w in range(min(windows, len(rec.context))):
        k = max(len(rec.keys[c]) for c in rec.cases)

        def padded(x: np.ndarray, k: int = k) -> np.ndarray:  # (K_case, H, W, 3) -> (k, H, W, 3)
            return np.concatenate([x, np.repeat(x[-1:], k - len(x), 0)])

        game = np.concatenate([padded(rec.frames[c][w]) for c in rec.cases], 2)  # (k, H, C W, 3)
        model = np.concatenate([padded(made["model"][c][w]) for c in rec.cases], 2)
        gap = np.full((k, 2, game.shape[2], 3), 255, np.uint8)
        clips.append(np.concatenate([game, gap, model], 1))  # (k, 2H + 2, C W, 3)
    frames = np.concatenate(clips)
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    fps = 35.0 / max(int(rec.source.get("doom", {}).get("frame_skip", 4)), 1)

    def write(tmp: str) -> None:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1) as writer:
            for f in frames:
                writer.append_data(f)

    atomic_write(path, write)


def summary(result: dict[str, Any]) -> str:
    """The headline numbers as a short table, for the terminal."""
    br, hs = result["branches"], result["horizons"]

    def f(v: float | None, fmt: str = "6.2f") -> str:
        return "     -" if v is None else format(v, fmt)

    lines = [f"branches ({len(br['names'])}): " + "   ".join(f"@{h}" for h in hs)]
    for p in PREDICTORS:
        m = br[p]["mean"]
        lines.append(
            f"  {p:<10} PSNR "
            + " ".join(f(m[f"psnr@{h}"]) for h in hs)
            + " | gap "
            + " ".join(f(m[f"gap_db@{h}"], "+6.2f") for h in hs)
            + " | id "
            + " ".join(f(m[f"accuracy@{h}"], "6.2f") for h in hs)
        )
    lines.append(f"  {'chance':<10} id " + " ".join(f(br[f"chance@{h}"], "6.2f") for h in hs))
    for name, r in result["revisits"].items():
        lines.append(
            f"revisit {name:<12} vs departure: model {f(r['model']['psnr_vs_departure'])}  game "
            f"{f(r['game']['psnr_vs_departure'])} | vs game's return: model {f(r['model']['psnr_vs_game'])}"
            f"  hold-last {f(r['hold_last']['psnr_vs_game'])}"
        )
    if result["camera"]:
        for p in PREDICTORS:
            a = result["camera"][p]["all"]
            lines.append(
                f"camera {p:<10} yaw err {f(a['yaw_err_deg'])} deg, forward err {f(a['forward_err'])} units, "
                f"turn signs {f(a['yaw_sign_agreement'], '5.2f')}, walk signs {f(a['forward_sign_agreement'], '5.2f')}"
            )
    for m, v in (result.get("per_map") or {}).items():
        model, held = v["model"], v["hold_last"]
        cols = [k for k in model if "@" in k]  # psnr@1, psnr@H, accuracy@4, gap_db@8
        turn = model.get("turn360_vs_departure")
        lines.append(
            f"map {m:<6} {v['windows']:>3} windows: "
            + ", ".join(f"{k} {f(model[k])} ({f(held[k])})" for k in cols)
            + (f", turn360 {f(turn)}" if "turn360_vs_departure" in model else "")
            + " (hold-last in brackets)"
        )
    lines.append(
        f"{result['windows']} windows, context {result['context']}; the game's replays matched the recording "
        f"{f(result['replay_matched'], '.0%')}, repeated identically {f(result['game_deterministic'], '.0%')}; "
        f"{result['seconds']} s on {result['device']}"
    )
    return "\n".join(lines)


__all__ = [
    "BRANCHES",
    "EnginePlayer",
    "HoldLast",
    "HORIZONS",
    "KIND",
    "Odometry",
    "PlayConfig",
    "PlayRecording",
    "PlayScript",
    "Player",
    "evaluate_play",
    "load_recording",
    "score_branches",
    "summary",
    "told_apart",
    "write_json",
]
