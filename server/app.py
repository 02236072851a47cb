"""The streaming server behind ``worldgen serve`` (``docs/serving.md``, ``docs/protocol.md``).

One asyncio event loop runs everything but the model:

* each websocket is one :class:`Player`: a reader task (messages in; the latest action wins),
  a sender task (frames out through a latest-wins :class:`Outbox`, so a slow client loses
  stale frames instead of growing a queue) and one engine session with its own cache;
* one scheduler task (:meth:`Server.schedule`) ticks at the target fps and steps every live
  session in ONE batched ``wm.step_many`` call, run in a single worker thread so the loop stays
  responsive while the model computes. Every engine call (create, step, reset, close) goes
  through that one thread: the model is never entered twice at once.
* HTTP requests to any path other than ``/ws`` get the browser client's static files.

Example (what ``worldgen serve`` does)::

    wm = WorldModel.load("default")
    asyncio.run(serve(wm, ServeConfig(port=8765)))
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import io
import logging
import mimetypes
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from worldgen.actions import KEYS, MAX_MOUSE_DEG, MOUSE, Action, ActionError
from worldgen.server import protocol as P

log = logging.getLogger("worldgen.server")



@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = P.DEFAULT_PORT          # 0: any free port (the bound one is printed)
    token: str | None = None            # required in hello when set
    max_sessions: int = 16
    fps: float | None = None            # None: the model's own playback rate (wm.fps)
    max_message: int = P.MAX_MESSAGE_BYTES
    idle_timeout: float = 300.0         # seconds without any client message (hello included)
    jpeg_quality: int = 85
    stats_every: float = 1.0            # seconds between stats messages
    # Bytes that may wait for one client past its outbox: the kernel's send buffer (Linux
    # doubles this), plus half as much in websockets' write buffer. Small, so a slow reader
    # gets fresh frames with stale ones dropped rather than seconds of old ones queued; 32 KiB
    # is still far above what 10 fps of 160x120 JPEGs (~50 KB/s) needs in flight.
    send_buffer: int = 32 * 1024


def hard_limit(max_message: int) -> int:
    """Largest message websockets reads at all. Between ``max_message`` and this a message is
    read and answered with a ``too_large`` error; beyond it websockets closes with 1009, so a
    client cannot make the server buffer an arbitrarily large message."""
    return max(64 * max_message, 2**20)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux ``/proc``), for stats and the load benchmark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


class Outbox:
    """What one client has yet to be sent: at most one frame and one stats message.

    A newer frame replaces an unsent one (counted in ``dropped``): a client that reads slower
    than the server produces sees the newest world state, late, but never a growing backlog.

    Example:
        >>> async def demo():
        ...     box = Outbox()
        ...     for i in range(3):
        ...         box.put_frame(bytes([i]))
        ...     return await box.get(), box.dropped
        >>> asyncio.run(demo())
        ([b'\\x02'], 2)
    """

    def __init__(self) -> None:
        self.frame: bytes | None = None
        self.stats: bytes | None = None
        self.dropped = 0
        self._ready = asyncio.Event()

    def put_frame(self, msg: bytes) -> None:
        if self.frame is not None:
            self.dropped += 1
        self.frame = msg
        self._ready.set()

    def put_stats(self, msg: bytes) -> None:
        self.stats = msg
        self._ready.set()

    async def get(self) -> list[bytes]:
        """Wait for something to send; returns it all (stats first) and empties the box."""
        await self._ready.wait()
        self._ready.clear()
        out = [m for m in (self.stats, self.frame) if m is not None]
        self.stats = self.frame = None
        return out


class Player:
    """One websocket's session: its engine session, its input state and its outbox."""

    def __init__(self, pid: int, ws: ServerConnection, session: Any, seed: int):
        self.pid, self.ws, self.session, self.seed = pid, ws, session, seed
        self.keys = np.zeros(len(KEYS), np.uint8)   # held keys: the latest action's
        self.mouse = np.zeros(len(MOUSE), np.float32)  # deltas summed since the last frame
        self.t: float | None = None   # client timestamp of the newest action not yet shown
        self.reset_seed: int | None = None  # a reset asked for, applied at the next tick
        self.frame_id = 0
        self.frames_since_stats = 0
        self.outbox = Outbox()
        self.open = True
        self.failed = False  # the engine failed on it; it gets no more ticks

    def set_action(self, a: Action, t: float | None) -> None:
        # Latest action wins for the held keys; mouse deltas add up so no camera motion is
        # lost between two frames (a browser sends mouse moves far faster than the model's fps).
        self.keys = a.keys
        self.mouse = np.clip(self.mouse + a.mouse, -MAX_MOUSE_DEG, MAX_MOUSE_DEG)
        if t is not None:
            self.t = t

    def take_action(self) -> tuple[Action, float | None]:
        a, t = Action(self.keys, self.mouse), self.t
        self.mouse = np.zeros(len(MOUSE), np.float32)
        self.t = None
        return a, t


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Server:
    """Sessions, the batched scheduler and static files; :func:`serve` puts it on a socket."""

    def __init__(self, wm: Any, cfg: ServeConfig, model_name: str = ""):
        self.wm, self.cfg, self.model_name = wm, cfg, model_name
        self.fps = float(cfg.fps or wm.fps)
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        self.players: dict[int, Player] = {}
        self.slots = 0      # sessions live or being created: what --max-sessions caps
        self.next_pid = 1
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="worldgen-engine")
        self.rng = np.random.default_rng()
        self.wake = asyncio.Event()  # set when a player joins, so an idle scheduler sleeps
        self.gen_ms: list[float] = []  # batched forward times since the last stats
        self.batches: list[int] = []
        self.web = self._load_web()
        self.tasks: set[asyncio.Task] = set()

    # -- HTTP: the browser client -------------------------------------------------------

    @staticmethod
    def _load_web() -> dict[str, bytes]:
        web = resources.files("worldgen.clients").joinpath("web")
        return {f.name: f.read_bytes() for f in web.iterdir() if f.is_file()}

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == P.WS_PATH:
            return None  # go on with the websocket handshake
        name = "index.html" if path == "/" else path.lstrip("/")
        body = self.web.get(name)  # a fixed set of names: nothing like ../ can reach the disk
        if body is None:
            return conn.respond(404, f"{path}: not found; the client is at /, the websocket at {P.WS_PATH}\n")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                           ("Content-Length", str(len(body))), ("Content-Type", ctype),
                           ("Cache-Control", "no-cache")])
        return Response(200, "OK", headers, body)

    # -- one websocket ------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.cfg.send_buffer)
        try:
            hello = await self._hello(ws)
            player = await self._open(ws, hello)
        except Refused as r:
            log.info("refused %s: %s: %s", ws.remote_address, r.code, r.message)
            await self._fatal(ws, r.code, r.message)
            return
        except ConnectionClosed:
            return
        log.info("session %d opened for %s (seed %d, %d live)", player.pid, ws.remote_address,
                 player.seed, len(self.players))
        sender = asyncio.create_task(self._send_loop(player))
        try:
            await self._read_loop(player)
        finally:
            await self._drop(player)
            sender.cancel()
            log.info("session %d closed (%d frames, %d dropped, %d live)", player.pid, player.frame_id,
                     player.outbox.dropped, len(self.players))

    async def _fatal(self, ws: ServerConnection, code: str, message: str) -> None:
        try:
            await ws.send(P.pack(P.error(code, message)))
            await ws.close(P.FATAL_CLOSE[code], code)
        except ConnectionClosed:
            pass

    async def _recv(self, ws: ServerConnection) -> bytes | str:
        try:
            async with asyncio.timeout(self.cfg.idle_timeout):
                return await ws.recv()
        except TimeoutError:
            raise Refused("idle_timeout", f"no message for {self.cfg.idle_timeout:g} s (--idle-timeout); "
                                          "send actions to keep the session") from None

    async def _hello(self, ws: ServerConnection) -> dict[str, Any]:
        raw = await self._recv(ws)
        try:
            msg = P.parse(raw, self.cfg.max_message)
        except P.ProtocolError as e:
            raise Refused("hello_required", f"the first message must be a valid hello ({e})") from None
        if msg["type"] != "hello":
            raise Refused("hello_required", f"the first message must be hello, got {msg['type']}")
        if msg["version"] != P.VERSION:
            raise Refused("version_mismatch", f"client speaks protocol version {msg['version']}, this server "
                                              f"speaks {P.VERSION}; update the client")
        if self.cfg.token is not None and not hmac.compare_digest(
                (msg.get("token") or "").encode(), self.cfg.token.encode()):
            raise Refused("unauthorized", "missing or wrong token (the server was started with --token; "
                                          "open the URL it printed, which carries ?token=...)")
        if self.slots >= self.cfg.max_sessions:
            raise Refused("busy", f"the server already runs {self.cfg.max_sessions} sessions "
                                  "(--max-sessions); try again later")
        return msg

    async def _open(self, ws: ServerConnection, hello: dict[str, Any]) -> Player:
        seed = hello.get("seed")
        seed = int(self.rng.integers(P.MAX_SEED)) if seed is None else seed
        self.slots += 1  # reserved before the await, so concurrent hellos cannot overshoot
        try:
            session = await asyncio.get_running_loop().run_in_executor(
                self.engine, lambda: self.wm.session(seed=seed))
        except Exception as e:
            self.slots -= 1
            log.exception("session creation failed")
            raise Refused("internal", f"could not start a session: {type(e).__name__}: {e}") from None
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        player = Player(pid, ws, session, seed)
        h, w = self.wm.frame_shape[:2]
        try:
            await ws.send(P.pack({
                "type": "welcome", "version": P.VERSION, "session": pid, "seed": seed, "fps": self.fps,
                "width": w, "height": h, "keys": list(KEYS), "mouse": list(MOUSE), "model": self.model_name,
                "max_message": self.cfg.max_message, "idle_timeout": self.cfg.idle_timeout,
                "max_sessions": self.cfg.max_sessions, "sessions": len(self.players) + 1}))
        except ConnectionClosed:
            await self._drop(player)
            raise
        # Frame 0 is the start context's last frame: the player sees the world before acting.
        player.outbox.put_frame(P.pack({"type": "frame", "id": 0, "jpeg": encode_jpeg(session.frame, self.cfg.jpeg_quality),
                                        "t": None, "gen_ms": 0.0, "step": 0, "reset": True, "seed": seed}))
        self.players[pid] = player
        self.wake.set()
        return player

    async def _drop(self, player: Player) -> None:
        if not player.open:
            return
        player.open = False
        self.players.pop(player.pid, None)
        # Queued behind any tick that still uses the session, on the engine thread.
        await asyncio.get_running_loop().run_in_executor(self.engine, player.session.close)
        self.slots -= 1

    async def _read_loop(self, player: Player) -> None:
        ws = player.ws
        while player.open:
            try:
                raw = await self._recv(ws)
            except Refused as r:
                await self._fatal(ws, r.code, r.message)
                return
            except ConnectionClosed:
                return
            try:
                msg = P.parse(raw, self.cfg.max_message)
                if msg["type"] == "action":
                    a = Action.from_dict({"keys": msg.get("keys") or [], "mouse": msg.get("mouse") or (0.0, 0.0)})
                    player.set_action(a, msg.get("t"))
                elif msg["type"] == "reset":
                    seed = msg.get("seed")
                    player.reset_seed = int(self.rng.integers(P.MAX_SEED)) if seed is None else seed
                else:  # hello
                    raise P.ProtocolError("unexpected", "hello was already received; this session is open")
            except P.ProtocolError as e:
                err = P.error(e.code, e.message)
            except (ActionError, TypeError, ValueError, OverflowError) as e:
                err = P.error("bad_action", str(e))
            else:
                continue
            try:
                await ws.send(P.pack(err))
            except ConnectionClosed:
                return

    async def _send_loop(self, player: Player) -> None:
        try:
            while True:
                for msg in await player.outbox.get():
                    await player.ws.send(msg)
        except ConnectionClosed:
            pass

    # -- the scheduler ------------------------------------------------------------------

    def _tick(self, resets: list[tuple[Player, int]], steps: list[tuple[Player, Action]]) -> list[tuple]:
        """Engine thread: apply resets, step the rest in one batch, JPEG-encode every frame.
        Returns ``(player, jpeg or exception, gen_ms, steps, reset)`` per player."""
        out: list[tuple] = []
        for p, seed in resets:
            try:
                p.session.reset(seed=seed)
                out.append((p, p.session.frame, 0.0, 0, True))
            except Exception as e:
                out.append((p, e, 0.0, 0, True))
        if steps:
            sessions, actions = [p.session for p, _ in steps], [a for _, a in steps]
            t0 = time.perf_counter()
            try:
                frames = list(self.wm.step_many(sessions, actions))
                ms = (time.perf_counter() - t0) * 1000
                self.gen_ms.append(ms)
                self.batches.append(len(steps))
                out += [(p, f, ms, p.session.steps, False) for (p, _), f in zip(steps, frames)]
            except Exception:
                # One session's failure must not take the others down: retry each alone.
                log.exception("batched step of %d sessions failed; stepping them one by one", len(steps))
                for p, a in steps:
                    t0 = time.perf_counter()
                    try:
                        f = self.wm.step_many([p.session], [a])[0]
                        out.append((p, f, (time.perf_counter() - t0) * 1000, p.session.steps, False))
                    except Exception as e:
                        out.append((p, e, 0.0, 0, False))
        encoded = []
        for p, f, ms, n, r in out:
            if not isinstance(f, Exception):
                try:
                    f = encode_jpeg(f, self.cfg.jpeg_quality)
                except Exception as e:  # e.g. a frame of the wrong shape or dtype
                    f = e
            encoded.append((p, f, ms, n, r))
        return encoded

    async def schedule(self) -> None:
        """Tick at ``self.fps``: every live session gets one new frame per tick (held keys keep
        acting while no new action arrives, as in a game). A tick that runs long is not made
        up for: the next starts at once and the rate drops, rather than bursting."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.fps
        next_tick = loop.time()
        last_stats = loop.time()
        while True:
            if not self.players:
                self.wake.clear()
                await self.wake.wait()
                next_tick = loop.time()
            delay = next_tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_tick = max(next_tick + period, loop.time())
            try:
                await self._step_all()
            except Exception:  # a bug here must not freeze every session: log it, tick again
                log.exception("scheduler tick failed")
            if loop.time() - last_stats >= self.cfg.stats_every:
                self._send_stats(loop.time() - last_stats)
                last_stats = loop.time()

    async def _step_all(self) -> None:
        """One tick: take every live session's input, step them on the engine thread, hand
        each client its frame."""
        players = [p for p in self.players.values() if p.open and not p.failed]
        resets, steps, stamps = {}, [], {}
        for p in players:
            if p.reset_seed is not None:
                resets[p], p.reset_seed = p.reset_seed, None
            else:
                a, stamps[p.pid] = p.take_action()
                steps.append((p, a))
        results = await asyncio.get_running_loop().run_in_executor(
            self.engine, self._tick, list(resets.items()), steps)
        for p, jpeg, ms, n, was_reset in results:
            if not p.open:
                continue
            if isinstance(jpeg, Exception):
                log.error("session %d failed: %r", p.pid, jpeg)
                p.failed = True  # out of the batch from now on; its handler drops it on close
                self._background(self._fatal(p.ws, "internal", f"the engine failed on this session: "
                                                               f"{type(jpeg).__name__}: {jpeg}"))
                continue
            p.frame_id += 1
            p.frames_since_stats += 1
            msg = {"type": "frame", "id": p.frame_id, "jpeg": jpeg, "t": stamps.get(p.pid),
                   "gen_ms": round(ms, 3), "step": n, "reset": was_reset}
            if was_reset:
                msg["seed"] = p.seed = resets[p]
            p.outbox.put_frame(P.pack(msg))

    def _background(self, coro) -> None:
        # The loop keeps only weak references to tasks: hold one until it is done.
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send_stats(self, dt: float) -> None:
        gen = float(np.mean(self.gen_ms)) if self.gen_ms else 0.0
        batch = float(np.mean(self.batches)) if self.batches else 0.0
        self.gen_ms, self.batches = [], []
        for p in list(self.players.values()):
            p.outbox.put_stats(P.pack({
                "type": "stats", "frames": p.frame_id, "dropped": p.outbox.dropped,
                "fps": round(p.frames_since_stats / dt, 3), "target_fps": self.fps, "gen_ms": round(gen, 3),
                "batch": round(batch, 2), "sessions": len(self.players)}))
            p.frames_since_stats = 0


def url_for(host: str, port: int, token: str | None) -> str:
    shown = host if host not in ("0.0.0.0", "::", "") else os.uname().nodename
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


async def serve(wm: Any, cfg: ServeConfig, model_name: str = "",
                on_ready: Callable[[str], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve ``wm`` until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None).
    ``on_ready(url)`` is called once the socket listens, with the browser URL."""
    server = Server(wm, cfg, model_name)
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    async with ws_serve(server.handle, cfg.host, cfg.port, process_request=server.process_request,
                        max_size=hard_limit(cfg.max_message), write_limit=cfg.send_buffer // 2,
                        compression=None) as ws_server:  # JPEG does not deflate; save the CPU
        port = ws_server.sockets[0].getsockname()[1]
        scheduler = asyncio.create_task(server.schedule())
        if on_ready is not None:
            on_ready(url_for(cfg.host, port, cfg.token))
        await stop.wait()
        scheduler.cancel()
    server.engine.shutdown(wait=True)
