"""Noise covariance against curvature in one layer: a superlinear power law (ZYT).

Claim (Zhang, Yang & Tu, "On the superlinear relationship between SGD noise
covariance and loss landscape curvature", arXiv:2602.05600): in the eigenbasis of
one layer's Hessian H, the diagonal of the mini-batch gradient covariance C
follows ``C_ii ∝ λ_i^γ`` with ``1 ≤ γ ≤ 2``; cross-entropy gives a larger γ than
the square loss on softmax outputs, and C nearly commutes with H.

Protocol (the paper's MNIST MLP, on digits by default): a bias-free ReLU MLP
``D → 50 → 50 → 10`` trained by SGD (η = 0.1, cosine annealing to η/100 over
``cosine_t_max`` epochs, gradient-norm clipping at 5, B = 50), once with
cross-entropy and once with ``MSE(softmax(f), one-hot)``, from the same
initialisation. Every ``measure_every`` epochs, for the 50×50 hidden weight (2,500
parameters): the dense layer Hessian over the training set (``torch.func``
Hessian-vector products against the 2,500 unit vectors), its full eigenbasis
(``eigh``), the expected mini-batch covariance at batch B over the training set
(``C = (n−B)/(B(n−1))·Σ``, Σ the per-sample gradient covariance, exact dense), and
in the eigenbasis: γ (log-log least squares of ``C̃_ii`` on ``λ_i`` over the top
``top_n``, with a 95% interval and R²), Spearman's ρ on the same points, the
eigen-alignment ratio, the commutativity error ``‖CH − HC‖_F / ‖CH‖_F`` of the
full matrices and its random-rotation baseline (H replaced by ``QHQᵀ``, Q Haar).
Page: docs/recipes/power_law.md.

Commands (from the repository root; outputs under ``<out-dir>/power_law/``)::

    python recipes/power_law.py --quick      # 200 epochs, measured at 0 and 200
    python recipes/power_law.py              # 300 epochs, measured every 50
    python recipes/power_law.py --dataset mnist --data-dir data --download \\
        --num-train 20000 --device cuda      # the paper's MNIST setting (GPU)

Expected (``--quick``, seeds 0-2; ~80 s of CPU, 4 min wall on the loaded 2-core
machine): γ_CE = 1.43-1.47 and γ_MSE = 1.04-1.07 at the last measurement,
γ_CE − γ_MSE ≥ 0.15, the commutativity error at most half its baseline, and
Spearman ρ ≥ 0.8, for both losses: all PASS; ``power_law.png`` shows C̃_ii against
λ_i with the fits, and γ, the commutativity error and ρ along training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from _common import option
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

RECIPE = "power_law"
LOSS_NAMES = ("ce", "mse")
BLOCK = "2.weight"  # the hidden width x width weight of the Sequential below
# eigenvalues and C~_ii below p * eps (float64) of their largest value among the
# top N are at the level of eigh's rounding (zero curvature of dead ReLU units):
# left out of the fit and of rho, like the paper's non-positive entries
EPS64 = float(torch.finfo(torch.float64).eps)
PER_MEASURE = (
    "epoch",
    "gamma",
    "gamma_ci_low",
    "gamma_ci_high",
    "r2",
    "spearman",
    "num_points",
    "eigen_alignment",
    "comm_error",
    "comm_baseline",
    "comm_error_top",
    "lambda_max",
    "train_loss",
    "train_accuracy",
    "test_accuracy",
)


@dataclass(frozen=True)
class Config(common.RunOptions):
    seed: int = option(0, "seed of the data split, the initialisation, the batches")
    dataset: str = option("digits", "'digits' (offline) or 'mnist'")
    data_dir: str | None = option(None, "where torchvision data lives")
    download: bool = option(False, "download a missing torchvision dataset")
    num_train: int | None = option(None, "training subset (None: all; MNIST: 20000)")
    width: int = option(50, "hidden width; the target block is width x width")
    epochs: int = option(300, "SGD epochs per loss")
    lr: float = option(0.1, "SGD learning rate")
    lr_min_ratio: float = option(0.01, "cosine annealing floor, as a fraction of lr")
    cosine_t_max: int = option(500, "cosine annealing period in epochs (ZYT: 500)")
    grad_clip: float = option(5.0, "gradient-norm clipping")
    batch_size: int = option(50, "SGD batch size B (also the B of C)")
    measure_every: int = option(50, "epochs between measurements (also at 0 and end)")
    top_n: int = option(1000, "top Hessian eigenvalues in the power-law fit")
    rotations: int = option(4, "Haar rotations of the commutativity baseline")
    data_chunk: int = option(4096, "samples per chunk of the Hessian and gradients")
    threads: int = option(1, "torch CPU threads during the run (restored after)")

    @classmethod
    def quick(cls) -> Config:
        """The CI setting: 200 epochs, measured at 0 and 200, 1 rotation."""
        return cls(epochs=200, measure_every=200, rotations=1)


def main(cfg: Config) -> dict[str, Any]:
    """Train with CE and with MSE, measure along training, write the results.

    Args:
        cfg: The configuration.

    Returns:
        The results as written to ``results.json``.
    """
    validate(cfg)
    with common.Run(RECIPE, cfg, threads=cfg.threads) as run:
        data = load(cfg, run.device)
        stages = common.Stages(run.open(), run.save)
        runs = {}
        for i, loss in enumerate(LOSS_NAMES):
            runs[loss] = stages.run(
                loss,
                lambda resume, snap, i=i, loss=loss: train_and_measure(
                    cfg, data, loss, i, resume, snap
                ),
            )
        metrics = summarise(runs, cfg, data)
        return run.finish(metrics, runs, verdict(metrics), plot)


def validate(cfg: Config) -> None:
    """Check the config alone, before anything is loaded, built or written.

    Raises:
        ValueError: On the first invalid field.
    """
    common.check_choice(cfg, "dataset", ("digits", "mnist"))  # before the generic one
    common.check_config_basics(cfg)
    common.check_min(
        cfg,
        (
            "width",
            "batch_size",
            "measure_every",
            "cosine_t_max",
            "data_chunk",
            "threads",
        ),
        1,
    )
    common.check_min(cfg, ("epochs",), 0)
    common.check_min(cfg, ("top_n",), 3)  # a slope with a confidence interval
    common.check_min(cfg, ("rotations",), 1)
    if cfg.top_n > cfg.width * cfg.width:
        raise ValueError(
            f"`top_n` must be <= the block's size width^2 = {cfg.width**2}; "
            f"got {cfg.top_n}."
        )
    for name in ("lr_min_ratio", "grad_clip"):
        v = getattr(cfg, name)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{name}` must be > 0; got {v!r}.")


# --------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------


def load(cfg: Config, device: torch.device) -> common.DataSplit:
    """The flat, standardised data (digits: 64 features; MNIST: 784).

    Raises:
        ValueError: If the batch is larger than the training set.
    """
    data = common.load_data(
        cfg.dataset,
        image_size=None,
        flatten=True,
        num_train=cfg.num_train,
        data_dir=cfg.data_dir,
        download=cfg.download,
        seed=cfg.seed,
    )
    if cfg.batch_size > len(data.y_train):
        raise ValueError(
            f"`batch_size` must be <= the training set size {len(data.y_train)}; "
            f"got {cfg.batch_size}."
        )
    return data.to(device)


def build_model(cfg: Config, input_dim: int, num_classes: int) -> nn.Sequential:
    """ZYT's bias-free ReLU MLP ``input_dim → width → width → num_classes``.

    ``BLOCK`` (``"2.weight"``) is the width×width hidden weight. Seeded with
    ``cfg.seed``; the global RNG is left as it was.
    """
    state = torch.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        w = cfg.width
        with torch.device("cpu"):  # seeded on the CPU; the caller moves it
            model = nn.Sequential(
                nn.Linear(input_dim, w, bias=False),
                nn.ReLU(),
                nn.Linear(w, w, bias=False),
                nn.ReLU(),
                nn.Linear(w, num_classes, bias=False),
            )
    finally:
        torch.set_rng_state(state)
    return model


class SoftmaxMSE(nn.Module):
    """ZYT's square loss: ``nn.MSELoss()(softmax(f), one_hot(y))`` (mean over all
    entries), taking integer labels like cross-entropy."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        classes = torch.arange(logits.shape[-1], device=labels.device)
        target = (labels[..., None] == classes).to(logits.dtype)  # one-hot
        return ((logits.softmax(-1) - target) ** 2).mean()


def make_loss(name: str) -> nn.Module:
    """``"ce"``: cross-entropy; ``"mse"``: :class:`SoftmaxMSE`."""
    return nn.CrossEntropyLoss() if name == "ce" else SoftmaxMSE()


# --------------------------------------------------------------------------------------
# Training with measurements
# --------------------------------------------------------------------------------------


def measure_epochs(cfg: Config) -> list[int]:
    """Epochs after which to measure: 0, every ``measure_every``, and the last."""
    return sorted(set(range(0, cfg.epochs + 1, cfg.measure_every)) | {cfg.epochs})


def train_and_measure(
    cfg: Config,
    data: common.DataSplit,
    loss_name: str,
    index: int,
    resume: dict[str, Any] | None,
    snapshot: Any,
) -> dict[str, Any]:
    """SGD with one loss, measuring the block at :func:`measure_epochs`.

    The batches of epoch ``e`` come from a generator seeded with
    ``seed·1000 + e`` (the same for both losses), the baseline's rotations from
    one seeded with the seed, the loss and the epoch: a resumed run gives the
    same result. A snapshot after every epoch.

    Returns:
        ``{"records": per-measurement dicts (:data:`PER_MEASURE` and the top-N
        ``lambda``, ``c_diag``), "train_loss": per-step losses}``.

    Raises:
        common.Diverged: If the loss becomes non-finite.
    """
    model = build_model(cfg, data.input_dim, data.num_classes).to(data.x_train.device)
    loss_fn = make_loss(loss_name)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=cfg.cosine_t_max, eta_min=cfg.lr * cfg.lr_min_ratio
    )
    first, records, losses = 0, [], []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first, records, losses = (
            resume["epoch"],
            resume["records"],
            resume["train_loss"],
        )
    when = measure_epochs(cfg)
    n = len(data.y_train)
    per_epoch = math.ceil(n / cfg.batch_size)
    bar = common.progress_bar(
        total=cfg.epochs, initial=first, desc=f"{loss_name} epochs"
    )

    def maybe_measure(epoch: int) -> None:
        if epoch in when and (not records or records[-1]["epoch"] < epoch):
            bar.set_postfix(step=f"measuring at epoch {epoch}")
            gen = torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + index * 10_007 + epoch
            )
            records.append(measure(model, loss_fn, data, cfg, gen) | {"epoch": epoch})

    maybe_measure(first)
    for epoch in range(first, cfg.epochs):
        common.maybe_interrupt(index * cfg.epochs + epoch)  # units: epochs
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen, device="cpu").to(data.x_train.device)
        for b in range(per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                raise common.Diverged(
                    f"{loss_name}: the training loss became {loss.item()} at epoch "
                    f"{epoch}; lower `lr` (now {cfg.lr})."
                )
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        maybe_measure(epoch + 1)
        snapshot(
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "records": records,
                "train_loss": losses,
            }
        )
    bar.close()
    return {"records": records, "train_loss": losses}


# --------------------------------------------------------------------------------------
# The layer's Hessian and noise covariance, and ZYT's metrics
# --------------------------------------------------------------------------------------


def _block_loss(model: nn.Module, loss_fn: nn.Module, block: str):
    """``f(w, x, y)``: the loss with the block set to ``w``, the rest fixed."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}

    def f(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**params, block: w}, (x,)), y)

    return f, params[block]


def layer_hessian(
    model: nn.Sequential,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    data_chunk: int = 4096,
) -> Tensor:
    """The dense Hessian ``(p, p)`` of the mean loss on ``(x, y)`` w.r.t. :data:`BLOCK`.

    For :func:`build_model`'s net ``z = W_3 relu(W_2 relu(W_1 x))`` the logits are
    piecewise linear in the block ``W_2``, so the Hessian is exactly (almost
    everywhere) its Gauss-Newton part, which factorises per sample:
    ``∂z_i/∂(W_2)_{ab} = A_i[:, a] h_i[b]`` with ``h_i = relu(W_1 x_i)`` and
    ``A_i = W_3 diag(1[W_2 h_i > 0])``, hence

        ``H[(a, b), (c, d)] = (1/n) Σ_i M_i[a, c] h_i[b] h_i[d]``,
        ``M_i = A_iᵀ Λ_i A_i``,

    with ``Λ_i`` the Hessian of the per-sample loss in the logits
    (``torch.func.hessian``). One ``(p × n)(n × p)`` product (float64, in data
    chunks), instead of ``p`` Hessian-vector products; the tests check it
    against ``torch.func.hessian`` of the block.
    """
    W1, W2, W3 = (model[i].weight.detach().double() for i in (0, 2, 4))
    w_out, w_in = W2.shape
    n = len(y)

    def per_sample(z: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(z[None], yi[None])

    lam_fn = vmap(torch.func.hessian(per_sample))
    H = torch.zeros(w_out * w_out, w_in * w_in, dtype=torch.float64, device=W2.device)
    for s in range(0, n, data_chunk):
        xc, yc = x[s : s + data_chunk].double(), y[s : s + data_chunk]
        h = torch.relu(xc @ W1.T)  # (m, w_in): the block's input
        u = h @ W2.T  # (m, w_out): its output, before the ReLU
        z = torch.relu(u) @ W3.T  # (m, K)
        A = W3[None] * (u > 0).to(W3.dtype)[:, None, :]  # (m, K, w_out)
        M = A.transpose(1, 2) @ lam_fn(z, yc) @ A  # (m, w_out, w_out)
        hh = h[:, :, None] * h[:, None, :]  # (m, w_in, w_in)
        H += M.reshape(len(yc), -1).T @ hh.reshape(len(yc), -1)  # [(a,c), (b,d)]
    H = H.reshape(w_out, w_out, w_in, w_in).permute(0, 2, 1, 3)
    H = H.reshape(w_out * w_in, w_out * w_in) / n
    return (H + H.T) / 2


def minibatch_covariance(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    block: str = BLOCK,
    data_chunk: int = 4096,
) -> Tensor:
    """The covariance ``(p, p)`` of the block's mini-batch gradient at batch ``B``.

    For a batch of ``B`` distinct samples drawn uniformly from the ``n``
    (without replacement), ``C = (n − B)/(B(n − 1)) · Σ`` exactly, with
    ``Σ = (1/n) Σ_i g_i g_iᵀ − ḡḡᵀ`` the per-sample gradient covariance
    (float64, from ``torch.func`` per-sample gradients).
    """
    f, w = _block_loss(model, loss_fn, block)
    p, n = w.numel(), len(y)

    def one(v: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        return f(v, xi[None], yi[None])

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    S = torch.zeros(p, p, dtype=torch.float64, device=w.device)
    gsum = torch.zeros(p, dtype=torch.float64, device=w.device)
    x = x.double()
    for s in range(0, n, data_chunk):
        G = per_sample(w, x[s : s + data_chunk], y[s : s + data_chunk]).reshape(-1, p)
        S += G.T @ G
        gsum += G.sum(0)
    gbar = gsum / n
    sigma = S / n - torch.outer(gbar, gbar)
    return (n - batch_size) / (batch_size * (n - 1)) * sigma


def haar(p: int, gen: torch.Generator) -> Tensor:
    """A Haar-distributed orthogonal ``(p, p)`` matrix (QR of a Gaussian)."""
    Q, R = torch.linalg.qr(
        torch.randn(p, p, generator=gen, dtype=torch.float64, device="cpu")
    )
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def _comm(Ct: Tensor, lam: Tensor) -> float:
    """``‖CH − HC‖_F / ‖CH‖_F`` from ``C̃ = VᵀCV`` and ``H = V diag(lam) Vᵀ``.

    In H's eigenbasis (the Frobenius norm is rotation invariant):
    ``(C̃Λ − ΛC̃)_ij = C̃_ij (λ_j − λ_i)`` and ``(C̃Λ)_ij = C̃_ij λ_j``.
    """
    C2 = Ct * Ct
    num = (C2 * (lam[None, :] - lam[:, None]) ** 2).sum()
    den = (C2 * (lam * lam)[None, :]).sum()
    return float((num / den).sqrt())


def zyt_metrics(
    H: Tensor, C: Tensor, top_n: int, rotations: int, gen: torch.Generator
) -> dict[str, Any]:
    """ZYT's per-layer metrics of the dense Hessian ``H`` and covariance ``C``.

    With ``H = VΛVᵀ`` (eigenvalues descending) and ``C̃ = VᵀCV``:

    * ``gamma``, ``gamma_ci_low/high``, ``r2``: least squares of ``log10 C̃_ii``
      on ``log10 λ_i`` over the top ``top_n`` with both positive (above
      ``p·eps`` of their largest there, eigh's rounding level), the slope's 95%
      t-interval (nominal: the points are not independent) and R²;
      ``num_points`` used;
    * ``spearman``: Spearman's ρ of ``C̃_ii`` and ``λ_i`` on the same points;
    * ``eigen_alignment``: ``‖diag C̃‖² / ‖C̃‖_F²`` (all ``p`` directions);
    * ``comm_error``: ``‖CH − HC‖_F / ‖CH‖_F`` (full matrices), and
      ``comm_baseline``: its mean with H replaced by ``QHQᵀ`` over
      ``rotations`` Haar draws Q from ``gen``;
    * ``comm_error_top``: the error restricted to the top-``top_n`` subspace,
      ``‖C̃_NΛ_N − Λ_NC̃_N‖_F / ‖C̃_NΛ_N‖_F`` (the form a top-k solver gives);
    * ``lambda``, ``c_diag``: the top-``top_n`` ``λ_i`` and ``C̃_ii`` (lists).

    Returns:
        The metrics (floats) and the two lists.
    """
    from scipy import stats

    lam, V = torch.linalg.eigh(H)
    lam, V = lam.flip(0), V.flip(1)
    Ct = V.T @ C @ V
    d = torch.diagonal(Ct)
    lt, dt = lam[:top_n], d[:top_n]
    floor = len(lam) * EPS64
    keep = (lt > floor * lt.max()) & (dt > floor * dt.max())
    lx, dy = lt[keep].log10().cpu().numpy(), dt[keep].log10().cpu().numpy()
    out: dict[str, Any] = {"num_points": int(keep.sum())}
    if len(lx) >= 3:
        fit = stats.linregress(lx, dy)
        half = float(stats.t.ppf(0.975, len(lx) - 2)) * fit.stderr
        out.update(
            gamma=float(fit.slope),
            gamma_ci_low=float(fit.slope - half),
            gamma_ci_high=float(fit.slope + half),
            r2=float(fit.rvalue**2),
            spearman=float(stats.spearmanr(lx, dy).statistic),
        )
    else:
        out.update(
            gamma=None, gamma_ci_low=None, gamma_ci_high=None, r2=None, spearman=None
        )
    out["eigen_alignment"] = float((d * d).sum() / (Ct * Ct).sum())
    out["comm_error"] = _comm(Ct, lam)
    base = []
    for _ in range(rotations):
        Q = haar(len(lam), gen).to(Ct.device)
        # ||[C, Q H Q^T]|| = ||[Q^T C Q, H]||: rotate C~ in H's eigenbasis
        base.append(_comm(Q.T @ Ct @ Q, lam))
    out["comm_baseline"] = sum(base) / len(base)
    out["comm_error_top"] = _comm(Ct[:top_n, :top_n], lt)
    out["lambda_max"] = float(lam[0])
    out["lambda"] = lt.tolist()
    out["c_diag"] = dt.tolist()
    return out


@torch.no_grad()
def _accuracy(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor):
    out = model(x)
    return float(loss_fn(out, y)), float((out.argmax(1) == y).double().mean())


def measure(
    model: nn.Module,
    loss_fn: nn.Module,
    data: common.DataSplit,
    cfg: Config,
    gen: torch.Generator,
) -> dict[str, Any]:
    """The block's H and C over the training set, then :func:`zyt_metrics`."""
    model.eval()
    x, y = data.x_train, data.y_train
    H = layer_hessian(model, loss_fn, x, y, data_chunk=cfg.data_chunk)
    C = minibatch_covariance(
        model, loss_fn, x, y, cfg.batch_size, data_chunk=cfg.data_chunk
    )
    out = zyt_metrics(H, C, cfg.top_n, cfg.rotations, gen)
    out["train_loss"], out["train_accuracy"] = _accuracy(model, loss_fn, x, y)
    out["test_accuracy"] = _accuracy(model, loss_fn, data.x_test, data.y_test)[1]
    return out


# --------------------------------------------------------------------------------------
# Summary, verdict, table, figure
# --------------------------------------------------------------------------------------


def summarise(
    runs: dict[str, Any], cfg: Config, data: common.DataSplit
) -> dict[str, Any]:
    """The last measurement of each loss ("at convergence") and the block's size."""
    m: dict[str, Any] = {
        "block": BLOCK,
        "block_size": cfg.width * cfg.width,
        "num_train": len(data.y_train),
        "covariance": "expected mini-batch covariance at B, (n-B)/(B(n-1)) Sigma",
        "hessian": "dense, exact Gauss-Newton factorisation of the block (float64)",
    }
    for loss in LOSS_NAMES:
        last = runs[loss]["records"][-1]
        m[loss] = {k: last[k] for k in PER_MEASURE}
    g_ce, g_mse = m["ce"]["gamma"], m["mse"]["gamma"]
    m["gamma_gap"] = None if g_ce is None or g_mse is None else g_ce - g_mse
    return m


def verdict(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """ZYT's claims at the last measurement of each loss."""
    C = common.claim
    paper = "ZYT (arXiv:2602.05600): theory, 1 <= gamma <= 2"
    ours = "ours (docs/recipes/power_law.md), from ZYT's qualitative claim"
    rows = []
    for loss in LOSS_NAMES:
        m = metrics[loss]
        note = f"{loss}, epoch {m['epoch']}, {m['num_points']} points"
        rows += [
            C(f"gamma_{loss} >= 1", m["gamma"], ">=", 1.0, source=paper, note=note),
            C(f"gamma_{loss} <= 2", m["gamma"], "<=", 2.0, source=paper, note=note),
        ]
    rows.append(
        C(
            "gamma_ce - gamma_mse",
            metrics["gamma_gap"],
            ">=",
            0.15,
            source=ours + " (CE above MSE)",
        )
    )
    for loss in LOSS_NAMES:
        m = metrics[loss]
        ratio = None if not m["comm_baseline"] else m["comm_error"] / m["comm_baseline"]
        rows.append(
            C(
                f"commutativity error / random baseline ({loss})",
                ratio,
                "<=",
                0.5,
                source=ours + " (error 'significantly lower' than the baseline)",
                note=f"error {m['comm_error']:.3g}, baseline {m['comm_baseline']:.3g}",
            )
        )
    for loss in LOSS_NAMES:
        rows.append(
            C(
                f"Spearman rho of C_ii and lambda_i ({loss})",
                metrics[loss]["spearman"],
                ">=",
                0.8,
                source=ours + " (Spearman 'near 1')",
            )
        )
    return rows


def table(results: dict[str, Any]) -> str:
    """The last measurement of each loss as a Markdown table."""
    m = results["metrics"]

    def f(v, fmt=".3f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "| loss | epoch | γ (95% CI) | R² | ρ | eigen-alignment | E_comm / baseline "
        "| E_comm top-N | train / test acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in LOSS_NAMES:
        r = m[loss]
        lines.append(
            f"| {loss} | {r['epoch']} | {f(r['gamma'])} ({f(r['gamma_ci_low'])}, "
            f"{f(r['gamma_ci_high'])}) | {f(r['r2'])} | {f(r['spearman'])} | "
            f"{f(r['eigen_alignment'])} | {f(r['comm_error'])} / "
            f"{f(r['comm_baseline'])} | {f(r['comm_error_top'])} | "
            f"{f(r['train_accuracy'])} / {f(r['test_accuracy'])} |"
        )
    return "\n".join(lines)


def plot(results_path: str | Path) -> Path:
    """Draw ``power_law.png`` from the JSON alone.

    Panels: C̃_ii against λ_i (log-log, last measurement, both losses, with the
    fitted lines); γ with its 95% interval along training; the commutativity
    error and its baseline along training; Spearman ρ and the eigen-alignment
    ratio along training.
    """
    plt = common.pyplot()
    res = common.read_json(results_path)
    runs = res["arrays"]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for i, loss in enumerate(LOSS_NAMES):
        recs = runs[loss]["records"]
        last = recs[-1]
        lam = [v for v in last["lambda"]]
        cd = [v for v in last["c_diag"]]
        pts = [(a, b) for a, b in zip(lam, cd, strict=True) if a > 0 and b > 0]
        col = f"C{i}"
        if pts:
            ax[0].loglog(*zip(*pts, strict=True), ".", ms=2, color=col, alpha=0.5)
        g = last["gamma"]
        if g is not None and pts:
            xs = [p[0] for p in pts[: last["num_points"]]]
            ys = [p[1] for p in pts[: last["num_points"]]]
            mx = sum(math.log10(v) for v in xs) / len(xs)
            my = sum(math.log10(v) for v in ys) / len(ys)
            lo, hi = min(xs), max(xs)
            ax[0].loglog(
                [lo, hi],
                [10 ** (my + g * (math.log10(v) - mx)) for v in (lo, hi)],
                "-",
                color=col,
                label=f"{loss}: γ = {g:.2f}, R² = {last['r2']:.2f}",
            )
        ep = [r["epoch"] for r in recs]
        gam = [r["gamma"] for r in recs]
        err = [
            [r["gamma"] - r["gamma_ci_low"] for r in recs],
            [r["gamma_ci_high"] - r["gamma"] for r in recs],
        ]
        ax[1].errorbar(ep, gam, yerr=err, fmt="o-", color=col, capsize=3, label=loss)
        ax[2].plot(ep, [r["comm_error"] for r in recs], "o-", color=col, label=loss)
        ax[2].plot(
            ep,
            [r["comm_baseline"] for r in recs],
            "x:",
            color=col,
            label=f"{loss} baseline",
        )
        ax[3].plot(
            ep, [r["spearman"] for r in recs], "o-", color=col, label=f"ρ {loss}"
        )
        ax[3].plot(
            ep,
            [r["eigen_alignment"] for r in recs],
            "s--",
            color=col,
            label=f"eigen-alignment {loss}",
        )
    ax[0].set(
        xlabel="λ_i (layer Hessian)",
        ylabel="C̃_ii",
        title=f"top-{res['config']['top_n']}, last epoch",
    )
    ax[1].axhspan(1, 2, color="grey", alpha=0.15, label="1 ≤ γ ≤ 2")
    ax[1].set(xlabel="epoch", ylabel="γ (95% CI)", title="power-law exponent")
    ax[2].set(xlabel="epoch", ylabel="‖CH − HC‖/‖CH‖", title="commutativity")
    ax[3].axhline(0.8, color="grey", ls=":")
    ax[3].set(xlabel="epoch", ylim=(0, 1.05), title="rank and alignment")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(
        f"{res['config']['dataset']} MLP, {res['metrics']['block_size']}-parameter "
        "hidden block (ZYT)",
        fontsize=9,
    )
    path = Path(results_path).parent / "power_law.png"
    common.save_figure(fig, path)
    return path


if __name__ == "__main__":
    common.cli(RECIPE, Config, main, __doc__, report=table)
