"""Shrinking a saved model, `growfam shrink` as a function: score its parts, prune it to a
smaller shape, and optionally recover what pruning cost by training — distillation from the
unpruned source (Minitron's recipe: logits-only forward KL; Muralidharan et al., arXiv
2407.14679, and Sreenivas et al., arXiv 2408.11796) or plain cross-entropy, to compare.

grow/ slices and train/ trains; joining them is a member's build, so it lives with the family's
stages, and a family built downward (family/downward.py) uses it for each member below the
largest. The output folder OUT holds:

    shrink.json      settings, parameter counts, held-out losses (source, pruned, recovered), done
    importance.json  the scores of every dimension and the indices kept
    model/           the result, a Hugging Face directory (recovered when recovery was asked)
    pruned/          with recovery: the model right after pruning, the run's start
    recovery/        with recovery: the training run (checkpoints, metrics.jsonl)

`check_shrink` validates everything before any work; `shrink_directory` does the work. A run
killed during recovery resumes when the same command is given again (the same settings); a
finished one is reported, not rebuilt.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from growfam.data import TokenDataset, eval_windows, open_dataset
from growfam.data.loader import num_windows
from growfam.device import check_device, resolve_device
from growfam.errors import ConfigError, GrowfamError
from growfam.family.directory import RECOVERY_RUN
from growfam.family.stage import publish
from growfam.grow.config import RECOVERY
from growfam.grow.importance import DEPTH_RULES, WIDTH_RULES, measure, random_importance, select
from growfam.grow.optim import prune_adamw
from growfam.grow.prune import PruneMaps, prune
from growfam.io import atomic_write_text, check_output, read_json
from growfam.model import (Llama, ModelConfig, check_pretrained, load_pretrained, num_params, resolve_config,
                           save_pretrained)
from growfam.outputs import SHRINK, SHRINK_FILE, kind_of
from growfam.train import TrainConfig, check_teacher, train
from growfam.train.checkpoint import OPTIMIZER_FILE, holds_optimizer_state, latest_checkpoint, load_checkpoint
from growfam.train.config import check_seq_len
from growfam.train.optim import make_optimizer
from growfam.train.parallel import barrier, on_main, rank_and_world, share

#: The fields `--to FIELD=N,...` may set (the rest is the source's).
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
IMPORTANCE_FILE = "importance.json"


@dataclass
class ShrinkOptions:
    """How to shrink. width: the importance rule (WIDTH_RULES); depth: DEPTH_RULES; calibration:
    windows of seq_len tokens of the training split, run one at a time (Minitron found larger
    batches worse); recover: RECOVERY, over `tokens` training tokens; train: other TrainConfig
    fields of the recovery run (max_lr, batch_size, ...; `distill` fields with kd);
    eval_windows: validation windows of the held-out losses; seed: random scores and the run."""

    width: str = "importance"
    depth: str = "contiguous"
    calibration: int = 1024
    seq_len: int | None = None  # 256, or the source's context when that is shorter
    recover: str = "none"
    tokens: int = 0
    train: dict = field(default_factory=dict)
    eval_windows: int = 64
    seed: int = 0


@dataclass
class Checked:
    """What check_shrink found: the configs, the dataset, the recovery run's config (None
    without recovery), and the earlier record when OUT holds an unfinished (or finished) run."""

    source: ModelConfig
    target: ModelConfig
    dataset: TokenDataset
    recovery: TrainConfig | None
    settings: dict
    earlier: dict | None


def target_config(source: ModelConfig, to: str) -> ModelConfig:
    """The pruned shape: `to` a preset, config file or model directory (its shape fields), or
    "FIELD=N,..." changing some of SHAPE_FIELDS; everything else (vocabulary, RoPE, head_dim,
    biases, model type) is the source's."""
    if "=" in to:
        fields = {}
        for item in to.split(","):
            key, _, value = (part.strip() for part in item.partition("="))
            if key not in SHAPE_FIELDS:
                raise ConfigError(f"--to {to}: expected FIELD=N[,FIELD=N...] with fields {', '.join(SHAPE_FIELDS)}, "
                                  f"got {item.strip()!r}")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ConfigError(f"--to {to}: {key} must be a whole number, got {value!r}") from None
        name, head_dim = f"{source.name}-pruned", source.head_dim
    else:
        given = resolve_config(to)
        fields, name, head_dim = {k: getattr(given, k) for k in SHAPE_FIELDS}, given.name, given.head_dim
    return source.replace(name=name, head_dim=head_dim, **fields)


def _settings(src: str, to: str, data: str, opts: ShrinkOptions) -> dict:
    """What a shrink output is built with (its identity: a rerun with these resumes)."""
    return {"source": str(Path(src).resolve()), "to": to, "data": str(Path(data).resolve()), **asdict(opts)}


def check_shrink(src: str, to: str, data: str, out: str, opts: ShrinkOptions, force: bool = False,
                 owned: bool = False) -> Checked:
    """Every input checked before any work or write (one-line GrowfamErrors): the options, the
    source, the output (new, an unfinished shrink of the same settings to resume, or --force
    over a shrink output), the target shape, the dataset (the source's tokenizer; calibration
    and validation windows) and the recovery run's config (and teacher). `opts.seq_len` comes
    back filled in (Checked.settings). owned: OUT belongs to a family run (no output checks;
    an earlier shrink there must have the same settings)."""
    _check_options(opts)
    source = check_pretrained(src)
    if opts.seq_len is None:
        opts = replace(opts, seq_len=min(256, source.max_seq_len))
    settings = _settings(src, to, data, opts)
    earlier = _earlier(out, settings, force, [src, data], owned)
    shape = target_config(source, to)
    # the shape's refusals before the weights; the pruned config (norm_eps follows d) from any maps of it
    target = select(random_importance(source), source, shape, opts.depth).config(source).replace(name=shape.name)
    check_seq_len(opts.seq_len, source, f"the source {src}")
    dataset = open_dataset(data)
    _check_tokenizer(src, dataset)
    for split, what in (("train", "the calibration set"), ("val", "the held-out set")):
        if num_windows(dataset.num_tokens(split), opts.seq_len) == 0:
            raise ConfigError(f"{what} is empty: the {split} split of {data} holds {dataset.num_tokens(split):,} "
                              f"tokens, no window of {opts.seq_len + 1}")
    recovery = None
    if opts.recover != "none":
        extra = dict(opts.train)
        distill = extra.pop("distill", None)
        recovery = TrainConfig.from_dict({
            "seed": opts.seed, **extra, "model": target.to_dict(), "data": data, "seq_len": opts.seq_len,
            "out_dir": str(Path(out) / RECOVERY_RUN), "max_tokens": opts.tokens, "max_steps": None,
            "distill": None if opts.recover == "ce" else {"weight": 1.0, **(distill or {}), "teacher": src}})
        recovery.total_steps  # a budget under one step is refused here
        if recovery.distill is not None:
            check_teacher(recovery.distill, target, dataset, opts.seq_len)
        elif distill is not None:
            raise ConfigError("distill settings are for --recover kd; --recover ce trains on cross-entropy alone")
    return Checked(source, target, dataset, recovery, settings, earlier)


def _check_options(opts: ShrinkOptions) -> None:
    for value, choices, flag in ((opts.width, WIDTH_RULES, "--width"), (opts.depth, DEPTH_RULES, "--depth"),
                                 (opts.recover, RECOVERY, "--recover")):
        if value not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    seq_len = 2 if opts.seq_len is None else opts.seq_len  # None: filled in from the source later
    for value, flag, low in ((opts.calibration, "--calibration", 1), (seq_len, "--seq-len", 2),
                             (opts.eval_windows, "--eval-windows", 1), (opts.tokens, "--tokens", 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{flag} must be a whole number ≥ {low}, got {value!r}")
    if (opts.recover == "none") != (opts.tokens == 0):
        raise ConfigError("--recover kd|ce needs --tokens N > 0, and --tokens needs --recover kd|ce"
                          if opts.recover != "none" else "--tokens needs --recover kd or ce")
    check_device(opts.train.get("device", "auto"))  # importance and pruning run there too
    unused = sorted(set(opts.train) - {"device"}) if opts.recover == "none" else []
    if unused:
        raise ConfigError(f"{', '.join(unused)}: recovery settings need --recover kd or ce")
    if not -2**63 <= opts.seed < 2**63:
        raise ConfigError(f"--seed must be a 64-bit integer, got {opts.seed}")


def _earlier(out: str, settings: dict, force: bool, sources: list[str], owned: bool = False) -> dict | None:
    """The record of an earlier shrink with these settings in `out` (to resume or report), or
    None when `out` may be written afresh; a GrowfamError when it may not."""
    path = Path(out)
    if owned and not (path / SHRINK_FILE).is_file():
        return None
    if (owned or kind_of(path) == SHRINK) and not force:
        record = read_json(path / SHRINK_FILE)
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise GrowfamError(f"{path / SHRINK_FILE} is not a shrink record growfam wrote; pass --force to "
                               "replace the output, or choose another --out")
        if record["settings"] != settings:
            old = record["settings"]
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise GrowfamError(f"--out {out} holds a shrink with other settings ({', '.join(changed)}); "
                               "pass --force to replace it, or choose another --out")
        return record
    check_output(path, force=force, makes=SHRINK, sources=sources, what="--out")
    return None


def _check_tokenizer(src: str, dataset: TokenDataset) -> None:
    try:
        same = dataset.tokenized_with(src)
    except GrowfamError:
        raise ConfigError(f"{src} holds no tokenizer, so it cannot be checked against the dataset's; "
                          "save the model with its tokenizer files") from None
    if not same:
        raise ConfigError(f"{src} has another tokenizer than the dataset {dataset.path} was prepared with: "
                          "prepare the data with the model's tokenizer")


@torch.no_grad()
def held_out_loss(model: Llama, tokens, seq_len: int, windows: int) -> float:
    """Mean next-token loss (nats per token) over `windows` evenly spread windows of `tokens`."""
    device = next(model.parameters()).device
    total = count = 0
    for x, y in eval_windows(tokens, seq_len, windows, 8):
        total, count = total + model.loss(x.to(device), y.to(device)).item() * len(x), count + len(x)
    return total / count


def calibration_windows(dataset: TokenDataset, seq_len: int, count: int) -> torch.Tensor:
    """[≤ count, seq_len] windows spread evenly over the training split."""
    return torch.cat([x for x, _ in eval_windows(dataset.tokens("train"), seq_len, count, 64)])


def shrink_directory(src: str, to: str, data: str, out: str, opts: ShrinkOptions, *, force: bool = False,
                     log: Callable[[str], None] = print, progress: bool = True, owned: bool = False,
                     model_dir: str | Path | None = None) -> dict:
    """Shrink the model directory `src` to `to` (see the module docstring); the record written
    to OUT/shrink.json. owned: OUT is a family's (check_shrink); model_dir: where the result
    goes (default OUT/model)."""
    checked = check_shrink(src, to, data, out, opts, force, owned)
    # Under torchrun rank 0 alone prunes, measures and writes, every rank trains the recovery:
    # every rank has read OUT before rank 0 writes there, and rank 0's view decides.
    barrier()
    opts = replace(opts, seq_len=checked.settings["seq_len"])
    out_dir = Path(out)
    record = checked.earlier
    if record is not None and record.get("done"):
        log(f"{out} holds this shrink, done earlier; nothing to do")
        return record
    if force and (out_dir.is_symlink() or kind_of(out_dir) == SHRINK):  # check_output allowed it, as --force asks
        on_main(lambda: out_dir.unlink() if out_dir.is_symlink() else shutil.rmtree(out_dir))
    device = resolve_device(opts.train.get("device", "auto"))
    model_dir = Path(model_dir) if model_dir is not None else out_dir / "model"
    if share(record is None or not (out_dir / "pruned").is_dir()):
        record = share(on_main(lambda: _prune(src, out_dir, model_dir, checked, opts, device, log, progress)))
    if checked.recovery is not None:
        record = _recover(out_dir, model_dir, checked, record, device, log)
    record["done"] = True
    on_main(lambda: atomic_write_text(out_dir / SHRINK_FILE, _json(record)))
    return record


def _prune(src: str, out_dir: Path, model_dir: Path, checked: Checked, opts: ShrinkOptions, device, log,
           progress) -> dict:
    """Score, prune, measure; write importance.json, shrink.json (not done) and pruned/ (or,
    without recovery, model/)."""
    source = load_pretrained(src, dtype=torch.float32, device=device).eval()
    val = checked.dataset.tokens("val")
    windows = None if opts.width != "importance" else calibration_windows(checked.dataset, opts.seq_len,
                                                                             opts.calibration)
    start = time.perf_counter()
    importance = measure(opts.width, source, windows, opts.seed, progress)
    maps = select(importance, source.cfg, checked.target, opts.depth)
    scored = time.perf_counter() - start
    pruned = prune(source, maps).eval()
    losses = {"source": held_out_loss(source, val, opts.seq_len, opts.eval_windows),
              "pruned": held_out_loss(pruned, val, opts.seq_len, opts.eval_windows)}
    log(f"pruned {src}: held-out loss {losses['source']:.4f} -> {losses['pruned']:.4f}")
    record = {"settings": checked.settings, "source_config": source.cfg.to_dict(),
              "target_config": pruned.cfg.replace(name=checked.target.name).to_dict(),
              "params": _params(source.cfg, pruned.cfg),
              "kept": _kept(maps, source.cfg), "calibration_windows": 0 if windows is None else len(windows),
              "held_out": losses, "seconds": {"importance": scored}, "recovery": None, "done": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / IMPORTANCE_FILE, json.dumps({"rule": opts.width, "depth": opts.depth, "scores":
                                                            importance.to_dict(), "kept": asdict(maps)}) + "\n")
    atomic_write_text(out_dir / SHRINK_FILE, _json(record))
    if checked.recovery is None:
        save_pretrained(pruned, model_dir, tokenizer=src)
        return record
    optimizer = _pruned_optimizer(src, source, pruned, maps, checked.recovery)
    save_pretrained(pruned, out_dir / "pruned", tokenizer=src)
    if optimizer is not None:  # the sliced moments, the run's start, beside its weights
        torch.save(optimizer.state_dict(), out_dir / "pruned" / OPTIMIZER_FILE)
    return record


def _pruned_optimizer(src: str, source: Llama, pruned: Llama, maps: PruneMaps, tcfg: TrainConfig):
    """The source checkpoint's AdamW state (whole or sharded) sliced like the weights (None when
    SRC has none)."""
    if not holds_optimizer_state(src):
        return None
    optimizer = make_optimizer(source, tcfg.replace(model=source.cfg), torch.device("cpu"))
    load_checkpoint(src, source, optimizer)
    return prune_adamw(optimizer, source, pruned, maps)


def _recover(out_dir: Path, model_dir: Path, checked: Checked, record: dict, device, log) -> dict:
    """Train the pruned model (resuming a killed run), publish model/, measure it."""
    tcfg = checked.recovery
    model = optimizer = None
    if latest_checkpoint(out_dir / RECOVERY_RUN) is None and rank_and_world()[0] == 0:  # train() sends it on
        model = load_pretrained(out_dir / "pruned", dtype=torch.float32)
        if (out_dir / "pruned" / OPTIMIZER_FILE).is_file():
            optimizer = make_optimizer(model, tcfg, torch.device("cpu"))
            optimizer.load_state_dict(torch.load(out_dir / "pruned" / OPTIMIZER_FILE, weights_only=True))
    how = "distillation from the source" if tcfg.distill else "cross-entropy"
    log(f"recovering by {how}: {tcfg.max_tokens:,} tokens")
    result = train(tcfg, model, optimizer, dataset=checked.dataset)
    return share(on_main(lambda: _recovered(result, model_dir, checked, record, device)))


def _recovered(result, model_dir: Path, checked: Checked, record: dict, device) -> dict:
    """Publish the recovery run's result to model_dir and measure it; the record with both."""
    tcfg, opts = checked.recovery, checked.settings
    publish(result, model_dir)
    recovered = load_pretrained(model_dir, dtype=torch.float32, device=device).eval()
    record["held_out"]["recovered"] = held_out_loss(recovered, checked.dataset.tokens("val"), opts["seq_len"],
                                                    opts["eval_windows"])
    record["recovery"] = {"how": opts["recover"], "tokens": result.tokens, "steps": result.steps,
                          "flops": result.flops, "flops_attn": result.flops_attn, "flops_teacher": result.flops_teacher,
                          "wall_s": result.wall_s, "val_loss": result.val_loss, "train_loss": result.train_loss,
                          "max_lr": tcfg.max_lr, "spikes": result.spikes, "rollbacks": result.rollbacks,
                          "distill": None if tcfg.distill is None else
                          {k: v for k, v in tcfg.distill.to_dict().items() if k != "teacher"}}
    return record


def _params(source: ModelConfig, target: ModelConfig) -> dict:
    return {f"{who}_{kind}": num_params(cfg, kind) for who, cfg in (("source", source), ("pruned", target))
            for kind in ("total", "nonembedding")}


def _kept(maps: PruneMaps, cfg: ModelConfig) -> dict:
    return {"hidden": [len(maps.hidden), cfg.d_model], "kv_groups": [len(maps.groups[0]), cfg.n_kv_heads],
            "ffn": [len(maps.ffn[0]), cfg.ffn_dim], "layers": list(maps.layers), "of_layers": cfg.n_layers}


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def format_record(record: dict) -> str:
    """The shrink as text: shapes, parameters kept, the held-out losses, the recovery's cost."""
    s, t, p, k, h = (record[key] for key in ("source_config", "target_config", "params", "kept", "held_out"))
    shape = "d={d_model} ffn={ffn_dim} heads={n_heads}/{n_kv_heads} layers={n_layers}"
    settings = record["settings"]
    dropped = [i for i in range(k["of_layers"]) if i not in k["layers"]]
    lines = [f"shrink {s['name']} -> {t['name']}: width={settings['width']} depth={settings['depth']} "
             f"calibration={record['calibration_windows']} windows",
             f"  source  {shape.format(**s)}  {p['source_total']:,} parameters ({p['source_nonembedding']:,} "
             "non-embedding)",
             f"  pruned  {shape.format(**t)}  {p['pruned_total']:,} parameters ({p['pruned_nonembedding']:,} "
             f"non-embedding, {p['pruned_nonembedding'] / p['source_nonembedding']:.1%} kept)",
             f"  kept: {k['hidden'][0]}/{k['hidden'][1]} channels, {k['kv_groups'][0]}/{k['kv_groups'][1]} KV groups "
             f"per layer, {k['ffn'][0]}/{k['ffn'][1]} FFN neurons per layer; layers dropped: {dropped or 'none'}",
             f"  held-out loss: source {h['source']:.4f}, pruned {h['pruned']:.4f}"
             + (f", recovered {h['recovered']:.4f}" if h.get("recovered") is not None else "")]
    if record.get("recovery"):
        r = record["recovery"]
        lines.append(f"  recovery ({r['how']}): {r['tokens']:,} tokens, {r['steps']} steps, {r['flops']:.3g} FLOPs"
                     + (f" + teacher {r['flops_teacher']:.3g}" if r["flops_teacher"] else "")
                     + f", {r['wall_s']:.0f} s")
    return "\n".join(lines)
