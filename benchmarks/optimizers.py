"""Optimizer benchmark: step time of our optimizers vs torch.optim.SGD (issue #4).

Measures the optimizer step alone on a timm CNN's parameters with fixed random
gradients (no forward/backward), for

* ``sgd_foreach``: ``torch.optim.SGD(foreach=True)``, the reference;
* ``probed_sgd``: :class:`~geoopt_sgd.ProbedSGD` (foreach, no probe);
* ``cyclic_sgd``: :class:`~geoopt_sgd.CyclicLRWrapper` around SGD (foreach);
* ``noisy_isotropic``: :class:`~geoopt_sgd.NoisyGD` with ``noise="isotropic"``
  (foreach);

all with momentum 0. Each repetition times a block of steps of every optimizer,
in a rotating order (interleaved, so that a change in machine load hits all of
them alike); the per-step time is the median over repetitions. Targets from the
issue: isotropic noise <= 1.2x SGD, the wrapper <= 1.02x.

The Hessian-aligned noise (``noise="hessian"``), whose cost is HVPs at each
refresh amortised over ``refresh_every`` steps, is measured by
``benchmarks/_noisy_gd_bench.py`` (``bench_noisy_gd``) and reported here in HVPs
per step.

Commands::

    python benchmarks/optimizers.py --quick   # timm test_resnet (0.37M), ~1 min
    python benchmarks/optimizers.py           # timm resnet18 (11.2M), ~5-10 min
                                              # on 2 busy CPU cores

Results: a table on stdout and ``benchmarks/results/optimizers.json`` with the
environment (versions, threads, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
from _common import (
    add_device_argument,
    build_timm,
    environment,
    load_average,
    positive,
    synchronize,
    timm_model,
)

from geoopt_sgd import CyclicLRWrapper, NoisyGD, ProbedSGD

TARGETS = {"noisy_isotropic": 1.2, "cyclic_sgd": 1.02}


def _optimizers(params: list[torch.Tensor]) -> dict[str, torch.optim.Optimizer]:
    # a tiny lr: thousands of steps must not move the parameters far
    lr = 1e-8
    return {
        "sgd_foreach": torch.optim.SGD(params, lr=lr, foreach=True),
        "probed_sgd": ProbedSGD(params, lr=lr, foreach=True),
        "cyclic_sgd": CyclicLRWrapper(
            torch.optim.SGD(params, lr=lr, foreach=True),
            base_lr=lr,
            max_lr=2 * lr,
            step_size_up=50,
        ),
        "noisy_isotropic": NoisyGD(
            params, lr=lr, noise="isotropic", noise_scale=1e-3, foreach=True, seed=0
        ),
    }


def bench_steps(
    model_name: str, *, repeats: int, block: int, warmup: int, device: str
) -> dict[str, Any]:
    """Time the step of each optimizer on ``model_name``'s parameters.

    Returns:
        Per-optimizer median ms per step, all repetitions, and ratios to SGD.
    """

    torch.manual_seed(0)
    model = build_timm(model_name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device="cpu").to(p)
    opts = _optimizers(params)
    names = list(opts)

    def run_block(opt: torch.optim.Optimizer) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(block):
            opt.step()
        synchronize(device)
        return (time.perf_counter() - start) / block

    for name in names:
        for _ in range(warmup):
            run_block(opts[name])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(1e3 * run_block(opts[name]))
    median = {n: statistics.median(v) for n, v in samples.items()}
    ref = median["sgd_foreach"]
    ratios = {n: median[n] / ref for n in names if n != "sgd_foreach"}
    # paired ratios (same repetition): less sensitive to slow load drifts
    paired = {
        n: statistics.median(
            a / b for a, b in zip(samples[n], samples["sgd_foreach"], strict=True)
        )
        for n in names
        if n != "sgd_foreach"
    }
    return {
        "model": model_name,
        "params": sum(p.numel() for p in params),
        "repeats": repeats,
        "steps_per_block": block,
        "ms_per_step_median": median,
        "ms_per_step_samples": samples,
        "ratio_vs_sgd": ratios,
        "paired_ratio_vs_sgd": paired,
        "targets": TARGETS,
        "meets_target": {n: paired[n] <= t for n, t in TARGETS.items()},
        "cyclic_last_step": opts["cyclic_sgd"].last_step,
    }


def bench_hessian(quick: bool, device: str) -> dict[str, Any]:
    """Hessian-aligned noise: HVPs per step (``_noisy_gd_bench.bench_noisy_gd``).

    Returns:
        The bench result dict, or a dict with ``"error"`` if it is unavailable.
    """
    try:
        from _noisy_gd_bench import bench_noisy_gd
    except ImportError as e:
        return {"error": f"benchmarks/_noisy_gd_bench.py unavailable: {e}"}
    kwargs: dict[str, Any] = {"device": device}
    if quick:
        kwargs.update(
            model_name="test_resnet",
            small_model_name="test_resnet",
            small_samples=16,
            hessian_steps=10,
            repeats=5,
        )
    return bench_noisy_gd(**kwargs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and write the JSON.

    Returns:
        The results dict.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="timm test_resnet")
    parser.add_argument(
        "--model", type=timm_model, default=None, help="timm model (default resnet18)"
    )
    parser.add_argument("--repeats", type=positive(int), default=None)
    parser.add_argument(
        "--block", type=positive(int), default=None, help="steps per timing"
    )
    add_device_argument(parser)
    parser.add_argument("--no-hessian", action="store_true")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "optimizers.json"),
    )
    args = parser.parse_args(argv)
    model = args.model or ("test_resnet" if args.quick else "resnet18")
    repeats = args.repeats or (15 if args.quick else 21)
    block = args.block or (20 if args.quick else 5)

    load_before = load_average()
    start = time.perf_counter()
    steps = bench_steps(
        model, repeats=repeats, block=block, warmup=2, device=args.device
    )
    hessian = None if args.no_hessian else bench_hessian(args.quick, args.device)
    result = {
        "schema_version": 1,
        "benchmark": "optimizers",
        "quick": args.quick,
        "environment": environment(args.device),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": time.perf_counter() - start,
        "step_alone": steps,
        "noisy_gd": hessian,
    }

    print(
        f"step alone on {model} ({steps['params']:,} params), ms/step (median); "
        "x SGD: the median of the per-repetition ratios (paired), not the ratio "
        "of the medians:"
    )
    for name, ms in steps["ms_per_step_median"].items():
        extra = ""
        if name != "sgd_foreach":
            r = steps["paired_ratio_vs_sgd"][name]
            target = TARGETS.get(name)
            extra = f"  {r:.3f}x SGD" + (f" (target <= {target}x)" if target else "")
        print(f"  {name:16s} {ms:9.3f}{extra}")
    if hessian and "hessian_noise" in hessian:
        h = hessian["hessian_noise"]
        print(
            f"hessian noise on {h['model']} (k={h['k']}, refresh_every="
            f"{h['refresh_every']}): {h['hvp_per_step']:.1f} HVPs/step, "
            f"{h['hvp_per_refresh']:.1f} HVPs/refresh, {h['ratio_vs_sgd']:.2f}x "
            "SGD's train step"
        )
    elif hessian:
        print(f"hessian noise: {hessian.get('error')}")
    print(f"load average before/after: {load_before} / {result['load_average_after']}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
