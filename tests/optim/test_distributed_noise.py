"""NoisyGD under torch.distributed: 2 gloo ranks stay identical, sharing no noise."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import make_data, mlp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geoopt_sgd import NoisyGD

KINDS = ("isotropic", "diagonal", "hessian", "sgd_matched", "geometry_aware")


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        loss_fn = nn.CrossEntropyLoss()
        X, y = make_data(n=12, seed=rank)  # each rank holds its own shard
        results = {}
        for kind in KINDS:
            ddp = DDP(mlp(seed=0))
            opt = NoisyGD(
                ddp.parameters(),
                lr=0.1,
                noise=kind,
                noise_scale=0.1,
                batch_size=3,
                k=2,
                refresh_every=2,
                model=ddp,
                loss_fn=loss_fn,
                data=(X, y),
                seed=11,
            )
            rng = torch.get_rng_state()
            for _ in range(3):
                opt.zero_grad()
                loss_fn(ddp(X), y).backward()
                opt.step()
            assert torch.equal(rng, torch.get_rng_state()), "global RNG changed"
            results[kind] = (
                torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]),
                opt.stats["realised_sq_norm"],
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_replicas_stay_identical_with_noise(tmp_path):
    mp.spawn(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for kind in KINDS:
        assert torch.equal(r0[kind][0], r1[kind][0]), kind
        assert r0[kind][1] == r1[kind][1] > 0, kind
