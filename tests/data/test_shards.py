"""Sharded, resumable, multi-process and multi-part preparation; the sharded reader; old datasets."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from growfam.cli import main
from growfam.data import (PackedWindows, ShardedTokens, TokenDataset, eval_windows, load_tokenizer, local_source,
                          merge, open_source, partial_dir, prepare)
from growfam.errors import GrowfamError

from conftest import checksums, tiny_config


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Documents of varied length (a few long ones), some sharing text."""
    rng = random.Random(seed)
    words = "the of grow model family token shard unit stream train width depth loss".split()
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.choice([5, 40, 300, 2000])))
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def dataset_files(path: Path) -> dict[str, str]:
    """The checksums of what a reader uses: index.json, the token files, the tokenizer."""
    return {k: v for k, v in checksums(path).items() if not k.startswith("units/")}


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


# -- the reader ---------------------------------------------------------------------------------

def test_sharded_tokens_read_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, n).astype(np.uint16) for n in (7, 1, 20, 3, 11)]
    whole = np.concatenate(parts)
    stream = ShardedTokens(parts)
    assert len(stream) == len(whole) and stream.shape == whole.shape and stream.dtype == np.uint16
    assert stream.tolist() == whole.tolist()
    for i in (0, 6, 7, 8, 28, 41, -1, -42):
        assert stream[i] == whole[i]
    for a, b in ((0, 42), (5, 9), (6, 8), (7, 8), (3, 35), (30, 100), (10, 10), (-5, None)):
        view = stream[a:b]
        assert np.array_equal(np.asarray(view), whole[a:b]) and len(view) == len(whole[a:b])
        assert np.array_equal(np.asarray(view[1:4]), whole[a:b][1:4])
    with pytest.raises(IndexError):
        stream[42]
    with pytest.raises(IndexError):
        stream[::2]
    # the loaders see the same windows as over one array
    for seed in (0, 1):
        a = PackedWindows(whole, 4, 3, seed, max_unique_tokens=33)
        b = PackedWindows(stream, 4, 3, seed, max_unique_tokens=33)
        for _ in range(5):
            assert all(np.array_equal(x, y) for x, y in zip(a.next_batch(), b.next_batch()))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(eval_windows(whole, 5, 4, 2), eval_windows(stream, 5, 4, 2)))


def test_a_dataset_of_the_single_file_format_still_reads_and_trains(tmp_path, gpt2):
    new = prepare(corpus(200), gpt2, tmp_path / "new", val_fraction=0.1, shard_tokens=3000, progress=False)
    assert len(new.shards("train")) > 3
    # the format before shards: one tokens.bin per split, splits {file, tokens, documents}
    old = tmp_path / "old"
    (old / "train").mkdir(parents=True)
    (old / "val").mkdir()
    index = json.loads((new.path / "index.json").read_text())
    for split in ("train", "val"):
        (old / split / "tokens.bin").write_bytes(np.asarray(new.tokens(split)).tobytes())
        entry = index["splits"][split]
        index["splits"][split] = {"file": f"{split}/tokens.bin", "tokens": entry["tokens"],
                                  "documents": entry["documents"]}
    index["format"] = "growfam-tokens/1"
    for key in ("shard_tokens", "units"):
        index.pop(key)
    (old / "index.json").write_text(json.dumps(index))
    (old / "tokenizer").symlink_to(new.path / "tokenizer")
    ds = TokenDataset.open(old)
    for split in ("train", "val"):
        assert ds.tokens(split).tolist() == new.tokens(split).tolist() and len(ds.shards(split)) == 1

    from growfam.train import TrainConfig, train

    results = {}
    for name, path in (("old", old), ("new", new.path)):
        cfg = TrainConfig(model=tiny_config(vocab_size=gpt2.vocab_size), batch_size=4, seq_len=32, max_steps=3, eval_every=3, eval_batches=2,
                          ckpt_every=3, log_every=1, seed=0, out_dir=str(tmp_path / f"run-{name}"))
        results[name] = train(cfg, dataset=TokenDataset.open(path)).val_loss
    assert results["old"] == results["new"]  # the same tokens, the same windows


# -- units of work ------------------------------------------------------------------------------

def test_units_read_the_sources_documents_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus(300)
    folder = tmp_path / "src"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs[:150])
    pq.write_table(pa.table({"text": docs[150:280]}), folder / "b.parquet", row_group_size=13)
    for i, doc in enumerate(docs[280:]):
        (folder / f"c{i:02d}.txt").write_text(doc)
    source = local_source(folder)
    assert list(source) == docs
    for target in (300, 500, 20_000, 10**9):
        units = source.units(target)
        assert [d for u in units for d in u.documents()] == docs, target
        if target == 500:  # the jsonl cut in byte ranges, the parquet by row group, the small .txt grouped
            kinds = [u.kind for u in units]
            assert kinds.count("jsonl") > 5 and kinds.count("parquet") > 5 and kinds.count("files") >= 1
    assert len(source.units(10**9)) == 1


def test_a_jsonl_range_names_the_bad_line_by_its_byte(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "good"}\n' * 40 + '{"text": 3}\n')
    bad = len('{"text": "good"}\n') * 40
    units = local_source(path).units(100)
    with pytest.raises(GrowfamError, match=rf"a.jsonl: the line at byte {bad}: no string field 'text'"):
        [d for u in units for d in u.documents()]


# -- resumable, byte-identical ------------------------------------------------------------------

def _prepare_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "growfam", "data", "prepare", str(source), "--out", str(out),
            "--shard-tokens", "4000", "--val-fraction", "0.05", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(source, the checksums of the dataset an uninterrupted one-thread prepare of it makes, its
    number of units), made in this process: a killed run, with worker processes too, must end on
    exactly these files."""
    root = tmp_path_factory.mktemp("uninterrupted")
    source = write_jsonl(root / "docs.jsonl", corpus(1000))
    reference = root / "reference"
    assert main(_prepare_command(source, reference, "--workers", "1")[3:]) == 0
    files = dataset_files(reference)
    assert sum(k.startswith("train/") for k in files) > 20
    return source, files, len(json.loads((reference / "prepare.json").read_text())["units"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_prepare_killed_at_random_points_then_run_again_is_byte_identical(tmp_path, workers, uninterrupted):
    source, files, total = uninterrupted
    out = tmp_path / "ds"
    units = partial_dir(out) / "units"
    rng = random.Random(int(workers))
    # Kill points: once during start-up, then after random numbers of finished units, each a
    # random few milliseconds on (inside a unit, between a shard and its marker, ...).
    points = [0, *sorted(rng.sample(range(1, total - 1), 3))]
    kills = 0
    for point in points:
        proc = subprocess.Popen(_prepare_command(source, out, "--workers", workers),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and \
                (not units.is_dir() or len(list(units.iterdir())) < point):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.3, 1.0) if point == 0 else rng.uniform(0, 0.05))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    done = len(list(units.iterdir())) if units.is_dir() else 0
    subprocess.run(_prepare_command(source, out, "--workers", workers), check=True, capture_output=True)
    assert kills >= 1, "the preparation finished before any kill: make the corpus larger"
    assert dataset_files(out) == files, f"{kills} kills, {done} units done before the last run"
    assert not partial_dir(out).exists()


def test_parts_then_merge_equal_a_one_machine_prepare(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(400))
    common = ["--shard-tokens", "3000", "--val-fraction", "0.05", "--workers", "1"]
    assert main(["data", "prepare", str(source), "--out", str(tmp_path / "one"), *common]) == 0
    out = tmp_path / "two"
    assert main(["data", "prepare", str(source), "--out", str(out), *common, "--part", "1/2"]) == 0
    assert "run `growfam data merge" in capsys.readouterr().err and not out.exists()
    assert main(["data", "merge", str(out)]) == 2  # part 0 is missing
    err = capsys.readouterr().err
    assert "units are not prepared yet" in err and len(err.strip().splitlines()) == 1
    assert main(["data", "prepare", str(source), "--out", str(out), *common, "--part", "0/2"]) == 0
    assert "every part is done" in capsys.readouterr().err
    assert main(["data", "merge", str(out)]) == 0
    assert dataset_files(out) == dataset_files(tmp_path / "one")
    assert main(["data", "merge", str(out)]) == 2  # nothing left to merge
    assert "no preparation to merge" in capsys.readouterr().err


def test_workers_and_shard_sizes_do_not_change_the_stream(tmp_path, gpt2):
    docs = corpus(300)
    streams = []
    for name, shard_tokens, workers in (("a", 10**8, 1), ("b", 2000, 2), ("c", 2000, 1)):
        ds = prepare(docs, gpt2, tmp_path / name, val_fraction=0.1, shard_tokens=shard_tokens, workers=workers,
                     progress=False)
        streams.append([ds.tokens(s).tolist() for s in ("train", "val")])
        sizes = [s["tokens"] for s in ds.shards("train")]
        longest = max(len(gpt2.encode(d)) + 1 for d in docs)
        assert all(size < shard_tokens + longest for size in sizes)
    assert streams[0] == streams[1] == streams[2]
    assert dataset_files(tmp_path / "b") == dataset_files(tmp_path / "c")


def test_a_local_parquet_folder_in_the_datasets_layout_reads_through_hf(tmp_path, gpt2, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = corpus(90)
    folder = tmp_path / "hub-copy"
    (folder / "data").mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"text": docs[30 * i: 30 * i + 30], "id": list(range(30))}),
                       folder / "data" / f"train-{i:05d}-of-00003.parquet", row_group_size=7)
    source = open_source(f"hf:{folder}")
    assert list(source) == docs and len(source.units(10)) == 3
    via_hf = prepare(source, gpt2, tmp_path / "hf", val_fraction=0.1, progress=False)
    plain = prepare(docs, gpt2, tmp_path / "plain", val_fraction=0.1, progress=False)
    for split in ("train", "val"):
        assert via_hf.tokens(split).tolist() == plain.tokens(split).tolist()
    assert len(via_hf.shards("train")) == 3 and via_hf.source.startswith("hf: ")


# -- settings and bad input ---------------------------------------------------------------------

def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path, capsys, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(200))
    out = tmp_path / "ds"
    args = ["data", "prepare", str(source), "--out", str(out), "--shard-tokens", "2000", "--workers", "1"]
    assert main([*args, "--part", "0/3"]) == 0
    capsys.readouterr()
    before = checksums(partial_dir(out))
    assert main([*args, "--part", "1/3", "--val-fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "other settings (val_fraction: 0.005 -> 0.2)" in err and len(err.strip().splitlines()) == 1
    assert checksums(partial_dir(out)) == before
    assert main([*args, "--part", "1/3", "--shard-tokens", "3000"]) == 2
    assert "shard_tokens: 2000 -> 3000" in capsys.readouterr().err
    for bad, message in (("3/3", "I must be in 0..2"), ("1", "expected I/N"), ("a/2", "part 'a/2': I"),
                         ("0/0", "N"), ("-1/2", "I must be")):
        assert main([*args, f"--part={bad}"]) == 2
        assert message in capsys.readouterr().err, bad
    assert main([*args, "--part", "1/2", "--max-tokens", "100"]) == 2
    assert "cannot be split into parts" in capsys.readouterr().err
    assert main([*args, "--shard-tokens", "0"]) == 2
    assert checksums(partial_dir(out)) == before
    assert main([*args, "--val-fraction", "0.2", "--force"]) == 0  # starts again with the new settings
    assert TokenDataset.open(out).index["val_fraction"] == 0.2 and not partial_dir(out).exists()


def test_a_user_folder_where_the_partial_goes_is_refused(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(20))
    mine = tmp_path / "ds.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert main(["data", "prepare", str(source), "--out", str(tmp_path / "ds"), *extra]) == 2
        assert "growfam did not make" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "mine" and not (tmp_path / "ds").exists()


def test_merge_refuses_an_existing_dataset_without_force(tmp_path, gpt2, capsys):
    docs = corpus(60)
    prepare(docs, gpt2, tmp_path / "ds", progress=False)
    prepare(docs, gpt2, tmp_path / "ds", progress=False, part="0/2", overwrite=True)
    prepare(docs, gpt2, tmp_path / "ds", progress=False, part="1/2", overwrite=True)
    before = checksums(tmp_path / "ds")
    assert main(["data", "merge", str(tmp_path / "ds")]) == 2
    assert "pass --force" in capsys.readouterr().err and checksums(tmp_path / "ds") == before
    assert merge(tmp_path / "ds", overwrite=True).tokens("train").tolist()
    assert os.listdir(tmp_path) == ["ds"]


def test_a_damaged_unit_record_is_prepared_again(tmp_path, gpt2):
    docs = corpus(120)
    reference = prepare(docs, gpt2, tmp_path / "ref", shard_tokens=2000, progress=False)
    prepare(docs, gpt2, tmp_path / "ds", shard_tokens=2000, progress=False, part="0/2")
    marker = partial_dir(tmp_path / "ds") / "units" / "000000.json"
    marker.write_text("{broken")
    with pytest.raises(GrowfamError, match="units are not prepared yet"):
        merge(tmp_path / "ds")
    prepare(docs, gpt2, tmp_path / "ds", shard_tokens=2000, progress=False, part="0/2")
    ds = prepare(docs, gpt2, tmp_path / "ds", shard_tokens=2000, progress=False, part="1/2") or merge(tmp_path / "ds")
    assert dataset_files(ds.path) == dataset_files(reference.path)
