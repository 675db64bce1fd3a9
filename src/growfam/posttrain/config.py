"""The settings of a post-training: what `growfam posttrain` takes, one dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..checks import as_int, as_mapping, as_number, check_keys
from ..errors import ConfigError


@dataclass
class PosttrainConfig:
    """SFT then DPO, with the defaults of the SimPO paper's base-model setting (Meng et al.
    2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", arXiv
    2405.14734), which growfam's source paper follows: one epoch each, a global batch of 128,
    cosine decay after 10% warmup, SFT peak LR 2e-5, DPO peak LR 5e-7 and beta 0.01.

    sft, dpo: data sources (posttrain/data.py), None to skip that phase. batch_size: sequences
    (SFT) or pairs (DPO) per optimizer step over all ranks; micro_batch_size per forward.
    max_length: tokens per sequence (prompt and reply), longer ones truncated and counted;
    None = the member's context, at most 2048. max_steps overrides epochs. held_out: records of
    each source kept out of training to measure on. limit: records read from each source.
    """

    sft: str | None = None
    dpo: str | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    sft_lr: float = 2e-5
    dpo_lr: float = 5e-7
    beta: float = 0.01
    batch_size: int = 128
    micro_batch_size: int = 8
    max_length: int | None = None
    warmup_ratio: float = 0.1
    held_out: int = 200
    limit: int | None = None
    save_steps: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.sft is None and self.dpo is None:
            raise ConfigError("posttrain needs --sft DATA, --dpo DATA or both")
        positive = {"epochs": self.epochs, "sft_lr": self.sft_lr, "dpo_lr": self.dpo_lr, "beta": self.beta,
                    "batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                    "held_out": self.held_out, "save_steps": self.save_steps}
        for key, value in {**positive, "max_steps": self.max_steps, "max_length": self.max_length,
                           "limit": self.limit}.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key.replace('_', '-')} must be a positive number, not {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup-ratio must lie in [0, 1), not {self.warmup_ratio!r}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch-size {self.batch_size} is not a multiple of micro-batch-size "
                              f"{self.micro_batch_size}")

    def training(self) -> dict:
        """The settings that shape the weights: a rerun into the same --out must repeat them."""
        return {k: v for k, v in asdict(self).items() if k not in ("device", "save_steps")}


#: The `posttrain:` section's keys beyond PosttrainConfig's: what runs after training.
RUN_KEYS = ("mt_bench", "max_new_tokens", "members")


def posttrain_section(section: dict) -> tuple[PosttrainConfig, dict]:
    """The family YAML's `posttrain:` section (`growfam family run` ends with it): the
    PosttrainConfig and run_posttrain's keyword options (mt_bench, max_new_tokens, members).
    ConfigError naming the key, before any work."""
    section = dict(as_mapping(section, "posttrain"))
    check_keys(section, [f.name for f in fields(PosttrainConfig)] + list(RUN_KEYS), "posttrain")
    options = {key: section.pop(key) for key in RUN_KEYS if key in section}
    if not isinstance(options.get("mt_bench", False), bool):
        raise ConfigError(f"posttrain.mt_bench must be true or false, got {options['mt_bench']!r}")
    if "max_new_tokens" in options:
        options["max_new_tokens"] = as_int(options["max_new_tokens"], "posttrain.max_new_tokens", 1)
    members = options.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise ConfigError(f"posttrain.members must be a list of member names, got {members!r}")
    for key, value in section.items():
        if value is None:
            continue
        if key in ("sft", "dpo", "device"):
            if not isinstance(value, str):
                raise ConfigError(f"posttrain.{key} must be a string, got {value!r}")
        elif PosttrainConfig.__dataclass_fields__[key].type.startswith("int"):
            section[key] = as_int(value, f"posttrain.{key}", 0 if key == "seed" else 1)
        else:  # YAML 1.1 reads 2e-5 as text
            section[key] = as_number(value, f"posttrain.{key}")
    try:
        return PosttrainConfig(**section), options
    except ConfigError as err:
        raise ConfigError(f"posttrain: {err}") from None
