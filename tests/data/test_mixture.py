"""Mixtures of prepared datasets: windows in proportion to the weights, deterministic, resumable;
in train configs (inline) and family configs (a mixture folder, recorded in the ledger)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import documents

from growfam.config import FamilyConfig
from growfam.data import MIXTURE_FILE, PackedWindows, TokenDataset, open_dataset, prepare
from growfam.data.mixture import COMPONENT_SEED_STRIDE
from growfam.errors import ConfigError, GrowfamError
from growfam.family import run_family
from growfam.train import TrainConfig, train


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two datasets with one tokenizer; A's documents are the first half, B's the second."""
    root = tmp_path_factory.mktemp("mix")
    docs = documents()
    a = prepare(docs[:150], "train:300", root / "a", val_fraction=0.1, progress=False)
    b = prepare(docs[150:], a.path / "tokenizer", root / "b", val_fraction=0.1, progress=False)
    return a.path, b.path


def test_windows_follow_the_weights_exactly_and_resume(parts):
    a, b = parts
    mixture = open_dataset({"mix": [{"dir": str(a), "weight": 7}, {"dir": str(b), "weight": 3}]})
    assert mixture.weights == [0.7, 0.3]
    windows = mixture.windows(16, 10, seed=0)
    counts = []
    for k in range(1, 41):
        windows.next_batch()
        counts.append(list(windows.taken))
        # after 10k windows, each component has its share to within one window
        assert all(abs(n - w * 10 * k) < 1 for n, w in zip(windows.taken, mixture.weights))
    assert counts[-1] == [280, 120]
    # the rows are each component's own windows, in its own order, interleaved as the rule gives by hand
    x, y = mixture.windows(16, 10, seed=3).next_batch()
    own = [PackedWindows(ds.tokens("train"), 16, n, 3 + COMPONENT_SEED_STRIDE * i).next_batch()[0]
           for i, (ds, n) in enumerate(zip(mixture.components, (7, 3)))]
    picks = [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]  # k=5 ties 0.5 each: to the first
    for i in (0, 1):
        assert torch.equal(x[[r for r, p in enumerate(picks) if p == i]], own[i])
    assert torch.equal(x[:, 1:], y[:, :-1])
    # a cursor resumes the same windows; another mix refuses it
    first = mixture.windows(16, 10, seed=1)
    for _ in range(7):
        first.next_batch()
    saved = json.loads(json.dumps(first.state_dict()))
    again = mixture.windows(16, 10, seed=1)
    again.load_state_dict(saved)
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(first.next_batch(), again.next_batch()))
    other = open_dataset({"mix": [{"dir": str(a), "weight": 1}, {"dir": str(b), "weight": 1}]}).windows(16, 10, seed=1)
    with pytest.raises(GrowfamError, match="does not match this mixture"):
        other.load_state_dict(saved)


def test_a_cursor_of_two_ranks_resumes_on_one(parts):
    """Two ranks drew the same components, each its half of every component's epoch order; one
    rank resuming from their cursor continues every component right after the windows both took."""
    a, b = parts
    mixture = open_dataset({"mix": [{"dir": str(a), "weight": 7}, {"dir": str(b), "weight": 3}]})
    ranks = [mixture.windows(16, 5, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(4):
        for w in ranks:
            w.next_batch()
    assert ranks[0].taken == ranks[1].taken == [14, 6]
    one = mixture.windows(16, 10, seed=2)
    one.load_state_dict(json.loads(json.dumps(ranks[0].state_dict())))
    assert one.taken == [28, 12]
    for _ in range(3):
        before = list(one.taken)
        x, _ = one.next_batch()
        rows = [tuple(r) for r in x.tolist()]
        for i, (ds, part) in enumerate(zip(mixture.components, one.parts)):
            n = one.taken[i] - before[i]
            perm = np.random.default_rng(2 + COMPONENT_SEED_STRIDE * i).permutation(part.num_windows)
            expected = [tuple(r) for r in part.gather(perm[before[i]:before[i] + n] * 16)[0].tolist()]
            assert [r for r in rows if r in set(expected)] == expected  # the next n of its order, in order
        assert sum(one.taken) - sum(before) == len(rows) == 10
    # a world that splits a component's epoch differently refuses, naming both
    odd = mixture.windows(16, 5, seed=2, rank=0, world_size=3)
    with pytest.raises(GrowfamError, match="2 rank"):
        odd.load_state_dict(ranks[0].state_dict())


def test_validation_tokens_are_cut_in_proportion(parts):
    a, b = parts
    mixture = open_dataset({"mix": [{"dir": str(a), "weight": 1}, {"dir": str(b), "weight": 3}]})
    va, vb = (TokenDataset.open(p).tokens("val") for p in parts)
    val = mixture.tokens("val")
    scale = min(len(va) / 0.25, len(vb) / 0.75)
    assert len(val) == int(scale * 0.25) + int(scale * 0.75)
    assert val.tolist() == va[: int(scale * 0.25)].tolist() + vb[: int(scale * 0.75)].tolist()


def test_a_train_run_on_a_mixture_resumes_to_the_same_losses(parts, tmp_path):
    a, b = parts
    base = dict(model=dict(d_model=32, n_heads=2, n_layers=1, ffn_dim=64, vocab_size=300, max_seq_len=32),
                data={"mix": [{"dir": str(a), "weight": 0.6}, {"dir": str(b), "weight": 0.4}]},
                batch_size=4, seq_len=32, max_steps=8, eval_every=4, eval_batches=2, ckpt_every=4, log_every=1)
    whole = train(TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "whole")}))
    cut = TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "cut"), "eval_every": 6})

    def kill(step, val_loss):
        raise KeyboardInterrupt  # at step 6, past the checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(cut, on_eval=kill)
    resumed = train(cut)
    assert resumed.steps == whole.steps == 8

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 9)) and got == expected  # bitwise: the same windows after the resume


def test_a_family_on_a_mixture_records_it(parts, tmp_path):
    a, b = parts
    mix = [{"dir": str(a), "weight": 0.5}, {"dir": str(b), "weight": 0.5}]
    member = dict(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, ffn_dim=64, vocab_size=300, max_seq_len=32)
    family = FamilyConfig.from_dict(dict(
        name="mixed", members=[{**member, "name": "s"}, {**member, "name": "l", "n_layers": 2}],
        tokens={"explicit": [1600, 3200]}, batch_size=4, seq_len=32, data={"mix": mix},
        growth={"width": "lossless", "depth": "identity"},
        train={"eval_every": 5, "eval_batches": 2, "ckpt_every": 50, "log_every": 5, "tensorboard": False}))
    from growfam.data.config import ensure_dataset

    folder = ensure_dataset(family.data, None, tmp_path / "fam" / "data", log=lambda s: None)
    assert json.loads((tmp_path / "fam" / "data" / MIXTURE_FILE).read_text())["mix"][1]["weight"] == 0.5
    ledger = run_family(family, tmp_path / "fam", data=folder, modes="progressive", log=lambda s: None)
    assert ledger.data_mix == [{"dir": str(a.resolve()), "weight": 0.5}, {"dir": str(b.resolve()), "weight": 0.5}]
    assert len(ledger.members("progressive")) == 2
    # the family's evaluation finds its dataset: the mixture folder
    from growfam.family.members import resolve_target
    assert resolve_target(tmp_path / "fam").dataset().fingerprint() == ledger.data_fingerprint
    # another mix is refused: its folder is never rewritten, and the ledger refuses it anyway
    recorded = (tmp_path / "fam" / "data" / MIXTURE_FILE).read_bytes()
    other = FamilyConfig.from_dict({**family.to_dict(), "data": {"mix": [mix[0], {**mix[1], "weight": 2}]}})
    with pytest.raises(ConfigError, match="holds another mix"):
        ensure_dataset(other.data, None, tmp_path / "fam" / "data", log=lambda s: None)
    assert (tmp_path / "fam" / "data" / MIXTURE_FILE).read_bytes() == recorded
    with pytest.raises(ConfigError, match="holds something other than a mixture"):
        ensure_dataset(other.data, None, a, log=lambda s: None)  # a prepared dataset is not a mixture folder
    assert not (a / MIXTURE_FILE).exists()
    # a damaged mixture.json is one clear error, and stays as it was
    for damaged, message in (('{"format": "growfam-mixture/1", "mix": 5}', "must be a non-empty list"),
                             ('{"format": "growfam-mixture/1", "mix": [{"dir": "x", "weight": "a"}]}',
                              "weight must be a number"),
                             ('{"mix": []}', "not a growfam mixture")):
        (tmp_path / "damaged").mkdir(exist_ok=True)
        (tmp_path / "damaged" / MIXTURE_FILE).write_text(damaged)
        with pytest.raises(GrowfamError, match=message):
            ensure_dataset(FamilyConfig.from_dict({**family.to_dict(), "data": {"mix": mix, "dir": str(tmp_path / "damaged")}}).data,
                           None, tmp_path / "x", log=lambda s: None)
        assert (tmp_path / "damaged" / MIXTURE_FILE).read_text() == damaged
    other_folder = ensure_dataset(other.data, None, tmp_path / "other", log=lambda s: None)
    with pytest.raises(ConfigError, match="different data fingerprint"):
        run_family(other, tmp_path / "fam", data=other_folder, modes="progressive", log=lambda s: None)


def test_a_mixture_folder_is_its_own_mix_though_its_weights_normalise_again(tmp_path):
    """Weights 1:4:1 normalise to values that, read back and normalised again, differ in their
    last bits: the folder still holds the same mix (nothing to write, nothing refused)."""
    from growfam.data.config import DataConfig, dataset_dir
    from growfam.data.mixture import parse_mix

    mix = [{"dir": str(tmp_path / name), "weight": w} for name, w in (("a", 1), ("b", 4), ("c", 1))]
    stored = [{"dir": d, "weight": w} for d, w in parse_mix(mix)]
    assert [m["weight"] for m in stored] != [w for _, w in parse_mix(stored)]  # the case this is about
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / MIXTURE_FILE).write_text(json.dumps({"format": "growfam-mixture/1", "mix": stored}))
    section = DataConfig.from_dict({"mix": mix, "dir": str(tmp_path / "mixed")})
    assert dataset_dir(section, None, tmp_path / "x") == (str(tmp_path / "mixed"), False)


def test_bad_mixtures_are_one_clear_error(parts, tmp_path):
    a, b = parts
    cases = [
        ({"mix": []}, "non-empty list"),
        ({"mix": [{"dir": str(a)}]}, r"data.mix\[0\] must be"),
        ({"mix": [{"dir": str(a), "weight": 0}]}, "must be positive"),
        ({"mix": [{"dir": str(a), "weight": "nan"}]}, "weight"),
        ({"mix": [{"dir": str(a), "weight": 1}, {"dir": str(a), "weight": 2}]}, "names a dataset twice"),
        ({"mix": [{"dir": str(tmp_path / "none"), "weight": 1}]}, "not a prepared dataset"),
        ({"mixture": []}, "mix"),
    ]
    for data, message in cases:
        with pytest.raises(GrowfamError, match=message):
            open_dataset(data)
    other = prepare(documents()[:40], "gpt2", tmp_path / "gpt2", val_fraction=0.1, progress=False)
    with pytest.raises(ConfigError, match="different tokenizers"):
        open_dataset({"mix": [{"dir": str(a), "weight": 1}, {"dir": str(other.path), "weight": 1}]})
    with pytest.raises(ConfigError, match="fixed-data mode"):
        open_dataset({"mix": [{"dir": str(a), "weight": 1}]}).windows(16, 2, 0, max_unique_tokens=100)
    with pytest.raises(ConfigError, match="not both"):
        FamilyConfig.from_dict(dict(name="x", members=["tiny-1", "tiny-2"], batch_size=4,
                                    data={"mix": [{"dir": str(a), "weight": 1}], "source": "embedded"}))
    with pytest.raises(ConfigError, match="data"):
        TrainConfig.from_dict(dict(model="tiny-1", data={"mix": [{"dir": "a", "weight": -1}]}, max_steps=1))
