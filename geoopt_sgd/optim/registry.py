"""Register geoopt_sgd's optimizers in timm's optimizer registry.

timm is an optional dependency: it is imported only when
:func:`register_timm_optimizers` is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TIMM_NAMES", "register_timm_optimizers"]

#: Registry names: timm's ``create_optimizer_v2`` reads the part of the name after
#: the last underscore (``"lookahead_sgd"`` -> Lookahead around ``"sgd"``), so a
#: name like ``"probed_sgd"`` would silently create timm's Nesterov SGD. Hence no
#: underscores.
TIMM_NAMES: tuple[str, ...] = ("probedsgd", "noisygd")


def _infos(opt_info_cls: Any) -> list[Any]:
    from .noisy_gd import NoisyGD
    from .probed_sgd import ProbedSGD

    return [
        opt_info_cls(
            name="probedsgd",
            opt_class=ProbedSGD,
            description=(
                "geoopt_sgd ProbedSGD: torch.optim.SGD (classical momentum, "
                "not Nesterov) plus an optional noise-geometry probe"
            ),
            has_eps=False,
            has_momentum=True,
            defaults={"nesterov": False},
        ),
        opt_info_cls(
            name="noisygd",
            opt_class=NoisyGD,
            description=(
                "geoopt_sgd NoisyGD: gradient descent plus injected noise "
                "(isotropic, diagonal, Hessian-aligned, SGD-like)"
            ),
            has_eps=False,
            has_momentum=False,
        ),
    ]


def register_timm_optimizers(registry: Any = None) -> tuple[str, ...]:
    """Register :class:`~geoopt_sgd.ProbedSGD` and :class:`~geoopt_sgd.NoisyGD` in timm.

    After the call, ``timm.optim.create_optimizer_v2(model, "probedsgd", lr=...)``
    and ``create_optimizer_v2(model, "noisygd", lr=..., noise="isotropic")`` build
    our optimizers, with timm's parameter grouping (weight decay off for biases
    and norm layers), layer decay and ``lookahead_`` prefix. Registering again is a
    no-op. Notes on timm's conventions:

    - timm's ``"sgd"`` is **Nesterov** SGD (``nesterov=True``) and timm passes
      ``momentum=0.9`` to every optimizer that has momentum unless told
      otherwise. ``"probedsgd"`` is registered with ``nesterov=False`` (like
      timm's ``"momentum"``), but timm's ``momentum=0.9`` default still applies:
      pass ``momentum=0.0`` for plain SGD/GD, e.g. in a GD-vs-SGD experiment.
    - ``"noisygd"`` has no momentum; timm then drops its ``momentum`` argument.
      NoisyGD's other arguments (``noise``, ``noise_scale``, ``model``,
      ``loss_fn``, ``data``, ...) pass through as keyword arguments.
    - :class:`~geoopt_sgd.CyclicLRWrapper` is not an entry (it wraps an
      optimizer): wrap the result,
      ``CyclicLRWrapper(create_optimizer_v2(model, "probedsgd", lr=0.1), ...)``.

    Args:
        registry: A ``timm.optim.OptimizerRegistry``. Default: ``None``, meaning
            timm's global registry (the one ``create_optimizer_v2`` uses).

    Returns:
        The registered names, :data:`TIMM_NAMES`.

    Raises:
        ImportError: If timm is not installed.
        TypeError: If ``registry`` is not a ``timm.optim.OptimizerRegistry``.

    Example:
        >>> import timm.optim
        >>> import torch
        >>> register_timm_optimizers()
        ('probedsgd', 'noisygd')
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = timm.optim.create_optimizer_v2(model, "probedsgd", lr=0.1, momentum=0)
        >>> type(opt).__name__, opt.param_groups[0]["nesterov"]
        ('ProbedSGD', False)
    """
    try:
        from timm.optim import OptimInfo, OptimizerRegistry
        from timm.optim._optim_factory import default_registry
    except ImportError as e:
        raise ImportError(
            "register_timm_optimizers needs timm (an optional dependency of "
            "geoopt_sgd); install it with `pip install timm`."
        ) from e
    if registry is None:
        registry = default_registry
    if not isinstance(registry, OptimizerRegistry):
        raise TypeError(
            "`registry` must be a timm.optim.OptimizerRegistry or None; got "
            f"{type(registry).__name__}."
        )
    registered = set(registry.list_optimizers())
    for info in _infos(OptimInfo):
        # skip our own earlier registration (timm logs a warning on overwrite)
        if info.name in registered and (
            registry.get_optimizer_info(info.name).opt_class is info.opt_class
        ):
            continue
        registry.register(info)
    return TIMM_NAMES
