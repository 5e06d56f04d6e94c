"""Models, losses and targets of the recipes.

:func:`make_model` builds any timm model with ``timm.create_model(name,
pretrained=False, ...)`` or one of the papers' small models (``mlp``: the fully
connected net of Wu, Wang & Su 2022, ``cnn``, ``linear``, the random-feature model
``rfm`` and the deep linear network ``deep_linear``), with seeded
initialisation. :func:`make_loss` and
:func:`make_targets` pair a loss name with the targets it takes;
:func:`parity_targets` are the papers' one-output ±1 even/odd targets.
:func:`flat_parameters` and :func:`set_flat_parameters` read and write the
parameters as one vector, in ``model.parameters()`` order (the operators' order).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from geoopt_sgd import HalfSquaredError

SMALL_MODELS = ("mlp", "cnn", "linear", "rfm", "deep_linear")
LOSSES = ("ce", "mse")

__all__ = [
    "LOSSES",
    "SMALL_MODELS",
    "RandomFeatures",
    "check_model_name",
    "flat_parameters",
    "full_batch_loss",
    "make_loss",
    "make_model",
    "make_targets",
    "model_wants_flat",
    "parity_targets",
    "parse_model_kwargs",
    "set_flat_parameters",
]


def parse_model_kwargs(items: Iterable[str] | None, model: str) -> dict[str, Any]:
    """Parse ``--model-kwargs`` entries (``'key=value'``) for ``timm.create_model``.

    Values are Python literals (``channels=(8,8,16,16)``, ``depth=2``,
    ``class_token=False``); a bare word is a string (``norm_layer=groupnorm1``).

    Args:
        items: The entries (``None`` or empty: no arguments).
        model: The model name; arguments are allowed for timm models only.

    Returns:
        The keyword arguments.

    Raises:
        ValueError: If an entry is not ``key=value`` with an identifier as key,
            or ``model`` is one of :data:`SMALL_MODELS` and arguments are given.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = (t.strip() for t in item.partition("="))
        if not sep or not key.isidentifier():
            raise ValueError(
                f"`model_kwargs` entries must be 'key=value'; got {item!r}."
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word is a string
    if out and model in SMALL_MODELS:
        raise ValueError(
            f"`model_kwargs` are passed to timm.create_model; model {model!r} "
            "is not a timm model."
        )
    return out


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


class RandomFeatures(nn.Module):
    """Random-feature model ``f(x) = a^T ReLU(W x) / sqrt(m)``: only ``a`` is trained.

    The rows of ``W`` (``m × d``) are drawn uniformly on the sphere of radius
    ``sqrt(d)``, so ``w_j^T x`` has unit variance for unit-norm ``x``. ``W`` is a
    buffer (not a parameter), so the curvature operators see only the head.
    """

    def __init__(self, input_dim: int, width: int, num_classes: int):
        super().__init__()
        w = torch.randn(width, input_dim)
        w = w / w.norm(dim=1, keepdim=True) * math.sqrt(input_dim)
        self.register_buffer("features", w)
        self.scale = 1.0 / math.sqrt(width)
        self.head = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(x @ self.features.T) * self.scale)


_CNN_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
}
_CNN_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class _SmallCNN(nn.Module):
    """Two conv layers of ``width`` channels (``activation``, 2×2 ``pool`` pooling)
    and a linear head."""

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        width: int,
        size: int,
        activation: str = "relu",
        pool: str = "max",
    ):
        super().__init__()
        act, pool_cls = _CNN_ACTIVATIONS[activation], _CNN_POOLS[pool]
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            act(),
            pool_cls(2),
            nn.Conv2d(width, width, 3, padding=1),
            act(),
            pool_cls(2),
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
    cnn_activation: str = "relu",
    cnn_pool: str = "max",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    timm_args: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build a recipe model, with seeded initialisation.

    * ``"mlp"``: the fully connected net of Wu, Wang & Su 2022 (arXiv:2207.02628),
      ``input_dim → width (×depth) → num_classes`` with ``activation`` (``"tanh"``
      or ``"relu"``); needs flat inputs.
    * ``"cnn"``: two 3×3 conv layers of ``width`` channels, each followed by
      ``cnn_activation`` and 2×2 ``cnn_pool`` pooling, then a linear head; needs
      ``image_size``.
    * ``"linear"``: one linear layer on flat inputs.
    * ``"rfm"``: the random-feature model :class:`RandomFeatures` with ``width``
      fixed ReLU features; needs flat inputs.
    * ``"deep_linear"``: ``depth`` hidden bias-free linear layers of ``width``
      units and a bias-free linear output, no activation (WWS22's linear network:
      ``depth = 2`` gives its three layers); needs flat inputs.
    * anything else: ``timm.create_model(name, pretrained=False,
      num_classes=num_classes, in_chans=in_chans, **timm_kwargs, **timm_args)``.

    Args:
        name: Model name (see :func:`check_model_name`).
        num_classes: Number of outputs ``K``.
        in_chans: Input channels (image models).
        input_dim: Input features (``mlp``, ``linear``, ``rfm``, ``deep_linear``).
        image_size: Input side (``cnn``; for timm models, checked by a forward).
        width: Hidden width / channels of the small models.
        depth: Hidden layers of ``mlp`` and ``deep_linear``.
        activation: ``"tanh"`` or ``"relu"`` (``mlp``).
        cnn_activation: ``"relu"``, ``"gelu"``, ``"softplus"`` or ``"tanh"``
            (``cnn``).
        cnn_pool: ``"max"`` or ``"avg"`` pooling (``cnn``).
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
    # built on the CPU whatever the default device: the seeded draws come from
    # the CPU generator, and the recipes move the model to their device after
    with torch.device("cpu"):
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = _build(
                name,
                num_classes,
                in_chans=in_chans,
                input_dim=input_dim,
                image_size=image_size,
                width=width,
                depth=depth,
                activation=activation,
                cnn_activation=cnn_activation,
                cnn_pool=cnn_pool,
                timm_args=timm_args,
                **timm_kwargs,
            )
        finally:
            torch.set_rng_state(state)
        model = model.to(dtype)
        if name not in SMALL_MODELS and image_size is not None:
            _check_input_size(model, name, in_chans, image_size, dtype)
    return model


def _build(
    name: str,
    num_classes: int,
    *,
    in_chans: int,
    input_dim: int | None,
    image_size: int | None,
    width: int,
    depth: int,
    activation: str,
    cnn_activation: str,
    cnn_pool: str,
    timm_args: Mapping[str, Any],
    **timm_kwargs: Any,
) -> nn.Module:
    """The model :func:`make_model` names, on the current RNG and default device."""
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
        return nn.Sequential(*layers)
    if name in ("linear", "rfm", "deep_linear"):
        if input_dim is None:
            raise ValueError(f"`input_dim` is needed for model {name!r}.")
        if name == "linear":
            return nn.Linear(input_dim, num_classes)
        if name == "rfm":
            return RandomFeatures(input_dim, width, num_classes)
        dims = [input_dim] + [width] * depth + [num_classes]
        return nn.Sequential(
            *(
                nn.Linear(a, b, bias=False)
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            )
        )
    if name == "cnn":
        if image_size is None:
            raise ValueError("`image_size` is needed for model 'cnn'.")
        for arg, value, allowed in (
            ("cnn_activation", cnn_activation, _CNN_ACTIVATIONS),
            ("cnn_pool", cnn_pool, _CNN_POOLS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"`{arg}` must be one of {', '.join(map(repr, allowed))}; "
                    f"got {value!r}."
                )
        return _SmallCNN(
            in_chans, num_classes, width, image_size, cnn_activation, cnn_pool
        )
    import timm

    return timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        **timm_kwargs,
        **timm_args,
    )


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
    return name in ("mlp", "linear", "rfm", "deep_linear")


def make_loss(name: str) -> nn.Module:
    """Return the loss module for ``"ce"`` or ``"mse"``.

    ``"mse"`` is the papers' square loss :class:`geoopt_sgd.HalfSquaredError`
    (mean over samples of ``1/2 ||f - y||^2``, summed over outputs), on one-hot or
    parity targets (:func:`make_targets`, :func:`parity_targets`).

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
        return HalfSquaredError()
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


def parity_targets(labels: Tensor, dtype: torch.dtype) -> Tensor:
    """Return the one-output parity targets ``(N, 1)``: +1 for even labels, -1 for odd.

    The square-loss setting of WWS22/WW23: one output, so the Hessian's
    top eigenvalue is separated from the next.
    """
    return (1.0 - 2.0 * (labels % 2)).to(dtype).unsqueeze(1)


def flat_parameters(model: nn.Module) -> Tensor:
    """All parameters as one detached vector ``(P,)``, in ``model.parameters()`` order.

    The order is the curvature operators' (their eigenvectors index it), and the
    vector is a copy: later steps do not change it.
    """
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def full_batch_loss(model: nn.Module, loss_fn: Any, x: Tensor, y: Tensor) -> float:
    """The loss ``L(θ)`` on all of ``(x, y)``, in eval mode, without gradients."""
    model.eval()
    return float(loss_fn(model(x), y))


def set_flat_parameters(model: nn.Module, theta: Tensor) -> None:
    """Write the vector ``theta`` ``(P,)`` into the model's parameters."""
    torch.nn.utils.vector_to_parameters(theta, list(model.parameters()))
