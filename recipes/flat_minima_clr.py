"""SGD+CLR finds flatter minima than GD+CLR (Wang & Wu 2023; SPEC R11, §4).

The same cyclical learning rate (:class:`geoopt_sgd.CyclicLRWrapper`, SPEC §4:
``square`` or ``triangular``, extremes η_min = 0.5·2/λ_0 and η_max = 1.5·2/λ_0
around the GD stability threshold of the start θ_0) drives full-batch GD and
mini-batch SGD from the same θ_0. At the end of every low phase (= every cycle)
the recipe measures λ_max, Tr H and ‖H‖_F (:func:`geoopt_sgd.sharpness`, Lanczos
warm-started from the previous cycle's eigenvectors), the loss, the test accuracy,
and the cycle displacement Δ_c = θ_c − θ_{c−1} with its cos² against u_1(θ_c).

Setting (SPEC R11 [PROPOSED]): the R5 FCN (64 → 32 → 32 → 1, tanh) on the offline
``digits`` (1,000 training images, ±1 even/odd targets, square loss
½(f − y)²), GD-pretrained to θ_0; 150 steps per phase, 8 cycles, SGD batch 16,
3 seeds.

Verdict (the issue's thresholds): after the last cycle, SGD+CLR is flatter
(Tr H ≤ 0.8 × GD+CLR's and λ_max below GD+CLR's); GD+CLR's cycle displacement
aligns with u_1 (median cos² ≥ 0.7) and SGD+CLR's does not (≤ 0.3). Measured: the
flatness rows and SGD's row pass; GD's alignment row fails (cos² ~ 1e-6): after the
first cycle GD+CLR is stable in the high phases and does not oscillate (see
``recipes/README.md``).

Commands (from the repository root)::

    python recipes/flat_minima_clr.py --quick        # CI setting
    python recipes/flat_minima_clr.py                # full: 3 seeds, 8 cycles
    python recipes/flat_minima_clr.py --mode triangular
    python recipes/flat_minima_clr.py --model test_resnet --task classes --loss ce

Outputs go to ``<out-dir>/flat_minima_clr/``: ``config.json``, ``results.json``
and ``clr.png``, redrawn from the JSON by :func:`plot`. Runtime on 2 CPU cores and
the measured numbers: see ``recipes/README.md``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from torch import nn

RECIPE = "flat_minima_clr"
ARMS = ("gd", "sgd")


@dataclass(frozen=True)
class Config:
    seed: int = 0  # base seed; runs seeds seed .. seed+num_seeds-1
    num_seeds: int = 3  # seeds (the verdict averages them)
    device: str = "cpu"  # 'cpu' or 'cuda'
    out_dir: str = "runs"  # outputs go to <out_dir>/flat_minima_clr/
    resume: bool = False  # continue from <out_dir>/flat_minima_clr/checkpoint.pt
    dataset: str = "digits"  # 'digits' (offline), 'fashion_mnist', 'mnist', 'cifar10'
    data_dir: str | None = None  # where torchvision data lives (with --download)
    download: bool = False  # download a missing torchvision dataset into data_dir
    num_train: int = 1000  # training samples (R5: 1,000)
    task: str = "parity"  # 'parity' (R5: one output, +-1 even/odd) or 'classes'
    loss: str = "mse"  # 'mse' (square loss 1/2 (f-y)^2 summed over outputs) or 'ce'
    model: str = "mlp"  # 'mlp' (R5 FCN), 'cnn', 'linear' or any timm name
    width: int = 32  # hidden width / channels of the small models
    depth: int = 2  # hidden layers of the mlp
    activation: str = "tanh"  # 'tanh' or 'relu' (mlp)
    image_size: int | None = None  # input side for image models (None: native)
    pretrain_lr: float = 0.2  # GD step size from the initialisation to theta_0
    pretrain_steps: int = 500  # GD steps to theta_0 (0: start at the initialisation)
    mode: str = "square"  # CLR shape: 'square' or 'triangular' (SPEC §4)
    low_factor: float = 0.5  # eta_min = low_factor * 2 / lambda_0 (SPEC §4)
    high_factor: float = 1.5  # eta_max = high_factor * 2 / lambda_0 (SPEC §4)
    phase_steps: int = 150  # steps per phase (half-cycle)
    cycles: int = 8  # number of cycles
    batch_size: int = 16  # SGD batch size
    trace_probes: int = 30  # Hutchinson probes for Tr H and ||H||_F per measurement
    tol: float = 1e-3  # Lanczos relative tolerance of lambda_max

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: 1 seed, short phases (a few minutes on 2 CPU cores)."""
        return cls(num_seeds=1, phase_steps=60, cycles=4, trace_probes=20)


# --------------------------------------------------------------------------------------
# Model, data, loss
# --------------------------------------------------------------------------------------


class HalfSquaredError(nn.Module):
    """Square loss of WWS22/WW23: mean over samples of ½‖f − y‖² (sum over outputs)."""

    def forward(self, output, target):
        return 0.5 * (output - target).pow(2).sum(-1).mean()


def load_task(cfg: Config, seed: int, device: torch.device) -> dict[str, Any]:
    """Return the training/test tensors with targets for ``cfg.task`` and the loss."""
    data = common.load_data(
        cfg.dataset,
        image_size=cfg.image_size,
        flatten=common.model_wants_flat(cfg.model),
        num_train=cfg.num_train,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=seed,
        dtype=torch.float64 if device.type == "cpu" else torch.float32,
    )
    dtype = data.x_train.dtype
    if cfg.task == "parity":
        outputs = 1

        def targets(y):
            return ((y % 2 == 0).to(dtype) * 2 - 1)[:, None]

        def correct(out, y):
            return (out[:, 0] > 0) == (y % 2 == 0)

    else:
        outputs = data.num_classes

        def targets(y):
            if cfg.loss == "mse":
                return nn.functional.one_hot(y, outputs).to(dtype)
            return y

        def correct(out, y):
            return out.argmax(1) == y

    loss_fn = HalfSquaredError() if cfg.loss == "mse" else nn.CrossEntropyLoss()
    return {
        "data": data.to(device),
        "y_train": targets(data.y_train).to(device),
        "y_test": targets(data.y_test).to(device),
        "outputs": outputs,
        "loss_fn": loss_fn,
        "correct": correct,
    }


def build_model(cfg: Config, task: dict, seed: int) -> nn.Module:
    """Build the (seeded) model in the data's dtype and device."""
    data = task["data"]
    return common.make_model(
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
    ).to(data.x_train.device)


def flat_params(model: nn.Module) -> torch.Tensor:
    """Return the parameters as one flat float64 vector ``(P,)``."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


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
    from geoopt_sgd import sharpness

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


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def pretrain(model: nn.Module, task: dict, cfg: Config) -> list[float]:
    """Full-batch GD at ``pretrain_lr`` for ``pretrain_steps`` steps (to θ_0).

    Raises:
        RuntimeError: If the loss becomes non-finite.
    """
    opt = torch.optim.SGD(model.parameters(), lr=cfg.pretrain_lr)
    d = task["data"]
    losses = []
    for _ in common.progress(range(cfg.pretrain_steps), desc="GD to theta_0"):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = task["loss_fn"](model(d.x_train), task["y_train"])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(
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
    lrs: tuple[float, float],
    start: dict,
    resume: dict | None,
    save: Any,
    stop_at: int | None,
) -> dict[str, Any]:
    """Run GD+CLR or SGD+CLR from θ_0 (the model's current parameters).

    ``start`` holds the measurements at θ_0 (cycle 0). A checkpoint is saved at the
    end of every cycle; ``resume`` is that checkpoint.
    """
    from geoopt_sgd import CyclicLRWrapper

    eta_min, eta_max = lrs
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
    d = task["data"]
    n = d.x_train.shape[0]
    rec: dict[str, list] = {
        k: [start[k]]
        for k in ("lambda_max", "trace", "frobenius", "loss", "train_acc", "test_acc")
    }
    rec.update(cycle=[0], cos2_cycle=[math.nan], cos2_high=[math.nan])
    rec.update(displacement=[0.0], lr=[], step_loss=[])
    first = 0
    theta_prev, u_prev = start["theta"], start["u1"]
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        rec, first = resume["record"], resume["cycle"]
        theta_prev, u_prev = resume["theta_prev"], resume["u_prev"]
    period = 2 * cfg.phase_steps
    bar = common.progress(
        total=cfg.cycles * period, initial=first * period, desc=f"{arm}+CLR s{seed}"
    )
    for c in range(first, cfg.cycles):
        theta_high = None
        for t in range(c * period, (c + 1) * period):
            common.maybe_interrupt(t, stop_at)
            model.train()
            opt.zero_grad(set_to_none=True)
            if arm == "sgd":
                idx = torch.randperm(n, generator=gen)[: cfg.batch_size].to(
                    d.x_train.device
                )
                loss = task["loss_fn"](model(d.x_train[idx]), task["y_train"][idx])
            else:
                loss = task["loss_fn"](model(d.x_train), task["y_train"])
            loss.backward()
            rec["lr"].append(float(base.param_groups[0]["lr"]))
            opt.step()
            rec["step_loss"].append(float(loss.detach()))
            bar.update(1)
            if t % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3g}", lr=f"{rec['lr'][-1]:.3g}")
            if t - c * period + 1 == cfg.phase_steps:
                theta_high = flat_params(model)
        theta = flat_params(model)
        ev = evaluate(model, task)
        if not (math.isfinite(ev["loss"]) and torch.isfinite(theta).all()):
            rec["diverged_at_cycle"] = c + 1
            for k in ("lambda_max", "trace", "frobenius", "cos2_cycle", "cos2_high"):
                rec[k].append(math.nan)
            for k, v in ev.items():
                rec[k].append(v)
            rec["cycle"].append(c + 1)
            rec["displacement"].append(math.nan)
            break
        rep, u1 = measure_sharpness(model, task, cfg, seed + c + 1, v0=u_prev[:, None])
        delta = theta - theta_prev
        high = theta_high - theta_prev
        rec["lambda_max"].append(rep.lambda_max)
        rec["trace"].append(rep.trace)
        rec["frobenius"].append(rep.frobenius)
        for k, v in ev.items():
            rec[k].append(v)
        rec["cycle"].append(c + 1)
        rec["displacement"].append(float(delta.norm()))
        rec["cos2_cycle"].append(_cos2(delta, u1))
        rec["cos2_high"].append(_cos2(high, u_prev))
        theta_prev, u_prev = theta, u1
        save(
            {
                "arm": arm,
                "seed": seed,
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


def _cos2(v: torch.Tensor, u: torch.Tensor) -> float:
    nv = float(v.norm())
    if nv == 0 or not math.isfinite(nv):
        return math.nan
    return float((v @ u.to(v)) ** 2 / (nv**2 * float(u.norm()) ** 2))


def run_seed(
    cfg: Config, seed: int, device: torch.device, state: dict, save: Any, stop_at
) -> dict[str, Any]:
    """Pretrain to θ_0, measure λ_0, run both arms; ``state`` holds finished parts."""
    task = load_task(cfg, seed, device)
    model = build_model(cfg, task, seed)
    current = state.get("current")

    def save_current(cur):
        state["current"] = cur
        save()

    if "theta0" not in state:
        state["pretrain_loss"] = pretrain(model, task, cfg)
        rep, u1 = measure_sharpness(model, task, cfg, seed)
        state["theta0"] = {k: v.clone() for k, v in model.state_dict().items()}
        state["start"] = {
            "lambda_max": rep.lambda_max,
            "trace": rep.trace,
            "frobenius": rep.frobenius,
            **evaluate(model, task),
            "theta": flat_params(model),
            "u1": u1,
        }
        lam0 = rep.lambda_max
        state["lambda0"] = lam0
        state["lrs"] = [cfg.low_factor * 2 / lam0, cfg.high_factor * 2 / lam0]
        save()
    arms = state.setdefault("arms", {})
    for arm in ARMS:
        if arm in arms:
            continue
        model.load_state_dict(state["theta0"])
        resume = current if current and current["arm"] == arm else None
        arms[arm] = run_arm(
            arm,
            model,
            task,
            cfg,
            seed,
            tuple(state["lrs"]),
            state["start"],
            resume,
            save_current,
            stop_at,
        )
        state["current"] = current = None
        save()
    return state


# --------------------------------------------------------------------------------------
# Verdict, main
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


def summarise(seeds: dict[str, dict]) -> tuple[dict, list[dict]]:
    """Summary metrics (means over seeds) and the verdict rows."""

    def last(arm, key):
        return _mean([s["arms"][arm][key][-1] for s in seeds.values()])

    def cycles(arm, key):
        return [v for s in seeds.values() for v in s["arms"][arm][key][1:]]

    metrics = {
        "lambda0": _mean([s["lambda0"] for s in seeds.values()]),
        "eta_min": _mean([s["lrs"][0] for s in seeds.values()]),
        "eta_max": _mean([s["lrs"][1] for s in seeds.values()]),
    }
    for arm in ARMS:
        for key in ("lambda_max", "trace", "frobenius", "loss", "test_acc"):
            metrics[f"{arm}_final_{key}"] = last(arm, key)
        metrics[f"{arm}_cos2_cycle_median"] = _median(cycles(arm, "cos2_cycle"))
        metrics[f"{arm}_cos2_high_median"] = _median(cycles(arm, "cos2_high"))
    tr_ratio = metrics["sgd_final_trace"] / metrics["gd_final_trace"]
    lam_ratio = metrics["sgd_final_lambda_max"] / metrics["gd_final_lambda_max"]
    metrics.update(trace_ratio_sgd_over_gd=tr_ratio, lambda_ratio_sgd_over_gd=lam_ratio)
    src = "SPEC R11 [PROPOSED pass]"
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
            "GD+CLR's cycle displacement aligns with u_1 (median cos^2)",
            metrics["gd_cos2_cycle_median"],
            ">=",
            0.7,
            source=src,
        ),
        common.claim(
            "SGD+CLR's cycle displacement does not (median cos^2)",
            metrics["sgd_cos2_cycle_median"],
            "<=",
            0.3,
            source=src,
        ),
    ]
    return metrics, rows


def validate(cfg: Config) -> None:
    """Check the config before any training.

    Raises:
        ValueError: On an invalid field (unknown model, dataset, task, loss or
            mode; lr or factors <= 0; eta_min >= eta_max; counts < 1; data that
            is missing).
        FileNotFoundError: If a torchvision dataset is missing without --download.
    """
    common.check_config_basics(cfg)
    if cfg.task not in ("parity", "classes"):
        raise ValueError(
            f"`task` must be one of 'parity', 'classes'; got {cfg.task!r}."
        )
    if cfg.mode not in ("square", "triangular"):
        raise ValueError(
            f"`mode` must be one of 'square', 'triangular'; got {cfg.mode!r}."
        )
    if cfg.task == "parity" and cfg.loss != "mse":
        raise ValueError(f"`loss` must be 'mse' with task 'parity'; got {cfg.loss!r}.")
    for name in ("low_factor", "high_factor", "tol"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{name}` must be > 0; got {v!r}.")
    if cfg.low_factor >= cfg.high_factor:
        raise ValueError(
            f"`low_factor` must be < high_factor = {cfg.high_factor}; "
            f"got {cfg.low_factor}."
        )
    for name in ("num_seeds", "phase_steps", "cycles", "batch_size", "trace_probes"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"`{name}` must be >= 1; got {getattr(cfg, name)}.")
    if cfg.pretrain_steps < 0:
        raise ValueError(f"`pretrain_steps` must be >= 0; got {cfg.pretrain_steps}.")
    task = load_task(cfg, cfg.seed, torch.device("cpu"))
    if cfg.batch_size > task["data"].x_train.shape[0]:
        raise ValueError(
            f"`batch_size` must be <= the training set size "
            f"{task['data'].x_train.shape[0]}; got {cfg.batch_size}."
        )


def main(cfg: Config, *, _stop_at: int | None = None) -> dict[str, Any]:
    """Run the recipe; write ``config.json``, ``results.json`` and ``clr.png``.

    Args:
        cfg: The configuration.
        _stop_at: Test hook: raise :class:`_common.Interrupted` at this step of the
            first arm that reaches it (after the previous cycle's checkpoint).

    Returns:
        The results dict (also in ``results.json``).
    """
    validate(cfg)
    t_start = time.perf_counter()
    device = common.resolve_device(cfg.device)
    out = common.recipe_dir(cfg.out_dir, RECIPE)
    cfg_dict = common.config_to_dict(cfg)
    common.write_json(out / "config.json", cfg_dict)
    ckpt = out / "checkpoint.pt"
    progress: dict[str, Any] = {}
    if cfg.resume:
        saved = common.load_checkpoint(ckpt, config=cfg_dict)
        if saved is not None:
            progress = saved["progress"]
    else:
        common.seed_everything(cfg.seed)

    def save() -> None:
        common.save_checkpoint(ckpt, {"config": cfg_dict, "progress": progress})

    seeds = {}
    for seed in range(cfg.seed, cfg.seed + cfg.num_seeds):
        state = progress.setdefault(str(seed), {})
        run_seed(cfg, seed, device, state, save, _stop_at)
        seeds[str(seed)] = state
    metrics, rows = summarise(seeds)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    arrays = {
        s: {
            "lambda0": v["lambda0"],
            "lrs": v["lrs"],
            "pretrain_loss": v["pretrain_loss"],
            "arms": v["arms"],
        }
        for s, v in seeds.items()
    }
    results = common.results_payload(
        RECIPE,
        cfg,
        env=common.environment(device),
        metrics=metrics,
        arrays=arrays,
        verdict=rows,
    )
    path = common.write_json(out / "results.json", results)
    plot(path)
    return common.read_json(path)  # as written: NaN became null


def _finite(values: list) -> list[float]:
    # JSON null (NaN/inf) and overflowing losses of a diverged arm are not drawn
    return [v if v is not None and abs(v) < 1e100 else math.nan for v in values]


def plot(results_path: str | Path) -> list[Path]:
    """Redraw ``clr.png`` from ``results.json`` alone; return the PNG paths."""
    plt = common.pyplot()
    res = common.read_json(results_path)
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    for j, s in enumerate(res["arrays"].values()):
        for i, arm in enumerate(ARMS):
            a = s["arms"][arm]
            kw = dict(color=f"C{i}", alpha=1.0 if j == 0 else 0.4)
            label = f"{arm.upper()}+CLR" if j == 0 else None
            if j == 0:  # one seed's per-step loss (GD drawn on top of SGD)
                axes[0].plot(
                    _finite(a["step_loss"]), lw=0.5, label=label, zorder=3 - i, **kw
                )
            c = a["cycle"]
            axes[1].plot(c, _finite(a["lambda_max"]), "o-", label=label, **kw)
            axes[2].plot(c, _finite(a["trace"]), "o-", label=label, **kw)
            axes[3].plot(c[1:], _finite(a["cos2_cycle"][1:]), "o-", label=label, **kw)
        if j == 0:
            axes[4].plot(s["arms"]["gd"]["lr"], color="k", lw=0.8)
            axes[1].axhline(2 / s["lrs"][1], ls=":", c="k", lw=0.8, label="2/eta_max")
            axes[1].axhline(2 / s["lrs"][0], ls="--", c="k", lw=0.8, label="2/eta_min")
    axes[0].set(yscale="log", title="training loss (per step, first seed)")
    axes[0].set_xlabel("step")
    axes[1].set(title="lambda_max at the end of each cycle", xlabel="cycle")
    axes[2].set(title="Tr H at the end of each cycle", xlabel="cycle")
    axes[3].set(title="cos^2(cycle displacement, u_1)", xlabel="cycle", ylim=(0, 1))
    axes[4].set(title="learning rate (both arms)", xlabel="step")
    for ax in axes[:4]:
        ax.legend(fontsize=7)
    out = Path(results_path).parent / "clr.png"
    fig.savefig(out)
    plt.close(fig)
    return [out]


if __name__ == "__main__":
    cfg = common.parse_config(Config, description=__doc__)
    res = main(cfg)
    print(common.verdict_table(res["verdict"]))
    print(f"results: {Path(cfg.out_dir) / RECIPE / 'results.json'}")
    sys.exit(0 if res["passed"] else 1)
