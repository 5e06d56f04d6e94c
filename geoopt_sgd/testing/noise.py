"""Dense float64 references for per-sample gradients, gradient covariances and metrics.

Everything here forms explicit ``P x P`` matrices (covariances, GGN, Hessian) and loops
over samples: for tests and checks on small models only. The conventions are those of
:func:`geoopt_sgd.noise_geometry` (``docs/science/conventions.md``): every loss is used
as given on a batch of one (``nn.MSELoss`` included: ``L_i = (1/K) ||f(x_i) -
y_i||^2``), ``L`` is the mean over samples, and ``Sigma`` uses ``1/n``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from .._model import _mode_policy, _policy_functions

__all__ = [
    "dense_curvature",
    "dense_metrics",
    "gradient_covariance",
    "per_sample_gradients_loop",
]


def _sample_loss(loss_fn: Callable[..., Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda out, y: loss_fn(out.unsqueeze(0), y.unsqueeze(0)).reshape(())


def _setup(model: nn.Module, mode: str) -> tuple[list[str], list[Tensor], dict]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [
        p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    ]
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    return names, params, bufs


class _Policy:
    # the package's mode policy (which modules and functions are switched off),
    # so the references measure the same function; the computation is theirs
    def __init__(self, model: nn.Module, mode: str) -> None:
        self.stack = contextlib.ExitStack()
        self.model, self.mode = model, mode

    def __enter__(self) -> None:
        self.stack.enter_context(_mode_policy(self.model, self.mode))
        self.stack.enter_context(_policy_functions(self.model, self.mode))

    def __exit__(self, *exc: Any) -> None:
        self.stack.__exit__(*exc)


def per_sample_gradients_loop(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    mode: Literal["eval", "train"] = "eval",
) -> Tensor:
    """Per-sample gradients by a plain loop of ``N`` backward passes.

    Args:
        model: The model (left untouched: parameters are cloned, buffers cloned).
        loss_fn: The loss.
        inputs: Inputs ``(N, ...)``.
        targets: Targets ``(N, ...)``.
        mode: ``"eval"``: one forward/backward per single sample; ``"train"``: one
            batch forward (batch statistics), then one backward per sample's loss.

    Returns:
        ``(N, P)`` float tensor (the parameters' dtype).
    """
    ell = _sample_loss(loss_fn)
    names, params, bufs = _setup(model, mode)
    ps = [p.requires_grad_(True) for p in params]
    rows = []
    with _Policy(model, mode):
        N = int(targets.shape[0])
        if mode == "train":
            values = {**dict(zip(names, ps, strict=True)), **bufs}
            out = functional_call(model, (values,), (inputs,))
            for i in range(N):
                g = torch.autograd.grad(ell(out[i], targets[i]), ps, retain_graph=True)
                rows.append(torch.cat([t.reshape(-1) for t in g]))
        else:
            for i in range(N):
                values = {**dict(zip(names, ps, strict=True)), **bufs}
                out = functional_call(model, (values,), (inputs[i : i + 1],))
                g = torch.autograd.grad(ell(out[0], targets[i]), ps)
                rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows).detach()


def gradient_covariance(
    per_sample: Tensor, *, batch_size: int | None = None
) -> dict[str, Tensor]:
    """Explicit second moment, outer product of the mean, and covariance.

    Args:
        per_sample: ``(N, P)`` per-sample gradients.
        batch_size: ``None`` for the per-sample covariance; ``B`` for the
            mini-batch covariance over the ``N // B`` consecutive disjoint batches
            (a trailing partial batch is dropped), ``C ~ Sigma / B``.

    Returns:
        Dict with ``"sigma1"`` ``(1/M) R^T R``, ``"sigma2"`` ``rbar rbar^T``,
        ``"sigma"`` their difference, ``"rows"`` ``R`` ``(M, P)`` (the per-sample or
        per-batch mean gradients) and ``"mean"`` ``rbar`` ``(P,)``.
    """
    D = per_sample.to(torch.float64)
    if batch_size is None:
        R = D
    else:
        M = D.shape[0] // batch_size
        R = D[: M * batch_size].reshape(M, batch_size, -1).mean(1)
    rbar = R.mean(0)
    s1 = R.T @ R / R.shape[0]
    s2 = torch.outer(rbar, rbar)
    return {"sigma1": s1, "sigma2": s2, "sigma": s1 - s2, "rows": R, "mean": rbar}


def dense_curvature(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    kind: Literal["ggn", "hessian"] = "ggn",
    mode: Literal["eval", "train"] = "eval",
) -> Tensor:
    """Explicit GGN ``(1/n) sum J_i^T Lambda_i J_i`` or Hessian of the mean loss.

    Args:
        model: The model.
        loss_fn: The loss, used as given on a batch of one.
        inputs: Inputs ``(N, ...)``.
        targets: Targets ``(N, ...)``.
        kind: ``"ggn"`` or ``"hessian"``.
        mode: Mode policy, as in the library.

    Returns:
        ``(P, P)`` float64 matrix.
    """
    ell = _sample_loss(loss_fn)
    names, params, bufs = _setup(model, mode)
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.reshape(-1) for p in params])

    def split(v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def outputs(v: Tensor) -> Tensor:
        fresh = {k: b.clone() for k, b in bufs.items()}  # train-mode BN writes them
        return functional_call(model, ({**split(v), **fresh},), (inputs,))

    with _Policy(model, mode):
        if kind == "hessian":

            def mean_loss(v: Tensor) -> Tensor:
                out = outputs(v)
                return torch.stack(
                    [ell(out[i], targets[i]) for i in range(len(out))]
                ).mean()

            # plain autograd double backward: torch.func's nested transforms
            # (jacfwd(jacrev) and jacrev(jacrev)) return a non-symmetric, wrong
            # Hessian through train-mode batch_norm here (cf. pytorch#196699)
            return torch.autograd.functional.hessian(mean_loss, flat0).detach()
        out = outputs(flat0).detach()
        N = out.shape[0]
        J = jacrev(lambda v: outputs(v).reshape(N, -1))(flat0).detach()  # (N, K, P)
        G = flat0.new_zeros(flat0.numel(), flat0.numel())
        for i in range(N):
            lam = hessian(lambda o, i=i: ell(o.reshape(out[i].shape), targets[i]))(
                out[i].reshape(-1)
            )
            G += J[i].T @ lam @ J[i]
        return G / N


def _fro(A: Tensor) -> float:
    return float((A * A).sum().sqrt())


def _linregress(x: Tensor, y: Tensor) -> tuple[float, float]:
    xm, ym = x - x.mean(), y - y.mean()
    slope = float((xm * ym).sum() / (xm * xm).sum())
    r = float((xm * ym).sum() / ((xm * xm).sum() * (ym * ym).sum()).sqrt())
    return slope, r * r


def dense_metrics(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    k: int = 3,
    curvature: Literal["ggn", "hessian"] = "ggn",
    batch_size: int | None = None,
    mode: Literal["eval", "train"] = "eval",
    eigenvalues: Tensor | None = None,
    eigenvectors: Tensor | None = None,
    random_directions: Tensor | None = None,
    rotations: Sequence[Tensor] | None = None,
    displacement: Tensor | None = None,
) -> dict[str, Any]:
    """Every metric of :func:`geoopt_sgd.noise_geometry` from explicit matrices.

    Args:
        model: The model (float64 recommended).
        loss_fn: The loss.
        inputs: Inputs ``(N, ...)``.
        targets: Targets ``(N, ...)``.
        k: Number of top eigenpairs of the curvature.
        curvature: Matrix ``C`` used for the mu-type metrics, ``Tr(C Sigma)`` and the
            eigenbasis: ``"ggn"`` or ``"hessian"``.
        batch_size: ``None`` (per-sample ``Sigma``) or ``B`` (mini-batch ``C``).
        mode: Mode policy.
        eigenvalues: Use these ``(k,)`` instead of ``eigh`` (e.g. the library's).
        eigenvectors: Use these ``(P, k)`` instead of ``eigh``.
        random_directions: ``(P, r)`` directions for the random directional
            alignment (normalised here).
        rotations: ``(k, k)`` orthogonal matrices for the commutativity baseline.
        displacement: ``(P,)`` for the escape-direction decomposition.

    Returns:
        Dict of scalars (floats) and arrays (float64 tensors), keyed as
        :data:`geoopt_sgd.probes.metrics.METRICS`, plus ``"eigenvalues"``,
        ``"eigenvectors"``, ``"direction_shares"`` and ``"loss_shares"``.
    """
    nan = math.nan
    D = per_sample_gradients_loop(model, loss_fn, inputs, targets, mode=mode)
    cov = gradient_covariance(D, batch_size=batch_size)
    S, S1, S2 = cov["sigma"], cov["sigma1"], cov["sigma2"]
    G = dense_curvature(model, loss_fn, inputs, targets, kind="ggn", mode=mode)
    H = dense_curvature(model, loss_fn, inputs, targets, kind="hessian", mode=mode)
    Cm = G if curvature == "ggn" else H
    P = Cm.shape[0]
    ell = _sample_loss(loss_fn)
    with torch.no_grad(), _Policy(model, mode):
        names, params, bufs = _setup(model, mode)
        values = {**dict(zip(names, params, strict=True)), **bufs}
        out = functional_call(model, (values,), (inputs,))
        L = float(
            torch.stack([ell(out[i], targets[i]) for i in range(len(out))]).mean()
        )
    v: dict[str, Any] = {"loss": L}
    trS, froS = float(torch.trace(S)), _fro(S)

    def mus(A: Tensor) -> tuple[float, float, float, float, float, float]:
        froA = _fro(A)
        t, t1, t2 = (float((X * A).sum()) for X in (S, S1, S2))
        return (
            t / (froA * froS),
            froS / (2 * L * froA),
            t / (2 * L * froA**2),
            t1 / (2 * L * froA**2),
            t2 / (2 * L * froA**2),
            t,
        )

    v["alpha"], v["beta"], v["mu"], v["mu1"], v["mu2"], v["tr_h_sigma"] = mus(Cm)
    v["loss_alignment"] = v["mu1"]
    v["mu_hessian"] = mus(H)[2]
    v["tr_sigma"] = trS
    v["tr_h_sigma_iso"] = float(torch.trace(Cm)) * trS / P
    # norm uniformity chi_i = Tr(M_i G M_i^T) = Tr(Lambda_i J_i G J_i^T)
    names, params, bufs = _setup(model, mode)
    flat0 = torch.cat([p.reshape(-1) for p in params])
    shapes = [p.shape for p in params]

    def outputs(vv: Tensor) -> Tensor:
        d, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            d[n] = vv[i : i + s.numel()].reshape(s)
            i += s.numel()
        fresh = {k: b.clone() for k, b in bufs.items()}
        return functional_call(model, ({**d, **fresh},), (inputs,))

    with _Policy(model, mode):
        N = out.shape[0]
        J = jacrev(lambda vv: outputs(vv).reshape(N, -1))(flat0).detach()
        chi = []
        for i in range(N):
            lam = hessian(lambda o, i=i: ell(o.reshape(out[i].shape), targets[i]))(
                out[i].reshape(-1).detach()
            )
            chi.append(float(torch.trace(lam @ J[i] @ G @ J[i].T)))
    chi_t = torch.tensor(chi, dtype=torch.float64, device="cpu")
    v["gradient_uniformity"] = float(chi_t.min() / chi_t.mean())
    # eigenbasis
    if eigenvectors is None:
        e, Q = torch.linalg.eigh(Cm)
        lam_k, U = e.flip(0)[:k], Q.flip(1)[:, :k]
    else:
        U = eigenvectors.to(torch.float64)
        lam_k = eigenvalues.to(torch.float64) if eigenvalues is not None else None
        if lam_k is None:
            lam_k = torch.diagonal(U.T @ Cm @ U)
    Ct = U.T @ S @ U
    diag = torch.diagonal(Ct)
    quad = torch.diagonal(U.T @ Cm @ U)
    v["noise_energies"] = diag.clone()
    v["directional_alignment"] = diag / (2 * L * quad)
    if random_directions is not None:
        R = random_directions.to(torch.float64)
        R = R / R.norm(dim=0, keepdim=True)
        ga = torch.diagonal(R.T @ S @ R) / (2 * L * torch.diagonal(R.T @ Cm @ R))
        v["directional_alignment_random"] = float(ga.mean())
    v["projection_coefficient"] = float(diag[0] * torch.trace(Cm) / (lam_k[0] * trS))
    mask = (lam_k > 0) & (diag > 0)
    if int(mask.sum()) >= 2:
        x, y = lam_k[mask].log10(), diag[mask].log10()
        v["power_law_exponent"], v["power_law_r2"] = _linregress(x, y)
        rx = torch.argsort(torch.argsort(lam_k[mask])).double()
        ry = torch.argsort(torch.argsort(diag[mask])).double()
        v["spearman"] = _linregress(rx, ry)[1] ** 0.5 * (
            1.0 if _linregress(rx, ry)[0] >= 0 else -1.0
        )
    else:
        v["power_law_exponent"] = v["power_law_r2"] = v["spearman"] = nan
    v["eigen_alignment"] = float((diag * diag).sum() / (Ct * Ct).sum())
    Lam = torch.diag(lam_k)
    v["commutativity_error"] = _fro(Ct @ Lam - Lam @ Ct) / _fro(Ct @ Lam)
    if rotations is not None:
        vals = []
        for Qr in rotations:
            Hq = Qr @ Lam @ Qr.T
            vals.append(_fro(Ct @ Hq - Hq @ Ct) / _fro(Ct @ Hq))
        v["commutativity_baseline"] = sum(vals) / len(vals)
    if displacement is not None:
        d = displacement.to(torch.float64)
        c = U.T @ d
        dd = float(d @ d)
        v["sharp_fraction"] = float(c @ c) / dd
        v["direction_shares"] = c * c / dd
        lc = lam_k * c * c
        v["loss_shares"] = lc / lc.sum()
        v["loss_energy_fraction"] = float(lc.sum() / (d @ Cm @ d))
    v["eigenvalues"], v["eigenvectors"] = lam_k, U
    return v
