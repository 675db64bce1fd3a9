"""`growfam expand` on Hugging Face directories."""

import json
import os

import pytest
import torch

from conftest import random_model, tiny_config
from growfam.cli import main
from growfam.model import load_pretrained, save_pretrained


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
    (["--to", "tiny-1", "--seed", str(2**64)], "--seed must be a 64-bit integer"),
    (["--to", "tiny-1", "--probe-tokens", str(10**11)], "--probe-tokens must be in [0, 65536]"),
], ids=["operator", "head_dim", "preset", "masked", "seed", "probe-tokens"])
def test_expand_bad_request_exits_2(src_dir, tmp_path, capsys, args, message):
    code = main(["expand", str(src_dir), *args, "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("growfam expand: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "target.yaml"
    path.write_text("d_model: 64\nn_layers: 2\nn_heads: 8\nn_kv_heads: 4\nffn_dim: 128\n"
                    "vocab_size: 61\nmax_seq_len: 32\n")
    return path


def _expand(src_dir, target, out, *extra):
    return main(["expand", str(src_dir), "--to", str(target), "--probe-tokens", "0",
                 "--out", str(out), *extra])


def _one_error_line(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("growfam expand: error:") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_expand_refuses_a_non_empty_out_directory(src_dir, target, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert _expand(src_dir, target, tmp_path / "data") == 2
    _one_error_line(capsys, "is not empty; pass --force to replace it")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]


def test_expand_refuses_an_existing_out_file(src_dir, target, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    assert _expand(src_dir, target, tmp_path / "file.txt") == 2
    _one_error_line(capsys, "already exists as a file; pass --force to replace it")
    assert (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("where", ["source", "inside", "parent"])
def test_expand_never_writes_over_or_into_its_source(src_dir, target, tmp_path, capsys, where, force):
    before = sorted(p.name for p in src_dir.iterdir())
    out = {"source": src_dir, "inside": src_dir / "big", "parent": tmp_path}[where]
    assert _expand(src_dir, target, out, *(["--force"] if force else [])) == 2
    _one_error_line(capsys, "the source directory")
    assert sorted(p.name for p in src_dir.iterdir()) == before
    load_pretrained(src_dir)


def test_expand_writes_into_an_existing_empty_directory(src_dir, target, tmp_path):
    (tmp_path / "empty").mkdir()
    assert _expand(src_dir, target, tmp_path / "empty") == 0
    assert load_pretrained(tmp_path / "empty").cfg.d_model == 64


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_expand_force_replaces_an_existing_out(src_dir, target, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "directory":
        out.mkdir()
        (out / "old.txt").write_text("old")
    else:
        out.write_text("old")
    assert _expand(src_dir, target, out, "--force") == 0
    assert load_pretrained(out).cfg.d_model == 64 and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "target.yaml"]


def test_expand_disk_full_keeps_the_old_out(src_dir, target, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    import growfam.model.hf

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(growfam.model.hf, "save_file", full)
    assert _expand(src_dir, target, out, "--force") == 2
    _one_error_line(capsys, "No space left on device")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "target.yaml"]


@pytest.mark.parametrize("report,message", [
    ("no-such-folder/report.json", "folder"),
    (".", "is a directory"),
    ("out/report.json", "inside --out"),
    ("src/report.json", "the source directory"),
], ids=["no-folder", "directory", "inside-out", "inside-source"])
def test_expand_refuses_a_bad_report_path_before_any_work(src_dir, target, tmp_path, capsys,
                                                          monkeypatch, report, message):
    monkeypatch.chdir(tmp_path)
    assert _expand(src_dir, target, tmp_path / "out", "--report", report) == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_expand_refuses_to_overwrite_a_report_without_force(src_dir, target, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("mine")
    assert _expand(src_dir, target, tmp_path / "out", "--report", str(report)) == 2
    _one_error_line(capsys, "already exists as a file; pass --force")
    assert report.read_text() == "mine" and not (tmp_path / "out").exists()
    assert _expand(src_dir, target, tmp_path / "out", "--report", str(report), "--force") == 0
    assert json.loads(report.read_text())["target"]["d_model"] == 64


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "must be a mapping"),
    ("d_model: 64\nn_layers: -2\nn_heads: 8\nffn_dim: 128\n", "n_layers must be a positive integer"),
    ("d_model: 64\nn_layers: 2\nn_heads: 8\nffn_dim: 128\nnorm_eps: .nan\n", "norm_eps must be a number"),
    ("d_model: 64\nn_layers: 2\nn_heads: 8\nffn_dim: 128\nnorm_eps: 0\n", "norm_eps must be positive"),
    ("d_model: 64\nn_layers: 2\nn_heads: 8\nffn_dim: 128\nwidth: 3\n", "unknown key 'width'"),
], ids=["list", "negative", "nan", "eps0", "unknown"])
def test_expand_refuses_a_malformed_target_config(src_dir, tmp_path, capsys, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    assert _expand(src_dir, tmp_path / "bad.yaml", tmp_path / "out") == 2
    _one_error_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_expand_refuses_an_unreadable_source_in_one_line(src_dir, target, tmp_path, capsys):
    (src_dir / "model.safetensors").write_bytes(b"")
    assert _expand(src_dir, target, tmp_path / "out") == 2
    _one_error_line(capsys, "not a readable safetensors file")


def test_expanded_member_gets_the_umask_permissions(src_dir, target, tmp_path):
    old = os.umask(0o022)
    try:
        assert _expand(src_dir, target, tmp_path / "out") == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    assert {os.stat(p).st_mode & 0o777 for p in (tmp_path / "out").iterdir()} == {0o644}
