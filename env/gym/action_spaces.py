"""The env's action spaces: the schema action as Dict, Discrete, MultiDiscrete or Box.

Every space decodes to one schema :class:`~worldgen.actions.Action` (8 keys, mouse degrees), and
every space's mouse lies inside the range the model was trained on (:func:`trained_mouse_range`):
a world model knows nothing of a 90-degree flick it never saw, so offering one invites an agent
to exploit frames that are not Doom.

* ``"dict"``: ``Dict(keys=MultiBinary(8), mouse=Box(-range, range, (2,)))``, the schema itself.
  A mouse delta outside the trained range (but within the schema's +-180 degrees) is *clipped*
  to it; beyond +-180 it is an :class:`~worldgen.actions.ActionError`, as everywhere.
* ``"discrete"``: ``Discrete(len(DISCRETE_ACTIONS))``, the named key combinations of
  :data:`DISCRETE_ACTIONS` (keys only: Doom's turn keys turn at the game's own rate).
* ``"multidiscrete"``: ``MultiDiscrete(MULTIDISCRETE_NVEC)``, one choice per axis:
  move (none/forward/back), strafe (none/left/right), turn keys (none/left/right), attack (0/1),
  use (0/1), mouse yaw (MOUSE_BINS levels evenly over +-range), mouse pitch (likewise).
* ``"box"``: ``Box(-1, 1, (10,))``: 8 keys, each held when > 0, then yaw and pitch as a
  fraction of the trained range (the scale every continuous-control library expects).

Example:
    >>> codec = ActionCodec("discrete", (45.0, 3.0))
    >>> codec.space, codec.decode(1).to_dict()
    (Discrete(9), {'keys': ['forward'], 'mouse': [0.0, 0.0]})
    >>> ActionCodec("box", (45.0, 3.0)).decode(np.array([1, 0, 0, 0, 0, 0, -1, 0, 0.5, -1.0])).to_dict()
    {'keys': ['forward'], 'mouse': [22.5, -3.0]}
    >>> ActionCodec("multidiscrete", (45.0, 3.0)).decode([1, 0, 2, 1, 0, 4, 2]).to_dict()
    {'keys': ['forward', 'turn_right', 'attack'], 'mouse': [45.0, 0.0]}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from worldgen import actions, checkpoint
from worldgen.actions import Action, ActionError

ACTION_SPACES = ("dict", "discrete", "multidiscrete", "box")

# The explorer that recorded the default model's data (env/sources/policies.py) clamps yaw to +-45
# degrees per step and pitch to +-3: the range for checkpoints that predate a stored
# "mouse_range" (training stores the data's own since; see worldgen/training/dynamics.py).
RECORDER_MOUSE_RANGE = (45.0, 3.0)

# Discrete actions: ppo_doom.py's set plus "no-op" (waiting is a real choice when a door opens or
# a monster walks in) and "forward + use" (E1M1's doors and lifts gate most of its pickups).
DISCRETE_ACTIONS: tuple[tuple[str, Action], ...] = tuple(
    (name, Action.from_keys(keys))
    for name, keys in (
        ("noop", []),
        ("forward", ["forward"]),
        ("forward_left", ["forward", "turn_left"]),
        ("forward_right", ["forward", "turn_right"]),
        ("turn_left", ["turn_left"]),
        ("turn_right", ["turn_right"]),
        ("attack", ["attack"]),
        ("forward_attack", ["forward", "attack"]),
        ("forward_use", ["forward", "use"]),
    )
)

# Mouse levels per axis in "multidiscrete": odd, so 0 is one of them; 5 gives still, half and full.
MOUSE_BINS = 5
# move, strafe, turn keys, attack, use, yaw, pitch
MULTIDISCRETE_NVEC = (3, 3, 3, 2, 2, MOUSE_BINS, MOUSE_BINS)
_K = {k: i for i, k in enumerate(actions.KEYS)}
_AXES = ((_K["forward"], _K["back"]), (_K["strafe_left"], _K["strafe_right"]), (_K["turn_left"], _K["turn_right"]))


def trained_mouse_range(model_folder: str | Path | None) -> tuple[float, float]:
    """(yaw, pitch) degrees per step that the model's training data covers: the ``mouse_range``
    stored with its dynamics part (written by ``worldgen train dynamics``), else
    :data:`RECORDER_MOUSE_RANGE` (the recorder's clamps, for checkpoints without it)."""
    if model_folder is not None:
        stored = checkpoint.config(model_folder, "dynamics").get("mouse_range")
        if stored is not None:
            return float(stored[0]), float(stored[1])
    return RECORDER_MOUSE_RANGE


def check_mouse_range(mouse_range: Any) -> tuple[float, float]:
    try:
        yaw, pitch = (float(v) for v in mouse_range)
    except (TypeError, ValueError):
        raise ValueError(f"mouse_range must be (yaw, pitch) degrees per step, got {mouse_range!r}") from None
    if not (0 <= yaw <= actions.MAX_MOUSE_DEG and 0 <= pitch <= actions.MAX_MOUSE_DEG):
        raise ValueError(f"mouse_range must lie in [0, {actions.MAX_MOUSE_DEG}] degrees per step, got {mouse_range!r}")
    return yaw, pitch


class ActionCodec:
    """One action space and its decoding into schema actions (see the module docstring)."""

    def __init__(self, kind: str, mouse_range: tuple[float, float]):
        if kind not in ACTION_SPACES:
            raise ValueError(f"action_space must be one of {ACTION_SPACES}, got {kind!r}")
        self.kind = kind
        self.mouse_range = np.array(check_mouse_range(mouse_range), np.float32)  # (2,) degrees
        if kind == "dict":
            self.space: spaces.Space = spaces.Dict(
                {
                    "keys": spaces.MultiBinary(actions.NUM_KEYS),
                    "mouse": spaces.Box(-self.mouse_range, self.mouse_range, (actions.NUM_MOUSE,), np.float32),
                }
            )
        elif kind == "discrete":
            self.space = spaces.Discrete(len(DISCRETE_ACTIONS))
        elif kind == "multidiscrete":
            self.space = spaces.MultiDiscrete(MULTIDISCRETE_NVEC)
        else:
            self.space = spaces.Box(-1.0, 1.0, (actions.ACTION_DIM,), np.float32)

    def decode(self, a: Any) -> Action:
        """One action of this space (or, for "dict", any form :func:`to_action` takes) -> an Action.
        Raises :class:`ActionError` naming the problem."""
        if self.kind == "dict":
            act = to_action(a)
            clipped = np.clip(act.mouse, -self.mouse_range, self.mouse_range)
            return act if np.array_equal(clipped, act.mouse) else Action(act.keys, clipped)
        if self.kind == "discrete":
            i = np.asarray(a)
            if i.shape != () or not np.issubdtype(i.dtype, np.integer) or not 0 <= int(i) < len(DISCRETE_ACTIONS):
                raise ActionError(
                    f"a discrete action is an integer in [0, {len(DISCRETE_ACTIONS)}) "
                    f"({', '.join(n for n, _ in DISCRETE_ACTIONS)}), got {a!r}"
                )
            return DISCRETE_ACTIONS[int(i)][1]
        if self.kind == "multidiscrete":
            v = np.asarray(a)
            nvec = np.array(MULTIDISCRETE_NVEC)
            if v.shape != nvec.shape or not np.issubdtype(v.dtype, np.integer) or (v < 0).any() or (v >= nvec).any():
                raise ActionError(
                    f"a multidiscrete action is {len(nvec)} integers below {nvec.tolist()} (move, strafe, "
                    f"turn, attack, use, yaw, pitch), got {a!r}"
                )
            keys = np.zeros(actions.NUM_KEYS, np.uint8)
            for choice, (first, second) in zip(v[:3], _AXES):  # 0 none, 1 first key, 2 second key
                if choice:
                    keys[first if choice == 1 else second] = 1
            keys[_K["attack"]], keys[_K["use"]] = v[3], v[4]
            levels = v[5:].astype(np.float32) / (MOUSE_BINS // 2) - 1.0  # 0..BINS-1 -> -1..1
            return Action(keys, levels * self.mouse_range)
        v = np.asarray(a, np.float32)
        if v.shape != (actions.ACTION_DIM,) or not np.isfinite(v).all():
            raise ActionError(
                f"a box action is {actions.ACTION_DIM} finite numbers (8 keys held when > 0, then yaw "
                f"and pitch in [-1, 1] of the trained range), got shape {v.shape}"
            )
        return Action(
            (v[: actions.NUM_KEYS] > 0).astype(np.uint8), np.clip(v[actions.NUM_KEYS :], -1.0, 1.0) * self.mouse_range
        )


def to_action(a: Any) -> Action:
    """One schema action (a dict of the "dict" space, an Action, or the wire form) -> an Action.

    Example:
        >>> to_action({"keys": np.array([1, 0, 0, 0, 0, 0, 0, 0]), "mouse": np.array([5.0, 0.0])}).to_dict()
        {'keys': ['forward'], 'mouse': [5.0, 0.0]}
        >>> to_action({"keys": [1, 0]})
        Traceback (most recent call last):
        ...
        worldgen.actions.ActionError: keys must have shape (8,) (one 0/1 per key forward, back, ..., use), got (2,)
    """
    if isinstance(a, Action):
        return a
    if not isinstance(a, Mapping):
        raise ActionError(
            f"an action must be a dict {{'keys': 8 x 0/1, 'mouse': [yaw, pitch] degrees}} (the action "
            f"space) or a worldgen Action, got {type(a).__name__}"
        )
    unknown = set(a) - {"keys", "mouse"}
    if unknown or "keys" not in a:
        raise ActionError(f"an action dict has 'keys' and 'mouse'; got keys {sorted(map(str, a))}")
    return Action.from_dict(a)
