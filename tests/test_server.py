"""`worldgen serve` (issue 5): a real server process with the tiny trained model, driven by the
Python client and by raw websockets: frames arrive and follow actions, every kind of bad message
gets its typed error while other sessions keep streaming, refusals (version, token, busy, idle)
are typed errors with their close codes, the static client is served over HTTP."""

from __future__ import annotations

import asyncio
import math
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from worldgen.clients.client import Client, LocalServer, ServerError
from worldgen.server import protocol as P
from worldgen.server.app import Outbox

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # One model thread: two shared cores, and the test's clients need one.
    # A small send buffer, so a stalled reader's backlog fills in a second or two.
    with LocalServer(
        tiny_checkpoint,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--fps",
        "15",
        "--max-sessions",
        "8",
        "--send-buffer",
        "4096",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def strict_server(tiny_checkpoint):
    """Token, two sessions at most, and a short idle timeout."""
    with LocalServer(
        tiny_checkpoint,
        "--device",
        "cpu",
        "--threads",
        "1",
        "--fps",
        "15",
        "--token",
        TOKEN,
        "--max-sessions",
        "2",
        "--idle-timeout",
        "2",
    ) as srv:
        yield srv


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def collect(c: Client, last_id: int, act=None) -> dict[int, np.ndarray]:
    """Frames (id -> image) up to ``last_id``; ``act(c)`` is awaited after each frame."""
    frames = {}
    while True:
        f = await c.next_frame()
        frames[f.id] = f.image()
        if act is not None:
            await act(c)
        if f.id >= last_id:
            return frames


async def connect_when_free(url: str) -> Client:
    """Connect to the strict server once a slot is free: a client's close returns before the
    server has ended that session, so the previous test's sessions may still count for a moment."""
    for _ in range(100):
        try:
            return await Client.connect(url, token=TOKEN)
        except ServerError as e:
            assert e.code == "busy"
            await asyncio.sleep(0.1)
    raise AssertionError("the server stayed busy for 10 s after its sessions closed")


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


async def refusal(url: str, first: bytes | None) -> tuple[dict, int]:
    """Send ``first`` (nothing: wait) on a raw websocket; return the error message and close code."""
    async with ws_connect(url) as ws:
        if first is not None:
            await ws.send(first)
        err = P.unpack(await ws.recv())
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        return err, ws.close_code


def test_http_serves_the_browser_client(server):
    base = server.url.split("?")[0]
    page = urllib.request.urlopen(base).read().decode()
    assert "client.js" in page and "<canvas" in page
    js = urllib.request.urlopen(base + "client.js")
    assert js.headers["Content-Type"].startswith("text/javascript") and b"PROTOCOL_VERSION = 1" in js.read()
    for path, status in (("nope.html", 404), ("..%2f..%2fetc%2fpasswd", 404), ("ws", 426)):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path)
        assert e.value.code == status, path


def test_frames_arrive_follow_actions_and_repeat_under_a_seed(server):
    """Three sessions on one seed, batched together: two never act, one turns right from the
    start. The idle two see the same frames; the turning one sees others."""

    async def turn(c):
        await c.act(["turn_right"], yaw=15.0)

    async def main():
        idle_a, idle_b, turner = [await Client.connect(server.ws_url, seed=5) for _ in range(3)]
        w = turner.welcome
        assert (w["width"], w["height"], w["version"], w["seed"]) == (32, 24, P.VERSION, 5)
        sent = await turner.act(["turn_right"], yaw=15.0)
        first = await turner.next_frame()  # frame 0: the start context, before any action
        assert first.id == 0 and first.reset and first.seed == 5
        # 20 frames at 15 fps: more than a second, so a stats message arrives on the way.
        a, b, t = await asyncio.gather(collect(idle_a, 20), collect(idle_b, 20), collect(turner, 20, turn))
        stats = turner.stats
        for c in (idle_a, idle_b, turner):
            await c.close()
        return a, b, {0: first.image(), **t}, sent, stats

    a, b, t, sent, stats = arun(main())
    common = sorted(set(a) & set(b) & set(t))
    assert len(common) >= 10 and all(f.shape == (24, 32, 3) for f in t.values())
    same = [mad(a[i], b[i]) for i in common]
    # The same frames but for float rounding: one batched forward computes the twins' rows in
    # different GEMM blocks, so now and then a pixel lands on the next level (as the engine's
    # batch test allows) and JPEG spreads it a little.
    assert np.mean(same) < 0.05 and max(same) < 0.5, f"same seed, same (no) actions: same frames; differ by {same}"
    # The tiny model's response to a turn is small (about 1 grey level on average over a 32x24
    # frame) but the idle twins show that without it the frames would be identical.
    turned = [mad(a[i], t[i]) for i in common if i >= 10]
    assert np.mean(turned) > 0.5, f"turning changed the frames by only {turned}"
    assert mad(t[0], t[max(t)]) > 2.0, "the turning session's view changes"
    assert stats is not None and stats["sessions"] == 3 and stats["dropped"] >= 0 and stats["frames"] > 0
    assert sent > 0


def test_action_timestamp_is_echoed_once(server):
    async def main():
        async with await Client.connect(server.ws_url, seed=1) as c:
            await collect(c, 2)
            t = await c.act(["forward"])
            echoed = []
            for _ in range(6):
                f = await c.next_frame()
                echoed.append(f.t)
            return t, echoed, f

    t, echoed, last = arun(main())
    assert echoed.count(t) == 1 and all(e is None for e in echoed if e != t)
    assert last.gen_ms > 0 and last.step >= 8


def test_reset_returns_to_the_start(server):
    async def main():
        async with await Client.connect(server.ws_url, seed=9) as c:
            start = (await c.next_frame()).image()
            moved = await collect(c, 8, lambda c: c.act(["forward", "turn_left"], yaw=-10.0))
            await c.reset(seed=9)
            while not (f := await c.next_frame()).reset:
                pass
            after = await c.next_frame()
            return start, moved, f, after

    start, moved, f, after = arun(main())
    assert f.seed == 9 and f.step == 0 and f.id > max(moved)
    assert mad(start, f.image()) < 1.0 < mad(start, moved[max(moved)])
    assert after.step == 1


BAD = [  # (payload, error code)
    (b"\xc1\x00", "bad_message"),  # 0xc1: never used in msgpack
    (P.pack(P.action(["forward"]))[:-4], "bad_message"),  # truncated
    (P.pack([1, 2, 3]), "bad_message"),  # not a map
    (P.pack({"keys": []}), "bad_message"),  # no type
    ("text frame", "bad_message"),
    (P.pack({"type": "teleport"}), "unknown_type"),
    (P.pack({"type": "action", "keys": "forward"}), "bad_field"),
    (P.pack({"type": "action", "mouse": "left"}), "bad_field"),
    (P.pack({"type": "action", "t": "now"}), "bad_field"),
    (P.pack({"type": "action", "keys": [], "t": True}), "bad_field"),
    (P.pack({"type": "reset", "seed": -1}), "bad_field"),
    (P.pack({"type": "reset", "seed": "7"}), "bad_field"),
    (P.pack({"type": "action", "keys": ["jump"]}), "bad_action"),
    (P.pack({"type": "action", "keys": [1, 0, 0]}), "bad_action"),
    (P.pack({"type": "action", "keys": [2, 0, 0, 0, 0, 0, 0, 0]}), "bad_action"),
    (P.pack({"type": "action", "mouse": [math.nan, 0.0]}), "bad_action"),
    (P.pack({"type": "action", "mouse": [500.0, 0.0]}), "bad_action"),
    (P.pack({"type": "action", "mouse": [1.0, 2.0, 3.0]}), "bad_action"),
    (P.pack({"type": "action", "mouse": ["a", "b"]}), "bad_action"),
    (P.pack(P.hello()), "unexpected"),
    (b"\x00" * (P.MAX_MESSAGE_BYTES + 1), "too_large"),
    (P.pack({**P.action(["forward"]), "pad": "x" * P.MAX_MESSAGE_BYTES}), "too_large"),
]


def test_bad_messages_get_typed_errors_and_nobody_stops(server):
    async def watch(c: Client, stop: asyncio.Event) -> list[int]:
        ids = []
        while not stop.is_set():
            ids.append((await c.next_frame()).id)
        return ids

    async def main():
        watcher = await Client.connect(server.ws_url, seed=2)
        bad = await Client.connect(server.ws_url, seed=3)
        stop = asyncio.Event()
        watching = asyncio.create_task(watch(watcher, stop))
        got = []
        for payload, _ in BAD:
            await bad.send_raw(payload)
            err = await bad.next_error()
            got.append((err["code"], err["fatal"], err["message"]))
        # The offender is still served and still obeys actions.
        await bad.act(["forward"])
        after = [(await bad.next_frame()).id for _ in range(3)]
        # A message above the hard limit closes only the offender's connection (1009).
        big = Client(await ws_connect(server.ws_url, max_size=None), {})
        await big.send_raw(P.pack(P.hello()))
        await big.recv()
        await big.send_raw(b"\x00" * (2**20 + 1))
        with pytest.raises(ConnectionClosed):
            while True:
                await big.recv()
        await asyncio.sleep(0.5)  # the watcher streams on meanwhile
        stop.set()
        ids = await watching
        await asyncio.gather(watcher.close(), bad.close())
        return got, after, big.close_code, ids, watcher.errors

    got, after, big_code, ids, watcher_errors = arun(main())
    assert [(code, fatal) for code, fatal, _ in got] == [(code, False) for _, code in BAD]
    assert all(msg for _, _, msg in got)
    assert after == sorted(after) and len(after) == 3
    assert big_code == 1009
    assert watcher_errors == [] and len(ids) >= 5 and ids == sorted(ids)


def test_a_stalled_reader_gets_stale_frames_dropped(server):
    """A client that stops reading: the server drops its stale frames (counted in stats, seen
    as id gaps) instead of queueing them, and it gets fresh frames once it reads again."""

    async def main():
        host, port = urlsplit(server.ws_url).netloc.split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuned megabytes
        c = Client(await ws_connect(server.ws_url, sock=sock, max_queue=1, compression=None), {})
        await c.send_raw(P.pack(P.hello(seed=1)))
        assert (await c.recv())["type"] == "welcome"
        c.ws.transport.pause_reading()  # stall: bytes pile up in the kernel, then the server drops
        for _ in range(8):
            await c.act([])  # still talking, so no idle timeout
            await asyncio.sleep(0.5)
        c.ws.transport.resume_reading()
        # First the backlog (frames made before the drops), then a stats message that counts
        # drops, sent just before the newest frame: the one after the gap.
        ids, stats, after = [], None, 0
        while after < 5:
            msg = await c.recv()
            if msg["type"] == "frame":
                ids.append(msg["id"])
                after += stats is not None
            elif msg["type"] == "stats" and msg["dropped"] > 0:
                stats = stats or msg
        await c.close()
        return ids, stats

    ids, stats = arun(main())
    gaps = [b - a - 1 for a, b in zip(ids, ids[1:])]
    print(
        f"\nstalled reader: {sum(gaps)} frames dropped in {sum(g > 0 for g in gaps)} gaps; server counted "
        f"{stats['dropped']}"
    )
    assert ids == sorted(ids) and sum(gaps) > 0 and stats["dropped"] > 0


def test_version_mismatch_and_missing_hello_are_refused(server):
    err, code = arun(refusal(server.ws_url, P.pack(P.hello(version=P.VERSION + 1))))
    assert (err["type"], err["code"], err["fatal"], code) == ("error", "version_mismatch", True, 4426)
    assert str(P.VERSION) in err["message"]
    err, code = arun(refusal(server.ws_url, P.pack(P.action(["forward"]))))
    assert (err["code"], code) == ("hello_required", 4400)
    err, code = arun(refusal(server.ws_url, b"\xc1"))
    assert (err["code"], code) == ("hello_required", 4400) and "msgpack" in err["message"]
    with pytest.raises(ServerError) as e:
        arun(Client.connect(server.ws_url, version=0))
    assert e.value.code == "version_mismatch" and e.value.fatal


def test_token_refused_and_accepted(strict_server):
    for token in (None, "wrong", TOKEN + "x"):
        err, code = arun(refusal(strict_server.ws_url, P.pack(P.hello(token=token))))
        assert (err["code"], code) == ("unauthorized", 4401), token

    async def ok():
        async with await Client.connect(strict_server.ws_url, token=TOKEN) as c:
            return (await c.next_frame()).id

    assert arun(ok()) == 0
    assert f"token={TOKEN}" in strict_server.url  # the printed URL lets a browser in


def test_max_sessions_is_a_busy_error_and_frees_up(strict_server):
    async def keep_alive(cs):
        while True:
            for c in cs:
                await c.act([])
            await asyncio.sleep(0.3)

    async def main():
        a = await connect_when_free(strict_server.ws_url)
        b = await connect_when_free(strict_server.ws_url)
        alive = asyncio.create_task(keep_alive([a, b]))
        err, code = await refusal(strict_server.ws_url, P.pack(P.hello(token=TOKEN)))
        await a.close()
        c = await connect_when_free(strict_server.ws_url)
        frame = await c.next_frame()
        alive.cancel()
        await asyncio.gather(b.close(), c.close())
        return err, code, frame

    err, code, frame = arun(main())
    assert (err["code"], err["fatal"], code) == ("busy", True, 4503) and "max-sessions" in err["message"]
    assert frame.id == 0


def test_idle_timeout(strict_server):
    async def silent():
        c = await connect_when_free(strict_server.ws_url)
        frames = 0
        with pytest.raises(ServerError) as e:
            while True:
                await c.next_frame()
                frames += 1
        with pytest.raises(ConnectionClosed):
            await c.recv()
        return e.value, c.close_code, frames

    err, code, frames = arun(silent())
    assert (err.code, err.fatal, code) == ("idle_timeout", True, 4408) and frames > 0
    # Before hello too: a connection that never speaks is closed.
    err, code = arun(refusal(strict_server.ws_url, None))
    assert (err["code"], code) == ("idle_timeout", 4408)


def test_an_engine_failure_closes_only_its_session(tiny_checkpoint):
    """The real tiny model in an in-process server, with a fault injected into the batched step
    whenever one chosen session is in the batch: that session gets an `internal` error and a
    close; the other, batched with it until then, streams on."""
    import torch

    from worldgen import WorldModel
    from worldgen.server.app import ServeConfig, serve

    wm = WorldModel.load(tiny_checkpoint, device="cpu")
    by_seed, doomed = {}, set()
    session, step_many = wm.session, wm.step_many

    def recording_session(seed=None, **kw):
        by_seed[seed] = s = session(seed=seed, **kw)
        return s

    def faulty_step_many(sessions, actions):
        if any(id(s) in doomed for s in sessions):
            raise RuntimeError("injected fault")
        return step_many(sessions, actions)

    wm.session, wm.step_many = recording_session, faulty_step_many

    async def main():
        urls, stop = [], asyncio.Event()
        server = asyncio.create_task(serve(wm, ServeConfig(port=0, fps=15), on_ready=urls.append, stop=stop))
        while not urls:
            await asyncio.sleep(0.01)
        url = urls[0].replace("http://", "ws://") + "ws"
        ok, bad = await Client.connect(url, seed=1), await Client.connect(url, seed=2)
        await asyncio.gather(collect(ok, 3), collect(bad, 3))
        doomed.add(id(by_seed[2]))
        with pytest.raises(ServerError) as e:
            await collect(bad, 10**9)
        with pytest.raises(ConnectionClosed):
            await bad.recv()
        before = (await ok.next_frame()).id
        later = [(await ok.next_frame()).id for _ in range(5)]
        await ok.close()
        stop.set()
        await server
        return e.value, bad.close_code, before, later

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        err, code, before, later = arun(main())
    finally:
        torch.set_num_threads(n)
    assert (err.code, err.fatal, code) == ("internal", True, 4500) and "injected fault" in err.message
    assert later == list(range(before + 1, before + 6))


def test_outbox_keeps_only_the_newest_frame():
    async def main():
        box = Outbox()
        for i in range(5):
            box.put_frame(bytes([i]))
        box.put_stats(b"s1")
        box.put_stats(b"s2")
        first = await box.get()
        box.put_frame(b"\x09")
        return first, await box.get(), box.dropped

    first, second, dropped = asyncio.run(main())
    assert first == [b"s2", b"\x04"] and second == [b"\x09"] and dropped == 4


def test_protocol_parse_accepts_what_the_clients_send():
    for msg in (
        P.hello(token="x", seed=3),
        P.action(["forward", "use"], (1.5, -2)),
        P.action([1] * 8),
        P.reset(),
        P.reset(seed=P.MAX_SEED),
    ):
        assert P.parse(P.pack(msg)) == msg
    # Extra fields are ignored (forward compatibility), integers pass as numbers.
    assert P.parse(msgpack.packb({"type": "action", "t": 5, "new_field": [1]}))["t"] == 5
