"""Long-session stability (worldgen.evaluation.stability) and the sampler sweep that ranks by it,
on the tiny model and the tiny ViZDoom recording."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import benchmark_script, finite, reindexed  # tests/ is on sys.path under pytest

from worldgen import WorldModel, checkpoint
from worldgen.data import Dataset
from worldgen.evaluation import EvaluationError
from worldgen.evaluation.stability import in_range, judge, stability

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sessions_start_play_and_are_judged_on_the_given_episodes_only(tiny_checkpoint, doom_recording):
    ds = Dataset(doom_recording)
    wm = WorldModel.load(tiny_checkpoint, "cpu")
    r = stability(wm, ds, frames=25, sessions=2, context=3, episodes=[2], segment=10)
    assert r["real_frames"] == ds.episodes[2].length
    assert {e for e, _ in r["starts"]} == {ds.episodes[2].id} and r["starts"][0] != r["starts"][1]
    assert [len(s) for s in r["series"]["std"]] == [25, 25] and len(r["segments"]) == 3
    assert 0 <= r["outside_minmax"] <= r["outside_percentiles"] <= 1
    # Of 30 real frames only the lowest and the highest lie beyond p0.5 / p99.5, for mean or std.
    assert 0 < r["real_outside_percentiles"] <= 4 / 30
    assert np.mean(r["session_outside_percentiles"]) == pytest.approx(r["outside_percentiles"], abs=1e-4)
    assert np.mean(r["session_outside_minmax"]) == pytest.approx(r["outside_minmax"], abs=1e-4)
    assert r["start_episode_outside_percentiles"] == [r["real_outside_percentiles"]] * 2  # the one episode given
    assert in_range(r) == (
        r["outside_minmax"] <= 4 / 31 and max(r["session_outside_percentiles"]) <= 2 * r["real_outside_percentiles"]
    )
    assert finite(r)


def test_sessions_do_not_follow_the_index_order(tiny_checkpoint, doom_recording, tmp_path):
    """The same play indexed in another episode order gives the same sessions and frames."""
    wm = WorldModel.load(tiny_checkpoint, "cpu")
    a, b = (
        stability(wm, Dataset(d), frames=6, sessions=3, context=3, segment=6)
        for d in (doom_recording, reindexed(doom_recording, tmp_path))
    )
    assert a["starts"] == b["starts"] and a["series"] == b["series"]


def test_a_session_of_a_run_replays_alone_from_its_start(tiny_checkpoint, doom_recording):
    """--starts with --seed: one session of an earlier run again, without the others."""
    wm, ds = WorldModel.load(tiny_checkpoint, "cpu"), Dataset(doom_recording)
    run = stability(wm, ds, frames=6, sessions=3, context=3, segment=6)
    alone = stability(wm, ds, frames=6, context=3, seed=2, segment=6, starts=[tuple(run["starts"][2])])
    assert alone["starts"] == run["starts"][2:] and alone["sessions"] == 1
    for stat in ("mean", "std"):  # batched and alone agree within float rounding of uint8 frames
        np.testing.assert_allclose(alone["series"][stat][0], run["series"][stat][2], atol=0.5)
    with pytest.raises(EvaluationError, match="which the given episodes do not hold"):
        stability(wm, ds, frames=2, context=3, episodes=[2], starts=[(ds.episodes[0].id, 0)])


def test_sweep_ranks_settings_by_long_sessions_too_and_stores_the_best(tiny_checkpoint, doom_recording, tmp_path):
    sweep = benchmark_script("sampler_sweep")
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    result = sweep.main(
        [
            "--checkpoint",
            str(ckpt),
            "--data",
            str(doom_recording),
            "--steps",
            "1",
            "3",
            "--ctx-noise",
            "0.05",
            "--sinks",
            "0",
            "1",
            "--windows",
            "2",
            "--horizon",
            "2",
            "--stability-frames",
            "12",
            "--stability-sessions",
            "2",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "s.json"),
            "--apply",
            "--play-windows",
            "0",
        ]
    )  # this recording cannot be replayed: tests/test_play_suite.py
    rows, best = result["rows"], result["best"]
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(json.dumps(result))
    assert [(r["steps"], r["sinks"]) for r in rows] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert rows[0]["tf_psnr"] == rows[1]["tf_psnr"]  # one eval per sampler setting
    for r in rows:
        assert isinstance(r["in_range"], bool) and 0 <= r["outside_minmax"] <= r["outside_band"] <= 1
        assert r["std_mean"] > 0 and r["stability_seconds"] > 0
    if any(r["in_range"] for r in rows):
        assert best["in_range"]
    stored = checkpoint.config(ckpt, "dynamics")["sampler"]
    assert (stored["steps"], stored["ctx_noise"], stored["sinks"]) == (best["steps"], best["ctx_noise"], best["sinks"])
    wm = WorldModel.load(ckpt, "cpu")
    assert (wm.stream.steps, wm.stream.sinks) == (best["steps"], best["sinks"])
    for sinks in (0, 1):  # the window keeps what the sinks leave of the trained window
        stream = WorldModel.load(ckpt, "cpu", sinks=sinks).stream
        assert stream.sinks + stream.window + 1 == wm.trained_window


def test_each_session_is_compared_with_the_real_play_of_its_start_episode():
    # Real frames: a 4-frame episode, half of it flat (std 5), and a 996-frame one spanning std
    # 10-100. The band's low end sits above 5: half the first episode falls below it.
    real = {"mean": np.full(1000, 80.0), "std": np.r_[5.0, 5.0, 50.0, 50.0, np.linspace(10, 100, 996)]}
    series = {"mean": [[80.0] * 4, [80.0] * 4], "std": [[5.0, 5.0, 50.0, 50.0], [50.0] * 4]}
    v = judge(series, real, segment=4, start_episodes=[slice(0, 4), slice(4, 1000)])
    assert v["session_outside_percentiles"] == [0.5, 0.0]
    assert v["start_episode_outside_percentiles"][0] == 0.5
    assert v["start_episode_outside_percentiles"][1] < 0.02
    assert "start_episode_outside_percentiles" not in judge(series, real, segment=4)


def test_choosing_puts_staying_in_range_before_psnr():
    sweep = benchmark_script("sampler_sweep")
    good = {"tf_gain_db": 2.1, "rollout_psnr": 16.0, "rollout_baseline": 15.0, "control_db": 0.1, "score": 36.0}
    flat = {**good, "in_range": False, "control_db": 0.5, "score": 37.0}
    sharp = {**good, "in_range": True, "tf_gain_db": 1.3, "score": 35.0}
    assert sweep.choose([flat, sharp], 2.0) is sharp  # flat clears the bars, but leaves the range
    assert sweep.choose([flat, {**flat, "score": 30.0}], 2.0) is flat  # none in range: all ranked as before
    assert sweep.choose([good, {**good, "control_db": 0.3}], 2.0)["control_db"] == 0.3  # no check run: as before
    sink, no_sink = {**sharp, "worst_session_band": 0.02}, {**sharp, "worst_session_band": 0.005}
    assert sweep.choose([sink, no_sink], 2.0) is no_sink  # same PSNR: the long sessions' margin decides
