"""Replay the security probe of issue 28 against a real `worldgen serve` and print what happened.

    python benchmarks/server_probe.py --checkpoint CKPT --device cpu
    python benchmarks/server_probe.py --checkpoint default --device cuda --seconds 10

One server process (loopback, a free port) meets each attack in turn while one healthy client
plays throughout; every attack is bounded in count and time and stops by itself. Per case: how
many connections or messages, what the server did, the healthy client's frames/s while it ran,
and the server's resident memory and open file descriptors at their peak. Then the poisoned
checkpoints (NaN weights, a flipped byte, a shard name outside the folder, malformed JSON) are
loaded from copies of the checkpoint, and the server is stopped with silent clients connected.

The tiny model of the tests (32x24 frames) is made in the folder given, in about 30 s:

    python -m pytest -q tests/test_server.py -k http --basetemp /tmp/wg-tiny   # -> /tmp/wg-tiny/dyn0/ckpt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from worldgen.clients.client import Client, LocalServer, ServerError
from worldgen.server import protocol as P
from worldgen.server.app import rss_bytes

MB = 2**20


@dataclass
class Row:
    case: str
    count: int
    outcome: str
    healthy_fps: float | None = None
    server_cpu: float | None = None  # the server process's CPU seconds per second (all threads)
    rss_mb: float | None = None
    fds: int | None = None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watch:
    """The server's peak memory and descriptors, sampled every 0.2 s while a case runs."""

    def __init__(self, pid: int):
        self.pid, self.rss, self.fds = pid, 0, 0

    def sample(self) -> None:
        self.rss = max(self.rss, rss_bytes(self.pid))
        self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.2)


class Healthy:
    """One client that reads every frame and acts once per frame, as a person's browser does."""

    def __init__(self, c: Client):
        self.c, self.stamps = c, []

    async def run(self) -> None:
        with contextlib.suppress(ConnectionClosed, ServerError):
            while True:
                await self.c.next_frame()
                self.stamps.append(time.monotonic())
                await self.c.act(["forward"])

    def fps(self, t0: float, t1: float) -> float:
        return sum(t0 <= t <= t1 for t in self.stamps) / (t1 - t0)


async def silent(url: str) -> Client:
    """A session that stops reading after its welcome (small receive buffer) but stays connected."""
    host, port = urlsplit(url).netloc.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c = Client(await ws_connect(url, sock=sock, max_queue=1, compression=None, close_timeout=1), {})
    await c.send_raw(P.pack(P.hello()))
    await c.recv()
    c.ws.transport.pause_reading()
    return c


async def case_silent(url: str, healthy: Healthy, n: int, limit: float) -> str:
    clients = [await silent(url) for _ in range(n)]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and (healthy.c.stats or {}).get("sessions", 0) <= n:
        await asyncio.sleep(0.1)  # until a stats message counts the silent sessions
    while time.monotonic() - t0 < limit and (healthy.c.stats or {}).get("sessions", n + 1) > 1:
        await asyncio.sleep(0.25)
    took = time.monotonic() - t0
    live = (healthy.c.stats or {}).get("sessions")
    codes = []
    for c in clients:
        c.ws.transport.resume_reading()
        with contextlib.suppress(ConnectionClosed, ServerError, asyncio.TimeoutError):
            async with asyncio.timeout(5):
                while True:
                    await c.recv()
        codes.append(c.close_code)
        c.ws.transport.abort()
    return (
        f"{live - 1 if live else '?'} of {n} still live after {took:.0f} s; close codes {sorted(set(map(str, codes)))}"
    )


async def _flood(url: str, n: int, seconds: float) -> tuple[int, int, list]:
    """``n`` clients send actions as fast as they can for ``seconds``; returns messages sent,
    the server's count of dropped ones and the close codes of connections it closed."""
    clients = [await Client.connect(url, client="flood") for _ in range(n)]
    sent = [0] * n
    msg = P.pack(P.action(["forward"], t=0.0))

    async def flood(i: int) -> None:
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(seconds):  # a send blocks once the server's buffers are full
                while True:
                    await clients[i].ws.send(msg)
                    sent[i] += 1

    async def drain(c: Client) -> None:
        with contextlib.suppress(ConnectionClosed, ServerError):
            while True:
                await c.recv()

    readers = [asyncio.create_task(drain(c)) for c in clients]
    await asyncio.gather(*(flood(i) for i in range(n)))
    await asyncio.sleep(1.2)  # one more stats message with the drop count
    dropped = sum((c.stats or {}).get("rate_limited", 0) for c in clients)
    codes = [c.close_code for c in clients if c.close_code is not None]
    for c in clients:
        c.ws.transport.abort()
    for r in readers:
        r.cancel()
    return sum(sent), dropped, codes


def flood_process(url: str, n: int, seconds: float) -> tuple[int, int, list]:
    return asyncio.run(_flood(url, n, seconds))


async def case_flood(url: str, n: int, seconds: float) -> tuple[int, str]:
    """The flood comes from another process, so the healthy client's loop is not the one starved."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        total, dropped, codes = await asyncio.get_running_loop().run_in_executor(pool, flood_process, url, n, seconds)
    closed = f"; closed by the server: {sorted(set(codes))}" if codes else ""
    return total, f"{total / seconds:,.0f} msg/s sent, {dropped:,} dropped by the rate limit{closed}"


async def case_origins(url: str) -> str:
    port = urlsplit(url).port
    outcome = []
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port}.evil.example", f"http://127.0.0.1:{port}"):
        try:
            async with ws_connect(url, origin=origin):
                outcome.append("open")
        except InvalidStatus as e:
            outcome.append(str(e.response.status_code))
    return "foreign " + "/".join(outcome[:3]) + f", own {outcome[3]}"


async def case_no_hello(url: str, n: int, limit: float) -> str:
    opened, refused, errors = [], 0, 0
    for _ in range(n):
        try:
            opened.append(await ws_connect(url, open_timeout=5))
        except InvalidStatus:
            refused += 1
        except OSError:
            errors += 1
    t0 = time.monotonic()
    codes = []
    for ws in opened:
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            async with asyncio.timeout(max(0.1, limit - (time.monotonic() - t0))):
                while True:
                    await ws.recv()
        codes.append(ws.close_code)
        await ws.close()
    closed = sum(c is not None for c in codes)
    return (
        f"{len(opened)} opened, {refused} got 503{f', {errors} failed' if errors else ''}; {closed} closed by the "
        f"hello deadline within {time.monotonic() - t0:.0f} s (codes {sorted(set(map(str, codes)))})"
    )


async def case_bad_input(url: str) -> str:
    async with ws_connect(url) as ws:
        await ws.send(P.pack({"type": "action", "seed": "x"}))
        first = P.unpack(await ws.recv())["code"]
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()
        code = ws.close_code
    bad = [
        {"type": "action", "mouse": ["5", "5"]},
        {"type": "action", "mouse": [True, False]},
        {"type": "action", "keys": [True] * 8},
        {"type": "action", "t": math.nan},
    ]
    async with await Client.connect(url) as c:
        codes = []
        for m in bad:
            await c.send_raw(P.pack(m))
            codes.append((await c.next_error())["code"])
    return f"hello {{action, seed: 'x'}} -> {first}/{code}; mistyped actions -> {', '.join(codes)}"


def case_http(netloc: str) -> str:
    out = []
    for method, path in (("HEAD", "/"), ("DELETE", "/"), ("GET", "/<b>x</b>")):
        conn = http.client.HTTPConnection(netloc, timeout=10)
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
        out.append(f"{method} {r.status} ({len(body)} B, nosniff={r.getheader('X-Content-Type-Options') == 'nosniff'})")
        conn.close()
    return "; ".join(out)


def poisoned_checkpoints(checkpoint: str) -> list[Row]:
    """Load broken copies of the checkpoint; each must be a CheckpointError naming its file."""
    from safetensors.torch import load_file, save_file

    from worldgen import WorldModel
    from worldgen import checkpoint as ckpt
    from worldgen.checkpoint import CheckpointError

    src = ckpt.resolve(checkpoint)

    def nan_bias(d: Path) -> None:  # rewritten consistently (hash updated): only the NaN check can catch it
        meta = json.loads((d / "dynamics.json").read_text())
        shard = d / meta["files"][0]
        tensors = load_file(shard)
        name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 1)
        tensors[name][:16] = float("nan")
        save_file(tensors, shard)
        if "sha256" in meta:
            meta["sha256"][meta["files"][0]] = ckpt.sha256_file(shard)
        (d / "dynamics.json").write_text(json.dumps(meta))

    def flip(d: Path) -> None:
        shard = d / json.loads((d / "tokenizer.json").read_text())["files"][0]
        raw = bytearray(shard.read_bytes())
        raw[-100] ^= 0x01
        shard.write_bytes(bytes(raw))

    def outside(d: Path) -> None:
        meta = json.loads((d / "tokenizer.json").read_text())
        meta["files"] = ["../../../../../../etc/passwd"]
        (d / "tokenizer.json").write_text(json.dumps(meta))

    cases = [
        ("NaN weights", nan_bias),
        ("flipped byte", flip),
        ("shard outside folder", outside),
        ("dynamics.json = []", lambda d: (d / "dynamics.json").write_text("[]")),
        ("JSON nested 100,000 deep", lambda d: (d / "dynamics.json").write_text("[" * 100_000 + "]" * 100_000)),
    ]
    rows = []
    for name, poison in cases:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "ckpt"
            shutil.copytree(src, d)
            poison(d)
            try:
                WorldModel.load(d, device="cpu")
                outcome = "LOADED"
            except CheckpointError as e:
                outcome = "refused: " + str(e).replace(str(d) + "/", "")[:110]
            except Exception as e:  # noqa: BLE001 - anything else is a finding
                outcome = f"traceback: {type(e).__name__}: {e}"[:120]
        rows.append(Row(f"checkpoint: {name}", 1, outcome))
    return rows


async def probe(srv: LocalServer, args: argparse.Namespace) -> list[Row]:
    watch = Watch(srv.pid)
    sampler = asyncio.create_task(watch.run())
    healthy = Healthy(await Client.connect(srv.ws_url, seed=0, client="healthy"))
    playing = asyncio.create_task(healthy.run())
    rows: list[Row] = []

    async def run(case: str, count: int, coro, min_seconds: float = 2.0) -> None:
        watch.rss = watch.fds = 0
        watch.sample()
        t0, cpu0 = time.monotonic(), cpu_seconds(srv.pid)
        result = await coro
        # Quick cases are timed over a few frames at least, so the frames/s means something.
        await asyncio.sleep(max(0.0, min_seconds - (time.monotonic() - t0)))
        watch.sample()
        t1, cpu1 = time.monotonic(), cpu_seconds(srv.pid)
        if isinstance(result, tuple):
            count, result = result
        rows.append(Row(case, count, result, healthy.fps(t0, t1), (cpu1 - cpu0) / (t1 - t0), watch.rss / MB, watch.fds))
        print(rows[-1], flush=True)

    s = args.seconds
    await run("baseline (healthy client alone)", 0, asyncio.sleep(s, "-"))
    await run("clients that stop reading", 2, case_silent(srv.ws_url, healthy, 2, 60))
    await run("message flood, 1 client", 1, case_flood(srv.ws_url, 1, s))
    await run("message flood, 4 clients", 4, case_flood(srv.ws_url, 4, s))
    await run("foreign origins", 3, case_origins(srv.ws_url))
    await run("websockets without hello", args.no_hello, case_no_hello(srv.ws_url, args.no_hello, 30))
    await run("malformed hello and actions", 5, case_bad_input(srv.ws_url))
    loop = asyncio.get_running_loop()
    await run("HTTP HEAD/DELETE/404", 3, loop.run_in_executor(None, case_http, urlsplit(srv.ws_url).netloc))
    # Shutdown with two clients that do not read: the process must exit within seconds.
    stuck = [await silent(srv.ws_url) for _ in range(2)]
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    while srv.proc.poll() is None and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    rows.append(
        Row(
            "SIGTERM with 2 silent clients",
            2,
            f"exited in {took:.1f} s" if srv.proc.poll() is not None else "still running after 60 s",
        )
    )
    print(rows[-1], flush=True)
    sampler.cancel()
    playing.cancel()
    for c in stuck:
        c.ws.transport.abort()
    return rows


def table(rows: list[Row]) -> str:
    out = [
        "| case | count | outcome | healthy client fps | server CPU s/s | server RSS MB | server fds |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        out.append(
            f"| {r.case} | {r.count:,} | {r.outcome} | {fmt(r.healthy_fps, '.2f')} | {fmt(r.server_cpu, '.2f')} "
            f"| {fmt(r.rss_mb, '.0f')} | {fmt(r.fds, 'd')} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the timed cases (baseline, floods)")
    ap.add_argument("--no-hello", type=int, default=300, help="websockets opened that never say hello")
    ap.add_argument("--threads", type=int, default=1, help="server --threads (1: the probe needs a core too)")
    ap.add_argument("--server-args", default="", help="more `worldgen serve` flags, e.g. '--send-timeout 3'")
    args = ap.parse_args(argv)
    server_args = [
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--max-sessions",
        "8",
        "--log-level",
        "WARNING",
        *args.server_args.split(),
    ]
    rows = []
    with LocalServer(args.checkpoint, *server_args, timeout=1200) as srv:
        print(f"server pid {srv.pid} at {srv.url} ({' '.join(server_args)})", flush=True)
        rows += asyncio.run(probe(srv, args))
    rows += poisoned_checkpoints(args.checkpoint)
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
