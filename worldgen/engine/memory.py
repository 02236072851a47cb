"""The engine side of a session's frame memory (:mod:`worldgen.memory.bank`): where the camera of
the next frame is, and the recalled frames as the DiT's :class:`~worldgen.models.dit.Memory`.

In play there is no game to say where the camera is. Until the model predicts its own pose (the
world-cache issue's pose head), :func:`dead_reckon` moves the last pose by the action the way
Doom would on open floor: the turn is exact (mouse yaw, keyboard turn rate), the walk is Doom's
steady walking speed, and walls and momentum are ignored. Poses only ever enter relative to each
other, so a session starts at the origin. A caller that knows the true camera (a replay against
the game, the benchmark) passes it instead.

Example:
    >>> from worldgen.actions import Action
    >>> a = torch.from_numpy(Action.from_keys(["forward"], yaw=90.0).vector())[None]
    >>> [round(v) for v in dead_reckon(torch.zeros(1, 5), a)[0].tolist()]    # turned right to face -y, walked
    [0, -33, 0, -90, 0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worldgen.actions import KEYS, MOUSE_SCALE_DEG, NUM_KEYS
from worldgen.memory.bank import FrameBank, recall
from worldgen.models.dit import Memory

# Doom at 4 tics a step (worldgen.env.sources.doom): walking thrust 25 against friction 0.90625 settles at
# ~8.3 map units a tic, strafing (24) at ~8; a held turn key at 3.5 deg a tic after its first 5 tics.
WALK_UNITS_PER_STEP = 33.0
STRAFE_UNITS_PER_STEP = 32.0
TURN_DEG_PER_STEP = 14.1
_KEY = {name: i for i, name in enumerate(KEYS)}


def dead_reckon(pose: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """The camera (B, 5) after model action vectors ``acts`` (B, A) from ``pose`` (B, 5): see the
    module docstring. Turn first, then move along the new heading."""
    k, mouse = acts[:, :NUM_KEYS].float(), acts[:, NUM_KEYS:].float() * MOUSE_SCALE_DEG  # (B, 8), (B, 2) degrees
    turn = TURN_DEG_PER_STEP * (k[:, _KEY["turn_left"]] - k[:, _KEY["turn_right"]]) - mouse[:, 0]
    yaw = pose[:, 3] + turn
    pitch = (pose[:, 4] + mouse[:, 1]).clamp(-90.0, 90.0)
    ahead = WALK_UNITS_PER_STEP * (k[:, _KEY["forward"]] - k[:, _KEY["back"]])
    left = STRAFE_UNITS_PER_STEP * (k[:, _KEY["strafe_left"]] - k[:, _KEY["strafe_right"]])
    rad = torch.deg2rad(yaw)
    x = pose[:, 0] + ahead * rad.cos() - left * rad.sin()
    y = pose[:, 1] + ahead * rad.sin() + left * rad.cos()
    return torch.stack([x, y, pose[:, 2], yaw, pitch], -1)


def recalled(banks: Sequence[FrameBank], query: torch.Tensor, now: torch.Tensor) -> Memory:
    """The frames each session's bank recalls for its next camera ``query`` (B, 5) at step ``now``
    (B,), as the DiT's memory: always ``k`` slots (fixed shapes), the picks that add nothing masked."""
    z, rel, age, ok = recall(banks, query, now)
    return Memory(z.float(), rel, age, mask=ok)
