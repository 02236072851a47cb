"""The env with RL libraries nobody here wrote (issue 27): every action space decodes inside the
trained mouse range, Gymnasium's check_env passes on every observation/action combination,
max_episode_steps is honoured, and Stable-Baselines3's PPO and DQN train on the SB3 vector env.

Everything runs the tiny model of ``tiny_checkpoint`` (conftest.py) on the CPU.
"""

from __future__ import annotations

import itertools
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import worldgen.env  # noqa: F401  (registers worldgen/Doom-v0)
from worldgen import checkpoint
from worldgen.actions import ActionError
from worldgen.env.gym.action_spaces import ACTION_SPACES, DISCRETE_ACTIONS, ActionCodec
from worldgen.env.gym.world_model_env import OBSERVATION_KEYS, WorldModelEnv, WorldModelVectorEnv, set_torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores

OBSERVATIONS = [c for n in (1, 2, 3) for c in itertools.combinations(OBSERVATION_KEYS, n)]  # all 7


def test_every_action_space_stays_in_the_trained_mouse_range(tiny_checkpoint, doom_recording):
    from worldgen.data import Dataset

    ds = Dataset(doom_recording)
    covered = np.abs(np.concatenate([ds.read(i, "mouse") for i in range(len(ds))])).max(0)
    stored = checkpoint.config(tiny_checkpoint, "dynamics")["mouse_range"]  # training wrote what the data covers
    assert np.allclose(stored, covered, atol=1e-3) and covered[0] > 0
    rng = np.random.default_rng(0)
    for kind in ACTION_SPACES:
        codec = ActionCodec(kind, (30.0, 2.0))
        codec.space.seed(int(rng.integers(1000)))
        mouse = np.stack([codec.decode(codec.space.sample()).mouse for _ in range(300)])
        assert (np.abs(mouse) <= [30.0, 2.0]).all(), kind
        if kind != "discrete":  # discrete turns by key; the others reach both ends of the range
            assert np.isclose(np.abs(mouse).max(0), [30.0, 2.0], rtol=0.05).all(), (kind, np.abs(mouse).max(0))
    env = WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero")
    assert env.action_space["mouse"].high.tolist() == pytest.approx(stored)


def test_actions_decode_as_documented():
    d = ActionCodec("dict", (30.0, 2.0))
    clipped = d.decode({"keys": np.zeros(8, np.int8), "mouse": np.array([100.0, -5.0], np.float32)})
    assert clipped.mouse.tolist() == [30.0, -2.0]  # in the schema, beyond the trained range: clipped
    with pytest.raises(ActionError, match=r"within \+-180"):
        d.decode({"keys": np.zeros(8, np.int8), "mouse": np.array([200.0, 0.0], np.float32)})
    box = ActionCodec("box", (30.0, 2.0)).decode(np.array([0.1, -0.1, 0, 0, 0, 0.9, 1, 0, -0.5, 1.0], np.float32))
    assert box.to_dict() == {"keys": ["forward", "turn_right", "attack"], "mouse": [-15.0, 2.0]}
    md = ActionCodec("multidiscrete", (30.0, 2.0))
    assert md.decode(np.array([2, 1, 1, 0, 1, 0, 3])).to_dict() == {
        "keys": ["back", "strafe_left", "turn_left", "use"],
        "mouse": [-30.0, 1.0],
    }
    assert ActionCodec("discrete", (30.0, 2.0)).decode(np.int64(8)).to_dict()["keys"] == ["forward", "use"]
    for kind, bad, message in (
        ("discrete", 9, r"integer in \[0, 9\)"),
        ("discrete", 1.5, "integer"),
        ("multidiscrete", [3, 0, 0, 0, 0, 0, 0], "7 integers below"),
        ("box", np.zeros(9), "10 finite numbers"),
        ("box", np.full(10, np.nan), "finite"),
    ):
        with pytest.raises(ActionError, match=message):
            ActionCodec(kind, (30.0, 2.0)).decode(bad)
    with pytest.raises(ValueError, match="action_space must be one of"):
        ActionCodec("continuous", (30.0, 2.0))
    with pytest.raises(ValueError, match="mouse_range must lie in"):
        ActionCodec("box", (200.0, 2.0))


@pytest.mark.parametrize("observations", OBSERVATIONS + ["atari"])
def test_check_env_on_every_observation_and_action_space(tiny_checkpoint, tiny_geometry_run, observations):
    obs_kwargs = {"preset": "atari"} if observations == "atari" else {"observations": observations}
    for kind in ACTION_SPACES:
        env = WorldModelEnv(
            str(tiny_checkpoint),
            device="cpu",
            reward="zero",
            geometry=str(tiny_geometry_run[0] / "ckpt"),
            action_space=kind,
            **obs_kwargs,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env, skip_render_check=True)
        # Gymnasium advises [-1, 1] Box actions; only the dict space's mouse degrees do not follow it.
        assert not [w for w in caught if "action space" not in str(w.message) or kind != "dict"], [
            str(w.message) for w in caught
        ]
        if "depth" in observations:
            assert env.observation_space["depth"].shape == (24, 32, 1)
        if observations == "atari":
            assert env.observation_space.shape == (4, 84, 84)
        env.close()


def test_max_episode_steps_is_registered_and_honoured(tiny_checkpoint):
    env = gymnasium.make("worldgen/Doom-v0", model=str(tiny_checkpoint), device="cpu", reward="zero")
    assert env.spec.max_episode_steps == 1000 and env.unwrapped.world.horizon is None  # TimeLimit truncates
    env = gymnasium.wrappers.TimeAwareObservation(
        gymnasium.make(
            "worldgen/Doom-v0",
            model=str(tiny_checkpoint),
            device="cpu",
            reward="zero",
            max_episode_steps=3,
            action_space="discrete",
        ),
        flatten=False,
    )
    obs, _ = env.reset(seed=0)
    assert obs["time"] == 0
    ends = [env.step(1)[3] for _ in range(3)]
    assert ends == [False, False, True]
    envs = gymnasium.make_vec(
        "worldgen/DoomAtari-v0",
        num_envs=2,
        vectorization_mode="vector_entry_point",
        model=str(tiny_checkpoint),
        device="cpu",
        reward="zero",
        max_episode_steps=2,
    )
    envs.reset(seed=0)
    assert [envs.step(np.array([1, 2]))[3].tolist() for _ in range(2)] == [[False, False], [True, True]]
    envs.close()


def test_one_torch_thread_on_small_cpus(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr("os.cpu_count", lambda: 64)
        set_torch_threads(None, "cpu")
        assert torch.get_num_threads() == 2  # a big CPU keeps torch's choice
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        set_torch_threads(None, "cpu")
        assert torch.get_num_threads() == 1
        set_torch_threads(2, "cpu")
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="torch_threads must be >= 1"):
            set_torch_threads(0, "cpu")
    finally:
        torch.set_num_threads(before)


def test_same_step_autoreset_matches_gymnasium(tiny_checkpoint):
    """Same-step autoreset: the step that ends an episode returns the next episode's first
    observation; the last one is in final_obs, as Gymnasium's SyncVectorEnv does."""
    from gymnasium.vector import AutoresetMode

    envs = WorldModelVectorEnv(
        2,
        str(tiny_checkpoint),
        device="cpu",
        reward="zero",
        horizon=2,
        action_space="discrete",
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    single = WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero", horizon=2, action_space="discrete")
    envs.reset(seed=[4, 5])
    single.reset(seed=4)
    envs.step(np.array([1, 1]))
    single.step(1)
    obs, _, _, trunc, info = envs.step(np.array([1, 1]))
    last = single.step(1)[0]
    assert trunc.tolist() == [True, True] and np.array_equal(info["final_obs"][0], last)
    assert np.array_equal(obs[0], single.reset()[0]) and info["final_info"]["steps"].tolist() == [2, 2]
    envs.close()
    single.close()


# --- Stable-Baselines3 (the rl extra) ---------------------------------------------------------
@pytest.fixture
def sb3():
    return pytest.importorskip("stable_baselines3")


def forward_reward(prev, action, frame) -> float:
    """1 when the forward key is held: with gamma 0, a task PPO learns in a few hundred steps."""
    return float(action.keys[0])


@pytest.mark.parametrize("kind", ["discrete", "multidiscrete", "box"])
def test_sb3_check_env_accepts_the_env(sb3, tiny_checkpoint, kind):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = WorldModelEnv(str(tiny_checkpoint), device="cpu", reward="zero", action_space=kind, preset="atari")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SB3 warning either (image layout, action bounds, ...)
        sb3_check_env(env)
    env.close()


@pytest.mark.parametrize("kind, preset", [("discrete", None), ("multidiscrete", None), ("box", None)])
def test_sb3_ppo_learns_in_the_model(sb3, tiny_checkpoint, kind, preset):
    """PPO over the SB3 vector env: episodes end as max_episode_steps says, each step is one
    batched forward of the model, and the policy learns to hold forward."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from worldgen.env.gym.sb3 import SB3VecEnv

    venv = SB3VecEnv(
        2, str(tiny_checkpoint), device="cpu", reward=forward_reward, action_space=kind, preset=preset, horizon=16
    )
    forwards = []
    step_many = venv.model.step_many
    venv.model.step_many = lambda sessions, acts: forwards.append(len(sessions)) or step_many(sessions, acts)
    venv = VecMonitor(venv)
    model = PPO(
        "CnnPolicy" if preset else "MlpPolicy",
        venv,
        n_steps=64,
        batch_size=64,
        n_epochs=4,
        gamma=0.0,
        learning_rate=3e-3,
        seed=0,
        device="cpu",
        policy_kwargs={"net_arch": [32]} if not preset else None,
    )
    obs = venv.reset()
    codec = venv.unwrapped.venv.world.codec

    def holds_forward() -> float:  # the share of the policy's sampled actions that hold forward
        acts = [model.predict(obs, deterministic=False)[0] for _ in range(100)]
        return float(np.mean([codec.decode(a[0]).keys[0] for a in acts]))

    before = holds_forward()
    model.learn(384)
    assert forwards[-192:] == [2] * 192  # one forward for both sub-envs, every step
    assert len(model.ep_info_buffer) >= 20 and all(e["l"] == 16 for e in model.ep_info_buffer)  # 384 / 16 per episode
    assert holds_forward() > before + 0.15, before
    venv.close()


def test_sb3_dqn_trains_on_the_atari_preset(sb3, tiny_checkpoint):
    from stable_baselines3 import DQN

    from worldgen.env.gym.sb3 import SB3VecEnv

    venv = SB3VecEnv(
        1,
        str(tiny_checkpoint),
        device="cpu",
        reward=forward_reward,
        action_space="discrete",
        preset="atari",
        horizon=16,
    )
    model = DQN(
        "CnnPolicy",
        venv,
        buffer_size=400,
        learning_starts=64,
        train_freq=8,
        target_update_interval=64,
        exploration_fraction=0.5,
        learning_rate=1e-3,
        batch_size=16,
        seed=0,
        device="cpu",
    )
    model.learn(200)
    assert model.num_timesteps == 200 and model.replay_buffer.size() == 200
    obs = venv.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert venv.action_space.contains(int(action[0])) and DISCRETE_ACTIONS[int(action[0])][0]
    venv.close()
