"""expected_sharpness under torch.distributed: 2 gloo ranks on CPU.

A rank with an empty shard joins the loss reductions with zeros, as in the
operators and sharpness (raising there alone left the other rank hanging);
every rank gets the single-process value on the union of the shards.
Tolerance: float64 sums re-added across ranks, 1e-12 relative.
"""

import os

import cases
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.distributed

KW = {"sigma": 0.1, "num_samples": 3, "seed": 0}


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        from torch.nn.parallel import DistributedDataParallel as DDP

        from geoopt_sgd import expected_sharpness

        model, (X, y), CE = cases.mlp(), cases.make_data(12), nn.CrossEntropyLoss()
        res = {}
        for split, cut in (("uneven", 7), ("empty", 12)):
            shard = (X[:cut], y[:cut]) if rank == 0 else (X[cut:], y[cut:])
            for wrap, m in (("plain", model), ("ddp", DDP(model))):
                est = expected_sharpness(m, CE, shard, **KW)
                res[f"{split}-{wrap}"] = torch.tensor([est.value, est.stderr])
        try:  # empty on every rank: the same clear error on both, no hang
            expected_sharpness(model, CE, (X[:0], y[:0]), **KW)
        except ValueError as e:
            res["all_empty_error"] = str(e)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_empty_shard_on_one_rank_equals_one_process(tmp_path):
    from geoopt_sgd import expected_sharpness

    cases.spawn_gloo(_worker, (str(tmp_path),), timeout=60)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model, (X, y), CE = cases.mlp(), cases.make_data(12), nn.CrossEntropyLoss()
    ref = expected_sharpness(model, CE, (X, y), **KW)
    ref = torch.tensor([ref.value, ref.stderr])
    for key in ("uneven-plain", "uneven-ddp", "empty-plain", "empty-ddp"):
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], ref, rtol=1e-12, atol=1e-15)
    for r in (r0, r1):
        assert "empty on every rank" in r["all_empty_error"]
