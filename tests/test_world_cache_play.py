"""Sessions of a world-cache model (worldgen/engine/world_cache.py): each owns a cloud in the
model's pool, every step renders the clouds at the predicted poses in one batch, conditions the
DiT on the views and fuses the generated RGB-D back; the Gymnasium env observes the model's own
depth and pose. The tiny RGB-D model (conftest.cache_model) is trained on the tiny recording."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

WALK = [{"keys": ["forward"], "mouse": [4.0, 0.0]}, {"keys": ["turn_left"], "mouse": [0.0, 0.0]}]


@pytest.fixture(scope="module")
def wm(cache_model):
    from worldgen.engine import WorldModel

    return WorldModel.load(cache_model, device="cpu", steps=2, cache_points=2048)


def test_session_steps_rgb_with_its_own_depth_and_pose(wm):
    assert wm.world is not None and wm.num_starts == 2
    depth, pose = wm.start_geometry(0)
    assert depth.shape == (3, 24, 32) and depth.dtype == np.uint8 and pose.shape == (3, 5)
    s = wm.session(seed=1)
    assert s.depth.shape == (24, 32)
    start_pose = s.camera_pose
    frame = s.step(WALK[0])
    assert frame.shape == (24, 32, 3) and frame.dtype == np.uint8 and frame.flags.c_contiguous
    assert s.depth.shape == (24, 32) and s.depth.dtype == np.uint8
    # The pose moved as the motion model says a forward step with a turn moves it.
    assert np.isfinite(s.camera_pose).all() and not np.allclose(s.camera_pose, start_pose)
    assert wm.world.clouds.num_points()[s.slot] > 0
    s.close()


def test_session_saves_its_cloud_as_ply(wm, tiny_checkpoint, tmp_path):
    s = wm.session(seed=2)
    for a in WALK:
        s.step(a)
    path = s.save_cloud(tmp_path / "session.ply")
    # Its own slot of the pool, in the format tests/test_world_cache.py reads back.
    xyz = wm.world.clouds.points(s.slot)[0]
    assert len(xyz) > 0 and path.read_bytes() == wm.world.clouds.save_ply(tmp_path / "pool.ply", s.slot).read_bytes()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.save_cloud(tmp_path / "closed.ply")
    from worldgen.engine import WorldModel

    rgb_only = WorldModel.load(tiny_checkpoint, device="cpu").session(seed=0)
    with pytest.raises(ValueError, match="world cache"):
        rgb_only.save_cloud(tmp_path / "none.ply")
    o3d = pytest.importorskip("open3d", exc_type=ImportError)  # the optional `pointcloud` extra
    assert np.allclose(np.asarray(o3d.io.read_point_cloud(str(path)).points), xyz)


def test_batch_equals_alone(wm):
    """Sessions stepped together (one render, one DiT batch) give the frames, depth and poses they give alone."""
    alone = []
    for seed in (3, 4):
        s = wm.session(seed=seed)
        alone.append([(s.step(a), s.depth.copy(), s.camera_pose) for a in WALK * 2])
        s.close()
    pair = [wm.session(seed=seed) for seed in (3, 4)]
    for t, a in enumerate(WALK * 2):
        frames = wm.step_many(pair, [a, a])
        for i, s in enumerate(pair):
            f, d, p = alone[i][t]
            # A batched matmul may round a level differently (as tests/test_engine.py allows);
            # the cloud must not turn that into a drift.
            assert np.abs(frames[i].astype(int) - f).max() <= 1
            assert np.abs(s.depth.astype(int) - d).max() <= 1
            np.testing.assert_allclose(s.camera_pose, p, atol=1e-4)
    for s in pair:
        s.close()


def test_memory_stays_bounded_over_many_frames(wm):
    s = wm.session(seed=5)
    before = s.cache_bytes()
    frames = 1000  # ~10 ms a step on the CPU: 10,000 would take ~2 minutes
    for t in range(frames):
        s.step(WALK[(t // 5) % 2])
    assert s.cache_bytes() == before
    clouds = wm.world.clouds
    assert clouds.num_points()[s.slot] == 2048  # full, and at its cap ...
    stamp = clouds.stamp[s.slot]
    assert stamp[stamp >= 0].min() > frames // 2  # ... by forgetting the oldest points
    assert clouds.frames[s.slot] == 3 + frames  # every frame was fused
    s.close()


def test_clear_errors(wm):
    from worldgen.engine import WorldModel
    from worldgen.engine.world_cache import PlayCache
    from worldgen.models.tokenizer import Tokenizer

    frames, acts = wm.start(0)
    depth, pose = wm.start_geometry(0)
    with pytest.raises(ValueError, match=r"needs context_depth .* \(missing: context_depth\)"):
        wm.session(frames, acts, context_poses=pose)
    with pytest.raises(ValueError, match="missing: context_poses"):
        wm.session(frames, acts, context_depth=depth)
    with pytest.raises(ValueError, match="context_depth must be uint8"):
        wm.session(frames, acts, context_poses=pose, context_depth=depth[:, :10])
    s = wm.session(frames, acts, context_poses=pose, context_depth=depth)  # given in full: plays
    assert s.step(WALK[0]).shape == (24, 32, 3)
    s.close()
    # World-cache settings for a model without depth (an RGB tokenizer).
    with pytest.raises(ValueError, match="needs a model that generates depth"):
        rgb = Tokenizer(dataclasses.replace(wm.tokenizer.cfg, in_channels=3))
        WorldModel(rgb, wm.dit, world_cache=wm.world.settings, device="cpu")
    # A world-cache DiT without its settings.
    with pytest.raises(ValueError, match="needs its world-cache settings"):
        WorldModel(wm.tokenizer, wm.dit, device="cpu")
    assert isinstance(wm.world.settings, PlayCache)


def test_rgb_only_model_refuses_cache_points(tiny_checkpoint):
    from worldgen.engine import WorldModel

    with pytest.raises(ValueError, match="trained with the world cache"):
        WorldModel.load(tiny_checkpoint, device="cpu", cache_points=1024)
    with pytest.raises(ValueError, match="trained with the world cache"):
        WorldModel.load(tiny_checkpoint, device="cpu", pose_correction=True)


def test_pose_correction_moves_a_sessions_camera(cache_model):
    """``pose_correction`` (on by default): after each step the frame's depth and colour correct the
    camera the motion model predicted, and the session reports the corrected one; batched
    sessions as alone. Off, the predicted cameras stand."""
    from worldgen.engine import WorldModel

    cams = {}
    for on in (False, True):
        wm = WorldModel.load(cache_model, device="cpu", steps=1, cache_points=2048, pose_correction=on)
        assert (wm.world.settings.align is not None) == on
        sessions = [wm.session(seed=s) for s in (0, 1)]
        alone = wm.session(seed=1)
        for _ in range(3):
            wm.step_many(sessions, [{"keys": ["forward"]}] * 2)
            alone.step({"keys": ["forward"]})
        cams[on] = [s.camera_pose for s in sessions]
        np.testing.assert_allclose(alone.camera_pose, cams[on][1], atol=1e-3)
    assert any(not np.allclose(a, b) for a, b in zip(cams[False], cams[True]))


def test_env_observes_the_models_own_depth_and_pose(wm):
    from worldgen.env import WorldModelEnv

    env = WorldModelEnv(wm, observations=("rgb", "depth", "pose"), reward="zero", horizon=None)
    assert env.world.geometry is None  # no geometry head: the model makes both
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs["depth"][..., 0], env.session.depth)
    obs, *_ = env.step({"keys": ["forward"], "mouse": [3.0, 0.0]})
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs["depth"][..., 0], env.session.depth)
    want = env.session.camera_pose
    want[3] = (want[3] + 180) % 360 - 180
    np.testing.assert_allclose(obs["pose"], want, atol=1e-4)
    env.close()


def test_compiled_step_traces_once_with_the_view(wm, cache_model):
    """``wm.compile()``'s step takes the view as ``cond``: traced once (Dynamo's tracing alone,
    counted by a test backend, as tests/test_engine.py does) and gives the eager frames; the
    render and encode stay outside the compiled region."""
    from torch._dynamo.testing import CompileCounter

    from worldgen.engine import WorldModel

    compiled = WorldModel.load(cache_model, device="cpu", steps=2, cache_points=2048)
    counter = CompileCounter()
    compiled._step = torch.compile(compiled._denoise, backend=counter, dynamic=False)
    a, b = wm.session(seed=7), compiled.session(seed=7)
    for act in WALK * 2:
        np.testing.assert_array_equal(a.step(act), b.step(act))
        np.testing.assert_array_equal(a.depth, b.depth)
    assert counter.frame_count == 1
    a.close()


def test_long_session_stability_starts_from_recorded_geometry(wm, doom_recording):
    """The stability judge (and long_horizon.py, the sampler sweep) opens each session from a
    real context; a world-cache model's sessions also get that context's depth and poses."""
    from worldgen.data import Dataset
    from worldgen.evaluation.stability import stability

    ds = Dataset(doom_recording)
    r = stability(wm, ds, frames=4, sessions=2, context=3, segment=4)
    assert len(r["series"]["mean"]) == 2 and len(r["series"]["mean"][0]) == 4
    starts = [tuple(s) for s in r["starts"]]
    again = stability(wm, ds, frames=4, context=3, segment=4, starts=starts)
    assert again["series"] == r["series"]  # the same starts and seeds: the same sessions
