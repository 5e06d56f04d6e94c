"""Reduce and broadcast helpers for torch.distributed; identities when not initialized.

Curvature operators and probes call these so that, under ``torch.distributed``
(each rank holding a shard of the data), every rank gets the full-data value.
Only small or P-sized reductions travel; never per-sample P-sized tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum",
    "broadcast",
    "is_distributed",
    "rank",
    "rank0_seed",
    "world_size",
]


def is_distributed() -> bool:
    """Return whether a default process group is initialized and has > 1 rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Return the number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Return this process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks, in place, and return it (identity when not distributed).

    Args:
        x: A tensor, identical in shape on every rank.

    Returns:
        ``x``, now holding the sum over ranks.
    """
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def rank0_seed(seed: int, device: torch.device | str = "cpu") -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself without a process group).

    Random draws whose products are summed over ranks must be the same on every
    rank; ranks given different seeds (``seed = base + rank``) all take rank 0's.

    Args:
        seed: This rank's seed.
        device: Where the one-integer message lives (the process group's device).

    Returns:
        Rank 0's seed.
    """
    if not is_distributed():
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=device)
    return int(broadcast(t)[0])


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``x`` from rank ``src``, in place, and return it.

    Args:
        x: A tensor, identical in shape on every rank.
        src: The rank whose value everyone receives.

    Returns:
        ``x``, now holding rank ``src``'s value.
    """
    if is_distributed():
        dist.broadcast(x, src=src)
    return x
