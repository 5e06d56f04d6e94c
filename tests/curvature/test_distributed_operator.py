"""Operators under torch.distributed: 2 gloo ranks on CPU, each with a data shard.

Every rank must get the full-data product (the single-process result on all the
data) for a plain and a DDP-wrapped model, with even and uneven shards.
Tolerance: the same float64 sums split over two ranks and re-added: rounding
only (~1e-15 relative), checked at 1e-10.
"""

import os

import cases
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.distributed


def _problem():
    X, y = cases.make_data(13)  # odd: the uneven split gives 7 and 6 samples
    return cases.mlp(), X, y


def _block():
    """Three columns: with ``max_block=2``, one pass of two and one of one."""
    t = torch.arange(57, dtype=torch.float64)
    return torch.stack(
        [torch.linspace(-1, 1, 57).double(), t.cos(), (0.3 * t).sin()], 1
    )


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        from geoopt_sgd.curvature import GGNOperator, HessianOperator
        from geoopt_sgd.curvature.lanczos import top_eigenpairs

        model, X, y = _problem()
        CE = nn.CrossEntropyLoss()
        v = torch.linspace(-1, 1, 57, dtype=torch.float64)
        results = {}
        # "empty": rank 1 holds no sample (an empty batch), rank 0 all 13
        cuts = {"even": (0, 6, 12), "uneven": (0, 7, 13), "empty": (0, 13, 13)}
        for split, (a, b, c) in cuts.items():
            lo, hi = (a, b) if rank == 0 else (b, c)
            shard = [(X[lo:hi], y[lo:hi])]
            if split == "uneven" and rank == 0:
                shard = [
                    (X[lo : lo + 3], y[lo : lo + 3]),
                    (X[lo + 3 : hi], y[lo + 3 : hi]),
                ]
            for wrap in ("plain", "ddp"):
                m = (
                    nn.parallel.DistributedDataParallel(model)
                    if wrap == "ddp"
                    else model
                )
                for method in ("auto", "fwd_rev", "rev_rev"):
                    H = HessianOperator(m, CE, shard, method=method)
                    results[f"H-{split}-{wrap}-{method}"] = H.matvec(v)
                    assert H.num_samples == c
                G = GGNOperator(m, CE, shard)
                results[f"G-{split}-{wrap}"] = G.matvec(v)
                # block products, batched route: one all-reduce per block
                for kind, Op in (("HB", HessianOperator), ("GB", GGNOperator)):
                    op = Op(m, CE, shard, block="batched", max_block=2)
                    results[f"{kind}-{split}-{wrap}"] = op.matmat(_block())
                results[f"grad-{split}-{wrap}"] = H.gradient()
                results[f"loss-{split}-{wrap}"] = torch.tensor(H.loss())
        H = HessianOperator(
            model, CE, [(X[:6], y[:6])] if rank == 0 else [(X[6:12], y[6:12])]
        )
        try:
            eig = top_eigenpairs(H, 2, seed=0)
            results["eig"] = eig.eigenvalues
        except NotImplementedError:  # eigensolver not there yet
            pass
        # empty on every rank: the same clear error on both (no hang)
        try:
            HessianOperator(model, CE, (X[:0], y[:0]))
        except ValueError as e:
            results["all_empty_error"] = torch.tensor([1.0])
            assert "empty on every rank" in str(e), str(e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_ranks_match_single_process(tmp_path):
    from geoopt_sgd.curvature import GGNOperator, HessianOperator
    from geoopt_sgd.testing.curvature import assert_close_report

    mp.spawn(_worker, args=(2, cases.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model, X, y = _problem()
    CE = nn.CrossEntropyLoss()
    v = torch.linspace(-1, 1, 57, dtype=torch.float64)
    for split, n in (("even", 12), ("uneven", 13), ("empty", 13)):
        H = HessianOperator(model, CE, (X[:n], y[:n]))
        G = GGNOperator(model, CE, (X[:n], y[:n]))
        ref_h, ref_g = H.matvec(v), G.matvec(v)
        ref_hb, ref_gb = H.matmat(_block()), G.matmat(_block())
        for key in r0:
            if key.split("-")[1:2] != [split]:
                continue
            ref = {
                "H": ref_h,
                "G": ref_g,
                "HB": ref_hb,
                "GB": ref_gb,
                "grad": H.gradient(),
            }.get(key.split("-")[0])
            if ref is None:
                ref = torch.tensor(H.loss())
            assert torch.equal(r0[key], r1[key]), key  # identical on every rank
            assert_close_report(r0[key], ref, 1e-10, 1e-13)
    if "eig" in r0:
        assert torch.equal(r0["eig"], r1["eig"])
    assert "all_empty_error" in r0 and "all_empty_error" in r1
