"""Block products: the per-column cost of the loop and the batched route.

``HessianOperator.matmat`` / ``GGNOperator.matmat`` apply a block of ``q``
columns either column by column through the kept first-order graph
(``block="loop"``) or in one vectorised pass per batch (``block="batched"``:
``torch.autograd.grad(..., is_grads_batched=True)`` on the same graph). This
script times both for ``q`` in ``--blocks`` and reports the cost per column in
gradient-equivalents: (time of one ``q``-column product / ``q``) / (time of one
gradient of the batch loss, ``torch.autograd.grad``), all timed in the same run,
interleaved in a rotating order, medians over ``--reps``. ``q = 1`` is the
single-vector product (``matvec``), the same for both routes.

Models (eval-mode BatchNorm, cross-entropy, float32, one cached batch):

* ``mlp``: a 64-128-10 tanh MLP (P = 9,610) on the 1,797 scikit-learn digits
  (one full batch);
* ``test_resnet``: timm ``test_resnet`` (P = 374k), batch 16, 3x32x32;
* ``resnet18``: timm ``resnet18`` (P = 11.2M), batch 32, 3x32x32, small blocks
  (``--resnet18-blocks``).

Commands::

    python benchmarks/block_products.py                # all three, CPU, 2 threads
    python benchmarks/block_products.py --models mlp --operators hessian ggn
    python benchmarks/block_products.py --device cuda  # the GPU path (not measured)

Results: a table on stdout and ``benchmarks/results/block_products.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from _common import (
    add_device_argument,
    environment,
    load_average,
    positive,
    synchronize,
)
from torch import nn

from geoopt_sgd import GGNOperator, HessianOperator

OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}
MODELS = ("mlp", "test_resnet", "resnet18")


def make_problem(name, device):
    """``(model, (X, y))`` of a named workload, on ``device``.

    Built on the CPU whatever the default device (the same draws on every
    device), then moved.
    """
    with torch.device("cpu"):
        model, (X, y) = _make_problem(name)
    return model.eval().to(device), (X.to(device), y.to(device))


def _make_problem(name):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "mlp":
        from sklearn.datasets import load_digits

        d = load_digits()
        X = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    else:
        import timm

        n = {"test_resnet": 16, "resnet18": 32}[name]
        model = timm.create_model(name, pretrained=False, num_classes=10)
        X = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    return model, (X, y)


def per_column_costs(model, data, operator, blocks, reps, max_block, device):
    """Seconds of a gradient and of each route's ``q``-column product, medians."""
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    X, y = data
    Op = OPERATORS[operator]
    ops = {
        r: Op(model, loss_fn, data, block=r, max_block=max_block)
        for r in ("loop", "batched")
    }
    P = ops["loop"].shape[0]
    g = torch.Generator().manual_seed(0)
    V = {q: torch.randn(P, q, generator=g, device="cpu").to(device) for q in blocks}

    def grad():
        torch.autograd.grad(loss_fn(model(X), y), params)

    jobs = {"grad": grad}
    for q in blocks:
        for r, op in ops.items():
            if q == 1 and r == "batched":
                continue  # one column: both routes are the single-vector product
            jobs[(r, q)] = (
                (lambda op=op, v=V[q]: op.matmat(v))
                if q > 1
                else (lambda op=op, v=V[1][:, 0]: op.matvec(v))
            )
    for fn in jobs.values():  # warm-up; the first product builds the graph
        fn()
        synchronize(device)
    times = {key: [] for key in jobs}
    keys = list(jobs)
    for rep in range(reps):
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            synchronize(device)
            t0 = time.perf_counter()
            jobs[key]()
            synchronize(device)
            times[key].append(time.perf_counter() - t0)
    t_grad = statistics.median(times["grad"])
    rows = []
    for q in blocks:
        row = {"q": q}
        for r in ("loop", "batched"):
            key = (r, q) if (r, q) in times else ("loop", q)
            t = statistics.median(times[key])
            row[f"{r}_seconds"] = t
            row[f"{r}_per_column"] = t / q / t_grad
        row["batched_over_loop"] = row["batched_seconds"] / row["loop_seconds"]
        rows.append(row)
    for op in ops.values():
        op.release()
    return {
        "P": P,
        "grad_seconds": t_grad,
        "rows": rows,
        "raw": {str(k): v for k, v in times.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument(
        "--operators", nargs="+", default=["hessian"], choices=list(OPERATORS)
    )
    ap.add_argument("--blocks", type=positive(int), nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--resnet18-blocks", type=positive(int), nargs="+", default=[1, 4])
    ap.add_argument(
        "--max-block", type=positive(int), default=16, help="the operators' cap"
    )
    ap.add_argument(
        "--reps", type=positive(int), default=7, help="timed repetitions (medians)"
    )
    ap.add_argument("--threads", type=positive(int), default=2)
    add_device_argument(ap)
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(__file__), "results", "block_products.json"
        ),
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"config": vars(args), "env": environment(args.device), "problems": []}
    for name in args.models:
        model, data = make_problem(name, args.device)
        blocks = args.resnet18_blocks if name == "resnet18" else args.blocks
        for operator in args.operators:
            res = per_column_costs(
                model, data, operator, blocks, args.reps, args.max_block, args.device
            )
            res.update(model=name, operator=operator, batch=int(data[1].shape[0]))
            results["problems"].append(res)
            print(
                f"\n== {name} ({operator}), P = {res['P']:,}, batch {res['batch']}, "
                f"gradient {res['grad_seconds'] * 1e3:.1f} ms =="
            )
            print(f"{'q':>3s} {'loop':>8s} {'batched':>8s} {'batched/loop':>13s}")
            for r in res["rows"]:
                print(
                    f"{r['q']:3d} {r['loop_per_column']:8.2f} "
                    f"{r['batched_per_column']:8.2f} {r['batched_over_loop']:13.2f}",
                    flush=True,
                )
            _write(results, args.out)  # after every table: a long run keeps its part
    _write(results, args.out)
    print(f"\nwrote {args.out}")
    return results


def _write(results, path):
    results["env"]["load_average_end"] = load_average()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
