"""The world cache's view as DiT input: the rendered RGB-D view through the tokenizer, plus its mask.

A frame generated with the point-cloud world cache (:mod:`worldgen.memory.cloud`) is conditioned
on the cache rendered at its camera pose. The view enters the DiT as extra input channels of
that frame's latent grid (``DiTConfig.cond_channels``): the RGB-D view encoded by the model's own
tokenizer (so it lives in the space the DiT denoises, and a cache pixel and a generated pixel
are compared like for like) and the validity mask averaged over each latent cell (how much of
the cell the cache covers: 1 = all of it, 0 = a hole to invent). The tokenizer must be RGB-D:
the cache is built from generated depth, and an RGB tokenizer could not encode the view's.

Example:
    >>> from worldgen.memory.camera import DOOM
    >>> from worldgen.memory.cloud import View
    >>> tok = Tokenizer(TokenizerConfig(image_size=(24, 32), in_channels=4, latent_channels=4,
    ...                                 downsample=8, channels=(8, 8, 8, 8)))
    >>> view = View(torch.zeros(2, 3, 24, 32, 3, dtype=torch.uint8), torch.zeros(2, 3, 24, 32),
    ...             torch.zeros(2, 3, 24, 32, dtype=torch.bool))
    >>> view_condition(tok, view, DOOM.resized(32, 24)).shape, cond_channels(tok.cfg)
    (torch.Size([2, 3, 5, 3, 4]), 5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worldgen.memory.camera import Camera
from worldgen.memory.cloud import View
from worldgen.memory.views import PoseNoise, history_views
from worldgen.models import frames_to_tensor, tensor_to_uint8
from worldgen.models.tokenizer import Tokenizer, TokenizerConfig


def cond_channels(tokenizer: TokenizerConfig) -> int:
    """``DiTConfig.cond_channels`` of a world-cache model: the view's latents plus the mask."""
    check_rgbd(tokenizer)
    return tokenizer.latent_channels + 1


def check_rgbd(tokenizer: TokenizerConfig) -> None:
    if tokenizer.in_channels != 4:
        raise ValueError(
            f"the world cache needs a model that generates depth: an RGB-D tokenizer "
            f"(in_channels 4, `worldgen train tokenizer --depth`), this one has in_channels "
            f"{tokenizer.in_channels}"
        )


@torch.no_grad()
def view_condition(tokenizer: Tokenizer, view: View, camera: Camera) -> torch.Tensor:
    """Cache views ``(..., H, W)`` (a :class:`~worldgen.memory.cloud.View`) -> DiT conditioning
    ``(..., latent_channels + 1, h, w)``: the encoded RGB-D view, then the mask's cover of each
    latent cell in [-1, 1]."""
    cfg = tokenizer.cfg
    check_rgbd(cfg)
    lead, (h, w) = view.mask.shape[:-2], view.mask.shape[-2:]
    if (h, w) != tuple(cfg.image_size) or (camera.height, camera.width) != (h, w):
        raise ValueError(
            f"view is {h}x{w}, the tokenizer takes {cfg.image_size[0]}x{cfg.image_size[1]} "
            f"and the camera is {camera.height}x{camera.width}"
        )
    # Depth back to the stored uint8 levels the tokenizer was trained on; holes read 0 (the mask says so).
    level = camera.world_to_depth(view.depth).round().clamp(0, 255).to(torch.uint8)
    level = torch.where(view.mask, level, torch.zeros_like(level))
    rgbd = torch.cat([view.rgb, level[..., None]], -1).reshape(-1, h, w, 4)  # (N, H, W, 4)
    param = next(tokenizer.parameters())
    latents = tokenizer.encode(frames_to_tensor(rgbd, param.device).to(param.dtype))  # (N, C, h', w')
    cover = F.avg_pool2d(view.mask.reshape(-1, 1, h, w).to(latents), cfg.downsample) * 2 - 1  # (N, 1, h', w')
    out = torch.cat([latents, cover], 1)
    return out.reshape(*lead, *out.shape[1:])


@torch.no_grad()
def episode_condition(
    tokenizer: Tokenizer,
    camera: Camera,
    rgb: torch.Tensor,
    depth: torch.Tensor,
    pose: torch.Tensor,
    history: int,
    noise: PoseNoise | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """Every frame of an episode (``rgb (N, H, W, 3)`` uint8, ``depth (N, H, W)`` levels, ``pose
    (N, 5)``) with its cache view from its ``history`` predecessors (:func:`history_views`, at
    the pose plus ``noise``) as DiT conditioning ``(N, latent_channels + 1, h, w)``. ``chunk``
    frames render at once (a cloud each), which bounds the memory."""
    out = []
    for start in range(0, len(rgb), chunk):
        hi = min(start + chunk, len(rgb))
        window = (x[None, :hi] for x in (rgb, depth, pose))
        out.append(window_condition(tokenizer, camera, *window, history, start, noise, generator)[0])
    return torch.cat(out)


@torch.no_grad()
def window_condition(
    tokenizer: Tokenizer,
    camera: Camera,
    rgb: torch.Tensor,
    depth: torch.Tensor,
    pose: torch.Tensor,
    history: int,
    first: int = 0,
    noise: PoseNoise | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DiT conditioning ``(B, T - first, latent_channels + 1, h, w)`` of frames ``first:`` of windows
    ``rgb (B, T, H, W, 3)`` uint8, ``depth (B, T, H, W)`` levels, ``pose (B, T, 5)``: each frame's
    view of the cloud of its ``history`` predecessors in the window (:func:`history_views`, at its
    pose plus ``noise``); only the predecessors of those frames are fused."""
    lo = max(0, first - history)
    view = history_views(camera, rgb[:, lo:], depth[:, lo:], pose[:, lo:], history, noise=noise, generator=generator)
    return view_condition(tokenizer, View(*(x[:, first - lo :] for x in view)), camera)


@torch.no_grad()
def decode_rgbd(tokenizer: Tokenizer, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB-D latents ``(..., C, h, w)`` -> frames ``(..., H, W, 3)`` uint8 and depth ``(..., H, W)``
    in levels: what a generated frame brings to a cloud."""
    check_rgbd(tokenizer.cfg)
    param = next(tokenizer.parameters())
    x = tokenizer.decode(z.reshape(-1, *z.shape[-3:]).to(param.dtype))  # (N, 4, H, W)
    rgbd = tensor_to_uint8(x).reshape(*z.shape[:-3], *x.shape[-2:], 4)
    return rgbd[..., :3].contiguous(), rgbd[..., 3].float()
