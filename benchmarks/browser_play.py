"""What a player sees: a model played in the real browser client for 30 seconds of scripted input,
beside the game playing the same input (issue 24, requirement 4).

1. A start context: the model's number of real context frames of episode ``--episode`` of a
   recording (made by ``worldgen record``, so the game can replay it), ending at frame ``--at``.
   By default, of 16 starts spread over the recording, the one from which the script, played in
   the game, walks farthest without the player dying: a start in the open, away from monsters.
   The checkpoint is copied with that context as its only start.
2. ``worldgen serve`` serves the copy; headless Chromium (Playwright, Debian's ``chromium``) opens
   the browser client with ``?record=1`` and presses the keys of :data:`SCRIPT` (walk, turn both
   ways, look back, strafe, stand still), held for the script's seconds at the model's frame rate,
   one frame at a time, as a player's hands would. The page keeps every frame it received (the
   JPEG it drew) and every action it sent.
3. Which action made each frame is read off the protocol: a frame echoes the ``t`` of the newest
   action the server applied to it (docs/protocol.md), so frame ``k`` was made with the keys of
   that action and the mouse deltas sent since the previous frame's.
4. The game replays the episode to frame ``--at`` and plays those per-frame actions
   (``worldgen.env.sources.record.branch``): the frames a player would have seen in ViZDoom.

Writes the contact sheet (``--out``: browser row above game row, every 2 seconds) and ``--json``
(per-segment PSNR of the browser's frames against the game's, and of the start frame held).

Example (what a CPU player of the README's first command sees):
    worldgen record --env doom --out data/val --steps 4000 --workers 2 --seed 7
    python benchmarks/browser_play.py --checkpoint default --data data/val --device cpu \\
        --out benchmarks/browser_play_default.png --json browser_play.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image

from worldgen import checkpoint
from worldgen.actions import Action
from worldgen.clients.client import HEADLESS_CHROMIUM_ARGS, LocalServer
from worldgen.data import Dataset
from worldgen.data.loader import WindowDataset
from worldgen.engine.world_model import WorldModel, save_starts
from worldgen.env.gym.starts import resize_frames
from worldgen.env.sources.doom import DoomEnv
from worldgen.env.sources.record import branch, load_replay
from worldgen.evaluation.metrics import psnr
from worldgen.evaluation.stability import session_fields


@dataclass(frozen=True)
class Segment:
    label: str
    keys: tuple[str, ...]
    seconds: float


# 30 seconds. Turn keys turn about 14 degrees a frame once held (env/sources/doom.py), so at the
# default's 8.75 frames/s one second of turning is about 110 degrees and 1.5 s about 180.
SCRIPT = (
    Segment("walk", ("forward",), 5.0),
    Segment("turn right", ("turn_right",), 1.0),
    Segment("walk", ("forward",), 4.0),
    Segment("turn left", ("turn_left",), 2.0),
    Segment("walk", ("forward",), 4.0),
    Segment("look back", ("turn_left",), 1.5),
    Segment("walk back", ("forward",), 4.0),
    Segment("strafe left", ("strafe_left",), 2.0),
    Segment("strafe right", ("strafe_right",), 2.0),
    Segment("stand still", (), 4.5),
)

# The browser client's key for each action key (clients/web/client.js, KEYMAP).
KEY_CODE = {
    "forward": "KeyW",
    "back": "KeyS",
    "strafe_left": "KeyA",
    "strafe_right": "KeyD",
    "turn_left": "ArrowLeft",
    "turn_right": "ArrowRight",
    "attack": "Space",
    "use": "KeyE",
}


class BrowserPlayError(RuntimeError):
    pass


def frames_per_segment(script: tuple[Segment, ...], fps: float) -> list[int]:
    return [max(1, round(s.seconds * fps)) for s in script]


def script_actions(script: tuple[Segment, ...], fps: float) -> tuple[np.ndarray, np.ndarray]:
    """The script's keys (K, 8) and mouse (K, 2), one row a frame at ``fps``."""
    acts = [Action.from_keys(s.keys) for s, k in zip(script, frames_per_segment(script, fps)) for _ in range(k)]
    return np.stack([a.keys for a in acts]), np.stack([a.mouse for a in acts])


def pick_start(ds: Dataset, context: int, keys: np.ndarray, mouse: np.ndarray, candidates: int = 16) -> tuple[int, int]:
    """(episode, last context frame) where the script, played in the game, walks farthest and the
    player lives to its end: ``candidates`` windows spread over the recording, each replayed and
    scripted in ViZDoom (a start facing a wall walks nowhere; one next to a monster dies)."""
    ends = [(e, at) for e, ep in enumerate(ds.episodes) for at in range(context - 1, ep.length, context)]
    best, where, env = -1.0, None, None
    try:
        for i in np.linspace(0, len(ends) - 1, min(candidates, len(ends))).round().astype(int):
            e, at = ends[i]
            spec = load_replay(f"{ds.root}::{ds.episodes[e].id}")
            env = env or DoomEnv(spec.config, spec.map)
            obs = env.reset(spec.map, spec.seed)
            for t in range(at):
                obs = env.step(spec.keys[t], spec.mouse[t])
            walked, xy = 0.0, obs.pose[:2]
            for k, m in zip(keys, mouse):
                obs = env.step(k, m)
                if obs is None:  # died or left the map
                    walked = -1.0
                    break
                walked, xy = walked + float(np.hypot(*(obs.pose[:2] - xy))), obs.pose[:2]
            if walked > best:
                best, where = walked, (e, at)
    finally:
        if env is not None:
            env.close()
    if best < 0:
        raise BrowserPlayError(f"the script kills the player from every start tried in {ds.root}: give --episode")
    return where


def start_context(
    ds: Dataset, episode: int, at: int, context: int, size: tuple[int, int], fields: tuple[str, ...] = ()
) -> dict:
    """The ``context`` frames of ``episode`` ending at frame ``at``, at the model's ``size`` (h, w),
    with the actions that produced them and the recorded ``fields`` the model's sessions start from
    (:func:`~worldgen.evaluation.stability.session_fields`: depth and poses for a world-cache model)."""
    if not context - 1 <= at < ds.episodes[episode].length:
        raise BrowserPlayError(
            f"--at must be in [{context - 1}, {ds.episodes[episode].length}) for {context} context frames "
            f"of episode {ds.episodes[episode].id}, got {at}"
        )
    item = WindowDataset(ds, context, episodes=[episode], fields=fields, verify=False)[at - context + 1]
    if item["frames"].shape[1:3] != size:
        if fields:
            raise BrowserPlayError(
                f"the recording's frames are {item['frames'].shape[2]}x{item['frames'].shape[1]}, the model's "
                f"{size[1]}x{size[0]}: a world-cache model needs a recording at its own size (depth and camera)"
            )
        item["frames"] = resize_frames(item["frames"], size)
    return item


def serving_copy(model: str, item: dict, source: dict, into: Path) -> Path:
    """The checkpoint copied to ``into`` with the one start context ``item``."""
    folder = into / "model"
    shutil.copytree(checkpoint.resolve(model), folder)
    geometry = {"depth": item["depth"][None], "pose": item["pose"][None]} if "pose" in item else {}
    save_starts(folder, item["frames"][None], item["keys"][None], item["mouse"][None], source, **geometry)
    return folder


def play_script(page: Any, url: str, script: tuple[Segment, ...], timeout_s: float = 120.0) -> dict:
    """Open the browser client at ``url`` (seed 0, recording on), hold each segment's keys for its share of
    frames at the model's rate, one frame at a time; returns the page's record (frames, actions)."""
    parts = urlsplit(url)
    page.goto(urlunsplit(parts._replace(query="&".join(q for q in (parts.query, "seed=0", "record=1") if q))))
    page.wait_for_function("worldgen.welcome && worldgen.lastId >= 0", timeout=timeout_s * 1000)
    fps = page.evaluate("worldgen.welcome.fps")
    # The world runs in real time: frames made before the first key are part of the session too.
    first = n = page.evaluate("worldgen.lastId")
    held, t0 = set(), time.perf_counter()
    for seg, frames in zip(script, frames_per_segment(script, fps)):
        for _ in range(frames):
            want = set(seg.keys)
            for k in sorted(held - want):
                page.keyboard.up(KEY_CODE[k])
            for k in sorted(want - held):
                page.keyboard.down(KEY_CODE[k])
            held, n = want, n + 1
            # One round trip a frame (a page slower than the server holds keys for extra frames);
            # an error ends the wait at once and is read at the segment's end.
            page.wait_for_function(f"worldgen.error || worldgen.lastId >= {n}", timeout=timeout_s * 1000)
        if err := page.evaluate("worldgen.error"):
            raise BrowserPlayError(f"the browser client shows an error: {err}")
    for k in sorted(held):
        page.keyboard.up(KEY_CODE[k])
    seconds = time.perf_counter() - t0
    record = page.evaluate("worldgen.record")
    return {"fps": fps, "script_from": first, "seconds": seconds, "frames_played": n - first, **record}


def frame_actions(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """From the page's record: the session's last start frame and the K frames generated after it
    (K + 1, H, W, 3), the keys (K, 8) and mouse (K, 2) that made each generated frame, and their
    ids. A frame's ``t`` names the newest action the server applied to it; its mouse is the sum of
    the deltas sent after the previous frame's action up to that one (docs/protocol.md)."""
    frames = record["frames"]
    starts = [i for i, f in enumerate(frames) if f["reset"]]
    if not starts:
        raise BrowserPlayError("the page received no start frame")
    made = frames[starts[-1] + 1 :]
    ids = [f["id"] for f in made]
    if ids != list(range(frames[starts[-1]]["id"] + 1, frames[starts[-1]]["id"] + 1 + len(made))):
        raise BrowserPlayError(f"frames were dropped on the way (ids {ids[:3]}...{ids[-3:]}): play with a lower --fps")
    order = [a["t"] for a in record["actions"]]
    index = {t: i for i, t in enumerate(order)}
    keys, mouse, current, last = [], [], Action.noop(), -1
    for f in made:
        m = np.zeros(2, np.float32)
        if f["t"] is not None:
            if f["t"] not in index:
                raise BrowserPlayError(f"frame {f['id']} echoes t={f['t']}, which the page never sent")
            i = index[f["t"]]
            m = np.sum([record["actions"][j]["mouse"] for j in range(last + 1, i + 1)], axis=0, dtype=np.float32)
            current, last = Action.from_keys(record["actions"][i]["keys"]), i
        keys.append(current.keys)
        mouse.append(np.clip(m, -180, 180))
    shown = frames[starts[-1] :]
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(f["jpeg"]))).convert("RGB")) for f in shown]
    return np.stack(images), np.stack(keys), np.stack(mouse), ids


def segment_bounds(counts: list[int], lead: int, total: int) -> list[tuple[int, int]]:
    """[a, b) frame ranges of the script's segments among ``total`` frames of which the first
    ``lead`` came before the script began."""
    ends = lead + np.cumsum(counts)
    return [(min(int(e - k), total), min(int(e), total)) for e, k in zip(ends, counts)]


def against_game(
    record: dict, data: str | Path, episode_id: str, at: int, start: np.ndarray, script: tuple[Segment, ...]
) -> dict[str, Any]:
    """The browser's frames beside the game's: which action made each frame (:func:`frame_actions`),
    the game replaying episode ``episode_id`` of ``data`` to frame ``at`` and playing those actions,
    each segment's frames and scores. ``start``: the last context frame at the model's size; both
    ``shown`` and ``game`` begin with it."""
    shown, keys, mouse, ids = frame_actions(record)
    game, _, matched = branch(f"{data}::{episode_id}", at, keys, mouse)
    game = np.concatenate([start[None], resize_frames(game, start.shape[:2])])
    lead = ids.index(record["script_from"]) + 1 if record["script_from"] in ids else 0
    bounds = segment_bounds(frames_per_segment(script, record["fps"]), lead, len(ids))
    scores = segment_scores(script, shown[1:], game[1:], start, bounds)
    return {
        "shown": shown,
        "game": game,
        "keys": keys,
        "mouse": mouse,
        "ids": ids,
        "lead": lead,
        "bounds": bounds,
        "scores": scores,
        "matched": matched,
    }


def segment_scores(
    script: tuple[Segment, ...], model: np.ndarray, game: np.ndarray, held: np.ndarray, bounds: list[tuple[int, int]]
) -> list[dict]:
    """PSNR of the browser's frames and of the start frame held against the game's, per segment."""
    p_model = psnr(model, game).numpy()
    p_held = psnr(np.repeat(held[None], len(game), 0), game).numpy()
    out = []
    for seg, (a, b) in zip(script, bounds):
        out.append(
            {
                "segment": seg.label,
                "frames": [a, b],
                "model_db": float(p_model[a:b].mean()),
                "held_db": float(p_held[a:b].mean()),
            }
        )
    return out


def contact_sheet(
    script: tuple[Segment, ...],
    model: np.ndarray,
    game: np.ndarray,
    bounds: list[tuple[int, int]],
    fps: float,
    path: Path,
    title: str,
    every_s: float = 2.0,
) -> None:
    """Browser row above game row, a column every ``every_s`` seconds of the script from its start
    (0 s), in bands of 4. ``model`` and ``game`` hold the start frame, then the generated frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lead, end = bounds[0][0], bounds[-1][1]  # in generated frames; frame i is row i + 1 here
    label = {i + 1: s.label for s, (a, b) in zip(script, bounds) for i in range(a, b)}
    cols = [lead + round(t * fps) for t in np.arange(0, (end - lead) / fps + 1e-6, every_s)]
    per_band = 4
    bands = -(-len(cols) // per_band)
    fig, axes = plt.subplots(2 * bands, per_band, figsize=(2.2 * per_band, 1.9 * 2 * bands), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, c in enumerate(cols):
        r, k = 2 * (j // per_band), j % per_band
        db = float(psnr(model[c], game[c]))
        what = label.get(c, "start")
        axes[r, k].imshow(model[c])
        axes[r, k].set_title(f"{(c - lead) / fps:.1f} s · {what}\nbrowser · {db:.1f} dB", fontsize=7)
        axes[r + 1, k].imshow(game[c])
        axes[r + 1, k].set_title("game", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    plt.close(fig)
    # 256 colours: a quarter of the bytes, and the frames themselves are JPEGs of few colours.
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--data", required=True, help="a recording made by `worldgen record` (validation play)")
    p.add_argument("--episode", help="episode id (default: the start that sees farthest)")
    p.add_argument("--at", type=int, help="the last context frame in the episode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--out", required=True, help="contact sheet PNG")
    p.add_argument("--json")
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    ds = Dataset(args.data)
    wm = WorldModel.load(args.checkpoint, device="cpu")
    ctx_frames, _ = wm.start(0)
    context, size, fields, fps = ctx_frames.shape[0], ctx_frames.shape[1:3], session_fields(wm), wm.fps
    del wm
    if args.episode is None:
        episode, at = pick_start(ds, context, *script_actions(SCRIPT, fps))
        at = at if args.at is None else args.at
    else:
        ids = [e.id for e in ds.episodes]
        if args.episode not in ids:
            raise BrowserPlayError(f"{args.data} has no episode {args.episode!r}")
        episode, at = ids.index(args.episode), context - 1 if args.at is None else args.at
    eid = ds.episodes[episode].id
    item = start_context(ds, episode, at, context, size, fields)

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = {"data": str(ds.root), "windows": [[eid, at - context + 1]]}
        model = serving_copy(args.checkpoint, item, source, Path(tmp))
        server = LocalServer(model, "--device", args.device, "--threads", str(args.threads))
        with server as srv, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=list(HEADLESS_CHROMIUM_ARGS))
            page = browser.new_page(viewport={"width": 900, "height": 700})
            record = play_script(page, srv.url, SCRIPT)
            browser.close()
    wall = time.perf_counter() - t0
    r = against_game(record, args.data, eid, at, item["frames"][-1], SCRIPT)
    ids, scores = r["ids"], r["scores"]
    title = (
        f"{args.checkpoint} in the browser client ({args.device}), above; the game, below; "
        f"{Path(args.data).name} episode {eid} from frame {at}"
    )
    contact_sheet(SCRIPT, r["shown"], r["game"], r["bounds"], record["fps"], Path(args.out), title)

    result = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "episode": eid,
        "at": at,
        "device": args.device,
        "script": [asdict(s) for s in SCRIPT],
        "model_fps": record["fps"],
        "frames": len(ids),
        "frames_before_the_script": r["lead"],
        "script_seconds": record["seconds"],
        "frames_per_second_received": record["frames_played"] / record["seconds"],
        "replay_matched": r["matched"],
        "segments": scores,
        "mean_model_db": float(np.mean([s["model_db"] for s in scores])),
        "mean_held_db": float(np.mean([s["held_db"] for s in scores])),
    }
    print("| segment | frames | browser vs game dB | start frame held vs game dB |\n|---|---|---:|---:|")
    for s in scores:
        print(f"| {s['segment']} | {s['frames'][0]}-{s['frames'][1]} | {s['model_db']:.2f} | {s['held_db']:.2f} |")
    print(
        f"{len(ids)} frames; the script took {record['seconds']:.0f} s ({wall:.0f} s in all); "
        f"the replay matched the recording: {r['matched']}; sheet {args.out}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
