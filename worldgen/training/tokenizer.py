"""``worldgen train tokenizer``: fit the per-frame VAE to recorded frames.

Data path: a pool of up to ``pool_frames`` train frames, spread evenly over the train episodes
(every k-th frame; neighbouring frames are near duplicates, so striding loses little), is read
once into device memory as uint8, and every batch is drawn from it on the device. A DataLoader
over single frames would spend more time in Python than the GPU spends on a batch of this small
model, and drawing from the pool with the step's generator makes a resumed run exact.

Loss: per-pixel MSE (what PSNR measures) plus the VAE's own weighted terms (its KL).
At the end: held-out PSNR/SSIM of the EMA weights, and ``latent_scale`` set to the std of
the posterior means so that ``encode`` hands the DiT ~unit-std latents.

Example:
    worldgen train tokenizer --data data/doom --out runs/tok --minutes 8
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import checkpoint
from worldgen.data import Dataset
from worldgen.data.dataset import depth_to_uint8
from worldgen.evaluation.metrics import psnr, ssim
from worldgen.models import (
    Tokenizer,
    TokenizerConfig,
    autocast,
    frames_to_tensor,
    load_tokenizer,
    save_part,
    tensor_to_frames,
)
from worldgen.training import loop
from worldgen.training.config import TrainConfig, opt
from worldgen.training.distributed import Dist
from worldgen.training.run import Run, save_image_rows

# A model folder's parts besides its tokenizer, which a --decoder-only run copies from --init.
MODEL_PARTS = ("dynamics", "starts", "reward", "geometry")


@dataclass
class TokenizerTrainConfig(TrainConfig):
    batch_size: int = opt(32, "frames per step over all GPUs; small convs need a few dozen a GPU to fill it")
    lr: float = opt(5e-4, "peak AdamW LR; conv VAEs train stably here with warmup")
    weight_decay: float = opt(0.0, "no decay: the KL already regularises, decay only blurs")
    channels: str = opt("32,64,128,128", "tokenizer widths per resolution level, full resolution first")
    latent_channels: int = opt(16, "latent channels at 8x down: 16 keeps ~30 dB at 160x120")
    depth: bool = opt(False, "also encode the depth buffer as a 4th input channel")
    equivariance: float = opt(0.5, "weight of the scale-equivariance loss (smooth, diffusable latents); 0 = off")
    pool_frames: int = opt(65536, "train frames held on the device to draw batches from (~3.8 GB at 160x120)")
    eval_frames: int = opt(512, "held-out frames for PSNR/SSIM (final; a quarter at checkpoints)")
    init: str = opt(
        "",
        "start from this model folder's tokenizer (its widths and latents; --channels, --latent-channels and "
        "--equivariance are then its own): with --depth, an RGB tokenizer grows the depth channel",
    )
    decoder_only: bool = opt(
        False,
        "with --init MODEL: keep its encoder and latent scale frozen (so its DiT's latents stay valid) and "
        "train a new decoder of --dec-channels/--dec-blocks; the run's ckpt/ is MODEL with that decoder, "
        "stored in the dtype MODEL's tokenizer is",
    )
    dec_channels: str = opt(
        "",
        "--decoder-only: the new decoder's widths, full resolution first (default: MODEL's; MODEL's shape "
        "goes on from its decoder)",
    )
    dec_blocks: int = opt(0, "--decoder-only: ResNet blocks per level of the new decoder (0: MODEL's)")


def open_dataset(cfg: TrainConfig) -> tuple[Dataset, list[int], list[int]]:
    """The dataset and its (train, held-out) episodes. Without held-out episodes (a tiny dataset),
    metrics fall back to train episodes, and say so."""
    if not cfg.data:
        raise ValueError("--data DIR is required: a dataset folder written by `worldgen record`")
    ds = Dataset(cfg.data)
    train, held = ds.split(cfg.heldout_fraction)
    if not train:
        raise ValueError(f"{cfg.data}: no train episodes (all {len(ds)} are held out)")
    if not held:
        print(f"[train] {cfg.data}: no held-out episodes; metrics are measured on train episodes", file=sys.stderr)
    return ds, train, held


def read_frames(
    ds: Dataset, episode: int, depth: bool, start: int = 0, stop: int | None = None, step: int = 1
) -> np.ndarray:
    """Frames ``[start:stop:step]`` of an episode as uint8 ``(N, H, W, 3 or 4)`` (RGB[, depth])."""
    frames = ds.read(episode, "frames", start, stop)[::step]
    if not depth:
        return frames
    if "depth" not in ds.fields:
        raise ValueError(f"{ds.root}: --depth asked for, but this dataset has no depth")
    d = depth_to_uint8(ds.read(episode, "depth", start, stop)[::step])
    return np.concatenate([frames, d[..., None]], -1)


def frame_pool(ds: Dataset, episodes: list[int], max_frames: int, depth: bool) -> np.ndarray:
    """Every k-th frame of ``episodes``, k chosen so at most ``max_frames`` remain: ``(N, H, W, C)``."""
    total = sum(ds.episodes[e].length for e in episodes)
    k = max(math.ceil(total / max(max_frames, 1)), 1)
    return np.concatenate([read_frames(ds, e, depth, step=k) for e in episodes])[:max_frames]


def initial_tokenizer(cfg: TokenizerTrainConfig, image_size: tuple[int, int]) -> Tokenizer:
    """A fresh tokenizer, or the ``--init`` one. An RGB tokenizer warm-starts an RGB-D one: the
    depth channel's input and output weights start at zero, so at step 0 it encodes and decodes
    RGB exactly as before (the latents a DiT of it learned stay valid) and only has to learn depth.

    Example:
        >>> import tempfile
        >>> from worldgen.models import save_part
        >>> rgb = Tokenizer(TokenizerConfig(image_size=(16, 16), channels=(8, 8), downsample=2, latent_channels=4))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_part(d, "tokenizer", rgb, {})
        ...     rgbd = initial_tokenizer(TokenizerTrainConfig(init=d, depth=True), (16, 16))
        >>> x = torch.rand(2, 4, 16, 16) * 2 - 1
        >>> torch.allclose(rgbd.posterior(x)[0], rgb.posterior(x[:, :3])[0])
        True
    """
    channels = 4 if cfg.depth else 3
    if cfg.decoder_only and not cfg.init:
        raise ValueError("--decoder-only trains a new decoder for a trained encoder: give --init MODEL")
    if (cfg.dec_channels or cfg.dec_blocks) and not cfg.decoder_only:
        raise ValueError("--dec-channels and --dec-blocks shape the new decoder of --decoder-only")
    if not cfg.init:
        return Tokenizer(
            TokenizerConfig(
                image_size=image_size,
                in_channels=channels,
                latent_channels=cfg.latent_channels,
                equivariance_weight=cfg.equivariance,
                channels=tuple(int(c) for c in cfg.channels.split(",")),
            )
        )
    old = load_tokenizer(cfg.init, "cpu")
    if tuple(old.cfg.image_size) != tuple(image_size):
        raise ValueError(
            f"--init {cfg.init}: its tokenizer takes {tuple(old.cfg.image_size)} frames, the data is {image_size}"
        )
    if old.cfg.in_channels > channels:
        raise ValueError(f"--init {cfg.init}: its tokenizer encodes depth; give --depth")
    if cfg.decoder_only:
        return new_decoder(old, cfg)
    model = Tokenizer(dataclasses.replace(old.cfg, in_channels=channels)).train()
    state = old.state_dict()
    grown = model.state_dict()
    for key, into in (("encoder.conv_in.weight", 1), ("decoder.head.2.weight", 0), ("decoder.head.2.bias", 0)):
        w = torch.zeros_like(grown[key])
        w.narrow(into, 0, state[key].shape[into]).copy_(state[key])
        state[key] = w
    model.load_state_dict(state)
    return model


def new_decoder(old: Tokenizer, cfg: TokenizerTrainConfig) -> Tokenizer:
    """``old``'s encoder, frozen, and its latent scale, with a decoder of ``cfg.dec_channels`` and
    ``cfg.dec_blocks``: fresh, or ``old``'s own to train on where those are its shape. The latents
    every DiT of ``old`` learned stay exactly as they were.

    Example:
        >>> big = Tokenizer(TokenizerConfig(image_size=(16, 16), channels=(8, 16), downsample=2, latent_channels=4))
        >>> small = new_decoder(big, TokenizerTrainConfig(dec_channels="8,8", dec_blocks=1))
        >>> x = torch.rand(2, 3, 16, 16) * 2 - 1
        >>> torch.equal(small.encode(x), big.encode(x)), small.cfg.dec_channels
        (True, (8, 8))
        >>> z = big.encode(x)
        >>> torch.equal(new_decoder(big, TokenizerTrainConfig()).decode(z), big.decode(z))  # its own shape
        True
    """
    if old.cfg.in_channels != (4 if cfg.depth else 3):
        raise ValueError("--decoder-only keeps the encoder as it is: --depth must match --init's tokenizer")
    widths = tuple(int(c) for c in cfg.dec_channels.split(",")) if cfg.dec_channels else old.cfg.dec_channels
    model = Tokenizer(
        dataclasses.replace(old.cfg, dec_channels=widths, dec_blocks=cfg.dec_blocks or old.cfg.dec_blocks)
    ).train()
    model.encoder.load_state_dict(old.encoder.state_dict())
    shape = lambda c: (c.dec_channels or c.channels, c.dec_blocks)
    if shape(model.cfg) == shape(old.cfg):  # go on from its decoder (a fine-tune, or a run continued)
        model.decoder.load_state_dict(old.decoder.state_dict())
    model.encoder.requires_grad_(False)
    return model


def tokenizer_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSE of a posterior sample's decoding of ``x`` (B, C, H, W) in [-1, 1], plus the
    VAE's own weighted terms (its KL)."""
    x_hat, aux = model(x)
    return F.mse_loss(x_hat.float(), x) + sum(v.float() for v in aux.values())


class TokenizerTask:
    """The :class:`~worldgen.training.loop.Task` of fitting a :class:`~worldgen.models.Tokenizer` to
    ``pool`` (uint8 ``(N, H, W, C)`` on the device), measured on ``eval_set`` (the same, on the CPU).
    :meth:`from_run` builds it from a dataset."""

    def __init__(
        self,
        cfg: TokenizerTrainConfig,
        model: Tokenizer,
        pool: torch.Tensor,
        eval_set: torch.Tensor,
        d: Dist,
        eval_split: str = "heldout",
    ):
        self.cfg, self.model, self.device, self.dist = cfg, model, d.device, d
        self.pool, self.eval_set, self.eval_split = pool.to(d.device), eval_set, eval_split
        self.tokens_per_sample = math.prod(model.cfg.latent_size)
        self.metrics: dict[str, float] = {}
        # A decoder-only run stores its tokenizer in the dtype --init's is stored in, so the frozen
        # encoder's latents stay bit for bit what the DiT learned.
        self.init_dtype = checkpoint.stored_dtype(cfg.init, "tokenizer") if cfg.decoder_only else None

    @classmethod
    def from_run(cls, cfg: TokenizerTrainConfig, run: Run, d: Dist) -> TokenizerTask:
        ds, train, held = open_dataset(cfg)
        w, h = ds.resolution
        torch.manual_seed(cfg.seed)
        model = initial_tokenizer(cfg, (h, w))
        t0 = time.time()
        pool = torch.from_numpy(frame_pool(ds, train, cfg.pool_frames, cfg.depth))
        held_eps = held or train
        n_held = sum(ds.episodes[e].length for e in held_eps)
        eval_set = torch.from_numpy(frame_pool(ds, held_eps, min(cfg.eval_frames, n_held), cfg.depth))
        if d.main:
            print(
                f"[train] tokenizer: {len(pool)} train frames on {d.device} from {len(train)} episodes, "
                f"{len(eval_set)} {'heldout' if held else 'train'} frames for metrics ({time.time() - t0:.1f} s)",
                file=sys.stderr,
            )
        return cls(cfg, model, pool, eval_set, d, "heldout" if held else "train")

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.pool), (self.cfg.batch_size,), generator=generator, device=self.device)
        idx = self.dist.shard(idx)  # this rank's frames of the global batch
        return tokenizer_loss(model, frames_to_tensor(self.pool[idx]))

    def flops_per_sample(self) -> float | None:
        """Forward + backward FLOPs of one frame, counted once by torch's FLOP counter (convs)."""
        from torch.utils.flop_counter import FlopCounterMode

        probe = type(self.model)(self.model.cfg)  # a fresh copy: counting must not touch the weights
        x = torch.zeros(1, self.model.cfg.in_channels, *self.model.cfg.image_size)
        with FlopCounterMode(display=False) as counter:
            tokenizer_loss(probe, x).backward()
        return float(counter.get_total_flops())

    @torch.no_grad()
    def reconstruct(self, model: nn.Module, frames: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` -> reconstructions as uint8 ``(N, H, W, C)`` (through encode/decode)."""
        out = []
        for i in range(0, len(frames), batch):
            x = frames_to_tensor(frames[i : i + batch].to(self.device))
            with autocast(self.device):
                x_hat = model.decode(model.encode(x))
            out.append(torch.from_numpy(tensor_to_frames(x_hat.float())))
        return torch.cat(out)

    def _metrics(self, model: nn.Module, n: int, with_ssim: bool) -> dict[str, float]:
        real = self.eval_set[:n]
        rec = self.reconstruct(model, real)
        real_rgb, rec_rgb = real[..., :3].to(self.device), rec[..., :3].to(self.device)
        out = {
            "heldout_loss": float(((rec_rgb.float() - real_rgb.float()) / 127.5).square().mean()),
            f"{self.eval_split}_psnr": float(psnr(rec_rgb, real_rgb).mean()),
        }
        if with_ssim:
            out[f"{self.eval_split}_ssim"] = float(ssim(rec_rgb, real_rgb).mean())
        return out

    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        self.metrics = self._metrics(ema_model, max(len(self.eval_set) // 4, 1), with_ssim=False)
        return self.metrics

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        self.metrics = {
            **self._metrics(ema_model, len(self.eval_set), with_ssim=True),
            "eval_frames": len(self.eval_set),
            "latent_scale": ema_model.cfg.latent_scale if self.cfg.decoder_only else self._latent_scale(ema_model),
        }
        return self.metrics

    def _latent_scale(self, model: nn.Module, n: int = 512, batch: int = 64) -> float:
        """Std of the unscaled posterior means over ``n`` pool frames (the tokenizer's latent_std,
        pooled over batches so it is one std of all of them, not a mean of stds)."""
        idx = torch.linspace(0, len(self.pool) - 1, min(n, len(self.pool))).long()
        s1 = s2 = count = 0.0
        with torch.no_grad():
            for i in range(0, len(idx), batch):
                mean = model.posterior(frames_to_tensor(self.pool[idx[i : i + batch].to(self.device)]))[0].double()
                s1, s2, count = s1 + mean.sum().item(), s2 + mean.square().sum().item(), count + mean.numel()
        return math.sqrt(max(s2 / count - (s1 / count) ** 2, 1e-12))

    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """Real frames over their reconstructions, 8 held-out frames spread over the eval set."""
        idx = torch.linspace(0, len(self.eval_set) - 1, min(8, len(self.eval_set))).long()
        real = self.eval_set[idx]
        rec = self.reconstruct(ema_model, real)
        save_image_rows([real[..., :3].numpy(), rec[..., :3].numpy()], folder / f"step-{step:07d}.png")

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        if self.cfg.decoder_only:  # the --init model goes along once (ckpt/ is a whole model), its latent scale kept
            for part in MODEL_PARTS:
                if checkpoint.has_part(self.cfg.init, part) and not checkpoint.has_part(folder, part):
                    checkpoint.copy_part(self.cfg.init, folder, part)
            dtype = self.init_dtype
        else:
            ema_model.cfg.latent_scale = self._latent_scale(ema_model)
        save_part(
            folder,
            "tokenizer",
            ema_model,
            {
                "train": {"data": str(self.cfg.data), "steps": step, "config": dataclasses.asdict(self.cfg)},
                "metrics": self.metrics,
            },
            dtype=dtype,
        )


def train(cfg: TokenizerTrainConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a tokenizer training run in ``cfg.out``; returns its summary.

    ``given``: the flags set on the command line (a resume reports those it ignores).
    """
    return loop.train("tokenizer", cfg, given, TokenizerTask.from_run)
