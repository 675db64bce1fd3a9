"""infer/: cached decoding, speculative decoding's exactness and its sampling distribution."""

import pytest
import torch

from conftest import random_model, tiny_config
from growfam.errors import GrowfamError
from growfam.infer import (DecodeOptions, TextStream, draw, generate, probabilities, residual,
                           speculative_generate, verify)
from growfam.infer.sampling import next_token, sample
from growfam.model import KVCache, Llama

F64 = torch.float64


def uncached_greedy(model, ids, n):
    """Reference: the full forward pass over the whole sequence at every step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_config(max_seq_len=48)
    return random_model(cfg, 0, F64), random_model(cfg, 1, F64)


def test_cached_equals_uncached_greedy(pair):
    target, _ = pair
    for prompt in ([5], [3, 1, 4, 1, 5, 9, 2, 6]):
        assert generate(target, prompt, 20).tokens == uncached_greedy(target, prompt, 20)


def test_cached_logits_match_uncached_float32():
    model = random_model(tiny_config(), 2)
    seq = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = KVCache.empty(model.cfg, 1)
    with torch.no_grad():
        full = model(seq)[0]
        steps = [model(seq[:, :10], cache)[0]] + [model(seq[:, i:i + 1], cache)[0] for i in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_speculative_greedy_is_target_greedy(pair, k):
    target, draft = pair
    gen = torch.Generator().manual_seed(k)
    for length in (1, 5, 30):
        prompt = torch.randint(0, 97, (length,), generator=gen).tolist()
        # up to the end of the 48-token context
        want = generate(target, prompt, 100).tokens
        assert len(want) == 48 - length
        got = speculative_generate(target, draft, prompt, k, 100)
        assert got.tokens == want
        assert got.drafted > 0 and got.accepted <= got.drafted


def test_draft_equal_to_target_accepts_everything(pair):
    target, _ = pair
    out = speculative_generate(target, target, [7, 8, 9], 4, 30)
    assert out.tokens == generate(target, [7, 8, 9], 30).tokens
    assert out.acceptance == 1.0 and out.drafted > 0
    # every round but the last accepts 4 and draws one more: 5 tokens per target call
    assert out.target_calls == 1 + 6 and len(out.tokens) == 30


def test_eos_stops_both(pair):
    target, draft = pair
    full = generate(target, [1, 2], 30).tokens
    eos = full[10]
    cut = full[:full.index(eos) + 1]
    assert generate(target, [1, 2], 30, eos_id=eos).tokens == cut
    assert speculative_generate(target, draft, [1, 2], 4, 30, eos_id=eos).tokens == cut


def test_reading_tokens_in_chunks_changes_nothing(pair):
    """sync_every > 1 (the accelerator default) gives the same tokens, the same eos cut and the
    same stream; the steps decoded past the eos cost target calls but never show."""
    target, _ = pair
    full = generate(target, [4, 2], 30).tokens
    eos = full[6]
    for sync_every in (1, 4, 30):
        seen = []
        out = generate(target, [4, 2], 30, eos_id=eos, on_tokens=seen.append, sync_every=sync_every)
        assert out.tokens == full[:full.index(eos) + 1] == [t for chunk in seen for t in chunk]
        assert all(len(chunk) <= sync_every for chunk in seen)
        assert out.target_calls == min(30, -(-len(out.tokens) // sync_every) * sync_every)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert (generate(target, [3], 20, 1.0, 0.9, gen[0]).tokens
            == generate(target, [3], 20, 1.0, 0.9, gen[1], sync_every=7).tokens)


def test_logits_of_the_last_positions_only(pair):
    target, _ = pair
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        full = target(ids)
        torch.testing.assert_close(target(ids, last=2), full[:, -2:], atol=1e-12, rtol=0)
        assert target(ids, last=0).shape == (1, 0, 97)


def test_greedy_and_sampled_next_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 97, generator=gen, dtype=F64)
    # greedy from the logits is the hot index of probabilities' one-hot
    assert torch.equal(next_token(logits), probabilities(logits, 0.0).argmax(-1))
    # sampling is torch.multinomial's own method: the same draws from the same generator state
    probs = probabilities(logits, 0.8, 0.9)
    ours = sample(probs, torch.Generator().manual_seed(1))
    theirs = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))[:, 0]
    assert torch.equal(ours, theirs)
    assert bool((probs.gather(-1, ours[:, None]) > 0).all())  # never a token top-p cut


def test_draft_and_target_on_different_devices_refused(pair):
    target, _ = pair
    with torch.device("meta"):
        elsewhere = Llama(target.cfg)
    with pytest.raises(GrowfamError, match="one device"):
        speculative_generate(target, elsewhere, [1], 4, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decoding_matches_cpu(pair):
    """On CUDA (float64, so exact): greedy equals the CPU's, speculative greedy the target's own,
    and sampling runs with a generator on the GPU or on the CPU."""
    target, draft = pair
    gpu_target, gpu_draft = (m.to("cuda") for m in (target, draft))
    try:
        want = generate(target, [5, 6, 7], 40).tokens
        assert generate(gpu_target, [5, 6, 7], 40).tokens == want
        assert speculative_generate(gpu_target, gpu_draft, [5, 6, 7], 4, 40).tokens == want
        for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
            out = speculative_generate(gpu_target, gpu_draft, [5, 6, 7], 4, 20, 1.0, 1.0, gen)
            assert len(out.tokens) == 20 and max(out.tokens) < 97
            assert len(generate(gpu_target, [5], 20, 1.0, 1.0, gen).tokens) == 20
    finally:
        target.to("cpu"), draft.to("cpu")


def test_rollback_equals_fresh_prefill(pair):
    target, _ = pair
    seq = list(range(20, 40))
    rolled, fresh = (KVCache.empty(target.cfg, 1, dtype=F64) for _ in range(2))
    with torch.no_grad():
        target(torch.tensor([seq[:12]]), rolled)
        target(torch.tensor([[90, 91, 92, 93]]), rolled)  # rejected drafts
        rolled.truncate(12)
        a = target(torch.tensor([seq[12:]]), rolled)[0]
        # the same chunks, so equality is bitwise: the rejected tokens left no trace
        target(torch.tensor([seq[:12]]), fresh)
        b = target(torch.tensor([seq[12:]]), fresh)[0]
    assert rolled.length == fresh.length == 20
    for layer in range(target.cfg.n_layers):
        assert torch.equal(rolled.k[layer][:, :, :20], fresh.k[layer][:, :, :20])
        assert torch.equal(rolled.v[layer][:, :, :20], fresh.v[layer][:, :, :20])
    assert torch.equal(a, b)


def test_accept_resample_maths_gives_p_exactly():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.rand(6, generator=gen, dtype=F64) ** 3
        q = torch.rand(6, generator=gen, dtype=F64) ** 3
        p, q = p / p.sum(), q / q.sum()
        accept = torch.minimum(torch.ones_like(p), p / q)
        out = q * accept + (1 - (q * accept).sum()) * residual(p, q)
        torch.testing.assert_close(out, p, atol=1e-14, rtol=0)


def _first_token_frequencies(rule, p, q, trials, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(p[0]), dtype=F64)
    for _ in range(trials):
        x = draw(q[0], gen)
        accepted, token = rule(p, q, [x], gen)
        counts[x if accepted else token] += 1
    return counts / trials


def _naive(p, q, drafted, gen):
    """The wrong rule: keep the draft's token when it is the target's argmax, else sample p."""
    if drafted[0] == int(p[0].argmax()):
        return 1, draw(p[1], gen)
    return 0, draw(p[0], gen)


def test_verify_samples_from_p_and_naive_rule_does_not():
    p = torch.tensor([[0.40, 0.30, 0.20, 0.10], [0.25, 0.25, 0.25, 0.25]], dtype=F64)
    q = torch.tensor([[0.10, 0.20, 0.30, 0.40]], dtype=F64)
    trials = 4000
    # 4 standard errors of the largest-variance cell bound one frequency's deviation
    bound = 4 * (0.25 / trials) ** 0.5
    freq = _first_token_frequencies(verify, p, q, trials, seed=1)
    assert (freq - p[0]).abs().max() < bound
    naive = _first_token_frequencies(_naive, p, q, trials, seed=1)
    assert (naive - p[0]).abs().max() > bound


def test_speculative_sampling_reproducible_and_in_vocab(pair):
    target, draft = pair
    a = speculative_generate(target, draft, [1, 2, 3], 4, 20, 1.0, 0.9, torch.Generator().manual_seed(3))
    b = speculative_generate(target, draft, [1, 2, 3], 4, 20, 1.0, 0.9, torch.Generator().manual_seed(3))
    assert a.tokens == b.tokens and len(a.tokens) == 20
    assert 0 < a.acceptance < 1


def test_decode_options_name_the_flags():
    cases = [(dict(temperature=-1), "--temperature"), (dict(temperature=1, top_p=1.5), "--top-p"),
             (dict(top_p=0), "--top-p"), (dict(dtype="float64"), "--dtype"), (dict(device="tpu"), "device"),
             (dict(k=0), "--k")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "CUDA is not available"))
    for given, named in cases:
        with pytest.raises(GrowfamError, match=named):
            DecodeOptions(**given).check()
    assert DecodeOptions(device="cpu", dtype="bfloat16").check().dtype == "bfloat16"


def test_probabilities_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=F64)
    assert probabilities(logits, 0.0).tolist() == [1.0, 0.0, 0.0, 0.0]
    full = torch.softmax(logits, -1)
    torch.testing.assert_close(probabilities(logits, 1.0), full)
    # top 2 hold 0.64 + 0.24 = 0.88 of the mass: top_p 0.8 keeps both, 0.5 keeps one
    kept = probabilities(logits, 1.0, 0.8)
    torch.testing.assert_close(kept, torch.cat([full[:2] / full[:2].sum(), torch.zeros(2, dtype=F64)]))
    assert probabilities(logits, 1.0, 0.5).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_bad_input_refused(pair):
    target, draft = pair
    other = random_model(tiny_config(vocab_size=50), 0)
    cases = [
        lambda: speculative_generate(target, other, [1], 4, 5),
        lambda: speculative_generate(target, draft, [1], 0, 5),
        lambda: generate(target, list(range(48)), 5),
        lambda: generate(target, [], 5),
        lambda: generate(target, [97], 5),
        lambda: generate(target, [1], 0),
        lambda: generate(target, [1], 5, temperature=-1),
        lambda: generate(target, [1], 5, temperature=1, top_p=1.5),
        lambda: generate(target, [1], 5, temperature=1, top_p=0),
    ]
    for case in cases:
        with pytest.raises(GrowfamError) as err:
            case()
        assert "\n" not in str(err.value)


class _Chars:
    """A tokenizer whose tokens are UTF-8 bytes."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_waits_for_whole_characters():
    out = []
    stream = TextStream(_Chars(), out.append)
    for byte in "aé".encode():
        stream([byte])
    stream.finish()
    assert out == ["a", "é"]


# --------------------------------------------------------------------------------------------
# growfam generate
# --------------------------------------------------------------------------------------------

TEXT = [f"line {i}: the {'quick brown fox' if i % 2 else 'lazy dog'} jumps over {i % 5} fences. " * 3
        for i in range(200)]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two members sharing a trained tokenizer, and one with another tokenizer."""
    from growfam.data import train_bpe
    from growfam.model import save_pretrained

    root = tmp_path_factory.mktemp("members")
    train_bpe(TEXT, 300, root / "tok")
    train_bpe([t.upper() for t in TEXT], 300, root / "other-tok")
    for name, seed, tok in (("big", 0, "tok"), ("small", 1, "tok"), ("other", 2, "other-tok")):
        model = random_model(tiny_config(vocab_size=300, max_seq_len=32, n_layers=1), seed)
        save_pretrained(model, root / name, tokenizer=root / tok)
    return root


def _cli(capsys, *argv):
    from growfam.cli import main

    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_with_and_without_draft(members, capsys):
    code, plain, err = _cli(capsys, members / "big", "--prompt", "the lazy dog", "--max-new-tokens", 8)
    assert code == 0 and plain.startswith("the lazy dog") and len(plain) > len("the lazy dog\n") and err == ""
    code, spec, err = _cli(capsys, members / "big", "--prompt", "the lazy dog", "--max-new-tokens", 8,
                           "--draft", members / "small", "--k", 3)
    assert code == 0 and spec == plain  # greedy: the target's own output
    assert err.startswith("prompt 1: ") and "drafted" in err
    code, half, err = _cli(capsys, members / "big", "--prompt", "the lazy dog", "--max-new-tokens", 8,
                           "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0 and half.startswith("the lazy dog") and err == ""


def test_cli_generate_checks_the_members_once(members, capsys, monkeypatch):
    from growfam.infer import run

    calls = []
    checked = run.check_members
    monkeypatch.setattr(run, "check_members", lambda *a: calls.append(a) or checked(*a))
    code, _, _ = _cli(capsys, members / "big", "--prompt", "x", "--max-new-tokens", 2, "--draft", members / "small")
    assert code == 0 and len(calls) == 1


def test_cli_generate_refuses_bad_input(members, capsys, tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    big = members / "big"
    cases = [
        (big, "--prompt", "x", "--draft", members / "other"),  # another tokenizer
        (big, "--prompt", "x", "--draft", members / "small", "--k", 0),
        (big, "--prompt", "fox " * 40),  # longer than the 32-token context
        (big, "--prompts", tmp_path / "blank.txt"),
        (big, "--prompts", tmp_path / "missing.txt"),
        (big, "--prompt", "x", "--temperature", "nan"),
        (big, "--prompt", "x", "--max-new-tokens", "1.5"),
        (tmp_path / "nowhere", "--prompt", "x"),
        (tmp_path, "--prompt", "x"),  # a directory without a tokenizer
        (big, "--prompt", "x", "--dtype", "float64"),
        (big, "--prompt", "x", "--device", "tpu"),
        (big, "--prompt", "x", "--temperature", "1", "--top-p", "2"),
    ]
    for argv in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and out == "", argv
        assert err.count("\n") == 1 and err.startswith("growfam generate: error: "), err
    assert "share the target's tokenizer" in _cli(capsys, big, "--prompt", "x", "--draft", members / "other")[2]
    assert "--top-p must be in (0, 1]" in _cli(capsys, big, "--prompt", "x", "--top-p", "2")[2]
