"""The training loop: metrics, checkpoints, resume, callbacks, the one-process seam, the command line."""

import json
import math
import os
import re

import shutil

import pytest
import torch

from growfam.train.checkpoint import checkpoint_at, latest_checkpoint, read_trainer_state
from growfam.errors import ConfigError, GrowfamError
from growfam.grow.masks import MaskState, attach_masks, mask_state
from growfam.train.metrics import read_metrics
from growfam.model import Llama, flops_per_token, load_pretrained, num_params
from growfam.train import (Callback, Parallelism, forward_backward, make_optimizer, make_parallelism, train,
                           validation_loss)

from train.support import TINY, ArrayDataset, cli_config, config, step_losses


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


def test_a_wsd_run_logs_its_schedule_and_a_checkpoint_from_before_it_still_resumes(tmp_path):
    import json

    from growfam.train.metrics import read_metrics

    train(config(tmp_path / "w", max_steps=10, lr_schedule="wsd", decay_frac=0.3, warmup_frac=0.2, log_every=1,
                 min_lr_ratio=0.0), dataset=ArrayDataset())
    lrs = [r["lr"] for r in read_metrics(tmp_path / "w" / "run" / "metrics.jsonl") if r.get("event") == "train"]
    peak = 1e-2
    assert lrs[:2] == pytest.approx([peak / 2, peak]) and lrs[2:7] == [peak] * 5
    assert lrs[7:] == pytest.approx([2 * peak / 3, peak / 3, 0.0])
    # the stable checkpoint (step 7) is written and kept; a run killed in the decay resumes exactly
    assert checkpoint_at(tmp_path / "w" / "run", 7) is not None

    def kill_in_decay(step, val_loss):
        raise KeyboardInterrupt

    wsd = config(tmp_path / "k", max_steps=10, lr_schedule="wsd", decay_frac=0.3, warmup_frac=0.2, log_every=1,
                 min_lr_ratio=0.0, eval_every=8, ckpt_every=0, keep_last=1)
    with pytest.raises(KeyboardInterrupt):
        train(wsd, dataset=ArrayDataset(), on_eval=kill_in_decay)
    assert latest_checkpoint(tmp_path / "k" / "run").name == "step_0000007"
    train(wsd, dataset=ArrayDataset())
    assert step_losses(tmp_path / "k" / "run") == step_losses(tmp_path / "w" / "run")
    # a checkpoint written before the schedule keys existed resumes as the cosine run it was
    def kill(step, val_loss):
        raise KeyboardInterrupt

    old = config(tmp_path / "old", max_steps=6, ckpt_every=2, eval_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(old, dataset=ArrayDataset(), on_eval=kill)
    state_file = latest_checkpoint(tmp_path / "old" / "run") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("lr_schedule", "decay_frac", "decay_shape"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="lr_schedule: checkpoint 'cosine', now 'wsd'"):
        train(old.replace(lr_schedule="wsd"), dataset=ArrayDataset())
    assert train(old, dataset=ArrayDataset(), resume=True).steps == 6


def test_averaging_publishes_the_float64_mean_of_the_last_checkpoints(tmp_path):
    from safetensors.torch import load_file

    from growfam.train.average import AVERAGE_DIR

    cfg = config(tmp_path, max_steps=10, lr_schedule="constant", average={"last": 3, "every": 2}, keep_last=1,
                 ckpt_every=0)
    result = train(cfg, dataset=ArrayDataset())
    run = tmp_path / "run"
    assert result.hf_dir == run / AVERAGE_DIR
    kept = [checkpoint_at(run, step) for step in (6, 8, 10)]
    assert all(kept) and checkpoint_at(run, 4) is None  # the averaged ones kept through keep_last 1
    tensors = [load_file(path / "model.safetensors") for path in kept]
    mean = load_file(result.hf_dir / "model.safetensors")
    for name, value in mean.items():
        expected = (sum(t[name].double() for t in tensors) / 3).to(value.dtype)
        assert torch.equal(value, expected), name
    assert not torch.equal(mean["model.norm.weight"], tensors[-1]["model.norm.weight"])
    assert (result.hf_dir / "config.json").is_file()
    # its validation loss is the averaged model's, measured as training measures it
    from growfam.train import validation_loss

    assert result.val_loss == pytest.approx(validation_loss(cfg, load_pretrained(result.hf_dir), ArrayDataset()))
    # given again, the finished run reports the same result; a removed average is written again
    shutil.rmtree(result.hf_dir)
    again = train(cfg, dataset=ArrayDataset())
    assert again.hf_dir == result.hf_dir and again.val_loss == pytest.approx(result.val_loss)
    assert torch.equal(load_file(again.hf_dir / "model.safetensors")["model.norm.weight"], mean["model.norm.weight"])
    with pytest.raises(ConfigError, match="average: 6 checkpoints 2 steps apart need more than 10 steps"):
        train(config(tmp_path / "b", max_steps=10, average={"last": 6, "every": 2}), dataset=ArrayDataset())
    with pytest.raises(ConfigError, match="average.last"):
        config(tmp_path / "c", average={"last": 1})


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

# ---- command line --------------------------------------------------------------------------------

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


@pytest.mark.slow  # several processes
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
