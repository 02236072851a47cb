"""The generic Gymnasium recorder: real envs from PyPI (CartPole, Pendulum) and a tiny RGB one."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from worldgen.data import Dataset, DatasetError, WindowDataset
from worldgen.env.sources.gym_recorder import episode_seed, record_gym


class TinyRGBEnv(gym.Env):
    """Observations are the RGB image itself; MultiBinary(3) actions move a bright square."""

    metadata = {"render_modes": []}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = gym.spaces.Box(0, 255, (12, 16, 3), np.uint8)
        self.action_space = gym.spaces.MultiBinary(3)
        self.pos = np.zeros(2, int)

    def _obs(self) -> np.ndarray:
        img = np.full((12, 16, 3), 40, np.uint8)
        img[self.pos[0] : self.pos[0] + 3, self.pos[1] : self.pos[1] + 3] = (255, 200, 0)
        return img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = self.np_random.integers(0, 9, 2), 0
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + [int(action[0]) - int(action[1]), int(action[2])], 0, 9)
        self.t += 1
        return self._obs(), 0.0, self.t >= 25, False, {}


class NoPixelsEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = gym.spaces.Discrete(4)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        return 0, {}


for _id, _cls in (("worldgen_test/TinyRGB-v0", TinyRGBEnv), ("worldgen_test/NoPixels-v0", NoPixelsEnv)):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls)


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory) -> Path:
    return record_gym("CartPole-v1", tmp_path_factory.mktemp("gym") / "cartpole", steps=300, seed=3, episode_steps=100)


def test_cartpole_records_real_frames_and_actions(cartpole):
    ds = Dataset(cartpole)
    ds.validate()
    assert ds.num_steps == 300 and ds.resolution == (160, 120) and ds.frame_skip == 1
    assert ds.fields == ["frames", "keys", "mouse", "env_actions"]
    src = ds.index["source"]
    assert src["env_id"] == "CartPole-v1" and src["frames_from"] == "render"
    assert src["env_action_space"]["repr"] == "Discrete(2)" and src["env_action_space"]["flatdim"] == 2
    assert [e.seed for e in ds.episodes] == [episode_seed(3, k) for k in range(len(ds))]
    assert {e.map for e in ds.episodes} == {"CartPole-v1"} and src["fps"] == 50
    assert len(set(e.seed for e in ds.episodes)) == len(ds) > 2  # random play drops the pole soon
    for i, info in enumerate(ds.episodes):
        ep = ds.episode(i)
        assert info.length <= 100
        assert info.terminal or info.length == 100 or i == len(ds) - 1
        # real renders: not blank, and the picture changes as the cart moves
        distinct = len({f.tobytes() for f in ep.frames})
        assert float(ep.frames.std()) > 10 and distinct > len(ep) // 2, (i, distinct, len(ep))
        # Discrete(2): action a holds key a; env_actions is its one-hot; the last step is the no-op
        np.testing.assert_array_equal(ep.keys[:-1, :2], ep.env_actions[:-1].astype(np.uint8))
        assert ep.keys[:-1, :2].sum(1).tolist() == [1] * (len(ep) - 1) and not ep.keys[:, 2:].any()
        assert not ep.keys[-1].any() and not ep.env_actions[-1].any() and not ep.mouse.any()


def test_cartpole_replays_exactly_from_seed_and_actions(cartpole):
    """The stored seed and env actions reproduce the recorded frames: actions match what was played."""
    ds = Dataset(cartpole)
    ep = ds.episode(1)
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env.reset(seed=ds.episodes[1].seed)
    for t in range(len(ep)):
        frame = np.asarray(Image.fromarray(env.render()).resize((160, 120), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(frame, ep.frames[t], err_msg=f"step {t}")
        if t < len(ep) - 1:
            env.step(int(ep.env_actions[t].argmax()))
    env.close()


def test_cartpole_windows_load(cartpole):
    item = WindowDataset(cartpole, 8, fields=("env_actions",))[3]
    assert item["frames"].shape == (8, 120, 160, 3) and item["env_actions"].shape == (8, 2)


def test_rgb_observation_env_and_multibinary_keys(tmp_path):
    out = record_gym("worldgen_test/TinyRGB-v0", tmp_path / "tiny", steps=60, seed=1, resolution=None)
    ds = Dataset(out)
    assert ds.index["source"]["frames_from"] == "observation" and ds.resolution == (16, 12)
    assert [e.length for e in ds.episodes] == [26, 26, 8] and [e.terminal for e in ds.episodes] == [True, True, False]
    ep = ds.episode(0)
    env = TinyRGBEnv()
    obs, _ = env.reset(seed=ds.episodes[0].seed)
    for t in range(len(ep)):
        np.testing.assert_array_equal(ep.frames[t], obs)
        if t < len(ep) - 1:
            np.testing.assert_array_equal(ep.keys[t, :3], ep.env_actions[t])
            obs, *_ = env.step(ep.env_actions[t].astype(np.int8))
    assert ep.keys[:-1, :3].any() and not ep.keys[:, 3:].any()


def test_box_actions_are_stored_and_keys_left_zero(tmp_path):
    ds = Dataset(record_gym("Pendulum-v1", tmp_path / "pendulum", steps=40, seed=0))
    ep = ds.episode(0)
    assert ds.index["source"]["key_mapping"].startswith("none")
    assert ep.env_actions.shape == (40, 1) and np.abs(ep.env_actions).max() <= 2.0
    assert ep.env_actions[:-1].std() > 0.1 and not ep.keys.any() and not ep.mouse.any()


@pytest.mark.filterwarnings("ignore:.*render_mode")  # NoPixels-v0 cannot render, which is the point
def test_bad_inputs_are_clear_errors(tmp_path, cartpole):
    with pytest.raises(ValueError, match="NoSuchEnv-v9"):
        record_gym("NoSuchEnv-v9", tmp_path / "x", steps=10)
    with pytest.raises(ValueError, match="no RGB frames"):
        record_gym("worldgen_test/NoPixels-v0", tmp_path / "y", steps=10)
    with pytest.raises(DatasetError, match="already"):
        record_gym("CartPole-v1", cartpole, steps=10)
    with pytest.raises(ValueError, match="steps"):
        record_gym("CartPole-v1", tmp_path / "z", steps=0)


def test_overwrite_replaces_the_dataset(tmp_path):
    out = record_gym("worldgen_test/TinyRGB-v0", tmp_path / "tiny", steps=30, seed=0)
    record_gym("worldgen_test/TinyRGB-v0", out, steps=10, seed=5, overwrite=True)
    ds = Dataset(out)
    assert ds.num_steps == 10 and ds.episodes[0].seed == episode_seed(5, 0) and not ds.stray_files()
