"""Writing files so that a reader never sees half of one: everything worldgen writes goes
through :func:`atomic_write` (datasets, checkpoints, run state, reports, plots, videos).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "notes" / "a.txt"
    >>> atomic_write(path, lambda tmp: Path(tmp).write_text("all or nothing"))
    >>> path.read_text()
    'all or nothing'
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

# mkstemp makes 0600 files; datasets and models are shared, so written files get the umask's mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Write through a temp file in the same folder, fsync, rename: all or nothing.

    The temp name keeps ``path``'s suffix (``.clip.x1y2.tmp.mp4``) so writers that pick a format
    from the extension (PIL, ffmpeg) work; a dot prefix and ``.tmp`` mark it as not ours to read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too, or a crash can bring back the old name.
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_mp4(path: str | os.PathLike, frames: Iterable[np.ndarray] | np.ndarray, fps: float) -> None:
    """H.264 mp4 of uint8 ``(N, H, W, 3)`` frames, written atomically.

    yuv420p needs even sides, so odd ones get a black row or column rather than be rescaled.
    """
    import imageio.v2 as imageio  # imageio-ffmpeg's binary loads only when a video is written

    def write(tmp: str) -> None:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1) as w:
            for frame in frames:
                w.append_data(np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))))

    atomic_write(path, write)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (datasets and checkpoints store it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
