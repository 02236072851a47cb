"""Python client of ``worldgen serve``: what scripts, tests, the load benchmark and
``worldgen play --server`` use. It speaks only the wire protocol (``docs/protocol.md``).

Example (asyncio)::

    async with await Client.connect("ws://127.0.0.1:8765/ws", seed=0) as c:
        print(c.welcome["width"], c.welcome["height"], c.welcome["fps"])
        await c.act(["forward"], yaw=2.0)
        f = await c.next_frame()          # Frame(id, jpeg, t, gen_ms, ...); f.image() -> (H, W, 3) uint8
        print(f.id, f.latency_ms)

From a program with its own loop (pygame): :class:`BackgroundClient` runs the same client in a
thread and keeps the newest frame.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
from PIL import Image
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from worldgen.server import protocol as P

T = TypeVar("T")


class ServerError(RuntimeError):
    """An ``error`` message from the server: ``code`` (``docs/protocol.md``), ``message``, ``fatal``."""

    def __init__(self, code: str, message: str, fatal: bool = True):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.fatal = code, message, fatal


@dataclass
class Frame:
    id: int
    jpeg: bytes
    t: float | None  # our timestamp echoed: the newest action this frame is the first to show
    gen_ms: float  # the server's batched forward that made it
    step: int
    reset: bool
    received_ms: float  # our clock when it arrived
    seed: int | None = None

    @property
    def latency_ms(self) -> float | None:
        """Action-to-frame latency: from sending the action to receiving its first frame."""
        return None if self.t is None else self.received_ms - self.t

    def image(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))


def as_frame(msg: dict[str, Any], received_ms: float) -> Frame:
    return Frame(
        msg["id"],
        msg["jpeg"],
        msg.get("t"),
        msg.get("gen_ms", 0.0),
        msg.get("step", 0),
        bool(msg.get("reset")),
        received_ms,
        msg.get("seed"),
    )


@dataclass
class Client:
    """One session on a server. Build it with :meth:`connect`."""

    ws: ClientConnection
    welcome: dict[str, Any]
    stats: dict[str, Any] | None = None  # the newest stats message
    errors: list[dict[str, Any]] = field(default_factory=list)  # non-fatal errors seen by next_frame

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None = None,
        seed: int | None = None,
        version: int = P.VERSION,
        client: str = "python",
        open_timeout: float = 30.0,
    ) -> Client:
        """Open a session: hello, then the server's welcome. Raises :class:`ServerError` when
        the server refuses (``busy``, ``unauthorized``, ``version_mismatch``, ...)."""
        ws = await ws_connect(url, max_size=2**24, compression=None, open_timeout=open_timeout)
        try:
            await ws.send(P.pack(P.hello(token=token, seed=seed, client=client, version=version)))
            msg = P.unpack(await asyncio.wait_for(ws.recv(), open_timeout))
        except BaseException:
            await ws.close()
            raise
        if msg.get("type") == "error":
            await ws.close()
            raise ServerError(msg["code"], msg["message"], msg.get("fatal", True))
        if msg.get("type") != "welcome":
            await ws.close()
            raise ServerError("bad_message", f"expected welcome, got {msg.get('type')!r}")
        return cls(ws, msg)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.ws.close()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def act(self, keys: Iterable[str] | Iterable[int] = (), yaw: float = 0.0, pitch: float = 0.0) -> float:
        """Send an action (held keys by name or 8 x 0/1, mouse deltas in degrees); returns its
        timestamp, which the first frame showing it echoes."""
        msg = P.action(list(keys), (yaw, pitch))
        await self.ws.send(P.pack(msg))
        return msg["t"]

    async def reset(self, seed: int | None = None) -> None:
        await self.ws.send(P.pack(P.reset(seed)))

    async def send_raw(self, data: bytes | str) -> None:
        """Send anything, for tests of the server's error handling."""
        await self.ws.send(data)

    async def recv(self) -> dict[str, Any]:
        """The next message as a dict (frames keep their raw fields; see :meth:`next_frame`)."""
        msg = P.unpack(await self.ws.recv())
        if msg.get("type") == "stats":
            self.stats = msg
        return msg

    async def next_frame(self) -> Frame:
        """The next frame. Stats are kept in :attr:`stats`, non-fatal errors in :attr:`errors`;
        a fatal error raises :class:`ServerError`."""
        while True:
            msg = await self.recv()
            kind = msg.get("type")
            if kind == "frame":
                return as_frame(msg, P.now_ms())
            if kind == "error":
                if msg.get("fatal"):
                    raise ServerError(msg["code"], msg["message"], True)
                self.errors.append(msg)

    async def next_error(self) -> dict[str, Any]:
        """Skip frames and stats up to the next error message (tests of bad input)."""
        while True:
            msg = await self.recv()
            if msg.get("type") == "error":
                return msg


class BackgroundClient:
    """A :class:`Client` on its own thread and event loop, for programs with a loop of their own.

    ``latest()`` returns the newest frame not yet taken (older ones are skipped: the caller shows
    the present); ``act()`` sends without blocking. ``error`` holds what ended the connection.

    Example::

        bc = BackgroundClient("ws://127.0.0.1:8765/ws", seed=1)
        bc.act(["forward"])
        f = bc.latest()   # Frame or None
        bc.close()
    """

    def __init__(self, url: str, token: str | None = None, seed: int | None = None, timeout: float = 30.0):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worldgen-client", daemon=True)
        self.thread.start()
        self._frame: Frame | None = None
        self._lock = threading.Lock()  # the reader thread sets _frame while the caller takes it
        self.stats: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.closed = False
        self.client: Client = self._call(Client.connect(url, token=token, seed=seed, client="pygame"), timeout)
        self.welcome = self.client.welcome
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), self.loop)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    async def _read(self) -> None:
        try:
            while True:
                f = await self.client.next_frame()
                with self._lock:
                    self._frame, self.stats = f, self.client.stats
        except ConnectionClosed as e:
            self.error = e
        except ServerError as e:
            self.error = e
        finally:
            self.closed = True

    def latest(self) -> Frame | None:
        with self._lock:
            f, self._frame = self._frame, None
        return f

    def act(self, keys: Iterable[str] = (), yaw: float = 0.0, pitch: float = 0.0) -> None:
        if not self.closed:
            asyncio.run_coroutine_threadsafe(self.client.act(list(keys), yaw, pitch), self.loop)

    def reset(self, seed: int | None = None) -> None:
        if not self.closed:
            asyncio.run_coroutine_threadsafe(self.client.reset(seed), self.loop)

    def close(self) -> None:
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(5)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# Flags for headless Chromium driving the browser client (tests, benchmarks/browser_play.py):
# root in a container needs --no-sandbox; the background-networking ones stop Chromium from
# reaching for Google's hosts on a machine with no outside network.
HEADLESS_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class LocalServer:
    """``worldgen serve`` in a child process on a free port: what tests and the load benchmark
    run against. Its output is kept in ``lines`` (read on a thread, so a chatty server never
    blocks on a full pipe).

    Example::

        with LocalServer("default", "--device", "cuda", "--max-sessions", "64") as srv:
            c = await Client.connect(srv.ws_url)
            print(srv.url, srv.pid)
    """

    def __init__(
        self, checkpoint: str | os.PathLike, *args: str, timeout: float = 180.0, env: dict[str, str] | None = None
    ):
        cmd = [sys.executable, "-m", "worldgen.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        ready = threading.Event()
        url: list[str] = []

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"open (http://\S+)", line)
                if m and not url:
                    url.append(m.group(1))
                    ready.set()
            ready.set()  # exited before it was ready

        threading.Thread(target=pump, name="worldgen-serve-output", daemon=True).start()
        if not ready.wait(timeout) or not url:
            self.close()
            tail = "\n".join(self.lines[-30:])
            raise RuntimeError(
                f"`{' '.join(cmd)}` did not start within {timeout:g} s (exit code {self.proc.returncode}):\n{tail}"
            )
        self.url = url[0]
        parts = urlsplit(self.url)
        self.ws_url = f"ws://{parts.netloc}{P.WS_PATH}"

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
