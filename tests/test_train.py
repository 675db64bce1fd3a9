"""The training loop: schedule, optimizer groups, accumulation, resume, spike guard, checkpoints."""

import errno
import json
import math
import os

import numpy as np
import pytest
import torch

import growfam.checkpoint as checkpoint_module
from growfam.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
from growfam.errors import ConfigError, GrowfamError
from growfam.grow.masks import MaskState, attach_masks, mask_state
from growfam.hf import load_pretrained
from growfam.metrics import read_metrics
from growfam.model import Llama, ModelConfig, flops_per_token, num_params
from growfam.train import TrainConfig, forward_backward, lr_at, lr_bounds, param_groups, train

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a busy shared machine cannot stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    def loss(x, y):
        count[0] += 1
        value = original(x, y)
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


def test_a_given_model_must_match_the_config(tmp_path):
    with pytest.raises(ConfigError, match="not the configured one"):
        train(config(tmp_path), Llama(TINY.replace(d_model=64, n_heads=4)), dataset=ArrayDataset())


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
