"""A family given its first member (`start_from: DIR`): stage 1 is the checkpoint, later stages
grow from it on Eq. 4 budgets that count it as given; bad inputs are one line before any work."""

import math

import pytest
import torch
import yaml
from conftest import dataset_and_model, documents

from growfam.cli import main
from growfam.config import FamilyConfig
from growfam.data import prepare
from growfam.errors import ConfigError
from growfam.family import make_plan, run_family
from growfam.model import ModelConfig, load_pretrained

TEXT = documents()
SMALL = dict(name="small", d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=64, vocab_size=300, max_seq_len=32)
LARGE = dict(name="large", d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, ffn_dim=96, vocab_size=300, max_seq_len=32)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A prepared dataset, and a checkpoint saved by growfam with that dataset's tokenizer."""
    return dataset_and_model(tmp_path_factory.mktemp("start"), ModelConfig(**SMALL), "released", seed=3)


def spec(made, **changes) -> dict:
    data = dict(name="pair", start_from=str(made / "released"), members=[str(made / "released"), LARGE],
                tokens={"explicit": [4000, 8000]}, batch_size=4, seq_len=32,
                growth={"width": "lossless", "depth": "identity"},
                train={"eval_every": 4, "eval_batches": 2, "ckpt_every": 4, "log_every": 4})
    data.update(changes)
    return data


def test_plan_counts_the_given_member_in_eq4_only(made):
    family = FamilyConfig.from_dict(spec(made))
    assert family.members[0].name == "small"  # the name growfam wrote into config.json
    scratch = make_plan(FamilyConfig.from_dict({**spec(made), "members": [SMALL, LARGE]} | {"start_from": None}))
    plan = make_plan(family)
    first, second = plan.stages
    assert (first.tokens_progressive, first.tokens_independent, first.flops_progressive) == (0, 0, 0)
    assert first.given_tokens == 4000 and first.given_flops == 6 * first.params * 4000
    # later budgets are what they would be had the family trained member 1 itself
    assert second.tokens_progressive == scratch.stages[1].tokens_progressive
    assert second.cum_flops_progressive == pytest.approx(second.flops_independent)
    assert plan.flops_progressive == pytest.approx(second.flops_independent - first.given_flops)
    continued = make_plan(FamilyConfig.from_dict(spec(made, start_from_tokens=1000)))
    assert continued.stages[0].tokens_progressive == continued.stages[0].tokens_independent == 1000
    assert continued.stages[1].tokens_progressive == pytest.approx(8000 - 5000 * first.params / second.params)


def test_a_family_grows_from_a_given_checkpoint(made, tmp_path):
    family = FamilyConfig.from_dict(spec(made))
    ledger = run_family(family, tmp_path, data=str(made / "ds"), log=lambda s: None)
    given = load_pretrained(made / "released")
    idx = torch.randint(0, 300, (1, 16))
    for mode in ("progressive", "independent"):
        first, second = ledger.members(mode)
        assert (first.name, first.tokens, first.flops, first.steps) == ("small", 0, 0, 0)
        assert first.given["tokens"] == 4000 and first.cum_flops == first.given["flops"]
        published = load_pretrained(tmp_path / mode / "small")
        assert all(torch.equal(a, b) for a, b in zip(published.state_dict().values(), given.state_dict().values()))
        assert (tmp_path / mode / "small" / "tokenizer.json").is_file()
        assert second.tokens > 0 and second.val_loss is not None
    # the given member is measured once, on the family's validation windows, for both modes
    losses = [ledger.members(mode)[0].val_loss for mode in ("progressive", "independent")]
    assert losses[0] == losses[1] and abs(losses[0] - math.log(300)) < 1  # a random model: about ln V
    # the grown member starts as the given one's function (lossless + identity)
    assert ledger.members("progressive")[1].growth["probe"]["max_abs_dlogits"] < 1e-4
    assert ledger.members("independent")[1].growth is None
    prog = ledger.members("progressive")
    assert prog[1].cum_flops == pytest.approx(make_plan(family).stages[1].flops_independent, rel=0.05)
    with torch.no_grad():
        assert torch.isfinite(load_pretrained(tmp_path / "progressive" / "large")(idx)).all()


def test_a_given_checkpoint_can_be_continued(made, tmp_path):
    family = FamilyConfig.from_dict(spec(made, start_from_tokens=256))
    ledger = run_family(family, tmp_path, data=str(made / "ds"), modes=("progressive",), log=lambda s: None)
    first = ledger.members("progressive")[0]
    assert first.tokens == 256 and first.steps == 2 and first.val_loss is not None
    assert first.cum_flops == first.given["flops"] + first.flops
    trained = load_pretrained(tmp_path / "progressive" / "small")
    assert not torch.equal(trained.embed_tokens.weight, load_pretrained(made / "released").embed_tokens.weight)


@pytest.mark.slow  # several processes
def test_a_given_checkpoint_starts_a_family_under_torchrun(made, tmp_path):
    """`torchrun --nproc_per_node 2 -m growfam family run` with start_from, FSDP2: every rank reads
    the given checkpoint and they measure it together, rank 0 grows it and the ranks train the
    grown member; both modes give the losses and members of one plain process."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from train.test_parallel import assert_same_weights

    plain = spec(made)
    plain["train"].update(device="cpu", tensorboard=False)
    sharded = {**plain, "train": {**plain["train"], "parallel": {"strategy": "fsdp"}}}
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(sharded))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "growfam", "family", "run", str(tmp_path / "pair.yaml"), "--out", str(tmp_path / "two"),
                           "--data", str(made / "ds"), "--mode", "both"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_family(FamilyConfig.from_dict(plain), tmp_path / "one", data=str(made / "ds"), log=lambda s: None)
    one, two = (json.loads((tmp_path / d / "family.json").read_text())["modes"] for d in ("one", "two"))
    for mode in ("progressive", "independent"):
        for a, b in zip(one[mode], two[mode], strict=True):
            assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
            assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
            assert_same_weights(load_file(str(tmp_path / "two" / mode / a["name"] / "model.safetensors")),
                                load_file(str(tmp_path / "one" / mode / a["name"] / "model.safetensors")))
    assert two["progressive"][0]["steps"] == 0 and two["progressive"][1]["growth"]["width"] == "lossless"


def _cli(tmp_path, made, capsys, **changes) -> tuple[int, str]:
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(spec(made, **changes)))
    code = main(["family", "run", str(path), "--out", str(tmp_path / "out"), "--data", str(made / "ds")])
    return code, capsys.readouterr().err.strip()


def test_bad_start_from_is_one_line_before_any_work(made, tmp_path, capsys):
    code, err = _cli(tmp_path, made, capsys, start_from=str(tmp_path / "missing"))
    assert code == 2 and "no such directory" in err and len(err.splitlines()) == 1
    code, err = _cli(tmp_path, made, capsys, members=[dict(SMALL, d_model=48, n_heads=3), LARGE])
    assert code == 2 and "d_model 32 there, 48 here" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((made / "released" / "config.json").read_text())
    code, err = _cli(tmp_path, made, capsys, start_from=str(tmp_path / "empty"))
    assert code == 2 and "no model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_a_dataset_of_another_tokenizer_is_refused(made, tmp_path, capsys):
    prepare(TEXT, "train:280", tmp_path / "other", val_fraction=0.05, progress=False)
    with pytest.raises(ConfigError, match="not tokenized with start_from"):
        run_family(FamilyConfig.from_dict(spec(made)), tmp_path / "out", data=str(tmp_path / "other"))
    assert not (tmp_path / "out").exists()


#: transformers-made stand-ins: Qwen2 (q/k/v biases, tied embeddings) and Mistral (untied, a
#: sliding window that covers the context, Llama 3 RoPE scaling).
RELEASED = {
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, use_sliding_window=False), {"tie_embeddings": True}),
    "mistral": ("Mistral", dict(sliding_window=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), {}),
}


@pytest.mark.parametrize("kind", RELEASED)
def test_a_released_checkpoint_from_transformers_starts_a_family_of_its_type(made, tmp_path, kind):
    """A released-model stand-in made by transformers itself: both modes' larger members are of
    its type too (biases, RoPE scaling and window carried over), the progressive one grown
    exactly, and transformers loads them as their class with growfam's logits."""
    import shutil

    import transformers

    prefix, hf_options, large = RELEASED[kind]
    torch.manual_seed(0)
    hf = getattr(transformers, f"{prefix}Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=300, max_position_embeddings=32, **hf_options)
    released = tmp_path / kind
    getattr(transformers, f"{prefix}ForCausalLM")(hf).save_pretrained(released)
    for f in (made / "ds" / "tokenizer").iterdir():
        shutil.copy(f, released / f.name)
    family = FamilyConfig.from_dict(spec(made, start_from=str(released), members=[str(released), {**LARGE, **large}]))
    first, second = family.members
    assert second.model_type == kind and second.qkv_bias == (kind == "qwen2")
    assert (second.rope_scaling, second.sliding_window) == (first.rope_scaling, first.sliding_window)
    assert kind != "mistral" or (second.rope_scaling["rope_type"], second.sliding_window) == ("llama3", 32)
    ledger = run_family(family, tmp_path / "fam", data=str(made / "ds"), log=lambda s: None)
    assert ledger.members("progressive")[1].growth["probe"]["max_abs_dlogits"] < 1e-4
    idx = torch.randint(0, 300, (1, 16))
    for mode in ("progressive", "independent"):
        member = tmp_path / "fam" / mode / "large"
        theirs = transformers.AutoModelForCausalLM.from_pretrained(member).eval()
        assert type(theirs).__name__ == f"{prefix}ForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(theirs(idx).logits, load_pretrained(member)(idx), rtol=1e-4, atol=1e-4)
