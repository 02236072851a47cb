"""The sampler's cache backend (:mod:`worldgen.sampling`, docs/sampling.md): frames made a chunk
at a time on a rolling KV cache (:mod:`worldgen.engine.cache`), as streaming sessions play.

One step of B timelines (:func:`denoise`):

1. start the new chunk's latents from noise and take ``steps`` Euler steps on the shifted
   schedule (:func:`worldgen.sampling.euler`), every pass attending to the cache;
2. run one more pass on the finished latents, noised to the stabilisation level ``ctx_noise``
   and labelled with it (the Diffusion-Forcing trick: the model learned to lean less on the
   exact pixels of its own past frames), whose keys and values are what the cache keeps.

:func:`prefill` fills a cleared cache from context latents; :func:`rollout_latents` plays whole
timelines on latents with a cache of its own: what ``worldgen eval`` scores, what the trainers
roll out, and step for step what :class:`~worldgen.engine.world_model.Session` plays.

Example:
    >>> from worldgen.models import DiT, MODELS
    >>> dit = DiT(MODELS["tiny"]).eval()
    >>> stream = StreamConfig(steps=1, window=4)
    >>> with torch.no_grad():
    ...     z = rollout_latents(dit, stream, torch.randn(1, 3, 16, 15, 20), torch.zeros(1, 3, 10),
    ...                         torch.zeros(1, 6, 10), torch.Generator().manual_seed(0))
    >>> z.shape
    torch.Size([1, 6, 16, 15, 20])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worldgen import sampling
from worldgen.engine.cache import KVCache
from worldgen.models import DiT
from worldgen.models.attention import LayerKV, apply_rope
from worldgen.models.dit import Context, Memory


@dataclass
class StreamConfig(sampling.SamplerConfig):
    """The sampler settings (:class:`~worldgen.sampling.SamplerConfig`) and what the cache keeps;
    a session's defaults come from the checkpoint's sampler settings where it has them
    (``worldgen train`` stores them), else from here."""

    # Cache: ``sinks`` first frames kept for ever plus the ``window`` latest. Positions run to
    # sinks + window + chunk - 1, which must stay within what the model was trained on. No sink by
    # default: a sink holds a session to the look it started in (a dark start stays dark for
    # 10,000 frames). It scores better PSNR at 64-256 frames, but a game has to keep its look
    # (benchmarks/RESULTS.md, long horizon).
    sinks: int = 0
    window: int = 15

    def check(self, dit: DiT, trained_window: int) -> None:
        """Raise a ValueError naming the setting ``dit``, trained on ``trained_window`` frames, cannot play with."""
        if not 1 <= self.steps <= 64:  # latency is ~ (steps + 1) passes a frame
            raise ValueError(f"steps must lie in [1, 64], got {self.steps}")
        super().check(dit)
        chunk = dit.cfg.frames_per_block
        if self.sinks < 0 or self.window < chunk or self.sinks % chunk or self.window % chunk:
            raise ValueError(
                f"sinks ({self.sinks}) and window ({self.window}) must be multiples of the "
                f"model's chunk of {chunk} frames, window >= one chunk"
            )
        if self.sinks + self.window + chunk > trained_window:
            raise ValueError(
                f"sinks + window + chunk = {self.sinks + self.window + chunk} frames exceed the "
                f"{trained_window} frames the model was trained on"
            )


def denoise(
    dit: DiT,
    stream: StreamConfig,
    x: torch.Tensor,
    eps_ctx: torch.Tensor | None,
    acts: torch.Tensor,
    frame_pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    exit_step: int | None = None,
    memory: Memory | None = None,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of B timelines as a pure function (what ``WorldModel.compile`` captures): the
    Euler passes from noise ``x`` (B, c, C, h, w), every pass attending to the cache (unrotated
    keys ``k`` and values ``v``, (depth, B, H, L, d), RoPE ``cos``/``sin`` of their positions,
    key ``mask`` (B, L)) and to the recalled ``memory`` frames if any, then the pass on the
    finished latent noised with ``eps_ctx`` to the stabilisation level. Returns the latents and
    that pass's keys (unrotated) and values, (depth, B, H, c * N, d) each, for the cache (the
    memory frames' own are dropped).

    ``exit_step``: stop the Euler passes there (:func:`worldgen.sampling.euler`; Self Forcing's
    training, whose gradient flows through that pass alone). The cache pass never carries gradient.
    ``cond`` (B, c, cond_channels, h, w): the new frames' world-cache views, for a model trained with them."""
    b, chunk = acts.shape[:2]
    past = [LayerKV(apply_rope(k[i], cos, sin), v[i]) for i in range(k.shape[0])]
    context = Context(frame_pos, past, mask, memory)
    velocity = sampling.velocity(dit, acts, stream.guidance, context=context, cond=cond)
    x = sampling.euler(x, velocity, stream.steps, stream.shift, exit_step)
    with torch.no_grad():
        written = x if eps_ctx is None else sampling.add_noise(x, eps_ctx, stream.ctx_noise)
        t = torch.full((b, chunk), stream.ctx_noise, device=x.device)
        dit(written, t, acts, cond=cond, context=context)
    skip = 0 if memory is None else memory.z.shape[1] * dit.cfg.tokens_per_frame  # the memory frames' keys lead
    return x, torch.stack([p.new[0][:, :, skip:] for p in past]), torch.stack([p.new[1][:, :, skip:] for p in past])


def prefill(
    dit: DiT,
    stream: StreamConfig,
    z: torch.Tensor,
    acts: torch.Tensor,
    eps: torch.Tensor | None,
    cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (unrotated) and values, (depth, B, H, T * N, d) each, that context latents
    (B, T, C, h, w) with their actions (B, T, A), noised with ``eps`` to the stabilisation level,
    leave in a cleared cache: one block-causal pass, exactly what a full recompute attends to.
    ``cond`` (B, T, cond_channels, h, w): the context frames' world-cache views, if the model takes them."""
    x = z.float() if eps is None else sampling.add_noise(z.float(), eps, stream.ctx_noise)
    b, t = z.shape[:2]
    empty = torch.zeros(b, dit.cfg.heads, 0, dit.cfg.dim // dit.cfg.heads, device=z.device)
    past = [LayerKV(empty, empty) for _ in range(dit.cfg.depth)]
    levels = torch.full((b, t), stream.ctx_noise, device=z.device)
    dit(x, levels, acts, cond=cond, context=Context(frame_pos=torch.arange(t, device=z.device), past=past))
    return torch.stack([p.new[0] for p in past]), torch.stack([p.new[1] for p in past])


def rollout_latents(
    dit: DiT,
    stream: StreamConfig,
    ctx: torch.Tensor,
    ctx_actions: torch.Tensor,
    actions: torch.Tensor,
    generator: sampling.Generators,
    exit_steps: Sequence[int | None] | None = None,
    noise: torch.Tensor | None = None,
    ctx_cond: torch.Tensor | None = None,
    views: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Play B timelines of one age on latents, step for step as sessions play (the same rolling
    cache, re-positioned keys and stabilised writes; :func:`denoise`), with no tokenizer: what
    ``worldgen eval`` scores and what the trainers generate when they train on the model's own
    rollouts (Self Forcing). Noise comes from ``generator`` in the order a session draws it, so
    B = 1 with a session's seed gives that session's latents; with one generator per row
    (:func:`worldgen.sampling.randn`) every row does, however the rows are batched.

    Args:
        ctx: (B, T, C, h, w) context latents (the latest ``sinks + window`` are kept);
        ctx_actions: (B, T, A); actions: (B, n, A), n a multiple of the chunk.
        exit_steps: per chunk, None (played as a session plays it, without gradient) or Self
            Forcing's exit step k: the chunk is the clean estimate of Euler step k, whose pass
            alone carries gradient (:func:`denoise`; :mod:`worldgen.training.distill`).
            None: every chunk played, without gradient.
        noise: (B, n, C, h, w) the sampler's starting noise of the played frames, given rather
            than drawn (distill's ODE warm-up pairs teacher and student on it); the
            stabilisation noise is drawn all the same.
        ctx_cond, views: a world-cache model's conditioning: ``ctx_cond`` (B, T, cond_channels,
            h, w) the context frames' views; ``views(generated)``, given the latents played so
            far (B, i, C, h, w), the next chunk's views (B, chunk, cond_channels, h, w), rendered
            from a cloud that holds the played frames.
    Returns:
        (B, n, C, h, w) float32 latents.
    """
    cfg = dit.cfg
    b, chunk, keep = ctx.shape[0], cfg.frames_per_block, stream.sinks + stream.window
    if actions.shape[1] % chunk:
        raise ValueError(f"play whole chunks: {actions.shape[1]} actions for chunks of {chunk} frames")
    n_chunks = actions.shape[1] // chunk
    exit_steps = [None] * n_chunks if exit_steps is None else list(exit_steps)
    if len(exit_steps) != n_chunks:
        raise ValueError(f"exit_steps must give one entry per chunk ({n_chunks}), got {len(exit_steps)}")
    grad = torch.is_grad_enabled()
    cache = KVCache(
        cfg.depth,
        cfg.heads,
        cfg.dim // cfg.heads,
        cfg.tokens_per_frame,
        stream.sinks,
        stream.window,
        ctx.device,
        torch.bfloat16 if ctx.device.type == "cuda" else torch.float32,
        batch=b,
    )
    if (ctx_cond is None) != (views is None):
        raise ValueError(
            "a world-cache rollout needs both the context's views (ctx_cond) and views for the played frames"
        )
    ctx, ctx_actions = ctx[:, -keep:], ctx_actions[:, -keep:]
    ctx_cond = None if ctx_cond is None else ctx_cond[:, -keep:]

    def randn(frames: int) -> torch.Tensor:
        return sampling.randn((b, frames, cfg.latent_channels, *cfg.latent_size), generator, ctx.device)

    with torch.no_grad():
        eps_ctx = randn(ctx.shape[1]) if stream.ctx_noise > 0 else None
        cache.write(*prefill(dit, stream, ctx, ctx_actions, eps_ctx, ctx_cond))
    out = []
    for j, i in enumerate(range(0, actions.shape[1], chunk)):
        pos = cache.positions()[None].to(ctx.device)  # (1, slots)
        cos, sin = dit.rope(pos, pos.shape[1])
        mask = cache.valid()[None].expand(b, -1).to(ctx.device)
        frame_pos = (cache.next_position() + torch.arange(chunk, device=ctx.device))[None].expand(b, -1)
        x = randn(chunk) if noise is None else noise[:, i : i + chunk].float()
        eps = randn(chunk) if stream.ctx_noise > 0 else None
        cond = None if views is None else views(torch.cat(out, 1) if out else ctx[:, :0].float())
        with torch.set_grad_enabled(grad and exit_steps[j] is not None):
            x, k_new, v_new = denoise(
                dit,
                stream,
                x,
                eps,
                actions[:, i : i + chunk],
                frame_pos,
                cache.k,
                cache.v,
                cos,
                sin,
                mask,
                exit_steps[j],
                cond=cond,
            )
        cache.write(k_new, v_new)
        out.append(x)
    return torch.cat(out, 1)
