"""Calibrating the reward head on the model's own frames (issue 27): the game labels the model's
rollouts (replaying the recorded episode to the same state, then the same actions), the head
trains on real plus generated transitions, and the report compares event rates on held-out
rollouts. Tiny model, a tiny real recording, CPU."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import SIZE, cycle_player  # tests/ is on sys.path under pytest
from PIL import Image

from worldgen.data import Dataset, DatasetIndex, Episode, EpisodeInfo, write_episode_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 2 shared cores

# Walk and fire: real play in which ammo (and sometimes health) moves.
FIRE_CYCLE = [(["forward"], 0.0)] * 3 + [(["attack"], 0.0)] * 3 + [(["turn_right"], 0.0)] * 2 + [([], -6.0)] * 2


@pytest.fixture(scope="module")
def replayable_recording(tmp_path_factory):
    """Real ViZDoom play (E1M1, 2 episodes) at 32x24 with game variables, its index naming the
    game settings so the episodes can be replayed, as `worldgen record` writes it."""
    from worldgen.env.sources.doom import VARIABLE_NAMES, DoomConfig, DoomEnv, rollout

    root = tmp_path_factory.mktemp("replayable")
    config = DoomConfig()
    index = DatasetIndex(
        root,
        resolution=SIZE,
        frame_skip=4,
        variables=VARIABLE_NAMES,
        has_depth=False,
        has_pose=False,
        source={"env": "doom", "doom": config.to_dict(), "test": "downscaled"},
    )
    with DoomEnv(config) as env:
        for seed, (name, n) in enumerate((("a", 60), ("b", 60), ("c", 40))):
            chunks = list(rollout(env, cycle_player(FIRE_CYCLE, 3 * seed), "E1M1", seed, n))
            frames = np.concatenate([c.frames for c in chunks])
            ep = Episode(
                frames=np.stack([np.asarray(Image.fromarray(f).resize(SIZE, Image.BILINEAR)) for f in frames]),
                keys=np.concatenate([c.keys for c in chunks]),
                mouse=np.concatenate([c.mouse for c in chunks]),
                variables=np.concatenate([c.variables for c in chunks]),
            )
            index.add(
                EpisodeInfo(id=name, length=len(ep), shards=write_episode_shards(root, name, ep), map="E1M1", seed=seed)
            )
    return root


@pytest.fixture(scope="module")
def small_head(replayable_recording, tmp_path_factory):
    from worldgen.env.learned.reward_train import RewardTrainConfig, train

    out = tmp_path_factory.mktemp("head")
    train(
        RewardTrainConfig(
            data=str(replayable_recording),
            out=str(out),
            steps=30,
            batch_size=16,
            warmup=5,
            targets="health,selected_weapon_ammo",
            weights="selected_weapon_ammo=0.1,health=0.01,death=-1",
            channels="8,16",
            ckpt_every=1000,
            log_every=10,
            eval_transitions=256,
            device="cpu",
        )
    )
    return out / "ckpt"


def tiny_calibration(recording, model, head, out, **settings):
    """A calibration of the tiny model on the tiny recording: 6-step rollouts after 3 real frames, CPU."""
    from worldgen.env.learned.reward_calibrate import CalibrateConfig

    return CalibrateConfig(
        data=str(recording),
        out=str(out),
        model=str(model),
        head=str(head),
        length=6,
        context=3,
        workers=1,
        device="cpu",
        **settings,
    )


def test_the_game_labels_the_models_rollouts(tiny_checkpoint, replayable_recording):
    """Recorded actions: the game's labels are the recording's variables (replay is exact);
    other actions: the game's own answer (firing spends ammo, not firing does not)."""
    from worldgen.env.gym.world_model_env import load_model
    from worldgen.env.learned.reward_calibrate import make_rollouts, plan, random_actions

    wm, ds = load_model(str(tiny_checkpoint), "cpu"), Dataset(replayable_recording)
    rng = np.random.default_rng(0)
    starts = plan(ds, [0, 1], 4, 3, 5, True, rng)
    keys = np.stack([ds.read(e, "keys", t, t + 5) for e, t in starts])
    mouse = np.stack([ds.read(e, "mouse", t, t + 5) for e, t in starts])
    r = make_rollouts(wm, ds, starts, keys, mouse, 3, batch=3, workers=1, seed=0)
    assert r["frames"].shape == (4, 6, 24, 32, 3) and r["matched"].all() and (r["valid"] == 5).all()
    for (e, t), v in zip(starts, r["variables"]):
        assert np.array_equal(v, ds.read(e, "variables", t, t + 6))
    for (e, t), f in zip(starts, r["frames"]):
        assert np.array_equal(f[0], ds.read(e, "frames", t, t + 1)[0])  # g_0 real, the rest the model's

    keys, mouse = random_actions(6, 8, 4, rng)
    keys[:3, :, 6], keys[3:, :, 6] = 1, 0  # three rollouts fire throughout, three never
    r = make_rollouts(wm, ds, plan(ds, [0, 1], 6, 3, 8, False, rng), keys, mouse, 3, batch=4, workers=1, seed=0)
    ammo = r["variables"][..., r["variables_names"].index("selected_weapon_ammo")]
    spent = ammo[:, 2] - ammo[:, -1]  # from step 2: a shot the recording fired just before t may land first
    assert (spent[:3] > 0).all() and (spent[3:] == 0).all(), spent


def test_spawn_share_starts_rollouts_in_a_fresh_games_first_frames(replayable_recording):
    """--spawn-share: that share of rollouts starts right after an episode's first ``context``
    frames (a fresh game, as the env's start="doom"); out of range is refused."""
    from worldgen.env.learned.reward_calibrate import CalibrateConfig, calibrate, plan

    ds = Dataset(replayable_recording)
    draw = lambda **kw: plan(ds, [0, 1], 200, 3, 5, False, np.random.default_rng(7), **kw)  # noqa: E731
    assert {t for _, t in draw(spawn=1.0)} == {2}
    share = np.mean([t == 2 for _, t in draw(spawn=0.5)])
    assert 0.35 < share < 0.75  # half at the spawn, plus the random starts that land there too
    with pytest.raises(ValueError, match="--spawn-share"):
        calibrate(CalibrateConfig(data=str(replayable_recording), out="unused", spawn_share=1.5))


def test_calibrate_trains_on_generated_transitions_and_reports_event_rates(
    tiny_checkpoint, replayable_recording, small_head, tmp_path
):
    from worldgen.env.learned.reward_calibrate import calibrate, load_rollouts

    report = calibrate(
        tiny_calibration(
            replayable_recording,
            tiny_checkpoint,
            small_head,
            tmp_path,
            rollouts=12,
            heldout_rollouts=6,
            batch=6,
            train_steps=20,
            train_args="batch_size=16,warmup=5,ckpt_every=1000,log_every=10,eval_transitions=256",
        )
    )
    assert json.loads((tmp_path / "report.json").read_text()) == report
    held = load_rollouts(tmp_path / "rollouts-heldout.npz")
    assert report["heldout_replays_matched"] == "6/6"
    rates = report["generated_heldout"]
    n = int(held["valid"].sum())
    names = held["variables_names"]
    ammo = held["variables"][..., names.index("selected_weapon_ammo")]
    spent = sum(int((np.diff(ammo[i, : m + 1]) < 0).sum()) for i, m in enumerate(held["valid"]))
    for when in ("before", "trained", "after"):
        assert rates[when]["transitions"]["count"] == n
        assert rates[when]["selected_weapon_ammo_down"]["actual"] == pytest.approx(spent / n)
        assert 0 <= rates[when]["selected_weapon_ammo_down"]["predicted"] <= 1
    # The calibrated head is a normal head, trained on real and generated transitions.
    log = (tmp_path / "head" / "log.jsonl").read_text()
    stored = json.loads((tmp_path / "head" / "ckpt" / "reward.json").read_text())["config"]
    assert stored["train"]["config"]["generated"] == str(tmp_path / "rollouts-train.npz") and "loss" in log
    assert stored["reward_weights"] == {"selected_weapon_ammo": 0.1, "health": 0.01, "death": -1.0}


def test_fit_rates_makes_the_heads_event_rates_the_games():
    """The refitted prior correction: over the transitions it was fitted on, the mean probability
    of each event is the event's rate; a class the transitions never have keeps its offset."""
    import torch

    from worldgen.env.learned.reward import RewardHead, RewardHeadConfig
    from worldgen.env.learned.reward_calibrate import event_rates, fit_rates
    from worldgen.env.learned.reward_train import Transitions

    torch.manual_seed(0)
    head = RewardHead(
        RewardHeadConfig(frame_size=(24, 32), downsample=1, targets=("health", "itemcount"), channels=(8,))
    )
    head.logit_bias[1, 0] = -3.0  # items never go down: this offset must stay
    m = 400
    change = torch.zeros(m, 2)
    change[:40, 0], change[40:48, 0], change[100:106, 1] = -5.0, 10.0, 1.0  # 10% damage, 2% health, 1.5% items
    death = torch.zeros(m)
    death[:4] = 1.0
    frames = torch.randint(0, 256, (m + 1, 3, 24, 32), dtype=torch.uint8)
    t = Transitions(frames, torch.arange(m), torch.randn(m, 10), change, death)
    assert abs(event_rates(head, t)["health_down"]["ratio"] - 1) > 0.5  # an untrained head is far off
    fit_rates(head, t)
    rates = event_rates(head, t)
    for name, actual in (("health_down", 0.10), ("health_up", 0.02), ("itemcount_up", 0.015), ("death", 0.01)):
        assert rates[name]["actual"] == pytest.approx(actual)
        assert rates[name]["predicted"] == pytest.approx(actual, rel=0.01), name
    assert rates["itemcount_down"]["actual"] == 0
    items_down = head.logit_bias[1, 0] - head.logit_bias[1, 1]  # its offset against "same": what softmax sees
    assert float(items_down) < -2.0


def test_calibrate_with_no_training_refits_the_given_heads_rates_alone(
    tiny_checkpoint, replayable_recording, small_head, tmp_path
):
    """--train-steps 0: the head keeps its weights (the report's "trained" is "before"); only its
    prior correction changes, fitted on the train rollouts."""
    import torch

    from worldgen.env.learned.reward import load_head
    from worldgen.env.learned.reward_calibrate import calibrate

    cfg = tiny_calibration(
        replayable_recording,
        tiny_checkpoint,
        small_head,
        tmp_path,
        rollouts=8,
        heldout_rollouts=4,
        batch=4,
        train_steps=0,
    )
    report = calibrate(cfg)
    rates = report["generated_heldout"]
    assert rates["trained"] == rates["before"] and report["real_heldout_metrics_after"] == {}
    given, _ = load_head(small_head)
    fitted, stored = load_head(tmp_path / "head" / "ckpt")
    g, f = given.state_dict(), fitted.state_dict()
    assert all(torch.equal(g[k], f[k]) for k in g if k not in ("logit_bias", "death_bias"))
    assert not torch.equal(g["logit_bias"], f["logit_bias"])
    assert stored["rate_fit"]["rollouts"] == str(tmp_path / "rollouts-train.npz") and "metrics" not in stored
    with pytest.raises(ValueError, match="--train-steps 0"):
        calibrate(dataclasses.replace(cfg, fit_rates=False))
