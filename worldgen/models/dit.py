"""Block-causal diffusion transformer over per-frame latents (docs/architecture.md).

Each frame's latent (C, h, w) becomes h*w/p^2 patch tokens. The sequence of a forward is the
frames' tokens, frame-major. Attention is bidirectional inside a block of
``frames_per_block`` frames and causal across blocks (see :mod:`worldgen.models.attention`).
Positions are 3D RoPE over (frame position, row, column).

What a forward sees besides its own frames comes in one :class:`Context`: the frame positions
(a streaming engine uses window-relative ones), a KV cache's past keys and values with their
mask, and the frame memory's recalled frames (:class:`Memory`), non-causal context in front
that every frame sees.

Conditioning is adaLN-zero as in DiT, but per frame: frame f's tokens are modulated by
``c_f = t_embed(t_f) + action_mlp(a_f)``, its own noise level and the action that produced
it. With Diffusion Forcing every frame carries its own noise level: a frame at ``t = 0`` is
clean context, one at ``t = 1`` pure noise.

Flow matching: ``x_t = (1 - t) x0 + t eps``; the model predicts the velocity ``v = eps - x0``.

Example:
    >>> dit = DiT(MODELS["tiny"])
    >>> x = torch.randn(2, 3, 16, 15, 20)           # (B, T, C, h, w) noisy latents
    >>> t = torch.tensor([[0.0, 0.0, 0.7]] * 2)     # two clean context frames, one noisy
    >>> dit(x, t, torch.zeros(2, 3, 10)).shape      # velocity per frame
    torch.Size([2, 3, 16, 15, 20])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from worldgen.actions import ACTION_DIM
from worldgen.models.attention import Attention, LayerKV, Mask, dense_mask, make_mask, rope_angles, rope_sections


@dataclass
class DiTConfig:
    latent_channels: int = 16  # the tokenizer's latent channels (in and out)
    latent_size: tuple[int, int] = (15, 20)  # (h, w) of a frame's latent grid: 160x120 / 8
    # 2: 8x10 = 80 tokens per frame (the grid is zero-padded to 16 rows), 1/4 the tokens of
    # patch 1 and 1/16 the attention: many more frames per GPU-second to learn from.
    patch_size: int = 2
    dim: int = 256
    depth: int = 8
    heads: int = 4  # head dim 64: the efficient size for flash/flex kernels
    mlp_ratio: float = 4.0
    action_dim: int = ACTION_DIM  # worldgen.actions.to_vector: 8 keys + 2 mouse deltas
    # Extra per-frame input-only channels concatenated to the latents (e.g. a rendered
    # point-cloud view's latents); the output stays latent_channels.
    cond_channels: int = 0
    frames_per_block: int = 1  # 1 = frame-level causality: interaction per frame
    # A learned "no action" embedding that stands in for dropped actions (trainer's
    # action_dropout): the action-free prediction that action guidance steers away from.
    null_action: bool = False
    max_frames: int = 64  # most frames (prefix included) one forward accepts
    # Most recalled frames (worldgen.memory.bank) a forward takes as non-causal context, each
    # conditioned on its pose relative to the newest frame's camera and its age; 0: a model
    # trained without memory (no memory embedder, memory refused).
    memory_frames: int = 0
    qk_norm: bool = True  # bounds attention logits: stable bf16 training
    rope_theta: float = 10000.0
    attn_impl: str = "auto"  # "flex" | "sdpa" | "auto" (flex to train on CUDA, else sdpa): see make_mask

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        rope_sections(self.dim // self.heads)  # raises if the head dim cannot be split three ways
        if self.frames_per_block < 1 or self.max_frames < 1 or self.memory_frames < 0:
            raise ValueError(
                f"frames_per_block and max_frames must be >= 1 and memory_frames >= 0, got "
                f"{self.frames_per_block}, {self.max_frames}, {self.memory_frames}"
            )
        if self.attn_impl not in ("flex", "sdpa", "auto"):
            raise ValueError(f"attn_impl must be 'flex', 'sdpa' or 'auto', got {self.attn_impl!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patch tokens per frame; a partial patch at the edge is zero-padded."""
        return tuple(-(-n // self.patch_size) for n in self.latent_size)

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]


# Sizes. Shipped weights may take 48 MiB in all (tokenizer, DiT, start contexts): "M" fits in
# bf16, "B" only stored in fp8 (`worldgen checkpoint convert --dtype fp8`, one scale per tensor).
MODELS: dict[str, DiTConfig] = {
    # CPU tests: ~0.2M params; patch 1, since test latents are only a few cells across.
    "tiny": DiTConfig(patch_size=1, dim=64, depth=2, heads=2, max_frames=16),
    # ~10M params; 80 tokens a frame (patch 2) keep attention a small share of its FLOPs.
    "S": DiTConfig(dim=256, depth=8, heads=4),
    # ~13M params: the shipped default's size (26 MiB in bf16).
    "M": DiTConfig(dim=256, depth=11, heads=4),
    # ~32M params: for longer training runs; shippable in fp8 (31 MiB; 34 with the tokenizer).
    "B": DiTConfig(dim=384, depth=12, heads=6),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Noise level t in [0, 1] -> (D,): sinusoidal features of 1000 t, then an MLP (as DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (...) -> (..., D)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[..., None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], -1))


@dataclass
class Memory:
    """Recalled frames (:func:`worldgen.memory.bank.recall`) that every frame of a forward sees as
    non-causal context in front of it; they are never predicted, so never in a loss."""

    z: torch.Tensor  # (B, P, C, h, w) their clean latents
    pose: torch.Tensor  # (B, P, 6) pose relative to the newest frame's camera (bank.relative_pose)
    age: torch.Tensor  # (B, P) steps between each and the newest frame
    mask: torch.Tensor | None = None  # (B, P) bool: real recalls (None: all); others are hidden from every frame
    level: torch.Tensor | None = None  # (B, P) noise level they are labelled with; None: 0 (clean)

    def repeat(self, n: int) -> Memory:
        """The batch ``n`` times over (guidance runs each pass on two copies)."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(n, *[1] * (x.ndim - 1))

        return Memory(rep(self.z), rep(self.pose), rep(self.age), rep(self.mask), rep(self.level))


@dataclass
class Context:
    """What a forward attends to besides its own frames, for streaming and memory; the default
    (all None) is a plain training forward over frames at positions ``0 .. T - 1``."""

    # (T,) or (B, T) RoPE time position per frame; None: arange(T).
    frame_pos: torch.Tensor | None = None
    # Per layer, keys (rotated to frame_pos's frame of reference) and values of earlier frames
    # that every frame here sees: a streaming cache (worldgen.engine). Each LayerKV.new receives
    # the forward's own keys and values. The frames here stay block-causal among themselves.
    past: list[LayerKV] | None = None
    past_mask: torch.Tensor | None = None  # (B, Lc) bool: which past keys are real (a cache's empty slots are not)
    # Recalled frames (needs cfg.memory_frames), in front at the newest frame's time position;
    # their keys and values lead each LayerKV.new.
    memory: Memory | None = None

    def repeat(self, n: int) -> Context:
        """The batch ``n`` times over (guidance runs each pass on two copies); ``past`` gets new
        :class:`LayerKV` holders, so each copy's forward records its own keys."""

        def rep(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.repeat(n, *[1] * (x.ndim - 1))

        shared_pos = self.frame_pos is None or self.frame_pos.ndim == 1  # (T,): one for the whole batch
        return Context(
            self.frame_pos if shared_pos else rep(self.frame_pos),
            None if self.past is None else [LayerKV(rep(p.k), rep(p.v)) for p in self.past],
            rep(self.past_mask),
            None if self.memory is None else self.memory.repeat(n),
        )


class MemoryEmbedder(nn.Module):
    """A memory frame's relative pose (6,) and age -> (D,), in place of its action embedding:
    Fourier features (sizes from a step's move to a map's width), then an MLP."""

    def __init__(self, dim: int, pose_dim: int = 6, n_freqs: int = 8):
        super().__init__()
        self.n_freqs = n_freqs
        n_in = (pose_dim + 1) * (2 * n_freqs + 1)
        self.mlp = nn.Sequential(nn.Linear(n_in, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, pose: torch.Tensor, age: torch.Tensor) -> torch.Tensor:  # (B, P, 6), (B, P) -> (B, P, D)
        # log age: one step and 10,000 steps apart both stay in reach of the features.
        f = torch.cat([pose.float(), (torch.log1p(age.float().clamp(min=0)) / math.log(1e4))[..., None]], -1)
        freqs = 0.5 * 2.0 ** torch.arange(self.n_freqs, device=f.device)
        ang = f[..., None] * freqs  # (B, P, 7, F)
        return self.mlp(torch.cat([f, ang.sin().flatten(-2), ang.cos().flatten(-2)], -1))


class Block(nn.Module):
    """adaLN-zero transformer block whose modulation varies per frame."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Linear(d, 6 * d)  # zero-initialised: the block starts as the identity

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: Mask,
        past: LayerKV | None = None,
    ) -> torch.Tensor:
        """x (B, T, N, D) tokens; c (B, T, D) per-frame conditioning, already through SiLU."""
        b, t, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, :, None].chunk(6, -1)  # (B, T, 1, D)
        h = modulate(self.norm1(x), shift1, scale1).reshape(b, t * n, d)
        x = x + gate1 * self.attn(h, rope, mask, past).view(b, t, n, d)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Block-causal, action-conditioned DiT; ``forward(x, t, actions) -> v``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p, c = cfg.dim, cfg.patch_size, cfg.latent_channels
        self.patch_embed = nn.Linear((c + cfg.cond_channels) * p * p, d)
        self.t_embed = TimestepEmbedder(d)
        self.action_embed = nn.Sequential(nn.Linear(cfg.action_dim, d), nn.SiLU(), nn.Linear(d, d))
        if cfg.null_action:
            self.null_action = nn.Parameter(torch.zeros(d))
        if cfg.memory_frames:
            self.memory_embed = MemoryEmbedder(d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final_proj = nn.Linear(d, p * p * c)
        self._init_weights()

    def _init_weights(self) -> None:
        # As facebookresearch/DiT: xavier linears, N(0, 0.02) embedding MLPs, and every
        # modulation and the output layer zeroed, so the model starts as v = 0 and each block
        # as the identity: stable from the first step.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        memory_mlp = (self.memory_embed.mlp,) if self.cfg.memory_frames else ()
        for mlp in (self.t_embed.mlp, self.action_embed, *memory_mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for m in [blk.ada for blk in self.blocks] + [self.final_ada, self.final_proj]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        *,
        drop_actions: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        context: Context | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of every frame.

        Args:
            x: (B, T, C, h, w) latents, frame f noised to level ``t[:, f]``.
            t: (B, T) noise level per frame in [0, 1]; 0 = clean context, 1 = pure noise.
            actions: (B, T, action_dim) ``worldgen.actions.to_vector`` of the action that
                produced each frame.
            drop_actions: (B, T) bool, frames whose action is replaced by the learned null
                action (needs ``cfg.null_action``): action dropout, and guidance's other half.
            cond: (B, T, cond_channels, h, w) extra input channels, if the config has any.
            context: frame positions, a cache's past keys and values, recalled memory frames
                (:class:`Context`); None: none of them.
        Returns:
            v: (B, T, C, h, w) predicted velocity ``eps - x0`` (memory frames left out).
        """
        cfg = self.cfg
        ctx = context or Context()
        b, n_frames = x.shape[:2]
        self._check_inputs(x, t, actions, cond, drop_actions)
        memory, past = ctx.memory, ctx.past
        n_mem = 0
        if memory is not None:
            n_mem = self._check_memory(memory, x)
            x = torch.cat([memory.z.to(x.dtype), x], 1)
            if cond is not None:  # memory frames bring no extra channels
                cond = torch.cat([cond.new_zeros(b, n_mem, *cond.shape[2:]), cond], 1)
            n_frames = n_frames + n_mem
        p, (gh, gw) = cfg.patch_size, cfg.grid
        if cond is not None:
            x = torch.cat([x, cond], 2)
        h_lat, w_lat = cfg.latent_size
        x = F.pad(x, (0, gw * p - w_lat, 0, gh * p - h_lat))  # whole patches
        tokens = rearrange(x, "b t c (h p) (w q) -> b t (h w) (p q c)", p=p, q=p)
        h = self.patch_embed(tokens)  # (B, T, N, D)
        a = self.action_embed(actions)  # (B, T, D)
        if drop_actions is not None:
            a = torch.where(drop_actions[..., None], self.null_action.to(a.dtype), a)
        c = self.t_embed(t) + a  # (B, T, D)
        frame_pos = ctx.frame_pos if ctx.frame_pos is not None else torch.arange(n_frames - n_mem, device=x.device)
        if memory is not None:
            level = memory.level if memory.level is not None else torch.zeros(memory.age.shape, device=x.device)
            c = torch.cat([self.t_embed(level) + self.memory_embed(memory.pose, memory.age), c], 1)
            # Recalled frames sit at the newest frame's position: their time is the age embedding.
            frame_pos = torch.cat([frame_pos[..., -1:].expand(*frame_pos.shape[:-1], n_mem), frame_pos], -1)
        c = F.silu(c)
        rope = self.rope(frame_pos, n_frames)
        # A cache's keys (or recalled frames) come with a per-session mask: dense SDPA (streaming
        # needs no flex), the mask built in the graph rather than looked up, so a compiled streaming
        # step is one graph.
        if past is not None or (memory is not None and memory.mask is not None):
            mask = dense_mask(cfg.tokens_per_frame, n_frames - n_mem, cfg.frames_per_block, n_mem, x.device)
        else:
            mask = make_mask(
                cfg.attn_impl, cfg.tokens_per_frame, n_frames - n_mem, cfg.frames_per_block, n_mem, x.device
            )
        if memory is not None and memory.mask is not None:
            mask = _hide_memory(mask, memory.mask, cfg.tokens_per_frame)
        if past is not None:
            mask = _with_past(mask, ctx.past_mask, past[0].k.shape[2], b, n_mem * cfg.tokens_per_frame)
        for i, block in enumerate(self.blocks):
            h = block(h, c, rope, mask, past[i] if past is not None else None)

        shift, scale = self.final_ada(c)[:, :, None].chunk(2, -1)  # (B, T, 1, D)
        out = self.final_proj(modulate(self.final_norm(h), shift, scale))  # (B, T, N, p*p*C)
        out = rearrange(out, "b t (h w) (p q c) -> b t c (h p) (w q)", h=gh, w=gw, p=p, q=p)
        return out[:, n_mem:, :, :h_lat, :w_lat]

    def rope(self, frame_pos: torch.Tensor, n_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B or 1, 1, T*N, head_dim/2) for tokens at (frame_pos[f], row, column); a
        streaming cache rotates its stored keys with these too."""
        gh, gw = self.cfg.grid
        if frame_pos.shape[-1] != n_frames or frame_pos.ndim not in (1, 2):
            raise ValueError(f"frame_pos must be (T,) or (B, T) with T={n_frames}, got {tuple(frame_pos.shape)}")
        fp = frame_pos.float().reshape(-1, n_frames)  # (B or 1, T)
        rows, cols = torch.meshgrid(
            torch.arange(gh, device=fp.device), torch.arange(gw, device=fp.device), indexing="ij"
        )
        space = torch.stack([rows.flatten(), cols.flatten()], -1).float()  # (N, 2)
        pos = torch.cat(
            [fp[:, :, None, None].expand(-1, -1, len(space), 1), space.expand(*fp.shape, -1, -1)], -1
        )  # (B, T, N, 3)
        cos, sin = rope_angles(pos.flatten(1, 2), self.cfg.dim // self.cfg.heads, self.cfg.rope_theta)
        return cos[:, None], sin[:, None]

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        actions: torch.Tensor,
        cond: torch.Tensor | None,
        drop_actions: torch.Tensor | None,
    ) -> None:
        cfg = self.cfg
        want = (cfg.latent_channels, *cfg.latent_size)
        if x.ndim != 5 or tuple(x.shape[2:]) != want:
            raise ValueError(f"x must be (B, T, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        b, n = x.shape[:2]
        if n > cfg.max_frames:
            raise ValueError(f"{n} frames exceed max_frames={cfg.max_frames} of this model")
        if tuple(t.shape) != (b, n):
            raise ValueError(f"t must be (B, T) = {(b, n)} (one noise level per frame), got {tuple(t.shape)}")
        if tuple(actions.shape) != (b, n, cfg.action_dim):
            raise ValueError(
                f"actions must be (B, T, {cfg.action_dim}) = {(b, n, cfg.action_dim)}, got {tuple(actions.shape)}"
            )
        if drop_actions is not None and (
            not cfg.null_action or tuple(drop_actions.shape) != (b, n) or drop_actions.dtype != torch.bool
        ):
            raise ValueError(
                f"drop_actions must be a (B, T) = {(b, n)} bool tensor and the model needs a null "
                f"action (null_action={cfg.null_action}: trained without action dropout)"
            )
        if (cond is None) != (cfg.cond_channels == 0):
            raise ValueError(
                f"cond must be given exactly when cond_channels > 0 "
                f"(cond_channels={cfg.cond_channels}, cond given: {cond is not None})"
            )
        if cond is not None and tuple(cond.shape) != (b, n, cfg.cond_channels, *cfg.latent_size):
            raise ValueError(f"cond must be {(b, n, cfg.cond_channels, *cfg.latent_size)}, got {tuple(cond.shape)}")

    def _check_memory(self, memory: Memory, x: torch.Tensor) -> int:
        """The number of memory frames P, after checking them against the model and ``x``."""
        cfg, (b, n) = self.cfg, x.shape[:2]
        if not cfg.memory_frames:
            raise ValueError("this model was trained without memory (memory_frames=0): it takes no memory frames")
        p = memory.z.shape[1] if memory.z.ndim == 5 else -1
        shapes = {
            "z": (memory.z, (b, p, *x.shape[2:])),
            "pose": (memory.pose, (b, p, 6)),
            "age": (memory.age, (b, p)),
            "mask": (memory.mask, (b, p)),
            "level": (memory.level, (b, p)),
        }
        for name, (got, want) in shapes.items():
            if got is not None and tuple(got.shape) != want:
                raise ValueError(f"memory.{name} must be {want}, got {tuple(got.shape)}")
        if not 1 <= p <= cfg.memory_frames or p + n > cfg.max_frames:
            raise ValueError(
                f"{p} memory frames: this model takes 1..{cfg.memory_frames}, and at most "
                f"max_frames={cfg.max_frames} frames with the {n} others"
            )
        if memory.mask is not None and memory.mask.dtype != torch.bool:
            raise ValueError(f"memory.mask must be bool, got {memory.mask.dtype}")
        return p


def _hide_memory(mask: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 1, L, L): the dense ``mask`` (L, L) with the tokens of memory frames not in ``keep``
    (B, P) hidden from every query but their own frame's (a row must see something)."""
    b, p = keep.shape
    length = mask.shape[-1]
    frame = torch.arange(length, device=mask.device) // n
    own = frame[:, None] == frame[None, :]  # (L, L)
    key_ok = torch.cat([keep, keep.new_ones(b, length // n - p)], 1).repeat_interleave(n, 1)  # (B, L)
    return (mask & (key_ok[:, None, :] | own))[:, None]


def _with_past(
    mask: torch.Tensor, past_mask: torch.Tensor | None, n_past: int, b: int, prefix_tokens: int = 0
) -> torch.Tensor:
    """The dense (B, 1, Lq, Lc + Lq) mask: ``past_mask`` (B, Lc) over the past keys (all real
    if None), then the block-causal ``mask`` (Lq, Lq) or (B, 1, Lq, Lq) among the new tokens.
    The first ``prefix_tokens`` (memory frames) see no past keys, as in training."""
    n_new = mask.shape[-1]
    if past_mask is None:
        past_mask = torch.ones(b, n_past, dtype=torch.bool, device=mask.device)
    past = past_mask[:, None, None, :].expand(b, 1, n_new, n_past)
    if prefix_tokens:
        past = past & (torch.arange(n_new, device=mask.device) >= prefix_tokens)[:, None]
    return torch.cat([past, mask.expand(b, 1, n_new, n_new)], -1)


def flops_per_frame(cfg: DiTConfig, frames: int) -> float:
    """Forward FLOPs (a multiply-add = 2) per frame of a ``frames``-frame block-causal window,
    attention counted over visible keys only (what a block-sparse kernel computes).
    Training costs ~3x this (forward + backward). For model FLOPs utilisation::

        mfu = 3 * flops_per_frame(cfg, T) * frames_per_second / peak_flops
    """
    n, d, p, c = cfg.tokens_per_frame, cfg.dim, cfg.patch_size, cfg.latent_channels
    hidden = int(d * cfg.mlp_ratio)
    per_token = 2 * (
        (c + cfg.cond_channels) * p * p * d  # patch embed
        + cfg.depth * (4 * d * d + 2 * d * hidden)  # qkv, proj, mlp
        + d * p * p * c
    )  # output projection
    per_frame = 2 * (
        256 * d
        + d * d
        + cfg.action_dim * d
        + d * d  # t and action embedders
        + cfg.depth * 6 * d * d
        + 2 * d * d
    )  # adaLN modulations
    fpb = cfg.frames_per_block
    visible = sum(min(frames, (f // fpb + 1) * fpb) for f in range(frames)) * n  # keys per query token, summed
    attention = cfg.depth * 4 * d * n * visible  # QK^T and AV per query token
    return (frames * (n * per_token + per_frame) + attention) / frames


def flops_per_token(cfg: DiTConfig, frames: int) -> float:
    """:func:`flops_per_frame` / tokens per frame."""
    return flops_per_frame(cfg, frames) / cfg.tokens_per_frame
