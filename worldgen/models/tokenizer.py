"""Per-frame VAE tokenizer: a frame (B, 3, H, W) in [-1, 1] <-> a latent grid (B, 16, H/8, W/8).

Per-frame (image-level) latents keep interaction frame-granular: the DiT predicts one
frame's latent per action, and any frame can be decoded alone.

Convolutional ResNet encoder/decoder (GroupNorm, SiLU), no attention: at 15x20 latents a
3x3 conv stack already sees the whole frame, and convs are the fastest thing on any device.
The encoder outputs a diagonal Gaussian posterior; the VAE's small KL term keeps latents
near N(0, 1) and its posterior noise makes the decoder robust to small latent errors, which
is what a diffusion model on these latents produces.

Training (the trainer's loop)::

    x_hat, aux = tok(x)                        # decodes a posterior sample
    loss = recon(x_hat, x) + sum(aux.values()) # aux terms come weighted already
    ...
    tok.cfg.latent_scale = tok.latent_std(x_batch)  # once, after training

Inference: ``z = tok.encode(x)`` (posterior mean divided by ``latent_scale``, so ~unit std
for the DiT) and ``x_hat = tok.decode(z)``.

Example:
    >>> tok = Tokenizer(TokenizerConfig(channels=(8, 8, 8, 8)))
    >>> z = tok.encode(torch.zeros(2, 3, 120, 160))
    >>> z.shape, tok.decode(z).shape
    (torch.Size([2, 16, 15, 20]), torch.Size([2, 3, 120, 160]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenizerConfig:
    image_size: tuple[int, int] = (120, 160)  # (H, W): ViZDoom frames recorded at 160x120
    in_channels: int = 3  # RGB; 4 = RGB + depth, encoded and decoded jointly
    latent_channels: int = 16  # 16 channels at 8x down (12x compression) reach ~30 dB
    downsample: int = 8  # 120x160 -> 15x20 latents = 300 DiT tokens per frame
    # Width per resolution level, full resolution first; log2(downsample) + 1 levels. Narrow at
    # full resolution, where convs cost the most FLOPs, wide at low resolution, where they are cheap.
    channels: tuple[int, ...] = (32, 64, 128, 128)
    enc_blocks: int = 1  # ResNet blocks per level in the encoder
    dec_blocks: int = 2  # the decoder's job (inventing detail) is harder
    # The decoder's widths, full resolution first; () = channels. It runs on every played frame
    # (the encoder only on the start context), so a narrower one is the cheaper way to stream
    # faster: `worldgen train tokenizer --decoder-only` trains one for a frozen encoder.
    dec_channels: tuple[int, ...] = ()
    groups: int = 8  # GroupNorm groups; must divide every width
    # Per latent element, against a per-pixel reconstruction loss. Small: the KL only has to stop
    # the latents drifting in scale and keep posterior noise alive, not to compress.
    kl_weight: float = 1e-4
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the diffusability of autoencoders"):
    # the decoder of a 2x-downsampled latent must give the 2x-downsampled frame. Without it the
    # latents carry high-frequency noise-like detail (a 2-pixel shift changed them by half their
    # variance), which a diffusion model predicts poorly; 0 turns it off.
    equivariance_weight: float = 0.0
    latent_scale: float = 1.0  # std of the posterior means; set after training

    def __post_init__(self) -> None:
        levels = int(math.log2(self.downsample))
        if 2**levels != self.downsample or levels < 1:
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if len(self.channels) != levels + 1:
            raise ValueError(f"channels needs log2(downsample) + 1 = {levels + 1} widths, got {self.channels}")
        if any(c % self.groups for c in self.channels):
            raise ValueError(f"groups={self.groups} must divide every width in channels={self.channels}")
        if self.dec_channels and len(self.dec_channels) != levels + 1:
            raise ValueError(f"dec_channels needs log2(downsample) + 1 = {levels + 1} widths, got {self.dec_channels}")
        if any(c % self.groups for c in self.dec_channels):
            raise ValueError(f"groups={self.groups} must divide every width in dec_channels={self.dec_channels}")
        if any(s % self.downsample for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be divisible by downsample={self.downsample}")
        if not self.latent_scale > 0:
            raise ValueError(f"latent_scale must be > 0, got {self.latent_scale}")

    @property
    def latent_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.downsample, self.image_size[1] // self.downsample)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv: no checkerboard artifacts, unlike a transposed conv. It
    narrows to the next level's width at once, so no conv runs wide at the higher resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _head(c: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(groups, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, c_out, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            if i > 0:  # strided conv halves resolution, keeps width; the block then widens
                layers.append(nn.Conv2d(c_prev, c_prev, 3, stride=2, padding=1))
            layers += [ResBlock(c_prev if j == 0 else c, c, g) for j in range(cfg.enc_blocks)]
        self.body = nn.Sequential(*layers)
        self.head = _head(ch[-1], 2 * cfg.latent_channels, g)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.conv_in(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, g = (cfg.dec_channels or cfg.channels)[::-1], cfg.groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            if i > 0:
                layers.append(Upsample(ch[i - 1], c))
            layers += [ResBlock(c, c, g) for _ in range(cfg.dec_blocks)]
        self.body = nn.Sequential(*layers)
        self.head = _head(ch[-1], cfg.in_channels, g)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.conv_in(z)))


class Tokenizer(nn.Module):
    """Per-frame VAE. ``encode``/``decode`` work on scaled latents (~unit std); ``forward`` is
    the training path. All methods take any batch size; frames are independent."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x: torch.Tensor) -> None:
        want = (self.cfg.in_channels, *self.cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"tokenizer input must be (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and log-variance, each (B, C, h, w)."""
        self._check(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) in [-1, 1] -> (B, C, h, w): the posterior mean / latent_scale."""
        return self.posterior(x)[0] / self.cfg.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents -> (B, in_channels, H, W), roughly in [-1, 1] (not clamped)."""
        want = (self.cfg.latent_channels, *self.cfg.latent_size)
        if z.ndim != 4 or tuple(z.shape[1:]) != want:
            raise ValueError(f"latents must be (B, {', '.join(map(str, want))}), got {tuple(z.shape)}")
        return self.decoder(z * self.cfg.latent_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training path: decode a posterior sample.

        Returns ``(x_hat, aux)``: ``x_hat`` (B, in_channels, H, W) and ``aux`` = {"kl": ...},
        loss terms already multiplied by their config weight, to be added to the trainer's
        reconstruction loss (a per-pixel mean, e.g. MSE or L1 against ``x``).
        """
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).mean()
        aux = {"kl": self.cfg.kl_weight * kl}
        if self.cfg.equivariance_weight > 0:
            h, w = (n // 2 * 2 for n in z.shape[-2:])  # even latent grid (15 rows -> 14)
            f = self.cfg.downsample
            small = self.decoder(F.avg_pool2d(z[..., :h, :w], 2))  # (B, C, H/2, W/2)
            aux["equivariance"] = self.cfg.equivariance_weight * F.mse_loss(
                small.float(), F.avg_pool2d(x[..., : h * f, : w * f], 2).float()
            )
        return self.decoder(z), aux

    @torch.no_grad()
    def latent_std(self, x: torch.Tensor) -> float:
        """Std of the unscaled posterior means of frames ``x``: the ``latent_scale`` to store so
        that ``encode`` gives ~unit-std latents, which the DiT's noise schedule assumes."""
        return self.posterior(x)[0].float().std().item()
