"""``worldgen train distill``: Self Forcing, a few-step student trained on its own streaming
rollouts by distribution matching (DESIGN.md section 5; Huang et al. 2025, DMD: Yin et al. 2024).

Three DiTs, all conditioned on the real actions:

* the **teacher**, a Diffusion-Forcing model (``--teacher``, e.g. the shipped default), frozen:
  its velocity gives the score of real play ("real");
* the **student**, initialised from the teacher, the model being trained: it plays at
  ``--sample-steps`` Euler steps (stored as the exported model's sampler setting);
* the **critic**, initialised from the teacher, trained online with the Diffusion-Forcing loss
  on the student's frames: the score of the student's play ("fake").

One step, per window of the batch:

1. **Play.** From ``sinks + window`` real frames (a session's cache) the student plays n ~
   U{G..N} frames with the real actions, exactly as a session plays them
   (:func:`worldgen.engine.rollout_latents`: the rolling KV cache, the chunk, the stabilised
   cache-writing pass). N (``--rollout-frames``) exceeds the cache, so late windows are played
   on a cache that has rolled past the trained window, as in unbounded play. The last G
   (``--grad-frames``) chunks stop at a random exit step each (Self Forcing's recipe: the
   chunk is the clean estimate of Euler step k ~ U{0..K-1}, and only that pass carries gradient);
   the frames before them are played at all K steps without gradient.
2. **Distribution matching.** The last ``window`` frames of real context + play are noised:
   the G student frames each to its own level t ~ U[t_min, t_max] (Diffusion Forcing's
   independent levels), the frames before them to the stabilisation level as context. Teacher
   and critic predict the clean frames; the student's frames move along ``x0_fake - x0_real``,
   normalised per window by ``mean |x - x0_real|`` (DMD's loss ``0.5 |x - sg(x - grad)|^2``, whose
   gradient is that difference: zero where critic and teacher agree). Optional action guidance
   of the teacher (``--teacher-guidance``, needs a teacher trained with action dropout).
3. **The critic** learns the flow-matching loss on the same (detached) windows with fresh levels.

Optionally (``--ode-steps``) the student first warms up by regression on the teacher's ODE
solutions (CausVid's and Self Forcing's initialisation, here on the student's own Euler path):
from the same starting noise and the teacher's played history, its exit-step estimate of each of
G frames against the teacher's frame at the teacher's sampler steps.

Student and critic are one module (:class:`StudentCritic`) for the shared trainer
(:func:`worldgen.training.loop.fit`: bf16 autocast on CUDA, EMA, resumable state, torchrun):
one optimizer step updates both, the critic at ``--critic-lr`` (DMD2 trains the fake score
faster than the generator). Only the student's EMA weights are exported.

Example:
    worldgen train distill --data data/doom --teacher worldgen/checkpoints/default --out runs/distill --minutes 20
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worldgen import checkpoint, sampling
from worldgen.engine import StreamConfig, WorldModel, rollout_latents
from worldgen.models import DiT, autocast, flops_per_frame, save_part, tensor_to_frames
from worldgen.training import loop
from worldgen.training.config import TrainConfig, opt
from worldgen.training.distributed import Dist
from worldgen.training.dynamics import Latents, flow_matching_loss, split_latents, tokenizer_folder, write_starts
from worldgen.training.run import Run, save_image_rows
from worldgen.training.schedule import param_groups
from worldgen.training.tokenizer import open_dataset


@dataclass
class DistillTrainConfig(TrainConfig):
    teacher: str = opt(
        "",
        "the Diffusion-Forcing model folder to distil (e.g. worldgen/checkpoints/default); "
        "its tokenizer encodes the data and its sampler settings (cache, stabilisation) are kept",
    )
    sample_steps: int = opt(
        2,
        "the student's Euler steps per frame (stored as the exported sampler's steps): "
        "2 = 3 DiT passes a frame with the cache pass, half of the 5-step teacher's 6",
    )
    train_steps: str = opt(
        "1,2,4",
        "step counts a training rollout draws from (comma-separated): the student "
        "learns each schedule, so it can sample at any of them",
    )
    rollout_frames: int = opt(
        32,
        "N: most frames a training rollout plays; beyond the cache (16 frames) the "
        "cache rolls past the trained window, as unbounded play does",
    )
    grad_frames: int = opt(
        4,
        "G: the last G frames of a rollout carry gradient (at their exit steps) and the "
        "distribution-matching loss; the rest of the window is their context",
    )
    batch_size: int = opt(8, "windows per step per GPU; each plays up to N frames")
    lr: float = opt(2e-5, "student AdamW LR: a fine-tune of a trained model (Self Forcing: 2e-6 at 1.3B)")
    critic_lr: float = opt(1e-4, "critic AdamW LR; the critic must track the student's moving distribution")
    warmup: int = opt(20, "linear LR warmup steps")
    ema_decay: float = opt(0.99, "EMA of the weights; distillation runs are short (hundreds of steps)")
    t_min: float = opt(0.02, "lowest noise level of the distribution-matching loss (DMD: 0.02)")
    t_max: float = opt(0.98, "highest noise level (DMD: 0.98)")
    ode_steps: int = opt(
        0,
        "warm-up: the first S steps train the student by regression instead of DMD: from the "
        "same noise and the teacher's history, its exit-step estimate of G frames against "
        "the teacher's frames at the teacher's sampler steps (the ODE solution); the critic "
        "trains on its frames throughout. 0: DMD from the first step",
    )
    teacher_guidance: float = opt(
        1.0,
        "action guidance of the teacher's score (> 1 needs a teacher trained with "
        "action dropout); 1 = the plain conditional score",
    )
    encode_batch: int = opt(256, "frames per tokenizer batch when encoding the dataset")
    eval_windows: int = opt(16, "held-out windows for the held-out rollout error at checkpoints")
    eval_frames: int = opt(8, "frames the student plays per held-out window")
    sample_frames: int = opt(16, "frames generated in each sample strip after the real context")
    starts: int = opt(8, "real start contexts (held-out play) stored with the exported model for new sessions")
    start_frames: int = opt(8, "frames per start context")


def step_choices(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; a clear error otherwise."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or any(not 1 <= k <= 64 for k in steps):
        raise ValueError(f"--train-steps must be comma-separated step counts in [1, 64], got {text!r}")
    return steps


def dmd_loss(
    x: torch.Tensor, real_v: torch.Tensor, fake_v: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """DMD's generator loss for student frames ``x`` (B, G, C, h, w), given the teacher's and the
    critic's velocities at ``noisy`` = x noised to levels ``t`` (B, G).

    The clean estimates are ``x0 = noisy - t v``; the gradient on x is ``x0_fake - x0_real`` (the
    difference of the two scores), over ``mean |x - x0_real|`` per window (DMD's normaliser). The
    loss ``0.5 |x - sg(x - grad)|^2`` has exactly that gradient (over its element count): zero
    where teacher and critic agree.
    """
    with torch.no_grad():
        tt = t[..., None, None, None].float()
        x0_real = noisy.float() - tt * real_v.float()
        x0_fake = noisy.float() - tt * fake_v.float()
        norm = (x.detach().float() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))


class StudentCritic(nn.Module):
    """The two trained DiTs as one module (one optimizer, EMA and resume state for both, and one
    forward for DDP). :meth:`forward` is a whole Self-Forcing step; the teacher is passed in, so
    it is neither trained, averaged nor saved."""

    def __init__(self, teacher: DiT):
        super().__init__()
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)
        self.critic = copy.deepcopy(teacher).train().requires_grad_(True)
        for m in (self.student, self.critic):
            if m.cfg.null_action:  # unused by both (no action dropout): frozen, so DDP sees no idle parameter
                m.null_action.requires_grad_(False)

    def forward(
        self,
        teacher: DiT,
        stream: StreamConfig,
        ctx: torch.Tensor,
        ctx_acts: torch.Tensor,
        acts: torch.Tensor,
        exits: list[int | None],
        levels: torch.Tensor,
        eps: torch.Tensor,
        critic_levels: torch.Tensor,
        critic_eps: torch.Tensor,
        generator: torch.Generator,
        window: int,
        guidance: float,
        ode_noise: torch.Tensor | None = None,
        teacher_stream: StreamConfig | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's loss, the critic's flow-matching loss) of one step.

        ctx (B, S, C, h, w) and ctx_acts (B, S, A): the real context (the session's cache);
        acts (B, n, A): the actions played; exits: per chunk, None or its exit step;
        levels, critic_levels (B, window): noise levels of the last ``window`` frames for the
        DMD loss and the critic's loss; eps, critic_eps (B, window, C, h, w): their noise.
        ode_noise (B, n, C, h, w): an ODE warm-up step instead (:meth:`ode_play`), the student's
        loss the regression on the teacher's frames, played with ``teacher_stream``.
        """
        g = self.student.cfg.frames_per_block * sum(e is not None for e in exits)  # frames with gradient
        if ode_noise is None:
            played = rollout_latents(self.student, stream, ctx, ctx_acts, acts, generator, exits)  # (B, n, C, h, w)
        else:
            played, target = self.ode_play(
                teacher, stream, teacher_stream, ctx, ctx_acts, acts, exits, ode_noise, generator
            )
        seq = torch.cat([ctx.float(), played], 1)[:, -window:]  # (B, T, C, h, w)
        seq_acts = torch.cat([ctx_acts, acts], 1)[:, -window:].float()
        first = window - g  # the student's frames: first..
        if ode_noise is not None:
            gen = F.mse_loss(played[:, -g:].float(), target[:, -g:].float())
        else:
            with torch.no_grad():
                noisy = sampling.add_noise(seq.detach(), eps, levels)
                # The teacher's velocity of the student's frames after their noised context, guided as sampling guides.
                teacher_v = sampling.velocity(
                    teacher, seq_acts, guidance, ctx=noisy[:, :first], ctx_t=levels[:, :first]
                )
                real_v = teacher_v(noisy[:, first:], levels[:, first:])
                fake_v = self.critic(noisy, levels, seq_acts)[:, first:]
            gen = dmd_loss(seq[:, first:], real_v, fake_v, noisy[:, first:], levels[:, first:])
        critic = flow_matching_loss(self.critic, seq.detach(), seq_acts, critic_levels, critic_eps, first_target=first)
        return gen, critic

    def ode_play(
        self,
        teacher: DiT,
        stream: StreamConfig,
        teacher_stream: StreamConfig,
        ctx: torch.Tensor,
        ctx_acts: torch.Tensor,
        acts: torch.Tensor,
        exits: list[int | None],
        noise: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ODE warm-up's pairs: the teacher plays the frames from ``noise`` at its own sampler
        steps (the ODE solution, no gradient); the student plays each chunk from the same noise at
        its exit step, on the teacher's history (teacher forcing: the history is read into a
        fresh cache, so once frames have left the window their traces in the keys of those that
        stayed are gone, as in a recompute). Returns (student, teacher) latents, (B, n, C, h, w) each."""
        with torch.no_grad():
            target = rollout_latents(teacher, teacher_stream, ctx, ctx_acts, acts, generator, noise=noise)
        # What the teacher's cache holds before chunk j: the sinks, then the window's latest frames.
        s, w, chunk = stream.sinks, stream.window, self.student.cfg.frames_per_block
        ctx, ctx_acts = ctx[:, -(s + w) :].float(), ctx_acts[:, -(s + w) :]
        out = []
        for j, e in enumerate(exits):
            a, b = j * chunk, (j + 1) * chunk
            hist = torch.cat([ctx[:, :s], torch.cat([ctx[:, s:], target[:, :a]], 1)[:, -w:]], 1)
            hist_acts = torch.cat([ctx_acts[:, :s], torch.cat([ctx_acts[:, s:], acts[:, :a]], 1)[:, -w:]], 1)
            out.append(
                rollout_latents(self.student, stream, hist, hist_acts, acts[:, a:b], generator, [e], noise[:, a:b])
            )
        return torch.cat(out, 1), target


class DistillTask:
    """The :class:`~worldgen.training.loop.Task` of Self Forcing (module docstring)."""

    def __init__(
        self,
        cfg: DistillTrainConfig,
        teacher: WorldModel,
        train: Latents,
        held: Latents | None,
        d: Dist,
        tok_folder: Path | None = None,
        data: tuple[Any, list[int]] | None = None,
    ):
        self.cfg, self.device, self.data, self.tok_folder, self.dist = cfg, d.device, data, tok_folder, d
        self.teacher = teacher.dit.to(d.device).eval().requires_grad_(False)
        self.tokenizer = teacher.tokenizer
        self.train, self.held = train, held if held is not None else train
        self.eval_split = "heldout" if held is not None else "train"
        self.choices = step_choices(cfg.train_steps)
        chunk = self.teacher.cfg.frames_per_block
        # The student plays as its sessions will: the teacher's cache and stabilisation, one pass per step.
        self.stream = dataclasses.replace(teacher.stream, steps=cfg.sample_steps, guidance=1.0)
        self.teacher_stream = teacher.stream  # its own sampler: the ODE warm-up's targets
        self.stream.check(self.teacher, teacher.trained_window)
        self.window = teacher.trained_window
        self.ctx_frames = self.stream.sinks + self.stream.window
        if not 1 <= cfg.sample_steps <= 64:
            raise ValueError(f"--sample-steps must lie in [1, 64], got {cfg.sample_steps}")
        if cfg.grad_frames < chunk or cfg.grad_frames % chunk or cfg.grad_frames >= self.window:
            raise ValueError(
                f"--grad-frames must be a multiple of the chunk ({chunk}) in [{chunk}, "
                f"{self.window - 1}] (the window of {self.window} keeps one context frame), "
                f"got {cfg.grad_frames}"
            )
        if cfg.rollout_frames < cfg.grad_frames or cfg.rollout_frames % chunk:
            raise ValueError(
                f"--rollout-frames must be a multiple of the chunk ({chunk}) >= --grad-frames "
                f"({cfg.grad_frames}), got {cfg.rollout_frames}"
            )
        if not 0 < cfg.t_min < cfg.t_max <= 1:
            raise ValueError(f"need 0 < --t-min < --t-max <= 1, got {cfg.t_min}, {cfg.t_max}")
        if cfg.teacher_guidance != 1 and (not cfg.teacher_guidance > 0 or not self.teacher.cfg.null_action):
            raise ValueError(
                f"--teacher-guidance {cfg.teacher_guidance} needs a teacher trained with action dropout "
                f"(this one has null_action={self.teacher.cfg.null_action}); 1 = no guidance"
            )
        if cfg.ode_steps < 0:
            raise ValueError(f"--ode-steps must be >= 0, got {cfg.ode_steps}")
        if cfg.compile:
            raise ValueError("--compile: distill plays rollouts in Python loops; run it uncompiled")
        self.span = self.ctx_frames + cfg.rollout_frames
        starts = train.starts(self.span)
        if len(starts) == 0:
            raise ValueError(
                f"{cfg.data}: no train episode has {self.span} frames (the cache of {self.ctx_frames} "
                f"+ --rollout-frames {cfg.rollout_frames})"
            )
        self.starts = starts[d.rank :: d.world_size]
        self.model = StudentCritic(self.teacher)
        self.tokens_per_sample = cfg.rollout_frames * self.teacher.cfg.tokens_per_frame
        self.metrics: dict[str, float] = {}
        # Sums of the two losses since the last evaluation (logged there: no GPU sync per step).
        self._sums = torch.zeros(3, device=d.device)
        if d.main:
            n = sum(p.numel() for p in self.teacher.parameters()) / 1e6
            print(
                f"[train] distill: student and critic from {cfg.teacher} ({n:.2f}M params each); steps "
                f"{self.choices}, rollouts of {cfg.grad_frames}..{cfg.rollout_frames} frames after a cache of "
                f"{self.ctx_frames}; {len(train.z)} train frames ({len(starts)} windows)",
                file=sys.stderr,
            )

    @classmethod
    def from_run(cls, cfg: DistillTrainConfig, run: Run, d: Dist) -> DistillTask:
        """Load the teacher (with its tokenizer), encode (or reuse the cached latents of) the dataset."""
        if not cfg.teacher:
            raise ValueError(
                "--teacher is required: a Diffusion-Forcing model folder (e.g. worldgen/checkpoints/default)"
            )
        ds, train, held = open_dataset(cfg)
        tok_folder = tokenizer_folder(cfg.teacher)  # a run folder means its ckpt/: a whole model folder
        teacher = WorldModel.load(tok_folder, device=d.device, guidance=1.0)
        tokenizer = teacher.tokenizer.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        lat = split_latents(run, ds, {"train": train, "heldout": held}, tok_folder, tokenizer, d, cfg)
        return cls(cfg, teacher, lat["train"], lat["heldout"], d, tok_folder, (ds, held or train))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The student's groups at the LR of the schedule, the critic's scaled to ``--critic-lr``."""
        scale = self.cfg.critic_lr / self.cfg.lr
        return param_groups(self.model.student, weight_decay) + [
            {**g, "lr_scale": scale} for g in param_groups(self.model.critic, weight_decay)
        ]

    def draw(self, generator: torch.Generator, batch: int, ode: bool = False) -> dict[str, Any]:
        """Everything random in a step but the rollout's own noise (drawn inside, as sessions draw
        it); ``ode``: an ODE warm-up step, G frames from given noise (:meth:`StudentCritic.ode_play`)."""
        cfg, T, dev, chunk = self.cfg, self.window, self.device, self.teacher.cfg.frames_per_block

        def randint(hi: int) -> int:
            return int(torch.randint(hi, (), generator=generator, device=dev))

        steps = self.choices[randint(len(self.choices))]
        n = (
            cfg.grad_frames
            if ode
            else cfg.grad_frames + chunk * randint((cfg.rollout_frames - cfg.grad_frames) // chunk + 1)
        )
        g_chunks = cfg.grad_frames // chunk
        exits = [None] * (n // chunk - g_chunks) + [randint(steps) for _ in range(g_chunks)]
        # The global batch is drawn on every rank alike; each keeps its own rows (Dist.shard).
        shard = self.dist.shard
        i = shard(torch.randint(len(self.starts), (batch,), generator=generator, device=dev))
        z, acts = self.train.windows(self.starts[i], self.ctx_frames + n)
        shape = (batch, T, *z.shape[2:])
        levels, critic_levels = (shard(self._levels(batch, generator)) for _ in range(2))
        eps = shard(torch.randn(shape, generator=generator, device=dev))
        critic_eps = shard(torch.randn(shape, generator=generator, device=dev))
        stream = dataclasses.replace(self.stream, steps=steps)
        extra = {}
        if ode:
            extra = dict(
                ode_noise=shard(torch.randn((batch, n, *z.shape[2:]), generator=generator, device=dev)),
                teacher_stream=self.teacher_stream,
            )
        return dict(
            stream=stream,
            ctx=z[:, : self.ctx_frames],
            ctx_acts=acts[:, : self.ctx_frames],
            acts=acts[:, self.ctx_frames :],
            exits=exits,
            levels=levels,
            eps=eps,
            critic_levels=critic_levels,
            critic_eps=critic_eps,
            **extra,
        )

    def _levels(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, window): context at the stabilisation level, the last G frames (per chunk) ~ U[t_min, t_max]."""
        cfg, T, chunk = self.cfg, self.window, self.teacher.cfg.frames_per_block
        g = cfg.grad_frames
        u = torch.rand((batch, g // chunk), generator=generator, device=self.device)
        t = (cfg.t_min + (cfg.t_max - cfg.t_min) * u).repeat_interleave(chunk, 1)
        return torch.cat([torch.full((batch, T - g), self.stream.ctx_noise, device=self.device), t], 1)

    def loss(self, model: nn.Module, step: int, generator: torch.Generator) -> torch.Tensor:
        batch = self.draw(generator, self.cfg.batch_size, ode=step < self.cfg.ode_steps)
        gen, critic = model(
            self.teacher, generator=generator, window=self.window, guidance=self.cfg.teacher_guidance, **batch
        )
        self._sums += torch.stack([gen.detach().float(), critic.detach().float(), torch.ones((), device=self.device)])
        return gen + critic

    def flops_per_sample(self) -> float | None:
        m, cfg, T = self.teacher.cfg, self.cfg, self.window
        one = flops_per_frame(m, 1) + m.depth * 4 * m.dim * m.tokens_per_frame**2 * self.ctx_frames
        k = sum(self.choices) / len(self.choices)
        frames = (cfg.grad_frames + cfg.rollout_frames) / 2
        rollout = (
            flops_per_frame(m, self.ctx_frames) * self.ctx_frames + frames * (k + 1) * one + 2 * cfg.grad_frames * one
        )  # backward through the exit passes
        window = flops_per_frame(m, T) * T * (2 + (cfg.teacher_guidance != 1) + 3)  # teacher, critic, critic training
        return rollout + window

    @torch.no_grad()
    def evaluate(self, ema_model: nn.Module) -> dict[str, float]:
        """Latent MSE of the student's play (EMA, its sampler steps, fixed noise) against the real
        frames of fixed held-out windows: first frame and mean over ``eval_frames``."""
        cfg, n = self.cfg, self.cfg.eval_frames
        starts = self.held.starts(self.ctx_frames + n)
        if len(starts) == 0 or n < 1:
            return {}
        g = torch.Generator(self.device).manual_seed(1234)
        pick = starts[torch.linspace(0, len(starts) - 1, min(cfg.eval_windows, len(starts))).long()]
        errors = []
        for i in range(0, len(pick), cfg.batch_size):
            z, acts = self.held.windows(pick[i : i + cfg.batch_size], self.ctx_frames + n)
            with autocast(self.device):
                out = rollout_latents(
                    ema_model.student,
                    self.stream,
                    z[:, : self.ctx_frames],
                    acts[:, : self.ctx_frames],
                    acts[:, self.ctx_frames :],
                    g,
                )
            errors.append(((out.float() - z[:, self.ctx_frames :]) ** 2).mean(dim=(2, 3, 4)))  # (b, n)
        e = torch.cat(errors)
        self.metrics = {"heldout_rollout_mse_1": e[:, 0].mean().item(), f"heldout_rollout_mse_{n}": e.mean().item()}
        gen, critic, steps = self._sums.tolist()
        if steps:  # the two parts of the logged loss (student: DMD, or ODE regression in the warm-up)
            self.metrics.update(student_loss=gen / steps, critic_loss=critic / steps)
            self._sums.zero_()
        return self.metrics

    def finish(self, ema_model: nn.Module) -> dict[str, Any]:
        return {
            "teacher": str(self.cfg.teacher),
            "sample_steps": self.cfg.sample_steps,
            "train_steps": self.choices,
            "window": self.window,
            "train_frames": len(self.train.z),
            "eval_split": self.eval_split,
        }

    @torch.no_grad()
    def sample(self, ema_model: nn.Module, step: int, folder: Path) -> None:
        """Rows: the real frames; the real context then the student's play with the real actions."""
        lat, ctx = self.held, self.ctx_frames
        lengths = (lat.offsets[1:] - lat.offsets[:-1]).tolist()
        e = int(np.argmax(lengths))  # the longest held-out episode, the same every time
        n = min(self.cfg.sample_frames, lengths[e] - ctx)
        if n < 1:
            return
        lo = int(lat.offsets[e]) + (lengths[e] - ctx - n) // 2
        z, acts = lat.windows(torch.tensor([lo], device=self.device), ctx + n)
        with autocast(self.device):
            gen = rollout_latents(
                ema_model.student,
                self.stream,
                z[:, :ctx],
                acts[:, :ctx],
                acts[:, ctx:],
                torch.Generator(self.device).manual_seed(0),
            )
            show = min(ctx, 8)
            real = self.tokenizer.decode(z[0, ctx - show :])
            fake = self.tokenizer.decode(torch.cat([z[0, ctx - show : ctx], gen[0].to(z.dtype)]))
        save_image_rows(
            [tensor_to_frames(real.float())[..., :3], tensor_to_frames(fake.float())[..., :3]],
            folder / f"step-{step:07d}.png",
        )

    def export(self, ema_model: nn.Module, folder: Path, dtype: torch.dtype, step: int) -> None:
        """A complete model folder: the teacher's tokenizer, start contexts, the EMA student with
        the teacher's sampler settings but ``--sample-steps``."""
        teacher_cfg = checkpoint.config(self.tok_folder, "dynamics")
        tok_extra = {
            k: v
            for k, v in checkpoint.config(self.tok_folder, "tokenizer").items()
            if k not in ("model", "action_schema")
        }
        save_part(folder, "tokenizer", self.tokenizer, tok_extra, dtype=dtype)
        if self.data is not None and self.cfg.starts > 0:
            write_starts(folder, *self.data, self.cfg.starts, self.cfg.start_frames)
        sampler = {
            **teacher_cfg.get("sampler", {}),
            "steps": self.cfg.sample_steps,
            "guidance": 1.0,
            "window": self.window,
            "chosen_by": f"worldgen train distill --sample-steps (trained at {self.choices})",
        }
        save_part(
            folder,
            "dynamics",
            ema_model.student,
            {
                "train": {
                    "data": str(self.cfg.data),
                    "steps": step,
                    "config": dataclasses.asdict(self.cfg),
                    "teacher": str(self.cfg.teacher),
                },
                "frame_skip": teacher_cfg.get("frame_skip"),
                "sampler": sampler,
                "metrics": self.metrics,
            },
            dtype=dtype,
        )


def train(cfg: DistillTrainConfig, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a distillation run in ``cfg.out``; returns its summary."""
    return loop.train("distill", cfg, given, DistillTask.from_run)
