"""The rolling KV cache of one streaming session (docs/architecture.md, streaming).

A session keeps, for every DiT layer, the keys and values of ``sinks`` frames held for ever (its
first frames) and of the ``window`` most recent frames (a ring), so its memory is fixed from the
first frame on. Keys are stored *before* RoPE. Each step re-rotates them to window-relative
positions: the cached frames, ordered by time, take positions ``0 .. L-1`` and the new frames
``L ..``. Positions therefore never exceed ``sinks + window + chunk``, however long a session runs
(hours of play), and as long as nothing has left the window they equal the absolute frame
indices, so streaming equals a full block-causal recompute.

Buffers are full-size from the start and empty slots are masked, so every step of every
session has the same tensor shapes: sessions of different ages batch together, and a compiled
or CUDA-graphed forward never sees a new shape. With ``batch`` B, one cache holds B timelines
of the same age (the trainer's rollouts): keys and values gain a batch axis after the layer's.

Example:
    >>> c = KVCache(depth=2, heads=2, head_dim=8, tokens_per_frame=3, sinks=1, window=2)
    >>> for _ in range(5):
    ...     c.write(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8))   # (depth, H, N, d): one frame
    >>> c.frames, c.held().tolist(), c.positions().tolist()     # frame 0 (sink), frames 3 and 4
    (5, [0, 3, 4], [0, 1, 2])
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys (unrotated) and values of at most ``sinks + window`` frames of one session
    (``(depth, H, slots * N, d)``), or of ``batch`` timelines of one age (``(depth, B, H, slots * N, d)``)."""

    def __init__(
        self,
        depth: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        sinks: int,
        window: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch: int | None = None,
    ):
        if sinks < 0 or window < 1:
            raise ValueError(f"need sinks >= 0 and window >= 1, got sinks={sinks}, window={window}")
        self.sinks, self.window, self.n = sinks, window, tokens_per_frame
        slots = sinks + window
        lead = (depth,) if batch is None else (depth, batch)
        self.k = torch.zeros(*lead, heads, slots * tokens_per_frame, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self._frame = torch.full((slots,), -1, dtype=torch.long)  # absolute frame index per slot; -1 empty
        self.frames = 0  # frames written since the session (re)started

    @property
    def slots(self) -> int:
        return self.sinks + self.window

    def clear(self) -> None:
        self._frame.fill_(-1)
        self.frames = 0

    def _slot(self, frame: int) -> int:
        """Sinks take the first slots; later frames cycle through the window's slots."""
        return frame if frame < self.sinks else self.sinks + (frame - self.sinks) % self.window

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append F frames in time order: keys (unrotated) and values (depth, [B,] H, F * tokens_per_frame, d)."""
        for f in range(k.shape[-2] // self.n):
            slot = self._slot(self.frames)
            src, dst = slice(f * self.n, (f + 1) * self.n), slice(slot * self.n, (slot + 1) * self.n)
            self.k[..., dst, :] = k[..., src, :]
            self.v[..., dst, :] = v[..., src, :]
            self._frame[slot] = self.frames
            self.frames += 1

    def held(self) -> torch.Tensor:
        """(slots,) absolute frame index held in each slot, -1 where empty."""
        return self._frame.clone()

    def positions(self) -> torch.Tensor:
        """(slots,) RoPE time position of each slot: its rank in time among the frames held (0 if empty)."""
        held = self._frame
        rank = (held[None, :] < held[:, None]) & (held[None, :] >= 0)  # (slots, slots): j older than i
        return torch.where(held >= 0, rank.sum(1), 0)

    def next_position(self) -> int:
        """Position of the next frame: right after the frames held."""
        return int((self._frame >= 0).sum())

    def valid(self) -> torch.Tensor:
        """(slots * tokens_per_frame,) bool: which cached keys are real."""
        return (self._frame >= 0).repeat_interleave(self.n)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
