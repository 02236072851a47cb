"""The geometry head (depth and odometry for the env's depth and pose observations), trained by
`worldgen train geometry` on the tiny real ViZDoom recording of conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worldgen.checkpoint import CheckpointError
from worldgen.data import Dataset, DatasetIndex, EpisodeInfo, write_episode_shards
from worldgen.env.learned.geometry import (
    MOTION_FIELDS,
    find_head,
    integrate,
    load_head,
    motion_between,
    predict_depth,
    predict_motion,
    wrap_degrees,
)
from worldgen.env.learned.geometry_train import GeometryTrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_motion_and_integration_invert_each_other_on_recorded_poses(doom_recording):
    ds = Dataset(doom_recording)
    for e in range(len(ds)):
        pose = ds.read(e, "pose").astype(np.float64)
        motion = motion_between(pose[:-1], pose[1:])
        back = integrate(pose[:-1], motion)
        np.testing.assert_allclose(back[:, [0, 1, 2, 4]], pose[1:, [0, 1, 2, 4]], atol=1e-6)
        np.testing.assert_allclose(wrap_degrees(back[:, 3] - pose[1:, 3]), 0.0, atol=1e-6)
        # The recording walks forward: mostly along the camera's own axis, not sideways.
        walking = ds.read(e, "keys")[:-1, 0] == 1
        assert motion[walking, 0].mean() > 3 * np.abs(motion[walking, 1]).mean()


def test_head_learns_depth_and_odometry_from_a_real_recording(tiny_geometry_run, doom_recording):
    out, summary = tiny_geometry_run
    log = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert log[-1]["loss"] < log[0]["loss"] / 2, [e["loss"] for e in log]
    depth, motion = summary["heldout_depth"], summary["heldout_motion"]
    # Held-out episode "c": better than its train frames' mean depth map, and than standing still
    # where the action says it all (turning by key or mouse, walking forward).
    assert depth["mae_levels"] < depth["mean_map_mae_levels"], depth
    for field in ("forward", "yaw"):
        assert motion[field]["mae"] < 0.7 * motion[field]["zero_motion_mae"], motion
    drift = summary["heldout_drift"]
    assert drift["paths"] > 0 and drift["position_error"] < drift["displacement"], drift
    stored = json.loads((out / "ckpt" / "geometry.json").read_text())["config"]
    assert stored["metrics"]["heldout_depth"] == depth

    head, _ = load_head(out / "ckpt")
    ds = Dataset(doom_recording)
    frames = ds.read(2, "frames")[:6]
    d = predict_depth(head, frames)
    assert d.shape == frames.shape[:3] and d.dtype == np.uint8
    m = predict_motion(head, frames[:-1], ds.read(2, "keys")[:5], ds.read(2, "mouse")[:5], frames[1:])
    assert m.shape == (5, len(MOTION_FIELDS)) and np.isfinite(m).all()
    assert torch.all(head.motion_scale > 0)


def test_bad_data_and_missing_heads_are_clear_errors(doom_recording, tmp_path):
    ds = Dataset(doom_recording)
    no_pose = DatasetIndex(
        tmp_path / "nopose", resolution=ds.resolution, frame_skip=4, source={}, has_depth=True, has_pose=False
    )
    for e in range(len(ds)):
        ep = ds.episode(e)
        ep.pose = None
        no_pose.add(
            EpisodeInfo(
                id=ds.episodes[e].id,
                length=len(ep),
                shards=write_episode_shards(tmp_path / "nopose", ds.episodes[e].id, ep),
            )
        )
    with pytest.raises(ValueError, match="recorded pose, which this dataset does not have"):
        train(GeometryTrainConfig(data=str(tmp_path / "nopose"), out=str(tmp_path / "run"), steps=2, device="cpu"))
    with pytest.raises(CheckpointError, match="geometry head"):
        find_head("learned", tmp_path, "cpu")
    with pytest.raises(CheckpointError):
        load_head(tmp_path)
    with pytest.raises(TypeError, match="geometry must be"):
        find_head(3, None, "cpu")


def test_drift_benchmark_runs_on_the_tiny_model(tiny_checkpoint, tiny_geometry_run, doom_recording, tmp_path):
    """benchmarks/geometry_drift.py end to end: odometry over real and over generated frames."""
    from conftest import benchmark_script, finite

    bench = benchmark_script("geometry_drift")
    out = tmp_path / "drift.json"
    result = bench.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--geometry",
            str(tiny_geometry_run[0] / "ckpt"),
            "--data",
            str(doom_recording),
            "--paths",
            "3",
            "--steps",
            "4",
            "--context",
            "3",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert result["paths"] == 3 and finite(result) and json.loads(out.read_text())["mean"] == result["mean"]
    row = result["per_path"][0]
    assert set(row) == {
        "walked",
        "displacement",
        *(f"{a}_{b}_error" for a in ("real", "imagined") for b in ("position", "yaw", "height")),
    }
    assert all(r["walked"] >= r["displacement"] - 1e-6 for r in result["per_path"])
