"""Probe benchmark: per-sample gradients, metric costs, probe overhead, ProbedSGD.

Four measurements (issue #3), written to ``benchmarks/results/probes.json``:

1. ``per_sample``: per-sample gradient throughput of
   :func:`geoopt_sgd.per_sample_gradients` (chunked ``vmap(grad)``) against
   BackPACK ``BatchGrad`` (``extend(..., use_converter=True)``, needed for timm's
   in-place residual adds) and a plain loop of single-sample backward passes, in
   samples/s and in batch-gradient equivalents (time / time of one gradient of the
   mean loss over the same batch).
2. ``metric_costs``: the cost of each metric of :func:`geoopt_sgd.noise_geometry`
   computed alone (``metrics=[name]``, ``k``, cold start), and of the default set,
   in gradient equivalents of the probe batch, with the operation counters.
3. ``overhead``: a resnet18 training run (SGD, momentum 0.9, batch 128, 32x32
   random images, 10 classes) with and without a :class:`geoopt_sgd.NoiseProbe`
   (default metrics, ``k``, warm-started, probe batch 128). The run is short on a
   CPU, so it reports the measured ratio of the short run (probes every
   ``--run-every`` steps) and the ratio projected to one probe every ``--every``
   (400: one CIFAR-10 epoch at batch 128) steps from the measured mean step time
   and the mean *warm* probe time: ``1 + t_probe / (every * t_step)``, with both
   times taken in the probed run, because the machine's load drifts between runs
   (``projected_ratio_seconds`` uses the unprobed run's step time instead).
   Target: <= 1.10.
4. ``step_time``: :class:`geoopt_sgd.ProbedSGD` without a probe against
   ``torch.optim.SGD`` (momentum 0.9, foreach and for-loop kernels) on resnet18's
   parameters with fixed random gradients; the two are interleaved to cancel drift
   in a shared machine's load. Target: <= 1.02.

Commands (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/probes.py --quick   # ~30 min on 1 busy core
    OMP_NUM_THREADS=2 python benchmarks/probes.py           # full settings
    python benchmarks/probes.py --device cuda --models resnet18 --sections overhead \
        --steps 1200 --run-every 400  # the target's setting on a GPU (not measured)

All models are built with ``pretrained=False`` (no downloads); data are random.
Models and data are drawn on the CPU and moved to ``--device`` (``cpu`` or
``cuda``); on CUDA every timing starts and ends with a synchronisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import (
    add_device_argument,
    build_timm,
    environment,
    load_average,
    median_seconds,
    positive,
    synchronize,
    timm_model,
)
from torch import nn

from geoopt_sgd import NoiseProbe, ProbedSGD, noise_geometry
from geoopt_sgd._model import FunctionalModel
from geoopt_sgd.probes.metrics import DEFAULT_METRICS, METRICS
from geoopt_sgd.probes.primitives import ProbeSet

ESCAPE = ("sharp_fraction", "loss_energy_fraction")
SECTIONS = ("per_sample", "metric_costs", "overhead", "overhead_lean", "step_time")
RESULTS = Path(__file__).resolve().parent / "results"


# --- helpers -------------------------------------------------------------------------
def make_model(name, num_classes=10, device="cpu"):
    """A timm model built on the CPU (the same init everywhere), on ``device``."""
    torch.manual_seed(0)
    return build_timm(name, device, num_classes)


def make_batch(n, size, num_classes=10, seed=0, device="cpu"):
    """Random images and labels drawn on the CPU, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, device="cpu")
    y = torch.randint(0, num_classes, (n,), generator=g, device="cpu")
    return x.to(device), y.to(device)


def grad_time(model, loss_fn, x, y, reps=3):
    """Median time of one gradient of the mean loss (eval mode, as the probes)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        torch.autograd.grad(loss_fn(model(x), y), params)

    return median_seconds(run, repeats=reps, device=x.device)


# --- 1. per-sample gradients ---------------------------------------------------------
def bench_per_sample(model_name, n, size, chunk_size, reps, device="cpu"):
    from geoopt_sgd import per_sample_gradients

    model = make_model(model_name, device=device)
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_batch(n, size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    t_grad = grad_time(model, loss_fn, x, y, reps=reps)
    out = {"model": model_name, "P": P, "n": n, "t_grad": t_grad}

    def vmap_route():
        per_sample_gradients(model, loss_fn, x, y, chunk_size=chunk_size)

    def loop_route():
        rows = []
        for i in range(n):
            g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    out["vmap"] = {
        "seconds": median_seconds(vmap_route, repeats=reps, device=device),
        "chunk_size": chunk_size,
    }
    out["loop"] = {"seconds": median_seconds(loop_route, repeats=reps, device=device)}
    try:
        seconds, complete = _backpack_time(model_name, x, y, reps, device)
        out["backpack"] = {"seconds": seconds, "all_params_have_grad_batch": complete}
    except Exception as e:  # BackPACK does not support every layer
        out["backpack"] = {"error": f"{type(e).__name__}: {e}"[:200]}
    for key in ("vmap", "loop", "backpack"):
        s = out[key].get("seconds")
        if s is not None:
            out[key]["samples_per_s"] = n / s
            out[key]["grad_equivalents"] = s / t_grad
    return out


def _backpack_time(model_name, x, y, reps, device="cpu"):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model = extend(make_model(model_name), use_converter=True).to(device)
    model.eval()
    loss_fn = extend(nn.CrossEntropyLoss())

    def run():
        model.zero_grad()
        loss = loss_fn(model(x), y)
        with backpack(BatchGrad()):
            loss.backward()

    seconds = median_seconds(run, repeats=reps, device=device)
    complete = all(
        getattr(p, "grad_batch", None) is not None and p.grad_batch.shape[0] == len(y)
        for p in model.parameters()
    )
    return seconds, complete


# --- 2. metric costs -----------------------------------------------------------------
def bench_metric_costs(model_name, n, size, k, names, reps, device="cpu"):
    model = make_model(model_name, device=device)
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_batch(n, size, seed=1, device=device)
    t_grad = grad_time(model, loss_fn, x, y, reps=reps)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(3)
    displacement = 1e-2 * torch.randn(P, generator=g, device="cpu").to(device)
    noise_geometry(model, loss_fn, (x, y), metrics=["loss"], k=1)  # warm up
    rows = {}
    for name in names:
        metrics = list(DEFAULT_METRICS) if name == "default" else [name]
        kwargs = {"displacement": displacement} if name in ESCAPE else {}
        synchronize(device)
        t0 = time.perf_counter()
        res = noise_geometry(model, loss_fn, (x, y), metrics=metrics, k=k, **kwargs)
        synchronize(device)
        seconds = time.perf_counter() - t0
        rows[name] = {
            "seconds": seconds,
            "grad_equivalents": seconds / t_grad,
            "route": res.route,
            "value": res.values.get(name) if name != "default" else None,
            "cost": {c: float(v) for c, v in res.cost.items()},
        }
    return {"model": model_name, "P": P, "n": n, "k": k, "t_grad": t_grad, "rows": rows}


# --- 3. probe overhead ---------------------------------------------------------------
def _train(model, loss_fn, batches, opt, steps):
    """Train ``steps`` steps; return each step's wall time (synchronised)."""
    model.train()
    device = batches[0][0].device
    times = []
    for t in range(steps):
        x, y = batches[t % len(batches)]
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_overhead(
    model_name,
    batch,
    size,
    probe_batch,
    k,
    steps,
    run_every,
    every,
    metrics,
    options,
    device="cpu",
):
    loss_fn = nn.CrossEntropyLoss()
    batches = [make_batch(batch, size, seed=10 + i, device=device) for i in range(4)]
    probe_data = make_batch(probe_batch, size, seed=99, device=device)

    model = make_model(model_name, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _train(model, loss_fn, batches, opt, 2)  # warm up allocator and kernels
    base = _train(model, loss_fn, batches, opt, steps)

    model = make_model(model_name, device=device)
    probe = NoiseProbe(
        model, loss_fn, probe_data, every=run_every, k=k, metrics=metrics, **options
    )
    opt = ProbedSGD(model.parameters(), lr=0.01, momentum=0.9)
    _train(model, loss_fn, batches, opt, 2)
    probe.attach(opt)
    probed = _train(model, loss_fn, batches, opt, steps)

    # gradient of one batch (eval mode, as the probe) and the probe's unit
    # operations, interleaved right after the run so that they see the same load
    units = unit_costs(model, loss_fn, probe_data, reps=3)
    t_grad = units["t_grad"]
    probe_times = [r["probe_seconds"] for r in probe.history]
    plain_steps = [
        t for i, t in enumerate(probed, start=1) if i % run_every != 0
    ]  # steps of the probed run whose hook did not measure
    t_step = statistics.mean(base)
    warm = probe_times[1:] or probe_times
    t_probe = statistics.mean(warm)
    last = probe.history[-1]
    breakdown = {
        key: last.get(f"cost_{key}")
        for key in ("n_backward", "n_jvp", "n_ggnvp", "n_hvp", "n_forward")
    }
    for key in ("seconds_eigen", "seconds_sketch"):
        sec = last.get(f"cost_{key}")
        breakdown[key.replace("seconds", "ge")] = None if sec is None else sec / t_grad
    return {
        "model": model_name,
        "batch": batch,
        "image_size": size,
        "probe_batch": probe_batch,
        "k": k,
        "metrics": list(metrics or DEFAULT_METRICS),
        "options": options,
        "steps": steps,
        "run_every": run_every,
        "t_step_mean": t_step,
        "t_step_probed_run_mean": statistics.mean(plain_steps),
        "probe_seconds": probe_times,
        "probe_seconds_cold": probe_times[0] if probe_times else None,
        "probe_seconds_warm_mean": t_probe,
        "t_grad_probe_batch": t_grad,
        "probe_grad_equivalents": t_probe / t_grad,
        "warm_probe_breakdown": breakdown,
        "unit_costs_ge": {k_: v for k_, v in units.items() if k_ != "t_grad"},
        "step_grad_equivalents": statistics.mean(plain_steps) / t_grad,
        "measured_ratio": sum(probed) / sum(base),
        "every": every,
        "projected_ratio_seconds": 1.0 + t_probe / (every * t_step),
        # probe and steps timed in the same run: robust to drifting machine load
        "projected_ratio": 1.0 + t_probe / (every * statistics.mean(plain_steps)),
        "routes": sorted({r.get("route", "?") for r in probe.history}),
        "values_last": {
            k_: v for k_, v in probe.history[-1].items() if isinstance(v, float)
        },
        "load_average": load_average(),
    }


def unit_costs(model, loss_fn, data, reps=3):
    """Interleaved medians: one gradient, 8 jvps, one GGN-vector product, in ge."""
    x, y = data
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    probe = ProbeSet(FunctionalModel(model, None, mode="eval"), loss_fn, [(x, y)])
    g = torch.Generator().manual_seed(5)
    V = torch.randn(probe.P, 8, generator=g, device="cpu").to(x.device)

    def grad():
        torch.autograd.grad(loss_fn(model(x), y), params)

    fns = {
        "grad": grad,
        "jvp8": lambda: probe.tangents(V),
        "ggnvp": lambda: probe.ggn_matmat(V[:, :1]),
    }
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            synchronize(x.device)
            t0 = time.perf_counter()
            f()
            synchronize(x.device)
            times[k].append(time.perf_counter() - t0)
    t_grad = statistics.median(times["grad"])
    return {
        "t_grad": t_grad,
        "jvp": statistics.median(times["jvp8"]) / 8 / t_grad,
        "ggnvp": statistics.median(times["ggnvp"]) / t_grad,
    }


# --- 4. ProbedSGD step time ----------------------------------------------------------
def bench_step_time(model_name, reps, steps_per_rep, device="cpu"):
    out = {}
    for foreach in (True, False):
        model = make_model(model_name, device=device)
        params_a = [p.detach().clone().requires_grad_() for p in model.parameters()]
        params_b = [p.detach().clone().requires_grad_() for p in model.parameters()]
        g = torch.Generator().manual_seed(0)
        for pa, pb in zip(params_a, params_b, strict=True):
            grad = torch.randn(pa.shape, generator=g, device="cpu").to(device)
            pa.grad = 1e-3 * grad
            pb.grad = pa.grad.clone()
        sgd = torch.optim.SGD(params_a, lr=1e-3, momentum=0.9, foreach=foreach)
        probed = ProbedSGD(params_b, lr=1e-3, momentum=0.9, foreach=foreach)
        ta, tb, ratios = [], [], []
        for r in range(reps + 1):
            pair = {}
            order = (
                ((sgd, "a"), (probed, "b")) if r % 2 else ((probed, "b"), (sgd, "a"))
            )
            for opt, key in order:
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(steps_per_rep):
                    opt.step()
                synchronize(device)
                pair[key] = (time.perf_counter() - t0) / steps_per_rep
            if r > 0:  # first rep is warm-up
                ta.append(pair["a"])
                tb.append(pair["b"])
                ratios.append(pair["b"] / pair["a"])
        out["foreach" if foreach else "for-loop"] = {
            "sgd_seconds": statistics.median(ta),
            "probed_sgd_seconds": statistics.median(tb),
            # median of back-to-back pairs: cancels the drift of a shared machine
            "ratio": statistics.median(ratios),
            "ratio_of_medians": statistics.median(tb) / statistics.median(ta),
            "ratio_of_minima": min(tb) / min(ta),
            "equal_params": all(
                torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True)
            ),
        }
    return {"model": model_name, "reps": reps, "steps_per_rep": steps_per_rep, **out}


# --- main ----------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="small settings (~30 min on 1 busy core)"
    )
    ap.add_argument(
        "--models", default="test_resnet,resnet18", help="comma-separated timm names"
    )
    ap.add_argument("--image-size", type=positive(int), default=32)
    ap.add_argument("--k", type=positive(int), default=10)
    ap.add_argument("--per-sample-n", type=positive(int), default=None)
    ap.add_argument("--probe-batch", type=positive(int), default=None)
    ap.add_argument(
        "--steps", type=positive(int), default=None, help="overhead run length"
    )
    ap.add_argument("--run-every", type=positive(int), default=None)
    ap.add_argument("--every", type=positive(int), default=400)
    ap.add_argument(
        "--lean-metrics",
        default="loss,alpha,beta,mu,mu1,mu2,tr_sigma,tr_h_sigma,tr_h_sigma_iso",
        help="metrics of the 'overhead_lean' probe (no eigenbasis metrics)",
    )
    ap.add_argument("--lean-num-probes", type=positive(int), default=8)
    ap.add_argument(
        "--sections",
        default="per_sample,metric_costs,overhead,step_time",
        help=f"comma-separated, of {', '.join(SECTIONS)}",
    )
    add_device_argument(ap)
    ap.add_argument(
        "--out",
        default=None,
        help="JSON file (default results/probes.json, probes_quick.json with --quick)",
    )
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    unknown = [m for m in args.lean_metrics.split(",") if m not in METRICS]
    if unknown:
        ap.error(f"--lean-metrics: unknown {unknown}; see geoopt_sgd's METRICS")
    for name in args.models.split(","):
        try:
            timm_model(name)
        except argparse.ArgumentTypeError as e:
            ap.error(f"--models: {e}")
    if args.out is None:
        args.out = str(RESULTS / ("probes_quick.json" if args.quick else "probes.json"))

    q = args.quick
    per_sample_n = args.per_sample_n or (16 if q else 64)
    probe_batch = args.probe_batch or (32 if q else 128)
    steps = args.steps or (12 if q else 40)
    run_every = args.run_every or (6 if q else 20)
    if run_every > steps and {"overhead", "overhead_lean"} & set(
        args.sections.split(",")
    ):
        ap.error(f"--run-every {run_every} > --steps {steps}: no probe would run")
    models = args.models.split(",")
    sections = args.sections.split(",")
    reps = 2 if q else 3
    torch.manual_seed(0)

    results = {
        "schema_version": 1,
        "benchmark": "probes",
        "quick": q,
        "settings": vars(args)
        | {
            "per_sample_n": per_sample_n,
            "probe_batch": probe_batch,
            "steps": steps,
            "run_every": run_every,
        },
        "env": environment(args.device),
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["env"]["load_average_end"] = load_average()
        out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    if "per_sample" in sections:
        results["per_sample"] = []
        for name in models:
            results["per_sample"].append(
                bench_per_sample(
                    name, per_sample_n, args.image_size, 8, reps, args.device
                )
            )
            save()
    if "metric_costs" in sections:
        results["metric_costs"] = []
        for name in models:
            small = sum(p.numel() for p in make_model(name).parameters()) < 1e6
            names = list(METRICS) if small else ["loss", "mu", "spearman"]
            names = ["default"] + [m for m in names if m != "n_nonfinite"]
            results["metric_costs"].append(
                bench_metric_costs(
                    name, probe_batch, args.image_size, args.k, names, reps, args.device
                )
            )
            save()
    overhead_model = "resnet18" if "resnet18" in models else models[-1]
    lean = (
        args.lean_metrics.split(","),
        {"num_probes": args.lean_num_probes},
    )
    for key, (metrics, options) in (
        ("overhead", (None, {})),
        ("overhead_lean", lean),
    ):
        if key in sections:
            results[key] = bench_overhead(
                overhead_model,
                128 if not q else 32,
                args.image_size,
                probe_batch,
                args.k,
                steps,
                run_every,
                args.every,
                metrics,
                options,
                args.device,
            )
            save()
    if "step_time" in sections:
        results["step_time"] = bench_step_time(
            "resnet18" if "resnet18" in models else models[-1],
            reps=100 if q else 200,
            steps_per_rep=10,
            device=args.device,
        )
        save()
    save()
    return results


if __name__ == "__main__":
    res = main()
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=1)[:4000])
