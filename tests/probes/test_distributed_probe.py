"""NoiseProbe and ProbedSGD under DDP: 2 gloo ranks on CPU.

The probe never changes the trajectory (the DDP replicas equal a run without
a probe, bit for bit), every rank records the same values, a sink or callback
failing on rank 0 alone neither stops training nor desynchronises the ranks,
and a rank whose probe shard is empty joins the probe's reductions with zeros,
as :func:`~geoopt_sgd.noise_geometry` does (raising there alone left the other
rank waiting). Every rank's record equals ``noise_geometry`` on the union of
the shards (the distributed route, ``sketch``): float64 sums re-added across
ranks, checked at 1e-9 relative.
"""

import math
import os
import warnings

import cases
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.distributed]
METRICS = ["loss", "alpha", "mu", "tr_sigma"]
KW = {"k": 2, "metrics": METRICS, "seed": 1}


class _FailsOnRank0:
    """A writer whose every write fails on rank 0 (a full disk there only)."""

    def add_scalar(self, *args):
        if torch.distributed.get_rank() == 0:
            raise OSError("disk full")


def _fails_on_rank0(record):
    if torch.distributed.get_rank() == 0:
        raise RuntimeError("callback failed")


def _train(probe_data, **probe_kw):
    """Three DDP steps of ProbedSGD (momentum) with a probe after each one."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from geoopt_sgd import NoiseProbe, ProbedSGD

    ddp = DDP(cases.mlp())
    X, y = cases.make_data(12, seed=3)
    probe = None
    if probe_data is not None:
        probe = NoiseProbe(
            ddp,
            nn.CrossEntropyLoss(),
            probe_data,
            every=1,
            warm_start=False,
            **KW,
            **probe_kw,
        )
    opt = ProbedSGD(ddp.parameters(), lr=0.1, momentum=0.9, probe=probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the failing sinks
        for _ in range(3):
            opt.zero_grad()
            nn.CrossEntropyLoss()(ddp(X), y).backward()
            opt.step()
    theta = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    return (
        theta,
        (probe.history if probe else None),
        (probe.sink_errors if probe else None),
    )


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        X, y = cases.make_data(12)
        uneven = (X[:7], y[:7]) if rank == 0 else (X[7:], y[7:])
        res = {
            "none": _train(None),
            "uneven": _train(uneven),
            "failing": _train(
                uneven, sinks=[_FailsOnRank0()], callback=_fails_on_rank0
            ),
            "empty": _train((X, y) if rank == 0 else (X[:0], y[:0])),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_probe_under_ddp(tmp_path):
    from geoopt_sgd import noise_geometry

    cases.spawn_gloo(_worker, (str(tmp_path),), timeout=90)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for key in ("none", "uneven", "failing", "empty"):
        # the same trajectory on both replicas, and the probe does not change it
        assert torch.equal(r0[key][0], r1[key][0]), key
        assert torch.equal(r0[key][0], r0["none"][0]), key
    # the parameters each probe measured: the trajectory before each step's probe
    model, X, y = cases.mlp(), *cases.make_data(12, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe_X, probe_y = cases.make_data(12)
    for step in range(3):
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(X), y).backward()
        opt.step()
        ref = noise_geometry(
            model,
            nn.CrossEntropyLoss(),
            (probe_X, probe_y),
            route="sketch",
            **{**KW, "seed": KW["seed"] + step},
        ).values
        for key in ("uneven", "failing", "empty"):
            for r in (r0, r1):
                rec = r[key][1][step]
                assert rec["step"] == step + 1
                for m in METRICS:
                    assert math.isclose(rec[m], ref[m], rel_tol=1e-9), (key, m)
    assert len(r0["failing"][2]) == 6 and r1["failing"][2] == []
