"""SGD+CLR finds flatter minima than GD+CLR (Wang & Wu 2023, arXiv:2310.00692).

Claim (WW23): "unlike GD, which escapes along the sharpest directions, SGD tends to
escape from flatter directions, and cyclical learning rates can exploit this".

Protocol: GD to a minimum θ_0 on 256 ZCA-whitened digits, ±1 even/odd targets,
½(f − y)²; then the same cyclical learning rate (:class:`geoopt_sgd.CyclicLRWrapper`,
``square`` or ``triangular`` between η_min = 0.5·2/λ_0 and η_max = 1.5·2/λ_0)
drives full-batch GD and mini-batch SGD (B = 16) from θ_0. Per step: the full
training loss. Per cycle c (start θ_c): λ_max, Tr H, ‖H‖_F
(:func:`geoopt_sgd.sharpness`), the test accuracy, and the cos² against u_1 of the
escape displacement ``θ_esc − θ_c`` (θ_esc: the first step with
``L ≥ escape_factor·L(θ_c)``), of the high-phase excursion and of the end-to-end
cycle displacement. Why the escape displacement, and the settings tried:
recipes/README.md.

Models: the default is timm's ``test_vit`` as a one-token residual MLP
(:data:`VIT_KWARGS`: the 8×8 digit is one 8×8 patch, no class token, depth 2;
88k parameters, float64), GD at 0.06 for 3,000 steps to θ_0 (escape_direction's
0.03 on the mean squared error). ``--model mlp`` alone is WWS22's fully connected
net (escape_direction's θ*), GD at 0.2 for 2,000 steps. Every pass runs the model
in eval mode (GD, SGD, the loss, the Hessian), so that each step descends the loss
whose Hessian is measured: a BatchNorm layer is then a fixed affine map at its
initial statistics, so use a BatchNorm-free model (the ViT's LayerNorms are
per-sample) or swap ``norm_layer`` through ``--model-kwargs``. The run uses
``--threads 1`` by default (restored afterwards).

Commands (from the repository root; outputs under ``<out-dir>/flat_minima_clr/``)::

    python recipes/flat_minima_clr.py --quick        # CI setting (timm test_vit)
    python recipes/flat_minima_clr.py                # full: 3 seeds, 8 cycles
    python recipes/flat_minima_clr.py --quick --model mlp   # the papers' MLP
    python recipes/flat_minima_clr.py --mode triangular
    python recipes/flat_minima_clr.py --model resnet18 \\
        --model-kwargs norm_layer=groupnorm --dataset cifar10 --data-dir data \\
        --download --num-train 5000 --device cuda        # GPU; not measured

Expected (``--quick``, seed 0, 1 thread, test_vit): Tr H ratio 0.490 (≤ 0.8),
λ_max ratio 0.850 (< 1), GD escape cos² 0.9964 (≥ 0.7), SGD 0.0030 (≤ 0.3): all
PASS (seeds 0–4 all pass: recipes/README.md). ``--model mlp``: 0.154, 0.900,
0.9991, 0.0015. ``clr.png`` shows the per-step loss with each cycle's escape level,
λ_max and Tr H per cycle, the three cos² and the lr.
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
from torch import nn

from geoopt_sgd import CyclicLRWrapper, sharpness

RECIPE = "flat_minima_clr"
ARMS = ("gd", "sgd")
# per-cycle records besides the measurements (index 0: theta_0, NaN)
PER_CYCLE = (
    "cos2_escape",  # cos^2(theta_esc - theta_c, u_1(theta_c)); NaN: no escape
    "escape_step",  # step of the cycle (1-based) at which it escaped; None: none
    "escape_distance",  # ||theta_esc - theta_c||
    "loss_ratio_max",  # max over the cycle of L(theta_t) / L(theta_c)
    "cos2_high",  # cos^2(theta_end_of_high_phase - theta_c, u_1(theta_c))
    "excursion",  # ||theta_end_of_high_phase - theta_c||
    "cos2_cycle",  # cos^2(theta_{c+1} - theta_c, u_1(theta_{c+1}))
)
# The one-token ViT: an 8x8 patch of the 8x8 digit is the only token, so the model
# is a residual MLP with LayerNorms and attention over one token (88k parameters).
VIT_KWARGS = (
    "img_size=8",
    "patch_size=8",
    "class_token=False",
    "global_pool=avg",
    "weight_init=jax",
    "depth=2",
)
# Per-model defaults of the fields left at None; any other model takes FALLBACK
# (the defaults before the timm default, under which WWS22's MLP was tuned).
FALLBACK = {"model_kwargs": (), "pretrain_lr": 0.2, "pretrain_steps": 2000}
MODEL_DEFAULTS = {
    "test_vit": {
        "model_kwargs": VIT_KWARGS,
        "pretrain_lr": 0.06,
        "pretrain_steps": 3000,
    },
}


@dataclass(frozen=True)
class Config(common.RunOptions):
    seed: int = option(0, "base seed; runs seeds seed .. seed+num_seeds-1")
    num_seeds: int = option(3, "seeds (the verdict averages them)")
    dataset: str = option(
        "digits", "'digits' (offline), 'fashion_mnist', 'mnist', 'cifar10'"
    )
    data_dir: str | None = option(None, "where torchvision data lives")
    download: bool = option(False, "download a missing torchvision dataset")
    num_train: int = option(256, "training samples (escape_direction's theta*: 256)")
    whiten: bool = option(True, "ZCA-whiten the inputs (high effective dimension)")
    task: str = option(
        "parity", "'parity' (one output, +-1 even/odd targets) or 'classes'"
    )
    loss: str = option("mse", "'mse' (1/2 ||f - y||^2, summed over outputs) or 'ce'")
    model: str = option(
        "test_vit", "a timm name (default: one-token ViT), 'mlp', 'cnn', 'linear'"
    )
    model_kwargs: tuple[str, ...] | None = option(
        None, "extra timm.create_model args, 'key=value' (None: the model's default)"
    )
    width: int = option(64, "hidden width / channels of the small models")
    depth: int = option(2, "hidden layers of the mlp")
    activation: str = option("tanh", "'tanh' or 'relu' (mlp)")
    image_size: int | None = option(None, "input side for image models (None: native)")
    pretrain_lr: float | None = option(
        None, "GD step size to theta_0 (None: the model's default)"
    )
    pretrain_steps: int | None = option(
        None, "GD steps to theta_0 (0: start at the initialisation; None: default)"
    )
    mode: str = option("square", "CLR shape: 'square' or 'triangular'")
    low_factor: float = option(0.5, "eta_min = low_factor * 2 / lambda_0")
    high_factor: float = option(1.5, "eta_max = high_factor * 2 / lambda_0")
    phase_steps: int = option(150, "steps per phase (half-cycle)")
    cycles: int = option(8, "number of cycles")
    batch_size: int = option(16, "SGD batch size")
    escape_factor: float = option(
        1e4, "a cycle escapes at its first L >= this * L(theta_c)"
    )
    trace_probes: int = option(30, "Hutchinson probes for Tr H and ||H||_F")
    tol: float = option(1e-3, "Lanczos relative tolerance of lambda_max")
    threads: int = option(1, "torch CPU threads during the run (restored after)")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: 1 seed, 4 cycles of 2 x 60 steps, 10 trace probes."""
        return cls(num_seeds=1, phase_steps=60, cycles=4, trace_probes=10)


def main(cfg: Config) -> dict[str, Any]:
    """Run the recipe; write ``config.json``, ``results.json`` and ``clr.png``.

    Args:
        cfg: The configuration; fields left at ``None`` take the model's defaults
            (:func:`resolve`), and ``config.json`` records the resolved values.

    Returns:
        The results as written to ``results.json``. Torch's CPU thread count is
        ``cfg.threads`` during the run and restored afterwards.
    """
    cfg = resolve(cfg)
    validate(cfg)
    with common.Run(RECIPE, cfg, threads=cfg.threads) as run:
        first_task = load_task(cfg, cfg.seed, run.device)  # data errors stop here
        first_model = build_model(cfg, first_task, cfg.seed)  # ... model errors too
        state = run.open()
        seeds = {}
        for seed in range(cfg.seed, cfg.seed + cfg.num_seeds):
            if seed == cfg.seed:
                task, model = first_task, first_model
            else:
                task = load_task(cfg, seed, run.device)
                model = build_model(cfg, task, seed)
            stages = common.Stages(state.setdefault(str(seed), {}), run.save)
            seeds[str(seed)] = run_one_seed(cfg, seed, task, model, stages)
        metrics, rows = summarise(seeds, cfg)
        return run.finish(metrics, seeds, rows, plot)


def resolve(cfg: Config) -> Config:
    """Fill the fields left at ``None`` with the model's defaults.

    ``test_vit`` (the default) takes :data:`VIT_KWARGS`, GD at 0.06 for 3,000
    steps; every other model (``mlp`` among them) :data:`FALLBACK`.
    """
    defaults = MODEL_DEFAULTS.get(cfg.model, FALLBACK)
    fill = {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill)


def validate(cfg: Config) -> None:
    """Check the (resolved) config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On an invalid field (unknown model, dataset, task, loss or
            mode; lr or factors <= 0; escape_factor <= 1; eta_min >= eta_max;
            counts < 1; a batch larger than the training set; ``model_kwargs``
            not ``key=value`` or given to a small model).
    """
    common.check_config_basics(cfg)
    model_kwargs(cfg)
    common.check_choice(cfg, "task", ("parity", "classes"))
    common.check_choice(cfg, "mode", ("square", "triangular"))
    if cfg.task == "parity" and cfg.loss != "mse":
        raise ValueError(f"`loss` must be 'mse' with task 'parity'; got {cfg.loss!r}.")
    for name in ("low_factor", "high_factor", "tol"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{name}` must be > 0; got {v!r}.")
    if not (cfg.escape_factor > 1 and math.isfinite(cfg.escape_factor)):
        raise ValueError(f"`escape_factor` must be > 1; got {cfg.escape_factor!r}.")
    if cfg.low_factor >= cfg.high_factor:
        raise ValueError(
            f"`low_factor` must be < high_factor = {cfg.high_factor}; "
            f"got {cfg.low_factor}."
        )
    common.check_min(
        cfg,
        ("num_seeds", "phase_steps", "cycles", "batch_size", "trace_probes", "threads"),
        1,
    )
    common.check_min(cfg, ("pretrain_steps",), 0)
    if cfg.batch_size > cfg.num_train:
        raise ValueError(
            f"`batch_size` must be <= the training set size {cfg.num_train}; "
            f"got {cfg.batch_size}."
        )


# --------------------------------------------------------------------------------------
# Data, model, measurements
# --------------------------------------------------------------------------------------


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """``cfg.model_kwargs`` parsed for timm (:func:`_common.parse_model_kwargs`).

    Raises:
        ValueError: If an entry is not ``key=value`` or the model is not timm's.
    """
    return common.parse_model_kwargs(cfg.model_kwargs, cfg.model)


def load_task(cfg: Config, seed: int, device: torch.device) -> dict[str, Any]:
    """Return the training/test tensors with targets for ``cfg.task`` and the loss."""
    data = common.load_data(
        cfg.dataset,
        image_size=cfg.image_size,
        flatten=common.model_wants_flat(cfg.model),
        num_train=cfg.num_train,
        whiten=cfg.whiten,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=seed,
        dtype=torch.float64 if device.type == "cpu" else torch.float32,
    )
    dtype = data.x_train.dtype
    if cfg.task == "parity":
        outputs = 1

        def targets(y):
            return common.parity_targets(y, dtype)

        def correct(out, y):
            return (out[:, 0] > 0) == (y % 2 == 0)

    else:
        outputs = data.num_classes

        def targets(y):
            return common.make_targets(cfg.loss, y, outputs, dtype)

        def correct(out, y):
            return out.argmax(1) == y

    return {
        "data": data.to(device),
        "y_train": targets(data.y_train).to(device),
        "y_test": targets(data.y_test).to(device),
        "outputs": outputs,
        "loss_fn": common.make_loss(cfg.loss),  # "mse": the papers' 1/2 ||f - y||^2
        "correct": correct,
    }


def build_model(cfg: Config, task: dict, seed: int) -> nn.Module:
    """Build the (seeded) model in the data's dtype and device, in eval mode.

    Raises:
        ValueError: If the timm model rejects ``model_kwargs``.
    """
    data = task["data"]
    try:
        model = common.make_model(
            cfg.model,
            task["outputs"],
            in_chans=data.in_chans,
            input_dim=data.input_dim,
            image_size=data.image_size,
            width=cfg.width,
            depth=cfg.depth,
            activation=cfg.activation,
            seed=seed,
            dtype=data.x_train.dtype,
            timm_args=model_kwargs(cfg) or None,
        )
    except TypeError as err:  # an argument the timm model does not take
        raise ValueError(f"`model_kwargs` {cfg.model_kwargs!r}: {err}") from None
    # Eval mode throughout (GD, SGD, the loss and the Hessian): a normalisation
    # layer's statistics are fixed and dropout is off, so every step descends the L
    # whose Hessian is measured.
    return model.to(data.x_train.device).eval()


def theta_of(model: nn.Module) -> torch.Tensor:
    """The parameters as one float64 vector ``(P,)`` (what the cos² compare)."""
    return common.flat_parameters(model).double()


def full_loss(model: nn.Module, task: dict) -> float:
    """The full training loss L(θ) in eval mode (the escape criterion's L)."""
    d = task["data"]
    return common.full_batch_loss(model, task["loss_fn"], d.x_train, task["y_train"])


@torch.no_grad()
def evaluate(model: nn.Module, task: dict) -> dict[str, float]:
    """Full training loss and accuracy, and test accuracy."""
    model.eval()
    d = task["data"]
    out = model(d.x_train)
    test = model(d.x_test)
    return {
        "loss": float(task["loss_fn"](out, task["y_train"])),
        "train_acc": float(task["correct"](out, d.y_train).double().mean()),
        "test_acc": float(task["correct"](test, d.y_test).double().mean()),
    }


def measure_sharpness(model, task, cfg: Config, seed: int, v0=None):
    """λ_max, Tr H, ‖H‖_F and u_1 at the model's parameters (full training set)."""
    rep = sharpness(
        model,
        task["loss_fn"],
        (task["data"].x_train, task["y_train"]),
        k=1,
        tol=cfg.tol,
        trace_probes=cfg.trace_probes,
        seed=seed,
        v0=v0,
    )
    return rep, rep.eigenvectors[:, 0].double()


def _cos2(v: torch.Tensor, u: torch.Tensor) -> float:
    nv = float(v.norm())
    if nv == 0 or not math.isfinite(nv):
        return math.nan
    return float((v @ u.to(v)) ** 2 / (nv**2 * float(u.norm()) ** 2))


# --------------------------------------------------------------------------------------
# Stages: theta_0, then one CLR arm after the other
# --------------------------------------------------------------------------------------


def run_one_seed(
    cfg: Config, seed: int, task: dict, model: nn.Module, stages: common.Stages
) -> dict[str, Any]:
    """Pretrain ``model`` (at its initialisation) to θ_0 and measure λ_0 (stage
    "theta0"), then run both arms.

    Returns:
        ``{"lambda0", "lrs", "pretrain_loss", "arms"}`` (the seed's arrays).
    """
    start = stages.run(
        "theta0", lambda resume, snapshot: reach_theta0(model, task, cfg, seed)
    )
    arms = {}
    for arm in ARMS:

        def clr(resume, snapshot, arm=arm):
            model.load_state_dict(start["theta0"])
            return run_arm(arm, model, task, cfg, seed, start, resume, snapshot)

        arms[arm] = stages.run(arm, clr)
    return {
        "lambda0": start["lambda0"],
        "lrs": start["lrs"],
        "pretrain_loss": start["pretrain_loss"],
        "arms": arms,
    }


def reach_theta0(model: nn.Module, task: dict, cfg: Config, seed: int) -> dict:
    """GD to θ_0, then λ_0, the CLR's extremes and the cycle-0 measurements."""
    pretrain_loss = pretrain(model, task, cfg)
    rep, u1 = measure_sharpness(model, task, cfg, seed)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    start = {
        "lambda_max": rep.lambda_max,
        "trace": rep.trace,
        "frobenius": rep.frobenius,
        **evaluate(model, task),
        "theta": theta_of(model),
        "u1": u1,
    }
    lam0 = rep.lambda_max
    return {
        "pretrain_loss": pretrain_loss,
        "theta0": theta0,
        "start": start,
        "lambda0": lam0,
        "lrs": [cfg.low_factor * 2 / lam0, cfg.high_factor * 2 / lam0],
    }


def pretrain(model: nn.Module, task: dict, cfg: Config) -> list[float]:
    """Full-batch GD at ``pretrain_lr`` for ``pretrain_steps`` steps (to θ_0).

    Raises:
        _common.Diverged: If the loss becomes non-finite.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.pretrain_lr)
    d = task["data"]
    losses = []
    for _ in common.progress_bar(range(cfg.pretrain_steps), desc="GD to theta_0"):
        opt.zero_grad(set_to_none=True)
        loss = task["loss_fn"](model(d.x_train), task["y_train"])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise common.Diverged(
                f"GD pretraining diverged at pretrain_lr={cfg.pretrain_lr}; pass a "
                "smaller --pretrain-lr."
            )
    return losses


def run_arm(
    arm: str,
    model: nn.Module,
    task: dict,
    cfg: Config,
    seed: int,
    start: dict,
    resume: dict | None,
    snapshot: Any,
) -> dict[str, Any]:
    """Run GD+CLR or SGD+CLR from θ_0 (the model's current parameters).

    ``start`` is the stage "theta0" (the measurements at θ_0 are cycle 0). A
    snapshot is saved at the end of every cycle; ``resume`` is the last one.

    Returns:
        The arm's record: per-step ``lr``, ``step_loss``, ``full_loss``; per cycle
        the measurements and :data:`PER_CYCLE`.
    """
    eta_min, eta_max = start["lrs"]
    base = torch.optim.SGD(model.parameters(), lr=eta_min)
    opt = CyclicLRWrapper(
        base,
        base_lr=eta_min,
        max_lr=eta_max,
        step_size_up=cfg.phase_steps,
        step_size_down=cfg.phase_steps,
        mode=cfg.mode,
    )
    gen = torch.Generator().manual_seed(30_000 + seed)  # SGD batch sampling
    rec: dict[str, list] = {
        k: [start["start"][k]]
        for k in ("lambda_max", "trace", "frobenius", "loss", "train_acc", "test_acc")
    }
    for k in PER_CYCLE:
        rec[k] = [None if k == "escape_step" else math.nan]
    rec.update(cycle=[0], displacement=[0.0], lr=[], step_loss=[], full_loss=[])
    first = 0
    theta_prev, u_prev = start["start"]["theta"], start["start"]["u1"]
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        rec, first = resume["record"], resume["cycle"]
        theta_prev, u_prev = resume["theta_prev"], resume["u_prev"]
    # a resumed run's stage results and snapshot come back on the CPU (the
    # checkpoint loads with map_location="cpu"); θ_prev meets the model's θ below
    device = next(model.parameters()).device
    theta_prev, u_prev = theta_prev.to(device), u_prev.to(device)
    period = 2 * cfg.phase_steps
    bar = common.progress_bar(
        total=cfg.cycles * period, initial=first * period, desc=f"{arm}+CLR s{seed}"
    )
    for c in range(first, cfg.cycles):
        loss_start = rec["loss"][-1]
        theta_high, escape, loss_max = run_cycle(
            arm, c, model, opt, gen, task, cfg, rec, theta_prev, bar
        )
        theta = theta_of(model)
        ev = evaluate(model, task)
        rec["cycle"].append(c + 1)
        rec["loss_ratio_max"].append(loss_max / loss_start)
        rec["escape_step"].append(None if escape is None else escape[0])
        rec["escape_distance"].append(
            math.nan if escape is None else float(escape[1].norm())
        )
        rec["cos2_escape"].append(
            math.nan if escape is None else _cos2(escape[1], u_prev)
        )
        high = theta_high - theta_prev
        rec["excursion"].append(float(high.norm()))
        rec["cos2_high"].append(_cos2(high, u_prev))
        for k, v in ev.items():
            rec[k].append(v)
        if not (math.isfinite(ev["loss"]) and torch.isfinite(theta).all()):
            rec["diverged_at_cycle"] = c + 1
            for k in ("lambda_max", "trace", "frobenius", "cos2_cycle"):
                rec[k].append(math.nan)
            rec["displacement"].append(math.nan)
            break
        rep, u1 = measure_sharpness(model, task, cfg, seed + c + 1, v0=u_prev[:, None])
        delta = theta - theta_prev
        rec["lambda_max"].append(rep.lambda_max)
        rec["trace"].append(rep.trace)
        rec["frobenius"].append(rep.frobenius)
        rec["displacement"].append(float(delta.norm()))
        rec["cos2_cycle"].append(_cos2(delta, u1))
        theta_prev, u_prev = theta, u1
        snapshot(
            {
                "cycle": c + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "record": rec,
                "theta_prev": theta_prev,
                "u_prev": u_prev,
            }
        )
    bar.close()
    return rec


def run_cycle(
    arm: str,
    c: int,
    model: nn.Module,
    opt: CyclicLRWrapper,
    gen: torch.Generator,
    task: dict,
    cfg: Config,
    rec: dict[str, list],
    theta_prev: torch.Tensor,
    bar: Any,
) -> tuple[torch.Tensor, tuple[int, torch.Tensor] | None, float]:
    """Run cycle ``c``'s ``2·phase_steps`` steps, appending the per-step records.

    Returns:
        θ at the end of the high phase, the escape ``(step of the cycle,
        θ_esc − θ_c)`` or ``None``, and the cycle's largest full loss.
    """
    period = 2 * cfg.phase_steps
    d = task["data"]
    n = d.x_train.shape[0]
    theta_high, escape = None, None
    loss_start, loss_max = rec["loss"][-1], -math.inf
    for t in range(c * period, (c + 1) * period):
        common.maybe_interrupt(t)  # units: the arm's steps
        opt.zero_grad(set_to_none=True)
        if arm == "sgd":
            idx = torch.randperm(n, generator=gen, device="cpu")[: cfg.batch_size]
            idx = idx.to(d.x_train.device)
            loss = task["loss_fn"](model(d.x_train[idx]), task["y_train"][idx])
        else:
            loss = task["loss_fn"](model(d.x_train), task["y_train"])
        loss.backward()
        rec["lr"].append(float(opt.param_groups[0]["lr"]))
        opt.step()
        rec["step_loss"].append(float(loss.detach()))
        full = full_loss(model, task)
        rec["full_loss"].append(full)
        loss_max = max(loss_max, full) if math.isfinite(full) else math.inf
        if escape is None and full >= cfg.escape_factor * loss_start:
            escape = (t - c * period + 1, theta_of(model) - theta_prev)
        bar.update(1)
        if t % 10 == 0:
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3g}", lr=f"{rec['lr'][-1]:.3g}"
            )
        if t - c * period + 1 == cfg.phase_steps:
            theta_high = theta_of(model)
    return theta_high, escape, loss_max


# --------------------------------------------------------------------------------------
# Verdict and figure
# --------------------------------------------------------------------------------------


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else math.nan


def _median(vals: list[float]) -> float:
    vals = sorted(v for v in vals if v is not None and math.isfinite(v))
    if not vals:
        return math.nan
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else 0.5 * (vals[m - 1] + vals[m])


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _escape_note(arm: str, metrics: dict, seeds: dict) -> str:
    """The note of an escape row: counts, where, and the other displacements."""
    m = {k[len(arm) + 1 :]: v for k, v in metrics.items() if k.startswith(arm + "_")}
    ran = sum(len(s["arms"][arm]["cycle"]) - 1 for s in seeds.values())
    where = m["escape_cycles"]
    if where == [1]:
        where = "all in cycle 1: a first-cycle measurement"
    else:
        where = "in cycles " + (", ".join(map(str, where)) or "-")
    return (
        f"{_count(m['escapes'], 'escape')} in {_count(ran, 'cycle')} over "
        f"{_count(len(seeds), 'seed')} ({where}); medians: "
        f"|theta_esc - theta_c| = {m['escape_distance_median']:.3g}, cos^2 of "
        f"the high-phase excursion = {m['cos2_high_median']:.3g}, of the "
        f"end-to-end cycle displacement = {m['cos2_cycle_median']:.3g}"
    )


def summarise(seeds: dict[str, dict], cfg: Config) -> tuple[dict, list[dict]]:
    """Summary metrics (means over seeds, medians over cycles) and the verdict rows."""

    def last(arm, key):
        return _mean([s["arms"][arm][key][-1] for s in seeds.values()])

    def cycles(arm, key):
        return [v for s in seeds.values() for v in s["arms"][arm][key][1:]]

    metrics = {
        "lambda0": _mean([s["lambda0"] for s in seeds.values()]),
        "loss0": _mean([s["arms"]["gd"]["loss"][0] for s in seeds.values()]),
        "eta_min": _mean([s["lrs"][0] for s in seeds.values()]),
        "eta_max": _mean([s["lrs"][1] for s in seeds.values()]),
    }
    for arm in ARMS:
        for key in ("lambda_max", "trace", "frobenius", "loss", "test_acc"):
            metrics[f"{arm}_final_{key}"] = last(arm, key)
        for key in ("cos2_escape", "escape_distance", "cos2_high", "cos2_cycle"):
            metrics[f"{arm}_{key}_median"] = _median(cycles(arm, key))
        metrics[f"{arm}_excursion_median"] = _median(cycles(arm, "excursion"))
        steps = cycles(arm, "escape_step")
        metrics[f"{arm}_escapes"] = sum(v is not None for v in steps)
        metrics[f"{arm}_escape_cycles"] = sorted(
            {
                c
                for s in seeds.values()
                for c, v in enumerate(s["arms"][arm]["escape_step"])
                if v is not None
            }
        )
        # eta_max * lambda_max(theta_c) / 2 at the start of cycles 2.. (< 1: the
        # high phase is GD-stable there)
        metrics[f"{arm}_later_stability_max"] = max(
            (
                s["lrs"][1] * lam / 2
                for s in seeds.values()
                for lam in s["arms"][arm]["lambda_max"][1:-1]
                if lam is not None and math.isfinite(lam)
            ),
            default=math.nan,
        )
    tr_ratio = metrics["sgd_final_trace"] / metrics["gd_final_trace"]
    lam_ratio = metrics["sgd_final_lambda_max"] / metrics["gd_final_lambda_max"]
    metrics.update(trace_ratio_sgd_over_gd=tr_ratio, lambda_ratio_sgd_over_gd=lam_ratio)
    # the paper states the claim without numbers: every threshold is ours
    src = (
        "ours (docs/recipes/flat_minima_clr.md); claim: Wang & Wu 2023, "
        "arXiv:2310.00692 (qualitative)"
    )

    esc = (
        f"the escape displacement theta_esc - theta_c (theta_esc: first step of a "
        f"cycle with L >= {cfg.escape_factor:g} L(theta_c)) against u_1(theta_c), "
        f"median cos^2 over the escapes"
    )
    rows = [
        common.claim(
            "SGD+CLR ends flatter: Tr H(SGD) / Tr H(GD) after the last cycle",
            tr_ratio,
            "<=",
            0.8,
            source=src,
        ),
        common.claim(
            "SGD+CLR ends flatter: lambda_max(SGD) / lambda_max(GD)",
            lam_ratio,
            "<",
            1.0,
            source=src,
        ),
        common.claim(
            f"GD+CLR escapes along u_1: {esc}",
            metrics["gd_cos2_escape_median"],
            ">=",
            0.7,
            source=src,
            note=_escape_note("gd", metrics, seeds),
        ),
        common.claim(
            "SGD+CLR escapes off u_1: the same escape displacement, median cos^2 "
            "over SGD+CLR's escapes",
            metrics["sgd_cos2_escape_median"],
            "<=",
            0.3,
            source=src,
            note=_escape_note("sgd", metrics, seeds),
        ),
    ]
    return metrics, rows


def _finite(values: list) -> list[float]:
    # JSON null (NaN/inf) and overflowing losses of a diverged arm are not drawn
    return [v if v is not None and abs(v) < 1e100 else math.nan for v in values]


def plot(results_path: str | Path) -> list[Path]:
    """Redraw ``clr.png`` from ``results.json`` alone; return the PNG paths."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    kappa = res["config"]["escape_factor"]
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    for j, s in enumerate(res["arrays"].values()):
        for i, arm in enumerate(ARMS):
            a = s["arms"][arm]
            kw = dict(color=f"C{i}", alpha=1.0 if j == 0 else 0.4)
            label = f"{arm.upper()}+CLR" if j == 0 else None
            if j == 0:  # one seed's full training loss per step
                axes[0].plot(_finite(a["full_loss"]), lw=0.6, label=label, **kw)
            c = a["cycle"]
            axes[1].plot(c, _finite(a["lambda_max"]), "o-", label=label, **kw)
            axes[2].plot(c, _finite(a["trace"]), "o-", label=label, **kw)
            for key, mk, what in (
                ("cos2_escape", "o", "escape"),
                ("cos2_high", "s", "high-phase excursion"),
                ("cos2_cycle", "x", "cycle displacement"),
            ):
                lab = f"{arm.upper()}: {what}" if j == 0 else None
                axes[3].plot(
                    c[1:], _finite(a[key][1:]), mk, label=lab, mfc="none", **kw
                )
        if j == 0:
            period = 2 * res["config"]["phase_steps"]
            gd = s["arms"]["gd"]
            for k, start in enumerate(gd["loss"][:-1]):
                if start is not None:  # the escape level of each cycle (GD's start)
                    x = [k * period, (k + 1) * period]
                    axes[0].plot(x, [kappa * start] * 2, ls=":", c="C0", lw=0.8)
            axes[4].plot(gd["lr"], color="k", lw=0.8)
            axes[1].axhline(2 / s["lrs"][1], ls=":", c="k", lw=0.8, label="2/eta_max")
            axes[1].axhline(2 / s["lrs"][0], ls="--", c="k", lw=0.8, label="2/eta_min")
    axes[0].set(
        yscale="log", title="training loss L (first seed; dotted: GD's escape level)"
    )
    axes[0].set_xlabel("step")
    axes[1].set(title="lambda_max at the end of each cycle", xlabel="cycle")
    axes[2].set(title="Tr H at the end of each cycle", xlabel="cycle")
    axes[3].set(
        title="cos^2(displacement from the cycle start, u_1)",
        xlabel="cycle",
        yscale="log",
        ylim=(1e-8, 2),
    )
    axes[4].set(title="learning rate (both arms)", xlabel="step")
    for ax in axes[:4]:
        ax.legend(fontsize=7)
    out = Path(results_path).parent / "clr.png"
    common.save_figure(fig, out)
    return [out]


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__)
