"""Policies that play while the recorder records: a map-covering explorer, the explorer with
bursts of random actions ("babble": training data whose actions are not foretold by the frames),
the explorer with pauses where it lets go of every control ("still"), the explorer whose mouse
yaw gets a fresh random offset every step ("jitter"), and a uniform-random baseline.

A policy is called once per step with the current observation (anything with ``depth``
(H, W), ``pose`` (5,) and ``variables`` (V,) like :class:`worldgen.env.sources.doom.Observation`) and
returns one schema action, ``keys`` (8,) uint8 and ``mouse`` (2,) float32 degrees.
``reset(seed)`` starts an episode; the same seed and observations give the same actions, so
a recorded episode is reproducible from its seed alone.

Example:
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> p = make_policy("explore")
    >>> p.reset(seed=0)
    >>> obs = SimpleNamespace(depth=np.full((120, 160), 40, np.uint8), pose=np.zeros(5, np.float32),
    ...                       variables=np.zeros(0, np.float32))
    >>> keys, mouse = p(obs)
    >>> keys.shape, mouse.shape
    ((8,), (2,))
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from worldgen import actions

K = {name: i for i, name in enumerate(actions.KEYS)}
DOOM_EXTENT = 32768.0  # Doom map coordinates lie in +-32768 units


class Obs(Protocol):
    depth: np.ndarray  # (H, W), larger = farther
    pose: np.ndarray  # (5,) x, y, z, yaw (deg, counter-clockwise), pitch (deg, > 0 up)
    variables: np.ndarray  # (V,) game variables, named by the recorder


class Policy(Protocol):
    def reset(self, seed: int) -> None: ...
    def __call__(self, obs: Obs) -> tuple[np.ndarray, np.ndarray]: ...


# --- uniform random ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomConfig:
    yaw_range: float = 20.0  # deg/step, uniform in +-range: a brisk but human turn rate
    pitch_range: float = 0.0  # a random pitch walk ends staring at the floor; the baseline is about movement


class RandomPolicy:
    """Uniform random over the schema: each key held with probability 1/2, mouse uniform."""

    def __init__(self, config: RandomConfig = RandomConfig()):
        self.config = config
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, obs: Obs) -> tuple[np.ndarray, np.ndarray]:
        keys = (self.rng.random(actions.NUM_KEYS) < 0.5).astype(np.uint8)
        c = self.config
        mouse = self.rng.uniform(-1, 1, 2) * np.array([c.yaw_range, c.pitch_range])
        return keys, mouse.astype(np.float32)


# --- what the explorer knows of the map ----------------------------------------------------------
class FrontierMap:
    """A top-down grid of what the depth buffer has shown (unknown, free, blocked), and the
    shortest way through free cells to the nearest *frontier*: a free cell next to unknown space.

    Example:
        >>> m = FrontierMap(cell=32.0)
        >>> m.observe(0.0, 0.0, np.radians([0.0]), np.array([300.0]))  # a wall 300 units east
        >>> m.plan(0.0, 0.0) is not None   # free cells east border unknown ones: go look
        True
    """

    UNKNOWN, FREE, BLOCKED = 0, 1, 2

    def __init__(self, cell: float = 32.0, max_range: float = 768.0, window: int = 48, memory: int = 300):
        self.cell = cell  # map units per cell: the player is 32 wide
        self.max_range = max_range  # map units: beyond this, sparse rays leave holes that look like frontiers
        self.window = window  # cells each way searched for a frontier
        # memory: steps a learned block lasts (~35 s of play)
        self.half = int(DOOM_EXTENT // cell)
        self.state = np.zeros((2 * self.half, 2 * self.half), np.uint8)  # (X, Y)
        # Learned the hard way (stuck, unreachable): blocked whatever rays see through it later
        # (windows, ledges and railings look open to the depth buffer), until it expires: a
        # blocked doorway may open, and wrong guesses must not seal a passage for good.
        self.learned: dict[tuple[int, int], int] = {}  # cell -> observe() count it expires at
        self.memory = memory
        self.t = 0
        self._steps = np.arange(16.0, max_range, 24.0)  # (S,) sample points along a ray, < a cell apart

    def index(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        return _grid(x, self.cell, 2 * self.half), _grid(y, self.cell, 2 * self.half)

    def observe(self, x: float, y: float, heading: np.ndarray, dist: np.ndarray) -> None:
        """Rays from (x, y) along ``heading`` (R,) radians hit something at ``dist`` (R,) units
        (``inf`` or >= max_range: nothing in range). Free up to the hit, blocked just past it."""
        cos, sin = np.cos(heading), np.sin(heading)
        free = self._steps[None, :] < dist[:, None] - 16.0  # (R, S) short of the hit, by half a cell
        px = x + self._steps[None, :] * cos[:, None]
        py = y + self._steps[None, :] * sin[:, None]
        self.state[self.index(px[free], py[free])] = self.FREE
        hit = dist < self.max_range
        # 12 units past the hit: depth is coarse (~7 units), and a wall must not close a corridor.
        self.block(x + (dist[hit] + 12.0) * cos[hit], y + (dist[hit] + 12.0) * sin[hit])
        i = self.index(float(x), float(y))
        self.state[i] = self.FREE  # where the player stands is walkable
        self.learned.pop((int(i[0]), int(i[1])), None)
        self.t += 1

    def block(self, x: np.ndarray | float, y: np.ndarray | float, learned: bool = False) -> None:
        i = self.index(x, y)
        self.state[i] = self.BLOCKED
        if learned:
            self.learned[(int(i[0]), int(i[1]))] = self.t + self.memory

    def plan(
        self, x: float, y: float, goal: tuple[float, float] | None = None, lookahead: int = 5
    ) -> tuple[float, float, float, float] | None:
        """``(waypoint x, y, goal x, y)`` in map units: the cell ``lookahead`` cells along the
        shortest free path to ``goal`` if it is still a reachable frontier, else to the nearest
        frontier at least 2 cells away; None if none is reachable within ``window`` cells.
        Keeping the goal stops the explorer from dithering between frontiers."""
        ix, iy = (int(v) for v in self.index(x, y))
        x0, y0 = max(ix - self.window, 0), max(iy - self.window, 0)
        st = self.state[x0 : ix + self.window + 1, y0 : iy + self.window + 1]
        free = st == self.FREE
        self.learned = {c: t for c, t in self.learned.items() if t > self.t}
        for cx, cy in self.learned:
            if 0 <= cx - x0 < st.shape[0] and 0 <= cy - y0 < st.shape[1]:
                free[cx - x0, cy - y0] = False
        frontier = free & _shift_or(st == self.UNKNOWN)
        target = None
        if goal is not None:
            gx, gy = (int(v) for v in self.index(*goal))
            if 0 <= gx - x0 < st.shape[0] and 0 <= gy - y0 < st.shape[1] and frontier[gx - x0, gy - y0]:
                target = np.zeros_like(frontier)
                target[gx - x0, gy - y0] = True
        sx, sy = ix - x0, iy - y0
        free[sx, sy] = True
        dist = np.full(st.shape, -1, np.int32)
        dist[sx, sy] = 0
        front = np.zeros(st.shape, bool)
        front[sx, sy] = True
        found = None
        for k in range(1, 4 * self.window):  # breadth-first, one ring of cells per iteration
            front = _shift_or(front, diagonal=True) & free & (dist < 0)  # diagonal: no L-shaped paths
            if not front.any():
                break
            dist[front] = k
            if k >= 2 and (hits := front & (frontier if target is None else target)).any():
                found = np.argwhere(hits)[0]
                break
        if found is None:
            return None if target is None else self.plan(x, y, None, lookahead)
        gx, gy = int(found[0]), int(found[1])
        wx, wy = gx, gy
        while dist[wx, wy] > lookahead:  # walk the path back from the goal
            for dx, dy in NEIGHBOURS:
                nx, ny = wx + dx, wy + dy
                if 0 <= nx < st.shape[0] and 0 <= ny < st.shape[1] and dist[nx, ny] == dist[wx, wy] - 1:
                    wx, wy = nx, ny
                    break
        centre = lambda i, o: (i + o - self.half + 0.5) * self.cell  # noqa: E731
        return centre(wx, x0), centre(wy, y0), centre(gx, x0), centre(gy, y0)


def _grid(v: np.ndarray | float, cell: float, n: int) -> np.ndarray:
    """Map coordinate(s) -> index on a grid of ``n`` cells of ``cell`` units centred on 0."""
    if isinstance(v, (float, int, np.floating)):  # one point: plain Python is 10x quicker
        return min(max(int(v // cell) + n // 2, 0), n - 1)
    i = np.floor_divide(v, cell).astype(np.int64) + n // 2
    return np.minimum(np.maximum(i, 0), n - 1)  # ufuncs: np.clip costs more than the rest


def _shift_or(a: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """Cells with a 4-neighbour (or 8-neighbour, ``diagonal``) set in ``a``."""
    out = np.zeros_like(a)
    out[1:] |= a[:-1]
    out[:-1] |= a[1:]
    out[:, 1:] |= a[:, :-1]
    out[:, :-1] |= a[:, 1:]
    if diagonal:
        out[1:, 1:] |= a[:-1, :-1]
        out[:-1, :-1] |= a[1:, 1:]
        out[1:, :-1] |= a[:-1, 1:]
        out[:-1, 1:] |= a[1:, :-1]
    return out


NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


# --- the explorer --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExploreConfig:
    hfov_deg: float = 90.0  # ViZDoom's horizontal field of view, to turn depth columns into bearings
    depth_units: float = 7.0  # map units per depth level (measured, env/sources/doom.py)
    pixel_aspect: float = 1.2  # Doom's tall pixels: vertical / horizontal focal length (measured via pitch)
    rays: int = 40  # bearings: depth columns min-pooled to this many (2.25 deg each at 90 deg)
    near: float = 40.0  # map units: a wall this close ahead ends a walk (player radius is 16)
    cell: float = 64.0  # map units per novelty cell; worldgen.data.coverage uses the same
    replan_every: int = 8  # steps between frontier searches (~1 s of play)
    give_up: int = 80  # steps chasing one goal before it counts as unreachable
    steer_gain: float = 0.4  # fraction of the bearing error corrected per step: smooth, not twitchy
    max_steer: float = 15.0  # deg/step cap while walking
    wander_deg: float = 2.5  # std of the mouse-yaw wander (OU noise) while walking
    wide_turn_p: float = 0.01  # chance per step of a spontaneous wide turn (45-270 deg)
    key_turn_p: float = 0.25  # share of turns made with the turn keys instead of the mouse
    door_p: float = 0.6  # chance to try a wall ahead as a door: use, then wait for it to open
    door_wait: int = 6  # steps to wait: a Doom door opens in about a second (9 steps)
    scan_every: int = 150  # at most this often, look around 360 deg when no frontier is in reach
    strafe_p: float = 0.03  # chance per step to start strafing for a few steps
    back_p: float = 0.004  # chance per step to back up for a few steps
    idle_p: float = 0.005  # chance per step to stop and look around a moment
    attack_p: float = 0.02  # chance per step to start a burst of fire (1-6 steps)
    use_p: float = 0.03  # chance per step to press use (switches, lifts)
    fight: bool = True  # when hurt (damage_taken rises in obs.variables), fire while sweeping
    pitch_p: float = 0.01  # chance per step to pick a new pitch target in +-pitch_max
    pitch_max: float = 12.0  # deg: small looks up/down, enough to keep pitch in the data
    stuck_steps: int = 10  # steps pushing forward that the stuck detector looks back over
    stuck_dist: float = 24.0  # moved less than this over them = stuck (walking covers 80+)
    # Chance per step (while walking) of a short burst of one random action held 2-8 steps: moves
    # that the recent frames do not foretell, so a world model must read the action to get them
    # right. 0 keeps "explore" exactly as recorded before (no extra random draws).
    babble_p: float = 0.0
    # Chance per step (while walking) to stand completely still for 2-16 steps: no key, no mouse.
    # In "explore" play that happens only at doors (~2% of steps), and a world model trained on it
    # keeps walking when the player lets go. 0 keeps "explore" exactly as recorded before.
    still_p: float = 0.0
    # Half-width (deg) of a uniform mouse-yaw offset drawn afresh every step the player moves: the
    # explorer steers smoothly (its yaw one step predicts the next: lag-1 correlation 0.80), so a
    # model can turn from the context's motion alone; independent offsets it can only get from
    # the action. 0 keeps "explore" exactly as recorded before.
    jitter_deg: float = 0.0


class ExplorePolicy:
    """Covers the map like a curious player.

    It maps what the depth buffer shows into a :class:`FrontierMap` and walks the shortest
    free path to the nearest unexplored opening, steering smoothly with continuous mouse
    deltas. At a wall it tries a door (use, wait) or turns until the way is clear; it looks
    around 360 degrees at the start and whenever nothing is left to explore nearby, then heads
    for the most open, least visited view; when stuck it backs off diagonally and turns away.
    Around that, for varied data: wide turns (some with the turn keys), strafes, pauses,
    backing up, small pitch looks, bursts of fire (and fire while sweeping when hurt), use.
    """

    def __init__(self, config: ExploreConfig = ExploreConfig(), variable_names: Sequence[str] = ()):
        self.config = config
        names = list(variable_names)
        self._damage = names.index("damage_taken") if "damage_taken" in names else None
        self._width = 0  # depth width the bearing tables below were made for
        self.reset(0)

    def reset(self, seed: int) -> None:
        c = self.config
        self.rng = np.random.default_rng(seed)
        self.map = FrontierMap()
        n = int(2 * DOOM_EXTENT // c.cell)
        self.visits = np.zeros((n, n), np.int32)  # (X, Y) steps spent per novelty cell
        self.trail: deque[np.ndarray] = deque(maxlen=c.stuck_steps)
        self.t, self.last_door, self.last_scan, self.last_wall = 0, -(10**6), -(10**6), -(10**6)
        self.mode, self.left = "walk", 0  # current manoeuvre and its remaining steps
        self.then: str | None = None  # what follows it: "turn" (after an escape), "face" (after a scan)
        self.turn_rate, self.turn_keys = 0.0, False
        self.until_clear, self.turned = False, 0.0  # turn-until-clear and the degrees turned so far
        self.best = (-np.inf, 0.0)  # best (score, heading) seen during a scan
        self.plan: tuple[float, float, float, float] | None = None  # waypoint x, y, goal x, y
        self.goal_since, self.next_plan = 0, 0
        self.strafe, self.strafe_left = 0, 0  # strafe direction (-1 left, +1 right) and steps left
        self.attack_left, self.wander, self.pitch_target = 0, 0.0, 0.0
        self.damage: float | None = None  # last damage counter seen
        self.babble_keys, self.babble_yaw = np.zeros(actions.NUM_KEYS, np.uint8), 0.0  # a burst's action

    # --- perception -----------------------------------------------------------------------------
    def _cell(self, v: np.ndarray | float) -> np.ndarray:
        """Map coordinate(s) -> index into ``visits``."""
        return _grid(v, self.config.cell, len(self.visits))

    def _columns(self, obs: Obs) -> tuple[np.ndarray, np.ndarray]:
        """Per bearing (``rays`` groups of depth columns): distance (map units) to the nearest
        thing at eye to waist level, and the bearing (deg, > 0 = left of centre).

        Eye level sees walls, monsters and closed doors, and looks over floors, stairs and low
        sills (the stuck detector learns those). A 2.5D test of each pixel's height that also
        caught sills and railings covered less of the maps (stairs read as walls): measured.
        """
        c = self.config
        h, w = obs.depth.shape
        if self._width != w:
            f = (w / 2) / math.tan(math.radians(c.hfov_deg / 2))  # horizontal focal length, pixels
            self._group = max(w // c.rays, 1)  # columns per bearing
            n = w // self._group
            centre = (np.arange(n) + 0.5) * self._group - 0.5  # (R,) column at each bearing's centre
            self._bearing = np.degrees(np.arctan(((w - 1) / 2 - centre) / f))  # (R,)
            self._secant = 1.0 / np.cos(np.radians(self._bearing))  # depth is planar, rays are not
            self._fv = f * c.pixel_aspect  # vertical focal length, pixels
            self._width = w
        # Doom looks up and down by shearing the image: the horizon row moves by fv * tan(pitch).
        horizon = int(h / 2 + self._fv * math.tan(math.radians(float(obs.pose[4]))))
        band = obs.depth[max(horizon - 2, 0) : max(horizon + 6, 1) : 2]  # (4, W) eye to waist level
        # 0 is the weapon sprite (it rises into view when firing), never a wall (>= 16 units away).
        level = np.where(band == 0, 255, band).min(0)  # (W,)
        n = len(self._bearing)
        level = level[: n * self._group].reshape(n, self._group).min(1).astype(np.float32)  # (R,) thin things count
        dist = level * c.depth_units * self._secant
        dist[level >= 250] = np.inf  # saturated: nothing in range
        return dist, self._bearing

    def _scores(self, obs: Obs, dist: np.ndarray, bearing: np.ndarray) -> np.ndarray:
        """(R,) how good each bearing is to head down: room to walk minus how visited it is."""
        reach = np.minimum(dist, 384.0)  # six floor tiles; farther is not better
        heading = np.radians(obs.pose[3] + bearing)
        seen = 0.0
        for frac in (0.5, 1.0):  # halfway and just short of the wall: the floor, not the wall's cell
            d = np.maximum(reach * frac - 32.0, 0.0)
            seen = (
                seen
                + self.visits[
                    self._cell(obs.pose[0] + d * np.cos(heading)), self._cell(obs.pose[1] + d * np.sin(heading))
                ]
            )
        score = reach / 384.0 - 0.35 * np.log1p(seen / 2)
        return np.convolve(score, np.ones(3) / 3, mode="same")  # a gap must be wider than a sliver

    # --- manoeuvres -----------------------------------------------------------------------------
    def _start(self, mode: str, steps: int, then: str | None = None) -> None:
        self.mode, self.left, self.then = mode, max(1, steps), then

    def _start_turn(self, direction: float, degrees: float, until_clear: bool = False, slowest: float = 10.0) -> None:
        """Turn ``degrees`` toward ``direction`` (+1 right, -1 left) at a rate drawn per turn
        (log-uniform in ``slowest``..30 deg/step); ``until_clear``: stop early, after 45
        degrees, once the way ahead is open."""
        c, r = self.config, self.rng
        self.turn_keys = bool(r.random() < c.key_turn_p)
        rate = 14.0 if self.turn_keys else float(np.exp(r.uniform(math.log(slowest), math.log(30.0))))
        self._start("turn", round(degrees / rate))
        self.turn_rate, self.until_clear, self.turned = direction * rate, until_clear, 0.0

    def _face(self, heading: float, yaw: float) -> None:
        """Turn toward absolute ``heading`` (deg, counter-clockwise) from ``yaw``."""
        delta = (heading - yaw + 180.0) % 360.0 - 180.0  # > 0: heading is to the left
        if abs(delta) < 10:
            self._start("walk", 0)
        else:
            self._start_turn(-math.copysign(1.0, delta), abs(delta))

    def _goal_bearing(self, obs: Obs) -> float | None:
        """Bearing of the current waypoint (deg, > 0 = left), or None without a plan."""
        if self.plan is None:
            return None
        x, y, yaw = float(obs.pose[0]), float(obs.pose[1]), float(obs.pose[3])
        heading = math.degrees(math.atan2(self.plan[1] - y, self.plan[0] - x))
        return (heading - yaw + 180.0) % 360.0 - 180.0

    def _side(self, obs: Obs, scores: np.ndarray) -> float:
        """Which way to turn from a wall: toward the waypoint, else the better half of the view."""
        goal = self._goal_bearing(obs)
        if goal is not None:
            return -1.0 if goal > 0 else 1.0
        w = len(scores)
        return 1.0 if scores[w // 2 :].mean() > scores[: w // 2].mean() else -1.0  # right half better

    def _block_ahead(self, obs: Obs) -> None:
        """What stops us is just ahead: the map must not route through it again."""
        yaw = math.radians(float(obs.pose[3]))
        for d in (24.0, 48.0):
            self.map.block(obs.pose[0] + d * math.cos(yaw), obs.pose[1] + d * math.sin(yaw), learned=True)
        self.next_plan = self.t

    def _replan(self, obs: Obs) -> None:
        c = self.config
        x, y = float(obs.pose[0]), float(obs.pose[1])
        old = self.plan
        self.plan = self.map.plan(x, y, None if old is None else old[2:])
        if self.plan is None or old is None or self.plan[2:] != old[2:]:
            self.goal_since = self.t
        elif self.t - self.goal_since > c.give_up:  # chased too long: unreachable (a ledge, a window)
            self.map.block(self.plan[2], self.plan[3], learned=True)
            self.plan, self.goal_since = self.map.plan(x, y), self.t
        self.next_plan = self.t + c.replan_every

    def _choose(self, obs: Obs, dist: np.ndarray, scores: np.ndarray, hurt: bool, stuck: bool) -> np.ndarray:
        """Pick the manoeuvre for this step; return keys it adds at its start (use)."""
        c, r, w = self.config, self.rng, len(dist)
        keys = np.zeros(actions.NUM_KEYS, np.uint8)
        ahead = float(np.min(dist[w // 3 : w - w // 3]))  # nearest thing in the middle third
        if hurt and c.fight and self.mode != "fight":
            self._start("fight", int(r.integers(6, 12)))
            self.turn_rate = float(r.choice([-1, 1]) * r.uniform(6, 15))
        if self.mode == "turn" and self.until_clear and self.turned >= 45 and ahead > 3 * c.near:
            self._start("walk", 0)
        if self.mode != "walk":
            return keys
        goal = self._goal_bearing(obs)
        if stuck:  # back off diagonally, then turn well away; use in case it is a door
            self._block_ahead(obs)
            self._start("escape", int(r.integers(3, 8)), then="turn")
            self.strafe = int(r.choice([-1, 1]))
            keys[K["use"]] = 1
            self.trail.clear()
        elif ahead < c.near:
            if self.t - self.last_door > 40 and r.random() < c.door_p:
                self._start("door", c.door_wait)
                self.last_door = self.t
                keys[K["use"]] = 1
            else:
                if goal is not None and abs(goal) < 45:  # the plan runs into this wall: it is wrong here
                    self._block_ahead(obs)
                self._start_turn(self._side(obs, scores), r.uniform(60, 180), until_clear=True)
                self.last_wall = self.t
        elif self.t == 1 or (self.plan is None and self.t - self.last_scan > c.scan_every):
            self._start("scan", 12, then="face")  # 12 x 30 deg: a full look around
            self.turn_rate = float(r.choice([-1, 1])) * 30.0
            self.best, self.last_scan = (-np.inf, 0.0), self.t
        elif goal is not None and abs(goal) > 90 and self.t - self.last_wall > 12:  # the way on is behind
            self._face(float(obs.pose[3]) + goal, float(obs.pose[3]))
        elif r.random() < c.wide_turn_p:
            self._start_turn(float(r.choice([-1, 1])), r.uniform(45, 270), slowest=4.0)  # slow pans too
        elif r.random() < c.idle_p:
            self._start("idle", int(r.integers(3, 12)))
        elif r.random() < c.back_p:
            self._start("back", int(r.integers(2, 6)))
        elif c.still_p > 0 and r.random() < c.still_p:
            self._start("still", int(r.integers(2, 17)))
        elif c.babble_p > 0 and r.random() < c.babble_p:
            self._start("babble", int(r.integers(2, 9)))
            self.babble_keys = (r.random(actions.NUM_KEYS) < 0.3).astype(np.uint8)
            self.babble_keys[[K["use"], K["attack"]]] = 0  # movement and turning, what a view shows
            self.babble_yaw = float(r.uniform(-20, 20)) if r.random() < 0.7 else 0.0
        return keys

    def __call__(self, obs: Obs) -> tuple[np.ndarray, np.ndarray]:
        c, r = self.config, self.rng
        self.t += 1
        xy = obs.pose[:2].astype(np.float64)
        self.visits[self._cell(float(xy[0])), self._cell(float(xy[1]))] += 1
        dist, bearing = self._columns(obs)
        self.map.observe(xy[0], xy[1], np.radians(obs.pose[3] + bearing), dist)
        near_waypoint = self.plan is not None and math.dist(self.plan[:2], xy) < 1.5 * self.map.cell
        if self.t >= self.next_plan or near_waypoint:
            self._replan(obs)
        scores = self._scores(obs, dist, bearing)
        hurt = False
        if self._damage is not None:
            d = float(obs.variables[self._damage])
            hurt, self.damage = self.damage is not None and d > self.damage, d
        stuck = len(self.trail) == self.trail.maxlen and float(np.linalg.norm(xy - self.trail[0])) < c.stuck_dist

        keys = self._choose(obs, dist, scores, hurt, stuck)
        yaw = 0.0
        if self.mode == "walk":
            keys[K["forward"]] = 1
            goal = self._goal_bearing(obs)
            if goal is None:  # nothing mapped to go to: the most open, least visited column
                target = float(bearing[int(np.argmax(scores))])
            else:  # toward the waypoint, through the column nearest it with room to pass
                room = np.minimum(dist, 128.0) / 128.0 - np.abs(bearing - goal) / 90.0
                target = float(bearing[int(np.argmax(room))])
            self.wander = 0.8 * self.wander + float(r.normal(0, c.wander_deg))
            yaw = min(max(-c.steer_gain * target, -c.max_steer), c.max_steer) + self.wander
            if self.strafe_left == 0 and r.random() < c.strafe_p:
                self.strafe, self.strafe_left = int(r.choice([-1, 1])), int(r.integers(2, 10))
            if self.strafe_left > 0:
                keys[K["strafe_right" if self.strafe > 0 else "strafe_left"]] = 1
                self.strafe_left -= 1
        elif self.mode == "turn":
            if self.turn_keys:
                keys[K["turn_right" if self.turn_rate > 0 else "turn_left"]] = 1
            else:
                yaw = self.turn_rate * float(r.uniform(0.8, 1.2))
            self.turned += abs(self.turn_rate)
            if float(dist[len(dist) // 2]) > 2 * c.near and r.random() < 0.5:  # keep moving in the open
                keys[K["forward"]] = 1
        elif self.mode == "scan":
            i = int(np.argmax(scores))
            if scores[i] > self.best[0]:
                self.best = (float(scores[i]), float(obs.pose[3] + bearing[i]))
            yaw = self.turn_rate
        elif self.mode == "fight":  # fire while sweeping; keep moving (it may be a damaging floor)
            keys[K["attack"]] = 1
            keys[K["forward"]] = int(float(dist[len(dist) // 2]) > c.near)
            yaw = self.turn_rate
        elif self.mode == "escape":
            keys[K["back"]] = 1
            keys[K["strafe_right" if self.strafe > 0 else "strafe_left"]] = 1
        elif self.mode == "back":
            keys[K["back"]] = 1
        elif self.mode == "idle":
            yaw = float(r.normal(0, 4))
        elif self.mode == "babble":
            keys |= self.babble_keys
            yaw = self.babble_yaw
        # "door": stand still while it opens

        still = self.mode == "still"  # hands off: none of the overlays below either
        if self.mode != "walk":
            self.left -= 1
            if self.left <= 0:
                self._next(obs, scores)

        if still:
            self.attack_left, self.pitch_target = 0, float(obs.pose[4])
            return keys, np.zeros(2, np.float32)
        if self.attack_left == 0 and r.random() < c.attack_p:
            self.attack_left = int(r.integers(1, 7))
        if self.attack_left > 0:
            keys[K["attack"]] = 1
            self.attack_left -= 1
        if r.random() < c.use_p:
            keys[K["use"]] = 1
        if r.random() < c.pitch_p:
            self.pitch_target = float(r.uniform(-c.pitch_max, c.pitch_max)) if r.random() < 0.6 else 0.0
        pitch = min(max(0.3 * (self.pitch_target - float(obs.pose[4])), -3.0), 3.0)
        if c.jitter_deg > 0:
            yaw += float(r.uniform(-c.jitter_deg, c.jitter_deg))
        yaw = min(max(yaw, -45.0), 45.0)
        if keys[K["forward"]] and not keys[K["back"]]:  # the stuck detector: pushing forward, going nowhere
            self.trail.append(xy)
        return keys, np.array([yaw, pitch], np.float32)

    def _next(self, obs: Obs, scores: np.ndarray) -> None:
        """The current manoeuvre is over: what comes after it."""
        if self.then == "turn":
            self._start_turn(self._side(obs, scores), self.rng.uniform(90, 200), until_clear=True)
        elif self.then == "face":
            self.next_plan = self.t  # the look around mapped a lot: plan again first
            self._face(self.best[1], float(obs.pose[3]))
        else:
            self._start("walk", 0)


POLICIES = ("explore", "babble", "still", "jitter", "random")
JITTER_DEG = 15.0  # "jitter" policy's offset half-width: yaw lag-1 corr 0.80 -> 0.49 (`worldgen data info`)


def make_policy(name: str, variable_names: Sequence[str] = ()) -> Policy:
    """A policy by name (:data:`POLICIES`) with its default config.

    ``variable_names`` names the columns of ``obs.variables`` (the explorer fights back when
    ``damage_taken`` rises).
    """
    if name == "explore":
        return ExplorePolicy(variable_names=variable_names)
    if name == "babble":  # the explorer with bursts of random actions: 0.3 puts ~22% of steps in
        # bursts (E1M1-E1M3, 1,676 steps), enough that an action often breaks the motion before it
        return ExplorePolicy(ExploreConfig(babble_p=0.3), variable_names=variable_names)
    if name == "still":  # the explorer that also stands still: 0.02 puts ~11% of steps in pauses
        return ExplorePolicy(ExploreConfig(still_p=0.02), variable_names=variable_names)
    if name == "jitter":  # the explorer whose mouse yaw gets a fresh offset every step: JITTER_DEG
        return ExplorePolicy(ExploreConfig(jitter_deg=JITTER_DEG), variable_names=variable_names)
    if name == "random":
        return RandomPolicy()
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
