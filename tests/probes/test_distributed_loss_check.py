"""The per-sample loss check under torch.distributed: a refused loss is refused
on every rank, so no rank is left waiting in a collective."""

import os

import cases
import pytest
import torch
from torch import nn

from geoopt_sgd import NoiseProbe, noise_geometry

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank, world, port, out_dir):
    with cases.gloo_group(rank, world, port):
        model = cases.mlp()
        X, y = cases.make_data(n=8, seed=rank)
        if rank == 0:
            y[0] = 2  # the ignored class, on this rank's shard only
        loss_fn = nn.CrossEntropyLoss(ignore_index=2)
        y = torch.where(y == 2, 1, y) if rank == 1 else y
        for name, call in [
            (
                "noise_geometry",
                lambda: noise_geometry(
                    model, loss_fn, (X, y), metrics=["tr_sigma"], k=2
                ),
            ),
            ("NoiseProbe", lambda: NoiseProbe(model, loss_fn, (X, y), k=2)),
        ]:
            try:
                call()
                what = "ok"
            except ValueError as exc:
                what = "ValueError: " + str(exc)
            with open(os.path.join(out_dir, f"{name}{rank}.txt"), "w") as f:
                f.write(what)


def test_ignore_index_on_one_rank_is_refused_on_every_rank(tmp_path):
    cases.spawn_gloo(_worker, (str(tmp_path),), timeout=90.0)
    for name in ("noise_geometry", "NoiseProbe"):
        for rank in range(2):
            text = (tmp_path / f"{name}{rank}.txt").read_text()
            assert text.startswith("ValueError") and "ignore_index" in text, (
                name,
                rank,
                text,
            )
