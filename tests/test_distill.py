"""Self Forcing (issue 26, tests 5): `worldgen train distill` on the tiny model and the real
ViZDoom recording of conftest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldgen import WorldModel, checkpoint
from worldgen.actions import Action
from worldgen.engine import rollout_latents
from worldgen.models import frames_to_tensor, tensor_to_frames
from worldgen.training.distill import DistillTask, DistillTrainConfig, dmd_loss, step_choices, train
from worldgen.training.distributed import Dist
from worldgen.training.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores

PLAY = [
    Action.from_keys(["forward"]),
    Action.from_keys(["turn_left"]),
    Action.from_keys([], yaw=8.0),
    Action.from_keys(["strafe_right"]),
    Action.from_keys(["back"]),
]
# Tiny settings: the tiny teacher's cache holds 5 frames (window 6), so 8-frame rollouts roll it.
TINY = dict(
    batch_size=2,
    rollout_frames=8,
    grad_frames=2,
    warmup=2,
    log_every=1,
    ckpt_every=1000,
    sample_every=0,
    eval_windows=2,
    eval_frames=2,
    starts=2,
    start_frames=4,
    lr=1e-3,
    critic_lr=1e-3,
)


def config(recording, teacher, out, **kw) -> DistillTrainConfig:
    return DistillTrainConfig(data=str(recording), teacher=str(teacher), out=str(out), device="cpu", **{**TINY, **kw})


def test_training_rollout_plays_as_a_session(tiny_checkpoint):
    """The student's training rollout is a session's play: with every exit step at the last
    step it gives the session's frames for the same noise, past the cache window too, while its
    graded frames carry gradient to the student."""
    wm = WorldModel.load(tiny_checkpoint, device="cpu", steps=2, precision="fp32")  # training's
    frames, acts = wm.start(0)
    plan = (PLAY * 2)[: wm.stream.window + 3]
    s = wm.session(frames, acts, seed=5)
    streamed = np.stack([s.step(a) for a in plan])
    keep = wm.stream.sinks + wm.stream.window
    with torch.no_grad():
        z = wm.tokenizer.encode(frames_to_tensor(frames[-keep:]))[None]

    def vec(xs):
        return torch.from_numpy(np.stack([x.vector() for x in xs]))[None]

    exits = [None] * (len(plan) - 2) + [wm.stream.steps - 1] * 2  # the last two frames graded
    lat = rollout_latents(wm.dit, wm.stream, z, vec(acts[-keep:]), vec(plan), torch.Generator().manual_seed(5), exits)
    assert lat.requires_grad
    lat[:, -2:].square().mean().backward()
    assert all(p.grad is not None for p in wm.dit.blocks[0].parameters())
    with torch.no_grad():
        out = tensor_to_frames(wm.tokenizer.decode(lat[0]))
    assert np.abs(out.astype(int) - streamed).max() <= 1
    # An earlier exit gives the clean estimate of that step: another frame than the session's.
    early = rollout_latents(
        wm.dit, wm.stream, z, vec(acts[-keep:]), vec(plan), torch.Generator().manual_seed(5), exits[:-1] + [0]
    )
    assert torch.equal(early[:, :-1], lat[:, :-1].detach()) and not torch.equal(early[:, -1], lat[:, -1].detach())


def test_dmd_gradient_is_zero_when_critic_and_teacher_agree(doom_recording, tiny_checkpoint, tmp_path):
    """At the start the critic is the teacher: the student gets exactly zero gradient (the
    critic does get one); once the critic differs, the student's gradient is not zero."""
    task = DistillTask.from_run(config(doom_recording, tiny_checkpoint, tmp_path), Run(tmp_path), Dist())
    model = task.model

    def grads(critic_grad: bool = False):
        model.zero_grad(set_to_none=True)
        batch = task.draw(torch.Generator().manual_seed(0), 2)
        gen, critic = model(
            task.teacher, generator=torch.Generator().manual_seed(1), window=task.window, guidance=1.0, **batch
        )
        (gen + critic).backward()
        assert (
            all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.blocks.parameters())
            or not critic_grad
        )
        return [p.grad for p in model.student.parameters() if p.requires_grad]

    g = grads(critic_grad=True)
    assert all(x is not None for x in g) and all(torch.count_nonzero(x) == 0 for x in g)
    with torch.no_grad():
        model.critic.final_proj.bias.add_(0.05)
    assert any(torch.count_nonzero(x) > 0 for x in grads())
    # The loss itself: zero gradient where the two scores agree, the score difference otherwise.
    x = torch.randn(2, 3, 4, 3, 4, requires_grad=True)
    v, noisy, t = torch.randn(2, 3, 4, 3, 4), torch.randn(2, 3, 4, 3, 4), torch.rand(2, 3)
    dmd_loss(x, v, v.clone(), noisy, t).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_ode_warmup_pairs_student_and_teacher_on_the_same_noise(doom_recording, tiny_checkpoint, tmp_path):
    """The ODE warm-up's pairs: the student, still the teacher, at the teacher's step count and
    its last exit step, from the same noise and on the teacher's history, makes the teacher's
    frames (exact conditioning: no stabilisation noise); an earlier exit does not."""
    import dataclasses

    task = DistillTask.from_run(config(doom_recording, tiny_checkpoint, tmp_path, ode_steps=1), Run(tmp_path), Dist())
    batch = task.draw(torch.Generator().manual_seed(0), 2, ode=True)
    assert batch["ode_noise"].shape[1] == batch["acts"].shape[1] == TINY["grad_frames"]
    teacher = dataclasses.replace(task.teacher_stream, ctx_noise=0.0)
    k = teacher.steps
    # 2 context frames: nothing leaves the cache, so the student's re-read history is the teacher's cache.
    ctx, ctx_acts = batch["ctx"][:, -2:], batch["ctx_acts"][:, -2:]
    with torch.no_grad():
        student, target = task.model.ode_play(
            task.teacher,
            teacher,
            teacher,
            ctx,
            ctx_acts,
            batch["acts"],
            [k - 1] * 2,
            batch["ode_noise"],
            torch.Generator(),
        )
        early, _ = task.model.ode_play(
            task.teacher, teacher, teacher, ctx, ctx_acts, batch["acts"], [0] * 2, batch["ode_noise"], torch.Generator()
        )
    torch.testing.assert_close(student, target, atol=1e-4, rtol=1e-4)
    assert (early - target).abs().max() > 1e-2


def test_resume_equals_an_uninterrupted_run(doom_recording, tiny_checkpoint, tmp_path, monkeypatch):
    """A run stopped after its step-2 checkpoint and resumed ends with the weights of a run that
    went straight through (every draw, rollout noise included, comes from the step's generator)."""
    straight = train(config(doom_recording, tiny_checkpoint, tmp_path / "straight", steps=4))
    assert straight["steps"] == 4 and np.isfinite(straight["final_loss"])

    loss = DistillTask.loss

    def crash_at_3(self, model, step, generator):
        if step == 3:
            raise RuntimeError("killed")
        return loss(self, model, step, generator)

    cut = config(doom_recording, tiny_checkpoint, tmp_path / "cut", steps=4, ckpt_every=2)
    monkeypatch.setattr(DistillTask, "loss", crash_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        train(cut)
    monkeypatch.setattr(DistillTask, "loss", loss)
    resumed = train(cut)
    assert resumed["steps"] == 4
    a, _ = checkpoint.load(tmp_path / "cut" / "ckpt", "dynamics")
    b, _ = checkpoint.load(tmp_path / "straight" / "ckpt", "dynamics")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # The student differs from its teacher: it was trained.
    t, _ = checkpoint.load(tiny_checkpoint, "dynamics")
    assert any(not torch.equal(a[k], t[k]) for k in a)


def test_one_step_student_session_equal_alone_and_batched(doom_recording, tiny_checkpoint, tmp_path):
    """The exported 1-step student (one ODE warm-up step, then DMD) is a complete model folder
    whose sampler plays 1 step, and its sessions give the same frames alone and stepped
    together; it also samples at 2 and 4."""
    summary = train(config(doom_recording, tiny_checkpoint, tmp_path, steps=2, sample_steps=1, ode_steps=1))
    assert summary["sample_steps"] == 1 and {"heldout_rollout_mse_1", "student_loss", "critic_loss"} <= set(summary)
    wm = WorldModel.load(tmp_path / "ckpt", device="cpu")
    assert wm.stream.steps == 1 and wm.num_starts == 2
    teacher = WorldModel.load(tiny_checkpoint, device="cpu")
    assert (wm.stream.window, wm.stream.ctx_noise, wm.stream.sinks) == (
        teacher.stream.window,
        teacher.stream.ctx_noise,
        teacher.stream.sinks,
    )
    frames, acts = wm.start(0)
    solo = [
        [s.step(PLAY[(i + j) % 5]) for j in range(7)]
        for i, s in enumerate([wm.session(frames, acts, seed=1), wm.session(seed=2)])
    ]
    together = [wm.session(frames, acts, seed=1), wm.session(seed=2)]
    batch = [wm.step_many(together, [PLAY[(i + j) % 5] for i in range(2)]) for j in range(7)]
    for i in range(2):
        for j in range(7):
            assert np.abs(batch[j][i].astype(int) - solo[i][j]).max() <= 1
    for k in (2, 4):
        assert (
            WorldModel.load(tmp_path / "ckpt", device="cpu", steps=k).session(seed=0).step(PLAY[0]).shape
            == wm.frame_shape
        )


def test_bad_settings_are_clear_errors(doom_recording, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--grad-frames"):
        DistillTask.from_run(config(doom_recording, tiny_checkpoint, tmp_path, grad_frames=6), Run(tmp_path), Dist())
    with pytest.raises(ValueError, match="--teacher-guidance"):
        # The tiny teacher has a null action: guidance is allowed, a non-positive scale is not.
        DistillTask.from_run(
            config(doom_recording, tiny_checkpoint, tmp_path, teacher_guidance=-1.0), Run(tmp_path), Dist()
        )
    with pytest.raises(ValueError, match="--train-steps"):
        step_choices("1,x")
    with pytest.raises(ValueError, match="--teacher is required"):
        DistillTask.from_run(config(doom_recording, "", tmp_path), Run(tmp_path), Dist())
