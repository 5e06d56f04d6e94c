"""Build geoopt_sgd's optimizers by name with timm's ``create_optimizer_v2``.

For users of timm's ``train.py`` or of their own script built on timm's factory:
:func:`geoopt_sgd.register_timm_optimizers` adds ``"probedsgd"`` and ``"noisygd"``
to timm's optimizer registry, after which ``create_optimizer_v2`` builds them with
timm's parameter grouping (no weight decay on biases and norm layers). Two timm
conventions to know: timm's ``"sgd"`` is *Nesterov* SGD, and timm passes
``momentum=0.9`` to every optimizer with momentum unless told otherwise (pass
``momentum=0`` for plain SGD). To use the names from timm's own ``train.py``, call
``register_timm_optimizers()`` before it parses ``--opt`` (e.g. from a wrapper
script that imports and runs it).

Run (from the repository root)::

    python examples/timm_create_optimizer.py          # 40 steps each, ~25 s
    python examples/timm_create_optimizer.py --tiny   # 4 steps each (the test)
"""

from __future__ import annotations

import argparse

import timm
import torch
from timm.optim import create_optimizer_v2, list_optimizers

from geoopt_sgd import CyclicLRWrapper, NoiseProbe, register_timm_optimizers


def main() -> None:
    """Build, probe and step both optimizers from timm's factory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="fewer steps (for tests)")
    args = parser.parse_args()
    steps = 4 if args.tiny else 40

    names = register_timm_optimizers()  # ("probedsgd", "noisygd")
    assert set(names) <= set(list_optimizers())

    torch.manual_seed(0)
    model = timm.create_model("test_byobnet", pretrained=False, num_classes=10)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))

    # ProbedSGD by name: classical momentum (not Nesterov), timm's weight-decay groups
    opt = create_optimizer_v2(
        model, "probedsgd", lr=0.05, momentum=0.9, weight_decay=5e-4
    )
    probe = NoiseProbe(model, loss_fn, (x[:32], y[:32]), every=2, k=3)
    probe.attach(opt)
    # any timm-built optimizer can be wrapped in a cyclical schedule
    opt = CyclicLRWrapper(opt, base_lr=0.01, max_lr=0.05, step_size_up=2)
    print(
        "probedsgd:",
        type(opt.optimizer).__name__,
        "groups:",
        [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups],
    )
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    print(f"  {probe.num_probes} probes, last mu = {probe.history[-1]['mu']:.3g}")

    # NoisyGD by name: timm drops `momentum` (NoisyGD has none); the noise
    # options pass through
    opt = create_optimizer_v2(
        model, "noisygd", lr=0.05, noise="isotropic", noise_scale=1e-3, seed=0
    )
    print("noisygd:", type(opt).__name__, opt.param_groups[0]["lr"])
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    print(
        f"  {opt.stats['step']} steps, realised E|xi|^2 = "
        f"{opt.stats['realised_sq_norm_mean']:.3g}"
    )


if __name__ == "__main__":
    main()
