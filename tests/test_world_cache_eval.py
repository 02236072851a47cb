"""`worldgen eval` of a world-cache model (conftest.cache_model) on the tiny real recording:
teacher-forced frames see their views as training builds them, rollouts keep clouds as sessions
do (tests/test_engine.py checks them frame for frame against a session), the generated depth is
scored, and a recording without depth or poses is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import finite

from worldgen import sampling
from worldgen.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_scores_a_world_cache_model(cache_model, doom_recording, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", str(cache_model), "--data", str(doom_recording), "--json", str(out)]
    opts = ["--split", "all", "--windows", "2", "--horizon", "4", "--steps", "1", "--device", "cpu", "--no-media"]
    assert main(args + opts) == 0
    r = json.loads(out.read_text())
    assert finite(r) and r["context"] == 3 and r["horizon"] == 4
    assert r["teacher_forced"]["frames"] == 8 and r["teacher_forced"]["psnr"] > 0
    assert all(v is not None for v in r["rollout"]["curve"]) and r["controllability"]["delta_db"] is None
    wc = r["world_cache"]
    assert {k: wc[k] for k in ("history", "max_points", "rollout_pose")} == {
        "history": 2,
        "max_points": 65536,
        "rollout_pose": "corrected",
    }
    # The cameras of the rollouts against the recorded ones: drift after 1 step, per-step error.
    assert set(wc["pose"]) == {"@1", "per_step"} and wc["pose"]["@1"]["position"] >= 0
    assert wc["pose"]["per_step"]["position"] > 0  # a motion model is never exact on real play
    depth = r["depth"]  # in uint8 depth levels
    assert 0 <= depth["teacher_forced_mae"] < 255 and len(depth["rollout_curve"]) == 4
    assert depth["rollout_mae@1"] == depth["rollout_curve"][0] and depth["rollout_mae@16"] is None


def test_eval_without_pose_correction_keeps_the_predicted_cameras(cache_model, doom_recording, tmp_path, capsys):
    """--no-pose-correction: the rollouts keep the predicted cameras (by default each is corrected
    from the frame made there); the plain suite only (the play suite names the option as not its own)."""
    runs = {}
    for flag in ([], ["--no-pose-correction"]):
        out = tmp_path / f"eval{len(flag)}.json"
        args = ["eval", "--checkpoint", str(cache_model), "--data", str(doom_recording), "--json", str(out)]
        opts = ["--split", "all", "--windows", "2", "--horizon", "4", "--steps", "1", "--device", "cpu", "--no-media"]
        assert main(args + opts + flag) == 0
        runs[len(flag)] = json.loads(out.read_text())["world_cache"]
    assert runs[1]["rollout_pose"] == "predicted" and runs[1]["pose"] != runs[0]["pose"]
    args = ["eval", "--suite", "play", "--checkpoint", str(cache_model), "--data", str(doom_recording)]
    assert main(args + ["--json", str(tmp_path / "p.json"), "--no-pose-correction"]) == 2
    assert "--no-pose-correction is for the plain suite" in capsys.readouterr().err


def test_teacher_forced_views_are_trainings(cache_model, doom_recording):
    """Each frame of a window sees the cloud of its history predecessors in its episode (those
    before the window included) at its true pose: the training views without pose noise."""
    from worldgen.data import Dataset
    from worldgen.data.camera import dataset_camera
    from worldgen.evaluation.evaluate import _play_cache, _Runner, select_windows
    from worldgen.models import load_dit, load_tokenizer
    from worldgen.models.world_cache import episode_condition

    tok, dit = load_tokenizer(cache_model).eval(), load_dit(cache_model).eval()
    world = _play_cache(cache_model, dit.cfg)
    ds = Dataset(doom_recording)
    items = select_windows(ds, [0, 1], 6, 3, seed=1, fields=("depth", "pose"))
    assert any(it["start"] > 0 for it in items)  # a window with predecessors before it
    run = _Runner(tok, dit, sampling.SamplerConfig(), 3, 0, 2, torch.device("cpu"), world)
    views = run.teacher_views(ds, items)
    assert views.shape == (3, 6, dit.cfg.cond_channels, *dit.cfg.latent_size)
    for it, v in zip(items, views):
        e = it["episode"]
        episode = [torch.from_numpy(ds.read(e, f)) for f in ("frames", "depth", "pose")]
        want = episode_condition(tok, dataset_camera(ds), episode[0], episode[1].float(), episode[2], 2)
        torch.testing.assert_close(v, want[it["start"] : it["start"] + 6], atol=1e-5, rtol=1e-5)


def test_recording_without_depth_or_poses_is_a_clear_error(cache_model, doom_recording, tmp_path, capsys):
    data = tmp_path / "rgb_only"
    shutil.copytree(doom_recording, data)
    index = json.loads((data / "index.json").read_text())
    index.update(has_depth=False, pose=[])  # the arrays stay in the shards; the dataset no longer has them
    (data / "index.json").write_text(json.dumps(index))
    args = ["eval", "--checkpoint", str(cache_model), "--data", str(data), "--json", str(tmp_path / "e.json")]
    assert main(args + ["--split", "all", "--windows", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "plays with a world cache" in err and "no depth and no pose" in err
    assert not (tmp_path / "e.json").exists()
