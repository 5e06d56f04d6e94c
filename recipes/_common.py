"""Parts shared by the recipes: config CLI, data, models, environment, I/O, verdicts.

Every recipe is one readable script; what two or more of them need lives here:

* **Config → CLI.** :func:`parse_config` turns a frozen ``Config`` dataclass into an
  argparse CLI (``--field-name``; help from the field's trailing ``# comment``),
  with ``--quick`` (start from ``Config.quick()``) and ``--config f.json`` (file
  values override the defaults; the command line overrides the file).
* **Data.** :func:`load_data` returns tensors for the offline default ``digits``
  (:func:`sklearn.datasets.load_digits`, resized to the model's input), torchvision
  ``cifar10`` / ``fashion_mnist`` / ``mnist`` behind ``--data-dir`` and
  ``--download`` (a missing dataset names the flag), standardised with the training
  split's statistics, split and subset deterministically.
* **Models.** :func:`make_model` builds any timm model with
  ``timm.create_model(name, pretrained=False, ...)`` or one of the papers' small
  models (``mlp``: the R5 FCN, ``cnn``, ``linear``).
* **Environment, I/O.** :func:`environment` (versions, device, git SHA),
  :func:`write_json` (atomic: temp file + :func:`os.replace`),
  :func:`save_checkpoint` / :func:`load_checkpoint` (atomic; RNG states included),
  :func:`results_payload` (the common ``results.json`` layout).
* **Verdict.** :func:`claim` builds one verdict row (claim, value, threshold,
  passed); :func:`verdict_table` formats the rows.
* **Progress and plots.** :func:`progress` (tqdm, ``disable=None`` so it is silent
  off a terminal), :func:`pyplot` (matplotlib on the Agg backend).

Interruptions for the resume tests: a recipe's ``main(cfg, _stop_at=step)`` calls
:func:`maybe_interrupt`, which raises :class:`Interrupted` at that step, after the
checkpoint of the previous steps has been written.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import re
import subprocess
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_REPO_ROOT = Path(__file__).resolve().parent.parent  # where `git rev-parse` runs

SCHEMA_VERSION = 1  # bump when results.json changes incompatibly

DATASETS = ("digits", "cifar10", "fashion_mnist", "mnist")
SMALL_MODELS = ("mlp", "cnn", "linear")
LOSSES = ("ce", "mse")
DEVICES = ("cpu", "cuda")

__all__ = [
    "DATASETS",
    "DEVICES",
    "LOSSES",
    "SCHEMA_VERSION",
    "SMALL_MODELS",
    "DataSplit",
    "Interrupted",
    "check_config_basics",
    "check_dataset",
    "check_device",
    "check_model_name",
    "claim",
    "config_from_dict",
    "config_to_dict",
    "environment",
    "load_checkpoint",
    "load_data",
    "make_loss",
    "make_model",
    "make_targets",
    "maybe_interrupt",
    "model_wants_flat",
    "parse_config",
    "progress",
    "pyplot",
    "read_json",
    "recipe_dir",
    "resolve_device",
    "results_payload",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "verdict_table",
    "write_json",
]


# --------------------------------------------------------------------------------------
# Config dataclass <-> CLI / JSON
# --------------------------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Read each field's trailing ``# comment`` from the class source (for --help)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = re.match(r"^\s+(\w+)\s*:\s*[^#]*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _split_items(text: str) -> list[str]:
    """Split a CLI tuple on commas and whitespace outside brackets and quotes.

    ``"a=1,b=(8, 8),c='x y'"`` gives ``["a=1", "b=(8, 8)", "c='x y'"]``, so
    ``--model-kwargs`` can pass tuples, lists and quoted strings.
    """
    items, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if cur:
        items.append("".join(cur))
    return items


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Coerce a JSON or CLI value to the field's annotated type."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and value in ("none", "None", "null")):
        if optional:
            return None
        raise ValueError(f"`{name}` must not be None.")
    origin = typing.get_origin(base)
    if origin is tuple or base is tuple:
        args = typing.get_args(base)
        item = args[0] if args else str
        if isinstance(value, str):
            value = _split_items(value)
        return tuple(_convert(name, item, v) for v in value)
    if base is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"`{name}` must be a boolean; got {value!r}.")
        return bool(value)
    if base in (int, float, str):
        try:
            out = base(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"`{name}` must be of type {base.__name__}; got {value!r}."
            ) from None
        if base is int and isinstance(value, float) and value != out:
            raise ValueError(f"`{name}` must be an integer; got {value!r}.")
        return out
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a config dataclass as a JSON-ready dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """Build ``cls`` from ``values`` on top of ``base`` (default ``cls()``).

    Args:
        cls: A dataclass type.
        values: Field values (e.g. from JSON); converted to the annotated types.
        base: The instance whose values fill the fields not in ``values``.

    Returns:
        A new ``cls`` instance.

    Raises:
        ValueError: If ``values`` names an unknown field or a value has the wrong
            type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(map(repr, unknown))}; the fields "
            f"are {', '.join(map(repr, names))}."
        )
    base = cls() if base is None else base
    conv = {k: _convert(k, hints[k], v) for k, v in values.items()}
    return dataclasses.replace(base, **conv)


def parse_config(
    cls: type, argv: Sequence[str] | None = None, description: str | None = None
) -> Any:
    """Parse a recipe's command line into its ``Config``.

    Precedence (lowest first): ``cls()`` or ``cls.quick()`` with ``--quick``; the
    values in ``--config f.json``; the ``--field-name`` options given. Booleans take
    ``--flag`` / ``--no-flag``; tuples take comma- or space-separated values;
    optional fields take ``none``.

    Args:
        cls: The recipe's frozen ``Config`` dataclass (with a ``quick()``
            classmethod).
        argv: The arguments (default ``sys.argv[1:]``).
        description: The ``--help`` text (e.g. the recipe's docstring).

    Returns:
        The config instance.

    Raises:
        SystemExit: On ``--help`` or an invalid command line (argparse's
            behaviour), or a config file that cannot be read or names an unknown
            field.
    """
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="start from Config.quick() (CI setting)"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="JSON file of field values (CLI overrides)"
    )
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        tp, _ = _strip_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{comments.get(f.name, '')} (default: {getattr(defaults, f.name)!r})"
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar="X", help=help_
            )
    ns = vars(parser.parse_args(argv))
    quick, config_file = ns.pop("quick"), ns.pop("config")
    base = cls.quick() if quick else cls()
    try:
        if config_file is not None:
            with open(config_file) as fh:
                base = config_from_dict(cls, json.load(fh), base)
        return config_from_dict(cls, ns, base)
    except (OSError, ValueError) as err:
        parser.error(str(err))


# --------------------------------------------------------------------------------------
# Validation shared by the recipes (all before any training starts)
# --------------------------------------------------------------------------------------


def check_model_name(name: str) -> str:
    """Check that ``name`` is a small paper model or a timm model name.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"linear"`` or any ``timm.list_models()`` name.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: If the name is unknown.
    """
    if name in SMALL_MODELS:
        return name
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"`model` must be one of {', '.join(map(repr, SMALL_MODELS))} or a timm "
            f"model name; got {name!r}. List timm names with "
            "`python -c \"import timm; print(timm.list_models('*resnet*'))\"` "
            "(e.g. 'test_resnet', 'resnet18')."
        )
    return name


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


def check_device(name: str) -> str:
    """Check a device name, and that CUDA is there when asked for.

    Args:
        name: ``"cpu"`` or ``"cuda"`` (optionally ``"cuda:N"``).

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: If the name is unknown or CUDA is not available.
    """
    if name.split(":")[0] not in DEVICES:
        raise ValueError(
            f"`device` must be one of {', '.join(map(repr, DEVICES))}; got {name!r}."
        )
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"`device` is {name!r} but CUDA is not available here; pass --device cpu."
        )
    return name


def check_config_basics(cfg: Any) -> None:
    """Validate the fields most recipes share, where present.

    Checks ``model``, ``dataset``, ``device``, ``loss``, every field whose name
    ends in ``lr`` (> 0), ``seed`` (>= 0) and ``steps``-like counts (>= 0).

    Args:
        cfg: A recipe config.

    Raises:
        ValueError: On the first invalid field.
    """
    if hasattr(cfg, "model"):
        check_model_name(cfg.model)
    if hasattr(cfg, "dataset"):
        check_dataset(cfg.dataset)
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    if hasattr(cfg, "loss") and cfg.loss not in LOSSES:
        raise ValueError(
            f"`loss` must be one of {', '.join(map(repr, LOSSES))}; got {cfg.loss!r}."
        )
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name.endswith("lr") and v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"`{f.name}` must be > 0; got {v!r}.")
        if f.name == "seed" and v < 0:
            raise ValueError(f"`seed` must be >= 0; got {v!r}.")


def resolve_device(name: str) -> torch.device:
    """Return the :class:`torch.device` for a checked device name.

    Args:
        name: ``"cpu"`` or ``"cuda"``.

    Returns:
        The device.

    Raises:
        ValueError: See :func:`check_device`.
    """
    return torch.device(check_device(name))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


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
        x = torch.as_tensor(ds.data).float()
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)
        return x / 255.0, torch.as_tensor(ds.targets).long()

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
        x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=g)
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
        idx = torch.randperm(len(y), generator=g)[:n]
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


# --------------------------------------------------------------------------------------
# Models and losses
# --------------------------------------------------------------------------------------


class _SmallCNN(nn.Module):
    """Two conv layers of ``width`` channels (ReLU, 2×2 pooling) and a linear head."""

    def __init__(self, in_chans: int, num_classes: int, width: int, size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(width * (size // 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def make_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 1,
    input_dim: int | None = None,
    image_size: int | None = None,
    width: int = 128,
    depth: int = 2,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    timm_args: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a recipe model, with seeded initialisation.

    * ``"mlp"``: the FCN of SPEC R5, ``input_dim → width (×depth) → num_classes``
      with ``activation`` (``"tanh"`` or ``"relu"``); needs flat inputs.
    * ``"cnn"``: two 3×3 conv layers of ``width`` channels with ReLU and 2×2
      pooling, then a linear head; needs ``image_size``.
    * ``"linear"``: one linear layer on flat inputs.
    * anything else: ``timm.create_model(name, pretrained=False,
      num_classes=num_classes, in_chans=in_chans, **timm_kwargs, **timm_args)``.

    Args:
        name: Model name (see :func:`check_model_name`).
        num_classes: Number of outputs ``K``.
        in_chans: Input channels (image models).
        input_dim: Input features (``mlp``, ``linear``).
        image_size: Input side (``cnn``; for timm models, checked by a forward).
        width: Hidden width / channels of the small models.
        depth: Hidden layers of ``mlp``.
        activation: ``"tanh"`` or ``"relu"`` (``mlp``).
        seed: Seed of the initialisation (the global RNG is restored afterwards).
        dtype: Parameter dtype.
        timm_args: More :func:`timm.create_model` arguments, for names that
            this function also takes (e.g. a ViT's ``depth``); timm models only.
        **timm_kwargs: Passed to :func:`timm.create_model`.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: If the name is unknown, a size the model needs is missing,
            ``timm_args`` is given for a small model or repeats a keyword, or a
            timm model cannot run on ``image_size`` inputs (checked with one
            eval-mode forward of two blank images).
    """
    check_model_name(name)
    timm_args = dict(timm_args or {})
    if timm_args and name in SMALL_MODELS:
        raise ValueError(f"`timm_args` are for timm models; got model {name!r}.")
    clash = sorted(
        set(timm_args) & (set(timm_kwargs) | {"pretrained", "num_classes", "in_chans"})
    )
    if clash:
        raise ValueError(f"`timm_args` repeats keyword arguments: {clash}.")
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "mlp":
            if input_dim is None:
                raise ValueError("`input_dim` is needed for model 'mlp'.")
            if activation not in ("tanh", "relu"):
                raise ValueError(
                    f"`activation` must be one of 'tanh', 'relu'; got {activation!r}."
                )
            act = nn.Tanh if activation == "tanh" else nn.ReLU
            layers: list[nn.Module] = []
            d = input_dim
            for _ in range(depth):
                layers += [nn.Linear(d, width), act()]
                d = width
            layers.append(nn.Linear(d, num_classes))
            model: nn.Module = nn.Sequential(*layers)
        elif name == "linear":
            if input_dim is None:
                raise ValueError("`input_dim` is needed for model 'linear'.")
            model = nn.Linear(input_dim, num_classes)
        elif name == "cnn":
            if image_size is None:
                raise ValueError("`image_size` is needed for model 'cnn'.")
            model = _SmallCNN(in_chans, num_classes, width, image_size)
        else:
            import timm

            model = timm.create_model(
                name,
                pretrained=False,
                num_classes=num_classes,
                in_chans=in_chans,
                **timm_kwargs,
                **timm_args,
            )
    finally:
        torch.set_rng_state(state)
    model = model.to(dtype)
    if name not in SMALL_MODELS and image_size is not None:
        _check_input_size(model, name, in_chans, image_size, dtype)
    return model


def _check_input_size(
    model: nn.Module, name: str, in_chans: int, image_size: int, dtype: torch.dtype
) -> None:
    """One eval-mode forward of two blank images: a model that downsamples below
    one pixel at this size stops here with a clear message, before training."""
    training = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, in_chans, image_size, image_size, dtype=dtype))
    except (RuntimeError, AssertionError) as err:  # timm asserts fixed input sizes
        raise ValueError(
            f"model {name!r} cannot run on {image_size}x{image_size} inputs "
            f"({(str(err).splitlines() or [type(err).__name__])[0]}); pass another "
            "`--image-size` (a larger one if the model downsamples it away) or "
            "`--model-kwargs` that fit it."
        ) from None
    finally:
        for m, t in zip(model.modules(), training, strict=True):
            m.training = t


def model_wants_flat(name: str) -> bool:
    """Return whether model ``name`` takes flat ``(N, D)`` inputs."""
    return name in ("mlp", "linear")


def make_loss(name: str) -> nn.Module:
    """Return the loss module for ``"ce"`` or ``"mse"``.

    ``"mse"`` is :class:`torch.nn.MSELoss` (mean over samples *and* outputs) on
    one-hot targets (:func:`make_targets`); the library's metrics convert it to the
    SPEC's ½‖r‖² convention.

    Args:
        name: One of :data:`LOSSES`.

    Returns:
        The loss module (reduction ``"mean"``).

    Raises:
        ValueError: If the name is unknown.
    """
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "mse":
        return nn.MSELoss()
    raise ValueError(
        f"`loss` must be one of {', '.join(map(repr, LOSSES))}; got {name!r}."
    )


def make_targets(
    loss: str, labels: Tensor, num_classes: int, dtype: torch.dtype
) -> Tensor:
    """Return the targets ``loss`` expects: labels for CE, one-hot for MSE."""
    if loss == "mse":
        return nn.functional.one_hot(labels, num_classes).to(dtype)
    return labels


# --------------------------------------------------------------------------------------
# Environment, seeds, RNG states
# --------------------------------------------------------------------------------------


def _git_sha() -> dict[str, Any]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"git_sha": sha or None, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Capture what a result depends on: versions, device, threads, git SHA.

    Args:
        device: The device the recipe runs on.

    Returns:
        A JSON-ready dict.
    """
    device = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    for mod in ("timm", "torchvision", "numpy", "sklearn", "geoopt_sgd"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded
            env[mod] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    env.update(_git_sha())
    return env


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's global RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict[str, Any]:
    """Return the global RNG states (torch CPU and CUDA, Python, NumPy).

    The result holds only tensors, lists, ints and strings, so it loads with
    ``torch.load(weights_only=True)``.
    """
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(
            (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        )


# --------------------------------------------------------------------------------------
# Files: atomic JSON, checkpoints, results layout
# --------------------------------------------------------------------------------------


def recipe_dir(out_dir: str | os.PathLike, recipe: str) -> Path:
    """Return (and create) ``<out_dir>/<recipe>/``."""
    path = Path(out_dir) / recipe
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    """Replace NaN/inf by None so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Save a Matplotlib figure as PNG atomically (temp file + rename) and close it.

    An interrupted run never leaves a truncated PNG behind: readers see the old
    figure or the new one.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        _atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON, atomically (temp file + rename).

    Tensors and NumPy arrays become lists; NaN and infinities become ``null``.

    Args:
        path: Destination.
        obj: A JSON-ready structure.

    Returns:
        The path written.
    """
    path = Path(path)
    text = json.dumps(
        _clean_floats(json.loads(json.dumps(obj, default=_json_default))),
        indent=1,
        allow_nan=False,
    )
    _atomic_write(path, lambda fh: fh.write(text.encode() + b"\n"))
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path) as fh:
        return json.load(fh)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save a checkpoint atomically, adding the global RNG states.

    Args:
        path: Destination (``checkpoint.pt``).
        state: Tensors, state dicts, lists, numbers and strings only (so it loads
            with ``weights_only=True``), e.g. ``{"step": t, "model": ...,
            "optimizer": ..., "config": ..., "arrays": ...}``.

    Returns:
        The path written.
    """
    path = Path(path)
    payload = dict(state, rng=rng_state())
    _atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(
    path: str | os.PathLike, *, config: dict[str, Any] | None = None, restore_rng=True
) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint`, if there is one.

    Args:
        path: The checkpoint file.
        config: The current run's config dict; if given, it must equal the saved
            one except for ``resume``, ``device`` and ``out_dir``.
        restore_rng: Restore the saved global RNG states.

    Returns:
        The saved dict, or ``None`` if ``path`` does not exist.

    Raises:
        ValueError: If ``config`` differs from the checkpoint's.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if config is not None and "config" in state:
        ignore = {"resume", "device", "out_dir"}
        diff = sorted(
            k
            for k in set(config) | set(state["config"])
            if k not in ignore and config.get(k) != state["config"].get(k)
        )
        if diff:
            raise ValueError(
                f"--resume: the checkpoint {str(path)!r} was written with a different "
                f"config (fields {', '.join(map(repr, diff))}); rerun with the same "
                "config, or without --resume to start over."
            )
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return state


def results_payload(
    recipe: str,
    cfg: Any,
    *,
    env: dict[str, Any],
    metrics: dict[str, Any],
    arrays: dict[str, Any],
    verdict: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble the common ``results.json`` layout.

    Keys: ``schema_version``, ``recipe``, ``config``, ``seed``, ``env``,
    ``metrics`` (summary numbers), ``arrays`` (per-step lists), ``verdict`` (rows
    from :func:`claim`), ``passed`` (all rows passed), plus ``extra``.

    Args:
        recipe: The recipe's name.
        cfg: Its config dataclass.
        env: From :func:`environment`.
        metrics: Summary metrics.
        arrays: Per-step arrays.
        verdict: Verdict rows.
        **extra: More top-level keys.

    Returns:
        The dict to pass to :func:`write_json`.
    """
    cfg_d = config_to_dict(cfg)
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe,
        "config": cfg_d,
        "seed": cfg_d.get("seed"),
        "env": env,
        "metrics": metrics,
        "arrays": arrays,
        "verdict": verdict,
        "passed": bool(verdict) and all(row["passed"] for row in verdict),
        **extra,
    }


# --------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------

_OPS = {
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
}


def claim(
    claim: str,
    value: float | None,
    op: str,
    threshold: float,
    *,
    source: str = "",
    note: str = "",
) -> dict[str, Any]:
    """Return one verdict row: does ``value op threshold`` hold?

    A missing or non-finite value fails.

    Args:
        claim: The paper's claim in words (e.g. "GD escapes along u_1").
        value: The measured value.
        op: One of ``">="``, ``">"``, ``"<="``, ``"<"``.
        threshold: The threshold from the SPEC.
        source: Where the claim and threshold come from (e.g. "SPEC R10").
        note: Anything a reader needs (e.g. which arm, which k).

    Returns:
        ``{"claim", "value", "op", "threshold", "passed", "source", "note"}``.

    Raises:
        ValueError: If ``op`` is unknown.
    """
    if op not in _OPS:
        raise ValueError(
            f"`op` must be one of {', '.join(map(repr, _OPS))}; got {op!r}."
        )
    v = None if value is None else float(value)
    ok = v is not None and math.isfinite(v) and bool(_OPS[op](v, float(threshold)))
    return {
        "claim": claim,
        "value": v,
        "op": op,
        "threshold": float(threshold),
        "passed": ok,
        "source": source,
        "note": note,
    }


def verdict_table(rows: Iterable[dict[str, Any]]) -> str:
    """Format verdict rows as a Markdown table (for the terminal and README)."""
    lines = ["| claim | value | threshold | pass |", "|---|---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(
            f"| {r['claim']} | {v} | {r['op']} {r['threshold']:.4g} | "
            f"{'PASS' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Progress, plots, interruption hook
# --------------------------------------------------------------------------------------


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """Return a tqdm progress bar; silent when stderr is not a terminal.

    Args:
        iterable: What to iterate over (or ``None`` with ``total=``).
        **kwargs: Passed to :class:`tqdm.tqdm` (``total``, ``desc``, ``initial``).

    Returns:
        The bar.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def pyplot() -> Any:
    """Return :mod:`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {"figure.dpi": 110, "savefig.bbox": "tight", "axes.grid": True, "font.size": 9}
    )
    return plt


class Interrupted(RuntimeError):
    """Raised by :func:`maybe_interrupt` to simulate a killed run (tests only)."""


def maybe_interrupt(step: int, stop_at: int | None) -> None:
    """Raise :class:`Interrupted` when ``step == stop_at`` (test hook).

    Args:
        step: The step about to run.
        stop_at: The step at which to stop, or ``None`` (never).

    Raises:
        Interrupted: If ``step == stop_at``.
    """
    if stop_at is not None and step == stop_at:
        raise Interrupted(f"interrupted at step {step} (test hook)")
