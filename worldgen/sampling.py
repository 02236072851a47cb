"""The one sampler of worldgen: rectified-flow Euler steps on a shifted timestep schedule
(docs/sampling.md).

Flow matching convention (the trainer uses the same, through :func:`add_noise`)::

    x_t = (1 - t) x0 + t eps,   v = dx_t/dt = eps - x0,   t = 1 pure noise -> t = 0 clean

An Euler step from t to s < t is ``x_s = x_t + (s - t) v``.

Three pieces make every sampler here: :class:`SamplerConfig` (steps, shift, context noise,
guidance), :func:`velocity` (the DiT's velocity of the new frames as a function of their
latents and level, with action guidance) and :func:`euler` (the loop). They run on one of two
backends:

* **cache** (:mod:`worldgen.engine.stream`): past frames are keys and values in a rolling KV
  cache, written once, each after a pass on the finished frame noised to ``ctx_noise``. What
  streaming sessions play, and so what ``worldgen eval`` scores and training rolls out.
* **recompute** (:func:`generate`, :func:`predict_next`, :func:`rollout` here): every Euler
  step runs the DiT on ``context + new frames``, the context noised to ``ctx_noise`` afresh.
  Teacher-forced predictions and ``worldgen generate``'s overlapping clips use it.

``ctx_noise`` is the Diffusion-Forcing stabilisation trick: the context latents get that
much noise (``add_noise``) and are labelled with it, so the model leans less on the exact
pixels of its own imperfect past frames during a long rollout. 0 is exact conditioning
(teacher-forced evaluation); ~0.02-0.1 trades a little sharpness for less drift.

Example:
    >>> from worldgen.models import DiT, MODELS
    >>> dit = DiT(MODELS["tiny"]).eval()
    >>> ctx = torch.randn(1, 2, 16, 15, 20)
    >>> g = torch.Generator().manual_seed(0)
    >>> sampler = SamplerConfig(steps=2)
    >>> predict_next(dit, ctx, torch.zeros(1, 2, 10), torch.zeros(1, 10), sampler, generator=g).shape
    torch.Size([1, 16, 15, 20])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worldgen.models.dit import Context, DiT

# The model's velocity of the frames being made, as a function of their latents and level.
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# SD3's resolution rule, shift = sqrt(latent size / reference), gives ~1 or less for 300-token
# frames: little redundancy, so coarse structure is not settled until mid-schedule. Strong
# context already fixes the layout of the next frame; a shift > 1 spends more steps at high
# noise (helps first frames and fast turns), < 1 more at low noise (sharper, with few steps).
SHIFT = 1.0
STEPS = 4  # GameNGen and Self Forcing use 4 steps
# Where sampling starts: pure noise, labelled a little below 1. Logit-normal training almost
# never draws t ~ 1 (P(t > 0.97) ~ 3e-4), and the sinusoidal embedding of 1000 t does not
# interpolate there: measured on the default model, the clean-context one-step estimate of the
# next latent had MSE 0.91 labelled 1.0 but 0.37 labelled 0.97 (copying the last frame: 0.76;
# benchmarks/one_step_probe.py).
T_MAX = 0.97
# Action guidance (classifier-free guidance on the new frames' actions): v = v_free + g (v_act -
# v_free), v_free predicted with the learned null action. 1 = plain conditional sampling (one
# pass); g > 1 exaggerates what the action changes, at a second pass per step.
GUIDANCE = 1.0


@dataclass
class SamplerConfig:
    """How frames are sampled, on either backend; a checkpoint stores its own (``worldgen train``
    writes them, ``WorldModel.load`` and ``worldgen eval`` read them).

    Example:
        >>> SamplerConfig(steps=2, ctx_noise=0.1)
        SamplerConfig(steps=2, shift=1.0, ctx_noise=0.1, guidance=1.0)
    """

    steps: int = STEPS  # Euler steps per frame; a frame costs ~steps DiT passes
    shift: float = SHIFT  # schedule shift (shifted_timesteps)
    ctx_noise: float = 0.0  # stabilisation level of the context; 0 = exact conditioning
    # Action guidance scale (GUIDANCE); != 1 doubles each pass's batch and needs a model
    # trained with action dropout (a null action).
    guidance: float = GUIDANCE

    def settings(self) -> dict[str, Any]:
        """The sampler settings alone (a subclass's other fields left out), for a report."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerConfig)}

    def check(self, dit: DiT) -> None:
        """Raise a ValueError naming the setting that ``dit`` cannot sample with."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.ctx_noise < 1.0 or not self.shift > 0:
            raise ValueError(f"need 0 <= ctx_noise < 1 and shift > 0, got {self.ctx_noise}, {self.shift}")
        if self.guidance != 1 and (not self.guidance > 0 or not dit.cfg.null_action):
            raise ValueError(
                f"guidance {self.guidance} needs guidance > 0 and a model trained with action "
                f"dropout (this one has null_action={dit.cfg.null_action}); 1 = no guidance"
            )


def shifted_timesteps(
    steps: int, shift: float = SHIFT, device: torch.device | str | None = None, t_max: float | None = None
) -> torch.Tensor:
    """(steps + 1,) noise levels from ``t_max`` (default :data:`T_MAX`) down to 0, SD3-shifted:
    ``s t / (1 + (s - 1) t)``.

    Example:
        >>> shifted_timesteps(2, shift=3.0, t_max=1.0).tolist()
        [1.0, 0.75, 0.0]
    """
    t_max = T_MAX if t_max is None else t_max
    if steps < 1 or not shift > 0 or not 0 < t_max <= 1:
        raise ValueError(f"need steps >= 1, shift > 0 and 0 < t_max <= 1, got {steps}, {shift}, {t_max}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return t_max * shift * t / (1 + (shift - 1) * t)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - t) x0 + t eps`` for latents (B, T, C, h, w) and levels t (B, T) (or a scalar)."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    t = t.reshape(*t.shape, *[1] * (x0.ndim - t.ndim))
    return (1 - t) * x0 + t * eps


def euler(
    x: torch.Tensor,
    velocity: Velocity,
    steps: int = STEPS,
    shift: float = SHIFT,
    exit_step: int | None = None,
    t_max: float | None = None,
) -> torch.Tensor:
    """Integrate ``x`` from the level ``t_max`` (default :data:`T_MAX`: ``x`` is pure noise) to
    0 on the shifted schedule, ``velocity(x, t)`` giving the model's v at the level ``t``: the
    one sampling loop of every sampler here and of the streaming engine. A ``t_max`` below
    :data:`T_MAX` refines a partly noised ``x`` (``worldgen generate``'s fused clips).

    ``t`` is a 0-d tensor on ``x``'s device, not a Python float: a compiled step then traces one
    graph for every level (a float is a constant of the graph, a new one recompiles).

    ``exit_step`` k (Self Forcing's exit step, :mod:`worldgen.training.distill`): stop at step k
    with the jump to 0 along its velocity, ``x - t_k v`` (the clean estimate; for k = steps - 1
    exactly the last Euler step), the earlier steps under no_grad, so only step k's pass carries
    gradient. None: all steps, in the caller's grad mode.

    Example:
        >>> euler(torch.ones(2), lambda x, t: x, steps=2, t_max=1.0).tolist()  # v = x: each step halves x
        [0.25, 0.25]
    """
    levels = shifted_timesteps(steps, shift, x.device, t_max)
    last = steps - 1 if exit_step is None else exit_step
    if not 0 <= last < steps:
        raise ValueError(f"exit_step must lie in [0, steps - 1 = {steps - 1}], got {exit_step}")
    for i in range(last + 1):
        t_next = levels[i + 1] if i < last else levels[-1]
        with torch.no_grad() if exit_step is not None and i < last else contextlib.nullcontext():
            x = x + (t_next - levels[i]) * velocity(x, levels[i])
    return x


def velocity(
    dit: DiT,
    actions: torch.Tensor,
    guidance: float = GUIDANCE,
    *,
    ctx: torch.Tensor | None = None,
    ctx_t: float | torch.Tensor = 0.0,
    context: Context | None = None,
    cond: torch.Tensor | None = None,
) -> Velocity:
    """``v(x, t)``: the DiT's velocity of the n new frames ``x`` (B, n, C, h, w) at the level
    ``t`` (0-d, or (B, n) per frame), float32: what :func:`euler` integrates. Both backends build
    it here, so they guide alike.

    Args:
        actions: (B, Tc + n, A) the actions of the context frames (if any) and the new frames.
        guidance: action guidance scale: != 1 runs each pass on the batch twice, the second copy
            with the null action on the new frames, and returns ``v_free + g (v_act - v_free)``.
        ctx: (B, Tc, C, h, w) latents in front of the new frames, labelled ``ctx_t`` (a level,
            or (B, Tc) per frame): the recompute backend's context, already noised.
        context: the cache backend's past keys, positions and recalled memory (:class:`Context`).
        cond: the extra input channels of every frame the DiT sees, if the model takes them:
            (B, Tc + n, cond_channels, h, w) with ``ctx``, else (B, n, ...) (the cache's frames
            brought theirs when they were written).

    Example:
        >>> from worldgen.models import DiT, MODELS
        >>> dit = DiT(MODELS["tiny"]).eval()
        >>> v = velocity(dit, torch.zeros(1, 3, 10), ctx=torch.randn(1, 2, 16, 15, 20), ctx_t=0.1)
        >>> v(torch.randn(1, 1, 16, 15, 20), torch.tensor(0.5)).shape
        torch.Size([1, 1, 16, 15, 20])
    """
    b = actions.shape[0]
    tc = 0 if ctx is None else ctx.shape[1]
    n = actions.shape[1] - tc
    acts = actions.float()
    t_ctx = ctx_t if isinstance(ctx_t, torch.Tensor) else torch.full((b, tc), float(ctx_t), device=actions.device)

    def inputs(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.expand(b, n)  # a tensor level: one compiled graph serves every step
        return (x, t) if ctx is None else (torch.cat([ctx, x], 1), torch.cat([t_ctx, t], 1))

    if guidance == 1:

        def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xs, ts = inputs(x, t)
            return dit(xs, ts, acts, cond=cond, context=context)[:, tc:].float()

        return v

    # The batch twice: with the actions, and with the null action on the new frames.
    acts2, drop = acts.repeat(2, 1, 1), guidance_mask(b, tc + n, n, actions.device)
    context2 = None if context is None else context.repeat(2)
    cond2 = None if cond is None else cond.repeat(2, 1, 1, 1, 1)

    def v_guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs, ts = inputs(x, t)
        out = dit(xs.repeat(2, 1, 1, 1, 1), ts.repeat(2, 1), acts2, drop_actions=drop, cond=cond2, context=context2)
        return guided(out[:, tc:], guidance)

    return v_guided


def guided(v: torch.Tensor, guidance: float) -> torch.Tensor:
    """Combine a doubled batch's velocities, first half with the actions, second half without
    (null action on the frames being made): ``v_free + guidance (v_act - v_free)``.

    Example:
        >>> guided(torch.tensor([[3.0], [1.0]]), 2.0).tolist()
        [[5.0]]
    """
    v_act, v_free = v.float().chunk(2)
    return v_free + guidance * (v_act - v_free)


def guidance_mask(b: int, frames: int, new: int, device: torch.device | str) -> torch.Tensor:
    """``drop_actions`` (2B, frames) of a guided doubled batch: the second half drops the last
    ``new`` frames' actions."""
    drop = torch.zeros(2 * b, frames, dtype=torch.bool, device=device)
    drop[b:, frames - new :] = True
    return drop


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str) -> torch.Tensor:
    """float32 standard normal noise of ``shape`` on ``device``, drawn on the generator's own
    device: a seed gives the same noise wherever the model runs (every sampler draws through this).

    ``generator`` may be a sequence of generators, one per row (``shape[0]``): each row is then
    its own stream, the same numbers whatever else is in the batch (sessions stepped together,
    eval windows batched any way).

    Example:
        >>> gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]
        >>> torch.equal(randn((2, 3), gens(), "cpu")[1], randn((1, 3), gens()[1:], "cpu")[0])
        True
    """
    if generator is None or isinstance(generator, torch.Generator):
        where = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per row: {len(generator)} generators for {shape[0]} rows")
    if not generator:  # no rows (torch.stack needs one)
        return torch.zeros(tuple(shape), device=device)
    return torch.stack([randn(shape[1:], g, device) for g in generator])


def noised(ctx: torch.Tensor, level: float, generator: Generators) -> torch.Tensor:
    """Context latents (B, T, ...) as float32, noised to ``level`` with fresh noise (unchanged at 0,
    drawing nothing): how both backends stabilise the context."""
    ctx = ctx.float()
    return add_noise(ctx, randn(ctx.shape, generator, ctx.device), level) if level > 0 else ctx


@torch.no_grad()
def generate(
    dit: DiT,
    ctx_latents: torch.Tensor,
    ctx_actions: torch.Tensor,
    actions: torch.Tensor,
    sampler: SamplerConfig | None = None,
    generator: Generators = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The recompute backend: denoise ``n`` new frames jointly after the context, every Euler
    step a pass over context + new frames (the step both functions below build on).

    Args:
        ctx_latents: (B, Tc, C, h, w) clean context latents, oldest first (Tc may be 0).
        ctx_actions: (B, Tc, A) the actions that produced them.
        actions: (B, n, A) the actions that produce the new frames.
        sampler: the settings (default :class:`SamplerConfig`'s); guidance != 1 needs a DiT with a null action.
        generator: one, or one per row (:func:`randn`); the context noise is drawn first.
        cond: (B, Tc + n, cond_channels, h, w) every frame's world-cache view, context and new,
            for a model trained with them.
    Returns:
        (B, n, C, h, w) float32 latents.
    """
    sampler = sampler or SamplerConfig()
    b, tc = ctx_latents.shape[:2]
    n = actions.shape[1]
    if ctx_actions.shape[:2] != (b, tc) or actions.shape[0] != b:
        raise ValueError(
            f"ctx_actions must be (B, Tc, A) = ({b}, {tc}, A) and actions (B, n, A), got "
            f"{tuple(ctx_actions.shape)} and {tuple(actions.shape)}"
        )
    if not 0.0 <= sampler.ctx_noise < 1.0:
        raise ValueError(f"ctx_noise must be in [0, 1), got {sampler.ctx_noise}")
    ctx = noised(ctx_latents, sampler.ctx_noise, generator)
    x = randn((b, n, *ctx_latents.shape[2:]), generator, ctx_latents.device)
    v = velocity(
        dit, torch.cat([ctx_actions, actions], 1), sampler.guidance, ctx=ctx, ctx_t=sampler.ctx_noise, cond=cond
    )
    return euler(x, v, sampler.steps, sampler.shift)


def predict_next(
    dit: DiT,
    ctx_latents: torch.Tensor,
    ctx_actions: torch.Tensor,
    next_action: torch.Tensor,
    sampler: SamplerConfig | None = None,
    generator: Generators = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next frame's latent (B, C, h, w) given the context and the action (B, A) that makes it
    (and, for a world-cache model, ``cond`` (B, Tc + 1, cond_channels, h, w): the context's and
    the new frame's views; :func:`generate`).

    With ``frames_per_block > 1`` the new frame shares a block (bidirectional attention) with
    the last ``Tc % frames_per_block`` context frames, as frames at mixed noise levels do in
    Diffusion-Forcing training.
    """
    return generate(dit, ctx_latents, ctx_actions, next_action[:, None], sampler, generator, cond)[:, 0]


def rollout(
    dit: DiT,
    ctx_latents: torch.Tensor,
    ctx_actions: torch.Tensor,
    actions: torch.Tensor,
    sampler: SamplerConfig | None = None,
    window: int = 16,
    generator: Generators = None,
) -> torch.Tensor:
    """Generate one frame per action (B, N, A) autoregressively by recompute -> (B, N, C, h, w).

    Frames are made a block (``frames_per_block``) at a time, each conditioned on at most
    ``window`` frames in all (context + new), the most recent ones, noised afresh at every
    block; frame positions restart at 0 within the window, so keep ``window`` <= the training
    window length. Sessions play on the cache backend instead
    (:func:`worldgen.engine.stream.rollout_latents`): the reference it is measured against
    (``benchmarks/rollout_speed.py``).

    Example:
        >>> from worldgen.models import DiT, MODELS
        >>> dit = DiT(MODELS["tiny"]).eval()
        >>> rollout(dit, torch.randn(1, 3, 16, 15, 20), torch.zeros(1, 3, 10), torch.zeros(1, 4, 10),
        ...         SamplerConfig(steps=1), window=4).shape
        torch.Size([1, 4, 16, 15, 20])
    """
    chunk = dit.cfg.frames_per_block
    if window < chunk:
        raise ValueError(f"window={window} must hold at least one block of {chunk} frames")
    frames, acts = ctx_latents.float(), ctx_actions
    out = []
    for i in range(0, actions.shape[1], chunk):
        new_acts = actions[:, i : i + chunk]
        # Keep whole blocks of context so the new frames start a block of their own.
        keep = min(window - new_acts.shape[1], frames.shape[1]) // chunk * chunk
        frames, acts = frames[:, frames.shape[1] - keep :], acts[:, acts.shape[1] - keep :]
        new = generate(dit, frames, acts, new_acts, sampler, generator)
        frames, acts = torch.cat([frames, new], 1), torch.cat([acts, new_acts], 1)
        out.append(new)
    return torch.cat(out, 1)
