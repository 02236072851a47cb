"""The clients (issue 5): the browser client in headless Chromium (Debian's `chromium`, driven
by Playwright) and the pygame client headless (SDL_VIDEODRIVER=dummy) with scripted key events,
both against a real `worldgen serve` with the tiny trained model, and the pygame client on the
local engine. What a client shows is checked against a Python client's frames for the same seed
with no input: equal before any key is pressed, different once one is held."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

os.environ["SDL_VIDEODRIVER"] = "dummy"  # before pygame opens a display
import pygame  # noqa: E402
from conftest import benchmark_script, finite  # noqa: E402

from worldgen.actions import KEYS  # noqa: E402
from worldgen.clients.client import HEADLESS_CHROMIUM_ARGS, Client, LocalServer  # noqa: E402
from worldgen.clients.play import LocalSource, RemoteSource, play  # noqa: E402

TOKEN = "t0ken"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_INSTALL = "apt-get update -q && apt-get install -y -q chromium"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with LocalServer(tiny_checkpoint, "--device", "cpu", "--threads", "1", "--fps", "15", "--token", TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: intra-op threads only fight each other
    yield
    torch.set_num_threads(n)


def reference(ws_url: str, seed: int, last_id: int) -> dict[int, np.ndarray]:
    """Frames 0..last_id of a session on ``seed`` that never acts."""

    async def main():
        async with await Client.connect(ws_url, token=TOKEN, seed=seed) as c:
            frames = {}
            while (f := await c.next_frame()).id < last_id:
                frames[f.id] = f.image()
            frames[f.id] = f.image()
            return frames

    # On a thread of its own: Playwright's sync API keeps an event loop running on this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(asyncio.wait_for(main(), 120))).result()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def key(kind: int, k: int) -> pygame.event.Event:
    return pygame.event.Event(kind, key=k, mod=0, unicode="", scancode=0)


# -- browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(
            f"the browser test needs Debian's chromium, which is not installed: run `{CHROMIUM_INSTALL}` "
            "(the README's test command does)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the browser test needs playwright: pip install -e ".[test]"')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=list(HEADLESS_CHROMIUM_ARGS))
        yield b
        b.close()


def canvas_now(page) -> tuple[int, np.ndarray]:
    """(id of the frame on the canvas, its pixels), read in one go in the page."""
    got = page.evaluate("""() => {
        const c = document.getElementById('screen');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        return {id: worldgen.drawnId, w: c.width, h: c.height, px: Array.from(d.data)};
    }""")
    return got["id"], np.array(got["px"], np.uint8).reshape(got["h"], got["w"], 4)[..., :3]


def test_browser_client_plays(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 900, "height": 700})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "&seed=11")
    page.wait_for_function("worldgen.drawnId >= 3", timeout=30_000)
    before_id, before = canvas_now(page)
    page.keyboard.down("ArrowRight")  # turn right, held
    page.wait_for_function(f"worldgen.drawnId >= {before_id + 16}", timeout=30_000)
    held_id, held = canvas_now(page)
    page.wait_for_function("worldgen.latency !== null", timeout=10_000)
    shot = ARTIFACTS / "browser_client.png"
    page.screenshot(path=str(shot))
    print(f"\nbrowser screenshot: {shot}")
    state = page.evaluate(
        "({a: worldgen.lastAction, o: document.getElementById('overlay').textContent,"
        " s: document.getElementById('status').textContent, e: worldgen.error})"
    )
    page.keyboard.up("ArrowRight")
    page.close()

    ref = reference(server.ws_url, 11, held_id)
    assert errors == [] and state["e"] in ("", None)
    assert before.shape == (24, 32, 3) and "seed 11" in state["s"]
    assert state["a"]["keys"] == ["turn_right"]
    assert "fps" in state["o"] and "latency –" not in state["o"]  # a measured latency is shown
    # The status line shows the rate frames arrive at, beside the server's target (--fps 15).
    got = re.search(r"· ([0-9.]+) fps \(target 15\.00\)", state["s"])
    assert got and 0 < float(got.group(1)) <= 20, state["s"]
    # The canvas shows the server's frames: equal to the no-input reference before the key
    # (up to JPEG decoders), different while turning.
    print(
        f"browser: canvas vs no-input frame: {mad(before, ref[before_id]):.2f} before the key, "
        f"{mad(held, ref[held_id]):.2f} while turning"
    )
    assert mad(before, ref[before_id]) < 0.2, f"frame {before_id} differs from the reference"
    assert mad(held, ref[held_id]) > 0.4, f"frame {held_id} while turning equals the no-input one"
    assert shot.stat().st_size > 1000


def test_browser_shows_a_readable_refusal(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page()
    page.goto(server.url.split("?")[0])  # without the token
    page.wait_for_function("worldgen.error", timeout=30_000)
    box = page.locator("#error")
    text = box.inner_text()
    shot = ARTIFACTS / "browser_refused.png"
    page.screenshot(path=str(shot))
    print(f"\nbrowser screenshot: {shot}")
    assert box.is_visible() and "token" in text and "unauthorized" in text
    assert page.evaluate("worldgen.refused") and page.evaluate("worldgen.frames") == 0
    page.close()


# -- pygame ----------------------------------------------------------------------------------


def turn_right_from(n: int):
    """Press Right at frame n, click to take the mouse, then move it right by 60 px a frame."""

    def script(i: int) -> list[pygame.event.Event]:
        if i == n:
            return [
                key(pygame.KEYDOWN, pygame.K_RIGHT),
                pygame.event.Event(pygame.MOUSEBUTTONDOWN, button=1, pos=(5, 5)),
            ]
        return [pygame.event.Event(pygame.MOUSEMOTION, rel=(60, 0), pos=(5, 5), buttons=(0, 0, 0))] if i > n else []

    return script


def capture(src):
    """Keep every frame ``src`` hands the window (the recorded mp4 is too lossy at 32x24 to
    compare frames by)."""
    shown, poll = [], src.poll

    def keep():
        got = poll()
        if got is not None:
            shown.append(got[0])
        return got

    src.poll = keep
    return shown


def test_pygame_local_engine(tiny_checkpoint, tmp_path, one_thread):
    """Local engine: the same seed and the same scripted input give the same frames; turning
    right (key and mouse) from frame 2 on gives others; --record writes every frame shown."""

    def run(script, name):
        src = LocalSource(str(tiny_checkpoint), device="cpu", seed=4, fps=200)
        shown = capture(src)
        try:
            r = play(src, frames=14, record=str(tmp_path / name), script=script)
        finally:
            src.close()
        assert len(imageio.mimread(tmp_path / name)) == r.frames == len(shown) == 14
        return r, shown

    still_a, va = run(lambda i: [], "a.mp4")
    still_b, vb = run(lambda i: [], "b.mp4")
    turned, vt = run(turn_right_from(2), "t.mp4")
    assert still_a.ids == turned.ids == list(range(14)) and va[0].shape == (24, 32, 3)
    assert all(np.array_equal(x, y) for x, y in zip(va, vb))
    # The tiny model answers a turn weakly (a fraction of a grey level on average), but the
    # twins above show that any difference at all is the input's doing.
    assert np.array_equal(va[0], vt[0]) and not any(np.array_equal(x, y) for x, y in zip(va[4:], vt[4:]))
    assert np.mean([mad(x, y) for x, y in zip(va[8:], vt[8:])]) > 0.1
    assert len(turned.latencies_ms) == 13 and all(ms > 0 for ms in turned.latencies_ms)


def test_steps_option_reaches_the_sampler(tiny_checkpoint, one_thread):
    """`--steps` of `worldgen play` (local) and `worldgen serve` sets the Euler steps per frame:
    the same seed gives other frames at 3 steps than at the checkpoint's; 0 is a clear error."""

    def run(**steps):
        src = LocalSource(str(tiny_checkpoint), device="cpu", seed=4, fps=200, **steps)
        shown = capture(src)
        try:
            play(src, frames=3, script=lambda i: [])
            return src.wm.stream.steps, shown[-1]
        finally:
            src.close()

    (own, last_own), (three, last_three) = run(), run(steps=3)
    assert own != three == 3 and not np.array_equal(last_own, last_three)
    with pytest.raises(ValueError, match="steps must lie"):
        LocalSource(str(tiny_checkpoint), device="cpu", steps=0)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "worldgen.cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--steps",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "steps must lie in [1, 64], got 0" in done.stderr


def test_play_threads_option(tiny_checkpoint, monkeypatch, one_thread, capsys):
    """`worldgen play --threads N` (local mode) sets torch's CPU threads, as serve and generate do."""
    import torch

    from worldgen.cli import main

    calls, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    base = ["play", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--fps", "200", "--frames", "2"]
    assert main(base + ["--threads", "1"]) == 0 and calls == [1]
    assert "2 frames" in capsys.readouterr().out
    assert main(base + ["--threads", "0"]) == 2 and calls == [1]
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_pygame_client_on_the_server(server, tmp_path):
    src = RemoteSource(server.ws_url, token=TOKEN, seed=21)
    frames = capture(src)
    try:
        r = play(src, frames=18, record=str(tmp_path / "remote.mp4"), script=turn_right_from(2))
    finally:
        src.close()
    ref = reference(server.ws_url, 21, max(r.ids))
    assert r.frames == len(imageio.mimread(tmp_path / "remote.mp4")) == len(frames) == 18
    first = r.ids[0]  # the newest frame wins: on a loaded machine the very first may be skipped
    assert r.ids == sorted(r.ids) and first <= 1  # frames 0 and 1 come before any key
    assert r.latencies_ms, "held keys are sent with timestamps the server echoes"
    shown = dict(zip(r.ids, frames))
    assert mad(shown[first], ref[first]) < 0.1
    late = [mad(shown[i], ref[i]) for i in r.ids if i >= 10]
    print(f"\nremote pygame: mean abs difference to the no-input session from frame 10: {np.mean(late):.2f}")
    assert np.mean(late) > 0.3


def test_worldgen_play_command(server, tmp_path):
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy"}
    out = tmp_path / "cli.mp4"
    cmd = [
        sys.executable,
        "-m",
        "worldgen.cli",
        "play",
        "--server",
        server.ws_url,
        "--token",
        TOKEN,
        "--frames",
        "5",
        "--record",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5 frames" in done.stdout and len(imageio.mimread(out)) == 5
    refused = subprocess.run(cmd[:-6] + ["--frames", "5"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "unauthorized" in refused.stderr


# -- what a player sees: benchmarks/browser_play.py -----------------------------------------


def test_browser_play_benchmark(tiny_checkpoint, browser, tmp_path, one_thread):
    """The contact-sheet benchmark on a real ViZDoom recording: the browser client plays a short
    script, and which action made each frame, read off the protocol's echoes, is exact: the engine
    playing those actions from the same start makes the same frames, JPEG for JPEG. The game
    replays the same actions from the same start, and the sheet and scores come out."""
    from worldgen.actions import Action
    from worldgen.data import Dataset
    from worldgen.engine.world_model import WorldModel
    from worldgen.env.sources import record as rec
    from worldgen.server.app import encode_jpeg

    bp = benchmark_script("browser_play")
    data = tmp_path / "play"
    rec.record_doom(data, 60, workers=1, episode_steps=60, maps=["E1M1"], seed=4, progress=False)
    ds = Dataset(data)
    wm = WorldModel.load(tiny_checkpoint, device="cpu")
    start = wm.start(0)[0]  # (T, H, W, 3)
    context, size = start.shape[0], start.shape[1:3]
    # 5 frames/s: the page reacts to each frame within a frame's time even on a busy 2-core CPU
    # (at 15 a slow page held a key 3 frames long), so a segment's frame count holds to one.
    fps = 5.0
    script = (
        bp.Segment("walk", ("forward",), 0.6),
        bp.Segment("turn left", ("turn_left",), 0.4),
        bp.Segment("stand still", (), 0.6),
    )
    episode, at = bp.pick_start(ds, context, *bp.script_actions(script, fps), candidates=2)
    item = bp.start_context(ds, episode, at, context, size)
    model = bp.serving_copy(str(tiny_checkpoint), item, {"data": str(data)}, tmp_path)
    with LocalServer(model, "--device", "cpu", "--threads", "1", "--fps", str(int(fps))) as srv:
        page = browser.new_page()
        record = bp.play_script(page, srv.url, script)
        page.close()
    r = bp.against_game(record, data, ds.episodes[episode].id, at, item["frames"][-1], script)
    shown, keys, mouse, ids = r["shown"], r["keys"], r["mouse"], r["ids"]
    assert record["fps"] == fps and len(shown) == len(keys) + 1 == len(ids) + 1
    assert np.array_equal(shown[0], np.asarray(Image.open(io.BytesIO(encode_jpeg(item["frames"][-1], 85)))))

    session = WorldModel.load(model, device="cpu").session(seed=0)
    for i, (k, m) in enumerate(zip(keys, mouse)):
        made = np.asarray(Image.open(io.BytesIO(encode_jpeg(session.step(Action(k, m)), 85))))
        assert np.array_equal(made, shown[i + 1]), f"frame {ids[i]} was not made by the action read for it"
    # Each key was held for its segment's frames (one frame early or late at a key change).
    counts = bp.frames_per_segment(script, fps)
    walked, turned = (int(keys[:, KEYS.index(k)].sum()) for k in ("forward", "turn_left"))
    assert abs(walked - counts[0]) <= 1 and abs(turned - counts[1]) <= 1 and keys[-2:].sum() == 0

    assert r["matched"] and len(r["game"]) == len(shown)
    assert [sc["segment"] for sc in r["scores"]] == ["walk", "turn left", "stand still"] and finite(r["scores"])
    assert [b - a for a, b in r["bounds"]] == counts  # every segment played its frames
    bp.contact_sheet(script, shown, r["game"], r["bounds"], 15.0, tmp_path / "sheet.png", "test")
    assert (tmp_path / "sheet.png").stat().st_size > 1000
