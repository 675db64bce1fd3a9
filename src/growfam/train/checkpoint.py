"""Training checkpoints: complete, atomic, readable by a single process.

Layout under a run's `out_dir`:

    checkpoints/
      step_0000100/          a Hugging Face directory (config.json, model.safetensors,
        ...                  tokenizer files) that transformers loads as is, plus
        optimizer.pt         torch.save(optimizer.state_dict()); read with weights_only=True
        trainer_state.json   step, tokens, data cursor, RNG, ledger, spike guard, config
      step_0000200/
      latest                 one line: the name of the newest complete checkpoint

A checkpoint is written into a temporary sibling directory and renamed into place; only then
is `latest` replaced (os.replace), and only then are checkpoints beyond `keep_last` deleted.
A crash or a full disk at any point leaves every checkpoint that `latest` can name complete.

A checkpoint never holds NaN/inf: `save_checkpoint` checks the weights and the optimizer's
moments first and refuses to write, and loading refuses them too. Loading a damaged
checkpoint (truncated or garbage files, a malformed trainer_state.json) raises one
GrowfamError naming it and the previous complete checkpoint to fall back to.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from growfam.errors import GrowfamError, TrainingDiverged
from growfam.io import atomic_directory, atomic_write_text
from growfam.model import Llama, load_pretrained, save_pretrained

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
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


def encode_rng() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states as base64 strings, so JSON can hold them."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def decode_rng(state: dict[str, Any]) -> None:
    """Restore what encode_rng saved (the CUDA part only when CUDA is here)."""
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


def nonfinite_tensors(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters (and "optimizer KEY of NAME" entries) holding NaN/inf."""
    tensors = list(model.named_parameters()) if model is not None else []
    names = {id(p): n for n, p in tensors}
    if optimizer is not None:
        tensors += [(f"optimizer {key} of {names.get(id(p), '?')}", v) for p, state in optimizer.state.items()
                    for key, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()  # one device sync
    return [n for (n, _), ok in zip(tensors, finite) if not ok]


def save_checkpoint(out_dir: str | Path, step: int, model: Llama, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, tokenizer=None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to `keep_last`; its path.

    trainer_state must be JSON-serialisable. Any OSError (unwritable directory, full disk)
    becomes a GrowfamError, and the checkpoints written before stay as they were. NaN/inf in
    the weights or the optimizer state raise TrainingDiverged and nothing is written.
    """
    root = checkpoint_root(out_dir)
    target = root / _step_dir_name(step)
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        raise TrainingDiverged(f"NaN/inf in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} at step {step}: "
                               f"checkpoint not written; the earlier checkpoints in {root} are intact")

    def write(tmp: Path) -> None:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")

    try:
        atomic_directory(target, write)
        atomic_write_text(root / LATEST_FILE, target.name + "\n")
    except (GrowfamError, OSError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise GrowfamError(f"checkpoint for step {step} was not written ({detail}); "
                           f"the earlier checkpoints in {root} are intact") from None
    for old in _checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


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


def load_checkpoint(path: str | Path, model: Llama, optimizer: torch.optim.Optimizer | None = None,
                    device: torch.device | None = None) -> dict[str, Any]:
    """Copy checkpoint weights (and optimizer state) into `model` / `optimizer`; trainer state.

    The model must have the checkpoint's shape; the tensors are copied in place, so references
    held elsewhere (an optimizer, a compiled wrapper) stay valid. A damaged checkpoint (any
    failure reading it, or NaN/inf in it) raises a `broken_checkpoint` GrowfamError.
    """
    path = Path(path)
    state = read_trainer_state(path)
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
    return state


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
