"""`worldgen eval` and its metrics, on CPU: a tiny real ViZDoom recording and a tiny random model.

The recording is real play (ViZDoom, E1M1) with its 160x120 frames downscaled 5x to 32x24, as
in tests/test_training.py: a tokenizer then decodes hundreds of frames in a second or two.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import finite, reindexed  # tests/ is on sys.path under pytest
from PIL import Image

from worldgen.cli import main
from worldgen.data import Dataset, DatasetIndex, Episode, EpisodeInfo, write_episode_shards
from worldgen.evaluation import PSNR_CAP_DB, EvalConfig, EvaluationError, evaluate, psnr, ssim
from worldgen.evaluation.evaluate import _derangement, select_windows
from worldgen.models import MODELS, DiT, Tokenizer, TokenizerConfig, save_part

CONTEXT = 4
SIZE = (32, 24)  # (W, H) of the test frames
# The "tiny" DiT on 3x4 latents (32x24 / 8): 12 tokens per frame.
TINY = dataclasses.replace(MODELS["tiny"], latent_size=(SIZE[1] // 8, SIZE[0] // 8), dim=32)
EPISODE_STEPS = (150, 120, 40)  # the last one is too short for a 4 + 64 window


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops gain nothing from a second thread, and on a busy 2-core machine the threads
    # of two processes spin against each other (measured: 0.5 s vs 0.03 s per tiny DiT forward).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- metrics ---------------------------------------------------------------------------------


def test_psnr_known_values_and_forms():
    a = np.full((2, 3, 8, 6, 3), 100, np.uint8)  # leading axes are kept
    b = a.copy()
    b[0] += 10  # MSE = (10/255)^2 everywhere
    b[1, :, :4] = 255  # half the rows off by 155
    want0 = 20 * math.log10(25.5)
    want1 = 10 * math.log10(1 / (0.5 * (155 / 255) ** 2))
    got = psnr(a, b)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got[0].numpy(), want0, atol=1e-4)
    np.testing.assert_allclose(got[1].numpy(), want1, atol=1e-4)
    # Model-space floats in [-1, 1], channels first, give the same numbers.
    to_float = lambda u: torch.from_numpy(u).movedim(-1, -3).float() / 127.5 - 1
    np.testing.assert_allclose(psnr(to_float(a), to_float(b)).numpy(), got.numpy(), atol=1e-3)
    # Identical frames: capped, not inf, so a still frame cannot make a mean infinite.
    assert psnr(a, a).eq(PSNR_CAP_DB).all() and 58 < PSNR_CAP_DB < 60


def test_ssim_identical_is_one_and_falls_with_noise():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (1, 48, 64, 3)).astype(np.uint8)
    clean = np.repeat(np.repeat(clean[:, ::4, ::4], 4, 1), 4, 2)  # blocky: has structure to lose
    noisy = [np.clip(clean + rng.normal(0, s, clean.shape), 0, 255).astype(np.uint8) for s in (5, 40)]
    s0, s1, s2 = (float(ssim(clean, x)) for x in (clean, *noisy))
    assert s0 == pytest.approx(1.0, abs=1e-6)
    assert 1.0 > s1 > s2 > 0.0
    to_float = lambda u: torch.from_numpy(u).movedim(-1, -3).float() / 127.5 - 1
    assert float(ssim(to_float(clean), to_float(noisy[0]))) == pytest.approx(s1, abs=1e-4)


def test_metrics_reject_mismatched_inputs():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match="same shape and form"):
        psnr(a, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
        ssim(np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 3, 8, 8), np.uint8))


def test_derangement_moves_every_window():
    for n in (2, 3, 17):
        perm = _derangement(n, seed=n)
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != torch.arange(n)).all()
    assert _derangement(9, 1).tolist() == _derangement(9, 1).tolist()


# --- a tiny real recording and a tiny random model ---------------------------------------------


def record_doom(root: Path, steps: tuple[int, ...]) -> Path:
    """Real ViZDoom play (E1M1) with a persistent random policy, one seed per episode, at SIZE."""
    import vizdoom as vzd

    game = vzd.DoomGame()
    game.set_doom_game_path(os.path.join(os.path.dirname(vzd.__file__), "freedoom1.wad"))
    game.set_doom_map("E1M1")
    game.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_window_visible(False)
    game.set_depth_buffer_enabled(True)
    game.set_mode(vzd.Mode.PLAYER)
    b = vzd.Button
    game.set_available_buttons(
        [
            b.MOVE_FORWARD,
            b.MOVE_BACKWARD,
            b.MOVE_LEFT,
            b.MOVE_RIGHT,
            b.TURN_LEFT,
            b.TURN_RIGHT,
            b.ATTACK,
            b.USE,
            b.TURN_LEFT_RIGHT_DELTA,
        ]
    )
    game.init()
    index = DatasetIndex(
        root,
        resolution=SIZE,
        frame_skip=4,
        source={"env": "vizdoom", "test": "downscaled"},
        has_depth=True,
        has_pose=False,
    )
    try:
        for e, n in enumerate(steps):
            game.set_seed(e)
            game.new_episode()
            rng = np.random.default_rng(e)
            frames, depth = [], []
            keys, mouse = np.zeros((n, 8), np.uint8), np.zeros((n, 2), np.float32)
            for i in range(n):
                if i % 8 == 0:  # persistent actions: 8 steps each, like a player holding keys
                    k = (rng.random(8) < [0.7, 0.05, 0.15, 0.15, 0.2, 0.2, 0.1, 0.05]).astype(np.uint8)
                    yaw = float(rng.normal(0, 4))
                keys[i], mouse[i, 0] = k, yaw
                state = game.get_state()
                frames.append(np.asarray(Image.fromarray(state.screen_buffer).resize(SIZE, Image.BILINEAR)))
                depth.append(np.asarray(Image.fromarray(state.depth_buffer).resize(SIZE, Image.NEAREST)))
                game.make_action([*k.tolist(), -yaw], 4)  # the game's positive delta turns left
            ep = Episode(frames=np.stack(frames), keys=keys, mouse=mouse, depth=np.stack(depth))
            name = f"e{e:02d}"
            index.add(
                EpisodeInfo(id=name, length=n, shards=write_episode_shards(root, name, ep, 64), map="E1M1", seed=e)
            )
    finally:
        game.close()
    return root


@pytest.fixture(scope="module")
def doom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("doom")
    cwd = os.getcwd()
    os.chdir(root)  # ViZDoom writes _vizdoom.ini into the working directory
    try:
        return record_doom(root / "data", EPISODE_STEPS)
    finally:
        os.chdir(cwd)


def make_ckpt(folder: Path, in_channels: int = 3) -> Path:
    """Random weights, with the DiT's zero-initialised output and modulations made random so
    that its predictions depend on the actions (at init the velocity is 0 whatever the input)."""
    torch.manual_seed(0)
    tok = Tokenizer(
        TokenizerConfig(image_size=SIZE[::-1], in_channels=in_channels, channels=(8, 8, 8, 8), dec_blocks=1)
    )
    save_part(folder, "tokenizer", tok, {})
    dit = DiT(TINY)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    save_part(folder, "dynamics", dit, {"sampler": {"steps": 2, "ctx_noise": 0.0, "window": CONTEXT + 1}})
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("ckpt"))


def test_select_windows_deterministic_tiles(doom):
    ds = Dataset(doom)
    a = select_windows(ds, [0, 1, 2], 30, 6, seed=3)
    b = select_windows(ds, [0, 1, 2], 30, 6, seed=3)
    spans = [(w["episode"], w["start"]) for w in a]
    assert spans == [(w["episode"], w["start"]) for w in b] and len(set(spans)) == 6
    assert all(s % 30 == 0 for _, s in spans)  # enough tiles: no overlap
    many = select_windows(ds, [0, 1, 2], 30, 20, seed=3)  # more than the 5 + 4 + 1 tiles
    assert len({(w["episode"], w["start"]) for w in many}) == 20
    assert all(len(w["frames"]) == 30 for w in many)


def test_select_windows_ignore_the_index_order(doom, tmp_path):
    """The same recording indexed in another episode order (parallel workers finish in any
    order) gives the same windows, in the same order, so evaluations of it pair up."""
    a, b = Dataset(doom), Dataset(reindexed(doom, tmp_path))
    assert [e.id for e in a.episodes] != [e.id for e in b.episodes]
    spans = lambda ds: [
        (ds.episodes[w["episode"]].id, w["start"]) for w in select_windows(ds, list(range(len(ds))), 30, 6, seed=3)
    ]
    assert spans(a) == spans(b)


def test_windows_from_pairs_two_evaluations(doom, ckpt, tmp_path):
    """--windows-from scores exactly an earlier eval.json's windows and shuffled actions: the same
    model and seed give the same numbers, from a recording indexed in another order too."""
    first = evaluate(
        ckpt, doom, EvalConfig(windows=3, horizon=8, split="all", seed=1), device="cpu", log=lambda s: None
    )
    (tmp_path / "first.json").write_text(json.dumps(first))
    again = evaluate(
        ckpt,
        reindexed(doom, tmp_path),
        EvalConfig(split="all", seed=1, windows_from=tmp_path / "first.json"),
        device="cpu",
        log=lambda s: None,
    )
    assert again["window_starts"] == first["window_starts"] and again["horizon"] == 8
    for key in ("teacher_forced", "rollout", "controllability"):
        assert again[key] == first[key]
    fresh = evaluate(
        ckpt, doom, EvalConfig(windows=3, horizon=8, split="all", seed=2), device="cpu", log=lambda s: None
    )
    assert fresh["window_starts"] != first["window_starts"]  # a new draw: what --windows-from avoids

    lost = dict(first, window_starts=[["no-such-episode", 0]] + first["window_starts"][1:])
    (tmp_path / "lost.json").write_text(json.dumps(lost))
    with pytest.raises(EvaluationError, match="not in this recording: .*no episode 'no-such-episode'"):
        evaluate(ckpt, doom, EvalConfig(windows_from=tmp_path / "lost.json"), device="cpu", log=lambda s: None)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EvaluationError, match="not an eval.json"):
        evaluate(ckpt, doom, EvalConfig(windows_from=tmp_path / "bad.json"), device="cpu", log=lambda s: None)


def test_eval_end_to_end(doom, ckpt, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(doom),
            "--json",
            str(out),
            "--split",
            "all",
            "--windows",
            "2",
            "--batch",
            "64",
            "--device",
            "cpu",
            "--video-windows",
            "1",
        ]
    )
    assert rc == 0
    r = json.loads(out.read_text())

    assert r["version"] == 1 and r["windows"] == 2 and r["split"] == "all" and r["episodes"] == 3
    assert r["heldout_fraction"] is None
    assert r["context"] == CONTEXT and r["horizon"] == 64  # from the checkpoint's sampler window
    assert r["sampler"] == {
        "steps": 2,
        "ctx_noise": 0.0,
        "shift": 1.0,
        "guidance": 1.0,
        "window": CONTEXT + 1,
        "seed": 0,
    }
    assert set(r["tokenizer"]) == {"psnr", "ssim", "frames"} and r["tokenizer"]["frames"] == 2 * 68
    assert set(r["teacher_forced"]) == {"psnr", "ssim", "baseline_psnr", "baseline_ssim", "gain_db", "frames"}
    assert r["teacher_forced"]["frames"] == 2 * 64
    keys = {f"{p}psnr@{h}" for p in ("", "baseline_") for h in (1, 16, 64)}
    assert set(r["rollout"]) == keys | {"curve", "baseline_curve", "shuffled_curve"}
    assert all(len(r["rollout"][k]) == 64 for k in ("curve", "baseline_curve", "shuffled_curve"))
    ctl = r["controllability"]
    assert set(ctl) == {
        "psnr@16_real",
        "psnr@16_shuffled",
        "delta_db",
        "windows_real",
        "windows_shuffled",
        "shuffled_from",
    }
    assert finite(r) and all(
        v is not None
        for part in ("tokenizer", "teacher_forced", "rollout", "controllability")
        for v in r[part].values()
    )
    assert ctl["delta_db"] == pytest.approx(ctl["psnr@16_real"] - ctl["psnr@16_shuffled"], abs=1e-3)
    for name in ("real", "shuffled"):  # the per-window PSNRs are what the means are of
        assert ctl[f"psnr@16_{name}"] == pytest.approx(np.mean(ctl[f"windows_{name}"]), abs=1e-3)
    assert ctl["shuffled_from"] == [1, 0]
    # Both windows are on E1M1 with as many frames each: the map's means are the overall ones.
    e1m1 = r["per_map"]["E1M1"]
    assert list(r["per_map"]) == ["E1M1"] and e1m1["windows"] == 2
    for key, overall in (
        ("teacher_forced_psnr", r["teacher_forced"]["psnr"]),
        ("teacher_forced_baseline_psnr", r["teacher_forced"]["baseline_psnr"]),
        ("rollout_psnr@16", r["rollout"]["psnr@16"]),
        ("rollout_baseline_psnr@16", r["rollout"]["baseline_psnr@16"]),
    ):
        assert e1m1[key] == pytest.approx(overall, abs=1e-3), key
    assert r["rollout"]["curve"] != r["rollout"]["shuffled_curve"]  # the shuffled actions were used
    for f in r["files"].values():
        assert Path(f).is_file() and Path(f).stat().st_size > 1000
    assert Path(r["files"]["plot"]).parent == tmp_path / "eval_media"

    # The repeat-last-frame baselines, straight from the dataset at the recorded window starts.
    ds = Dataset(doom)
    ids = [e.id for e in ds.episodes]
    win = np.stack([ds.read(ids.index(e), "frames", s, s + CONTEXT + 64) for e, s in r["window_starts"]])
    ref = lambda x, y: 10 * np.log10(1 / np.maximum(((x / 255.0 - y / 255.0) ** 2).mean((-3, -2, -1)), 1e-30))
    tf_base = np.minimum(ref(win[:, CONTEXT - 1 : -1].astype(float), win[:, CONTEXT:].astype(float)), PSNR_CAP_DB)
    assert r["teacher_forced"]["baseline_psnr"] == pytest.approx(tf_base.mean(), abs=1e-3)
    ro_base = np.minimum(
        ref(win[:, CONTEXT - 1 : CONTEXT].astype(float), win[:, CONTEXT:].astype(float)), PSNR_CAP_DB
    ).mean(0)
    np.testing.assert_allclose(r["rollout"]["baseline_curve"], ro_base, atol=1e-3)
    assert r["rollout"]["baseline_psnr@1"] == pytest.approx(ro_base[0], abs=1e-3)
    assert r["rollout"]["baseline_psnr@16"] == pytest.approx(ro_base[15], abs=1e-3)


def cut(src: Path, dst: Path, lengths: tuple[int, ...]) -> Path:
    """A dataset of the first ``lengths[i]`` recorded frames of episode i."""
    ds = Dataset(src)
    index = DatasetIndex(
        dst, resolution=SIZE, frame_skip=4, source={"cut_from": str(src)}, has_depth=True, has_pose=False
    )
    for e, n in enumerate(lengths):
        name = f"s{e:02d}"
        index.add(EpisodeInfo(id=name, length=n, shards=write_episode_shards(dst, name, ds.episode(e, 0, n))))
    return dst


def test_eval_short_episodes_record_effective_horizon(doom, tmp_path, monkeypatch):
    # 4 + 64 frames fit in no episode: the horizon shrinks to what fits (the longest episode),
    # and the named horizons beyond it are null rather than measured somewhere else.
    # The tokenizer here encodes RGB + depth, as `worldgen train tokenizer --depth` makes one.
    # Without ffmpeg (as on some GPU images) the plot is still written, the video skipped.
    short = cut(doom, tmp_path / "short", (14, 10))
    ckpt = make_ckpt(tmp_path / "ckpt", in_channels=4)
    # The module, not the function `evaluate` that the package exports under the same name.
    monkeypatch.setattr(importlib.import_module("worldgen.evaluation.evaluate"), "has_ffmpeg", lambda: False)
    logs: list[str] = []
    r = evaluate(
        ckpt, short, EvalConfig(windows=3, batch=64, split="all"), device="cpu", media=tmp_path / "m", log=logs.append
    )
    assert "no video" in logs[0] and r["files"] == {"plot": str(tmp_path / "m" / "psnr_vs_horizon.png"), "video": None}
    assert (tmp_path / "m" / "psnr_vs_horizon.png").is_file() and not (
        tmp_path / "m" / "real_vs_generated.mp4"
    ).exists()
    # The longest horizon with two windows (shuffling needs two): 4 + 9 frames fit twice in 14.
    assert r["context"] == CONTEXT and r["horizon"] == 9 and r["windows"] == 2
    assert r["window_starts"] == [["s00", 0], ["s00", 1]]
    assert r["rollout"]["psnr@1"] is not None and r["rollout"]["psnr@16"] is None
    assert r["rollout"]["psnr@64"] is None and r["controllability"]["delta_db"] is None
    assert len(r["rollout"]["curve"]) == 9


def test_eval_errors_name_the_problem(doom, ckpt, tmp_path, capsys):
    one = cut(doom, tmp_path / "one", (40,))
    assert Dataset(one).split()[1] == []  # a lone episode whose id hashes to the training side
    rc = main(["eval", "--checkpoint", str(ckpt), "--data", str(one), "--json", str(tmp_path / "x.json")])
    assert rc == 2 and "no held-out episodes" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(EvaluationError, match="--context must lie in"):
        evaluate(ckpt, doom, EvalConfig(context=TINY.max_frames, split="all"), device="cpu")
    tiny = cut(doom, tmp_path / "tiny", (5, 4))
    with pytest.raises(EvaluationError, match=r"longest 5 frames\) hold fewer than 2 windows"):
        evaluate(ckpt, tiny, EvalConfig(split="all"), device="cpu")


def test_eval_context_is_whole_blocks(ckpt):
    """A session's cache holds whole blocks, so eval's context must be a multiple of them."""
    from worldgen.evaluation.evaluate import _sampler_settings

    chunked = dataclasses.replace(TINY, frames_per_block=2)
    with pytest.raises(EvaluationError, match="--context must be a multiple of the model's 2-frame blocks"):
        _sampler_settings(Path(ckpt), EvalConfig(context=5), chunked)
    assert _sampler_settings(Path(ckpt), EvalConfig(context=4), chunked)[0] == 4
