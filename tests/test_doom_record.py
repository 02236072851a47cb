"""ViZDoom recorder: button mapping, determinism, replay, parallel recording, policies, coverage.

Everything runs the real game (ViZDoom ships with freedoom1.wad) at 160x120 for a few hundred
steps; the whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from worldgen import actions
from worldgen.cli import main as cli_main
from worldgen.data import Dataset, DatasetError
from worldgen.data.coverage import cells_visited, coverage, load_map_lines, plot_coverage
from worldgen.env.sources import record as rec
from worldgen.env.sources.doom import VARIABLE_NAMES, DoomConfig, DoomEnv, DoomError, check_maps, rollout
from worldgen.env.sources.policies import ExplorePolicy, FrontierMap, RandomPolicy, make_policy


def act(names=(), yaw=0.0, pitch=0.0):
    a = actions.Action.from_keys(names, yaw=yaw, pitch=pitch)
    return a.keys, a.mouse


def turned(before: float, after: float) -> float:
    """Change of the pose yaw in degrees, counter-clockwise positive, wrapped to +-180."""
    return (after - before + 180.0) % 360.0 - 180.0


@pytest.fixture(scope="module")
def env():
    e = DoomEnv(DoomConfig())
    yield e
    e.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A small dataset recorded by 2 worker processes; shared by several tests."""
    out = tmp_path_factory.mktemp("rec") / "doom"
    summary = rec.record_doom(out, 240, workers=2, episode_steps=100, maps=["E1M1", "E1M2"], seed=3, progress=False)
    return out, summary


# --- the action mapping, measured in the game ------------------------------------------------------
def test_mouse_and_keys_turn_as_the_schema_says(env):
    obs = env.reset("E1M1", seed=1)
    for _ in range(3):
        obs = env.step(*act())
    y0, p0 = float(obs.pose[3]), float(obs.pose[4])
    obs = env.step(*act(yaw=10.0))  # yaw > 0 turns right: Doom's angle falls
    assert turned(y0, float(obs.pose[3])) == pytest.approx(-10.0, abs=0.1)
    y0 = float(obs.pose[3])
    obs = env.step(*act(yaw=-2.5))
    assert turned(y0, float(obs.pose[3])) == pytest.approx(2.5, abs=0.1)
    obs = env.step(*act(pitch=5.0))  # pitch > 0 looks up, pose pitch > 0 is up
    assert float(obs.pose[4]) - p0 == pytest.approx(5.0, abs=0.1)
    obs = env.step(*act(pitch=-5.0))
    # Turn keys: Doom's keyboard turn accelerates (1.758 deg/tic for 5 tics, then 3.516).
    steps = []
    for _ in range(4):
        y0 = float(obs.pose[3])
        obs = env.step(*act(["turn_left"]))
        steps.append(turned(y0, float(obs.pose[3])))
    assert steps == pytest.approx([7.03, 12.30, 14.06, 14.06], abs=0.05)
    obs = env.step(*act())
    y0 = float(obs.pose[3])
    obs = env.step(*act(["turn_right"]))
    assert turned(y0, float(obs.pose[3])) == pytest.approx(-7.03, abs=0.05)


def test_observation_shapes_and_variables(env):
    obs = env.reset("E1M2", seed=2)
    assert obs.frame.shape == (120, 160, 3) and obs.frame.dtype == np.uint8
    assert obs.depth.shape == (120, 160) and obs.depth.dtype == np.uint8
    assert obs.pose.shape == (5,) and obs.variables.shape == (len(VARIABLE_NAMES),)
    v = dict(zip(VARIABLE_NAMES, obs.variables))
    assert v["health"] == 100 and v["dead"] == 0 and v["selected_weapon_ammo"] > 0


# --- determinism -----------------------------------------------------------------------------------
def test_same_seed_and_actions_give_identical_frames_in_two_games(env):
    rng = np.random.default_rng(0)
    keys = (rng.random((150, actions.NUM_KEYS)) < 0.3).astype(np.uint8)
    mouse = np.stack([rng.uniform(-15, 15, 150), np.zeros(150)], 1).astype(np.float32)

    def play(game):
        it = iter(zip(keys, mouse))
        return [c for c in rollout(game, lambda obs: next(it), "E1M2", 1234, len(keys), chunk_steps=64)]

    with DoomEnv(DoomConfig(), "E1M2") as other:
        a, b = play(env), play(other)
    assert len(a) == len(b) and sum(len(c) for c in a) == sum(len(c) for c in b) > 50
    for x, y in zip(a, b):
        for name in ("frames", "depth", "pose", "variables"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), name
    assert not np.array_equal(a[0].frames[0], a[-1].frames[-1])  # it moved: the test can fail


# --- recording -------------------------------------------------------------------------------------
def test_parallel_recording_makes_a_valid_dataset(recorded):
    out, summary = recorded
    ds = Dataset(out)
    ds.validate()
    assert summary["frames"] == ds.num_steps == 240 and summary["workers"] == 2
    assert ds.resolution == (160, 120) and ds.frame_skip == 4
    assert ds.variable_names == VARIABLE_NAMES and ds.fields == [
        "frames",
        "keys",
        "mouse",
        "depth",
        "pose",
        "variables",
    ]
    ids = [e.id for e in ds.episodes]
    assert len(set(ids)) == len(ids) and {i.split("-")[1] for i in ids} == {"w00", "w01"}
    for e in ds.episodes:  # seed derived from --seed, worker and episode; maps round-robin
        _, w, k = e.id.split("-")
        assert e.seed == rec.episode_seed(3, int(w[1:]), int(k[1:]))
        assert e.map == ["E1M1", "E1M2"][(int(k[1:]) * 2 + int(w[1:])) % 2]
        assert e.terminal == (e.extra["end"] != "steps") and e.length <= 100
    assert len({e.seed for e in ds.episodes}) == len(ds)
    ep = ds.episode(0)
    assert ep.pose.shape == (ep.frames.shape[0], 5) and np.abs(ep.mouse[:, 0]).max() > 1
    lines = load_map_lines(out, "E1M1")
    assert lines.shape[1] == 5 and len(lines) > 100 and 0 < lines[:, 4].mean() < 1
    assert summary["coverage"]["frames"] == 240 and summary["coverage"]["cells"] >= 5


def test_replay_of_a_recorded_episode_reproduces_it(recorded, tmp_path, capsys):
    out, _ = recorded
    ds = Dataset(out)
    i = max(range(len(ds)), key=lambda j: ds.episodes[j].length)
    eid = ds.episodes[i].id
    assert cli_main(["record", "--replay", f"{out}::{eid}", "--out", str(tmp_path / "re"), "--quiet"]) == 0
    assert "identical" in capsys.readouterr().out
    re = Dataset(tmp_path / "re")
    assert re.episodes[0].id == eid and re.episodes[0].seed == ds.episodes[i].seed
    for name in ("frames", "depth", "pose", "keys", "mouse"):
        assert np.array_equal(re.read(0, name), ds.read(i, name)), name


def test_replay_of_an_action_file_is_deterministic_and_obeys_the_actions(tmp_path):
    spec = {
        "map": "E1M1",
        "seed": 5,
        "resolution": "160x120",
        "frame_skip": 4,
        "actions": [{"keys": [], "mouse": [0, 0]}] * 3
        + [{"keys": ["forward"], "mouse": [10.0, 0.0]}] * 20
        + [{"keys": ["attack"]}],
    }
    path = tmp_path / "my actions.json"
    path.write_text(json.dumps(spec))
    a = rec.replay(path, tmp_path / "a", progress=False)
    b = rec.replay(path, tmp_path / "b", progress=False)
    assert a["frames"] == b["frames"] == 24 and a["identical"] is None
    da, db = Dataset(tmp_path / "a"), Dataset(tmp_path / "b")
    assert np.array_equal(da.read(0, "frames"), db.read(0, "frames"))
    pose = da.read(0, "pose")
    assert all(turned(pose[t, 3], pose[t + 1, 3]) == pytest.approx(-10.0, abs=0.1) for t in range(3, 22))
    assert np.linalg.norm(pose[-1, :2] - pose[3, :2]) > 100  # walked forward
    assert da.read(0, "keys")[-1].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


def test_failed_worker_leaves_a_valid_dataset_of_finished_episodes(tmp_path, monkeypatch):
    bad = rec.episode_seed(0, 1, 1)  # worker 1's second episode crashes after its first shard
    real = rec.rollout

    def flaky(env, act, map, seed, max_steps, chunk_steps):
        for i, chunk in enumerate(real(env, act, map, seed, max_steps, chunk_steps)):
            if seed == bad and i == 1:
                raise RuntimeError("simulated crash")
            yield chunk

    monkeypatch.setattr(rec, "rollout", flaky)  # workers are forked: they see the patch
    monkeypatch.setattr(rec, "SHARD_STEPS", 16)
    with pytest.raises(rec.RecordError, match="simulated crash"):
        rec.record_doom(tmp_path / "ds", 400, workers=2, episode_steps=40, maps=["E1M1"], progress=False)
    ds = Dataset(tmp_path / "ds")
    ds.validate()
    ids = [e.id for e in ds.episodes]
    assert "s0-w01-e0000" in ids and "s0-w01-e0001" not in ids
    assert any("s0-w01-e0001" in p.name for p in ds.stray_files())  # written, never listed


# --- errors name the problem -----------------------------------------------------------------------
def test_bad_settings_are_clear_errors(tmp_path, recorded, capsys):
    with pytest.raises(DoomError, match="E9M9.*freedoom1.wad.*E1M1"):
        check_maps(["E1M1", "E9M9"], "freedoom1.wad")
    with pytest.raises(DoomError, match="123x45"):
        DoomConfig(resolution=(123, 45))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"map": "E1M1", "actions": [{"keys": []}, {"keys": ["jump"]}]}))
    with pytest.raises(DoomError, match=r"bad\.json: actions\[1\]: unknown key 'jump'"):
        rec.load_replay(bad)
    with pytest.raises(DatasetError, match="no episode 'nope'"):
        rec.load_replay(f"{recorded[0]}::nope")
    assert cli_main(["record", "--out", str(recorded[0]), "--steps", "10", "--quiet"]) == 2
    assert "already here" in capsys.readouterr().err
    assert cli_main(["record", "--replay", str(bad), "--out", str(tmp_path / "x"), "--steps", "5"]) == 2
    assert "--steps" in capsys.readouterr().err


# --- policies --------------------------------------------------------------------------------------
def test_explore_covers_more_of_the_map_than_random(env):
    cells = {"explore": 0, "random": 0}
    for seed in (11, 12, 13):  # one episode is luck; three are a measurement (benchmarks: ~2.3x)
        for name, policy in (("explore", make_policy("explore", VARIABLE_NAMES)), ("random", RandomPolicy())):
            policy.reset(seed)
            pose = np.concatenate([c.pose for c in rollout(env, policy, "E1M1", seed, 300)])
            cells[name] += cells_visited(pose)
    assert cells["explore"] > 1.3 * cells["random"], cells


def test_explorer_escapes_when_stuck_and_turns_at_walls():
    p = ExplorePolicy()
    p.reset(0)
    open_view = SimpleNamespace(
        depth=np.full((120, 160), 200, np.uint8), pose=np.zeros(5, np.float32), variables=np.zeros(0, np.float32)
    )
    keys = np.array([p(open_view)[0] for _ in range(60)])  # pushes forward, never moves
    assert keys[:, actions.KEYS.index("forward")].sum() > 10
    assert keys[:, actions.KEYS.index("back")].any()  # the stuck detector fired
    p.reset(1)
    wall = SimpleNamespace(
        depth=np.full((120, 160), 3, np.uint8), pose=np.zeros(5, np.float32), variables=np.zeros(0, np.float32)
    )
    out = [p(wall) for _ in range(60)]
    k = np.array([o[0] for o in out])
    yaw = np.array([o[1][0] for o in out])
    assert k[:, actions.KEYS.index("forward")].mean() < 0.5  # no running into the wall
    assert (np.abs(yaw) > 3).sum() + k[:, 4:6].sum() > 20  # it turns away (mouse or keys)
    assert k[:, actions.KEYS.index("use")].any()  # and tries it as a door


def test_babble_adds_bursts_of_one_held_random_action(env):
    """In the real game the 'babble' explorer spends a good share of its steps in bursts of one
    random action (movement keys and a mouse turn held 2-8 steps); 'explore' never does."""

    def play(name):
        policy, out = make_policy(name, VARIABLE_NAMES), []
        policy.reset(5)
        obs = env.reset("E1M1", 5)
        for _ in range(600):
            keys, mouse = policy(obs)
            out.append((policy.mode, keys.copy(), float(mouse[0])))
            obs = env.step(keys, mouse)
            if obs is None:
                break
        return out

    steps = play("babble")
    bursts, run = [], []
    for mode, keys, yaw in steps + [("end", None, 0.0)]:
        if mode == "babble":
            run.append((keys, yaw))
        elif run:
            bursts.append(run)
            run = []
    assert len(bursts) >= 5 and sum(map(len, bursts)) > 0.1 * len(steps), (len(bursts), len(steps))
    moves = [
        actions.KEYS.index(k) for k in ("forward", "back", "strafe_left", "strafe_right", "turn_left", "turn_right")
    ]
    for burst in bursts:
        assert 1 <= len(burst) <= 8
        assert len({yaw for _, yaw in burst}) == 1  # one mouse turn held
        assert len({keys[moves].tobytes() for keys, _ in burst}) == 1  # one set of movement keys held
    assert all(mode != "babble" for mode, _, _ in play("explore"))


def test_jitter_explorer_turns_in_ways_its_last_turn_does_not_foretell(env):
    """'jitter' adds a fresh offset to the mouse yaw every step: in the real game its yaw is much
    less predictable from the step before than the smooth explorer's, and it still explores."""

    def play(name):
        policy, yaw, cells = make_policy(name, VARIABLE_NAMES), [], set()
        policy.reset(5)
        obs = env.reset("E1M1", 5)
        for _ in range(600):
            keys, mouse = policy(obs)
            yaw.append(float(mouse[0]))
            cells.add((int(obs.pose[0] // 64), int(obs.pose[1] // 64)))
            obs = env.step(keys, mouse)
            if obs is None:
                break
        y = np.array(yaw)
        return float(np.corrcoef(y[1:], y[:-1])[0, 1]), len(cells)

    (smooth, explored), (jittered, jitter_explored) = play("explore"), play("jitter")
    assert jittered < smooth - 0.15, (smooth, jittered)
    assert jitter_explored > 0.5 * explored, (explored, jitter_explored)


def test_still_explorer_lets_go_and_the_view_settles(env):
    """The 'still' explorer stands with no key and no mouse for 2-16 steps at a time, a good share
    of its play; in the game the camera then stops turning and glides to a stop."""
    policy, steps = make_policy("still", VARIABLE_NAMES), []
    policy.reset(7)
    obs = env.reset("E1M1", 7)
    for _ in range(600):
        keys, mouse = policy(obs)
        steps.append((keys.copy(), mouse.copy(), obs.pose.copy()))
        obs = env.step(keys, mouse)
        if obs is None:
            break
    hands_off = [i for i, (k, m, _) in enumerate(steps[:-1]) if not k.any() and not m.any()]
    assert len(hands_off) > 0.05 * len(steps), (len(hands_off), len(steps))
    moved = {i: float(np.hypot(*(steps[i + 1][2][:2] - steps[i][2][:2]))) for i in hands_off}
    for i in hands_off:  # no turn; Doom's friction only ever slows the glide down
        assert turned(float(steps[i][2][3]), float(steps[i + 1][2][3])) == pytest.approx(0.0, abs=0.01)
        if i - 1 in moved:
            assert moved[i] <= moved[i - 1] + 1e-3, (i, moved[i - 1], moved[i])
    assert any(all(j in moved for j in range(i - 9, i)) and moved[i] < 1.0 for i in moved), (
        "no pause long enough to come to a stop"
    )
    explore = make_policy("explore", VARIABLE_NAMES)
    explore.reset(7)
    obs = env.reset("E1M1", 7)
    for _ in range(300):
        keys, mouse = explore(obs)
        assert explore.mode != "still"
        obs = env.step(keys, mouse)
        if obs is None:
            break


def test_frontier_map_plans_around_walls_to_unexplored_space():
    m = FrontierMap(cell=32.0)
    # A corridor going east from the origin, then north: walls seen around it, unknown beyond.
    heading = np.radians(np.linspace(-40, 40, 33))
    m.observe(16.0, 16.0, heading, np.full(33, 200.0))
    path = m.plan(16.0, 16.0)
    assert path is not None and path[0] > 16.0  # the waypoint leads east, into what was seen
    m.block(path[2], path[3], learned=True)
    again = m.plan(16.0, 16.0)
    assert again is None or again[2:] != path[2:]  # a learned block is not chosen again


# --- coverage --------------------------------------------------------------------------------------
def test_coverage_counts_distinct_cells_per_block_and_map():
    xy = np.array([[0, 0], [10, 10], [70, 0], [130, 200]], np.float32)
    assert cells_visited(xy) == 3
    c = coverage([("E1M1", xy), ("E1M2", xy)], per=4)
    assert c["frames"] == 8 and c["cells"] == 6 and c["blocks"] == 2 and c["cells_per_block"] == 3.0
    assert coverage([("E1M1", xy)], per=10)["cells_per_block"] is None
    with pytest.raises(ValueError, match="positions"):
        cells_visited(np.zeros(3))


def test_plot_coverage_from_a_dataset_and_from_poses(recorded, tmp_path):
    out, _ = recorded
    png = plot_coverage(Dataset(out), tmp_path / "cov.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    xy = np.cumsum(np.ones((50, 2)), 0) * 10
    png2 = plot_coverage(xy, tmp_path / "poses.png", map_lines=np.array([[0, 0, 500, 0, 1]], np.float32))
    assert png2.is_file()
    (out / "maps" / "E1M9.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"E1M9\.json"):
        load_map_lines(out, "E1M9")
