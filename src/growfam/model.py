"""The Llama decoder growfam trains, its config, named presets and a KV cache.

One file, read top to bottom: `ModelConfig` (a dataclass that round-trips through YAML/JSON),
exact parameter and FLOP counts, the preset registry, then the modules. The maths follows
Hugging Face `LlamaForCausalLM` (pre-RMSNorm, rotate-half RoPE, SwiGLU, no biases, GQA) so that
export is a rename of tensors and the logits match.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from growfam.errors import ConfigError, as_int, as_number, check_keys, read_json, read_yaml


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of one family member.

    `n_kv_heads` None means multi-head attention (= n_heads). `nominal_params` is the size a
    member is advertised as (the paper's "1B"); it only matters to the planner's `nominal`
    counting and never to the network.
    """

    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int = 50257
    n_kv_heads: int | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    name: str = "custom"
    nominal_params: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"model config name must be text, got {self.name!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for key in _INT_FIELDS:
            value = getattr(self, key)
            try:  # whole floats and numeric text ("1e3": YAML 1.1 reads it as a string) are fine
                setattr(self, key, as_int(value, key, at_least=1))
            except ConfigError:
                raise ConfigError(f"{self.name}: {key} must be a positive integer, got {value!r}") from None
        for key in _FLOAT_FIELDS:
            value = getattr(self, key)
            if value is not None or key != "nominal_params":
                setattr(self, key, as_number(value, f"{self.name}: {key}", above=0))
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"{self.name}: tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"{self.name}: n_heads={self.n_heads} does not divide d_model={self.d_model}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.name}: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{self.name}: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "the model config")
        try:
            return cls(**data)
        except TypeError as err:  # a missing required field
            raise ConfigError(f"incomplete model config: {err}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """The config in a YAML or JSON file; ConfigError naming the file."""
        data = read_json(path) if Path(path).suffix == ".json" else read_yaml(path)
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_INT_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len")
# Checked finite and positive (nominal_params may also be None); `__post_init__` converts
# numeric text, since YAML 1.1 reads `1e-5` (no dot) as a string.
_FLOAT_FIELDS = ("rope_theta", "norm_eps", "init_std", "nominal_params")


# --------------------------------------------------------------------------------------------
# Exact counts
# --------------------------------------------------------------------------------------------


def num_params(cfg: ModelConfig, kind: str = "total") -> int:
    """Exact parameter count of the model `cfg` describes.

    kind: "total" (every tensor, a tied embedding once) or "nonembedding" (without the
    token embedding and the output head, Kaplan et al.'s N; the paper's sizes use it).
    """
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    ffn = 3 * d * cfg.ffn_dim
    per_layer = attn + ffn + 2 * d  # two RMSNorm gains
    nonembedding = cfg.n_layers * per_layer + d  # final norm
    if kind == "nonembedding":
        return nonembedding
    if kind == "total":
        embed = cfg.vocab_size * d
        return nonembedding + embed + (0 if cfg.tie_embeddings else embed)
    raise ConfigError(f"unknown parameter count kind {kind!r} (use total or nonembedding)")


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token including attention: 6·N_matmul + 12·L·d·T.

    N_matmul is the non-embedding count plus the output head (V·d), because the head is a
    real matmul while the embedding is a lookup (the torchtitan / PaLM convention; DESIGN.md
    writes 6·N_nonemb, which undercounts the head by 6·V·d). T defaults to max_seq_len.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    n_matmul = num_params(cfg, "nonembedding") + cfg.vocab_size * cfg.d_model
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.d_model * seq_len


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _paper(name: str, nominal: float, d: int, ffn: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, ffn_dim=ffn, vocab_size=50257,
                       max_seq_len=1024, name=name, nominal_params=nominal)


def _tiny(name: str, d: int, layers: int, heads: int) -> ModelConfig:
    # head_dim 16 throughout, FFN 3.5·d like the paper's ladder, a small BPE vocabulary.
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, ffn_dim=int(3.5 * d),
                       vocab_size=4096, max_seq_len=256, name=name)


#: Named model shapes. Paper sizes are Appendix A of Yano et al. 2025 (head_dim 128, MHA).
PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _paper("paper-1b", 1e9, 2048, 7168, 18, 16),
        _paper("paper-2b", 2e9, 2560, 8960, 22, 20),
        _paper("paper-4b", 4e9, 3200, 11200, 27, 25),
        _paper("paper-8b", 8e9, 4096, 14336, 33, 32),
        _tiny("tiny-1", 64, 2, 4),
        _tiny("tiny-2", 96, 3, 6),
        _tiny("tiny-3", 128, 4, 8),
        _tiny("tiny-4", 160, 5, 10),
    )
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; ConfigError naming the known ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def resolve_config(spec: str | Path | dict | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset name, a YAML/JSON path, a dict, or a config."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec)
    if str(spec) in PRESETS:
        return get_preset(str(spec))
    path = Path(spec)
    if path.is_dir():  # a Hugging Face model directory
        from growfam.hf import read_hf_config

        return read_hf_config(path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return ModelConfig.load(path)
    raise ConfigError(f"unknown preset {str(spec)!r}; known presets: {', '.join(PRESETS)}")


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
        # [dim] growth mask (growfam.grow masked operator); None outside a growth ramp.
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        if self.mask is None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        else:  # statistics over the active (mask-weighted) dimensions, output gated by the mask
            m = self.mask.to(x.dtype)
            x = x * torch.rsqrt((x.pow(2) * m).sum(-1, keepdim=True) / m.sum() + self.eps) * m
        return self.weight * x.to(dtype)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim] for integer `positions` [T] (Hugging Face layout).

    Computed in float32 exactly as transformers does, or float64 for a float64 model.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=positions.device).to(work) / hd))
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
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        # [n_heads] growth mask on the heads' outputs; None outside a growth ramp.
        self.register_buffer("head_mask", None, persistent=False)

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
        if self.head_mask is not None:
            y = y * self.head_mask.to(y.dtype)[:, None, None]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        # [ffn_dim] growth mask on the hidden units; None outside a growth ramp.
        self.register_buffer("unit_mask", None, persistent=False)

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.unit_mask is not None:
            h = h * self.unit_mask.to(h.dtype)
        return self.down_proj(h)


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


class Llama(nn.Module):
    """Llama decoder. Parameter names equal Hugging Face's minus the `model.` prefix.

    forward(idx [B, T] int64, cache=None) -> logits [B, T, vocab]. With a KVCache, idx holds
    the next T tokens after the cache's `length` and the cache advances by T.
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
        """N(0, init_std) weights; residual-writing projections scaled by 1/sqrt(2·L)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0.0, std * scale, generator=generator)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
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
        return self.lm_head(self.norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; idx, targets: [B, T]."""
        logits = self(idx)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self, kind: str = "total") -> int:
        return num_params(self.cfg, kind)
