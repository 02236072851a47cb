"""Dataset format, validation on read, the window loader and `worldgen data`. Tiny data made here."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from worldgen.data import Dataset, DatasetError, DatasetIndex, Episode, EpisodeInfo, WindowDataset, write_episode_shards
from worldgen.data import dataset as dataset_mod
from worldgen.data.loader import collate

H, W = 6, 8


def make_episode(n: int, tag: int, env_dim: int | None = None) -> Episode:
    """Frames that say where they come from: channel 0 = episode tag, channel 1 = step."""
    rng = np.random.default_rng(tag)
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[..., 0] = tag
    frames[..., 1] = np.arange(n)[:, None, None]
    frames[..., 2] = rng.integers(0, 255, (n, H, W))
    return Episode(
        frames=frames,
        keys=rng.integers(0, 2, (n, 8)).astype(np.uint8),
        mouse=rng.normal(0, 5, (n, 2)).astype(np.float32),
        depth=rng.integers(0, 65535, (n, H, W)).astype(np.uint16),
        pose=np.c_[np.arange(n) * 10.0, np.arange(n) * 5.0, np.zeros((n, 3))].astype(np.float32),
        variables=rng.normal(size=(n, 2)).astype(np.float32),
        env_actions=None if env_dim is None else rng.normal(size=(n, env_dim)).astype(np.float32),
    )


def make_dataset(root: Path, lengths=(7, 3, 12), shard_steps: int = 4, env_dim: int | None = None) -> list[Episode]:
    index = DatasetIndex(
        root,
        resolution=(W, H),
        frame_skip=4,
        source={"kind": "test"},
        variables=["health", "ammo"],
        has_env_actions=env_dim is not None,
    )
    episodes = []
    for i, n in enumerate(lengths):
        ep = make_episode(n, tag=i + 1, env_dim=env_dim)
        shards = write_episode_shards(root, f"e{i}", ep, shard_steps=shard_steps)
        index.add(EpisodeInfo(id=f"e{i}", length=n, shards=shards, map=f"E1M{i % 2 + 1}", seed=100 + i))
        episodes.append(ep)
    return episodes


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, list[Episode]]:
    return tmp_path / "ds", make_dataset(tmp_path / "ds")


# --- format ---------------------------------------------------------------------------------


def test_roundtrip_across_shards(data):
    root, episodes = data
    ds = Dataset(root)
    assert len(ds) == 3 and ds.num_steps == 22 and ds.resolution == (W, H) and ds.frame_skip == 4
    assert ds.fields == ["frames", "keys", "mouse", "depth", "pose", "variables"]
    ds.validate()
    for i, ep in enumerate(episodes):
        got = ds.episode(i)
        for name, arr in ep.arrays().items():
            np.testing.assert_array_equal(getattr(got, name), arr, err_msg=name)
    # a range across a shard boundary (shards of 4 steps), and an empty range keeping its shape
    np.testing.assert_array_equal(ds.read(2, "frames", 3, 9), episodes[2].frames[3:9])
    assert ds.read(2, "depth", 5, 5).shape == (0, H, W)
    with pytest.raises(IndexError):
        ds.read(1, "frames", 0, 4)
    with pytest.raises(DatasetError, match="env_actions"):
        ds.read(0, "env_actions")
    assert ds.episodes[1].map == "E1M2" and ds.episodes[1].seed == 101
    assert os.stat(root / "index.json").st_mode & 0o444  # readable by others under a usual umask


def test_env_actions_optional_and_old_index_compatible(tmp_path):
    root = tmp_path / "ds"
    episodes = make_dataset(root, lengths=(5,), env_dim=3)
    np.testing.assert_array_equal(Dataset(root).episode(0).env_actions, episodes[0].env_actions)
    # an index written before env_actions existed reads as before
    old = tmp_path / "old"
    make_dataset(old, lengths=(5,))
    index = json.loads((old / "index.json").read_text())
    del index["has_env_actions"]
    (old / "index.json").write_text(json.dumps(index))
    assert "env_actions" not in Dataset(old).fields


def test_episode_checks_its_arrays():
    ep = make_episode(4, 1)
    with pytest.raises(ValueError, match="depth"):
        Episode(frames=ep.frames, keys=ep.keys, mouse=ep.mouse, depth=ep.depth[:, :3])
    with pytest.raises(ValueError, match="pose"):
        Episode(frames=ep.frames, keys=ep.keys, mouse=ep.mouse, pose=ep.pose[:, :3])
    with pytest.raises(ValueError, match="steps"):
        Episode(frames=ep.frames, keys=ep.keys, mouse=ep.mouse, variables=ep.variables[:3])
    with pytest.raises(ValueError, match="keys"):
        Episode(frames=ep.frames, keys=ep.keys * 2, mouse=ep.mouse)
    with pytest.raises(ValueError, match="no steps"):
        write_episode_shards("unused", "e", ep.slice(0, 0))


def test_index_refuses_existing_dataset_unless_overwrite(data):
    root, _ = data
    with pytest.raises(DatasetError, match="already"):
        DatasetIndex(root, resolution=(W, H), frame_skip=1, source={})
    DatasetIndex(root, resolution=(W, H), frame_skip=1, source={}, overwrite=True)
    assert len(Dataset(root)) == 0 and not (root / "shards").exists()


# --- validation on read ---------------------------------------------------------------------


def test_truncated_shard_is_an_error_naming_it(data):
    root, _ = data
    shard = root / Dataset(root).episodes[2].shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    ds = Dataset(root)
    np.testing.assert_array_equal(
        ds.read(2, "frames", 0, 4)[..., 1], np.broadcast_to(np.arange(4)[:, None, None], (4, H, W))
    )
    with pytest.raises(DatasetError, match=rf"{shard.name}.*truncated"):
        ds.read(2, "frames", 0, 8)  # nothing partial: the intact first shard is not served alone
    with pytest.raises(DatasetError, match=shard.name):
        Dataset(root).validate()
    with pytest.raises(DatasetError, match=shard.name):
        WindowDataset(root, 4)


def test_corrupt_shard_is_an_error_naming_it(data):
    root, _ = data
    shard = root / Dataset(root).episodes[0].shards[0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # same size, one byte of frame data flipped
    shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=rf"{shard.name}.*SHA-256"):
        Dataset(root).read(0, "frames")
    shard.unlink()
    with pytest.raises(DatasetError, match=rf"{shard.name}.*missing"):
        Dataset(root).validate()


def test_shard_with_wrong_arrays_is_an_error_naming_it(data):
    root, _ = data
    ds = Dataset(root)
    entry = ds.episodes[1].shards[0]
    bad = make_episode(entry["steps"], 9)
    bad.frames = np.zeros((entry["steps"], H + 1, W, 3), np.uint8)  # not the index's resolution
    bad.depth = None
    written = write_episode_shards(root, "bad", bad)[0]
    os.replace(root / written["file"], root / entry["file"])
    index = json.loads((root / "index.json").read_text())
    index["episodes"][1]["shards"][0].update(bytes=written["bytes"], sha256=written["sha256"])
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match=rf"{Path(entry['file']).name}.*'frames' has shape"):
        Dataset(root).validate()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t[: len(t) // 2], "not valid JSON"),
        (lambda t: "[1, 2]", "JSON object"),
        (lambda t: t.replace('"frame_skip": 4', '"frame_skip": "4"'), "frame_skip"),
        (lambda t: t.replace('"resolution": [\n  8,\n  6\n ]', '"resolution": [8]'), "resolution"),
        (lambda t: t.replace("shards/e1-0000", "../../etc/e1-0000"), "is not a shards/"),
        (lambda t: t.replace('"length": 7', '"length": 8'), "shards hold 7 steps"),
        (lambda t: t.replace('"terminal"', '"termnial"'), "unknown fields"),
        (lambda t: t.replace('"version": 1', '"version": 99'), "v1"),
        (lambda t: t.replace('"forward"', '"jump"'), "action schema"),
    ],
)
def test_bad_index_is_an_error_naming_it(data, damage, message):
    root, _ = data
    path = root / "index.json"
    text = path.read_text()
    damaged = damage(text)
    assert damaged != text
    path.write_text(damaged)
    with pytest.raises(DatasetError, match=message) as e:
        Dataset(root)
    assert str(path) in str(e.value)


def test_unlisted_shards_are_never_read(data):
    root, _ = data
    # a recorder killed mid-episode: shards on disk, episode never added; a temp file left over
    write_episode_shards(root, "e9", make_episode(6, 9), shard_steps=4)
    (root / "shards" / ".e9-0002.abc.tmp.safetensors").write_bytes(b"half")
    ds = Dataset(root)
    assert [e.id for e in ds.episodes] == ["e0", "e1", "e2"]
    assert {p.name for p in ds.stray_files()} == {
        "e9-0000.safetensors",
        "e9-0001.safetensors",
        ".e9-0002.abc.tmp.safetensors",
    }
    ds.validate()
    frames = [WindowDataset(ds, 2)[i]["frames"] for i in range(len(WindowDataset(ds, 2)))]
    assert all(f[..., 0].max() <= 3 for f in frames)  # no frame of tag 10 (episode e9)


KILLED_WRITER = """
import sys, numpy as np
from worldgen.data import DatasetIndex, Episode, EpisodeInfo, write_episode_shards
root = sys.argv[1]
index = DatasetIndex(root, resolution=(64, 48), frame_skip=1, source={}, has_depth=False, has_pose=False)
for i in range(10**6):
    n = 40
    ep = Episode(frames=np.full((n, 48, 64, 3), i % 256, np.uint8), keys=np.zeros((n, 8), np.uint8),
                 mouse=np.zeros((n, 2), np.float32))
    index.add(EpisodeInfo(id=f"e{i}", length=n, shards=write_episode_shards(root, f"e{i}", ep, shard_steps=16)))
    print(i, flush=True)
"""


def test_killed_writer_leaves_a_valid_dataset(tmp_path):
    root = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # at least three episodes done, then kill it mid-write of another
            assert proc.stdout.readline(), "writer died"
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ds = Dataset(root)
    assert len(ds) >= 3
    ds.validate()  # every listed shard is whole
    for i in range(len(ds)):
        assert (ds.read(i, "frames") == i % 256).all()


# --- split ----------------------------------------------------------------------------------


def test_split_is_deterministic_by_episode_id(tmp_path):
    big = tmp_path / "big"  # 40 index entries (the split reads only ids; no shard is opened)
    make_dataset(big, lengths=(2,), shard_steps=2)
    index = json.loads((big / "index.json").read_text())
    index["episodes"] = [{**index["episodes"][0], "id": f"e{i}"} for i in range(40)]
    for i, e in enumerate(index["episodes"]):
        e["shards"] = [{**e["shards"][0], "file": f"shards/e{i}-0000.safetensors"}]
    (big / "index.json").write_text(json.dumps(index))
    train, held = Dataset(big).split(0.25)
    assert sorted(train + held) == list(range(40)) and 3 <= len(held) <= 20
    assert Dataset(big).split(0.25) == (train, held)
    # the same id lands on the same side in another dataset holding a subset of the episodes
    index = json.loads((big / "index.json").read_text())
    index["episodes"] = index["episodes"][::3]
    (big / "index.json").write_text(json.dumps(index))
    sub_train, sub_held = Dataset(big).split(0.25)
    held_ids = {f"e{i}" for i in held}
    assert {Dataset(big).episodes[i].id for i in sub_held} == held_ids & {f"e{i}" for i in range(0, 40, 3)}
    # tiny datasets still get a held-out episode
    small = tmp_path / "small"
    make_dataset(small, lengths=(2, 2), shard_steps=2)
    assert [len(s) for s in Dataset(small).split(0.1)] == [1, 1]


# --- window loader --------------------------------------------------------------------------


def check_window(item: dict, episodes: list[Episode], window: int) -> None:
    ep, start = int(item["episode"]), int(item["start"])
    src = episodes[ep]
    frames = np.asarray(item["frames"])
    assert frames.shape == (window, H, W, 3)
    assert (frames[..., 0] == ep + 1).all(), "window crosses an episode boundary"
    np.testing.assert_array_equal(frames[:, 0, 0, 1], np.arange(start, start + window))
    np.testing.assert_array_equal(np.asarray(item["depth"]), src.depth[start : start + window])
    np.testing.assert_array_equal(np.asarray(item["pose"]), src.pose[start : start + window])
    # the action that produced frame t is the dataset's action of step t - 1; no-op before step 0
    keys = np.concatenate([np.zeros((1, 8), np.uint8), src.keys])[start : start + window]
    mouse = np.concatenate([np.zeros((1, 2), np.float32), src.mouse])[start : start + window]
    np.testing.assert_array_equal(np.asarray(item["keys"]), keys)
    np.testing.assert_array_equal(np.asarray(item["mouse"]), mouse)


def test_windows_never_cross_episode_boundaries(data):
    root, episodes = data  # lengths 7, 3, 12; shards of 4 steps
    w = WindowDataset(root, 4)
    assert len(w) == (7 - 4 + 1) + 0 + (12 - 4 + 1)
    assert {(int(w[i]["episode"]), int(w[i]["start"])) for i in range(len(w))} == {(0, s) for s in range(4)} | {
        (2, s) for s in range(9)
    }
    for i in range(len(w)):
        check_window(w[i], episodes, 4)
    strided = WindowDataset(root, 3, episodes=[1, 2], stride=4)
    assert [(int(x["episode"]), int(x["start"])) for x in strided] == [(1, 0), (2, 0), (2, 4), (2, 8)]
    ones = WindowDataset(root, 1, fields=("depth", "pose", "variables", "env_actions"))
    assert len(ones) == 22 and "env_actions" not in ones[0] and ones[0]["variables"].shape == (1, 2)
    check_window(ones[0], episodes, 1)
    with pytest.raises(DatasetError, match="13 steps"):
        WindowDataset(root, 13)
    with pytest.raises(ValueError, match="unknown fields"):
        WindowDataset(root, 2, fields=("dpeth",))


def test_env_actions_align_like_keys(tmp_path):
    root = tmp_path / "ds"
    (ep,) = make_dataset(root, lengths=(6,), env_dim=2)
    item = WindowDataset(root, 3, fields=("env_actions",))[2]
    np.testing.assert_array_equal(item["env_actions"], ep.env_actions[1:4])
    np.testing.assert_array_equal(WindowDataset(root, 3, fields=("env_actions",))[0]["env_actions"][0], [0, 0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_serve_every_window_once(data, num_workers):
    root, episodes = data
    windows = WindowDataset(root, 4, stride=1)
    seen = []
    for batch in windows.loader(batch_size=3, shuffle=True, num_workers=num_workers, seed=0):
        assert batch["frames"].shape[1:] == (4, H, W, 3) and batch["frames"].dtype == torch.uint8
        assert batch["mouse"].dtype == torch.float32 and batch["depth"].dtype == torch.uint16
        for b in range(len(batch["episode"])):
            check_window({k: v[b] for k, v in batch.items()}, episodes, 4)
            seen.append((int(batch["episode"][b]), int(batch["start"][b])))
    assert sorted(seen) == sorted((int(e), int(s)) for e, s in windows._index)


def test_collate_matches_default_collate(data):
    root, _ = data
    w = WindowDataset(root, 4)
    items = [w[i] for i in (0, 5, 7)]
    ours, theirs = collate(items), torch.utils.data.default_collate(items)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_verification_is_done_once_and_survives_pickling(data, monkeypatch):
    root, _ = data
    hashed = []
    real = dataset_mod.sha256_file
    monkeypatch.setattr(dataset_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    w = WindowDataset(root, 4)  # verifies every shard up front
    assert len(hashed) == 6
    for i in range(len(w)):
        w[i]
    clone = pickle.loads(pickle.dumps(w))  # what a spawned DataLoader worker gets
    for i in range(len(clone)):
        clone[i]
    assert len(hashed) == 6  # neither the reads nor the worker copy hashed again


# --- `worldgen data info | view` ------------------------------------------------------------


def test_data_info(data, capsys):
    from worldgen.cli import main

    root, episodes = data
    assert main(["data", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["episodes"] == 3 and info["steps"] == 22
    assert info["steps_per_map"] == {"E1M1": 19, "E1M2": 3}
    assert info["seeds"] == [100, 101, 102] and info["resolution"] == [W, H] and info["frame_skip"] == 4
    assert info["split"]["train_episodes"] + info["split"]["heldout_episodes"] == 3
    keys = np.concatenate([e.keys for e in episodes])
    assert info["actions"]["keys_held"]["forward"] == pytest.approx(keys[:, 0].mean(), abs=1e-3)
    mouse = np.concatenate([e.mouse for e in episodes])
    assert info["actions"]["mouse"]["yaw"]["std"] == pytest.approx(mouse[:, 0].std(), abs=1e-3)
    # step-to-step pairs inside each episode only: never the last step of one with the next's first
    pairs = [(e.keys[:-1], e.keys[1:], e.mouse[:-1, 0], e.mouse[1:, 0]) for e in episodes]
    repeat = np.concatenate([(a == b).all(1) for a, b, _, _ in pairs]).mean()
    yaw = [np.concatenate(x) for x in zip(*[(a, b) for _, _, a, b in pairs])]
    assert info["actions"]["keys_repeat"] == pytest.approx(repeat)
    assert info["actions"]["mouse"]["yaw"]["lag1_corr"] == pytest.approx(np.corrcoef(*yaw)[0, 1])
    assert info["validation"] == "ok"
    assert main(["data", "info", str(root)]) == 0
    text = capsys.readouterr().out
    assert "E1M1" in text and "forward" in text and "ok" in text
    # a damaged dataset: info still reports, names the bad file, and exits non-zero
    shard = root / Dataset(root).episodes[0].shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["data", "info", str(root), "--json"]) == 1
    assert shard.name in json.loads(capsys.readouterr().out)["validation"]


def test_data_view_writes_strip_and_clip(data, tmp_path, capsys):
    from PIL import Image

    from worldgen.cli import main

    root, episodes = data
    out = tmp_path / "view"
    assert main(["data", "view", str(root), "--out", str(out), "--episode", "2", "--frames", "5"]) == 0
    strip = np.asarray(Image.open(out / "strip.png"))
    assert strip.shape[0] >= 2 * H and strip.shape[1] >= 5 * W  # frames above their depth
    assert (out / "clip.mp4").stat().st_size > 0
    import imageio.v3 as iio

    clip = iio.imread(out / "clip.mp4")
    assert clip.shape == (len(episodes[2]), H, 2 * W, 3)  # every frame, depth alongside
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left
    # by its id: the same episode, whatever order the index lists them in
    eid = Dataset(root).episodes[2].id
    assert main(["data", "view", str(root), "--out", str(tmp_path / "by_id"), "--episode", eid, "--frames", "5"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "by_id" / "strip.png")), strip)
    assert main(["data", "view", str(root), "--episode", "nope"]) == 1
    assert (
        f"worldgen data: {root / 'index.json'}: no episode 'nope' (it has {Dataset(root).episodes[0].id}"
        in capsys.readouterr().err
    )
