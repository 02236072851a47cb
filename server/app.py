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

Nothing a client does can hold the server: every send has a deadline (``send_timeout``; a client
that does not drain is closed as ``slow_reader``), each connection's messages are rate limited,
a new websocket must say hello within ``hello_timeout`` and at most ``max_pending`` may wait for
theirs, browsers from other origins are refused, and shutdown cuts off whoever has not closed
within ``shutdown_timeout``.

Example (what ``worldgen serve`` does)::

    wm = WorldModel.load("default")
    asyncio.run(serve(wm, ServeConfig(port=8765)))
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import http
import io
import ipaddress
import logging
import mimetypes
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from worldgen.actions import KEYS, MAX_MOUSE_DEG, MOUSE, Action, ActionError
from worldgen.server import protocol as P

log = logging.getLogger("worldgen.server")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = P.DEFAULT_PORT  # 0: any free port (the bound one is printed)
    token: str | None = None  # required in hello when set
    max_sessions: int = 16
    fps: float | None = None  # None: the model's own playback rate (wm.fps)
    max_message: int = P.MAX_MESSAGE_BYTES
    idle_timeout: float = 300.0  # seconds without any client message (hello included)
    jpeg_quality: int = 85
    stats_every: float = 1.0  # seconds between stats messages
    # Bytes that may wait for one client past its outbox: the kernel's send buffer (Linux
    # doubles this), plus half as much in websockets' write buffer. Small, so a slow reader
    # gets fresh frames with stale ones dropped rather than seconds of old ones queued; 32 KiB
    # is still far above what 10 fps of 160x120 JPEGs (~50 KB/s) needs in flight.
    send_buffer: int = 32 * 1024
    # A send that waits this long means the client stopped reading (its buffers are full): it is
    # closed as slow_reader and its slot freed. Long enough for a slow link to catch up.
    send_timeout: float = 10.0
    # A new websocket must send its hello within this many seconds; a person's browser does at once.
    hello_timeout: float = 10.0
    # Websockets open but without a hello yet; more are refused with HTTP 503 at the handshake, so
    # idle connections cannot pile up memory and file descriptors.
    max_pending: int = 32
    # Client messages per second per connection (bursts of one second's worth). A browser sends one
    # per animation frame while the mouse moves (60-240/s) plus key changes; the excess is dropped.
    max_rate: float = 300.0
    # Browser origins, besides the server's own, that may open the websocket ("*": any). Pages on
    # other sites would otherwise be able to drive a local server through the user's browser.
    allow_origins: tuple[str, ...] = ()
    # Seconds clients get to close at shutdown before their connections are cut.
    shutdown_timeout: float = 3.0
    # torch.compile the step (CUDA graphs), compiled and warmed on the engine thread for every
    # padded batch size before the port opens, so no tick stalls on a compile mid-game.
    compile: bool = False
    # A compile that fails on this machine: serve eagerly with a warning (True, what the CUDA
    # default does) or stop with the error (False, what an explicit --compile asks for).
    compile_fallback: bool = False


RECV_BUFFER = 64 * 1024  # kernel receive buffer per websocket; actions are ~60 bytes
CLOSE_GRACE = 1.0  # seconds a slow reader's close frame may take to queue before the socket is cut
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or a name) is this machine only."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def batch_sizes(max_sessions: int) -> list[int]:
    """Batch sizes a compiled server steps: powers of two from 2 below ``max_sessions``, and it.
    A tick's batch is padded up to the next size. One compile serves every batch of 2 or more
    (the batch dimension is dynamic; batch 1 would compile again, so a lone player is padded to
    2) and each size records its own CUDA graph, which is quick."""
    if max_sessions == 1:
        return [1]
    return [2**i for i in range(1, max_sessions.bit_length()) if 2**i < max_sessions] + [max_sessions]


class CompileError(RuntimeError):
    """Compiling or warming the step failed; serving eagerly (``--no-compile``) still works."""


class SlowReader(Exception):
    """A send to a client did not complete within ``send_timeout``."""


class RateLimit:
    """Token bucket: ``rate`` messages per second on average, bursts of up to one second's worth.

    Example:
        >>> r = RateLimit(2.0, now=0.0)
        >>> [r.take(0.0) for _ in range(3)], r.take(0.5), r.dropped
        ([True, True, False], True, 1)
    """

    def __init__(self, rate: float, now: float):
        self.rate, self.tokens, self.last = rate, rate, now
        self.dropped = 0  # messages refused so far

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        return False


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

    def __init__(self, pid: int, ws: ServerConnection, session: Any, seed: int, limit: RateLimit):
        self.pid, self.ws, self.session, self.seed, self.limit = pid, ws, session, seed, limit
        self.rate_error_at = -1e9  # loop time of the last rate_limited error sent
        self.keys = np.zeros(len(KEYS), np.uint8)  # held keys: the latest action's
        self.mouse = np.zeros(len(MOUSE), np.float32)  # deltas summed since the last frame
        self.t: float | None = None  # client timestamp of the newest action not yet shown
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
        self.slots = 0  # sessions live or being created: what --max-sessions caps
        self.next_pid = 1
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="worldgen-engine")
        self.rng = np.random.default_rng()
        self.wake = asyncio.Event()  # set when a player joins, so an idle scheduler sleeps
        self.gen_ms: list[float] = []  # batched forward times since the last stats
        self.batches: list[int] = []
        self.web = self.load_web()
        self.tasks: set[asyncio.Task] = set()
        self.pending: set[ServerConnection] = set()  # websockets being opened or without a hello yet
        self.sizes: list[int] | None = batch_sizes(cfg.max_sessions) if cfg.compile else None
        self.pads: list[Any] = []  # idle sessions that fill a compiled batch up to its size
        self.engine_thread: int | None = None  # the thread that compiled: every step must run there

    # -- HTTP: the browser client -------------------------------------------------------

    @staticmethod
    def load_web(folder: str | os.PathLike | None = None) -> dict[str, bytes]:
        """The browser client's files by name, read once: regular files directly in ``folder``
        (default: the packaged ``clients/web``). Links are skipped: nothing outside is served."""
        web = Path(str(folder or resources.files("worldgen.clients").joinpath("web")))
        return {f.name: f.read_bytes() for f in web.iterdir() if f.is_file() and not f.is_symlink()}

    @staticmethod
    def _response(
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: tuple[tuple[str, str], ...] = (),
    ) -> Response:
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", content_type),
                ("X-Content-Type-Options", "nosniff"),
                ("Cache-Control", "no-cache"),
                *extra,
            ]
        )
        return Response(status, http.HTTPStatus(status).phrase, headers, body)

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.method != "GET":  # HEAD included: nothing here is worth a HEAD
            return self._response(405, b"", extra=(("Allow", "GET"),))
        path = urlsplit(request.path).path
        if path == P.WS_PATH:
            return self._admit(request, conn)
        name = "index.html" if path == "/" else path.lstrip("/")
        body = self.web.get(name)  # a fixed set of names: nothing like ../ can reach the disk
        if body is None:  # the path is not echoed: nothing a link can make this page say
            return self._response(404, f"not found; the client is at /, the websocket at {P.WS_PATH}\n".encode())
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return self._response(200, body, ctype)

    def _admit(self, request: Request, conn: ServerConnection) -> Response | None:
        """The websocket handshake goes on (None) only from an allowed origin and while fewer
        than ``max_pending`` connections wait for their hello."""
        origin = request.headers.get("Origin")
        if not self._origin_allowed(origin, request.headers.get("Host", "")):
            log.info("refused websocket from origin %r (%s)", origin, conn.remote_address)
            return self._response(403, b"this origin may not open the websocket (worldgen serve --allow-origin)\n")
        self.pending = {c for c in self.pending if c.state is not State.CLOSED}
        if len(self.pending) >= self.cfg.max_pending:
            return self._response(
                503,
                f"{len(self.pending)} connections are waiting to say hello (--max-pending); try again later\n".encode(),
            )
        self.pending.add(conn)
        return None

    def _origin_allowed(self, origin: str | None, host: str) -> bool:
        """Browsers send the page's origin with every websocket; other clients send none. A page
        may connect if it came from this server: same port, same host name (or both loopback),
        and, on a loopback server, a loopback Host (a DNS-rebound name is not)."""
        if origin is None or "*" in self.cfg.allow_origins or origin in self.cfg.allow_origins:
            return True
        try:
            o, h = urlsplit(origin), urlsplit(f"//{host}")
            o_port, h_port = o.port or 80, h.port or 80
        except ValueError:
            return False
        if o.scheme not in ("http", "https") or not o.hostname or not h.hostname or o_port != h_port:
            return False
        if is_loopback(self.cfg.host) and not is_loopback(h.hostname):
            return False
        return o.hostname == h.hostname or (is_loopback(o.hostname) and is_loopback(h.hostname))

    # -- one websocket ------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.cfg.send_buffer)
            # Not the kernel's autotuned megabytes: a flood then stalls its sender early.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        try:
            hello = await self._hello(ws)
            player = await self._open(ws, hello)
        except Refused as r:
            log.info("refused %s: %s: %s", ws.remote_address, r.code, r.message)
            await self._fatal(ws, r.code, r.message)
            return
        except (ConnectionClosed, SlowReader):
            ws.transport.abort()
            return
        finally:
            self.pending.discard(ws)
        log.info(
            "session %d opened for %s (seed %d, %d live)", player.pid, ws.remote_address, player.seed, len(self.players)
        )
        sender = asyncio.create_task(self._send_loop(player))
        try:
            await self._read_loop(player)
        finally:
            await self._drop(player)
            sender.cancel()
            log.info(
                "session %d closed (%d frames, %d dropped, %d live)",
                player.pid,
                player.frame_id,
                player.outbox.dropped,
                len(self.players),
            )

    async def _send(self, ws: ServerConnection, msg: bytes) -> None:
        """Send with a deadline: a client whose buffers stay full does not hold anything up."""
        try:
            async with asyncio.timeout(self.cfg.send_timeout):
                await ws.send(msg)
        except TimeoutError:
            raise SlowReader() from None

    async def _fatal(self, ws: ServerConnection, code: str, message: str) -> None:
        """Send the error, then close with its code. A client that does not take them in time
        (for ``slow_reader``: at once, only the close frame is queued) has its connection cut."""
        try:
            async with asyncio.timeout(CLOSE_GRACE if code == "slow_reader" else self.cfg.send_timeout):
                if code != "slow_reader":
                    await ws.send(P.pack(P.error(code, message)))
                await ws.close(P.FATAL_CLOSE[code], code)
        except TimeoutError:
            ws.transport.abort()
        except ConnectionClosed:
            pass

    async def _recv(self, ws: ServerConnection, timeout: float | None = None, hello: bool = False) -> bytes | str:
        timeout = timeout or self.cfg.idle_timeout
        try:
            async with asyncio.timeout(timeout):
                return await ws.recv()
        except TimeoutError:
            if hello:
                raise Refused("idle_timeout", f"no hello within {timeout:g} s (--hello-timeout)") from None
            raise Refused(
                "idle_timeout", f"no message for {timeout:g} s (--idle-timeout); send actions to keep the session"
            ) from None

    async def _hello(self, ws: ServerConnection) -> dict[str, Any]:
        raw = await self._recv(ws, min(self.cfg.hello_timeout, self.cfg.idle_timeout), hello=True)
        try:
            msg = P.parse(raw, self.cfg.max_message)
        except (P.ProtocolError, ActionError) as e:  # e.g. an action as the first message
            raise Refused("hello_required", f"the first message must be a valid hello ({e})") from None
        if msg["type"] != "hello":
            raise Refused("hello_required", f"the first message must be hello, got {msg['type']}")
        if msg["version"] != P.VERSION:
            raise Refused(
                "version_mismatch",
                f"client speaks protocol version {msg['version']}, this server speaks {P.VERSION}; update the client",
            )
        if self.cfg.token is not None and not hmac.compare_digest(
            (msg.get("token") or "").encode(), self.cfg.token.encode()
        ):
            raise Refused(
                "unauthorized",
                "missing or wrong token (the server was started with --token; "
                "open the URL it printed, which carries ?token=...)",
            )
        if self.slots >= self.cfg.max_sessions:
            raise Refused(
                "busy", f"the server already runs {self.cfg.max_sessions} sessions (--max-sessions); try again later"
            )
        return msg

    async def _open(self, ws: ServerConnection, hello: dict[str, Any]) -> Player:
        seed = hello.get("seed")
        seed = int(self.rng.integers(P.MAX_SEED)) if seed is None else seed
        self.slots += 1  # reserved before the await, so concurrent hellos cannot overshoot
        try:
            session = await asyncio.get_running_loop().run_in_executor(self.engine, lambda: self.wm.session(seed=seed))
        except Exception as e:
            self.slots -= 1
            log.exception("session creation failed")
            raise Refused("internal", f"could not start a session: {type(e).__name__}: {e}") from None
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        loop = asyncio.get_running_loop()
        player = Player(pid, ws, session, seed, RateLimit(self.cfg.max_rate, loop.time()))
        h, w = self.wm.frame_shape[:2]
        try:
            await self._send(
                ws,
                P.pack(
                    {
                        "type": "welcome",
                        "version": P.VERSION,
                        "session": pid,
                        "seed": seed,
                        "fps": self.fps,
                        "width": w,
                        "height": h,
                        "keys": list(KEYS),
                        "mouse": list(MOUSE),
                        "model": self.model_name,
                        "max_message": self.cfg.max_message,
                        "idle_timeout": self.cfg.idle_timeout,
                        "max_rate": self.cfg.max_rate,
                        "max_sessions": self.cfg.max_sessions,
                        "sessions": len(self.players) + 1,
                    }
                ),
            )
        except (ConnectionClosed, SlowReader):
            await self._drop(player)
            raise
        # Frame 0 is the start context's last frame: the player sees the world before acting.
        player.outbox.put_frame(
            P.pack(
                {
                    "type": "frame",
                    "id": 0,
                    "jpeg": encode_jpeg(session.frame, self.cfg.jpeg_quality),
                    "t": None,
                    "gen_ms": 0.0,
                    "step": 0,
                    "reset": True,
                    "seed": seed,
                }
            )
        )
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
        loop = asyncio.get_running_loop()
        while player.open:
            try:
                raw = await self._recv(ws)
            except Refused as r:
                await self._fatal(ws, r.code, r.message)
                return
            except ConnectionClosed:
                return
            if not player.limit.take(loop.time()):
                # Dropped unparsed. Each drop also pauses this reader for one token's time, so a
                # flood is read at most twice as fast as the limit; the rest waits in TCP.
                if loop.time() - player.rate_error_at >= 1.0:
                    player.rate_error_at = loop.time()
                    if not await self._answer(
                        player,
                        P.error(
                            "rate_limited",
                            f"more than {self.cfg.max_rate:g} messages per second (--max-rate); "
                            f"{player.limit.dropped} dropped so far",
                        ),
                    ):
                        return
                await asyncio.sleep(1.0 / self.cfg.max_rate)
                continue
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
            if not await self._answer(player, err):
                return

    async def _answer(self, player: Player, err: dict[str, Any]) -> bool:
        """Send a non-fatal error; False once the connection is gone (or cut for not reading)."""
        try:
            await self._send(player.ws, P.pack(err))
            return True
        except ConnectionClosed:
            return False
        except SlowReader:
            await self._slow(player)
            return False

    async def _send_loop(self, player: Player) -> None:
        try:
            while True:
                for msg in await player.outbox.get():
                    await self._send(player.ws, msg)
        except ConnectionClosed:
            pass
        except SlowReader:
            await self._slow(player)

    async def _slow(self, player: Player) -> None:
        log.info(
            "session %d: the client read nothing for %g s (--send-timeout); closing it",
            player.pid,
            self.cfg.send_timeout,
        )
        await self._fatal(player.ws, "slow_reader", "")

    # -- the scheduler ------------------------------------------------------------------

    def compile(self) -> None:
        """Engine thread: compile the model and step every batch size in :attr:`sizes` a few
        times, so CUDA graphs are recorded on the thread that replays them, before any client."""
        import torch._dynamo

        self.engine_thread = threading.get_ident()
        # A recompile per batch size beyond dynamo's limit would quietly run eager: leave room.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.sizes) + 1)
        self.wm.compile()
        for n in self.sizes:
            t0 = time.perf_counter()
            sessions = [self.wm.session(seed=i) for i in range(n)]
            try:
                for _ in range(3):  # compile, then record the graph (CUDA graph trees warm up first)
                    self.wm.step_many(sessions, [Action.noop()] * n)
            except Exception as e:  # noqa: BLE001 - any compiler failure surfaces here, at the first call
                why = f"compiling the step for batch size {n} failed ({type(e).__name__}: {str(e)[:500]})"
                if not self.cfg.compile_fallback:
                    raise CompileError(f"{why}; serve with --no-compile") from e
                log.warning("%s; serving the eager step instead", why)
                self.wm.eager()
                self.sizes, self.cfg.compile = None, False  # the start-up line says "compiled" no more
                return
            finally:
                for s in sessions:
                    s.close()
            log.info("compiled and warmed batch size %d in %.1f s", n, time.perf_counter() - t0)

    def _padded(self, sessions: list[Any], actions: list[Action]) -> tuple[list[Any], list[Action]]:
        """A compiled server steps only the sizes it compiled: fill the batch with idle sessions."""
        if self.sizes is None:
            return sessions, actions
        if threading.get_ident() != self.engine_thread:
            raise RuntimeError("compiled step called off the engine thread that recorded its CUDA graphs")
        size = next(n for n in self.sizes if n >= len(sessions))
        while len(self.pads) < size - len(sessions):
            self.pads.append(self.wm.session(seed=len(self.pads)))
        fill = size - len(sessions)
        return sessions + self.pads[:fill], actions + [Action.noop()] * fill

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
                frames = list(self.wm.step_many(*self._padded(sessions, actions)))[: len(steps)]
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
                        f = self.wm.step_many(*self._padded([p.session], [a]))[0]
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
        results = await asyncio.get_running_loop().run_in_executor(self.engine, self._tick, list(resets.items()), steps)
        for p, jpeg, ms, n, was_reset in results:
            if not p.open:
                continue
            if isinstance(jpeg, Exception):
                log.error("session %d failed: %r", p.pid, jpeg)
                p.failed = True  # out of the batch from now on; its handler drops it on close
                self._background(
                    self._fatal(p.ws, "internal", f"the engine failed on this session: {type(jpeg).__name__}: {jpeg}")
                )
                continue
            p.frame_id += 1
            p.frames_since_stats += 1
            msg = {
                "type": "frame",
                "id": p.frame_id,
                "jpeg": jpeg,
                "t": stamps.get(p.pid),
                "gen_ms": round(ms, 3),
                "step": n,
                "reset": was_reset,
            }
            if was_reset:
                msg["seed"] = p.seed = resets[p]
            p.outbox.put_frame(P.pack(msg))

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        # The loop keeps only weak references to tasks: hold one until it is done.
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send_stats(self, dt: float) -> None:
        gen = float(np.mean(self.gen_ms)) if self.gen_ms else 0.0
        batch = float(np.mean(self.batches)) if self.batches else 0.0
        self.gen_ms, self.batches = [], []
        for p in list(self.players.values()):
            p.outbox.put_stats(
                P.pack(
                    {
                        "type": "stats",
                        "frames": p.frame_id,
                        "dropped": p.outbox.dropped,
                        "fps": round(p.frames_since_stats / dt, 3),
                        "target_fps": self.fps,
                        "gen_ms": round(gen, 3),
                        "batch": round(batch, 2),
                        "sessions": len(self.players),
                        "rate_limited": p.limit.dropped,
                    }
                )
            )
            p.frames_since_stats = 0


def url_for(host: str, port: int, token: str | None) -> str:
    shown = host if host not in ("0.0.0.0", "::", "") else os.uname().nodename
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


async def serve(
    wm: Any,
    cfg: ServeConfig,
    model_name: str = "",
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``wm`` until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is None).
    ``on_ready(url)`` is called once the socket listens, with the browser URL."""
    server = Server(wm, cfg, model_name)
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    if cfg.compile:
        t0 = time.perf_counter()
        await loop.run_in_executor(server.engine, server.compile)
        log.info("compiled for batch sizes %s in %.0f s", server.sizes, time.perf_counter() - t0)
    # open_timeout bounds a handshake that never completes; the hello deadline starts after it.
    async with ws_serve(
        server.handle,
        cfg.host,
        cfg.port,
        process_request=server.process_request,
        max_size=hard_limit(cfg.max_message),
        write_limit=cfg.send_buffer // 2,
        open_timeout=cfg.hello_timeout,
        close_timeout=cfg.shutdown_timeout,
        compression=None,
    ) as ws_server:  # JPEG does not deflate; save the CPU
        port = ws_server.sockets[0].getsockname()[1]
        scheduler = asyncio.create_task(server.schedule())
        if on_ready is not None:
            on_ready(url_for(cfg.host, port, cfg.token))
        await stop.wait()
        scheduler.cancel()
        ws_server.close()  # stop listening, close every connection with 1001 (in the background)
        try:
            async with asyncio.timeout(cfg.shutdown_timeout):
                await ws_server.wait_closed()
        except TimeoutError:  # clients that do not read cannot take a close frame: cut them off
            log.info(
                "cutting off %d connections that did not close within %g s",
                len(ws_server.all_connections),
                cfg.shutdown_timeout,
            )
            for conn in list(ws_server.all_connections):
                conn.transport.abort()
    server.engine.shutdown(wait=True)
