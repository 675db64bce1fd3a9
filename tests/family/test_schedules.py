"""Schedules in a family: the lr: section's WSD reaches every stage of both modes, and growth
from the stable phase grows each member from its stage's checkpoint before the decay (kept
through pruning, bit-identical to a plain run's at that step), the decay being the published
member's branch."""

import pytest
import torch
from conftest import documents

from growfam.config import FamilyConfig
from growfam.data import TokenDataset, prepare
from growfam.errors import ConfigError
from growfam.family import make_plan, run_family
from growfam.family.stage import _probe_batch, stage_train_config
from growfam.model import load_pretrained
from growfam.train import Schedule, train
from growfam.train.checkpoint import checkpoint_at, latest_checkpoint

SMALL = dict(name="small", d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=64, vocab_size=300, max_seq_len=32)
LARGE = dict(name="large", d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, ffn_dim=96, vocab_size=300, max_seq_len=32)


def spec(**changes) -> dict:
    data = dict(name="sched", members=[SMALL, LARGE], tokens={"explicit": [3200, 6400]}, batch_size=4, seq_len=32,
                lr={"policy": "fixed", "max": 3e-3, "schedule": "wsd", "decay": 0.25},
                growth={"width": "lossless", "depth": "identity", "from": "stable", "probe_tokens": 256},
                train={"eval_every": 5, "eval_batches": 2, "ckpt_every": 5, "keep_last": 1, "log_every": 5,
                       "tensorboard": False})
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    prepare(documents(), "train:300", root / "ds", val_fraction=0.05, progress=False)
    return root / "ds"


def test_growth_from_the_stable_phase(dataset, tmp_path):
    family = FamilyConfig.from_dict(spec())
    ledger = run_family(family, tmp_path / "fam", data=str(dataset), log=lambda s: None)
    small, large = ledger.members("progressive")
    tcfg = stage_train_config(family, make_plan(family), 0, "progressive", str(dataset), tmp_path / "fam",
                              small.planned_tokens, False)
    schedule = Schedule.of(tcfg, 1)
    assert (schedule.total_steps, schedule.stable_end) == (25, 18)
    assert small.growth_point == {"from": "stable", "step": 18, "branch_tokens": round(small.tokens * 7 / 25),
                                  "branch_flops": pytest.approx(small.flops * 7 / 25)}
    run = tmp_path / "fam" / "runs" / "progressive" / "small"
    stable = checkpoint_at(run, 18)
    assert stable is not None and latest_checkpoint(run).name == "step_0000025"  # kept despite keep_last 1
    assert checkpoint_at(run, 15) is None
    # the same stage trained alone has, at that step, the same bits
    alone = train(tcfg.replace(out_dir=str(tmp_path / "alone")), dataset=TokenDataset.open(dataset))
    assert alone.steps == 25
    a, b = load_pretrained(stable), load_pretrained(checkpoint_at(tmp_path / "alone", 18))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the large member grew from the stable checkpoint (exact growth: its probe loss is the stable model's),
    # not from the decayed member the family published
    probe = _probe_batch(TokenDataset.open(dataset), 32, 256)
    with torch.no_grad():
        stable_loss = a.loss(probe[:, :-1], probe[:, 1:]).item()
        decayed = load_pretrained(tmp_path / "fam" / "progressive" / "small")
        decayed_loss = decayed.loss(probe[:, :-1], probe[:, 1:]).item()
    grown = large.growth["probe"]
    assert grown["loss_source"] == pytest.approx(stable_loss, abs=1e-4) and abs(stable_loss - decayed_loss) > 1e-3
    assert grown["max_abs_dlogits"] < 1e-4
    # both modes train on the family's schedule; the largest has no branch
    assert large.growth_point is None and ledger.members("independent")[0].growth_point is None


def test_a_constant_schedule_with_averaging_publishes_the_averages_and_grows_from_the_last_state(dataset, tmp_path):
    from growfam.train.average import AVERAGE_DIR

    family = FamilyConfig.from_dict(spec(lr={"policy": "fixed", "max": 3e-3, "schedule": "constant"},
                                         growth={"width": "lossless", "depth": "identity", "probe_tokens": 256},
                                         train={"eval_every": 5, "eval_batches": 2, "ckpt_every": 5, "keep_last": 1,
                                                "tensorboard": False, "average": {"last": 3, "every": 4}}))
    ledger = run_family(family, tmp_path / "fam", data=str(dataset), modes="progressive", log=lambda s: None)
    small, large = ledger.members("progressive")
    run = tmp_path / "fam" / "runs" / "progressive" / "small"
    published, mean = load_pretrained(tmp_path / "fam" / "progressive" / "small"), load_pretrained(run / AVERAGE_DIR)
    assert all(torch.equal(x, y) for x, y in zip(published.state_dict().values(), mean.state_dict().values()))
    assert [checkpoint_at(run, step) is not None for step in (17, 21, 25)] == [True] * 3
    probe = _probe_batch(TokenDataset.open(dataset), 32, 256)
    with torch.no_grad():
        last = load_pretrained(latest_checkpoint(run))
        last_loss, mean_loss = (m.loss(probe[:, :-1], probe[:, 1:]).item() for m in (last, mean))
    assert large.growth["probe"]["loss_source"] == pytest.approx(last_loss, abs=1e-4)  # grown from the last state
    assert abs(last_loss - mean_loss) > 1e-4


def test_schedule_sections_are_checked():
    with pytest.raises(ConfigError, match="growth.from stable needs a stable phase and a decay: lr.schedule wsd"):
        FamilyConfig.from_dict(spec(lr={"policy": "fixed", "max": 3e-3}))
    with pytest.raises(ConfigError, match="growth.from must be decayed or stable"):
        FamilyConfig.from_dict(spec(growth={"from": "early"}))
    with pytest.raises(ConfigError, match="choose one"):
        FamilyConfig.from_dict(spec(growth={"from": "stable", "schedule": "converged"}))
    with pytest.raises(ConfigError, match="train.lr_schedule is set by the family plan"):
        FamilyConfig.from_dict(spec(train={"lr_schedule": "wsd"}))
    with pytest.raises(ConfigError, match="lr.schedule must be cosine or wsd or constant"):
        FamilyConfig.from_dict(spec(lr={"policy": "fixed", "schedule": "step"}, growth={}))
    # a cosine family's plan and growth section are as they were before schedules existed
    plain = make_plan(FamilyConfig.from_dict(spec(lr={"policy": "fixed", "max": 3e-3}, growth={})))
    assert set(plain.to_dict()["lr"]) == {"policy", "max", "min_ratio"}
    assert "from" not in FamilyConfig.from_dict(spec(lr={"policy": "fixed"}, growth={})).growth.to_dict()
