"""Frame memory in the DiT, the trainer and the engine (issue 23) on the tiny real-ViZDoom model."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from worldgen import WorldModel
from worldgen.actions import Action
from worldgen.data import Dataset
from worldgen.engine.memory import dead_reckon
from worldgen.models import MODELS, DiT, load_dit
from worldgen.models.attention import LayerKV
from worldgen.models.dit import Context, Memory
from worldgen.training.dynamics import flow_matching_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores

PLAY = [
    Action.from_keys(["forward"]),
    Action.from_keys(["turn_left"]),
    Action.from_keys([], yaw=8.0),
    Action.from_keys(["strafe_right"]),
    Action.from_keys(["back"], pitch=-3.0),
]


@pytest.fixture(scope="module")
def memory_checkpoint(doom_recording, tiny_checkpoint, tmp_path_factory):
    """The tiny model fine-tuned with up to 2 recalled frames (a fresh memory embedder on its weights)."""
    from worldgen.training.dynamics import DynamicsTrainConfig, train

    out = tmp_path_factory.mktemp("dyn-memory")
    train(
        DynamicsTrainConfig(
            data=str(doom_recording),
            out=str(out),
            tokenizer=str(tiny_checkpoint),
            init=str(tiny_checkpoint),
            model="tiny",
            window=6,
            steps=30,
            batch_size=8,
            lr=3e-3,
            warmup=5,
            ckpt_every=1000,
            sample_every=0,
            log_every=10,
            sample_steps=2,
            eval_windows=8,
            ema_decay=0.9,
            memory_frames=2,
            memory_gap=8,
            memory_cap=8,
            memory_none=0.25,
        )
    )
    return out / "ckpt"


def tiny_memory_dit() -> DiT:
    torch.manual_seed(0)
    dit = DiT(dataclasses.replace(MODELS["tiny"], latent_channels=4, latent_size=(3, 4), memory_frames=3)).eval()
    for p in dit.parameters():  # adaLN-zero starts as v = 0: give every path weight
        p.data.normal_(0, 0.1)
    return dit


def test_memory_is_context_every_frame_sees_and_masked_memory_is_none():
    dit = tiny_memory_dit()
    x, t, a = torch.randn(2, 4, 4, 3, 4), torch.rand(2, 4), torch.randn(2, 4, 10)
    mem = Memory(torch.randn(2, 3, 4, 3, 4), torch.randn(2, 3, 6), torch.rand(2, 3) * 100)
    with torch.no_grad():
        plain, with_mem = dit(x, t, a), dit(x, t, a, context=Context(memory=mem))
        assert with_mem.shape == x.shape  # memory frames are not predicted
        assert (with_mem - plain)[:, 0].abs().amax() > 1e-3  # even the first frame sees them
        none = dit(x, t, a, context=Context(memory=dataclasses.replace(mem, mask=torch.zeros(2, 3, dtype=torch.bool))))
        assert torch.allclose(none, plain, atol=1e-5)
        # A masked slot is the same as a memory without it (what a session's empty recalls rely on).
        keep = torch.tensor([[True, False, True], [True, True, True]])
        part = dit(x, t, a, context=Context(memory=dataclasses.replace(mem, mask=keep)))
        alone = dit(
            x[:1],
            t[:1],
            a[:1],
            context=Context(memory=Memory(mem.z[:1, [0, 2]], mem.pose[:1, [0, 2]], mem.age[:1, [0, 2]])),
        )
        assert torch.allclose(part[:1], alone, atol=1e-5)
        # Pose and age are what tells recalled frames apart.
        moved = dit(x, t, a, context=Context(memory=dataclasses.replace(mem, pose=mem.pose + 1.0)))
        older = dit(x, t, a, context=Context(memory=dataclasses.replace(mem, age=mem.age + 500)))
        assert (moved - with_mem).abs().amax() > 1e-3 and (older - with_mem).abs().amax() > 1e-3
        # Streaming: the recalled frames see each other only, never the cached past (as in training).
        n, heads, hd = dit.cfg.tokens_per_frame, dit.cfg.heads, dit.cfg.dim // dit.cfg.heads
        kv = [[torch.randn(2, heads, past * n, hd) for _ in range(2)] for past in (5, 0)]
        caches = [[LayerKV(k, v) for _ in range(dit.cfg.depth)] for k, v in kv]
        for past in caches:
            dit(x[:, :1], t[:, :1], a[:, :1], context=Context(torch.tensor([5]), past, memory=mem))
        last = [past[-1].new[0][:, :, : 3 * n] for past in caches]  # the memory frames' keys
        assert torch.allclose(last[0], last[1], atol=1e-5)
    dit.train()
    loss = flow_matching_loss(dit, x, a, t, torch.randn_like(x), memory=mem)
    loss.backward()
    assert dit.memory_embed.mlp[0].weight.grad.abs().sum() > 0


def test_a_model_trained_without_memory_refuses_memory(tiny_checkpoint):
    with pytest.raises(ValueError, match="trained without memory"):
        WorldModel.load(tiny_checkpoint, device="cpu", memory_k=2)
    with pytest.raises(ValueError, match="trained without memory"):
        WorldModel.load(tiny_checkpoint, device="cpu", memory_cap=64)
    dit = load_dit(tiny_checkpoint)
    x = torch.zeros(1, 2, *dit.cfg.latent_size[:0], dit.cfg.latent_channels, *dit.cfg.latent_size)
    with pytest.raises(ValueError, match="trained without memory"):
        dit(
            x,
            torch.zeros(1, 2),
            torch.zeros(1, 2, 10),
            context=Context(memory=Memory(x[:, :1], torch.zeros(1, 1, 6), torch.zeros(1, 1))),
        )
    assert WorldModel.load(tiny_checkpoint, device="cpu").memory is None  # and plays as before


def test_memory_training_stores_its_settings_and_sessions_recall(memory_checkpoint, doom_recording):
    wm = WorldModel.load(memory_checkpoint, device="cpu")
    assert wm.dit.cfg.memory_frames == 2 and (wm.memory.k, wm.memory.cap) == (2, 8)
    assert wm.memory.min_age == wm.stream.window + 1  # the KV window is not recalled
    with pytest.raises(ValueError, match="takes 1..2"):
        WorldModel.load(memory_checkpoint, device="cpu", memory_k=3)
    # A real start with the game's cameras, then the game's path: frames recalled once old enough.
    ds = Dataset(doom_recording)
    ep = ds.episode(0)
    n_ctx = 4
    made_by = [Action.from_keys([])] + [Action(k, m) for k, m in zip(ep.keys[: n_ctx - 1], ep.mouse[: n_ctx - 1])]
    s = wm.session(ep.frames[:n_ctx], made_by, seed=1, context_poses=ep.pose[:n_ctx])
    assert len(s.bank) == n_ctx
    size = s.cache_bytes()
    recalled = []
    for i in range(n_ctx, len(ep)):
        s.step(Action(ep.keys[i - 1], ep.mouse[i - 1]), pose=ep.pose[i])
        recalled.append(int(_recall_count(wm, s, ep.pose[min(i + 1, len(ep) - 1)])))
    assert len(s.bank) == wm.memory.cap and s.cache_bytes() == size  # bounded however long it plays
    assert max(recalled) > 0 and recalled[0] == 0  # nothing old enough at first


def _recall_count(wm, s, pose) -> int:
    from worldgen.engine.memory import recalled

    return recalled([s.bank], torch.from_numpy(pose)[None], torch.tensor([s.clock])).mask.sum()


def test_memory_sessions_batch_as_they_play_alone(memory_checkpoint, monkeypatch):
    import worldgen.engine.world_model as engine

    recalls = []  # per step_many call: what each session recalled (latents, relative poses, ages, mask)
    real = engine.recalled
    monkeypatch.setattr(engine, "recalled", lambda *a: recalls.append(real(*a)) or recalls[-1])
    wm = WorldModel.load(memory_checkpoint, device="cpu", memory_cap=6)
    plays = [PLAY * 3, (PLAY[::-1] * 3)[:13]]  # different ages when batched
    alone = []
    for seed, play in zip((3, 4), plays):
        s = wm.session(seed=seed)
        alone.append(np.stack([s.step(a) for a in play]))
    alone_recalls, recalls[:] = list(recalls), []
    s1, s2 = wm.session(seed=3), wm.session(seed=4)
    for a in plays[0][:2]:
        s1.step(a)
    together = np.stack([wm.step_many([s1, s2], [a1, a2]) for a1, a2 in zip(plays[0][2:], plays[1])], 1)
    # Each session recalls the same frames (ages), at the same relative poses, in the batch as alone
    # (the latents themselves carry the float rounding of the steps that made them, see below).
    for i, m in enumerate(recalls[2:]):
        for b, one in enumerate((alone_recalls[2 + i], alone_recalls[len(plays[0]) + i])):
            for field in ("pose", "age", "mask"):
                assert torch.equal(getattr(m, field)[b : b + 1], getattr(one, field)), (i, b, field)
            assert torch.allclose(m.z[b : b + 1], one.z, atol=1e-5)
    assert any(m.mask.any() for m in recalls)  # the batch did recall frames
    # Frames: the same up to float rounding. A batched matmul rounds differently from a single
    # one (~1e-7 in the latents, without memory too), which can flip a pixel by one level.
    for b in range(2):
        diff = np.abs(together[b].astype(int) - alone[b][-len(together[b]) :])
        assert diff.max() <= 1 and diff.mean() < 1e-3
    assert wm.memory.k == 2 and len(s1.bank) == 6


def test_dead_reckoning_follows_doom_turns_and_walks():
    pose = torch.tensor([[100.0, 0.0, 41.0, 90.0, 0.0]])
    turn = torch.from_numpy(Action.from_keys(["turn_left"]).vector())[None]
    walk = torch.from_numpy(Action.from_keys(["forward", "strafe_left"], pitch=5.0).vector())[None]
    p = dead_reckon(pose, turn)
    assert p[0, 3].item() == pytest.approx(104.1) and torch.equal(p[0, :3], pose[0, :3])
    p = dead_reckon(torch.tensor([[0.0, 0.0, 41.0, 90.0, 0.0]]), walk)  # facing +y: left is -x
    assert p[0, :2].tolist() == pytest.approx([-32.0, 33.0], abs=1e-4) and p[0, 4].item() == 5.0


def test_revisit_benchmark_scores_variants_on_the_way_back(memory_checkpoint, tiny_checkpoint, doom_recording):
    """benchmarks/revisit.py end to end on CPU. The game side is ViZDoom (env.record.branch, tested
    with the recorder); this recording is downscaled, so a stand-in answers for the game here: the
    way out's recorded frames and cameras in reverse, what walking the path back would roughly see.
    The scripted player of the recording barely turns, so "out of view" is loosened to < 50% seen."""
    from conftest import benchmark_script

    revisit = benchmark_script("revisit")
    ds = Dataset(doom_recording)

    def stand_in(source, at, keys, mouse):
        e = ds.episode_index(source.rsplit("::", 1)[1])
        lo = at - len(keys)
        return ds.read(e, "frames", lo, at)[::-1], ds.read(e, "pose", lo, at)[::-1], True

    args = argparse.Namespace(
        data=str(doom_recording),
        variant=[f"no memory={memory_checkpoint},memory_k=0", f"bank={memory_checkpoint}"],
        windows=2,
        context=3,
        out_frames=16,
        out_of_view=4,
        out_share=0.5,
        dead_reckon=False,
        seed=0,
        device="cpu",
    )
    result = revisit.run(args, game=stand_in)
    assert [r["variant"] for r in result["rows"]] == ["no memory", "bank"] and len(result["windows"]) == 2
    assert result["rows"][0]["memory"] is None and result["rows"][1]["memory"] == {"k": 2, "cap": 8}
    for r in result["rows"]:
        assert len(r["psnr_back_per_frame"]) == 16 and all(5 < v < 100 for v in r["psnr_back_per_frame"])
    assert "| bank |" in revisit.table(result)
    with pytest.raises(revisit.RevisitError, match="no window"):
        revisit.run(argparse.Namespace(**{**vars(args), "out_of_view": 16}), game=stand_in)
    with pytest.raises(revisit.RevisitError, match="trained without memory"):
        revisit.run(argparse.Namespace(**{**vars(args), "variant": [f"x={tiny_checkpoint},memory_k=2"]}), game=stand_in)


def test_gym_vector_env_plays_with_memory_settings(memory_checkpoint, tiny_checkpoint):
    from worldgen.env.gym.world_model_env import WorldModelEnv, WorldModelVectorEnv

    envs = WorldModelVectorEnv(2, str(memory_checkpoint), device="cpu", reward="zero", stream={"memory_cap": 6})
    try:
        envs.reset(seed=0)
        act = {"keys": np.zeros((2, 8), np.int8), "mouse": np.full((2, 2), 4.0, np.float32)}
        for _ in range(9):
            obs, *_ = envs.step(act)
        assert obs.shape[0] == 2 and all(len(e.session.bank) == 6 for e in envs.envs)
    finally:
        envs.close()
    with pytest.raises(ValueError, match="trained without memory"):
        WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero", stream={"memory_k": 2})


def test_training_recalls_frames_from_far_earlier_in_the_same_episode(doom_recording, tiny_checkpoint, tmp_path):
    from worldgen.memory.bank import relative_pose
    from worldgen.training.distributed import Dist
    from worldgen.training.dynamics import DynamicsTask, DynamicsTrainConfig
    from worldgen.training.run import Run

    cfg = DynamicsTrainConfig(
        data=str(doom_recording),
        out=str(tmp_path / "run"),
        tokenizer=str(tiny_checkpoint),
        init=str(tiny_checkpoint),
        model="tiny",
        window=6,
        memory_frames=3,
        memory_gap=10,
    )
    task = DynamicsTask.from_run(cfg, Run(cfg.out), Dist())
    lat = task.train
    assert task.model.cfg.memory_frames == 3 and lat.pose is not None and len(lat.pose) == len(lat.z)
    newest = task.memory_starts + cfg.window - 1
    assert (newest - lat.episode_start(newest) >= cfg.memory_gap).all() and len(newest) < len(task.starts)
    mem = task.recall(newest, torch.Generator().manual_seed(0))
    rows = newest[:, None] - mem.age.long()  # (B, m) the recalled rows
    assert (mem.age >= cfg.memory_gap).all() and (rows >= lat.episode_start(newest)[:, None]).all()
    assert torch.equal(mem.z, lat.z[rows].float())
    assert torch.allclose(mem.pose, relative_pose(lat.pose[rows], lat.pose[newest][:, None]))
    x0, acts, t, eps, drop, _, memory = task.draw(torch.Generator().manual_seed(1), 4, memory=True)
    assert x0.shape[:2] == (4, cfg.window) and memory.z.shape[:2] == (4, memory.age.shape[1])
    assert torch.isfinite(flow_matching_loss(task.model, x0, acts, t, eps, drop, memory=memory))
