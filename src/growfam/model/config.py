"""ModelConfig (a dataclass that round-trips through YAML/JSON) and exact parameter and FLOP counts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from growfam.checks import as_int, as_number, check_keys
from growfam.errors import ConfigError
from growfam.io import read_json, read_yaml


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of one family member.

    `n_kv_heads` None means multi-head attention (= n_heads). `nominal_params` is the size a
    member is advertised as (the paper's "1B"); it only matters to the planner's `nominal`
    counting and never to the network.

    Released checkpoints (model.hf reads them): `head_dim` None means d_model // n_heads;
    `model_type` is the Hugging Face architecture written back ("llama", "mistral", "qwen2");
    `qkv_bias` / `o_bias` add biases to the q/k/v and o projections (Qwen2: q/k/v only);
    `rope_scaling` is transformers' RoPE parameters without rope_theta ({"rope_type": "llama3"
    or "linear", "factor": ...}); `sliding_window` (None: none) must cover max_seq_len, where
    it changes nothing.
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
    head_dim: int | None = None
    model_type: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: dict | None = None
    sliding_window: int | None = None

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
        for key in ("tie_embeddings", "qkv_bias", "o_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{self.name}: {key} must be true or false, got {getattr(self, key)!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"{self.name}: n_heads={self.n_heads} does not divide d_model={self.d_model}"
                )
            self.head_dim = self.d_model // self.n_heads
        self.head_dim = as_int(self.head_dim, f"{self.name}: head_dim", at_least=1)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.name}: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{self.name}: head_dim={self.head_dim} must be even for RoPE")
        self._check_architecture()

    def _check_architecture(self) -> None:
        """ConfigError for a model type, bias pattern, RoPE scaling or window growfam cannot run."""
        if self.model_type not in _BIASES:
            raise ConfigError(f"{self.name}: model_type {self.model_type!r} is not supported "
                              f"(known: {', '.join(_BIASES)})")
        allowed = _BIASES[self.model_type]
        if (self.qkv_bias, self.o_bias) not in allowed:
            raise ConfigError(f"{self.name}: a {self.model_type} model has q/k/v bias, o bias in "
                              f"{allowed}, got {(self.qkv_bias, self.o_bias)}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.name)
        if self.sliding_window is not None:
            self.sliding_window = as_int(self.sliding_window, f"{self.name}: sliding_window", at_least=1)
            if self.sliding_window < self.max_seq_len:
                raise ConfigError(
                    f"{self.name}: sliding window attention ({self.sliding_window} tokens < context "
                    f"{self.max_seq_len}) is not supported; growfam attends to the whole context")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The fields; the checkpoint-only ones (head_dim, model_type, ...) only when they differ
        from their defaults, so a plain Llama's dict is what it always was."""
        out = dataclasses.asdict(self)
        defaults = {**_CHECKPOINT_DEFAULTS, "head_dim": self.d_model // self.n_heads}
        return {k: v for k, v in out.items() if k not in defaults or v != defaults[k]}

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
        """A copy with `changes`; a head_dim equal to d_model // n_heads follows the new shape."""
        if "head_dim" not in changes and self.head_dim == self.d_model // self.n_heads:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


#: Allowed (qkv_bias, o_bias) per model type: Llama's attention_bias sets both, Qwen2 always
#: has q/k/v biases and no o bias, Mistral none.
_BIASES = {"llama": ((False, False), (True, True)), "mistral": ((False, False),),
           "qwen2": ((True, False),)}
_CHECKPOINT_DEFAULTS = {"model_type": "llama", "qkv_bias": False, "o_bias": False,
                        "rope_scaling": None, "sliding_window": None}
#: RoPE scaling types and their parameters (transformers' modeling_rope_utils names).
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}


def _check_rope_scaling(scaling, name: str) -> dict:
    """{"rope_type": ..., parameters as numbers}; ConfigError for another type or a bad value."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"{name}: rope_scaling must be a mapping, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{name}: unsupported RoPE scaling {kind!r} (growfam runs "
                          f"{', '.join(ROPE_SCALINGS)} or none)")
    out = {"rope_type": kind}
    for key in ROPE_SCALINGS[kind]:
        if key not in scaling:
            raise ConfigError(f"{name}: RoPE scaling {kind} needs {key!r}")
        out[key] = as_number(scaling[key], f"{name}: rope {key}", above=0)
    if kind == "llama3":
        out["original_max_position_embeddings"] = as_int(
            out["original_max_position_embeddings"], f"{name}: rope original_max_position_embeddings", at_least=1)
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError(f"{name}: RoPE llama3 needs high_freq_factor > low_freq_factor")
    return out


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
    attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * cfg.qkv_bias + d * cfg.o_bias
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
    """Training FLOPs per token including attention: 6·N_matmul + 12·L·H·hd·T (H·hd = d
    unless head_dim is set apart).

    N_matmul is the non-embedding count plus the output head (V·d), because the head is a
    real matmul while the embedding is a lookup (the torchtitan / PaLM convention; 6·N_nonemb
    alone would undercount the head by 6·V·d). T defaults to max_seq_len.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    n_matmul = num_params(cfg, "nonembedding") + cfg.vocab_size * cfg.d_model
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len

