"""The camera model of the world a dataset was recorded in (:mod:`worldgen.memory.camera`), for
what unprojects its frames: the world cache's training views and ``worldgen cloud``."""

from __future__ import annotations

from worldgen.data.dataset import Dataset
from worldgen.memory.camera import DOOM, Camera


def dataset_camera(ds: Dataset) -> Camera:
    """The camera model of the world a dataset was recorded in, at its resolution."""
    env = ds.index["source"].get("env")
    if env != "doom":
        raise ValueError(f"{ds.root}: no camera model for env {env!r} (only ViZDoom's is fitted: 'doom')")
    if not ds.index["has_depth"] or not ds.index["pose"]:
        raise ValueError(
            f"{ds.root}: a cloud needs recorded depth and camera poses; this dataset lacks "
            f"{'depth' if not ds.index['has_depth'] else 'poses'}"
        )
    return DOOM.resized(*ds.resolution)
