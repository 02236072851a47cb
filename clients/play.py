"""``worldgen play``: play a world model in a pygame window, on this machine's engine or on a
``worldgen serve`` server.

Example:
    worldgen play                                        # default model, local engine
    worldgen play --server ws://127.0.0.1:8765/ws --record out.mp4
    SDL_VIDEODRIVER=dummy worldgen play --frames 50 --record out.mp4   # headless

Keys: W/S or Up/Down walk, A/D strafe, Left/Right turn, Space or Ctrl or left click attack,
E or F use, R reset. Click the window to steer with the mouse; Esc lets go, Esc again quits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import pygame  # noqa: E402  (after the variable that silences its banner)

from worldgen.actions import Action  # noqa: E402

KEYMAP = {
    pygame.K_w: "forward",
    pygame.K_UP: "forward",
    pygame.K_s: "back",
    pygame.K_DOWN: "back",
    pygame.K_a: "strafe_left",
    pygame.K_d: "strafe_right",
    pygame.K_LEFT: "turn_left",
    pygame.K_RIGHT: "turn_right",
    pygame.K_SPACE: "attack",
    pygame.K_LCTRL: "attack",
    pygame.K_RCTRL: "attack",
    pygame.K_e: "use",
    pygame.K_f: "use",
}
HELD_RESEND_S = 0.1  # remote: resend held keys this often, so latency keeps being measured


class Source(Protocol):
    """Where frames come from: :class:`LocalSource` (engine here) or :class:`RemoteSource`."""

    fps: float
    shape: tuple[int, int]  # (H, W)

    def act(self, keys: list[str], yaw: float, pitch: float, changed: bool) -> None: ...
    def poll(self) -> tuple[np.ndarray, dict[str, Any]] | None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class LocalSource:
    """The engine in this process: one session stepped at ``fps`` with the current input."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,
        seed: int | None = None,
        fps: float | None = None,
        steps: int | None = None,
    ):
        from worldgen import WorldModel  # torch only for the local mode

        self.wm = WorldModel.load(checkpoint, device=device, steps=steps)
        self.seed = seed
        self.session = self.wm.session(seed=seed)
        self.fps = float(fps or self.wm.fps)
        self.shape = tuple(self.wm.frame_shape[:2])
        self.keys: list[str] = []
        self.mouse = np.zeros(2, np.float32)
        self.next_step = time.perf_counter()
        self.pending: np.ndarray | None = self.session.frame  # frame 0: the start context's last
        self.frame_id = 0

    def act(self, keys: list[str], yaw: float, pitch: float, changed: bool) -> None:
        self.keys = keys
        self.mouse += (yaw, pitch)  # deltas add up until the next step, as on the server

    def poll(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        if self.pending is not None:
            f, self.pending = self.pending, None
            return f, {"id": 0}
        now = time.perf_counter()
        if now < self.next_step:
            return None
        self.next_step = max(self.next_step + 1 / self.fps, now)
        a = Action.from_keys(self.keys, *np.clip(self.mouse, -180, 180))
        self.mouse[:] = 0
        frame = self.session.step(a)
        ms = (time.perf_counter() - now) * 1000
        self.frame_id += 1
        return frame, {"id": self.frame_id, "latency_ms": ms, "gen_ms": ms}

    def reset(self) -> None:
        self.session.reset(seed=self.seed)
        self.pending = self.session.frame

    def close(self) -> None:
        self.session.close()


class RemoteSource:
    """A ``worldgen serve`` session through :class:`~worldgen.clients.client.BackgroundClient`."""

    def __init__(self, url: str, token: str | None = None, seed: int | None = None):
        from worldgen.clients.client import BackgroundClient

        self.client = BackgroundClient(url, token=token, seed=seed)
        w = self.client.welcome
        self.fps, self.shape, self.seed = float(w["fps"]), (w["height"], w["width"]), seed
        self.last_send = 0.0

    def act(self, keys: list[str], yaw: float, pitch: float, changed: bool) -> None:
        now = time.perf_counter()
        if changed or yaw or pitch or (keys and now - self.last_send >= HELD_RESEND_S):
            self.client.act(keys, yaw, pitch)
            self.last_send = now

    def poll(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        if self.client.closed:
            raise ConnectionError(f"the server closed the session: {self.client.error}")
        f = self.client.latest()
        if f is None:
            return None
        info = {"id": f.id, "latency_ms": f.latency_ms, "gen_ms": f.gen_ms}
        if self.client.stats:
            info.update(dropped=self.client.stats["dropped"], sessions=self.client.stats["sessions"])
        return f.image(), info

    def reset(self) -> None:
        self.client.reset(self.seed)

    def close(self) -> None:
        self.client.close()


@dataclass
class PlayResult:
    frames: int = 0  # frames shown
    ids: list[int] = field(default_factory=list)  # their frame ids (a gap: frames the server dropped)
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    record: str | None = None


def play(
    source: Source,
    frames: int | None = None,
    record: str | None = None,
    scale: int | None = None,
    sensitivity: float = 0.15,
    script: Callable[[int], list[pygame.event.Event]] | None = None,
) -> PlayResult:
    """Run the window until it is closed (or ``frames`` frames were shown).

    ``script(n)`` returns events to post when frame ``n`` is on screen (each ``n`` once): how
    tests and demos press keys without a person. ``record`` writes every frame shown, at the
    model's resolution and fps, to an mp4.
    """
    h, w = source.shape
    scale = scale or max(1, 640 // w)
    pygame.display.init()
    pygame.font.init()
    screen = pygame.display.set_mode((w * scale, h * scale))
    pygame.display.set_caption("worldgen")
    font = pygame.font.Font(None, 20)
    writer = None
    if record:
        import imageio.v2 as imageio

        writer = imageio.get_writer(record, fps=source.fps, codec="libx264", macro_block_size=1)
    held: set[int] = set()
    mouse_attack = captured = False
    yaw = pitch = 0.0
    result, info, shown_at = PlayResult(record=record), {}, []
    scripted = -1
    surface = None
    clock, t0 = pygame.time.Clock(), time.perf_counter()
    try:
        running = True
        while running:
            if script is not None and scripted < result.frames:
                scripted = result.frames
                for e in script(result.frames):
                    pygame.event.post(e)
            before = (frozenset(held), mouse_attack)
            for e in pygame.event.get():
                if e.type == pygame.QUIT:
                    running = False
                elif e.type == pygame.KEYDOWN:
                    if e.key == pygame.K_ESCAPE:
                        running = captured  # Esc lets go of the mouse first, then quits
                        captured = False
                        pygame.mouse.set_relative_mode(False)
                    elif e.key == pygame.K_r:
                        source.reset()
                    elif e.key in KEYMAP:
                        held.add(e.key)
                elif e.type == pygame.KEYUP:
                    held.discard(e.key)
                elif e.type == pygame.MOUSEBUTTONDOWN:
                    if not captured:
                        captured = True
                        pygame.mouse.set_relative_mode(True)
                    elif e.button == 1:
                        mouse_attack = True
                elif e.type == pygame.MOUSEBUTTONUP and e.button == 1:
                    mouse_attack = False
                elif e.type == pygame.MOUSEMOTION and captured:
                    yaw += e.rel[0] * sensitivity  # right = yaw > 0
                    pitch -= e.rel[1] * sensitivity  # up = pitch > 0
                elif e.type == pygame.WINDOWFOCUSLOST:
                    held.clear()
                    mouse_attack = False
            keys = sorted({KEYMAP[k] for k in held} | ({"attack"} if mouse_attack else set()))
            source.act(keys, yaw, pitch, changed=(frozenset(held), mouse_attack) != before)
            yaw = pitch = 0.0
            got = source.poll()
            if got is not None:
                frame, info = got
                if writer is not None:
                    writer.append_data(frame)
                surface = pygame.transform.scale(pygame.surfarray.make_surface(frame.swapaxes(0, 1)), screen.get_size())
                result.frames += 1
                result.ids.append(info["id"])
                shown_at.append(time.perf_counter())
                if info.get("latency_ms") is not None:
                    result.latencies_ms.append(info["latency_ms"])
                if frames is not None and result.frames >= frames:
                    running = False
            if surface is not None:
                screen.blit(surface, (0, 0))
            _overlay(screen, font, shown_at, result.latencies_ms, info, captured)
            pygame.display.flip()
            clock.tick(120)
    finally:
        result.seconds = time.perf_counter() - t0
        if writer is not None:
            writer.close()
        pygame.display.quit()
    return result


def _overlay(
    screen: pygame.Surface,
    font: pygame.font.Font,
    shown_at: list[float],
    latencies: list[float],
    info: dict,
    captured: bool,
) -> None:
    now = time.perf_counter()
    fps = sum(t > now - 1 for t in shown_at[-200:])
    lat = f"{np.mean(latencies[-8:]):.0f} ms" if latencies else "-"
    lines = [f"{fps} fps  latency {lat}  frame {info.get('id', '-')}"]
    if "dropped" in info:
        lines.append(f"dropped {info['dropped']}  {info['sessions']} playing")
    if not captured:
        lines.append("click: steer with mouse  Esc: quit  R: reset")
    for i, text in enumerate(lines):
        img = font.render(text, True, (140, 255, 140))
        shade = pygame.Surface((img.get_width() + 6, img.get_height() + 2), pygame.SRCALPHA)
        shade.fill((0, 0, 0, 140))
        screen.blit(shade, (2, 2 + 16 * i))
        screen.blit(img, (5, 3 + 16 * i))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", default=None, help="ws://host:port/ws of a `worldgen serve` (default: run the model here)"
    )
    p.add_argument("--token", default=None, help="the server's --token")
    p.add_argument(
        "--checkpoint", default="default", help="local mode: checkpoint folder or packaged name (default: default)"
    )
    p.add_argument("--device", default=None, help="local mode: cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--fps", type=float, default=None, help="local mode: frames per second (default: the model's)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="local mode: Euler steps per frame (default: the checkpoint's; more = sharper, slower)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="local mode: torch CPU threads for the model (default: torch's choice); on a small machine "
        "1 or 2 can be faster",
    )
    p.add_argument("--seed", type=int, default=None, help="picks the start context and the sampler noise")
    p.add_argument("--record", default=None, help="write the frames shown to this mp4")
    p.add_argument("--frames", type=int, default=None, help="quit after this many frames (default: play until closed)")
    p.add_argument("--scale", type=int, default=None, help="window pixels per model pixel (default: about 640 wide)")
    p.add_argument("--sensitivity", type=float, default=0.15, help="mouse degrees per pixel (default 0.15)")


def run(args: argparse.Namespace) -> int:
    from websockets.exceptions import WebSocketException

    from worldgen.checkpoint import CheckpointError
    from worldgen.clients.client import ServerError

    if args.threads is not None and not args.server:
        if args.threads < 1:
            print(f"worldgen play: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        source: Source = (
            RemoteSource(args.server, token=args.token, seed=args.seed)
            if args.server
            else LocalSource(args.checkpoint, device=args.device, seed=args.seed, fps=args.fps, steps=args.steps)
        )
    except ServerError as e:
        print(f"worldgen play: {args.server} refused the session: {e}", file=sys.stderr)
        return 1
    except (OSError, WebSocketException) as e:
        print(f"worldgen play: cannot reach {args.server}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as e:  # ValueError: e.g. no start contexts, --steps out of range
        print(f"worldgen play: {e}", file=sys.stderr)
        return 1
    try:
        r = play(source, frames=args.frames, record=args.record, scale=args.scale, sensitivity=args.sensitivity)
    except ConnectionError as e:
        print(f"worldgen play: {e}", file=sys.stderr)
        return 1
    finally:
        source.close()
    lat = f", latency p50 {np.percentile(r.latencies_ms, 50):.0f} ms" if r.latencies_ms else ""
    print(
        f"worldgen play: {r.frames} frames in {r.seconds:.1f} s{lat}" + (f"; recorded {r.record}" if r.record else "")
    )
    return 0
