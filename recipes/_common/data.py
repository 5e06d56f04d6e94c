"""Data sets as standardised tensors sized for the model.

:func:`load_data` returns a :class:`DataSplit`: the offline default ``digits``
(:func:`sklearn.datasets.load_digits`, resized to the model's input) or torchvision
``cifar10`` / ``fashion_mnist`` / ``mnist`` behind ``--data-dir`` and ``--download``
(a missing dataset names the flag), standardised with the training split's
statistics, split and subset deterministically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DATASETS = ("digits", "cifar10", "fashion_mnist", "mnist")

__all__ = ["DATASETS", "DataSplit", "check_dataset", "load_data"]


def check_dataset(name: str) -> str:
    """Check a dataset name.

    Args:
        name: One of :data:`DATASETS`.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: If the name is unknown.
    """
    if name not in DATASETS:
        raise ValueError(
            f"`dataset` must be one of {', '.join(map(repr, DATASETS))}; got {name!r}."
        )
    return name


@dataclass
class DataSplit:
    """Training and test tensors plus what a model needs to know about them.

    Attributes:
        x_train: Inputs, ``(N, C, S, S)`` for image models or ``(N, D)`` flat.
        y_train: Integer labels ``(N,)``.
        x_test: Test inputs, same layout.
        y_test: Test labels.
        num_classes: Number of classes ``K``.
        in_chans: Input channels ``C`` (1 for flat inputs).
        image_size: Side ``S`` (``None`` for flat inputs).
        name: The dataset's name.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_chans: int
    image_size: int | None
    name: str

    @property
    def input_dim(self) -> int:
        """Number of input features per sample (``C*S*S`` or ``D``)."""
        return int(self.x_train[0].numel())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):
        """Return a copy on ``device`` with floating inputs cast to ``dtype``."""
        kw = {"dtype": dtype} if dtype is not None else {}
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device, **kw),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device, **kw),
            y_test=self.y_test.to(device),
        )


def _torchvision_raw(
    name: str, data_dir: str | None, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Read a torchvision dataset as uint8-scaled float tensors (N, C, H, W)."""
    flag = "--data-dir DIR --download"
    if data_dir is None:
        raise ValueError(
            f"`dataset` {name!r} needs a data directory: pass --data-dir DIR (and "
            f"--download to fetch it there), or use --dataset digits (offline)."
        )
    from torchvision import datasets

    cls = {
        "cifar10": datasets.CIFAR10,
        "fashion_mnist": datasets.FashionMNIST,
        "mnist": datasets.MNIST,
    }[name]
    try:
        train = cls(data_dir, train=True, download=download)
        test = cls(data_dir, train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under {data_dir!r}; pass {flag} to "
            f"download it ({err})."
        ) from None

    def arrays(ds):
        x = torch.as_tensor(ds.data, device="cpu").float()
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)
        return x / 255.0, torch.as_tensor(ds.targets, device="cpu").long()

    xtr, ytr = arrays(train)
    xte, yte = arrays(test)
    return xtr, ytr, xte, yte, 10


def _zca(xtr: Tensor, xte: Tensor, rel_eps: float = 1e-2) -> tuple[Tensor, Tensor]:
    """ZCA-whiten flattened images with the training split's statistics."""
    shape = xtr.shape[1:]
    a, b = xtr.flatten(1).double(), xte.flatten(1).double()
    mean = a.mean(0, keepdim=True)
    cov = (a - mean).T @ (a - mean) / (len(a) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    eps = rel_eps * float(evals.clamp_min(0).mean())
    W = evecs @ torch.diag((evals.clamp_min(0) + eps).rsqrt()) @ evecs.T
    a, b = (a - mean) @ W, (b - mean) @ W
    return a.float().reshape(-1, *shape), b.float().reshape(-1, *shape)


def load_data(
    name: str = "digits",
    *,
    image_size: int | None = 16,
    in_chans: int = 1,
    flatten: bool = False,
    num_train: int | None = None,
    num_test: int | None = None,
    test_fraction: float = 0.25,
    whiten: bool = False,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DataSplit:
    """Load a dataset as standardised tensors sized for the model.

    ``digits`` (1797 8×8 grey images, 10 classes; shipped with scikit-learn) is split
    train/test by a seeded permutation (``test_fraction``); the torchvision datasets
    keep their own split. Images are resized bilinearly to ``image_size`` (``None``
    keeps the native size), repeated or averaged to ``in_chans`` channels, then
    standardised per channel with the training split's mean and std. Subsets
    (``num_train``, ``num_test``) are seeded and class-agnostic.

    Args:
        name: One of :data:`DATASETS`.
        image_size: Side of the square input, or ``None`` for the native size.
        in_chans: Channels the model expects.
        flatten: Return ``(N, D)`` instead of ``(N, C, S, S)`` (MLPs).
        num_train: Keep this many training samples (``None``: all).
        num_test: Keep this many test samples (``None``: all).
        test_fraction: Fraction held out for testing (``digits`` only).
        whiten: ZCA-whiten the images at their native resolution (before resizing),
            with the training split's covariance regularised by 1% of its mean
            eigenvalue; makes the input spectrum flat (high effective dimension).
        data_dir: Where torchvision datasets live.
        download: Download a missing torchvision dataset into ``data_dir``.
        seed: Seed of the split and the subsets.
        dtype: Floating dtype of the inputs.

    Returns:
        A :class:`DataSplit`.

    Raises:
        ValueError: If ``name`` is unknown, a torchvision dataset is asked for
            without ``data_dir``, or a size is invalid.
        FileNotFoundError: If a torchvision dataset is missing and ``download`` is
            off; the message names ``--download``.
    """
    check_dataset(name)
    if image_size is not None and image_size < 1:
        raise ValueError(f"`image_size` must be >= 1; got {image_size}.")
    if in_chans < 1:
        raise ValueError(f"`in_chans` must be >= 1; got {in_chans}.")
    g = torch.Generator().manual_seed(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (
            torch.as_tensor(d.images, dtype=torch.float32, device="cpu").unsqueeze(1)
            / 16.0
        )
        y = torch.as_tensor(d.target, dtype=torch.long, device="cpu")
        perm = torch.randperm(len(y), generator=g, device="cpu")
        n_test = int(round(test_fraction * len(y)))
        xte, yte = x[perm[:n_test]], y[perm[:n_test]]
        xtr, ytr = x[perm[n_test:]], y[perm[n_test:]]
        num_classes = 10
    else:
        xtr, ytr, xte, yte, num_classes = _torchvision_raw(name, data_dir, download)

    def subset(x, y, n, what):
        if n is None:
            return x, y
        if n < 1 or n > len(y):
            raise ValueError(f"`{what}` must be in [1, {len(y)}]; got {n}.")
        idx = torch.randperm(len(y), generator=g, device="cpu")[:n]
        return x[idx], y[idx]

    xtr, ytr = subset(xtr, ytr, num_train, "num_train")
    xte, yte = subset(xte, yte, num_test, "num_test")

    if whiten:
        xtr, xte = _zca(xtr, xte)

    def shape(x):
        if image_size is not None and x.shape[-1] != image_size:
            x = nn.functional.interpolate(
                x, size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        if x.shape[1] != in_chans:
            x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1)
        return x.contiguous()

    xtr, xte = shape(xtr), shape(xte)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    size = int(xtr.shape[-1])
    if flatten:
        xtr, xte = xtr.flatten(1), xte.flatten(1)
    return DataSplit(
        x_train=xtr.to(dtype),
        y_train=ytr,
        x_test=xte.to(dtype),
        y_test=yte,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=None if flatten else size,
        name=name,
    )
