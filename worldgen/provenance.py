"""What benchmark reports share: the device's name, its peak FLOP/s for MFU, the commit of the
code, and the time a call takes.

Example:
    >>> import torch
    >>> peak_flops(torch.device("cpu")) is None   # no published peak: MFU is reported n/a
    True
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
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


def time_per_call(
    fn: Callable[[], object], device: torch.device, seconds: float, warmup: int = 1
) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of ``fn``: ``warmup`` calls, then calls until
    ``seconds`` have passed (at least 3). CPU seconds stay meaningful when other work shares the
    cores; on CUDA the queue is drained before each clock is read."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu) / calls
