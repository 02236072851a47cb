"""The play suite (worldgen.evaluation.play, worldgen.env.sources.play_suite) on a tiny real ViZDoom
recording: the game's branches, a model that is given the game's frames scores the game's
ceiling, the held last frame scores chance, and the whole command runs on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conftest import SIZE, finite

from worldgen.actions import Action
from worldgen.cli import main
from worldgen.evaluation.metrics import PSNR_CAP_DB
from worldgen.evaluation.play import BRANCHES, HoldLast, PlayConfig, PlayScript, evaluate_play, load_recording

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = PlayScript(horizon=8, yaw_step=45.0, walks=(2,))  # short cases: seconds on a CPU


@pytest.fixture(scope="module")
def play_recording(tmp_path_factory):
    """Real play that ViZDoom can replay: 3 episodes of 40 steps on E1M1 at 160x120."""
    from worldgen.env.sources.record import record_doom

    out = tmp_path_factory.mktemp("play") / "doom"
    record_doom(out, 120, workers=2, episode_steps=40, maps=["E1M1"], seed=5, progress=False)
    return out


@pytest.fixture(scope="module")
def branches(play_recording, tmp_path_factory):
    from worldgen.env.sources.play_suite import record_branches

    out = tmp_path_factory.mktemp("branches") / "b"
    summary = record_branches(
        play_recording, out, windows=3, context=5, script=SCRIPT, workers=2, size=SIZE, progress=False
    )
    return out, summary


class Oracle:
    """A "model" that is given the true future: the game's own frames for each case."""

    def __init__(self, rec):
        self.rec = rec

    def play(self, context, context_keys, context_mouse, keys, mouse, seeds, progress=None, **geometry):
        name = next(
            n
            for n in self.rec.cases
            if np.array_equal(self.rec.keys[n], keys) and np.array_equal(self.rec.mouse[n], mouse)
        )
        return self.rec.frames[name]


def test_branch_recording_holds_the_games_answers(branches, play_recording):
    out, summary = branches
    rec = load_recording(out)
    assert summary["replay_matched"] == 1.0 and rec.matched == 1.0  # ViZDoom replays exactly
    assert summary["deterministic"] == 1.0 and rec.deterministic == 1.0
    assert list(rec.cases) == [*BRANCHES, "turn360", "out_back_2"]
    assert rec.context.shape == (3, 5, SIZE[1], SIZE[0], 3) and rec.frames["forward"].shape[:2] == (3, 8)
    # Windows in episode-id order; the context is the recording's own play.
    assert [s[0] for s in rec.starts] == sorted(s[0] for s in rec.starts)
    # The game answers the keys: walking forward moves the camera, noop barely, the yaw turns it.
    moved = lambda case: np.linalg.norm(rec.pose[case][:, -1, :2] - rec.context_pose[:, -1, :2], axis=1)
    assert (moved("forward") > 50).all() or (moved("forward") > moved("noop") + 20).all()
    turned = (rec.pose["yaw_right"][:, 0, 3] - rec.context_pose[:, -1, 3] + 180) % 360 - 180
    np.testing.assert_allclose(turned, -45.0, atol=1.0)  # yaw > 0 turns right: Doom's angle drops
    # Back where it started after the 360-degree turn.
    back = (rec.pose["turn360"][:, -1, 3] - rec.context_pose[:, -1, 3] + 180) % 360 - 180
    np.testing.assert_allclose(back, 0.0, atol=1.0)


def test_oracle_scores_the_ceiling_and_hold_last_scores_chance(branches):
    rec = load_recording(branches[0])
    cfg = PlayConfig(progress=False)
    oracle = evaluate_play(rec, Oracle(rec), cfg=cfg, device="cpu")
    br = oracle["branches"]
    assert br["model"] == br["game"]
    for h in oracle["horizons"]:
        assert br["model"]["mean"][f"psnr@{h}"] == pytest.approx(PSNR_CAP_DB, abs=1e-3)
        assert br["model"]["mean"][f"ssim@{h}"] == pytest.approx(1.0, abs=1e-4)
        assert br["model"]["mean"][f"accuracy@{h}"] in (1.0, None)
        assert br["model"]["mean"][f"gap_db@{h}"] > 3  # the game's branches differ
    assert br["told_apart@8"] > 0.3 and br["chance@8"] < 1.0
    # One map, so its numbers are the overall ones.
    assert rec.maps == ["E1M1"] * 3 and list(oracle["per_map"]) == ["E1M1"]
    e1m1 = oracle["per_map"]["E1M1"]
    assert e1m1["windows"] == 3 and set(e1m1) == {"windows", "model", "hold_last", "game"}
    for key in ("psnr@1", "psnr@8", "accuracy@4", "gap_db@8"):
        assert e1m1["model"][key] == pytest.approx(br["model"]["mean"][key], abs=1e-3), key
    for p in ("model", "game"):
        want = oracle["revisits"]["turn360"][p]["psnr_vs_departure"]
        assert e1m1[p]["turn360_vs_departure"] == pytest.approx(want, abs=1e-3)

    held = evaluate_play(rec, HoldLast(), cfg=cfg, device="cpu")
    br = held["branches"]
    assert br["model"] == br["hold_last"]
    for h in held["horizons"]:
        assert br["model"]["mean"][f"gap_db@{h}"] == pytest.approx(0.0, abs=1e-3)
        if br[f"chance@{h}"] is not None:
            assert br["model"]["mean"][f"accuracy@{h}"] == pytest.approx(br[f"chance@{h}"], abs=1e-3)
    r = held["revisits"]["turn360"]
    assert r["model"]["psnr_vs_departure"] == pytest.approx(PSNR_CAP_DB, abs=1e-3)  # why vs_game is there too
    assert r["model"]["psnr_vs_game"] == r["hold_last"]["psnr_vs_game"]


def test_play_command_end_to_end(play_recording, tiny_checkpoint, tiny_geometry_run, tmp_path, capsys):
    args = [
        "eval",
        "--suite",
        "play",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(play_recording),
        "--split",
        "all",
        "--windows",
        "2",
        "--horizon",
        "4",
        "--yaw-step",
        "30",
        "--walks",
        "4",
        "8",
        "--json",
        str(tmp_path / "play.json"),
        "--geometry",
        str(tiny_geometry_run[0] / "ckpt"),
        "--workers",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    r = json.loads((tmp_path / "play.json").read_text())
    assert finite(r) and r["suite"] == "play" and r["windows"] == 2 and r["horizons"] == [1, 4]
    assert r["context"] == 5 and r["replay_matched"] == 1.0 and r["game_deterministic"] == 1.0
    assert set(r["revisits"]) == {"turn360", "out_back_4", "out_back_8"} and r["yaw_step_deg"] == 30
    cam = r["camera"]
    assert cam["model"]["all"]["yaw_err_deg"] >= 0 and "forward" in cam["game"] and "geometry" in cam["odometry"]
    # Turns are read off the frames, not the actions: the held frame never turns.
    assert (
        cam["hold_last"]["turn360"]["yaw_sign_agreement"] == 0.0 and cam["game"]["turn360"]["yaw_sign_agreement"] > 0.5
    )
    assert (tmp_path / "play_media" / "play_dashboard.png").stat().st_size > 10_000
    assert (tmp_path / "play_media" / "play.mp4").stat().st_size > 1_000
    assert "play suite" in capsys.readouterr().out
    # A second run reuses the branch recording made from the same play.
    assert main(args + ["--no-media", "--geometry", "none"]) == 0
    assert "reusing the branch recording" in capsys.readouterr().out


def replayable(recording, tmp_path):
    """The tiny recording (the tiny model's own 32x24 play) told how to replay it: conftest
    played each episode on E1M1 with seed = its number and the default game settings."""
    from worldgen.env.sources.doom import DoomConfig

    shutil.copytree(recording, tmp_path / "replayable")
    index = json.loads((tmp_path / "replayable" / "index.json").read_text())
    index["source"] = {"env": "doom", "doom": DoomConfig().to_dict()}
    for seed, e in enumerate(index["episodes"]):
        e.update(map="E1M1", seed=seed)
    (tmp_path / "replayable" / "index.json").write_text(json.dumps(index))
    return tmp_path / "replayable"


def test_sampler_sweep_scores_settings_with_the_play_suite(doom_recording, tiny_checkpoint, tmp_path):
    from conftest import benchmark_script

    from worldgen.env.sources.play_suite import record_branches

    data = replayable(doom_recording, tmp_path)
    # Made here with a short script (the sweep makes the default one when --branches is missing).
    record_branches(data, tmp_path / "sweep_branches", windows=2, context=5, script=SCRIPT, workers=2, progress=False)
    sweep = benchmark_script("sampler_sweep")
    result = sweep.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(data),
            "--split",
            "all",
            "--steps",
            "1",
            "--ctx-noise",
            "0.0",
            "--windows",
            "2",
            "--horizon",
            "2",
            "--stability-frames",
            "0",
            "--play-windows",
            "2",
            "--workers",
            "2",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "sweep.json"),
        ]
    )
    row = result["rows"][0]
    # Replays of the downscaled recording match it at its own resolution.
    assert load_recording(tmp_path / "sweep_branches").matched == 1.0
    assert row["play_horizon"] == 8 and row["play_accuracy"] is not None and row["play_chance"] < 1
    assert (tmp_path / "sweep_branches" / "index.json").is_file()
    # The play suite's gap, not eval's real-minus-shuffled PSNR, decides between useful settings.
    useful = {"tf_gain_db": 3.0, "rollout_psnr": 16.0, "rollout_baseline": 15.0, "score": 36.0}
    follows = {**useful, "control_db": -0.2, "play_gap_db": 2.0}
    assert sweep.choose([{**useful, "control_db": 0.5, "play_gap_db": 0.1}, follows], 2.0) is follows


def test_play_command_names_bad_input(doom_recording, tiny_checkpoint, tmp_path, capsys):
    base = ["eval", "--suite", "play", "--checkpoint", str(tiny_checkpoint), "--json", str(tmp_path / "p.json")]
    # The tiny recording does not say how to replay it in ViZDoom.
    assert main(base + ["--data", str(doom_recording), "--split", "all"]) == 2
    assert "worldgen record --env doom" in capsys.readouterr().err
    assert main(base + ["--data", str(doom_recording), "--context", "3"]) == 2
    assert "--context: not used by the play suite" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_play_suite_plays_a_world_cache_model(branches, cache_model):
    """Branch recordings keep depth (the game's, at the recording's size), and a world-cache
    model's sessions start from the context's depth and poses; without depth, a clear error."""
    from worldgen.data import Dataset
    from worldgen.engine import WorldModel
    from worldgen.evaluation import EvaluationError
    from worldgen.evaluation.play import EnginePlayer

    rec = load_recording(branches[0])
    assert rec.context_depth.shape == (3, 5, SIZE[1], SIZE[0]) and rec.context_depth.dtype == np.uint8
    ds = Dataset(branches[0])
    forward = ds.episode_index("w000-forward")
    assert ds.read(forward, "depth").shape == (9, SIZE[1], SIZE[0])  # the departure, then the game's 8
    np.testing.assert_array_equal(ds.read(forward, "depth")[0], rec.context_depth[0, -1])

    wm = WorldModel.load(cache_model, device="cpu", steps=1)
    cfg = PlayConfig(progress=False, video_windows=0)
    r = evaluate_play(rec, EnginePlayer(wm, batch=2), cfg=cfg, device="cpu")
    assert finite(r) and r["windows"] == 3 and r["branches"]["model"]["mean"]["psnr@8"] > 0
    # Window 0's forward branch is what a session started on its RGB-D context plays.
    acts = [Action(k, m) for k, m in zip(rec.context_keys[0], rec.context_mouse[0])]
    s = wm.session(rec.context[0], acts, seed=0, context_depth=rec.context_depth[0], context_poses=rec.context_pose[0])
    played = np.stack([s.step(Action(k, m)) for k, m in zip(rec.keys["forward"], rec.mouse["forward"])])
    made = EnginePlayer(wm).play(
        rec.context[:1],
        rec.context_keys[:1],
        rec.context_mouse[:1],
        rec.keys["forward"],
        rec.mouse["forward"],
        [0],
        context_depth=rec.context_depth[:1],
        context_pose=rec.context_pose[:1],
    )
    np.testing.assert_array_equal(made[0], played)
    with pytest.raises(EvaluationError, match="has no depth"):
        evaluate_play(dataclasses.replace(rec, context_depth=None), EnginePlayer(wm), cfg=cfg, device="cpu")
    assert (
        evaluate_play(dataclasses.replace(rec, context_depth=None), HoldLast(), cfg=cfg, device="cpu")["windows"] == 3
    )
