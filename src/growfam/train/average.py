"""Checkpoint averaging: a run's result as the mean of its last checkpoints.

With `average: {last: K, every: S}` a run writes (and never prunes) the checkpoints of steps
T − (K−1)·S, …, T − S, T, and once it is finished writes OUT/average: the element-wise mean
of their weights, summed in float64 and cast back to the checkpoints' dtype, with the run's
tokenizer. It reads each checkpoint's Hugging Face files, which a sharded (FSDP2) checkpoint
holds gathered too, so sharded runs average the same way. A finished run given again writes
it again if it is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from growfam.errors import GrowfamError
from growfam.model import load_pretrained, save_pretrained
from growfam.train.checkpoint import checkpoint_at

AVERAGE_DIR = "average"


def average_checkpoints(paths: list[Path], out: Path, tokenizer=None) -> Path:
    """Write the float64 mean of the models at `paths` (Hugging Face directories of one shape)
    to `out`, atomically, in the first one's dtype; `out`."""
    result = load_pretrained(paths[0])  # in its own dtype: the average is written in it
    total = {name: tensor.to(torch.float64, copy=True) for name, tensor in result.state_dict().items()}
    for path in paths[1:]:
        for name, tensor in load_pretrained(path, dtype=torch.float64).state_dict().items():
            total[name].add_(tensor)
    dtype = next(result.parameters()).dtype
    with torch.no_grad():
        result.load_state_dict({name: (t / len(paths)).to(dtype) for name, t in total.items()})
    return save_pretrained(result, out, tokenizer=tokenizer)


def averaged(out_dir: str | Path, steps: list[int], tokenizer=None) -> Path:
    """OUT/average for the checkpoints of `steps` of the run `out_dir` (written if missing);
    a GrowfamError naming a checkpoint that is gone."""
    target = Path(out_dir) / AVERAGE_DIR
    if target.is_dir():
        return target
    paths = [checkpoint_at(out_dir, step) for step in steps]
    missing = [step for step, path in zip(steps, paths) if path is None]
    if missing:
        raise GrowfamError(f"{out_dir}: the checkpoints of steps {missing} to average are gone; "
                           "they are kept by the run that writes them (do not delete them by hand)")
    return average_checkpoints(paths, target, tokenizer)
