"""`growfam expand` on Hugging Face directories."""

import json
import os
import shutil

import pytest
import torch

from conftest import random_model, tiny_config
from growfam.cli import main
from growfam.model import load_pretrained, resolve_config, save_pretrained


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


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_expand_never_replaces_a_users_folder_or_file(src_dir, target, tmp_path, capsys, force):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    for out, kind in ((tmp_path / "data", "a folder growfam did not make"), (tmp_path / "file.txt", "a file")):
        assert _expand(src_dir, target, out, *(["--force"] if force else [])) == 2
        _one_error_line(capsys, f"is {kind}; growfam replaces only a model directory there, even with --force")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]
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


def test_expand_force_replaces_a_model_directory_only(src_dir, target, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(src_dir, out)
    assert _expand(src_dir, target, out) == 2
    _one_error_line(capsys, "already exists as a model directory; pass --force to replace it")
    assert _expand(src_dir, target, out, "--force") == 0
    assert load_pretrained(out).cfg.d_model == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "target.yaml"]


def test_expand_disk_full_keeps_the_old_out(src_dir, target, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(src_dir, out)
    (out / "old.txt").write_text("old")
    import growfam.model.hf

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(growfam.model.hf, "save_file", full)
    assert _expand(src_dir, target, out, "--force") == 2
    _one_error_line(capsys, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in src_dir.iterdir()), "old.txt"])
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


# --------------------------------------------------------------------------------------------
# Several sources: growfam expand A B --to ... [--combine depth|width]
# --------------------------------------------------------------------------------------------


def _source(path, seed, **changes):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61, max_seq_len=32)
    model = random_model(tiny_config(**{**base, **changes}), seed=seed)
    save_pretrained(model, path)
    (path / "tokenizer.json").write_text('{"shared": true}')
    return path


@pytest.fixture
def two_sources(tmp_path):
    return _source(tmp_path / "a", seed=1), _source(tmp_path / "b", seed=2)


def test_expand_two_sources_by_depth(two_sources, tmp_path, capsys):
    a, b = two_sources
    target = tmp_path / "target.yaml"
    target.write_text("d_model: 32\nn_layers: 4\nn_heads: 4\nn_kv_heads: 2\nffn_dim: 64\n"
                      "vocab_size: 61\nmax_seq_len: 32\n")
    code = main(["expand", str(a), str(b), "--to", str(target), "--combine", "depth",
                 "--depth", "identity", "--probe-tokens", "64", "--report",
                 str(tmp_path / "report.json"), "--out", str(tmp_path / "out")])
    assert code == 0
    assert "combined from 2 sources by depth" in capsys.readouterr().out
    grown = load_pretrained(tmp_path / "out")
    want = {k: v for k, v in resolve_config(target).to_dict().items() if k != "name"}
    assert {k: v for k, v in grown.cfg.to_dict().items() if k != "name"} == want
    # the layers interleave A0 B0 A1 B1; the primary (a) gives the embedding and the tokenizer
    source_a, source_b = load_pretrained(a), load_pretrained(b)
    for j, (model, layer) in enumerate([(source_a, 0), (source_b, 0), (source_a, 1), (source_b, 1)]):
        assert torch.equal(grown.layers[j].mlp.up_proj.weight, model.layers[layer].mlp.up_proj.weight)
    assert torch.equal(grown.embed_tokens.weight, source_a.embed_tokens.weight)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"shared": true}'
    assert "combined from 2 sources" in " ".join(json.loads((tmp_path / "report.json").read_text())["notes"])


def test_expand_two_sources_by_width_then_grown(two_sources, tmp_path):
    target = tmp_path / "target.yaml"
    target.write_text("d_model: 96\nn_layers: 3\nn_heads: 12\nn_kv_heads: 6\nffn_dim: 160\n"
                      "vocab_size: 61\nmax_seq_len: 32\n")
    assert main(["expand", *map(str, two_sources), "--to", str(target), "--combine", "width",
                 "--probe-tokens", "0", "--out", str(tmp_path / "out")]) == 0
    grown = load_pretrained(tmp_path / "out")
    assert (grown.cfg.d_model, grown.cfg.n_layers, grown.cfg.n_kv_heads, grown.cfg.ffn_dim) == (96, 3, 6, 160)


def _not_a_model(tmp_path, a, b):
    (tmp_path / "empty").mkdir()
    return [str(a), str(tmp_path / "empty")]


def _widths_differ(tmp_path, a, b):
    return [str(a), str(_source(tmp_path / "c", seed=3, d_model=48, n_heads=6, n_kv_heads=3))]


def _tokenizer_differs(tmp_path, a, b):
    (b / "tokenizer.json").write_text('{"other": true}')
    return [str(a), str(b)]


def _tokenizer_missing(tmp_path, a, b):
    (b / "tokenizer.json").unlink()
    return [str(a), str(b)]


def _shrinks_the_combined_model(tmp_path, a, b):
    (tmp_path / "small.yaml").write_text("d_model: 32\nn_layers: 3\nn_heads: 4\nn_kv_heads: 2\n"
                                         "ffn_dim: 64\nvocab_size: 61\nmax_seq_len: 32\n")
    (b / "model.safetensors").write_bytes(b"")  # unreadable: the refusal comes before the weights
    return [str(a), str(b), "--to", str(tmp_path / "small.yaml")]


@pytest.mark.parametrize("make,message", [
    (lambda tmp_path, a, b: [str(a), str(tmp_path / "nowhere")], "nowhere: not a directory"),
    (_not_a_model, "empty: a directory with no config.json (not a model directory)"),
    (lambda tmp_path, a, b: [str(a), str(b), str(a)], "one directory is given twice"),
    (lambda tmp_path, a, b: [str(a), f"{b}/../a"], "one directory is given twice"),
    (lambda tmp_path, a, b: [str(a), str(b), "--combine", "sideways"], "unknown combine mode 'sideways'"),
    (lambda tmp_path, a, b: [str(a), "--combine", "depth"], "--combine needs two or more SRC_DIRs"),
    (_widths_differ, "sources differ in d_model ([32, 48])"),
    (_tokenizer_differs, "tokenizers differ (tokenizer.json of"),
    (_tokenizer_missing, "tokenizers differ (tokenizer.json of"),
    (_shrinks_the_combined_model, "cannot shrink n_layers from 4 to 3"),
    (lambda tmp_path, a, b: [str(a), str(b), "--out", str(b / "out")], "is inside the source directory"),
    (lambda tmp_path, a, b: [str(a), str(b), "--out", str(b), "--force"], "is the source directory"),
    (lambda tmp_path, a, b: [str(a), str(b), "--report", str(b / "r.json")], "the source directory"),
], ids=["missing", "not-a-model", "twice", "twice-by-another-name", "combine-mode", "combine-one",
        "widths-differ", "tokenizer-differs", "tokenizer-missing", "shrinks-before-weights",
        "out-inside-second", "out-is-second", "report-inside-second"])
def test_expand_refuses_bad_sources_in_one_line(two_sources, tmp_path, capsys, make, message):
    target = tmp_path / "target.yaml"  # what a and b combined by depth grow into
    target.write_text("d_model: 64\nn_layers: 6\nn_heads: 8\nn_kv_heads: 4\nffn_dim: 128\n"
                      "vocab_size: 61\nmax_seq_len: 32\n")
    args = make(tmp_path, *two_sources)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    args += [] if "--to" in args else ["--to", str(target)]
    args += [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert main(["expand", *args, "--probe-tokens", "0"]) == 2
    _one_error_line(capsys, message)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
