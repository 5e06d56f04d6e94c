"""The environment record every benchmark writes beside its numbers.

One function, imported by the benchmark scripts as a sibling module (they run as
``python benchmarks/<name>.py``, which puts their own folder on the import path).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import geoopt_sgd

__all__ = ["environment", "load_average"]

_REPO = Path(__file__).resolve().parents[1]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=_REPO,
            check=False,
        ).stdout.strip()
    except OSError:
        return None
    return out or None


def environment(device: str = "cpu") -> dict[str, Any]:
    """What a timing depends on: versions, machine, threads, device, git SHA, load.

    Args:
        device: The device the benchmark runs on.

    Returns:
        A JSON-ready dict. A script adds ``load_average_end`` when it finishes.
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
        "git_sha": _git_sha(),
        "load_average": load_average(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
