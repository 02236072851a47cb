"""The one action schema shared by the recorder, the model, the Gymnasium env and every client.

An action is what a player does during one step:

* ``keys``: multi-hot over :data:`KEYS` (held = 1), shape ``(8,)`` uint8;
* ``mouse``: continuous camera deltas over :data:`MOUSE`, shape ``(2,)`` float32, in degrees
  for this step. ``yaw > 0`` turns right (clockwise seen from above), ``pitch > 0`` looks up.

Batches and sequences put leading axes in front: keys ``(..., 8)``, mouse ``(..., 2)``.
The model sees one float vector per step, :func:`to_vector`: keys as 0/1 followed by the
mouse deltas divided by :data:`MOUSE_SCALE_DEG`, so a typical flick is about 1.

Example:
    >>> a = Action.from_keys(["forward", "turn_left"], yaw=-4.0)
    >>> a.keys.tolist(), a.mouse.tolist()
    ([1, 0, 0, 0, 1, 0, 0, 0], [-4.0, 0.0])
    >>> to_vector(a.keys, a.mouse).shape
    (10,)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

KEYS: tuple[str, ...] = (
    "forward",
    "back",
    "strafe_left",
    "strafe_right",
    "turn_left",
    "turn_right",
    "attack",
    "use",
)
MOUSE: tuple[str, ...] = ("yaw", "pitch")
NUM_KEYS = len(KEYS)
NUM_MOUSE = len(MOUSE)
ACTION_DIM = NUM_KEYS + NUM_MOUSE
# Deltas beyond this are a flick of more than a full turn in one step: a client bug, not play.
MAX_MOUSE_DEG = 180.0
# A brisk mouse turn in one step at 35/4 steps per second; puts model inputs near unit scale.
MOUSE_SCALE_DEG = 10.0
# Bumped whenever KEYS, MOUSE or their meaning changes; stored in every dataset and checkpoint.
SCHEMA_VERSION = 1


class ActionError(ValueError):
    """An action that does not fit the schema; the message names what is wrong."""


def schema() -> dict[str, Any]:
    """The schema as plain data, stored in dataset indexes and checkpoints."""
    return {
        "version": SCHEMA_VERSION,
        "keys": list(KEYS),
        "mouse": list(MOUSE),
        "mouse_units": "degrees per step",
        "mouse_scale_deg": MOUSE_SCALE_DEG,
    }


def check_schema(stored: Mapping[str, Any], where: str) -> None:
    """Raise if ``stored`` (from a dataset or checkpoint at ``where``) is not this schema."""
    mine = schema()
    for field in ("version", "keys", "mouse"):
        if stored.get(field) != mine[field]:
            raise ActionError(
                f"{where}: action schema {field}={stored.get(field)!r} does not match this worldgen's {mine[field]!r}"
            )


def validate(keys: Any, mouse: Any, batch_shape: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Check and normalise one action (or a batch with leading ``batch_shape``).

    Returns ``keys`` as uint8 ``(*batch_shape, 8)`` and ``mouse`` as float32
    ``(*batch_shape, 2)``. Raises :class:`ActionError` naming the problem otherwise.
    """
    try:
        k = np.asarray(keys)
        m = np.asarray(mouse, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ActionError(f"action is not numeric: {e}") from None
    if k.shape != (*batch_shape, NUM_KEYS):
        raise ActionError(
            f"keys must have shape {(*batch_shape, NUM_KEYS)} (one 0/1 per key {', '.join(KEYS)}), got {k.shape}"
        )
    if m.shape != (*batch_shape, NUM_MOUSE):
        raise ActionError(
            f"mouse must have shape {(*batch_shape, NUM_MOUSE)} ({', '.join(MOUSE)} in degrees), got {m.shape}"
        )
    if k.dtype == bool:
        k = k.astype(np.uint8)
    if not np.issubdtype(k.dtype, np.number) or not np.isin(k, (0, 1)).all():
        raise ActionError(f"keys must be 0 or 1, got values {np.unique(k)[:8].tolist()}")
    if not np.isfinite(m).all():
        raise ActionError("mouse deltas must be finite numbers, got NaN or inf")
    if (np.abs(m) > MAX_MOUSE_DEG).any():
        raise ActionError(
            f"mouse deltas must lie within +-{MAX_MOUSE_DEG} degrees per step, "
            f"got {m.reshape(-1, NUM_MOUSE)[np.abs(m.reshape(-1, NUM_MOUSE)).max(1).argmax()].tolist()}"
        )
    return k.astype(np.uint8), m


def to_vector(keys: np.ndarray, mouse: np.ndarray) -> np.ndarray:
    """Model input: ``(..., 10)`` float32 = keys 0/1 then mouse / MOUSE_SCALE_DEG."""
    return np.concatenate([keys.astype(np.float32), mouse.astype(np.float32) / MOUSE_SCALE_DEG], -1)


@dataclass(frozen=True)
class Action:
    """One validated action. Build it from key names or arrays; both are checked."""

    keys: np.ndarray  # (8,) uint8
    mouse: np.ndarray  # (2,) float32, degrees

    def __post_init__(self) -> None:
        k, m = validate(self.keys, self.mouse)
        object.__setattr__(self, "keys", k)
        object.__setattr__(self, "mouse", m)

    @classmethod
    def noop(cls) -> Action:
        return cls(np.zeros(NUM_KEYS, np.uint8), np.zeros(NUM_MOUSE, np.float32))

    @classmethod
    def from_keys(cls, names: Iterable[str] = (), yaw: float = 0.0, pitch: float = 0.0) -> Action:
        keys = np.zeros(NUM_KEYS, np.uint8)
        for name in names:
            if name not in KEYS:
                raise ActionError(f"unknown key {name!r}; the keys are {', '.join(KEYS)}")
            keys[KEYS.index(name)] = 1
        return cls(keys, np.array([yaw, pitch], np.float32))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Action:
        """From the wire/JSON form ``{"keys": [names] or multi-hot, "mouse": [yaw, pitch]}``."""
        if not isinstance(d, Mapping):
            raise ActionError(f"action must be a mapping with 'keys' and 'mouse', got {type(d).__name__}")
        keys = d.get("keys", [])
        if isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys):
            keys = cls.from_keys(keys).keys  # names, possibly none held
        return cls(np.asarray(keys), d.get("mouse", (0.0, 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [k for k, on in zip(KEYS, self.keys) if on], "mouse": self.mouse.tolist()}

    def vector(self) -> np.ndarray:
        return to_vector(self.keys, self.mouse)
