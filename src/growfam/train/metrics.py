"""Run logging for the trainer: one JSONL file, TensorBoard when installed, wandb on request.

Every record is one JSON object per line in `out_dir/metrics.jsonl`:
`{"event": "train" | "eval" | "spike" | "rollback" | "checkpoint" | "resume" | ..., "step": int,
"time": unix seconds, ...values}`. Numeric values also go to TensorBoard as `<event>/<key>`.
Only rank 0 writes anything; the other ranks get a logger whose methods do nothing.
A failed write (a full disk) is one GrowfamError naming the file; a resumed run drops the
half-written last line such a failure (or a kill) can leave, so every line stays JSON.

Also here: the bf16 dense peak FLOP/s of known GPUs, for MFU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from growfam.errors import GrowfamError

#: Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendors' data sheets.
#: Matched against torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),  # also GH200
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak FLOP/s of `device`, or None when it is not a GPU in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def _scalar(value: Any) -> float | None:
    """value as a finite-or-not float if it is a plain number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class MetricsLogger:
    """Appends events to metrics.jsonl and mirrors scalars to TensorBoard / wandb.

    enabled=False (ranks other than 0) makes every method a no-op. `resume=True` appends to an
    existing metrics.jsonl; otherwise the file starts empty.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, resume: bool = False,
                 tensorboard: bool = True, wandb_project: str | None = None,
                 run_config: dict | None = None) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        self.path = out_dir / "metrics.jsonl"
        self._tb_dir = out_dir / "tensorboard"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                _drop_partial_line(self.path)
            self._file = open(self.path, "a" if resume else "w", encoding="utf-8")
        except OSError as err:
            raise GrowfamError(f"cannot write metrics to {out_dir}: {err.strerror or err}") from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("growfam: tensorboard is not installed; skipping TensorBoard logs "
                      "(pip install tensorboard to get them)")
            else:
                with self._writing(self._tb_dir):
                    self._tb = SummaryWriter(str(self._tb_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise GrowfamError("wandb_project is set but wandb is not installed (pip install wandb)") from None
            self._wandb = wandb.init(project=wandb_project, config=run_config, dir=str(out_dir),
                                     resume="allow")

    def log(self, event: str, step: int, **values: Any) -> None:
        """Write one record; non-finite floats become null in JSON (and stay NaN elsewhere)."""
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3)}
        for key, value in values.items():
            number = _scalar(value)
            record[key] = None if number is not None and not math.isfinite(number) else value
        with self._writing(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a killed run keeps every line it logged
        scalars = {f"{event}/{k}": _scalar(v) for k, v in values.items() if _scalar(v) is not None}
        if self._tb is not None:
            with self._writing(self._tb_dir):
                for key, number in scalars.items():
                    self._tb.add_scalar(key, number, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    @staticmethod
    @contextlib.contextmanager
    def _writing(path: Path):
        """Turn an OSError (a full disk) into one GrowfamError naming `path`."""
        try:
            yield
        except OSError as err:
            raise GrowfamError(f"cannot write {path}: {err.strerror or err}") from None

    def close(self) -> None:
        """Close every sink (again: nothing happens)."""
        file, tb, run, self._file, self._tb, self._wandb = self._file, self._tb, self._wandb, None, None, None
        if file is not None:
            with self._writing(self.path):
                file.close()
        if tb is not None:
            with self._writing(self._tb_dir):
                tb.close()
        if run is not None:
            run.finish()


def _drop_partial_line(path: Path) -> None:
    """Cut `path` after its last newline: what follows is a line a failed write left half done."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        tail = 0
        while tail < size:  # scan back in blocks for the last newline
            block = min(4096, size - tail)
            f.seek(size - tail - block)
            chunk = f.read(block)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(size - tail - block + newline + 1)
                return
            tail += block
        f.truncate(0)


def read_metrics(path: str | Path, event: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (only those of `event` when given), in file order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r["event"] == event]
