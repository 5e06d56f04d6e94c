"""The benchmark scripts compute on ``--device``, never on the default device.

No GPU runs the suite, so, as ``tests/test_default_device.py`` does for the
library and ``tests/recipes/test_recipes_default_device.py`` for the recipes,
every benchmark entry point runs at tiny settings with ``--device cpu`` (the
scripts without ``--device`` compute on the CPU) under a *meta* default device.
The scripts build their models and data themselves, inside the context: an
allocation that names no device (``torch.randn(n, generator=g)``, a model built
without ``device=``) lands on meta and fails (a CPU generator drawing a meta
tensor, a meta model moved to the CPU, ...). On CUDA the same allocation is a
CPU tensor that meets CUDA ones. The scripts draw on the CPU and move the
results to ``--device``, so on the CPU they compute what they always did.

Peer tools are left out (``--tools``), except where the scripts catch their
failures themselves (BackPACK in ``probes.py``). On a machine with CUDA the
``--device`` scripts also run on ``cuda`` under the meta default device
(``-m gpu``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

META = torch.device("meta")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# script: tiny arguments (seconds each on one core); "DEVICE" is --device's value
TINY = {
    "block_products": [
        *("--models", "mlp", "test_resnet", "--operators", "hessian", "ggn"),
        *("--blocks", "1", "2", "--resnet18-blocks", "1", "--reps", "1"),
        *("--threads", "1", "--device", "DEVICE"),
    ],
    "curvature": [
        *("--quick", "--models", "mlp", "digits", "clustered", "--ks", "2"),
        *("--seeds", "1", "--hvp-reps", "1", "--device", "DEVICE"),
        *("--tools", "geoopt_sgd", "geoopt_sgd_unchecked"),
    ],
    "probes": [
        *("--quick", "--models", "test_resnet", "--per-sample-n", "4"),
        *("--sections", "per_sample,metric_costs,overhead,overhead_lean,step_time"),
        *("--probe-batch", "8", "--steps", "2", "--run-every", "2", "--k", "2"),
        *("--lean-num-probes", "2", "--device", "DEVICE"),
    ],
    "optimizers": ["--quick", "--repeats", "1", "--block", "1", "--device", "DEVICE"],
    # no --device: CPU only
    "warm_start": ["--quick"],
    "cluster_skips": ["--quick", "--starts", "1", "--tools", "checked,unchecked"],
    "multiplicities": ["--quick", "--starts", "1"],
}
ON_DEVICE = sorted(s for s, argv in TINY.items() if "DEVICE" in argv)


@pytest.fixture
def threads():
    """block_products and warm_start set torch's thread count: restored after."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(bench, monkeypatch, script, device, out):
    argv = [device if a == "DEVICE" else a for a in TINY[script]]
    argv += ["--out", str(out)]
    module = bench(script)
    torch.manual_seed(0)
    with torch.device(META):
        if script in ("cluster_skips", "multiplicities"):  # main() reads sys.argv
            monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
            module.main()
        else:
            module.main(argv)
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_under_meta_default(
    bench, monkeypatch, threads, tmp_path, capsys, script
):
    result = _run(bench, monkeypatch, script, "cpu", tmp_path / "r.json")
    assert result  # it completed and wrote its results
    printed = capsys.readouterr().out
    assert "crashed" not in printed and "device='meta'" not in printed


def test_curvature_skips_the_peers_off_the_cpu(bench):
    """On CUDA only our tools run; each peer's row says why it has no numbers."""
    curvature = bench("curvature")
    for tool in curvature.TOOLS:
        assert curvature.off_device(tool, "cpu") is None
        why = curvature.off_device(tool, "cuda")
        if tool in ("geoopt_sgd", "geoopt_sgd_unchecked"):
            assert why is None
        else:
            assert "skipped on --device cuda" in why


@pytest.mark.gpu
@pytest.mark.parametrize("script", ON_DEVICE)
def test_benchmark_on_cuda_under_meta_default(
    bench, monkeypatch, threads, tmp_path, capsys, script
):
    result = _run(bench, monkeypatch, script, "cuda", tmp_path / "r.json")
    env = result.get("env") or result["environment"]
    assert env["device"] == "cuda" and "gpu" in env
    printed = capsys.readouterr().out
    assert "crashed" not in printed and "device='meta'" not in printed


def test_timings_synchronise(bench, monkeypatch):
    """Each timed stretch of curvature.py and probes.py starts and ends with a
    ``synchronize`` of the run's device (a no-op on the CPU; counted here)."""
    from torch import nn

    calls = []
    modules = {name: bench(name) for name in ("curvature", "probes")}
    for module in modules.values():
        monkeypatch.setattr(module, "synchronize", lambda d: calls.append(str(d)))
    curvature, probes = modules["curvature"], modules["probes"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))

    curvature.run_ours(model, data, 2, 1e-3, 0)
    assert calls == ["cpu"] * 2
    calls.clear()
    curvature.hvp_cost(model, data, reps=2)
    assert calls == ["cpu"] * (2 + 2 * 3)  # the first HVP; gradient, HVP per rep
    calls.clear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes._train(model, nn.CrossEntropyLoss(), [data], opt, 3)
    assert calls == ["cpu"] * 2 * 3
