"""Fixtures for the benchmark scripts' tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch):
    """``benchmarks/`` first on ``sys.path``, its modules fresh, restored afterwards.

    recipes/ (on pytest's ``pythonpath``) has its own ``_common`` package, which
    the recipe tests import: while a test here runs, ``_common`` is the benchmarks'
    module, and afterwards the previous entries of ``sys.modules`` come back.
    """
    monkeypatch.syspath_prepend(str(BENCH))
    # every module name once: a second pop would save None over the first
    saved = {p.stem: sys.modules.pop(p.stem, None) for p in BENCH.glob("*.py")}
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


@pytest.fixture
def bench(bench_modules):
    """Import ``benchmarks/<name>.py`` as its command line does (its folder first)."""
    return importlib.import_module
