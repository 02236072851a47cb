"""Shared fixtures: a tiny real ViZDoom recording and a tiny world model trained on it.

The recording is real play (ViZDoom, E1M1, a scripted player), its 160x120 frames downscaled to
32x24 so a CPU trains on them in seconds (latent grids of 3 x 4). ``tiny_checkpoint`` is a whole
model folder (tokenizer, DiT, start contexts) trained by the real trainers for a few seconds:
what engine, server, client and Gymnasium tests load with ``WorldModel.load``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from worldgen.actions import Action
from worldgen.data import DatasetIndex, Episode, EpisodeInfo, write_episode_shards

SIZE = (32, 24)  # (W, H) of the test frames: real 160x120 frames downscaled 5x
# ds.split() holds out "c". 80 train frames: few enough that a tiny DiT memorises them in 200 steps.
EPISODES = (("a", 40), ("b", 40), ("c", 30))


def _small(frames: np.ndarray, resample: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize(SIZE, resample)) for f in frames])


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def reindexed(recording: Path, tmp_path: Path) -> Path:
    """A copy of the recording whose index lists the episodes in reverse (parallel recording
    workers finish in any order)."""
    shutil.copytree(recording, tmp_path / "reindexed")
    index = json.loads((tmp_path / "reindexed" / "index.json").read_text())
    index["episodes"] = index["episodes"][::-1]
    (tmp_path / "reindexed" / "index.json").write_text(json.dumps(index))
    return tmp_path / "reindexed"


def finite(x) -> bool:
    """No NaN or infinity anywhere in a JSON-like result (nested dicts and lists)."""
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, list):
        return all(finite(v) for v in x)
    return not isinstance(x, float) or math.isfinite(x)


def cycle_player(cycle: list[tuple[list[str], float]], offset: int = 0):
    """A recorder policy that plays ``(key names, yaw degrees)`` steps in a fixed cycle, started
    at ``offset``: real play whose statistics do not move when the exploration policy is retuned."""
    step = iter(range(offset, 10**9))

    def act(obs):
        names, yaw = cycle[next(step) % len(cycle)]
        a = Action.from_keys(names, yaw=yaw)
        return a.keys, a.mouse

    return act


# Walk, turn by key, strafe, turn by mouse, back.
WALK_CYCLE = (
    [(["forward"], 0.0)] * 6
    + [(["turn_right"], 0.0)] * 3
    + [(["forward", "strafe_left"], 0.0)] * 3
    + [([], -6.0)] * 3
    + [(["back"], 0.0)] * 2
)


class _OneThread:
    """torch intra-op threads spin against each other on 2 shared cores (measured 10x slower)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@pytest.fixture(scope="module")
def one_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` in CPU-heavy test modules."""
    with _OneThread():
        yield


@pytest.fixture(scope="session")
def doom_recording(tmp_path_factory) -> Path:
    """A real ViZDoom recording of 110 steps in 3 episodes, in the worldgen dataset format, with
    depth and camera poses."""
    from worldgen.env.sources.doom import DoomConfig, DoomEnv, rollout

    root = tmp_path_factory.mktemp("doom")
    index = DatasetIndex(
        root, resolution=SIZE, frame_skip=4, source={"env": "doom", "test": "downscaled"}, has_depth=True, has_pose=True
    )
    with DoomEnv(DoomConfig()) as env:
        for seed, (name, n) in enumerate(EPISODES):
            chunks = list(rollout(env, cycle_player(WALK_CYCLE, 7 * seed), "E1M1", seed, n))
            ep = Episode(
                frames=_small(np.concatenate([c.frames for c in chunks]), Image.BILINEAR),
                keys=np.concatenate([c.keys for c in chunks]),
                mouse=np.concatenate([c.mouse for c in chunks]),
                depth=_small(np.concatenate([c.depth for c in chunks]), Image.NEAREST),
                pose=np.concatenate([c.pose for c in chunks]),
            )
            index.add(EpisodeInfo(id=name, length=len(ep), shards=write_episode_shards(root, name, ep)))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_run(doom_recording, tmp_path_factory) -> tuple[Path, dict]:
    """`worldgen train tokenizer` for 40 steps on the recording: (run folder, summary)."""
    from worldgen.training.tokenizer import TokenizerTrainConfig, train

    out = tmp_path_factory.mktemp("tok")
    with _OneThread():
        summary = train(
            TokenizerTrainConfig(
                data=str(doom_recording),
                out=str(out),
                steps=40,
                batch_size=8,
                channels="8,8,8,8",
                latent_channels=4,
                warmup=5,
                lr=2e-3,
                ckpt_every=1000,
                sample_every=20,
                log_every=5,
                eval_frames=32,
            )
        )
    return out, summary


@pytest.fixture(scope="session")
def tiny_rgbd_tokenizer(doom_recording, tmp_path_factory) -> Path:
    """An RGB-D tokenizer run (depth as a 4th channel, 6 steps): what world-cache models need."""
    from worldgen.training.tokenizer import TokenizerTrainConfig, train

    out = tmp_path_factory.mktemp("tok_rgbd")
    with _OneThread():
        train(
            TokenizerTrainConfig(
                data=str(doom_recording),
                out=str(out),
                steps=6,
                batch_size=8,
                channels="8,8,8,8",
                latent_channels=4,
                warmup=2,
                lr=2e-3,
                ckpt_every=1000,
                sample_every=0,
                log_every=5,
                eval_frames=8,
                depth=True,
            )
        )
    return out


# The tests' tiny world-cache DiT run (with `data`, `tokenizer` an RGB-D tokenizer, `out` and a budget).
TINY_WORLD_CACHE = dict(
    model="tiny",
    window=4,
    batch_size=4,
    lr=3e-3,
    warmup=2,
    ckpt_every=1000,
    sample_every=0,
    log_every=10,
    eval_windows=4,
    world_cache=2,
)


@pytest.fixture(scope="session")
def cache_model(doom_recording, tiny_rgbd_tokenizer, tmp_path_factory) -> Path:
    """A world-cache model folder: RGB-D tokenizer, tiny DiT with --world-cache 2 (4-frame
    windows, 4 steps), starts with depth and poses. It plays; it is no good at anything."""
    from worldgen.training.dynamics import DynamicsTrainConfig, train

    root = tmp_path_factory.mktemp("cache_model")
    with _OneThread():
        train(
            DynamicsTrainConfig(
                data=str(doom_recording),
                out=str(root / "dyn"),
                tokenizer=str(tiny_rgbd_tokenizer),
                steps=4,
                starts=2,
                start_frames=3,
                **TINY_WORLD_CACHE,
            )
        )
    return root / "dyn" / "ckpt"


@pytest.fixture(scope="session")
def tiny_checkpoint(doom_recording, tiny_tokenizer_run, tmp_path_factory) -> Path:
    """A complete tiny model folder: `worldgen train dynamics` (tiny DiT, 6-frame windows, 150
    steps) on the recording, exported with its tokenizer and start contexts. Frames change with
    actions; it is no good at anything else."""
    from worldgen.training.dynamics import DynamicsTrainConfig, train

    out = tmp_path_factory.mktemp("dyn")
    with _OneThread():
        train(
            DynamicsTrainConfig(
                data=str(doom_recording),
                out=str(out),
                tokenizer=str(tiny_tokenizer_run[0]),
                model="tiny",
                window=6,
                steps=150,
                batch_size=8,
                lr=3e-3,
                warmup=10,
                ckpt_every=1000,
                sample_every=0,
                log_every=50,
                sample_steps=2,
                eval_windows=8,
                ema_decay=0.9,
            )
        )
    return out / "ckpt"


@pytest.fixture(scope="session")
def tiny_geometry_run(doom_recording, tmp_path_factory) -> tuple[Path, dict]:
    """`worldgen train geometry` for 200 steps on the recording: (run folder, summary)."""
    from worldgen.env.learned.geometry_train import GeometryTrainConfig, train

    out = tmp_path_factory.mktemp("geometry")
    with _OneThread():
        summary = train(
            GeometryTrainConfig(
                data=str(doom_recording),
                out=str(out),
                steps=200,
                batch_size=16,
                warmup=10,
                lr=3e-3,
                ckpt_every=1000,
                log_every=20,
                drift_steps=8,
                device="cpu",
            )
        )
    return out, summary
