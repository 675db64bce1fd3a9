"""`growfam expand` on Hugging Face directories."""

import json

import pytest
import torch

from conftest import random_model, tiny_config
from growfam.cli import main
from growfam.hf import load_pretrained, save_pretrained


@pytest.fixture
def src_dir(tmp_path):
    model = random_model(tiny_config(d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                     vocab_size=61, max_seq_len=32))
    path = save_pretrained(model, tmp_path / "src")
    (path / "tokenizer.json").write_text("{}")
    return path


def test_expand_round_trip(src_dir, tmp_path, capsys):
    target = tmp_path / "target.yaml"
    target.write_text("d_model: 64\nn_layers: 4\nn_heads: 8\nn_kv_heads: 4\nffn_dim: 128\n"
                      "vocab_size: 61\nmax_seq_len: 32\nname: big\n")
    out = tmp_path / "big"
    code = main(["expand", str(src_dir), "--to", str(target), "--width", "hypercloning",
                 "--depth", "identity", "--probe-tokens", "64", "--report",
                 str(tmp_path / "report.json"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "width=hypercloning depth=identity" in printed and "max |Δlogits|" in printed
    grown = load_pretrained(out)
    assert (grown.cfg.d_model, grown.cfg.n_layers, grown.cfg.n_kv_heads) == (64, 4, 4)
    assert (out / "tokenizer.json").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["probe"]["rel_dlogits"] < 1e-5  # exact up to float32 rounding
    tokens = torch.randint(0, 61, (1, 16))
    torch.testing.assert_close(grown(tokens), load_pretrained(src_dir)(tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--to", "tiny-1", "--width", "sideways"], "unknown width operator 'sideways'"),
    (["--to", "tiny-1"], "head_dim (d_model / n_heads) changes from 8 to 16"),
    (["--to", "no-such-preset"], "unknown preset"),
    (["--to", "tiny-1", "--width", "masked"], "masks"),
], ids=["operator", "head_dim", "preset", "masked"])
def test_expand_bad_request_exits_2(src_dir, tmp_path, capsys, args, message):
    code = main(["expand", str(src_dir), *args, "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("growfam expand: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
