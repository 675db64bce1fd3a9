"""GPU memory of training a model with FSDP2, estimated for planning (`growfam plan --memory`).

Per GPU, for a model of P parameters sharded over N GPUs as the trainer shards it (FSDP2 on
each block and the root, float32 master weights, bf16 mixed precision), in bytes:

- parameters: 4·P/N (float32 shards);
- gradients: 4·P/N (float32 shards, after the reduce-scatter);
- AdamW moments: 8·P/N (exp_avg and exp_avg_sq, float32);
- gathered: what FSDP2 holds whole for a while: the root's bf16 parameters (embedding, head,
  final norm; gathered for the whole step) and two blocks' (the one computing and the one
  prefetched), plus the float32 gradients of the root and of one block before they are
  reduce-scattered;
- activations: what the backward pass needs of a micro-batch of B sequences of T tokens.
  Per block and token, in bf16: the two RMSNorms' input, float32 upcast and output (8·d
  each), attention's q, k, v after RoPE and its output (4·d + 4·kv, flash attention keeps no
  T×T scores), the FFN's gate, up, silu(gate) and their product (8·f). A checkpointed
  block keeps only its input (2·d) and rebuilds its full set when the backward pass reaches
  it. The backward pass frees each block's set once it is through it, so the peak is at its
  first block: one full set plus what every block below it keeps. The head adds 12·V bytes
  per token (the float32 log-softmax, its gradient and the logits' gradient); fused and
  chunked (`loss_chunk`, model/loss.py) it keeps the gradients of its input and weight (4·d
  per token, 4·V·d) and one chunk's logits at a time (8·V per token of the chunk). d:
  d_model, kv: n_kv_heads·head_dim, f: ffn_dim, V: vocab_size.

An estimate: the CUDA context (~0.5 GiB), the allocator's fragmentation and temporary
buffers of kernels come on top; bench/parallel.py --gpu measures the real peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from growfam.model import ModelConfig, num_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of each part (see the module docstring); `total` is their sum."""

    parameters: float
    gradients: float
    moments: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.moments + self.gathered + self.activations


#: GPUs a member is sharded over when `growfam plan --memory` is given no --gpus: one node.
DEFAULT_GPUS = 8


def fsdp_memory(cfg: ModelConfig, gpus: int, micro_batch: int, seq_len: int,
                checkpoint_every: int = 0, loss_chunk: int = 0) -> MemoryEstimate:
    """Bytes per GPU of training `cfg` with FSDP2 over `gpus` GPUs on micro-batches of
    `micro_batch` sequences of `seq_len` tokens, every `checkpoint_every`-th block checkpointed
    (0: none, 1: all), the head's loss in chunks of `loss_chunk` tokens (0: whole); see the
    module docstring."""
    total, block = num_params(cfg, "total"), _block_params(cfg)
    root = total - cfg.n_layers * block
    d, kv, f, vocab = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    tokens = micro_batch * seq_len
    per_block = 2 * 8 * d + (4 * d + 4 * kv) + 8 * f  # bytes per token: norms, attention, FFN
    below = [2 * d if checkpoint_every and i % checkpoint_every == 0 else per_block for i in range(cfg.n_layers - 1)]
    kept = per_block + sum(below)
    head = 4 * d * tokens + 4 * vocab * d + 8 * vocab * min(loss_chunk, tokens) if loss_chunk else 12 * vocab * tokens
    return MemoryEstimate(parameters=4 * total / gpus, gradients=4 * total / gpus, moments=8 * total / gpus,
                          gathered=2 * (root + 2 * block) + 4 * (root + block),
                          activations=tokens * kept + head)


def _block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: attention, SwiGLU FFN and the two norm gains."""
    attention = 2 * cfg.d_model * cfg.n_heads * cfg.head_dim + 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    return attention + 3 * cfg.d_model * cfg.ffn_dim + 2 * cfg.d_model
