"""Curvature benchmark: top-k Hessian eigenvalues, geoopt_sgd vs peer tools.

Runs the same work (the k largest algebraic Hessian eigenvalues of a fixed batch,
tolerance 1e-3) with

* ``geoopt_sgd``: :class:`~geoopt_sgd.HessianOperator` (graph reuse) +
  :func:`~geoopt_sgd.top_eigenpairs` (thick-restart Lanczos),
* ``pyhessian``: ``hessian(...).eigenvalues(top_n=k, tol=tol)`` (power iteration
  with deflation, graph reuse),
* ``hessian_eigenthings``: ``HessianOperator`` + ``lanczos(k=k, tol=tol,
  which="LA")`` (its defaults otherwise: ``2k`` steps, no restart),
* ``curvlinops``: ``HessianLinearOperator(...).to_scipy()`` + scipy ``eigsh``
  (implicitly restarted Lanczos, ARPACK),

on an MLP and a timm CNN on CPU (``--models mlp cnn``; ``--device cuda`` runs our
tools on a GPU, the peers are skipped there), and on two clustered
spectra (``--models digits clustered``): ``digits``, an MLP trained briefly on
scikit-learn's digits, and ``clustered``, a synthetic symmetric matrix with runs of
eigenvalues ``tol / 2`` and ``tol`` apart around the 20th, where a solver that
stops on residuals alone can skip an eigenvalue (PyHessian and hessian-eigenthings
need a model and skip ``clustered``; ``curvlinops_eigsh`` is plain scipy ``eigsh``
there). It prints per tool: HVPs used and wall time
(means over ``--seeds`` start vectors), max relative eigenvalue error vs a
high-accuracy reference, and missed eigenvalues (reference eigenvalues with no
returned value within 1e-3, summed over seeds; ``--seeds 20`` gives the missed
count over 20 start vectors). ``geoopt_sgd_unchecked`` is ours with
``verify=False``: the products the skip check costs on the same runs. PyHessian and
hessian-eigenthings run twice: at their defaults, and as ``@acc``, the cheapest
setting of a sweep that reaches the accuracy bar (see ``PYHESSIAN_SWEEP`` and
``EIGENTHINGS_SWEEP``), so costs can be compared at equal accuracy. It also
measures one HVP of our operator in gradient-equivalents. HVPs of peer tools are
counted by wrapping their HVP function or operator.

Commands::

    python benchmarks/curvature.py --quick  # minutes on 2 cores: MLP + test_resnet
    python benchmarks/curvature.py --quick --device cuda  # ours on a GPU (not measured)
    python benchmarks/curvature.py          # MLP + resnet18 (batch 64): hours
    python benchmarks/curvature.py --models digits clustered --seeds 20 \
        --tools geoopt_sgd geoopt_sgd_unchecked curvlinops_eigsh pyhessian

Results: a table on stdout and ``benchmarks/results/curvature.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import numpy as np
import torch
from _common import (
    add_device_argument,
    environment,
    load_average,
    positive,
    synchronize,
)
from torch import nn

from geoopt_sgd import DenseOperator, HessianOperator, LinearOperator, top_eigenpairs

MATCH_RTOL = 1e-3  # a reference eigenvalue is "found" if a value is within this
# the tools that run on --device; the peers run on the CPU only (skipped elsewhere)
ON_DEVICE = ("geoopt_sgd", "geoopt_sgd_unchecked")


# --- problems ----------------------------------------------------------------


def make_mlp(quick):
    torch.manual_seed(0)
    d, h, c, n = (32, 64, 10, 128) if quick else (64, 256, 10, 512)
    model = nn.Sequential(
        nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)
    )
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return model, (X, y)


def make_cnn(quick):
    import timm

    torch.manual_seed(0)
    name = "test_resnet" if quick else "resnet18"
    model = timm.create_model(name, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(1)
    n, s = (16, 32) if quick else (64, 32)
    X = torch.randn(n, 3, s, s, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return model.eval(), (X, y), name


def make_digits():
    """A 64-128-10 tanh MLP (9,610 parameters) on all 1,797 digits, 30 SGD steps.

    Init seed and step count were picked from a scan (seeds 0-7, 30-300 steps) for
    the tightest pair near the 20th eigenvalue: lambda_19 / lambda_20 are 2.7e-3
    apart (relative). The gaps are printed.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model, (X, y)


def clustered_spectrum(P, tol):
    """Descending eigenvalues with runs ``tol / 2`` and ``tol`` apart near the 20th.

    1-12: geometric from 10 down, 8% apart; 13-16: a run ``tol`` apart; 17-20: a
    run ``tol / 2`` apart (the 20th closes it); 21-24: a run ``tol`` apart; then a
    bulk in ``[0, 0.6 * lambda_24]`` dense near 0 (like a Hessian's). Runs are 3%
    apart, so a skipped member shifts the returned values past a gap > tol.
    """
    lam = [10.0 * 0.92**i for i in range(12)]
    for spacing in (tol, tol / 2, tol):
        top = lam[-1] * 0.97
        lam += [top * (1 - spacing) ** j for j in range(4)]
    rng = np.random.default_rng(0)
    bulk = 0.6 * lam[-1] * rng.random(P - len(lam)) ** 3
    return np.concatenate([lam, np.sort(bulk)[::-1]])


def make_clustered(tol, P=2000):
    """``Q diag(lam) Q^T`` in float32 with a random orthogonal ``Q``; its spectrum."""
    lam = clustered_spectrum(P, tol)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=torch.float64, generator=g))
    A = (Q * torch.from_numpy(lam)) @ Q.T
    A = 0.5 * (A + A.T)
    return DenseOperator(A.float()), lam


def to_device(model, data, device):
    """A problem built on the CPU (model or bare operator, data), on ``device``."""
    if isinstance(model, DenseOperator):
        model = DenseOperator(model.matrix.to(device))
    elif isinstance(model, nn.Module):
        model = model.to(device)
    if data is not None:
        data = tuple(t.to(device) for t in data)
    return model, data


def device_of(model, data):
    """The device a problem lives on."""
    if data is not None:
        return data[0].device
    return model.matrix.device


def off_device(tool, device):
    """Why ``tool`` is not run on ``device``; ``None`` where it is."""
    if torch.device(device).type == "cpu" or tool in ON_DEVICE:
        return None
    return f"a peer tool, run on the CPU only: skipped on --device {device}"


class NotApplicable(Exception):
    """A tool that needs a model, asked to run on a bare operator."""


def n_params(model):
    if isinstance(model, LinearOperator):
        return model.shape[0]
    return sum(p.numel() for p in model.parameters())


# --- reference and scoring ---------------------------------------------------


def reference(model, data, kmax, quick):
    """High-accuracy top eigenvalues: float64 for the MLP, tight tol otherwise."""
    loss = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in model.parameters())
    if P <= 6000:
        m64 = copy.deepcopy(model).double()
        X, y = data
        op = HessianOperator(m64, loss, (X.double(), y))
        lam = torch.linalg.eigvalsh(op.to_dense()).flip(0)[: kmax + 10]
        return lam.tolist(), "dense float64 eigh"
    if model_is_small(model):
        m64 = copy.deepcopy(model).double()
        X, y = data
        op = HessianOperator(m64, loss, (X.double(), y))
        res = top_eigenpairs(op, kmax + 10, tol=1e-9, verify=True)
        return res.eigenvalues.tolist(), (
            "geoopt_sgd float64 Lanczos tol 1e-9, k+10, verify=True"
            + ("" if res.verified else " (NOT verified)")
        )
    op = HessianOperator(model, loss, data)
    res = top_eigenpairs(op, kmax + 5, tol=1e-5)
    return res.eigenvalues.tolist(), "geoopt_sgd float32 Lanczos tol 1e-5, k+5"


def model_is_small(model):
    return sum(p.numel() for p in model.parameters()) <= 2_000_000


def score(values, ref, k):
    ref = np.asarray(ref[:k], dtype=np.float64)
    vals = np.sort(np.asarray(values, dtype=np.float64))[::-1][:k]
    if len(vals) < k:
        vals = np.concatenate([vals, np.full(k - len(vals), np.nan)])
    err = np.abs(vals - ref) / np.abs(ref)
    missed, used = 0, set()
    for r in ref:
        hit = [
            i
            for i, v in enumerate(vals)
            if i not in used and abs(v - r) <= MATCH_RTOL * abs(r)
        ]
        if hit:
            used.add(hit[0])
        else:
            missed += 1
    return float(np.nanmax(err)) if np.isfinite(err).any() else float("nan"), missed


# --- tools -------------------------------------------------------------------
#
# Every tool runs from ``--seeds`` start vectors (seed s: our ``seed=s``, eigsh's
# ``v0`` from ``default_rng(s)``, PyHessian's ``torch.manual_seed(s)``,
# hessian-eigenthings' ``seed=s``): Krylov methods differ by 10-30% in products
# between start vectors, so one seed cannot rank two of them.
#
# Two rows per peer that has a knob for accuracy: its documented defaults at the
# same ``tol``, and "@acc", the cheapest setting of a sweep that meets the accuracy
# bar (max relative error <= MATCH_RTOL, none missed) for that seed. PyHessian's
# ``tol`` is a relative change of the eigenvalue between power steps, not a
# residual, and hessian-eigenthings runs a fixed number of steps, so at their
# defaults they return inaccurate values; comparing costs at equal accuracy needs
# the sweep. Only the successful setting's products and time are counted (a user
# would pay for the failed ones too), which flatters the peer.

PYHESSIAN_SWEEP = [(1e-4, 1000), (1e-5, 1000), (1e-6, 1000), (1e-7, 2000)]
EIGENTHINGS_SWEEP = [4, 8, 16, 32]  # max_iter = factor * k, full reorthogonalisation


def run_ours(model, data, k, tol, seed, verify=True):
    device = device_of(model, data)
    synchronize(device)
    t0 = time.perf_counter()
    bare = isinstance(model, LinearOperator)
    op = model if bare else HessianOperator(model, nn.CrossEntropyLoss(), data)
    res = top_eigenpairs(op, k, tol=tol, seed=seed, verify=verify)
    synchronize(device)
    secs = time.perf_counter() - t0
    if not bare:
        op.release()
    how = f"verify={verify}"
    if verify and not res.verified:
        how += " (not verified)"
    return res.eigenvalues.tolist(), res.n_matvec, secs, how


def run_ours_unchecked(model, data, k, tol, seed):
    """Without the skip check: what the check costs, and what it catches."""
    return run_ours(model, data, k, tol, seed, verify=False)


def _pyhessian(model, data, k, tol, seed, max_iter):
    if isinstance(model, LinearOperator):
        raise NotApplicable("PyHessian needs a model")
    import pyhessian.hessian  # noqa: F401  (the package re-exports the class)

    ph = sys.modules["pyhessian.hessian"]

    counter = [0]
    orig = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter[0] += 1
        return orig(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        m = copy.deepcopy(model)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        H = ph.hessian(m, nn.CrossEntropyLoss(), data=data, cuda=False)
        vals, _ = H.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        secs = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = orig
    return vals, counter[0], secs


def run_pyhessian(model, data, k, tol, seed):
    vals, n, secs = _pyhessian(model, data, k, tol, seed, 100)
    return vals, n, secs, f"tol={tol:g}, maxIter=100"


def _sweep(settings, run, ref, k):
    """Run ``run(s)`` for each setting until one meets the accuracy bar.

    Returns ``(vals, n, secs, s, reached)`` for that setting, or for the last one
    with ``reached=False`` when none does.
    """
    for s in settings:
        vals, n, secs = run(s)
        err, missed = score(vals, ref, k)
        if err <= MATCH_RTOL and missed == 0:
            return vals, n, secs, s, True
    return vals, n, secs, s, False


def run_pyhessian_acc(model, data, k, tol, seed, ref):
    vals, n, secs, (ptol, max_iter), reached = _sweep(
        PYHESSIAN_SWEEP, lambda s: _pyhessian(model, data, k, s[0], seed, s[1]), ref, k
    )
    note = f"tol={ptol:g}, maxIter={max_iter}"
    return vals, n, secs, note if reached else f"{note}: bar not reached"


def _eigenthings(model, data, k, tol, seed, max_iter):
    if isinstance(model, LinearOperator):
        raise NotApplicable("hessian-eigenthings needs a model")
    import hessian_eigenthings as he

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    op = he.HessianOperator(m, [data], he.supervised_loss(nn.CrossEntropyLoss()))
    counter = [0]
    orig = op.matvec

    def counted(v):
        counter[0] += 1
        return orig(v)

    op.matvec = counted
    kw = {} if max_iter is None else {"max_iter": max_iter, "reorthogonalize": True}
    res = he.lanczos(op, k=k, tol=tol, which="LA", seed=seed, **kw)
    secs = time.perf_counter() - t0
    return res.eigenvalues.tolist(), counter[0], secs


def run_eigenthings(model, data, k, tol, seed):
    vals, n, secs = _eigenthings(model, data, k, tol, seed, None)
    return vals, n, secs, "defaults (max_iter=2k)"


def run_eigenthings_acc(model, data, k, tol, seed, ref):
    if isinstance(model, LinearOperator):
        raise NotApplicable("hessian-eigenthings needs a model")
    P = n_params(model)
    vals, n, secs, max_iter, reached = _sweep(
        [min(f * k, P - 1) for f in EIGENTHINGS_SWEEP],
        lambda m: _eigenthings(model, data, k, tol, seed, m),
        ref,
        k,
    )
    if not reached:
        return vals, n, secs, f"max_iter={max_iter}: bar not reached"
    return vals, n, secs, f"max_iter={max_iter}, reorthogonalize"


def run_eigsh_dense(A, k, tol, seed):
    """scipy ``eigsh`` on a bare operator's matrix, counting products."""
    from scipy.sparse.linalg import LinearOperator as SciOp
    from scipy.sparse.linalg import eigsh

    M = A.matrix.numpy()
    counter = [0]

    def mv(x):
        x = np.asarray(x)
        counter[0] += 1 if x.ndim == 1 else x.shape[1]
        return M @ x

    t0 = time.perf_counter()
    L = SciOp(M.shape, matvec=mv, matmat=mv, dtype=M.dtype)
    v0 = np.random.default_rng(seed).standard_normal(M.shape[0]).astype(M.dtype)
    vals = eigsh(L, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    secs = time.perf_counter() - t0
    return sorted(vals.tolist(), reverse=True), counter[0], secs, "scipy eigsh defaults"


def run_curvlinops(model, data, k, tol, seed):
    if isinstance(model, LinearOperator):
        return run_eigsh_dense(model, k, tol, seed)
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator as SciOp
    from scipy.sparse.linalg import eigsh

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    params = [p for p in m.parameters() if p.requires_grad]
    H = HessianLinearOperator(
        m, nn.CrossEntropyLoss(), params, [data], check_deterministic=False
    ).to_scipy()
    counter = [0]

    def mv(x):
        x = np.asarray(x)
        counter[0] += 1 if x.ndim == 1 else x.shape[1]
        return H @ x

    L = SciOp(H.shape, matvec=mv, matmat=mv, dtype=np.float32)
    v0 = np.random.default_rng(seed).standard_normal(H.shape[0]).astype(np.float32)
    vals = eigsh(L, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    secs = time.perf_counter() - t0
    return sorted(vals.tolist(), reverse=True), counter[0], secs, "eigsh defaults"


TOOLS = {
    "geoopt_sgd": run_ours,
    "geoopt_sgd_unchecked": run_ours_unchecked,
    "pyhessian": run_pyhessian,
    "pyhessian@acc": run_pyhessian_acc,
    "hessian_eigenthings": run_eigenthings,
    "hessian_eigenthings@acc": run_eigenthings_acc,
    "curvlinops_eigsh": run_curvlinops,
}
NEEDS_REF = {"pyhessian@acc", "hessian_eigenthings@acc"}


# --- HVP cost in gradient-equivalents -----------------------------------------


def hvp_cost(model, data, reps):
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    X, y = data

    def grad_once():
        return torch.autograd.grad(loss_fn(model(X), y), params)

    device = X.device
    grad_once()
    op = HessianOperator(model, loss_fn, data)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=g, device="cpu").to(device)
    synchronize(device)
    t0 = time.perf_counter()
    op.matvec(v)  # builds and caches the first-order graph
    synchronize(device)
    t_first = time.perf_counter() - t0
    # interleave gradients and HVPs and take medians, so that load from other
    # processes hits both alike
    tg, th = [], []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        grad_once()
        synchronize(device)
        tg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        op.matvec(v)
        synchronize(device)
        th.append(time.perf_counter() - t0)
    t_grad, t_hvp = float(np.median(tg)), float(np.median(th))
    method = op.method_used
    op.release()
    return {
        "grad_seconds": t_grad,
        "hvp_seconds_reused_graph": t_hvp,
        "hvp_seconds_first": t_first,
        "hvp_in_gradients": t_hvp / t_grad,
        "method": method,
    }


# --- main --------------------------------------------------------------------

MODELS = ("mlp", "cnn", "digits", "clustered")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small MLP + timm test_resnet (seconds-minutes)",
    )
    ap.add_argument(
        "--ks",
        type=positive(int),
        nargs="+",
        default=[5, 20],
        help="numbers of eigenvalues",
    )
    ap.add_argument(
        "--tol",
        type=positive(float),
        default=1e-3,
        help="tolerance passed to every tool",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        default=["mlp", "cnn"],
        choices=MODELS,
        metavar="MODEL",
        help=f"any of {', '.join(MODELS)}",
    )
    ap.add_argument(
        "--tools",
        nargs="+",
        default=list(TOOLS),
        choices=list(TOOLS),
        metavar="TOOL",
        help=f"subset of {list(TOOLS)}",
    )
    ap.add_argument(
        "--hvp-reps",
        type=positive(int),
        default=5,
        help="repetitions for the HVP cost",
    )
    ap.add_argument(
        "--seeds",
        type=positive(int),
        default=5,
        help="start vectors per tool (HVPs and seconds are their means; errors "
        "the max, missed the total)",
    )
    add_device_argument(
        ap,
        "'cpu' (measured) or 'cuda' (our tools on a GPU; the peers are "
        "skipped there; not measured in benchmarks/README.md)",
    )
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "curvature.json"),
    )
    args = ap.parse_args(argv)

    results = {"config": vars(args), "env": environment(args.device), "problems": []}
    for which in args.models:
        # built on the CPU whatever the default device (the same draws and the
        # same digits training on every device), then moved to --device
        with torch.device("cpu"):
            if which == "mlp":
                model, data = make_mlp(args.quick)
                name = "mlp"
            elif which == "digits":
                model, data = make_digits()
                name = "digits"
            elif which == "clustered":
                model, spectrum = make_clustered(args.tol)
                data, name = None, "clustered"
            else:
                model, data, name = make_cnn(args.quick)
        model, data = to_device(model, data, args.device)
        P = n_params(model)
        batch = None if data is None else int(data[1].shape[0])
        print(f"\n== {name}: P = {P:,}, batch {batch} ==", flush=True)
        t0 = time.perf_counter()
        if data is None:
            ref, ref_how = spectrum[: max(args.ks) + 10].tolist(), "constructed"
        else:
            ref, ref_how = reference(model, data, max(args.ks), args.quick)
        print(
            f"reference ({ref_how}) in {time.perf_counter() - t0:.1f}s: "
            f"top {ref[:3]} ...",
            flush=True,
        )
        r = np.asarray(ref[:26])
        gaps = (r[:-1] - r[1:]) / np.abs(r[:-1])
        print(
            "relative gaps (l_i - l_i+1) / l_i, i = 1..25:\n"
            + "\n".join(
                f"  {i + 1:2d}  {r[i]:.6g}  {g:.2e}" for i, g in enumerate(gaps)
            ),
            flush=True,
        )
        prob = {
            "model": name,
            "P": P,
            "batch": batch,
            "reference": ref,
            "reference_how": ref_how,
            "relative_gaps": gaps.tolist(),
        }
        if data is not None:
            prob["hvp_cost"] = cost = hvp_cost(model, data, args.hvp_reps)
            print(
                f"HVP cost: {prob['hvp_cost']['hvp_in_gradients']:.2f} gradients "
                f"(reused graph, {prob['hvp_cost']['method']}); first HVP "
                f"{cost['hvp_seconds_first'] / cost['grad_seconds']:.2f}",
                flush=True,
            )
        prob["runs"] = []
        for k in args.ks:
            print(
                f"{'tool':24s} {'k':>3s} {'HVPs':>7s} {'seconds':>9s} "
                f"{'max rel err':>12s} {'missed':>6s}  setting"
            )
            for tool in args.tools:
                row = {"tool": tool, "k": k, "seeds": []}
                if off_device(tool, args.device):
                    row["not_applicable"] = off_device(tool, args.device)
                for seed in range(0 if "not_applicable" in row else args.seeds):
                    try:
                        extra = (ref,) if tool in NEEDS_REF else ()
                        vals, n_hvp, secs, how = TOOLS[tool](
                            model, data, k, args.tol, seed, *extra
                        )
                        err, missed = score(vals, ref, k)
                        row["seeds"].append(
                            dict(
                                seed=seed,
                                n_hvp=n_hvp,
                                seconds=secs,
                                max_rel_err=err,
                                missed=missed,
                                setting=how,
                                values=vals,
                            )
                        )
                    except NotApplicable as e:
                        row["not_applicable"] = str(e)
                        break
                    except ImportError as e:  # a peer that is not installed
                        row["not_installed"] = (
                            f"{e.name or e} is not installed "
                            "(pip install -e '.[bench]')"
                        )
                        break
                    except Exception as e:  # a peer tool crashing is a result
                        row.update(
                            crashed=f"{type(e).__name__}: {e}",
                            trace=traceback.format_exc(limit=3),
                        )
                        break
                if "not_applicable" in row:
                    print(f"{tool:24s} {k:3d} skipped: {row['not_applicable']}")
                elif "not_installed" in row:
                    print(f"{tool:24s} {k:3d} skipped: {row['not_installed']}")
                elif "crashed" in row:
                    print(f"{tool:24s} {k:3d} crashed: {row['crashed']}", flush=True)
                else:
                    runs = row["seeds"]
                    row.update(
                        n_hvp=float(np.mean([r["n_hvp"] for r in runs])),
                        seconds=float(np.mean([r["seconds"] for r in runs])),
                        max_rel_err=max(r["max_rel_err"] for r in runs),
                        missed=sum(r["missed"] for r in runs),
                        settings=sorted({r["setting"] for r in runs}),
                    )
                    print(
                        f"{tool:24s} {k:3d} {row['n_hvp']:7.1f} {row['seconds']:9.2f} "
                        f"{row['max_rel_err']:12.2e} {row['missed']:6d}  "
                        f"{'; '.join(row['settings'])}",
                        flush=True,
                    )
                prob["runs"].append(row)
            ours = next(
                (
                    r
                    for r in prob["runs"]
                    if r["tool"] == "geoopt_sgd" and r["k"] == k and "n_hvp" in r
                ),
                None,
            )
            if ours:
                for r in prob["runs"]:
                    if r["k"] == k and r["tool"] != "geoopt_sgd" and "n_hvp" in r:
                        r["hvp_ratio_vs_ours"] = r["n_hvp"] / ours["n_hvp"]
                        r["time_ratio_vs_ours"] = r["seconds"] / ours["seconds"]
                        print(
                            f"  {r['tool']}/ours: HVPs x{r['hvp_ratio_vs_ours']:.2f}, "
                            f"time x{r['time_ratio_vs_ours']:.2f}",
                            flush=True,
                        )
        results["problems"].append(prob)
    results["env"]["load_average_end"] = load_average()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
