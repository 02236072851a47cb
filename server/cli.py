"""``worldgen serve``: stream a world model to browsers and other clients over websockets.

Example:
    worldgen serve                                  # default model, http://127.0.0.1:8765/
    WORLDGEN_TOKEN=s3cret worldgen serve --host 0.0.0.0 --max-sessions 32 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from worldgen.server import protocol as P

TOKEN_ENV = "WORLDGEN_TOKEN"


def read_token(flag: str | None, file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token from --token, else --token-file, else $WORLDGEN_TOKEN (None: no token). The
    file and the variable keep it out of the process list, where any local user can read a flag."""
    if flag is not None:
        return flag
    if file is not None:
        try:
            token = Path(file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file {file}: cannot read it: {e.strerror or e}") from None
        if not token:
            raise ValueError(f"--token-file {file}: the file is empty")
        return token
    return environ.get(TOKEN_ENV) or None


def exposure_warning(host: str, token: str | None) -> str | None:
    """What to tell someone who serves beyond this machine with no token: anyone who can reach
    the port can play (and keep the GPU busy)."""
    from worldgen.server.app import is_loopback

    if token is None and not is_loopback(host):
        return (
            f"worldgen serve: warning: listening on {host} without a token: anyone who can reach this port "
            f"can use the server; set one with --token-file FILE or ${TOKEN_ENV}"
        )
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="default", help="checkpoint folder or packaged name (default: default)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--port", type=int, default=P.DEFAULT_PORT, help=f"TCP port, 0 for any free one (default {P.DEFAULT_PORT})"
    )
    p.add_argument(
        "--token",
        default=None,
        help=f"secret every client must send in its hello (default: none). Visible in the process list: "
        f"prefer --token-file or ${TOKEN_ENV}",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help="read the token from this file (its whole content, surrounding whitespace stripped)",
    )
    p.add_argument(
        "--max-sessions", type=int, default=16, help="live sessions at most; more get a busy error (default 16)"
    )
    p.add_argument(
        "--fps", type=float, default=None, help="frames per second per session (default: the model's own rate)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Euler steps per frame (default: the checkpoint's; more = sharper frames over long sessions, slower)",
    )
    p.add_argument(
        "--memory-k",
        type=int,
        default=None,
        help="frames each session recalls from its frame memory per step, 0 = off (default: the "
        "checkpoint's; only models trained with memory)",
    )
    p.add_argument(
        "--memory-cap", type=int, default=None, help="frames a session's memory holds (default: the checkpoint's)"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="close a session that sends nothing for this many seconds (default 300)",
    )
    p.add_argument(
        "--max-message",
        type=int,
        default=P.MAX_MESSAGE_BYTES,
        help=f"largest client message in bytes; larger ones get a too_large error (default {P.MAX_MESSAGE_BYTES})",
    )
    p.add_argument("--jpeg-quality", type=int, default=85, help="JPEG quality of streamed frames, 1-95 (default 85)")
    p.add_argument(
        "--send-buffer",
        type=int,
        default=32 * 1024,
        help="bytes that may wait for one client in the kernel (plus half as much in user space) before "
        "its stale frames are dropped (default 32768)",
    )
    p.add_argument(
        "--send-timeout",
        type=float,
        default=10.0,
        help="close a client (slow_reader) once a send to it has waited this many seconds (default 10)",
    )
    p.add_argument(
        "--hello-timeout",
        type=float,
        default=10.0,
        help="close a websocket that has not sent its hello within this many seconds (default 10)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=32,
        help="websockets waiting for their hello at most; more get HTTP 503 (default 32)",
    )
    p.add_argument(
        "--max-rate",
        type=float,
        default=300.0,
        help="messages per second a client may send; the excess is dropped (default 300)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin besides the server's own that may connect, e.g. https://example.org; "
        "repeatable; '*' allows any page on any site to use this server",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step with CUDA graphs, warmed for every padded batch size before the "
        "port opens (default: on for CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the model (default: torch's choice); on a small machine shared "
        "with its clients 1 can be several times faster",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def run(args: argparse.Namespace) -> int:
    from worldgen import WorldModel  # torch: only once we know we serve
    from worldgen.checkpoint import CheckpointError
    from worldgen.server.app import CompileError, ServeConfig, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    for name, value, low in (
        ("--max-sessions", args.max_sessions, 1),
        ("--max-message", args.max_message, 64),
        ("--send-buffer", args.send_buffer, 1024),
        ("--max-pending", args.max_pending, 1),
        ("--jpeg-quality", args.jpeg_quality, 1),
    ):
        if value < low:
            print(f"worldgen serve: {name} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    for name, value in (
        ("--fps", args.fps),
        ("--idle-timeout", args.idle_timeout),
        ("--send-timeout", args.send_timeout),
        ("--hello-timeout", args.hello_timeout),
        ("--max-rate", args.max_rate),
    ):
        if value is not None and not value > 0:
            print(f"worldgen serve: {name} must be > 0, got {value}", file=sys.stderr)
            return 2
    try:
        token = read_token(args.token, args.token_file, os.environ)
    except ValueError as e:
        print(f"worldgen serve: {e}", file=sys.stderr)
        return 2
    if (warning := exposure_warning(args.host, token)) is not None:
        print(warning, file=sys.stderr, flush=True)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        wm = WorldModel.load(
            args.checkpoint, device=args.device, steps=args.steps, memory_k=args.memory_k, memory_cap=args.memory_cap
        )
    except (CheckpointError, ValueError) as e:  # ValueError: --steps out of range, memory on a model without it
        print(f"worldgen serve: {e}", file=sys.stderr)
        return 1
    if wm.num_starts == 0:  # a session starts from a stored real context; without one there is no game
        print(
            f"worldgen serve: {args.checkpoint} stores no start contexts (real frames a session begins from); "
            "serve a checkpoint exported with them by `worldgen train dynamics`",
            file=sys.stderr,
        )
        return 1
    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        token=token,
        max_sessions=args.max_sessions,
        fps=args.fps,
        max_message=args.max_message,
        idle_timeout=args.idle_timeout,
        jpeg_quality=min(args.jpeg_quality, 95),
        send_buffer=args.send_buffer,
        send_timeout=args.send_timeout,
        hello_timeout=args.hello_timeout,
        max_pending=args.max_pending,
        max_rate=args.max_rate,
        allow_origins=tuple(args.allow_origin),
        compile=wm.device.type == "cuda" if args.compile is None else args.compile,
        compile_fallback=args.compile is None,
    )
    h, w = wm.frame_shape[:2]

    def ready(url: str) -> None:
        print(
            f"worldgen serve: {args.checkpoint} model, {w}x{h} at {cfg.fps or wm.fps:g} fps, "
            f"up to {cfg.max_sessions} sessions{', compiled' if cfg.compile else ''}",
            flush=True,
        )
        print(f"worldgen serve: open {url} (Ctrl-C stops)", flush=True)

    try:
        asyncio.run(serve(wm, cfg, model_name=str(args.checkpoint), on_ready=ready))
    except OSError as e:  # port taken, address not available, ...
        print(f"worldgen serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    except CompileError as e:
        print(f"worldgen serve: {e}", file=sys.stderr)
        return 1
    return 0
