"""PyTorch Lightning: ProbedSGD with a NoiseProbe and a cyclical learning rate.

``configure_optimizers`` builds a :class:`geoopt_sgd.ProbedSGD` carrying a
:class:`geoopt_sgd.NoiseProbe`, wraps it in a :class:`geoopt_sgd.CyclicLRWrapper`,
and hands Lightning the inner optimizer plus the wrapper's schedule as an
``LRScheduler`` stepped after every optimizer step (``interval="step"``).
Returning the wrapper itself as the optimizer, with no scheduler, is the other
supported way; do not mix the two. The probe writes JSON lines and the module
logs the latest ``mu`` and ``alpha`` with ``self.log``. Needs
``pip install lightning``.

Run (from the repository root)::

    python examples/lightning_cyclic_lr.py          # ~1 min on 2 CPU cores
    python examples/lightning_cyclic_lr.py --tiny   # a few seconds (the test)
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from geoopt_sgd import CyclicLRWrapper, NoiseProbe, ProbedSGD


class DigitsMLP(L.LightningModule):
    """A small MLP whose optimizer measures its own noise geometry."""

    def __init__(self, probe_batch, every: int, step_size: int, log_path: str):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.loss_fn = nn.CrossEntropyLoss()
        self.probe_batch, self.every = probe_batch, every
        self.step_size, self.log_path = step_size, log_path
        self.probe: NoiseProbe | None = None
        self._logged = 0

    def forward(self, x):
        """Return the logits."""
        return self.net(x)

    def training_step(self, batch, batch_idx):
        """Return the loss of one batch."""
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """Log the probe's newest record, if the last step measured."""
        if self.probe is not None and self.probe.num_probes > self._logged:
            self._logged = self.probe.num_probes
            rec = self.probe.history[-1]
            self.log_dict({"noise/mu": rec["mu"], "noise/alpha": rec["alpha"]})

    def configure_optimizers(self):
        """ProbedSGD with a probe, on a triangular cyclical schedule."""
        self.probe = NoiseProbe(
            self.net,
            self.loss_fn,
            self.probe_batch,
            every=self.every,
            k=4,
            sinks=[self.log_path],
        )
        opt = ProbedSGD(self.parameters(), lr=0.05, momentum=0.9, probe=self.probe)
        clr = CyclicLRWrapper(
            opt, base_lr=0.02, max_lr=0.1, step_size_up=self.step_size
        )
        return {
            "optimizer": clr.optimizer,  # the ProbedSGD itself
            "lr_scheduler": {"scheduler": clr.as_scheduler(), "interval": "step"},
        }


def main() -> None:
    """Train for a few epochs and print the probe's last record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (for tests)")
    parser.add_argument("--out", default="runs/examples/lightning_noise.jsonl")
    args = parser.parse_args()
    steps, every, step_size = (8, 4, 2) if args.tiny else (600, 50, 100)

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    module = DigitsMLP((x[:128], y[:128]), every, step_size, args.out)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    last = module.probe.history[-1]
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    print(
        f"{module.probe.num_probes} probes; step {last['step']}: mu={last['mu']:.3g} "
        f"alpha={last['alpha']:.3g}; lr now {lr:.3g}"
    )


if __name__ == "__main__":
    main()
