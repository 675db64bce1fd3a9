"""Training checkpoints: complete, atomic, readable by a single process.

Layout under a run's `out_dir`:

    checkpoints/
      step_0000100/          a Hugging Face directory (config.json, model.safetensors,
        ...                  tokenizer files) that transformers loads as is, plus
        optimizer.pt         torch.save(optimizer.state_dict()); read with weights_only=True
        trainer_state.json   step, tokens, data cursor, RNG, ledger, spike guard, config
      step_0000200/
      latest                 one line: the name of the newest complete checkpoint

Under FSDP (sharded parameters) a checkpoint also holds `dcp/`, the model and AdamW state as
torch.distributed.checkpoint writes them (each rank its shards, in parallel), instead of
optimizer.pt; its Hugging Face files are gathered to rank 0 and written there. A checkpoint
with dcp/ resumes on any number of processes (DCP reshards; one process reads every shard),
and a whole one (optimizer.pt) resumes under FSDP too: rank 0 reads it and sends each rank its
shards.

A checkpoint is written into a temporary sibling directory and renamed into place; only then
is `latest` replaced (os.replace), and only then are checkpoints beyond `keep_last` deleted.
A crash or a full disk at any point leaves every checkpoint that `latest` can name complete.

A checkpoint never holds NaN/inf: `save_checkpoint` checks the weights and the optimizer's
moments first and refuses to write, and loading refuses them too. Loading a damaged
checkpoint (truncated or garbage files, a malformed trainer_state.json) raises one
GrowfamError naming it and the previous complete checkpoint to fall back to.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

from growfam.errors import GrowfamError, TrainingDiverged
from growfam.io import atomic_directory, atomic_write_text, os_error_of
from growfam.model import Llama, load_pretrained, save_pretrained
from growfam.train.guard import nonfinite_tensors
from growfam.train.parallel import Parallelism, share

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SHARDED_DIR = "dcp"
LATEST_FILE = "latest"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _complete(path: Path) -> bool:
    # trainer_state.json is written last inside the temporary directory, so its presence in a
    # renamed directory means the directory is whole.
    return (path / STATE_FILE).is_file()


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and _complete(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def checkpoint_at(out_dir: str | Path, step: int) -> Path | None:
    """The complete checkpoint of `step` in the run `out_dir`, or None."""
    path = checkpoint_root(out_dir) / _step_dir_name(step)
    return path if _complete(path) else None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or (if it is missing or broken) the highest complete one."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST_FILE
    try:
        named = root / pointer.read_text().strip() if pointer.is_file() else None
        if named is not None and named.parent == root and named.name.startswith("step_") and _complete(named):
            return named
    except (OSError, UnicodeDecodeError, ValueError):  # a damaged pointer: look for ourselves
        pass
    found = _checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(out_dir: str | Path, step: int, model: Llama, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, tokenizer=None, keep_last: int = 2,
                    parallel: Parallelism | None = None, keep: tuple[int, ...] = ()) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to `keep_last` (never the
    steps in `keep`: a WSD run's stable checkpoint); its path.

    trainer_state must be JSON-serialisable. Any OSError (unwritable directory, full disk)
    becomes a GrowfamError, and the checkpoints written before stay as they were. NaN/inf in
    the weights or the optimizer state raise TrainingDiverged and nothing is written.
    parallel: a sharded (FSDP) run's strategy; then every rank calls this (see save_sharded).
    """
    if parallel is not None and parallel.sharded:
        return _save_sharded(parallel, out_dir, step, model, optimizer, trainer_state, tokenizer, keep_last, keep)
    root = checkpoint_root(out_dir)
    target = root / _step_dir_name(step)
    _refuse_nonfinite(nonfinite_tensors(model, optimizer), step, root)

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        # through a Python file object, so a full disk's OSError is behind torch's RuntimeError
        # ("unexpected pos"), where io.os_error_of finds it
        with open(tmp / OPTIMIZER_FILE, "wb") as file:
            torch.save(optimizer.state_dict(), file)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")

    try:
        _publish(root, target, write)
    except (GrowfamError, OSError) as err:
        raise _not_written(step, root, err) from None
    _prune(root, target, keep_last, keep)
    return target


def _save_sharded(parallel: Parallelism, out_dir: str | Path, step: int, model: Llama,
                  optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], tokenizer, keep_last: int,
                  keep: tuple[int, ...] = ()) -> Path:
    """save_checkpoint of a sharded model, on every rank: rank 0 makes the temporary directory
    and tells the others, every rank writes its shards into dcp/ there, rank 0 writes the
    gathered Hugging Face files and the trainer state and publishes it; every rank raises the
    same error when any of it fails."""
    root = checkpoint_root(out_dir)
    target = root / _step_dir_name(step)
    _refuse_nonfinite(parallel.union(nonfinite_tensors(model, optimizer)), step, root)
    whole = parallel.full_state(model)  # collective: rank 0 gets the weights, on the CPU
    told = False

    def write(tmp: Path) -> None:
        nonlocal told
        with torch.device("meta"):
            skeleton = Llama(model.cfg)
        skeleton.load_state_dict(whole, assign=True)
        save_pretrained(skeleton, tmp, tokenizer=tokenizer)  # first: it replaces the directory
        share(str(tmp))
        told = True
        save_sharded(model, optimizer, tmp / SHARDED_DIR)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")

    error = None
    if parallel.is_main:
        try:
            _publish(root, target, write)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 -- every rank must hear of it
            error = str(_not_written(step, root, err))
            if not told:
                share(None)
    else:
        tmp = share(None)
        if tmp is not None:
            with suppress(Exception, CheckpointException):  # DCP raises on every rank alike; rank 0 reports it
                save_sharded(model, optimizer, Path(tmp) / SHARDED_DIR)
    error = share(error)
    if error is not None:
        raise GrowfamError(error)
    if parallel.is_main:
        _prune(root, target, keep_last, keep)
    return target


def _refuse_nonfinite(bad: list[str], step: int, root: Path) -> None:
    if bad:
        raise TrainingDiverged(f"NaN/inf in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} at step {step}: "
                               f"checkpoint not written; the earlier checkpoints in {root} are intact")


def _publish(root: Path, target: Path, write) -> None:
    """Write the checkpoint directory through a temporary one, then point `latest` at it."""
    atomic_directory(target, write)
    atomic_write_text(root / LATEST_FILE, target.name + "\n")


def _not_written(step: int, root: Path, err: BaseException) -> GrowfamError:
    """One line: which checkpoint was not written and why (a write's OSError, however the writer
    wrapped it: DCP gathers every rank's), and that the earlier ones are intact."""
    problem = err if isinstance(err, GrowfamError) else os_error_of(err)
    if isinstance(problem, OSError) and problem.strerror:
        detail = problem.strerror
    else:
        detail = " ".join(str(problem or _describe(err)).split())[:300]
    return GrowfamError(f"checkpoint for step {step} was not written ({detail}); "
                        f"the earlier checkpoints in {root} are intact")


def _prune(root: Path, target: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    """Delete the complete checkpoints older than the newest `keep_last` (never `target`, nor
    the steps in `keep`)."""
    for old in _checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old != target and _step(old) not in keep:
            shutil.rmtree(old, ignore_errors=True)


def broken_checkpoint(path: str | Path, problem: str) -> GrowfamError:
    """The error for a damaged checkpoint: which one, what is wrong, and what to do."""
    path = Path(path)
    earlier = [p for p in _checkpoints(path.parent) if _step(p) < _step(path)]
    todo = (f"move it away to resume from {earlier[-1].name}" if earlier
            else "there is no earlier complete checkpoint: move it away to start the run over")
    problem = " ".join(problem.split())  # one line
    if len(problem) > 300:
        problem = problem[:300] + " …"
    return GrowfamError(f"checkpoint {path} is broken ({problem}); {todo}")


def _step(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if not isinstance(err, GrowfamError) else str(err)


#: trainer_state.json keys and the JSON types their values must have.
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "train_loss": (int, float, type(None)), "val_loss": (int, float, type(None)),
    "finished": (bool,), "stopped_early": (bool,), "data": (dict,), "rng": (dict,), "guard": (dict,),
    "masks": (dict, type(None)), "ledger": (dict,), "config": (dict,),
}
_LEDGER_KEYS = ("tokens_processed", "flops", "flops_attn", "wall_s")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, checked for the keys and types training needs;
    a `broken_checkpoint` error otherwise."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise broken_checkpoint(path, f"{STATE_FILE} is unreadable: {_describe(err)}") from None
    if not isinstance(state, dict):
        raise broken_checkpoint(path, f"{STATE_FILE} holds a {type(state).__name__}, not an object")
    for key, types in _STATE_TYPES.items():
        if key not in state:
            raise broken_checkpoint(path, f"{STATE_FILE} lacks {key!r}")
        if not isinstance(state[key], types) or (isinstance(state[key], bool) and bool not in types):
            raise broken_checkpoint(path, f"{STATE_FILE}: {key} is {state[key]!r}")
    if state["step"] < 0:
        raise broken_checkpoint(path, f"{STATE_FILE}: step is {state['step']}")
    ledger = state["ledger"]
    if not all(isinstance(ledger.get(k), (int, float)) for k in _LEDGER_KEYS):
        raise broken_checkpoint(path, f"{STATE_FILE}: ledger is {ledger!r}")
    return state


def holds_optimizer_state(path: str | Path) -> bool:
    """Whether the directory `path` is a checkpoint with AdamW state: whole (optimizer.pt) or
    sharded (dcp/, written under FSDP2 or torchrun)."""
    path = Path(path)
    return (path / OPTIMIZER_FILE).is_file() or (path / SHARDED_DIR).is_dir()


def load_checkpoint(path: str | Path, model: Llama, optimizer: torch.optim.Optimizer | None = None,
                    device: torch.device | None = None, parallel: Parallelism | None = None) -> dict[str, Any]:
    """Copy checkpoint weights (and optimizer state) into `model` / `optimizer`; trainer state.

    The model must have the checkpoint's shape; the tensors are copied in place, so references
    held elsewhere (an optimizer, a compiled wrapper) stay valid. A damaged checkpoint (any
    failure reading it, or NaN/inf in it) raises a `broken_checkpoint` GrowfamError.
    parallel: the run's strategy when every rank of a run calls this together; None: this
    process alone (a sharded checkpoint's every shard is read here).
    """
    path = Path(path)
    state = read_trainer_state(path)
    if (path / SHARDED_DIR).is_dir():
        try:
            load_sharded(model, optimizer, path / SHARDED_DIR, alone=parallel is None)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 -- DCP and torch raise many types
            raise broken_checkpoint(path, f"sharded state: {_describe(err)}") from None
    elif parallel is not None and parallel.sharded:
        _load_whole_into_shards(path, model, optimizer, parallel)
    else:
        _load_whole(path, model, optimizer, device)
        return state
    bad = nonfinite_tensors(model, optimizer)
    bad = parallel.union(bad) if parallel is not None else bad
    if bad:
        raise broken_checkpoint(path, f"NaN/inf in {', '.join(bad[:3])}")
    return state


def _load_whole(path: Path, model: Llama, optimizer: torch.optim.Optimizer | None, device: torch.device | None) -> None:
    """Load a checkpoint of whole tensors (Hugging Face weights, optimizer.pt) into a whole model."""
    try:
        saved = load_pretrained(path)
        with torch.no_grad():
            model.load_state_dict(saved.state_dict())
    except Exception as err:  # noqa: BLE001 -- safetensors and torch raise many types for a damaged file
        raise broken_checkpoint(path, f"model weights: {_describe(err)}") from None
    bad = nonfinite_tensors(model)
    if bad:
        raise broken_checkpoint(path, f"NaN/inf in {', '.join(bad[:3])}")
    if optimizer is not None:
        load_optimizer_state(path, optimizer, device)


def _load_whole_into_shards(path: Path, model: Llama, optimizer: torch.optim.Optimizer | None,
                            parallel: Parallelism) -> None:
    """A checkpoint of whole tensors into a sharded model (a one-process run resumed under
    FSDP): rank 0 reads it and sends every rank its shards."""
    weights = moments = problem = None
    if parallel.is_main:
        try:
            weights = load_pretrained(path).state_dict()
            if optimizer is not None:
                saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
                moments = named_optimizer_state(saved, model, optimizer)
        except Exception as err:  # noqa: BLE001 -- as in _load_whole
            problem = _describe(err)
    problem = share(problem)
    if problem is not None:
        raise broken_checkpoint(path, problem)
    parallel.load_from_main(model, optimizer, weights, moments)


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer,
                         device: torch.device | None = None) -> None:
    """Load a checkpoint's AdamW state (read with weights_only=True: no code runs); a
    `broken_checkpoint` GrowfamError if it is damaged, does not fit, or holds NaN/inf."""
    path = Path(path)
    try:
        state = torch.load(path / OPTIMIZER_FILE, map_location=device or "cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 -- unpickling, zip and shape errors come in many types
        raise broken_checkpoint(path, f"optimizer state: {_describe(err)}") from None
    bad = nonfinite_tensors(None, optimizer)
    if bad:
        raise broken_checkpoint(path, f"NaN/inf in the optimizer state ({len(bad)} tensors)")


def named_optimizer_state(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict as `optimizer.state_dict()` gives it (parameters numbered in the
    order of the groups) keyed by parameter names instead, the form set_optimizer_state_dict
    takes. model, optimizer: any pair with these groups and parameter names, sharded or not."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder) -> None:
    """Write the model's and optimizer's state (each rank its shards) as a DCP checkpoint;
    collective: every rank calls it with the same folder."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=_dcp_writer(folder))


def _dcp_writer(folder):
    """DCP's file writer, whose failed writes raise the OSError behind them: torch.save raises a
    RuntimeError ("unexpected pos") with a full disk's OSError as its context, and DCP sends
    exceptions between ranks pickled, which drops the context; an OSError keeps its errno."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class Files(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path, mode):
            try:
                with super(Files, self).create_stream(path, mode) as stream:
                    yield stream
            except Exception as err:
                problem = os_error_of(err)
                if problem is None or problem is err:
                    raise
                raise problem from err

    writer = FileSystemWriter(str(folder))
    writer.fs = Files()
    return writer


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, folder, alone: bool = False) -> None:
    """Read a DCP checkpoint into the model (and optimizer), resharded to however they are laid
    out now (any world size, sharded or whole). Collective, unless `alone` or outside a process
    group: one process reading every shard (rank 0 consolidating a checkpoint between family
    stages, a one-process resume)."""
    import torch.distributed.checkpoint as dcp

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():  # DCP warns that reading alone is what it assumes
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=alone or not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
