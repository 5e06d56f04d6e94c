"""Measure a timm model's SGD noise geometry while it trains, and plot it.

A plain training loop with :class:`geoopt_sgd.ProbedSGD` (``torch.optim.SGD``, same
updates) and a :class:`geoopt_sgd.NoiseProbe`: every ``--every`` steps the probe
measures the noise geometry on a fixed probe batch and appends one JSON line to
``<out-dir>/noise.jsonl``. At the end the script plots three of the recorded
metrics against the step: ``alpha`` (the cosine between the noise covariance and the
curvature), ``mu`` (the loss-scaled alignment) and ``tr_h_sigma`` (``Tr(H Sigma)``,
with its isotropic twin ``tr_h_sigma_iso``). See docs/science/metrics.md.

Run (from the repository root, with the ``recipes`` extra installed)::

    python examples/timm_noise_probe.py               # ~1 min on 2 CPU cores
    python examples/timm_noise_probe.py --tiny        # a few seconds (the test)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from sklearn.datasets import load_digits

from geoopt_sgd import NoiseProbe, ProbedSGD


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)  # argparse turns a ValueError into "invalid ... value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits of scikit-learn (offline), as (N, 1, 8, 8) images."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target)


def main() -> None:
    """Train with the probe, then plot its records."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (for tests)")
    parser.add_argument("--model", default="test_byobnet", help="any timm name")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="600 (10 with --tiny)"
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=None,
        help="probe every N steps: 50 (5 with --tiny)",
    )
    parser.add_argument("--out-dir", default="runs/examples/timm_noise_probe")
    args = parser.parse_args()
    steps = args.steps or (10 if args.tiny else 600)
    every = args.every or (5 if args.tiny else 50)
    if every > steps:
        parser.error(f"--every {every} > --steps {steps}: no probe would run")
    n_probe, k = (64, 4) if args.tiny else (128, 10)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "noise.jsonl"
    log.unlink(missing_ok=True)  # the probe appends

    torch.manual_seed(0)
    x, y = digits()
    model = timm.create_model(args.model, pretrained=False, num_classes=10, in_chans=1)
    loss_fn = torch.nn.CrossEntropyLoss()

    # the probe's own fixed batch; the training batches never change it
    probe_batch = (x[:n_probe], y[:n_probe])
    probe = NoiseProbe(model, loss_fn, probe_batch, every=every, k=k, sinks=[log])
    optimizer = ProbedSGD(model.parameters(), lr=0.01, momentum=0.9, probe=probe)

    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()  # every `every`-th step also measures

    records = [json.loads(line) for line in log.read_text().splitlines()]
    plot(records, out / "noise.png")
    last = records[-1]
    print(
        f"{len(records)} probes in {log}; last (step {last['step']}): "
        f"loss={last['loss']:.3g} alpha={last['alpha']:.3g} mu={last['mu']:.3g} "
        f"Tr(H Sigma)={last['tr_h_sigma']:.3g} (isotropic {last['tr_h_sigma_iso']:.3g})"
    )


def plot(records: list[dict], path: Path) -> None:
    """Plot alpha, mu and Tr(H Sigma) (with its isotropic twin) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), constrained_layout=True)
    axes[0].plot(step, [r["alpha"] for r in records], "o-")
    axes[0].set_title(r"$\alpha$ = cos($\Sigma$, H)")
    axes[1].plot(step, [r["mu"] for r in records], "o-")
    axes[1].set_title(r"$\mu$ = Tr($\Sigma$H) / (2L $\|H\|_F^2$)")
    axes[2].semilogy(step, [r["tr_h_sigma"] for r in records], "o-", label="Tr(HΣ)")
    axes[2].semilogy(
        step, [r["tr_h_sigma_iso"] for r in records], "o--", label="Tr H Tr Σ / P"
    )
    axes[2].set_title(r"Tr(H$\Sigma$) vs isotropic")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
