"""The spike guard: NaN losses, spikes rolled back, non-finite weights never checkpointed, divergence."""

import math

import pytest
import torch

from growfam.train.checkpoint import load_checkpoint
from growfam.errors import TrainingDiverged
from growfam.train.metrics import read_metrics
from growfam.model import Llama, load_pretrained
from growfam.train import lr_at, make_optimizer, train

from train.support import TINY, ArrayDataset, cli_config, config, nan_at


# ---- spike guard -----------------------------------------------------------------------------------


def test_nan_loss_skips_the_update_and_is_logged(tmp_path):
    torch.manual_seed(0)
    model = Llama(TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nan_at(model, {1, 2})  # both micro-batches of step 1
    result = train(config(tmp_path, max_steps=1), model, dataset=ArrayDataset())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    spikes = read_metrics(tmp_path / "run" / "metrics.jsonl", "spike")
    assert len(spikes) == 1 and spikes[0]["step"] == 1 and spikes[0]["action"] == "skip"
    assert spikes[0]["loss"] is None  # NaN is written as null
    assert result.spikes == 1


def test_one_nan_micro_batch_poisons_the_step_and_training_goes_on(tmp_path):
    model = Llama(TINY)
    nan_at(model, {5})  # the first micro-batch of step 3
    result = train(config(tmp_path), model, dataset=ArrayDataset())
    assert result.spikes == 1 and result.steps == 8 and math.isfinite(result.train_loss)
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "spike")] == [3]


def test_repeated_spikes_roll_back_and_lower_the_lr(tmp_path):
    model = Llama(TINY)
    nan_at(model, set(range(11, 17)))  # steps 5, 6, 7 (calls 9-10 are the validation at step 4)
    cfg = config(tmp_path, max_steps=10, ckpt_every=4, spike_patience=3)
    result = train(cfg, model, dataset=ArrayDataset())
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rollback = [r for r in records if r["event"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 4 and rollback[0]["lr_scale"] == 0.5
    assert [r["step"] for r in records if r["event"] == "spike"] == [5, 6, 7]
    assert result.rollbacks == 1 and result.steps == 10
    # After the rollback, steps 5.. are trained again at half the learning rate.
    lrs = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    assert lrs[5] == pytest.approx(0.5 * lr_at(4, 10, 1e-2, 1e-3, 3))


def bounded(limit: int):
    """An on_eval callback (use eval_every=1) that fails a run going on for `limit` steps."""
    calls = [0]

    def count(step, val_loss):
        calls[0] += 1
        assert calls[0] < limit, "rollbacks are not bounded"

    return count


def assert_finite_checkpoints(out_dir, cfg) -> None:
    for ckpt in (out_dir / "checkpoints").glob("step_*"):
        model = Llama(TINY)
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert all(torch.isfinite(p).all() for p in load_pretrained(ckpt).parameters()), ckpt
        moments = [v for s in state["state"].values() for v in s.values()]
        assert moments and all(torch.isfinite(v).all() for v in moments), ckpt
        load_checkpoint(ckpt, model, optimizer)


def test_an_overflowing_lr_stops_with_training_diverged(tmp_path):
    """max_lr 1e4 (the report: 27,000 lines in 10 minutes): bounded rollbacks, then a clean stop."""
    cfg = config(tmp_path, max_lr=1e4, max_steps=40, eval_every=1, eval_batches=1)
    with pytest.raises(TrainingDiverged, match="diverged at step .*3 rollbacks in a row.*Lower max_lr"):
        train(cfg, dataset=ArrayDataset(), on_eval=bounded(100))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["event"] for r in records].count("rollback") == cfg.max_rollbacks == 3
    assert records[-1]["event"] == "diverged" and len(records) < 60
    assert_finite_checkpoints(tmp_path / "run", cfg)


def poison_after(optimizer, calls) -> None:
    """Make optimizer.step write inf into a weight on the given 1-based calls (an overflow)."""
    original, count = optimizer.step, [0]

    def step(*args, **kwargs):
        original(*args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0][0, 0] = math.inf

    optimizer.step = step


def test_nonfinite_weights_are_never_checkpointed_but_rolled_back(tmp_path):
    """Step 8's update overflows; its checkpoint is not written: back to step 4, and on."""
    torch.manual_seed(0)
    model = Llama(TINY)
    cfg = config(tmp_path, eval_every=1, eval_batches=1)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    poison_after(optimizer, {8})
    result = train(cfg, model, optimizer, dataset=ArrayDataset(), on_eval=bounded(100))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rollback = [r for r in records if r["event"] == "rollback"]
    assert [r["step"] for r in rollback] == [4] and result.rollbacks == 1 and result.steps == 8
    assert [r["nonfinite_weights"] for r in records if r["event"] == "spike"] == [True]
    assert_finite_checkpoints(tmp_path / "run", cfg)


def test_weights_that_keep_overflowing_stop_keeping_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Llama(TINY)
    cfg = config(tmp_path, max_steps=20, eval_every=1, eval_batches=1, keep_last=0)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    poison_after(optimizer, set(range(5, 100)))
    with pytest.raises(TrainingDiverged, match="keeping the last checkpoint, step_0000004"):
        train(cfg, model, optimizer, dataset=ArrayDataset(), on_eval=bounded(100))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_0000004"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["event"] == "diverged" and records[-1]["checkpoint"].endswith("step_0000004")
    assert [r["event"] for r in records].count("rollback") == 3


def test_nonfinite_weights_with_no_checkpoint_stop_at_once(tmp_path):
    """max_lr 1e41 overflows the weights in the very first update, before any checkpoint."""
    cfg = config(tmp_path, max_lr=1e41, warmup_frac=0, ckpt_every=1, eval_every=1, eval_batches=1)
    with pytest.raises(TrainingDiverged, match="at step 1: NaN/inf in the weights and no checkpoint.*no checkpoint was"):
        train(cfg, dataset=ArrayDataset(), on_eval=bounded(100))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("steps", [6, 30])
def test_a_blow_up_is_caught_from_step_0_not_followed(tmp_path, steps):
    """max_lr 10: the loss jumps from ln(128) to tens at step 2; the guard is armed already and
    its baseline does not follow the blow-up, so the run stops instead of exiting 0, also when
    it is over before the rollbacks run out (6 steps)."""
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(config(tmp_path, max_lr=10.0, max_steps=steps, eval_every=1, eval_batches=1), dataset=ArrayDataset(),
              on_eval=bounded(100))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    spikes = [r for r in records if r["event"] == "spike"]
    assert spikes and spikes[0]["step"] <= 3 and spikes[0]["loss"] > 2 * math.log(TINY.vocab_size)
    assert max(r["loss"] for r in records if r["event"] == "train") < 2 * math.log(TINY.vocab_size)
    assert records[-1]["event"] == "diverged" and records[-1]["checkpoint"] is None


def test_cli_exits_3_when_training_diverges(tmp_path, monkeypatch, capsys):
    from growfam.cli import main

    path = cli_config(tmp_path, monkeypatch, "max_steps: 30\nmax_lr: 10\neval_every: 0\n")
    assert main(["train", str(path)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if "growfam train" in line]
    assert len(errors) == 1 and errors[0].startswith("growfam train: error: training diverged at step")
