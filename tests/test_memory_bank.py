"""The frame memory bank (worldgen.memory.bank): recall by view overlap, bounded memory, batching."""

from __future__ import annotations

import pytest
import torch

from worldgen.memory.bank import BankConfig, FrameBank, recall, relative_pose, retrieve, stack

LATENT = (2, 3, 4)


def pose(x=0.0, y=0.0, yaw=0.0, pitch=0.0) -> torch.Tensor:
    return torch.tensor([x, y, 41.0, yaw, pitch])


def ring_bank(cfg: BankConfig, yaws, at=(0.0, 0.0), t0: int = 0) -> FrameBank:
    """A bank of frames all taken from one spot, turning through ``yaws``; latent i is filled with i."""
    bank = FrameBank(cfg, LATENT)
    for i, yaw in enumerate(yaws):
        bank.add(torch.full(LATENT, float(i)), pose(*at, yaw=yaw), t0 + i)
    return bank


def test_recalls_the_frames_facing_the_way_the_camera_looks():
    cfg = BankConfig(k=3, cap=64)
    bank = ring_bank(cfg, [10.0 * i for i in range(36)])  # a full turn, one frame per 10 degrees
    for look in (93.0, 181.0, 268.0):
        z, rel, age, ok = recall([bank], pose(yaw=look)[None], torch.tensor([100]))
        assert ok.all()
        yaws = (z[0, :, 0, 0, 0] * 10.0).tolist()  # latent i was taken at yaw 10 i
        first = min(range(36), key=lambda i: abs(10.0 * i - look))
        assert yaws[0] == 10.0 * first  # the closest view comes first
        # Greedy coverage: the next picks are distinct views that each add a part of this view.
        assert len(set(yaws)) == 3 and all(abs(y - look) < 90 for y in yaws)
        assert torch.allclose(rel[0, 0, 3:5], torch.tensor([0.0, 1.0]), atol=0.1)  # sin, cos of ~0 yaw offset


def test_views_from_elsewhere_and_behind_are_not_recalled():
    cfg = BankConfig(k=2, cap=16)
    bank = FrameBank(cfg, LATENT)
    bank.add(torch.zeros(LATENT), pose(0.0, 0.0, yaw=0.0), 0)  # looks +x along the corridor
    bank.add(torch.ones(LATENT), pose(400.0, 0.0, yaw=180.0), 1)  # from further on, looking back
    bank.add(torch.full(LATENT, 2.0), pose(0.0, 5000.0, yaw=0.0), 2)  # another room, same heading
    idx, ok = retrieve(*stack([bank]), pose(200.0, 0.0, yaw=180.0)[None], torch.tensor([50]), 2, cfg)
    assert idx[0, 0].item() == 1 and ok[0, 0]  # the one that looked this way
    assert not ok[0, 1]  # nothing else sees this view


def test_recency_breaks_ties_and_the_rolling_window_is_left_out():
    cfg = BankConfig(k=1, cap=8, min_age=4)
    bank = ring_bank(cfg, [0.0, 0.0, 0.0])  # one view, taken at t = 0, 1, 2
    idx, ok = retrieve(*stack([bank]), pose()[None], torch.tensor([6]), 1, cfg)
    assert bank.time[idx[0, 0]].item() == 2 and ok.all()  # the newest of equal views
    idx, ok = retrieve(*stack([bank]), pose()[None], torch.tensor([5]), 1, cfg)
    assert bank.time[idx[0, 0]].item() == 1  # t = 2 is only 3 steps old
    _, ok = retrieve(*stack([bank]), pose()[None], torch.tensor([3]), 1, cfg)
    assert not ok.any()


def test_memory_stays_bounded_over_10000_frames_and_keeps_a_view_seen_once():
    cfg = BankConfig(k=2, cap=32, samples=64)
    bank = FrameBank(cfg, LATENT)
    size = bank.nbytes()
    bank.add(torch.full(LATENT, -1.0), pose(0.0, 0.0, yaw=90.0), 0)  # the only look north, at the start
    for t in range(1, 10_000):  # then east and back, over and over
        x = 2000.0 * abs((t / 500) % 2 - 1)
        bank.add(torch.zeros(LATENT), pose(x, 0.0, yaw=0.0 if (t // 500) % 2 == 0 else 180.0), t)
    assert len(bank) == cfg.cap and bank.added == 10_000 and bank.nbytes() == size
    assert (bank.z[:, 0, 0, 0] == -1.0).any()  # redundant views went first
    z, _, _, ok = recall([bank], pose(0.0, 0.0, yaw=90.0)[None], torch.tensor([10_000]))
    assert ok[0, 0] and z[0, 0, 0, 0, 0].item() == -1.0


def test_a_batch_recalls_what_each_session_recalls_alone():
    cfg = BankConfig(k=3, cap=24)
    banks = [ring_bank(cfg, [15.0 * i for i in range(n)], at=(37.0 * n, -11.0 * n), t0=n) for n in (3, 24, 40)]
    query = torch.stack([pose(37.0 * 3, -33.0, yaw=20.0), pose(0.0, 0.0, yaw=200.0), pose(1480.0, -440.0, yaw=300.0)])
    now = torch.tensor([40, 60, 90])
    batched = recall(banks, query, now)
    for i, bank in enumerate(banks):
        alone = recall([bank], query[i : i + 1], now[i : i + 1])
        for a, b in zip(batched, alone):
            assert torch.equal(a[i : i + 1], b)
    assert batched[3].any(1).all()


def test_relative_pose_is_what_the_camera_sees():
    ref = pose(100.0, 50.0, yaw=90.0)  # looking +y
    rel = relative_pose(pose(100.0, 306.0, yaw=180.0), ref)  # 256 ahead, turned 90 left
    assert torch.allclose(rel, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]), atol=1e-5)


def test_bad_settings_and_frames_are_refused():
    with pytest.raises(ValueError, match="k <= cap"):
        FrameBank(BankConfig(k=8, cap=4), LATENT)
    bank = FrameBank(BankConfig(cap=4), LATENT)
    with pytest.raises(ValueError, match="latent"):
        bank.add(torch.zeros(3, 3, 4), pose(), 0)
    with pytest.raises(ValueError, match="finite"):
        bank.add(torch.zeros(LATENT), pose(x=float("nan")), 0)
