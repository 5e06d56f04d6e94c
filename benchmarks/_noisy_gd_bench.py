"""NoisyGD benchmark section (imported and printed by benchmarks/optimizers.py).

Three measurements, all on CPU unless ``device="cuda"``:

1. **Optimizer step alone** on a timm CNN's parameters (resnet18, 11.2M), with
   fixed random gradients: ``torch.optim.SGD(foreach=True)`` vs ``NoisyGD``
   with ``noise="none"`` and ``noise="isotropic"`` (foreach). Median over
   ``repeats`` timed steps.
2. **Training iteration** (forward + backward + step) of the same model on a
   small batch: the noise's share of a real step.
3. **Hessian-aligned noise** (``noise="hessian"``) on a small timm CNN with a
   fixed data set: HVPs per step and wall time per step, amortised over
   ``refresh_every`` (warm-started Lanczos), against plain SGD's step; each
   trains its own copy of the same initial model, after an untimed
   forward/backward pass.

On CUDA every timing starts and ends with a synchronisation.

Run alone: ``python benchmarks/_noisy_gd_bench.py [--device cuda]`` (prints JSON).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from typing import Any

import torch
from _common import build_timm, median_seconds, synchronize
from torch import nn

from geoopt_sgd import NoisyGD


def _step_times(
    model: nn.Module, repeats: int, warmup: int, device: str = "cpu"
) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype, device="cpu").to(
            p.device
        )
    opts = {
        "sgd_foreach": torch.optim.SGD(params, lr=1e-6, foreach=True),
        "noisy_none": NoisyGD(params, lr=1e-6, foreach=True),
        "noisy_isotropic": NoisyGD(
            params, lr=1e-6, noise="isotropic", noise_scale=1e-6, foreach=True
        ),
    }
    # interleaved: each repetition times one step of every optimizer, so a
    # change in machine load hits all of them alike
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    samples: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            synchronize(device)
            start = time.perf_counter()
            opt.step()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in samples.items()}


def bench_noisy_gd(
    *,
    model_name: str = "resnet18",
    image_size: int = 64,
    batch: int = 4,
    repeats: int = 10,
    warmup: int = 2,
    small_model_name: str = "test_resnet",
    small_samples: int = 16,
    k: int = 5,
    refresh_every: int = 10,
    hessian_steps: int = 20,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Measure NoisyGD's step cost against torch SGD; see the module docstring.

    Returns:
        A JSON-ready dict: per-measurement times in ms, ratios to SGD, the
        HVP accounting of the Hessian-aligned noise, and the settings.
    """

    torch.manual_seed(seed)
    result: dict[str, Any] = {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }

    # 1. step alone on a timm CNN's parameters; the models are built on the CPU
    # (the same init on every device) and moved
    model = build_timm(model_name, device)
    numel = sum(p.numel() for p in model.parameters())
    steps = _step_times(model, repeats, warmup, device)
    result["step_alone"] = {
        "model": model_name,
        "params": numel,
        "ms": steps,
        "ratio_none_vs_sgd": steps["noisy_none"] / steps["sgd_foreach"],
        "ratio_isotropic_vs_sgd": steps["noisy_isotropic"] / steps["sgd_foreach"],
    }

    # 2. full training iteration (forward + backward + step)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    iters = {}
    for name, make in (
        ("sgd_foreach", lambda ps: torch.optim.SGD(ps, lr=1e-6, foreach=True)),
        (
            "noisy_isotropic",
            lambda ps: NoisyGD(
                ps, lr=1e-6, noise="isotropic", noise_scale=1e-6, foreach=True
            ),
        ),
    ):
        opt = make(list(model.parameters()))

        def iteration(opt=opt, model=model):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        iters[name] = 1e3 * median_seconds(
            iteration, max(3, repeats // 2), 1, device=device
        )
    result["train_iteration"] = {
        "batch": batch,
        "image_size": image_size,
        "ms": iters,
        "ratio_isotropic_vs_sgd": iters["noisy_isotropic"] / iters["sgd_foreach"],
    }
    del model

    # 3. Hessian-aligned noise on a small CNN: HVPs per step, amortised. Each
    # optimizer trains its own copy of the same initial model, after one untimed
    # forward/backward pass (the first pass's one-off costs fall on neither)
    initial = build_timm(small_model_name, device)
    xs = torch.randn(small_samples, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (small_samples,), device=device)
    timings = {}
    stats: dict[str, Any] = {}
    for name in ("sgd", "hessian"):
        small = copy.deepcopy(initial)
        loss_fn(small(xs), ys).backward()
        small.zero_grad(set_to_none=True)
        if name == "sgd":
            opt = torch.optim.SGD(small.parameters(), lr=1e-4)
        else:
            opt = NoisyGD(
                small.parameters(),
                lr=1e-4,
                noise="hessian",
                noise_scale=1.0,
                batch_size=8,
                k=k,
                refresh_every=refresh_every,
                model=small,
                loss_fn=loss_fn,
                data=(xs, ys),
                seed=seed,
            )
        synchronize(device)
        start = time.perf_counter()
        for _ in range(hessian_steps):
            opt.zero_grad()
            loss_fn(small(xs), ys).backward()
            opt.step()
        synchronize(device)
        timings[name] = 1e3 * (time.perf_counter() - start) / hessian_steps
        if name == "hessian":
            stats = dict(opt.stats)
    result["hessian_noise"] = {
        "model": small_model_name,
        "params": sum(p.numel() for p in small.parameters()),
        "samples": small_samples,
        "k": k,
        "refresh_every": refresh_every,
        "steps": hessian_steps,
        "ms_per_step": timings,
        "ratio_vs_sgd": timings["hessian"] / timings["sgd"],
        "n_hvp": stats["n_hvp"],
        "n_backward": stats["n_backward"],
        "n_refresh": stats["n_refresh"],
        "hvp_per_step": stats["hvp_per_step"],
        "hvp_per_refresh": stats["n_hvp"] / max(1, stats["n_refresh"]),
        "refresh_seconds": stats["refresh_seconds"],
    }
    return result


if __name__ == "__main__":
    import argparse

    from _common import environment

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    args = parser.parse_args()
    result = bench_noisy_gd(device=args.device)
    print(json.dumps({"env": environment(args.device), **result}, indent=2))
