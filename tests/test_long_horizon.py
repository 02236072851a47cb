"""benchmarks/long_horizon.py end to end on the tiny model (trained window 6) and the tiny recording."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script, finite  # tests/ is on sys.path under pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return benchmark_script("long_horizon")


def test_smoke_run_writes_json_and_plot(bench, tiny_checkpoint, doom_recording, tmp_path):
    out, plot = tmp_path / "lh.json", tmp_path / "lh.png"
    result = bench.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(doom_recording),
            "--device",
            "cpu",
            "--frames",
            "30",
            "--sessions",
            "2",
            "--segment",
            "10",
            "--settings",
            "4,1,0.1",
            "2,0,0.0",
            "--horizons",
            "2",
            "4",
            "--windows",
            "3",
            "--context",
            "3",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(result))
    assert plot.stat().st_size > 0
    assert finite(stored)

    st = stored["stability"]
    assert (st["sessions"], st["frames"], st["real_frames"]) == (2, 30, 110)  # 40 + 40 + 30 recorded frames
    assert len(st["starts"]) == 2 and st["starts"][0] != st["starts"][1]
    assert [len(s) for s in st["series"]["mean"]] == [30, 30]
    assert [s["frames"] for s in st["segments"]] == [[1, 10], [11, 20], [21, 30]]
    for stat in ("mean", "std"):
        real, gen = st["real"][stat], st["generated"][stat]
        assert real["min"] <= real["p0.5"] <= real["p99.5"] <= real["max"]
        assert 0 <= gen["outside_minmax"] <= gen["outside_percentiles"] <= 1
    assert st["frames_per_s"] > 0

    assert [r["setting"] for r in stored["settings"]] == ["4,1,0.1", "2,0,0"]
    assert stored["best"] in ("4,1,0.1", "2,0,0")
    assert stored["windows"] == 3 and len(stored["window_starts"]) == 3
    for scores in [r["psnr"] for r in stored["settings"]] + [stored["baseline"]]:
        assert set(scores) == {"2", "4"} and all(0 < v <= 59 for v in scores.values())
    assert stored["defaults"] == st["setting"] == "5,0,0.05" and stored["trained_window"] == 6
    assert stored["torch"] and stored["device_name"]


def test_setting_beyond_the_trained_window_is_a_clear_error(bench, tiny_checkpoint, doom_recording, capsys):
    with pytest.raises(SystemExit):
        bench.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(doom_recording),
                "--device",
                "cpu",
                "--frames",
                "2",
                "--settings",
                "4,1,0.1",
                "5,1,0.1",
                "--horizons",
                "2",
            ]
        )
    err = capsys.readouterr().err
    assert "setting 5,1,0.1" in err and "exceed the 6 frames" in err


def test_horizon_longer_than_every_episode_is_a_clear_error(bench, tiny_checkpoint, doom_recording, capsys):
    with pytest.raises(SystemExit):
        bench.main(
            [
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(doom_recording),
                "--device",
                "cpu",
                "--frames",
                "2",
                "--settings",
                "4,1,0.1",
                "--horizons",
                "64",
            ]
        )
    assert "no episode holds a context of 8 + 64 frames" in capsys.readouterr().err


def test_setting_syntax(bench):
    assert bench.parse_setting("14,1,0.1") == bench.Setting(14, 1, 0.1)
    with pytest.raises(Exception, match="window,sinks,ctx_noise"):
        bench.parse_setting("14,1")


def test_start_syntax(bench):
    assert bench.parse_start("s1000-w15-e0000:992") == ("s1000-w15-e0000", 992)
    with pytest.raises(Exception, match="EPISODE_ID:FRAME"):
        bench.parse_start("s1000-w15-e0000")
