"""Hessian sharpness report of a timm model on a small dataset (issue #2 §5).

Builds ``timm.create_model(name, pretrained=False, num_classes=...)`` (default the
small ``test_byobnet``), optionally trains it for a few epochs with SGD, then measures
on a fixed subset of the training data, in eval mode: the top-k Hessian eigenvalues
and ``λ_min`` (thick-restart Lanczos), ``Tr H`` and ``‖H‖_F`` (Hutchinson, with
standard errors), the stability ratio ``lr·λ_max/2`` of the training learning rate
(the plain-GD threshold; with heavy-ball momentum β, GD on a quadratic is stable up
to ``λ < (2 + 2β)/lr``), the expected sharpness ``E L(θ+ν) − L(θ)``,
``ν ~ N(0, σ²I)``, and the spectral density (stochastic Lanczos quadrature).

Commands (outputs under ``<out-dir>/sharpness_report/``)::

    python recipes/sharpness_report.py --quick   # ~1 min on 2 CPU cores
    python recipes/sharpness_report.py           # 3 epochs, k = 10, finer density
    python recipes/sharpness_report.py --model resnet18 --dataset cifar10 \\
        --data-dir data --download --image-size 32 --device cuda

Expected: the table of measures and a verdict of internal consistency checks, all
PASS (Lanczos converged; ``λ_min ≤ λ_max``; the density integrates to 1;
``‖H‖_F² ≥ Σ_{i≤k} λ_i²`` within 3 standard errors). Writes ``config.json``,
``results.json`` and ``sharpness.png`` (top eigenvalues, spectral density). The
test models' native input is 160 px; ``--image-size 160`` uses it (≈100× the cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from _common import option
from torch import nn

from geoopt_sgd import (
    HessianOperator,
    expected_sharpness,
    sharpness,
    spectral_density,
)

RECIPE = "sharpness_report"
NATIVE_CHANNELS = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}


@dataclass(frozen=True)
class Config(common.RunOptions):
    # model and data
    model: str = option("test_byobnet", "any timm name, or 'mlp' / 'cnn' / 'linear'")
    width: int = option(128, "hidden width of 'mlp' / channels of 'cnn'")
    dataset: str = option(
        "digits", "'digits' (offline), 'mnist', 'fashion_mnist', 'cifar10'"
    )
    data_dir: str | None = option(None, "where torchvision datasets live")
    download: bool = option(False, "download a missing torchvision dataset")
    image_size: int = option(
        16, "input side (digits are 8x8; test_* models' native: 160)"
    )
    num_train: int | None = option(None, "training subset (None: all)")
    dtype: str = option("float32", "'float32' or 'float64'")
    # optional training
    epochs: int = option(3, "SGD epochs before measuring (0: at initialisation)")
    lr: float = option(0.002, "SGD learning rate (also used for the stability ratio)")
    momentum: float = option(0.9, "SGD momentum")
    batch_size: int = option(64, "SGD batch size")
    # measures
    curvature_samples: int = option(512, "training samples the Hessian refers to")
    k: int = option(10, "top eigenvalues")
    tol: float = option(1e-3, "relative tolerance of the eigenvalues")
    trace_probes: int = option(30, "Hutchinson probes for Tr H and ||H||_F")
    density_probes: int = option(5, "probes of the spectral density")
    density_steps: int = option(40, "Lanczos steps per density probe")
    sharpness_sigma: float = option(0.01, "sigma of the expected sharpness (Z19)")
    sharpness_samples: int = option(20, "draws of the expected sharpness")
    # run
    seed: int = option(0, "seed of the split, the init, the batches, the probes")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: one epoch, k = 5, a coarse density."""
        return cls(
            epochs=1,
            curvature_samples=256,
            k=5,
            trace_probes=10,
            density_probes=2,
            density_steps=20,
            sharpness_samples=5,
        )


def main(cfg: Config) -> dict[str, Any]:
    """Train (optionally), measure, write ``results.json`` and ``sharpness.png``.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.
    """
    validate(cfg)
    with common.Run(RECIPE, cfg) as run:
        model, data = build(cfg, run.device)
        stages = common.Stages(run.open(), run.save)
        loss_fn = nn.CrossEntropyLoss()
        trained = stages.run(
            "train",
            lambda resume, snapshot: train(model, loss_fn, data, cfg, resume, snapshot),
        )
        model.load_state_dict(trained["model"])
        model.eval()
        m = min(cfg.curvature_samples, len(data.y_train))
        batch = (data.x_train[:m], data.y_train[:m])
        metrics, arrays = measure(model, loss_fn, batch, cfg)
        metrics.update(
            curvature_samples=m,
            train=evaluate(model, data.x_train, data.y_train),
            test=evaluate(model, data.x_test, data.y_test),
        )
        arrays["train_loss"] = trained["train_loss"]
        return run.finish(metrics, arrays, verdict(metrics), plot)


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On the first invalid field.
    """
    common.check_config_basics(cfg)
    common.check_choice(cfg, "dtype", ("float32", "float64"))
    common.check_min(
        cfg, ("k", "width", "batch_size", "curvature_samples", "density_probes"), 1
    )
    common.check_min(cfg, ("density_steps",), 2)
    common.check_min(cfg, ("epochs", "trace_probes"), 0)
    if cfg.trace_probes == 1:
        raise ValueError(
            "`trace_probes` must be 0 or >= 2 (for a standard error); got 1."
        )
    common.check_min(cfg, ("sharpness_samples",), 1)
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1); got {cfg.momentum!r}.")
    for name in ("tol", "sharpness_sigma"):
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                "`tol` and `sharpness_sigma` must be > 0 and finite; got "
                f"`{name}` = {value!r}."
            )


def build(cfg: Config, device: torch.device) -> tuple[nn.Module, common.DataSplit]:
    """Load the data and build the seeded model.

    Raises:
        ValueError: If ``k`` exceeds the parameter count.
    """
    dtype = getattr(torch, cfg.dtype)
    data = common.load_data(
        cfg.dataset,
        image_size=cfg.image_size,
        in_chans=NATIVE_CHANNELS[cfg.dataset],
        flatten=common.model_wants_flat(cfg.model),
        num_train=cfg.num_train,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=cfg.seed,
        dtype=dtype,
    )
    model = common.make_model(
        cfg.model,
        data.num_classes,
        in_chans=data.in_chans,
        input_dim=data.input_dim,
        image_size=data.image_size,
        width=cfg.width,
        seed=cfg.seed,
        dtype=dtype,
    ).to(device)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.k > P:
        raise ValueError(f"`k` must be <= the parameter count P = {P}; got {cfg.k}.")
    return model, data.to(device)


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    data: common.DataSplit,
    cfg: Config,
    resume: dict[str, Any] | None,
    snapshot: Any,
) -> dict[str, Any]:
    """SGD for ``cfg.epochs`` epochs, a snapshot after each (the stage "train").

    The batches of epoch ``e`` come from a generator seeded with ``seed·1000 + e``,
    so a resumed run draws the same batches.

    Returns:
        ``{"train_loss": per-step losses, "model": the trained state dict}``.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    first, losses = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        first, losses = resume["epoch"], resume["train_loss"]
    n = len(data.y_train)
    per_epoch = math.ceil(n / cfg.batch_size)
    bar = common.progress_bar(
        total=cfg.epochs * per_epoch, initial=first * per_epoch, desc="train"
    )
    for epoch in range(first, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen, device="cpu").to(data.x_train.device)
        for b in range(per_epoch):
            common.maybe_interrupt(epoch * per_epoch + b)  # units: training steps
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=cfg.lr)
        snapshot(
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "train_loss": losses,
            }
        )
    bar.close()
    return {"train_loss": losses, "model": model.state_dict()}


def measure(
    model: nn.Module, loss_fn: nn.Module, batch: tuple, cfg: Config
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sharpness measures on ``batch`` (model in eval mode): metrics, arrays."""
    bar = common.progress_bar(total=3, desc="curvature")
    bar.set_postfix(step="eigenvalues + trace")
    rep = sharpness(
        model,
        loss_fn,
        batch,
        k=cfg.k,
        lr=cfg.lr,
        tol=cfg.tol,
        trace_probes=cfg.trace_probes,
        seed=cfg.seed,
    )
    bar.update(1)
    bar.set_postfix(step="spectral density")
    sd = spectral_density(
        HessianOperator(model, loss_fn, batch),
        num_probes=cfg.density_probes,
        num_steps=cfg.density_steps,
        num_points=400,
        seed=cfg.seed,
    )
    bar.update(1)
    bar.set_postfix(step="expected sharpness")
    es = expected_sharpness(
        model,
        loss_fn,
        batch,
        sigma=cfg.sharpness_sigma,
        num_samples=cfg.sharpness_samples,
        seed=cfg.seed,
    )
    bar.update(1)
    bar.close()
    report = rep.as_dict()
    dx = float(sd.grid[1] - sd.grid[0])
    metrics = {
        **report,
        "num_params": sum(p.numel() for p in model.parameters()),
        "expected_sharpness": float(es.value),
        "expected_sharpness_stderr": float(es.stderr),
        "expected_sharpness_quadratic": (
            None if rep.trace is None else cfg.sharpness_sigma**2 / 2 * rep.trace
        ),
        "density_mass": float(sd.density.sum()) * dx,
        "density_n_hvp": int(sd.n_matvec),
    }
    arrays = {
        "top_eigenvalues": report["top_eigenvalues"],
        "density_grid": sd.grid.tolist(),
        "density": sd.density.tolist(),
    }
    return metrics, arrays


def verdict(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Internal consistency checks of the measures."""
    C = common.claim
    rows = [
        C(
            "Lanczos converged to tol",
            float(metrics["converged"]),
            ">=",
            1.0,
            source="the solver's own residual test",
        ),
        C(
            "lambda_min <= lambda_max",
            metrics["lambda_max"] - metrics["lambda_min"],
            ">=",
            0.0,
            source="an identity",
        ),
        C(
            "spectral density integrates to 1 (|mass - 1|)",
            abs(metrics["density_mass"] - 1),
            "<=",
            0.05,
            source="ours (docs/recipes/sharpness_report.md)",
        ),
    ]
    fro = metrics["frobenius"]
    if fro is not None:
        # ||H||_F^2 >= sum of the top-k lambda_i^2 exactly; the estimate may fall
        # short by its noise, so allow three standard errors of ||H||_F^2
        fro2_se = 2 * fro * (metrics["frobenius_stderr"] or 0.0)
        top2 = sum(x * x for x in metrics["top_eigenvalues"])
        rows.append(
            C(
                "||H||_F^2 (+3 s.e.) >= sum of top-k lambda^2 (ratio)",
                (fro**2 + 3 * fro2_se) / max(top2, 1e-300),
                ">=",
                1.0,
                source="an identity, with 3 standard errors of the estimate",
            )
        )
    return rows


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Cross-entropy and accuracy in eval mode, in chunks of 512."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), 512):
            out = model(x[i : i + 512])
            loss += float(
                nn.functional.cross_entropy(out, y[i : i + 512], reduction="sum")
            )
            correct += int((out.argmax(1) == y[i : i + 512]).sum())
    model.train(was)
    return {"loss": loss / len(y), "accuracy": correct / len(y)}


def table(results: dict[str, Any]) -> str:
    """The measures as a Markdown table (printed before the verdict)."""
    m = results["metrics"]

    def pm(v, s):
        if v is None:
            return "n/a"
        return f"{v:.4g}" + ("" if s is None else f" ± {s:.2g}")

    rows = [("λ_max", f"{m['lambda_max']:.4g}")]
    rows += [
        (f"λ_{i + 1}", f"{v:.4g}") for i, v in enumerate(m["top_eigenvalues"][1:], 1)
    ]
    rows += [
        ("λ_min", f"{m['lambda_min']:.4g}"),
        ("Tr H", pm(m["trace"], m["trace_stderr"])),
        ("‖H‖_F", pm(m["frobenius"], m["frobenius_stderr"])),
        ("lr·λ_max/2", pm(m["stability_ratio"], None)),
        (
            "expected sharpness",
            pm(m["expected_sharpness"], m["expected_sharpness_stderr"]),
        ),
        (
            "train / test accuracy",
            f"{m['train']['accuracy']:.3f} / {m['test']['accuracy']:.3f}",
        ),
        ("HVPs (eig + trace, density)", f"{m['n_hvp']}, {m['density_n_hvp']}"),
    ]
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def plot(results_path: str | Path) -> Path:
    """Draw ``sharpness.png`` (top eigenvalues, spectral density) from the JSON."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    a, m = res["arrays"], res["metrics"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    top = a["top_eigenvalues"]
    ax[0].plot(range(1, len(top) + 1), top, "o-", ms=4)
    ax[0].axhline(
        m["lambda_min"], color="grey", ls=":", label=f"λ_min = {m['lambda_min']:.3g}"
    )
    ax[0].set(
        xlabel="index i", ylabel="Hessian eigenvalue λ_i", title="top eigenvalues"
    )
    ax[0].legend(fontsize=7)
    ax[1].semilogy(a["density_grid"], [max(d, 1e-14) for d in a["density"]])
    for v in top:
        ax[1].axvline(v, color="C1", lw=0.5, alpha=0.6)
    ax[1].set(xlabel="eigenvalue", ylabel="density (SLQ)", title="spectral density")
    # outliers carry weight ~1/P each: keep the axis low enough to show them
    ax[1].set_ylim(bottom=1e-10)
    fig.suptitle(f"{res['config']['model']} on {res['config']['dataset']}", fontsize=9)
    path = Path(results_path).parent / "sharpness.png"
    common.save_figure(fig, path)
    return path


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__, report=table)
