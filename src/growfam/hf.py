"""Hugging Face I/O: every family member is a directory `transformers` loads as is.

A member directory holds `config.json` (LlamaConfig fields), `model.safetensors` (tensor names
of `LlamaForCausalLM`) and, when known, the tokenizer files. Reading accepts directories that
transformers itself wrote, sharded or not, but only safetensors: loading never unpickles.
Writing goes to a temporary directory renamed into place, so a crash never leaves a
half-written member where a complete one was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from growfam.errors import ConfigError, read_json
from growfam.io import atomic_directory
from growfam.model import Llama, ModelConfig

#: Files of a Hugging Face tokenizer directory that travel with a member.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` dict of a LlamaForCausalLM with the shape of `cfg`.

    RoPE theta is written both as `rope_theta` (transformers 4.x) and `rope_parameters` (5.x).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "growfam": {"name": cfg.name, "nominal_params": cfg.nominal_params},
    }


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a Llama `config.json` dict; ConfigError for what growfam cannot run."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", None):
        raise ConfigError(f"config.json describes a {model_type!r} model; growfam reads Llama models")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (Llama uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention/MLP biases are not supported (Llama has none)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"unsupported RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    try:
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if "head_dim" in hf and hf["head_dim"] is not None and int(hf["head_dim"]) * n_heads != d_model:
            raise ConfigError(f"head_dim {hf['head_dim']} x {n_heads} heads != hidden_size {d_model}; "
                              "growfam needs head_dim = hidden_size / heads")
        extra = hf.get("growfam") or {}
        return ModelConfig(
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            name=extra.get("name", "custom"),
            nominal_params=extra.get("nominal_params"),
        )
    except KeyError as err:
        raise ConfigError(f"config.json lacks {err.args[0]!r}") from None


# --------------------------------------------------------------------------------------------
# Tensor names
# --------------------------------------------------------------------------------------------


def _to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_state_dict(model: Llama, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors under Hugging Face names; a tied head is left out (transformers re-ties it)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        out[_to_hf_name(name)] = (tensor if dtype is None else tensor.to(dtype)).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the Hugging Face tokenizer files found in src_dir; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


def save_pretrained(model: Llama, out_dir: str | Path, tokenizer=None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face Llama directory (atomically); returns the path.

    tokenizer: None, a tokenizer object with `.save(dir)`, or a directory whose tokenizer
    files are copied. dtype: cast the weights on the way out (default: as they are).
    """
    tensors = hf_state_dict(model, dtype)
    stored = next(iter(tensors.values())).dtype

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.cfg, stored), indent=2) + "\n")
        if isinstance(tokenizer, (str, Path)):
            copy_tokenizer_files(tokenizer, tmp)
        elif tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_directory(out_dir, write)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ConfigError(f"{path} holds only pickled weights (.bin/.pt); growfam reads safetensors "
                          "only — re-save it with save_pretrained(..., safe_serialization=True)")
    raise ConfigError(f"{path}: no model.safetensors found")


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device=None) -> Llama:
    """Read a Hugging Face Llama directory (ours or transformers') into a growfam Llama.

    dtype: cast to it (default: keep the stored dtype); device: where the tensors land.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory")
    cfg = config_from_hf(read_json(path / "config.json"))
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {_to_hf_name(n) for n in model.state_dict()}
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    state = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device or "cpu")) as f:
            for name in f.keys():
                if name in expected:
                    t = f.get_tensor(name)
                    state[_from_hf_name(name)] = t if dtype is None else t.to(dtype)
                elif not name.endswith("rotary_emb.inv_freq"):
                    raise ConfigError(f"{file.name}: unexpected tensor {name!r} for a Llama model")
    missing = sorted(expected - {_to_hf_name(n) for n in state})
    if missing:
        raise ConfigError(f"{path}: missing tensors {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    for name, t in state.items():
        want = tuple(model.get_parameter(name).shape)
        if tuple(t.shape) != want:
            raise ConfigError(f"{path}: {name} has shape {tuple(t.shape)}, config says {want}")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model
