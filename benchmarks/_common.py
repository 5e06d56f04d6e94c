"""Shared pieces of the benchmark scripts: the environment record and a timer.

Imported as ``_common`` by the scripts in this folder (run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

import geoopt_sgd


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def git_sha() -> str:
    """Short commit of the checkout holding this folder, ``""`` if unknown."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        ).stdout.strip()
    except OSError:
        return ""


def environment(device: str = "cpu") -> dict[str, Any]:
    """The one environment record every benchmark writes beside its numbers.

    Keys: package versions (``timm`` is ``None`` when it is not installed), the
    machine, the thread count, the device (and the GPU's name on CUDA), the load
    average at the start and the git commit. Scripts add ``load_average_end``
    (:func:`load_average`) when they finish.
    """
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    env: dict[str, Any] = {
        "geoopt_sgd": geoopt_sgd.__version__,
        "torch": torch.__version__,
        "timm": timm_version,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "load_average": load_average(),
        "git_sha": git_sha(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
