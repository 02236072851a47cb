"""Tokenizer, block-causal DiT and sampler on CPU with tiny configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.flop_counter import FlopCounterMode

from worldgen import actions, checkpoint, sampling
from worldgen.checkpoint import CheckpointError
from worldgen.models import (
    MODELS,
    DiT,
    DiTConfig,
    Tokenizer,
    TokenizerConfig,
    attention,
    flops_per_frame,
    frames_to_tensor,
    load_dit,
    load_tokenizer,
    save_part,
    tensor_to_frames,
)
from worldgen.models.attention import dense_mask
from worldgen.models.dit import Context, Memory
from worldgen.sampling import SamplerConfig, add_noise, generate, predict_next, rollout, shifted_timesteps

# Small latents keep each forward to milliseconds; head dim 16 still splits three ways for RoPE.
SMALL = DiTConfig(latent_channels=4, latent_size=(3, 4), dim=32, depth=2, heads=2, max_frames=16)
SMALL_TOK = TokenizerConfig(channels=(8, 8, 16, 16), enc_blocks=1, dec_blocks=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomized(cfg: DiTConfig) -> DiT:
    """A DiT whose zero-initialised modulations and output layer are random too: at init the
    output is identically 0 and no dependence test could fail."""
    dit = DiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    return dit


def inputs(cfg: DiTConfig, b: int = 2, t: int = 5):
    return (
        torch.randn(b, t, cfg.latent_channels, *cfg.latent_size),
        torch.rand(b, t),
        torch.randn(b, t, cfg.action_dim),
    )


def changed(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per frame of (B, T, ...) outputs: did anything change?"""
    return [bool((a[:, f] - b[:, f]).abs().max() > 1e-4) for f in range(a.shape[1])]


# --- registry, shapes, FLOPs -------------------------------------------------------------


def test_registry_sizes_fit_budget():
    n = {k: sum(p.numel() for p in DiT(c).parameters()) for k, c in MODELS.items() if k != "B"}
    tok = sum(p.numel() for p in Tokenizer(TokenizerConfig()).parameters())
    assert 1e5 < n["tiny"] < 1e6
    assert 8e6 < n["S"] + tok <= 16 * 2**20  # tokenizer + S weights within 32 MiB in bf16
    assert 2e6 <= tok <= 4e6


def test_forward_shapes_and_tiny_registry_model():
    cfg = MODELS["tiny"]
    x, t, a = inputs(cfg, b=1, t=2)
    with torch.no_grad():
        v = DiT(cfg)(x, t, a)
    assert v.shape == x.shape
    assert (v == 0).all()  # adaLN-zero: the untrained model is exactly v = 0


def test_forward_rejects_bad_shapes():
    dit = DiT(SMALL)
    x, t, a = inputs(SMALL)
    with pytest.raises(ValueError, match="t must be"):
        dit(x, t[:, 0], a)
    with pytest.raises(ValueError, match="actions must be"):
        dit(x, t, a[..., :8])
    with pytest.raises(ValueError, match="x must be"):
        dit(x[:, :, :2], t, a)
    with pytest.raises(ValueError, match="max_frames"):
        dit(*inputs(SMALL, 1, 17))
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(patch_size=0)


def test_flops_match_counter_plus_visible_attention():
    cfg = dataclasses.replace(SMALL, frames_per_block=2)
    dit, frames = DiT(cfg), 5
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(*inputs(cfg, 1, frames))  # the counter sees the linear layers, not CPU SDPA
    visible = dense_mask(cfg.tokens_per_frame, frames, cfg.frames_per_block).sum().item()
    attention = cfg.depth * 4 * cfg.dim * visible
    assert flops_per_frame(cfg, frames) * frames == pytest.approx(counter.get_total_flops() + attention, rel=1e-6)


# --- (a) causality -----------------------------------------------------------------------


@pytest.mark.parametrize("what", ["latent", "noise_level", "action"])
def test_causality_frame_j_never_changes_earlier_frames(what):
    dit, j = randomized(SMALL), 2
    x, t, a = inputs(SMALL)
    x2, t2, a2 = x.clone(), t.clone(), a.clone()
    {"latent": x2, "noise_level": t2, "action": a2}[what][:, j] += 0.5
    with torch.no_grad():
        v, v2 = dit(x, t, a), dit(x2, t2, a2)
    assert torch.equal(v[:, :j], v2[:, :j])
    assert changed(v, v2)[j:] == [True] * (5 - j)


def test_causality_with_chunks_is_per_block():
    cfg = dataclasses.replace(SMALL, frames_per_block=2)  # blocks {0,1} {2,3} {4}
    dit = randomized(cfg)
    x, t, a = inputs(cfg)
    x2 = x.clone()
    x2[:, 3] += 0.5
    with torch.no_grad():
        v, v2 = dit(x, t, a), dit(x2, t, a)
    assert changed(v, v2) == [False, False, True, True, True]  # frame 2 sees 3: same block


def test_mask_matches_definition():
    n, frames, fpb, prefix = 2, 5, 2, 1
    m = dense_mask(n, frames, fpb, prefix)
    for q in range(m.shape[0]):
        for k in range(m.shape[1]):
            fq, fk = q // n, k // n
            want = fk < prefix or (fq >= prefix and (fk - prefix) // fpb <= (fq - prefix) // fpb)
            assert bool(m[q, k]) == want, (q, k)


# --- (b) per-frame noise levels; clean context ---------------------------------------------


def test_noise_levels_are_per_frame_and_per_batch_element():
    dit = randomized(SMALL)
    x, t, a = inputs(SMALL)
    with torch.no_grad():
        v = dit(x, t, a)
        t2 = t.clone()
        t2[1, 3] = 1.0 - t2[1, 3]  # only sample 1, frame 3
        v2 = dit(x, t2, a)
        v_one = dit(x[:1], t[:1], a[:1])
    assert changed(v[1:], v2[1:]) == [False, False, False, True, True]
    assert torch.equal(v[:1], v2[:1])
    torch.testing.assert_close(v[:1], v_one, atol=1e-5, rtol=1e-5)


def test_clean_context_frame_conditions_later_frames():
    dit = randomized(SMALL)
    x, _, a = inputs(SMALL, t=3)
    t = torch.tensor([[0.0, 0.0, 0.8]] * 2)  # two clean context frames, then one to denoise
    with torch.no_grad():
        v = dit(x, t, a)
        x2 = x.clone()
        x2[:, 0] = torch.randn_like(x2[:, 0])  # other clean content in context frame 0
        v_content = dit(x2, t, a)
        v_label = dit(x, torch.tensor([[0.5, 0.0, 0.8]] * 2), a)  # same content, labelled noisy
    assert changed(v, v_content) == [True, True, True]
    assert changed(v, v_label) == [True, True, True]  # the level is a real input, not ignored


def test_sampler_labels_context_with_ctx_noise():
    seen = []

    class Spy(torch.nn.Module):
        cfg = SMALL

        def forward(self, x, t, a, **_):
            seen.append(t.clone())
            return torch.zeros_like(x)

    ctx = torch.randn(2, 3, 4, 3, 4)
    predict_next(Spy(), ctx, torch.zeros(2, 3, 10), torch.zeros(2, 10), SamplerConfig(steps=2, ctx_noise=0.1))
    assert [s.shape for s in seen] == [(2, 4)] * 2
    t_max = sampling.T_MAX
    assert torch.allclose(seen[0][:, :3], torch.tensor(0.1)) and torch.allclose(seen[0][:, 3], torch.tensor(t_max))
    assert torch.allclose(seen[1][:, 3], torch.tensor(t_max / 2))


# --- (c) FlexAttention block mask == dense masked SDPA -------------------------------------


@pytest.mark.parametrize("fpb,memory", [(1, 0), (2, 1)])  # the default; chunks after a memory frame
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_matches_dense_sdpa(fpb, memory, monkeypatch):
    calls = []

    def counted_flex(*args, **kwargs):
        calls.append(kwargs["block_mask"])
        return flex_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "flex_attention", counted_flex)
    cfg = dataclasses.replace(MODELS["tiny"], frames_per_block=fpb, memory_frames=memory, attn_impl="sdpa")
    dit = randomized(cfg)
    x, t, a = inputs(cfg, b=1, t=4)
    # Recalled frames are the non-causal prefix every frame sees.
    ctx = Context(memory=Memory(x[:, :1], torch.randn(1, 1, 6), torch.ones(1, 1))) if memory else None
    with torch.no_grad():  # FlexAttention has no CPU backward; the forward is what is compared
        ref = dit(x, t, a, context=ctx)
        assert not calls
        dit.cfg = dataclasses.replace(cfg, attn_impl="flex")  # the same weights through the other kernel
        flex = dit(x, t, a, context=ctx)
    assert len(calls) == cfg.depth and isinstance(calls[0], BlockMask)
    torch.testing.assert_close(flex, ref, atol=1e-4, rtol=1e-4)
    assert ref.abs().mean() > 0.1  # a real comparison, not of zeros


# --- memory context, positions, extra channels ---------------------------------------------


def test_memory_frames_are_seen_by_every_frame():
    cfg = dataclasses.replace(SMALL, memory_frames=2)
    dit = randomized(cfg)
    x, t, a = inputs(cfg)
    mem = Memory(torch.randn(2, 2, *x.shape[2:]), torch.randn(2, 2, 6), torch.ones(2, 2))
    with torch.no_grad():
        v = dit(x, t, a, context=Context(memory=mem))
        x_last = x.clone()
        x_last[:, -1] += 0.5
        assert changed(v, dit(x_last, t, a, context=Context(memory=mem))) == [False, False, False, False, True]
        moved = dataclasses.replace(mem, z=mem.z + 0.5)
        assert changed(v, dit(x, t, a, context=Context(memory=moved))) == [True] * 5


def test_frame_positions_are_relative():
    dit = randomized(SMALL)
    x, t, a = inputs(SMALL)
    with torch.no_grad():
        v = dit(x, t, a)
        v_shift = dit(x, t, a, context=Context(frame_pos=torch.arange(5) + 100))  # a rolling window's offset
        v_gap = dit(x, t, a, context=Context(frame_pos=torch.tensor([[0, 1, 2, 3, 9]] * 2)))
    torch.testing.assert_close(v_shift, v, atol=1e-4, rtol=1e-4)  # RoPE sees only differences
    assert changed(v, v_gap) == [False, False, False, False, True]


def test_cond_channels_are_inputs_only():
    cfg = dataclasses.replace(SMALL, cond_channels=3)
    dit = randomized(cfg)
    x, t, a = inputs(cfg)
    cond = torch.randn(2, 5, 3, *cfg.latent_size)
    with torch.no_grad():
        v = dit(x, t, a, cond=cond)
        cond[:, 2] += 1
        assert v.shape == x.shape and changed(v, dit(x, t, a, cond=cond)) == [False, False, True, True, True]
    with pytest.raises(ValueError, match="cond must be given"):
        dit(x, t, a)


def test_training_step_backward_and_bf16_autocast():
    dit = DiT(SMALL)
    x, t, a = inputs(SMALL)
    eps = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = dit(add_noise(x, eps, t), t, a)
    loss = (v.float() - (eps - x)).square().mean()
    loss.backward()
    # adaLN-zero: at init only the output layer gets gradient; that is what lets it learn.
    assert dit.final_proj.weight.grad.abs().sum() > 0


# --- tokenizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [3, 4])
def test_tokenizer_shapes(in_channels):
    tok = Tokenizer(dataclasses.replace(SMALL_TOK, in_channels=in_channels))
    x = torch.rand(2, in_channels, 120, 160) * 2 - 1
    with torch.no_grad():
        z = tok.encode(x)
        assert z.shape == (2, 16, 15, 20)
        assert tok.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="tokenizer input"):
        tok.encode(x[:, :, :64])
    with pytest.raises(ValueError, match="latents must be"):
        tok.decode(z[:, :8])


def test_tokenizer_training_terms():
    tok = Tokenizer(dataclasses.replace(SMALL_TOK, image_size=(32, 48), kl_weight=0.5))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    x_hat, aux = tok(x)
    assert x_hat.shape == x.shape and set(aux) == {"kl"} and aux["kl"].ndim == 0
    mean, logvar = tok.posterior(x)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    torch.testing.assert_close(aux["kl"], 0.5 * kl)  # weighted by the config, ready to add
    ((x_hat - x).square().mean() + sum(aux.values())).backward()
    assert all(p.grad is not None for p in tok.parameters())
    assert not torch.equal(tok(x)[0], tok(x)[0])  # the training path samples the posterior


def test_tokenizer_encode_is_deterministic_and_scaled():
    tok = Tokenizer(SMALL_TOK).eval()
    x = torch.rand(2, 3, 120, 160) * 2 - 1
    with torch.no_grad():
        z = tok.encode(x)
        assert torch.equal(z, tok.encode(x))  # the posterior mean, no sampling
        x_hat = tok.decode(z)
        tok.cfg.latent_scale = tok.latent_std(x)
        z_scaled = tok.encode(x)
        assert z_scaled.std().item() == pytest.approx(1.0, rel=1e-3)
        torch.testing.assert_close(z_scaled * tok.cfg.latent_scale, z)
        torch.testing.assert_close(tok.decode(z_scaled), x_hat)  # scale in, scale out


def test_tokenizer_config_is_validated():
    with pytest.raises(ValueError, match="channels needs"):
        TokenizerConfig(channels=(8, 8))
    with pytest.raises(ValueError, match="divisible"):
        TokenizerConfig(image_size=(100, 160))


def test_frames_tensor_round_trip():
    frames = np.random.default_rng(0).integers(0, 256, (2, 3, 120, 160, 3), dtype=np.uint8)
    x = frames_to_tensor(frames)
    assert x.shape == (2, 3, 3, 120, 160) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_frames(x), frames)
    assert tensor_to_frames(torch.full((3, 1, 1), 5.0)).tolist() == [[[255, 255, 255]]]
    with pytest.raises(ValueError, match="uint8"):
        frames_to_tensor(frames.astype(np.float32))


# --- checkpoints -------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    dit, tok = randomized(SMALL), Tokenizer(dataclasses.replace(SMALL_TOK, latent_scale=0.5)).eval()
    save_part(tmp_path, "dynamics", dit, {"steps": 7})
    save_part(tmp_path, "tokenizer", tok)
    meta = json.loads((tmp_path / "dynamics.json").read_text())["config"]
    assert meta["steps"] == 7 and meta["action_schema"] == actions.schema()
    dit2, tok2 = load_dit(tmp_path), load_tokenizer(tmp_path)
    assert dit2.cfg == dit.cfg and tok2.cfg == tok.cfg and tok2.cfg.latent_scale == 0.5 and not dit2.training
    x, t, a = inputs(SMALL)
    img = torch.rand(1, 3, 120, 160)
    with torch.no_grad():
        assert torch.equal(dit2(x, t, a), dit(x, t, a))
        assert torch.equal(tok2.encode(img), tok.encode(img))
    save_part(tmp_path, "dynamics", dit, dtype=torch.bfloat16)  # half the bytes, loads back as fp32
    dit3 = load_dit(tmp_path)
    assert next(dit3.parameters()).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(dit3(x, t, a), dit(x, t, a), atol=0.1, rtol=0.05)


def test_load_names_missing_or_misshapen_tensor(tmp_path):
    save_part(tmp_path, "dynamics", DiT(SMALL))
    tensors, config = checkpoint.load(tmp_path, "dynamics")
    del tensors["final_proj.weight"]
    tensors["blocks.0.ada.bias"] = torch.zeros(3)
    checkpoint.save(tmp_path, "dynamics", tensors, config)  # well-formed (its hashes match), misfitting
    with pytest.raises(
        CheckpointError, match=r"missing tensors \['final_proj\.weight'\].*wrong shapes \['blocks\.0\.ada\.bias"
    ):
        load_dit(tmp_path)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_rejects_unknown_config_field_and_schema(tmp_path):
    save_part(tmp_path, "dynamics", DiT(SMALL))
    path = tmp_path / "dynamics.json"
    meta = json.loads(path.read_text())
    meta["config"]["model"]["wings"] = 2
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="wings"):
        load_dit(tmp_path)
    del meta["config"]["model"]["wings"]
    meta["config"]["action_schema"]["keys"] = ["jump"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="action schema keys"):
        load_dit(tmp_path)


def test_save_part_checks_part_and_module(tmp_path):
    with pytest.raises(ValueError, match="part"):
        save_part(tmp_path, "tokenizer", DiT(SMALL))
    assert not list(Path(tmp_path).iterdir())


# --- sampler -----------------------------------------------------------------------------


def test_shifted_timesteps():
    t = shifted_timesteps(4, shift=3.0, t_max=1.0)
    assert t[0] == 1 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    assert (t[1:-1] > torch.linspace(1, 0, 5)[1:-1]).all()  # shift > 1 spends more steps at high noise
    assert torch.equal(shifted_timesteps(4, 1.0, t_max=1.0), torch.linspace(1, 0, 5))
    assert shifted_timesteps(4)[0].item() == pytest.approx(sampling.T_MAX) and sampling.T_MAX < 1  # never t = 1


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (3, 2.0)])
def test_euler_recovers_target_with_exact_velocity(steps, shift):
    """A model that returns the true velocity toward x0 makes every Euler path land on x0:
    checks the step direction and the schedule end to end."""
    x0 = torch.randn(2, 1, 4, 3, 4)

    class Oracle(torch.nn.Module):
        cfg = SMALL

        def forward(self, x, t, a, **_):
            tt = t[:, :, None, None, None].clamp_min(1e-6)
            return (x - torch.cat([x[:, :-1], x0], 1)) / tt  # v = eps - x0 = (x_t - x0) / t

    out = generate(
        Oracle(), torch.randn(2, 2, 4, 3, 4), torch.zeros(2, 2, 10), torch.zeros(2, 1, 10), SamplerConfig(steps, shift)
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_sampler_is_deterministic_given_generator():
    dit = randomized(SMALL)
    ctx, ca, na = torch.randn(1, 3, 4, 3, 4), torch.randn(1, 3, 10), torch.randn(1, 10)

    def run(seed):
        return predict_next(
            dit, ctx, ca, na, SamplerConfig(steps=3, ctx_noise=0.05), torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_rollout_slides_window_like_repeated_predict_next():
    dit, window, steps = randomized(SMALL), 4, 2
    ctx, ca, acts = torch.randn(1, 3, 4, 3, 4), torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    out = rollout(dit, ctx, ca, acts, SamplerConfig(steps), window, torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 4, 3, 4)
    g = torch.Generator().manual_seed(0)
    frames, fa = ctx, ca
    for i in range(3):
        frames, fa = frames[:, -(window - 1) :], fa[:, -(window - 1) :]
        nxt = predict_next(dit, frames, fa, acts[:, i], SamplerConfig(steps), g)
        torch.testing.assert_close(out[:, i], nxt, atol=0, rtol=0)
        frames, fa = torch.cat([frames, nxt[:, None]], 1), torch.cat([fa, acts[:, i : i + 1]], 1)


def test_rollout_generates_whole_blocks_for_chunked_models():
    cfg = dataclasses.replace(SMALL, frames_per_block=2)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = cfg

        def forward(self, x, t, a, **_):
            seen.append(tuple(t.shape))
            return torch.zeros_like(x)

    rollout(Spy(), torch.randn(1, 3, 4, 3, 4), torch.zeros(1, 3, 10), torch.zeros(1, 5, 10), SamplerConfig(1), 6)
    # 3 context frames trim to one whole block (2); then 2+2, 4+2 (window 6), 4+1 new frames.
    assert seen == [(1, 4), (1, 6), (1, 5)]


def test_dropped_actions_use_the_null_action():
    """Action dropout: a dropped frame's output no longer depends on its action; the others'
    do; a model without a null action refuses drop_actions."""
    cfg = dataclasses.replace(SMALL, null_action=True)
    dit = randomized(cfg)
    x, t, a = inputs(cfg, b=1, t=3)
    drop = torch.tensor([[False, False, True]])
    other = a.clone()
    other[:, 2] += 1.0
    with torch.no_grad():
        assert torch.equal(dit(x, t, a, drop_actions=drop)[:, 2], dit(x, t, other, drop_actions=drop)[:, 2])
        assert not torch.equal(dit(x, t, a)[:, 2], dit(x, t, other)[:, 2])
    with pytest.raises(ValueError, match="null action"):
        randomized(SMALL)(x, t, a, drop_actions=drop)


def test_guidance_extrapolates_from_the_action_free_prediction():
    """generate() with guidance g takes v_free + g (v_act - v_free) at every step: one Euler step
    from T_MAX checks it against the two plain predictions."""
    cfg = dataclasses.replace(SMALL, null_action=True)
    dit = randomized(cfg)
    ctx, ca, na = torch.randn(1, 2, 4, 3, 4), torch.randn(1, 2, 10), torch.randn(1, 1, 10)
    noise = torch.randn(1, 1, 4, 3, 4, generator=torch.Generator().manual_seed(3))
    out = generate(dit, ctx, ca, na, SamplerConfig(steps=1, guidance=3.0), torch.Generator().manual_seed(3))
    xs, t = torch.cat([ctx, noise], 1), torch.tensor([[0.0, 0.0, sampling.T_MAX]])
    acts = torch.cat([ca, na], 1)
    with torch.no_grad():
        v_act = dit(xs, t, acts)[:, 2:]
        v_free = dit(xs, t, acts, drop_actions=torch.tensor([[False, False, True]]))[:, 2:]
    torch.testing.assert_close(out, noise - sampling.T_MAX * (v_free + 3.0 * (v_act - v_free)), atol=1e-5, rtol=1e-5)
