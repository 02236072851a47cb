"""What ran a measurement, for benchmark reports: the device's name, its peak FLOP/s for MFU,
and the commit of the code.

Example:
    >>> import torch
    >>> peak_flops(torch.device("cpu")) is None   # no published peak: MFU is reported n/a
    True
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# Dense bf16 peaks (no sparsity), for model FLOPs utilisation; matched in order on the name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("4090", 165e12),
)


def hardware(device: torch.device) -> str:
    """What ran a measurement, for benchmark reports: the GPU's name, or the CPU's model name
    (``lscpu``), its cores and the torch threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine() or "cpu"
    return f"{name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device``, or None where unknown (CPU: MFU is reported n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def git_commit() -> str | None:
    """The short commit of the checkout this code runs from (not the working directory's), or
    None outside a git checkout, e.g. installed from a wheel."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None
