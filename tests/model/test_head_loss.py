"""The fused, chunked output head and cross-entropy (model/loss.py, parallel.loss_chunk): the
same loss and gradients as the plain head (float64, exactly), the [tokens, vocab] logits never
kept for the backward pass, the same training run in one process and under FSDP2."""

import pytest
import torch
import torch.nn.functional as F

from growfam.errors import ConfigError
from growfam.model import Llama, ModelConfig, head_cross_entropy

from train.test_parallel import Data, assert_same_weights, weights
from train.support import config, step_losses

CFG = ModelConfig(d_model=24, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, vocab_size=97, max_seq_len=16)


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_the_chunked_loss_and_gradients_equal_the_plain_ones_in_float64(chunk):
    torch.manual_seed(0)
    h = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (40,))
    plain = F.cross_entropy(h @ weight.T, targets)
    fused = head_cross_entropy(h, weight, targets, chunk)
    assert fused.item() == pytest.approx(plain.item(), abs=1e-13)
    for a, b in zip(torch.autograd.grad(2.5 * plain, (h, weight)), torch.autograd.grad(2.5 * fused, (h, weight))):
        assert (a - b).abs().max().item() < 1e-14
    with torch.no_grad():  # evaluation: the loss alone
        assert head_cross_entropy(h, weight, targets, chunk).item() == pytest.approx(plain.item(), abs=1e-13)
    # finite differences, on a corner of the problem (the whole one took 40 s at chunk 7; fast
    # mode's random directions missed a 1% error in the weight's gradient)
    small = (h[:12, :6].detach().clone().requires_grad_(), weight[:13, :6].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda h, w: head_cross_entropy(h, w, targets[:12] % 13, chunk), small)


@pytest.mark.parametrize("tied", [False, True])
def test_a_models_loss_and_every_gradient_are_unchanged_by_the_chunks(tied):
    torch.manual_seed(1)
    model = Llama(CFG.replace(tie_embeddings=tied)).double()
    idx, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    grads = []
    for chunk in (0, 5):
        model.zero_grad()
        loss = model.loss(idx, targets, loss_chunk=chunk)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, g0), (fused, g1) = grads
    assert fused == pytest.approx(plain, abs=1e-13)
    assert max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-13


def test_the_logits_are_not_kept_for_the_backward_pass():
    """What autograd saves for the backward pass, in bytes: the plain head keeps the float32
    log-softmax of every token (4·V bytes per token); the fused one keeps gradients the size
    of the head's input and weight instead of the input and the weight."""
    model = Llama(CFG.replace(vocab_size=4096))
    idx = torch.randint(0, 4096, (4, 16))

    def saved_bytes(chunk: int) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(idx, idx, loss_chunk=chunk)
        return total[0]

    tokens, vocab = idx.numel(), 4096
    assert saved_bytes(0) - saved_bytes(16) >= 4 * vocab * tokens


def test_training_with_a_chunked_loss_follows_the_plain_run(tmp_path):
    train = __import__("growfam.train", fromlist=["train"]).train
    train(config(tmp_path / "plain", max_steps=4), dataset=Data())
    for name, parallel in (("chunked", {"loss_chunk": 5}), ("fsdp", {"loss_chunk": 5, "strategy": "fsdp"})):
        train(config(tmp_path / name, max_steps=4, parallel=parallel), dataset=Data())
        assert step_losses(tmp_path / name / "run") == pytest.approx(step_losses(tmp_path / "plain" / "run"), abs=1e-5)
        assert_same_weights(weights(tmp_path / name / "run"), weights(tmp_path / "plain" / "run"))


@pytest.mark.parametrize("value", [-1, 1.5, "many", True])
def test_a_bad_loss_chunk_is_one_clear_line(tmp_path, value):
    with pytest.raises(ConfigError, match="parallel.loss_chunk must be"):
        config(tmp_path, parallel={"loss_chunk": value})
