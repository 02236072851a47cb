"""ViZDoom as a data source: game setup, the action -> button mapping, and step -> Episode arrays.

One :class:`DoomEnv` wraps one ``vizdoom.DoomGame`` (one engine process). Per step it gives an
:class:`Observation`: the RGB frame, the depth buffer, the camera pose and the game variables.
:func:`rollout` plays a policy (or a fixed action list) and yields the steps as
:class:`~worldgen.data.Episode` chunks in the dataset's alignment (``keys[i]``/``mouse[i]`` is
the action taken after observing ``frames[i]``).

Action mapping (measured with ViZDoom 1.3.2, ``freedoom1.wad``; see ``tests/test_doom_record.py``):

* the 8 keys of :data:`worldgen.actions.KEYS` map one to one onto :data:`KEY_BUTTONS`;
* ``mouse`` yaw/pitch (degrees per step) map onto the delta buttons ``TURN_LEFT_RIGHT_DELTA`` and
  ``LOOK_UP_DOWN_DELTA``. ViZDoom repeats a button for every tic of a frame skip, so the button
  value is degrees *per tic*: ``yaw / frame_skip``. A positive ``TURN_LEFT_RIGHT_DELTA`` turns
  right (the ANGLE game variable, counter-clockwise, decreases); a positive ``LOOK_UP_DOWN_DELTA``
  looks up. Both match the schema's signs, so no sign flips.
* ``turn_left``/``turn_right`` keys turn at Doom's keyboard rate with its acceleration:
  1.758 deg/tic for the first 5 tics a key is held, then 3.516 deg/tic. At frame skip 4 that is
  7.0, 12.3, then 14.1 degrees per step. A model learns this from the history it sees.

Pose conventions (``Episode.pose``, :data:`worldgen.data.dataset.POSE_FIELDS`): the *camera*
(eye, including view bob), from the CAMERA_* game variables. ``x, y`` map units (y up on the
automap), ``z`` absolute eye height, ``yaw`` = Doom ANGLE in degrees counter-clockwise from +x
(so ``mouse`` yaw > 0 lowers it), ``pitch`` in degrees with > 0 looking up (ViZDoom's PITCH
with the sign flipped, to match the action schema). Horizontal field of view :data:`HFOV_DEG`.

Depth: ViZDoom's uint8 depth buffer, larger = farther; roughly 7 map units per level (measured
walking at a wall), a wall at arm's length reads ~2. Good for nearness, not calibrated geometry.

Example:
    >>> env = DoomEnv(DoomConfig())                          # doctest: +SKIP
    >>> obs = env.reset("E1M1", seed=7)                      # doctest: +SKIP
    >>> obs.frame.shape, obs.depth.shape, obs.pose.shape     # doctest: +SKIP
    ((120, 160, 3), (120, 160), (5,))
    >>> a = Action.from_keys(["forward"], yaw=5.0)           # doctest: +SKIP
    >>> obs = env.step(a.keys, a.mouse)                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vizdoom as vzd

from worldgen import actions
from worldgen.data.dataset import Episode

_V = vzd.GameVariable
_B = vzd.Button

# One button per schema key, in actions.KEYS order.
KEY_BUTTONS: tuple[vzd.Button, ...] = (
    _B.MOVE_FORWARD,
    _B.MOVE_BACKWARD,
    _B.MOVE_LEFT,
    _B.MOVE_RIGHT,
    _B.TURN_LEFT,
    _B.TURN_RIGHT,
    _B.ATTACK,
    _B.USE,
)
# Then the mouse deltas, in actions.MOUSE order (yaw, pitch).
MOUSE_BUTTONS: tuple[vzd.Button, ...] = (_B.TURN_LEFT_RIGHT_DELTA, _B.LOOK_UP_DOWN_DELTA)
BUTTONS = KEY_BUTTONS + MOUSE_BUTTONS
assert len(KEY_BUTTONS) == actions.NUM_KEYS and len(MOUSE_BUTTONS) == actions.NUM_MOUSE

# Camera pose, in POSE_FIELDS order; PITCH_SIGN flips ViZDoom's pitch (< 0 = up) to > 0 = up.
POSE_VARIABLES = (_V.CAMERA_POSITION_X, _V.CAMERA_POSITION_Y, _V.CAMERA_POSITION_Z, _V.CAMERA_ANGLE, _V.CAMERA_PITCH)
PITCH_SIGN = -1.0
# Game variables stored per step (names lower-cased into the dataset index): what rewards,
# evaluation and HUD-free rendering need later.
VARIABLES = (
    _V.HEALTH,
    _V.ARMOR,
    _V.SELECTED_WEAPON,
    _V.SELECTED_WEAPON_AMMO,
    _V.KILLCOUNT,
    _V.ITEMCOUNT,
    _V.SECRETCOUNT,
    _V.DAMAGECOUNT,
    _V.DAMAGE_TAKEN,
    _V.HITCOUNT,
    _V.HITS_TAKEN,
    _V.DEAD,
)
VARIABLE_NAMES = [v.name.lower() for v in VARIABLES]
HFOV_DEG = 90.0  # ViZDoom's default horizontal field of view (CAMERA_FOV)
WAD_DIR = Path(vzd.__file__).parent


class DoomError(ValueError):
    """A Doom setting that cannot work (unknown map, resolution, WAD); the message names it."""


@dataclass(frozen=True)
class DoomConfig:
    """Game settings shared by every episode of a recording (stored in the dataset index)."""

    wad: str = "freedoom1.wad"  # ships inside the vizdoom package: no download
    resolution: tuple[int, int] = (160, 120)  # (W, H); GameNGen-scale frames, cheap to model
    frame_skip: int = 4  # tics per step: 35/4 ~ 8.75 steps/s, as most Doom agents
    skill: int = 2  # 1-5; 2 has monsters but lets an explorer live long enough to roam
    render_hud: bool = False  # the status bar repeats `variables` in pixels; keep frames about the world

    def __post_init__(self) -> None:
        resolution_enum(self.resolution)
        if self.frame_skip < 1:
            raise DoomError(f"frame_skip must be >= 1, got {self.frame_skip}")
        if not 1 <= self.skill <= 5:
            raise DoomError(f"skill must be 1..5, got {self.skill}")
        wad_path(self.wad)

    def to_dict(self) -> dict:
        return {
            "wad": self.wad,
            "resolution": list(self.resolution),
            "frame_skip": self.frame_skip,
            "skill": self.skill,
            "render_hud": self.render_hud,
        }


def resolution_enum(res: tuple[int, int]) -> vzd.ScreenResolution:
    name = f"RES_{res[0]}X{res[1]}"
    if not hasattr(vzd.ScreenResolution, name):
        known = sorted(tuple(map(int, n[4:].split("X"))) for n in dir(vzd.ScreenResolution) if n.startswith("RES_"))
        raise DoomError(
            f"resolution {res[0]}x{res[1]} is not a ViZDoom screen resolution; choose one "
            f"of {', '.join(f'{w}x{h}' for w, h in known)}"
        )
    return getattr(vzd.ScreenResolution, name)


def wad_path(wad: str) -> Path:
    """A WAD name shipped with vizdoom (``freedoom1.wad``) or a path to one."""
    p = Path(wad) if Path(wad).is_file() else WAD_DIR / wad
    if not p.is_file():
        raise DoomError(f"WAD {wad!r} not found (neither a file nor in {WAD_DIR})")
    return p


def wad_maps(wad: str) -> list[str]:
    """Map names (E1M1.., MAP01..) in a WAD, read from its lump directory.

    Checked before a game starts because ViZDoom hangs on a map that does not exist.
    """
    path = wad_path(wad)
    with open(path, "rb") as f:
        ident, count, offset = struct.unpack("<4sii", f.read(12))
        if ident not in (b"IWAD", b"PWAD"):
            raise DoomError(f"{path}: not a WAD file")
        f.seek(offset)
        directory = f.read(16 * count)
    names = (directory[i * 16 + 8 : i * 16 + 16].rstrip(b"\0").decode("ascii", "replace") for i in range(count))
    return [n for n in names if re.fullmatch(r"E\dM\d|MAP\d\d", n)]


def check_maps(maps: list[str], wad: str) -> list[str]:
    """Upper-cased ``maps``, each checked to exist in ``wad``."""
    known = wad_maps(wad)
    maps = [m.strip().upper() for m in maps if m.strip()]
    if not maps:
        raise DoomError("no maps given")
    for m in maps:
        if m not in known:
            raise DoomError(f"map {m!r} is not in {wad}; its maps are {', '.join(known)}")
    return maps


def to_buttons(keys: np.ndarray, mouse: np.ndarray, frame_skip: int) -> list[float]:
    """One schema action -> ViZDoom button values (keys 0/1, then deltas in degrees per tic)."""
    return [float(k) for k in keys] + [float(mouse[0]) / frame_skip, float(mouse[1]) / frame_skip]


@dataclass
class Observation:
    """What the game shows after a step (or at the start of an episode)."""

    frame: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray  # (H, W) uint8, larger = farther
    pose: np.ndarray  # (5,) float32: x, y, z, yaw, pitch (module docstring)
    variables: np.ndarray  # (V,) float32, VARIABLE_NAMES


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _new_game(config: DoomConfig, first_map: str, workdir: str, sectors: bool = False) -> vzd.DoomGame:
    game = vzd.DoomGame()
    game.set_doom_game_path(str(wad_path(config.wad)))
    game.set_doom_map(first_map)  # init() starts an episode: it must be a map that exists
    game.set_doom_skill(config.skill)
    game.set_doom_config_path(os.path.join(workdir, "vizdoom.ini"))
    game.set_screen_resolution(resolution_enum(config.resolution))
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_depth_buffer_enabled(True)
    game.set_sectors_info_enabled(sectors)  # halves the step rate: only for map geometry
    game.set_render_hud(config.render_hud)
    game.set_render_messages(False)  # pickup texts would be noise the model cannot predict
    game.set_render_crosshair(False)
    game.set_render_weapon(True)  # the weapon sprite shows attacks and bob: part of the world
    game.set_window_visible(False)
    game.set_sound_enabled(False)
    game.set_episode_timeout(0)  # episode length is the recorder's business
    game.set_mode(vzd.Mode.PLAYER)  # synchronous: deterministic given seed and actions
    game.set_available_buttons(list(BUTTONS))
    game.set_available_game_variables(list(POSE_VARIABLES + VARIABLES))
    # The engine writes ./_vizdoom/ into its working directory: keep it out of the user's.
    with _cwd(workdir), _no_sigint():
        game.init()
    return game


@contextlib.contextmanager
def _no_sigint() -> Iterator[None]:
    """Start the engine with Ctrl-C ignored (it inherits that): a Ctrl-C reaches Python as
    KeyboardInterrupt, whose cleanup closes the engine, instead of killing it mid-call."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _shutdown(game: vzd.DoomGame, tmp: tempfile.TemporaryDirectory) -> None:
    game.close()
    tmp.cleanup()


class DoomEnv:
    """One ViZDoom game. ``reset(map, seed)`` starts an episode, ``step(keys, mouse)`` plays a step.

    The same config, map, seed and action sequence give identical frames in any process.
    """

    def __init__(self, config: DoomConfig, first_map: str = "E1M1"):
        self.config = config
        tmp = tempfile.TemporaryDirectory(prefix="worldgen-vizdoom-")
        self.game = _new_game(config, check_maps([first_map], config.wad)[0], tmp.name)
        # Finalizers run newest first at exit: the engine stops before its folder is removed.
        self._close = weakref.finalize(self, _shutdown, self.game, tmp)
        self.end: str | None = None  # why the last episode ended: "death", "exit" or None (still running)

    def reset(self, map: str, seed: int) -> Observation:
        self.game.set_seed(int(seed))
        self.game.set_doom_map(map)
        self.game.new_episode()
        self.end = None
        return self._observe()

    def step(self, keys: np.ndarray, mouse: np.ndarray) -> Observation | None:
        """Play one action for ``frame_skip`` tics; None when that ended the episode (see ``end``)."""
        self.game.make_action(to_buttons(keys, mouse, self.config.frame_skip), self.config.frame_skip)
        if self.game.is_episode_finished():
            self.end = "death" if self.game.is_player_dead() else "exit"
            return None
        return self._observe()

    def _observe(self) -> Observation:
        s = self.game.get_state()
        gv = np.asarray(s.game_variables, np.float32)
        pose = gv[:5].copy()
        pose[4] *= PITCH_SIGN
        return Observation(frame=s.screen_buffer, depth=s.depth_buffer, pose=pose, variables=gv[5:])

    def close(self) -> None:
        self._close()

    def __enter__(self) -> DoomEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_lines(map: str, wad: str = "freedoom1.wad") -> np.ndarray:
    """The map's line segments ``(L, 5)`` float32: ``x1, y1, x2, y2, blocking`` in map units.

    Read from ViZDoom's sector info in a short-lived game of its own (sector info slows every
    step, so recording games run without it). Blocking lines are walls; the rest are steps,
    doors and other sector borders.
    """
    config = DoomConfig(wad=wad, resolution=(160, 120))
    with tempfile.TemporaryDirectory(prefix="worldgen-vizdoom-") as tmp:
        game = _new_game(config, check_maps([map], wad)[0], tmp, sectors=True)
        try:
            sectors = game.get_state().sectors
        finally:
            game.close()
    lines = {(line.x1, line.y1, line.x2, line.y2, float(line.is_blocking)) for s in sectors for line in s.lines}
    return np.array(sorted(lines), np.float32).reshape(-1, 5)


# A policy maps an observation to (keys (8,) uint8, mouse (2,) float32 degrees).
Act = Callable[[Observation], "tuple[np.ndarray, np.ndarray]"]


def rollout(env: DoomEnv, act: Act, map: str, seed: int, max_steps: int, chunk_steps: int = 512) -> Iterator[Episode]:
    """Play one episode of at most ``max_steps`` steps; yield it as Episode chunks in order.

    Chunks keep memory bounded for long episodes. After the generator is exhausted,
    ``env.end`` says whether the game ended it ("death", "exit") or the step limit did (None).
    """
    res_w, res_h = env.config.resolution
    obs = env.reset(map, seed)
    step = 0
    while obs is not None and step < max_steps:
        n = min(chunk_steps, max_steps - step)
        frames = np.empty((n, res_h, res_w, 3), np.uint8)  # (N, H, W, 3)
        depth = np.empty((n, res_h, res_w), np.uint8)  # (N, H, W)
        pose = np.empty((n, 5), np.float32)  # (N, 5)
        variables = np.empty((n, len(VARIABLES)), np.float32)
        keys = np.empty((n, actions.NUM_KEYS), np.uint8)  # (N, 8)
        mouse = np.empty((n, actions.NUM_MOUSE), np.float32)  # (N, 2)
        i = 0
        while i < n and obs is not None:
            k, m = act(obs)
            frames[i], depth[i], pose[i], variables[i], keys[i], mouse[i] = (
                obs.frame,
                obs.depth,
                obs.pose,
                obs.variables,
                k,
                m,
            )
            obs = env.step(k, m)
            i += 1
        step += i
        yield Episode(
            frames=frames[:i], keys=keys[:i], mouse=mouse[:i], depth=depth[:i], pose=pose[:i], variables=variables[:i]
        )
