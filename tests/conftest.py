import os

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
