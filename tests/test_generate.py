"""``worldgen generate`` (issue 4, requirement 5): clip plans, the fusion arithmetic on a stub
model whose clips are known exactly, the seam measure, and the command end to end on the tiny
model (trained window 6: context 2, clips of 4, hop 2) and the tiny ViZDoom recording."""

from __future__ import annotations

import doctest
import json
from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import reindexed  # tests/ is on sys.path under pytest

from worldgen.cli import main
from worldgen.data import Dataset
from worldgen.engine import generate as gen
from worldgen.engine.generate import GenerateConfig, GenerateError, generate_latents, seam_measure
from worldgen.sampling import SamplerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores


def test_doctests():
    assert doctest.testmod(gen).failed == 0


# --- the algorithm on a stub ------------------------------------------------------------------


class StubDiT(torch.nn.Module):
    """Predicts the clean latent of every frame being made as ``action[0] + 1000 * (the action[0]
    of the clip's first new frame)``. With frame f's action[0] = f + 10, frame f of the clip
    starting at s comes out as ``raw(s, f) = f + 10 + 1000 (s + 10)`` whatever the noise: each
    clip's result is known. Records each call's noisy input."""

    cfg = SimpleNamespace(frames_per_block=1)

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, a, **_):  # (1, T, C, h, w), (1, T), (1, T, A)
        self.calls.append((x.clone(), t.clone()))
        new = t[0] > 0  # context frames are labelled 0 here
        x0 = a[0, :, 0] + 1000 * a[0, int(new.nonzero()[0]), 0]  # (T,)
        x0 = x0.reshape(1, -1, 1, 1, 1).expand_as(x)
        t = t.reshape(1, -1, 1, 1, 1)
        return torch.where(t > 0, (x - x0) / t.clamp_min(1e-6), torch.zeros_like(x))


def _stub_run(fusion: str, renoise: float, n: int = 8):
    dit = StubDiT()
    ctx = torch.zeros(3, 4, 3, 4)  # 3 context latents
    acts = torch.arange(10.0, n + 10)[:, None].repeat(1, 10)  # frame f's action[0] = f + 10
    cfg = GenerateConfig(fusion=fusion, renoise=renoise, seed=1)
    z, stats = generate_latents(dit, ctx, -torch.ones(3, 10), acts, cfg, SamplerConfig(steps=2), window=6)
    return z[:, 0, 0, 0], stats, dit  # one number per frame


def raw(s: int, f: torch.Tensor) -> torch.Tensor:
    return f + 10 + 1000 * (s + 10)


def test_overlap_fusion_crossfades_the_two_clips():
    """Window 6 -> context 2, clips of 4 starting every 2: clips at 0, 2, 4 for 8 frames. Without
    refinement the overlaps are exactly the cross-fade of the previous clip and the new one."""
    z, stats, _ = _stub_run("overlap", renoise=0.0)
    assert (stats["context"], stats["clip"], stats["hop"], stats["clip_starts"]) == (2, 4, 2, [2, 4])
    f = torch.arange(8.0)
    w = torch.tensor([1 / 3, 2 / 3])  # the new clip's weight across an overlap
    clip = {s: raw(s, f) for s in (0, 2, 4)}  # each clip's own result
    expect = torch.cat(
        [clip[0][:2], (1 - w) * clip[0][2:4] + w * clip[2][2:4], (1 - w) * clip[2][4:6] + w * clip[4][4:6], clip[4][6:]]
    )
    torch.testing.assert_close(z, expect, atol=0.05, rtol=0)
    # The fused frames are neither clip's own.
    assert (z[2:6] - clip[2][2:6]).abs().min() > 100 and (z[2:6] - clip[0][2:6]).abs().min() > 100


def test_overlap_starts_from_previous_clip_and_refines():
    z, _, dit = _stub_run("overlap", renoise=0.3)
    # Clip 1's first pass: its overlap (frames 2, 3) starts from clip 0's result noised to the
    # top level (3% of it left at 0.97: ~300 here), its fresh half from pure noise.
    x, t = dit.calls[2]  # clip 0 took 2 passes
    top = t[0, -1].item()
    overlap, fresh = x[0, 2:4].mean((1, 2, 3)), x[0, 4:].mean((1, 2, 3))
    torch.testing.assert_close(overlap, (1 - top) * raw(0, torch.tensor([2.0, 3.0])), atol=0.6, rtol=0)
    assert fresh.abs().max() < 0.6
    # Then one refinement pass from 0.3 over the whole fused clip (the stub re-predicts the new clip).
    x, t = dit.calls[4]
    assert torch.allclose(t[0, 2:], torch.tensor(0.3)) and len(dit.calls) == 2 + 3 * 2
    torch.testing.assert_close(z[2:4], raw(2, torch.tensor([2.0, 3.0])), atol=0.05, rtol=0)


def test_no_fusion_is_back_to_back_clips():
    z, stats, dit = _stub_run("none", renoise=0.3, n=7)
    assert stats["clip"] == 2 and stats["clip_starts"] == [2, 4, 6] and len(dit.calls) == 4 * 2
    f = torch.arange(7.0)
    torch.testing.assert_close(z, raw(f // 2 * 2, f), atol=0.05, rtol=0)


def test_plan_defaults_and_errors():
    assert GenerateConfig().plan(16, 1) == (6, 10, 5)
    assert GenerateConfig().plan(6, 1) == (2, 4, 2)
    assert GenerateConfig(clip=8).plan(16, 2) == (8, 8, 4)
    for cfg, msg in [
        (GenerateConfig(clip=5), "multiple of 2"),
        (GenerateConfig(context=4, clip=4), "exceed"),
        (GenerateConfig(fusion="blend"), "fusion must be"),
        (GenerateConfig(renoise=1.0), "renoise"),
        (GenerateConfig(context=0), "context must"),
    ]:
        with pytest.raises(GenerateError, match=msg):
            cfg.plan(6, 1)


# --- the seam measure ---------------------------------------------------------------------------


def test_seam_measure_on_synthetic_video():
    rng = np.random.default_rng(0)
    # Clips of 4 frames drifting by 2 grey levels a frame, each clip 30 levels above the last.
    f = np.array([30 * (i // 4) + 2 * (i % 4) for i in range(12)])
    video = np.broadcast_to(f[:, None, None, None], (12, 5, 6, 3)).astype(np.uint8)
    s = seam_measure(video, [4, 8])
    assert s["boundary"] == pytest.approx(24.0) and s["inside"] == pytest.approx(2.0) and s["ratio"] == 12.0
    assert (s["boundary_pairs"], s["inside_pairs"]) == (2, 9)
    # Seamless motion: about 1 whatever the boundaries.
    ramp = np.clip(np.arange(12)[:, None, None, None] * 5 + rng.integers(0, 3, (12, 5, 6, 3)), 0, 255)
    assert 0.7 < seam_measure(ramp.astype(np.uint8), [4, 8])["ratio"] < 1.4
    assert seam_measure(np.zeros((3, 2, 2, 3), np.uint8), [1])["ratio"] is None  # nothing moves
    with pytest.raises(ValueError, match="outside"):
        seam_measure(video, [0])
    with pytest.raises(ValueError, match="uint8"):
        seam_measure(video.astype(np.float32), [4])


# --- the command ------------------------------------------------------------------------------


def _frames(path) -> np.ndarray:
    return np.stack(imageio.mimread(path))


def test_cli_both_fusions_write_n_frames(tiny_checkpoint, doom_recording, tmp_path, capsys):
    out, js = tmp_path / "v.mp4", tmp_path / "v.json"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(tiny_checkpoint),
            "--context",
            str(doom_recording),
            "--episode",
            "1",
            "--start",
            "3",
            "--actions",
            "dataset",
            "--frames",
            "12",
            "--out",
            str(out),
            "--json",
            str(js),
            "--device",
            "cpu",
            "--compare",
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "overlap" in table and "none" in table and "real" in table
    r = json.loads(js.read_text())
    assert r["frames"] == 12 and r["config"]["fusion"] == "overlap" and r["sampler"]["steps"] >= 1
    for mode, path in (("overlap", out), ("none", tmp_path / "v_none.mp4")):
        run = r["runs"][mode]
        assert run["video"] == str(path) and _frames(path).shape == (12, 24, 32, 3)
        assert run["seam"]["ratio"] > 0 and run["psnr"] > 5 and run["seconds"] > 0
    assert r["runs"]["overlap"]["clip_starts"] == [2, 4, 6, 8] and r["runs"]["none"]["clip_starts"] == [2, 4, 6, 8, 10]
    assert r["runs"]["overlap"]["dit_frame_passes_per_frame"] > r["runs"]["none"]["dit_frame_passes_per_frame"]
    assert r["real"]["ratio"] > 0


def test_cli_episode_by_id_is_the_same_episode_in_any_index_order(tiny_checkpoint, doom_recording, tmp_path):
    ds = Dataset(doom_recording)
    runs = []
    for rec, ref in ((doom_recording, "1"), (reindexed(doom_recording, tmp_path), ds.episodes[1].id)):
        js = tmp_path / f"{len(runs)}.json"
        assert (
            main(
                [
                    "generate",
                    "--checkpoint",
                    str(tiny_checkpoint),
                    "--context",
                    str(rec),
                    "--episode",
                    ref,
                    "--actions",
                    "dataset",
                    "--frames",
                    "6",
                    "--fusion",
                    "none",
                    "--out",
                    str(tmp_path / "v.mp4"),
                    "--json",
                    str(js),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        runs.append(json.loads(js.read_text()))
    assert runs[0]["episode"] == runs[1]["episode"] == ds.episodes[1].id
    assert runs[0]["runs"]["none"]["psnr"] == runs[1]["runs"]["none"]["psnr"]


def _context_npz(recording, path, frames=4, size=None):
    ds = Dataset(recording)
    f = ds.read(0, "frames", 0, frames)
    if size:
        f = np.zeros((frames, *size, 3), np.uint8)
    np.savez(path, frames=f, keys=ds.read(0, "keys", 0, frames), mouse=ds.read(0, "mouse", 0, frames))
    return path


def test_cli_npz_context_and_action_files(tiny_checkpoint, doom_recording, tmp_path):
    ctx = _context_npz(doom_recording, tmp_path / "ctx.npz")
    lines = [{"keys": ["forward"], "mouse": [0, 0]}, {"keys": ["turn_left"], "mouse": [-5, 0]}] * 3
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(a) for a in lines) + "\n")
    (tmp_path / "a.json").write_text(json.dumps({"map": "E1M1", "actions": lines[:5]}))
    np.savez(tmp_path / "a.npz", keys=np.eye(8, dtype=np.uint8)[:7], mouse=np.zeros((7, 2), np.float32))
    for name, n in (("a.jsonl", 6), ("a.json", 5), ("a.npz", 7)):
        out = tmp_path / f"{name}.mp4"
        rc = main(
            [
                "generate",
                "--checkpoint",
                str(tiny_checkpoint),
                "--context",
                str(ctx),
                "--actions",
                str(tmp_path / name),
                "--out",
                str(out),
                "--fusion",
                "none",
                "--device",
                "cpu",
            ]
        )
        assert rc == 0 and len(_frames(out)) == n


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no dataset index"),
        ("short", "2 context frames; clips are conditioned on 3"),
        ("bad_line", "line 3: unknown key 'jump'"),
        ("bad_index", "action 1: mouse"),
        ("zero", "--frames must be at least 1"),
        ("too_many", "6 actions given; 9 frames asked for"),
        ("resolution", "context frames are 20x16; the model takes 32x24"),
        ("past_episode", "do not fit"),
        ("bad_episode", "no episode 'nope' (it has a, b, c)"),
        ("steps", "steps must lie in [1, 64], got 0"),
    ],
)
def test_cli_bad_inputs_name_the_problem(tiny_checkpoint, doom_recording, tmp_path, capsys, case, message):
    acts = tmp_path / "a.jsonl"
    rows = [{"keys": ["forward"], "mouse": [0, 0]}] * 6
    if case == "bad_line":
        rows[2] = {"keys": ["jump"]}
    acts.write_text("\n".join(json.dumps(a) for a in rows))
    if case == "bad_index":
        acts = tmp_path / "a.json"
        acts.write_text(json.dumps([{"keys": []}, {"keys": [], "mouse": [0, 999]}]))
    ctx = str(
        _context_npz(
            doom_recording,
            tmp_path / "ctx.npz",
            2 if case == "short" else 4,
            (16, 20) if case == "resolution" else None,
        )
    )
    extra = {
        "missing": ["--context", str(tmp_path / "nowhere")],
        "zero": ["--frames", "0"],
        "too_many": ["--frames", "9"],
        "short": ["--context-frames", "3"],
        "past_episode": ["--context", str(doom_recording), "--start", "39", "--actions", "dataset"],
        "bad_episode": ["--context", str(doom_recording), "--episode", "nope", "--actions", "dataset"],
        "steps": ["--steps", "0"],
    }
    args = [
        "generate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--context",
        ctx,
        "--actions",
        str(acts),
        "--out",
        str(tmp_path / "v.mp4"),
        "--device",
        "cpu",
        *extra.get(case, []),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldgen generate: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_cli_rejects_unknown_fusion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--context", "c.npz", "--actions", "a.json", "--out", "v.mp4", "--fusion", "blend"])
    assert e.value.code == 2 and "invalid choice: 'blend'" in capsys.readouterr().err
