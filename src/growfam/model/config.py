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

