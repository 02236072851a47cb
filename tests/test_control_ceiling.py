"""benchmarks/control_ceiling.py on a real ViZDoom recording: the replay reaches each window's
last context frame exactly, its own actions replay the recorded future bit for bit, and another
window's actions give another future."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_script

from worldgen.env.sources import record as rec
from worldgen.evaluation.metrics import PSNR_CAP_DB

CONTEXT, HORIZON = 4, 8


@pytest.fixture(scope="module")
def script():
    return benchmark_script("control_ceiling")


def test_replayed_futures(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ViZDoom writes _vizdoom.ini into the working directory
    data = tmp_path / "play"
    rec.record_doom(data, 90, workers=1, episode_steps=90, maps=["E1M1"], seed=4, progress=False)
    from worldgen.data import Dataset

    episode = Dataset(data).episodes[0]
    assert episode.length == 90, "the explorer should live 90 steps on E1M1 at skill 2"

    def run(shuffled_from):
        # The fields of a `worldgen eval` result the script reads; the model's curve is made up.
        result = {
            "checkpoint": "m",
            "context": CONTEXT,
            "horizon": HORIZON,
            "window_starts": [[episode.id, 0], [episode.id, 30], [episode.id, 60]],
            "rollout": {"curve": [20.0] * HORIZON, "shuffled_curve": [19.0] * HORIZON},
            "controllability": {"shuffled_from": shuffled_from},
        }
        path = tmp_path / "eval.json"
        path.write_text(json.dumps(result))
        out = script.main(["--eval", str(path), "--data", str(data), "--horizons", "1", str(HORIZON), "--workers", "1"])
        assert out["replay_matched"] == 3
        return {(r["horizon"], r["predictor"]): r for r in out["rows"]}

    own = run([0, 1, 2])  # each window its own actions: the replay is the recording
    game = own[(HORIZON, "game")]
    assert game["real"] == game["shuffled"] == pytest.approx(PSNR_CAP_DB)
    blurred = [own[(HORIZON, f"game at 1/{k}")]["real"] for k in script.FACTORS]
    assert blurred == sorted(blurred, reverse=True) and blurred[-1] < 30  # less detail, lower PSNR

    other = run([1, 2, 0])
    game = other[(HORIZON, "game")]
    assert game["shuffled"] < 40 and game["delta_db"] > 10
    assert other[(HORIZON, "model (eval.json)")]["delta_db"] == pytest.approx(1.0)
    assert other[(1, "last context frame")]["delta_db"] == 0

    from worldgen.env.sources.doom import DoomError

    with pytest.raises(DoomError, match="a frame in"):
        rec.branch(f"{data}::{episode.id}", 90, np.zeros((1, 8), np.uint8), np.zeros((1, 2), np.float32))
    with pytest.raises(SystemExit, match="horizons must lie"):
        script.main(["--eval", str(tmp_path / "eval.json"), "--data", str(data), "--horizons", "9"])
