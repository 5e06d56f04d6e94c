"""How GD and SGD leave a GD-stable minimum (SPEC R7 + R10; WWS22 Fig. 4, WW23).

Train with full-batch GD to a minimum θ* that GD is stable at (``train_lr·λ_1 < 2``),
compute the top-K Hessian eigenpairs there, then start many short runs from θ*:

* **SGD** at ``η = lr_factor·2/λ_1`` (GD-stable) and batch ``B``: noise-driven
  escape. WWS22 Thm 3.5 predicts ``E L_t ≥ γ_0^t L(θ*)`` with
  ``γ_0 = η² μ_0 ‖H‖_F² / B`` (``μ_0`` = μ at θ*, ``‖H‖_F²`` by Hutchinson; the
  factor ``(n−B)/(n−1)`` of sampling without replacement is included).
* **control**: SGD at the same η with a larger batch, ``γ_0 < 1``: no escape.
* **gd_unstable** / **sgd_unstable**: GD and SGD at ``η' = unstable_factor·2/λ_1``
  from ``θ* + perturbation·N(0, I)``: lr-driven escape, along ``u_1`` for GD.
* **NoisyGD** arms (``noisy_kinds``) at η, matched to SGD's noise at batch B:
  isotropic, Hessian top-k, and Gaussian with SGD's exact covariance.

Tracked per step (SPEC §2.6): the loss, the sharp fraction
``ρ_k = ‖U_kᵀδ‖²/‖δ‖²`` (``δ = θ_t − θ*``), per-direction shares
``s_j = (u_jᵀδ)²/‖δ‖²`` and loss shares ``ℓ_j = λ_j(u_jᵀδ)²/Σ_i λ_i(u_iᵀδ)²``,
with the §2.6 Perron profile ``m_j ∝ g_jλ_j/(r* − (1−ηλ_j)²)`` (``g_j``: WW23
directional alignment on ``u_j``; the bulk beyond K enters the growth-rate equation
as ``μ_0(‖H‖_F² − Σ_j λ_j²)/(r* − 1)``) overlaid. A run has escaped when
``L ≥ escape_factor·L(θ*)`` or ``‖δ‖ ≥ escape_distance·‖θ*‖``; shares are read at
that step.

Verdict: θ* is GD-stable; GD at η' escapes along u_1 (``ρ_1 ≥ 0.9``); SGD's
displacement lies largely outside the top directions (``ρ_20 ≤ 0.5``); with
``γ_0 > 1`` SGD escapes and its mean loss grows by a factor within ×2 of ``γ_0`` per
step early on; the ``γ_0 < 1`` control does not escape.

Setting, and why (tuned on 2 CPU cores): the R5 FCN (``mlp``: 64 → 64 → 64 → 1,
tanh, float64) on 256 digits with **even/odd ±1 targets and MSE** (the square-loss
setting of WWS22/WW23), inputs **ZCA-whitened**. Two measured reasons:

* With 10 one-hot outputs the top ~9 Hessian eigenvalues are nearly equal (class
  outliers, λ_2/λ_1 ≈ 0.99), so GD at 1.1·2/λ_1 is unstable along several
  directions and ``ρ_1`` stays far below 0.9. One output gives a gap.
* Raw digits have a low effective input dimension: the top-20 Hessian eigenvalues
  hold ~90% of Tr H, and the Perron profile then puts ``ρ_20 ≈ 0.85`` for every B.
  Whitening spreads the spectrum (top-20 ≈ 43% of Tr H), the high-dimensional
  regime WW23's claim is about.
* No timm ``test_*`` model passes every row robustly yet, so the default is the
  paper model. The closest (measured on 1 thread, quick setting): ``test_vit`` as a
  one-token residual MLP, ``--model test_vit --model-kwargs
  img_size=8,patch_size=8,class_token=False,global_pool=avg,weight_init=jax,depth=2
  --train-lr 0.03 --train-steps 3000`` (88k parameters, float64, zero-initialised
  head; ~100 s). GD reaches ``L(θ*) ≈ 1e-8`` and the GD row passes
  (``ρ_1 = 0.998``), but ``ρ_20`` sits at the threshold: 0.485 / 0.521 / 0.494 for
  seeds 0 / 1 / 2 (0.54, 0.55 at ``B`` = 10, 20); seed 1 also has ``μ_0 = 0.18``
  (``γ_0 = 0.25`` against a measured growth of 1.44). Its top spectrum falls
  faster than the MLP's (``λ_20/λ_1 ≈ 0.29`` against 0.65). ``embed_dim=128,
  depth=1`` flattens it (0.44) but gives ``ρ_20`` = 0.53 / 0.52 at ``B`` = 16 / 24. With
  ``train_lr = 0.05`` GD ends at its edge of stability (``λ_2/λ_1 = 0.996``) and
  ``ρ_1`` drops to 0.69. More samples (``--num-train`` 384 / 512) do not help:
  GD stops at ``L(θ*) ≈ 1e-6`` (512 needs 6000 steps, 216 s), ``ρ_20`` is
  0.45–0.54 and ``γ_0 < 1`` in 4 of 5 runs (``μ_0`` 0.42–0.85) while the loss grows
  1.5–2.3× per step. ``test_efficientnet_gn`` stalls at the constant
  predictor; ``pre_lr``/``pre_steps`` add a first GD stage for slow models.
  ``final_norm=False`` and ``embed_dim=128`` raise ``ρ_20`` (0.52–0.58);
  ``patch_size=4`` (4 tokens) gives ``ρ_20 ≈ 0.18`` only in runs that never escape
  (``γ_0`` 0.4–0.5 at ``B = 16``); at ``B = 5`` SGD escapes and ``ρ_20`` is
  0.57–0.63 (recipes/README.md).
  A screen of 14 timm settings (exact kernel spectrum at θ*, recipes/README.md)
  finds 52–62% of Tr H in the top 20 eigenvalues for the ViTs (the MLP: 43%;
  ``test_byobnet``: 93%), and the Perron profile then predicts ``ρ_20`` 0.43–0.57.
* ``B = 16`` gives ``γ_0 ≈ 3``, a fast escape with ``ρ_20 ≈ 0.41``; the control
  ``B = 128`` gives ``γ_0 ≈ 0.2``.
* Escape is read at ``L ≥ 10⁴·L(θ*)``, not the SPEC's proposed 100×: θ* is not an
  exact fixed point, and GD at η' first keeps descending along the flat directions
  where the residual loss sits. That drift is of size ``√(L*/λ_flat)`` and at
  100·L* it is as large as the u_1 component (ρ_1 ≈ 0.5, measured); at 10⁴·L* the
  u_1 growth dominates. The start perturbation is ``1e-8`` (SPEC: ``1e-6``,
  proposed) so that it stays far below the displacement at escape
  (``1e-16·P ≈ 1e-12`` against ``2·10⁴·L*/λ_1 ≈ 1e-6``).

Commands (outputs under ``<out-dir>/escape_direction/``)::

    python recipes/escape_direction.py --quick   # CI setting, ~1 min on 2 CPU cores
    python recipes/escape_direction.py           # full: 20 runs per arm, K = 50
    python recipes/escape_direction.py --resume  # continue an interrupted run

Expected: every verdict row PASS; ``escape_loss.png`` shows straight lines on the
log axis for SGD and flat curves for the control; ``escape_direction.png`` shows
``ρ_1 → 1`` for GD and ``ρ_20 < 0.5`` for SGD.
"""

from __future__ import annotations

import ast
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import Tensor, nn

from geoopt_sgd import (
    HessianOperator,
    NoisyGD,
    noise_geometry,
    squared_frobenius,
    top_eigenpairs,
)

RECIPE = "escape_direction"
TARGETS = ("parity", "onehot")
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class Config:
    # model and data
    model: str = "mlp"  # 'mlp' (R5 FCN), 'cnn', 'linear' or a timm name
    model_kwargs: tuple[str, ...] = ()  # extra timm.create_model args, 'key=value'
    width: int = 64  # hidden width (mlp) or channels (cnn)
    depth: int = 2  # hidden layers of the mlp
    activation: str = "tanh"  # 'tanh' or 'relu' (mlp)
    dataset: str = "digits"  # 'digits' (offline), 'mnist', 'fashion_mnist', 'cifar10'
    data_dir: str | None = None  # where torchvision datasets live
    download: bool = False  # download a missing torchvision dataset
    num_train: int = 256  # training samples n; the loss L is their mean
    image_size: int = 8  # input side for image models (digits are 8x8)
    whiten: bool = True  # ZCA-whiten the inputs (high effective dimension)
    target: str = "parity"  # 'parity' (even/odd -> +-1, one output) or 'onehot'
    dtype: str = "float64"  # 'float64' or 'float32'
    # phase 1: full-batch GD to theta*
    pre_lr: float | None = None  # GD lr of a first stage (None: no first stage)
    pre_steps: int = 0  # GD steps of the first stage, before the train_lr steps
    train_lr: float = 0.1  # GD lr of the final stage; theta* is GD-stable at it
    train_steps: int = 2000  # GD steps at train_lr (after the pre_steps)
    checkpoint_every: int = 200  # training steps between checkpoints
    # phase 2: curvature and noise at theta*
    num_eigs: int = 50  # K: top Hessian eigenpairs at theta*
    ks: tuple[int, ...] = (1, 5, 20, 50)  # k of the sharp fractions rho_k (<= K)
    trace_probes: int = 50  # Hutchinson probes for ||H||_F^2
    # phase 3: escape runs from theta*
    lr_factor: float = 0.9  # eta = lr_factor * 2/lambda_1 (< 1: GD-stable)
    unstable_factor: float = 1.1  # eta' = unstable_factor * 2/lambda_1 (> 1)
    batch_size: int = 16  # B of the SGD arms (gamma_0 > 1)
    control_batch_size: int = 128  # B of the control arm (gamma_0 < 1)
    runs: int = 20  # runs of each SGD arm
    gd_runs: int = 3  # runs of the GD arm (differ only in the perturbation)
    noisy_runs: int = 5  # runs of each NoisyGD arm
    noisy_kinds: tuple[str, ...] = ("isotropic_matched", "hessian", "sgd_matched")
    max_steps: int = 100  # steps of each run
    stop_loss: float = 1.0  # stop a run once L exceeds this (high-loss region)
    escape_factor: float = 1e4  # escaped when L >= escape_factor * L(theta*)
    escape_distance: float = 0.1  # ... or ||delta|| >= escape_distance * ||theta*||
    perturbation: float = 1e-8  # std of the start perturbation of the eta' arms
    growth_steps: int = 3  # early steps over which the loss growth factor is read
    # run
    seed: int = 0  # seed of the initialisation, the data split and every run
    device: str = "cpu"  # 'cpu' or 'cuda'
    out_dir: str = "runs"  # outputs go to <out_dir>/escape_direction/
    resume: bool = False  # continue from <out_dir>/escape_direction/checkpoint.pt

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: fewer runs, K = 20, shorter runs."""
        return cls(
            num_eigs=20,
            ks=(1, 5, 20),
            trace_probes=30,
            runs=8,
            gd_runs=2,
            noisy_runs=2,
        )


# ---------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check the config before anything is built or trained.

    Raises:
        ValueError: On the first invalid field.
    """
    common.check_config_basics(cfg)
    if cfg.target not in TARGETS:
        raise ValueError(
            f"`target` must be one of 'parity', 'onehot'; got {cfg.target!r}."
        )
    if cfg.dtype not in DTYPES:
        raise ValueError(
            f"`dtype` must be one of 'float64', 'float32'; got {cfg.dtype!r}."
        )
    if not 0 < cfg.lr_factor < 1:
        raise ValueError(
            f"`lr_factor` must be in (0, 1) (eta < 2/lambda_1: GD-stable); "
            f"got {cfg.lr_factor!r}."
        )
    if not cfg.unstable_factor > 1:
        raise ValueError(f"`unstable_factor` must be > 1; got {cfg.unstable_factor!r}.")
    for name in ("train_steps", "num_eigs", "runs", "max_steps", "growth_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"`{name}` must be >= 1; got {getattr(cfg, name)!r}.")
    for name in (
        "gd_runs",
        "noisy_runs",
        "checkpoint_every",
        "trace_probes",
        "pre_steps",
    ):
        if getattr(cfg, name) < 0:
            raise ValueError(f"`{name}` must be >= 0; got {getattr(cfg, name)!r}.")
    if cfg.pre_steps > 0 and cfg.pre_lr is None:
        raise ValueError(
            f"`pre_lr` must be set when `pre_steps` > 0; got pre_steps="
            f"{cfg.pre_steps!r} and pre_lr=None."
        )
    model_kwargs(cfg)
    if cfg.trace_probes < 2:
        raise ValueError(f"`trace_probes` must be >= 2; got {cfg.trace_probes!r}.")
    if not cfg.ks or min(cfg.ks) < 1 or max(cfg.ks) > cfg.num_eigs:
        raise ValueError(
            f"`ks` must hold values in [1, num_eigs={cfg.num_eigs}]; got {cfg.ks!r}."
        )
    if cfg.num_train < 2:
        raise ValueError(f"`num_train` must be >= 2; got {cfg.num_train!r}.")
    for name in ("batch_size", "control_batch_size"):
        b = getattr(cfg, name)
        if not 1 <= b < cfg.num_train:
            raise ValueError(
                f"`{name}` must be in [1, num_train) = [1, {cfg.num_train}); got {b!r}."
            )
    for name in ("escape_factor", "escape_distance", "perturbation", "stop_loss"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"`{name}` must be > 0; got {getattr(cfg, name)!r}.")
    bad = [k for k in cfg.noisy_kinds if k not in NoisyGD.NOISE_KINDS or k == "none"]
    if bad:
        raise ValueError(
            f"`noisy_kinds` must hold NoisyGD kinds "
            f"({', '.join(repr(k) for k in NoisyGD.NOISE_KINDS if k != 'none')}); "
            f"got {bad[0]!r}."
        )


# ---------------------------------------------------------------------- setup


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Parse ``cfg.model_kwargs`` (``'key=value'``; values as Python literals).

    Raises:
        ValueError: If an entry is not ``key=value`` or the model is not timm's.
    """
    out: dict[str, Any] = {}
    for item in cfg.model_kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(
                f"`model_kwargs` entries must be 'key=value'; got {item!r}."
            )
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word is a string
    if out and cfg.model in common.SMALL_MODELS:
        raise ValueError(
            f"`model_kwargs` are passed to timm.create_model; model {cfg.model!r} "
            "is not a timm model."
        )
    return out


def build(cfg: Config, device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    """Load the data and build the (seeded) model; return model, inputs, targets.

    Raises:
        ValueError: If ``num_eigs`` exceeds the model's parameter count, or the
            timm model rejects ``model_kwargs``.
    """
    dtype = getattr(torch, cfg.dtype)
    flat = common.model_wants_flat(cfg.model)
    data = common.load_data(
        cfg.dataset,
        image_size=cfg.image_size,
        flatten=flat,
        num_train=cfg.num_train,
        num_test=1,
        whiten=cfg.whiten,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=cfg.seed,
        dtype=dtype,
    )
    K = 1 if cfg.target == "parity" else data.num_classes
    try:
        model = common.make_model(
            cfg.model,
            K,
            in_chans=data.in_chans,
            input_dim=data.input_dim,
            image_size=data.image_size,
            width=cfg.width,
            depth=cfg.depth,
            activation=cfg.activation,
            seed=cfg.seed,
            dtype=dtype,
            timm_args=model_kwargs(cfg) or None,
        ).to(device)
    except TypeError as err:  # an argument the timm model does not take
        raise ValueError(f"`model_kwargs` {cfg.model_kwargs!r}: {err}") from None
    # Eval mode throughout: BatchNorm (timm models) is a fixed affine map and dropout
    # is off, so every per-sample loss is a function of theta alone and the
    # dynamics, the Hessian and the noise all refer to the same L (SPEC §2).
    model.eval()
    P = sum(p.numel() for p in model.parameters())
    if cfg.num_eigs > P:
        raise ValueError(
            f"`num_eigs` must be <= the parameter count P = {P}; got {cfg.num_eigs}."
        )
    X = data.x_train.to(device)
    if cfg.target == "parity":
        Y = (1.0 - 2.0 * (data.y_train % 2)).to(dtype).unsqueeze(1)
    else:
        Y = common.make_targets("mse", data.y_train, data.num_classes, dtype)
    return model, X, Y.to(device)


def flat_params(model: nn.Module) -> Tensor:
    """All parameters as one detached vector ``(P,)`` (the operators' order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def set_flat(model: nn.Module, theta: Tensor) -> None:
    """Write the vector ``theta`` ``(P,)`` into the model's parameters."""
    torch.nn.utils.vector_to_parameters(theta, list(model.parameters()))


def full_loss(model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor) -> float:
    """The training loss ``L(θ)`` (mean over all n samples)."""
    with torch.no_grad():
        return float(loss_fn(model(X), Y))


def run_seed(seed: int, arm: int, run: int) -> int:
    """A distinct, order-independent seed for run ``run`` of arm ``arm``."""
    return (seed * 1_000_003 + arm * 10_007 + run) % (2**62)


# ---------------------------------------------------------------------- theory


def perron_profile(
    lam: Tensor, g: Tensor, eta: float, batch: float, bulk: float, mu: float
) -> tuple[float, Tensor]:
    """Solve the §2.6 second-moment recursion for its growth rate and profile.

    ``1 = (η²/B)[Σ_j g_jλ_j²/(r − c_j) + μ·bulk/(r − 1)]`` with
    ``c_j = (1 − ηλ_j)²`` (bulk directions: ``ηλ ≪ 1``, ``c ≈ 1``), solved by
    bisection for ``r* > max(c_j, 1)``; the profile is ``m_j ∝ g_jλ_j/(r* − c_j)``,
    normalised over the top K.

    Args:
        lam: Top-K eigenvalues ``(K,)``.
        g: Directional alignment on each eigenvector ``(K,)``.
        eta: Learning rate.
        batch: Effective batch size ``B (n−1)/(n−B)``.
        bulk: ``‖H‖_F² − Σ_j λ_j²`` (clamped at 0).
        mu: ``μ_0``, the alignment of the bulk.

    Returns:
        ``(r*, m)`` with ``m`` ``(K,)`` summing to 1.
    """
    lam, g = lam.double().clamp_min(0), g.double().clamp_min(0)
    c = (1 - eta * lam) ** 2
    w = g * lam**2

    def f(r: float) -> float:
        return (eta**2 / batch) * (float((w / (r - c)).sum()) + mu * bulk / (r - 1)) - 1

    lo = max(float(c.max()), 1.0) + 1e-12
    hi = lo + 1.0
    while f(hi) > 0 and hi < 1e12:
        hi = 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    r = 0.5 * (lo + hi)
    m = g * lam / (r - c)
    return r, m / m.sum().clamp_min(1e-300)


# ---------------------------------------------------------------------- one run


def escape_run(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    Y: Tensor,
    theta_star: Tensor,
    U: Tensor,
    lam: Tensor,
    *,
    kind: str,
    lr: float,
    batch: int | None,
    seed: int,
    cfg: Config,
    L_star: float,
) -> dict[str, Any]:
    """Run one trajectory from θ* and record loss, ρ_k and shares per step.

    Args:
        model: The model (its parameters are overwritten).
        loss_fn: The loss.
        X: Training inputs.
        Y: Training targets.
        theta_star: ``θ*`` ``(P,)``.
        U: Top-K eigenvectors ``(P, K)``.
        lam: Top-K eigenvalues ``(K,)``.
        kind: ``"sgd"``, ``"gd"`` or a NoisyGD noise kind.
        lr: Learning rate.
        batch: SGD batch size (``None`` for GD).
        seed: Seed of this run.
        cfg: The config.
        L_star: ``L(θ*)``.

    Returns:
        The run's record (plain lists and floats).
    """
    n = len(Y)
    gen = torch.Generator().manual_seed(seed)
    theta = theta_star.clone()
    if kind == "gd":
        noise = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        theta = theta + cfg.perturbation * noise.to(theta.device)
    set_flat(model, theta)
    params = list(model.parameters())
    if kind in ("sgd", "gd"):
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    else:
        opt = NoisyGD(
            params,
            lr=lr,
            noise=kind,
            batch_size=batch,
            k=min(20, len(lam)),
            model=model,
            loss_fn=loss_fn,
            data=(X, Y),
            curvature="hessian",
            seed=seed % (2**31),
        )
    norm_star = float(theta_star.norm())
    ks = cfg.ks
    losses, rho = [], {k: [] for k in ks}
    escape_step, shares, loss_shares = None, None, None
    for t in range(cfg.max_steps):
        opt.zero_grad(set_to_none=True)
        if kind == "sgd":
            idx = torch.randperm(n, generator=gen)[:batch].to(X.device)
            loss = loss_fn(model(X[idx]), Y[idx])
        else:
            loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        L = full_loss(model, loss_fn, X, Y)
        delta = flat_params(model) - theta_star
        c2 = (U.T @ delta) ** 2
        d2 = float(delta @ delta)
        losses.append(L)
        for k in ks:
            rho[k].append(float(c2[:k].sum()) / max(d2, 1e-300))
        escaped = L >= cfg.escape_factor * L_star or math.sqrt(d2) >= (
            cfg.escape_distance * norm_star
        )
        stop = not math.isfinite(L) or L >= cfg.stop_loss
        if escape_step is None and (escaped or stop or t == cfg.max_steps - 1):
            shares = (c2 / max(d2, 1e-300)).tolist()
            loss_shares = (
                lam.clamp_min(0) * c2 / (lam.clamp_min(0) * c2).sum()
            ).tolist()
            if escaped:
                escape_step = t + 1
            rho_at = {k: rho[k][-1] for k in ks}
        if stop:
            break
    return {
        "loss": losses,
        "rho": {str(k): v for k, v in rho.items()},
        "escape_step": escape_step,
        "rho_at_escape": {str(k): v for k, v in rho_at.items()},
        "shares_at_escape": shares,
        "loss_shares_at_escape": loss_shares,
    }


# ---------------------------------------------------------------------- main


def _arms(cfg: Config, eta: float, eta_u: float) -> list[dict[str, Any]]:
    arms = [
        {
            "name": "sgd",
            "kind": "sgd",
            "lr": eta,
            "batch": cfg.batch_size,
            "runs": cfg.runs,
        },
        {
            "name": "control",
            "kind": "sgd",
            "lr": eta,
            "batch": cfg.control_batch_size,
            "runs": cfg.runs,
        },
        {
            "name": "gd_unstable",
            "kind": "gd",
            "lr": eta_u,
            "batch": None,
            "runs": cfg.gd_runs,
        },
        {
            "name": "sgd_unstable",
            "kind": "sgd",
            "lr": eta_u,
            "batch": cfg.batch_size,
            "runs": cfg.runs,
        },
    ]
    for kind in cfg.noisy_kinds:
        arms.append(
            {
                "name": kind,
                "kind": kind,
                "lr": eta,
                "batch": cfg.batch_size,
                "runs": cfg.noisy_runs,
            }
        )
    return [a for a in arms if a["runs"] > 0]


def _summarise_arm(
    arm: dict[str, Any], records: list[dict], cfg: Config, L_star: float
):
    steps = cfg.max_steps
    # mean loss per step over runs; a stopped run keeps its last loss (it stopped in
    # the high-loss region, so this under-states the mean)
    padded = [r["loss"] + [r["loss"][-1]] * (steps - len(r["loss"])) for r in records]
    mean_loss = [sum(col) / len(col) for col in zip(*padded, strict=True)]
    escaped = [r["escape_step"] is not None for r in records]
    out = dict(arm)
    out.update(
        runs_done=len(records),
        loss=[r["loss"] for r in records],
        mean_loss=mean_loss,
        escape_steps=[r["escape_step"] for r in records],
        escaped_fraction=sum(escaped) / len(records),
        rho_mean={
            k: _ragged_mean([r["rho"][k] for r in records]) for k in records[0]["rho"]
        },
        rho_at_escape={
            k: sum(r["rho_at_escape"][k] for r in records) / len(records)
            for k in records[0]["rho_at_escape"]
        },
        shares_at_escape=_col_mean([r["shares_at_escape"] for r in records]),
        loss_shares_at_escape=_col_mean([r["loss_shares_at_escape"] for r in records]),
    )
    t = min(cfg.growth_steps, len(mean_loss))
    out["growth_factor"] = (mean_loss[t - 1] / L_star) ** (1.0 / t)
    return out


def _ragged_mean(rows: list[list[float]]) -> list[float]:
    n = max(len(r) for r in rows)
    out = []
    for i in range(n):
        col = [r[i] for r in rows if i < len(r)]
        out.append(sum(col) / len(col))
    return out


def _col_mean(rows: list[list[float]]) -> list[float]:
    return [sum(c) / len(c) for c in zip(*rows, strict=True)]


def _diverged(cfg: Config, where: str) -> str:
    pre = f" or --pre-lr (got {cfg.pre_lr})" if cfg.pre_steps > 0 else ""
    return (
        f"GD training diverged ({where}): lower --train-lr (got {cfg.train_lr})"
        f"{pre} and rerun without --resume."
    )


def main(cfg: Config, *, _stop_at: int | None = None) -> dict[str, Any]:
    """Run the recipe; write ``config.json``, ``results.json`` and the figures.

    Args:
        cfg: The configuration.
        _stop_at: Test hook: raise :class:`_common.Interrupted` at this unit of
            work (units are training steps, then runs), after the checkpoint of
            the previous units.

    Returns:
        The results dict (also in ``results.json``).

    Raises:
        RuntimeError: If the GD training phase diverges.
    """
    validate(cfg)
    t_start = time.perf_counter()
    device = common.resolve_device(cfg.device)
    out = common.recipe_dir(cfg.out_dir, RECIPE)
    cfg_d = common.config_to_dict(cfg)
    common.write_json(out / "config.json", cfg_d)
    ckpt_path = out / "checkpoint.pt"
    common.seed_everything(cfg.seed)
    model, X, Y = build(cfg, device)
    loss_fn = nn.MSELoss()
    state = common.load_checkpoint(ckpt_path, config=cfg_d) if cfg.resume else None
    state = state or {"config": cfg_d, "train_step": 0, "train_loss": [], "runs": {}}
    unit = 0

    def save() -> None:
        common.save_checkpoint(ckpt_path, state)

    # ---- phase 1: full-batch GD to theta*
    if "model" in state:
        model.load_state_dict(state["model"])
    # a first stage at pre_lr (if any), then plain GD at train_lr, so that theta*
    # is a fixed point of GD at train_lr; the lr is a pure function of the step
    total_steps = cfg.pre_steps + cfg.train_steps
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train_lr)
    bar = common.progress(total=total_steps, initial=state["train_step"], desc="GD")
    for step in range(state["train_step"], total_steps):
        common.maybe_interrupt(step, _stop_at)
        lr = cfg.pre_lr if step < cfg.pre_steps else cfg.train_lr
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), Y)
        value = loss.item()  # one device sync per step
        if not math.isfinite(value):  # stop now, not after every step
            bar.close()
            raise RuntimeError(_diverged(cfg, f"at step {step}, loss {value}"))
        loss.backward()
        opt.step()
        state["train_loss"].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3e}", lr=lr)
        if (step + 1) % max(cfg.checkpoint_every, 1) == 0 or step + 1 == total_steps:
            state.update(train_step=step + 1, model=model.state_dict())
            save()
    bar.close()
    unit = total_steps
    theta_star = flat_params(model).clone()
    L_star = full_loss(model, loss_fn, X, Y)
    if not math.isfinite(L_star) or not bool(torch.isfinite(theta_star).all()):
        raise RuntimeError(_diverged(cfg, f"L(theta*) = {L_star}"))

    # ---- phase 2: curvature and noise geometry at theta*
    if "lam" not in state:
        op = HessianOperator(model, loss_fn, (X, Y))
        eig = top_eigenpairs(op, cfg.num_eigs, tol=1e-6, seed=cfg.seed)
        fro = squared_frobenius(op, num_probes=cfg.trace_probes, seed=cfg.seed)
        geo = noise_geometry(
            model,
            loss_fn,
            (X, Y),
            metrics=("loss", "mu", "directional_alignment"),
            k=cfg.num_eigs,
            curvature="hessian",
            v0=eig.eigenvectors,
            max_samples=len(Y),
            seed=cfg.seed,
        )
        # g_j on OUR eigenvectors: noise_geometry's own (warm-started) basis may
        # order or sign them differently, so match by eigenvalue order only when
        # its eigenvalues agree; otherwise fall back to mu for every direction.
        g = geo.directional_alignment
        if g is None or g.numel() != cfg.num_eigs:
            g = torch.full((cfg.num_eigs,), geo.values["mu"])
        state.update(
            lam=eig.eigenvalues.detach().cpu(),
            U=eig.eigenvectors.detach().cpu(),
            eig_converged=bool(eig.converged),
            n_hvp_eig=int(eig.n_matvec),
            fro2=float(fro.value),
            fro2_stderr=float(fro.stderr),
            mu=float(geo.values["mu"]),
            g=g.detach().double().cpu(),
        )
        save()
    lam, U = state["lam"].to(device), state["U"].to(device, theta_star.dtype)
    lam1, fro2, mu = float(lam[0]), state["fro2"], state["mu"]
    eta = cfg.lr_factor * 2 / lam1
    eta_u = cfg.unstable_factor * 2 / lam1
    n = len(Y)

    def gamma0(lr: float, B: int) -> float:
        # SPEC §2.8 Thm 3.5, with the (n-B)/(n-1) of sampling without replacement
        return lr**2 * mu * fro2 / B * (n - B) / (n - 1)

    bulk = max(fro2 - float((lam.double() ** 2).sum()), 0.0)

    def perron(lr: float, B: int) -> tuple[float, Tensor]:
        B_eff = B * (n - 1) / (n - B)
        return perron_profile(lam.cpu(), state["g"], lr, B_eff, bulk, mu)

    # ---- phase 3: escape runs
    arms = _arms(cfg, eta, eta_u)
    total = sum(a["runs"] for a in arms)
    done = sum(len(v) for v in state["runs"].values())
    bar = common.progress(total=total, initial=done, desc="runs")
    for a_idx, arm in enumerate(arms):
        records = state["runs"].setdefault(arm["name"], [])
        for r in range(arm["runs"]):
            if r < len(records):
                unit += 1
                continue
            common.maybe_interrupt(unit, _stop_at)
            rec = escape_run(
                model,
                loss_fn,
                X,
                Y,
                theta_star,
                U,
                lam,
                kind=arm["kind"],
                lr=arm["lr"],
                batch=arm["batch"],
                seed=run_seed(cfg.seed, a_idx, r),
                cfg=cfg,
                L_star=L_star,
            )
            records.append(rec)
            save()
            unit += 1
            bar.update(1)
            bar.set_postfix(arm=arm["name"], lr=f"{arm['lr']:.3g}")
    bar.close()
    set_flat(model, theta_star)

    # ---- summary, verdict, files
    summaries = {}
    for arm in arms:
        s = _summarise_arm(arm, state["runs"][arm["name"]], cfg, L_star)
        if arm["kind"] == "sgd" and arm["batch"] is not None:
            s["gamma0"] = gamma0(arm["lr"], arm["batch"])
            r_star, m = perron(arm["lr"], arm["batch"])
            s["perron_rate"], s["perron_profile"] = r_star, m.tolist()
        summaries[arm["name"]] = s
    sgd, ctrl, gdu = (
        summaries["sgd"],
        summaries["control"],
        summaries.get("gd_unstable"),
    )
    k20 = str(20 if 20 in cfg.ks else max(cfg.ks))
    C = common.claim
    verdict = [
        C(
            "theta* is GD-stable: train_lr * lambda_1(theta*) < 2",
            cfg.train_lr * lam1,
            "<",
            2.0,
            source="SPEC R7",
        ),
        C(
            "GD at eta' = 1.1*2/lambda_1 escapes along u_1: rho_1 at escape",
            None if gdu is None else gdu["rho_at_escape"]["1"],
            ">=",
            0.9,
            source="SPEC R10",
            note=f"mean of {cfg.gd_runs} runs",
        ),
        C(
            f"SGD's displacement lies outside the top-{k20}: rho_{k20} at escape",
            sgd["rho_at_escape"][k20],
            "<=",
            0.5,
            source="SPEC R10",
            note=f"B = {cfg.batch_size}, mean of {cfg.runs} runs",
        ),
        C(
            "escape predicted for SGD: gamma_0 = eta^2 mu_0 ||H||_F^2 / B",
            sgd["gamma0"],
            ">",
            1.0,
            source="SPEC §2.8 Thm 3.5",
            note=f"mu_0 = {mu:.3g}, ||H||_F^2 = {fro2:.4g}, B = {cfg.batch_size}",
        ),
        C(
            "SGD escapes: fraction of runs reaching L >= escape_factor * L(theta*)",
            sgd["escaped_fraction"],
            ">=",
            0.9,
            source="SPEC R7",
        ),
        C(
            "SGD loss grows exponentially: early growth factor / gamma_0",
            sgd["growth_factor"] / sgd["gamma0"],
            ">=",
            0.5,
            source="SPEC R7 (proposed pass)",
            note=f"growth over {cfg.growth_steps} steps = {sgd['growth_factor']:.3g}",
        ),
        C(
            "... and not faster than 2 gamma_0: early growth factor / gamma_0",
            sgd["growth_factor"] / sgd["gamma0"],
            "<=",
            2.0,
            source="SPEC R7 (proposed pass)",
        ),
        C(
            "control has gamma_0 < 1",
            ctrl["gamma0"],
            "<",
            1.0,
            source="SPEC R7",
            note=f"B = {cfg.control_batch_size}",
        ),
        C(
            "control does not escape: fraction of runs escaping",
            ctrl["escaped_fraction"],
            "<=",
            0.1,
            source="SPEC R7",
        ),
    ]
    metrics = {
        "L_star": L_star,
        "theta_star_norm": float(theta_star.norm()),
        "lambda_1": lam1,
        "lambda_2": float(lam[1]) if len(lam) > 1 else None,
        "fro2": fro2,
        "fro2_stderr": state["fro2_stderr"],
        "mu_0": mu,
        "eta": eta,
        "eta_unstable": eta_u,
        "eig_converged": state["eig_converged"],
        "n_hvp_eig": state["n_hvp_eig"],
        "num_params": int(theta_star.numel()),
        "seconds": time.perf_counter() - t_start,
        **{f"gamma0_{a}": s["gamma0"] for a, s in summaries.items() if "gamma0" in s},
        **{
            f"escaped_fraction_{a}": s["escaped_fraction"] for a, s in summaries.items()
        },
    }
    arrays = {
        "train_loss": state["train_loss"],
        "eigenvalues": lam.tolist(),
        "directional_alignment": state["g"].tolist(),
        "arms": summaries,
    }
    results = common.results_payload(
        RECIPE,
        cfg,
        env=common.environment(device),
        metrics=metrics,
        arrays=arrays,
        verdict=verdict,
    )
    path = common.write_json(out / "results.json", results)
    plot(path)
    return results


# ---------------------------------------------------------------------- figures


def plot(results_path: str | Path) -> list[Path]:
    """Draw ``escape_loss.png`` and ``escape_direction.png`` from the JSON alone."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    out = Path(results_path).parent
    arms = res["arrays"]["arms"]
    L_star = res["metrics"]["L_star"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.0), sharey=True)
    axes = list(axes) if len(arms) > 1 else [axes]
    for ax, (name, a), col in zip(axes, arms.items(), colors * 3, strict=False):
        for run in a["loss"]:
            ax.semilogy(range(1, len(run) + 1), run, color=col, alpha=0.25, lw=0.7)
        # the mean only while every run is still going (stopped runs hold no data)
        alive = min(len(run) for run in a["loss"])
        ax.semilogy(range(1, alive + 1), a["mean_loss"][:alive], color="k", lw=1.8)
        t = range(0, alive + 1)
        if a.get("gamma0"):
            g0 = a["gamma0"]
            ax.semilogy(
                t, [L_star * g0**i for i in t], "r--", lw=1, label=f"γ0^t ({g0:.2g})"
            )
            ax.legend(fontsize=7, loc="upper left")
        ax.axhline(L_star * res["config"]["escape_factor"], color="grey", ls=":", lw=1)
        ax.set_title(f"{name} (lr {a['lr']:.3g}, B {a['batch']})", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylim(L_star * 0.1, max(10.0, L_star * 10))
    axes[0].set_ylabel("training loss L(θ_t)")
    p1 = out / "escape_loss.png"
    common.save_figure(fig, p1)

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    fig.subplots_adjust(wspace=0.35)
    for name, col in zip(("sgd", "gd_unstable", "sgd_unstable"), colors, strict=False):
        if name not in arms:
            continue
        for j, (k, v) in enumerate(arms[name]["rho_mean"].items()):
            ax[0].plot(
                range(1, len(v) + 1),
                v,
                color=col,
                alpha=1 - 0.2 * j,
                ls=["-", "--", ":", "-."][j % 4],
                label=f"{name} ρ_{k}",
            )
    ax[0].set(xlabel="step", ylabel="sharp fraction ρ_k (mean)", ylim=(0, 1.02))
    ax[0].legend(fontsize=6)
    j = range(1, len(res["arrays"]["eigenvalues"]) + 1)
    for name, col in zip(("sgd", "gd_unstable"), colors, strict=False):
        if name in arms:
            s = arms[name]["shares_at_escape"]
            tot = sum(s)
            ax[1].semilogy(j, [x / tot for x in s], "o-", ms=3, color=col, label=name)
            ax[2].semilogy(
                j,
                arms[name]["loss_shares_at_escape"],
                "o-",
                ms=3,
                color=col,
                label=name,
            )
    if "perron_profile" in arms.get("sgd", {}):
        ax[1].semilogy(
            j, arms["sgd"]["perron_profile"], "k--", lw=1, label="Perron (§2.6)"
        )
    ax[1].set(xlabel="eigen-direction j", ylabel="share s_j at escape (within top K)")
    ax[2].set(xlabel="eigen-direction j", ylabel="loss share ℓ_j at escape")
    ax[1].legend(fontsize=7)
    ax[2].legend(fontsize=7)
    p2 = out / "escape_direction.png"
    common.save_figure(fig, p2)
    return [p1, p2]


if __name__ == "__main__":
    config = common.parse_config(Config, description=__doc__)
    try:
        result = main(config)
    except (ValueError, FileNotFoundError) as err:  # bad configuration: no traceback
        sys.exit(f"error: {err}")
    print(common.verdict_table(result["verdict"]))
    print(f"results: {Path(config.out_dir) / RECIPE / 'results.json'}")
    sys.exit(0 if result["passed"] else 1)
