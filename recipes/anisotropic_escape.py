"""Anisotropic noise escapes sharp minima (Zhu et al. 2019, arXiv:1803.00195).

Claim (Z19, "The Anisotropic Noise in SGD"): noise aligned with the Hessian (SGD's
own, or GLD's with C, H or u_1) leaves sharp minima for flat ones; isotropic noise of
the same size does not.

* **The 2-D toy (Fig. 2).** A sharp basin at (1, 1) (Hessian eigenvalues 20 and
  200) and a flat one at (-1, -1) (2I). From w = (1, 1), GD plus noise of total
  variance 0.01 per step in six flavours (none, isotropic, diag(C), C, H, u_1),
  100 runs each, written out vectorised here. Success: w ends in the flat basin.
* **The net: escaping a GD minimum (Figs. 3, 5).** Z19's FashionMNIST setting on the
  offline ``digits`` (1,000 clean + 200 random-label images; MLP 64→32→32→10, ReLU,
  CE): GD to θ*_GD, then each dynamic of Z19 (GD, the GLD variants through
  :class:`geoopt_sgd.NoisyGD`, mini-batch SGD; docs/science/dynamics.md) from it at
  the same lr. Measured: accuracies, expected sharpness, and along SGD
  Tr(HΣ)/Tr(HΣ̄) and â.

Commands (from the repository root; outputs under ``<out-dir>/anisotropic_escape/``)::

    python recipes/anisotropic_escape.py --quick            # CI setting
    python recipes/anisotropic_escape.py                    # full: 3 seeds
    python recipes/anisotropic_escape.py --part toy         # the toy only (seconds)
    python recipes/anisotropic_escape.py --dataset fashion_mnist \\
        --data-dir ~/data --download --model cnn            # the paper's data

Expected: every verdict row PASS. Toy: GD never escapes, GLD-const and GLD-diag in
≤ 5% of runs, GLD-lead/Hess/1eig in ≥ 20%, Tr(HC) > Tr(HC̄) at (1, 1). Net: the
anisotropic group (SGD, lead, Hess, 1eig) ends ≥ 1 pp more accurate and flatter
than the isotropic one (GD, const, dyn, diag); Tr(HΣ)/Tr(HΣ̄) ≥ 5 and â > 1 along
SGD. Figures ``toy.png`` / ``net.png``; runtimes and numbers: recipes/README.md;
every verdict row and where its threshold comes from:
docs/recipes/anisotropic_escape.md.
"""

from __future__ import annotations

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
    expected_sharpness,
    noise_geometry,
    top_eigenpairs,
)

RECIPE = "anisotropic_escape"

TOY_DYNAMICS = ("gd", "const", "diag", "lead", "hess", "1eig")
NET_DYNAMICS = ("gd", "const", "dyn", "diag", "lead", "hess", "1eig", "sgd")
ISOTROPIC_GROUP = ("gd", "const", "dyn", "diag")
ANISOTROPIC_GROUP = ("sgd", "lead", "hess", "1eig")
# Verdict sources: the paper, and the page that gives our thresholds and their evidence.
Z19 = "Zhu et al. 2019, arXiv:1803.00195"
DOC = "docs/recipes/anisotropic_escape.md"
# The NoisyGD noise kind behind each GLD variant of Z19 (docs/science/dynamics.md).
NOISE_KIND = {
    "gd": "none",
    "const": "isotropic",
    "dyn": "isotropic_matched",
    "diag": "diagonal",
    "lead": "sgd_leading",
    "hess": "hessian",
    "1eig": "top_eigvec",
}


@dataclass(frozen=True)
class Config(common.RunOptions):
    part: str = option("both", "'toy' (Z19 Fig. 2), 'net' (Figs. 3, 5) or 'both'")
    seed: int = option(0, "base seed; the net part runs seeds seed .. +num_seeds-1")
    # --- the 2-D toy (Z19 Fig. 2, as in the authors' released code)
    toy_runs: int = option(100, "independent runs per dynamic, each with fresh data")
    toy_points: int = option(100, "data points per run")
    toy_steps: int = option(500, "iterations per run")
    toy_lr: float = option(0.005, "step size")
    toy_noise_var: float = option(
        0.01, "total noise variance E||eps||^2 per step (param units)"
    )
    toy_traj_runs: int = option(4, "trajectories per dynamic kept for the figure")
    # --- the net: escaping a GD minimum (Z19 Figs. 3, 5)
    dataset: str = option(
        "digits", "'digits' (offline), 'fashion_mnist', 'mnist', 'cifar10'"
    )
    data_dir: str | None = option(None, "where torchvision data lives")
    download: bool = option(False, "download a missing torchvision dataset")
    model: str = option("mlp", "'mlp', 'cnn', 'linear' or any timm name")
    width: int = option(32, "hidden width / channels of the small models")
    activation: str = option("relu", "'relu' or 'tanh' (mlp)")
    image_size: int | None = option(None, "input side for image models (None: native)")
    num_train: int = option(
        1200, "training samples (the last num_corrupt get random labels)"
    )
    num_corrupt: int = option(200, "training labels replaced by random labels")
    lr: float = option(0.2, "step size of GD to theta*_GD and of every dynamic")
    gd_steps: int = option(3000, "GD iterations to reach theta*_GD")
    steps: int = option(1000, "iterations of each dynamic from theta*_GD")
    batch_size: int = option(20, "SGD batch; noise magnitudes are matched to it")
    dynamics: tuple[str, ...] = option(NET_DYNAMICS, "subset of the dynamics to run")
    k: int = option(20, "eigenpairs of GLD-lead / GLD-Hess")
    refresh_every: int = option(10, "steps between noise-statistics refreshes")
    const_noise: float = option(1e-3, "GLD-const std per coordinate, rho")
    eval_every: int = option(100, "steps between accuracy evaluations")
    sharpness_sigma: float = option(0.01, "expected-sharpness radius delta")
    sharpness_samples: int = option(1000, "Monte-Carlo draws of expected sharpness")
    geometry_every: int = option(
        500, "steps between Tr(H Sigma) / a-hat probes along SGD"
    )
    geometry_k: int = option(10, "Lanczos pairs of the probe (u_1, lambda_1)")
    top_k: int = option(50, "Hessian eigenvalues reported at theta*_GD")
    num_seeds: int = option(3, "seeds of the net part (the verdict averages them)")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: 1 seed, 2k GD steps, 600 steps per dynamic."""
        return cls(
            num_seeds=1,
            gd_steps=2000,
            steps=600,
            eval_every=100,
            sharpness_samples=200,
            geometry_every=200,
            top_k=20,
            toy_traj_runs=3,
        )


def main(cfg: Config) -> dict[str, Any]:
    """Run the recipe and write ``config.json``, ``results.json`` and the figures.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.
    """
    validate(cfg)
    with common.Run(RECIPE, cfg) as run:
        net_parts = cfg.part in ("net", "both")
        seeds = range(cfg.seed, cfg.seed + cfg.num_seeds) if net_parts else []
        first = prepare_net(cfg, cfg.seed, run.device) if net_parts else None
        state = run.open()
        toy = {}
        if cfg.part in ("toy", "both"):
            toy = run_toy(cfg, common.Stages(state.setdefault("toy", {}), run.save))
        net = {}
        for seed in seeds:
            data, model = (
                first if seed == cfg.seed else prepare_net(cfg, seed, run.device)
            )
            seed_state = state.setdefault("net", {}).setdefault(str(seed), {})
            stages = common.Stages(seed_state, run.save)
            net[str(seed)] = run_net_seed(cfg, seed, data, model, stages)
        metrics, rows = summarise(cfg, toy, net)
        return run.finish(metrics, {"toy": toy, "net": net}, rows, plot)


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On an invalid field (unknown part, model, dataset or dynamic;
            non-positive lr or sharpness radius; counts < 1; a batch above half
            the training set).
    """
    common.check_choice(cfg, "part", ("toy", "net", "both"))
    common.check_config_basics(cfg)
    common.check_min(
        cfg, ("toy_runs", "toy_points", "toy_steps", "num_seeds", "batch_size"), 1
    )
    for name in ("toy_noise_var", "const_noise"):
        value = getattr(cfg, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"`{name}` must be >= 0 and finite; got {value}.")
    common.check_min(
        cfg, ("k", "geometry_k", "top_k", "eval_every", "refresh_every"), 1
    )
    common.check_min(cfg, ("gd_steps", "steps", "sharpness_samples"), 1)
    common.check_min(cfg, ("geometry_every", "toy_traj_runs"), 0)
    if not (cfg.sharpness_sigma > 0 and math.isfinite(cfg.sharpness_sigma)):
        raise ValueError(
            f"`sharpness_sigma` must be > 0 and finite; got {cfg.sharpness_sigma!r}."
        )
    bad = [d for d in cfg.dynamics if d not in NET_DYNAMICS]
    if bad or not cfg.dynamics:
        raise ValueError(
            "`dynamics` must be a non-empty subset of "
            f"{', '.join(map(repr, NET_DYNAMICS))}; got {cfg.dynamics!r}."
        )
    if not 0 <= cfg.num_corrupt < cfg.num_train:
        raise ValueError(
            f"`num_corrupt` must be in [0, num_train) = [0, {cfg.num_train}); "
            f"got {cfg.num_corrupt}."
        )
    if cfg.part != "toy" and cfg.batch_size > cfg.num_train // 2:
        raise ValueError(
            f"`batch_size` must be <= num_train/2 = {cfg.num_train // 2} (the "
            f"noise statistics need >= 2 batches); got {cfg.batch_size}."
        )


# ======================================================================================
# The 2-D toy (Z19 Fig. 2)
# ======================================================================================

_C = _S = math.cos(math.pi / 4)


def toy_basins(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Return the toy's fixed geometry: axes and Hessians of the two basins."""
    # the toy runs on the CPU whatever --device is (2 parameters)
    # soft axis of the sharp basin (20), stiff axis (200) toward (-1, -1)
    v1 = torch.tensor([_C, -_S], dtype=dtype, device="cpu")
    v2 = torch.tensor([_C, _S], dtype=dtype, device="cpu")
    return {
        "v1": v1,
        "v2": v2,
        "h_sharp": 20 * torch.outer(v1, v1) + 200 * torch.outer(v2, v2),
        "h_flat": 2 * torch.eye(2, dtype=dtype, device="cpu"),
    }


def toy_data(runs: int, n: int, generator: torch.Generator) -> Tensor:
    """Draw ``runs`` data sets of ``n`` points x = 0.01·(z_1√10, z_2)·K, ``(R, n, 2)``.

    K is the 45° rotation [[c, -s], [s, c]] [C-Z19 2Dim].
    """
    z = torch.randn(runs, n, 2, generator=generator, dtype=torch.float64, device="cpu")
    z = z * torch.tensor([math.sqrt(10.0), 1.0], dtype=torch.float64, device="cpu")
    rot = torch.tensor([[_C, -_S], [_S, _C]], dtype=torch.float64, device="cpu")
    return 0.01 * z @ rot


def toy_terms(w: Tensor, x: Tensor, basins: dict[str, Tensor]):
    """Per-point losses, gradients and the exact Hessian of the mean loss.

    ℓ(w; x) = min{10(c·a − s·b)² + 100(c·a + s·b)², (w_1−x_1+1)² + (w_2−x_2+1)²},
    a = w_1 − x_1 − 1, b = w_2 − x_2 − 1 (Z19 Fig. 2, as in the authors' code).

    Args:
        w: Iterates ``(R, 2)``.
        x: Data ``(R, n, 2)``.
        basins: From :func:`toy_basins`.

    Returns:
        ``(loss (R, n), grads (R, n, 2), hessian (R, 2, 2))``; the Hessian is that
        of the mean loss: each point contributes its active quadratic's Hessian.
    """
    v1, v2 = basins["v1"], basins["v2"]
    e = w[:, None, :] - x - 1.0
    q1, q2 = e @ v1, e @ v2
    loss_sharp = 10 * q1**2 + 100 * q2**2
    grad_sharp = 20 * q1[..., None] * v1 + 200 * q2[..., None] * v2
    f = w[:, None, :] - x + 1.0
    loss_flat = (f**2).sum(-1)
    grad_flat = 2 * f
    sharp = loss_sharp <= loss_flat
    loss = torch.where(sharp, loss_sharp, loss_flat)
    grads = torch.where(sharp[..., None], grad_sharp, grad_flat)
    frac = sharp.to(w.dtype).mean(1)[:, None, None]
    hessian = frac * basins["h_sharp"] + (1 - frac) * basins["h_flat"]
    return loss, grads, hessian


def _trace(m: Tensor) -> Tensor:
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def toy_noise_covariance(kind: str, c: Tensor, h: Tensor, var: float) -> Tensor:
    """Return the parameter-unit noise covariance of one toy dynamic, ``(R, 2, 2)``.

    Every non-GD dynamic has total variance ``var`` [C-Z19 2Dim]: GLD-const
    ``var/2·I``, GLD-diag ``diag(C)/Tr C·var``, GLD-lead (k = 2) ``C/Tr C·var``,
    GLD-Hess ``H/Tr H·var``, GLD-1eig ``var·u_1u_1ᵀ``.

    Args:
        kind: One of :data:`TOY_DYNAMICS`.
        c: Per-sample gradient covariances ``(R, 2, 2)``.
        h: Hessians ``(R, 2, 2)``.
        var: Total variance.

    Returns:
        The covariance.
    """
    eye = torch.eye(2, dtype=c.dtype, device=c.device).expand_as(c)
    if kind == "gd":
        return torch.zeros_like(c)
    if kind == "const":
        return var / 2 * eye
    if kind == "diag":
        return (
            torch.diag_embed(c.diagonal(dim1=1, dim2=2))
            / _trace(c)[:, None, None].clamp_min(1e-300)
            * var
        )
    if kind == "lead":
        return c / _trace(c)[:, None, None].clamp_min(1e-300) * var
    if kind == "hess":
        return h / _trace(h)[:, None, None] * var
    if kind == "1eig":
        u1 = torch.linalg.eigh(h)[1][..., -1]
        return var * u1[:, :, None] * u1[:, None, :]
    raise ValueError(
        f"`kind` must be one of {', '.join(map(repr, TOY_DYNAMICS))}; got {kind!r}."
    )


def run_toy_dynamic(kind: str, x: Tensor, cfg: Config, seed: int) -> dict[str, Any]:
    """Run one toy dynamic for all runs at once: w ← w − η∇L(w) + ε, ε ~ N(0, S).

    Args:
        kind: One of :data:`TOY_DYNAMICS`.
        x: Data ``(R, n, 2)`` (one data set per run).
        cfg: The config.
        seed: Seed of this dynamic's noise stream.

    Returns:
        Success rate, final iterates, the mean Tr(H_t S_t) per step (escape
        efficiency, S_t the injected covariance), the mean loss per step, and the
        first ``cfg.toy_traj_runs`` trajectories.
    """
    basins = toy_basins()
    gen = torch.Generator().manual_seed(seed)
    runs = x.shape[0]
    w = torch.ones(runs, 2, dtype=torch.float64, device="cpu")
    keep = min(cfg.toy_traj_runs, runs)
    traj = [w[:keep].clone()]
    tr_hs, mean_loss = [], []
    for _ in range(cfg.toy_steps):
        loss, grads, h = toy_terms(w, x, basins)
        g = grads.mean(1)
        dev = grads - g[:, None]
        c = dev.transpose(1, 2) @ dev / grads.shape[1]
        s = toy_noise_covariance(kind, c, h, cfg.toy_noise_var)
        evals, evecs = torch.linalg.eigh(s)
        z = torch.randn(runs, 2, 1, generator=gen, dtype=torch.float64, device="cpu")
        eps = (evecs * evals.clamp_min(0).sqrt()[:, None, :]) @ z
        tr_hs.append(float((h * s).sum((1, 2)).mean()))
        mean_loss.append(float(loss.mean()))
        w = w - cfg.toy_lr * g + eps[..., 0]
        traj.append(w[:keep].clone())
    success = (w[:, 0] < -0.5) & (w[:, 1] < -0.5)
    return {
        "success_rate": float(success.to(torch.float64).mean()),
        "successes": int(success.sum()),
        "final_w": w.tolist(),
        "tr_hs": tr_hs,
        "loss": mean_loss,
        "trajectories": torch.stack(traj, 1).tolist(),  # (keep, T+1, 2)
    }


def toy_alignment_ratio(x: Tensor) -> float:
    """Mean over runs of Tr(HC)/Tr(HC̄) at w = (1, 1), C̄ = Tr C/2·I.

    Z19's escaping-efficiency indicator (docs/science/metrics.md).
    """
    w = torch.ones(x.shape[0], 2, dtype=torch.float64, device=x.device)
    _, grads, h = toy_terms(w, x, toy_basins())
    dev = grads - grads.mean(1, keepdim=True)
    c = dev.transpose(1, 2) @ dev / grads.shape[1]
    ratio = (h * c).sum((1, 2)) / (_trace(h) * _trace(c) / 2)
    return float(ratio.mean())


def run_toy(cfg: Config, stages: common.Stages) -> dict[str, Any]:
    """The toy: every dynamic on the same data sets, one stage per dynamic."""
    x = toy_data(cfg.toy_runs, cfg.toy_points, torch.Generator().manual_seed(cfg.seed))
    ratio = toy_alignment_ratio(x)
    dynamics = {}
    for i, kind in enumerate(common.progress_bar(TOY_DYNAMICS, desc="toy")):
        dynamics[kind] = stages.run(
            kind,
            lambda resume, snapshot, i=i, kind=kind: run_toy_dynamic(
                kind, x, cfg, seed=1000 * cfg.seed + i + 1
            ),
        )
    return {"tr_hc_ratio": ratio, "dynamics": dynamics}


# ======================================================================================
# The net: escaping a GD minimum (Z19 Figs. 3, 5)
# ======================================================================================


def prepare_net(
    cfg: Config, seed: int, device: torch.device
) -> tuple[common.DataSplit, nn.Module]:
    """Load one seed's data and build its model.

    Raises:
        ValueError: If ``k``, ``geometry_k`` or ``top_k`` exceeds the parameter
            count, or the data cannot be loaded.
        FileNotFoundError: If a torchvision dataset is missing without --download.
    """
    data = load_net_data(cfg, seed, device)
    model = build_model(cfg, data, seed)
    num_params = sum(p.numel() for p in model.parameters())
    for name in ("k", "geometry_k", "top_k"):
        if getattr(cfg, name) > num_params:
            raise ValueError(
                f"`{name}` must be <= the parameter count {num_params}; "
                f"got {getattr(cfg, name)}."
            )
    return data, model


def load_net_data(cfg: Config, seed: int, device: torch.device) -> common.DataSplit:
    """Load the training set with ``num_corrupt`` random labels, and the test set.

    Z19 keeps 1,000 clean + 200 random-label FashionMNIST images [C-Z19]; here the
    last ``num_corrupt`` of ``num_train`` seeded samples get uniform random labels.
    Inputs are standardised (``_common.load_data``) rather than scaled to [-1, 1].
    """
    flat = common.model_wants_flat(cfg.model)
    data = common.load_data(
        cfg.dataset,
        image_size=cfg.image_size,
        flatten=flat,
        num_train=cfg.num_train,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=seed,
        dtype=torch.float64 if device.type == "cpu" else torch.float32,
    )
    g = torch.Generator().manual_seed(10_000 + seed)
    y = data.y_train.clone()
    if cfg.num_corrupt:
        y[-cfg.num_corrupt :] = torch.randint(
            0, data.num_classes, (cfg.num_corrupt,), generator=g, device="cpu"
        )
    data.y_train = y
    return data.to(device)


def build_model(cfg: Config, data: common.DataSplit, seed: int) -> nn.Module:
    """Build the model of the net part (seeded), in the data's dtype."""
    return common.make_model(
        cfg.model,
        data.num_classes,
        in_chans=data.in_chans,
        input_dim=data.input_dim,
        image_size=data.image_size,
        width=cfg.width,
        activation=cfg.activation,
        seed=seed,
        dtype=data.x_train.dtype,
    ).to(data.x_train.device)


@torch.no_grad()
def evaluate(model: nn.Module, data: common.DataSplit, loss_fn: nn.Module) -> dict:
    """Train loss and accuracy (on the corrupted labels) and test accuracy."""
    model.eval()
    out = model(data.x_train)
    test = model(data.x_test)
    return {
        "train_loss": float(loss_fn(out, data.y_train)),
        "train_acc": float((out.argmax(1) == data.y_train).double().mean()),
        "test_acc": float((test.argmax(1) == data.y_test).double().mean()),
    }


def _new_record(**extra: list) -> dict[str, list]:
    """An empty evaluation record: steps, training loss and accuracy, test accuracy."""
    return {"step": [], "train_loss": [], "train_acc": [], "test_acc": [], **extra}


def _record_evaluation(
    rec: dict[str, list], model: nn.Module, data: common.DataSplit, loss_fn, step: int
) -> dict[str, float]:
    """Evaluate the model, append the values at ``step`` to ``rec``; return them."""
    ev = evaluate(model, data, loss_fn)
    for key, v in ev.items():
        rec[key].append(v)
    rec["step"].append(step)
    return ev


def make_optimizer(
    kind: str, model: nn.Module, loss_fn: nn.Module, data, cfg: Config, seed: int
) -> torch.optim.Optimizer:
    """Return the optimizer of one dynamic: NoisyGD, or torch SGD for SGD.

    The dynamics and their noise: docs/science/dynamics.md.
    """
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    noise = NOISE_KIND[kind]
    kwargs: dict[str, Any] = {"noise": noise, "seed": seed}
    if noise == "isotropic":
        kwargs["noise_scale"] = cfg.const_noise
    elif noise != "none":
        kwargs.update(
            batch_size=cfg.batch_size,
            k=cfg.k,
            refresh_every=cfg.refresh_every,
            model=model,
            loss_fn=loss_fn,
            data=(data.x_train, data.y_train),
        )
    return NoisyGD(model.parameters(), lr=cfg.lr, **kwargs)


def _expected_sharpness(model, loss_fn, data, cfg: Config, seed: int) -> float:
    est = expected_sharpness(
        model,
        loss_fn,
        (data.x_train, data.y_train),
        sigma=cfg.sharpness_sigma,
        num_samples=cfg.sharpness_samples,
        seed=seed,
    )
    return float(est.value)


def _geometry(model, loss_fn, data, cfg: Config, seed: int, v0) -> tuple[dict, Any]:
    ng = noise_geometry(
        model,
        loss_fn,
        (data.x_train, data.y_train),
        metrics=["tr_h_sigma", "tr_h_sigma_iso", "projection_coefficient"],
        k=cfg.geometry_k,
        curvature="hessian",
        v0=v0,
        seed=seed,
    )
    vals = {k: float(v) for k, v in ng.values.items()}
    iso = vals.get("tr_h_sigma_iso", math.nan)
    vals["tr_ratio"] = vals.get("tr_h_sigma", math.nan) / iso if iso else math.nan
    return vals, ng.eigenvectors


def _top_spectrum(model, loss_fn, data, cfg: Config, seed: int) -> list[float]:
    op = HessianOperator(model, loss_fn, (data.x_train, data.y_train))
    res = top_eigenpairs(op, cfg.top_k, seed=seed)
    return [float(v) for v in res.eigenvalues]


def run_net_seed(
    cfg: Config,
    seed: int,
    data: common.DataSplit,
    model: nn.Module,
    stages: common.Stages,
) -> dict[str, Any]:
    """The net for one seed: GD to θ*_GD (stage "theta_gd"), then a stage per dynamic.

    Returns:
        ``{"pretrain", "at_gd", "dynamics"}`` (the seed's arrays).
    """
    loss_fn = nn.CrossEntropyLoss()
    gd = stages.run(
        "theta_gd",
        lambda resume, snapshot: reach_theta_gd(
            model, loss_fn, data, cfg, seed, resume, snapshot
        ),
    )
    dynamics = {}
    for kind in cfg.dynamics:

        def dynamic(resume, snapshot, kind=kind):
            model.load_state_dict(gd["theta"])
            return run_dynamic(kind, model, loss_fn, data, cfg, seed, resume, snapshot)

        dynamics[kind] = stages.run(kind, dynamic)
    return {"pretrain": gd["pretrain"], "at_gd": gd["at_gd"], "dynamics": dynamics}


def reach_theta_gd(
    model: nn.Module,
    loss_fn: nn.Module,
    data: common.DataSplit,
    cfg: Config,
    seed: int,
    resume: dict | None,
    snapshot: Any,
) -> dict[str, Any]:
    """GD to θ*_GD, then its top spectrum, expected sharpness and accuracies."""
    pretrain = pretrain_gd(model, loss_fn, data, cfg, resume, snapshot)
    theta = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    at_gd = {
        "top_eigenvalues": _top_spectrum(model, loss_fn, data, cfg, seed),
        "expected_sharpness": _expected_sharpness(model, loss_fn, data, cfg, seed),
        **evaluate(model, data, loss_fn),
    }
    return {"pretrain": pretrain, "theta": theta, "at_gd": at_gd}


def pretrain_gd(
    model: nn.Module,
    loss_fn: nn.Module,
    data: common.DataSplit,
    cfg: Config,
    resume: dict | None,
    snapshot: Any,
) -> dict[str, list]:
    """Full-batch GD at ``cfg.lr`` for ``cfg.gd_steps`` steps: θ*_GD (checkpointed)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    rec = _new_record()
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        rec, start = resume["record"], resume["step"]
    bar = common.progress_bar(total=cfg.gd_steps, initial=start, desc="GD to theta*")
    for t in range(start, cfg.gd_steps):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(data.x_train), data.y_train).backward()
        opt.step()
        bar.update(1)
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.gd_steps:
            ev = _record_evaluation(rec, model, data, loss_fn, t + 1)
            bar.set_postfix(loss=f"{ev['train_loss']:.3g}", lr=cfg.lr)
            snapshot(
                {
                    "step": t + 1,
                    "model": model.state_dict(),
                    "record": rec,
                }
            )
    bar.close()
    return rec


def run_dynamic(
    kind: str,
    model: nn.Module,
    loss_fn: nn.Module,
    data: common.DataSplit,
    cfg: Config,
    seed: int,
    resume: dict | None,
    snapshot: Any,
) -> dict[str, Any]:
    """Continue from the model's current θ*_GD with one dynamic for ``cfg.steps``.

    Saves a snapshot after every evaluation block, so an interrupted run resumes
    bit for bit.
    """
    opt = make_optimizer(kind, model, loss_fn, data, cfg, seed)
    gen = torch.Generator().manual_seed(20_000 + seed)  # SGD batch sampling
    rec = _new_record(geometry=[])
    start, v0 = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        rec, start = resume["record"], resume["step"]
    else:
        _record_evaluation(rec, model, data, loss_fn, 0)
    n = data.x_train.shape[0]
    bar = common.progress_bar(total=cfg.steps, initial=start, desc=f"{kind} s{seed}")
    for t in range(start, cfg.steps):
        common.maybe_interrupt(t)  # units: the dynamic's steps
        if (
            kind == "sgd"
            and cfg.geometry_every
            and t % cfg.geometry_every == 0
            and t > 0
        ):
            vals, v0 = _geometry(model, loss_fn, data, cfg, seed + t, v0)
            rec["geometry"].append({"step": t, **vals})
        model.train()
        opt.zero_grad(set_to_none=True)
        if kind == "sgd":
            idx = torch.randperm(n, generator=gen, device="cpu")[: cfg.batch_size]
            idx = idx.to(data.x_train.device)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        else:
            loss = loss_fn(model(data.x_train), data.y_train)
        loss.backward()
        opt.step()
        bar.update(1)
        if (t + 1) % cfg.eval_every == 0 or t + 1 == cfg.steps:
            ev = _record_evaluation(rec, model, data, loss_fn, t + 1)
            bar.set_postfix(loss=f"{ev['train_loss']:.3g}", lr=cfg.lr)
            snapshot(
                {
                    "step": t + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "record": rec,
                }
            )
    bar.close()
    last = rec["test_acc"][-3:]
    out = dict(rec)
    out["final_test_acc"] = sum(last) / len(last)
    out["final_train_acc"] = rec["train_acc"][-1]
    out["expected_sharpness"] = _expected_sharpness(model, loss_fn, data, cfg, seed)
    if isinstance(opt, NoisyGD):
        # wall-clock fields are left out so that a resumed run's results are equal
        out["noise_stats"] = {
            k: float(v) for k, v in opt.stats.items() if not k.endswith("seconds")
        }
    return out


def _group_mean(net: dict, group: tuple[str, ...], key: str) -> float:
    vals = [
        seed_res["dynamics"][k][key]
        for seed_res in net.values()
        for k in group
        if k in seed_res["dynamics"]
    ]
    return sum(vals) / len(vals) if vals else math.nan


def summarise(cfg: Config, toy: dict, net: dict) -> tuple[dict, list[dict]]:
    """Summary metrics and the verdict rows of the parts that ran.

    Each row's ``source`` cites Z19 or, where the threshold is our choice, says
    ``ours (docs/recipes/anisotropic_escape.md)``.
    """
    metrics: dict[str, Any] = {}
    rows: list[dict] = []
    if toy:
        rows += _toy_verdict(toy, metrics)
    if net:
        rows += _net_verdict(cfg, net, metrics)
    return metrics, rows


def _toy_verdict(toy: dict, metrics: dict[str, Any]) -> list[dict]:
    """The toy's rows; adds the toy's success rates and Tr(HC) ratio to ``metrics``."""
    rows: list[dict] = []
    rates = {k: toy["dynamics"][k]["success_rate"] for k in toy["dynamics"]}
    metrics["toy_success_rate"] = rates
    metrics["toy_tr_hc_ratio_at_start"] = toy["tr_hc_ratio"]
    src = f"ours ({DOC}), from a re-run of the authors' code; claim: {Z19}, Fig. 2"
    rows.append(
        common.claim(
            "toy: GD never escapes", rates["gd"], "<=", 0, source=f"{Z19}, Fig. 2"
        )
    )
    for k in ("const", "diag"):
        rows.append(
            common.claim(
                f"toy: GLD-{k} rarely escapes (success rate)",
                rates[k],
                "<=",
                0.05,
                source=src,
            )
        )
    for k in ("lead", "hess", "1eig"):
        rows.append(
            common.claim(
                f"toy: GLD-{k} escapes often (success rate)",
                rates[k],
                ">=",
                0.20,
                source=src,
            )
        )
    rows.append(
        common.claim(
            "toy: Tr(HC) > Tr(HC_iso) at (1,1) (ratio)",
            toy["tr_hc_ratio"],
            ">",
            1.0,
            source=f"{Z19}, Fig. 2, the Tr(H Sigma) indicator",
            note="re-run of the released code: about 1.7",
        )
    )
    return rows


def _net_verdict(cfg: Config, net: dict, metrics: dict[str, Any]) -> list[dict]:
    """The net's rows; adds the group means and SGD's probe medians to ``metrics``."""
    rows: list[dict] = []
    iso, aniso = ISOTROPIC_GROUP, ANISOTROPIC_GROUP
    acc_iso = _group_mean(net, iso, "final_test_acc")
    acc_aniso = _group_mean(net, aniso, "final_test_acc")
    sh_iso = _group_mean(net, iso, "expected_sharpness")
    sh_aniso = _group_mean(net, aniso, "expected_sharpness")
    geo = [
        g
        for s in net.values()
        for g in s["dynamics"].get("sgd", {}).get("geometry", [])
    ]
    ratio = _median([g["tr_ratio"] for g in geo])
    a_hat = _median([g.get("projection_coefficient", math.nan) for g in geo])
    metrics.update(
        test_acc_isotropic_group=acc_iso,
        test_acc_anisotropic_group=acc_aniso,
        expected_sharpness_isotropic_group=sh_iso,
        expected_sharpness_anisotropic_group=sh_aniso,
        tr_ratio_median_along_sgd=ratio,
        projection_coefficient_median_along_sgd=a_hat,
    )
    per_dyn = {}
    for k in cfg.dynamics:
        per_dyn[k] = {
            key: _group_mean(net, (k,), key)
            for key in ("final_test_acc", "final_train_acc", "expected_sharpness")
        }
    metrics["per_dynamic"] = per_dyn
    ours = f"ours ({DOC})"
    rows += [
        common.claim(
            "net: anisotropic group ends more accurate (test acc gain, pp)",
            100 * (acc_aniso - acc_iso),
            ">=",
            1.0,
            source=f"{ours}; claim: {Z19}, Fig. 3",
            note=f"groups {aniso} vs {iso}; mean of the last 3 evaluations",
        ),
        common.claim(
            "net: anisotropic group ends flatter (exp. sharpness ratio)",
            sh_aniso / sh_iso if sh_iso else math.nan,
            "<",
            1.0,
            source=f"{Z19}, Figs. 3, 5 (qualitative)",
        ),
        common.claim(
            "net: Tr(H Sigma) >> Tr(H Sigma_iso) along SGD (median ratio)",
            ratio,
            ">=",
            5.0,
            source=f"{ours}; claim: {Z19}, Fig. 5",
        ),
        common.claim(
            "net: projection coefficient a-hat > 1 along SGD (median)",
            a_hat,
            ">",
            1.0,
            source=f"{ours}; a-hat of {Z19}, Prop. 1",
        ),
    ]
    return rows


def _median(values: list[float]) -> float:
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return math.nan
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else 0.5 * (vals[m - 1] + vals[m])


# ======================================================================================
# Figures (from results.json only)
# ======================================================================================

LABELS = {
    "gd": "GD",
    "const": "GLD const",
    "dyn": "GLD dynamic",
    "diag": "GLD diag",
    "lead": "GLD leading",
    "hess": "GLD Hessian",
    "1eig": "GLD 1st eigvec",
    "sgd": "SGD",
}


def plot(results_path: str | Path) -> list[Path]:
    """Redraw the figures from ``results.json`` alone; return the PNG paths."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    out = Path(results_path).parent
    paths = []
    if res["arrays"]["toy"]:
        paths.append(_plot_toy(plt, res["arrays"]["toy"], out))
    if res["arrays"]["net"]:
        paths.append(_plot_net(plt, res, out))
    return paths


def _plot_toy(plt: Any, toy: dict, out: Path) -> Path:
    """``toy.png``: trajectories over the loss contours, success rates, Tr(H_t S_t)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    basins = toy_basins()
    g = torch.linspace(-1.6, 1.6, 161, dtype=torch.float64, device="cpu")
    ww = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    loss, _, _ = toy_terms(
        ww, torch.zeros(ww.shape[0], 1, 2, dtype=torch.float64, device="cpu"), basins
    )
    ax = axes[0]
    ax.contour(
        g,
        g,
        loss.reshape(161, 161).log10(),
        levels=20,
        cmap="Greys",
        linewidths=0.5,
    )
    for i, (kind, d) in enumerate(toy["dynamics"].items()):
        for j, tr in enumerate(d["trajectories"]):
            t = torch.tensor(tr, device="cpu")
            ax.plot(
                t[:, 0],
                t[:, 1],
                lw=0.6,
                color=f"C{i}",
                label=LABELS[kind] if j == 0 else None,
            )
    ax.set(
        title="trajectories over the loss contours (noise-free data)",
        xlabel="w1",
        ylabel="w2",
    )
    ax.legend(fontsize=7)
    kinds = list(toy["dynamics"])
    axes[1].bar(
        [LABELS[k] for k in kinds],
        [100 * toy["dynamics"][k]["success_rate"] for k in kinds],
        color=[f"C{i}" for i in range(len(kinds))],
    )
    axes[1].axhline(20, ls="--", c="k", lw=0.8)
    axes[1].axhline(5, ls=":", c="k", lw=0.8)
    axes[1].set(title="escapes to the flat minimum (%)", ylabel="success rate (%)")
    axes[1].tick_params(axis="x", rotation=45)
    for i, k in enumerate(kinds):
        axes[2].plot(
            toy["dynamics"][k]["tr_hs"], color=f"C{i}", label=LABELS[k], lw=0.8
        )
    axes[2].set(
        title="Tr(H_t S_t) (mean over runs)", xlabel="iteration", yscale="symlog"
    )
    axes[2].legend(fontsize=7)
    return common.save_figure(fig, out / "toy.png")


def _plot_net(plt: Any, res: dict, out: Path) -> Path:
    """``net.png``: accuracies, expected sharpness, Tr(HΣ) along SGD, top spectrum."""
    net = res["arrays"]["net"]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    seed0 = next(iter(net.values()))
    for i, (kind, d) in enumerate(seed0["dynamics"].items()):
        axes[0].plot(
            d["step"],
            [100 * a for a in d["test_acc"]],
            color=f"C{i}",
            label=LABELS[kind],
        )
        axes[1].plot(
            d["step"],
            [100 * a for a in d["train_acc"]],
            color=f"C{i}",
            label=LABELS[kind],
        )
    axes[0].set(title="test accuracy (%), from theta*_GD", xlabel="iteration")
    axes[1].set(title="train accuracy (%), noisy labels", xlabel="iteration")
    axes[0].legend(fontsize=7)
    per = res["metrics"]["per_dynamic"]
    kinds = list(per)
    axes[2].bar(
        [LABELS[k] for k in kinds],
        [per[k]["expected_sharpness"] for k in kinds],
        color=["C0" if k in ISOTROPIC_GROUP else "C3" for k in kinds],
    )
    axes[2].set(title="final expected sharpness (blue: isotropic)")
    plt.setp(axes[2].get_xticklabels(), rotation=45, ha="right")
    geo = seed0["dynamics"].get("sgd", {}).get("geometry", [])
    if geo:
        steps = [g["step"] for g in geo]
        axes[3].plot(steps, [g["tr_h_sigma"] for g in geo], "o-", label="Tr(H Sigma)")
        axes[3].plot(
            steps, [g["tr_h_sigma_iso"] for g in geo], "o:", label="Tr(H Sigma_iso)"
        )
        axes[3].set(yscale="log", title="Tr(H Sigma) along SGD", xlabel="iteration")
        axes[3].legend(fontsize=7)
    top = seed0["at_gd"]["top_eigenvalues"]
    axes[4].plot(range(1, len(top) + 1), top, "o-", ms=3)
    axes[4].set(title="top Hessian eigenvalues at theta*_GD", xlabel="index")
    return common.save_figure(fig, out / "net.png")


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__)
