"""How GD and SGD leave a GD-stable minimum (WWS22 Fig. 4; WW23).

Papers: Wu, Wang & Su 2022 (WWS22, arXiv:2207.02628); Wang & Wu 2023 (WW23,
arXiv:2310.00692).

Claim: from a minimum θ* that GD is stable at, GD at an unstable lr escapes along
the sharpest Hessian direction(s), while SGD at a GD-stable lr escapes through its
noise, with large components off the sharpest direction, spread as WW23's Perron
profile says, and with the loss growing at least by WWS22 Thm 3.5's factor
``γ_0 = η² μ_0 ‖H‖_F² / B = η² Tr(HΣ) / (2L·B)`` per step.

Protocol: full-batch GD to θ* (``train_lr·λ_1 < 2``); the top-K Hessian eigenpairs,
the exact ``Tr(HΣ)`` (per-sample gradients and Hessian products), μ_0 and the whole
Gauss-Newton spectrum there; then short runs from θ*: SGD at
``η = lr_factor·2/λ_1`` with batch B (``γ_0 > 1``), the same with a larger batch
(control, ``γ_0 < 1``), GD and SGD at ``η' = unstable_factor·2/λ_1`` from a
perturbed θ*, and NoisyGD arms matched to SGD's noise. Per step: the loss and
``ρ_k = ‖U_kᵀδ‖²/‖δ‖²`` (``δ = θ_t − θ*``: the Euclidean share of the
displacement in the top k directions) and, at escape (``L ≥ escape_factor·L(θ*)``),
the per-direction and loss shares, against ``τ_k`` (the share of ``Tr H`` in the top
k eigenvalues) and the Perron profile at the measured growth rate. Default model:
timm's ``test_vit`` as a one-token residual MLP (GD at 0.03 for 3,000 steps, SGD
at B = 4); ``--model mlp`` is WWS22's fully connected net (GD at 0.1 for 2,000
steps, B = 16); both
on 256 ZCA-whitened digits with ±1 even/odd targets. Why these settings, and the
timm settings tried: recipes/README.md. Every verdict row and where its threshold
comes from: docs/recipes/escape_direction.md. The run uses one torch thread
(``--threads``, restored afterwards): on a shared 2-core machine two threads made
the quick run several times slower.

Commands (outputs under ``<out-dir>/escape_direction/``)::

    python recipes/escape_direction.py --quick   # CI setting, ~2.5 min on 2 CPU cores
    python recipes/escape_direction.py --quick --model mlp   # the papers' net, ~1 min
    python recipes/escape_direction.py           # full: 20 runs per arm, K = 50
    python recipes/escape_direction.py --resume  # continue an interrupted run

Expected: every verdict row PASS: θ* GD-stable; GD at η' has ``ρ ≥ 0.9`` on the
directions unstable at η' (u_1 alone when ``1.1·λ_2/λ_1 < 1``); SGD's
``ρ_1`` at least 0.3 below GD's and at most 0.5, with ≥ 90% of runs escaping;
SGD's ``ρ_20`` within 0.12 of the Perron profile's at the measured growth rate;
``γ_0 > 1`` and the early growth at least ``0.5·γ_0``; the control has
``γ_0 < 1`` and does not escape. ``escape_loss.png`` shows straight lines on the
log axis for SGD and flat curves for the control; ``escape_direction.png`` ``ρ_1 →
1`` for GD, SGD's shares against the Perron profile, and ``ρ_k``, ``τ_k``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from _common import option
from torch import Tensor, nn

from geoopt_sgd import (
    HessianOperator,
    NoisyGD,
    hutchinson_trace,
    noise_geometry,
    per_sample_gradients,
    squared_frobenius,
    top_eigenpairs,
)

RECIPE = "escape_direction"
TARGETS = ("parity", "onehot")
DTYPES = ("float64", "float32")
# Verdict sources: the papers, and the page with our thresholds and their evidence.
WWS22 = "Wu, Wang & Su 2022, arXiv:2207.02628"
WW23 = "Wang & Wu 2023, arXiv:2310.00692"
OURS = "ours (docs/recipes/escape_direction.md)"
# k of the reported shares tau_k (of Tr H) and rho_k / tau_k
TAU_KS = (1, 5, 20)
# Seconds between checkpoint writes during an arm's runs (written after every run,
# the quick ViT setting wrote its 15 MB checkpoint about 40 times, 0.6 GB)
RUNS_CHECKPOINT_SECONDS = 30.0

# The per-model defaults of the fields left at None: the timm default is test_vit as
# a one-token residual MLP (8x8 inputs, one 8x8 patch, no class token, two blocks,
# JAX init: zero head); the papers' fully connected net keeps its own setting.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "test_vit": {
        "model_kwargs": (
            "img_size=8",
            "patch_size=8",
            "class_token=False",
            "global_pool=avg",
            "weight_init=jax",
            "depth=2",
        ),
        "train_lr": 0.03,
        "train_steps": 3000,
        "batch_size": 4,
    },
    "mlp": {
        "model_kwargs": (),
        "train_lr": 0.1,
        "train_steps": 2000,
        "batch_size": 16,
    },
}
OTHER_DEFAULTS: dict[str, Any] = {
    "model_kwargs": (),
    "train_lr": 0.1,
    "train_steps": 2000,
    "batch_size": 16,
}


@dataclass(frozen=True)
class Config(common.RunOptions):
    # model and data
    model: str = option(
        "test_vit", "a timm name, or 'mlp' (WWS22's FCN), 'cnn', 'linear'"
    )
    model_kwargs: tuple[str, ...] | None = option(
        None,
        "extra timm.create_model args, 'key=value' (None: test_vit's one-token "
        "setting for test_vit, none for other models)",
    )
    width: int = option(64, "hidden width (mlp) or channels (cnn)")
    depth: int = option(2, "hidden layers of the mlp")
    activation: str = option("tanh", "'tanh' or 'relu' (mlp)")
    dataset: str = option(
        "digits", "'digits' (offline), 'mnist', 'fashion_mnist', 'cifar10'"
    )
    data_dir: str | None = option(None, "where torchvision datasets live")
    download: bool = option(False, "download a missing torchvision dataset")
    num_train: int = option(256, "training samples n; the loss L is their mean")
    image_size: int = option(8, "input side for image models (digits are 8x8)")
    whiten: bool = option(True, "ZCA-whiten the inputs (high effective dimension)")
    target: str = option("parity", "'parity' (even/odd -> +-1, one output) or 'onehot'")
    dtype: str = option("float64", "'float64' or 'float32'")
    # phase 1: full-batch GD to theta*
    pre_lr: float | None = option(None, "GD lr of a first stage (None: no first stage)")
    pre_steps: int = option(0, "GD steps of the first stage, before train_lr's")
    train_lr: float | None = option(
        None,
        "GD lr of the final stage; theta* is stable at it (None: 0.03 for "
        "test_vit, 0.1 otherwise)",
    )
    train_steps: int | None = option(
        None, "GD steps at train_lr, after the pre_steps (None: 3000 test_vit, 2000)"
    )
    checkpoint_every: int = option(200, "training steps between checkpoints")
    # phase 2: curvature and noise at theta*
    num_eigs: int = option(50, "K: top Hessian eigenpairs at theta*")
    ks: tuple[int, ...] = option((1, 5, 20, 50), "k of the sharp fractions rho_k")
    trace_probes: int = option(50, "Hutchinson probes for ||H||_F^2 (and Tr H)")
    exact_max_entries: int = option(
        100_000_000,
        "largest n*K*P (samples x outputs x parameters) for the exact Tr(H Sigma) "
        "and Gauss-Newton spectrum; beyond, estimates",
    )
    # phase 3: escape runs from theta*
    lr_factor: float = option(0.9, "eta = lr_factor * 2/lambda_1 (< 1: GD-stable)")
    unstable_factor: float = option(1.1, "eta' = unstable_factor * 2/lambda_1 (> 1)")
    batch_size: int | None = option(
        None, "B of the SGD arms, gamma_0 > 1 (None: 4 for test_vit, 16 otherwise)"
    )
    control_batch_size: int = option(128, "B of the control arm (gamma_0 < 1)")
    runs: int = option(20, "runs of each SGD arm")
    gd_runs: int = option(3, "runs of the GD arm (differ only in the perturbation)")
    noisy_runs: int = option(5, "runs of each NoisyGD arm")
    noisy_kinds: tuple[str, ...] = option(
        ("isotropic_matched", "hessian", "sgd_matched"), "NoisyGD noise kinds"
    )
    max_steps: int = option(100, "steps of each run")
    stop_loss: float = option(1.0, "stop a run once L exceeds this")
    escape_factor: float = option(1e4, "escaped when L >= escape_factor * L(theta*)")
    escape_distance: float = option(
        0.1, "... or ||delta|| >= escape_distance * ||theta*||"
    )
    perturbation: float = option(1e-8, "std of the start perturbation (eta' arms)")
    growth_steps: int = option(3, "early steps over which the loss growth is read")
    threads: int = option(1, "torch CPU threads during the run (restored after)")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: fewer runs, K = 20, one run per NoisyGD arm.

        The NoisyGD arms are drawn in the figures but enter no verdict row; their
        Hessian-noise refreshes (a top-20 eigensolve every 10 steps) cost about a
        third of the quick run on the ViT, so the quick setting keeps one run each.
        """
        return cls(
            num_eigs=20,
            ks=(1, 5, 20),
            trace_probes=30,
            runs=8,
            gd_runs=2,
            noisy_runs=1,
        )


def resolved(cfg: Config) -> Config:
    """``cfg`` with the per-model defaults (:data:`MODEL_DEFAULTS`) in its None fields.

    ``--model mlp`` alone is the papers' setting (GD at 0.1 for 2,000 steps, B = 16),
    the default ``test_vit`` its one-token setting (GD at 0.03 for 3,000 steps,
    B = 4).
    """
    defaults = MODEL_DEFAULTS.get(cfg.model, OTHER_DEFAULTS)
    fill = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill) if fill else cfg


def main(cfg: Config) -> dict[str, Any]:
    """Run the recipe; write ``config.json``, ``results.json`` and the figures.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.

    Raises:
        _common.Diverged: If the GD training phase diverges.
    """
    cfg = resolved(cfg)
    validate(cfg)
    with common.Run(RECIPE, cfg, threads=cfg.threads) as run:
        model, X, Y = build(cfg, run.device)
        stages = common.Stages(run.open(), run.save)
        loss_fn = nn.MSELoss()
        # phase 1: full-batch GD to theta*
        trained = stages.run(
            "train",
            lambda resume, snapshot: train_to_minimum(
                model, loss_fn, X, Y, cfg, resume, snapshot
            ),
        )
        model.load_state_dict(trained["model"])
        theta_star = common.flat_parameters(model)
        L_star = common.full_batch_loss(model, loss_fn, X, Y)
        if not math.isfinite(L_star) or not bool(torch.isfinite(theta_star).all()):
            raise common.Diverged(_diverged(cfg, f"L(theta*) = {L_star}"))
        # phase 2: curvature and noise geometry at theta*
        curv = stages.run(
            "curvature",
            lambda resume, snapshot: curvature_at_minimum(model, loss_fn, X, Y, cfg),
        )
        lam = curv["lam"].to(run.device)
        U = curv["U"].to(run.device, theta_star.dtype)
        lam1 = float(lam[0])
        eta = cfg.lr_factor * 2 / lam1
        eta_u = cfg.unstable_factor * 2 / lam1
        # phase 3: escape runs from theta*, one stage per arm
        arms = _arms(cfg, eta, eta_u)
        minimum = Minimum(theta_star, U, lam, L_star)
        records = escape_arms(arms, stages, model, loss_fn, X, Y, minimum, cfg)
        common.set_flat_parameters(model, theta_star)
        summaries = {
            arm["name"]: summarise_arm(arm, records[arm["name"]], cfg, minimum, curv)
            for arm in arms
        }
        metrics = summary_metrics(minimum, curv, cfg, summaries)
        arrays = {
            "train_loss": trained["train_loss"],
            "eigenvalues": lam.tolist(),
            "directional_alignment": curv["g"].tolist(),
            "arms": summaries,
        }
        return run.finish(metrics, arrays, verdict(summaries, metrics, cfg), plot)


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On the first invalid field.
    """
    cfg = resolved(cfg)
    common.check_config_basics(cfg)
    common.check_choice(cfg, "target", TARGETS)
    common.check_choice(cfg, "dtype", DTYPES)
    if not 0 < cfg.lr_factor < 1:
        raise ValueError(
            f"`lr_factor` must be in (0, 1) (eta < 2/lambda_1: GD-stable); "
            f"got {cfg.lr_factor!r}."
        )
    if not cfg.unstable_factor > 1:
        raise ValueError(f"`unstable_factor` must be > 1; got {cfg.unstable_factor!r}.")
    common.check_min(
        cfg,
        ("train_steps", "num_eigs", "runs", "max_steps", "growth_steps", "threads"),
        1,
    )
    common.check_min(
        cfg,
        (
            "gd_runs",
            "noisy_runs",
            "checkpoint_every",
            "trace_probes",
            "pre_steps",
            "exact_max_entries",
        ),
        0,
    )
    if cfg.pre_steps > 0 and cfg.pre_lr is None:
        raise ValueError(
            f"`pre_lr` must be set when `pre_steps` > 0; got pre_steps="
            f"{cfg.pre_steps!r} and pre_lr=None."
        )
    model_kwargs(cfg)
    common.check_min(cfg, ("trace_probes",), 2)
    if not cfg.ks or min(cfg.ks) < 1 or max(cfg.ks) > cfg.num_eigs:
        raise ValueError(
            f"`ks` must hold values in [1, num_eigs={cfg.num_eigs}]; got {cfg.ks!r}."
        )
    common.check_min(cfg, ("num_train",), 2)
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


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``cfg.model_kwargs`` (after the model's defaults) parsed for timm.

    Raises:
        ValueError: If an entry is not ``key=value`` or the model is not timm's.
    """
    cfg = resolved(cfg)
    return common.parse_model_kwargs(cfg.model_kwargs, cfg.model)


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
    # dynamics, the Hessian and the noise all refer to the same L
    # (docs/science/conventions.md).
    model.eval()
    P = sum(p.numel() for p in model.parameters())
    if cfg.num_eigs > P:
        raise ValueError(
            f"`num_eigs` must be <= the parameter count P = {P}; got {cfg.num_eigs}."
        )
    X = data.x_train.to(device)
    if cfg.target == "parity":
        Y = common.parity_targets(data.y_train, dtype)
    else:
        Y = common.make_targets("mse", data.y_train, data.num_classes, dtype)
    return model, X, Y.to(device)


def train_to_minimum(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    Y: Tensor,
    cfg: Config,
    resume: dict[str, Any] | None,
    snapshot: Any,
) -> dict[str, Any]:
    """Full-batch GD to θ* (the stage "train"), a snapshot every ``checkpoint_every``.

    A first stage at ``pre_lr`` (if any), then plain GD at ``train_lr``, so that θ*
    is a fixed point of GD at ``train_lr``; the lr is a pure function of the step.

    Returns:
        ``{"train_loss": per-step losses, "model": θ*'s state dict}``.

    Raises:
        _common.Diverged: At the first non-finite loss (never checkpointed).
    """
    total = cfg.pre_steps + cfg.train_steps
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train_lr)
    first, losses = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        first, losses = resume["step"], resume["train_loss"]
    bar = common.progress_bar(total=total, initial=first, desc="GD")
    for step in range(first, total):
        common.maybe_interrupt(step)  # units: training steps, then runs
        lr = cfg.pre_lr if step < cfg.pre_steps else cfg.train_lr
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), Y)
        value = loss.item()  # one device sync per step
        if not math.isfinite(value):  # stop now, not after every step
            bar.close()
            raise common.Diverged(_diverged(cfg, f"at step {step}, loss {value}"))
        loss.backward()
        opt.step()
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3e}", lr=lr)
        if (step + 1) % max(cfg.checkpoint_every, 1) == 0 or step + 1 == total:
            snapshot(
                {"step": step + 1, "model": model.state_dict(), "train_loss": losses}
            )
    bar.close()
    return {
        "train_loss": losses,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
    }


def curvature_at_minimum(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor, cfg: Config
) -> dict[str, Any]:
    """The curvature and the noise at θ*, for the escape runs and the verdict.

    Top-K Hessian eigenpairs (Lanczos); ``Tr(HΣ)``, ``μ_0`` and the directional
    alignments g_j (``noise_geometry`` on the training loss, so that ``γ_0`` is in
    the units of the dynamics); the whole spectrum of the Gauss-Newton matrix
    (:func:`gauss_newton_spectrum`: ``Tr H`` and the shares ``τ_k``, and the Perron
    profile over every direction); ``‖H‖_F²`` by Hutchinson (reported).

    Both ``Tr(HΣ)`` (per-sample gradients and ``n`` Hessian products) and the
    spectrum (the ``nK × nK`` kernel) are exact while ``n·K·P`` is at most
    ``cfg.exact_max_entries``; beyond, ``Tr(HΣ)`` is noise_geometry's sketch
    estimate and the spectrum the top K plus one bulk level fitted to the
    Hutchinson ``Tr H`` and ``‖H‖_F²`` (``spectrum_route`` says which).
    """
    op = HessianOperator(model, loss_fn, (X, Y))
    eig = top_eigenpairs(op, cfg.num_eigs, tol=1e-6, seed=cfg.seed)
    fro = squared_frobenius(op, num_probes=cfg.trace_probes, seed=cfg.seed)
    n, K = Y.shape[0], Y.shape[1]
    P = sum(p.numel() for p in model.parameters())
    exact = n * K * P <= cfg.exact_max_entries
    # Tr(H Sigma), mu_0 and g_j of the loss the runs follow (nn.MSELoss); mu_0 and
    # g_j are scale-free, so they equal the papers' 1/2-squared-error values
    geo = noise_geometry(
        model,
        loss_fn,
        (X, Y),
        metrics=("loss", "mu", "tr_h_sigma", "directional_alignment"),
        k=cfg.num_eigs,
        curvature="hessian",
        v0=eig.eigenvectors,
        max_samples=len(Y),
        seed=cfg.seed,
        route="exact" if exact else "sketch",
        num_probes=max(cfg.trace_probes, 8),
    )
    # g_j on OUR eigenvectors: noise_geometry's own (warm-started) basis may
    # order or sign them differently, so match by eigenvalue order only when
    # its eigenvalues agree; otherwise fall back to mu for every direction.
    g = geo.directional_alignment
    if g is None or g.numel() != cfg.num_eigs:
        g = torch.full((cfg.num_eigs,), geo.values["mu"], device="cpu")
    lam = eig.eigenvalues.detach().double().cpu()
    if exact:
        values = gauss_newton_spectrum(model, X, K)
        weights = torch.ones_like(values)
        trace = float(values.sum())
        trace_stderr = 0.0
        route = "gauss_newton_kernel"
    else:
        tr = hutchinson_trace(op, num_probes=cfg.trace_probes, seed=cfg.seed)
        trace, trace_stderr = float(tr.value), float(tr.stderr)
        values, weights = bulk_spectrum(lam, trace, float(fro.value))
        route = "top_k_and_bulk_level"
    return {
        "lam": eig.eigenvalues.detach().cpu(),
        "U": eig.eigenvectors.detach().cpu(),
        "eig_converged": bool(eig.converged),
        "n_hvp_eig": int(eig.n_matvec),
        "fro2": float(fro.value),
        "fro2_stderr": float(fro.stderr),
        "mu": float(geo.values["mu"]),
        "g": g.detach().double().cpu(),
        "tr_h_sigma": float(geo.values["tr_h_sigma"]),
        "noise_loss": float(geo.values["loss"]),
        "noise_route": geo.route,
        "spectrum": values.detach().double().cpu(),
        "spectrum_weights": weights.detach().double().cpu(),
        "spectrum_route": route,
        "trace": trace,
        "trace_stderr": trace_stderr,
    }


def gauss_newton_spectrum(model: nn.Module, X: Tensor, K: int) -> Tensor:
    """Every nonzero eigenvalue of the Gauss-Newton matrix of ``nn.MSELoss``.

    ``G = (2/(nK)) Σ_i J_iᵀJ_i`` (``J_i``: the ``K × P`` output Jacobian of sample
    i) has the nonzero eigenvalues of the ``nK × nK`` kernel ``(2/(nK)) J Jᵀ``,
    computed exactly from the rows of ``J`` (per-sample gradients of each output).
    At a minimum of the square loss the Hessian is G up to terms of the size of
    the residuals.

    Returns:
        The ``nK`` eigenvalues ``(nK,)``, descending, clamped at 0.
    """
    n = X.shape[0]
    rows = []
    for k in range(K):
        pick = torch.zeros(n, K, dtype=X.dtype, device=X.device)
        pick[:, k] = 1
        rows.append(
            per_sample_gradients(model, lambda out, e: (out * e).sum(), X, pick)
        )
    J = torch.stack(rows, 1).reshape(n * K, -1)
    kernel = (J @ J.T) * (2.0 / (n * K))
    return torch.linalg.eigvalsh(kernel).flip(0).clamp_min(0)


def bulk_spectrum(lam: Tensor, trace: float, fro2: float) -> tuple[Tensor, Tensor]:
    """The top K eigenvalues and one bulk level: values and multiplicities.

    The bulk (everything beyond the top K) is one eigenvalue ``b`` with
    multiplicity ``w``, fitted to its trace and squared norm: ``w b = Tr H −
    Σλ_j`` and ``w b² = ‖H‖_F² − Σλ_j²`` (``b`` at most ``λ_K``; no bulk when
    either is not positive).
    """
    lam = lam.double().clamp_min(0)
    tr_bulk = trace - float(lam.sum())
    fro_bulk = fro2 - float((lam**2).sum())
    ones = torch.ones_like(lam)
    if tr_bulk <= 0 or fro_bulk <= 0:
        return lam, ones
    b = min(fro_bulk / tr_bulk, float(lam[-1]))
    values = torch.cat([lam, lam.new_tensor([b])])
    return values, torch.cat([ones, ones.new_tensor([tr_bulk / b])])


def perron_shares(
    values: Tensor, weights: Tensor, eta: float, rate: float, ks: tuple[int, ...]
) -> dict[int, float]:
    """Share of ``E‖δ‖²`` in the top k directions under WW23's Perron profile.

    The profile at growth rate ``r`` with uniform alignment (g_j = 1),
    ``m_j ∝ λ_j/(r − (1 − ηλ_j)²)`` over every direction of the spectrum
    (``weights``: multiplicities), gives ``Σ_{j≤k} m_j / Σ_j m_j``. Needs
    ``r > max_j (1 − ηλ_j)²``.

    Raises:
        ValueError: If ``rate`` is not above every ``(1 − ηλ_j)²``.
    """
    lam = values.double().clamp_min(0)
    c = (1 - eta * lam) ** 2
    if not rate > float(c.max()):
        raise ValueError(f"the rate {rate} is not above max (1 - eta lambda)^2.")
    m = weights.double() * lam / (rate - c)
    total = float(m.sum())
    return {k: float(m[:k].sum()) / total for k in ks}


def trace_shares(
    values: Tensor, weights: Tensor, ks: tuple[int, ...]
) -> dict[int, float]:
    """``τ_k``: the share of ``Tr H`` in its top k eigenvalues."""
    lam = values.double().clamp_min(0) * weights.double()
    total = float(lam.sum())
    return {k: float(lam[:k].sum()) / total for k in ks}


def measured_growth_rate(records: list[dict[str, Any]], L_star: float) -> float | None:
    """The per-step loss growth factor of the escaping runs, late in their escape.

    For each run that escaped at step t: ``(L_t / L_a)^{1/(t − a)}`` with
    ``a = ⌊t/2⌋`` (``L_0 = L(θ*)``), the second half of its way out, where the
    Perron vector dominates; the geometric mean over runs. ``None`` if no run
    escaped.
    """
    logs = []
    for r in records:
        t = r["escape_step"]
        if t is None:
            continue
        a = t // 2
        start = L_star if a == 0 else r["loss"][a - 1]
        logs.append(math.log(r["loss"][t - 1] / start) / (t - a))
    return math.exp(sum(logs) / len(logs)) if logs else None


@dataclass
class Minimum:
    """θ* and what the escape runs are measured against.

    Attributes:
        theta: ``θ*`` ``(P,)``.
        U: Top-K eigenvectors ``(P, K)``.
        lam: Top-K eigenvalues ``(K,)``.
        loss: ``L(θ*)``.
    """

    theta: Tensor
    U: Tensor
    lam: Tensor
    loss: float


def _arms(cfg: Config, eta: float, eta_u: float) -> list[dict[str, Any]]:
    """The escape arms: name, kind (``"sgd"``, ``"gd"`` or a NoisyGD kind), lr, B."""
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


def escape_arms(
    arms: list[dict[str, Any]],
    stages: common.Stages,
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    Y: Tensor,
    minimum: Minimum,
    cfg: Config,
) -> dict[str, list[dict[str, Any]]]:
    """Run every arm's runs from θ*: one stage per arm, a snapshot after each run.

    The checkpoint (θ*'s K eigenvectors included: 14 MB for the default ViT at
    K = 20) is written at most every :data:`RUNS_CHECKPOINT_SECONDS` within an
    arm, at the arm's end and on an interrupt; each run has its own seed, so a
    run redone after a kill gives the same record.

    Units of work (:func:`_common.maybe_interrupt`) continue the training steps'
    count: run ``r`` of an arm is unit ``pre_steps + train_steps + (runs of the
    earlier arms) + r``.

    Returns:
        Arm name → its run records.
    """
    unit = cfg.pre_steps + cfg.train_steps
    bar = common.progress_bar(total=sum(a["runs"] for a in arms), desc="runs")
    out = {}
    for a_idx, arm in enumerate(arms):

        def runs(resume, snapshot, a_idx=a_idx, arm=arm, unit=unit):
            records = [] if resume is None else resume
            bar.update(len(records))
            for r in range(len(records), arm["runs"]):
                common.maybe_interrupt(unit + r)
                rec = escape_run(
                    model,
                    loss_fn,
                    X,
                    Y,
                    minimum,
                    kind=arm["kind"],
                    lr=arm["lr"],
                    batch=arm["batch"],
                    seed=escape_run_seed(cfg.seed, a_idx, r),
                    cfg=cfg,
                )
                records.append(rec)
                snapshot(records)
                bar.update(1)
                bar.set_postfix(arm=arm["name"], lr=f"{arm['lr']:.3g}")
            return records

        out[arm["name"]] = stages.run(
            f"runs:{arm['name']}", runs, min_interval=RUNS_CHECKPOINT_SECONDS
        )
        unit += arm["runs"]
    bar.close()
    return out


def escape_run_seed(seed: int, arm: int, run: int) -> int:
    """A distinct, order-independent seed for run ``run`` of arm ``arm``."""
    return (seed * 1_000_003 + arm * 10_007 + run) % (2**62)


def perron_profile(
    lam: Tensor, g: Tensor, eta: float, batch: float, bulk: float, mu: float
) -> tuple[float, Tensor]:
    """Solve WW23's second-moment recursion for its growth rate and profile.

    The recursion and its Perron profile: docs/recipes/escape_direction.md.

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


def escape_run(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    Y: Tensor,
    minimum: Minimum,
    *,
    kind: str,
    lr: float,
    batch: int | None,
    seed: int,
    cfg: Config,
) -> dict[str, Any]:
    """Run one trajectory from θ* and record loss, ρ_k and shares per step.

    Args:
        model: The model (its parameters are overwritten).
        loss_fn: The loss.
        X: Training inputs.
        Y: Training targets.
        minimum: θ*, its top-K eigenpairs and ``L(θ*)``.
        kind: ``"sgd"``, ``"gd"`` or a NoisyGD noise kind.
        lr: Learning rate.
        batch: SGD batch size (``None`` for GD).
        seed: Seed of this run.
        cfg: The config.

    Returns:
        The run's record (plain lists and floats).
    """
    theta_star, U, lam, L_star = minimum.theta, minimum.U, minimum.lam, minimum.loss
    n = len(Y)
    gen = torch.Generator().manual_seed(seed)
    theta = theta_star.clone()
    if kind == "gd":
        noise = torch.randn(theta.shape, generator=gen, dtype=theta.dtype, device="cpu")
        theta = theta + cfg.perturbation * noise.to(theta.device)
    common.set_flat_parameters(model, theta)
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
            idx = torch.randperm(n, generator=gen, device="cpu")[:batch].to(X.device)
            loss = loss_fn(model(X[idx]), Y[idx])
        else:
            loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        L = common.full_batch_loss(model, loss_fn, X, Y)
        delta = common.flat_parameters(model) - theta_star
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


def summarise_arm(
    arm: dict[str, Any],
    records: list[dict],
    cfg: Config,
    minimum: Minimum,
    curv: dict[str, Any],
) -> dict[str, Any]:
    """One arm's summary: mean loss, escapes, mean ρ_k and shares at escape.

    SGD arms also get ``γ_0 = η² Tr(HΣ)/(2L·B)`` (WWS22 Thm 3.5, with the
    ``(n−B)/(n−1)`` of sampling without replacement), the Perron growth rate and
    profile of the recursion, the measured growth rate and the Perron shares
    ``ρ_k`` at that rate (g_j = 1).
    """
    L_star = minimum.loss
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
    shares = out["shares_at_escape"]
    K = len(shares)
    # rho_k for every k <= K, from the mean per-direction shares (their partial sums)
    out["rho_k_at_escape"] = {str(k): sum(shares[:k]) for k in _report_ks(K)}
    if arm["kind"] == "sgd" and arm["batch"] is not None:
        n, B, lr = cfg.num_train, arm["batch"], arm["lr"]
        # WWS22 Thm 3.5's gamma_0 = eta^2 mu_0 ||H||_F^2 / B with mu_0 ||H||_F^2 =
        # Tr(H Sigma) / (2L), and (n - B)/(n - 1) for sampling without replacement
        out["gamma0"] = (
            lr**2
            * curv["tr_h_sigma"]
            / (2 * curv["noise_loss"] * B)
            * (n - B)
            / (n - 1)
        )
        out["growth_over_gamma0"] = out["growth_factor"] / out["gamma0"]
        lam = minimum.lam
        mu, fro2 = curv["mu"], curv["fro2"]
        bulk = max(fro2 - float((lam.double() ** 2).sum()), 0.0)
        B_eff = B * (n - 1) / (n - B)
        r_star, m = perron_profile(lam.cpu(), curv["g"], lr, B_eff, bulk, mu)
        out["perron_rate"], out["perron_profile"] = r_star, m.tolist()
        rate = measured_growth_rate(records, L_star)
        out["growth_rate_measured"] = rate
        ks = _report_ks(len(curv["spectrum"]))
        try:
            perron = perron_shares(
                curv["spectrum"], curv["spectrum_weights"], lr, rate, ks
            )
        except (TypeError, ValueError):  # no run escaped, or no growth
            perron = dict.fromkeys(ks)
        out["perron_rho_at_measured_rate"] = {str(k): v for k, v in perron.items()}
    return out


def _report_ks(K: int) -> tuple[int, ...]:
    """The k of the reported ``ρ_k``, ``τ_k``: 1, 5, 20 and K, those ``<= K``."""
    return tuple(sorted({k for k in (*TAU_KS, K) if 1 <= k <= K}))


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


def summary_metrics(
    minimum: Minimum, curv: dict[str, Any], cfg: Config, summaries: dict[str, dict]
) -> dict[str, Any]:
    """The summary numbers of ``results.json``: θ*, its curvature, the lrs, γ_0s.

    ``rho_k_<arm>`` is the Euclidean share of the displacement ``δ`` in the top k
    Hessian directions at escape (mean over runs), ``tau_k`` the share of ``Tr H``
    in the top k eigenvalues, and ``rho_k_over_tau_k_<arm>`` their ratio.
    """
    lam, L_star, theta_star = minimum.lam, minimum.loss, minimum.theta
    lam1 = float(lam[0])
    tau = trace_shares(
        curv["spectrum"], curv["spectrum_weights"], _report_ks(len(curv["spectrum"]))
    )
    out = {
        "L_star": L_star,
        "theta_star_norm": float(theta_star.norm()),
        "lambda_1": lam1,
        "lambda_2": float(lam[1]) if len(lam) > 1 else None,
        "lambda2_over_lambda1": float(lam[1]) / lam1 if len(lam) > 1 else None,
        "unstable_directions": unstable_directions(lam, cfg.unstable_factor),
        "fro2": curv["fro2"],
        "fro2_stderr": curv["fro2_stderr"],
        "mu_0": curv["mu"],
        "tr_h_sigma": curv["tr_h_sigma"],
        "noise_route": curv["noise_route"],
        "trace_H": curv["trace"],
        "trace_H_stderr": curv["trace_stderr"],
        "spectrum_route": curv["spectrum_route"],
        "spectrum_top_gap": _spectrum_gap(lam, curv),
        "eta": cfg.lr_factor * 2 / lam1,
        "eta_unstable": cfg.unstable_factor * 2 / lam1,
        "eig_converged": curv["eig_converged"],
        "n_hvp_eig": curv["n_hvp_eig"],
        "num_params": int(theta_star.numel()),
        **{f"tau_{k}": v for k, v in tau.items()},
        **{f"gamma0_{a}": s["gamma0"] for a, s in summaries.items() if "gamma0" in s},
        **{
            f"escaped_fraction_{a}": s["escaped_fraction"] for a, s in summaries.items()
        },
    }
    for a in ("sgd", "gd_unstable", "sgd_unstable"):
        if a not in summaries:
            continue
        for k, v in summaries[a]["rho_k_at_escape"].items():
            out[f"rho_{k}_{a}"] = v
            if int(k) in tau:
                out[f"rho_{k}_over_tau_{k}_{a}"] = v / tau[int(k)]
    sgd = summaries["sgd"]
    out["growth_factor_sgd"] = sgd["growth_factor"]
    out["growth_over_gamma0_sgd"] = sgd["growth_over_gamma0"]
    out["growth_rate_measured_sgd"] = sgd["growth_rate_measured"]
    out["perron_rate_sgd"] = sgd["perron_rate"]
    for k, v in sgd["perron_rho_at_measured_rate"].items():
        out[f"perron_rho_{k}_sgd"] = v
    return out


def unstable_directions(lam: Tensor, unstable_factor: float) -> int:
    """How many top directions GD at ``η' = unstable_factor·2/λ_1`` is unstable
    along: those with ``η'λ_j > 2``, i.e. ``unstable_factor·λ_j/λ_1 > 1``."""
    lam1 = float(lam[0])
    return max(1, sum(1 for v in lam.tolist() if unstable_factor * v / lam1 > 1))


def _spectrum_gap(lam: Tensor, curv: dict[str, Any]) -> float:
    """Largest ``|λ_j(H) − λ_j(G)| / λ_1`` over the top K: Lanczos on the Hessian
    against the Gauss-Newton spectrum (0 at an exact minimum)."""
    K = min(len(lam), len(curv["spectrum"]))
    diff = (lam[:K].double().cpu() - curv["spectrum"][:K]).abs().max()
    return float(diff) / float(lam[0])


def verdict(
    summaries: dict[str, dict[str, Any]], metrics: dict[str, Any], cfg: Config
) -> list[dict[str, Any]]:
    """The verdict rows.

    Each row's ``source`` cites WWS22 or WW23 or, where the threshold is our
    choice, says ``ours (docs/recipes/escape_direction.md)``. ``rho_k`` is the
    Euclidean share of the displacement in the top k Hessian directions.
    """
    cfg = resolved(cfg)
    sgd, ctrl = summaries["sgd"], summaries["control"]
    gdu = summaries.get("gd_unstable")
    ku = metrics["unstable_directions"]
    k20 = 20 if 20 <= len(sgd["shares_at_escape"]) else len(sgd["shares_at_escape"])
    rho1_sgd = sgd["shares_at_escape"][0]
    rho1_gd = None if gdu is None else gdu["shares_at_escape"][0]
    rho_ku_gd = None if gdu is None else sum(gdu["shares_at_escape"][:ku])
    perron = sgd["perron_rho_at_measured_rate"].get(str(k20))
    rho_k20 = sum(sgd["shares_at_escape"][:k20])
    gap = None if perron is None else abs(rho_k20 - perron)
    diff = None if rho1_gd is None else rho1_gd - rho1_sgd
    rate = sgd["growth_rate_measured"]
    gamma0 = sgd["gamma0"]
    growth = sgd["growth_factor"] / gamma0
    ratio = metrics["lambda2_over_lambda1"]
    C = common.claim
    return [
        C(
            "theta* is GD-stable: train_lr * lambda_1(theta*) < 2",
            cfg.train_lr * metrics["lambda_1"],
            "<",
            2.0,
            source=f"{WWS22}: GD's linear stability",
        ),
        C(
            f"GD at eta' escapes along the {ku} direction(s) unstable at eta': "
            f"rho_{ku} at escape",
            rho_ku_gd,
            ">=",
            0.9,
            source=f"{OURS}; claim: {WW23}",
            note=f"eta' = {cfg.unstable_factor}*2/lambda_1; lambda_2/lambda_1 = "
            f"{ratio if ratio is None else f'{ratio:.3g}'}; mean of {cfg.gd_runs} runs",
        ),
        C(
            "SGD escapes off the sharpest direction: rho_1(GD at eta') - rho_1(SGD)",
            diff,
            ">=",
            0.3,
            source=f"{OURS}; claim: {WW23}",
            note=f"rho_1(GD) = {rho1_gd if rho1_gd is None else f'{rho1_gd:.3g}'}, "
            f"rho_1(SGD) = {rho1_sgd:.3g}",
        ),
        C(
            "... with most of its displacement off u_1: rho_1(SGD) at escape",
            rho1_sgd,
            "<=",
            0.5,
            source=f"{OURS}; claim: {WW23}",
            note=f"B = {cfg.batch_size}, mean of {cfg.runs} runs",
        ),
        C(
            "SGD escapes: fraction of runs reaching L >= escape_factor * L(theta*)",
            sgd["escaped_fraction"],
            ">=",
            0.9,
            source=f"{OURS}; claim: {WWS22}, Fig. 4",
        ),
        C(
            f"SGD's profile is WW23's Perron profile: abs(rho_{k20}(SGD) - "
            f"Perron rho_{k20}) at the measured growth rate",
            gap,
            "<=",
            0.12,
            source=f"{OURS}; profile: {WW23}",
            note=f"rho_{k20} = {rho_k20:.3g}, Perron (g_j = 1) "
            f"{perron if perron is None else f'{perron:.3g}'} at r = "
            f"{rate if rate is None else f'{rate:.3g}'} per step",
        ),
        C(
            "escape predicted for SGD: gamma_0 = eta^2 Tr(H Sigma) / (2 L B)",
            gamma0,
            ">",
            1.0,
            source=f"{WWS22}, Thm 3.5",
            note=f"Tr(H Sigma) = {metrics['tr_h_sigma']:.4g}, B = {cfg.batch_size}",
        ),
        C(
            "SGD loss grows exponentially: early growth factor / gamma_0",
            growth,
            ">=",
            0.5,
            source=f"{OURS}; claim: {WWS22}, Thm 3.5 (a lower bound)",
            note=f"growth over {cfg.growth_steps} steps = {sgd['growth_factor']:.3g}",
        ),
        C(
            "control has gamma_0 < 1",
            ctrl["gamma0"],
            "<",
            1.0,
            source=f"{WWS22}, Thm 3.5 / Lemma 3.6 (the setting of the control)",
            note=f"B = {cfg.control_batch_size}",
        ),
        C(
            "control does not escape: fraction of runs escaping",
            ctrl["escaped_fraction"],
            "<=",
            0.1,
            source=OURS,
        ),
    ]


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

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.2))
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
    ax[0].set(
        xlabel="step", ylabel="share of ‖δ‖² in top k, ρ_k (mean)", ylim=(0, 1.02)
    )
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
            j, arms["sgd"]["perron_profile"], "k--", lw=1, label="Perron (WW23)"
        )
    ax[1].set(xlabel="eigen-direction j", ylabel="share s_j at escape (within top K)")
    ax[2].set(xlabel="eigen-direction j", ylabel="loss share ℓ_j at escape")
    ax[1].legend(fontsize=7)
    ax[2].legend(fontsize=7)
    _plot_shares(ax[3], res["metrics"], colors)
    p2 = out / "escape_direction.png"
    common.save_figure(fig, p2)
    return [p1, p2]


def _plot_shares(ax: Any, m: dict[str, Any], colors: list[str]) -> None:
    """Bars of ρ_k (SGD, GD at η'), the Perron ρ_k and τ_k; ρ_k/τ_k in the labels."""
    ks = sorted(int(key[4:]) for key in m if key.startswith("tau_"))
    ks = [k for k in ks if k in TAU_KS] or ks
    bars = [
        ("SGD ρ_k", "rho_{}_sgd", colors[0]),
        ("GD(η') ρ_k", "rho_{}_gd_unstable", colors[1]),
        ("Perron ρ_k (measured r)", "perron_rho_{}_sgd", "k"),
        ("τ_k (share of Tr H)", "tau_{}", "0.6"),
    ]
    width = 0.2
    for i, (label, key, col) in enumerate(bars):
        vals = [m.get(key.format(k)) for k in ks]
        xs = [j + (i - 1.5) * width for j in range(len(ks))]
        ax.bar(
            xs,
            [math.nan if v is None else v for v in vals],
            width,
            color=col,
            label=label,
        )
    ticks = []
    for k in ks:
        r = m.get(f"rho_{k}_over_tau_{k}_sgd")
        ticks.append(f"k={k}" + ("" if r is None else f"\nρ/τ={r:.2f}"))
    ax.set_xticks(range(len(ks)), ticks, fontsize=7)
    ax.set(ylabel="share", ylim=(0, 1.02))
    ax.legend(fontsize=6)


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__)
