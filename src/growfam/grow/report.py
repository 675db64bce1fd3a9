"""What a growth did: per tensor copied / split / new counts, and what it did to the function
on a probe batch (max |Δlogits|, Δloss, the fpi RMS mismatch factor)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from growfam.model import Llama, RMSNorm


@dataclass
class ParamGrowth:
    """One target tensor: elements copied as is, copied and rescaled (split), and new."""

    name: str
    shape: tuple[int, ...]
    copied: int
    split: int
    new: int


@dataclass
class ProbeResult:
    """Source vs grown model on the probe batch [B, T] (loss: next-token, tokens 1..T-1)."""

    max_abs_dlogits: float
    rel_dlogits: float  # max |Δlogits| / max |source logits|
    loss_source: float
    loss_grown: float

    @property
    def dloss(self) -> float:
        return self.loss_grown - self.loss_source


@dataclass
class GrowthReport:
    source: dict
    target: dict
    width: str
    depth: str
    seed: int
    exactness: dict[str, str]  # "width aki" / "depth stack" -> when it preserves the function
    params: list[ParamGrowth]
    probe: ProbeResult | None = None
    rms_factor: tuple[float, float] | None = None  # (min, max) of rms(x)/rms(x') over tokens
    optimizer: str | None = None  # "transfer", "reset" or None (no optimizer given)
    mask_steps: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(p, k) for p in self.params) for k in ("copied", "split", "new")}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["totals"] = self.totals()
        if self.probe is not None:
            out["probe"]["dloss"] = self.probe.dloss
        return out

    def __str__(self) -> str:
        s, t = self.source, self.target
        shape = "d={d_model} ffn={ffn_dim} heads={n_heads}/{n_kv_heads} layers={n_layers}"
        lines = [f"growth {s['name']} -> {t['name']}: width={self.width} depth={self.depth} "
                 f"seed={self.seed} ({self.seconds:.2f} s)",
                 f"  source  {shape.format(**s)}", f"  target  {shape.format(**t)} "
                 f"norm_eps={t['norm_eps']:.3g}"]
        lines += [f"  {op}: {how}" for op, how in self.exactness.items()]
        lines.append(f"  {'tensor':<42}{'n':>4}{'copied':>14}{'split':>14}{'new':>14}")
        for role, (n, c) in _by_role(self.params).items():
            lines.append(f"  {role:<42}{n:>4}{c[0]:>14,}{c[1]:>14,}{c[2]:>14,}")
        tot = self.totals()
        lines.append(f"  {'total':<42}{len(self.params):>4}{tot['copied']:>14,}{tot['split']:>14,}"
                     f"{tot['new']:>14,}")
        if self.probe is not None:
            p = self.probe
            lines.append(f"  probe: max |Δlogits| {p.max_abs_dlogits:.3e} (relative "
                         f"{p.rel_dlogits:.3e}); loss {p.loss_source:.5f} -> {p.loss_grown:.5f} "
                         f"(Δ {p.dloss:+.3e})")
        if self.rms_factor is not None:
            lines.append(f"  RMS mismatch rms(x)/rms(x'): min {self.rms_factor[0]:.6f} "
                         f"max {self.rms_factor[1]:.6f}")
        if self.mask_steps is not None:
            lines.append(f"  masks: new units ramp 0 -> 1 over {self.mask_steps} steps "
                         "(growfam.grow.advance_masks)")
        if self.optimizer is not None:
            lines.append(f"  optimizer state: {self.optimizer}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _by_role(params: list[ParamGrowth]) -> dict[str, tuple[int, list[int]]]:
    """Counts summed over layers: 'layers.*.mlp.up_proj.weight' -> (n tensors, [c, s, n])."""
    roles: dict[str, tuple[int, list[int]]] = {}
    for p in params:
        role = re.sub(r"^layers\.\d+\.", "layers.*.", p.name)
        n, c = roles.get(role, (0, [0, 0, 0]))
        roles[role] = (n + 1, [c[0] + p.copied, c[1] + p.split, c[2] + p.new])
    return roles


@torch.no_grad()
def probe_logits(model: Llama, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(logits [B, T, V] in float64, next-token loss) of `model` on token ids [B, T]."""
    tokens = tokens.to(model.embed_tokens.weight.device)
    logits = model(tokens).double()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return logits, float(loss)


def compare(source: tuple[torch.Tensor, float], grown: tuple[torch.Tensor, float]) -> ProbeResult:
    diff = (grown[0] - source[0]).abs().max().item()
    return ProbeResult(diff, diff / source[0].abs().max().item(), source[1], grown[1])


@torch.no_grad()
def rms_mismatch(model: Llama, tokens: torch.Tensor, weights: torch.Tensor,
                 d_target: int) -> tuple[float, float]:
    """(min, max) over tokens and RMSNorms of the factor rms(x)/rms(x') by which fpi rescales
    each sublayer's input: x' = x[g], so mean(x'²) = Σ_k c_k x_k² / D_t. weights: [D_s] c_k."""
    lo, hi = float("inf"), 0.0

    def hook(norm: RMSNorm, args) -> None:
        nonlocal lo, hi
        x2 = args[0].double().pow(2)
        source = x2.mean(-1) + norm.eps
        grown = (x2 * weights.to(x2.device)).sum(-1) / d_target + norm.eps
        factor = (source / grown).sqrt()
        lo, hi = min(lo, factor.min().item()), max(hi, factor.max().item())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, RMSNorm)]
    try:
        model(tokens.to(model.embed_tokens.weight.device))
    finally:
        for h in handles:
            h.remove()
    return lo, hi
