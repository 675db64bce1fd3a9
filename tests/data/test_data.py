"""Data pipeline: packed windows, preparation, the on-disk dataset, and their errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

import growfam.data.preparation as prepare_module  # where prepare looks up _write_tokens and train_bpe
from growfam.cli import main
from growfam.data import (
    PackedWindows,
    TokenDataset,
    eval_windows,
    in_val_split,
    open_source,
    prepare,
    token_dtype,
)
from growfam.data.tokenizer import EOT, TiktokenGPT2, Tokenizer, load_tokenizer
from growfam.errors import GrowfamError


def window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row of x, for a stream whose token at position p is p."""
    return [int(row[0]) // seq_len for row in x]


def test_windows_are_shifted_slices_of_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = PackedWindows(tokens, seq_len=16, batch_size=4, seed=0).next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)
    assert all(int(row[0]) % 16 == 0 for row in x)


def test_every_window_once_per_epoch_and_seeded():
    tokens = np.arange(16 * 10 + 1)  # exactly 10 windows
    loader = PackedWindows(tokens, seq_len=16, batch_size=5, seed=3)
    first = window_ids(loader.next_batch()[0], 16) + window_ids(loader.next_batch()[0], 16)
    assert sorted(first) == list(range(10)) and loader.epoch == 1
    second = window_ids(loader.next_batch()[0], 16) + window_ids(loader.next_batch()[0], 16)
    assert sorted(second) == list(range(10)) and second != first  # epoch e uses seed + e
    again = PackedWindows(tokens, seq_len=16, batch_size=5, seed=3)
    assert window_ids(again.next_batch()[0], 16) == first[:5]
    other = PackedWindows(tokens, seq_len=16, batch_size=10, seed=4)
    assert window_ids(other.next_batch()[0], 16) != first


def test_resume_mid_epoch_gives_identical_batches():
    tokens = np.arange(5000)
    run = PackedWindows(tokens, seq_len=8, batch_size=7, seed=1)
    for _ in range(100):  # crosses epoch boundaries (624 windows, 7 per batch)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))
    expected = [run.next_batch() for _ in range(5)]
    resumed = PackedWindows(tokens, seq_len=8, batch_size=7, seed=1)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"] == 1
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_refuses_another_stream():
    state = PackedWindows(np.arange(500), seq_len=8, batch_size=2, seed=1).state_dict()
    with pytest.raises(GrowfamError, match="seed"):
        PackedWindows(np.arange(500), seq_len=8, batch_size=2, seed=2).load_state_dict(state)


def test_rank_sharding_partitions_the_epoch():
    tokens = np.arange(4 * 25 + 1)  # 25 windows of 4: 3 ranks take 8 each, one is dropped
    seen = []
    for rank in range(3):
        loader = PackedWindows(tokens, seq_len=4, batch_size=8, seed=5, rank=rank, world_size=3)
        seen.append(set(window_ids(loader.next_batch()[0], 4)))
        assert loader.epoch == 1
    assert all(len(s) == 8 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_fixed_data_repeats_the_first_tokens():
    tokens = np.arange(10_000)
    loader = PackedWindows(tokens, seq_len=10, batch_size=3, seed=0, max_unique_tokens=61)
    assert loader.num_windows == 6
    rows = torch.cat([loader.next_batch()[0] for _ in range(4)])  # 12 windows = 2 epochs
    assert int(rows.max()) < 60 and loader.epoch == 2
    ids = window_ids(rows, 10)
    assert sorted(ids[:6]) == sorted(ids[6:]) == list(range(6))


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(GrowfamError, match="too few"):
        PackedWindows(np.arange(10), seq_len=16, batch_size=1, seed=0)


def test_eval_windows_are_deterministic_and_spread():
    tokens = np.arange(8 * 100 + 1)
    batches = list(eval_windows(tokens, seq_len=8, max_windows=10, batch_size=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    starts = [int(r[0]) for x, _ in batches for r in x]
    assert starts[0] == 0 and starts[-1] == 99 * 8 and len(set(starts)) == 10
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = [int(r[0]) for x, _ in eval_windows(tokens, 8, 10, 4) for r in x]
    assert again == starts
    assert sum(len(x) for x, _ in eval_windows(tokens, 8)) == 100


# --------------------------------------------------------------------------------------------
# Sources, preparation and the on-disk dataset
# --------------------------------------------------------------------------------------------

DOCS = [
    "The first document.\nIt has two lines.",
    "def add(a, b):\n    return a + b\n",
    "Unicode: héllo wörld 日本語 🤗, and a literal <|endoftext|> inside.",
    "   whitespace   runs\n\n\n\tand tabs",
    "numbers 3.14159 2.71828 1e-9 0xFF",
] + [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_text_tokens_windows_round_trip(tmp_path, gpt2):
    ds = prepare(write_jsonl(tmp_path / "docs.jsonl", DOCS), gpt2, tmp_path / "ds", val_fraction=0.0, progress=False)
    tokens = ds.tokens("train")
    assert ds.num_tokens("val") == 0 and ds.num_documents("train") == len(DOCS)
    assert gpt2.decode(tokens.tolist()) == "".join(d + EOT for d in DOCS)
    assert int((tokens == gpt2.eos_id).sum()) == len(DOCS)  # literal "<|endoftext|>" is not eos
    seq = 16
    in_order = torch.cat([x for x, _ in eval_windows(tokens, seq)])
    n = len(in_order)
    assert torch.equal(in_order.flatten(), torch.from_numpy(tokens[: n * seq].astype(np.int64)))
    x, y = PackedWindows(tokens, seq_len=seq, batch_size=n, seed=0).next_batch()  # one whole epoch
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = [tuple(tokens[i * seq : i * seq + seq + 1].tolist()) for i in range(n)]
    assert sorted(tuple(rx + ry[-1:]) for rx, ry in zip(x.tolist(), y.tolist())) == sorted(windows)


class CharTokenizer(Tokenizer):
    """Unicode code points as ids: a vocabulary too large for uint16."""

    name, vocab_size, eos_id = "chars", 0x110001, 0x110000

    def encode_batch(self, texts, num_threads=8):
        return [[ord(c) for c in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != self.eos_id)

    def save(self, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "chars.txt").write_text("code points\n")
        return Path(out_dir)

    def fingerprint(self):
        return "chars"


def test_token_dtype_fits_the_vocabulary(tmp_path, gpt2):
    assert token_dtype(4096) == token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert prepare(["abc"], gpt2, tmp_path / "a", val_fraction=0, progress=False).tokens("train").dtype == np.uint16
    wide = prepare(["a🤗"], CharTokenizer(), tmp_path / "b", val_fraction=0, progress=False)
    assert wide.dtype == np.uint32 and wide.tokens("train").tolist() == [ord("a"), ord("🤗"), 0x110000]


def test_val_split_is_stable_and_disjoint(tmp_path, gpt2):
    many = [f"doc {i} " + "x" * (i % 13) for i in range(400)]
    picked = {d for d in many if in_val_split(d, 0.25)}
    assert 60 < len(picked) < 140  # about a quarter
    forward = prepare(many, gpt2, tmp_path / "f", val_fraction=0.25, progress=False)
    backward = prepare(many[::-1], gpt2, tmp_path / "b", val_fraction=0.25, progress=False)
    assert forward.tokenizer_fingerprint == backward.tokenizer_fingerprint == gpt2.fingerprint()
    for ds in (forward, backward):
        val_docs = set(gpt2.decode(ds.tokens("val").tolist()).split(EOT)[:-1])
        train_docs = set(gpt2.decode(ds.tokens("train").tolist()).split(EOT)[:-1])
        assert val_docs == picked and train_docs == set(many) - picked
        assert ds.num_documents("val") == len(picked)


def test_max_tokens_stops_after_the_crossing_document(tmp_path, gpt2):
    ds = prepare(DOCS, gpt2, tmp_path / "ds", val_fraction=0, max_tokens=50, progress=False)
    lengths = np.cumsum([len(gpt2.encode(d)) + 1 for d in DOCS])
    assert ds.num_tokens("train") == lengths[np.searchsorted(lengths, 50)]
    assert json.loads((tmp_path / "ds" / "index.json").read_text())["max_tokens"] == 50
    assert TokenDataset.open(tmp_path / "ds").fingerprint() == ds.fingerprint()
    whole = prepare(DOCS, gpt2, tmp_path / "whole", val_fraction=0, progress=False)
    assert whole.fingerprint() != ds.fingerprint() and whole.tokenizer_fingerprint == ds.tokenizer_fingerprint


def test_dataset_is_self_contained(tmp_path):
    ds = prepare(DOCS * 3, "train:300", tmp_path / "ds", val_fraction=0.2, progress=False)
    tok = ds.tokenizer()
    assert tok.vocab_size == ds.vocab_size <= 300 and tok.fingerprint() == ds.tokenizer_fingerprint
    assert ds.num_tokens("val") > 0 and ds.num_tokens("train") > ds.num_tokens("val")
    text = tok.decode(ds.tokens("train").tolist())
    assert text.split(EOT)[0] in DOCS
    assert not list(tmp_path.glob(".ds.tmp-*"))  # the temporary directory was renamed away


def test_embedded_corpus_yields_documents(tmp_path, gpt2):
    source = open_source("embedded")
    assert "standard library" in source.description
    docs = list(islice(source, 120))
    assert len(docs) == 120 and all(isinstance(d, str) and d for d in docs)
    assert any("import " in d for d in docs) and any("assert" in d for d in docs)
    assert docs[:5] == list(islice(open_source("embedded"), 5))  # deterministic order
    ds = prepare("embedded", gpt2, tmp_path / "ds", max_tokens=20_000, progress=False)
    assert 20_000 <= ds.num_tokens("train") + ds.num_tokens("val") < 200_000


def test_local_folder_and_capped_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub" / "b.txt").write_text("second file")
    write_jsonl(tmp_path / "c.jsonl", ["x", "y"])
    (tmp_path / "ignored.md").write_text("not a source")
    assert list(open_source(tmp_path)) == ["first file", "x", "y", "second file"]
    assert list(open_source({"path": str(tmp_path), "max_documents": 2})) == ["first file", "x"]


def test_source_errors(tmp_path, gpt2):
    with pytest.raises(GrowfamError, match="no such file or folder"):
        prepare(tmp_path / "missing", gpt2, tmp_path / "out")
    with pytest.raises(GrowfamError, match="no .txt"):
        open_source(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(GrowfamError, match="bad.jsonl:2: no string field 'text'"):
        list(open_source(tmp_path / "bad.jsonl"))
    with pytest.raises(GrowfamError, match="expected one of the keys"):
        open_source({"nothing": 1})


def test_optional_dependencies_fail_clearly(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(GrowfamError, match="pip install 'growfam\\[hub\\]'"):
            open_source("hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(GrowfamError, match="needs pyarrow"):
            list(open_source(tmp_path / "d.parquet"))


def test_empty_dataset_is_an_error(tmp_path, gpt2):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.txt").write_text("")
    with pytest.raises(GrowfamError, match="no training documents"):
        prepare(tmp_path / "src", gpt2, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_existing_output_is_refused_unless_overwritten(tmp_path, gpt2):
    prepare(["one"], gpt2, tmp_path / "ds", val_fraction=0, progress=False)
    with pytest.raises(GrowfamError, match="already exists"):
        prepare(["two"], gpt2, tmp_path / "ds", progress=False)
    ds = prepare(["two"], gpt2, tmp_path / "ds", val_fraction=0, overwrite=True, progress=False)
    assert gpt2.decode(ds.tokens("train").tolist()) == "two" + EOT


def test_corrupt_datasets_are_clear_errors(tmp_path, gpt2):
    with pytest.raises(GrowfamError, match="not a prepared dataset"):
        TokenDataset.open(tmp_path)
    path = tmp_path / "ds"
    prepare(DOCS, gpt2, path, val_fraction=0.3, progress=False)
    index = (path / "index.json").read_text()
    (path / "index.json").write_text(index[:-20])
    with pytest.raises(GrowfamError, match="malformed JSON"):
        TokenDataset.open(path)
    (path / "index.json").write_text(json.dumps({"format": "growfam-tokens/1"}))
    with pytest.raises(GrowfamError, match="corrupt index.json"):
        TokenDataset.open(path)
    (path / "index.json").write_text(index)
    with open(path / "train" / "000000-0000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(GrowfamError, match="train/000000-0000.bin is missing or not"):
        TokenDataset.open(path)


def test_cli_prepare_on_a_local_folder(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:02d}.txt").write_text(doc)
    out = tmp_path / "ds"
    argv = ["data", "prepare", str(folder), "--tokenizer", "train:300", "--out", str(out), "--val-fraction", "0.2"]
    assert main(argv) == 0
    ds = TokenDataset.open(out)
    assert ds.num_documents("train") + ds.num_documents("val") == len(DOCS) and ds.vocab_size <= 300
    assert str(out) in capsys.readouterr().out
    assert main(["data", "prepare", str(tmp_path / "nope"), "--tokenizer", "gpt2", "--out", str(tmp_path / "x")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    assert list(open_source(tmp_path / "d.parquet")) == ["alpha", "beta"]
    with pytest.raises(GrowfamError, match="no column 'body'"):
        list(open_source(tmp_path / "d.parquet", text_field="body"))


def test_unwritable_output_is_a_clear_error(tmp_path, gpt2):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(GrowfamError, match="cannot write in .*file"):
        prepare(["doc"], gpt2, tmp_path / "file" / "ds", progress=False)


# --------------------------------------------------------------------------------------------
# Hostile inputs
# --------------------------------------------------------------------------------------------


def test_huge_runs_prepare_and_round_trip(tmp_path, gpt2):
    run = "a" * 400_000  # train:VOCAB took ~90 s on one 400K-character run (quadratic BPE trainer)
    ds = prepare([run, DOCS[0]], "train:300", tmp_path / "bpe", val_fraction=0, progress=False)
    assert ds.tokenizer().decode(ds.tokens("train").tolist()) == run + EOT + DOCS[0] + EOT
    spaces = " " * 1_100_000 + "x"  # tiktoken's regex overflowed its stack on a 1M-space run
    ds = prepare([spaces], gpt2, tmp_path / "gpt2", val_fraction=0, progress=False)
    assert gpt2.decode(ds.tokens("train").tolist()) == spaces + EOT


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_interrupted_prepare_leftovers_are_removed_and_temporaries_named_like_io(tmp_path, gpt2):
    partial = tmp_path / "ds.partial"
    stale = partial / f".tokenizer.tmp-{_dead_pid()}"  # what a killed tokenizer save left behind
    stale.mkdir(parents=True)
    (partial / "prepare.json").write_text("{}")  # a killed preparation's settings (before any unit)
    with pytest.raises(GrowfamError, match="not a preparation's settings"):
        prepare(["doc"], gpt2, tmp_path / "ds", val_fraction=0, progress=False)
    prepare(["doc"], gpt2, tmp_path / "ds", val_fraction=0, progress=False, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["index.json", "prepare.json", "tokenizer",
                                                                  "train", "units", "val"]


def test_force_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, gpt2, monkeypatch):
    out = tmp_path / "ds"
    old = prepare(["old"], gpt2, out, val_fraction=0, progress=False)
    old_tokens = old.tokens("train").tolist()

    def fail_midway(partial, number, *args):
        (partial / "train" / f"{number:06d}-0000.bin").write_bytes(b"\0\0")
        raise GrowfamError("source went away")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_write_unit", fail_midway)
        with pytest.raises(GrowfamError, match="source went away"):
            prepare(["new"], gpt2, out, overwrite=True, progress=False)
    assert TokenDataset.open(out).tokens("train").tolist() == old_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no unit was done: nothing kept

    real_rmtree = shutil.rmtree

    def rmtree_fails_halfway(path, *args, **kwargs):  # e.g. a busy file on a network disk
        if Path(path) == out:
            (out / "train" / "tokens.bin").unlink()
            raise OSError(16, "Device or resource busy")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_fails_halfway)
    new = prepare(["new"], gpt2, out, val_fraction=0, overwrite=True, progress=False)
    assert gpt2.decode(new.tokens("train").tolist()) == "new" + EOT  # the old one was moved, not deleted in place


BAD_NUMBERS = [
    ("--max-tokens", "nan", "max_tokens"), ("--max-tokens", "inf", "max_tokens"),
    ("--max-tokens", "-3", "max_tokens"), ("--max-tokens", "0", "max_tokens"),
    ("--workers", "-1", "workers"), ("--workers", "0", "workers"),
    ("--val-fraction", "nan", "val_fraction"), ("--val-fraction", "1", "val_fraction"),
    ("--val-fraction", "-0.1", "val_fraction"),
]


@pytest.mark.parametrize("flag,value,name", BAD_NUMBERS, ids=[f"{f}={v}" for f, v, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, capsys, flag, value, name):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    before = sorted(tmp_path.iterdir())
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "ds"), flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and name in err and value in err
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(GrowfamError, match=name):
        prepare(source, "gpt2", tmp_path / "ds", progress=False, **{name: float(value)})
    assert sorted(tmp_path.iterdir()) == before


def test_output_that_is_a_file_or_overlaps_the_source_is_refused(tmp_path, gpt2, capsys):
    target = tmp_path / "somefile"
    target.write_text("precious")
    assert main(["data", "prepare", str(write_jsonl(tmp_path / "d.jsonl", DOCS)), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a file; growfam replaces only a prepared dataset" in err
    # --force replaces only a dataset (test_force_keeps_the_old_dataset_...): never a user's file
    assert main(["data", "prepare", str(tmp_path / "d.jsonl"), "--out", str(target), "--force"]) == 2
    assert "even with --force" in capsys.readouterr().err and target.read_text() == "precious"

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text")
    for out in (corpus, corpus / "ds", tmp_path):
        with pytest.raises(GrowfamError, match="the source directory"):
            prepare(corpus, gpt2, out, overwrite=True, progress=False)
    assert (corpus / "a.txt").read_text() == "some text" and [p.name for p in corpus.iterdir()] == ["a.txt"]


def test_token_ids_beyond_the_vocabulary_are_a_clear_error(tmp_path, gpt2):
    path = tmp_path / "ds"
    prepare(DOCS, gpt2, path, val_fraction=0.3, progress=False)
    index = json.loads((path / "index.json").read_text())
    index["tokenizer"].update(vocab_size=100, eos_id=99)  # still uint16; the tokens hold ids up to 50256
    (path / "index.json").write_text(json.dumps(index))
    ds = TokenDataset.open(path)
    where = re.escape(str(path))
    with pytest.raises(GrowfamError, match=rf"{where}: train split: token id .*vocabulary of 100") as err:
        PackedWindows(ds.tokens("train"), seq_len=8, batch_size=1000, seed=0).next_batch()
    bad, position = map(int, re.search(r"token id (\d+) at position (\d+)", str(err.value)).groups())
    assert bad >= 100 and ds.tokens("train")[position] == bad
    with pytest.raises(GrowfamError, match=rf"{where}: val split: token id .*vocabulary of 100"):
        list(eval_windows(ds.tokens("val"), seq_len=8))
    capped = PackedWindows(ds.tokens("train"), seq_len=8, batch_size=1000, seed=0, max_unique_tokens=50)
    with pytest.raises(GrowfamError, match="vocabulary of 100"):
        capped.next_batch()


def _corrupt(index: dict, change) -> dict:
    index = json.loads(json.dumps(index))
    change(index)
    return index


CORRUPTIONS = {
    "not a mapping": (lambda i: [i], "not a JSON object"),
    "missing splits": (lambda i: i.pop("splits"), "missing 'splits'"),
    "missing tokenizer field": (lambda i: i["tokenizer"].pop("eos_id"), "missing 'tokenizer.eos_id'"),
    "float dtype": (lambda i: i.update(dtype="float32"), "dtype 'float32'.*uint16 or uint32"),
    "unknown dtype": (lambda i: i.update(dtype="bogus"), "dtype 'bogus'.*uint16 or uint32"),
    "wrong count": (lambda i: i["splits"]["train"].update(tokens=i["splits"]["train"]["tokens"] + 1),
                    "shards do not add up"),
    "wrong shard size": (lambda i: [i["splits"]["train"].update(tokens=i["splits"]["train"]["tokens"] + 1),
                                    i["splits"]["train"]["shards"][0].update(tokens=i["splits"]["train"]["tokens"])],
                         "train/000000-0000.bin is missing or not"),
    "shards not a list": (lambda i: i["splits"]["val"].update(shards={"a": 1}), "not a list of shards"),
    "count not a number": (lambda i: i["splits"]["val"].update(tokens="many"), "splits.val.tokens"),
    "eos outside vocab": (lambda i: i["tokenizer"].update(eos_id=60_000), "eos_id 60000 is outside"),
    "file outside dataset": (lambda i: i["splits"]["train"]["shards"][0].update(file="../../etc/passwd"),
                             "outside the dataset"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_index_is_a_clear_error(tmp_path, gpt2, case):
    path = tmp_path / "ds"
    prepare(DOCS, gpt2, path, val_fraction=0.3, progress=False)
    change, message = CORRUPTIONS[case]
    index = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps(change(index) if case == "not a mapping" else _corrupt(index, change)))
    with pytest.raises(GrowfamError, match=message):
        TokenDataset.open(path)


def test_token_file_not_a_multiple_of_the_dtype_is_a_clear_error(tmp_path, gpt2):
    path = tmp_path / "ds"
    prepare(DOCS, gpt2, path, val_fraction=0, progress=False)
    with open(path / "train" / "000000-0000.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(GrowfamError, match="not a whole number of uint16 tokens"):
        TokenDataset.open(path)


def _full_disk_at(monkeypatch, owner, name: str, file: str, folder=None) -> None:
    """Make `owner.name(self_or_source, ..., out, ...)` write `file` under its output (or under
    folder(*args)) to /dev/full."""
    real = getattr(owner, name)

    def writes_to_a_full_disk(*args):
        out = folder(*args) if folder else next(a for a in args if isinstance(a, Path))
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        (out / file).unlink(missing_ok=True)
        (out / file).symlink_to("/dev/full")  # every write there fails with ENOSPC
        return real(*args)

    monkeypatch.setattr(owner, name, writes_to_a_full_disk)


@pytest.mark.parametrize("where", ["tokens", "gpt2 tokenizer", "trained tokenizer"])
def test_full_disk_is_one_clear_line_and_the_old_dataset_survives(tmp_path, capsys, monkeypatch, where):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    source = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "ds"
    assert main(["data", "prepare", str(source), "--out", str(out), "--val-fraction", "0"]) == 0
    old = TokenDataset.open(out).tokens("train").tolist()
    tokenizer = "train:300" if where == "trained tokenizer" else "gpt2"
    if where == "tokens":
        _full_disk_at(monkeypatch, prepare_module._ShardWriter, "open", "train/000000-0000.bin.tmp",
                      lambda writer: writer.partial)
    elif where == "gpt2 tokenizer":
        _full_disk_at(monkeypatch, TiktokenGPT2, "save", "tokenizer.json")
    else:
        _full_disk_at(monkeypatch, prepare_module, "train_bpe", "tokenizer.json")
    capsys.readouterr()
    assert main(["data", "prepare", str(source), "--out", str(out), "--tokenizer", tokenizer, "--force"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("growfam")]  # not the progress bar
    assert len(said) == 1 and "No space left on device" in said[0] and "Traceback" not in err, err
    assert TokenDataset.open(out).tokens("train").tolist() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ds"]  # no unit was done: nothing kept
    monkeypatch.undo()  # the disk has room again
    assert main(["data", "prepare", str(source), "--out", str(out), "--tokenizer", tokenizer, "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "ds"]
