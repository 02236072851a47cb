"""benchmarks/control_by_turn.py on a real ViZDoom recording: the camera turn it reads off the
pose is the turn the actions made, and windows are grouped by it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script, cycle_player

from worldgen.data import DatasetIndex, EpisodeInfo, write_episode_shards

CONTEXT = 4


@pytest.fixture(scope="module")
def script():
    return benchmark_script("control_by_turn")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """Two episodes of E1M1: one walks straight ahead, one turns 6 degrees left by mouse a step."""
    from worldgen.env.sources.doom import DoomConfig, DoomEnv, rollout

    root = tmp_path_factory.mktemp("turns")
    cwd = os.getcwd()
    os.chdir(root)  # ViZDoom writes _vizdoom.ini into the working directory
    try:
        index = DatasetIndex(
            root / "data", resolution=(160, 120), frame_skip=4, source={"env": "doom"}, has_depth=True, has_pose=True
        )
        with DoomEnv(DoomConfig()) as env:
            for seed, (name, cycle) in enumerate((("walk", [([], 0.0)]), ("turn", [([], -6.0)]))):
                ep = next(rollout(env, cycle_player(cycle), "E1M1", seed, 24))
                index.add(EpisodeInfo(id=name, length=len(ep), shards=write_episode_shards(root / "data", name, ep)))
    finally:
        os.chdir(cwd)
    return root / "data"


def test_turns_come_from_the_pose_and_windows_group_by_them(script, recording, tmp_path, capsys):
    from worldgen.data import Dataset

    # An eval result as `worldgen eval` writes it, with per-window PSNRs made up for the grouping.
    result = {
        "checkpoint": "m",
        "data": str(recording),
        "context": CONTEXT,
        "sampler": {"steps": 2},
        "window_starts": [["walk", 0], ["turn", 0], ["turn", 2]],
        "controllability": {
            "windows_real": [20.0, 15.0, 16.0],
            "windows_shuffled": [17.0, 15.0, 15.5],
            "shuffled_from": [1, 2, 0],
        },
    }
    turns = script.net_turns(result, Dataset(recording))
    # Mouse yaw -6 per step turns left, raising Doom's ANGLE: 16 steps, 96 degrees.
    np.testing.assert_allclose(turns, [0.0, 96.0, 96.0], atol=1.0)
    np.testing.assert_allclose(script.wrap([190.0, -190.0, 90.0]), [-170.0, 170.0, 90.0])

    path = tmp_path / "eval.json"
    path.write_text(json.dumps(result))
    script.main(["--eval", str(path)])
    out = capsys.readouterr().out
    assert "| 0-30 | 1 | 20.00 | 17.00 | +3.00 |" in out  # the straight walk
    assert "| 90-180 | 2 | 15.50 | 15.25 | +0.25 |" in out  # the two turning windows
    assert "| all | 3 | 17.00 | 15.83 | +1.17 |" in out
    # Apart: the walk got a turning window's actions (96 deg), window 1 window 2's (the same turn).
    assert "| 0-30 | 1 | 15.00 | 15.00 | +0.00 |" in out and "| 90-180 | 2 | 18.00 | 16.25 | +1.75 |" in out

    del result["controllability"]["windows_real"]
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="no per-window PSNRs"):
        script.main(["--eval", str(path)])
