"""The reduce and broadcast helpers of ``geoopt_sgd.distributed``: 2 gloo ranks.

``all_reduce_sum`` sums in place over ranks, ``broadcast`` sends rank ``src``'s
value in place, both identities without a process group. (The callers' tests
hold identical values on every rank, so a broadcast that did nothing, or sent
the wrong rank's value, passed them.)
"""

import os

import cases
import pytest
import torch

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
