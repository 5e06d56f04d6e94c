"""Send a run's noise geometry to TensorBoard.

The same loop as ``timm_noise_probe.py``, with a
:class:`torch.utils.tensorboard.SummaryWriter` as the probe's sink: every number of
each probe record is written as a scalar ``noise/<name>`` (arrays such as the
eigenvalues as ``noise/eigenvalues/<i>``), next to the training loss the loop logs
itself. Needs ``pip install tensorboard``.

Run (from the repository root)::

    python examples/tensorboard_noise_probe.py
    tensorboard --logdir runs/examples/tensorboard
    python examples/tensorboard_noise_probe.py --tiny   # a few seconds (the test)
"""

from __future__ import annotations

import argparse

import timm
import torch
from sklearn.datasets import load_digits
from torch.utils.tensorboard import SummaryWriter

from geoopt_sgd import NoiseProbe, ProbedSGD


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)  # argparse turns a ValueError into "invalid ... value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> None:
    """Train with the probe writing to TensorBoard."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (for tests)")
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="600 (10 with --tiny)"
    )
    parser.add_argument(
        "--every",
        type=positive_int,
        default=None,
        help="probe every N steps: 50 (5 with --tiny)",
    )
    parser.add_argument("--log-dir", default="runs/examples/tensorboard")
    args = parser.parse_args()
    steps = args.steps or (10 if args.tiny else 600)
    every = args.every or (5 if args.tiny else 50)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    model = timm.create_model(
        "test_byobnet", pretrained=False, num_classes=10, in_chans=1
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    writer = SummaryWriter(args.log_dir)
    probe = NoiseProbe(
        model, loss_fn, (x[:64], y[:64]), every=every, k=4, sinks=[writer]
    )  # tags noise/alpha, noise/mu, noise/tr_h_sigma, ...
    optimizer = ProbedSGD(model.parameters(), lr=0.01, momentum=0.9, probe=probe)

    for step in range(steps):
        idx = torch.randint(0, len(x), (32,))
        optimizer.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        writer.add_scalar("train/loss", loss.item(), step + 1)
    writer.close()
    print(f"{probe.num_probes} probes written to {args.log_dir} (tags noise/<metric>)")


if __name__ == "__main__":
    main()
