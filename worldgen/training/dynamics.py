"""``worldgen train dynamics``: Diffusion Forcing of the block-causal DiT on tokenizer latents.

Data path. First every train and held-out episode is encoded once by the frozen tokenizer, in
big batches on the device (under torchrun each rank encodes its share of the episodes), and
cached as ``RUN/latents-{train,heldout}.safetensors`` (a resume does not re-encode). All latents
(bf16, ~9.6 KB a frame at 16x15x20) and action vectors then live on the device, and each step
gathers its windows of T frames there: no DataLoader, no host-to-device copies, nothing to
starve the GPU. Windows never cross an episode boundary.

Actions: frame f's action is the one that *produced* it, exactly as
:class:`worldgen.data.WindowDataset` aligns them (that class reads each episode, so the
alignment lives in one place): the no-op for an episode's first frame.

Loss (Diffusion Forcing with flow matching, docs/architecture.md): every frame block gets its own
noise level t ~ logit-normal(0, 1) (SD3), ``x_t = (1 - t) x0 + t eps``, the DiT predicts
``v = eps - x0``, MSE over all frames. A share ``action_dropout`` of the frames gets the learned
null action instead of its own (classifier-free guidance's unconditional half). Independent
levels teach every context/target pattern; but with T = 16 almost no window has a clean
15-frame history, which is what inference conditions on (clean context labelled with a small
stabilisation level). So a share
``prefix_prob`` of the windows gets the inference pattern: a random number of leading blocks at
t ~ U[0, 2 ctx_noise], the rest logit-normal.

Training on its own rollouts (``rollout_frames`` G > 0, Self Forcing's idea with a regression
target). A model trained only on real context never sees the blur of
its own past frames, and a long rollout drifts to an average frame that no longer follows the
actions. So each step first lets the model play: from ``window - 1`` real frames it generates
g ~ U{0..G} frames with the real actions exactly as a streaming session would
(:func:`worldgen.engine.rollout_latents`: a session's default KV cache of ``window - 1`` frames,
``sample_steps`` Euler steps, writes stabilised at ``ctx_noise``; no gradient), and the training
window is the last ``window`` frames of real context + generated frames + s ~ U{1..window - g}
real frames that follow. Only those s frames are trained on (Diffusion Forcing levels, the generated frames labelled as
context): the model learns to continue its own rollout towards what really came next, which
only the actions can tell it. ``init`` starts such a fine-tune from a trained model.

With the world cache (``world_cache`` H > 0) a rollout builds its clouds from what it played, as a
session does: every generated frame is decoded to RGB-D by the tokenizer, and each later frame
of the window (generated or real) is conditioned on the cloud of its H predecessors, generated
ones included, rendered at its pose plus pose noise. So the model meets views with its own
depth errors and smears and learns to repair them rather than trust the cache blindly.

Frame memory (``memory_frames`` k > 0, DESIGN.md section 7, :mod:`worldgen.memory.bank`). On a
share ``1 - memory_none`` of the plain Diffusion Forcing steps each window also gets m ~ U{1..k}
frames from at least ``memory_gap`` frames earlier in its episode, with their true poses: of 64
random earlier frames, the m that the bank's retrieval picks for the window's newest camera
(what a session recalls), each with its pose relative to that camera and its age. They enter
as clean non-causal context (:class:`~worldgen.models.dit.Memory`) and are never in the loss.
The other steps have no memory, so the model works with and without it. Needs a dataset with
camera poses; ``init`` from a model without memory adds a fresh memory embedder to it.

Example:
    worldgen train dynamics --data data/doom --tokenizer runs/tok --out runs/dyn --minutes 15
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from worldgen import actions, checkpoint, sampling
from worldgen.data import Dataset, WindowDataset
from worldgen.data.camera import dataset_camera
from worldgen.engine import StreamConfig, rollout_latents, save_starts
from worldgen.files import atomic_write
from worldgen.memory import bank
from worldgen.memory.camera import Camera
from worldgen.memory.motion import MotionModel
from worldgen.memory.views import PoseNoise
from worldgen.models import (
    MODELS,
    DiT,
    DiTConfig,
    autocast,
    flops_per_frame,
    frames_to_tensor,
    load_dit,
    load_tokenizer,
    save_part,
    tensor_to_frames,
)
from worldgen.models.dit import Context, Memory
from worldgen.models.world_cache import cond_channels, decode_rgbd, episode_condition, window_condition
from worldgen.training import loop
from worldgen.training.config import TrainConfig, opt
from worldgen.training.distributed import Dist, barrier, rank_generator
from worldgen.training.run import Run, save_image_rows
from worldgen.training.tokenizer import depth_to_uint8, open_dataset

CACHE_VERSION = 1


@dataclass
class DynamicsTrainConfig(TrainConfig):
    tokenizer: str = opt("", "the trained tokenizer: a `train tokenizer` run folder or a model folder")
    model: str = opt("S", "DiT size from worldgen.models.MODELS", choices=tuple(MODELS))
    window: int = opt(16, "frames per training window: the context the model learns to use")
    batch_size: int = opt(16, "windows per step over all GPUs (x window x 300 tokens)")
    lr: float = opt(3e-4, "peak AdamW LR; QK-norm and adaLN-zero keep a small DiT stable here")
    prefix_prob: float = opt(0.4, "share of windows with a clean-ish prefix and noisy rest (the inference pattern)")
    ctx_noise: float = opt(0.05, "context noise label at inference (stabilisation); prefixes train on U[0, 2x this]")
    t_loc: float = opt(0.0, "logit-normal mean of t (SD3: 0)")
    t_scale: float = opt(1.0, "logit-normal std of t (SD3: 1)")
    action_dropout: float = opt(
        0.1,
        "share of frames whose action is swapped for a learned null action: the "
        "action-free prediction that action guidance at sampling steers from",
    )
    encode_batch: int = opt(256, "frames per tokenizer batch when encoding the dataset")
    sample_steps: int = opt(8, "Euler steps for sample strips (stored as the checkpoint's sampler default)")
    sample_frames: int = opt(16, "frames generated in each sample strip after the real context")
    eval_windows: int = opt(64, "held-out windows for the held-out loss at checkpoints")
    init: str = opt(
        "", "start from this model folder's dynamics weights (a fine-tune); its DiT size is used, not --model"
    )
    rollout_frames: int = opt(
        0,
        "G > 0: train on the model's own rollouts of up to G frames (see the module "
        "docstring; a step costs G/2 x (sample_steps + 1) one-frame passes more); 0: real "
        "context only",
    )
    rollout_share: float = opt(
        1.0,
        "with --rollout-frames, the share of steps on own rollouts; the others are "
        "plain Diffusion Forcing steps on real windows (1 lost 0.5 dB teacher-forced "
        "in 330 steps: docs/history/results-2026-12.md)",
    )
    starts: int = opt(8, "real start contexts (held-out play) stored with the exported model for new sessions")
    start_frames: int = opt(8, "frames per start context")
    world_cache: int = opt(
        0,
        "H > 0: condition every frame on the point-cloud world cache of its H predecessors, "
        "rendered at its pose plus pose noise (docs/world_cache.md); needs an RGB-D tokenizer "
        "and a recording with depth and poses",
    )
    memory_frames: int = opt(
        0,
        "k > 0: train with up to k recalled frames from far earlier in the episode as "
        "context (frame memory bank; needs recorded poses); 0: no memory",
    )
    memory_gap: int = opt(
        32,
        "recalled frames lie at least this many frames before the window's newest (older "
        "than a session's rolling window)",
    )
    memory_none: float = opt(
        0.25,
        "with --memory-frames, share of steps without memory: the model also plays before it has anything to recall",
    )
    memory_cap: int = opt(256, "frames a session's bank holds (stored with the model as its default)")


# --- the loss --------------------------------------------------------------------------------
def noise_levels(
    batch: int,
    frames: int,
    frames_per_block: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    prefix_prob: float = 0.4,
    ctx_noise: float = 0.05,
    loc: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """Per-frame noise levels ``(B, T)`` for Diffusion Forcing (see the module docstring).

    One level per block of ``frames_per_block`` frames (a block is denoised together at inference).

    Example:
        >>> t = noise_levels(4, 6, 1, torch.Generator().manual_seed(0))
        >>> t.shape, bool(((t >= 0) & (t <= 1)).all())
        (torch.Size([4, 6]), True)
    """
    blocks = math.ceil(frames / frames_per_block)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    t = torch.sigmoid(loc + scale * torch.randn((batch, blocks), generator=generator, device=device))
    if blocks > 1 and prefix_prob > 0:
        # Prefix of k in [1, blocks - 1] blocks, clean up to the stabilisation level.
        k = 1 + (rand(batch) * (blocks - 1)).long()  # (B,)
        in_prefix = torch.arange(blocks, device=device)[None] < k[:, None]  # (B, blocks)
        use = (rand(batch) < prefix_prob)[:, None] & in_prefix
        t = torch.where(use, rand(batch, blocks) * 2 * ctx_noise, t)
    return t.repeat_interleave(frames_per_block, dim=1)[:, :frames]


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    acts: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    drop: torch.Tensor | None = None,
    first_target: int = 0,
    cond: torch.Tensor | None = None,
    memory: Memory | None = None,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``eps - x0`` at ``x_t = (1 - t) x0 + t eps``.

    x0, eps: (B, T, C, h, w) clean latents and noise; acts: (B, T, 10); t: (B, T); drop: (B, T)
    bool, frames whose action is dropped (None: none); frames before ``first_target`` are
    context only, left out of the loss; cond: (B, T, cond_channels, h, w) for a model with
    extra input channels (the world cache's view), else None; ``memory``: recalled frames as
    context (never in the loss).
    """
    context = None if memory is None else Context(memory=memory)
    v = model(sampling.add_noise(x0, eps, t), t, acts, drop_actions=drop, cond=cond, context=context)
    return F.mse_loss(v[:, first_target:].float(), (eps - x0)[:, first_target:])


# --- latents on the device -------------------------------------------------------------------
@dataclass
class Latents:
    """Every frame of some episodes, encoded, with the action that produced it, back to back."""

    z: torch.Tensor  # (N, C, h, w) bf16
    actions: torch.Tensor  # (N, 10) float32
    offsets: torch.Tensor  # (E + 1,) int64: episode e is rows offsets[e]:offsets[e + 1]
    cond: torch.Tensor | None = None  # (N, cond_channels, h, w) bf16: each frame's world-cache view, if used
    pose: torch.Tensor | None = None  # (N, 5) float32 camera poses, for memory training

    def to(self, device: torch.device) -> Latents:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return Latents(
            self.z.to(device), self.actions.to(device), self.offsets.to(device), move(self.cond), move(self.pose)
        )

    def episode_start(self, rows: torch.Tensor) -> torch.Tensor:
        """First row of the episode holding each of ``rows``."""
        off = self.offsets.to(rows.device)
        return off[torch.searchsorted(off, rows, right=True) - 1]

    def starts(self, window: int) -> torch.Tensor:
        """Every row where a window of ``window`` frames fits inside one episode."""
        off = self.offsets.tolist()
        return torch.cat(
            [torch.arange(a, max(a, b - window + 1), dtype=torch.long) for a, b in zip(off[:-1], off[1:])]
            + [torch.zeros(0, dtype=torch.long)]
        ).to(self.z.device)

    def windows(self, starts: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0 (B, T, C, h, w) float32, actions (B, T, 10))`` of the windows starting at ``starts``."""
        idx = starts[:, None] + torch.arange(window, device=starts.device)  # (B, T)
        return self.z[idx].float(), self.actions[idx]

    def cond_windows(self, starts: torch.Tensor, window: int) -> torch.Tensor | None:
        """The windows' world-cache conditioning ``(B, T, cond_channels, h, w)``, None without it."""
        if self.cond is None:
            return None
        return self.cond[starts[:, None] + torch.arange(window, device=starts.device)].float()


def tokenizer_folder(path: str) -> Path:
    """A tokenizer run folder means its exported ``ckpt/``; otherwise the folder itself."""
    p = checkpoint.resolve(path)
    return p / "ckpt" if (p / "ckpt" / "tokenizer.json").is_file() else p


def _fingerprint(ds: Dataset, episodes: list[int], tok_folder: Path, world_cache: int = 0) -> str:
    """What the cached latents depend on: the episodes' shards, the tokenizer's weights files and
    the world-cache history."""
    tok_files = json.loads((tok_folder / "tokenizer.json").read_text()).get("files", [])
    shards = [s["sha256"] for e in episodes for s in ds.episodes[e].shards]
    text = json.dumps(
        {
            "v": CACHE_VERSION,
            "ids": [ds.episodes[e].id for e in episodes],
            "shards": shards,
            "tokenizer": tok_files,
            **({"world_cache": world_cache} if world_cache else {}),
        }
    )
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def encode_episodes(
    ds: Dataset, episodes: list[int], tokenizer: nn.Module, device: torch.device, batch: int, world_cache: int = 0
) -> Latents:
    """Encode every frame of ``episodes`` with ``tokenizer`` (on ``device``, in batches); with
    ``world_cache`` = H > 0 also each frame's cache view of its H predecessors
    (:func:`~worldgen.models.world_cache.episode_condition`, one pose-noise draw per frame, seeded)."""
    depth = tokenizer.cfg.in_channels == 4
    camera = dataset_camera(ds) if world_cache else None
    zs, acts, offsets, conds = [], [], [0], []
    for e in episodes:
        # The whole episode as one window: WindowDataset owns the frame/action alignment.
        fields = ("depth", "pose") if world_cache else ("depth",) if depth else ()
        item = WindowDataset(ds, ds.episodes[e].length, episodes=[e], fields=fields)[0]
        if world_cache:
            g = torch.Generator(device).manual_seed(e)
            levels = depth_to_uint8(item["depth"])  # as eval and play read depth: uint8 levels
            with autocast(device):
                conds.append(
                    episode_condition(
                        tokenizer,
                        camera,
                        torch.from_numpy(item["frames"]).to(device),
                        torch.from_numpy(levels).to(device),
                        torch.from_numpy(item["pose"]).to(device),
                        world_cache,
                        PoseNoise(),
                        g,
                    ).to(torch.bfloat16)
                )
        frames = item["frames"]
        if depth:
            frames = np.concatenate([frames, depth_to_uint8(item["depth"])[..., None]], -1)
        for i in range(0, len(frames), batch):
            x = frames_to_tensor(torch.from_numpy(frames[i : i + batch]).to(device))
            with autocast(device):
                zs.append(tokenizer.encode(x).to(torch.bfloat16))
        acts.append(torch.from_numpy(actions.to_vector(item["keys"], item["mouse"])))
        offsets.append(offsets[-1] + len(frames))
    return Latents(
        torch.cat(zs),
        torch.cat(acts).to(device),
        torch.tensor(offsets, dtype=torch.long),
        torch.cat(conds) if world_cache else None,
    )


def cached_latents(
    path: Path,
    ds: Dataset,
    episodes: list[int],
    tok_folder: Path,
    tokenizer: nn.Module,
    d: Dist,
    batch: int,
    world_cache: int = 0,
) -> Latents:
    """Latents of ``episodes`` from the cache file at ``path``, encoding and caching them first if
    it is missing or stale (another dataset, tokenizer or world-cache history). Under torchrun each
    rank encodes every ``world_size``-th episode into a part file and rank 0 joins the parts into
    the cache: the dataset is encoded once, N times faster, and no rank idles while another encodes
    it all."""
    key = _fingerprint(ds, episodes, tok_folder, world_cache)

    def read() -> Latents | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") != key:
                    return None
            t = load_file(path)
            return Latents(t["z"], t["actions"], t["offsets"], t.get("cond"))
        except (SafetensorError, OSError, KeyError) as e:  # unreadable: encode afresh
            if d.main:
                print(f"[train] {path}: unreadable latent cache ({e}); encoding again", file=sys.stderr)
            return None

    def write(file: Path, lat: Latents) -> None:
        tensors = {
            "z": lat.z.cpu().contiguous(),
            "actions": lat.actions.cpu().contiguous(),
            "offsets": lat.offsets.cpu(),
        }
        if lat.cond is not None:  # the world cache's views
            tensors["cond"] = lat.cond.cpu().contiguous()
        atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"fingerprint": key}))

    lat = read()  # the same file on every rank: all of them encode, or none
    if lat is None:
        t0 = time.time()
        parts = [path.with_name(f"{path.stem}.part-{r}-of-{d.world_size}.safetensors") for r in range(d.world_size)]
        mine = episodes[d.rank :: d.world_size]
        if mine:  # more ranks than episodes: the last ones have none
            lat = encode_episodes(ds, mine, tokenizer, d.device, batch, world_cache)
            if d.world_size > 1:
                write(parts[d.rank], lat)
        barrier(d)
        if d.main:
            if d.world_size > 1:
                lat = _interleave([load_file(f) for f in parts[: len(episodes)]])
            write(path, lat)
            for f in path.parent.glob(f"{path.stem}.part-*.safetensors"):
                f.unlink(missing_ok=True)
            print(
                f"[train] encoded {len(lat.z)} frames of {len(episodes)} episodes on {d.world_size} rank(s) "
                f"-> {path.name} ({time.time() - t0:.1f} s)",
                file=sys.stderr,
            )
        barrier(d)
        if not d.main:
            lat = read()
            if lat is None:
                raise RuntimeError(f"{path}: rank 0 did not write the latent cache")
    return lat.to(d.device)


def _interleave(parts: list[dict[str, torch.Tensor]]) -> Latents:
    """One :class:`Latents` from the part files of :func:`cached_latents`: part r holds episodes
    r, r + N, r + 2N, ...; the result holds them in their order, 0, 1, 2, ..."""
    n = len(parts)
    per_part = [len(p["offsets"]) - 1 for p in parts]
    has_cond = "cond" in parts[0]
    zs, acts, conds, offsets = [], [], [], [0]
    for k in range(sum(per_part)):
        part, j = parts[k % n], k // n
        a, b = int(part["offsets"][j]), int(part["offsets"][j + 1])
        zs.append(part["z"][a:b])
        acts.append(part["actions"][a:b])
        if has_cond:
            conds.append(part["cond"][a:b])
        offsets.append(offsets[-1] + b - a)
    return Latents(
        torch.cat(zs), torch.cat(acts), torch.tensor(offsets, dtype=torch.long), torch.cat(conds) if has_cond else None
    )


def split_latents(
    run: Run,
    ds: Dataset,
    splits: dict[str, list[int]],
    tok_folder: Path,
    tokenizer: nn.Module,
    d: Dist,
    cfg: TrainConfig,
    world_cache: int = 0,
) -> dict[str, Latents | None]:
    """The cached latents of each split (``{"train": episodes, "heldout": episodes}``) in the run
    folder, None for an empty split, after checking the tokenizer takes the dataset's frames."""
    w, h = ds.resolution
    if tuple(tokenizer.cfg.image_size) != (h, w):
        raise ValueError(
            f"{tok_folder}: tokenizer takes {tokenizer.cfg.image_size} (H, W) frames, {cfg.data} has {(h, w)}"
        )
    return {
        name: cached_latents(
            run.root / f"latents-{name}.safetensors", ds, eps, tok_folder, tokenizer, d, cfg.encode_batch, world_cache
        )
        if eps
        else None
        for name, eps in splits.items()
    }


def dit_config(
    cfg: DynamicsTrainConfig, latent_channels: int, latent_size: tuple[int, int], cond: int = 0
) -> DiTConfig:
    """The ``--model`` size fitted to the tokenizer's latents, the training window and the
    ``cond`` extra input channels (the world cache's view)."""
    base = MODELS[cfg.model]
    return dataclasses.replace(
        base,
        latent_channels=latent_channels,
        latent_size=latent_size,
        max_frames=max(base.max_frames, cfg.window + cfg.memory_frames),
        null_action=cfg.action_dropout > 0,
        cond_channels=cond,
        memory_frames=cfg.memory_frames,
    )


def initial_dit(cfg: DynamicsTrainConfig, latent_channels: int, latent_size: tuple[int, int], cond: int = 0) -> DiT:
    """A fresh ``--model`` DiT, or the ``--init`` model's, checked against this run's settings."""
    if not cfg.init:
        return DiT(dit_config(cfg, latent_channels, latent_size, cond))
    model = load_dit(cfg.init).train()
    got = model.cfg
    if cfg.memory_frames != got.memory_frames:  # add (or resize) the memory embedder, keep the rest
        if got.memory_frames and not cfg.memory_frames:
            raise ValueError(f"--init {cfg.init}: its DiT was trained with memory; give --memory-frames > 0")
        grown = DiT(
            dataclasses.replace(
                got, memory_frames=cfg.memory_frames, max_frames=max(got.max_frames, cfg.window + cfg.memory_frames)
            )
        )
        missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("memory_embed.") for k in missing):
            raise ValueError(
                f"--init {cfg.init}: weights do not fit a memory DiT (missing {missing}, unexpected {unexpected})"
            )
        model = grown.train()
        got = model.cfg
    if (got.latent_channels, tuple(got.latent_size)) != (latent_channels, tuple(latent_size)):
        raise ValueError(
            f"--init {cfg.init}: its DiT takes {got.latent_channels}x{tuple(got.latent_size)} "
            f"latents, the tokenizer makes {latent_channels}x{tuple(latent_size)}"
        )
    if got.max_frames < cfg.window:
        raise ValueError(f"--init {cfg.init}: its DiT holds {got.max_frames} frames, --window is {cfg.window}")
    if got.cond_channels == 0 and cond:  # grow the cache view's input channels, starting ignored
        model = grow_cond_channels(model, cond).train()
        got = model.cfg
    if got.cond_channels != cond:
        raise ValueError(
            f"--init {cfg.init}: its DiT takes {got.cond_channels} conditioning channels, this run "
            f"gives {cond} (--world-cache {cfg.world_cache})"
        )
    if got.null_action != (cfg.action_dropout > 0):
        raise ValueError(
            f"--init {cfg.init}: its DiT {'has' if got.null_action else 'has no'} null action, "
            f"so --action-dropout must be {'> 0' if got.null_action else '0'}"
        )
    return model


def grow_cond_channels(model: DiT, cond: int) -> DiT:
    """``model`` taking ``cond`` extra input channels whose patch-embedding weights start at zero:
    it predicts exactly as before until training teaches it to read them (a DiT without the world
    cache warm-starts one with it).

    Example:
        >>> small = DiT(dit_config(DynamicsTrainConfig(model="tiny"), 4, (4, 4))).eval()
        >>> grown = grow_cond_channels(small, 5).eval()
        >>> x, t, a = torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2), torch.zeros(1, 2, small.cfg.action_dim)
        >>> torch.allclose(grown(x, t, a, cond=torch.randn(1, 2, 5, 4, 4)), small(x, t, a), atol=1e-5)
        True
    """
    cfg = model.cfg
    grown = DiT(dataclasses.replace(cfg, cond_channels=cond))
    state = model.state_dict()
    p, c = cfg.patch_size, cfg.latent_channels
    # Tokens flatten a patch as (p q c), channels innermost: the old c come first in each pixel.
    w = state["patch_embed.weight"].unflatten(1, (p, p, c))
    state["patch_embed.weight"] = torch.cat([w, w.new_zeros(*w.shape[:3], cond)], 3).flatten(1)
    grown.load_state_dict(state)
    return grown


# --- the task --------------------------------------------------------------------------------
class DynamicsTask:
    """The :class:`~worldgen.training.loop.Task` of Diffusion Forcing a :class:`DiT` on latents
    already on the device. :meth:`from_run` builds it from a dataset and a tokenizer; without a
    tokenizer (benchmarks) it writes no sample images and exports only the dynamics part."""

    def __init__(
        self,
        cfg: DynamicsTrainConfig,
        model: DiT,
        train: Latents,
        held: Latents | None,
        d: Dist,
        tokenizer: nn.Module | None = None,
        tok_folder: Path | None = None,
        data: tuple[Dataset, list[int]] | None = None,
        camera: Camera | None = None,
    ):
        self.cfg, self.model, self.device, self.dist = cfg, model, d.device, d
        self.data = data  # (dataset, episodes to take start contexts from)
        self.train, self.held = train, held if held is not None else train
        self.eval_split = "heldout" if held is not None else "train"
        self.tokenizer, self.tok_folder = tokenizer, tok_folder
        if not 0 <= cfg.rollout_frames < cfg.window:
            raise ValueError(
                f"--rollout-frames must lie in [0, --window - 1 = {cfg.window - 1}], got {cfg.rollout_frames}"
            )
        if not 0 <= cfg.rollout_share <= 1:
            raise ValueError(f"--rollout-share must lie in [0, 1], got {cfg.rollout_share}")
        if cfg.rollout_frames and (model.cfg.frames_per_block != 1 or cfg.window < 3):
            raise ValueError("--rollout-frames needs one-frame blocks (frames_per_block 1) and --window >= 3")
        if cfg.world_cache and cfg.rollout_frames and (tokenizer is None or train.pose is None):
            raise ValueError(
                "--world-cache with --rollout-frames needs the tokenizer (to decode the generated RGB-D) "
                "and the train latents' camera poses"
            )
        # A rollout window: window - 1 real frames, up to window frames generated and followed.
        self.span = 2 * cfg.window - 1 if cfg.rollout_frames else cfg.window
        starts = train.starts(self.span)
        if len(starts) == 0:
            raise ValueError(
                f"{cfg.data}: no train episode has {self.span} frames "
                f"(--window {cfg.window}{', with --rollout-frames' if cfg.rollout_frames else ''})"
            )
        self.starts = starts  # every rank draws from all of them: the global batch is split, not the data
        self.tokens_per_sample = cfg.window * model.cfg.tokens_per_frame
        if cfg.memory_frames:
            if train.pose is None or len(train.pose) != len(train.z):
                raise ValueError("--memory-frames needs the train latents' camera poses (a dataset with poses)")
            if not 0 <= cfg.memory_none <= 1 or cfg.memory_gap < 1:
                raise ValueError(
                    f"need 0 <= --memory-none <= 1 and --memory-gap >= 1, got {cfg.memory_none}, {cfg.memory_gap}"
                )
            # Windows whose newest frame has at least one frame memory_gap or more before it.
            newest = self.starts + cfg.window - 1
            self.memory_starts = self.starts[newest - train.episode_start(newest) >= cfg.memory_gap]
            if len(self.memory_starts) == 0:
                raise ValueError(
                    f"{cfg.data}: no window has a frame {cfg.memory_gap} frames before its newest "
                    f"(--memory-gap); record longer episodes or lower it"
                )
        self.metrics: dict[str, float] = {}
        self.motion: MotionModel | None = None  # world-cache runs: the camera's motion model (from_run fits it)
        self.camera = camera  # world-cache runs: the camera views are rendered with
        if d.main:
            print(
                f"[train] dynamics: DiT {f'of {cfg.init}' if cfg.init else cfg.model} "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"params; {len(train.z)} train frames ({len(starts)} windows of {cfg.window}), "
                f"{len(self.held.z)} {self.eval_split} frames",
                file=sys.stderr,
            )

    @classmethod
    def from_run(cls, cfg: DynamicsTrainConfig, run: Run, d: Dist) -> DynamicsTask:
        """Load the tokenizer, encode (or reuse the cached latents of) the dataset, build the DiT."""
        if not cfg.tokenizer:
            raise ValueError("--tokenizer is required: a `worldgen train tokenizer` run folder or model folder")
        ds, train, held = open_dataset(cfg)
        tok_folder = tokenizer_folder(cfg.tokenizer)
        tokenizer = load_tokenizer(tok_folder, d.device).requires_grad_(False)
        torch.manual_seed(cfg.seed)
        cond = cond_channels(tokenizer.cfg) if cfg.world_cache else 0  # an RGB tokenizer: a clear error
        camera = dataset_camera(ds) if cfg.world_cache else None  # no camera model, depth or poses: a clear error
        model = initial_dit(cfg, tokenizer.cfg.latent_channels, tuple(tokenizer.cfg.latent_size), cond)
        lat = split_latents(run, ds, {"train": train, "heldout": held}, tok_folder, tokenizer, d, cfg, cfg.world_cache)
        if cfg.memory_frames or cfg.world_cache:  # poses are small: read them afresh, in the latents' episode order
            if "pose" not in ds.fields:
                raise ValueError(f"{cfg.data}: --memory-frames needs a dataset recorded with camera poses")
            lat["train"].pose = torch.from_numpy(np.concatenate([ds.read(e, "pose") for e in train])).to(d.device)
        task = cls(cfg, model, lat["train"], lat["heldout"], d, tokenizer, tok_folder, (ds, held or train), camera)
        if cfg.world_cache:  # how a session predicts the pose its cache view renders at, stored with the model
            task.motion = fit_motion(ds, train)
        return task

    def draw(self, generator: torch.Generator, batch: int, memory: bool = False) -> tuple[torch.Tensor, ...]:
        """This rank's rows ``(x0, actions, t, eps, drop, cond, memory)`` of the step's global batch
        of ``batch`` windows (b = batch / ranks of them; every draw is made for the whole batch, then
        sharded). ``cond`` is None without the world cache; with ``memory``, the windows have a far
        past and ``memory`` is their :class:`Memory` (:meth:`recall`), else None."""
        cfg, fpb, shard = self.cfg, self.model.cfg.frames_per_block, self.dist.shard
        pool = self.memory_starts if memory else self.starts
        i = shard(torch.randint(len(pool), (batch,), generator=generator, device=self.device))
        x0, acts = self.train.windows(pool[i], cfg.window)  # (b, T, C, h, w), (b, T, 10)
        cond = self.train.cond_windows(pool[i], cfg.window)  # (b, T, C + 1, h, w) or None
        t = shard(
            noise_levels(
                batch, cfg.window, fpb, generator, self.device, cfg.prefix_prob, cfg.ctx_noise, cfg.t_loc, cfg.t_scale
            )
        )  # (b, T)
        eps = shard(torch.randn((batch, *x0.shape[1:]), generator=generator, device=self.device))
        drop = None
        if cfg.action_dropout > 0:
            drop = shard(
                torch.rand((batch, cfg.window), generator=generator, device=self.device) < cfg.action_dropout
            )  # (b, T)
        recalled = self.recall(pool[i] + cfg.window - 1, generator) if memory else None
        return x0, acts, t, eps, drop, cond, recalled

    def recall(self, newest: torch.Tensor, generator: torch.Generator, candidates: int = 64) -> Memory:
        """m ~ U{1..k} memory frames for windows whose newest frame is row ``newest`` (B,): of
        ``candidates`` random rows from the episode's start to ``memory_gap`` before it, those
        the bank's retrieval picks for its camera (module docstring)."""
        cfg, lat = self.cfg, self.train
        m = 1 + int(torch.randint(cfg.memory_frames, (), generator=generator, device=self.device))
        first, last = lat.episode_start(newest), newest - cfg.memory_gap  # (B,) each, inclusive
        u = torch.rand((len(newest), candidates), generator=generator, device=self.device)
        rows = first[:, None] + (u * (last - first + 1)[:, None]).long()  # (B, M)
        query = lat.pose[newest]  # (B, 5)
        bank_cfg = bank.BankConfig(k=m, cap=candidates)
        # Time steps count from the episode's start, as a session's do.
        pick, _ = bank.retrieve(
            lat.pose[rows],
            rows - first[:, None],
            torch.ones_like(rows, dtype=torch.bool),
            query,
            newest - first,
            m,
            bank_cfg,
        )  # (B, m)
        chosen = rows.gather(1, pick)  # (B, m)
        return Memory(
            lat.z[chosen].float(),
            bank.relative_pose(lat.pose[chosen], query[:, None]),
            (newest[:, None] - chosen).float(),
        )

    def session_stream(self) -> StreamConfig:
        """How a session of the trained model plays (its default sinks, the window the rest of the
        trained window, stabilised writes), at the trainer's sampler steps: the rollout fine-tune
        and the previews play this way."""
        sinks, block = StreamConfig.sinks, self.model.cfg.frames_per_block
        return StreamConfig(
            steps=self.cfg.sample_steps,
            ctx_noise=self.cfg.ctx_noise,
            sinks=sinks,
            window=self.cfg.window - block - sinks,
        )

    @torch.no_grad()
    def draw_rollout(
        self, generator: torch.Generator, batch: int, noise: torch.Generator | None = None
    ) -> tuple[tuple[torch.Tensor, ...], int]:
        """This rank's rows of a global batch of ``batch`` windows ending in the model's own rollout
        (see the module docstring): ``((x0, actions, t, eps, drop, cond), first_target)``, x0 holding
        the generated latents, ``cond`` the world-cache views (None without the cache). The rollout's
        sampler and pose noise come from ``noise`` (default: ``generator``): they are drawn for this
        rank's rows only, so it must be the rank's own."""
        cfg, T, shard = self.cfg, self.cfg.window, self.dist.shard
        g = int(torch.randint(cfg.rollout_frames + 1, (), generator=generator, device=self.device))
        s = 1 + int(torch.randint(T - g, (), generator=generator, device=self.device))
        i = shard(torch.randint(len(self.starts), (batch,), generator=generator, device=self.device))
        x0, acts = self.train.windows(self.starts[i], T - 1 + g + s)  # (b, T - 1 + g + s, ...)
        noise = generator if noise is None else noise
        cond = self.train.cond_windows(self.starts[i] + g + s - 1, T)  # real frames' views, or None
        if g:  # g = 0: real context alone, so the teacher-forced skill is kept up too
            rows = self.starts[i][:, None] + torch.arange(x0.shape[1], device=self.device)
            cache = self.rollout_cache(x0, self.train.pose[rows], noise) if self.cfg.world_cache else None
            was_training = self.model.training
            self.model.eval()
            gen = rollout_latents(
                self.model,
                self.session_stream(),
                x0[:, : T - 1],
                acts[:, : T - 1],
                acts[:, T - 1 : T - 1 + g],
                noise,
                **(
                    {}
                    if cache is None
                    else {"ctx_cond": self.train.cond_windows(self.starts[i], T - 1), "views": cache}
                ),
            )  # (b, g, C, h, w)
            self.model.train(was_training)
            x0 = torch.cat([x0[:, : T - 1], gen.to(x0.dtype), x0[:, T - 1 + g :]], 1)
            if cache is not None:  # the window's views, from clouds that hold the generated frames
                cond = cache(gen, upto=x0.shape[1], first=x0.shape[1] - T)
        x0 = x0[:, -T:]
        acts = acts[:, -T:]
        # Real and generated context at the levels inference labels context with; targets at DF levels.
        t = noise_levels(batch, T, 1, generator, self.device, 0.0, cfg.ctx_noise, cfg.t_loc, cfg.t_scale)
        ctx = torch.rand((batch, T - s), generator=generator, device=self.device) * 2 * cfg.ctx_noise
        t = shard(torch.cat([ctx, t[:, T - s :]], 1))  # (b, T)
        eps = shard(torch.randn((batch, *x0.shape[1:]), generator=generator, device=self.device))
        drop = None
        if cfg.action_dropout > 0:
            drop = shard(torch.rand((batch, T), generator=generator, device=self.device) < cfg.action_dropout)
        return (x0, acts, t, eps, drop, cond), T - s

    def rollout_cache(self, x0: torch.Tensor, pose: torch.Tensor, generator: torch.Generator) -> Callable:
        """For a rollout of windows ``x0`` (b, L, C, h, w) at camera poses ``pose`` (b, L, 5), whose
        frames from ``window - 1`` on are played: ``views(generated, upto=None, first=None)``, the
        conditioning of the next played frame (default) or of frames ``first:upto``, each rendered
        from the RGB-D of its predecessors (real frames decoded, the ``generated`` (b, g, C, h, w)
        played so far in their place) at its pose plus :class:`PoseNoise` from ``generator``."""
        tok, ctx = self.tokenizer, self.cfg.window - 1
        with autocast(self.device):
            rgb, depth = decode_rgbd(tok, x0)  # (b, L, H, W, 3) uint8, (b, L, H, W) levels

        done = 0  # generated frames already in rgb/depth: each is decoded once

        def views(generated: torch.Tensor, upto: int | None = None, first: int | None = None) -> torch.Tensor:
            nonlocal done
            g = generated.shape[1]
            if g > done:
                with autocast(self.device):
                    rgb[:, ctx + done : ctx + g], depth[:, ctx + done : ctx + g] = decode_rgbd(tok, generated[:, done:])
                done = g
            upto = ctx + g + 1 if upto is None else upto
            first = upto - 1 if first is None else first
            with autocast(self.device):
                cond = window_condition(
                    tok,
                    self.camera,
                    rgb[:, :upto],
                    depth[:, :upto],
                    pose[:, :upto],
                    self.cfg.world_cache,
                    first,
                    PoseNoise(),
                    generator,
                )
            return cond.float()

        return views

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        cfg, share = self.cfg, self.cfg.rollout_share
        # A coin only when the share leaves a choice: share 1 draws what it drew before the knob.
        if cfg.rollout_frames and (
            share == 1 or share > 0 and float(torch.rand((), generator=generator, device=self.device)) < share
        ):
            noise = rank_generator(cfg.seed, self.dist.rank, step, self.device)
            (x0, acts, t, eps, drop, cond), first_target = self.draw_rollout(generator, cfg.batch_size, noise)
            return flow_matching_loss(model, x0, acts, t, eps, drop, first_target, cond)
        use_memory = (
            bool(cfg.memory_frames)
            and float(torch.rand((), generator=generator, device=self.device)) >= cfg.memory_none
        )
        x0, acts, t, eps, drop, cond, memory = self.draw(generator, cfg.batch_size, memory=use_memory)
        return flow_matching_loss(model, x0, acts, t, eps, drop, cond=cond, memory=memory)

    def flops_per_sample(self) -> float | None:
        cfg, m, T = self.cfg, self.model.cfg, self.cfg.window
        train = 3 * flops_per_frame(m, T) * T  # forward and backward over the window
        if not cfg.rollout_frames:
            return train
        # The rollout (a share of the steps): a prefill of T - 1 frames, then on average G / 2 frames of
        # sample_steps + 1 passes of one frame over the cache (its tokens, plus attention to T - 1 cached frames).
        one = flops_per_frame(m, 1) + m.depth * 4 * m.dim * m.tokens_per_frame**2 * (T - 1)
        rollout = flops_per_frame(m, T - 1) * (T - 1) + cfg.rollout_frames / 2 * (cfg.sample_steps + 1) * one
        return train + cfg.rollout_share * rollout

    @torch.no_grad()
    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        """Loss on fixed held-out windows with fixed noise: comparable across checkpoints."""
        cfg = self.cfg
        starts = self.held.starts(cfg.window)
        if len(starts) == 0:
            return {}
        g = torch.Generator(self.device).manual_seed(1234)
        pick = starts[torch.linspace(0, len(starts) - 1, min(cfg.eval_windows, len(starts))).long()]
        total, n = 0.0, 0
        for i in range(0, len(pick), cfg.batch_size):
            x0, acts = self.held.windows(pick[i : i + cfg.batch_size], cfg.window)
            cond = self.held.cond_windows(pick[i : i + cfg.batch_size], cfg.window)
            t = noise_levels(
                len(x0),
                cfg.window,
                ema_model.cfg.frames_per_block,
                g,
                self.device,
                cfg.prefix_prob,
                cfg.ctx_noise,
                cfg.t_loc,
                cfg.t_scale,
            )
            eps = torch.randn(x0.shape, generator=g, device=self.device)
            with autocast(self.device):
                total += flow_matching_loss(ema_model, x0, acts, t, eps, cond=cond).item() * len(x0)
            n += len(x0)
        self.metrics = {"heldout_loss": total / n}
        return self.metrics

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        return {
            "window": self.cfg.window,
            "tokens_per_frame": self.model.cfg.tokens_per_frame,
            "train_frames": len(self.train.z),
            "eval_split": self.eval_split,
            "tokenizer": str(self.tok_folder),
        }

    @torch.no_grad()
    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """Rows: the real frames; real context then generated frames (rollout with the real actions)."""
        cfg, lat = self.cfg, self.held
        if self.tokenizer is None or cfg.world_cache:  # a cache model's rollout renders its cache as it plays: not here
            return
        ctx = max(min(cfg.window - 1, 8), 1)
        lengths = (lat.offsets[1:] - lat.offsets[:-1]).tolist()
        e = int(np.argmax(lengths))  # the longest held-out episode, the same every time
        block = self.model.cfg.frames_per_block
        n = min(cfg.sample_frames, lengths[e] - ctx) // block * block  # a session plays whole blocks
        if n < 1:
            return
        lo = int(lat.offsets[e]) + (lengths[e] - ctx - n) // 2
        z, acts = lat.windows(torch.tensor([lo], device=self.device), ctx + n)  # (1, ctx + n, ...)
        g = torch.Generator(self.device).manual_seed(0)
        with autocast(self.device):  # played as a session plays (the sampler's cache backend)
            gen = rollout_latents(ema_model, self.session_stream(), z[:, :ctx], acts[:, :ctx], acts[:, ctx:], g)
            real = self.tokenizer.decode(z[0])
            fake = self.tokenizer.decode(torch.cat([z[0, :ctx], gen[0].to(z.dtype)]))
        save_image_rows(
            [tensor_to_frames(real.float())[..., :3], tensor_to_frames(fake.float())[..., :3]],
            folder / f"step-{step:07d}.png",
        )

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        if self.tokenizer is not None:  # ckpt/ is a complete model folder: the tokenizer goes along
            tok_extra = {
                k: v
                for k, v in checkpoint.config(self.tok_folder, "tokenizer").items()
                if k not in ("model", "action_schema")
            }
            save_part(folder, "tokenizer", self.tokenizer, tok_extra, dtype=dtype)
        if self.data is not None and self.cfg.starts > 0:
            write_starts(
                folder, *self.data, self.cfg.starts, self.cfg.start_frames, geometry=bool(self.cfg.world_cache)
            )
        save_part(
            folder,
            "dynamics",
            ema_model,
            {
                "train": {"data": str(self.cfg.data), "steps": step, "config": dataclasses.asdict(self.cfg)},
                "frame_skip": self.data[0].frame_skip if self.data is not None else None,
                "sampler": {"steps": self.cfg.sample_steps, "ctx_noise": self.cfg.ctx_noise, "window": self.cfg.window},
                # What the data's mouse covers: the Gymnasium env bounds its action spaces by it.
                "mouse_range": mouse_range(self.data[0]) if self.data is not None else None,
                **(
                    {
                        "world_cache": {
                            "history": self.cfg.world_cache,
                            "camera": dataset_camera(self.data[0]).to_dict(),
                            "motion": self.motion.to_dict(),
                        }
                    }
                    if self.cfg.world_cache and self.data is not None
                    else {}
                ),
                **(
                    {"memory": {"k": self.cfg.memory_frames, "cap": self.cfg.memory_cap}}
                    if self.cfg.memory_frames
                    else {}
                ),
                "metrics": self.metrics,
            },
            dtype=dtype,
        )


def mouse_range(ds: Dataset) -> list[float]:
    """[yaw, pitch]: the largest |mouse delta| (degrees per step) anywhere in ``ds``."""
    mouse = np.concatenate([ds.read(i, "mouse") for i in range(len(ds))] or [np.zeros((0, 2), np.float32)])
    return [round(float(v), 3) for v in (np.abs(mouse).max(0) if len(mouse) else np.zeros(2))]


def fit_motion(ds: Dataset, episodes: list[int]) -> MotionModel:
    """The camera's motion model (:class:`~worldgen.memory.motion.MotionModel`) fitted to the
    recorded poses and actions of ``episodes`` (those of 3 frames or more)."""
    poses, acts = [], []
    for e in episodes:
        if ds.episodes[e].length >= 3:
            poses.append(torch.from_numpy(ds.read(e, "pose")))
            acts.append(torch.from_numpy(actions.to_vector(ds.read(e, "keys"), ds.read(e, "mouse"))))
    if not poses:
        raise ValueError(f"{ds.root}: no train episode of 3 frames or more to fit the camera's motion on")
    return MotionModel.fit(poses, acts)


def write_starts(folder: Path, ds: Dataset, episodes: list[int], n: int, frames: int, geometry: bool = False) -> None:
    """Store ``n`` real contexts of ``frames`` frames, spread evenly over ``episodes``, with the
    model (:func:`worldgen.engine.save_starts`): what a new play session starts from.
    ``geometry``: with their depth and camera poses (a world-cache model's sessions need them)."""
    pool = WindowDataset(
        ds, frames, episodes, stride=frames, fields=("depth", "pose") if geometry else (), verify=False
    )
    items = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, min(n, len(pool))).round()]
    save_starts(
        folder,
        np.stack([it["frames"] for it in items]),
        np.stack([it["keys"] for it in items]),
        np.stack([it["mouse"] for it in items]),
        {"data": str(ds.root), "windows": [[ds.episodes[it["episode"]].id, int(it["start"])] for it in items]},
        **(
            {"depth": np.stack([it["depth"] for it in items]), "pose": np.stack([it["pose"] for it in items])}
            if geometry
            else {}
        ),
    )


def train(cfg: DynamicsTrainConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a dynamics training run in ``cfg.out``; returns its summary.

    ``given``: the flags set on the command line (a resume reports those it ignores).
    """
    return loop.train("dynamics", cfg, given, DynamicsTask.from_run)
