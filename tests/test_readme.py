"""The README's Python snippets run exactly as printed.

Every fenced block whose info string is ``python`` in ``README.md`` is executed, in
order, in one namespace (later blocks continue earlier ones, as a reader would),
in a temporary working directory. The names a snippet takes from the reader's own
code (``model``, ``loader``, ``loss_fn``, ``batch``, ``x_probe``/``y_probe``,
``optimizer``, ``X``/``y``) are supplied by a small fixture: a tiny classifier on
random data. A snippet that crashes fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture
def reader_namespace() -> dict:
    """What the README assumes the reader already has: a model, data, a loop."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    X = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    # full-size batches: the README's loop (``for x, y in loader``) rebinds ``y``,
    # which a later snippet uses as the whole target set beside ``X``
    loader = [(X, y), (X, y)]
    return {
        "model": model,
        "loss_fn": nn.CrossEntropyLoss(),
        "loader": loader,
        "batch": loader[0],
        "x_probe": X[:32],
        "y_probe": y[:32],
        "X": X,
        "y": y,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
    }


def test_readme_has_the_snippets_this_test_runs():
    code = "\n".join(readme_blocks())
    for name in (
        "sharpness(",
        "NoiseProbe(",
        "ProbedSGD(",
        "NoisyGD(",
        "CyclicLRWrapper(",
    ):
        assert name in code, name


def test_readme_snippets_run_as_printed(reader_namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = dict(reader_namespace)
    for i, block in enumerate(readme_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as exc:  # pragma: no cover - the failure is the report
            pytest.fail(f"README.md python block {i + 1} raised {exc!r}:\n{block}")
    # the probe's sink folder is created when the probe is built
    assert (tmp_path / "runs").is_dir()
