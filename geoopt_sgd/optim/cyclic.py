"""Cyclical learning rates: a pure schedule and a wrapper around any optimizer.

:func:`cyclic_lr` is the closed-form schedule of Smith (2017, arXiv:1506.01186), a pure
function of the step. :class:`CyclicLRWrapper` wraps any
:class:`torch.optim.Optimizer` (SGD, :class:`~geoopt_sgd.ProbedSGD`,
:class:`~geoopt_sgd.NoisyGD`, Adam, SAM-style wrappers) and writes
``cyclic_lr(t)`` into every param group before the ``t``-th step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.hooks import RemovableHandle

from .._checks import (
    check_choice,
    check_int,
    check_number,
    check_param_group,
    check_state_dict,
)

__all__ = ["CyclicLRWrapper", "cyclic_lr"]

Mode = Literal["triangular", "triangular2", "exp_range", "cosine", "square"]
MODES: tuple[str, ...] = ("triangular", "triangular2", "exp_range", "cosine", "square")

# Param-group keys owned by the wrapper. They are plain ints and floats, so a
# checkpoint holding them loads under ``torch.load(weights_only=True)``.
_STEP_KEY = "cyclic_step"
_BASE_KEY = "cyclic_base_lr"
_MAX_KEY = "cyclic_max_lr"
_BASE_MOMENTUM_KEY = "cyclic_base_momentum"
_MAX_MOMENTUM_KEY = "cyclic_max_momentum"

# Hook dicts created by ``Optimizer.__init__``: they may hold lambdas, so they are
# not pickled (as in ``Optimizer.__getstate__``) and are recreated empty on load.
_HOOK_ATTRS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "_cyclic_post_hooks",
)


def _schedule_value(
    step: int,
    low: float,
    high: float,
    step_size_up: int,
    step_size_down: int,
    mode: str,
    gamma: float,
) -> float:
    # Same operations, in the same order, as torch.optim.lr_scheduler.CyclicLR.get_lr,
    # so that the three modes torch has agree with it bit for bit.
    total_size = float(step_size_up) + float(step_size_down)
    step_ratio = float(step_size_up) / total_size
    cycle = math.floor(1 + step / total_size)
    x = 1.0 + step / total_size - cycle
    if x <= step_ratio:
        scale_factor = x / step_ratio
    else:
        scale_factor = (x - 1) / (step_ratio - 1)
    if mode == "square":
        # integer arithmetic: the phase boundaries are exact
        return high if step % (step_size_up + step_size_down) < step_size_up else low
    if mode == "cosine":
        scale_factor = 0.5 * (1.0 - math.cos(math.pi * scale_factor))
    base_height = (high - low) * scale_factor
    if mode == "triangular2":
        return low + base_height * (1 / (2.0 ** (cycle - 1)))
    if mode == "exp_range":
        return low + base_height * gamma**step
    return low + base_height * 1.0


def cyclic_lr(
    step: int,
    base_lr: float,
    max_lr: float,
    step_size_up: int,
    step_size_down: int | None = None,
    mode: Mode = "triangular",
    gamma: float = 1.0,
) -> float:
    r"""Return the cyclical learning rate used at step ``step``.

    With :math:`t` the step, :math:`s_u, s_d` the two half-cycle lengths,
    :math:`T = s_u + s_d`, :math:`c = \lfloor 1 + t/T \rfloor` the cycle (from 1)
    and :math:`x = 1 + t/T - c \in [0, 1)` the position in it:

    .. math::

        f = \begin{cases} x T / s_u & x \le s_u/T \\
                          (1 - x) T / s_d & \text{otherwise} \end{cases},
        \qquad
        \eta_t = \eta_{\min} + (\eta_{\max} - \eta_{\min})\, g(f)\, \sigma_t .

    - ``"triangular"``: :math:`g(f) = f`, :math:`\sigma_t = 1`.
    - ``"triangular2"``: :math:`\sigma_t = 2^{-(c-1)}` (amplitude halves each cycle).
    - ``"exp_range"``: :math:`\sigma_t = \gamma^t`.
    - ``"cosine"``: :math:`g(f) = (1 - \cos \pi f)/2`, :math:`\sigma_t = 1`: the
      triangle smoothed, with the same extremes at the same steps. Each cycle
      restarts from ``base_lr``; ``step_size_up=1`` gives SGDR-style warm restarts
      (one step at ``base_lr``, then cosine annealing from ``max_lr``).
    - ``"square"``: piecewise constant, ``max_lr`` for the first ``step_size_up``
      steps of each cycle (the high phase), then ``base_lr`` for
      ``step_size_down`` steps (the low phase), for mechanism studies (Wang & Wu
      2023's flat-minima experiment): a cycle ends at the end of a low phase.

    The first three modes equal ``torch.optim.lr_scheduler.CyclicLR`` with
    ``cycle_momentum=False`` bit for bit: the lr it sets before the ``t``-th
    ``optimizer.step()`` (counting from 0) is ``cyclic_lr(t, ...)``.

    Args:
        step: The step :math:`t \ge 0` (number of optimizer steps already taken).
        base_lr: Lower bound :math:`\eta_{\min} \ge 0`, the lr at the start of
            each cycle.
        max_lr: Upper bound :math:`\eta_{\max} \ge` ``base_lr``, reached at
            ``step_size_up`` into each cycle (scaled by :math:`\sigma_t`).
        step_size_up: Steps in the rising (``"square"``: high) half-cycle, >= 1.
            Smith (2017) suggests 2 to 10 epochs of steps.
        step_size_down: Steps in the falling (``"square"``: low) half-cycle, >= 1.
            Default: ``None``, meaning ``step_size_up``.
        mode: One of ``"triangular"``, ``"triangular2"``, ``"exp_range"``,
            ``"cosine"``, ``"square"``.
        gamma: Per-step decay :math:`\gamma > 0` of ``"exp_range"``; the other
            modes ignore it (as torch does). Default: ``1.0``.

    Returns:
        The learning rate, a Python float.

    Raises:
        TypeError: If ``step`` or a step size is not an int, or a rate is not a
            real number.
        ValueError: If an argument is out of range, ``base_lr > max_lr``, or
            ``mode`` is unknown.

    Example:
        >>> [cyclic_lr(t, 0.1, 0.5, step_size_up=2) for t in range(5)]
        [0.1, 0.30000000000000004, 0.5, 0.30000000000000004, 0.1]
        >>> [cyclic_lr(t, 0.1, 0.5, 2, 1, mode="square") for t in range(4)]
        [0.5, 0.5, 0.1, 0.5]
    """
    check_int("step", step, ge=0)
    step_size_up, step_size_down, mode, gamma = _check_schedule(
        step_size_up, step_size_down, mode, gamma
    )
    check_number("base_lr", base_lr, ge=0)
    check_number("max_lr", max_lr, ge=0)
    _check_order("base_lr", base_lr, "max_lr", max_lr)
    return _schedule_value(
        step,
        float(base_lr),
        float(max_lr),
        step_size_up,
        step_size_down,
        mode,
        gamma,
    )


def _check_schedule(
    step_size_up: Any, step_size_down: Any, mode: Any, gamma: Any
) -> tuple[int, int, str, float]:
    check_int("step_size_up", step_size_up, ge=1)
    check_int("step_size_down", step_size_down, ge=1, allow_none=True)
    check_choice("mode", mode, MODES)
    check_number("gamma", gamma, gt=0)
    if step_size_down is None:
        step_size_down = step_size_up
    return step_size_up, step_size_down, mode, float(gamma)


def _check_order(low_name: str, low: float, high_name: str, high: float) -> None:
    if low > high:
        raise ValueError(
            f"`{low_name}` must be <= `{high_name}`; got {low_name}={low!r} > "
            f"{high_name}={high!r}."
        )


def _per_group(
    name: str, value: Any, n_groups: int, *, lt: float | None = None
) -> list[float]:
    """Expand a scalar or a per-group list into a list of validated floats."""
    if not isinstance(value, (list, tuple)):
        check_number(name, value, ge=0, lt=lt)
        return [float(value)] * n_groups
    if len(value) != n_groups:
        raise ValueError(
            f"`{name}` must be a number or a list with one number per param "
            f"group ({n_groups}); got a list of {len(value)}."
        )
    for i, v in enumerate(value):
        check_number(f"{name}[{i}]", v, ge=0, lt=lt)
    return [float(v) for v in value]


def _write_value(group: dict[str, Any], key: str, value: float) -> None:
    # A tensor hyperparameter is written in place: torch.compile-d steps keep
    # reading the same tensor and do not recompile when the value changes.
    current = group[key]
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


class CyclicLRWrapper(torch.optim.Optimizer):
    r"""Cyclical learning rates for any optimizer.

    Before the ``t``-th call of :meth:`step` (counting from 0) the wrapper writes
    ``cyclic_lr(t, base_lr[g], max_lr[g], step_size_up, step_size_down, mode,
    gamma)`` into ``param_groups[g]["lr"]`` and then calls the inner optimizer's
    ``step`` once. Between steps ``group["lr"]`` holds the lr of the *next* step
    (``cyclic_lr(0)`` right after construction), as after a torch
    ``scheduler.step()``; the lr of the step just taken is
    ``lr_at(last_step - 1)``. Step post-hooks registered on the wrapper (an
    attached :class:`~geoopt_sgd.NoiseProbe`) run before the next lr is
    written, so they see the lr the step used. A torch ``LRScheduler`` built on
    the wrapper raises ``TypeError`` (its lr would be overwritten every step),
    and an lr written from outside between steps (``ReduceLROnPlateau``, a
    scheduler on the inner optimizer, a manual change) makes the next
    :meth:`step` raise ``RuntimeError`` before anything changes; use
    :meth:`as_scheduler` for an ``(optimizer, scheduler)`` pair. The
    wrapper changes nothing else: unlike
    ``torch.optim.lr_scheduler.CyclicLR`` (``cycle_momentum=True`` by
    default, which turns ``SGD(momentum=0)`` into momentum-0.9 SGD), momentum is
    cycled only when asked for with ``cycle_momentum=True``.

    The wrapper *shares* ``param_groups``, ``state`` and ``defaults`` with the
    inner optimizer (``wrapper.optimizer``). Its own keys live in the param groups
    under a ``cyclic_`` prefix: ``cyclic_step`` (steps taken), ``cyclic_base_lr``,
    ``cyclic_max_lr`` (and ``cyclic_base_momentum``, ``cyclic_max_momentum``).
    :meth:`state_dict` is therefore the inner optimizer's full state (momentum
    buffers, noise RNG) plus the schedule position, and a checkpoint saved with
    ``torch.save`` loads back under ``torch.load(weights_only=True)``. The
    schedule's shape (``mode``, step sizes, ``gamma``) is a constructor argument,
    not state: rebuild the wrapper with the same arguments, then
    :meth:`load_state_dict`.

    Usage notes:

    - **Closures.** ``step(closure)`` forwards the closure to the inner
      optimizer, which calls it once, and returns its loss; ``step()`` without a
      closure works for every optimizer that allows it (Lightning does this).
    - **AMP.** ``torch.amp.GradScaler.step(wrapper)`` skips ``wrapper.step`` on
      inf/NaN gradients, so skipped steps do not advance the schedule.
    - **torch.compile.** Give the inner optimizer a tensor lr
      (``SGD(params, lr=torch.tensor(0.01))``): the wrapper writes it in place
      with ``fill_``, so a compiled training step is not recompiled when the lr
      changes (a float lr is a guarded constant and would be). The schedule itself
      runs eagerly (``torch._disable_dynamo``).
    - **As an LRScheduler.** Frameworks that want ``(optimizer, scheduler)``
      pairs (Lightning's ``configure_optimizers``, timm's training loop) can
      either use the wrapper as the optimizer with no scheduler, or use
      ``wrapper.optimizer`` with :meth:`as_scheduler`, a
      ``torch.optim.lr_scheduler.LRScheduler`` stepped once after each optimizer
      step (``interval="step"`` in Lightning). Do not mix the two.
    - **Groups added to the inner optimizer.** A param group added with
      ``wrapper.optimizer.add_param_group`` (Lightning's ``BackboneFinetuning``
      adds groups to the optimizer it is given) joins the schedule at the
      wrapper's next step (with :meth:`as_scheduler`: the next optimizer step) or
      :meth:`state_dict`, exactly as if it had been added with
      :meth:`add_param_group` then.
    - **accelerate** steps schedulers ``num_processes`` times per step unless
      told otherwise; the wrapper counts real optimizer steps only.

    Args:
        optimizer: The inner optimizer; its ``param_groups`` are modified in place.
        base_lr: Lower lr bound, a number or one per param group. >= 0.
        max_lr: Upper lr bound, a number or one per param group. >= ``base_lr``.
        step_size_up: Steps in the rising (``"square"``: high) half-cycle, >= 1.
        step_size_down: Steps in the falling (``"square"``: low) half-cycle.
            Default: ``None``, meaning ``step_size_up``.
        mode: ``"triangular"``, ``"triangular2"``, ``"exp_range"``, ``"cosine"``
            or ``"square"`` (see :func:`cyclic_lr`). Default: ``"triangular"``.
        gamma: Per-step amplitude decay of ``"exp_range"``, > 0. Default: ``1.0``.
        cycle_momentum: Also cycle momentum (SGD ``momentum`` or Adam's
            ``betas[0]``) inversely to the lr, exactly as torch's ``CyclicLR``
            does. Default: ``False``.
        base_momentum: Momentum at the lr peak, a number or one per group, in
            ``[0, 1)``. Used only with ``cycle_momentum=True``. Default: ``0.8``
            (torch's ``CyclicLR`` default).
        max_momentum: Momentum at the cycle start, ``>= base_momentum``, in
            ``[0, 1)``. Default: ``0.9`` (torch's ``CyclicLR`` default).

    Raises:
        TypeError: If ``optimizer`` is not a ``torch.optim.Optimizer``, is
            itself a ``CyclicLRWrapper``, or an argument has the wrong type.
        ValueError: If an argument is out of range, ``base_lr > max_lr``,
            ``mode`` is unknown, a per-group list has the wrong length,
            ``cycle_momentum=True`` and the optimizer has neither ``momentum``
            nor ``betas``, or ``optimizer`` holds a parameter twice.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> inner = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> opt = CyclicLRWrapper(inner, base_lr=0.1, max_lr=0.5, step_size_up=2)
        >>> lrs = []
        >>> for _ in range(4):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     opt.step()
        ...     lrs.append(round(opt.param_groups[0]["lr"], 6))
        >>> lrs
        [0.3, 0.5, 0.3, 0.1]
        >>> opt.param_groups[0]["momentum"]  # untouched
        0
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float | Sequence[float],
        max_lr: float | Sequence[float],
        step_size_up: int,
        step_size_down: int | None = None,
        mode: Mode = "triangular",
        gamma: float = 1.0,
        *,
        cycle_momentum: bool = False,
        base_momentum: float | Sequence[float] = 0.8,
        max_momentum: float | Sequence[float] = 0.9,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "`optimizer` must be a torch.optim.Optimizer; got "
                f"{type(optimizer).__name__}."
            )
        if isinstance(optimizer, CyclicLRWrapper):
            raise TypeError(
                "`optimizer` is already a CyclicLRWrapper: two wrappers would write "
                "the same param groups' lr and schedule position. Wrap the inner "
                "optimizer once: keep using the existing wrapper, or build the new "
                "one on its `.optimizer` instead (it then starts again at step 0)."
            )
        step_size_up, step_size_down, mode, gamma = _check_schedule(
            step_size_up, step_size_down, mode, gamma
        )
        for i, group in enumerate(optimizer.param_groups):
            check_param_group(group, optimizer.param_groups[:i], name="optimizer")
        n_groups = len(optimizer.param_groups)
        base_lrs = _per_group("base_lr", base_lr, n_groups)
        max_lrs = _per_group("max_lr", max_lr, n_groups)
        for i, (lo, hi) in enumerate(zip(base_lrs, max_lrs, strict=True)):
            _check_order(f"base_lr[{i}]", lo, f"max_lr[{i}]", hi)
        if not isinstance(cycle_momentum, bool):
            raise TypeError(
                f"`cycle_momentum` must be a bool; got {type(cycle_momentum).__name__}."
            )
        momentum_key = None
        if cycle_momentum:
            defaults = optimizer.defaults
            if "betas" in defaults:
                momentum_key = "betas"
            elif "momentum" in defaults:
                momentum_key = "momentum"
            else:
                raise ValueError(
                    "`cycle_momentum=True` needs an optimizer with a `momentum` or "
                    f"`betas` hyperparameter; {type(optimizer).__name__} has "
                    "neither. Pass cycle_momentum=False (the default)."
                )
            base_ms = _per_group("base_momentum", base_momentum, n_groups, lt=1)
            max_ms = _per_group("max_momentum", max_momentum, n_groups, lt=1)
            for i, (lo, hi) in enumerate(zip(base_ms, max_ms, strict=True)):
                _check_order(f"base_momentum[{i}]", lo, f"max_momentum[{i}]", hi)

        # step post-hooks run inside step(), before the next step's lr is
        # written, so that they see the lr the step used (see step())
        self._cyclic_post_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()
        self.optimizer = optimizer
        self.mode = mode
        self.step_size_up = step_size_up
        self.step_size_down = step_size_down
        self.gamma = gamma
        self.cycle_momentum = cycle_momentum
        self._momentum_key = momentum_key
        self._base_lr_arg = base_lr
        self._max_lr_arg = max_lr
        self._base_momentum_arg = base_momentum
        self._max_momentum_arg = max_momentum

        # Optimizer.__init__ sets up the hook dicts and patches ``step`` so that
        # step hooks fire. It also assigns ``defaults``/``state``/``param_groups``
        # and re-adds the groups; run it unlinked, on copies of the inner groups,
        # so it cannot touch the inner optimizer. Linking happens afterwards.
        self._linked = False
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        for key in ("_unlinked_state", "_unlinked_param_groups", "_unlinked_defaults"):
            self.__dict__.pop(key, None)
        self._linked = True

        for i, group in enumerate(optimizer.param_groups):
            group[_STEP_KEY] = 0
            group[_BASE_KEY] = base_lrs[i]
            group[_MAX_KEY] = max_lrs[i]
            if cycle_momentum:
                group[_BASE_MOMENTUM_KEY] = base_ms[i]
                group[_MAX_MOMENTUM_KEY] = max_ms[i]
        self._apply_schedule()
        self._note_groups()

    # -- sharing with the inner optimizer ----------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's param groups (the same list object)."""
        if self.__dict__.get("_linked", False):
            return self.optimizer.param_groups
        return self.__dict__["_unlinked_param_groups"]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self.__dict__.get("_linked", False):
            self.optimizer.param_groups = value
        else:
            self.__dict__["_unlinked_param_groups"] = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's per-parameter state (the same object)."""
        if self.__dict__.get("_linked", False):
            return self.optimizer.state
        return self.__dict__["_unlinked_state"]

    @state.setter
    def state(self, value: Any) -> None:
        if self.__dict__.get("_linked", False):
            self.optimizer.state = value
        else:
            self.__dict__["_unlinked_state"] = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's defaults (the same dict)."""
        if self.__dict__.get("_linked", False):
            return self.optimizer.defaults
        return self.__dict__["_unlinked_defaults"]

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if self.__dict__.get("_linked", False):
            self.optimizer.defaults = value
        else:
            self.__dict__["_unlinked_defaults"] = value

    def __getstate__(self) -> dict[str, Any]:
        """Return the picklable state (everything but the hook dicts).

        Returns:
            The instance dict without the hook dicts, which may hold lambdas.
        """
        return {k: v for k, v in self.__dict__.items() if k not in _HOOK_ATTRS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled wrapper; hooks come back empty.

        Args:
            state: As returned by :meth:`__getstate__`.
        """
        super().__setstate__(state)
        self.__dict__.setdefault("_cyclic_post_hooks", OrderedDict())
        self.__dict__.setdefault("_group_keys", [])

    def __setattr__(self, name: str, value: Any) -> None:
        # A torch LRScheduler built on the wrapper replaces the instance's
        # ``step`` with one marked ``_wrapped_by_lr_sched``; its lr would be
        # overwritten by the cyclic schedule before every step, so refuse it.
        if name == "step" and getattr(value, "_wrapped_by_lr_sched", False):
            self._forget_scheduler_writes()
            raise TypeError(
                "a torch.optim.lr_scheduler cannot take a CyclicLRWrapper as its "
                "`optimizer`: the "
                "wrapper writes the cyclic lr before every step, so the "
                "scheduler's lr would be silently ignored. Use one schedule: the "
                "wrapper alone, or `wrapper.optimizer` with `wrapper.as_scheduler()`"
                ", or a torch scheduler on the inner optimizer without the wrapper."
            )
        super().__setattr__(name, value)

    def _note_groups(self) -> None:
        # the groups' hyperparameters now: a refused scheduler writes keys
        # (``initial_lr``; OneCycleLR also ``max_lr``, ``momentum``, ...) before it
        # is refused (see __setattr__), and those writes are undone
        self._group_keys = [
            {k: v for k, v in g.items() if k != "params"}
            for g in self.optimizer.param_groups
        ]

    def _check_lr_unchanged(self) -> None:
        # Something else wrote a group's lr since the wrapper's last write: a
        # ReduceLROnPlateau on the wrapper, a torch scheduler on the inner
        # optimizer, a manual change. The cyclic lr would silently replace it.
        # (A tensor lr is written in place and cannot be told apart.)
        noted = self.__dict__.get("_group_keys", [])
        for i, (group, keys) in enumerate(
            zip(self.optimizer.param_groups, noted, strict=False)
        ):
            was, now = keys.get("lr"), group.get("lr")
            if was is None or isinstance(was, torch.Tensor):
                continue
            if isinstance(now, torch.Tensor) or now != was:
                raise RuntimeError(
                    f"param_groups[{i}]['lr'] was changed to {now!r} outside the "
                    f"CyclicLRWrapper (it wrote {was!r}): a torch lr scheduler on "
                    "the wrapper or on `wrapper.optimizer` (e.g. ReduceLROnPlateau), "
                    "or a manual change, would be overwritten by the cyclic schedule "
                    "before this step. Use one schedule: the wrapper alone, or "
                    "`wrapper.optimizer` with `wrapper.as_scheduler()`, or a torch "
                    "scheduler without the wrapper. Nothing was stepped."
                )

    def _forget_scheduler_writes(self) -> None:
        noted = self.__dict__.get("_group_keys", [])
        for group, keys in zip(self.optimizer.param_groups, noted, strict=False):
            for k in [k for k in group if k != "params" and k not in keys]:
                del group[k]
            for k, v in keys.items():
                if not isinstance(v, torch.Tensor):
                    group[k] = v
        self._apply_schedule()  # a tensor lr is rewritten in place

    def register_step_post_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Register a hook called after each step, while the lr is the step's.

        Unlike a plain optimizer's, the hook runs inside :meth:`step`, after the
        inner step and before the wrapper writes the next step's lr, so
        ``param_groups[g]["lr"]`` is the lr the step used (what an attached
        :class:`~geoopt_sgd.NoiseProbe` records).

        Args:
            hook: Called as ``hook(optimizer, args, kwargs)``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._cyclic_post_hooks)
        self._cyclic_post_hooks[handle.id] = hook
        return handle

    def __repr__(self) -> str:
        """Return the schedule and the inner optimizer's repr.

        Returns:
            A multi-line description.
        """
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"{type(self).__name__} (\n"
            f"    mode: {self.mode}\n"
            f"    step_size_up: {self.step_size_up}\n"
            f"    step_size_down: {self.step_size_down}\n"
            f"    gamma: {self.gamma}\n"
            f"    cycle_momentum: {self.cycle_momentum}\n"
            f"    last_step: {self.last_step}\n"
            f"    optimizer: {inner}\n"
            ")"
        )

    # -- the schedule ------------------------------------------------------------

    @property
    def last_step(self) -> int:
        """Number of steps taken so far (the index of the next step)."""
        return next((int(g[_STEP_KEY]) for g in self.param_groups if _STEP_KEY in g), 0)

    def lr_at(self, step: int) -> list[float]:
        """Return the learning rate of every param group at step ``step``.

        Args:
            step: The step (>= 0).

        Returns:
            One float per param group.

        Raises:
            TypeError: If ``step`` is not an int.
            ValueError: If ``step`` is negative, or a group added to the inner
                optimizer directly cannot join the schedule (see :meth:`step`).
        """
        check_int("step", step, ge=0)
        self._adopt_new_groups()
        return [self._value(step, g[_BASE_KEY], g[_MAX_KEY]) for g in self.param_groups]

    def _value(self, step: int, low: float, high: float) -> float:
        return _schedule_value(
            step,
            low,
            high,
            self.step_size_up,
            self.step_size_down,
            self.mode,
            self.gamma,
        )

    @torch._disable_dynamo
    def _apply_schedule(self, groups: list[dict[str, Any]] | None = None) -> None:
        # Eager on purpose: the schedule is Python float arithmetic on int counters,
        # which a compiled step would guard on (and recompile for) every step.
        for group in self.param_groups if groups is None else groups:
            t = int(group[_STEP_KEY])
            _write_value(group, "lr", self._value(t, group[_BASE_KEY], group[_MAX_KEY]))
            self._write_momentum(group, t)

    def _write_momentum(self, group: dict[str, Any], t: int) -> None:
        if not self.cycle_momentum:
            return
        # inverse cycle: max_momentum at base_lr, base_momentum at max_lr, with
        # torch CyclicLR's arithmetic (the two bounds swapped)
        m = self._value(t, group[_MAX_MOMENTUM_KEY], group[_BASE_MOMENTUM_KEY])
        if self._momentum_key == "betas":
            group["betas"] = (m, *group["betas"][1:])
        else:
            _write_value(group, "momentum", m)

    @torch._disable_dynamo
    def _advance(self) -> None:
        for group in self.param_groups:
            group[_STEP_KEY] = int(group[_STEP_KEY]) + 1

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Set each group's lr for this step, then step the inner optimizer once.

        Args:
            closure: Optional closure that re-evaluates the model and returns the
                loss; forwarded to the inner optimizer, which calls it once.
            **kwargs: Forwarded to the inner optimizer's ``step``.

        Returns:
            Whatever the inner optimizer's ``step`` returns (the closure's loss,
            or ``None``).

        Raises:
            RuntimeError: If a group's lr was written from outside the wrapper
                since its last step (nothing is stepped).
            ValueError: If a group added to the inner optimizer directly cannot
                join the schedule: it has no ``cyclic_base_lr``/``cyclic_max_lr``
                while the wrapper's bounds are per group, or they are out of
                order, or it repeats a parameter (nothing is changed).
        """
        self._check_lr_unchanged()
        self._adopt_new_groups()
        self._apply_schedule()
        if closure is None:
            loss = self.optimizer.step(**kwargs)
        else:
            loss = self.optimizer.step(closure, **kwargs)
        self._advance()
        args = () if closure is None else (closure,)
        for hook in list(self._cyclic_post_hooks.values()):
            hook(self, (self, *args), kwargs)
        self._apply_schedule()
        self._note_groups()
        return loss

    # -- delegation ----------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the inner optimizer's ``zero_grad``.

        Args:
            set_to_none: Set gradients to ``None`` instead of zeroing them.
        """
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _schedule_keys(self, group: dict[str, Any]) -> dict[str, Any]:
        # the bounds of a group joining the schedule: its own ``cyclic_*`` keys,
        # else the constructor's scalars; checked, nothing written
        keys = {k: v for k, v in group.items() if k.startswith("cyclic_")}
        for key, arg, name in (
            (_BASE_KEY, self._base_lr_arg, "base_lr"),
            (_MAX_KEY, self._max_lr_arg, "max_lr"),
            (_BASE_MOMENTUM_KEY, self._base_momentum_arg, "base_momentum"),
            (_MAX_MOMENTUM_KEY, self._max_momentum_arg, "max_momentum"),
        ):
            if (
                key in (_BASE_MOMENTUM_KEY, _MAX_MOMENTUM_KEY)
                and not self.cycle_momentum
            ):
                continue
            if key not in keys:
                if isinstance(arg, (list, tuple)):
                    raise ValueError(
                        f"the new param group needs a `{key}` key: `{name}` was "
                        "given per group, so there is no default for new groups."
                    )
                keys[key] = arg
            lt = 1 if "momentum" in name else None
            keys[key] = _per_group(key, keys[key], 1, lt=lt)[0]
        _check_order(_BASE_KEY, keys[_BASE_KEY], _MAX_KEY, keys[_MAX_KEY])
        if self.cycle_momentum:
            _check_order(
                _BASE_MOMENTUM_KEY,
                keys[_BASE_MOMENTUM_KEY],
                _MAX_MOMENTUM_KEY,
                keys[_MAX_MOMENTUM_KEY],
            )
        return keys

    @torch._disable_dynamo
    def _adopt_new_groups(self) -> None:
        # Groups added to the inner optimizer directly (Lightning's
        # BackboneFinetuning) have no ``cyclic_step``: put them on the schedule as
        # add_param_group would have, at the current position. All are checked
        # before any is changed.
        groups = self.param_groups
        new = [i for i, g in enumerate(groups) if _STEP_KEY not in g]
        if not new:
            return
        position = self.last_step
        keys = []
        for i in new:
            try:
                check_param_group(groups[i], groups[:i])
                keys.append(self._schedule_keys(groups[i]))
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"param_groups[{i}] was added to `wrapper.optimizer` directly, "
                    "not with `wrapper.add_param_group`, and cannot join the "
                    f"schedule: {err} Fix that group (e.g. set its `cyclic_*` "
                    "keys) and try again. Nothing was changed."
                ) from None
        for i, group_keys in zip(new, keys, strict=True):
            groups[i].update(group_keys)
            groups[i][_STEP_KEY] = position
        self._apply_schedule([groups[i] for i in new])
        # note the adopted groups' lr as written (only theirs: noting every
        # group here would hide another group's lr changed outside the wrapper)
        noted = self.__dict__.get("_group_keys")
        if noted is not None:
            for i in new:
                keys = {k: v for k, v in groups[i].items() if k != "params"}
                if i < len(noted):
                    noted[i] = keys
                else:
                    noted.append(keys)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer and put it on the schedule.

        The group's bounds are its ``cyclic_base_lr``/``cyclic_max_lr`` keys if
        given, else the wrapper's scalar ``base_lr``/``max_lr``. It joins the
        schedule at the current step.

        Args:
            param_group: The group, as for ``torch.optim.Optimizer.add_param_group``.

        Raises:
            ValueError: If the bounds are missing (the wrapper was built with
                per-group lists) or out of order, or a parameter is repeated or
                already in a group.
        """
        if not self.__dict__.get("_linked", False):
            # called by Optimizer.__init__ on the unlinked copies
            super().add_param_group(param_group)
            return
        self._adopt_new_groups()
        group = dict(param_group)
        check_param_group(group, self.param_groups)
        group.update(self._schedule_keys(group))
        group[_STEP_KEY] = self.last_step
        self.optimizer.add_param_group(group)
        self._apply_schedule()
        self._note_groups()

    def state_dict(self) -> dict[str, Any]:
        """Return the inner optimizer's state dict, schedule position included.

        The wrapper's keys are in the param groups (``cyclic_*``), so the result
        is a plain optimizer state dict that loads under
        ``torch.load(weights_only=True)``. The wrapper's own state-dict hooks run
        around the inner ``state_dict()``.

        Returns:
            The state dict.
        """
        self._adopt_new_groups()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict into the inner optimizer, schedule position included.

        A state dict without ``cyclic_*`` keys (a plain optimizer checkpoint)
        keeps the wrapper's current bounds and position. The lr is set for the
        next step.

        Args:
            state_dict: A dict returned by :meth:`state_dict` (or by the inner
                optimizer's ``state_dict``).

        Raises:
            TypeError: If ``state_dict`` is not a dict.
            ValueError: If it is not an optimizer state dict.
        """
        check_state_dict("state_dict", state_dict)
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._adopt_new_groups()
        own = [
            {k: v for k, v in g.items() if k.startswith("cyclic_")}
            for g in self.param_groups
        ]
        self.optimizer.load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, own, strict=True):
            for k, v in keys.items():
                group.setdefault(k, v)
        self._apply_schedule()
        self._note_groups()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def as_scheduler(self) -> LRScheduler:
        """Return an ``LRScheduler`` driving the inner optimizer on this schedule.

        For frameworks that step an optimizer and a scheduler separately: use
        ``wrapper.optimizer`` as the optimizer and call the scheduler's
        ``step()`` once after each optimizer step. The learning rates are the
        wrapper's (``cyclic_lr(t)`` at step ``t``), starting from the wrapper's
        current position, and the position is kept in the groups' ``cyclic_step``
        so the optimizer's state dict still records it. Do not call the wrapper's
        own :meth:`step` as well.

        Returns:
            A ``torch.optim.lr_scheduler.LRScheduler``.
        """
        self._adopt_new_groups()
        hook = self._adopt_new_groups_hook
        if hook not in self.optimizer._optimizer_step_pre_hooks.values():
            # groups added to the optimizer directly join before its next step
            self.optimizer.register_step_pre_hook(hook)
        if hook not in self.optimizer._optimizer_state_dict_pre_hooks.values():
            self.optimizer.register_state_dict_pre_hook(hook)
        scheduler = _CyclicLRScheduler(self)
        self._note_groups()
        return scheduler

    def _adopt_new_groups_hook(self, *args: Any) -> None:
        self._adopt_new_groups()


class _CyclicLRScheduler(LRScheduler):
    """LRScheduler view of a :class:`CyclicLRWrapper`'s schedule."""

    def __init__(self, wrapper: CyclicLRWrapper) -> None:
        self._wrapper = wrapper
        self._offset = wrapper.last_step
        super().__init__(wrapper.optimizer, last_epoch=-1)

    def get_lr(self) -> list[float | torch.Tensor]:
        """Return the lrs of the step after ``last_epoch`` optimizer steps.

        Returns:
            One float per param group.
        """
        t = self._offset + self.last_epoch
        self._wrapper._adopt_new_groups()
        lrs: list[float | torch.Tensor] = []
        for group in self.optimizer.param_groups:
            group[_STEP_KEY] = t
            self._wrapper._write_momentum(group, t)
            lrs.append(self._wrapper._value(t, group[_BASE_KEY], group[_MAX_KEY]))
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler state, without the optimizer or the wrapper.

        Returns:
            The state dict.
        """
        return {
            k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_wrapper")
        }
