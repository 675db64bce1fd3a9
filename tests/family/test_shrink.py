"""`growfam shrink`: importance, pruning and recovery end to end; a killed recovery resumes bit for
bit; Llama (llama3 RoPE), Qwen2 and Mistral directories made by transformers shrink into
directories transformers loads as their own type; bad input is one line, exit 2, before any
write."""

import json
import shutil

import pytest
import torch
from conftest import checksums, dataset_and_model, documents
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import growfam.family.shrink as shrink_module
from growfam.cli import main
from growfam.data import prepare
from growfam.family.shrink import ShrinkOptions, shrink_directory
from growfam.model import ModelConfig, copy_tokenizer_files, load_pretrained
from growfam.train.callbacks import Callback

TEXT = documents()
SOURCE = dict(name="big", d_model=64, n_heads=4, n_kv_heads=2, n_layers=3, ffn_dim=96, vocab_size=300, max_seq_len=64)
TARGET = "d_model=48,n_heads=2,n_kv_heads=1,n_layers=2,ffn_dim=64"
RECOVER = ["--recover", "kd", "--tokens", "1024", "--batch-size", "4", "--seq-len", "32", "--calibration", "8",
           "--eval-windows", "4", "--set", "eval_every=2", "--set", "ckpt_every=2", "--set", "eval_batches=1",
           "--set", "log_every=1", "--set", "tensorboard=false"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A prepared dataset and a source model saved with its tokenizer."""
    return dataset_and_model(tmp_path_factory.mktemp("shrink"), ModelConfig(**SOURCE), "big", seed=1, val_fraction=0.1)


def test_shrink_prunes_recovers_by_distillation_and_a_rerun_does_nothing(made, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["shrink", str(made / "big"), "--to", TARGET, "--data", str(made / "ds"), "--out", str(out),
                 *RECOVER]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss: source" in printed and "recovery (kd): 1,024 tokens" in printed
    record = json.loads((out / "shrink.json").read_text())
    assert record["done"] and set(record["held_out"]) == {"source", "pruned", "recovered"}
    assert record["recovery"]["flops_teacher"] > 0 and record["recovery"]["steps"] == 8
    model = load_pretrained(out / "model")
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.ffn_dim) == (48, 2, 1, 64)
    assert record["params"]["pruned_total"] == sum(p.numel() for p in model.parameters())
    pruned = load_pretrained(out / "pruned")
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))
    importance = json.loads((out / "importance.json").read_text())
    assert len(importance["scores"]["hidden"]) == 64 and len(importance["kept"]["hidden"]) == 48
    assert (out / "model" / "tokenizer.json").is_file()
    # the same command again: reported, nothing rebuilt
    before = checksums(out)
    assert main(["shrink", str(made / "big"), "--to", TARGET, "--data", str(made / "ds"), "--out", str(out),
                 *RECOVER]) == 0
    assert "done earlier" in capsys.readouterr().out and checksums(out) == before


class _Kill(Callback):
    def on_step_end(self, run):
        if run.state.step == 5:
            raise KeyboardInterrupt


def test_a_killed_recovery_resumes_bit_for_bit(made, tmp_path, monkeypatch):
    opts = ShrinkOptions(calibration=8, seq_len=32, recover="ce", tokens=1024, eval_windows=4,
                         train={"batch_size": 4, "eval_every": 2, "ckpt_every": 2, "eval_batches": 1,
                                "tensorboard": False})
    args = (str(made / "big"), TARGET, str(made / "ds"))
    whole = shrink_directory(*args, str(tmp_path / "whole"), opts, log=lambda s: None, progress=False)
    real = shrink_module.train
    monkeypatch.setattr(shrink_module, "train", lambda *a, **k: real(*a, **k, callbacks=[_Kill()]))
    with pytest.raises(KeyboardInterrupt):
        shrink_directory(*args, str(tmp_path / "killed"), opts, log=lambda s: None, progress=False)
    assert not json.loads((tmp_path / "killed" / "shrink.json").read_text())["done"]
    monkeypatch.setattr(shrink_module, "train", real)
    resumed = shrink_directory(*args, str(tmp_path / "killed"), opts, log=lambda s: None, progress=False)
    assert resumed["held_out"] == whole["held_out"] and resumed["recovery"]["flops_teacher"] == 0
    a, b = load_pretrained(tmp_path / "whole" / "model"), load_pretrained(tmp_path / "killed" / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
TRANSFORMERS = {
    "llama-llama3": (LlamaForCausalLM, LlamaConfig(**SHAPE, rope_parameters=LLAMA3)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, tie_word_embeddings=True, use_sliding_window=False)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=None)),
}


@pytest.mark.parametrize("kind", TRANSFORMERS)
def test_transformers_directories_shrink_into_their_own_type(made, tmp_path, kind):
    cls, hf_cfg = TRANSFORMERS[kind]
    torch.manual_seed(0)
    cls(hf_cfg).save_pretrained(tmp_path / "src")
    copy_tokenizer_files(made / "ds" / "tokenizer", tmp_path / "src")
    assert main(["shrink", str(tmp_path / "src"), "--to", TARGET, "--data", str(made / "ds"), "--out",
                 str(tmp_path / "out"), "--calibration", "4", "--seq-len", "32", "--eval-windows", "2"]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    assert type(theirs) is cls and theirs.config.hidden_size == 48 and theirs.config.num_hidden_layers == 2
    source_hf = json.loads((tmp_path / "src" / "config.json").read_text())
    shrunk_hf = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert shrunk_hf.get("rope_scaling") == source_hf.get("rope_scaling")  # llama3 RoPE kept as it was
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        ours = load_pretrained(tmp_path / "out" / "model")(idx)
        assert (theirs(idx).logits - ours).abs().max().item() <= 1e-4


def _write_other_tokenizer_data(root):
    prepare([t.replace("fox", "cat") for t in TEXT], "train:280", root / "other", val_fraction=0.1, progress=False)


@pytest.mark.parametrize("extra, message", [
    (["--to", "d_model=96"], "larger than the source's .*use expand"),
    (["--to", "n_heads=3,n_kv_heads=1"], "pruning keeps whole GQA groups"),
    (["--to", "depth=2"], "expected FIELD=N"),
    (["--to", "n_layers=two"], "n_layers must be a whole number"),
    (["--to", "n_layers=2", "--depth", "none"], "depth rule none keeps all 3 layers"),
    (["--to", TARGET, "--width", "gradient"], "--width must be one of importance, magnitude, random"),
    (["--to", TARGET, "--recover", "kd"], "--recover kd|ce needs --tokens"),
    (["--to", TARGET, "--tokens", "100"], "--tokens needs --recover"),
    (["--to", TARGET, "--set", "max_lr=1e-3"], "max_lr: recovery settings need --recover"),
    (["--to", TARGET, "--calibration", "0"], "--calibration must be a whole number ≥ 1"),
    (["--to", TARGET, "--seq-len", "65"], "seq_len 65 exceeds the source"),
    (["--to", TARGET, "--recover", "ce", "--tokens", "1000", "--seq-len", "32", "--set", "distill={weight: 1}"],
     "distill settings are for --recover kd"),
    (["--to", TARGET, "--recover", "kd", "--tokens", "10", "--seq-len", "32", "--set", "batch_size=0"], "batch_size"),
    (["--to", TARGET, "--data", "OTHER"], "another tokenizer than the dataset"),
    (["--to", TARGET, "--set", "device=nowhere"], "device"),
    (["--to", TARGET, "--data", "MISSING"], "nowhere: not a prepared dataset"),
    (["--to", TARGET, "--seq-len", "64", "--data", "SHORT"], "the calibration set is empty"),
])
def test_bad_input_is_one_line_before_any_write(made, tmp_path, capsys, extra, message):
    if "OTHER" in extra and not (made / "other").is_dir():
        _write_other_tokenizer_data(made)
    if "SHORT" in extra and not (made / "short").is_dir():  # the same tokenizer, a train split of a few tokens
        prepare([f"tiny {i}" for i in range(4)] + ["a much longer document 0 " * 30], str(made / "ds" / "tokenizer"),
                made / "short", val_fraction=0.3, progress=False)
    names = {"OTHER": str(made / "other"), "MISSING": str(tmp_path / "nowhere"), "SHORT": str(made / "short")}
    extra = [names.get(a, a) for a in extra]
    data = [] if "--data" in extra else ["--data", str(made / "ds")]
    before = checksums(made / "big")
    assert main(["shrink", str(made / "big"), *data, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists() and checksums(made / "big") == before


def test_outputs_are_never_replaced_without_force_and_only_a_shrink_with_it(made, tmp_path, capsys):
    base = ["shrink", str(made / "big"), "--to", TARGET, "--data", str(made / "ds"), "--calibration", "4",
            "--seq-len", "32", "--eval-windows", "2"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*base, "--out", str(mine), "--force"]) == 2 and (mine / "notes.txt").read_text() == "mine"
    assert "growfam did not make" in capsys.readouterr().err
    assert main([*base, "--out", str(made / "big")]) == 2  # the source itself
    out = tmp_path / "out"
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--out", str(out), "--width", "magnitude"]) == 2
    assert "other settings (width)" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--width", "magnitude", "--force"]) == 0
    assert json.loads((out / "shrink.json").read_text())["settings"]["width"] == "magnitude"
    for damaged, message in (("{broken", "malformed JSON"), ("[1, 2]", "is not a shrink record growfam wrote")):
        (out / "shrink.json").write_text(damaged)
        before = checksums(out)
        assert main([*base, "--out", str(out), "--width", "magnitude"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and checksums(out) == before
    shutil.rmtree(out)
