"""Devices as users name them: "auto", "cpu", "cuda", "cuda:N" or "mps". `check_device` refuses a
device this machine lacks before any work; `resolve_device` turns a spec into a torch.device.
Every stage that runs a model uses them. Imports only growfam.errors.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from growfam.errors import ConfigError


def check_device(spec: Any) -> None:
    """ConfigError unless `spec` is "auto" or a device this machine has (cpu, cuda[:N], mps)."""
    if spec == "auto":
        return
    try:
        device = torch.device(spec) if isinstance(spec, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r}: MPS is not available on this machine; use cpu or auto")


def resolve_device(spec: str, world: int = 1) -> torch.device:
    """The device a config's spec names; "auto" is cuda (cuda:LOCAL_RANK under torchrun) when
    there is one, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0)
    return torch.device("cpu")
