"""The alignment of SGD noise with the curvature (WWS22 Figs. 1-2; WW23).

Wu, Wang & Su 2022 (arXiv:2207.02628, Figs. 1-2) measure, along SGD training with
the square loss ``½‖f − y‖²``, the loss-scaled alignment factors ``α = Tr(ΣG) /
(‖Σ‖_F‖G‖_F)``, ``β = ‖Σ‖_F / (2L‖G‖_F)``, ``μ = αβ``, ``μ_1``, ``μ_2`` and the
gradient norm uniformity ``γ`` for a random-feature model, a linear network with
fewer samples than parameters (n = 100, d = 50), a fully connected net and a conv
net: ``α`` stays near 1, ``μ`` clearly positive, and ``μ`` at convergence barely
moves over a 100× range of model sizes (CNN: ≈1.05 → 1.0). Wang & Wu 2023
(arXiv:2310.00692) bound the alignment from below for linear models in terms of
the sample size against the input's effective dimension: weaker for few samples,
``μ ≥ 1`` for many (Gaussian inputs: ``Σ ≈ ∇L∇Lᵀ + 2L·G``).

The papers' four families, each trained with SGD at three sizes (the parameter
counts span ≥ 100×), and timm's ``test_resnet`` (GroupNorm) at one size; every
``every`` steps ``noise_geometry(..., route="exact")`` on the whole training set;
then linear regression on Gaussian inputs (d = 100, a linear teacher) for
n ∈ {20, 100, 1000}, isotropic and decaying input spectra, several data draws
each, with ``μ`` and the directional alignment ``g(u_k)`` along the top-``k`` GGN
eigenvectors. The loss is :class:`geoopt_sgd.HalfSquaredError`, the papers'
``½‖f − y‖²`` (the library measures the loss as passed: ``L``, ``Σ`` and ``G`` are
the papers'; the ratios ``α``, ``β``, ``μ`` would be the same for any constant
multiple of it, since the GGN scales with the loss).

Models (``docs/recipes/alignment.md``): ``rfm`` (fixed ReLU features, trained
head; inputs on the sphere, a 2-neuron ReLU teacher), ``linear_net`` (bias-free
deep linear net, Gaussian inputs, a linear teacher), ``fcn`` (tanh MLP on digits,
±1 even/odd targets), ``cnn`` (two conv layers and a linear head) and ``timm``
(``test_resnet`` with ``channels`` and GroupNorm) on 8×8 digits, the same targets.

Commands (outputs under ``<out-dir>/alignment/``)::

    python recipes/alignment.py --quick      # ~5 min on 2 CPU cores at load 5
    python recipes/alignment.py              # more samples, steps, draws
    python recipes/alignment.py --device cuda --fcn-samples 1000 \\
        --cnn-samples 1000 --timm-samples 1000 --timm-widths 8,24  # not measured

Verdict rows: ``α`` ≥ 0.5 and ``μ`` ≥ 0.2 at every measurement; every run
converged; ``μ`` at convergence (the mean over an SGD tail: one iterate's ``μ``
jumps by ±0.3 near convergence; with ``inits`` > 1 also over initialisations)
within a factor 1.1 (CNN, the paper's) or 1.25 (the others, ours) over each ≥ 100×
size sweep; ``μ`` and ``min_j g(u_j)`` lower at n = 20 than at n = 1000 for both
spectra; ``μ ≥ 1`` at n = 1000 (the bias-free linear model of WWS22 Prop. 2.3).
Measured (``--quick``, seeds 0-2, ``recipes/README.md``): seed 2 passes every row;
seeds 0 and 1 fail the CNN's 10% flatness (1.15, 1.21: on 100 digits the ReLU
CNN's sizes differ by more than 10%); exit status 1 then. Full setting (seed 0):
every flatness and n row passes (CNN 1.037); three small models do not converge in
6,000 steps, and the timm ResNet's ``α`` and ``μ`` dip to 0.24 and 0.18
mid-training, so rows 1-3 fail. Writes ``config.json``, ``results.json`` and
``alignment.png``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from _common import option
from torch import nn

from geoopt_sgd import HalfSquaredError, noise_geometry

RECIPE = "alignment"
FAMILIES = ("rfm", "linear_net", "fcn", "cnn", "timm")
# what noise_geometry measures along training (WWS22 §2: alpha, beta, mu, mu_1,
# mu_2; gamma is its gradient_uniformity)
TRAIN_METRICS = ("loss", "alpha", "beta", "mu", "mu1", "mu2", "gradient_uniformity")
SPECTRA = ("isotropic", "decaying")
SRC_WWS22 = "Wu, Wang & Su 2022, arXiv:2207.02628"
SRC_WW23 = "Wang & Wu 2023, arXiv:2310.00692"
OURS = "ours (docs/recipes/alignment.md)"


@dataclass(frozen=True)
class Config(common.RunOptions):
    families: tuple[str, ...] = option(FAMILIES, "families to train (a subset)")
    # random-feature model
    rfm_dim: int = option(10, "rfm: input dimension d (inputs uniform on S^{d-1})")
    rfm_samples: int = option(100, "rfm: training samples")
    rfm_widths: tuple[int, ...] = option((200, 2000, 20000), "rfm: feature counts m")
    rfm_lr: float = option(5.0, "rfm: SGD learning rate")
    # deep linear network
    linear_dim: int = option(50, "linear_net: input dimension d")
    linear_samples: int = option(100, "linear_net: training samples n")
    linear_depth: int = option(3, "linear_net: hidden layers")
    linear_widths: tuple[int, ...] = option((4, 32, 128), "linear_net: widths")
    linear_lr: float = option(0.05, "linear_net: SGD learning rate")
    # fully connected tanh net on digits
    fcn_samples: int = option(300, "fcn: training digits")
    fcn_widths: tuple[int, ...] = option((5, 20, 160), "fcn: hidden widths (2 layers)")
    fcn_lr: float = option(0.2, "fcn: SGD learning rate")
    # conv nets on digits: two 3x3 conv layers + linear head, and a timm ResNet
    cnn_samples: int = option(300, "cnn: training digits")
    cnn_widths: tuple[int, ...] = option((6, 21, 68), "cnn: channels")
    cnn_lr: float = option(0.1, "cnn: SGD learning rate")
    cnn_activation: str = option(
        "relu", "cnn: activation, 'relu', 'gelu', 'softplus' or 'tanh'"
    )
    cnn_pool: str = option("max", "cnn: 2x2 pooling, 'max' or 'avg'")
    timm_model: str = option("test_resnet", "timm: a timm ResNet name")
    timm_samples: int = option(300, "timm: training digits")
    timm_widths: tuple[int, ...] = option((8,), "timm: channels of every stage")
    timm_lr: float = option(0.05, "timm: SGD learning rate")
    image_size: int = option(8, "cnn, timm: input side (digits are 8x8)")
    # SGD and the measurements
    batch_size: int = option(10, "SGD batch size B")
    max_steps: int = option(6000, "SGD steps at most per run")
    stop_loss: float = option(1e-4, "stop a run once the training loss is below")
    every: int = option(300, "measure every this many SGD steps")
    tail: int = option(25, "mu at convergence: mean of this many measurements ...")
    tail_every: int = option(20, "... taken every this many steps from convergence on")
    inits: int = option(
        1,
        "initialisations per size (families with >= 2 sizes): mu at convergence "
        "of a size is the mean over them",
    )
    # alignment against the sample size (linear regression)
    nsweep_dim: int = option(100, "n sweep: input dimension d")
    nsweep_samples: tuple[int, ...] = option((20, 100, 1000), "n sweep: sample sizes")
    nsweep_decay: float = option(
        0.9, "n sweep: decaying spectrum s_j = decay^j (d_eff ~ 1/(1-decay))"
    )
    nsweep_lr_factor: float = option(0.25, "n sweep: lr = factor / lambda_max(G)")
    nsweep_steps: int = option(2000, "n sweep: SGD steps at most")
    nsweep_every: int = option(100, "n sweep: measure every this many steps")
    nsweep_stop: float = option(1e-12, "n sweep: stop once the loss is below")
    nsweep_draws: int = option(5, "n sweep: data draws per (spectrum, n)")
    k: int = option(5, "n sweep: top GGN eigenvectors for g(u_k)")
    # thresholds (docs/recipes/alignment.md says which are the papers')
    alpha_min: float = option(0.5, "row: alpha >= this at every measurement")
    mu_min: float = option(0.2, "row: mu >= this at every measurement")
    cnn_flat_max: float = option(1.1, "row: max/min mu at convergence, cnn")
    flat_max: float = option(1.25, "row: max/min mu at convergence, other families")
    dtype: str = option("float64", "'float32' or 'float64'")
    seed: int = option(0, "seed of the data, the initialisation and the batches")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: fewer samples and steps, the same sizes and rows.

        On 100 digits one initialisation's ``μ`` at convergence varies from one
        minimum to the next by ±0.1 (FCN) and one iterate's by ±0.3 (CNN), so a
        size's value is the mean over 3 initialisations (12 tail values each);
        the FCN at lr 0.1 (at 0.2 its ``α`` falls to 0.40 in the first fast
        descent) is read at ``L < 1e-3`` (it crawls for thousands of steps from
        there to 1e-4). The n sweep keeps the two sizes its rows compare.
        """
        return cls(
            rfm_samples=50,
            fcn_samples=100,
            fcn_lr=0.1,
            cnn_samples=100,
            timm_samples=100,
            max_steps=4000,
            stop_loss=1e-3,
            tail=12,
            tail_every=10,
            inits=3,
            nsweep_samples=(20, 1000),
            nsweep_steps=1000,
            nsweep_draws=8,
        )


def main(cfg: Config) -> dict[str, Any]:
    """Run the recipe; write ``config.json``, ``results.json`` and ``alignment.png``.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.
    """
    validate(cfg)
    with common.Run(RECIPE, cfg, threads=1) as run:
        tasks = {f: load_task(f, cfg, run.device) for f in cfg.families}
        stages = common.Stages(run.open(), run.save)
        runs: dict[str, dict[str, Any]] = {}
        unit = 0
        for fam in cfg.families:
            for width in widths_of(cfg, fam):
                for init in range(inits_of(cfg, fam)):
                    common.maybe_interrupt(unit)  # units: training runs
                    unit += 1
                    key = run_key(fam, width, init)
                    runs[key] = stages.run(
                        f"train/{key}",
                        lambda _r, _s, f=fam, w=width, i=init: train_run(
                            tasks[f], f, w, cfg, run.device, i
                        ),
                    )
        nsweep: dict[str, dict[str, Any]] = {}
        for spectrum in SPECTRA:
            for n in cfg.nsweep_samples:
                common.maybe_interrupt(unit)
                unit += 1
                nsweep[f"{spectrum}/{n}"] = stages.run(
                    f"nsweep/{spectrum}/{n}",
                    lambda _r, _s, sp=spectrum, m=n: nsweep_runs(
                        sp, m, cfg, run.device
                    ),
                )
        metrics, rows = summarise(runs, nsweep, cfg)
        arrays = {"runs": runs, "nsweep": nsweep}
        return run.finish(metrics, arrays, rows, plot)


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On the first invalid field.
    """
    common.check_config_basics(cfg)
    common.check_choice(cfg, "dtype", ("float32", "float64"))
    common.check_choice(cfg, "cnn_activation", ("relu", "gelu", "softplus", "tanh"))
    common.check_choice(cfg, "cnn_pool", ("max", "avg"))
    if not cfg.families:
        raise ValueError("`families` must name at least one family.")
    for fam in cfg.families:
        if fam not in FAMILIES:
            raise ValueError(
                f"`families` must be among {', '.join(map(repr, FAMILIES))}; "
                f"got {fam!r}."
            )
    if len(set(cfg.families)) != len(cfg.families):
        raise ValueError(f"`families` must not repeat; got {cfg.families!r}.")
    if "timm" in cfg.families:
        common.check_model_name(cfg.timm_model)
    common.check_min(
        cfg,
        (
            "rfm_dim",
            "linear_dim",
            "linear_depth",
            "batch_size",
            "max_steps",
            "every",
            "tail",
            "tail_every",
            "inits",
            "nsweep_dim",
            "nsweep_steps",
            "nsweep_every",
            "nsweep_draws",
            "k",
        ),
        1,
    )
    common.check_min(cfg, ("rfm_samples", "linear_samples"), 2)
    common.check_min(cfg, ("image_size",), 4)
    for fam in FAMILIES:
        ws = widths_of(cfg, fam)
        name = {"linear_net": "linear_widths"}.get(fam, f"{fam}_widths")
        if not ws or min(ws) < 1 or len(set(ws)) != len(ws):
            raise ValueError(f"`{name}` must hold distinct widths >= 1; got {ws!r}.")
    if len(cfg.nsweep_samples) < 2 or min(cfg.nsweep_samples) < 2:
        raise ValueError(
            f"`nsweep_samples` must hold >= 2 sizes >= 2; got {cfg.nsweep_samples!r}."
        )
    if cfg.k > cfg.nsweep_dim:
        raise ValueError(f"`k` must be <= nsweep_dim = {cfg.nsweep_dim}; got {cfg.k}.")
    for name in ("fcn_samples", "cnn_samples", "timm_samples"):
        v = getattr(cfg, name)
        if not 2 <= v <= 1347:
            raise ValueError(f"`{name}` must be in [2, 1347] (digits); got {v}.")
    if not 0 < cfg.nsweep_decay <= 1:
        raise ValueError(f"`nsweep_decay` must be in (0, 1]; got {cfg.nsweep_decay}.")
    for name in ("stop_loss", "nsweep_stop", "nsweep_lr_factor"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{name}` must be > 0; got {v!r}.")
    for name in ("cnn_flat_max", "flat_max"):
        if not getattr(cfg, name) >= 1:
            raise ValueError(f"`{name}` must be >= 1; got {getattr(cfg, name)!r}.")


# --------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------


def widths_of(cfg: Config, family: str) -> tuple[int, ...]:
    """The sizes (widths, features or channels) of ``family``'s sweep."""
    return getattr(cfg, {"linear_net": "linear_widths"}.get(family, f"{family}_widths"))


def inits_of(cfg: Config, family: str) -> int:
    """Initialisations per size: ``cfg.inits`` where the family has a size sweep
    (its flatness row reads the mean over them), else 1."""
    return cfg.inits if len(widths_of(cfg, family)) > 1 else 1


def run_key(family: str, width: int, init: int = 0) -> str:
    """``"fcn/20"`` for the first initialisation, ``"fcn/20/2"`` for the third."""
    return f"{family}/{width}" if init == 0 else f"{family}/{width}/{init}"


def load_task(family: str, cfg: Config, device: torch.device) -> dict[str, Any]:
    """The training set of ``family`` (seeded by ``cfg.seed``), on ``device``.

    * ``rfm``: ``x`` uniform on the unit sphere in ``R^d``; ``y = ReLU(√d v_1·x) −
      ReLU(√d v_2·x)``, ``v_j`` uniform unit vectors (a 2-neuron ReLU teacher).
    * ``linear_net``: ``x ~ N(0, I_d)``, ``y = b·x / √d``, ``b ~ N(0, I_d)``.
    * ``fcn`` / ``cnn`` / ``timm``: digits (flat 64 / 1×S×S, standardised),
      ``y = ±1`` for even/odd labels.

    Returns:
        ``{"x", "y"}`` with ``y`` of shape ``(n, 1)``.
    """
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    if family == "rfm":
        d, n = cfg.rfm_dim, cfg.rfm_samples
        x = torch.randn(n, d, generator=gen, dtype=torch.float64, device="cpu")
        x = x / x.norm(dim=1, keepdim=True)
        v = torch.randn(2, d, generator=gen, dtype=torch.float64, device="cpu")
        v = v / v.norm(dim=1, keepdim=True) * math.sqrt(d)
        h = torch.relu(x @ v.T)
        y = (h[:, :1] - h[:, 1:]).contiguous()
    elif family == "linear_net":
        d, n = cfg.linear_dim, cfg.linear_samples
        x = torch.randn(n, d, generator=gen, dtype=torch.float64, device="cpu")
        b = torch.randn(d, 1, generator=gen, dtype=torch.float64, device="cpu")
        y = x @ b / math.sqrt(d)
    else:
        n = getattr(cfg, f"{family}_samples")
        data = common.load_data(
            "digits",
            image_size=8 if family == "fcn" else cfg.image_size,
            in_chans=1,
            flatten=family == "fcn",
            num_train=n,
            seed=cfg.seed,
        )
        x, y = data.x_train.double(), common.parity_targets(data.y_train, torch.float64)
    return {"x": x.to(device, dtype), "y": y.to(device, dtype)}


def build_model(
    family: str, width: int, task: dict[str, Any], cfg: Config, seed: int
) -> nn.Module:
    """The seeded model of ``family`` at size ``width`` (one output)."""
    dtype = getattr(torch, cfg.dtype)
    d = int(task["x"][0].numel())
    if family == "rfm":
        return common.make_model(
            "rfm", 1, input_dim=d, width=width, seed=seed, dtype=dtype
        )
    if family == "linear_net":
        return common.make_model(
            "deep_linear",
            1,
            input_dim=d,
            width=width,
            depth=cfg.linear_depth,
            seed=seed,
            dtype=dtype,
        )
    if family == "fcn":
        return common.make_model(
            "mlp",
            1,
            input_dim=d,
            width=width,
            depth=2,
            activation="tanh",
            seed=seed,
            dtype=dtype,
        )
    if family == "cnn":
        return common.make_model(
            "cnn",
            1,
            in_chans=1,
            image_size=cfg.image_size,
            width=width,
            cnn_activation=cfg.cnn_activation,
            cnn_pool=cfg.cnn_pool,
            seed=seed,
            dtype=dtype,
        )
    # a timm ResNet with `width` channels in every stage and GroupNorm(1 group),
    # a per-sample normalisation: the measured function is the trained one
    return common.make_model(
        cfg.timm_model,
        1,
        in_chans=1,
        image_size=cfg.image_size,
        seed=seed,
        dtype=dtype,
        timm_args={
            "channels": (width,) * 4,
            "stem_width": width,
            "norm_layer": "groupnorm1",
        },
    )


def num_params(model: nn.Module) -> int:
    """Trainable parameters (the ``P`` of the metrics)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def _measure(
    model: nn.Module, task: dict, names: tuple[str, ...], seed: int, **kw: Any
) -> Any:
    return noise_geometry(
        model,
        HalfSquaredError(),
        (task["x"], task["y"]),
        metrics=list(names),
        route="exact",
        max_samples=len(task["y"]),
        seed=seed,
        **kw,
    )


def _sgd(
    model: nn.Module,
    task: dict[str, Any],
    lr: float,
    cfg: Config,
    steps: int,
    every: int,
    stop: float,
    measure: Any,
    lr_name: str,
    gen: torch.Generator,
    tail: int = 1,
    tail_every: int = 1,
) -> dict[str, list]:
    """SGD with batches drawn without replacement per epoch; ``measure(step)``
    at step 0 and every ``every`` steps until the loss is below ``stop`` (or
    ``steps`` are done), then ``tail - 1`` more times every ``tail_every`` steps.

    Returns:
        ``{"step": [...], <measure's keys>: [...], "converged_at": the first
        measured step with L < stop or None, "tail_from": the index of the
        first of the last ``tail`` measurements}``.

    Raises:
        Diverged: If the training loss is not finite at a measurement.
    """
    x, y = task["x"], task["y"]
    loss_fn = HalfSquaredError()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record: dict[str, Any] = {"step": []}

    def at(step: int) -> bool:
        loss = common.full_batch_loss(model, loss_fn, x, y)
        if not math.isfinite(loss):
            raise common.Diverged(
                f"the training loss is {loss} at step {step}: pass a smaller "
                f"--{lr_name.replace('_', '-')} (now {lr:g})."
            )
        record["step"].append(step)
        for key, v in measure(step).items():
            record.setdefault(key, []).append(v)
        return loss < stop

    bar = common.progress_bar(total=steps, desc=lr_name.split("_")[0])
    _step = _batches(model, task, opt, cfg, gen, bar)
    done = at(0)
    step, converged_at = 0, (0 if done else None)
    while not done and step < steps:
        step = _step(step)
        if step % every == 0 or step == steps:
            done = at(step)
            if done:
                converged_at = step
            bar.set_postfix(loss=f"{record['loss'][-1]:.2e}")
    tail_from = len(record["step"]) - 1
    for _ in range(tail - 1):
        for _ in range(tail_every):
            step = _step(step)
        at(step)
    bar.close()
    record["converged_at"] = converged_at
    record["tail_from"] = tail_from
    return record


def _batches(
    model: nn.Module, task: dict[str, Any], opt: Any, cfg: Config, gen: Any, bar: Any
) -> Any:
    """One SGD step per call, batches without replacement within an epoch."""
    x, y = task["x"], task["y"]
    n = len(y)
    B = min(cfg.batch_size, n)
    loss_fn = HalfSquaredError()
    perm, pos = torch.randperm(n, generator=gen, device="cpu"), 0

    def step(t: int) -> int:
        nonlocal perm, pos
        if pos + B > n:
            perm, pos = torch.randperm(n, generator=gen, device="cpu"), 0
        idx = perm[pos : pos + B].to(x.device)
        pos += B
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        bar.update(1)
        return t + 1

    return step


def train_run(
    task: dict[str, Any],
    family: str,
    width: int,
    cfg: Config,
    device: torch.device,
    init: int = 0,
) -> dict[str, Any]:
    """SGD on ``family`` at size ``width``, measuring :data:`TRAIN_METRICS`.

    Initialisation ``init`` seeds the model and the batches with ``cfg.seed + 1000
    * init`` (the data stay those of ``cfg.seed``; ``init = 0`` is ``cfg.seed``).

    Returns:
        ``{"num_params", "width", "init", "lr", "step", <metric>: [...]}``.
    """
    seed = cfg.seed + 1000 * init
    model = build_model(family, width, task, cfg, seed).to(device)
    lr_name = {"linear_net": "linear_lr"}.get(family, f"{family}_lr")
    lr = getattr(cfg, lr_name)
    gen = torch.Generator().manual_seed(seed * 1000 + 1)

    def measure(step: int) -> dict[str, float]:
        res = _measure(model, task, TRAIN_METRICS, seed=step)
        return {m: res.values[m] for m in TRAIN_METRICS}

    rec = _sgd(
        model,
        task,
        lr,
        cfg,
        cfg.max_steps,
        cfg.every,
        cfg.stop_loss,
        measure,
        lr_name,
        gen,
        tail=cfg.tail,
        tail_every=cfg.tail_every,
    )
    return {
        "num_params": num_params(model),
        "width": width,
        "init": init,
        "lr": lr,
        **rec,
    }


def nsweep_inputs(
    spectrum: str, n: int, cfg: Config, device: torch.device, draw: int = 0
) -> dict[str, Any]:
    """Gaussian inputs ``x ~ N(0, S)`` and a linear teacher ``y = b·x / √Tr S``.

    ``S = I`` (isotropic, ``d_eff = Tr S / ‖S‖ = d``) or ``S = diag(decay^j)``
    (``d_eff ≈ 1 / (1 − decay)``); ``b ~ N(0, I)``. Seeded by ``seed``, ``n``
    and ``draw`` only, so both spectra see the same draws.
    """
    d = cfg.nsweep_dim
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * draw + 17 + n)
    if spectrum == "isotropic":
        s = torch.ones(d, dtype=torch.float64, device="cpu")
    else:
        s = cfg.nsweep_decay ** torch.arange(d, dtype=torch.float64, device="cpu")
    z = torch.randn(n, d, generator=gen, dtype=torch.float64, device="cpu")
    b = torch.randn(d, 1, generator=gen, dtype=torch.float64, device="cpu")
    x = z * s.sqrt()
    y = x @ b / math.sqrt(float(s.sum()))
    dtype = getattr(torch, cfg.dtype)
    d_eff = float(s.sum() / s.max())
    return {"x": x.to(device, dtype), "y": y.to(device, dtype), "d_eff": d_eff}


def nsweep_runs(spectrum: str, n: int, cfg: Config, device: torch.device) -> dict:
    """:func:`nsweep_run` on ``nsweep_draws`` independent draws of the data.

    Returns:
        ``{"n", "spectrum", "d_eff", "draws": [one record per draw]}``.
    """
    draws = [nsweep_run(spectrum, n, cfg, device, i) for i in range(cfg.nsweep_draws)]
    d_eff = draws[0]["d_eff"]
    return {"n": n, "spectrum": spectrum, "d_eff": d_eff, "draws": draws}


def nsweep_model(cfg: Config) -> nn.Module:
    """The ordinary linear model ``f(x) = θᵀx`` of WWS22 Prop. 2.3, bias-free.

    A bias is a constant feature, not a Gaussian one: along it ``Σ_bb = 2L −
    (mean residual)²`` falls short of ``2L·G_bb``, so with a bias ``μ ≥ 1`` is not
    what the proposition says.
    """
    return common.make_model(
        "deep_linear",
        1,
        input_dim=cfg.nsweep_dim,
        depth=0,
        seed=cfg.seed,
        dtype=getattr(torch, cfg.dtype),
    )


def nsweep_run(
    spectrum: str, n: int, cfg: Config, device: torch.device, draw: int = 0
) -> dict:
    """Linear regression (:func:`nsweep_model`) on :func:`nsweep_inputs` by SGD.

    The learning rate is ``nsweep_lr_factor / λ_max(G)``, ``G = XᵀX / n`` the
    (exact, constant) Gauss-Newton matrix. Measures
    ``μ``, ``μ_1``, ``g(u_j)`` for the top-``k`` eigenvectors and the mean ``g``
    over random directions.
    """
    task = nsweep_inputs(spectrum, n, cfg, device, draw)
    model = nsweep_model(cfg).to(device)
    xd = task["x"].double()
    lam = float(torch.linalg.eigvalsh(xd.T @ xd / n)[-1])
    lr = cfg.nsweep_lr_factor / lam
    k = min(cfg.k, num_params(model))
    names = (
        "loss",
        "mu",
        "mu1",
        "directional_alignment",
        "directional_alignment_random",
    )

    def measure(step: int) -> dict[str, Any]:
        res = _measure(model, task, names, seed=step, k=k, tol=1e-6)
        g = res.directional_alignment
        return {
            "loss": res.values["loss"],
            "mu": res.values["mu"],
            "mu1": res.values["mu1"],
            "g_top": math.nan if g is None else float(g.min()),
            "g_top_all": [] if g is None else [float(v) for v in g],
            "g_random": res.values["directional_alignment_random"],
        }

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 2 + 7919 * draw)
    rec = _sgd(
        model,
        task,
        lr,
        cfg,
        cfg.nsweep_steps,
        cfg.nsweep_every,
        cfg.nsweep_stop,
        measure,
        "nsweep_lr_factor",
        gen,
    )
    return {"n": n, "spectrum": spectrum, "d_eff": task["d_eff"], "lr": lr, **rec}


# --------------------------------------------------------------------------------------
# Summary and verdict
# --------------------------------------------------------------------------------------


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean(values: list) -> float:
    vals = _finite(values)
    return statistics.fmean(vals) if vals else math.nan


def _median(values: list) -> float:
    vals = _finite(values)
    return statistics.median(vals) if vals else math.nan


def _trajectory(rec: dict[str, Any], key: str) -> list[float]:
    """``key`` along training while the loss is positive (μ is 0/0 at L = 0)."""
    return _finite(
        [v for v, L in zip(rec[key], rec["loss"], strict=True) if L and L > 0]
    )


def summarise(
    runs: dict[str, dict], nsweep: dict[str, dict], cfg: Config
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Summary metrics and the verdict rows."""
    C = common.claim
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    alphas, mus, worst_a, worst_m = [], [], "", ""
    for key, rec in runs.items():
        a, m = _trajectory(rec, "alpha"), _trajectory(rec, "mu")
        if a and (not alphas or min(a) < min(alphas)):
            worst_a = key
        if m and (not mus or min(m) < min(mus)):
            worst_m = key
        alphas += a
        mus += m
        metrics[f"{key}/mu_converged"] = _mean(rec["mu"][rec["tail_from"] :])
        metrics[f"{key}/converged_at"] = rec["converged_at"]
        metrics[f"{key}/final_loss"] = rec["loss"][-1]
        metrics[f"{key}/steps"] = rec["step"][-1]
        metrics[f"{key}/num_params"] = rec["num_params"]
        for name in ("alpha", "beta", "mu", "gradient_uniformity"):
            vals = _trajectory(rec, name)
            metrics[f"{key}/{name}_min"] = min(vals) if vals else math.nan
    n_meas = len(alphas)
    rows.append(
        C(
            "alpha near 1 along training: min alpha over every measurement",
            min(alphas) if alphas else None,
            ">=",
            cfg.alpha_min,
            source=f"claim: {SRC_WWS22}, Figs. 1-2; threshold {OURS}",
            note=f"{n_meas} measurements; lowest in {worst_a}",
        )
    )
    rows.append(
        C(
            "mu clearly positive along training: min mu over every measurement",
            min(mus) if mus else None,
            ">=",
            cfg.mu_min,
            source=f"claim: {SRC_WWS22}, Figs. 1-2; threshold {OURS}",
            note=f"{len(mus)} measurements; lowest in {worst_m}",
        )
    )
    unconverged = [k for k, rec in runs.items() if rec["converged_at"] is None]
    rows.append(
        C(
            f"every run converged (reached L < {cfg.stop_loss:g}, where mu at "
            "convergence is read): number of runs that did not",
            len(unconverged),
            "<=",
            0,
            source=f"{SRC_WWS22} (mu at convergence); the level: {OURS}",
            note=("not converged: " + ", ".join(unconverged)) if unconverged else "",
        )
    )
    p_ratios = []
    for fam in cfg.families:
        ws = widths_of(cfg, fam)
        if len(ws) < 2:
            continue
        inits = inits_of(cfg, fam)
        mu_c = []
        for w in ws:
            # a size's mu at convergence: the mean over its initialisations
            per = [metrics[f"{run_key(fam, w, i)}/mu_converged"] for i in range(inits)]
            fin = _finite(per)
            mu_c.append(statistics.fmean(fin) if len(fin) == len(per) else math.nan)
            metrics[f"{fam}/{w}/mu_converged_size"] = mu_c[-1]
        ps = [runs[run_key(fam, w)]["num_params"] for w in ws]
        p_ratio = max(ps) / min(ps)
        p_ratios.append(p_ratio)
        fin = _finite(mu_c)
        flat = max(fin) / min(fin) if len(fin) == len(mu_c) and min(fin) > 0 else None
        metrics[f"{fam}/mu_flatness"] = flat
        metrics[f"{fam}/param_ratio"] = p_ratio
        is_cnn = fam in ("cnn", "timm")
        rows.append(
            C(
                f"mu roughly flat in model size ({fam}): max/min of mu at convergence "
                f"over P = {min(ps)}..{max(ps)}",
                flat,
                "<=",
                cfg.cnn_flat_max if is_cnn else cfg.flat_max,
                source=(
                    f"{SRC_WWS22}, Fig. 2 (CNN: 1.05 -> 1.0 over > 100x)"
                    if is_cnn
                    else f"claim: {SRC_WWS22}, Fig. 2; threshold {OURS}"
                ),
                note="mu at convergence: "
                + ", ".join("n/a" if m is None else f"{m:.3f}" for m in mu_c)
                + f" (mean of {cfg.tail} measurements {cfg.tail_every} steps apart"
                + (f", mean over {inits} initialisations)" if inits > 1 else ")"),
            )
        )
    rows.append(
        C(
            "the size sweeps span >= 100x parameters: min over families of P_max/P_min",
            min(p_ratios) if p_ratios else None,
            ">=",
            100,
            source=f"{SRC_WWS22}, Fig. 2 (over 100x)",
        )
    )
    # alignment against n
    n_lo, n_hi = min(cfg.nsweep_samples), max(cfg.nsweep_samples)
    for sp in SPECTRA:
        for n in cfg.nsweep_samples:
            rec = nsweep[f"{sp}/{n}"]
            for key in ("mu", "mu1", "g_top", "g_random"):
                # the median along each draw's training, averaged over the draws
                metrics[f"nsweep/{sp}/{n}/{key}_median"] = statistics.fmean(
                    _median(_trajectory(r, key)) for r in rec["draws"]
                )
            metrics[f"nsweep/{sp}/{n}/d_eff"] = rec["d_eff"]
    for sp in SPECTRA:
        lo = metrics[f"nsweep/{sp}/{n_lo}/mu_median"]
        hi = metrics[f"nsweep/{sp}/{n_hi}/mu_median"]
        d_eff = nsweep[f"{sp}/{n_lo}"]["d_eff"]
        rows.append(
            C(
                f"alignment weaker at small n ({sp} inputs, d_eff = {d_eff:.0f}): "
                f"median mu along training (mean over draws), n = {n_lo} over "
                f"n = {n_hi}",
                lo / hi if hi > 0 else None,
                "<",
                1.0,
                source=f"{SRC_WW23} (the claim; the threshold is its direction)",
                note=f"mu medians {lo:.3f} (n = {n_lo}) and {hi:.3f} (n = {n_hi})",
            )
        )
        lo = metrics[f"nsweep/{sp}/{n_lo}/g_top_median"]
        hi = metrics[f"nsweep/{sp}/{n_hi}/g_top_median"]
        rows.append(
            C(
                f"directional alignment weaker at small n ({sp}): median over training "
                f"of min_j g(u_j), j <= {cfg.k}, n = {n_lo} over n = {n_hi}",
                lo / hi if hi > 0 else None,
                "<",
                1.0,
                source=f"{SRC_WW23} (the claim; the threshold is its direction)",
                note=f"medians {lo:.3f} (n = {n_lo}) and {hi:.3f} (n = {n_hi})",
            )
        )
    large = [metrics[f"nsweep/{sp}/{n_hi}/mu_median"] for sp in SPECTRA]
    rows.append(
        C(
            f"large-n linear regression gives mu >= 1: median mu along training at "
            f"n = {n_hi} (mean over draws), min over the two spectra",
            common.strict_min(large),
            ">=",
            1.0,
            source=f"{SRC_WWS22}, Prop. 2.3 (Gaussian inputs: mu >= 1)",
            note=", ".join(
                f"{sp} {v:.4f}" for sp, v in zip(SPECTRA, large, strict=True)
            ),
        )
    )
    return metrics, rows


# --------------------------------------------------------------------------------------
# Report and figure
# --------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """Per run: P, steps, final loss, min α, min μ, μ at convergence, min γ."""
    m = results["metrics"]
    lines = [
        "| run | P | steps | final loss | min α | min β | min μ | μ conv. | min γ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in results["arrays"]["runs"]:

        def f(name, fmt=".3f", key=key):
            v = m.get(f"{key}/{name}")
            return "n/a" if v is None else format(v, fmt)

        lines.append(
            f"| {key} | {m[f'{key}/num_params']} | {m[f'{key}/steps']} | "
            f"{f('final_loss', '.1e')} | {f('alpha_min')} | {f('beta_min')} | "
            f"{f('mu_min')} | {f('mu_converged')} | {f('gradient_uniformity_min')} |"
        )
    lines += ["", "| n sweep | d_eff | μ | μ_1 | min_j g(u_j) | g(random) |"]
    lines += ["|---|---|---|---|---|---|"]
    for key in results["arrays"]["nsweep"]:

        def g(name, key=key):
            v = m.get(f"nsweep/{key}/{name}")
            return "n/a" if v is None else f"{v:.3f}"

        lines.append(
            f"| {key} | {g('d_eff')} | {g('mu_median')} | {g('mu1_median')} | "
            f"{g('g_top_median')} | {g('g_random_median')} |"
        )
    return "\n".join(lines)


def plot(results_path: str | Path) -> Path:
    """Draw ``alignment.png`` from the JSON: α, μ, β, γ along training (every run),
    μ at convergence against P, and μ and min g(u_j) against n."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    runs, nsweep, m = res["arrays"]["runs"], res["arrays"]["nsweep"], res["metrics"]
    fams = list(dict.fromkeys(k.split("/")[0] for k in runs))
    colors = {f: f"C{i}" for i, f in enumerate(FAMILIES)}
    fig, ax = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("alpha", "α = Tr(ΣG)/(‖Σ‖‖G‖)"),
        ("mu", "μ = Tr(ΣG)/(2L‖G‖²)"),
        ("beta", "β = ‖Σ‖/(2L‖G‖)"),
        ("gradient_uniformity", "γ (gradient norm uniformity)"),
    ]
    where = [ax[0, 0], ax[0, 1], ax[0, 2], ax[1, 0]]
    for (name, label), a in zip(panels, where, strict=True):
        for fam in fams:
            keys = [k for k in runs if k.startswith(fam + "/")]
            for j, key in enumerate(keys):
                rec = runs[key]
                a.plot(
                    rec["step"],
                    [math.nan if v is None else v for v in rec[name]],
                    color=colors[fam],
                    alpha=0.35 + 0.65 * (j + 1) / len(keys),
                    lw=1,
                    label=fam if j == len(keys) - 1 else None,
                )
        a.set(xlabel="SGD step", title=label)
        if name == "alpha":
            a.set_ylim(0, 1.05)
        a.legend(fontsize=7)
    a = ax[1, 1]
    for fam in fams:
        # one point per size: the mean over its initialisations where measured
        keys = [k for k in runs if k.startswith(fam + "/") and k.count("/") == 1]
        a.plot(
            [runs[k]["num_params"] for k in keys],
            [m.get(f"{k}/mu_converged_size", m.get(f"{k}/mu_converged")) for k in keys],
            "o-",
            color=colors[fam],
            label=fam,
        )
    a.set_xscale("log")
    a.set(xlabel="parameters P", ylabel="μ at convergence", title="μ against size")
    a.legend(fontsize=7)
    a = ax[1, 2]
    for i, sp in enumerate(SPECTRA):
        keys = [k for k in nsweep if k.startswith(sp + "/")]
        ns = [nsweep[k]["n"] for k in keys]
        a.plot(
            ns,
            [m.get(f"nsweep/{k}/mu_median") for k in keys],
            "o-",
            color=f"C{i}",
            label=f"μ, {sp}",
        )
        a.plot(
            ns,
            [m.get(f"nsweep/{k}/g_top_median") for k in keys],
            "s--",
            color=f"C{i}",
            label=f"min g(u_j), {sp}",
        )
    a.axhline(1.0, color="grey", lw=0.7, ls=":")
    a.set_xscale("log")
    a.set(
        xlabel="samples n (d = 100)",
        ylabel="median along training",
        title="linear regression: alignment against n",
    )
    a.legend(fontsize=7)
    fig.suptitle(f"alignment (seed {res['seed']})", fontsize=9)
    fig.subplots_adjust(hspace=0.35, wspace=0.25)
    path = Path(results_path).parent / "alignment.png"
    common.save_figure(fig, path)
    return path


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__, report=table)
