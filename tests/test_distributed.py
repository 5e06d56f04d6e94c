"""The reduce and broadcast helpers of ``geoopt_sgd.distributed``: 2 gloo ranks.

``all_reduce_sum`` sums in place over ranks, ``broadcast`` sends rank ``src``'s
value in place, both identities without a process group. (The callers' tests
hold identical values on every rank, so a broadcast that did nothing, or sent
the wrong rank's value, passed them.)

What the broadcasts are for: ranks that ask for different random draws (per-rank
seeds or ``v0``) all use rank 0's, and every rank gets the single-process result
of rank 0's seed. Tolerance: float64 sums split over two ranks and re-added,
~1e-15 relative, checked at 1e-9.
"""

import os

import cases
import pytest
import torch
from torch import nn

from geoopt_sgd import distributed

pytestmark = pytest.mark.distributed


def _helpers_worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        res = {
            "flags": torch.tensor(
                [
                    distributed.is_distributed(),
                    distributed.world_size(),
                    distributed.rank(),
                ]
            )
        }
        x = torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64)
        assert distributed.all_reduce_sum(x) is x  # in place
        res["sum"] = x
        b = torch.tensor([rank + 1.0, -(rank + 1.0)])
        assert distributed.broadcast(b, src=1) is b
        res["bcast1"] = b
        c = torch.tensor([rank + 1.0])
        assert distributed.broadcast(c) is c
        res["bcast0"] = c
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_helpers_sum_and_broadcast_in_place(tmp_path):
    cases.spawn_gloo(_helpers_worker, (str(tmp_path),), timeout=60)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["flags"].tolist() == [1, 2, rank]
        assert r["sum"].tolist() == [3.0, 30.0]
        assert r["bcast1"].tolist() == [2.0, -2.0]  # rank 1's, on both ranks
        assert r["bcast0"].tolist() == [1.0]


def test_helpers_are_identities_without_a_process_group():
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(x) is x and x.tolist() == [1.0, 2.0]
    assert distributed.broadcast(x, src=0) is x and x.tolist() == [1.0, 2.0]


# --- what the broadcasts are for: ranks asking for different start vectors ----

CUT = 7  # rank 0 holds 7 of the 12 samples, rank 1 the other 5


def _v0(seed):
    return torch.randn(57, generator=torch.Generator().manual_seed(seed)).double()


def _measure(model, data, seed):
    import geoopt_sgd as g

    CE = nn.CrossEntropyLoss()
    H = g.HessianOperator(model, CE, data)
    eig = g.top_eigenpairs(H, 2, seed=seed, tol=1e-10)
    warm = g.top_eigenpairs(H, 2, v0=_v0(100 + seed), tol=1e-10)
    sd = g.spectral_density(H, num_probes=2, num_steps=6, num_points=20, seed=seed)
    es = g.expected_sharpness(model, CE, data, sigma=0.1, num_samples=3, seed=seed)
    kw = {"num_probes": 5, "seed": seed, "chunk_size": 3}
    tr = g.hutchinson_trace(H, **kw)
    fr = g.squared_frobenius(H, **kw)
    dg = g.hutchinson_diagonal(H, **kw)
    hpp = g.hutchpp_trace(H, num_matvecs=10, seed=seed)
    sh = g.sharpness(model, CE, data, k=1, trace_probes=4, seed=seed)
    ng = g.noise_geometry(model, CE, data, k=2, route="sketch", seed=seed)
    return {
        "noise_geometry": torch.tensor(
            [ng.values[m] for m in ("tr_sigma", "alpha", "mu", "tr_h_sigma")]
        ),
        "trace": torch.tensor([tr.value, tr.stderr, fr.value, fr.stderr]),
        "diag": torch.stack([dg.value, dg.stderr]),
        "hutchpp": torch.tensor([hpp.value, hpp.stderr]),
        "sharpness": torch.tensor([sh.trace, sh.trace_stderr, sh.frobenius]),
        "eig": eig.eigenvalues,
        "eigvec": eig.eigenvectors.abs(),
        "warm": warm.eigenvalues,
        "nodes": sd.nodes,
        "weights": sd.weights,
        "es": torch.tensor([es.value, es.stderr]),
    }


def _start_worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        X, y = cases.make_data(12)
        shard = (X[:CUT], y[:CUT]) if rank == 0 else (X[CUT:], y[CUT:])
        # rank 1 asks for other random draws (seed 1, v0 drawn with seed 101)
        res = _measure(cases.mlp(), shard, seed=rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ranks_with_different_seeds_use_rank_0s_draws(tmp_path):
    # ranks given different seeds or v0 (say seed = base + rank) all use rank 0's
    # random draws, so every rank gets the single-process result of rank 0's
    # seed; otherwise each rank's Krylov space or perturbation differs while the
    # products and losses are summed over ranks
    import geoopt_sgd as g

    cases.spawn_gloo(_start_worker, (str(tmp_path),), timeout=90)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model, (X, y) = cases.mlp(), cases.make_data(12)
    ref = _measure(model, (X, y), seed=0)  # one process, rank 0's seed
    H = g.HessianOperator(model, nn.CrossEntropyLoss(), (X, y))
    other = g.spectral_density(H, num_probes=2, num_steps=6, num_points=20, seed=1)
    assert not torch.allclose(ref["nodes"], other.nodes)  # the seeds differ
    for key in ref:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(r0[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
