"""Hugging Face I/O: every family member is a directory `transformers` loads as is.

A member directory holds `config.json` (LlamaConfig fields, or Mistral / Qwen2 ones for a member
grown from such a checkpoint), `model.safetensors` (tensor names of `LlamaForCausalLM`) and, when known, the tokenizer files. Reading accepts directories that
transformers itself wrote, sharded or not, but only safetensors: loading never unpickles.
Writing goes to a temporary directory renamed into place, so a crash never leaves a
half-written member where a complete one was.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from growfam.checks import as_int, as_number
from growfam.errors import ConfigError
from growfam.io import atomic_directory, read_json
from growfam.model.config import ModelConfig
from growfam.model.llama import Llama

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


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}

#: config.json keys of mixture-of-experts models (refused: growfam runs dense MLPs).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` dict of a `cfg.model_type` model (LlamaForCausalLM, ...) of cfg's shape.

    RoPE theta is written both as `rope_theta` (transformers 4.x) and in `rope_parameters`
    (5.x), with the RoPE scaling there as transformers 5 writes it.
    """
    hf = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
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
        "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    else:  # Mistral and Qwen2 always attend to the whole context here (see ModelConfig)
        hf["sliding_window"] = cfg.sliding_window
    if cfg.model_type == "qwen2":
        hf["use_sliding_window"] = False
    return {**hf, "initializer_range": cfg.init_std,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "growfam": {"name": cfg.name, "nominal_params": cfg.nominal_params}}


def _supported_type(hf: dict) -> str:
    """The config's model_type, after refusing what growfam cannot run."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise ConfigError(f"config.json lacks {key!r}")
    model_type = hf.get("model_type") or "llama"
    if model_type not in _ARCHITECTURES:
        raise ConfigError(f"config.json describes a {model_type!r} model; growfam reads Llama "
                          f"models ({', '.join(_ARCHITECTURES)})")
    if any(hf.get(key) for key in _MOE_KEYS):
        raise ConfigError("mixture-of-experts models are not supported (growfam grows dense MLPs)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (Llama uses silu)")
    if hf.get("mlp_bias"):
        raise ConfigError("MLP biases are not supported (Llama, Mistral and Qwen2 have none)")
    if model_type != "llama" and hf.get("attention_bias"):
        raise ConfigError(f"attention_bias is not supported in a {model_type} config")
    return model_type


def _rope(hf: dict) -> tuple[dict, dict | None]:
    """(the RoPE parameters, the scaling among them or None for plain RoPE). transformers 5 reads
    `rope_parameters`, but a legacy `rope_scaling` beside it wins there (its standardisation
    copies it over): read them the same way."""
    legacy = dict(_json_object(hf, "rope_scaling"))
    if "type" in legacy:  # transformers 4's name of rope_type
        legacy.setdefault("rope_type", legacy.pop("type"))
    rope = {**_json_object(hf, "rope_parameters"), **legacy}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return rope, None if scaling.get("rope_type", "default") == "default" else scaling


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig from a Llama, Mistral or Qwen2 `config.json` dict; ConfigError for what
    growfam cannot run (another type, MoE, MLP biases, RoPE scaling other than llama3 / linear,
    a sliding window shorter than the context).

    Every value is checked (type and range) and an error names the config.json key.
    """
    model_type = _supported_type(hf)
    bias = model_type == "qwen2" or bool(hf.get("attention_bias"))
    rope, scaling = _rope(hf)
    extra = _json_object(hf, "growfam")

    def whole(key: str, default=None) -> int:
        value = hf.get(key)
        return default if value is None and default is not None else as_int(value, f"config.json {key}", at_least=1)

    def positive(value, key: str) -> float:
        return as_number(value, f"config.json {key}", above=0)

    d_model, n_heads = whole("hidden_size"), whole("num_attention_heads")
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"config.json tie_word_embeddings must be true or false, got {tie!r}")
    nominal = extra.get("nominal_params")
    return ModelConfig(
        d_model=d_model,
        n_layers=whole("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=whole("num_key_value_heads", default=n_heads),  # null: multi-head attention
        ffn_dim=whole("intermediate_size"),
        vocab_size=whole("vocab_size"),
        max_seq_len=whole("max_position_embeddings", default=2048),
        rope_theta=positive(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta"),
        norm_eps=positive(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tie_embeddings=tie,
        init_std=positive(hf.get("initializer_range", 0.02), "initializer_range"),
        name=extra.get("name", "custom"),
        nominal_params=None if nominal is None else positive(nominal, "growfam.nominal_params"),
        head_dim=None if hf.get("head_dim") is None else whole("head_dim"),
        model_type=model_type,
        qkv_bias=bias,
        o_bias=bias and model_type == "llama",
        rope_scaling=scaling,
        sliding_window=_sliding_window(hf, model_type),
    )


def _sliding_window(hf: dict, model_type: str) -> int | None:
    """The window a Mistral or Qwen2 config.json applies (None: none); ModelConfig refuses one
    shorter than the context."""
    if model_type == "llama":
        return None
    layer_types = hf.get("layer_types") or []
    if model_type == "qwen2" and not hf.get("use_sliding_window") and "sliding_attention" not in layer_types:
        return None
    return hf.get("sliding_window")


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the model directory `path`; ConfigError naming the directory."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: a directory with no config.json (not a model directory)")
    try:
        return config_from_hf(read_json(path / "config.json"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _json_object(hf: dict, key: str) -> dict:
    """hf[key] as a dict ({} when absent or null); ConfigError for anything else."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.json {key} must be an object, got {type(value).__name__}")
    return value


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


def check_same_tokenizer(dirs: list[str | Path]) -> None:
    """ConfigError unless every directory of `dirs` holds the same tokenizer files, byte for
    byte (a model grown from several sources is fed one tokenizer: the first one's)."""
    first = Path(dirs[0])
    for other in map(Path, dirs[1:]):
        for name in TOKENIZER_FILES:
            a, b = first / name, other / name
            try:
                same = a.is_file() == b.is_file() and (
                    not a.is_file() or filecmp.cmp(a, b, shallow=False))
            except OSError as err:
                raise ConfigError(f"cannot compare {a} with {b}: {err.strerror or err}") from None
            if not same:
                raise ConfigError(f"the sources' tokenizers differ ({name} of {other} is not "
                                  f"{first}'s); the grown model gets {first}'s tokenizer files, so "
                                  "every source must have the same ones")


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
    """The weight files of a member: its index's shards, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [_shard_path(path, shard) for shard in sorted(set(_weight_map(index).values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ConfigError(f"{path} holds only pickled weights (.bin/.pt); growfam reads safetensors "
                          "only — re-save it with save_pretrained(..., safe_serialization=True)")
    raise ConfigError(f"{path}: no model.safetensors found")


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard file map of a sharded member's index."""
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: malformed index (needs a \"weight_map\" of tensor names to "
                          "shard file names)")
    return weight_map


def _shard_path(path: Path, shard: str) -> Path:
    """path/shard, refused unless it names an existing .safetensors file inside path.

    The check is on the name, not the resolved path: the Hugging Face cache links shards to
    blobs outside the directory.
    """
    where = f"{path / 'model.safetensors.index.json'}: shard {shard!r}"
    name = PurePosixPath(shard)
    if name.is_absolute() or ".." in name.parts or "\\" in shard:
        raise ConfigError(f"{where} lies outside the model directory")
    if name.suffix != ".safetensors":
        raise ConfigError(f"{where} is not a .safetensors file; growfam reads safetensors only "
                          "(it never unpickles .bin/.pt weights)")
    if not (path / name).is_file():
        raise ConfigError(f"{where} is not found")
    return path / name


#: safetensors' dtype names -> torch's, for messages; floating-point ones start with F or BF.
_FLOAT_PREFIXES = ("F", "BF")


def _headers(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) of one file's tensors, from its header alone;
    ConfigError for an unreadable, cut or garbage file (safetensors checks that the header
    covers the whole file)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: not a readable safetensors file ({err})") from None


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape of a model of `cfg` (a tied head has none of its own)."""
    with torch.device("meta"):
        model = Llama(cfg)
    shapes = {_to_hf_name(name): tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_pretrained(path: str | Path) -> ModelConfig:
    """The config of the Hugging Face Llama directory `path`, once everything load_pretrained
    would refuse is ruled out from config.json and the safetensors headers alone (no weight is
    read, so a whole family is checked in moments before any work): an unreadable, cut or
    pickled weight file, a missing, foreign, mis-shaped or non-floating-point tensor. A
    ConfigError naming the directory or file otherwise."""
    path = Path(path)
    cfg = read_hf_config(path)
    expected, found = _expected_shapes(cfg), {}
    for file in _safetensors_files(path):
        for name, (shape, dtype) in _headers(file).items():
            if name not in expected:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ConfigError(f"{file.name}: unexpected tensor {name!r} for a Llama model")
            if not dtype.startswith(_FLOAT_PREFIXES):
                raise ConfigError(f"{file.name}: {name} is {dtype}; growfam reads floating-point weights")
            found[name] = shape
    missing = sorted(expected.keys() - found.keys())
    if missing:
        raise ConfigError(f"{path}: missing tensors {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    for name, shape in found.items():
        if shape != expected[name]:
            raise ConfigError(f"{path}: {_from_hf_name(name)} has shape {shape}, config says {expected[name]}")
    return cfg


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device=None) -> Llama:
    """Read a Hugging Face Llama directory (ours or transformers') into a growfam Llama, after
    check_pretrained's checks.

    dtype: cast to it (default: keep the stored dtype); device: where the tensors land.
    """
    path = Path(path)
    cfg = check_pretrained(path)
    expected = _expected_shapes(cfg)
    state = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device or "cpu")) as f:
                state.update({name: f.get_tensor(name) for name in f.keys() if name in expected})
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{file}: not a readable safetensors file ({err})") from None
    if dtype is None and state:  # one dtype for all (a model runs in one); the embedding's
        dtype = state.get("model.embed_tokens.weight", next(iter(state.values()))).dtype
    state = {_from_hf_name(name): t.to(dtype) for name, t in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model
