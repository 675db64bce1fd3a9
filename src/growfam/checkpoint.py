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
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from growfam.errors import GrowfamError
from growfam.hf import load_pretrained, save_pretrained
from growfam.io import atomic_directory, atomic_write_text
from growfam.model import Llama

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
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name.startswith("step_") and _complete(named):
            return named
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


def save_checkpoint(out_dir: str | Path, step: int, model: Llama, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], *, tokenizer=None, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune to `keep_last`; its path.

    trainer_state must be JSON-serialisable. Any OSError (unwritable directory, full disk)
    becomes a GrowfamError, and the checkpoints written before stay as they were.
    """
    root = checkpoint_root(out_dir)
    target = root / _step_dir_name(step)

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


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())


def load_checkpoint(path: str | Path, model: Llama, optimizer: torch.optim.Optimizer | None = None,
                    device: torch.device | None = None) -> dict[str, Any]:
    """Copy checkpoint weights (and optimizer state) into `model` / `optimizer`; trainer state.

    The model must have the checkpoint's shape; the tensors are copied in place, so references
    held elsewhere (an optimizer, a compiled wrapper) stay valid.
    """
    path = Path(path)
    saved = load_pretrained(path)
    with torch.no_grad():
        model.load_state_dict(saved.state_dict())
    if optimizer is not None:
        load_optimizer_state(path, optimizer, device)
    return read_trainer_state(path)


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer,
                         device: torch.device | None = None) -> None:
    """Load a checkpoint's AdamW state (a file we wrote; read with weights_only=True)."""
    state = torch.load(Path(path) / OPTIMIZER_FILE, map_location=device or "cpu", weights_only=True)
    optimizer.load_state_dict(state)
