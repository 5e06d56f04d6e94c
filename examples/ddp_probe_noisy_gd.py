"""Probe and NoisyGD under torch.distributed: 2 CPU processes with gloo.

Launch with ``torchrun``; each rank holds a shard of the data. Two phases:

1. SGD under :class:`~torch.nn.parallel.DistributedDataParallel` with a
   :class:`geoopt_sgd.NoiseProbe` whose probe batch is this rank's shard: every
   rank measures (the metrics are reduced across ranks, so they equal one process
   holding the whole probe batch) and only rank 0 writes the JSON lines.
2. Full-batch :class:`geoopt_sgd.NoisyGD` with Hessian-aligned noise: DDP
   averages the gradients, the curvature source's ``data`` is this rank's shard
   (its statistics are summed over ranks), and every rank draws the same noise
   from ``(seed, step)`` without communicating, so the replicas stay identical.

Run (from the repository root)::

    torchrun --standalone --nproc_per_node 2 examples/ddp_probe_noisy_gd.py
    torchrun --standalone --nproc_per_node 2 examples/ddp_probe_noisy_gd.py --tiny
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geoopt_sgd import NoiseProbe, NoisyGD


def main() -> None:
    """Run both phases on this rank and check that the replicas agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (for tests)")
    parser.add_argument("--out", default="runs/examples/ddp_noise.jsonl")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # torchrun sets it for every process
        parser.error(
            "launch it with torchrun: torchrun --standalone --nproc_per_node 2 "
            "examples/ddp_probe_noisy_gd.py"
        )
    steps = 6 if args.tiny else 300

    dist.init_process_group("gloo")  # torchrun sets rank, world size, address
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    # random inputs, labels from a random linear teacher (the same on every rank)
    x = torch.randn(512, 64, dtype=torch.float64)
    y = (x @ torch.randn(64, 10, dtype=torch.float64)).argmax(1)
    xs, ys = x[rank::world], y[rank::world]  # this rank's shard
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    model = DDP(net)
    loss_fn = nn.CrossEntropyLoss()

    # 1. SGD with a probe on this rank's shard of the probe batch
    probe = NoiseProbe(
        model,
        loss_fn,
        (xs[:64], ys[:64]),
        every=max(1, steps // 2),
        k=4,
        sinks=[args.out] if rank == 0 else [],
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(sgd)
    gen = torch.Generator().manual_seed(rank)  # different batches on each rank
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (16,), generator=gen)
        sgd.zero_grad()
        loss_fn(model(xs[idx]), ys[idx]).backward()  # DDP averages the gradients
        sgd.step()

    # 2. full-batch GD with Hessian-aligned noise matched to SGD at B = 32
    opt = NoisyGD(
        model.parameters(),
        lr=0.1,
        noise="hessian",
        batch_size=32,
        k=4,
        model=model,
        loss_fn=loss_fn,
        data=(xs, ys),
        seed=0,
    )
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(xs), ys).backward()
        opt.step()

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    same = all(torch.equal(copies[0], c) for c in copies)
    if rank == 0:
        last = probe.history[-1]
        print(
            f"probe: {probe.num_probes} records (step {last['step']}: "
            f"alpha={last['alpha']:.3g}, mu={last['mu']:.3g}, samples "
            f"{last['num_samples']}); NoisyGD: {opt.stats['step']} steps, "
            f"{opt.stats['n_hvp']} HVPs; replicas identical: {same}"
        )
    dist.destroy_process_group()
    if not same:
        raise SystemExit("replicas differ")


if __name__ == "__main__":
    main()
