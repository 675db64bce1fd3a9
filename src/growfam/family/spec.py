"""The family spec: which members to build and by which rules, loaded from a family YAML.

A `FamilySpec` names the members (smallest first), the token rule (Chinchilla multiple or
explicit tokens), the parameter count, batch sizes, sequence lengths and the peak-LR policy
(`LRPolicy`); `load_family_spec` finds a shipped family (growfam/configs) or reads a YAML path.
`make_plan` (family.plan) turns a spec into per-stage budgets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from growfam.checks import as_int, as_number, check_keys
from growfam.errors import ConfigError
from growfam.io import read_yaml
from growfam.model import PRESETS, ModelConfig, num_params, resolve_config
from growfam.report.numbers import si

Count = Literal["nonembedding", "total", "nominal"]
COUNTS: tuple[str, ...] = ("nonembedding", "total", "nominal")

#: Family YAMLs shipped with the package, by file stem (`growfam plan paper-r2`).
CONFIG_DIR = Path(__file__).parent.parent / "configs"

#: Top-level sections owned by later pipeline steps (training, growth operators, data); the
#: planner keeps them verbatim in `FamilySpec.extra` instead of rejecting them.
EXTRA_SECTIONS: tuple[str, ...] = ("train", "growth", "data")

#: Chinchilla tokens per parameter (Hoffmann et al. 2022); D(N) = r · 20 · N.
CHINCHILLA_TOKENS_PER_PARAM = 20


# --------------------------------------------------------------------------------------------
# Small validators: YAML 1.1 reads `40e9` and `3e-4` (no dot) as strings, so numbers may arrive
# as text and are accepted when they parse.
# --------------------------------------------------------------------------------------------


def _number(value: Any, what: str, *, positive: bool = True) -> float:
    return as_number(value, what, above=0 if positive else None)


def _per_stage(value: Any, n: int, what: str, convert) -> list:
    """A scalar broadcast to every stage, or a list with exactly one entry per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{what} has {len(value)} entries for {n} members")
        return [convert(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return [convert(value, what)] * n


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass
class LRPolicy:
    """Peak (max) learning rate of each stage's cosine schedule.

    policy "fixed": every stage peaks at `max`. policy "linear": the peak goes linearly from
    `start` (first stage) to `end` (last stage), interpolated by stage index (`by: index`) or by
    the counted parameter size (`by: params`). `min_ratio` is the cosine floor as a fraction of
    the peak; the paper does not state one, so 0.1 follows Llama's convention.
    """

    policy: Literal["fixed", "linear"] = "fixed"
    max: float | None = None  # fixed: None means Appendix A's 3e-4
    start: float | None = None
    end: float | None = None
    by: Literal["index", "params"] = "index"
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.policy == "fixed":
            self.max = _number(3e-4 if self.max is None else self.max, "lr.max")
            if self.start is not None or self.end is not None:
                raise ConfigError("lr: policy fixed takes `max`, not start/end")
        elif self.policy == "linear":
            self.start = _number(self.start, "lr.start")
            self.end = _number(self.end, "lr.end")
            if self.max is not None:
                raise ConfigError("lr: policy linear takes start/end, not `max`")
            if self.by not in ("index", "params"):
                raise ConfigError(f"lr.by must be index or params, got {self.by!r}")
        else:
            raise ConfigError(f"lr.policy must be fixed or linear, got {self.policy!r}")
        self.min_ratio = _number(self.min_ratio, "lr.min_ratio", positive=False)
        if not 0 <= self.min_ratio <= 1:
            raise ConfigError(f"lr.min_ratio must be in [0, 1], got {self.min_ratio}")

    @classmethod
    def from_dict(cls, data: dict) -> "LRPolicy":
        data = dict(_mapping(data, "lr"))
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "lr")
        return cls(**data)

    def to_dict(self) -> dict:
        if self.policy == "fixed":
            return {"policy": "fixed", "max": self.max, "min_ratio": self.min_ratio}
        return {"policy": "linear", "start": self.start, "end": self.end, "by": self.by,
                "min_ratio": self.min_ratio}

    def max_lrs(self, params: Sequence[float]) -> list[float]:
        """The peak LR of each stage; `params` are the counted sizes (used by `by: params`)."""
        if self.policy == "fixed":
            return [self.max] * len(params)
        if len(params) == 1:
            return [self.start]
        if self.by == "index":
            fractions = [i / (len(params) - 1) for i in range(len(params))]
        else:
            fractions = [(n - params[0]) / (params[-1] - params[0]) for n in params]
        return [self.start + f * (self.end - self.start) for f in fractions]


@dataclass
class FamilySpec:
    """What family to build and by which rules; the input of `make_plan`.

    members: the family, smallest first (a ModelConfig, a preset name, a YAML/JSON config path
        or a dict of ModelConfig fields; all are resolved to ModelConfig on construction).
    chinchilla / tokens: the from-scratch token rule, exactly one of them: D(N) = r·20·N with
        r = `chinchilla`, or `tokens[i]` explicit tokens for member i. A YAML without a
        `tokens` section means r = 1.
    count: which parameter count N is: "nonembedding" (default; the paper's sizes are these),
        "total", or "nominal" (the advertised size: `nominal[i]` if given, else the member's
        `ModelConfig.nominal_params`).
    batch_size: global batch in sequences per stage, or one int for every stage.
    seq_len: training sequence length in tokens per stage, or one int for every stage; None
        means each member's max_seq_len. (`batch_sizes` / `seq_lens` give the per-stage lists;
        the fields keep what was written, so a scalar still applies after `replace(members=...)`.)
    lr: the peak learning-rate policy.
    extra: the sections other pipeline steps own (`train`, `growth`, `data`), kept verbatim.
    """

    members: list[ModelConfig]
    batch_size: list[int] | int
    name: str = "family"
    chinchilla: float | None = None
    tokens: list[float] | None = None
    count: Count = "nonembedding"
    nominal: list[float] | None = None
    seq_len: list[int] | int | None = None
    lr: LRPolicy = field(default_factory=LRPolicy)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.members, (list, tuple)) or not self.members:
            raise ConfigError("members must be a non-empty list of presets, config paths or configs")
        self.members = [_resolve_member(m, i) for i, m in enumerate(self.members)]
        n = len(self.members)
        if (self.chinchilla is None) == (self.tokens is None):
            raise ConfigError("give exactly one token rule: tokens: {chinchilla: R} or {explicit: [...]}")
        if self.chinchilla is not None:
            self.chinchilla = _number(self.chinchilla, "tokens.chinchilla")
        else:
            if not isinstance(self.tokens, (list, tuple)):
                raise ConfigError(f"tokens.explicit must be a list with one entry per member, got {self.tokens!r}")
            self.tokens = _per_stage(self.tokens, n, "tokens.explicit", _number)
        if self.count not in COUNTS:
            raise ConfigError(f"count must be one of {', '.join(COUNTS)}, got {self.count!r}")
        if self.nominal is not None:
            if not isinstance(self.nominal, (list, tuple)):
                raise ConfigError(f"nominal must be a list with one size per member, got {self.nominal!r}")
            self.nominal = _per_stage(self.nominal, n, "nominal", _number)
        _ = self.batch_sizes  # raises on a bad batch_size
        for m, t in zip(self.members, self.seq_lens):
            if t > m.max_seq_len:
                raise ConfigError(f"seq_len {t} exceeds {m.name}'s max_seq_len {m.max_seq_len}")
        if isinstance(self.lr, dict):
            self.lr = LRPolicy.from_dict(self.lr)
        self.extra = dict(_mapping(self.extra, "extra"))
        self._validate_family()

    @property
    def batch_sizes(self) -> list[int]:
        """Global batch of each stage, in sequences."""
        return _per_stage(self.batch_size, len(self.members), "batch_size", partial(as_int, at_least=1))

    @property
    def seq_lens(self) -> list[int]:
        """Training sequence length of each stage, in tokens."""
        if self.seq_len is None:
            return [m.max_seq_len for m in self.members]
        return _per_stage(self.seq_len, len(self.members), "seq_len", partial(as_int, at_least=1))

    def counted_params(self) -> list[float]:
        """N of each member under `count`."""
        if self.count != "nominal":
            return [float(num_params(m, self.count)) for m in self.members]
        if self.nominal is not None:
            return list(self.nominal)
        missing = [m.name for m in self.members if m.nominal_params is None]
        if missing:
            raise ConfigError(
                f"count nominal needs a nominal size for every member, missing for: {', '.join(missing)} "
                "(set nominal_params in the member's config or give `nominal: [...]` in the family)"
            )
        return [float(m.nominal_params) for m in self.members]

    def _validate_family(self) -> None:
        """Checks that make progressive growth possible: same head_dim and vocab, growing N."""
        first = self.members[0]
        for m in self.members[1:]:
            if m.head_dim != first.head_dim:
                raise ConfigError(
                    f"head_dim must be constant across the family: {first.name} has "
                    f"{first.head_dim}, {m.name} has {m.head_dim}"
                )
            if m.vocab_size != first.vocab_size:
                raise ConfigError(
                    f"vocab_size must be equal across the family: {first.name} has "
                    f"{first.vocab_size}, {m.name} has {m.vocab_size}"
                )
        params = self.counted_params()
        for (a, na), (b, nb) in zip(zip(self.members, params), zip(self.members[1:], params[1:])):
            if nb <= na:
                raise ConfigError(
                    f"member sizes must strictly increase ({self.count} parameters): "
                    f"{b.name} ({si(nb)}) is not larger than {a.name} ({si(na)})"
                )

    def replace(self, **changes) -> "FamilySpec":
        """A copy with `changes` applied and re-validated; a new token rule replaces the old one."""
        if changes.get("chinchilla") is not None:
            changes.setdefault("tokens", None)
        if changes.get("tokens") is not None:
            changes.setdefault("chinchilla", None)
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation ----------------------------------------------------------------
    KEYS: ClassVar[tuple[str, ...]] = ("name", "members", "tokens", "count", "nominal", "batch_size", "seq_len", "lr") + EXTRA_SECTIONS

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | Path | None = None) -> "FamilySpec":
        """Build from the family YAML's mapping; relative config paths resolve against base_dir."""
        data = _mapping(data, "a family spec")
        check_keys(data, cls.KEYS, "the family spec")
        if "members" not in data or "batch_size" not in data:
            raise ConfigError("a family spec needs `members` and `batch_size`")
        tokens = _mapping(data.get("tokens", {"chinchilla": 1}), "tokens")
        check_keys(tokens, ["chinchilla", "explicit"], "tokens")
        members = data["members"]
        if base_dir is not None and isinstance(members, list):
            members = [_relative_to(m, Path(base_dir)) for m in members]
        return cls(
            members=members,
            batch_size=data["batch_size"],
            name=str(data.get("name", "family")),
            chinchilla=tokens.get("chinchilla"),
            tokens=tokens.get("explicit"),
            count=data.get("count", "nonembedding"),
            nominal=data.get("nominal"),
            seq_len=data.get("seq_len"),
            lr=LRPolicy.from_dict(data.get("lr", {})),
            extra={k: data[k] for k in EXTRA_SECTIONS if k in data},
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FamilySpec":
        path = Path(path)
        data = read_yaml(path)
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        """The YAML mapping of this spec; members are written inline so the file stands alone."""
        tokens = {"chinchilla": self.chinchilla} if self.chinchilla is not None else {"explicit": self.tokens}
        out: dict[str, Any] = {
            "name": self.name,
            "members": [m.to_dict() for m in self.members],
            "tokens": tokens,
            "count": self.count,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "lr": self.lr.to_dict(),
        }
        if self.nominal is not None:
            out["nominal"] = self.nominal
        return {**out, **self.extra}


def _resolve_member(member: Any, index: int) -> ModelConfig:
    """A ModelConfig, with errors naming the member's position in the family."""
    if not isinstance(member, (ModelConfig, dict, str, Path)):
        raise ConfigError(f"members[{index}] must be a preset name, a config path or a mapping, got {member!r}")
    try:
        return resolve_config(member)
    except ConfigError as err:
        raise ConfigError(f"members[{index}]: {err}") from None


def _relative_to(member: Any, base: Path) -> Any:
    if isinstance(member, str) and member not in PRESETS and not Path(member).is_absolute():
        candidate = base / member
        if candidate.exists():
            return candidate
    return member


def shipped_families() -> list[str]:
    """Names of the family YAMLs shipped in growfam/configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_family_spec(name_or_path: str | Path) -> FamilySpec:
    """A shipped family by name ("paper-r2") or a family YAML by path."""
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_file():
        return FamilySpec.from_yaml(shipped)
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml", ".json"):
        return FamilySpec.from_yaml(path)
    raise ConfigError(
        f"unknown family {str(name_or_path)!r}; shipped families: {', '.join(shipped_families())} "
        "(or give the path of a family YAML)"
    )
