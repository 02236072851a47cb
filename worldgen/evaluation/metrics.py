"""Weights-free image metrics, per image, batched on whatever device the inputs live on.

Two input forms, told apart by dtype, so callers never rescale by hand:

* uint8 frames ``(..., H, W, 3)`` (numpy or torch), as recorded and as a player sees them;
* float model-space images ``(..., 3, H, W)`` in [-1, 1] (``worldgen.models.frames_to_tensor``).

Both are compared on the [0, 1] scale, so a PSNR is the same number whichever form is given.

Identical images have infinite PSNR. Averages over frames would then be infinite too, and a
Doom recording has identical consecutive frames whenever the player stands still, so PSNR is
capped at :data:`PSNR_CAP_DB`: the PSNR of uniform 8-bit rounding noise. An error smaller than
the rounding of the stored frames themselves is not measurable, and the cap keeps one still
frame from outweighing many real ones in the mean.

Example:
    >>> import numpy as np
    >>> a = np.zeros((2, 120, 160, 3), np.uint8)
    >>> b = a.copy(); b[1] = 255
    >>> [round(v, 2) for v in psnr(a, b).tolist()]  # identical -> capped; black vs white -> 0 dB
    [58.92, 0.0]
    >>> ssim(a, a).tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

# 10 log10(1 / (1/255)^2 / 12): MSE of rounding to 8 bits is (1/255)^2 / 12 on the [0, 1] scale.
PSNR_CAP_DB = 10 * math.log10(12 * 255.0**2)
SSIM_CHUNK = 256  # images per SSIM call: ~0.6 GB of intermediates at 160x120


def to_unit(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` or float [-1, 1] ``(..., 3, H, W)`` -> float32 [0, 1] ``(N, 3, H, W)``."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        if x.ndim < 3 or x.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (..., H, W, 3), got {tuple(x.shape)}")
        return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 frames or float [-1, 1] tensors, got {x.dtype}")
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"float images must be (..., 3, H, W) in [-1, 1], got {tuple(x.shape)}")
    return (x.reshape(-1, *x.shape[-3:]).float().clamp(-1, 1) + 1) / 2


def _pair(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != y.shape or x.dtype.is_floating_point != y.dtype.is_floating_point:
        raise ValueError(
            f"cannot compare images of shape {tuple(x.shape)} {x.dtype} with "
            f"{tuple(y.shape)} {y.dtype}: same shape and form needed"
        )
    batch = tuple(x.shape[:-3])
    return to_unit(x), to_unit(y).to(x.device), batch


def psnr(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, shape ``x.shape[:-3]``, capped at PSNR_CAP_DB."""
    a, b, batch = _pair(x, y)
    mse = (a - b).square().mean((1, 2, 3))  # (N,)
    return (10 * torch.log10(1 / mse)).clamp(max=PSNR_CAP_DB).reshape(batch)


def ssim(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Structural similarity per image, shape ``x.shape[:-3]``; 1 for identical images.

    The standard SSIM of Wang et al. (2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
    K2 = 0.03, on the [0, 1] scale, averaged over the three colour channels.
    """
    a, b, batch = _pair(x, y)
    # Chunks bound the memory of SSIM's ~10 full-size intermediates for thousands of frames.
    out = [
        structural_similarity_index_measure(
            a[i : i + SSIM_CHUNK], b[i : i + SSIM_CHUNK], data_range=1.0, reduction="none"
        )
        for i in range(0, len(a), SSIM_CHUNK)
    ]
    return torch.cat(out).reshape(batch)


def by_map(maps: list[str | None], per_window: dict[str, torch.Tensor]) -> dict[str, dict[str, float | int | None]]:
    """Scores of each window (``per_window[name]``: ``(N, ...)``, NaN where not scored) averaged
    over the windows of each map and whatever dimensions follow, maps in name order:
    ``{map: {"windows": n, name: mean or None}}``. Windows of no known map are left out. It shows
    where a model is weak: Doom's maps differ in light, texture and room size.

    Example:
        >>> by_map(["E1M2", "E1M1", "E1M2"], {"psnr": torch.tensor([20.0, 18.0, 22.0])})
        {'E1M1': {'windows': 1, 'psnr': 18.0}, 'E1M2': {'windows': 2, 'psnr': 21.0}}
    """
    out: dict[str, dict[str, float | int | None]] = {}
    for m in sorted({m for m in maps if m}):
        rows = [i for i, x in enumerate(maps) if x == m]
        entry: dict[str, float | int | None] = {"windows": len(rows)}
        for name, v in per_window.items():
            x = v[torch.tensor(rows, device=v.device)].float()
            valid = ~x.isnan()
            entry[name] = round(float(x[valid].mean()), 4) if valid.any() else None
        out[m] = entry
    return out
