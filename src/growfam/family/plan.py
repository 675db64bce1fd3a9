"""The family planner: token budgets, steps, FLOPs, learning rates and GPU-hours per stage.

A `FamilyConfig` (growfam.config, loaded from a family YAML) says which members to build and by
which rules; `make_plan(family)` turns it into a `FamilyPlan` with, for every stage, both ways of building the
family (docs/concepts.md):

- Independent: member i trains from scratch on D(N_i) tokens (Chinchilla: D = r·20·N).
- Progressive (Eq. 3-4): member i starts from the expanded member i-1 and trains on
  D'_1 = D(N_1),  D'_i = D(N_i) − (Σ_{j<i} N_j·D'_j) / N_i,
  so the cumulative FLOPs after stage i equal the cost of training N_i from scratch.
- Shrink (`direction: shrink`): the largest member trains on D(N_L) (or is given: start_from);
  each smaller one is pruned from its source and recovers on shrink.tokens · D(N_i), its
  teacher's forwards counted too.

A family that starts from a checkpoint (`start_from`) is given its first member: both modes
publish it as it is (or continue it on `start_from_tokens`, D_c), so stage 1 spends 6·N_1·D_c.
Its from-scratch cost 6·N_1·D(N_1) is accounted as *given*: not spent by the family, but counted
by Eq. 4 as the paper counts stage 1 (Σ_{j<2} N_j·D'_j = N_1·(D(N_1) + D_c)), so every later
budget is what it would be had the family trained member 1 itself, and the cumulative FLOPs after
stage i >= 2 (given included) still equal training N_i from scratch. D(N_1) is the family's rule
for N_1, not what the release really cost (SmolLM2-360M saw 4T tokens: counted, that would
leave the larger members nothing).

Units: parameters and tokens are plain counts, FLOPs are floating-point operations, learning
rates are per step, batch sizes are sequences. FLOPs are 6·N·D with the counted N (the paper's
cost model); the attention-inclusive count (`model.flops_per_token` × tokens) is reported too
and is what GPU-hours use, because MFU is measured against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from growfam.checks import as_number
from growfam.config import CHINCHILLA_TOKENS_PER_PARAM, FamilyConfig
from growfam.errors import ConfigError
from growfam.model import flops_per_token, num_params
from growfam.train.config import steps_for

# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """One family member under both training modes. Tokens are budgets (may be fractional);
    steps are whole optimizer steps covering them: ceil(tokens / (batch_size · seq_len))."""

    index: int  # 1-based, as in the paper
    name: str
    params: float  # N under the family's count
    nonembedding_params: int
    total_params: int
    batch_size: int  # sequences
    seq_len: int  # tokens
    tokens_independent: float  # D(N_i)
    tokens_progressive: float  # D'_i
    steps_independent: int
    steps_progressive: int
    flops_independent: float  # 6 · N_i · D(N_i)
    flops_progressive: float  # 6 · N_i · D'_i
    cum_flops_independent: float  # Σ_{j<=i}
    cum_flops_progressive: float  # == flops_independent by Eq. 4
    attn_flops_independent: float  # flops_per_token(cfg, seq_len) · D(N_i)
    attn_flops_progressive: float
    max_lr: float
    min_lr: float
    given_tokens: float = 0.0  # D(N_1) of a start_from member: accounted, not trained
    given_flops: float = 0.0  # 6 · N_1 · given_tokens; in the cumulative columns, not the spent ones
    # distill.inherit: the teacher's forwards, 2 · N_{i-1} · D'_i · (share of steps at α > 0);
    # in cum_flops_progressive and the saving, not in flops_progressive
    teacher_flops_progressive: float = 0.0
    teacher_attn_flops_progressive: float = 0.0  # the same, attention-inclusive (a third of F_{i-1})
    # direction: shrink (None otherwise): the largest trains on D(N_L); a smaller member recovers
    # on shrink.tokens · D(N_i) with its source as teacher (2 · N_t per token under kd)
    tokens_shrink: float | None = None
    steps_shrink: int | None = None
    flops_shrink: float | None = None  # 6 · N_i · tokens_shrink
    teacher_flops_shrink: float | None = None
    cum_flops_shrink: float | None = None  # its source's, plus its own student and teacher FLOPs
    attn_flops_shrink: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def tokens(self, mode: str) -> float:
        """The planned budget of `mode`: progressive (Eq. 4), independent or shrink."""
        return {"progressive": self.tokens_progressive, "independent": self.tokens_independent,
                "shrink": self.tokens_shrink}[mode]

    def to_dict(self) -> dict:
        out = {**dataclasses.asdict(self), "tokens_per_step": self.tokens_per_step}
        if not self.teacher_flops_progressive:  # plans of families without a teacher stay as they were
            del out["teacher_flops_progressive"], out["teacher_attn_flops_progressive"]
        if self.tokens_shrink is None:  # and grow families' plans without the shrink fields
            out = {k: v for k, v in out.items() if not k.endswith("_shrink")}
        return out


#: GPU-hours assume an H100 SXM's dense bf16 peak (TFLOP/s) and 40% MFU, a typical well-tuned
#: LLM pre-training run.
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class VariantPlan:
    """A distilled variant (distill: retro / draft), the same in each mode: its tokens
    (`tokens` × the member's D(N_i)) and FLOPs (student 6·N_i·T, teacher forwards 2·N_t·T)."""

    name: str  # MEMBER+KIND
    teacher: str
    tokens: float
    flops: float
    teacher_flops: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GpuHours:
    """Wall-clock GPU-hours of the attention-inclusive FLOPs at `mfu` of `peak_tflops`."""

    peak_tflops: float  # dense peak of one GPU, 1e12 FLOP/s
    mfu: float  # model FLOPs utilisation, fraction of peak
    independent: list[float]  # per stage, hours
    progressive: list[float]

    @property
    def total_independent(self) -> float:
        return sum(self.independent)

    @property
    def total_progressive(self) -> float:
        return sum(self.progressive)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_independent": self.total_independent,
                "total_progressive": self.total_progressive}


@dataclass(frozen=True)
class FamilyPlan:
    """Per-stage budgets of a family under Independent and Progressive training, with totals."""

    family: FamilyConfig
    stages: list[StagePlan]
    variants: list[VariantPlan] = dataclasses.field(default_factory=list)  # per mode

    @property
    def given(self) -> StagePlan | None:
        """The stage that is a given checkpoint (start_from: the first, or a shrink family's
        largest), else None."""
        return self.stages[self.family.given_index] if self.family.start_from is not None else None

    @property
    def flops_independent(self) -> float:
        """Family total, 6ND spent: every member from scratch (a given one is not)."""
        return sum(s.flops_independent for s in self.stages)

    @property
    def flops_progressive(self) -> float:
        """Family total, 6ND spent: the largest member's from-scratch cost, less the given FLOPs."""
        return sum(s.flops_progressive for s in self.stages)

    @property
    def flops_shrink(self) -> float | None:
        """Family total of a shrink family, 6ND spent: the largest's training and every
        recovery's student and teacher FLOPs (None for a grow family)."""
        if self.family.direction != "shrink":
            return None
        return sum(s.flops_shrink + s.teacher_flops_shrink for s in self.stages)

    @property
    def teacher_flops(self) -> float:
        """distill.inherit's teacher forward passes over the progressive stages (0 without)."""
        return sum(s.teacher_flops_progressive for s in self.stages)

    @property
    def saving(self) -> float:
        """Fraction of the Independent 6ND FLOPs that progressive training saves (its teachers'
        forward passes, under distill.inherit, counted against it)."""
        return 1 - (self.flops_progressive + self.teacher_flops) / self.flops_independent

    @property
    def attn_saving(self) -> float:
        """The same saving measured with attention-inclusive FLOPs."""
        return 1 - (sum(s.attn_flops_progressive + s.teacher_attn_flops_progressive for s in self.stages)
                    / sum(s.attn_flops_independent for s in self.stages))

    def gpu_hours(self, peak_tflops: float, mfu: float) -> GpuHours:
        """GPU-hours per stage: attention-inclusive FLOPs / (peak_tflops·1e12·mfu) / 3600."""
        peak_tflops = as_number(peak_tflops, "peak TFLOPs", above=0)
        mfu = as_number(mfu, "MFU", above=0)
        if mfu > 1:
            raise ConfigError(f"MFU is a fraction of peak in (0, 1], got {mfu}")
        rate = peak_tflops * 1e12 * mfu * 3600  # FLOPs per GPU-hour
        return GpuHours(peak_tflops, mfu,
                        [s.attn_flops_independent / rate for s in self.stages],
                        [(s.attn_flops_progressive + s.teacher_attn_flops_progressive) / rate for s in self.stages])

    def to_dict(self, peak_tflops: float | None = None, mfu: float | None = None) -> dict:
        """JSON-ready plan; GPU-hours are included when both peak_tflops and mfu are given."""
        out = {
            "name": self.family.name,
            "count": self.family.count,
            "tokens": {"chinchilla": self.family.chinchilla} if self.family.chinchilla is not None
            else {"explicit": self.family.tokens},
            "lr": self.family.lr.to_dict(),
            "start_from": self.family.start_from,
            "stages": [s.to_dict() for s in self.stages],
            "totals": {
                "tokens_independent": sum(s.tokens_independent for s in self.stages),
                "tokens_progressive": sum(s.tokens_progressive for s in self.stages),
                "steps_independent": sum(s.steps_independent for s in self.stages),
                "steps_progressive": sum(s.steps_progressive for s in self.stages),
                "flops_independent": self.flops_independent,
                "flops_progressive": self.flops_progressive,
                "attn_flops_independent": sum(s.attn_flops_independent for s in self.stages),
                "attn_flops_progressive": sum(s.attn_flops_progressive for s in self.stages),
                "flops_given": sum(s.given_flops for s in self.stages),
                "saving_pct": 100 * self.saving,
                "attn_saving_pct": 100 * self.attn_saving,
            },
        }
        if self.teacher_flops:
            out["totals"]["teacher_flops_progressive"] = self.teacher_flops
        if self.flops_shrink is not None:
            out["direction"], out["shrink"] = "shrink", self.family.shrink.to_dict()
            out["totals"].update(tokens_shrink=sum(s.tokens_shrink for s in self.stages),
                                 flops_shrink=self.flops_shrink,
                                 teacher_flops_shrink=sum(s.teacher_flops_shrink for s in self.stages),
                                 shrink_saving_pct=100 * (1 - self.flops_shrink / self.flops_independent))
        if self.variants:
            out["variants"] = [v.to_dict() for v in self.variants]
        if peak_tflops is not None and mfu is not None:
            out["gpu_hours"] = self.gpu_hours(peak_tflops, mfu).to_dict()
        return out


def independent_tokens(family: FamilyConfig, params: Sequence[float]) -> list[float]:
    """D(N_i): r·20·N_i, or the family's explicit tokens."""
    if family.tokens is not None:
        return list(family.tokens)
    return [family.chinchilla * CHINCHILLA_TOKENS_PER_PARAM * n for n in params]


def progressive_tokens(params: Sequence[float], independent: Sequence[float],
                       names: Sequence[str], start_tokens: float | None = None) -> list[float]:
    """D'_i by Eq. 4; ConfigError naming the stage whose budget comes out <= 0.

    start_tokens: member 1 is given (start_from) and continued on these tokens: D'_1 is them,
    and Eq. 4 counts member 1 as N_1·(D(N_1) + start_tokens) (module docstring)."""
    spent = 0.0  # Σ_{j<i} N_j·D'_j, parameter-tokens already trained (or given)
    out = []
    for i, (n, d, name) in enumerate(zip(params, independent, names), start=1):
        if i == 1 and start_tokens is not None:
            out.append(start_tokens)
            spent += n * (d + start_tokens)
            continue
        d_prog = d - spent / n
        if d_prog <= 0:
            raise ConfigError(
                f"stage {i} ({name}): progressive budget D'_{i} = {d:.4g} - {spent / n:.4g} = "
                f"{d_prog:.4g} tokens <= 0; the earlier stages already cost as much as training "
                f"{name} from scratch (give it more tokens or the earlier stages fewer)"
            )
        out.append(d_prog)
        spent += n * d_prog
    return out


def make_plan(family: FamilyConfig) -> FamilyPlan:
    """Token budgets, steps, FLOPs and peak LRs of every stage of `family`."""
    params = family.counted_params()
    names = [m.name for m in family.members]
    d_ind = independent_tokens(family, params)
    start = family.start_from_tokens if family.start_from is not None else None
    g = family.given_index  # the given member: the first, or a shrink family's largest
    try:
        d_prog = progressive_tokens(params, d_ind, names, start if g == 0 else None)
    except ConfigError as err:
        raise ConfigError(f"family {family.name}: {err}") from None
    given = [0.0] * len(params)
    if start is not None:  # both modes train the given member on its continuation only
        given[g], d_ind = d_ind[g], [*d_ind[:g], start, *d_ind[g + 1:]]
    max_lrs = family.lr.max_lrs(params)
    batch_sizes, seq_lens = family.batch_sizes, family.seq_lens
    stages, cum_ind, cum_prog = [], 0.0, 0.0
    for i, cfg in enumerate(family.members):
        n, batch, seq = params[i], batch_sizes[i], seq_lens[i]
        f_ind, f_prog, f_given = 6 * n * d_ind[i], 6 * n * d_prog[i], 6 * n * given[i]
        steps_prog = steps_for(d_prog[i], batch * seq)
        share = family.distill.teacher_share(steps_prog) if i else 0.0
        f_teacher = 2 * params[i - 1] * d_prog[i] * share
        f_teacher_attn = flops_per_token(family.members[i - 1], seq) / 3 * d_prog[i] * share
        cum_ind += f_ind + f_given
        cum_prog += f_prog + f_given + f_teacher
        per_token = flops_per_token(cfg, seq)
        stages.append(StagePlan(
            index=i + 1, name=cfg.name, params=n,
            nonembedding_params=num_params(cfg, "nonembedding"), total_params=num_params(cfg, "total"),
            batch_size=batch, seq_len=seq,
            tokens_independent=d_ind[i], tokens_progressive=d_prog[i],
            steps_independent=steps_for(d_ind[i], batch * seq), steps_progressive=steps_prog,
            flops_independent=f_ind, flops_progressive=f_prog,
            cum_flops_independent=cum_ind, cum_flops_progressive=cum_prog,
            attn_flops_independent=per_token * d_ind[i], attn_flops_progressive=per_token * d_prog[i],
            max_lr=max_lrs[i], min_lr=max_lrs[i] * family.lr.min_ratio,
            given_tokens=given[i], given_flops=f_given, teacher_flops_progressive=f_teacher,
            teacher_attn_flops_progressive=f_teacher_attn,
        ))
    if family.direction == "shrink":
        stages = shrink_budgets(family, stages)
    variants = []
    for kind in family.distill.variants():
        for i, t in family.distill.pairs(kind, len(stages)):
            # a fraction of the member's from-scratch budget D(N_i) (a start_from member's given one)
            tokens = getattr(family.distill, kind)["tokens"] * (stages[i].given_tokens or stages[i].tokens_independent)
            variants.append(VariantPlan(f"{stages[i].name}+{kind}", stages[t].name, tokens, 6 * params[i] * tokens,
                                        2 * params[t] * tokens))
    return FamilyPlan(family, stages, variants)


def shrink_budgets(family: FamilyConfig, stages: list[StagePlan]) -> list[StagePlan]:
    """`stages` with the shrink fields of a family built downward: the largest trains on its
    D(N_L) (a given one, start_from, on its continuation; its from-scratch cost counted as given
    in the cumulative FLOPs); member i recovers on shrink.tokens · D(N_i) tokens, its teacher's
    forwards (kd) costing 2 · N_t per token; cumulative FLOPs run down the chain of sources."""
    section, last = family.shrink, len(stages) - 1
    out: list[StagePlan | None] = [None] * len(stages)
    for i in range(last, -1, -1):
        stage = stages[i]
        from_scratch = stage.given_tokens or stage.tokens_independent  # a given member's D(N)
        tokens = stage.tokens_independent if i == last else section.tokens * from_scratch
        teacher = None if i == last else section.teacher(i, len(stages))
        t_flops = 0.0 if teacher is None or section.recover != "kd" else 2 * stages[teacher].params * tokens
        flops = 6 * stage.params * tokens
        out[i] = dataclasses.replace(
            stage, tokens_shrink=tokens, steps_shrink=steps_for(tokens, stage.tokens_per_step), flops_shrink=flops,
            teacher_flops_shrink=t_flops, attn_flops_shrink=flops_per_token(family.members[i], stage.seq_len) * tokens,
            cum_flops_shrink=(stage.given_flops if teacher is None else out[teacher].cum_flops_shrink)
            + flops + t_flops)
    return out
