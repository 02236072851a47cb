"""The streaming engine (issue 4, tests 3a-e) on the tiny model trained on real ViZDoom play."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worldgen import WorldModel, sampling
from worldgen.actions import Action, ActionError
from worldgen.models import frames_to_tensor, tensor_to_frames

PLAY = [
    Action.from_keys(["forward"]),
    Action.from_keys(["turn_left"]),
    Action.from_keys([], yaw=8.0),
    Action.from_keys(["strafe_right", "attack"]),
    Action.from_keys(["back"], pitch=-3.0),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores


@pytest.fixture(scope="module")
def wm(tiny_checkpoint) -> WorldModel:
    # float32 sessions: these tests hold them to float32 references (recompute, eval, training)
    return WorldModel.load(tiny_checkpoint, device="cpu", precision="fp32")


def test_loads_with_starts_and_plays(wm):
    assert wm.frame_shape == (24, 32, 3) and wm.num_starts >= 2 and wm.fps == pytest.approx(35 / 4)
    frames, acts = wm.start(0)
    assert frames.dtype == np.uint8 and frames.shape[1:] == wm.frame_shape and len(acts) == len(frames)
    s = wm.session(seed=0)
    out = np.stack([s.step(a) for a in PLAY])
    assert out.shape == (5, 24, 32, 3) and out.dtype == np.uint8 and s.steps == 5
    assert np.array_equal(s.frame, out[-1])
    # Same seed, same actions: the same frames; other actions: other frames.
    s2 = wm.session(frames, acts, seed=3)
    a = np.stack([s2.step(x) for x in PLAY])
    assert np.array_equal(wm.rollout(frames, acts, PLAY, seed=3), a)
    b = wm.rollout(frames, acts, [Action.from_keys(["turn_right"], yaw=20.0)] * 5, seed=3)
    # Same seed and context, as deterministic as the line above shows: any difference is the
    # actions'. The tiny model reacts only weakly (often one uint8 level), so no size is asked.
    assert not np.array_equal(a, b)


def test_bf16_sessions_play_what_float32_sessions_play(tiny_checkpoint):
    """precision="bf16": each step under bf16 autocast, the weights still float32; its frames are
    the float32 session's within rounding. "auto" takes bf16 where the CPU has it natively."""
    from worldgen.models import native_bf16

    played = {}
    for precision in ("fp32", "bf16"):
        wm = WorldModel.load(tiny_checkpoint, device="cpu", precision=precision)
        assert wm.bf16 == (precision == "bf16") and next(wm.dit.parameters()).dtype == torch.float32
        s = wm.session(seed=0)
        played[precision] = np.stack([s.step(a) for a in PLAY[:3]]).astype(int)
    diff = np.abs(played["fp32"] - played["bf16"])
    assert 0 < diff.mean() < 1 and np.percentile(diff, 99) <= 3, (diff.mean(), np.percentile(diff, 99))
    assert WorldModel.load(tiny_checkpoint, device="cpu").bf16 == native_bf16("cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        WorldModel.load(tiny_checkpoint, device="cpu", precision="fp16")


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_streaming_equals_full_recompute_within_window(tiny_checkpoint, guidance):
    """(a): with nothing evicted yet, each streamed frame equals a block-causal recompute over the
    whole history (same sampler noise), within float tolerance. Exact conditioning (ctx_noise 0),
    as the recompute of worldgen.sampling draws fresh context noise at every frame. Also with
    action guidance (the tiny model is trained with action dropout)."""
    wm = WorldModel.load(tiny_checkpoint, device="cpu", ctx_noise=0.0, guidance=guidance, precision="fp32")
    frames, acts = wm.start(1)
    frames, acts = frames[:2], acts[:2]
    s = wm.session(frames, acts, seed=7)
    g = torch.Generator().manual_seed(7)  # the session's noise: one draw per frame (ctx_noise 0)
    with torch.no_grad():
        z = wm.tokenizer.encode(frames_to_tensor(frames))[None]
        a = torch.from_numpy(np.stack([x.vector() for x in acts]))[None]
    room = wm.stream.sinks + wm.stream.window - len(frames)
    assert room >= 3
    for act in (PLAY * 2)[:room]:
        streamed = s.step(act)
        v = torch.from_numpy(act.vector())[None, None]
        with torch.no_grad():
            zn = sampling.generate(wm.dit, z, a, v, wm.stream, g)
            full = tensor_to_frames(wm.tokenizer.decode(zn[:, 0]))[0]
        assert np.abs(full.astype(int) - streamed).max() <= 1
        z, a = torch.cat([z, zn], 1), torch.cat([a, v], 1)


def test_cache_memory_is_flat(wm):
    """(b): the cache is allocated once; frame W+10 and frame W+1000 hold the same bytes."""
    fast = WorldModel.load(wm.checkpoint, device="cpu", steps=1)  # cheaper frames, same cache layout
    s = fast.session(seed=1)
    w = fast.stream.sinks + fast.stream.window

    def state():
        return s.cache_bytes(), s.cache.k.data_ptr(), s.cache.v.data_ptr()

    at_start = state()
    for i in range(w + 1000):
        s.step(PLAY[i % 5])
        if i == w + 10:
            at_10 = state()
    assert at_start == at_10 == state()


def test_long_session_positions_stay_bounded(wm):
    """(c) at reduced scale: 3,000 frames, no error, no NaN, and the positions a step uses stay
    within sinks + window: the cache's state is periodic in time, so no length overflows."""
    fast = WorldModel.load(wm.checkpoint, device="cpu", steps=1)
    s = fast.session(seed=2)
    cap = fast.stream.sinks + fast.stream.window
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(3000):
        f = s.step(PLAY[rng.integers(5)])
        seen.add((tuple(s.cache.positions().tolist()), s.cache.next_position()))
    assert max(p for _, p in seen) == cap and max(max(ps) for ps, _ in seen) == cap - 1
    # After the first `cap` frames, the per-slot position patterns cycle with the window's period.
    assert len(seen) <= cap + fast.stream.window
    assert s.steps == 3000 and f.std() > 0
    with torch.no_grad():
        assert torch.isfinite(s.cache.k).all() and torch.isfinite(s.cache.v).all()


def test_batch_equals_sessions_alone(wm):
    """(d): sessions of different ages stepped together give the frames they give alone."""
    frames, acts = wm.start(0)

    def fresh():
        return [wm.session(frames[:2], acts[:2], seed=11), wm.session(seed=12), wm.session(frames, acts, seed=13)]

    alone = fresh()
    for s in alone[1:]:
        s.step(PLAY[0])  # different ages
    solo = [[s.step(PLAY[(i + j) % 5]) for j in range(wm.stream.window + 3)] for i, s in enumerate(alone)]
    together = fresh()
    for s in together[1:]:
        s.step(PLAY[0])
    batch = [wm.step_many(together, [PLAY[(i + j) % 5] for i in range(3)]) for j in range(wm.stream.window + 3)]
    for i in range(3):
        for j in range(wm.stream.window + 3):
            assert np.abs(batch[j][i].astype(int) - solo[i][j]).max() <= 1


def test_sessions_restarted_together_play_as_restarted_alone(wm):
    """``reset_many``: contexts of two lengths and a stored start, restarted in one call, give the
    frames each gives after its own ``reset``; a bad context names its session and changes none."""
    frames, acts = wm.start(0)
    contexts = [(frames[:2], acts[:2], 21), (None, None, 22), (frames, acts, 23)]

    def played(restart) -> list[np.ndarray]:
        sessions = [wm.session(seed=s) for s in (1, 2, 3)]
        for s in sessions:
            s.step(PLAY[1])  # a session that has played, then starts again
        restart(sessions)
        return [np.stack([s.step(PLAY[(i + j) % 5]) for j in range(4)]) for i, s in enumerate(sessions)]

    alone = played(lambda ss: [s.reset(f, a, seed=seed) for s, (f, a, seed) in zip(ss, contexts)])
    together = played(lambda ss: wm.reset_many(ss, *map(list, zip(*contexts))))
    for a, b in zip(alone, together):
        assert np.abs(a.astype(int) - b).max() <= 1

    sessions = [wm.session(seed=s) for s in (1, 2)]
    before = [s.step(PLAY[0]) for s in sessions]
    bad_actions = [{"keys": ["fly"], "mouse": [0, 0]}] * 2
    with pytest.raises(ActionError, match="session 1"):
        wm.reset_many(sessions, [frames, frames[:2]], [acts, bad_actions], [5, 6])
    with pytest.raises(ValueError, match="one context, action list, seed"):
        wm.reset_many(sessions, [frames], [acts], [5, 6])
    assert all(s.steps == 1 and (s.frame == f).all() for s, f in zip(sessions, before))


def test_rollout_latents_plays_as_a_session(wm):
    """The trainer's batched rollout on latents (engine.rollout_latents) is a session step for
    step: B = 1 with the session's seed gives its frames, past the window too (the ring turns)."""
    from worldgen.engine import rollout_latents

    frames, acts = wm.start(0)
    plan = (PLAY * 2)[: wm.stream.window + 3]
    s = wm.session(frames, acts, seed=5)
    streamed = np.stack([s.step(a) for a in plan])
    keep = wm.stream.sinks + wm.stream.window
    with torch.no_grad():
        z = wm.tokenizer.encode(frames_to_tensor(frames[-keep:]))[None]
        vec = lambda xs: torch.from_numpy(np.stack([x.vector() for x in xs]))[None]
        lat = rollout_latents(wm.dit, wm.stream, z, vec(acts[-keep:]), vec(plan), torch.Generator().manual_seed(5))
        out = tensor_to_frames(wm.tokenizer.decode(lat[0]))
    assert np.abs(out.astype(int) - streamed).max() <= 1
    # A batch plays its timelines together; each row is a timeline of its own noise.
    with torch.no_grad():
        two = rollout_latents(
            wm.dit,
            wm.stream,
            z.repeat(2, 1, 1, 1, 1),
            vec(acts[-keep:]).repeat(2, 1, 1),
            vec(plan).repeat(2, 1, 1),
            torch.Generator().manual_seed(5),
        )
    assert two.shape == (2, *lat.shape[1:]) and torch.isfinite(two).all() and not torch.equal(two[0], two[1])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"keys": ["jump"], "mouse": [0, 0]}, "unknown key"),
        ({"keys": [], "mouse": [float("nan"), 0]}, "finite"),
        ({"keys": [1, 0, 0], "mouse": [0, 0]}, "keys must have shape"),
        ({"keys": [], "mouse": [0, 0, 0]}, "mouse must have shape"),
        ("forward", "must be an Action or a mapping"),
    ],
)
def test_bad_actions_are_clear_errors_and_session_stays_usable(wm, bad, match):
    """(e)"""
    s, twin = wm.session(seed=4), wm.session(seed=4)
    s.step(PLAY[0]), twin.step(PLAY[0])
    with pytest.raises(ActionError, match=match):
        s.step(bad)
    with pytest.raises(ActionError, match="action 1"):
        wm.step_many([twin, s], [PLAY[1], bad])
    assert s.steps == twin.steps == 1
    assert np.array_equal(s.step(PLAY[1]), twin.step(PLAY[1]))  # nothing advanced, nothing drawn


def test_bad_context_and_settings_are_clear_errors(wm, tiny_checkpoint):
    frames, acts = wm.start(0)
    with pytest.raises(ValueError, match="context_frames must be uint8"):
        wm.session(frames.astype(np.float32), acts)
    with pytest.raises(ValueError, match="context frames but"):
        wm.session(frames, acts[:-1])
    with pytest.raises(ValueError, match="exceed"):
        WorldModel.load(tiny_checkpoint, device="cpu", window=40)
    with pytest.raises(TypeError, match="unknown stream settings"):
        WorldModel.load(tiny_checkpoint, device="cpu", windows=4)
    s = wm.session(seed=0)
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.step(PLAY[0])


def test_bench_cli_bad_settings_are_one_line_errors(tiny_checkpoint, capsys):
    from worldgen.cli import main

    assert main(["bench", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--steps", "0"]) == 1
    assert capsys.readouterr().err.strip() == "worldgen bench: steps must lie in [1, 64], got 0"
    assert main(["bench", "--checkpoint", "/no/such/model", "--device", "cpu"]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err


def test_compiled_step_is_one_graph_for_every_level(wm):
    """Issue 26 (4): the noise level enters the model as a tensor, so torch.compile traces a
    session's step once, whatever the number of denoising steps and whichever frame it is, and
    gives the eager frames. (Dynamo's tracing alone, counted by a test backend: no C++ compile.)
    The bench reports the first step's time and the graphs compiled per batch size."""
    from torch._dynamo.testing import CompileCounter

    from worldgen.engine.bench import bench

    eager = WorldModel.load(wm.checkpoint, device="cpu", steps=2)
    compiled = WorldModel.load(wm.checkpoint, device="cpu", steps=2)
    counter = CompileCounter()
    compiled._step = torch.compile(compiled._denoise, backend=counter, dynamic=False)
    a, b = eager.session(seed=4), compiled.session(seed=4)
    for act in (PLAY * 2)[: wm.stream.window + 2]:  # 2 levels a frame; the cache fills and its ring turns
        assert np.array_equal(a.step(act), b.step(act))
    assert counter.frame_count == 1
    rows = bench(compiled, [1], frames=1, warmup=1)  # compiled already: the bench traces nothing new
    # The first step's time is reported (a number, not judged here: it rounds to 0.00 s on a fast CPU).
    assert rows[0]["new_graphs"] == 0 and rows[0]["first_step_s"] >= 0


@pytest.mark.parametrize("model", ["tiny_checkpoint", "cache_model"])
def test_eval_rollouts_are_what_a_session_plays(model, request):
    """`worldgen eval` scores what players see: its rollout of window i (the sampler's cache
    backend, seeded rollout_seed(seed, i)) is the session started on that context with that
    seed, frame for frame, at a stabilising ctx_noise and past the cache's window (the ring
    turns); and a window's frames do not depend on how the windows are batched (same noise, within
    float rounding). A world-cache model's rollout keeps its clouds as sessions do (started from
    the context's RGB-D, poses predicted, every frame's RGB-D fused): the same frames and depth.
    Eval on a CPU computes in float32, as sessions loaded with precision="fp32" do."""
    from worldgen.evaluation.evaluate import _Runner, rollout_seed

    wm = WorldModel.load(request.getfixturevalue(model), device="cpu", ctx_noise=0.1, precision="fp32")  # eval's
    c, plan = wm.stream.window, (PLAY * 3)[: wm.stream.window + 3]
    starts = [wm.start(i) for i in range(2)]
    assert wm.stream.sinks == 0 and all(len(f) >= c for f, _ in starts)
    frames = np.stack([f[-c:] for f, _ in starts])
    geometry, given = None, [{}, {}]
    if wm.world is not None:
        depth, pose = (np.stack([wm.start_geometry(i)[k][-c:] for i in range(2)]) for k in (0, 1))
        frames = np.concatenate([frames, depth[..., None]], -1)  # RGB-D, as eval feeds an RGB-D tokenizer
        geometry = (torch.from_numpy(frames), torch.from_numpy(pose))
        given = [{"context_depth": depth[i], "context_poses": pose[i]} for i in range(2)]
    vec = lambda xs: np.stack([x.vector() for x in xs])
    ctx_acts = torch.from_numpy(np.stack([vec(a[-c:]) for _, a in starts]))
    future = torch.from_numpy(vec(plan))[None].repeat(2, 1, 1)
    sampler = sampling.SamplerConfig(**wm.stream.settings())
    world = None if wm.world is None else wm.world.settings
    run = _Runner(wm.tokenizer, wm.dit, sampler, c, seed=7, batch=2, device=torch.device("cpu"), world=world)
    with torch.no_grad():
        latents, _ = run.encode(torch.from_numpy(frames))
        scored = run.rollout(latents, ctx_acts, future, geometry).numpy()  # (2, n, H, W, 3 or 4)
        run.batch = 1
        alone = run.rollout(latents, ctx_acts, future, geometry).numpy()  # the same noise; float sums may round apart
    assert np.abs(alone.astype(int) - scored).max() <= 1
    for i, (f, a) in enumerate(starts):
        s = wm.session(f[-c:], a[-c:], seed=rollout_seed(7, i), **given[i])
        played = [(s.step(x), s.depth) for x in plan]
        assert np.abs(np.stack([p for p, _ in played]).astype(int) - scored[i, ..., :3]).max() <= 1
        if wm.world is not None:  # the depth the session made (and fused) is the depth eval made
            assert np.abs(np.stack([d for _, d in played]).astype(int) - scored[i, ..., 3]).max() <= 1
        s.close()
