"""NoiseProbe: measure a run's noise geometry on a schedule, as a pure observer.

A :class:`NoiseProbe` attaches to any :class:`torch.optim.Optimizer` through
:meth:`~torch.optim.Optimizer.register_step_post_hook`. After every ``every``-th
optimizer step it calls :func:`~geoopt_sgd.noise_geometry` on its own fixed probe
batch, warm-starting the eigensolver from the previous probe's eigenvectors, and
sends one record per probe to its sinks. The training trajectory is unchanged,
bit for bit: see :class:`NoiseProbe` for how each piece of state is protected.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from .. import distributed
from .._checks import check_choice, check_int, integer_value
from .._losses import PerSampleLossError, check_per_sample_batches
from .._model import (
    FunctionalModel,
    UntransformableModelError,
    batch_size,
    detect_reduction,
    full_precision,
    local_batches,
    map_inputs,
    preserve_global_rng,
    to_device,
    unwrap_model,
)
from ..curvature.hvp import math_sdpa
from . import metrics as _metrics
from .metrics import DEFAULT_METRICS, METRICS, noise_geometry
from .primitives import per_sample_loss, per_sample_loss_gradients

__all__ = ["NoiseProbe"]

# metrics undefined by construction with one eigenpair (a fit, a rank correlation)
_NEED_TWO_EIGENPAIRS = ("power_law_exponent", "power_law_r2", "spearman")
# noise_geometry's own arguments, set by NoiseProbe itself rather than forwarded
_RESERVED = ("model", "loss_fn", "data", "metrics", "k", "v0", "seed")


def _to_json_value(x: Any) -> Any:
    """Convert tensors and non-finite floats to plain, JSON-ready values."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.item() if x.numel() == 1 and x.dim() == 0 else x.tolist()
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else math.nan
    if isinstance(x, dict):
        return {str(k): _to_json_value(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_json_value(v) for v in x]
    try:
        return _to_json_value(float(x))
    except (TypeError, ValueError):
        return str(x)


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _scalars(record: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, float]]:
    """Yield ``(tag, value)`` for every number in ``record``, lists as ``tag/i``."""
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, (int, float)):
            yield tag, float(value)
        elif isinstance(value, dict):
            yield from _scalars(value, prefix=f"{tag}/")
        elif isinstance(value, list):
            yield from _scalars({str(i): v for i, v in enumerate(value)}, f"{tag}/")


def _count_nonfinite(values: Any) -> int:
    if isinstance(values, float):
        return 0 if math.isfinite(values) else 1
    if isinstance(values, dict):
        return sum(_count_nonfinite(v) for v in values.values())
    if isinstance(values, list):
        return sum(_count_nonfinite(v) for v in values)
    return 0


def _check_sinks(sinks: Any) -> tuple[list[str], list[Any]]:
    """Split ``sinks`` into JSON-lines paths (parent folders created) and writers."""
    if isinstance(sinks, (str, os.PathLike)):
        sinks = [sinks]  # one path, not a sequence of one-letter paths
    elif not isinstance(sinks, Iterable) or isinstance(sinks, (bytes, dict)):
        raise TypeError(
            "`sinks` must be a path or a sequence of paths and writers with "
            f"add_scalar; got {type(sinks).__name__}."
        )
    paths: list[str] = []
    writers: list[Any] = []
    for sink in sinks:
        if isinstance(sink, (str, os.PathLike)):
            path = os.fspath(sink)
            if not isinstance(path, str) or not path:
                raise ValueError(f"`sinks`: {sink!r} is not a usable file path.")
            if os.path.isdir(path):
                raise ValueError(
                    f"`sinks`: {path!r} is a directory; give a file path such as "
                    f"{os.path.join(path, 'noise.jsonl')!r}."
                )
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise ValueError(
                    f"`sinks`: cannot create the folder {parent!r} of {path!r}: {exc}"
                ) from exc
            paths.append(path)
        elif callable(getattr(sink, "add_scalar", None)):
            writers.append(sink)
        else:
            raise ValueError(
                "each sink must be a path (str or os.PathLike) for a JSON-lines "
                "file or a writer with add_scalar(tag, value, step) such as a "
                f"TensorBoard SummaryWriter; got {type(sink).__name__} in `sinks`."
            )
    return paths, writers


def _check_transformable(
    model: Any,
    loss_fn: Any,
    head: Iterable[Any],
    options: dict[str, Any],
    n: int | None = None,
) -> None:
    """Refuse now a model whose forward torch.func cannot transform.

    Every probe runs the model under transforms; a packed sequence, ``.item()``
    control flow or a random draw in ``forward`` would make the first probe
    raise inside the user's training loop. The per-sample gradients
    (``vmap(grad)``, the exact route) of the first (at most two) samples of the
    first batch show it now, with the global RNG restored. Unless
    ``route="exact"``, a refusal there is confirmed on the sketch route's
    transforms of the batch forward (a ``vjp`` and a vmapped ``jvp``), which run
    ``.item()`` on activations: a model that fails only under ``vmap`` over
    samples is refused where ``route="auto"`` would pick the exact route for
    the probe's ``n`` samples (known for a list of batches; ``None``, for a
    loader, leaves it to the first probe). Any other failure is left to the
    first probe, which reports it as before.
    """
    first = next((b for b in head if batch_size(b[1]) > 0), None)
    if first is None:
        return
    inputs, targets = first
    m = min(2, batch_size(targets))
    fm = FunctionalModel(model, options.get("params"), mode=options.get("mode", "eval"))
    inputs = to_device(map_inputs(inputs, lambda t: t[:m]), fm.device)
    targets = to_device(targets[:m], fm.device)
    try:
        with preserve_global_rng(), torch.enable_grad():
            per_sample_loss_gradients(fm, per_sample_loss(loss_fn), inputs, targets)
    except UntransformableModelError:
        # the sketch route transforms only the batch forward (a vjp and a
        # vmapped jvp): `.item()` on activations runs there, so refuse such a
        # model only where the first probe would
        route = options.get("route", "auto")
        if (
            route == "exact"
            or not _batch_forward_runs(fm, inputs)
            or (route == "auto" and n is not None and _auto_exact(fm, inputs, n))
        ):
            raise
    except Exception:  # the first probe reports it
        return


def _auto_exact(fm: FunctionalModel, inputs: Any, n: int) -> bool:
    """Whether ``route="auto"`` takes the exact route for ``n`` such samples."""
    try:
        with preserve_global_rng(), torch.no_grad(), fm.policy(), math_sdpa():
            out = fm([p.detach() for p in fm.params], inputs)
    except Exception:  # the first probe reports it
        return False
    if not isinstance(out, Tensor):
        return False  # the first probe reports it
    K = out[0].numel() if out.dim() else 1
    return _metrics.auto_picks_exact(n, K, sum(p.numel() for p in fm.params))


def _batch_forward_runs(fm: FunctionalModel, inputs: Any) -> bool:
    """Whether the sketch route's transforms of the batch forward run."""
    params = [p.detach() for p in fm.params]

    def out(p: list[Tensor]) -> Tensor:
        return fm(p, inputs)

    try:
        with preserve_global_rng(), torch.enable_grad(), fm.policy(), math_sdpa():
            o, f_vjp = vjp(out, params)
            f_vjp(torch.ones_like(o))
            tangents = [
                torch.ones((2, *p.shape), dtype=p.dtype, device=p.device)
                for p in params
            ]
            vmap(lambda t: jvp(out, (params,), (t,))[1])(tangents)
    except UntransformableModelError:
        return False
    except Exception:  # not the transforms' refusal: the first probe reports it
        return True
    return True


def _check_measurement(
    model: Any,
    loss_fn: Any,
    metrics: Sequence[str] | None,
    k: int,
    options: dict[str, Any],
) -> None:
    """Check at construction what the first probe would reject."""
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
    detect_reduction(loss_fn, None)  # the rule of sharpness and the operators
    try:
        sig = inspect.signature(_metrics.noise_geometry)
        defaults = {
            name: p.default
            for name, p in sig.parameters.items()
            if p.default is not p.empty
        }
    except (TypeError, ValueError):  # pragma: no cover - always a Python function
        defaults = {}
    args = {**defaults, **options}
    wanted = _metrics._wanted(metrics, args.get("displacement"))
    _metrics._check_arguments(
        wanted,
        k=k,
        **{
            name: args[name]
            for name in inspect.signature(_metrics._check_arguments).parameters
            if name not in ("wanted", "k")
        },
    )
    fm = FunctionalModel(model, args.get("params"), mode=args.get("mode", "eval"))
    if wanted & _metrics._EIGEN and k > fm.numel:
        raise ValueError(
            f"`k` must be <= P = {fm.numel} (the number of measured parameters); "
            f"got {k}."
        )
    if args.get("displacement") is not None:
        # the shape, type and finiteness checks of the first probe, done now
        _metrics._flatten_displacement(args["displacement"], fm)


def _check_sample_count(batches: list[Any], options: dict[str, Any]) -> int:
    """Refuse now a probe batch too small for the first probe's covariance.

    Without this, the first probe raised into the training loop at step
    ``every``. ``batches`` is the checked list of ``(inputs, targets)`` pairs.

    Returns:
        The samples a probe of ``batches`` takes (at most ``max_samples``).
    """
    max_samples = options.get(
        "max_samples",
        inspect.signature(_metrics.noise_geometry).parameters["max_samples"].default,
    )
    n = min(sum(batch_size(y) for _, y in batches), max_samples)
    if options.get("cov", "per_sample") == "minibatch":
        B, what = int(options["batch_size"]), f"batches of {options['batch_size']}"
    else:
        B, what = 1, "samples"
    if n // B < 2:
        raise ValueError(
            f"`probe_data` must hold at least 2 {what} for a covariance; got {n} "
            "samples."
        )
    return n


def _append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class NoiseProbe:
    """Measure the noise geometry of a training run every ``every`` optimizer steps.

    Attach it to any optimizer (``probe.attach(optimizer)``, or pass it to
    :class:`~geoopt_sgd.ProbedSGD` as ``probe=``). After step ``t`` with
    ``t % every == 0`` it runs
    ``noise_geometry(model, loss_fn, probe_data, metrics=metrics, k=k,
    v0=<previous eigenvectors>, seed=seed + <probe index>, **options)``
    and emits one record (a flat, JSON-ready dict):

    * ``step``: the optimizer step count ``t`` (steps seen since attaching, plus
      any restored by :meth:`load_state_dict`; steps that ``GradScaler`` skips
      never call the hook, so they are not counted);
    * ``lr``: the learning rate of param group 0, or a list when groups differ;
    * every entry of :meth:`NoiseGeometry.as_dict` (metric values by name, arrays
      such as ``eigenvalues`` as lists, ``cost_<counter>`` entries);
    * ``probe_seconds``: wall time of the probe.

    Sinks: the in-memory :attr:`history` (always); each item of ``sinks`` that is
    a path (``str`` or ``os.PathLike``) gets one JSON line appended per probe
    (non-finite values written as ``null``, so every line is strict JSON); each
    item with an ``add_scalar(tag, value, step)`` method (a TensorBoard
    ``SummaryWriter``, duck-typed) gets every number as ``<tag_prefix>/<name>``
    (list entries as ``<name>/<i>``) but ``step``, which is its ``step`` argument,
    and ``probe_seconds`` (the measurement's time is there as ``cost_seconds``);
    ``callback(record)`` is called last. Under
    ``torch.distributed`` every rank measures (the metrics reduce across ranks) and
    keeps the history; only rank 0 writes to ``sinks`` and calls ``callback``.
    A path's parent folders are created when the probe is built. A sink (or the
    callback) that raises while writing never stops training: the error is
    appended to :attr:`sink_errors`, one ``RuntimeWarning`` is issued per probe
    object, and the record stays in :attr:`history`.

    The trajectory is never changed: the global CPU RNG (and every CUDA device's
    RNG, if CUDA is initialised) is saved and restored around the probe; each
    parameter's ``.grad`` is set aside (``None`` during the probe) and put back as
    the same tensor object; every module's ``training`` flag and any buffer the
    measurement changed (BatchNorm running statistics, ``num_batches_tracked``) are
    restored; the optimizer's state is not read or written; the probe runs after
    ``step()`` returns, outside the step's autograd graph.

    Non-finite values never stop training: a metric that is NaN or infinite is
    recorded as NaN (an undefined ratio too, e.g. ``mu`` when the curvature is
    exactly zero on a saturated network), and a probe whose parameters are
    non-finite, or whose measurement raises while the probe loss or the
    parameters are non-finite, is recorded with every metric NaN. Every record
    carries ``n_nonfinite``, its number of NaN metrics. The first probe with a
    NaN metric issues a single ``RuntimeWarning`` per probe object, naming the
    metrics and the cause; :attr:`num_nonfinite` counts such probes. With
    ``k = 1``, ``power_law_exponent``, ``power_law_r2`` and ``spearman`` (a fit
    and a rank correlation over the eigenpairs) are undefined by construction:
    they are recorded as NaN (and in ``n_nonfinite``) without a warning. An
    exception raised on finite inputs (a genuine bug) propagates.

    Args:
        model: The trained model (DDP/DataParallel wrappers are unwrapped).
        loss_fn: The loss, as for :func:`~geoopt_sgd.noise_geometry`.
        probe_data: The fixed probe batch ``(inputs, targets)`` or a re-iterable of
            batches (under ``torch.distributed``: this rank's shard, possibly
            empty). Batch structure: :mod:`geoopt_sgd._model`; any other
            structure (e.g. a loader of dicts) through the option ``batch_fn`` of
            :func:`~geoopt_sgd.noise_geometry`. A loader's first batch is read
            here to check it (the global RNG restored).
        every: Probe after every ``every``-th optimizer step. Default: ``100``.
        metrics: Metric names (from ``geoopt_sgd.probes.metrics.METRICS``);
            ``None`` means the default, affordable set ``DEFAULT_METRICS``.
        k: Number of top curvature eigenpairs, at most the number of measured
            parameters. Default: ``10``.
        sinks: Paths of JSON-lines files and/or writers with ``add_scalar``; a
            single ``str`` or ``os.PathLike`` is one path.
        callback: Called with each record, after the other sinks.
        seed: Base seed of the measurement's private generator; probe ``j`` (from
            0) uses ``seed + j``. Default: ``0``.
        warm_start: Pass the previous probe's eigenvectors as ``v0``.
        tag_prefix: Prefix of the writers' tags. Default: ``"noise"``.
        **options: Further keyword arguments of
            :func:`~geoopt_sgd.noise_geometry` (``curvature``, ``cov``,
            ``batch_size``, ``max_samples``, ``params``, ``mode``, ``route``,
            ``num_probes``, ``tol``, ``chunk_size``, ``batch_fn``, ...).

    Attributes:
        history: The records, oldest first.
        step_count: Optimizer steps seen.
        num_probes: Probes run.
        num_nonfinite: Probes with at least one non-finite value.
        sink_errors: One line per failed sink write (``"step <t>: <sink>:
            <error>"``), oldest first.
        last_result: The last :class:`~geoopt_sgd.NoiseGeometry`, or ``None``.

    Raises:
        ValueError: If ``every < 1``, ``k < 1`` or ``k`` exceeds the number of
            measured parameters (when an eigenbasis metric is asked for),
            ``probe_data`` is empty, holds fewer than 2 samples (or batches of
            ``batch_size`` with ``cov="minibatch"``; checked here for a batch or
            a list of batches outside ``torch.distributed``, a loader at the
            first probe) or a batch's inputs and targets differ in length,
            ``model`` has no parameters, ``loss_fn``'s ``reduction`` is not
            ``"mean"`` or ``"sum"``, an option
            :func:`~geoopt_sgd.noise_geometry` would reject (``curvature``,
            ``cov``, ``route``, ...), a metric name is unknown (the message lists
            the valid ones),
            ``options`` names an argument that
            :func:`~geoopt_sgd.noise_geometry` does not take or one set here, a
            sink is neither a path nor a writer, a sink path is a directory or
            its folder cannot be created.
        TypeError: If ``every`` or ``k`` is not an integer, ``model`` is not a
            module, ``loss_fn`` is not callable, ``metrics`` is not a
            sequence of names, ``callback`` or ``batch_fn`` is not callable, or
            ``probe_data`` (after ``batch_fn``) is neither a batch nor a
            re-iterable of batches (one-shot iterators are
            refused: the first probe would exhaust them), or ``sinks`` is neither
            a path nor an iterable of sinks.
        RuntimeError: If the model's ``forward`` cannot run under
            ``torch.func``'s transforms (a packed sequence, ``.item()`` control
            flow, a random draw), found on the first two samples of the first
            batch with the global RNG restored. A model that fails only under
            ``vmap`` over samples (``.item()`` on activations, which the sketch
            route runs) is refused for ``route="exact"``, and for ``"auto"``
            where it would pick the exact route for the probe's samples (a
            batch or a list of batches; with a loader the first probe says so).

    Example:
        Three lines in an existing training loop::

            probe = NoiseProbe(model, loss_fn, (x_probe, y_probe), every=400,
                               sinks=["noise.jsonl"])
            probe.attach(optimizer)
            ...  # train as usual; probe.history fills up
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        probe_data: Any,
        *,
        every: int = 100,
        metrics: Sequence[str] | None = None,
        k: int = 10,
        sinks: Sequence[Any] | str | os.PathLike[str] = (),
        callback: Callable[[dict[str, Any]], Any] | None = None,
        seed: int = 0,
        warm_start: bool = True,
        tag_prefix: str = "noise",
        **options: Any,
    ) -> None:
        check_int("every", every, ge=1)
        check_int("k", k, ge=1)
        check_int("seed", seed, ge=0)
        if metrics is not None:
            if isinstance(metrics, str) or not isinstance(metrics, Iterable):
                raise TypeError(
                    "`metrics` must be a sequence of metric names or None; got "
                    f"{type(metrics).__name__}."
                )
            metrics = tuple(metrics)
            for name in metrics:
                check_choice("metrics", name, METRICS)
        if callback is not None and not callable(callback):
            raise TypeError(
                f"`callback` must be callable or None; got {type(callback).__name__}."
            )
        if isinstance(probe_data, Iterator):
            raise TypeError(
                "`probe_data` must be a batch or a re-iterable of batches (a list, a "
                "DataLoader); got a one-shot iterator, which the first probe would "
                "exhaust. Pass list(...) of it."
            )
        # an empty shard is refused only outside torch.distributed: there the
        # rank joins every reduction of noise_geometry with zeros (raising on
        # one rank alone would leave the others waiting)
        batches = local_batches(probe_data, options.get("batch_fn"))
        head = batches
        if not isinstance(batches, list):
            # check a loader's first batch now, not at the first probe; its
            # sampler may draw from the global RNG, which is restored
            with preserve_global_rng():
                head = list(itertools.islice(batches, 1))
        self._check_options(options)
        if isinstance(options.get("params"), Iterator):
            options["params"] = list(options["params"])  # read twice below
        _check_measurement(model, loss_fn, metrics, k, options)
        # one verdict on every rank (a refusal on one shard alone would hang)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        check_per_sample_batches(loss_fn, head, device=device)
        n = None
        if isinstance(batches, list) and not distributed.is_distributed():
            n = _check_sample_count(batches, options)
        _check_transformable(model, loss_fn, head, options, n)
        self.model = unwrap_model(model)
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.every = every
        self.metrics = metrics
        self.k = k
        self.seed = seed
        self.warm_start = bool(warm_start)
        self.tag_prefix = str(tag_prefix)
        self.options = dict(options)
        self.callback = callback
        self._paths, self._writers = _check_sinks(sinks)
        self.history: list[dict[str, Any]] = []
        self.sink_errors: list[str] = []
        self._sink_warned = False
        self.step_count = 0
        self.num_probes = 0
        self.num_nonfinite = 0
        self.last_result: Any = None
        self._v0: Tensor | None = None
        self._warned = False
        # at k = 1 the power-law fit and the rank correlation have one point
        self._undefined = frozenset(_NEED_TWO_EIGENPAIRS if k < 2 else ())
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: Any = None

    def _check_options(self, options: dict[str, Any]) -> None:
        reserved = sorted(set(options) & set(_RESERVED))
        if reserved:
            raise ValueError(
                f"`{reserved[0]}` is set by NoiseProbe itself and cannot be passed "
                "as an option."
            )
        try:
            sig = inspect.signature(noise_geometry)
        except (TypeError, ValueError):  # builtins without a signature
            return
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        accepted = [n for n in sig.parameters if n not in _RESERVED]
        for name in options:
            check_choice("option", name, accepted)

    # --- attaching ---------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> NoiseProbe:
        """Register the probe as a step post-hook of ``optimizer``.

        Args:
            optimizer: Any :class:`torch.optim.Optimizer` (or an object with
                ``register_step_post_hook`` and ``param_groups``, like a wrapper).

        Returns:
            The probe itself.

        Raises:
            RuntimeError: If the probe is already attached (call :meth:`detach`).
            TypeError: If ``optimizer`` has no ``register_step_post_hook``.
        """
        if self._handle is not None:
            raise RuntimeError(
                "this NoiseProbe is already attached to an optimizer; call "
                "probe.detach() first."
            )
        if not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise TypeError(
                "`optimizer` must be a torch.optim.Optimizer (with "
                f"register_step_post_hook); got {type(optimizer).__name__}."
            )
        self._handle = optimizer.register_step_post_hook(self._on_step)
        self._optimizer = optimizer
        return self

    def detach(self) -> None:
        """Remove the hook; the history and counters are kept."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._optimizer = None

    @property
    def attached(self) -> bool:
        """Whether the probe is registered on an optimizer."""
        return self._handle is not None

    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.step_count += 1
        if self.step_count % self.every == 0:
            self.measure(optimizer)

    # --- state -------------------------------------------------------------------
    def state_dict(self, include_eigenvectors: bool = True) -> dict[str, Any]:
        """Return the probe's position: counters and (optionally) the warm start.

        Args:
            include_eigenvectors: Include the ``(P, k)`` warm-start eigenvectors
                (``None`` before the first probe). :class:`~geoopt_sgd.ProbedSGD`
                leaves them out of its own checkpoint.

        Returns:
            ``{"step_count": int, "num_probes": int, "num_nonfinite": int}``, plus
            ``"eigenvectors"`` when asked; loadable with
            ``torch.load(weights_only=True)``.
        """
        sd: dict[str, Any] = {
            "step_count": self.step_count,
            "num_probes": self.num_probes,
            "num_nonfinite": self.num_nonfinite,
        }
        if include_eigenvectors:
            sd["eigenvectors"] = None if self._v0 is None else self._v0.clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters (and the warm start, when present).

        Args:
            state_dict: As returned by :meth:`state_dict`.

        Raises:
            ValueError: If a counter is missing or negative, or the eigenvectors
                do not have one row per measured parameter.
        """
        for key in ("step_count", "num_probes"):
            if key not in state_dict:
                raise ValueError(
                    f"`state_dict` has no {key!r} entry; pass a dict returned by "
                    "NoiseProbe.state_dict()."
                )
            check_int(f"state_dict['{key}']", integer_value(state_dict[key]), ge=0)
        v = state_dict.get("eigenvectors")
        if v is not None:
            # a warm start of another size would raise at the next probe,
            # inside the training loop
            P = FunctionalModel(
                self.model,
                self.options.get("params"),
                mode=self.options.get("mode", "eval"),
            ).numel
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != P:
                raise ValueError(
                    f"`state_dict['eigenvectors']` must be a ({P}, k) tensor for the "
                    f"{P} parameters this probe measures; got {shape}."
                )
        self.step_count = int(state_dict["step_count"])
        self.num_probes = int(state_dict["num_probes"])
        self.num_nonfinite = int(state_dict.get("num_nonfinite", 0))
        if "eigenvectors" in state_dict:
            v = state_dict["eigenvectors"]
            self._v0 = None if v is None else v.detach().clone()

    # --- measuring ---------------------------------------------------------------
    @full_precision
    def measure(self, optimizer: Any = None) -> dict[str, Any]:
        """Run one probe now, record it and send it to the sinks.

        Args:
            optimizer: Where to read the learning rate (default: the attached
                optimizer; ``lr`` is ``None`` without one).

        Returns:
            The record (also appended to :attr:`history`).
        """
        optimizer = optimizer if optimizer is not None else self._optimizer
        t0 = time.perf_counter()
        index = self.num_probes
        with _Protected(self.model):
            result = self._run(index)
        seconds = time.perf_counter() - t0
        self.num_probes += 1

        record: dict[str, Any] = {"step": self.step_count, "lr": _lr(optimizer)}
        if result is None:
            values: dict[str, Any] = {name: math.nan for name in self._names()}
            values["n_nonfinite"] = float(len(values))
            bad = list(values)
        else:
            values = _to_json_value(dict(result.as_dict()))
            if "n_nonfinite" not in values:
                values["n_nonfinite"] = float(_count_nonfinite(values))
            # metrics undefined by construction at this k are NaN, not a problem
            bad = [
                name
                for name, value in values.items()
                if _count_nonfinite(value) and name not in self._undefined
            ]
            vecs = result.eigenvectors
            if (
                self.warm_start
                and isinstance(vecs, Tensor)
                and bool(torch.isfinite(vecs).all())
            ):
                self._v0 = vecs.detach()
        self.last_result = result
        for key, value in values.items():
            if key not in ("step", "lr"):
                record[key] = value
        record["probe_seconds"] = seconds
        if bad:
            self.num_nonfinite += 1
            if not self._warned:
                self._warned = True
                warnings.warn(
                    _nonfinite_message(self.step_count, result is None, bad, values),
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.history.append(record)
        self._emit(record)
        return record

    def _names(self) -> tuple[str, ...]:
        if self.metrics is not None:
            return self.metrics
        return DEFAULT_METRICS

    def _run(self, index: int) -> Any:
        params = [p for p in self.model.parameters()]
        if not all(bool(torch.isfinite(p.detach()).all()) for p in params):
            return None
        kwargs = dict(self.options)
        kwargs.update(metrics=self.metrics, k=self.k, seed=self.seed + index)
        if self.warm_start and self._v0 is not None:
            kwargs["v0"] = self._v0
        try:
            with torch.enable_grad():
                return noise_geometry(
                    self.model, self.loss_fn, self.probe_data, **kwargs
                )
        except PerSampleLossError:
            # a loader batch of ignored targets only: its loss is NaN, but the
            # loss is refused, not diverged
            raise
        except Exception:
            if self._probe_loss_finite():
                raise
            return None

    def _probe_loss_finite(self) -> bool:
        """Whether the plain loss on the probe batch is finite (eval mode)."""
        fm = FunctionalModel(self.model, mode=self.options.get("mode", "eval"))
        with torch.no_grad(), fm.policy():
            batch_fn = self.options.get("batch_fn")
            for inputs, targets in local_batches(self.probe_data, batch_fn):
                if batch_size(targets) == 0:  # a NaN mean over no sample
                    continue
                # on the model's device, as noise_geometry reads the batches
                inputs = to_device(inputs, fm.device)
                targets = to_device(targets, fm.device)
                loss = self.loss_fn(fm(fm.params, inputs), targets)
                if not bool(torch.isfinite(loss).all()):
                    return False
        return True

    def _emit(self, record: dict[str, Any]) -> None:
        if distributed.rank() != 0:
            return
        if self._paths:
            line = json.dumps(_nan_to_none(record), allow_nan=False)
            for path in self._paths:
                self._write(path, lambda path=path: _append_line(path, line))
        if self._writers:
            step = record["step"]
            scalars = [
                (tag, value)
                for tag, value in _scalars(record)
                if tag not in ("step", "probe_seconds")
            ]
            for writer in self._writers:
                self._write(
                    type(writer).__name__,
                    lambda writer=writer: [
                        writer.add_scalar(f"{self.tag_prefix}/{tag}", value, step)
                        for tag, value in scalars
                    ],
                )
        if self.callback is not None:
            callback = self.callback
            self._write("callback", lambda: callback(record))

    def _write(self, sink: str, write: Callable[[], Any]) -> None:
        """Run one sink's write; a failure is recorded and warned once, not raised."""
        try:
            write()
        except Exception as exc:  # a sink must never stop training
            message = f"step {self.step_count}: {sink}: {type(exc).__name__}: {exc}"
            self.sink_errors.append(message)
            if not self._sink_warned:
                self._sink_warned = True
                warnings.warn(
                    f"NoiseProbe: a sink failed ({message}); the record is kept in "
                    "probe.history and training continues. Warned once; see "
                    "probe.sink_errors.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def __repr__(self) -> str:
        return (
            f"NoiseProbe(every={self.every}, k={self.k}, metrics={self.metrics!r}, "
            f"step_count={self.step_count}, num_probes={self.num_probes}, "
            f"attached={self.attached})"
        )


def _nonfinite_message(
    step: int, no_result: bool, bad: list[str], values: dict[str, Any]
) -> str:
    """The warning of the first probe with non-finite values: what and why."""
    if no_result:
        why = (
            "the parameters, or the probe loss or gradients, are not finite; "
            "every metric is recorded as NaN"
        )
    else:
        loss = values.get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            cause = (
                "the probe loss is finite, so these are undefined ratios: a zero "
                "denominator, e.g. a zero curvature or noise covariance on a "
                "saturated network"
            )
        else:
            cause = "NaN loss or infinite gradients on the probe batch"
        why = f"{', '.join(bad)} recorded as NaN ({cause})"
    return (
        f"NoiseProbe: non-finite values at step {step}: {why}; training continues. "
        "Warned once; see probe.num_nonfinite and each record's n_nonfinite."
    )


def _lr(optimizer: Any) -> float | list[float] | None:
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lrs = []
    for g in groups:
        lr = g.get("lr")
        lrs.append(float(lr) if lr is not None else math.nan)
    return lrs[0] if all(x == lrs[0] for x in lrs) else lrs


class _Protected:
    """Save and restore everything a probe must not change (see NoiseProbe)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> _Protected:
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        )
        self.params = list(self.model.parameters())
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        for m, flag in self.flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in self.buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
