"""Gymnasium env over a world model (issue 6): check_env, vector env = single envs (autoreset
included), seeding, headless human rendering, clear errors for bad actions, start sources, and
the learned reward head trained on a real ViZDoom recording's game variables.

Everything runs the tiny model of ``tiny_checkpoint`` (conftest.py) on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from conftest import SIZE, benchmark_script, cycle_player  # tests/ is on sys.path under pytest
from gymnasium.utils.env_checker import check_env
from PIL import Image

import worldgen.env  # noqa: F401  (registers worldgen/Doom-v0)
from worldgen.actions import ActionError
from worldgen.data import Dataset, DatasetIndex, Episode, EpisodeInfo, write_episode_shards
from worldgen.env.gym.world_model_env import WorldModelEnv, WorldModelVectorEnv

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores


@pytest.fixture(autouse=True)
def headless(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")  # check_env opens a 'human' env too
    monkeypatch.setenv("PYGAME_HIDE_SUPPORT_PROMPT", "1")


def make(ckpt: Path, **kwargs):
    kwargs.setdefault("reward", "zero")
    return gymnasium.make("worldgen/Doom-v0", model=str(ckpt), device="cpu", **kwargs)


def forward(yaw: float = 0.0) -> dict:
    return {"keys": np.array([1, 0, 0, 0, 0, 0, 0, 0], np.int8), "mouse": np.array([yaw, 0.0], np.float32)}


# --- a real recording with game variables, and a reward head trained on it ---------------------
# Walk, turn and fire: real play in which the ammo counter moves.
SHOOT_CYCLE = (
    [(["forward"], 0.0)] * 3
    + [(["attack"], 0.0)] * 4
    + [(["turn_right"], 0.0)] * 2
    + [(["forward", "attack"], 3.0)] * 3
    + [([], -6.0)] * 2
)


@pytest.fixture(scope="module")
def variables_recording(tmp_path_factory) -> Path:
    """Real ViZDoom play (E1M1, 3 episodes, 180 steps) with its game variables, at 32x24."""
    from worldgen.env.sources.doom import VARIABLE_NAMES, DoomConfig, DoomEnv, rollout

    root = tmp_path_factory.mktemp("doomvars")
    index = DatasetIndex(
        root,
        resolution=SIZE,
        frame_skip=4,
        source={"env": "doom", "test": "downscaled"},
        variables=VARIABLE_NAMES,
        has_depth=False,
        has_pose=False,
    )
    with DoomEnv(DoomConfig()) as env:
        for seed, (name, n) in enumerate((("a", 70), ("b", 70), ("c", 40))):
            chunks = list(rollout(env, cycle_player(SHOOT_CYCLE, 5 * seed), "E1M1", seed, n))
            frames = np.concatenate([c.frames for c in chunks])
            ep = Episode(
                frames=np.stack([np.asarray(Image.fromarray(f).resize(SIZE, Image.BILINEAR)) for f in frames]),
                keys=np.concatenate([c.keys for c in chunks]),
                mouse=np.concatenate([c.mouse for c in chunks]),
                variables=np.concatenate([c.variables for c in chunks]),
            )
            index.add(
                EpisodeInfo(id=name, length=len(ep), shards=write_episode_shards(root, name, ep), map="E1M1", seed=seed)
            )
    return root


@pytest.fixture(scope="module")
def reward_run(variables_recording, tmp_path_factory) -> tuple[Path, dict]:
    """`worldgen train reward` on the recording: (run folder, summary)."""
    from worldgen.env.learned.reward_train import RewardTrainConfig, train

    out = tmp_path_factory.mktemp("reward")
    summary = train(
        RewardTrainConfig(
            data=str(variables_recording),
            out=str(out),
            steps=150,
            batch_size=32,
            warmup=10,
            lr=3e-3,
            targets="health,selected_weapon_ammo",
            weights="selected_weapon_ammo=0.1,health=0.01,death=-1",
            channels="8,16,16,32",
            ckpt_every=1000,
            log_every=10,
            event_fraction=0.25,
            device="cpu",
        )
    )
    return out, summary


def test_reward_head_learns_recorded_variables(reward_run, variables_recording):
    out, summary = reward_run
    log = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert log[-1]["loss"] < log[0]["loss"] / 2, [e["loss"] for e in log]
    held = summary["heldout_selected_weapon_ammo"]
    # Firing the pistol is in the action and on screen: the head must beat answering "same".
    assert held["counts"]["down"] > 0
    assert held["balanced_accuracy"] > 0.7, held
    for key in ("heldout_health", "heldout_death", "heldout_reward"):
        assert key in summary
    stored = json.loads((out / "ckpt" / "reward.json").read_text())["config"]
    assert stored["reward_weights"]["selected_weapon_ammo"] == 0.1
    assert stored["metrics"]["heldout_selected_weapon_ammo"] == held


def test_prior_correction_undoes_event_over_sampling():
    """With a share f of each batch drawn from event transitions, a head that learned the sampled
    class frequencies, corrected by prior_bias, gives back the true frequencies."""
    from worldgen.env.learned.reward_train import Transitions, prior_bias

    change = torch.zeros(1000, 2)
    change[:10, 0], change[10:15, 0], change[15:18, 1] = -5.0, 3.0, 1.0  # 1% down, 0.5% up; 0.3% up
    death = torch.zeros(1000)
    death[990:] = 1.0  # 1% die, with no change
    t = Transitions(
        torch.zeros(1, 3, 1, 1, dtype=torch.uint8),
        torch.zeros(1000, dtype=torch.long),
        torch.zeros(1000, 10),
        change,
        death,
    )
    f = 0.5
    ev = t.events
    p_true = torch.nn.functional.one_hot(t.classes, 3).float().mean(0)  # (targets, 3)
    p_sampled = (1 - f) * p_true + f * torch.nn.functional.one_hot(t.classes[ev], 3).float().mean(0)
    bias, death_bias = prior_bias(t, f)
    assert torch.allclose((p_sampled.log() + bias).softmax(-1), p_true, atol=1e-6)
    d_sampled = (1 - f) * 0.01 + f * death[ev].mean()
    assert torch.sigmoid(torch.logit(d_sampled) + death_bias).item() == pytest.approx(0.01, rel=1e-4)


def test_learned_reward_in_the_env(reward_run, tiny_checkpoint):
    env = make(tiny_checkpoint, reward=str(reward_run[0] / "ckpt"))
    env.reset(seed=0)
    fire = {"keys": np.array([0, 0, 0, 0, 0, 0, 1, 0]), "mouse": np.zeros(2, np.float32)}
    _, r, term, _, info = env.step(fire)
    assert isinstance(r, float) and np.isfinite(r) and isinstance(term, bool)
    assert set(info["reward_terms"]) == {"health", "selected_weapon_ammo", "p_death"}
    terms = info["reward_terms"]
    # The reward is the weighted sum of the predicted changes, as the head's weights say.
    assert r == pytest.approx(0.01 * terms["health"] + 0.1 * terms["selected_weapon_ammo"] - terms["p_death"], abs=1e-5)
    env.close()
    # A reward model object with its own settings: threshold 0 ends every step by "death".
    from worldgen.env.learned.reward import LearnedReward

    env = make(tiny_checkpoint, reward=LearnedReward(reward_run[0] / "ckpt", {"health": 1.0}, death_threshold=0.0))
    env.reset(seed=0)
    _, r, term, _, info = env.step(fire)
    assert term is True and r == pytest.approx(info["reward_terms"]["health"], abs=1e-6)
    env.close()


def test_reward_head_of_another_frame_size_is_refused(tiny_checkpoint, tmp_path):
    from worldgen.env.learned.reward import RewardHead, RewardHeadConfig, save_head

    save_head(tmp_path, RewardHead(RewardHeadConfig(frame_size=(120, 160), targets=("health",))), {"health": 1.0})
    with pytest.raises(ValueError, match=r"reads \(120, 160\) frames, the model makes \(24, 32\)"):
        WorldModelEnv(str(tiny_checkpoint), device="cpu", reward=str(tmp_path))
    with pytest.raises(ValueError, match="name no target"):
        save_head(tmp_path, RewardHead(RewardHeadConfig(frame_size=(24, 32), downsample=1)), {"ammo": 1.0})


def test_user_reward_function(tiny_checkpoint):
    seen = []

    def brighter(prev, action, frame):
        seen.append((prev.copy(), action, frame.copy()))
        return float(frame.mean()) - float(prev.mean()), bool(action.keys[7])  # "use" ends the episode

    env = make(tiny_checkpoint, reward=brighter)
    obs0, _ = env.reset(seed=1)
    obs1, r, term, _, _ = env.step(forward())
    prev, action, frame = seen[-1]
    assert np.array_equal(prev, obs0) and np.array_equal(frame, obs1) and action.to_dict()["keys"] == ["forward"]
    assert r == pytest.approx(float(obs1.mean()) - float(obs0.mean())) and term is False
    assert env.step({"keys": ["use"], "mouse": [0.0, 0.0]})[2] is True
    env.close()
    bad = make(tiny_checkpoint, reward=lambda prev, action, frame: "lots")
    bad.reset(seed=0)
    with pytest.raises(TypeError, match="must return a number"):
        bad.step(forward())


# --- Gymnasium's checks ------------------------------------------------------------------------
def test_check_env_passes(tiny_checkpoint, reward_run):
    """check_env (reset/step determinism under a seed, spaces, fresh returned data, every render
    mode) with the learned reward head; the only warnings allowed are Gymnasium's advice to
    normalise Box actions, which the mouse's degrees do not follow on purpose, and its note that
    the pitch range is empty (the tiny recording never pitches: the trained range is 0)."""
    env = make(tiny_checkpoint, reward=str(reward_run[0] / "ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    others = [
        str(w.message)
        for w in caught
        if "normalized space" not in str(w.message) and "maximum and minimum values are equal" not in str(w.message)
    ]
    assert not others, others
    env.close()


def test_depth_and_pose_observations(tiny_checkpoint, tiny_geometry_run):
    """observations=("rgb", "depth", "pose"): a Dict that check_env accepts (determinism under a
    seed included); depth is the geometry head's reading of each frame, and the pose starts at the
    origin and integrates the head's odometry of every step (start-relative, as documented)."""
    from worldgen.env.learned.geometry import integrate, load_head, predict_depth, predict_motion

    geometry = str(tiny_geometry_run[0] / "ckpt")
    env = make(tiny_checkpoint, observations=("rgb", "depth", "pose"), geometry=geometry)
    assert isinstance(env.observation_space, gymnasium.spaces.Dict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    others = [
        str(w.message)
        for w in caught
        if "normalized space" not in str(w.message) and "maximum and minimum values are equal" not in str(w.message)
    ]
    assert not others, others

    head, _ = load_head(geometry)
    obs, _ = env.reset(seed=3)
    assert set(obs) == {"rgb", "depth", "pose"} and obs in env.observation_space
    assert obs["depth"].shape == (SIZE[1], SIZE[0], 1) and np.array_equal(obs["pose"], np.zeros(5, np.float32))
    pose, prev = np.zeros(5), obs["rgb"]
    turn_left = {"keys": np.zeros(8, np.int8), "mouse": np.array([-6.0, 0.0], np.float32)}  # as recorded
    for a in (forward(), turn_left, turn_left, turn_left):
        obs, *_ = env.step(a)
        motion = predict_motion(head, prev[None], a["keys"][None], a["mouse"][None], obs["rgb"][None])[0]
        pose, prev = integrate(pose, motion), obs["rgb"]
        np.testing.assert_allclose(obs["pose"], pose.astype(np.float32), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(obs["depth"], predict_depth(head, obs["rgb"][None])[0][..., None])
    assert 9.0 < obs["pose"][3] < 30.0, obs["pose"]  # three mouse turns of 6 degrees left: yaw up ~18
    obs, _ = env.reset(seed=4)
    assert np.array_equal(obs["pose"], np.zeros(5, np.float32))  # a new episode starts at the origin
    env.close()

    # The native vector env gives the same Dict observations as single envs.
    kwargs = dict(device="cpu", reward="zero", observations=("depth", "pose"), geometry=geometry)
    envs = WorldModelVectorEnv(2, str(tiny_checkpoint), **kwargs)
    singles = [WorldModelEnv(str(tiny_checkpoint), **kwargs) for _ in range(2)]
    batch, _ = envs.reset(seed=5)
    ones = [e.reset(seed=5 + i)[0] for i, e in enumerate(singles)]
    for _ in range(3):
        batch = envs.step([forward(), turn_left])[0]
        ones = [e.step(a)[0] for e, a in zip(singles, (forward(), turn_left))]
    assert set(batch) == {"depth", "pose"} and batch in envs.observation_space
    for i, one in enumerate(ones):
        # Batched GEMMs may round a pixel to the next level (see the test above): a near match.
        assert np.abs(batch["depth"][i].astype(int) - one["depth"]).mean() < 0.5
        np.testing.assert_allclose(batch["pose"][i], one["pose"], atol=0.5)
    envs.close()
    for e in singles:
        e.close()


def test_seeding_determinism(tiny_checkpoint):
    plan = [forward(), forward(5.0), {"keys": ["turn_left", "attack"], "mouse": [0.0, 0.0]}, forward(-3.0)]

    def play(env, seed):
        obs, info = env.reset(seed=seed)
        out = [obs]
        for a in plan:
            out.append(env.step(a)[0])
        return np.stack(out), info["start"]

    a, b = make(tiny_checkpoint), make(tiny_checkpoint)
    run_a, start_a = play(a, 7)
    run_b, start_b = play(b, 7)
    assert start_a == start_b and np.array_equal(run_a, run_b)
    assert np.array_equal(play(a, 7)[0], run_a)  # reseeding the same env replays it
    runs = [play(a, s)[0] for s in (8, 9, 10)]  # other seeds: another start or other sampler noise
    assert all(not np.array_equal(r, run_a) for r in runs)
    # An unseeded reset continues the env's own stream: reproducible after a seeded one.
    a.reset(seed=3)
    b.reset(seed=3)
    assert np.array_equal(play(a, None)[0], play(b, None)[0])
    a.close()
    b.close()


def test_vector_env_equals_single_envs_with_next_step_autoreset(tiny_checkpoint):
    """The native vector env against Gymnasium's SyncVectorEnv over single envs: the same
    observations, rewards, terminations, truncations and infos, step by step, through episode
    ends (horizon 3 truncates twice) and a termination from the reward function."""

    def ends_on_use(prev, action, frame):
        return float(frame.mean()) / 255.0, bool(action.keys[7])

    kwargs = dict(model=str(tiny_checkpoint), device="cpu", reward=ends_on_use, max_episode_steps=3)
    native = gymnasium.make_vec("worldgen/Doom-v0", num_envs=3, vectorization_mode="vector_entry_point", **kwargs)
    sync = gymnasium.make_vec("worldgen/Doom-v0", num_envs=3, vectorization_mode="sync", **kwargs)
    assert isinstance(native.unwrapped, WorldModelVectorEnv)
    assert (
        native.metadata["autoreset_mode"] == sync.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    )
    assert native.observation_space == sync.observation_space and native.action_space == sync.action_space

    calls, counting = [], [False]
    wm = native.unwrapped.model  # shared with the sync env's sub-envs: count the native env's calls only
    step_many = wm.step_many
    wm.step_many = lambda sessions, acts: (counting[0] and calls.append(len(sessions))) or step_many(sessions, acts)
    try:
        (o1, i1), (o2, i2) = native.reset(seed=11), sync.reset(seed=11)
        assert np.array_equal(o1, o2) and i1["start"].tolist() == i2["start"].tolist()
        native.action_space.seed(0)
        for t in range(8):
            a = native.action_space.sample()
            a["keys"][:, 7] = 0
            if t == 1:
                a["keys"][1, 7] = 1  # sub-env 1 terminates at step 2
            counting[0] = True
            r1 = native.step(a)
            counting[0] = False
            r2 = sync.step(a)
            # One batched forward against three single ones: the GEMMs sum in another order, so
            # now and then a pixel rounds to the next uint8 level (as in the engine's own test).
            assert np.abs(r1[0].astype(int) - r2[0]).max() <= 1, t
            assert np.allclose(r1[1], r2[1], rtol=0, atol=1e-5), (t, r1[1], r2[1])
            for x, y, what in zip(r1[2:4], r2[2:4], ("terminated", "truncated")):
                assert np.array_equal(x, y), (t, what, x, y)
            assert r1[4]["steps"].tolist() == r2[4]["steps"].tolist(), t
    finally:
        del wm.step_many
    # One batched forward of all sub-envs per vector step, autoresetting ones included (one shape).
    assert calls == [3] * 8, calls
    native.close()
    sync.close()


def test_vector_env_seeds_partial_reset_and_render(tiny_checkpoint):
    envs = WorldModelVectorEnv(2, str(tiny_checkpoint), device="cpu", reward="zero", render_mode="rgb_array")
    obs, info = envs.reset(seed=[5, 6])
    single = WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero")
    assert np.array_equal(obs[1], single.reset(seed=6)[0])
    envs.step([forward(), forward(2.0)])
    obs2, info2 = envs.reset(seed=[None, 6], options={"reset_mask": np.array([False, True])})
    assert np.array_equal(obs2[1], obs[1]) and info2["_steps"].tolist() == [False, True]
    assert [e.steps for e in envs.envs] == [1, 0]
    frames = envs.render()
    assert isinstance(frames, tuple) and all(np.array_equal(f, o) for f, o in zip(frames, obs2))
    envs.close()
    single.close()


# --- rendering -----------------------------------------------------------------------------------
def test_render_rgb_array_and_human_headless(tiny_checkpoint):
    import pygame

    env = make(tiny_checkpoint, render_mode="rgb_array")
    obs, _ = env.reset(seed=2)
    frame = env.render()
    assert np.array_equal(frame, obs) and frame is not obs
    env.close()

    env = make(tiny_checkpoint, render_mode="human")
    env.reset(seed=2)
    obs, *_ = env.step(forward())
    shown = pygame.surfarray.array3d(pygame.display.get_surface()).swapaxes(0, 1)  # (H', W', 3)
    scale = shown.shape[1] // obs.shape[1]
    assert shown.shape[1] >= 480 and shown.shape[:2] == (obs.shape[0] * scale, obs.shape[1] * scale)
    assert np.array_equal(shown[::scale, ::scale], obs)  # the window shows the step's frame
    assert env.render() is None
    env.close()
    assert not pygame.display.get_init()


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "action, message",
    [
        ({"keys": np.ones(7), "mouse": np.zeros(2)}, r"keys must have shape \(8,\)"),
        ({"keys": np.full(8, 2), "mouse": np.zeros(2)}, "keys must be 0 or 1"),
        ({"keys": np.zeros(8), "mouse": np.array([np.nan, 0.0])}, "finite"),
        ({"keys": np.zeros(8), "mouse": np.array([200.0, 0.0])}, r"within \+-180"),
        ({"keys": np.zeros(8), "mouse": np.zeros(3)}, r"mouse must have shape \(2,\)"),
        ({"keys": ["jump"], "mouse": [0, 0]}, "unknown key 'jump'"),
        ({"key": np.zeros(8), "mouse": np.zeros(2)}, "has 'keys' and 'mouse'"),
        (3, "an action must be a dict"),
    ],
)
def test_bad_actions_are_clear_errors_and_change_nothing(tiny_checkpoint, action, message):
    env, ref = make(tiny_checkpoint), make(tiny_checkpoint)
    env.reset(seed=4)
    ref.reset(seed=4)
    with pytest.raises(ActionError, match=message):
        env.step(action)
    assert env.unwrapped.steps == 0
    assert np.array_equal(env.step(forward())[0], ref.step(forward())[0])  # as if the bad call never was
    env.close()
    ref.close()


def test_vector_env_bad_action_names_the_sub_env(tiny_checkpoint):
    envs = WorldModelVectorEnv(3, str(tiny_checkpoint), device="cpu", reward="zero")
    envs.reset(seed=0)
    a = {"keys": np.zeros((3, 8), np.int8), "mouse": np.zeros((3, 2), np.float32)}
    a["mouse"][2, 0] = np.inf
    with pytest.raises(ActionError, match="sub-env 2: mouse deltas must be finite"):
        envs.step(a)
    with pytest.raises(ActionError, match=r"keys \(3, 8\) and mouse \(3, 2\)"):
        envs.step({"keys": np.zeros((2, 8)), "mouse": np.zeros((2, 2))})
    with pytest.raises(ActionError, match="2 actions for 3 sub-envs"):
        envs.step([forward(), forward()])
    assert [e.steps for e in envs.envs] == [0, 0, 0]  # nobody moved
    envs.close()


def test_bad_settings_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(Exception, match="need a geometry head"):
        make(tiny_checkpoint, observations=("rgb", "depth"))
    with pytest.raises(ValueError, match="observations must be distinct keys"):
        make(tiny_checkpoint, observations=("rgb", "normals"))
    with pytest.raises(ValueError, match="start must be"):
        make(tiny_checkpoint, start="moon")
    with pytest.raises(ValueError, match="needs data="):
        make(tiny_checkpoint, start="dataset")
    with pytest.raises(ValueError, match="render_mode must be one of"):
        WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero", render_mode="ascii")
    with pytest.raises(Exception, match="no reward head"):
        make(tiny_checkpoint, reward="learned")
    env = make(tiny_checkpoint)
    with pytest.raises(gymnasium.error.ResetNeeded):
        env.unwrapped.step(forward())
    with pytest.raises(ValueError, match="unknown reset options"):
        env.reset(options={"seed": 1})
    env.close()


# --- where episodes start ----------------------------------------------------------------------
def test_start_sources(tiny_checkpoint, doom_recording):
    env = make(tiny_checkpoint)
    wm = env.unwrapped.model
    obs, info = env.reset(seed=0, options={"start": 1})
    assert info["start"] == "stored:1" and np.array_equal(obs, wm.start(1)[0][-1])
    frames, acts = wm.start(0)
    obs, info = env.reset(options={"context_frames": frames[:3], "context_actions": [a.to_dict() for a in acts[:3]]})
    assert info["start"] == "options" and np.array_equal(obs, frames[2])
    env.close()

    env = make(tiny_checkpoint, start="dataset", data=str(doom_recording), split="all", context=4)
    obs, info = env.reset(seed=3)
    root, where = info["start"].split("::")
    episode_id, first = where.split("@")
    ds = Dataset(root)
    episode = [e.id for e in ds.episodes].index(episode_id)
    assert np.array_equal(obs, ds.read(episode, "frames", int(first) + 3, int(first) + 4)[0])
    env.close()

    env = make(tiny_checkpoint, start="doom", maps=["E1M2"], context=3)
    obs, info = env.reset(seed=5)
    assert info["start"].startswith("doom:E1M2:") and obs.shape == (24, 32, 3)
    assert np.array_equal(env.reset(seed=5)[0], obs)  # the same game seed replays the same frames
    env.close()


# --- registration and the default model ------------------------------------------------------
def test_registered_id_gives_the_default_model():
    env = gymnasium.make("worldgen/Doom-v0", device="cpu")
    assert env.observation_space.shape == (120, 160, 3)
    assert env.unwrapped.model.frame_shape == (120, 160, 3)
    assert env.spec.id == "worldgen/Doom-v0" and env.spec.vector_entry_point.endswith(":WorldModelVectorEnv")
    env.close()


def test_importing_worldgen_registers_the_ids():
    """``import worldgen.env`` registers the ids without loading an env; the envs import from
    ``worldgen.env`` on first use (the rooms below it are where they live)."""
    script = (
        "import sys, gymnasium, worldgen.env\n"
        "print(gymnasium.spec('worldgen/Doom-v0').entry_point)\n"
        "print('worldgen.env.gym.world_model_env' in sys.modules)\n"
        "from worldgen.env import RealDoomEnv, WorldModelEnv, WorldModelVectorEnv\n"
        "print(WorldModelEnv.__module__, WorldModelVectorEnv.__module__, RealDoomEnv.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == [
        "worldgen.env.gym.world_model_env:WorldModelEnv",
        "False",
        "worldgen.env.gym.world_model_env worldgen.env.gym.world_model_env worldgen.env.gym.real_game",
    ]
    with pytest.raises(AttributeError, match="no attribute 'NoSuchEnv'"):
        worldgen.env.NoSuchEnv  # noqa: B018


# --- the example: PPO in imagination, evaluated in the real game --------------------------------
def test_ppo_example_trains_in_the_model_and_in_the_real_game_and_scores_both(tiny_checkpoint, reward_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "ppo_doom.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--reward",
            str(reward_run[0] / "ckpt"),
            "--device",
            "cpu",
            "--steps",
            "64",
            "--num-envs",
            "2",
            "--num-steps",
            "16",
            "--horizon",
            "12",
            "--eval-episodes",
            "3",
            "--eval-steps",
            "10",
            "--eval-envs",
            "2",
            "--no-processes",
            "--out",
            str(tmp_path),
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads((tmp_path / "result.json").read_text())
    for where in ("imagination", "real"):
        assert result["trained"][where]["steps"] == 64 and len(result["trained"][where]["curve"]) == 2
        assert result["trained"][where]["episodes"] >= 2  # horizon 12 truncates within 32 steps per env
        assert (tmp_path / f"agent-{where}.pt").is_file()
    for policy in ("agent_imagination", "agent_real", "random"):
        real = result["real_game"][policy]
        assert len(real["episodes"]) == 3 and all(1 <= e["steps"] <= 10 for e in real["episodes"])
        assert np.isfinite(real["mean_return"]) and real["se_return"] >= 0
        assert {"selected_weapon_ammo", "health"} <= set(real["episodes"][0])
    c = result["comparisons"]["agent_imagination_vs_random"]
    a, r = result["real_game"]["agent_imagination"], result["real_game"]["random"]
    assert c["difference"] == pytest.approx(a["mean_return"] - r["mean_return"], abs=1e-3)
    assert result["reward_weights"] == {"selected_weapon_ammo": 0.1, "health": 0.01, "death": -1.0}


def test_ppo_example_trains_from_recorded_starts_and_scores_a_saved_agent(
    tiny_checkpoint, reward_run, doom_recording, tmp_path
):
    """``--start dataset``: short imagined episodes from a recording's windows (truncations
    bootstrapped from the value); ``--load``: the saved agent, scored again without training,
    plays the same real episodes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}
    common = [sys.executable, str(ROOT / "examples" / "ppo_doom.py"), "--checkpoint", str(tiny_checkpoint)]
    common += ["--reward", str(reward_run[0] / "ckpt"), "--device", "cpu", "--train-in", "imagination"]
    common += ["--eval-episodes", "3", "--eval-steps", "10", "--eval-envs", "2", "--no-processes"]
    trained, scored = tmp_path / "trained", tmp_path / "scored"
    train = ["--start", "dataset", "--data", str(doom_recording), "--steps", "64", "--num-envs", "2"]
    train += ["--num-steps", "16", "--horizon", "4"]
    for args in (
        train + ["--out", str(trained)],
        ["--load", f"imagination={trained / 'agent-imagination.pt'}", "--out", str(scored)],
    ):
        subprocess.run(common + args, check=True, env=env, capture_output=True, text=True, timeout=600)
    first, again = (json.loads((d / "result.json").read_text()) for d in (trained, scored))
    assert first["trained"]["imagination"]["episodes"] >= 8  # horizon 4: 32 steps per env
    assert again["trained"]["imagination"] == {"loaded": str(trained / "agent-imagination.pt")}
    assert again["real_game"] == first["real_game"]
    bad = subprocess.run(common + ["--load", "real=x.pt"], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--load takes WHERE=PATH" in bad.stderr

    # --reward-weights sets the task everywhere (the tiny head knows health and ammo): the same
    # episodes, scored by the ammo the shots cost.
    task = tmp_path / "task"
    load = ["--load", f"imagination={trained / 'agent-imagination.pt'}", "--out", str(task)]
    weights = ["--reward-weights", "selected_weapon_ammo=0.5"]
    subprocess.run(common + load + weights, check=True, env=env, capture_output=True, text=True, timeout=600)
    task_result = json.loads((task / "result.json").read_text())
    assert task_result["reward_weights"] == {"selected_weapon_ammo": 0.5}
    for name, played in task_result["real_game"].items():
        same = first["real_game"][name]["episodes"]
        assert [(e["steps"], e["died"]) for e in played["episodes"]] == [(e["steps"], e["died"]) for e in same]
        for e in played["episodes"]:
            assert e["return"] == pytest.approx(0.5 * e["selected_weapon_ammo"], abs=1e-3)
    assert task_result["real_game"]["random"]["events"]["selected_weapon_ammo"] < 0  # random fires: the weight is seen
    bad = subprocess.run(
        common + load + ["--reward-weights", "killcount=lots"], env=env, capture_output=True, text=True, timeout=600
    )
    assert bad.returncode != 0 and "--reward-weights takes NAME=WEIGHT" in bad.stderr


def test_event_recall_plays_on_from_real_states_before_events(tiny_checkpoint, reward_run, variables_recording):
    """benchmarks/event_recall.py on real play: every sample of an event type has that change
    inside its segment (the game's own sum), quiet segments have none, and the generated rows
    (recorded and shuffled actions) come from the model for every sample."""
    recall = benchmark_script("event_recall")
    args = ["--checkpoint", str(tiny_checkpoint), "--reward", str(reward_run[0] / "ckpt")]
    args += ["--data", str(variables_recording), "--split", "all", "--lead", "2", "--per-event", "4", "--device", "cpu"]
    rows = recall.main(args)["events"]
    assert "quiet" in rows and len(rows) >= 2, rows.keys()
    for kind, row in rows.items():
        target, _, way = kind.partition(" ")
        game = row["game"]
        if kind == "quiet":
            assert all(v == 0 for v in game.values())
        else:  # the event's change is in the segment (other changes of the same way may join it)
            assert game[target] < 0 if way == "down" else game[target] > 0
        for name in ("head_on_real", "generated", "generated_shuffled"):
            assert set(row[name]) == set(game) and all(np.isfinite(v) for v in row[name].values())
    with pytest.raises(SystemExit):
        recall.main(args[:-6] + ["--lead", "0", "--device", "cpu"])


def test_imagined_events_bins_the_heads_reading_beside_the_real_games(tiny_checkpoint, reward_run):
    """benchmarks/imagined_events.py: imagined and real episodes under one random policy, binned
    by step; the real game's deaths are 0 or 1 a step, each ratio is imagined over real, and bins
    that do not rise from 0 or a head that is no learned one are refused."""
    events = benchmark_script("imagined_events")
    args = ["--checkpoint", str(tiny_checkpoint), "--reward", str(reward_run[0] / "ckpt"), "--device", "cpu"]
    args += ["--episodes", "2", "--real-episodes", "2", "--steps", "8", "--bins", "0", "4"]
    rows = events.main(args)["bins"]
    assert [r["steps"] for r in rows] == [[0, 3], [4, 7]]
    for row in rows:
        assert (
            list(row["imagined"])
            == list(row["real"])
            == list(row["head_on_real"])
            == ["health", "selected_weapon_ammo", "death"]
        )
        assert 0 <= row["real"]["death"] <= 1 and all(np.isfinite(v) for v in row["head_on_real"].values())
        for k, ratio in row["ratio"].items():
            real = row["real"][k]
            assert ratio is None if real == 0 else ratio == pytest.approx(row["imagined"][k] / real, abs=0.01)
    with pytest.raises(SystemExit):
        events.main([*args[:-2], "1", "4"])  # bins must start at 0
    with pytest.raises(SystemExit):
        events.main([*args[:2], "--reward", "zero", *args[4:]])
