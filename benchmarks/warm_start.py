"""Warm-started eigensolves: products per solve, cold vs warm (issue #14 §2).

Three starts of ``top_eigenpairs`` on the same operator:

* ``cold``: no ``v0`` (a random start vector);
* ``summed``: ``v0`` = the sum of the previous eigenvectors' unit columns, one
  vector: what a ``(P, k)`` ``v0`` did before the block warm start;
* ``block``: ``v0`` = the previous :class:`~geoopt_sgd.EigenResult` (its
  eigenvectors and guard vectors): the block warm start, which falls back to
  the summed start when the first product leaves ``span(v0)`` too far.

Workloads (products are deterministic, so machine load does not change them):

1. a synthetic drifting operator ``A_t = A + t dt E`` (P = 800, 30 outliers 7%
   apart over a [0, 1] bulk, ``||E|| ~ 1.4``), k = 5 and 20, tol 1e-3, 5 steps;
2. NoisyGD's Hessian-aligned noise refresh as ``benchmarks/_noisy_gd_bench.py``
   runs it (timm ``test_resnet``, 16 samples, k = 5, refresh every 10 steps,
   lr 1e-4, noise_scale 1), HVPs of each refresh, from the initialisation and
   near a minimum (300 SGD steps at lr 0.05 first, then lr 1e-3), with and
   without the guards' vectors in the warm start;
3. sharpness tracking on timm ``test_resnet`` (16 samples, plain SGD, lr 0.01):
   a cold solve at step s, then cold / summed / block solves at step s + N for
   N = 10, 50, 200 (k = 5, tol 1e-3), and the probe's setting (k = 10,
   tol 1e-2, N = 400).

Commands (one thread)::

    OMP_NUM_THREADS=1 python benchmarks/warm_start.py          # ~4 min, one core
    OMP_NUM_THREADS=1 python benchmarks/warm_start.py --quick  # workload 1, seconds

Results: a table on stdout and ``benchmarks/results/warm_start.json``
(``warm_start_quick.json`` with ``--quick``; ``--out`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from _common import environment
from torch import nn

from geoopt_sgd import DenseOperator, HessianOperator, NoisyGD, top_eigenpairs


def _summed(res):
    V = res.eigenvectors
    return (V / V.norm(dim=0)).sum(dim=1)


def _rho(op, prev) -> float:
    """How far ``A v`` (``v`` the summed start) leaves ``span(v0)`` (1 product)."""
    V = prev.warm_start()
    Q, _ = torch.linalg.qr(V)
    s = (V / V.norm(dim=0)).sum(dim=1)
    w = op.matvec(s / s.norm())
    return float((w - Q @ (Q.T @ w)).norm() / w.norm())


def _three(op_fn, prev, k, tol, seed):
    out = {}
    for name, v0 in (("cold", None), ("summed", _summed(prev)), ("block", prev)):
        # the skip check off: it adds the same products to every start
        res = top_eigenpairs(op_fn(), k, tol=tol, v0=v0, seed=seed, verify=False)
        out[name] = res
    return out


def synthetic(P: int = 800, steps: int = 5) -> list[dict[str, Any]]:
    """Products per warm solve on ``A + t dt E`` (previous block result as v0)."""
    g = torch.Generator().manual_seed(0)
    with torch.device("cpu"):  # a CPU benchmark, whatever the default device
        Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
        lam = torch.cat(
            [
                10 * 0.93 ** torch.arange(30, dtype=torch.float64),
                torch.rand(P - 30, generator=g, dtype=torch.float64),
            ]
        )
        A = (Q * lam) @ Q.T
        E = torch.randn(P, P, generator=g, dtype=torch.float64)
    E = (E + E.T) / (2 * P**0.5)
    rows = []
    for k in (5, 20):
        for dt in (0.01, 0.1):
            prev = top_eigenpairs(DenseOperator(A), k, tol=1e-3, verify=False)
            counts: dict[str, list[int]] = {"cold": [], "summed": [], "block": []}
            err = 0.0
            for t in range(1, steps + 1):
                At = A + t * dt * E
                ref = torch.linalg.eigvalsh(At).flip(0)[:k]
                out = _three(lambda At=At: DenseOperator(At), prev, k, 1e-3, t)
                for name, res in out.items():
                    counts[name].append(res.n_matvec)
                    err = max(err, float(((res.eigenvalues - ref).abs() / ref).max()))
                    assert res.converged
                prev = out["block"]
            rows.append({"k": k, "dt": dt, "products": counts, "max_rel_err": err})
    return rows


def _timm(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    with torch.device("cpu"):  # a CPU benchmark, whatever the default device
        model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
        x = torch.randn(16, 3, 32, 32)
        y = torch.randint(0, 10, (16,))
    return model, x, y, nn.CrossEntropyLoss()


def noisy_gd_refresh(
    steps: int = 60,
    *,
    pretrain: int = 0,
    lr: float = 1e-4,
    guards: bool = True,
) -> dict[str, list]:
    """HVPs of each refresh of NoisyGD's Hessian-aligned noise (k = 5).

    ``pretrain`` full-batch SGD steps at lr 0.05 first (300 reach L ~ 6e-3: the
    refresh near a minimum); ``guards=False`` drops the guards' vectors from
    the warm start (NoisyGD before it kept them), for the comparison.
    """
    model, x, y, loss_fn = _timm()
    if pretrain:
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(pretrain):
            sgd.zero_grad()
            loss_fn(model(x), y).backward()
            sgd.step()
    opt = NoisyGD(
        model.parameters(),
        lr=lr,
        noise="hessian",
        noise_scale=1.0,
        batch_size=8,
        k=5,
        refresh_every=10,
        model=model,
        loss_fn=loss_fn,
        data=(x, y),
        seed=0,
    )
    per, lam1, last = [], [], 0
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if not guards:
            opt._cache.pop("guard_vectors", None)
        if opt.stats["n_hvp"] != last:
            per.append(opt.stats["n_hvp"] - last)
            lam1.append(float(opt._cache["eigenvalues"][0]))
            last = opt.stats["n_hvp"]
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    return {"hvps": per, "lambda_1": lam1, "loss": loss}


def tracking(settings=((5, 1e-3, 10), (5, 1e-3, 50), (5, 1e-3, 200), (10, 1e-2, 400))):
    """Cold solve at step s, then cold / summed / block at s + N (SGD, lr 0.01)."""
    model, x, y, loss_fn = _timm()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    def op():
        return HessianOperator(model, loss_fn, (x, y), mode="eval")

    rows = []
    train(20)  # leave the initialisation
    for k, tol, N in settings:
        prev = top_eigenpairs(op(), k, tol=tol, seed=1, verify=False)
        train(N)
        rho = _rho(op(), prev)
        out = _three(op, prev, k, tol, 2)
        ref = out["cold"].eigenvalues
        rows.append(
            {
                "k": k,
                "tol": tol,
                "N": N,
                "products": {n: r.n_matvec for n, r in out.items()},
                "converged": {n: r.converged for n, r in out.items()},
                "max_rel_diff_vs_cold": {
                    n: float(((r.eigenvalues - ref).abs() / ref.abs()).max())
                    for n, r in out.items()
                },
                "lambda_max": float(ref[0]),
                "rho": rho,
                "block_opened": rho * prev.warm_start().shape[1] <= 64 * tol,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the synthetic operator only (workload 1: seconds)",
    )
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "warm_start_quick.json" if args.quick else "warm_start.json"
        args.out = os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", name
        )
    torch.set_num_threads(1)
    result: dict[str, Any] = {"quick": args.quick, "env": environment()}
    result["synthetic"] = syn = synthetic()
    print("synthetic drifting operator (P=800, tol 1e-3), products per solve:")
    for r in syn:
        c = r["products"]
        print(
            f"  k={r['k']:2d} dt={r['dt']:<5} cold {c['cold']} summed {c['summed']} "
            f"block {c['block']}  max rel err {r['max_rel_err']:.1e}"
        )
    if not args.quick:
        workloads_2_and_3(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


def workloads_2_and_3(result: dict[str, Any]) -> None:
    """NoisyGD's refreshes and sharpness tracking on timm ``test_resnet``."""
    result["noisy_gd_refresh"] = ngd = {}
    for name, kw in (
        ("from init, lr 1e-4", {}),
        ("from init, lr 1e-4, no guards", {"guards": False}),
        ("near a minimum, lr 1e-3", {"pretrain": 300, "lr": 1e-3}),
        (
            "near a minimum, lr 1e-3, no guards",
            {"pretrain": 300, "lr": 1e-3, "guards": False},
        ),
    ):
        ngd[name] = r = noisy_gd_refresh(**kw)
        lam = ", ".join(f"{v:.3g}" for v in r["lambda_1"])
        print(
            f"NoisyGD hessian refresh (test_resnet, k=5), {name}: HVPs per "
            f"refresh {r['hvps']}, lambda_1 {lam}, final L {r['loss']:.2e}"
        )
    result["tracking"] = tr = tracking()
    print("sharpness tracking (test_resnet, SGD lr 0.01), products per solve:")
    for r in tr:
        print(
            f"  k={r['k']:2d} tol={r['tol']:g} N={r['N']:3d} {r['products']} "
            f"rho {r['rho']:.3g} block opened {r['block_opened']} "
            f"max rel diff vs cold {max(r['max_rel_diff_vs_cold'].values()):.1e}"
        )


if __name__ == "__main__":
    main()
