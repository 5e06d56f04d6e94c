"""SGD+CLR finds flatter minima than GD+CLR (Wang & Wu 2023; SPEC R11, §4).

The same cyclical learning rate (:class:`geoopt_sgd.CyclicLRWrapper`, SPEC §4:
``square`` or ``triangular``, extremes η_min = 0.5·2/λ_0 and η_max = 1.5·2/λ_0
around the GD stability threshold of the start θ_0) drives full-batch GD and
mini-batch SGD (B = 16) from the same θ_0. At the end of every cycle (= low phase)
the recipe measures λ_max, Tr H and ‖H‖_F (:func:`geoopt_sgd.sharpness`, Lanczos
warm-started from the previous cycle's eigenvector), the loss and the test
accuracy. Per step it records the full training loss L(θ_t); per cycle c (start
θ_c, the previous cycle's end) three displacements, each with its cos² against
the sharpest direction u_1:

* **escape** ``θ_esc − θ_c``, θ_esc the first step of the cycle with
  ``L ≥ escape_factor·L(θ_c)`` (10⁴, SPEC R10's escape criterion, as in
  ``escape_direction.py``), against u_1(θ_c); NaN when the cycle never gets there;
* **high-phase excursion** ``θ_{end of high phase} − θ_c``, against u_1(θ_c);
* **end-to-end cycle displacement** ``θ_{c+1} − θ_c``, against u_1(θ_{c+1}).

Verdict (the issue's thresholds): after the last cycle SGD+CLR is flatter (Tr H ≤
0.8 × GD+CLR's, λ_max below GD+CLR's); GD+CLR's escapes are along u_1 (median cos²
over its escapes ≥ 0.7) and SGD+CLR's are not (≤ 0.3). The other two displacements
are in ``results.json`` and in the notes of the verdict rows.

Why this measurement and this setting (WW23's claim: "unlike GD, which escapes
along the sharpest directions, SGD tends to escape from flatter directions, and
cyclical learning rates can exploit this"; SPEC R11 [PROPOSED], paper setup
[NOT FOUND]). Measured, not assumed:

* The end-to-end cycle displacement cannot show GD's oscillation: the low phase
  has η_min·λ_1 ≤ 1, so any u_1 component is damped within a few steps and the
  cycle ends wherever the slow directions took it (GD's median cos² 5e-12 in the
  full run, 4e-6 in the previous setting).
* The high-phase excursion cannot either: in the first high phase GD's u_1
  oscillation grows until GD catapults (L rises 10⁸–10⁹×) into a flatter region
  (λ_max 7.1 → 3.6–4.2), and the excursion measured at the end of the phase is
  that landing, far off u_1 (|Δ| ≈ 0.6, cos² ≤ 1e-4); in later high phases GD is
  stable and the excursion is convergence drift (cos² ≤ 1e-5).
* GD is not unstable in every high phase, whatever we tried: after the first
  escape λ_max(GD) stays below 2/η_max (η_max·λ_max/2 ≤ 0.90 square, ≤ 0.97
  triangular) and nothing re-sharpens it at a minimum. With η_max = 1.1–1.2·2/λ_0
  GD does go through a period-2 oscillation first, but it still slides to
  λ_max ≈ 0.98·2/η_max by the end of the first high phase and is stable
  afterwards. From an unconverged θ_0 (the previous setting: 1,000 raw digits, 500
  GD steps at its edge of stability; or 500 steps at lr 0.02, where progressive
  sharpening re-destabilises some later high phases) the training drift of a high
  phase (|Δ| ≈ 0.3–0.9) swamps the oscillation (≤ 0.16 along u_1) and every
  displacement has cos² ≤ 1e-3.
* What does show the claim is where each arm *leaves* its minimum: read at the
  escape level, GD's displacement is the u_1 oscillation of the quadratic model
  (cos² 0.9986–0.9992 in the 3 seeds, square; |θ_esc − θ_c| is 1.2–1.8× the
  quadratic prediction √(2·10⁴·L(θ_0)/λ_0) = 1.1–4.3e-3, within the one-step
  overshoot factor |1 − η_max·λ_0| = 2), while SGD leaves along flat directions
  (cos² ≤ 0.25). Not an artefact: the displacement is ~10¹²× the rounding of θ
  (ε·‖θ_0‖ = 1.6e-15). The u_1 component GD amplifies does start at the rounding
  level (×2 per step for ~40 steps), but a random perturbation of θ_0 of norm
  1e-12, 1e-8 or 1e-5 only moves the escape earlier (steps 37–39, 24–27, 14–17)
  with cos² ≥ 0.98 in all 3 seeds: u_1 wins because it grows ×2 per step against
  ×1.55 for u_2 (λ_2/λ_1 = 0.85). SGD from θ_0 over 10 other batch streams per
  seed: cos² ≤ 0.17 in all 30. "Escape" needs a minimum to escape from, so θ_0
  is R10's GD minimum θ*: the R5 FCN (64 → 64 → 64 → 1, tanh, float64) on 256
  ZCA-whitened digits with ±1 even/odd targets and
  ½(f − y)², 2,000 GD steps at 0.2 (= R10's 0.1 on the mean squared error):
  L(θ_0) = 4e-10, λ_0 = 7.12 (half of R10's λ_1 = 14.24, the loss convention).
  On raw digits from a GD minimum η_max = 1.5·2/λ_0 made both arms diverge.
* Both arms escape only in the first cycle: afterwards GD sits in its minimum
  (stable) and SGD wanders in a flatter valley without a 10⁴× loss rise. The
  escape rows are therefore a first-cycle measurement (one escape per arm and
  seed); their notes give the counts. That is WW23's picture: GD+CLR leaves θ_0
  once along u_1 and then stays, SGD+CLR leaves along flat directions and keeps
  moving to flatter regions (Tr H 248 → 11–16 against GD's 125–147, full run).

Threads: the default ``threads = 1`` is fastest for this 8,385-parameter model (on
the shared 2-core machine two threads made ``--quick`` 9× slower, 216 s against
25 s, load 2.4–4.4) and keeps the arithmetic independent of the machine's core
count. The trajectory after GD's catapult does depend on the arithmetic (the
instability amplifies rounding): with two threads the quick run ends at λ_max
ratio 0.894 instead of 0.900 and GD escape cos² 0.9975 instead of 0.9991; the
verdict does not change.

Measured (``--quick``, seed 0, 1 thread): Tr H ratio 0.154, λ_max ratio 0.900, GD
escape cos² 0.9991, SGD 0.0015: all PASS. ``--quick --mode triangular`` fails its
GD row (no escape): on a 60-step ramp GD is unstable only while η > 2/λ_0 (the
top 30 steps up and 30 down), and the growth ∏|1 − η_t·λ_0| = e²³ falls short of
the 2⁴² ≈ 4·10¹² that takes the rounding-level u_1 component to the escape level;
on the full 150-step ramp it is e⁵⁸ (2⁴² by the top) and GD escapes. Full runs
(3 seeds, both modes) and wall times: ``recipes/README.md``.

Commands (from the repository root)::

    python recipes/flat_minima_clr.py --quick        # CI setting
    python recipes/flat_minima_clr.py                # full: 3 seeds, 8 cycles
    python recipes/flat_minima_clr.py --mode triangular
    python recipes/flat_minima_clr.py --model test_resnet --task classes --loss ce

Outputs go to ``<out-dir>/flat_minima_clr/``: ``config.json``, ``results.json``
and ``clr.png`` (per-step loss with each cycle's escape level, λ_max and Tr H per
cycle, the three cos², the lr), redrawn from the JSON by :func:`plot`.
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
    num_train: int = 256  # training samples (R10's theta*: 256)
    whiten: bool = True  # ZCA-whiten the inputs (R10: high effective dimension)
    task: str = "parity"  # 'parity' (R5: one output, +-1 even/odd) or 'classes'
    loss: str = "mse"  # 'mse' (square loss 1/2 (f-y)^2 summed over outputs) or 'ce'
    model: str = "mlp"  # 'mlp' (R5 FCN), 'cnn', 'linear' or any timm name
    width: int = 64  # hidden width / channels of the small models
    depth: int = 2  # hidden layers of the mlp
    activation: str = "tanh"  # 'tanh' or 'relu' (mlp)
    image_size: int | None = None  # input side for image models (None: native)
    pretrain_lr: float = 0.2  # GD step size from the initialisation to theta_0
    pretrain_steps: int = 2000  # GD steps to theta_0 (0: start at the initialisation)
    mode: str = "square"  # CLR shape: 'square' or 'triangular' (SPEC §4)
    low_factor: float = 0.5  # eta_min = low_factor * 2 / lambda_0 (SPEC §4)
    high_factor: float = 1.5  # eta_max = high_factor * 2 / lambda_0 (SPEC §4)
    phase_steps: int = 150  # steps per phase (half-cycle)
    cycles: int = 8  # number of cycles
    batch_size: int = 16  # SGD batch size
    escape_factor: float = 1e4  # a cycle escapes at its first L >= this * L(theta_c)
    trace_probes: int = 30  # Hutchinson probes for Tr H and ||H||_F per measurement
    tol: float = 1e-3  # Lanczos relative tolerance of lambda_max
    threads: int = 1  # torch CPU threads during the run (restored after it)

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: 1 seed, 4 cycles of 2 x 60 steps, 10 trace probes."""
        return cls(num_seeds=1, phase_steps=60, cycles=4, trace_probes=10)


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
def full_loss(model: nn.Module, task: dict) -> float:
    """The full training loss L(θ) in eval mode (the escape criterion's L)."""
    model.eval()
    return float(task["loss_fn"](model(task["data"].x_train), task["y_train"]))


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

    ``start`` holds the measurements at θ_0 (cycle 0). Per step, the full training
    loss ``L(θ_{t+1})`` is recorded; the first step of cycle ``c`` at which it
    reaches ``escape_factor·L(θ_c)`` (θ_c: the cycle's start) is the cycle's escape,
    and the displacement ``θ_esc − θ_c`` is compared with ``u_1(θ_c)``. A checkpoint
    is saved at the end of every cycle; ``resume`` is that checkpoint.
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
    for k in PER_CYCLE:
        rec[k] = [None if k == "escape_step" else math.nan]
    rec.update(cycle=[0], displacement=[0.0], lr=[], step_loss=[], full_loss=[])
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
        theta_high, escape = None, None
        loss_start, loss_max = rec["loss"][-1], -math.inf
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
            full = full_loss(model, task)
            rec["full_loss"].append(full)
            loss_max = max(loss_max, full) if math.isfinite(full) else math.inf
            if escape is None and full >= cfg.escape_factor * loss_start:
                escape = (t - c * period + 1, flat_params(model) - theta_prev)
            bar.update(1)
            if t % 10 == 0:
                bar.set_postfix(
                    loss=f"{float(loss.detach()):.3g}", lr=f"{rec['lr'][-1]:.3g}"
                )
            if t - c * period + 1 == cfg.phase_steps:
                theta_high = flat_params(model)
        theta = flat_params(model)
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


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
    src = "SPEC R11 [PROPOSED pass]"

    def escape_note(arm):
        m = {
            k[len(arm) + 1 :]: v for k, v in metrics.items() if k.startswith(arm + "_")
        }
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
            note=escape_note("gd"),
        ),
        common.claim(
            "SGD+CLR escapes off u_1: the same escape displacement, median cos^2 "
            "over SGD+CLR's escapes",
            metrics["sgd_cos2_escape_median"],
            "<=",
            0.3,
            source=src,
            note=escape_note("sgd"),
        ),
    ]
    return metrics, rows


def validate(cfg: Config) -> None:
    """Check the config before any training.

    Raises:
        ValueError: On an invalid field (unknown model, dataset, task, loss or
            mode; lr or factors <= 0; escape_factor <= 1; eta_min >= eta_max;
            counts < 1; data that is missing).
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
    if not (cfg.escape_factor > 1 and math.isfinite(cfg.escape_factor)):
        raise ValueError(f"`escape_factor` must be > 1; got {cfg.escape_factor!r}.")
    if cfg.low_factor >= cfg.high_factor:
        raise ValueError(
            f"`low_factor` must be < high_factor = {cfg.high_factor}; "
            f"got {cfg.low_factor}."
        )
    for name in (
        "num_seeds",
        "phase_steps",
        "cycles",
        "batch_size",
        "trace_probes",
        "threads",
    ):
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
        The results dict (also in ``results.json``). Torch's CPU thread count is
        ``cfg.threads`` during the run and restored afterwards.
    """
    validate(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, _stop_at)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, _stop_at: int | None = None) -> dict[str, Any]:
    """The run itself: :func:`main` after validation, under ``cfg.threads``."""
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
    metrics, rows = summarise(seeds, cfg)
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
    cfg = common.parse_config(Config, description=__doc__)
    res = main(cfg)
    print(common.verdict_table(res["verdict"]))
    print(f"results: {Path(cfg.out_dir) / RECIPE / 'results.json'}")
    sys.exit(0 if res["passed"] else 1)
