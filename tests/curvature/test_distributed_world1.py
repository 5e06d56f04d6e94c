"""A process group of one rank, and a DDP-wrapped model passed directly.

With ``world_size=1`` every measurement equals the one without
``torch.distributed`` bit for bit (nothing is reduced). A DDP-wrapped model is
unwrapped, and the names of its parameters as the wrapper lists them
(``ddp.named_parameters()``: ``"module.0.weight"``) select the same parameters
as the inner module's names (``"0.weight"``); they were refused as "not a
parameter name of the model".
"""

import os

import cases
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.distributed


def _measure(model, names):
    import geoopt_sgd as g

    X, y = cases.make_data(12)
    CE = nn.CrossEntropyLoss()
    v = torch.linspace(-1, 1, 30, dtype=torch.float64)
    H = g.HessianOperator(model, CE, (X, y), params=names)
    s = g.sharpness(model, CE, (X, y), params=names, k=2, trace_probes=3, seed=0)
    ng = g.noise_geometry(
        model, CE, (X, y), params=names, k=2, seed=1, metrics=["alpha", "mu"]
    )
    es = g.expected_sharpness(model, CE, (X, y), params=names, num_samples=2)
    return {
        "Hv": H.matvec(v),
        "sharpness": torch.tensor([s.lambda_max, s.lambda_min, s.trace]),
        "noise": torch.tensor([ng.values["alpha"], ng.values["mu"]]),
        "expected": torch.tensor([es.value]),
    }


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(cases.mlp())
        res = {
            "plain": _measure(cases.mlp(), ["0.weight"]),
            "ddp": _measure(ddp, ["0.weight"]),
            "ddp_names": _measure(ddp, ["module.0.weight"]),
            "ddp_tensors": _measure(ddp, [ddp.module[0].weight]),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_one_rank_group_and_ddp_names(tmp_path):
    cases.spawn_gloo(_worker, (str(tmp_path),), nprocs=1, timeout=60)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    ref = _measure(cases.mlp(), ["0.weight"])  # no process group here
    for case, res in got.items():
        for key, value in res.items():
            assert torch.equal(value, ref[key]), (case, key)
