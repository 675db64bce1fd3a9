"""KL, total variation and expected acceptance between members (docs/concepts.md), in float64."""

import numpy as np
import pytest
import torch

import growfam.eval.consistency as consistency
from conftest import random_model, tiny_config
from growfam.errors import GrowfamError
from growfam.eval import chunk_divergence, divergence
from growfam.grow import expand


def brute_force(logits_p, logits_q):
    """KL(P‖Q), KL(Q‖P), TV per position from whole float64 probability arrays (no chunks, no
    log-softmax): the definitions of docs/concepts.md written out."""
    def probs(logits):
        e = np.exp(logits.double().numpy() - logits.double().numpy().max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = probs(logits_p), probs(logits_q)
    stats = np.stack([(p * np.log(p / q)).sum(-1), (q * np.log(q / p)).sum(-1), 0.5 * np.abs(p - q).sum(-1)], -1)
    return torch.from_numpy(stats)


def test_kl_of_a_distribution_with_itself_is_zero_and_acceptance_one():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    stats = chunk_divergence(logits, logits.clone())
    assert torch.equal(stats, torch.zeros_like(stats))


def test_chunked_divergence_equals_brute_force_and_kl_is_nonnegative(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    logits_p, logits_q = torch.randn(3, 7, 5, generator=gen) * 3, torch.randn(3, 7, 5, generator=gen) * 3
    monkeypatch.setattr(consistency, "_CHUNK_ELEMENTS", 10)  # two positions per chunk: 11 chunks
    stats = chunk_divergence(logits_p, logits_q)
    expected = brute_force(logits_p, logits_q)
    torch.testing.assert_close(stats, expected, rtol=1e-12, atol=1e-14)
    assert (stats[..., :2] > 0).all() and (stats[..., 2] > 0).all() and (stats[..., 2] < 1).all()
    # the reverse pair swaps the two KLs and keeps TV
    swapped = chunk_divergence(logits_q, logits_p)
    torch.testing.assert_close(swapped, stats[..., [1, 0, 2]], rtol=1e-12, atol=1e-14)


def test_divergence_averages_over_positions_then_windows():
    gen = torch.Generator().manual_seed(2)
    small, large = random_model(tiny_config(), seed=0), random_model(tiny_config(), seed=1)
    tokens = torch.randint(0, 97, (200,), generator=gen).numpy().astype(np.uint16)
    result = divergence(small, large, tokens, window=16, windows=5, batch_size=2)
    starts = np.linspace(0, (len(tokens) - 1) // 16 - 1, 5).round().astype(int) * 16
    x = torch.from_numpy(np.stack([tokens[s:s + 16] for s in starts]).astype(np.int64))
    with torch.no_grad():
        expected = brute_force(small(x), large(x)).mean(dim=1).mean(dim=0)
    assert result.windows == 5 and result.positions == 16
    assert result.kl_small_large == pytest.approx(float(expected[0]), rel=1e-6)
    assert result.kl_large_small == pytest.approx(float(expected[1]), rel=1e-6)
    assert result.acceptance == pytest.approx(1 - float(expected[2]), rel=1e-6)
    assert result.kl_small_large > 0.01  # two random models do disagree


def test_a_member_and_its_exact_expansion_have_kl_below_1e_6():
    small = random_model(tiny_config(vocab_size=97), seed=3, dtype=torch.float64)
    target = tiny_config(d_model=96, n_heads=6, n_layers=3, ffn_dim=192)
    grown, _, _ = expand(small, target, width="lossless", depth="identity")
    tokens = np.random.default_rng(0).integers(0, 97, 300).astype(np.uint16)
    result = divergence(small, grown.double().eval(), tokens, window=32, windows=8)
    assert 0 <= result.kl_small_large < 1e-6 and 0 <= result.kl_large_small < 1e-6
    assert result.acceptance > 1 - 1e-6


def test_divergence_refuses_different_vocabularies():
    small, large = random_model(tiny_config(vocab_size=97)), random_model(tiny_config(vocab_size=101))
    with pytest.raises(GrowfamError, match="vocabularies differ"):
        divergence(small, large, np.arange(64, dtype=np.uint16) % 97, window=16)
