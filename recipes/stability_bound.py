"""SGD's stability bound on ‖H‖_F over model sizes (WWS22 Fig. 3) and Tr(HΣ) against
its isotropic reference across widths (Z19 Fig. 4).

Part ``bound`` (Wu, Wang & Su 2022, arXiv:2207.02628, Thm 3.3 and Fig. 3): a linearly
stable minimum of SGD with learning rate η and batch B satisfies
``‖H‖_F ≤ √(B/μ_0)/η`` (μ_0 a lower bound of the alignment factor μ), a limit that
does not depend on the parameter count P, while the isotropic-noise analogue bounds
``Tr H`` by ``√(PB)/η``. For each model family (WWS22's tanh FCN ``mlp`` and a conv
net ``cnn`` on digits with ±1 even/odd targets and ½(f − y)²; optionally the
random-feature model ``rfm`` and the deep linear net ``deep_linear``) and each size
of a sweep (≥ 10× in P), SGD at the same η (per family: 0.2, the ReLU ``cnn``
0.05) with B = 5 and B = 40; along training:
the loss, ‖H‖_F and Tr H (exact from the dense Hessian up to ``exact_max``
parameters, Hutchinson with its standard error above) and μ
(:func:`geoopt_sgd.noise_geometry`); μ_0 is the median μ over the evaluations in the
last 10% of the steps, and the tightness ratio is ``‖H‖_F·η·√(μ_0/B)``.

Part ``widths`` (Zhu et al. 2019, arXiv:1803.00195, Fig. 4): one-hidden-layer ReLU
nets of widths 32, 128, 512 with a fixed ±1 output layer and a clipped output on
1,000 inputs uniform on [−2, 2]² labelled 1[x_1 ≥ x_2], mean squared error, full-batch
Adam (lr 1e-3, 10 steps per epoch, 31 epochs, linear decay to 0 from epoch 21). Each
epoch: ``Tr(HΣ)`` against ``Tr H·Tr Σ/P``, Σ the covariance of the gradients of 100
batches of 10 (:func:`geoopt_sgd.noise_geometry`, ``cov="minibatch"``).

Commands (from the repository root; outputs under ``<out-dir>/stability_bound/``)::

    python recipes/stability_bound.py --quick            # CI setting
    python recipes/stability_bound.py                    # full setting
    python recipes/stability_bound.py --part widths      # Z19 Fig. 4 only
    python recipes/stability_bound.py --part bound --families mlp,cnn,rfm,deep_linear
    python recipes/stability_bound.py --part bound --targets onehot \
        --parametrisation mup --cnn-lr 0.2      # ten outputs, muP (not the default)

Expected: the ratio ≤ 1 along training (after step 0) in every run; closer to 1 at
B = 5 than at B = 40; Tr(HΣ) ≥ 5·Tr(HΣ_iso) at every width and epoch, not
decreasing with width: PASS. "Tr H grows with P at least twice as much as ‖H‖_F"
FAILS in this setting (both grow by similar factors; recipes/README.md), and with
``--targets onehot --parametrisation mup`` too (the mlp reaches 1.96, the cnn 1.33,
seed 0). Writes ``bound.png`` (‖H‖_F and Tr H against P; the ratio along training)
and ``widths.png`` (Tr(HΣ) solid, Tr(HΣ_iso) dotted, per width and epoch). The
measured tables and the settings tried are in recipes/README.md.
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
    HalfSquaredError,
    HessianOperator,
    hutchinson_trace,
    noise_geometry,
    squared_frobenius,
)

RECIPE = "stability_bound"
PARTS = ("bound", "widths", "all")
FAMILIES = ("mlp", "cnn", "rfm", "deep_linear")
TARGETS = ("parity", "onehot")
PARAMETRISATIONS = ("sp", "mup")
MUP_FAMILIES = ("mlp", "cnn")  # the families "mup" rescales
NUM_CLASSES = 10  # digits: outputs of targets="onehot"
# thresholds of the verdict (docs/recipes/stability_bound.md says whose they are)
GROWTH_MIN = 2.0  # Tr H growth / ||H||_F growth over the size sweep (ours)
ISO_MIN = 5.0  # Tr(H Sigma) / Tr(H Sigma_iso) at every width and epoch (ours)


@dataclass(frozen=True)
class Config(common.RunOptions):
    part: str = option("all", "'bound' (WWS22 Fig. 3), 'widths' (Z19 Fig. 4), 'all'")
    seed: int = option(0, "seed of the data, the initialisations and the batches")
    # part "bound"
    families: tuple[str, ...] = option(
        ("mlp", "cnn"), "model families: 'mlp', 'cnn', 'rfm', 'deep_linear'"
    )
    mlp_widths: tuple[int, ...] = option((8, 64, 256), "hidden widths of the mlp")
    cnn_widths: tuple[int, ...] = option((8, 32), "channels of the cnn")
    rfm_widths: tuple[int, ...] = option((64, 256, 1024), "features of the rfm")
    deep_linear_widths: tuple[int, ...] = option(
        (16, 64, 256), "hidden widths of the deep linear net"
    )
    depth: int = option(2, "hidden layers of the mlp and the deep linear net")
    targets: str = option(
        "parity", "'parity' (one output, ±1 even/odd) or 'onehot' (ten outputs)"
    )
    parametrisation: str = option(
        "sp", "'sp' (PyTorch's) or 'mup' (first/last layer scaled from base_width)"
    )
    base_width: int = option(8, "width at which 'mup' equals 'sp' (mlp and cnn)")
    num_train: int = option(1000, "digits training samples")
    lr: float = option(0.2, "SGD learning rate eta (all sizes, both batch sizes)")
    cnn_lr: float = option(0.05, "eta of the cnn family (ReLU; diverges at 0.2)")
    batch_sizes: tuple[int, ...] = option((5, 40), "SGD batch sizes (WWS22: 5, 40)")
    steps: int = option(3000, "SGD steps per run")
    num_evals: int = option(8, "evaluations evenly spaced along a run")
    tail_evals: int = option(
        3, "evaluations in the last tenth of the steps (mu_0: their median)"
    )
    exact_max: int = option(650, "dense Hessian up to this P, Hutchinson above")
    trace_probes: int = option(16, "Hutchinson probes for Tr H and ||H||_F")
    mu_samples: int = option(256, "training samples mu is measured on (the first)")
    # part "widths"
    z19_widths: tuple[int, ...] = option((32, 128, 512), "hidden widths (Z19)")
    z19_samples: int = option(1000, "inputs uniform on [-2, 2]^2 (Z19: 1000)")
    z19_epochs: int = option(31, "epochs of 10 full-batch Adam steps (Z19: 31)")
    z19_decay_epoch: int = option(21, "linear lr decay to 0 from this epoch")
    z19_lr: float = option(1e-3, "Adam learning rate (Z19: 1e-3)")
    z19_batch: int = option(10, "batch size of the noise covariance (Z19: 10)")
    threads: int = option(1, "torch CPU threads during the run (restored after)")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: two sizes per family (>= 10x in P), 500 samples, 2000
        steps, 8 evaluations per run, Hutchinson with 10 probes throughout."""
        return cls(
            mlp_widths=(8, 64),
            exact_max=0,
            num_train=500,
            steps=2000,
            num_evals=5,
            tail_evals=3,
            trace_probes=10,
        )


def main(cfg: Config) -> dict[str, Any]:
    """Run the parts asked for; write ``results.json`` and the figures.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.
    """
    validate(cfg)
    with common.Run(RECIPE, cfg, threads=cfg.threads) as run:
        do_bound = cfg.part in ("bound", "all")
        task = load_digits(cfg, run.device) if do_bound else None  # errors stop here
        stages = common.Stages(run.open(), run.save)
        arrays: dict[str, Any] = {"bound": [], "widths": []}
        unit = 0
        if do_bound:
            for family in cfg.families:
                for width in widths_of(cfg, family):
                    for B in cfg.batch_sizes:
                        common.maybe_interrupt(unit)  # units: runs
                        unit += 1
                        name = f"bound/{family}/{width}/{B}"
                        arrays["bound"].append(
                            stages.run(
                                name,
                                lambda r, s, f=family, w=width, b=B: bound_run(
                                    cfg, task, f, w, b, run.device
                                ),
                            )
                        )
        if cfg.part in ("widths", "all"):
            for h in cfg.z19_widths:
                common.maybe_interrupt(unit)
                unit += 1
                arrays["widths"].append(
                    stages.run(
                        f"widths/{h}", lambda r, s, h=h: z19_run(cfg, h, run.device)
                    )
                )
        metrics, rows = summarise(arrays, cfg)
        return run.finish(metrics, arrays, rows, plot)


def widths_of(cfg: Config, family: str) -> tuple[int, ...]:
    """The size sweep of ``family``."""
    return getattr(cfg, f"{family}_widths")


def lr_of(cfg: Config, family: str) -> float:
    """The learning rate of ``family`` (the same for its sizes and batch sizes)."""
    return cfg.cnn_lr if family == "cnn" else cfg.lr


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On an invalid field.
    """
    common.check_config_basics(cfg)
    common.check_choice(cfg, "part", PARTS)
    if not cfg.families:
        raise ValueError("`families` must name at least one family.")
    for fam in cfg.families:
        if fam not in FAMILIES:
            raise ValueError(
                f"`families` entries must be one of {', '.join(map(repr, FAMILIES))}; "
                f"got {fam!r}."
            )
        if len(widths_of(cfg, fam)) < 2:
            raise ValueError(f"`{fam}_widths` must hold >= 2 sizes (a sweep).")
        if min(widths_of(cfg, fam)) < 2:
            raise ValueError(f"`{fam}_widths` must be >= 2.")
    common.check_choice(cfg, "targets", TARGETS)
    common.check_choice(cfg, "parametrisation", PARAMETRISATIONS)
    if cfg.parametrisation == "mup":
        other = [f for f in cfg.families if f not in MUP_FAMILIES]
        if other:
            raise ValueError(
                "`parametrisation='mup'` rescales only the families "
                f"{', '.join(map(repr, MUP_FAMILIES))}; got {', '.join(other)}."
            )
    if len(cfg.batch_sizes) != 2 or cfg.batch_sizes[0] >= cfg.batch_sizes[1]:
        raise ValueError(
            "`batch_sizes` must be two sizes, the small one first (WWS22: 5, 40); "
            f"got {cfg.batch_sizes!r}."
        )
    if (
        len(cfg.z19_widths) < 2
        or min(cfg.z19_widths) < 2
        or any(h % 2 for h in cfg.z19_widths)
    ):
        raise ValueError(
            "`z19_widths` must hold >= 2 even widths (half the units +1, half -1); "
            f"got {cfg.z19_widths!r}."
        )
    common.check_min(
        cfg,
        (
            "depth",
            "base_width",
            "num_evals",
            "tail_evals",
            "z19_epochs",
            "z19_batch",
            "threads",
        ),
        1,
    )
    common.check_min(cfg, ("trace_probes", "mu_samples"), 2)
    common.check_min(cfg, ("exact_max",), 0)
    common.check_min(cfg, ("steps",), 10)
    if min(cfg.batch_sizes) < 2:
        raise ValueError(f"`batch_sizes` must be >= 2; got {cfg.batch_sizes!r}.")
    if max(cfg.batch_sizes) > cfg.num_train:
        raise ValueError(
            f"`batch_sizes` must be <= num_train = {cfg.num_train}; "
            f"got {cfg.batch_sizes!r}."
        )
    if not 0 <= cfg.z19_decay_epoch <= cfg.z19_epochs:
        raise ValueError(
            f"`z19_decay_epoch` must be in [0, z19_epochs]; got {cfg.z19_decay_epoch}."
        )
    if cfg.z19_samples < 2 * cfg.z19_batch:
        raise ValueError(
            "`z19_samples` must hold >= 2 batches of z19_batch samples; "
            f"got {cfg.z19_samples}."
        )


# --------------------------------------------------------------------------------------
# Part "bound": WWS22 Fig. 3
# --------------------------------------------------------------------------------------


def load_digits(cfg: Config, device: torch.device) -> dict[str, Any]:
    """Digits, flat and as 8x8 images, with the ``targets`` of ``cfg`` (float64):
    ±1 even/odd ``(N, 1)`` or one-hot ``(N, 10)``."""
    out = {}
    for key, flat in (("flat", True), ("image", False)):
        data = common.load_data(
            "digits",
            image_size=None,
            flatten=flat,
            num_train=cfg.num_train,
            seed=cfg.seed,
            dtype=torch.float64,
        ).to(device)
        out[key] = data
    labels = out["flat"].y_train
    if cfg.targets == "onehot":
        y = common.make_targets("mse", labels, NUM_CLASSES, torch.float64)
    else:
        y = common.parity_targets(labels, torch.float64)
    out["y"] = y.to(device)
    return out


def build_model(
    cfg: Config, task: dict, family: str, width: int, device: torch.device
) -> tuple[nn.Module, Tensor]:
    """The seeded model of ``family`` at ``width`` (one output per target column,
    rescaled by :func:`mup_` under ``parametrisation="mup"``) and its training
    inputs."""
    data = task["image" if family == "cnn" else "flat"]
    model = common.make_model(
        family,
        task["y"].shape[1],
        in_chans=data.in_chans,
        input_dim=data.input_dim,
        image_size=data.image_size,
        width=width,
        depth=cfg.depth,
        activation="tanh",
        seed=cfg.seed,
        dtype=torch.float64,
    ).to(device)
    if cfg.parametrisation == "mup":
        mup_(model, width / cfg.base_width)
    return model, data.x_train


class Scaled(nn.Module):
    """``mult · layer(x)``: a layer with a fixed forward multiplier."""

    def __init__(self, layer: nn.Module, mult: float):
        super().__init__()
        self.layer = layer
        self.mult = mult

    def forward(self, x: Tensor) -> Tensor:
        return self.mult * self.layer(x)


def mup_(model: nn.Module, r: float) -> nn.Module:
    """Rescale a standard-parametrised net in place into muP for one SGD
    learning rate (Yang & Hu 2021, arXiv:2011.14522, Table 3), ``r`` its width
    over the base width.

    The first layer (``nn.Linear`` or ``nn.Conv2d``, input side fixed) gets the
    multiplier ``√r`` and its weight and bias divided by ``√r``: the same
    function at the start, its learning rate in effect ``η·r``. The last layer
    gets the multiplier ``1/√r`` on unchanged weights: its output ``√r`` times
    smaller at the start, its learning rate in effect ``η/r``. Hidden layers
    stay as they are. At ``r = 1`` the net is the standard-parametrised one;
    one ``η`` then trains every width alike (WWS22's bound is on the Hessian
    in the trained parameters, which these are).

    Returns:
        ``model``.
    """
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if len(layers) < 2:
        raise ValueError("mup_ needs a first and a last layer (Linear or Conv2d).")
    (first_name, first), last_name = layers[0], layers[-1][0]
    with torch.no_grad():
        for p in first.parameters():
            p.div_(math.sqrt(r))
    for name, mult in ((first_name, math.sqrt(r)), (last_name, 1 / math.sqrt(r))):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, Scaled(parent.get_submodule(attr), mult))
    return model


def eval_steps(cfg: Config) -> list[int]:
    """The steps measured: ``num_evals + 1`` evenly spaced, plus the tail's."""
    T = cfg.steps
    even = {round(i * T / cfg.num_evals) for i in range(cfg.num_evals + 1)}
    start = math.ceil(0.9 * T)
    tail = {
        start + round(j * (T - start) / cfg.tail_evals)
        for j in range(cfg.tail_evals + 1)
    }
    return sorted(even | tail)


def hessian_norms(
    model: nn.Module, loss_fn: nn.Module, batch: tuple, cfg: Config, seed: int
) -> dict[str, Any]:
    """‖H‖_F and Tr H of the full-batch loss, exact or Hutchinson (with s.e.)."""
    op = HessianOperator(model, loss_fn, batch)
    P = op.shape[0]
    if P <= cfg.exact_max:
        H = op.to_dense()
        return {
            "fro": float(H.norm()),
            "fro_se": 0.0,
            "trace": float(H.trace()),
            "trace_se": 0.0,
        }
    f2 = squared_frobenius(op, num_probes=cfg.trace_probes, seed=seed)
    tr = hutchinson_trace(op, num_probes=cfg.trace_probes, seed=seed + 1)
    fro = math.sqrt(max(float(f2.value), 0.0))
    return {
        "fro": fro,
        "fro_se": float(f2.stderr) / (2 * fro) if fro > 0 else math.nan,
        "trace": float(tr.value),
        "trace_se": float(tr.stderr),
    }


def bound_run(
    cfg: Config,
    task: dict,
    family: str,
    width: int,
    B: int,
    device: torch.device,
) -> dict[str, Any]:
    """SGD (B samples drawn with replacement per step) at the family's lr, measured.

    Returns:
        The run's record: per evaluation ``step``, ``loss``, ``fro`` (± ``fro_se``),
        ``trace`` (± ``trace_se``), ``mu`` and ``ratio``; ``mu0``, ``bound``, ``P``,
        ``method`` and ``diverged``.
    """
    model, x = build_model(cfg, task, family, width, device)
    y = task["y"]
    loss_fn = HalfSquaredError()
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = lr_of(cfg, family)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(10_000 * cfg.seed + B)
    rec: dict[str, Any] = {
        "family": family,
        "width": width,
        "B": B,
        "P": P,
        "lr": lr,
        "method": "exact" if P <= cfg.exact_max else "hutchinson",
        "diverged": False,
    }
    for key in ("step", "loss", "fro", "fro_se", "trace", "trace_se", "mu"):
        rec[key] = []
    todo = eval_steps(cfg)
    n = len(y)
    bar = common.progress_bar(total=cfg.steps, desc=f"{family} w={width} B={B}")
    for t in range(cfg.steps + 1):
        if t == todo[0]:
            todo.pop(0)
            L = common.full_batch_loss(model, loss_fn, x, y)
            rec["step"].append(t)
            rec["loss"].append(L)
            if not math.isfinite(L) or L > 1e6:
                rec["diverged"] = True
                for key in ("fro", "fro_se", "trace", "trace_se", "mu"):
                    rec[key].append(math.nan)
                break
            for key, v in hessian_norms(model, loss_fn, (x, y), cfg, t).items():
                rec[key].append(v)
            # mu only where mu_0 is read: the last 10% of the steps
            mu = math.nan
            if t >= 0.9 * cfg.steps:
                mu = noise_geometry(
                    model,
                    loss_fn,
                    (x, y),
                    metrics=["mu"],
                    max_samples=cfg.mu_samples,
                    route="exact",
                    seed=t,
                ).values["mu"]
            rec["mu"].append(mu)
            bar.set_postfix(loss=f"{L:.3g}", fro=f"{rec['fro'][-1]:.3g}")
        if t == cfg.steps:
            break
        model.train()
        idx = torch.randint(0, n, (B,), generator=gen, device="cpu").to(x.device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        bar.update(1)
    bar.close()
    tail = [
        m
        for s, m in zip(rec["step"], rec["mu"], strict=True)
        if s >= 0.9 * cfg.steps and math.isfinite(m)
    ]
    mu0 = _median(tail) if not rec["diverged"] else math.nan
    bound = math.sqrt(B / mu0) / lr if mu0 > 0 else math.nan
    rec["mu0"] = mu0
    rec["bound"] = bound
    rec["ratio"] = [f / bound for f in rec["fro"]]
    # the SGD solution: medians over the evaluations of the last 10%
    last = [i for i, s in enumerate(rec["step"]) if s >= 0.9 * cfg.steps]
    for key in ("fro", "trace", "ratio", "loss"):
        rec[f"final_{key}"] = _median([rec[key][i] for i in last]) if last else math.nan
    return rec


# --------------------------------------------------------------------------------------
# Part "widths": Z19 Fig. 4
# --------------------------------------------------------------------------------------


class OneHiddenLayer(nn.Module):
    """Z19's net: ``clip(Σ_h a_h ReLU(w_h·x + b_h), δ, 1 − δ)``, ``a`` fixed ±1.

    Only ``w`` and ``b`` are trained (``P = 3h`` on 2-D inputs); ``a`` is +1 on
    the first half of the units and −1 on the second. The trained weights start
    uniform on ``±√(3/P)`` (Glorot-uniform of one flat vector of P entries, as
    in Z19's released code).
    """

    def __init__(self, width: int, input_dim: int = 2, delta: float = 1e-3):
        super().__init__()
        P = width * (input_dim + 1)
        lim = math.sqrt(3.0 / P)
        self.weight = nn.Parameter((2 * torch.rand(width, input_dim) - 1) * lim)
        self.bias = nn.Parameter((2 * torch.rand(width) - 1) * lim)
        a = torch.ones(width)
        a[width // 2 :] = -1.0
        self.register_buffer("a", a)
        self.delta = delta

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(x @ self.weight.T + self.bias) @ self.a
        return out.clamp(self.delta, 1 - self.delta).unsqueeze(1)


def z19_data(cfg: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """``z19_samples`` inputs uniform on [−2, 2]², labels 1[x_1 ≥ x_2] (float64)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    u = torch.rand(cfg.z19_samples, 2, generator=gen, dtype=torch.float64, device="cpu")
    x = 4 * u - 2
    y = (x[:, 0] >= x[:, 1]).to(torch.float64).unsqueeze(1)
    return x.to(device), y.to(device)


def z19_run(cfg: Config, width: int, device: torch.device) -> dict[str, Any]:
    """Adam on Z19's one-hidden-layer net; Tr(HΣ) and its isotropic value per epoch.

    Σ is the covariance of the mean gradients of ``n // z19_batch`` disjoint
    batches of a fresh random permutation each epoch (Z19's code draws 100
    batches of 10 independently; the ratio does not depend on Σ's scale). H is
    the GGN, which equals the Hessian here: the output is piecewise linear in
    the parameters (ReLU, clip), so its second derivatives vanish almost
    everywhere (tested against the dense Hessian).

    Returns:
        ``width``, ``P`` and per epoch ``epoch``, ``loss``, ``accuracy``,
        ``tr_h_sigma``, ``tr_h_sigma_iso`` and their ``ratio``.
    """
    x, y = z19_data(cfg, device)
    state = torch.get_rng_state()
    torch.manual_seed(cfg.seed * 1000 + width)
    try:
        with torch.device("cpu"):  # seeded on the CPU, then moved
            model = OneHiddenLayer(width)
        model = model.to(device, torch.float64)
    finally:
        torch.set_rng_state(state)
    loss_fn = nn.MSELoss()  # Z19: mean of (f - y)^2
    opt = torch.optim.Adam(model.parameters(), lr=cfg.z19_lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + width + 1)
    rec: dict[str, Any] = {"width": width, "P": 3 * width}
    for key in ("epoch", "loss", "accuracy", "tr_h_sigma", "tr_h_sigma_iso", "ratio"):
        rec[key] = []
    E, E0 = cfg.z19_epochs, cfg.z19_decay_epoch
    for ep in common.progress_bar(range(E), desc=f"Z19 h={width}"):
        lr = cfg.z19_lr if ep < E0 else cfg.z19_lr * (E - ep) / (E - E0)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        perm = torch.randperm(len(y), generator=gen, device="cpu").to(x.device)
        geo = noise_geometry(
            model,
            loss_fn,
            (x[perm], y[perm]),
            metrics=["loss", "tr_h_sigma", "tr_h_sigma_iso"],
            cov="minibatch",
            batch_size=cfg.z19_batch,
            max_samples=len(y),
            seed=ep,
        )
        v = geo.values
        with torch.no_grad():
            acc = float(((model(x) > 0.5).to(y.dtype) == y).double().mean())
        rec["epoch"].append(ep)
        rec["loss"].append(v["loss"])
        rec["accuracy"].append(acc)
        rec["tr_h_sigma"].append(v["tr_h_sigma"])
        rec["tr_h_sigma_iso"].append(v["tr_h_sigma_iso"])
        rec["ratio"].append(v["tr_h_sigma"] / v["tr_h_sigma_iso"])
    return rec


# --------------------------------------------------------------------------------------
# Verdict and figures
# --------------------------------------------------------------------------------------


def _median(vals: list[float]) -> float:
    vals = sorted(v for v in vals if v is not None and math.isfinite(v))
    if not vals:
        return math.nan
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else 0.5 * (vals[m - 1] + vals[m])


def _finite(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def summarise(arrays: dict[str, list], cfg: Config) -> tuple[dict, list[dict]]:
    """Summary metrics and the verdict rows of the parts that ran."""
    C = common.claim
    wws = "Wu, Wang & Su 2022, arXiv:2207.02628"
    metrics: dict[str, Any] = {}
    rows: list[dict] = []
    runs = arrays["bound"]
    if runs:
        b_small, b_large = cfg.batch_sizes

        # the SGD iterates: every evaluation after the start (step 0 is the
        # initialisation, which SGD has not selected; its ratio is reported)
        def along(run):
            return [
                v for s, v in zip(run["step"], _finite(run["ratio"]), strict=True) if s
            ]

        ratios = [v for run in runs for v in along(run)]
        worst = max(runs, key=lambda r: max(along(r) or [math.inf]))
        metrics["ratio_max"] = common.strict_max(ratios)
        metrics["ratio_at_init"] = {
            f"{r['family']}/{r['width']}/B={r['B']}": _finite(r["ratio"])[0]
            for r in runs
        }
        metrics["diverged_runs"] = [
            f"{r['family']}/{r['width']}/B={r['B']}" for r in runs if r["diverged"]
        ]
        if metrics["diverged_runs"]:
            metrics["ratio_max"] = math.nan
        init_max = max(metrics["ratio_at_init"].values())
        rows.append(
            C(
                "||H||_F <= sqrt(B/mu_0)/eta along training in every run: max of "
                "||H||_F eta sqrt(mu_0/B) over runs and the evaluations after step 0",
                metrics["ratio_max"],
                "<=",
                1.0,
                source=f"{wws}, Thm 3.3 and Fig. 3b",
                note=(
                    f"largest in {worst['family']} width {worst['width']} "
                    f"B={worst['B']}; at the initialisation (step 0, not an SGD "
                    f"iterate) up to {init_max:.3g}; diverged: "
                    f"{', '.join(metrics['diverged_runs']) or 'none'}"
                ),
            )
        )
        pairs = []
        for fam in cfg.families:
            for w in widths_of(cfg, fam):
                by_b = {
                    r["B"]: r["final_ratio"]
                    for r in runs
                    if r["family"] == fam and r["width"] == w
                }
                pairs.append((f"{fam}/{w}", by_b[b_small] / by_b[b_large]))
        metrics["ratio_small_over_large"] = dict(pairs)
        low = min(pairs, key=lambda p: p[1] if math.isfinite(p[1]) else -math.inf)
        rows.append(
            C(
                f"the bound is tighter at B={b_small} than at B={b_large}: min over "
                f"families and sizes of ratio(B={b_small}) / ratio(B={b_large}) at "
                "the SGD solution",
                low[1],
                ">",
                1.0,
                source=f"{wws}, Fig. 3b",
                note=f"smallest at {low[0]}",
            )
        )
        growth = {}
        for fam in cfg.families:
            sel = sorted(
                (r for r in runs if r["family"] == fam and r["B"] == b_small),
                key=lambda r: r["P"],
            )
            lo, hi = sel[0], sel[-1]
            growth[fam] = {
                "P": [lo["P"], hi["P"]],
                "trace": hi["final_trace"] / lo["final_trace"],
                "fro": hi["final_fro"] / lo["final_fro"],
            }
            growth[fam]["ratio"] = growth[fam]["trace"] / growth[fam]["fro"]
        metrics["size_growth"] = growth
        fam_low = min(
            growth,
            key=lambda f: (
                growth[f]["ratio"] if math.isfinite(growth[f]["ratio"]) else -math.inf
            ),
        )
        g = growth[fam_low]
        rows.append(
            C(
                "Tr H grows with size markedly more than ||H||_F: min over families "
                f"of [Tr H growth] / [||H||_F growth] from the smallest to the "
                f"largest model at B={b_small}",
                g["ratio"],
                ">=",
                GROWTH_MIN,
                source=f"ours (docs/recipes/stability_bound.md); claim: {wws}, Fig. 3a",
                note=(
                    f"smallest in {fam_low}: P {g['P'][0]} -> {g['P'][1]}, Tr H x"
                    f"{g['trace']:.3g}, ||H||_F x{g['fro']:.3g}"
                ),
            )
        )
    wide = arrays["widths"]
    if wide:
        z19 = "Zhu et al. 2019, arXiv:1803.00195, Fig. 4 (qualitative)"
        all_r = [v for w in wide for v in _finite(w["ratio"])]
        # a NaN ratio (a diverged epoch) makes the min NaN
        metrics["z19_ratio_min"] = common.strict_min(all_r)
        medians = [_median(_finite(w["ratio"])) for w in wide]
        metrics["z19_ratio_median"] = {
            str(w["width"]): m for w, m in zip(wide, medians, strict=True)
        }
        steps = [b / a for a, b in zip(medians[:-1], medians[1:], strict=True)]
        metrics["z19_width_steps"] = steps
        rows.append(
            C(
                "Tr(H Sigma) >> Tr(H Sigma_iso): min of the ratio over widths and "
                "epochs",
                metrics["z19_ratio_min"],
                ">=",
                ISO_MIN,
                source=f"ours (docs/recipes/stability_bound.md); claim: {z19}",
            )
        )
        rows.append(
            C(
                "the ratio does not decrease with width: min over consecutive "
                "widths of median ratio(wider) / median ratio(narrower)",
                common.strict_min(steps),
                ">=",
                1.0,
                source=f"ours (docs/recipes/stability_bound.md); claim: {z19}",
                note="medians over epochs: "
                + ", ".join(
                    f"h={w['width']}: {m:.3g}"
                    for w, m in zip(wide, medians, strict=True)
                ),
            )
        )
    return metrics, rows


def table(results: dict[str, Any]) -> str:
    """The runs of part "bound" as a Markdown table (printed before the verdict)."""
    lines = []
    runs = results["arrays"]["bound"]
    if runs:
        lines += [
            "| family | width | P | B | final L | ||H||_F | Tr H | mu_0 | bound |"
            " ratio (final / max) | method |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            rat = _finite(r["ratio"])
            lines.append(
                f"| {r['family']} | {r['width']} | {r['P']} | {r['B']} | "
                f"{_g(r['final_loss'])} | {_g(r['final_fro'])} | "
                f"{_g(r['final_trace'])} | {_g(r['mu0'])} | {_g(r['bound'])} | "
                f"{_g(r['final_ratio'])} / {_g(max(rat) if rat else None)} | "
                f"{r['method']} |"
            )
    wide = results["arrays"]["widths"]
    if wide:
        lines += ["", "| width | P | Tr(H Sigma)/Tr(H Sigma_iso) min / median / max |"]
        lines += ["|---|---|---|"]
        for w in wide:
            rat = [v for v in _finite(w["ratio"]) if math.isfinite(v)]
            lines.append(
                f"| {w['width']} | {w['P']} | {_g(min(rat, default=None))} / "
                f"{_g(_median(rat))} / {_g(max(rat, default=None))} |"
            )
    return "\n".join(lines)


def _g(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3g}"


def plot(results_path: str | Path) -> list[Path]:
    """Redraw ``bound.png`` and ``widths.png`` from ``results.json`` alone."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    out_dir = Path(results_path).parent
    paths = []
    runs = res["arrays"]["bound"]
    if runs:
        fams = list(dict.fromkeys(r["family"] for r in runs))
        b_small, b_large = res["config"]["batch_sizes"]
        fig, ax = plt.subplots(1, 3, figsize=(15, 4))
        for i, fam in enumerate(fams):
            sel = sorted(
                (r for r in runs if r["family"] == fam and r["B"] == b_small),
                key=lambda r: r["P"],
            )
            P = [r["P"] for r in sel]
            ax[0].loglog(
                P,
                _finite([r["final_fro"] for r in sel]),
                "o-",
                c=f"C{i}",
                label=f"{fam}: ||H||_F",
            )
            ax[0].loglog(
                P,
                _finite([r["final_trace"] for r in sel]),
                "s--",
                c=f"C{i}",
                label=f"{fam}: Tr H",
            )
        ax[0].set(xlabel="parameters P", title=f"at the SGD solution (B={b_small})")
        ax[0].legend(fontsize=7)
        for j, B in enumerate((b_small, b_large)):
            for k, r in enumerate(r for r in runs if r["B"] == B):
                ax[1 + j].plot(
                    r["step"],
                    _finite(r["ratio"]),
                    "-",
                    lw=1,
                    c=f"C{fams.index(r['family'])}",
                    alpha=0.4 + 0.6 * (k % 3) / 2,
                    label=f"{r['family']} w={r['width']}",
                )
            ax[1 + j].axhline(1.0, c="k", ls=":", lw=1)
            ax[1 + j].set(
                xlabel="SGD step",
                ylabel="||H||_F eta sqrt(mu_0/B)",
                title=f"tightness of the bound, B={B}",
                ylim=(0, 1.2),
            )
            ax[1 + j].legend(fontsize=6)
        path = out_dir / "bound.png"
        common.save_figure(fig, path)
        paths.append(path)
    wide = res["arrays"]["widths"]
    if wide:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for i, w in enumerate(wide):
            ax[0].semilogy(
                w["epoch"],
                _finite(w["tr_h_sigma"]),
                "-",
                c=f"C{i}",
                label=f"h={w['width']}: Tr(H Sigma)",
            )
            ax[0].semilogy(
                w["epoch"],
                _finite(w["tr_h_sigma_iso"]),
                ":",
                c=f"C{i}",
                label=f"h={w['width']}: Tr H Tr Sigma / P",
            )
            ax[1].plot(
                w["epoch"],
                _finite(w["ratio"]),
                "o-",
                ms=3,
                c=f"C{i}",
                label=f"h={w['width']}",
            )
        ax[0].set(xlabel="epoch", title="Z19 Fig. 4: Tr(H Sigma) vs isotropic")
        ax[1].axhline(ISO_MIN, c="k", ls=":", lw=1)
        ax[1].set(xlabel="epoch", title="Tr(H Sigma) / Tr(H Sigma_iso)", yscale="log")
        for a in ax:
            a.legend(fontsize=7)
        path = out_dir / "widths.png"
        common.save_figure(fig, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__, report=table)
