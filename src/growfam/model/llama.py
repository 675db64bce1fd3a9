"""The Llama decoder growfam trains and its KV cache.

The maths follows Hugging Face `LlamaForCausalLM` (pre-RMSNorm, rotate-half RoPE, SwiGLU, GQA;
optional attention biases as Llama / Qwen2 have them, RoPE scaling llama3 / linear) so that
export is a rename of tensors and the logits match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from growfam.model.config import ModelConfig, num_params
from growfam.model.loss import head_cross_entropy


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    k, v: per layer, [batch, n_kv_heads, max_len, head_dim]. `length` tokens are valid;
    `truncate(n)` rolls back (speculative decoding rejects drafted tokens this way).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int | None = None, *,
              device=None, dtype=torch.float32) -> "KVCache":
        max_len = cfg.max_seq_len if max_len is None else max_len
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        return cls(k, v)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · γ, computed in float32 (or float64) like Hugging Face."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[head_dim / 2] inverse frequencies, with cfg.rope_scaling applied as transformers'
    modeling_rope_utils does (in float32 the same operations, so the same bits)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).to(dtype) / hd))
    scaling = cfg.rope_scaling or {"rope_type": "default"}
    if scaling["rope_type"] == "linear":
        inv_freq /= scaling["factor"]
    elif scaling["rope_type"] == "llama3":  # long wavelengths / factor, short kept, smooth between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim] for integer `positions` [T] (Hugging Face layout).

    Computed in float32 exactly as transformers does, or float64 for a float64 model.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = rope_inv_freq(cfg, work, positions.device)
    freqs = positions.to(work)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, hd]."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            mask, causal = None, True
        else:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            # query i (absolute position start+i) sees keys 0..start+i
            causal = False
            mask = None if T == 1 else (
                torch.arange(start + T, device=x.device)[None, :]
                <= torch.arange(start, start + T, device=x.device)[:, None]
            )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=cfg.n_rep > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def weight_std(cfg: ModelConfig, name: str) -> float | None:
    """The std `Llama.reset_parameters` draws parameter `name` from (None: an RMSNorm gain, set
    to 1). N(0, init_std); the residual-writing projections are scaled by 1/sqrt(2·L).

    The growth operators give new tensors this std too, so the rule lives here only.
    """
    if name.endswith("norm.weight"):
        return None
    if name.endswith(".bias"):
        return 0.0
    scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
    return cfg.init_std * scale


class Llama(nn.Module):
    """Llama decoder. Parameter names equal Hugging Face's minus the `model.` prefix.

    forward(idx [B, T] int64, cache=None, last=None) -> logits [B, T, vocab], or [B, last, vocab]
    for the last `last` positions only (decoding needs one; filling a cache needs none). With a
    KVCache, idx holds the next T tokens after the cache's `length` and the cache advances by T.
    With targets [B, T]: the mean cross-entropy instead (see `loss`). With `head`: head(h [B·T,
    d] (the final norm's output), lm_head.weight [V, d], targets [B·T] or None) instead of the
    output head, inside forward so wrappers' hooks cover it (a distillation loss, a teacher's
    hidden states).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) weights; residual-writing projections scaled by 1/sqrt(2·L); biases 0."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, weight_std(self.cfg, name), generator=generator)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last: int | None = None, *,
                targets: torch.Tensor | None = None, loss_chunk: int = 0, head=None):
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} tokens; {start + T} requested")
        x = self.embed_tokens(idx)
        positions = torch.arange(start, start + T, device=idx.device)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length = start + T
        if last is not None:  # the output head costs T·d·V: skip the positions nobody reads
            x = x[:, T - last:]
        x = self.norm(x)
        if head is not None:
            return head(x.flatten(0, 1), self.lm_head.weight, None if targets is None else targets.flatten())
        if targets is None:
            return self.lm_head(x)
        if loss_chunk:  # the head's logits never whole (model/loss.py)
            return head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk)
        logits = self.lm_head(x)  # bf16 under autocast: the softmax in float32 (float64 stays)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                               targets.flatten())

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, loss_chunk: int = 0, head=None) -> torch.Tensor:
        """Mean next-token cross-entropy; idx, targets: [B, T]. loss_chunk: tokens per chunk of
        the fused head and cross-entropy (0: the whole logits at once; see model/loss.py).
        head: another loss of the final hidden states (see forward), e.g. distillation's.
        Computed inside forward, so wrappers' forward hooks (FSDP2, DDP) cover the head."""
        return self(idx, targets=targets, loss_chunk=loss_chunk, head=head)

    def num_params(self, kind: str = "total") -> int:
        return num_params(self.cfg, kind)
