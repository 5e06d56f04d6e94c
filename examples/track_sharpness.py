"""Track the top Hessian eigenvalues during training, warm-starting each solve.

Every ``--every`` steps the script measures the top-``k`` Hessian eigenpairs of the
training loss on a fixed measurement batch with :func:`geoopt_sgd.sharpness`
(one Lanczos run, plus Hutchinson ``Tr H``), passing the previous report as
``v0`` (its eigenvectors and the solve's other Ritz vectors). Between two nearby
points the top eigenvectors move little, so a warm start can save Hessian-vector
products (how many depends on how far they moved: 100 SGD steps apart they move
too far for the block start and the solve is an ordinary warm one); the script
prints the cold and warm counts of a second solve at the last point, where
nothing moved (28 against 8). It also prints the stability ratio
``lr * lambda_max / 2`` (GD is linearly stable below 1).

Run (from the repository root)::

    python examples/track_sharpness.py          # ~10 s on 2 CPU cores
    python examples/track_sharpness.py --tiny   # a few seconds (the test)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from geoopt_sgd import sharpness


def main() -> None:
    """Train an MLP with SGD and measure its sharpness on a schedule."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (for tests)")
    parser.add_argument("--out", default=None, help="write the records as JSON lines")
    args = parser.parse_args()
    steps, every, k = (20, 10, 3) if args.tiny else (1500, 100, 5)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    measure = (x[:512], y[:512])  # fixed measurement batch

    records, previous = [], None
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (32,))
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
        if step % every == 0:
            # the previous report warm-starts the solve (its eigenvectors and
            # the solve's other Ritz vectors; None the first time)
            rep = sharpness(
                model, loss_fn, measure, k=k, lr=lr, v0=previous, trace_probes=5
            )
            records.append({"step": step, **rep.as_dict()})
            print(
                f"step {step:5d}: lambda_1..{k} = "
                + ", ".join(f"{v:.3g}" for v in rep.top_eigenvalues.tolist())
                + f"  Tr H = {rep.trace:.3g}  lr*lambda_max/2 = "
                f"{rep.stability_ratio:.3f}  HVPs {rep.n_hvp}"
            )
            previous = rep
    cold = sharpness(model, loss_fn, measure, k=k, trace_probes=0)
    warm = sharpness(model, loss_fn, measure, k=k, trace_probes=0, v0=previous)
    print(f"last point again: {cold.n_hvp} HVPs cold, {warm.n_hvp} warm-started")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
    main()
