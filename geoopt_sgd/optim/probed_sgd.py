r"""ProbedSGD: :class:`torch.optim.SGD`, plus a noise-geometry probe on a schedule.

``ProbedSGD`` *is* a :class:`torch.optim.SGD` (a subclass that does not override
``step``), so with or without a probe its trajectory is bit-for-bit the one of
``torch.optim.SGD`` with the same arguments: the same defaults and validation,
the same ``momentum_buffer`` state key (checkpoints load in both directions), the
same foreach / fused / single-tensor kernels, tensor learning rates,
``differentiable``, hooks and schedulers. The only addition is ``probe=``, a
:class:`~geoopt_sgd.NoiseProbe` that is attached as a step post-hook and observes
the run without changing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .._checks import (
    check_int,
    check_param_group,
    check_state_dict,
    integer_value,
)

__all__ = ["ProbedSGD"]


class ProbedSGD(torch.optim.SGD):
    r"""Stochastic gradient descent (exactly :class:`torch.optim.SGD`) with a probe.

    The update is torch's, with gradient :math:`g_t`, learning rate :math:`\eta`,
    momentum :math:`\mu`, dampening :math:`\tau` and weight decay :math:`\lambda`:

    .. math::

        g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
        b_t &\leftarrow \begin{cases} g_t & t = 1 \\
            \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases} \\
        g_t &\leftarrow g_t + \mu b_t \ \text{(Nesterov)}, \quad
            g_t \leftarrow b_t \ \text{(otherwise, when } \mu \neq 0) \\
        \theta_t &\leftarrow \theta_{t-1} \mp \eta g_t
            \quad (- \text{ to minimise}, + \text{ with } \texttt{maximize})

    .. note::
        As in torch, momentum multiplies the *buffer* and the learning rate
        multiplies the whole step (Sutskever et al. put :math:`\eta` inside the
        velocity). The two agree for a constant learning rate.

    Checkpoints: ``state_dict()`` is ``torch.optim.SGD``'s, plus, when a probe
    is attached, a ``"probe"`` entry holding the probe's integer counters (its
    step count and number of probes), so a resumed run keeps the probe schedule.
    ``torch.optim.SGD.load_state_dict`` ignores that entry, and a plain SGD
    checkpoint loads here unchanged. The probe's warm-start eigenvectors (``k``
    times the model's size) are not part of the optimizer checkpoint; save
    :meth:`NoiseProbe.state_dict` separately to keep them. Copies
    (``copy.deepcopy``, pickling) carry no probe. Validation errors are torch's
    own messages, unchanged, so code that matches on them keeps working, with
    one exception: a parameter listed twice is a ``ValueError`` naming
    ``params`` (torch only warns within a group, and would update it twice).

    Args:
        params: Iterable of parameters, of ``(name, parameter)`` pairs, or of
            param-group dicts, as for any torch optimizer.
        lr: Learning rate, a float or a one-element tensor. Default: ``1e-3``.
        momentum: Momentum factor. Default: ``0``.
        dampening: Dampening for momentum. Default: ``0``.
        weight_decay: L2 penalty. Default: ``0``.
        nesterov: Use Nesterov momentum. Default: ``False``.
        maximize: Maximise the objective instead of minimising it.
        foreach: Use the multi-tensor kernel (``None``: torch's choice).
        differentiable: Let autograd differentiate through the step.
        fused: Use the fused kernel (``None``: torch's choice).
        probe: A :class:`~geoopt_sgd.NoiseProbe` to attach, or ``None``. It runs
            after every ``probe.every``-th step and never changes the trajectory
            (parameters, ``.grad``, optimizer state, global RNG, BatchNorm
            statistics).

    Raises:
        ValueError: For the invalid values ``torch.optim.SGD`` rejects (negative
            ``lr``, ``momentum`` or ``weight_decay``; Nesterov without momentum or
            with dampening), with torch's messages; and for a parameter that
            appears twice, in one group or across groups.
        TypeError: If ``probe`` is neither a NoiseProbe nor ``None``.
        RuntimeError: For ``fused`` combined with ``foreach`` or
            ``differentiable`` (torch's messages), or when ``probe`` is already
            attached to another optimizer.

    Example:
        >>> import torch
        >>> from geoopt_sgd import ProbedSGD
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = ProbedSGD([w], lr=0.5, momentum=0.9)
        >>> w.grad = torch.tensor([1.0, 1.0])
        >>> opt.step()
        >>> w.data
        tensor([ 0.5000, -2.5000])

    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        probe: Any = None,
    ) -> None:
        if probe is not None and not callable(getattr(probe, "attach", None)):
            raise TypeError(
                f"`probe` must be a NoiseProbe or None; got {type(probe).__name__}."
            )
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._probe = None
        if probe is not None:
            probe.attach(self)
            self._probe = probe

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as torch does, rejecting repeated parameters.

        Args:
            param_group: As for :meth:`torch.optim.Optimizer.add_param_group`.

        Raises:
            ValueError: If a parameter is listed twice in the group (torch only
                warns, then updates it twice per step) or is already in another
                group (torch raises too, without naming ``params``).
        """
        check_param_group(param_group, self.param_groups)
        super().add_param_group(param_group)

    @property
    def probe(self) -> Any:
        """The attached :class:`~geoopt_sgd.NoiseProbe`, or ``None``."""
        return self.__dict__.get("_probe")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Unpickled / deep-copied optimizers carry no probe (Optimizer.__getstate__
        # keeps only defaults, state and groups); load_state_dict keeps the probe.
        self.__dict__.setdefault("_probe", None)

    def state_dict(self) -> dict[str, Any]:
        """Return torch's SGD state dict, plus the probe's counters if attached.

        Returns:
            The dict of :meth:`torch.optim.Optimizer.state_dict`, with an extra
            ``"probe"`` entry (plain integers) when a probe is attached.
        """
        sd = super().state_dict()
        if self.probe is not None:
            sd["probe"] = self.probe.state_dict(include_eigenvectors=False)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an SGD (or ProbedSGD) state dict; restore the probe's counters.

        Args:
            state_dict: As returned by :meth:`state_dict` here or by
                ``torch.optim.SGD.state_dict``.

        Raises:
            TypeError: If ``state_dict`` is not a dict.
            ValueError: If it is not an optimizer state dict, or its ``"probe"``
                entry lacks the counters or holds a negative one (checked before
                anything is loaded).
        """
        check_state_dict("state_dict", state_dict)
        probe_state = state_dict.get("probe")
        if probe_state is not None and self.probe is not None:
            if not isinstance(probe_state, dict) or not all(
                k in probe_state for k in ("step_count", "num_probes")
            ):
                raise ValueError(
                    "`state_dict['probe']` must hold the probe's 'step_count' and "
                    "'num_probes'; pass a dict returned by ProbedSGD.state_dict()."
                )
            for key in ("step_count", "num_probes"):
                # the probe checks them too, but only after the optimizer loaded
                check_int(
                    f"state_dict['probe'][{key!r}]",
                    integer_value(probe_state[key]),
                    ge=0,
                )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "probe"})
        if probe_state is not None and self.probe is not None:
            self.probe.load_state_dict(probe_state)
