import math
import os

import cases
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from geoopt_sgd import HessianOperator, noise_geometry

# spawning two interpreters and warming up torch.func dominates (> 10 s on a
# loaded 2-core machine), hence also `slow`
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
CONFIGS = {
    "per_sample": {"cov": "per_sample"},
    "minibatch": {"cov": "minibatch", "batch_size": 2},
    # natural and Rademacher probes, their per-probe terms for the jackknife
    "hessian": {"curvature": "hessian"},
}

METRICS = [
    "loss",
    "alpha",
    "beta",
    "mu",
    "mu1",
    "mu2",
    "gradient_uniformity",
    "tr_sigma",
    "tr_h_sigma",
    "tr_h_sigma_iso",
    "projection_coefficient",
    "directional_alignment_random",
    "noise_energies",
    "power_law_exponent",
    "spearman",
    "eigen_alignment",
    "commutativity_error",
    "commutativity_baseline",
]
KW = {"metrics": METRICS, "k": 3, "seed": 5, "num_probes": 16}


def _problem():
    model = cases.mlp()
    X, y = cases.make_data(n=12)
    return model, nn.CrossEntropyLoss(), X, y


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        model, loss_fn, X, y = _problem()
        half = X.shape[0] // world
        shard = (X[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
        for name, extra in CONFIGS.items():
            res = noise_geometry(model, loss_fn, shard, **KW, **extra)
            torch.save(
                {
                    "values": res.values,
                    "standard_errors": res.standard_errors,
                    "eigenvalues": res.eigenvalues,
                    "noise_energies": res.noise_energies,
                    "route": res.route,
                    "num_samples": res.num_samples,
                },
                os.path.join(out_dir, f"{name}-rank{rank}.pt"),
            )
        # an empty shard: rank 1 holds no sample and joins every reduction with
        # zeros (raising there alone would leave rank 0 hanging)
        lopsided = (X, y) if rank == 0 else (X[:0], y[:0])
        for name, extra in CONFIGS.items():
            res = noise_geometry(model, loss_fn, lopsided, **KW, **extra)
            torch.save(
                {"values": res.values, "eigenvalues": res.eigenvalues},
                os.path.join(out_dir, f"empty-{name}-rank{rank}.pt"),
            )
        if rank == 0:
            try:
                noise_geometry(model, loss_fn, shard, **KW, route="exact")
            except ValueError as e:
                torch.save(str(e), os.path.join(out_dir, "error.pt"))


def test_two_ranks_equal_one_process(tmp_path):
    # each rank holds half of the 12 probe samples; only (n, q) projections,
    # aggregated probe vectors, operator products and scalars are reduced
    mp.spawn(_worker, args=(2, cases.free_port(), str(tmp_path)), nprocs=2, join=True)
    model, loss_fn, X, y = _problem()
    for name, extra in CONFIGS.items():
        ref = noise_geometry(model, loss_fn, (X, y), route="sketch", **KW, **extra)
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=False)
            assert got["route"] == "sketch" and got["num_samples"] == 12
            # same seeded probes, same per-sample values, summed in a different
            # order across ranks: equal up to float64 rounding
            for key in ref.values:
                a, b = got["values"][key], ref.values[key]
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (name, key)
            # the jackknife too, with either curvature
            assert got["standard_errors"].keys() == ref.standard_errors.keys()
            assert "mu" in ref.standard_errors
            for key, b in ref.standard_errors.items():
                a = got["standard_errors"][key]
                assert math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-12), (name, key)
            torch.testing.assert_close(
                got["eigenvalues"], ref.eigenvalues, rtol=1e-9, atol=0
            )
            torch.testing.assert_close(
                got["noise_energies"], ref.noise_energies, rtol=1e-9, atol=0
            )
        for rank in range(2):
            got = torch.load(
                tmp_path / f"empty-{name}-rank{rank}.pt", weights_only=False
            )
            for key in ref.values:
                a, b = got["values"][key], ref.values[key]
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (name, key)
            torch.testing.assert_close(
                got["eigenvalues"], ref.eigenvalues, rtol=1e-9, atol=0
            )
    err = torch.load(tmp_path / "error.pt", weights_only=False)
    assert "`route` must be 'sketch' or 'auto' under torch.distributed" in err


def _dict_batches(X, y, size):
    """HF-style loader: a list of dict batches."""
    return [
        {"pixels": X[i : i + size], "label": y[i : i + size]}
        for i in range(0, len(X), size)
    ]


def _batch_fn(batch):
    return batch["pixels"], batch["label"]


def _batch_fn_worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        model, loss_fn, X, y = _problem()
        half = X.shape[0] // world
        shard = _dict_batches(
            X[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half], 3
        )
        res = noise_geometry(model, loss_fn, shard, **KW, batch_fn=_batch_fn)
        op = HessianOperator(model, loss_fn, shard, batch_fn=_batch_fn)
        v = torch.linspace(-1, 1, op.shape[0], dtype=op.dtype)
        torch.save(
            {"values": res.values, "eigenvalues": res.eigenvalues, "hv": op.matvec(v)},
            os.path.join(out_dir, f"batch_fn-rank{rank}.pt"),
        )


def test_batch_fn_shards_equal_one_process(tmp_path):
    # dict batches mapped by batch_fn on each rank's shard: the same measurement
    # and the same operator products as one process on the whole tuple batch
    mp.spawn(
        _batch_fn_worker,
        args=(2, cases.free_port(), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    model, loss_fn, X, y = _problem()
    ref = noise_geometry(model, loss_fn, (X, y), route="sketch", **KW)
    op = HessianOperator(model, loss_fn, (X, y))
    hv = op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=op.dtype))
    for rank in range(2):
        got = torch.load(tmp_path / f"batch_fn-rank{rank}.pt", weights_only=False)
        for key in ref.values:
            a, b = got["values"][key], ref.values[key]
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), key
        torch.testing.assert_close(
            got["eigenvalues"], ref.eigenvalues, rtol=1e-9, atol=0
        )
        torch.testing.assert_close(got["hv"], hv, rtol=1e-10, atol=1e-12)
