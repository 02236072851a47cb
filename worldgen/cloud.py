"""``worldgen cloud``: build a point-cloud world cache from recorded play, save it, look at it.

    worldgen cloud build DATASET --episode ID|N --out cloud.ply [--picture cloud.png]
                         [--frames N] [--every K] [--max-points P]
    worldgen cloud view cloud.ply          open3d's viewer (the optional `pointcloud` extra)

``build`` fuses an episode's frames with their recorded depth and camera poses into a
:class:`~worldgen.memory.cloud.WorldCache` (Voyager's update rule, bounded by ``--max-points``),
writes it as a binary ``.ply`` and, with ``--picture``, an oblique view of it as a PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from worldgen.data.camera import dataset_camera
from worldgen.data.dataset import Dataset, DatasetError
from worldgen.files import atomic_write
from worldgen.memory.cloud import CacheConfig, WorldCache

DEFAULT_CACHE_CONFIG = CacheConfig()


def build(
    ds: Dataset, episode: int, frames: int | None = None, every: int = 1, config: CacheConfig = DEFAULT_CACHE_CONFIG
) -> WorldCache:
    """The cloud of an episode's first ``frames`` frames (every ``every``-th one), fused in order."""
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    cam = dataset_camera(ds)
    stop = ds.episodes[episode].length if frames is None else min(frames, ds.episodes[episode].length)
    cache = WorldCache(cam, config)
    for start in range(0, stop, 256):  # chunks keep a long episode's frames out of memory
        end = min(start + 256, stop)
        rgb = torch.from_numpy(ds.read(episode, "frames", start, end))
        depth = torch.from_numpy(ds.read(episode, "depth", start, end))
        pose = torch.from_numpy(ds.read(episode, "pose", start, end))
        for t in range(-start % every, end - start, every):
            cache.update(rgb[t : t + 1], depth[t : t + 1], pose[t : t + 1])
    return cache


def picture(xyz: np.ndarray, rgb: np.ndarray, normal: np.ndarray, path: Path) -> Path:
    """An oblique view of a cloud (ceilings left out, so the rooms show; colours brightened, as
    Doom's are dark) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = normal[:, 2] > -0.5  # surfaces that face down are ceilings: they would hide the rooms
    xyz, rgb = xyz[keep], rgb[keep]
    fig = plt.figure(figsize=(8, 6), dpi=120, facecolor="black")
    ax = fig.add_axes((0, 0, 1, 1), projection="3d", facecolor="black")
    ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=(rgb / 255.0) ** 0.6, s=1.5, linewidths=0, depthshade=False)
    if len(xyz):  # frame the bulk of the cloud: a few points seen through a window lie far off
        lo, hi = np.percentile(xyz, 1, 0), np.percentile(xyz, 99, 0)
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1]), ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect((hi - lo).clip(1.0))
    ax.view_init(elev=40, azim=-60)
    ax.set_axis_off()
    atomic_write(path, lambda tmp: fig.savefig(tmp, facecolor="black"))
    plt.close(fig)
    return path


def view(path: Path) -> None:
    """Open a ``.ply`` in open3d's viewer."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        import open3d as o3d
    except ImportError as e:
        raise ValueError(f"viewing needs open3d (pip install 'worldgen[pointcloud]'): {e}") from e
    cloud = o3d.io.read_point_cloud(str(path))
    if cloud.is_empty():
        raise ValueError(f"{path}: open3d read no points from it")
    o3d.visualization.draw_geometries([cloud], window_name=f"worldgen cloud: {path.name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cloud_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="fuse a recorded episode into a point cloud (.ply)")
    b.add_argument("dataset", type=Path)
    b.add_argument("--episode", default="0", help="episode id or index (0-based), see `worldgen data info`")
    b.add_argument("--out", type=Path, required=True, help=".ply file to write")
    b.add_argument("--picture", type=Path, help="also write an oblique view of the cloud as a PNG")
    b.add_argument("--frames", type=int, help="use the episode's first N frames (default: all)")
    b.add_argument("--every", type=int, default=1, help="fuse every K-th frame")
    b.add_argument("--max-points", type=int, default=CacheConfig.max_points, help="the cloud's point bound")
    v = sub.add_parser("view", help="open a .ply in open3d's viewer (needs the `pointcloud` extra)")
    v.add_argument("ply", type=Path)


def run(args: argparse.Namespace) -> int:
    try:
        if args.cloud_command == "view":
            view(args.ply)
            return 0
        ds = Dataset(args.dataset)
        cache = build(
            ds, ds.episode_index(args.episode), args.frames, args.every, CacheConfig(max_points=args.max_points)
        )
        cache.save_ply(args.out)
        print(f"{args.out}: {int(cache.num_points()[0])} points (bound {args.max_points})")
        if args.picture:
            print(picture(*cache.points(0), args.picture))
    except (DatasetError, ValueError) as e:
        print(f"worldgen cloud: {e}", file=sys.stderr)
        return 1
    return 0
