"""`worldgen serve` under attack (issue 28), in-process with the tiny trained model, loopback
only, every attack bounded in count and time: clients that stop reading, floods, foreign
origins, connections that never say hello, malformed input and HTTP abuse. Each test failed
before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import math
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from worldgen.clients.client import Client, ServerError
from worldgen.server import protocol as P
from worldgen.server.app import ServeConfig, Server, serve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wm(tiny_checkpoint):
    from worldgen import WorldModel

    return WorldModel.load(tiny_checkpoint, device="cpu")


def arun(coro, limit: float = 60):
    return asyncio.run(asyncio.wait_for(coro, limit))


class Running:
    """An in-process server: ``http`` and ``ws`` URLs, the task that serves, and its stop event."""

    def __init__(self, task: asyncio.Task, stop: asyncio.Event, url: str):
        self.task, self.stop, self.http = task, stop, url.split("?")[0]
        self.netloc = urlsplit(self.http).netloc
        self.ws = f"ws://{self.netloc}{P.WS_PATH}"

    async def shutdown(self, limit: float = 10.0) -> float:
        """Stop the server; seconds it took to return."""
        t0 = time.monotonic()
        self.stop.set()
        await asyncio.wait_for(self.task, limit)
        return time.monotonic() - t0


@contextlib.asynccontextmanager
async def running(wm, **cfg):
    urls, stop = [], asyncio.Event()
    task = asyncio.create_task(serve(wm, ServeConfig(port=0, **{"fps": 15, **cfg}), on_ready=urls.append, stop=stop))
    while not urls:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    srv = Running(task, stop, urls[0])
    try:
        yield srv
    finally:
        if not task.done():
            await srv.shutdown()


async def silent_client(url: str) -> Client:
    """A session whose client stops reading after the welcome (a tiny receive buffer, so the
    server's side fills within a second or two) but keeps its TCP connection open."""
    host, port = urlsplit(url).netloc.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = Client(await ws_connect(url, sock=sock, max_queue=1, compression=None), {})
    await c.send_raw(P.pack(P.hello(seed=1)))
    assert (await c.recv())["type"] == "welcome"
    c.ws.transport.pause_reading()
    return c


async def connect_eventually(url: str, limit: float) -> Client:
    deadline = time.monotonic() + limit
    while True:
        try:
            return await Client.connect(url)
        except ServerError as e:
            if e.code != "busy" or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def test_clients_that_stop_reading_lose_their_slot_and_do_not_block_shutdown(wm):
    """Two silent clients on a 3-session server: each is closed once a send to it has waited
    --send-timeout, so their slots free up; two more silent ones at shutdown do not hold it up."""

    async def watch(c: Client, ids: list[int]) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                ids.append((await c.next_frame()).id)

    async def main():
        async with running(wm, max_sessions=3, send_buffer=4096, send_timeout=1.0, shutdown_timeout=1.0) as srv:
            silent = [await silent_client(srv.ws) for _ in range(2)]
            healthy, ids = await Client.connect(srv.ws), []
            watching = asyncio.create_task(watch(healthy, ids))
            # Both silent sessions must go within a few seconds: two new clients get in.
            t0 = time.monotonic()
            for _ in range(2):
                await (await connect_eventually(srv.ws, 15.0)).close()
            freed_after = time.monotonic() - t0
            for c in silent:
                c.ws.transport.resume_reading()
            codes = []
            for c in silent:
                with contextlib.suppress(ConnectionClosed, ServerError):
                    while True:
                        await c.next_frame()
                codes.append(c.close_code)
            stuck = [await silent_client(srv.ws) for _ in range(2)]
            await asyncio.sleep(0.5)
            took = await srv.shutdown()
            await watching
            for c in stuck:
                c.ws.transport.abort()
            return freed_after, codes, ids, healthy.close_code, took

    freed_after, codes, ids, healthy_code, took = arun(main())
    print(f"\nsilent clients closed; slots free after {freed_after:.1f} s; shutdown took {took:.1f} s")
    assert freed_after < 10
    # The close frame may not reach a client that never drains; when it does, it carries the code.
    assert all(code in (P.FATAL_CLOSE["slow_reader"], 1006) for code in codes), codes
    # The reading client streamed all along and was closed as the server went away.
    assert len(ids) > 20 and ids == sorted(ids) and healthy_code == 1001
    assert took < 3


def test_a_flood_is_rate_limited_and_counted(wm):
    async def main():
        async with running(wm, max_rate=50) as srv:
            c = await Client.connect(srv.ws)
            for _ in range(120):
                await c.send_raw(P.pack(P.action(["forward"])))
            err = await asyncio.wait_for(c.next_error(), 10)
            while (await c.recv()).get("type") != "stats":
                pass
            stats = c.stats
            frame = await c.next_frame()
            await c.close()
            return err, stats, frame

    err, stats, frame = arun(main())
    assert (err["code"], err["fatal"]) == ("rate_limited", False) and "50" in err["message"]
    assert stats["rate_limited"] > 0 and frame.id > 0


def test_only_the_servers_own_origin_may_open_a_websocket(wm):
    async def opens(url: str, origin: str | None) -> bool:
        try:
            async with ws_connect(url, origin=origin) as ws:
                await ws.send(P.pack(P.hello()))
                return P.unpack(await ws.recv())["type"] == "welcome"
        except InvalidStatus as e:
            assert e.response.status_code == 403
            return False

    async def main():
        async with running(wm) as srv:
            port = srv.netloc.split(":")[1]
            plain = [
                await opens(srv.ws, o)
                for o in (
                    None,
                    f"http://{srv.netloc}",
                    f"http://localhost:{port}",
                    "http://evil.example",
                    "null",
                    f"http://127.0.0.1:{port}.evil.example",
                )
            ]
        async with running(wm, allow_origins=("http://evil.example",)) as srv:
            allowed = [await opens(srv.ws, o) for o in ("http://evil.example", "http://other.example")]
        return plain, allowed

    plain, allowed = arun(main())
    assert plain == [True, True, True, False, False, False]
    assert allowed == [True, False]


def test_hello_has_a_deadline_and_pending_connections_a_cap(wm):
    async def main():
        async with running(wm, hello_timeout=1.0, max_pending=3) as srv:
            quiet = [await ws_connect(srv.ws) for _ in range(3)]
            with pytest.raises(InvalidStatus) as refused:
                await ws_connect(srv.ws)
            t0 = time.monotonic()
            err = P.unpack(await quiet[0].recv())
            with pytest.raises(ConnectionClosed):
                await quiet[0].recv()
            waited = time.monotonic() - t0
            for ws in quiet:
                await ws.close()
            await asyncio.sleep(0.2)
            async with await Client.connect(srv.ws) as c:  # the cap frees up again
                frame = await c.next_frame()
            return refused.value.response.status_code, err, quiet[0].close_code, waited, frame.id

    status, err, code, waited, frame_id = arun(main())
    assert status == 503
    assert (err["code"], code) == ("idle_timeout", 4408) and "hello" in err["message"] and waited < 3
    assert frame_id == 0


def test_a_hello_with_a_bad_seed_type_is_hello_required(wm):
    async def main():
        async with running(wm) as srv:
            async with ws_connect(srv.ws) as ws:
                await ws.send(P.pack({"type": "action", "seed": "x"}))
                err = P.unpack(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
                return err, ws.close_code

    err, code = arun(main())
    assert (err["code"], code) == ("hello_required", 4400)


@pytest.mark.parametrize(
    "msg, code",
    [
        ({"type": "action", "mouse": ["5", "5"]}, "bad_action"),
        ({"type": "action", "mouse": [True, False]}, "bad_action"),
        ({"type": "action", "keys": [True] * 8}, "bad_action"),
        ({"type": "action", "keys": ["forward", 1]}, "bad_action"),
        ({"type": "action", "t": math.nan}, "bad_field"),
        ({"type": "action", "t": math.inf}, "bad_field"),
    ],
)
def test_protocol_rejects_mistyped_action_values(msg, code):
    with pytest.raises(P.ProtocolError) as e:
        P.parse(P.pack(msg))
    assert e.value.code == code


def test_seed_is_checked_only_where_it_belongs():
    # An action has no seed: an extra field, ignored like any other.
    assert P.parse(P.pack({"type": "action", "seed": -5}))["type"] == "action"
    assert P.parse(P.pack({"type": "action", "seed": "x"}))["type"] == "action"
    with pytest.raises(P.ProtocolError, match="seed"):
        P.parse(P.pack({"type": "reset", "seed": -5}))


def _http(netloc: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(netloc, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_http_only_get_and_no_sniffing(wm):
    async def main():
        async with running(wm) as srv:
            loop = asyncio.get_running_loop()
            return [
                await loop.run_in_executor(None, _http, srv.netloc, m, p)
                for m, p in (("HEAD", "/"), ("DELETE", "/"), ("GET", "/<script>x</script>"), ("GET", "/"))
            ]

    (head, hh, hb), (delete, _, _), (missing, mh, mb), (ok, oh, _) = arun(main())
    assert head == delete == 405 and hb == b"" and "GET" in hh["allow"]
    assert missing == 404 and mh["x-content-type-options"] == "nosniff" and b"<script>" not in mb
    assert ok == 200 and oh["x-content-type-options"] == "nosniff"


def test_static_files_skip_links_out_of_the_folder(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<canvas>")
    (tmp_path / "secret.txt").write_text("secret")
    (web / "secret.txt").symlink_to(tmp_path / "secret.txt")
    assert set(Server.load_web(web)) == {"index.html"}


def test_token_from_environment_or_file_and_exposure_warning(tmp_path, monkeypatch):
    from worldgen.server.cli import exposure_warning, read_token

    f = tmp_path / "token"
    f.write_text("fromfile\n")
    assert read_token(None, str(f), {}) == "fromfile"
    assert read_token(None, None, {"WORLDGEN_TOKEN": "fromenv"}) == "fromenv"
    assert read_token("flag", None, {"WORLDGEN_TOKEN": "fromenv"}) == "flag"
    assert read_token(None, None, {}) is None
    with pytest.raises(ValueError, match="empty"):
        f.write_text("\n")
        read_token(None, str(f), {})
    with pytest.raises(ValueError, match="no-such"):
        read_token(None, str(tmp_path / "no-such"), {})
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "token" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "s3cret") is None


def test_compiled_serving_compiles_and_steps_on_the_engine_thread(wm, monkeypatch):
    """The compile path without a GPU: ``wm.compile`` is faked (CUDA graphs need CUDA) to record
    its thread; the server calls it on the engine thread, warms every padded batch size there,
    and pads each tick's batch to one of those sizes, so nothing compiles mid-game."""
    calls, batches = [], []
    monkeypatch.setattr(wm, "compile", lambda *a, **k: calls.append(threading.get_ident()) or wm)
    step_many = wm.step_many

    def recording(sessions, actions):
        batches.append((threading.get_ident(), len(sessions)))
        return step_many(sessions, actions)

    monkeypatch.setattr(wm, "step_many", recording)

    async def main():
        async with running(wm, compile=True, max_sessions=5) as srv:
            clients = [await Client.connect(srv.ws, seed=i) for i in range(3)]
            ids = [[(await c.next_frame()).id for _ in range(4)] for c in clients]
            for c in clients:
                await c.close()
            return ids

    ids = arun(main())
    engine = {t for t, _ in batches}
    assert len(calls) == 1 and engine == {calls[0]} and calls[0] != threading.get_ident()
    # Sizes (server.app.batch_sizes): powers of two from 2 below --max-sessions, and --max-sessions
    # itself; a lone player is padded to 2, so batch 1 never compiles.
    assert {n for _, n in batches} == {2, 4, 5}
    assert all(i == sorted(i) and len(set(i)) == 4 for i in ids)


def test_a_failed_default_compile_serves_eagerly(wm, monkeypatch):
    """A compile that fails on the machine (faked: the warm-up's first step raises) stops a server
    that was asked for ``--compile`` outright, and falls back to the eager step, with a warning,
    when compiling was only the CUDA default: players still get frames."""
    from worldgen.server.app import CompileError

    def broken_compile(*a, **k):
        def fail(*args, **kwargs):
            raise RuntimeError("CUDA graphs said no")

        wm._step = fail
        return wm

    monkeypatch.setattr(wm, "compile", broken_compile)

    async def asked():
        async with running(wm, compile=True, max_sessions=2):
            pass

    with pytest.raises(CompileError, match="CUDA graphs said no"):
        arun(asked())
    wm.eager()

    async def defaulted():
        async with running(wm, compile=True, compile_fallback=True, max_sessions=2) as srv:
            c = await Client.connect(srv.ws, seed=0)
            frame = await c.next_frame()
            await c.close()
            return frame

    assert arun(defaulted()).image().shape == wm.frame_shape
    assert wm._step == wm._denoise  # eager again
