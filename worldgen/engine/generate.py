"""``worldgen generate``: long videos offline, clip by clip, with overlapping-clip fusion.

A clip is ``clip`` frames denoised jointly (rectified-flow Euler on the shifted schedule, full
block-causal recompute, :mod:`worldgen.sampling`'s conventions), conditioned on the ``context``
finished frames before it, labelled with the checkpoint's stabilisation level ``ctx_noise``.
Context plus clip fit the model's trained window, so no position is ever out of training range.

``fusion="overlap"``: clips start every ``hop = clip / 2`` frames, so each
overlaps the previous one by half::

    frames      0    hop   2hop  3hop  4hop
    clip 0      [ A0  | B0  ]
    clip 1            [ A1  | B1  ]            A1 starts from B0 noised to the starting level
    clip 2                  [ A2  | B2  ]
    output      [ A0  | f1  | f2  | B2  ]      f_k = refine(crossfade(B_{k-1}, A_k))

After clip k is denoised, its first half ``A_k`` and the previous clip's second half
``B_{k-1}`` are cross-faded (the new clip's weight rising linearly across the overlap, so the
fused frames join ``B_{k-1}``'s past on the left and ``B_k`` on the right), the whole clip is
re-noised to ``renoise`` and denoised once more: averaging two plausible frames gives a ghosted
mix, and the light re-noise lets the model sharpen it without changing the layout.

``fusion="none"``: clips of ``hop`` frames back to back, each from pure noise conditioned on the
frames before it: the baseline, with the seams at the same frames.

:func:`seam_measure` compares the frame-to-frame change where a new clip's fresh frames begin
(frames ``hop, 2 hop, ...``) with the change inside clips: about 1 means no visible seam.

The command (``worldgen generate``, its report) is :mod:`worldgen.engine.generate_cli`; the
context and action files it reads are parsed by :mod:`worldgen.engine.generate_inputs`.

Example:
    worldgen generate --context data/heldout --episode 0 --start 100 --actions dataset --frames 48 \\
        --out gen.mp4 --compare --json gen.json
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from worldgen import sampling
from worldgen.models import DiT, frames_to_tensor, tensor_to_frames

if TYPE_CHECKING:
    from worldgen.engine.world_model import WorldModel

FUSIONS = ("overlap", "none")


class GenerateError(ValueError):
    """Input that cannot be generated from; the message names the problem."""


@dataclass
class GenerateConfig:
    fusion: str = "overlap"  # "overlap" (module docstring) or "none" (back-to-back clips)
    # Frames each clip is conditioned on; None: the trained window minus the clip. The first
    # clip's context is real frames, later clips' the finished frames before them.
    context: int | None = None
    # Frames per overlap clip (hop = clip / 2; "none" makes clips of hop frames). None: the
    # largest even number of blocks within two thirds of the trained window: a third stays for
    # context (recent motion and layout), and half a clip leaves several frames between seams.
    clip: int | None = None
    # Level the fused clip is re-noised to: enough noise to hide the blur of a blend of two
    # frames, little enough that the layout both clips agree on survives. 0 skips the refinement.
    renoise: float = 0.3
    # Euler steps from ``renoise`` to 0: one is the model's clean estimate at low noise, where a
    # single step is already accurate; it adds ~half a clip's denoising cost at 2 steps.
    refine_steps: int = 1
    seed: int = 0  # sampler noise (the same seed, input and settings: the same video)

    def plan(self, window: int, block: int) -> tuple[int, int, int]:
        """(context, clip, hop) for a model trained on ``window`` frames in blocks of ``block``.

        Example:
            >>> GenerateConfig().plan(16, 1)
            (6, 10, 5)
            >>> GenerateConfig(context=8).plan(16, 1)
            (8, 8, 4)
        """
        if self.fusion not in FUSIONS:
            raise GenerateError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if not 0.0 <= self.renoise < 1.0 or self.refine_steps < 1:
            raise GenerateError(f"need 0 <= renoise < 1 and refine_steps >= 1, got {self.renoise}, {self.refine_steps}")
        pair = 2 * block  # a clip holds two halves of whole blocks
        clip = self.clip
        if clip is None:
            room = window - self.context if self.context is not None else window - max(block, window // 3)
            clip = room // pair * pair
        context = window - clip if self.context is None else self.context
        if clip < pair or clip % pair:
            raise GenerateError(
                f"clip must be a positive multiple of 2 x {block} frames (two halves of whole "
                f"blocks), got {clip}; the model was trained on {window} frames"
            )
        if context < 1 or context % block:
            raise GenerateError(
                f"context must be a positive multiple of the model's {block}-frame blocks, got {context}"
            )
        if context + clip > window:
            raise GenerateError(
                f"context {context} + clip {clip} frames exceed the {window} frames the model was trained on"
            )
        return context, clip, clip // 2


# --- the algorithm -----------------------------------------------------------------------------


def clip_spans(n: int, length: int, hop: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` of each clip covering ``n`` frames: starts every ``hop``, the last cut at ``n``.

    Example:
        >>> list(clip_spans(10, 4, 2))
        [(0, 4), (2, 6), (4, 8), (6, 10)]
        >>> list(clip_spans(5, 2, 2))
        [(0, 2), (2, 4), (4, 5)]
    """
    start = 0
    while True:
        stop = min(start + length, n)
        yield start, stop
        if stop == n:
            return
        start += hop


def crossfade(prev: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Blend an overlap ``(T, ...)``: frame j weighs ``new`` by ``(j + 1) / (T + 1)``, so the
    first frame stays close to ``prev`` (which continues the frames before it) and the last to
    ``new`` (which continues into the frames after). A flat mean would put both seams' jumps
    at half size at the two ends instead.

    Example:
        >>> crossfade(torch.zeros(3), torch.full((3,), 4.0)).tolist()
        [1.0, 2.0, 3.0]
    """
    w = torch.arange(1, len(new) + 1, device=new.device, dtype=new.dtype) / (len(new) + 1)
    w = w.reshape(-1, *[1] * (new.ndim - 1))
    return (1 - w) * prev + w * new


def denoise(
    dit: DiT,
    ctx: torch.Tensor,
    ctx_acts: torch.Tensor,
    x: torch.Tensor,
    acts: torch.Tensor,
    sampler: sampling.SamplerConfig,
    generator: torch.Generator,
    steps: int | None = None,
    t_max: float | None = None,
) -> torch.Tensor:
    """The recompute backend from a given start: Euler from ``x`` at the level ``t_max`` (default
    :data:`~worldgen.sampling.T_MAX`) to 0 in ``steps`` (default the sampler's), after the
    context noised to the sampler's level (the overlap starts from the previous clip, the
    refinement from a lightly noised clip).

    Args:
        ctx: (Tc, C, h, w) clean context latents; ``ctx_acts`` (Tc, A) the actions that made them.
        x: (n, C, h, w) the clip at level ``t_max``; ``acts`` (n, A) its actions.
    Returns:
        (n, C, h, w) float32 latents.
    """
    noisy_ctx = sampling.noised(ctx[None], sampler.ctx_noise, generator)
    a = torch.cat([ctx_acts, acts])[None]  # (1, Tc + n, A)
    v = sampling.velocity(dit, a, sampler.guidance, ctx=noisy_ctx, ctx_t=sampler.ctx_noise)
    return sampling.euler(x[None].float(), v, steps or sampler.steps, sampler.shift, t_max=t_max)[0]


def generate_latents(
    dit: DiT,
    ctx: torch.Tensor,
    ctx_acts: torch.Tensor,
    acts: torch.Tensor,
    cfg: GenerateConfig,
    sampler: sampling.SamplerConfig,
    window: int,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``len(acts)`` new latents after the context, clip by clip (module docstring).

    Args:
        ctx: (Tc, C, h, w) clean latents of real frames, Tc >= the plan's context (the last are used).
        ctx_acts: (Tc, A) the action vectors that produced them; ``acts`` (N, A) those of the new frames.
        window: frames the model was trained on (context + clip must fit).
        progress: show a progress bar with an ETA over the frames made (stderr).
    Returns:
        latents (N, C, h, w) and stats: the plan, clip starts (the
        first output frames of clips after the first: where a clip's denoising starts from its
        context, the seams :func:`seam_measure` looks at) and the DiT's work in frame-passes
        (frames through one forward) per new frame.
    """
    context, clip, hop = cfg.plan(window, dit.cfg.frames_per_block)
    n = len(acts)
    if n < 1:
        raise GenerateError(f"need at least 1 frame to generate, got {n}")
    if len(ctx) < context:
        raise GenerateError(f"the context has {len(ctx)} frames; clips are conditioned on {context}")
    generator = torch.Generator().manual_seed(cfg.seed)
    overlap = cfg.fusion == "overlap"
    frames = torch.cat([ctx.float(), ctx.new_zeros((n, *ctx.shape[1:]))])  # (Tc + N, C, h, w)
    all_acts = torch.cat([ctx_acts, acts]).float()
    tc, passes = len(ctx), 0
    width = 1 if sampler.guidance == 1 else 2  # guidance runs each pass twice
    pending = frames[:0]  # overlap: the previous clip's second half, not yet final
    spans = list(clip_spans(n, clip if overlap else hop, hop))
    starts = [start for start, _ in spans[1:]]
    bar = tqdm(total=n, unit="frame", desc=f"generate ({cfg.fusion})", disable=not progress)
    for start, stop in spans:
        s, e = tc + start, tc + stop
        past, past_acts = frames[s - context : s], all_acts[s - context : s]
        x = sampling.randn((e - s, *ctx.shape[1:]), generator, ctx.device)
        ov = len(pending)
        x[:ov] = sampling.add_noise(pending, x[:ov], sampling.T_MAX)
        new = denoise(dit, past, past_acts, x, all_acts[s:e], sampler, generator)
        passes += (context + e - s) * sampler.steps * width
        if ov:
            new[:ov] = crossfade(pending, new[:ov])
            if cfg.renoise > 0:
                noisy = sampling.add_noise(new, sampling.randn(new.shape, generator, new.device), cfg.renoise)
                new = denoise(
                    dit, past, past_acts, noisy, all_acts[s:e], sampler, generator, cfg.refine_steps, cfg.renoise
                )
                passes += (context + e - s) * cfg.refine_steps * width
        keep = len(new) if stop == n else hop  # the rest waits for the next clip to overlap it
        frames[s : s + keep] = new[:keep]
        pending = new[keep:] if overlap else new[:0]
        bar.update(keep)
    bar.close()
    stats = {
        "frames": n,
        "context": context,
        "clip": clip if overlap else hop,
        "hop": hop,
        "clip_starts": starts,
        "dit_frame_passes_per_frame": round(passes / n, 2),
    }
    return frames[tc:], stats


def seam_measure(frames: np.ndarray, starts: Sequence[int]) -> dict[str, Any]:
    """How much a video jumps where clips meet, against how much it moves inside clips.

    ``boundary``: mean |frame[i+1] - frame[i]| (uint8 RGB, over pixels and pairs) over the pairs
    where ``i + 1`` is in ``starts`` (a clip's first output frame, after its context);
    ``inside``: the same over every other pair; ``ratio`` = boundary / inside (None when
    undefined). Seamless video: ~1.

    Both fusions put a clip start every ``hop`` frames: with ``"none"`` a clip begins there from
    pure noise; with ``"overlap"`` the fused stretch of the new clip, the part of it that
    follows its context directly (its second half runs on jointly, not a seam).

    Example:
        >>> f = np.array([0, 1, 2, 10, 11, 12], np.uint8)[:, None, None, None].repeat(3, -1)
        >>> seam_measure(f, [3])
        {'boundary': 8.0, 'inside': 1.0, 'ratio': 8.0, 'boundary_pairs': 1, 'inside_pairs': 4}
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if bad := [s for s in starts if not 1 <= s < len(frames)]:
        raise ValueError(f"clip starts {bad} outside 1..{len(frames) - 1}")
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))  # (N - 1,): pair (i, i + 1)
    at = np.zeros(len(diffs), bool)
    at[np.asarray(starts, int) - 1] = True
    boundary = float(diffs[at].mean()) if at.any() else None
    inside = float(diffs[~at].mean()) if (~at).any() else None
    ratio = boundary / inside if boundary is not None and inside else None
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {
        "boundary": r(boundary),
        "inside": r(inside),
        "ratio": r(ratio),
        "boundary_pairs": int(at.sum()),
        "inside_pairs": int((~at).sum()),
    }


@torch.no_grad()
def generate_video(
    wm: WorldModel,
    context_frames: np.ndarray,
    context_actions: np.ndarray,
    actions: np.ndarray,
    cfg: GenerateConfig,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Frames uint8 (N, H, W, 3) for action vectors ``actions`` (N, A) after real context frames
    (T, H, W, 3) and the action vectors (T, A) that produced them, with a loaded
    :class:`~worldgen.engine.world_model.WorldModel`'s tokenizer, DiT and sampler settings.

    Example:
        >>> wm = WorldModel.load("default", device="cpu")                           # doctest: +SKIP
        >>> frames, acts = wm.start(0)                                              # doctest: +SKIP
        >>> vecs = np.stack([a.vector() for a in acts])                             # doctest: +SKIP
        >>> video, stats = generate_video(wm, frames, vecs, vecs[:4].repeat(8, 0), GenerateConfig())  # doctest: +SKIP
        >>> video.shape, stats["seam"]["ratio"] > 0                                 # doctest: +SKIP
        ((32, 120, 160, 3), True)
    """
    if context_frames.shape[1:] != wm.frame_shape:
        (h, w, _), (mh, mw, _) = context_frames.shape[1:], wm.frame_shape
        raise GenerateError(f"context frames are {w}x{h}; the model takes {mw}x{mh}")
    context, _, _ = cfg.plan(wm.trained_window, wm.dit.cfg.frames_per_block)
    t0 = time.perf_counter()
    dev = wm.device
    with wm.autocast():
        ctx = wm.tokenizer.encode(frames_to_tensor(context_frames[-context:], dev)).float()
        z, stats = generate_latents(
            wm.dit,
            ctx,
            torch.from_numpy(context_actions[-context:]).to(dev),
            torch.from_numpy(actions).to(dev),
            cfg,
            wm.stream,
            wm.trained_window,
            progress,
        )
        video = np.concatenate([tensor_to_frames(wm.tokenizer.decode(z[i : i + 64])) for i in range(0, len(z), 64)])
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["frames_per_s"] = round(len(video) / stats["seconds"], 3)
    stats["seam"] = seam_measure(video, stats["clip_starts"])
    return video, stats
