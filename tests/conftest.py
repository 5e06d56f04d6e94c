import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture
def measure(monkeypatch):
    """Replace the recorder's ``noise_geometry``: ``measure(fake)`` for this test."""
    from geoopt_sgd.probes import recorder

    def use(fake):
        monkeypatch.setattr(recorder, "noise_geometry", fake)
        return fake

    return use


# the benchmark scripts' tests (tests/benchmarks/)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


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
