"""Attention pieces of the DiT: QK-normed multi-head attention, 3D RoPE and the block-causal mask.

The token sequence of one forward is ``P`` prefix frames followed by ``T`` frames, each of
``N`` tokens, flattened frame-major: token ``i`` belongs to frame ``i // N``.

* Prefix frames (memory frames, a rendered view: non-causal context) are visible to every
  token and see only the prefix.
* Frame ``f`` lies in block ``f // frames_per_block``; a token sees every token of its own
  block (bidirectional) and of earlier blocks (causal across blocks).

One ``mask_mod`` states this rule; the FlexAttention ``BlockMask`` and the dense boolean mask
for SDPA are both built from it, so the two paths cannot disagree.

Example:
    >>> dense_mask(tokens_per_frame=1, frames=3).int().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Mask = BlockMask | torch.Tensor | None  # what attend() takes: see there


def block_causal_mask_mod(tokens_per_frame: int, frames_per_block: int = 1, prefix_frames: int = 0) -> MaskMod:
    """``mask_mod(b, h, q_idx, kv_idx) -> bool``: may query token ``q_idx`` see key ``kv_idx``?"""
    n, fpb, p = tokens_per_frame, frames_per_block, prefix_frames

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        fq, fk = q_idx // n, kv_idx // n
        # Frame blocks count from the first frame after the prefix.
        causal = (fq >= p) & ((fk - p) // fpb <= (fq - p) // fpb)
        return (fk < p) | causal

    return mask_mod


def dense_mask(
    tokens_per_frame: int,
    frames: int,
    frames_per_block: int = 1,
    prefix_frames: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(L, L) bool, True = may attend, for L = (prefix_frames + frames) * tokens_per_frame."""
    idx = torch.arange((prefix_frames + frames) * tokens_per_frame, device=device)
    return block_causal_mask_mod(tokens_per_frame, frames_per_block, prefix_frames)(
        None, None, idx[:, None], idx[None, :]
    )


_BLOCK_MASKS: dict[tuple, BlockMask] = {}
_DENSE_MASKS: dict[tuple, torch.Tensor] = {}
_MAX_CACHED = 64  # masks for every window length a sampler meets, without growing forever
_compiled_flex: Callable | None = None


def _cached(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
    if key not in cache:
        if len(cache) >= _MAX_CACHED:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


@torch.compiler.disable  # Python-side caching: keep it out of a compiled graph (one graph break)
def make_mask(
    impl: str,
    tokens_per_frame: int,
    frames: int,
    frames_per_block: int = 1,
    prefix_frames: int = 0,
    device: torch.device | str = "cpu",
) -> BlockMask | torch.Tensor:
    """The block-causal mask for one sequence layout, cached, in the form ``impl`` uses.

    ``impl``: ``"flex"`` (a FlexAttention ``BlockMask``; compiled flex on CUDA skips fully
    masked tiles: ~half the FLOPs of dense causal attention), ``"sdpa"`` (a dense (L, L) bool
    mask for ``F.scaled_dot_product_attention``: the reference), or ``"auto"``: flex when
    training on CUDA; sdpa elsewhere (uncompiled CPU flex materialises the full score matrix
    anyway and has no backward) and under no_grad (samplers meet a new sequence length per
    context size, and compiled flex would recompile for each).
    """
    device = torch.device(device)
    if impl == "auto":
        impl = "flex" if device.type == "cuda" and torch.is_grad_enabled() else "sdpa"
    key = (tokens_per_frame, frames, frames_per_block, prefix_frames, str(device))
    if impl == "sdpa":
        return _cached(
            _DENSE_MASKS, key, lambda: dense_mask(tokens_per_frame, frames, frames_per_block, prefix_frames, device)
        )
    if impl == "flex":
        length = (prefix_frames + frames) * tokens_per_frame
        return _cached(
            _BLOCK_MASKS,
            key,
            lambda: create_block_mask(
                block_causal_mask_mod(tokens_per_frame, frames_per_block, prefix_frames),
                None,
                None,
                length,
                length,
                device=device,
            ),
        )
    raise ValueError(f"attn_impl must be 'flex', 'sdpa' or 'auto', got {impl!r}")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Attention of q (B, H, Lq, d) over k, v (B, H, Lk, d) -> (B, H, Lq, d).

    ``mask``: a ``BlockMask`` (FlexAttention), a bool tensor broadcastable to (B, H, Lq, Lk)
    (True = may attend), or None (every key visible, e.g. a KV cache holding only the past).
    """
    if isinstance(mask, BlockMask):
        return _flex(q.device)(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _flex(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA (eager flex is a slow reference there); eager elsewhere
    and inside an already compiled graph, which compiles it along."""
    global _compiled_flex
    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dim into (time, height, width) parts, each even: a quarter for time
    (few distinct frame positions), the rest shared by the two spatial axes."""
    if head_dim % 8:
        raise ValueError(f"head dim must be a multiple of 8 for 3D RoPE, got {head_dim}")
    t = 2 * (head_dim // 8)
    h = 2 * ((head_dim - t) // 4)
    return t, h, head_dim - t - h


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for 3D RoPE.

    Args:
        positions: (..., L, 3) float (time, row, column) of each token.
    Returns:
        cos, sin: (..., L, head_dim // 2) float32. Pair ``i`` of the head dim is (i, i + d/2).
    """
    angles = []
    for axis, size in enumerate(rope_sections(head_dim)):
        freqs = theta ** (-torch.arange(0, size, 2, device=positions.device, dtype=torch.float32) / size)
        angles.append(positions[..., axis, None].float() * freqs)  # (..., L, size/2)
    a = torch.cat(angles, -1)
    return a.cos(), a.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, L, d) by cos/sin broadcastable to (B, H, L, d/2); math in float32."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, output in the input dtype (bf16-autocast safe)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight).to(x.dtype)


@dataclass
class LayerKV:
    """Keys and values of earlier frames for one layer (a streaming session's cache), plus a slot
    the attention fills with the pass's own keys and values, for the cache to store.

    ``k`` is already rotated to this pass's positions; ``new`` holds the pass's keys *before*
    RoPE, so a cache can re-position them later (positions then never run out).
    """

    k: torch.Tensor  # (B, H, Lc, d), rotated
    v: torch.Tensor  # (B, H, Lc, d)
    new: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, H, Lq, d) each: unrotated k, v


class Attention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and RoPE.

    Keys are rotated here, after the norm. A KV cache that must re-position keys later stores
    them before :func:`apply_rope` (see :meth:`qkv`).
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # QK-norm bounds attention logits, so bf16 training tolerates higher learning rates.
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D) -> normed q, k and v, each (B, H, L, d), not yet rotated."""
        q, k, v = rearrange(self.qkv_proj(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Mask, past: LayerKV | None = None
    ) -> torch.Tensor:
        """x (B, L, D); rope: cos, sin (B or 1, 1, L, d/2); mask: see :func:`attend`, over
        ``past`` keys then these. With ``past``, its ``new`` receives this pass's k and v."""
        q, k, v = self.qkv(x)
        q, k_rot = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            past.new = (k, v)
            k_rot, v = torch.cat([past.k.to(k_rot.dtype), k_rot], 2), torch.cat([past.v.to(v.dtype), v], 2)
        o = attend(q, k_rot, v, mask)  # (B, H, L, d)
        return self.proj(rearrange(o, "b h l d -> b l (h d)"))
