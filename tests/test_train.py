"""The training loop: schedule, optimizer groups, accumulation, resume, spike guard, checkpoints."""

import errno
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import growfam.train.checkpoint as checkpoint_module
from growfam.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
from growfam.errors import ConfigError, GrowfamError, TrainingDiverged
from growfam.grow.masks import MaskState, attach_masks, mask_state
from growfam.train.metrics import read_metrics
from growfam.model import Llama, ModelConfig, flops_per_token, load_pretrained, num_params
from growfam.train import (Callback, Parallelism, TrainConfig, forward_backward, lr_at, lr_bounds, make_optimizer,
                           make_parallelism, param_groups, train, validation_loss)

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=128, max_seq_len=32)


class ArrayDataset:
    """In-memory stand-in for a prepared dataset: random tokens, no tokenizer."""

    vocab_size = TINY.vocab_size

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.splits = {"train": rng.integers(0, self.vocab_size, 20_000).astype(np.uint16),
                       "val": rng.integers(0, self.vocab_size, 2_000).astype(np.uint16)}

    def tokens(self, split: str) -> np.ndarray:
        return self.splits[split]


def config(tmp_path, **changes) -> TrainConfig:
    base = dict(model=TINY, out_dir=str(tmp_path / "run"), max_steps=8, batch_size=4, micro_batch_size=2,
                seq_len=16, max_lr=1e-2, warmup_frac=0.25, eval_every=4, eval_batches=2, ckpt_every=4,
                log_every=1, tensorboard=False, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def step_losses(out_dir) -> dict[int, float]:
    """Per-step training loss; a step logged twice (before a kill and after resuming) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl", "train")}


def nan_at(model: Llama, calls: set[int]) -> None:
    """Make model.loss return NaN (with a graph, so backward runs) on the given 1-based calls."""
    original, count = model.loss, [0]

    def loss(x, y, loss_chunk=0):
        count[0] += 1
        value = original(x, y, loss_chunk)
        return value * float("nan") if count[0] in calls else value

    model.loss = loss


# ---- schedule and optimizer --------------------------------------------------------------------


def test_lr_schedule_warmup_peak_cosine_floor():
    total, peak, floor, warm = 110, 1e-3, 1e-4, 10
    assert lr_at(0, total, peak, floor, warm) == pytest.approx(peak / 10)
    assert lr_at(4, total, peak, floor, warm) == pytest.approx(peak / 2)
    assert lr_at(9, total, peak, floor, warm) == pytest.approx(peak)
    assert lr_at(10, total, peak, floor, warm) == pytest.approx(peak)  # the cosine starts at the peak
    middle = 10 + (total - 1 - 10) / 2
    assert lr_at(int(middle), total, peak, floor, warm) == pytest.approx((peak + floor) / 2, rel=0.02)
    assert lr_at(total - 1, total, peak, floor, warm) == pytest.approx(floor)  # the last step at the floor
    assert lr_at(total + 5, total, peak, floor, warm) == pytest.approx(floor)
    lrs = [lr_at(s, total, peak, floor, warm) for s in range(total)]
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone decay


def test_lr_floor_ratio_or_absolute(tmp_path):
    assert lr_bounds(config(tmp_path, max_lr=1e-3)) == pytest.approx((1e-3, 1e-4))  # default ratio 0.1
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr_ratio=0.0)) == (1e-3, 0.0)
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr=3e-5), scale=0.5) == (5e-4, 3e-5)
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr=8e-4), scale=0.5) == (5e-4, 5e-4)
    with pytest.raises(ConfigError, match="at most one"):
        config(tmp_path, min_lr=1e-5, min_lr_ratio=0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_decay_matrices_only(tied):
    model = Llama(TINY.replace(tie_embeddings=tied))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert all(p.ndim == 2 for p in decay["params"])
    assert "embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_matches_one_batch():
    torch.manual_seed(0)
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    y = torch.randint(0, TINY.vocab_size, (4, 16))
    one, two = Llama(TINY), Llama(TINY)
    two.load_state_dict(one.state_dict())
    loss_one = forward_backward(one.loss, [(x, y)], torch.device("cpu"))
    loss_two = forward_backward(two.loss, [(x[:2], y[:2]), (x[2:], y[2:])], torch.device("cpu"))
    assert loss_two.item() == pytest.approx(loss_one.item(), abs=1e-6)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_config_rejects_unknown_keys_and_reads_yaml_numbers(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'max_lrr' in the train config.*did you mean 'max_lr'"):
        TrainConfig.from_dict({"model": "tiny-1", "max_steps": 10, "max_lrr": 1e-3})
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny-1\nmax_tokens: 2e6\nmax_lr: 6e-4\nbetas: [0.9, 0.99]\n")
    cfg = TrainConfig.load(path)
    assert cfg.max_tokens == 2_000_000 and cfg.max_lr == 6e-4 and cfg.betas == (0.9, 0.99)
    assert cfg.model.name == "tiny-1"
    with pytest.raises(ConfigError, match="exactly one of max_steps and max_tokens"):
        TrainConfig(model=TINY)


@pytest.mark.parametrize("changes, message", [
    ({"betas": [1.0, 0.95]}, r"betas must each be in \[0, 1\), got 1.0"),
    ({"betas": [0.9, -0.1]}, r"betas must each be in \[0, 1\)"),
    ({"device": "banana"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    ({"device": "cuda"}, "device 'cuda': CUDA is not available"),
    ({"device": 3}, "device must be"),
    ({"max_rollbacks": -1}, "max_rollbacks must be an integer >= 0"),
])
def test_config_refuses_bad_betas_devices(tmp_path, monkeypatch, changes, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **changes)


# ---- the loop -------------------------------------------------------------------------------------


def test_run_writes_metrics_checkpoints_and_hf_dir(tmp_path):
    result = train(config(tmp_path, keep_last=1, tensorboard=True), dataset=ArrayDataset())
    out = tmp_path / "run"
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    tokens = 8 * 4 * 16
    assert result.steps == 8 and result.tokens == tokens and not result.stopped_early
    assert result.flops == 6 * num_params(TINY, "nonembedding") * tokens
    assert result.flops_attn == flops_per_token(TINY, 16) * tokens
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    assert result.hf_dir == out / "checkpoints" / "step_0000008" == latest_checkpoint(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000008"]  # pruned
    assert load_pretrained(result.hf_dir).cfg == TINY
    assert sorted(step_losses(out)) == list(range(1, 9))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "eval")] == [4, 8]
    # Running again finds the finished run and reports it without training.
    again = train(config(tmp_path, keep_last=1), dataset=ArrayDataset())
    assert again.steps == 8 and again.val_loss == result.val_loss
    # validation_loss measures a model as the run measured its final one (what a family
    # publishes for a start_from member it does not train)
    final = load_pretrained(result.hf_dir).train()
    assert validation_loss(config(tmp_path), final, ArrayDataset()) == pytest.approx(result.val_loss, abs=1e-6)
    assert final.training  # left as it was
    short = ArrayDataset()
    short.splits["val"] = short.splits["val"][:16]  # no window of seq_len + 1 tokens
    assert validation_loss(config(tmp_path), final, short) is None
    wider = ArrayDataset()
    wider.vocab_size = TINY.vocab_size + 1
    with pytest.raises(ConfigError, match="larger than the model's"):
        validation_loss(config(tmp_path), final, wider)


def test_killed_and_resumed_run_reproduces_the_losses(tmp_path):
    straight = train(config(tmp_path / "a"), dataset=ArrayDataset())

    def kill(step, val_loss):
        raise KeyboardInterrupt  # after steps 5-6, past the checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", eval_every=6), dataset=ArrayDataset(), on_eval=kill)
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_0000004"
    resumed = train(config(tmp_path / "b", eval_every=6), dataset=ArrayDataset())
    expected, got = step_losses(tmp_path / "a" / "run"), step_losses(tmp_path / "b" / "run")
    assert got == expected  # bitwise: same weights, optimizer state, data cursor and schedule
    assert resumed.train_loss == pytest.approx(straight.train_loss, abs=1e-6)
    a, b = load_pretrained(straight.hf_dir), load_pretrained(resumed.hf_dir)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_resume_inside_a_logging_window_logs_the_same_train_losses(tmp_path):
    """The averaging window (steps 4-6 with log_every 3) straddles the checkpoint at step 4."""
    straight = config(tmp_path / "a", log_every=3, eval_every=6)
    train(straight, dataset=ArrayDataset())

    def kill(step, val_loss):
        raise KeyboardInterrupt  # at step 6, after the window's log line

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", log_every=3, eval_every=6), dataset=ArrayDataset(), on_eval=kill)
    train(config(tmp_path / "b", log_every=3, eval_every=6), dataset=ArrayDataset())
    expected, got = step_losses(tmp_path / "a" / "run"), step_losses(tmp_path / "b" / "run")
    assert sorted(expected) == [3, 6, 8]
    assert got == expected  # bitwise, including the window mean logged at step 6


def test_resume_in_a_masked_growth_ramp_reproduces_the_losses(tmp_path):
    source = TINY.replace(d_model=16, n_heads=1, n_kv_heads=1, ffn_dim=32)

    def masked_model() -> Llama:
        torch.manual_seed(1)
        model = Llama(TINY)
        attach_masks(model, MaskState.between(source, TINY, steps=6))
        return model

    straight = masked_model()
    train(config(tmp_path / "a"), straight, dataset=ArrayDataset())
    assert mask_state(straight) is None  # the ramp ended at step 6 and folded away

    def kill(step, val_loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", eval_every=6), masked_model(), dataset=ArrayDataset(), on_eval=kill)
    train(config(tmp_path / "b", eval_every=6), dataset=ArrayDataset())  # a fresh model: masks from the checkpoint
    assert step_losses(tmp_path / "b" / "run") == step_losses(tmp_path / "a" / "run")


def test_micro_batches_do_not_change_the_trajectory(tmp_path):
    train(config(tmp_path / "a", micro_batch_size=4, max_steps=3), dataset=ArrayDataset())
    train(config(tmp_path / "b", micro_batch_size=1, max_steps=3), dataset=ArrayDataset())
    a, b = step_losses(tmp_path / "a" / "run"), step_losses(tmp_path / "b" / "run")
    assert a == pytest.approx(b, abs=1e-5)


def test_resume_refuses_a_different_config(tmp_path):
    train(config(tmp_path, max_steps=4, ckpt_every=2), dataset=ArrayDataset())
    with pytest.raises(ConfigError, match=r"does not match the checkpoint.*max_lr: checkpoint 0.01, now 0.02"):
        train(config(tmp_path, max_steps=4, ckpt_every=2, max_lr=2e-2), dataset=ArrayDataset())
    with pytest.raises(GrowfamError, match="holds checkpoints of an earlier run"):
        train(config(tmp_path, max_steps=4, ckpt_every=2), dataset=ArrayDataset(), resume=False)
    with pytest.raises(GrowfamError, match="nothing to resume"):
        train(config(tmp_path / "empty"), dataset=ArrayDataset(), resume=True)


def test_a_handed_optimizer_gets_the_configs_hyperparameters(tmp_path):
    """A grown model's AdamW state arrives with the previous stage's wd/betas/eps: this stage's apply."""
    torch.manual_seed(0)
    model, reference = Llama(TINY), Llama(TINY)
    reference.load_state_dict(model.state_dict())
    cfg = config(tmp_path / "a", max_steps=4, weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6)
    stale = make_optimizer(model, cfg.replace(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8), torch.device("cpu"))
    train(cfg, model, stale, dataset=ArrayDataset())
    decay, no_decay = stale.param_groups
    assert (decay["weight_decay"], decay["betas"], decay["eps"]) == (0.0, (0.8, 0.9), 1e-6)
    assert (no_decay["weight_decay"], no_decay["betas"], no_decay["eps"]) == (0.0, (0.8, 0.9), 1e-6)
    saved = torch.load(latest_checkpoint(tmp_path / "a" / "run") / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.0, 0.0]
    # What is recorded is what was applied: the same weights as an optimizer built from cfg.
    train(config(tmp_path / "b", max_steps=4, weight_decay=0.0, betas=(0.8, 0.9), eps=1e-6), reference,
          dataset=ArrayDataset())
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(q, p), name
    # and the no_decay group stays undecayed when the config decays
    model = Llama(TINY)
    stale = make_optimizer(model, cfg.replace(weight_decay=0.0), torch.device("cpu"))
    train(config(tmp_path / "c", max_steps=1, weight_decay=0.2), model, stale, dataset=ArrayDataset())
    assert [g["weight_decay"] for g in stale.param_groups] == [0.2, 0.0]
    with pytest.raises(ConfigError, match="mixing matrices and norm gains"):
        train(config(tmp_path / "d", max_steps=1), model, torch.optim.AdamW(model.parameters()), dataset=ArrayDataset())


def test_a_given_model_must_match_the_config(tmp_path):
    with pytest.raises(ConfigError, match="not the configured one"):
        train(config(tmp_path), Llama(TINY.replace(d_model=64, n_heads=4)), dataset=ArrayDataset())


# ---- callbacks and the parallelism seam -----------------------------------------------------------


class Recorder(Callback):
    """Records the hooks it gets, raises KeyboardInterrupt (a kill) or stops at given steps, and
    carries its count of updates in checkpoints."""

    state_key = "recorder"

    def __init__(self, kill_at: int | None = None, stop_at: int | None = None) -> None:
        self.calls, self.updates, self.kill_at, self.stop_at = [], 0, kill_at, stop_at

    def on_train_start(self, run):
        self.calls.append(("start", run.state.step))

    def on_update(self, run):
        self.updates += 1

    def on_step_end(self, run):
        self.calls.append(("end", run.state.step))
        if run.state.step == self.kill_at:
            raise KeyboardInterrupt
        return run.state.step == self.stop_at

    def on_train_end(self, run):
        self.calls.append(("train_end", run.state.step))

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, saved):
        self.updates = saved["updates"]


def test_a_callback_sees_every_step_keeps_its_state_and_can_stop_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path), dataset=ArrayDataset(), callbacks=[Recorder(kill_at=6)])
    assert read_trainer_state(latest_checkpoint(tmp_path / "run"))["recorder"] == {"updates": 4}
    resumed = Recorder(stop_at=7)
    result = train(config(tmp_path), dataset=ArrayDataset(), callbacks=[resumed])
    assert resumed.calls == [("start", 4), ("end", 5), ("end", 6), ("end", 7), ("train_end", 7)]
    assert resumed.updates == 7  # 4 from the checkpoint, 3 in this session
    assert result.stopped_early and result.steps == 7
    state = read_trainer_state(latest_checkpoint(tmp_path / "run"))
    assert (state["step"], state["finished"], state["stopped_early"]) == (7, True, True)
    assert state["recorder"] == {"updates": 7}


def test_one_process_parallelism_is_the_identity():
    parallel = make_parallelism("cpu")
    assert type(parallel) is Parallelism and (parallel.rank, parallel.world, parallel.is_main) == (0, 1, True)
    torch.manual_seed(0)
    model = Llama(TINY)
    assert parallel.wrap(model) is model
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    lasts = []

    def micro_batch(last: bool):
        lasts.append(last)
        return parallel.micro_batch(model, last)

    loss = forward_backward(model.loss, [(x[:2, :-1], x[:2, 1:]), (x[2:, :-1], x[2:, 1:])], torch.device("cpu"),
                            micro_batch=micro_batch)
    assert lasts == [False, True]
    grads = [p.grad.clone() for p in model.parameters()]
    parallel.average([loss])
    parallel.reduce_gradients(model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    norm = parallel.clip_grad_norm(model, 1e-3)
    assert norm.item() == pytest.approx(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])) <= 1e-3 * (1 + 1e-5)


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


# ---- checkpoint failures -------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, [0]

    def save(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint's optimizer.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(GrowfamError, match="step 8 was not written.*No space left on device.*intact"):
        train(config(tmp_path), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]  # no temp dir left
    assert latest_checkpoint(tmp_path / "run") == root / "step_0000004"
    model = Llama(TINY)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1))
    assert load_checkpoint(root / "step_0000004", model, optimizer)["step"] == 4
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train(config(tmp_path), dataset=ArrayDataset()).steps == 8  # and the run resumes


def test_a_checkpoint_with_nonfinite_weights_or_moments_is_never_written(tmp_path):
    model = Llama(TINY)
    optimizer = make_optimizer(model, config(tmp_path), torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    optimizer.state[model.lm_head.weight]["exp_avg_sq"][0, 0] = math.inf
    with pytest.raises(GrowfamError, match="NaN/inf.*lm_head.weight.*not written"):
        checkpoint_module.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    optimizer.state[model.lm_head.weight]["exp_avg_sq"].zero_()
    with torch.no_grad():
        model.norm.weight[0] = math.nan
    with pytest.raises(GrowfamError, match="NaN/inf.*norm.weight.*not written"):
        checkpoint_module.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


CORRUPTIONS = {
    "weights truncated": ("model.safetensors", _truncate),
    "weights garbage": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 100)),
    "optimizer truncated": ("optimizer.pt", _truncate),
    "optimizer hostile pickle": ("optimizer.pt", lambda p: p.write_bytes(__import__("pickle").dumps(_Evil(), protocol=2))),
    "optimizer wrong tensors": ("optimizer.pt", lambda p: torch.save({"state": {}, "param_groups": []}, p)),
    "state not json": ("trainer_state.json", lambda p: p.write_text("{not json")),
    "state a list": ("trainer_state.json", lambda p: p.write_text("[1, 2]")),
    "state missing keys": ("trainer_state.json", lambda p: p.write_text('{"step": 8}')),
    "state bad guard": ("trainer_state.json",
                        lambda p: p.write_text(p.read_text().replace('"lr_scale": 1.0', '"lr_scale": "x"'))),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_checkpoint_names_itself_and_the_previous_one(tmp_path, monkeypatch, corruption):
    monkeypatch.chdir(tmp_path)
    train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    name, corrupt = CORRUPTIONS[corruption]
    corrupt(root / "step_0000008" / name)
    before = (root / "step_0000008" / name).read_bytes()
    with pytest.raises(GrowfamError, match=r"checkpoint .*step_0000008 is broken \(.+\); "
                                           r"move it away to resume from step_0000004") as err:
        train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    assert "\n" not in str(err.value)
    assert (root / "step_0000008" / name).read_bytes() == before  # nothing was touched
    assert not (tmp_path / "pwned").exists()


def test_the_only_checkpoint_broken_says_so(tmp_path):
    train(config(tmp_path, max_steps=4), dataset=ArrayDataset())
    (tmp_path / "run" / "checkpoints" / "step_0000004" / "trainer_state.json").write_text("null")
    with pytest.raises(GrowfamError, match="step_0000004 is broken.*no earlier complete checkpoint"):
        train(config(tmp_path, max_steps=8), dataset=ArrayDataset())


def _disk_full_open(fail_at: int):
    """An `open` whose files raise ENOSPC on the fail_at-th write, after writing half of it."""
    writes = [0]

    class Full:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            writes[0] += 1
            if writes[0] == fail_at:
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    return lambda *args, **kwargs: Full(open(*args, **kwargs))


def test_full_disk_while_logging_is_one_clear_error_and_resumes(tmp_path, monkeypatch):
    import growfam.train.metrics

    monkeypatch.setattr(growfam.train.metrics, "open", _disk_full_open(fail_at=9), raising=False)  # step 7's line
    with pytest.raises(GrowfamError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        train(config(tmp_path), dataset=ArrayDataset())
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    monkeypatch.undo()
    train(config(tmp_path), dataset=ArrayDataset())  # the half-written line is dropped on resume
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, 9))


def test_full_disk_in_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    with pytest.raises(GrowfamError, match=r"cannot write .*tensorboard: No space left on device"):
        train(config(tmp_path, tensorboard=True), dataset=ArrayDataset())


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    root = tmp_path / "run" / "checkpoints"
    (root / f".step_0000004.tmp-{dead}-abcd").mkdir(parents=True)
    (root / f".step_0000004.tmp-{dead}-abcd" / "model.safetensors").write_bytes(b"x" * 1000)
    train(config(tmp_path, max_steps=4), dataset=ArrayDataset())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(GrowfamError, match="cannot write"):
        train(config(tmp_path, out_dir=str(tmp_path / "file" / "run")), dataset=ArrayDataset())


def test_broken_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step_0000099\n")
    assert latest_checkpoint(tmp_path / "run") == root / "step_0000008"
    assert read_trainer_state(root / "step_0000004")["step"] == 4


# ---- two processes (gloo) ------------------------------------------------------------------------


def _two_rank_worker(rank: int, tmp_path, port: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train(config(tmp_path / "ddp", max_steps=3, ckpt_every=2), dataset=ArrayDataset())
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_worker, args=(tmp_path, port), nprocs=2)
    train(config(tmp_path / "one", max_steps=3, ckpt_every=2), dataset=ArrayDataset())
    # Rank r takes every other window of the same permutation: the same 4 windows per step.
    assert step_losses(tmp_path / "ddp" / "run") == pytest.approx(step_losses(tmp_path / "one" / "run"), abs=1e-5)
    assert latest_checkpoint(tmp_path / "ddp" / "run").name == "step_0000003"


# ---- command line --------------------------------------------------------------------------------


def cli_config(tmp_path, monkeypatch, extra: str = ""):
    """A train YAML for the tiny model on ArrayDataset (TokenDataset.open is stubbed)."""
    import growfam.data

    monkeypatch.setattr(growfam.data.TokenDataset, "open", classmethod(lambda cls, path: ArrayDataset()))
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {json.dumps(TINY.to_dict())}\ndata: unused\nout_dir: {tmp_path / 'run'}\n"
                    "batch_size: 4\nseq_len: 16\ntensorboard: false\ndevice: cpu\n" + extra)
    return path


@pytest.mark.parametrize("args, message", [
    (["--set", "max_lr=[1,"], re.escape("--set max_lr=[1,: malformed YAML")),
    (["--max-tokens", "nan"], "max_tokens must be a number, got nan"),
    (["--max-tokens", "inf"], "max_tokens must be a number, got inf"),
    (["--max-tokens", "-5"], "max_tokens must be an integer >= 1"),
    (["--max-steps", "-1"], "max_steps must be an integer >= 1"),
    (["--set", "betas=[1.0, 0.95]"], r"betas must each be in \[0, 1\)"),
    (["--device", "banana"], "device must be auto"),
    (["--out-dir", "FILE"], "out_dir .*FILE is not a directory"),
    (["--out-dir", "FILE/run"], "out_dir .*FILE is not a directory"),
    (["--data", "NOTDATA"], "NOTDATA: not a prepared dataset"),
])
def test_cli_train_refuses_bad_input_before_writing(tmp_path, monkeypatch, capsys, args, message):
    from growfam.cli import main

    path = cli_config(tmp_path, monkeypatch, "max_steps: 2\n")
    monkeypatch.undo()  # the real TokenDataset.open, for --data
    (tmp_path / "FILE").write_text("a user's file")
    (tmp_path / "NOTDATA").mkdir()
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("NOTDATA", str(tmp_path / "NOTDATA")) for a in args]
    if "--data" not in args:
        cli_config(tmp_path, monkeypatch, "max_steps: 2\n")
    assert main(["train", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err  # one line, no progress bar: nothing ran
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "FILE").read_text() == "a user's file"


def test_cli_train_with_overrides(tmp_path, monkeypatch, capsys):
    import growfam.data
    from growfam.cli import main

    monkeypatch.setattr(growfam.data.TokenDataset, "open", classmethod(lambda cls, path: ArrayDataset()))
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {json.dumps(TINY.to_dict())}\ndata: unused\nout_dir: {tmp_path / 'run'}\nmax_tokens: 1e9\n"
                    "batch_size: 4\nseq_len: 16\ntensorboard: false\n")
    assert main(["train", str(path), "--max-steps", "2", "--set", "log_every=1", "--device", "cpu"]) == 0
    assert "steps 2  tokens 128" in capsys.readouterr().out
    assert main(["train", str(path), "--max-steps", "2", "--no-resume"]) == 2
    assert main(["train", str(path), "--set", "max_lrr=1"]) == 2
    assert "unknown key 'max_lrr' in the train config" in capsys.readouterr().err


def test_cli_train_under_torchrun_joins_the_process_group(tmp_path):
    """`torchrun -m growfam.cli train` with two gloo ranks: one checkpoint, written by rank 0."""
    import subprocess
    import sys

    from growfam.data import prepare

    prepare([f"line {i} of a small corpus, " * 20 for i in range(200)], "train:300", tmp_path / "ds",
            val_fraction=0.05, progress=False)
    model = TINY.replace(vocab_size=300)
    (tmp_path / "train.yaml").write_text(
        f"model: {json.dumps(model.to_dict())}\ndata: {tmp_path / 'ds'}\nout_dir: {tmp_path / 'run'}\n"
        "max_steps: 3\nbatch_size: 4\nseq_len: 16\ntensorboard: false\neval_every: 0\ndevice: cpu\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "growfam.cli", "train", str(tmp_path / "train.yaml")],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = read_trainer_state(latest_checkpoint(tmp_path / "run"))
    assert (state["step"], state["world_size"]) == (3, 2)
    assert proc.stdout.count("steps 3  tokens 192") == 1  # only rank 0 reports
