"""The one config tree: a family YAML as a `FamilyConfig`, every section validated on load.

The plan fields sit at the YAML's top level (name, members, tokens, count, nominal, batch_size,
seq_len, lr: LRPolicy); each later step owns one typed section, defined in its stage's package:
`lr` (LRPolicy, train/config.py), `growth` (GrowthConfig, grow/), `data` (DataConfig, data/),
`train` (TrainSection: the TrainConfig fields the plan leaves free), `eval` (EvalConfig) and
`distill` (FamilyDistillConfig, train/distill.py); `shrink` (ShrinkConfig, grow/) with
`direction: shrink`. `load_family_config` finds a shipped family
(growfam/configs) or reads a YAML path; `make_plan` (family.plan) turns a FamilyConfig into
per-stage budgets. config.py may import errors, checks, io, text, model, data, grow,
train.config and train.distill; family/, report/ and the CLI import it (never growfam/train).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

from growfam.checks import Section, as_choice, as_int, as_mapping, as_number, check_keys, per_stage
from growfam.data.config import DataConfig
from growfam.errors import ConfigError
from growfam.grow.config import GrowthConfig, ShrinkConfig
from growfam.grow.growth import carry_over
from growfam.io import read_yaml
from growfam.model import PRESETS, ModelConfig, num_params, read_hf_config, resolve_config
from growfam.text import si
from growfam.train.config import LRPolicy, ParallelConfig, TrainConfig, check_seq_len
from growfam.train.distill import FamilyDistillConfig

#: How a family is built: upward by growth, or downward by pruning.
DIRECTIONS = ("grow", "shrink")

__all__ = ["DataConfig", "EvalConfig", "FamilyConfig", "GrowthConfig", "LRPolicy", "ShrinkConfig", "TrainSection",
           "load_family_config", "shipped_families"]

Count = Literal["nonembedding", "total", "nominal"]
COUNTS: tuple[str, ...] = ("nonembedding", "total", "nominal")

#: Family YAMLs shipped with the package, by file stem (`growfam plan paper-r2`).
CONFIG_DIR = Path(__file__).parent / "configs"
#: Chinchilla tokens per parameter (Hoffmann et al. 2022); D(N) = r · 20 · N.
CHINCHILLA_TOKENS_PER_PARAM = 20

#: TrainConfig fields that the family sets per stage (max_unique_tokens: run_family's
#: fixed_data); a family YAML's `train:` section may not.
PLANNED = ("model", "data", "out_dir", "max_steps", "max_tokens", "batch_size", "seq_len", "max_lr",
           "min_lr", "min_lr_ratio", "max_unique_tokens", "lr_schedule", "decay_frac", "decay_shape")


@dataclass
class EvalConfig(Section):
    """What `growfam eval` and `growfam consistency` measure and how: their options, and the
    family YAML's `eval:` section (`growfam family run --eval`, `growfam demo`), in one class.

    tasks: "paper", "none", or task names (a list, or one comma-separated string). ppl: "val"
    (the family's validation split), "wiki", text files or folders, or "none"; None: val and
    wiki for a family's members, wiki for a member alone. limit: examples per task (None: all).
    ppl_tokens: cap of each val / file stream, in tokens (None: all). batch_size: sequences per
    forward pass. stride: perplexity stride in tokens (None: half the window). windows and
    pairs: consistency's validation windows per pair, and adjacent or all pairs."""

    key: ClassVar[str] = "eval"
    tasks: str | list[str] = "paper"
    ppl: str | list[str] | None = None
    limit: int | None = None
    ppl_tokens: int | None = 1_000_000
    batch_size: int = 8
    device: str = "auto"
    stride: int | None = None
    windows: int = 64
    pairs: Literal["adjacent", "all"] = "adjacent"

    def __post_init__(self) -> None:
        for key in ("batch_size", "device", "windows", "pairs"):  # null (a YAML's `batch_size:`): the default
            if getattr(self, key) is None:
                setattr(self, key, next(f.default for f in dataclasses.fields(self) if f.name == key))
        for key, least in (("limit", 1), ("ppl_tokens", 2), ("batch_size", 1), ("stride", 1), ("windows", 1)):
            if getattr(self, key) is not None:
                setattr(self, key, as_int(getattr(self, key), f"eval.{key}", least))
        for key, value in (("tasks", self.tasks), ("ppl", self.ppl)):
            if not isinstance(value, (str, type(None))) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"eval.{key} must be a name or a list of names, got {value!r}")
        if not isinstance(self.device, str):
            raise ConfigError(f"eval.device must be a device name, got {self.device!r}")
        as_choice(self.pairs, ("adjacent", "all"), "eval.pairs")


@dataclass
class TrainSection(Section):
    """The `train:` section: the TrainConfig fields the plan leaves free (not PLANNED), as the YAML
    sets them (`given`); read as attributes, each field is its given value or TrainConfig's
    default (`section.micro_batch_size`, `section.parallel` as a ParallelConfig). The keys and
    the `parallel:` subsection are checked on load; the other values with each stage's
    TrainConfig (family.stage_train_config), whose errors name them as train.KEY."""

    key: ClassVar[str] = "train"
    given: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> "TrainSection":
        data = {} if data is None else as_mapping(data, "train")
        clash = sorted(set(data) & set(PLANNED))
        if clash:
            how = " (--fixed-data)" if clash[0] == "max_unique_tokens" else ""
            how = how or (" (the lr: section's schedule, decay, decay_shape)" if clash[0] in (
                "lr_schedule", "decay_frac", "decay_shape") else "")
            raise ConfigError(f"train.{clash[0]} is set by the family plan{how}; remove it from the train section")
        check_keys(data, [f.name for f in dataclasses.fields(TrainConfig) if f.name not in PLANNED], "train")
        try:
            ParallelConfig.from_dict(data.get("parallel"))
        except ConfigError as err:
            raise ConfigError(f"train section: {err}") from None
        return cls(dict(data))

    def to_dict(self) -> dict:
        return dict(self.given)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in PLANNED or name not in TrainConfig.__dataclass_fields__:
            raise AttributeError(name)
        if name == "parallel":
            return ParallelConfig.from_dict(self.given.get("parallel"))
        if name in self.given:
            return self.given[name]
        found = TrainConfig.__dataclass_fields__[name]
        return found.default_factory() if found.default is dataclasses.MISSING else found.default


_positive = partial(as_number, above=0)


@dataclass
class FamilyConfig:
    """A family YAML: which members to build, by which rules, and each pipeline step's section.

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
    lr, growth, data, train, eval, distill: the sections (a mapping is parsed); posttrain: as written.
    direction: "grow" (the default: members built upward, Progressive against Independent) or
        "shrink" (the largest trained, each smaller member pruned from one above and recovered,
        by the `shrink:` section, against Independent).
    start_from: a Hugging Face model directory (config.json, safetensors weights, tokenizer) that
        is the first member (with direction: shrink, the largest), given rather than trained; that
        member must have its shape (or be the directory itself). start_from_tokens: tokens to
        continue training it on (default 0:
        published as it is). See family.plan for how its FLOPs are accounted.
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
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: FamilyDistillConfig = field(default_factory=FamilyDistillConfig)
    start_from: str | None = None
    start_from_tokens: float = 0
    posttrain: dict | None = None
    direction: str = "grow"
    shrink: ShrinkConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.members, (list, tuple)) or not self.members:
            raise ConfigError("members must be a non-empty list of presets, config paths or configs")
        g = self.given_index
        raw_given = self.members[g]
        self.members = [_resolve_member(m, i) for i, m in enumerate(self.members)]
        if self.start_from is not None:
            self.start_from = str(self.start_from)
            self.members[g] = _check_start_from(Path(self.start_from), self.members[g], raw_given, g)
        # a larger member takes the first's model type, biases, RoPE scaling and window, as its
        # growth does, so both modes' members share one architecture (a Qwen2 start grows Qwen2s);
        # built downward, a smaller member takes the largest's, as its pruning does
        order = range(1, len(self.members)) if self.direction != "shrink" else range(len(self.members) - 2, -1, -1)
        for i in order:
            try:
                self.members[i] = carry_over(self.members[i - 1 if self.direction != "shrink" else i + 1],
                                             self.members[i])
            except ConfigError as err:
                raise ConfigError(f"members[{i}] ({self.members[i].name}): {err}") from None
        self.start_from_tokens = as_number(self.start_from_tokens or 0, "start_from_tokens", at_least=0)
        if self.start_from_tokens and self.start_from is None:
            raise ConfigError("start_from_tokens continues a start_from checkpoint; give start_from: DIR too")
        n = len(self.members)
        if (self.chinchilla is None) == (self.tokens is None):
            raise ConfigError("give exactly one token rule: tokens: {chinchilla: R} or {explicit: [...]}")
        if self.chinchilla is not None:
            self.chinchilla = _positive(self.chinchilla, "tokens.chinchilla")
        else:
            if not isinstance(self.tokens, (list, tuple)):
                raise ConfigError(f"tokens.explicit must be a list with one entry per member, got {self.tokens!r}")
            self.tokens = per_stage(self.tokens, n, "tokens.explicit", _positive)
        if self.count not in COUNTS:
            raise ConfigError(f"count must be one of {', '.join(COUNTS)}, got {self.count!r}")
        if self.nominal is not None:
            if not isinstance(self.nominal, (list, tuple)):
                raise ConfigError(f"nominal must be a list with one size per member, got {self.nominal!r}")
            self.nominal = per_stage(self.nominal, n, "nominal", _positive)
        _ = self.batch_sizes  # raises on a bad batch_size
        for m, t in zip(self.members, self.seq_lens):
            check_seq_len(t, m, m.name)
        for name, cls in (("lr", LRPolicy), ("growth", GrowthConfig), ("data", DataConfig), ("eval", EvalConfig),
                          ("distill", FamilyDistillConfig)):
            if not isinstance(getattr(self, name), cls):
                setattr(self, name, cls.from_dict(getattr(self, name)))
        if not isinstance(self.train, TrainSection):
            self.train = TrainSection.from_dict(self.train)
        self._check_direction()
        if self.growth.source == "stable" and self.lr.schedule != "wsd":
            raise ConfigError(f"growth.from stable needs a stable phase and a decay: lr.schedule wsd "
                              f"(this family's is {self.lr.schedule})")
        if self.posttrain is not None:  # checked whole by growfam.posttrain.config, which config.py precedes
            self.posttrain = as_mapping(self.posttrain, "posttrain")
        self._validate_family()

    @property
    def batch_sizes(self) -> list[int]:
        """Global batch of each stage, in sequences."""
        return per_stage(self.batch_size, len(self.members), "batch_size", partial(as_int, at_least=1))

    @property
    def seq_lens(self) -> list[int]:
        """Training sequence length of each stage, in tokens."""
        if self.seq_len is None:
            return [m.max_seq_len for m in self.members]
        return per_stage(self.seq_len, len(self.members), "seq_len", partial(as_int, at_least=1))

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

    def _check_direction(self) -> None:
        as_choice(self.direction, DIRECTIONS, "direction")
        if self.direction == "grow":
            if self.shrink is not None:
                raise ConfigError("a shrink: section is for direction: shrink (members built downward)")
            return
        if not isinstance(self.shrink, ShrinkConfig):
            self.shrink = ShrinkConfig.from_dict(self.shrink)
        if self.distill.inherit is not None:
            raise ConfigError("distill.inherit teaches grown members; a shrink family's members learn from their "
                              "source through shrink.recover: kd")

    @property
    def given_index(self) -> int:
        """The member a start_from directory is: the first (grow), or the largest (shrink)."""
        return len(self.members) - 1 if self.direction == "shrink" else 0

    @property
    def built_mode(self) -> str:
        """The mode this family's direction builds beside Independent."""
        return "progressive" if self.direction == "grow" else "shrink"

    def _validate_family(self) -> None:
        """Checks that make progressive growth possible: same head_dim and vocab, growing N."""
        first = self.members[0]
        for m in self.members[1:]:
            if m.head_dim != first.head_dim:
                raise ConfigError(f"head_dim must be constant across the family: {first.name} has "
                                  f"{first.head_dim}, {m.name} has {m.head_dim}")
            if m.vocab_size != first.vocab_size:
                raise ConfigError(f"vocab_size must be equal across the family: {first.name} has "
                                  f"{first.vocab_size}, {m.name} has {m.vocab_size}")
        params = self.counted_params()
        for (a, na), (b, nb) in zip(zip(self.members, params), zip(self.members[1:], params[1:])):
            if nb <= na:
                raise ConfigError(f"member sizes must strictly increase ({self.count} parameters): "
                                  f"{b.name} ({si(nb)}) is not larger than {a.name} ({si(na)})")

    def replace(self, **changes) -> "FamilyConfig":
        """A copy with `changes` applied and re-validated; a new token rule replaces the old one."""
        if changes.get("chinchilla") is not None:
            changes.setdefault("tokens", None)
        if changes.get("tokens") is not None:
            changes.setdefault("chinchilla", None)
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation ----------------------------------------------------------------
    KEYS: ClassVar[tuple[str, ...]] = ("name", "members", "tokens", "count", "nominal", "batch_size",
                                       "seq_len", "lr", "growth", "data", "train", "eval", "start_from",
                                       "start_from_tokens", "posttrain", "distill", "direction", "shrink")

    @classmethod
    def from_dict(cls, data: dict, base_dir: str | Path | None = None) -> "FamilyConfig":
        """Build from the family YAML's mapping; relative config paths resolve against base_dir."""
        data = as_mapping(data, "a family spec")
        check_keys(data, cls.KEYS, "the family spec")
        if "members" not in data or "batch_size" not in data:
            raise ConfigError("a family spec needs `members` and `batch_size`")
        tokens = as_mapping(data.get("tokens", {"chinchilla": 1}), "tokens")
        check_keys(tokens, ["chinchilla", "explicit"], "tokens")
        members, start_from = data["members"], data.get("start_from")
        if start_from is not None and not isinstance(start_from, (str, Path)):
            raise ConfigError(f"start_from must be the path of a model directory, got {start_from!r}")
        if base_dir is not None and isinstance(members, list):
            members = [_relative_to(m, Path(base_dir)) for m in members]
        if base_dir is not None and start_from is not None and not Path(start_from).is_absolute():
            start_from = str(Path(base_dir) / start_from)
        return cls(
            members=members,
            batch_size=data["batch_size"],
            name=str(data.get("name", "family")),
            chinchilla=tokens.get("chinchilla"),
            tokens=tokens.get("explicit"),
            count=data.get("count", "nonembedding"),
            start_from=start_from,
            start_from_tokens=data.get("start_from_tokens", 0),
            posttrain=data.get("posttrain"),
            direction=data.get("direction", "grow"),
            shrink=data.get("shrink"),
            **{key: data.get(key) for key in ("nominal", "seq_len")},
            **{key: data.get(key) for key in ("lr", "growth", "data", "train", "eval", "distill")},
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> "FamilyConfig":
        path = Path(path)
        data = read_yaml(path)
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        """The YAML mapping of this family (`from_dict` reads it back to an equal one); members
        are written inline and every section whole, so the file stands alone."""
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
        if self.start_from is not None:
            out.update(start_from=self.start_from, start_from_tokens=self.start_from_tokens)
        if self.posttrain is not None:
            out["posttrain"] = self.posttrain
        if self.distill.to_dict():
            out["distill"] = self.distill.to_dict()
        if self.direction != "grow":
            out.update(direction=self.direction, shrink=self.shrink.to_dict())
        return {**out, "growth": self.growth.to_dict(), "data": self.data.to_dict(), "train": self.train.to_dict(),
                "eval": self.eval.to_dict()}


def _resolve_member(member: Any, index: int) -> ModelConfig:
    """A ModelConfig, with errors naming the member's position in the family."""
    if not isinstance(member, (ModelConfig, dict, str, Path)):
        raise ConfigError(f"members[{index}] must be a preset name, a config path or a mapping, got {member!r}")
    try:
        return resolve_config(member)
    except ConfigError as err:
        raise ConfigError(f"members[{index}]: {err}") from None


#: ModelConfig fields that do not describe a checkpoint's function (compared by _check_start_from).
_LABELS = ("name", "nominal_params", "init_std")


def _check_start_from(path: Path, first: ModelConfig, raw_first: Any, index: int = 0) -> ModelConfig:
    """members[index] (the first, or a shrink family's largest), checked against the model
    directory `path` it is given as: the directory holds config.json, safetensors weights and
    tokenizer files, and its config is the member's shape. A member written as the directory
    itself and named nowhere (no growfam name in config.json) takes the directory's name."""
    where = f"start_from {path}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such directory")
    given = read_hf_config(path)
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise ConfigError(f"{where}: no model.safetensors (nor its index); not a model directory with weights")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ConfigError(f"{where}: no tokenizer files (tokenizer.json); the family trains with the "
                          "checkpoint's tokenizer, so it must be there")
    ours, theirs = first.to_dict(), given.to_dict()
    differ = [k for k in theirs if k not in _LABELS and ours.get(k) != theirs[k]]
    if differ:
        shown = ", ".join(f"{k} {theirs[k]} there, {ours.get(k)} here" for k in differ)
        raise ConfigError(f"{where} is not members[{index}] ({first.name}): {shown} (give the directory itself "
                          f"as members[{index}] to take its shape)")
    same_dir = isinstance(raw_first, (str, Path)) and Path(raw_first).resolve() == path.resolve()
    if same_dir and first.name == ModelConfig.name:
        return first.replace(name=path.name)
    return first


def _relative_to(member: Any, base: Path) -> Any:
    if isinstance(member, str) and member not in PRESETS and not Path(member).is_absolute():
        candidate = base / member
        if candidate.exists():
            return candidate
    return member


def shipped_families() -> list[str]:
    """Names of the family YAMLs shipped in growfam/configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_family_config(name_or_path: str | Path) -> FamilyConfig:
    """A shipped family by name ("paper-r2") or a family YAML by path."""
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.is_file():
        return FamilyConfig.from_yaml(shipped)
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml", ".json"):
        return FamilyConfig.from_yaml(path)
    raise ConfigError(
        f"unknown family {str(name_or_path)!r}; shipped families: {', '.join(shipped_families())} "
        "(or give the path of a family YAML)"
    )
