"""Training (issue 3, tests 4d-f): the tokenizer and Diffusion-Forcing trainers on a tiny real
ViZDoom recording, the resume of a SIGKILLed run, and clear errors for broken checkpoints.

The recording is real play (ViZDoom, E1M1, a scripted player), its 160x120 frames downscaled
to 32x24 so a CPU trains on them in seconds: latent grids of 3 x 4 tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from worldgen import checkpoint
from worldgen.checkpoint import CheckpointError
from worldgen.data import Dataset, DatasetIndex, EpisodeInfo, write_episode_shards
from worldgen.models import MODELS, DiT, load_dit, load_tokenizer
from worldgen.training.distributed import Dist
from worldgen.training.dynamics import DynamicsTask, DynamicsTrainConfig, Latents, flow_matching_loss, noise_levels
from worldgen.training.dynamics import train as train_dynamics
from worldgen.training.run import Run
from worldgen.training.schedule import EMA, param_groups
from worldgen.training.state import load_state, save_state
from worldgen.training.tokenizer import TokenizerTrainConfig
from worldgen.training.tokenizer import train as train_tokenizer

# Shared by every dynamics run here: the tiny DiT on 4-frame windows.
DYN = dict(
    model="tiny",
    window=4,
    batch_size=8,
    warmup=10,
    sample_every=0,
    log_every=10,
    sample_steps=2,
    sample_frames=4,
    eval_windows=8,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores


@pytest.fixture(scope="module")
def recording(doom_recording) -> Path:
    return doom_recording


@pytest.fixture(scope="module")
def tokenizer_run(tiny_tokenizer_run) -> tuple[Path, dict]:
    return tiny_tokenizer_run


def test_tokenizer_trains_and_reports_heldout_psnr_ssim(tokenizer_run, recording):
    out, summary = tokenizer_run
    assert summary["finished"] and summary["steps"] == 40
    # Held-out metrics exist and are sane; the loss fell.
    assert 12 < summary["heldout_psnr"] < 60 and 0 < summary["heldout_ssim"] <= 1
    losses = [e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert losses[-1] < 0.5 * losses[0]
    for f in ("loss.png", "summary.json", "samples/step-0000020.png", "samples/step-0000040.png", "state/train.json"):
        assert (out / f).is_file(), f
    # The exported tokenizer loads and its latent_scale gives ~unit-std latents.
    tok = load_tokenizer(out / "ckpt")
    assert tok.cfg.latent_scale == pytest.approx(summary["latent_scale"])
    from worldgen.models import frames_to_tensor

    with torch.no_grad():
        z = tok.encode(frames_to_tensor(Dataset(recording).read(0, "frames")))
    assert 0.7 < z.std().item() < 1.4


def test_noise_levels_mix_inference_pattern():
    g = torch.Generator().manual_seed(0)
    t = noise_levels(4000, 6, 1, g, prefix_prob=0.0)
    assert abs(t.mean().item() - 0.5) < 0.02 and t.min() > 0 and t.max() < 1  # logit-normal(0, 1)
    t = noise_levels(4000, 6, 1, g, prefix_prob=1.0, ctx_noise=0.05)
    assert (t[:, 0] <= 0.1).all()  # a clean-ish prefix, always
    assert ((t <= 0.1).sum(1) < 6).float().mean() > 0.95  # ... followed by noisy frames
    t = noise_levels(64, 6, 2, g)
    assert torch.equal(t[:, 0::2], t[:, 1::2])  # one level per block of 2 frames


def test_window_starts_skip_episodes_shorter_than_the_window():
    # Episodes of 5, 2 (a quick death) and 4 frames; windows of 4 fit only in the first and last.
    lat = Latents(torch.zeros(11, 1, 1, 1), torch.zeros(11, 10), torch.tensor([0, 5, 7, 11]))
    assert lat.starts(4).tolist() == [0, 1, 7]
    assert lat.starts(6).tolist() == []


def _measure_set(run: Path, n: int = 16) -> tuple[torch.Tensor, ...]:
    """Fixed train windows and noise, levels t in [0.3, 0.8] on every frame: mid noise, where a
    model that predicts nothing scores ~2 and one that has learnt the frames ~0."""
    t = load_file(run / "latents-train.safetensors")
    lat = Latents(t["z"], t["actions"], t["offsets"])
    g = torch.Generator().manual_seed(0)
    starts = lat.starts(DYN["window"])
    x0, acts = lat.windows(starts[torch.randint(len(starts), (n,), generator=g)], DYN["window"])
    return x0, acts, 0.3 + 0.5 * torch.rand(n, DYN["window"], generator=g), torch.randn(x0.shape, generator=g)


def _subset(src: Path, dst: Path, lengths: dict[str, int]) -> Path:
    """A dataset of the first ``lengths[id]`` steps of some episodes of ``src``."""
    ds = Dataset(src)
    index = DatasetIndex(
        dst,
        resolution=ds.resolution,
        frame_skip=ds.frame_skip,
        source=ds.index["source"],
        has_depth=True,
        has_pose=False,
    )
    for i, info in enumerate(ds.episodes):
        if info.id in lengths:
            ep = ds.episode(i, 0, lengths[info.id])
            index.add(EpisodeInfo(id=info.id, length=len(ep), shards=write_episode_shards(dst, info.id, ep)))
    return dst


def test_decoder_only_keeps_the_models_latents_and_plays(tiny_checkpoint, recording, tmp_path):
    """`--decoder-only`: a new, smaller decoder for a trained model's frozen encoder. Its ckpt/ is
    the whole model (DiT, start contexts) with the new decoder, and the encoder and latent scale
    are bit for bit the model's, so the DiT's latents mean what they meant."""
    from worldgen.engine import WorldModel

    cfg = TokenizerTrainConfig(
        data=str(recording),
        out=str(tmp_path / "dec"),
        init=str(tiny_checkpoint),
        decoder_only=True,
        dec_blocks=1,
        steps=30,
        batch_size=8,
        warmup=5,
        lr=2e-3,
        ckpt_every=1000,
        sample_every=0,
        log_every=5,
        eval_frames=16,
    )
    summary = train_tokenizer(cfg)
    ckpt = tmp_path / "dec" / "ckpt"
    old, new = load_tokenizer(tiny_checkpoint), load_tokenizer(ckpt)
    assert new.cfg.dec_blocks == 1 and old.cfg.dec_blocks == 2 and new.cfg.latent_scale == old.cfg.latent_scale
    assert all(torch.equal(a, b) for a, b in zip(new.encoder.state_dict().values(), old.encoder.state_dict().values()))
    assert sum(p.numel() for p in new.decoder.parameters()) < sum(p.numel() for p in old.decoder.parameters())
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "dec" / "log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert losses[-1] < losses[0] and summary["heldout_psnr"] > 10
    wm = WorldModel.load(ckpt, device="cpu")
    assert wm.dit.cfg == load_dit(tiny_checkpoint).cfg and wm.num_starts == WorldModel.load(tiny_checkpoint).num_starts
    frame = wm.session(seed=0).step({"keys": ["forward"], "mouse": [0.0, 0.0]})
    assert frame.shape == (*old.cfg.image_size, 3)
    with pytest.raises(ValueError, match="give --init MODEL"):
        train_tokenizer(dataclasses.replace(cfg, init="", out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="shape the new decoder"):
        train_tokenizer(dataclasses.replace(cfg, decoder_only=False, out=str(tmp_path / "y")))


def test_tiny_dit_overfits_tiny_recording(tokenizer_run, recording, tmp_path):
    """(d): Diffusion Forcing through the real trainer on 5 recorded frames (2 windows of 4; the
    held-out episode as it is); the loss on a fixed set falls >= 10x."""
    data = _subset(recording, tmp_path / "data", {"a": 5, "c": 30})
    run = tmp_path / "run"
    summary = train_dynamics(
        DynamicsTrainConfig(
            data=str(data),
            out=str(run),
            tokenizer=str(tokenizer_run[0]),
            steps=300,
            lr=5e-3,
            ckpt_every=1000,
            ema_decay=0.95,
            **{**DYN, "batch_size": 16},
        )
    )
    assert summary["finished"] and summary["steps"] == 300 and summary["mfu"] == "n/a"
    assert summary["tokens_per_s"] > 0 and "heldout_loss" in summary
    x0, acts, t, eps = _measure_set(run)
    trained = load_dit(run / "ckpt")
    with torch.no_grad():
        before = flow_matching_loss(DiT(trained.cfg), x0, acts, t, eps).item()  # a fresh init
        after = flow_matching_loss(trained, x0, acts, t, eps).item()
    assert before > 1.5
    assert after < before / 10, f"loss fell only {before / after:.1f}x ({before:.3f} -> {after:.3f})"
    for f in ("loss.png", "samples/step-0000300.png", "latents-heldout.safetensors"):
        assert (run / f).is_file(), f
    # ckpt/ holds the EMA weights of the final resume state, and the tokenizer it was trained on.
    state, _ = checkpoint.load(run / "state", "train")
    exported, config = checkpoint.load(run / "ckpt", "dynamics")
    assert all(torch.equal(v, state[f"ema.{k}"]) for k, v in exported.items())
    assert config["sampler"]["steps"] == DYN["sample_steps"] and config["train"]["steps"] == 300
    assert load_tokenizer(run / "ckpt").cfg == load_tokenizer(tokenizer_run[0] / "ckpt").cfg


def test_rollout_training_continues_the_models_own_rollouts(tiny_checkpoint, tokenizer_run, recording, tmp_path):
    """A fine-tune from a trained model (--init) on windows that end in the model's own rollout:
    the real frames are where they were, the generated ones replace the real, and only the real
    frames after them are targets."""
    cfg = DynamicsTrainConfig(
        data=str(recording),
        out=str(tmp_path / "ft"),
        tokenizer=str(tokenizer_run[0]),
        init=str(tiny_checkpoint),
        rollout_frames=3,
        steps=4,
        ckpt_every=1000,
        **{**DYN, "window": 6},
    )
    task = DynamicsTask.from_run(cfg, Run(cfg.out), Dist())
    init = load_dit(tiny_checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(task.model.state_dict().values(), init.state_dict().values()))

    T, b = cfg.window, 5
    # A seed whose step generates frames (g = 0, real context alone, is one draw in G + 1).
    seed = next(
        i
        for i in range(100)
        if torch.randint(cfg.rollout_frames + 1, (), generator=torch.Generator().manual_seed(i)) > 0
    )
    (x0, acts, t, eps, drop, cond), first_target = task.draw_rollout(torch.Generator().manual_seed(seed), b)
    again = torch.Generator().manual_seed(seed)  # the same draws, in draw_rollout's order
    g = int(torch.randint(cfg.rollout_frames + 1, (), generator=again))
    s = 1 + int(torch.randint(T - g, (), generator=again))
    starts = task.starts[torch.randint(len(task.starts), (b,), generator=again)]
    real, real_acts = task.train.windows(starts, T - 1 + g + s)
    real, real_acts = real[:, -T:], real_acts[:, -T:]
    assert x0.shape == real.shape and first_target == T - s and torch.equal(acts, real_acts) and cond is None
    n_real = T - g - s
    assert torch.equal(x0[:, :n_real], real[:, :n_real]) and torch.equal(x0[:, T - s :], real[:, T - s :])
    assert (x0[:, n_real : T - s] - real[:, n_real : T - s]).abs().amax() > 0.1  # generated, not real
    assert (t[:, : T - s] <= 2 * cfg.ctx_noise).all()  # labelled as context
    assert torch.isfinite(flow_matching_loss(task.model, x0, acts, t, eps, drop, first_target))

    summary = train_dynamics(cfg)
    assert summary["finished"] and summary["steps"] == 4
    stored = checkpoint.config(tmp_path / "ft" / "ckpt", "dynamics")["train"]["config"]
    assert stored["init"] == str(tiny_checkpoint) and stored["rollout_frames"] == 3

    # --rollout-share: the share of steps on own rollouts, the rest plain Diffusion Forcing.
    draw_rollout, draw = task.draw_rollout, task.draw
    for share, expect in ((0.0, {"plain"}), (1.0, {"rollout"}), (0.5, {"plain", "rollout"})):
        task.cfg, seen = dataclasses.replace(cfg, rollout_share=share, batch_size=2), set()
        task.draw_rollout = lambda g, b, noise, seen=seen: seen.add("rollout") or draw_rollout(g, b, noise)
        task.draw = lambda g, b, seen=seen, **kw: seen.add("plain") or draw(g, b, **kw)
        for step in range(12):
            assert torch.isfinite(task.loss(task.model, step, torch.Generator().manual_seed(step)))
        assert seen == expect, (share, seen)
    task.draw_rollout, task.draw, task.cfg = draw_rollout, draw, cfg
    with pytest.raises(ValueError, match="--rollout-share must lie in"):
        DynamicsTask.from_run(dataclasses.replace(cfg, rollout_share=1.5), Run(tmp_path / "z"), Dist())

    with pytest.raises(ValueError, match="--init .* has null action, so --action-dropout must be > 0"):
        DynamicsTask.from_run(dataclasses.replace(cfg, action_dropout=0.0), Run(tmp_path / "x"), Dist())
    with pytest.raises(ValueError, match="--rollout-frames must lie in"):
        DynamicsTask.from_run(dataclasses.replace(cfg, rollout_frames=T), Run(tmp_path / "y"), Dist())


def _flags(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def test_sigkilled_run_resumes_same_schedule(tokenizer_run, recording, tmp_path):
    """(e): kill -9 after a checkpoint; the resumed run continues at the saved step, does not
    re-encode, ends at the same total and with the same weights as an uninterrupted run."""
    cfg = dict(data=str(recording), tokenizer=str(tokenizer_run[0]), steps=30, ckpt_every=10, lr=1e-3, **DYN)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "worldgen.cli", "train", "dynamics", *_flags({**cfg, "out": str(run)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = run / "state" / "train.json"
    killed_at = None
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if state.is_file():
            killed_at = json.loads(state.read_text())["config"]["step"]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < 30, "the run finished (or never checkpointed) before the kill"
    assert proc.returncode == -signal.SIGKILL

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run} at step {killed_at} of 30" in resumed.stderr
    assert "encoded" not in resumed.stderr  # the latent cache was reused
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["total_steps"] == 30 and summary["finished"]
    steps = [e["step"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert steps == [10, 20, 30]  # one entry per log step: none lost, none repeated

    # The same config, uninterrupted, in this process: the same weights.
    train_dynamics(DynamicsTrainConfig(**cfg, out=str(tmp_path / "straight")))
    a, _ = checkpoint.load(run / "ckpt", "dynamics")
    b, _ = checkpoint.load(tmp_path / "straight" / "ckpt", "dynamics")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_minutes_budget_fixes_and_stores_the_schedule(tokenizer_run, recording, tmp_path):
    cfg = DynamicsTrainConfig(
        data=str(recording),
        out=str(tmp_path),
        tokenizer=str(tokenizer_run[0]),
        minutes=0.1,
        steps=100_000,
        ckpt_every=100_000,
        **DYN,
    )
    summary = train_dynamics(cfg)
    total = summary["total_steps"]
    assert 23 <= total < 100_000
    # Finished, or (on a machine much slower than its first steps said) stopped at the budget.
    assert summary["steps"] == total if summary["finished"] else summary["stopped_by_budget"]
    assert json.loads((tmp_path / "state" / "train.json").read_text())["config"]["total_steps"] == total
    again = train_dynamics(cfg)  # a resume keeps the stored schedule, whatever the clock says now
    assert again["total_steps"] == total and again["steps"] == total


def test_state_round_trip_and_export(tmp_path):
    torch.manual_seed(0)
    model = DiT(MODELS["tiny"])
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    ema = EMA(model, 0.9)
    for _ in range(2):
        x = torch.randn(2, 2, *_latent_shape(model))
        model(x, torch.rand(2, 2), torch.zeros(2, 2, 10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    save_state(tmp_path, model, ema, opt, {"step": 2, "total_steps": 9})

    model2 = DiT(MODELS["tiny"])
    opt2 = torch.optim.AdamW(param_groups(model2, 0.01), lr=1e-3)
    ema2 = EMA(model2, 0.9)
    meta = load_state(tmp_path, model2, ema2, opt2)
    assert meta["step"] == 2 and meta["total_steps"] == 9 and ema2.updates == 2
    for a, b in [(model, model2), (ema.module, ema2.module)]:
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def _latent_shape(model: DiT) -> tuple[int, ...]:
    return (model.cfg.latent_channels, *model.cfg.latent_size)


def _rewrite(folder: Path, part: str, change) -> None:
    tensors, config = checkpoint.load(folder, part)
    change(tensors)
    checkpoint.save(folder, part, tensors, config)


def test_broken_checkpoints_are_clear_errors(tokenizer_run, recording, tmp_path):
    """(f): a missing or misshapen tensor, in the model folder or the resume state, names itself."""
    cfg = DynamicsTrainConfig(
        data=str(recording), out=str(tmp_path / "run"), tokenizer=str(tokenizer_run[0]), steps=3, **DYN
    )
    train_dynamics(cfg)
    ckpt, state = tmp_path / "run" / "ckpt", tmp_path / "run" / "state"
    name = sorted(checkpoint.load(ckpt, "dynamics")[0])[0]

    _rewrite(ckpt, "dynamics", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensors.*{name}"):
        load_dit(ckpt)
    _rewrite(ckpt, "tokenizer", lambda t: t.update({k: v[:1] for k, v in list(t.items())[:1]}))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_tokenizer(ckpt)

    keep = tmp_path / "state-copy"
    shutil.copytree(state, keep)
    _rewrite(state, "train", lambda t: t.pop(f"model.{name}"))
    with pytest.raises(CheckpointError, match=f"missing tensors.*{name}"):
        train_dynamics(cfg)
    shutil.rmtree(state)
    shutil.copytree(keep, state)
    _rewrite(state, "train", lambda t: t.update({"optim.0.exp_avg": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="optim.0.exp_avg"):
        train_dynamics(cfg)


def test_one_trainer_per_run_folder(tmp_path):
    first = Run(tmp_path)
    first.start("dynamics", DynamicsTrainConfig(out=str(tmp_path)), {})
    with pytest.raises(RuntimeError, match=f"pid {os.getpid()}.*is training in this run folder"):
        Run(tmp_path).start("dynamics", DynamicsTrainConfig(out=str(tmp_path)), {})
    first.close()
    Run(tmp_path).start("dynamics", DynamicsTrainConfig(out=str(tmp_path)), {})  # free again
