"""Width operators and the one routine that grows a tensor along its index maps.

Every weight axis belongs to a *space* that grows: the residual stream `d`, query rows `q`,
key/value rows `kv` (whole heads, see maps.py) or FFN units `f`. A weight writes one space
along its rows and reads another along its columns (`q_proj`: writes q, reads d; `o_proj`:
writes d, reads q). An operator says, per space, whether new units copy a source unit or are
filled (zero / random) on the writing side and on the reading side, and whether readers
divide copied units by their count (the fpi split `W'[:, i] = W[:, g(i)] / c_g(i)`).

Optimizer moments travel through the same routine (see optim.py): a copy of a unit that its
readers divide by c receives 1/c of the source's gradient (its input activation is the same,
its output counts 1/c), so moments are scaled along the *written* space, m by 1/c and v by
1/c²; the split of the element's own input does not change its gradient. Filled units and
units whose outputs are not read (zero output columns) start at zero moments.

Two tensors are special: the output head and the final norm. A tied head is the embedding,
which must copy its columns undivided (x' = x[g]); so the head always copies its columns and
the final RMSNorm gains carry the split, γ' = γ[g]/c — the same logits, tied or untied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from growfam.errors import ConfigError
from growfam.grow import maps
from growfam.model import ModelConfig

#: What fills new positions: None (copy through the map), "zero" or "random" (a fresh init:
#: N(0, std) for matrices, 1 for RMSNorm gains).
Fill = str | None


@dataclass(frozen=True)
class WidthOp:
    """A width operator, as rules per space kind ("d" residual, "unit" heads and FFN units)."""

    name: str
    exact: str  # when it preserves the function, for docs and reports
    copy: str = "balanced"  # how new units pick a source: "balanced" or "tiled" (maps.py)
    split: bool = True  # readers divide copied units by their count
    d_fill: tuple[Fill, Fill] = (None, None)  # (write side, read side) of new residual dims
    unit_fill: tuple[Fill, Fill] = (None, None)  # (write side, read side) of new heads / units
    gain_fill: Fill = None  # new RMSNorm gains
    rescale_norm: bool = False  # lossless: γ·√(D_s/D_t), eps·D_s/D_t (zero-padded residual)
    next_layer: bool = False  # aki: new heads / FFN units come from layer l+1
    masked: bool = False  # new units gated by a ramped mask (masks.py)
    integer: bool = False  # needs integer ratios


WIDTH_OPS: dict[str, WidthOp] = {op.name: op for op in (
    WidthOp("fpi", "exact at integer ratios (equal replication); else RMS mismatch, reported"),
    WidthOp("aki", "not function-preserving by design (new units from layer l+1)", next_layer=True),
    WidthOp("lossless", "exact at any ratio (zero-padded residual, eps·D_s/D_t)", split=False,
            d_fill=("zero", "random"), unit_fill=(None, "zero"), rescale_norm=True),
    WidthOp("hypercloning", "exact (integer ratios only)", copy="tiled", integer=True),
    WidthOp("zero", "not exact (RMSNorm sees the zero dims); new units get no gradient",
            split=False, d_fill=("zero", "zero"), unit_fill=("zero", "zero"), gain_fill="zero"),
    WidthOp("random", "not exact", split=False, d_fill=("random", "random"),
            unit_fill=("random", "random"), gain_fill="random"),
    WidthOp("direct", "not exact (copies without division)", split=False),
    WidthOp("masked", "exact while the mask is 0; ramps new units in over mask_steps", split=False,
            d_fill=("random", "random"), unit_fill=("random", "random"), gain_fill="random",
            masked=True),
)}


@dataclass(frozen=True)
class Axis:
    """How one tensor axis grows from n_source to len(src) positions.

    Positions < keep copy `src` (the first n_source in place); later ones get `fill`. `value`
    and `grad` ([n_source] or None) multiply copied weights and copied moments (by source
    position); moments of positions >= moment_keep start at zero.
    """

    src: torch.Tensor
    n_source: int
    keep: int
    fill: Fill = None
    value: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    moment_keep: int | None = None

    @classmethod
    @functools.cache  # one per size: a 50k-long arange costs milliseconds
    def fixed(cls, n: int) -> "Axis":
        """An axis that does not grow (the vocabulary)."""
        return cls(torch.arange(n), n, n)

    @property
    def n_target(self) -> int:
        return len(self.src)

    def scale(self, mode: str) -> torch.Tensor | None:
        """The multiplier of copied positions in mode value / m / v; None when it is all 1."""
        s = self._nontrivial[0 if mode == "value" else 1]
        return None if s is None else s * s if mode == "v" else s

    @functools.cached_property
    def _nontrivial(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return tuple(None if s is None or bool(torch.all(s == 1)) else s
                     for s in (self.value, self.grad))

    @functools.cached_property
    def unscaled(self) -> int:
        """Copied positions (in value mode) whose value is not rescaled."""
        if self.value is None:
            return self.keep
        return int((self.value[self.src[:self.keep]] == 1).sum())


@dataclass(frozen=True)
class Space:
    """One growing dimension: its map, its readers' split and the operator's fills."""

    src: torch.Tensor  # [n_t] source unit of each target unit
    n_source: int
    split: torch.Tensor  # [n_s] float64: what readers multiply copied units by (1/count or 1)
    write_fill: Fill
    read_fill: Fill

    def _keep(self, fill: Fill) -> int:
        return self.n_source if fill else len(self.src)

    def write(self) -> Axis:
        """Rows of a weight producing this space (q_proj rows, o_proj rows, embedding columns)."""
        dead = self.write_fill or self.read_fill  # filled, or never read: no gradient to inherit
        return Axis(self.src, self.n_source, self._keep(self.write_fill), self.write_fill,
                    grad=self.split, moment_keep=self._keep(dead))

    def read(self) -> Axis:
        """Columns of a weight consuming this space (q_proj columns, o_proj columns)."""
        return Axis(self.src, self.n_source, self._keep(self.read_fill), self.read_fill,
                    value=self.split, moment_keep=self._keep(self.read_fill))

    def head(self) -> Axis:
        """Output-head columns: copied undivided (a tied head is the embedding); the final norm
        divides instead, so the head's input is h/c and its gradient is scaled by the split."""
        return Axis(self.src, self.n_source, self._keep(self.read_fill), self.read_fill,
                    grad=self.split, moment_keep=self._keep(self.read_fill))

    def gain(self, fill: Fill, factor: float, final: bool) -> Axis:
        """RMSNorm gains: copied (times `factor`); the final norm also carries the split. A
        gain over a filled residual dim sees a different input: its moments start at zero."""
        ones = torch.ones(self.n_source, dtype=torch.float64)
        value = (self.split if final else ones) * factor
        return Axis(self.src, self.n_source, self._keep(fill), fill, value=value,
                    grad=None if final else self.split,
                    moment_keep=self._keep(fill or self.write_fill))


def width_spaces(op: WidthOp, src: ModelConfig, tgt: ModelConfig,
                 generator: torch.Generator) -> dict[str, Space]:
    """The spaces d, q, kv, f of a growth src -> tgt under `op` (maps seeded by `generator`)."""

    def unit_map(n_s: int, n_t: int) -> torch.Tensor:
        if op.copy == "tiled":
            return maps.tiled_map(n_s, n_t)
        return maps.balanced_map(n_s, n_t, generator)

    def space(elem_src: torch.Tensor, n_s: int, fills: tuple[Fill, Fill]) -> Space:
        split = 1 / maps.counts(elem_src, n_s) if op.split else torch.ones(n_s, dtype=torch.float64)
        return Space(elem_src, n_s, split, *fills)

    hd = src.head_dim
    kv_heads = unit_map(src.n_kv_heads, tgt.n_kv_heads)
    q_heads = maps.grouped_head_map(kv_heads, src.n_rep)
    return {
        "d": space(unit_map(src.d_model, tgt.d_model), src.d_model, op.d_fill),
        "q": space(maps.blocks(q_heads, hd), src.n_heads * hd, op.unit_fill),
        "kv": space(maps.blocks(kv_heads, hd), src.n_kv_heads * hd, op.unit_fill),
        "f": space(unit_map(src.ffn_dim, tgt.ffn_dim), src.ffn_dim, op.unit_fill),
    }


def check_width(op: WidthOp, src: ModelConfig, tgt: ModelConfig) -> None:
    """ConfigError unless `op` can grow src into tgt."""
    if op.integer:
        for key in ("d_model", "n_kv_heads", "ffn_dim"):
            s, t = getattr(src, key), getattr(tgt, key)
            if t % s:
                raise ConfigError(f"width operator {op.name} needs integer ratios; "
                                  f"{key} grows {s} -> {t} (x{t / s:.3g})")


def norm_rescale(op: WidthOp, src: ModelConfig, tgt: ModelConfig) -> float:
    """D_s/D_t for lossless (gains scale by its square root, eps by it), else 1."""
    return src.d_model / tgt.d_model if op.rescale_norm else 1.0


# --------------------------------------------------------------------------------------------
# Growing one tensor
# --------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """Elements of one grown tensor: copied as is, copied and rescaled (split), or new."""

    copied: int = 0
    split: int = 0
    new: int = 0


def fill_new(t: torch.Tensor, fill: Fill, std: float | None,
             generator: torch.Generator | None) -> None:
    """Fill new positions in place: "random" (N(0, std), or 1 for a gain: std None), else 0."""
    if t.numel() == 0 or t.device.type == "meta":
        return
    if fill == "random" and std is None:
        t.fill_(1.0)  # a fresh RMSNorm gain
    elif fill == "random" and std:  # a bias (std 0) starts at zero
        t.normal_(0.0, std, generator=generator)
    else:
        t.zero_()


def grow_tensor(w: torch.Tensor, axes: tuple[Axis, ...], mode: str = "value", *,
                std: float | None = None, generator: torch.Generator | None = None,
                tail: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, Counts]:
    """Grow a 1-D or 2-D tensor `w` along `axes` (one per dimension).

    mode: "value" (weights: `value` scales, fills), "m" / "v" (Adam moments: `grad` scales,
    squared for v; every non-copied position zero). std: the N(0, std) of random fills, None
    for RMSNorm gains (filled with 1). tail: (dim, w_next) — positions >= n_source along dim
    copy from w_next instead of w (aki; dim 0 for a 1-D tensor). Built directly into the target tensor
    (slice copies of the source block, index_select for the copies, scales in place): no
    float32 upcast, no source-sized temporaries.
    """
    if w.ndim == 1:
        out, counts = grow_tensor(w[None], (Axis.fixed(1), axes[0]), mode, std=std, generator=generator,
                                  tail=None if tail is None else (1, tail[1][None]))
        return out[0], counts
    rows, cols = axes
    moments = mode != "value"
    r_keep = rows.moment_keep if moments and rows.moment_keep is not None else rows.keep
    c_keep = cols.moment_keep if moments and cols.moment_keep is not None else cols.keep
    rs, cs = rows.n_source, cols.n_source
    out = w.new_empty(rows.n_target, cols.n_target)
    c_idx = cols.src[cs:c_keep].to(w.device)
    next_rows = tail[1] if tail is not None and tail[0] == 0 else None
    next_cols = tail[1] if tail is not None and tail[0] == 1 else w
    r, c = rows.scale(mode), cols.scale(mode)
    c = None if c is None else c[cols.src[:c_keep]].to(out)  # per target column
    # Source rows: the source block in place, then the copied columns (aki: the next layer's).
    _copy_rows(out[:rs], w, next_cols, c_idx, scale=c)
    # Copied rows: from the finished rows above, or (aki) from the next layer's rows.
    if r_keep > rs:
        r_idx = rows.src[rs:r_keep].to(w.device)
        if next_rows is None:
            _copy_rows(out[rs:r_keep, :c_keep], out[:rs, :c_keep], None, c_idx[:0], r_idx)
        else:
            _copy_rows(out[rs:r_keep], next_rows, next_rows, c_idx, r_idx, scale=c)
    if r is not None:  # moments only: rows scale by their source row's split
        out[:r_keep, :c_keep].mul_(r[rows.src[:r_keep]].to(out)[:, None])
    # New positions (moments: every position that was not copied is zero).
    fill_new(out[r_keep:], None if moments else rows.fill, std, generator)
    fill_new(out[:r_keep, c_keep:], None if moments else cols.fill, std, generator)
    return out, Counts() if moments else _count(rows, cols)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, extra: torch.Tensor | None,
               c_idx: torch.Tensor, r_idx: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, chunk_bytes: int = 1 << 24) -> None:
    """dst[i, :n] = src[r(i)] and dst[i, n:] = extra[r(i), c_idx] (n = src columns; r = r_idx,
    or the identity), times `scale` per dst column if given. Written in place: big temporaries
    are fresh memory, and page faults, not arithmetic, dominate growing a large model; picked
    rows go through small chunks."""
    n, k = src.shape[1], len(c_idx)
    if r_idx is not None:
        if not k and dst.is_contiguous():
            torch.index_select(src, 0, r_idx, out=dst)
            return
        step = max(1, chunk_bytes // max(1, dst.shape[1] * dst.element_size()))
        for a in range(0, dst.shape[0], step):
            part = src.index_select(0, r_idx[a:a + step])
            more = part if extra is src or not k else extra.index_select(0, r_idx[a:a + step])
            _copy_rows(dst[a:a + step], part, more, c_idx, scale=scale)
        return
    if scale is None:
        dst[:, :n].copy_(src)
    else:
        torch.mul(src, scale[:n], out=dst[:, :n])
    if k:  # gather: about twice as fast as index_select along the inner dimension on CPU
        torch.gather(extra, 1, c_idx.expand(dst.shape[0], k), out=dst[:, n:n + k])
        if scale is not None:
            dst[:, n:n + k].mul_(scale[n:])


def _count(rows: Axis, cols: Axis) -> Counts:
    kept = rows.keep * cols.keep
    plain = rows.unscaled * cols.unscaled
    return Counts(copied=plain, split=kept - plain, new=rows.n_target * cols.n_target - kept)
