"""Distillation in the trainer (train/distill.py, train/teacher.py, the `distill:` section): the
chunked loss against a float64 full-logit reference, α's schedule, the plain run at α = 0, a
student equal to its teacher, resuming, several processes, and bad input."""

import json
import re
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from growfam.errors import ConfigError
from growfam.model import Llama, flops_per_token, num_params, save_pretrained
from growfam.train import train
from growfam.train.checkpoint import latest_checkpoint
from growfam.train.distill import DistillConfig, distill_loss
from growfam.train.metrics import read_metrics

from train.support import TINY, ArrayDataset, cli_config, config, step_losses

BIGGER = TINY.replace(d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=128, n_layers=3)


def reference(h, weight, teacher_h, teacher_weight, targets, kind, temperature, top_k, alpha):
    """The loss from whole float64 logits, the probabilities written out."""
    z, zt = (h @ weight.T) / temperature, (teacher_h @ teacher_weight.T) / temperature
    if top_k:
        zt, ids = zt.topk(top_k, dim=-1)
        z = z.gather(-1, ids)
    p, q = torch.softmax(zt, -1), torch.softmax(z, -1)
    if kind == "forward":
        d = (p * torch.log(p / q)).sum(-1)
    elif kind == "reverse":
        d = (q * torch.log(q / p)).sum(-1)
    else:
        m = (p + q) / 2
        d = 0.5 * (p * torch.log(p / m)).sum(-1) + 0.5 * (q * torch.log(q / m)).sum(-1)
    ce = F.cross_entropy(h @ weight.T, targets)
    return (1 - alpha) * ce + alpha * temperature ** 2 * d.mean(), ce, d.mean()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_the_chunked_loss_and_its_gradients_equal_a_float64_full_logit_reference(kind, top_k, chunk):
    g = torch.Generator().manual_seed(3)
    n, d, dt, vocab = 23, 8, 12, 40
    h = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=g, requires_grad=True)
    teacher_h = torch.randn(n, dt, dtype=torch.float64, generator=g)
    teacher_weight = torch.randn(vocab, dt, dtype=torch.float64, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    spec = DistillConfig(teacher="t", kind=kind, temperature=1.7, top_k=top_k)
    loss, parts = distill_loss(h, weight, teacher_h, teacher_weight, targets, spec, 0.3, chunk)
    grads = torch.autograd.grad(loss * 2.5, (h, weight))  # an upstream gradient other than 1
    expected, ce, div = reference(h, weight, teacher_h, teacher_weight, targets, kind, 1.7, top_k, 0.3)
    expected_grads = torch.autograd.grad(expected * 2.5, (h, weight))
    assert div.item() > 0.05  # the two distributions differ: a real comparison
    assert abs(loss.item() - expected.item()) <= 1e-9
    assert parts.tolist() == pytest.approx([ce.item(), div.item()], abs=1e-9)
    for got, want in zip(grads, expected_grads):
        assert (got - want).abs().max().item() <= 1e-9
    with torch.no_grad():  # evaluation: the same value, no gradient kept
        assert abs(distill_loss(h, weight, teacher_h, teacher_weight, targets, spec, 0.3, chunk)[0].item()
                   - expected.item()) <= 1e-9


def test_alpha_holds_until_then_falls_to_zero_over_the_ramp():
    spec = DistillConfig(teacher="t", weight=0.8, until=0.5, ramp=0.25)
    assert [spec.alpha(s, 8) for s in range(8)] == pytest.approx([0.8] * 4 + [0.8, 0.4, 0, 0])
    assert [DistillConfig(teacher="t", weight=0.8, until=0.5, ramp=0).alpha(s, 8) for s in (3, 4)] == [0.8, 0]
    assert {DistillConfig(teacher="t", weight=0.6).alpha(s, 8) for s in range(8)} == {0.6}


# ---- in the loop ----------------------------------------------------------------------------


def _teacher(path, cfg=TINY, seed=0):
    torch.manual_seed(seed)
    save_pretrained(Llama(cfg), path)
    return str(path)


def _weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def _train_lines(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "train")}


def test_alpha_zero_reproduces_a_plain_run_bit_for_bit(tmp_path):
    teacher = _teacher(tmp_path / "teacher", BIGGER, seed=5)
    plain = train(config(tmp_path / "plain"), dataset=ArrayDataset())
    zero = train(config(tmp_path / "zero", distill={"teacher": teacher, "weight": 0}), dataset=ArrayDataset())
    a, b = _weights(tmp_path / "plain" / "run"), _weights(tmp_path / "zero" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_losses(tmp_path / "plain" / "run") == step_losses(tmp_path / "zero" / "run")
    assert zero.val_loss == plain.val_loss and zero.flops_teacher == 0
    assert {r["kl"] for r in _train_lines(tmp_path / "zero" / "run").values()} == {None}


def test_a_student_equal_to_its_teacher_starts_at_kl_zero_and_the_ledger_counts_the_teacher(tmp_path):
    # the student is Llama(TINY) seeded with the run's seed (0): the teacher is the same model
    teacher = _teacher(tmp_path / "teacher", TINY, seed=0)
    result = train(config(tmp_path, distill={"teacher": teacher, "weight": 0.5, "temperature": 2.0},
                          spike_factor=None), dataset=ArrayDataset())
    lines = _train_lines(tmp_path / "run")
    assert lines[1]["kl"] == 0.0  # the same logits, exactly
    assert all(lines[s]["kl"] > 0 for s in range(2, 9))  # once the student has moved
    assert lines[1]["loss"] == pytest.approx(0.5 * lines[1]["ce"], rel=1e-6)
    tokens = 8 * 4 * 16
    assert result.flops_teacher == 2 * num_params(TINY, "nonembedding") * tokens
    ledger = json.loads((result.hf_dir / "trainer_state.json").read_text())["ledger"]
    assert ledger["flops_teacher_attn"] == flops_per_token(TINY, 16) // 3 * tokens
    assert ledger["flops"] == 6 * num_params(TINY, "nonembedding") * tokens  # the student's alone


def test_distillation_alone_pulls_the_student_toward_its_teacher(tmp_path):
    teacher = _teacher(tmp_path / "teacher", BIGGER, seed=7)
    train(config(tmp_path, max_steps=24, distill={"teacher": teacher, "weight": 1.0}, spike_factor=None,
                 eval_every=0), dataset=ArrayDataset())
    kl = {s: r["kl"] for s, r in _train_lines(tmp_path / "run").items()}
    assert kl[24] < 0.5 * kl[1], kl


def test_a_killed_distillation_run_resumes_exactly(tmp_path):
    teacher = _teacher(tmp_path / "teacher", BIGGER, seed=5)
    spec = {"teacher": teacher, "weight": 0.7, "until": 0.5, "ramp": 0.25, "kind": "jsd", "top_k": 20}
    straight = train(config(tmp_path / "a", distill=spec, log_every=3, eval_every=6), dataset=ArrayDataset())

    def kill(step, val_loss):
        raise KeyboardInterrupt  # at step 6, past the checkpoint at 4, inside α's ramp

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b", distill=spec, log_every=3, eval_every=6), dataset=ArrayDataset(), on_eval=kill)
    resumed = train(config(tmp_path / "b", distill=spec, log_every=3, eval_every=6), dataset=ArrayDataset())
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _train_lines(tmp_path / "a" / "run").keys() == {3, 6, 8}
    for step, line in _train_lines(tmp_path / "a" / "run").items():
        got = _train_lines(tmp_path / "b" / "run")[step]
        assert {k: got[k] for k in ("loss", "ce", "kl", "alpha")} == {k: line[k] for k in ("loss", "ce", "kl", "alpha")}
    assert resumed.flops_teacher == straight.flops_teacher > 0


# ---- several processes ------------------------------------------------------------------------

RUN = dict(max_steps=6, ckpt_every=3, max_lr=1e-3, batch_size=4, micro_batch_size=1, spike_factor=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(rank: int, port: int, root: str, teacher: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for strategy in ("ddp", "fsdp"):
            train(config(Path(root) / strategy, **RUN, parallel={"strategy": strategy, "loss_chunk": 5},
                         distill={"teacher": teacher, "weight": 0.6, "temperature": 2.0}), dataset=ArrayDataset())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # several processes
def test_ddp_and_fsdp_with_a_teacher_match_one_process(tmp_path):
    teacher = _teacher(tmp_path / "teacher", BIGGER, seed=5)
    spec = {"teacher": teacher, "weight": 0.6, "temperature": 2.0}
    train(config(tmp_path / "one", **RUN, distill=spec), dataset=ArrayDataset())
    torch.multiprocessing.spawn(_ranks, args=(_free_port(), str(tmp_path), teacher), nprocs=2)
    one = _train_lines(tmp_path / "one" / "run")
    for strategy in ("ddp", "fsdp"):
        lines = _train_lines(tmp_path / strategy / "run")
        assert lines.keys() == one.keys() == set(range(1, 7))
        for step in one:
            for key in ("loss", "ce", "kl"):
                assert lines[step][key] == pytest.approx(one[step][key], abs=1e-5), (strategy, step, key)
        a, b = _weights(tmp_path / strategy / "run"), _weights(tmp_path / "one" / "run")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


# ---- bad input ----------------------------------------------------------------------------------


def _tokenizer_teacher(path):
    from growfam.data import load_tokenizer

    torch.manual_seed(0)
    save_pretrained(Llama(TINY), path, tokenizer=load_tokenizer("gpt2"))
    return str(path)


@pytest.mark.parametrize("spec, message", [
    ({"teacher": "MISSING"}, "distill.teacher: .*missing: not a directory"),
    ({"teacher": "NOTMODEL"}, "distill.teacher: .*notmodel: a directory with no config.json"),
    ({"teacher": "OTHERVOCAB"}, "has a vocabulary of 256 tokens, the student 128"),
    ({"teacher": "SHORT"}, "seq_len 16 exceeds the teacher .*short.s max_seq_len 8"),
    ({"teacher": "TEACHER", "weight": 1.5}, r"distill.weight must be in \[0, 1\], got 1.5"),
    ({"teacher": "TEACHER", "weight": float("nan")}, "distill.weight must be a number, got nan"),
    ({"teacher": "TEACHER", "temperature": 0}, "distill.temperature must be positive, got 0"),
    ({"teacher": "TEACHER", "until": 0}, "distill.until must be positive"),
    ({"teacher": "TEACHER", "until": 1.5}, r"distill.until is a fraction of the run in \(0, 1\], got 1.5"),
    ({"teacher": "TEACHER", "kind": "kl"}, "distill.kind must be forward or reverse or jsd, got .kl."),
    ({"teacher": "TEACHER", "top_k": 0}, "distill.top_k must be an integer >= 1"),
    ({"teacher": "TEACHER", "alpha": 0.5}, "unknown key.*alpha"),
    ({"weight": 0.5}, "distill.teacher must be a model directory, got None"),
])
def test_bad_distillation_input_is_one_line_before_any_write(tmp_path, spec, message):
    paths = {"MISSING": tmp_path / "missing", "NOTMODEL": tmp_path / "notmodel",
             "OTHERVOCAB": _teacher(tmp_path / "othervocab", TINY.replace(vocab_size=256)),
             "SHORT": _teacher(tmp_path / "short", TINY.replace(max_seq_len=8)),
             "TEACHER": _teacher(tmp_path / "teacher")}
    (tmp_path / "notmodel").mkdir()
    spec = {k: str(paths.get(v, v)) if k == "teacher" else v for k, v in spec.items()}
    with pytest.raises(ConfigError, match=message) as err:
        train(config(tmp_path, distill=spec), dataset=ArrayDataset())
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    class Prepared(ArrayDataset):
        tokenizer_fingerprint = "not gpt2's"
        path = "DATA"

    teacher = _tokenizer_teacher(tmp_path / "teacher")
    with pytest.raises(ConfigError, match="has another tokenizer than the dataset DATA was prepared with"):
        train(config(tmp_path, distill={"teacher": teacher}), dataset=Prepared())
    no_tokenizer = _teacher(tmp_path / "bare")
    with pytest.raises(ConfigError, match="holds no tokenizer, so it cannot be checked"):
        train(config(tmp_path, distill={"teacher": no_tokenizer}), dataset=Prepared())
    assert not (tmp_path / "run").exists()


def test_cli_train_with_a_bad_teacher_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    from growfam.cli import main

    path = cli_config(tmp_path, monkeypatch, f"max_steps: 2\ndistill: {{teacher: {tmp_path / 'nowhere'}}}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search("distill.teacher: .*nowhere: not a directory", err), err
    assert main(["train", str(path), "--set", f"distill={{teacher: {tmp_path}, weight: -1}}"]) == 2
    assert "distill.weight must be in [0, 1], got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compile_with_a_teacher_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("compile: true does not cover a distillation loss")):
        config(tmp_path, compile=True, distill={"teacher": str(tmp_path)})


def test_a_resume_may_find_the_teacher_elsewhere_but_not_change_its_settings(tmp_path):
    import shutil

    teacher = _teacher(tmp_path / "teacher", BIGGER, seed=5)

    def kill(step, val_loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, distill={"teacher": teacher}, eval_every=6), dataset=ArrayDataset(), on_eval=kill)
    with pytest.raises(ConfigError, match="distill: checkpoint"):
        train(config(tmp_path, distill={"teacher": teacher, "weight": 0.9}), dataset=ArrayDataset())
    moved = shutil.move(teacher, tmp_path / "moved")
    assert train(config(tmp_path, distill={"teacher": str(moved)}), dataset=ArrayDataset()).steps == 8
