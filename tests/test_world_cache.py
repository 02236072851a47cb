"""The point-cloud world cache (memory/): camera model, unprojection, Voyager's update rule,
bounded memory, batched z-buffered rendering and .ply export, on the real ViZDoom recording."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import TINY_WORLD_CACHE  # tests/ is on sys.path under pytest

from worldgen.data import Dataset
from worldgen.memory.camera import DOOM, Camera, reprojection_error
from worldgen.memory.cloud import CacheConfig, WorldCache, write_ply
from worldgen.memory.motion import MotionModel
from worldgen.memory.views import PoseNoise, history_views

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def episode(doom_recording):
    """Episode "a" of the recording: frames (N, H, W, 3) uint8, depth (N, H, W) levels, pose (N, 5)."""
    ds = Dataset(doom_recording)
    e = ds.episode_index("a")
    return (
        torch.from_numpy(ds.read(e, "frames")),
        torch.from_numpy(ds.read(e, "depth")),
        torch.from_numpy(ds.read(e, "pose")),
    )


@pytest.fixture(scope="module")
def camera(doom_recording):
    return DOOM.resized(*Dataset(doom_recording).resolution)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean(-1)[mask].mean()
    return float(10 * torch.log10(255.0**2 / mse))


def test_unproject_project_round_trip_with_pitch():
    cam = DOOM.resized(32, 24)
    g = torch.Generator().manual_seed(0)
    depth = torch.randint(1, 200, (3, 24, 32), generator=g).float()
    pose = torch.tensor([[10.0, -5, 41, 30, 0], [0, 0, 50, 200, 12], [-300, 7, 30, 359, -20]])
    points, valid = cam.unproject(depth, pose)
    uv, z = cam.project(points.flatten(1, 2), pose)
    v, u = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    assert valid.all()
    assert torch.allclose(uv, torch.stack([u, v], -1).reshape(1, -1, 2).expand(3, -1, -1), atol=1e-3)
    assert torch.allclose(cam.world_to_depth(z), depth.flatten(1), atol=1e-3)
    assert cam.in_view(points.flatten(1, 2), pose).all()
    # Levels outside [min_level, max_level) are not geometry: the weapon sprite (0) and the sky (255).
    depth[0, 0, 0], depth[0, 0, 1] = 0, 255
    assert not cam.unproject(depth, pose)[1][0, 0, :2].any()
    with pytest.raises(ValueError, match="use Camera.resized"):
        DOOM.unproject(depth, pose)


def test_doom_camera_explains_the_recording(episode, camera):
    """The fitted ViZDoom camera explains the recording: reprojected depth agrees with the next
    frame's, and the next frame rendered from the last one's cloud is better than with a wrong
    field of view (at 32x24 the depth is too coarse to tell a 15% error apart; the full-resolution
    fit is benchmarks/fit_camera.py)."""
    frames, depth, pose = episode
    err = reprojection_error(camera, depth, pose)
    print(f"reprojection error at 32x24: {err}")
    assert err["median_levels"] < 1.0 and err["inliers"] > 0.7  # measured 0.76 levels, 78%
    # measured: 29.10 dB at 90 degrees, 27.41 at 60, 28.16 at 120

    def next_frame_psnr(cam: Camera) -> float:
        cache = WorldCache(cam, CacheConfig(max_points=cam.width * cam.height), batch=len(frames) - 1)
        cache.update(frames[:-1], depth[:-1], pose[:-1])
        view = cache.render(pose[1:])
        return psnr(view.rgb, frames[1:], view.mask)

    right = next_frame_psnr(camera)
    for hfov in (60.0, 120.0):
        wrong = Camera.from_hfov(
            camera.width,
            camera.height,
            hfov,
            depth_scale=camera.depth_scale,
            depth_offset=camera.depth_offset,
            min_level=1,
            max_level=255,
        )
        worse = next_frame_psnr(wrong)
        print(f"next frame from the cloud: {right:.2f} dB at 90 degrees, {worse:.2f} dB at {hfov:.0f}")
        assert worse < right - 0.5
    assert Camera.from_dict(camera.to_dict()) == camera


def test_render_at_the_same_pose_gives_the_frame_back(episode, camera):
    frames, depth, pose = episode
    cache = WorldCache(camera, CacheConfig(max_points=4096))
    cache.update(frames[5:6], depth[5:6], pose[5:6])
    view = cache.render(pose[5:6])
    valid = camera.unproject(depth[5:6], pose[5:6])[1]
    assert torch.equal(view.mask, valid)
    assert torch.equal(view.rgb[view.mask], frames[5:6][view.mask])
    assert torch.allclose(view.depth[view.mask], camera.depth_to_world(depth[5:6])[view.mask], rtol=1e-4)


def test_next_frame_rendered_from_the_cloud_of_the_last(episode, camera):
    """Each real frame's cloud rendered at the next frame's true pose matches the next frame where
    the render is valid, far better than holding the last frame."""
    frames, depth, pose = episode
    n = len(frames) - 1
    cache = WorldCache(camera, CacheConfig(max_points=camera.width * camera.height), batch=n)
    cache.update(frames[:-1], depth[:-1], pose[:-1])
    view = cache.render(pose[1:])
    rendered = psnr(view.rgb, frames[1:], view.mask)
    held = psnr(frames[:-1], frames[1:], torch.ones_like(view.mask))
    print(f"cache view {rendered:.2f} dB on {view.mask.float().mean():.1%} of pixels; hold-last {held:.2f} dB")
    assert rendered > 27.0 and rendered > held + 2.0  # measured 28.96 and 25.84 dB
    assert view.mask.float().mean() > 0.75


def test_small_splats_render_as_when_every_neighbour_is_tested(episode, camera, monkeypatch):
    """Splats under 3 pixels wide test only the 3x3 pixels around their own: a wall of a real
    frame's colours, splats 3.6 times its footprint, seen from where it was seen (splats 3.6 pixels
    wide) and from twice as far (1.8), renders as when all (2k + 1)^2 pixels are tested."""
    frames, _, pose = episode
    cache = WorldCache(camera, CacheConfig(max_points=camera.width * camera.height, splat_scale=3.6), batch=2)
    cache.update(frames[5:6].expand(2, -1, -1, -1), _wall(camera, 100.0, 2), pose[5:6].expand(2, -1))
    far = pose[5].clone()
    far[0] -= 100 * math.cos(math.radians(float(far[3])))
    far[1] -= 100 * math.sin(math.radians(float(far[3])))
    poses = torch.stack([pose[5], far])
    tested = []
    cover = WorldCache._cover

    def spy(self, uv, z, half, session, slot, radius):
        tested.append((radius, len(z)))
        return cover(self, uv, z, half, session, slot, radius)

    monkeypatch.setattr(WorldCache, "_cover", spy)
    fast = cache._splat(poses)  # z-buffer, front point, blended colour before rounding
    assert [r for r, n in tested if n] == [1, cache.config.max_splat]  # both kinds of splat are in view
    monkeypatch.setattr(WorldCache, "_cover", lambda self, *a: cover(self, *a[:-1], self.config.max_splat))
    full = cache._splat(poses)
    assert all(torch.equal(a, b) for a, b in zip(fast, full))


def _wall(cam: Camera, distance: float, batch: int = 1) -> torch.Tensor:
    """Depth levels of a wall facing the camera ``distance`` units away."""
    return cam.world_to_depth(torch.full((batch, cam.height, cam.width), distance))


def test_a_revisited_wall_is_not_duplicated(episode, camera):
    frames, depth, pose = episode
    cache = WorldCache(camera, CacheConfig(max_points=8192))
    cache.update(frames[:1], depth[:1], pose[:1])
    first = int(cache.num_points())
    cache.update(frames[:1], depth[:1], pose[:1])  # the same view again: everything is explained
    assert int(cache.num_points()) == first
    # Walking on: a next frame adds far fewer points than it has pixels (most of it is known).
    cache.update(frames[1:2], depth[1:2], pose[1:2])
    assert int(cache.num_points()) - first < 0.4 * first


def test_back_of_a_wall_is_added_front_is_not():
    cam = DOOM.resized(32, 24)
    cache = WorldCache(cam, CacheConfig(max_points=4096))
    rgb = torch.full((1, 24, 32, 3), 100, dtype=torch.uint8)
    front = torch.tensor([[0.0, 0, 41, 0, 0]])  # looking along +x at a wall 100 units away
    cache.update(rgb, _wall(cam, 100.0), front)
    n = int(cache.num_points())
    # From the other side, looking back along -x at the same plane: the cached points' normals face
    # away from this camera, so the view is not explained by them and its points are added.
    back = torch.tensor([[200.0, 0, 41, 180, 0]])
    cache.update(rgb, _wall(cam, 100.0), back)
    assert int(cache.num_points()) == 2 * n


def test_a_contradicted_point_is_removed():
    cam = DOOM.resized(32, 24)
    cache = WorldCache(cam, CacheConfig(max_points=4096))
    pose = torch.tensor([[0.0, 0, 41, 0, 0]])
    rgb = torch.full((1, 24, 32, 3), 50, dtype=torch.uint8)
    near = _wall(cam, 60.0)
    near[:, :, :16] = _wall(cam, 150.0)[:, :, :16]  # a thing at 60 units on the right half, a wall at 150
    cache.update(rgb, near, pose)
    # The thing has gone: the same camera now sees the wall at 150 everywhere, behind where the
    # cached points of the thing are. Those points are contradicted and removed.
    cache.update(rgb, _wall(cam, 150.0), pose)
    xyz, _, _ = cache.points(0)
    assert len(xyz) == 24 * 32
    assert np.allclose(xyz[:, 0], 150.0, atol=1e-3)


def test_memory_stays_bounded_and_keeps_the_newest(episode, camera):
    frames, depth, pose = episode
    config = CacheConfig(max_points=600)  # less than one 32x24 frame
    cache = WorldCache(camera, config)
    size = cache.nbytes()
    for t in range(len(frames)):
        cache.update(frames[t : t + 1], depth[t : t + 1], pose[t : t + 1])
        assert int(cache.num_points()) <= config.max_points
    assert cache.nbytes() == size
    # What was just seen survives: rendering at the last pose covers most of the valid view.
    view = cache.render(pose[-1:])
    assert view.mask.float().mean() > 0.5


def test_batch_equals_alone(episode, camera):
    frames, depth, pose = episode
    steps = [(0, 7, 14), (1, 8, 20), (2, 9, 30)]  # three sessions at different frames of the episode
    config = CacheConfig(max_points=1500)
    batched = WorldCache(camera, config, batch=3)
    alone = [WorldCache(camera, config) for _ in range(3)]
    for k in range(3):
        t = torch.tensor([s[k] for s in steps])
        active = torch.tensor([True, k != 1, True])  # session 1 skips a frame: 'active' leaves it alone
        batched.update(frames[t], depth[t], pose[t], active=active)
        for b in range(3):
            if active[b]:
                alone[b].update(frames[t[b]][None], depth[t[b]][None], pose[t[b]][None])
    at = pose[torch.tensor([s[-1] for s in steps]) + 1]
    view = batched.render(at)
    for b in range(3):
        one = alone[b].render(at[b : b + 1])
        assert torch.equal(view.mask[b], one.mask[0]) and torch.equal(view.rgb[b], one.rgb[0])
        assert torch.allclose(view.depth[b], one.depth[0])
        assert int(batched.num_points()[b]) == int(alone[b].num_points())


def test_ply_round_trip(episode, camera, tmp_path):
    frames, depth, pose = episode
    cache = WorldCache(camera, CacheConfig(max_points=4096))
    for t in range(0, 20, 4):
        cache.update(frames[t : t + 1], depth[t : t + 1], pose[t : t + 1])
    path = cache.save_ply(tmp_path / "cloud.ply")
    xyz, rgb, normal = cache.points(0)
    head, _, body = path.read_bytes().partition(b"end_header\n")
    assert f"element vertex {len(xyz)}".encode() in head
    rows = np.frombuffer(body, [("xyz", "<f4", 3), ("n", "<f4", 3), ("rgb", "u1", 3)])
    assert np.array_equal(rows["xyz"], xyz) and np.array_equal(rows["rgb"], rgb) and np.array_equal(rows["n"], normal)
    with pytest.raises(ValueError, match="same number of points"):
        write_ply(tmp_path / "bad.ply", xyz, rgb[:-1])
    o3d = pytest.importorskip("open3d", exc_type=ImportError)  # the optional `pointcloud` extra
    cloud = o3d.io.read_point_cloud(str(path))
    assert np.allclose(np.asarray(cloud.points), xyz)
    assert np.allclose(np.asarray(cloud.colors) * 255, rgb, atol=0.5)


def test_bad_input_is_named():
    cam = DOOM.resized(32, 24)
    cache = WorldCache(cam, CacheConfig(max_points=64), batch=2)
    with pytest.raises(ValueError, match=r"need pose \(2, 5\)"):
        cache.render(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="need rgb"):
        cache.update(torch.zeros(2, 24, 31, 3, dtype=torch.uint8), torch.zeros(2, 24, 32), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="max_points"):
        CacheConfig(max_points=0)
    assert math.isclose(cam.hfov_deg, 90.0)


def test_history_views_batch_every_frame_of_every_window(episode, camera):
    frames, depth, pose = episode
    starts = (3, 20)
    win = lambda x: torch.stack([x[s : s + 5] for s in starts])  # noqa: E731  (2 windows, 5 frames)
    view = history_views(camera, win(frames), win(depth), win(pose), history=2)
    assert view.rgb.shape == (2, 5, 24, 32, 3) and view.mask.shape == (2, 5, 24, 32)
    assert not view.mask[:, 0].any()  # nothing before the window's first frame
    # Frame 3 of window 1 is the cloud of its 2 predecessors (newest first) rendered at its pose.
    one = WorldCache(camera, CacheConfig(max_points=2 * 24 * 32))
    for t in (22, 21):
        one.update(frames[t : t + 1], depth[t : t + 1], pose[t : t + 1])
    alone = one.render(pose[23:24])
    assert torch.equal(view.mask[1, 3], alone.mask[0]) and torch.equal(view.rgb[1, 3], alone.rgb[0])
    # Pose noise moves the views, seeded.
    noise = PoseNoise(position=8.0, yaw=3.0)
    a = history_views(
        camera, win(frames), win(depth), win(pose), 2, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    b = history_views(
        camera, win(frames), win(depth), win(pose), 2, noise=noise, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a.rgb, b.rgb) and not torch.equal(a.rgb, view.rgb)


def test_view_condition_shapes_and_a_model_without_depth(episode, camera, tiny_tokenizer_run):
    from worldgen.models import MODELS, DiT, Tokenizer, TokenizerConfig, load_tokenizer
    from worldgen.models.world_cache import cond_channels, view_condition

    frames, depth, pose = episode
    tok = Tokenizer(
        TokenizerConfig(image_size=(24, 32), in_channels=4, latent_channels=4, downsample=8, channels=(8, 8, 8, 8))
    )
    view = history_views(camera, frames[None, :6], depth[None, :6], pose[None, :6], history=2)
    cond = view_condition(tok, view, camera)  # (1, 6, 5, 3, 4)
    assert cond.shape == (1, 6, 5, 3, 4)
    assert torch.all(cond[0, 0, -1] == -1) and cond[0, 1:, -1].mean() > 0  # mask cover: none, then most
    dit = DiT(
        dataclasses.replace(MODELS["tiny"], latent_channels=4, latent_size=(3, 4), cond_channels=cond_channels(tok.cfg))
    )
    x = torch.randn(1, 6, 4, 3, 4)
    out = dit(x, torch.rand(1, 6), torch.zeros(1, 6, 10), cond=cond)
    assert out.shape == x.shape
    # The shared tiny model's tokenizer is RGB only: it cannot carry the cache's depth.
    rgb_tok = load_tokenizer(tiny_tokenizer_run[0] / "ckpt")
    with pytest.raises(ValueError, match="needs a model that generates depth"):
        view_condition(rgb_tok, view, camera)
    with pytest.raises(ValueError, match="needs a model that generates depth"):
        cond_channels(rgb_tok.cfg)


def test_cloud_cli_builds_a_ply_and_a_picture(doom_recording, tmp_path, capsys):
    from worldgen.cli import main

    out = tmp_path / "a.ply"
    assert (
        main(
            [
                "cloud",
                "build",
                str(doom_recording),
                "--episode",
                "a",
                "--out",
                str(out),
                "--picture",
                str(tmp_path / "a.png"),
                "--max-points",
                "3000",
            ]
        )
        == 0
    )
    n = int(out.read_bytes().split(b"element vertex ")[1].split(b"\n")[0])
    assert 0 < n <= 3000 and (tmp_path / "a.png").stat().st_size > 1000
    assert main(["cloud", "view", str(tmp_path / "missing.ply")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_doctests():
    import doctest

    from worldgen.memory import align, cloud, motion, views
    from worldgen.memory import camera as camera_module
    from worldgen.models import world_cache

    for module in (align, camera_module, cloud, motion, views, world_cache):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_training_with_the_world_cache(doom_recording, tiny_tokenizer_run, tiny_rgbd_tokenizer, tmp_path):
    """`train dynamics --world-cache H` conditions the DiT on each frame's cache view through an
    RGB-D tokenizer, and names the problem when the tokenizer has no depth."""
    from worldgen import checkpoint
    from worldgen.models import load_dit
    from worldgen.training.dynamics import DynamicsTrainConfig
    from worldgen.training.dynamics import train as train_dynamics

    tiny = dict(data=str(doom_recording), **TINY_WORLD_CACHE)
    with pytest.raises(ValueError, match="needs a model that generates depth"):
        train_dynamics(
            DynamicsTrainConfig(out=str(tmp_path / "rgb"), tokenizer=str(tiny_tokenizer_run[0]), steps=2, **tiny)
        )
    summary = train_dynamics(
        DynamicsTrainConfig(out=str(tmp_path / "dyn"), tokenizer=str(tiny_rgbd_tokenizer), steps=10, **tiny)
    )
    assert math.isfinite(summary["heldout_loss"])
    model = load_dit(tmp_path / "dyn" / "ckpt")
    assert model.cfg.cond_channels == 4 + 1
    extra = checkpoint.config(tmp_path / "dyn" / "ckpt", "dynamics")["world_cache"]
    assert extra["history"] == 2 and Camera.from_dict(extra["camera"]) == DOOM.resized(32, 24)
    assert MotionModel.from_dict(extra["motion"]).weight.shape == (5 + 2 * 10 + 1, 5)


def test_world_cache_rollouts_see_clouds_of_the_generated_frames(doom_recording, tiny_rgbd_tokenizer, tmp_path):
    """`--world-cache` with `--rollout-frames`: a played frame's view is rendered from the cloud of
    its predecessors with the generated frames in place of the real ones (decoded RGB-D), and such a
    fine-tune trains."""
    from worldgen.models.world_cache import decode_rgbd, window_condition
    from worldgen.training.distributed import Dist
    from worldgen.training.dynamics import DynamicsTask, DynamicsTrainConfig
    from worldgen.training.dynamics import train as train_dynamics
    from worldgen.training.run import Run

    cfg = DynamicsTrainConfig(
        data=str(doom_recording),
        out=str(tmp_path / "dyn"),
        tokenizer=str(tiny_rgbd_tokenizer),
        steps=3,
        rollout_frames=2,
        rollout_share=1.0,
        **TINY_WORLD_CACHE,
    )
    task = DynamicsTask.from_run(cfg, Run(tmp_path / "task"), Dist())
    L = 2 * cfg.window - 1  # a rollout window: 3 real frames, up to 3 played, then real ones
    rows = task.starts[:2, None] + torch.arange(L)
    x0, pose = task.train.z[rows].float(), task.train.pose[rows]
    generated = x0[:, 3:4] + 2 * torch.randn_like(x0[:, 3:4])  # frame 3, played unlike the real one

    view = task.rollout_cache(x0, pose, torch.Generator().manual_seed(0))(generated)  # frame 4's view
    real = task.rollout_cache(x0, pose, torch.Generator().manual_seed(0))(x0[:, 3:4])
    rgb, depth = decode_rgbd(task.tokenizer, torch.cat([x0[:, :3], generated, x0[:, 4:]], 1))
    expect = window_condition(
        task.tokenizer,
        task.camera,
        rgb[:, :5],
        depth[:, :5],
        pose[:, :5],
        2,
        4,
        PoseNoise(),
        torch.Generator().manual_seed(0),
    )
    assert view.shape == (2, 1, 4 + 1, *x0.shape[-2:]) and torch.allclose(view, expect)
    assert not torch.allclose(view, real, atol=1e-3)  # the generated frame is in the cloud, not the real one

    # A whole draw that plays frames (g > 0, its first draw): the window's views come with it, one per frame.
    seed = next(i for i in range(100) if torch.randint(3, (), generator=torch.Generator().manual_seed(i)) > 0)
    (x0, acts, t, eps, drop, cond), first_target = task.draw_rollout(torch.Generator().manual_seed(seed), 4)
    assert cond.shape == (4, cfg.window, 4 + 1, *x0.shape[-2:]) and torch.isfinite(cond).all()
    summary = train_dynamics(cfg)
    assert summary["finished"] and math.isfinite(summary["heldout_loss"])


def test_motion_model_predicts_the_next_pose_from_the_actions(doom_recording):
    """Fitted on two episodes, the next pose of the third from its momentum and actions: the yaw
    follows the actions (a constant-velocity guess misses every change of turn)."""
    from worldgen import actions
    from worldgen.memory.camera import relative_pose
    from worldgen.memory.motion import compose, momentum

    ds = Dataset(doom_recording)

    def read(name):
        e = ds.episode_index(name)
        return (
            torch.from_numpy(ds.read(e, "pose")),
            torch.from_numpy(actions.to_vector(ds.read(e, "keys"), ds.read(e, "mouse"))),
        )

    train = [read("a"), read("b")]
    model = MotionModel.fit([p for p, _ in train], [a for _, a in train])
    pose, act = read("c")
    true = pose[2:]

    def error(guess):  # mean position (map units) and yaw (degrees) error per step
        r = relative_pose(true.float(), guess)
        return float(r[:, :2].norm(dim=-1).mean()), float(r[:, 3].abs().mean())

    predicted = error(model.predict(pose[1:-1], momentum(pose)[:-1], act[1:-1], act[:-2]))
    constant = error(compose(pose[1:-1], momentum(pose)[:-1]))
    still = error(pose[1:-1].float())
    print(f"next-pose error (units, degrees): motion model {predicted}, constant velocity {constant}, still {still}")
    # measured (units, degrees): motion model (1.87, 0.68), constant velocity (6.67, 1.94), still (16.6, 3.03)
    assert predicted[1] < 0.5 * constant[1] and predicted[1] < 0.5 * still[1]
    assert predicted[0] < constant[0] and predicted[0] < still[0]
    assert torch.equal(MotionModel.from_dict(model.to_dict()).weight, model.weight)


def test_a_frame_corrects_a_wrong_pose_towards_its_own(episode, camera):
    """The cloud of frame t - 1 (true pose) and frame t seen from a pose 6 units ahead and 5 to the
    right of its own: the depth-and-colour alignment moves the guess towards the true pose, and a
    batch of frames is corrected as each alone."""
    from worldgen.memory.align import AlignConfig, refine_pose
    from worldgen.memory.motion import compose

    rgb, depth, pose = episode
    ts = torch.arange(2, len(rgb), 3)
    cache = WorldCache(camera, batch=len(ts))
    cache.update(rgb[ts - 1], depth[ts - 1].float(), pose[ts - 1].float())
    true = pose[ts].float()
    guess = compose(true, torch.tensor([6.0, 5.0, 0, 0, 0]).expand_as(true))
    view, front = cache.render_front(guess)
    cfg = AlignConfig(stride=1)  # the recording is small: score every pixel
    fixed, cover = refine_pose(camera, view, front, rgb[ts], depth[ts].float(), guess, cfg)
    before = (guess[:, :2] - true[:, :2]).norm(dim=-1)
    after = (fixed[:, :2] - true[:, :2]).norm(dim=-1)
    print(
        f"position error {float(before.mean()):.2f} -> {float(after.mean()):.2f} units, cover {float(cover.mean()):.2f}"
    )
    # measured: 7.81 -> 6.06 units here
    assert float(after.mean()) < 0.85 * float(before.mean())
    assert torch.equal(fixed[:, 2:], guess[:, 2:])  # height, yaw and pitch stay as predicted
    one = cache.select(torch.tensor([1]))
    v1, f1 = one.render_front(guess[1:2])
    alone, _ = refine_pose(camera, v1, f1, rgb[ts[1:2]], depth[ts[1:2]].float(), guess[1:2], cfg)
    torch.testing.assert_close(alone, fixed[1:2])
