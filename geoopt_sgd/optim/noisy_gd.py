r"""NoisyGD: gradient descent plus injected Gaussian noise.

A drop-in :class:`torch.optim.Optimizer`: the user computes a gradient
(full-batch or not), then calls :meth:`NoisyGD.step`, which adds noise ``ξ_t`` of
the chosen kind. Kinds that need curvature or gradient statistics take a
*curvature source* (``model``, ``loss_fn``, ``data``) and refresh their
statistics every ``refresh_every`` steps (eigensolves warm-started from the
previous eigenvectors and guard vectors); the cost is counted in :attr:`NoisyGD.stats`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import (
    check_choice,
    check_int,
    check_number,
    check_param_group,
    check_state_dict,
)
from .._losses import check_per_sample_batches
from .._model import detect_reduction, local_batches, preserve_global_rng
from . import noise as _noise
from ._functional import noisy_gd_update
from ._noise_source import (
    STREAM_NOISE,
    STREAM_WEIGHTS,
    NoiseSource,
    needs_minibatches,
)

__all__ = ["NoisyGD"]

NoiseKind = Literal[
    "none",
    "isotropic",
    "isotropic_matched",
    "diagonal",
    "sgd_leading",
    "hessian",
    "top_eigvec",
    "sgd_matched",
    "geometry_aware",
    "geometry_aware_isotropic",
]

# steps whose realised ||xi||^2 may wait unconverted (one GPU sync per this many
# steps when `stats` is never read)
_MAX_PENDING = 256

_STATE_KEY = "noisy_gd"

# the settings the cached statistics depend on: statistics a checkpoint cached
# under other ones lack keys or are stale (Tr C at another B), and are
# refreshed. Not k: the eigenvectors of another k still warm-start a refresh.
_CACHE_SETTINGS = (
    "noise",
    "magnitude",
    "batch_size",
    "curvature",
    "num_batches",
    "mode",
    "loss_reduction",
)


def _check_source(
    noise: str, magnitude: str, batch_size: int | None, **source: Any
) -> None:
    """Raise if ``noise`` lacks its curvature source or ``batch_size``."""
    if noise not in ("none", "isotropic"):
        missing = [name for name, v in source.items() if v is None]
        if missing:
            raise ValueError(
                f"noise={noise!r} needs a curvature source: pass `model`, "
                "`loss_fn` and `data` (missing: "
                + ", ".join(f"`{m}`" for m in missing)
                + ")."
            )
    needs_batch = needs_minibatches(noise, magnitude) or noise in (
        "sgd_matched",
        "geometry_aware",
        "geometry_aware_isotropic",
    )
    if needs_batch and batch_size is None:
        raise ValueError(
            f"noise={noise!r} needs `batch_size`, the SGD batch size B whose "
            "noise magnitude Tr(Σ)/B it matches; got None."
        )


def _check_extra(extra: Any) -> None:
    """Check the ``"noisy_gd"`` entry of a state dict before loading anything."""
    name = f"state_dict[{_STATE_KEY!r}]"
    if not isinstance(extra, dict):
        raise ValueError(f"`{name}` must be a dict; got {type(extra).__name__}.")
    missing = [k for k in ("step", "seed", "cache", "stats") if k not in extra]
    if missing:
        raise ValueError(
            f"`{name}` has no {', '.join(repr(k) for k in missing)} entry; pass a "
            "dict returned by NoisyGD.state_dict()."
        )
    for key in ("step", "seed"):
        value = extra[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"`{name}[{key!r}]` must be an integer >= 0; got {value!r}."
            )
    if not isinstance(extra["cache"], dict) or not all(
        isinstance(v, Tensor) for v in extra["cache"].values()
    ):
        raise ValueError(f"`{name}['cache']` must be a dict of tensors.")
    if not isinstance(extra["stats"], dict):
        raise ValueError(f"`{name}['stats']` must be a dict.")
    if not isinstance(extra.get("settings", {}), dict):
        raise ValueError(f"`{name}['settings']` must be a dict.")


class NoisyGD(torch.optim.Optimizer):
    r"""Gradient descent with injected Gaussian noise of a chosen geometry.

    .. math::

        d_t = \pm g_t + \omega θ_t, \qquad
        θ_{t+1} = θ_t - η (d_t + ξ_t) \ \text{(grad units)}
        \quad\text{or}\quad
        θ_{t+1} = θ_t - η d_t + ξ_t \ \text{(param units)},

    with ``ξ_t ~ N(0, S)`` and ``S`` set by ``noise`` (``docs/science/dynamics.md``;
    ``C`` is the covariance of mini-batch gradients at batch size ``B``, which estimates
    ``Σ/B``; ``(λ_j, u_j)`` the top-``k`` eigenpairs of the curvature; ``s`` =
    ``noise_scale`` times ``noise_schedule(t)``):

    ==============================  =========================================
    ``noise``                       ``S`` (with ``magnitude="sgd"``)
    ==============================  =========================================
    ``"none"``                      0 (plain GD; equals ``torch.optim.SGD``)
    ``"isotropic"`` (GLD-const)     ``s² I``
    ``"isotropic_matched"`` (dyn)   ``s² (Tr C / P) I``
    ``"diagonal"`` (GLD-diag)       ``s² diag(C)``
    ``"sgd_leading"`` (GLD-lead)    ``s² (Tr C/Σe_j) Σ_j e_j v_j v_jᵀ``, top-k of C
    ``"hessian"`` (GLD-Hess)        ``s² (Tr C/Σλ_j) Σ_j λ_j u_j u_jᵀ``
    ``"top_eigvec"`` (GLD-1eig)     ``s² Tr C · u_1 u_1ᵀ``
    ``"sgd_matched"`` (SGD-Gauss)   ``s² Σ/B`` exactly, one reweighted backward
    ``"geometry_aware"`` (GEO)      ``s² (2L/B) Σ_j λ_j u_j u_jᵀ``
    ``"geometry_aware_isotropic"``  ``s² (2L/B) (Tr H/P) I`` (ISO)
    ==============================  =========================================

    ``magnitude`` changes the five matched kinds: ``"sgd"`` (default) gives them
    the SGD noise magnitude ``E‖ξ‖² = Tr C`` (so that comparisons are fair);
    ``"unit"`` normalises their covariance to trace 1, so that ``noise_scale²``
    is the total variance (the Z19 2-D toy); ``"raw"`` leaves the covariance
    unnormalised (``diag(C)``, ``Σ_j e_j v_j v_jᵀ``, ``Σ_j λ_j u_j u_jᵀ``,
    ``λ_1 u_1 u_1ᵀ``; Z19's FashionMNIST GLD-lead).

    Notes:
        * Low-rank kinds carry only the top-``k`` part of the curvature; the
          remainder (the bulk) is dropped, and the matched kinds renormalise
          the top-``k`` mass to the target. For ``"geometry_aware"`` the lost
          mass is not restored (GEO): its total variance is
          ``2L Σ_{j≤k} λ_j / B``, below the ``2L Tr H / B`` of its isotropic
          twin (``stats["target_sq_norm"]`` holds the top-``k`` value).
        * Negative Ritz values (indefinite Hessian) are clamped to 0, the count
          is recorded in ``stats["clamped_negative"]``, and a spectrum with no
          positive value gives zero noise, never NaN.
        * Statistics are refreshed at steps ``0, R, 2R, …`` (``R`` =
          ``refresh_every``) and cached in between; ``L(θ)`` of the GEO kinds is
          taken at the refresh. ``"sgd_matched"`` makes a fresh pass over
          ``data`` every step (``n_backward`` counts them).
        * Noise comes from generators seeded by ``(seed, t)`` (see
          :func:`~geoopt_sgd.optim.noise.step_seed`) on the parameters' device;
          the global RNG is never touched (its state is saved and restored
          around every pass over ``data``, so a shuffling ``DataLoader`` or a
          random augmentation leaves it as it was). The step count, the cached
          statistics and :attr:`stats` are saved in :meth:`state_dict`, so a
          resumed run continues bit for bit. Under ``torch.distributed`` every
          rank draws the same noise without communication; a curvature source's
          ``data`` is this rank's shard, and statistics are summed over ranks.
        * The noise is one vector over all parameters of all groups, in order.
          Parameters whose ``.grad`` is ``None`` are skipped (no update and no
          noise), as in torch SGD. Noise options are optimizer-wide; ``lr`` and
          ``weight_decay`` may differ per group and are read at every step.
        * Cost: ``"isotropic"`` adds one Gaussian draw of ``P`` numbers per
          step. On CPU, torch's generator fills about 0.1 G numbers per second
          on one thread, several times the cost of the SGD update itself, so
          the step alone is several times slower than ``torch.optim.SGD``
          (see ``benchmarks/_noisy_gd_bench.py``); against a forward and
          backward pass it is small. Curvature kinds cost the eigensolver's
          HVPs once per refresh (``stats["hvp_per_step"]``), and the
          ``C``-based kinds ``M`` mini-batch backward passes per refresh.
        * ``stats["target_sq_norm"]`` is NaN for ``"sgd_matched"``: its
          ``E‖ξ‖² = Tr(Σ)/B`` needs per-sample gradients, which it avoids.
        * Non-finite values. A ``noise_schedule`` value that is NaN or
          infinite raises ``ValueError`` (naming the step) before anything
          changes. Non-finite gradients are applied as ``torch.optim.SGD``
          applies them (the parameters become NaN; nothing is checked on the
          per-step path). A refresh of the statistics that meets non-finite
          parameters, mini-batch gradients or curvature-operator output raises
          ``FloatingPointError`` saying which, before that step's update.
          ``"sgd_matched"`` has no refresh: a non-finite reweighted gradient
          propagates like a non-finite gradient.
        * A parameter may appear only once over all groups (``ValueError``), and
          must be floating point (``TypeError``).
        * With ``loss_reduction="sum"`` the SGD noise scales with ``n``
          (``(n/B) Σ_{i∈b} ∇L_i`` estimates ``∇L``); ``C`` and ``"sgd_matched"``
          follow that convention.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        lr: Learning rate ``η`` (``>= 0``).
        noise: The noise kind; one of :attr:`NOISE_KINDS`.
        noise_scale: ``s``, multiplies the noise (``>= 0``). For
            ``"isotropic"`` it is the standard deviation per coordinate ``ϱ``.
        batch_size: ``B``, the SGD batch size whose noise is imitated; required
            by ``isotropic_matched``, ``diagonal``, ``sgd_leading``,
            ``sgd_matched``, the GEO kinds, and by ``hessian``/``top_eigvec``
            with ``magnitude="sgd"``.
        k: Number of eigenpairs of the low-rank kinds (Z19: 20).
        refresh_every: ``R``, steps between refreshes of the statistics
            (Z19: 1 or 10).
        model: The curvature source's model (the optimizer's parameters must be
            parameters of it).
        loss_fn: The curvature source's loss (reduction ``"mean"`` or ``"sum"``;
            a loss whose ``reduction`` attribute is ``"none"`` is rejected here).
        data: One ``(inputs, targets)`` batch or an iterable of them (a
            ``DataLoader`` in a fixed order), the data ``C`` and ``H`` refer to
            (batch structure: :mod:`geoopt_sgd._model`; a list's batches are
            checked here, a loader's at the first refresh).
        curvature: ``"hessian"`` or ``"ggn"`` (always PSD).
        noise_units: ``"grad"`` (``ξ`` added to the gradient) or ``"param"``
            (added to the parameters after the step, in parameter units).
        seed: Seed of the noise streams (``>= 0``).
        weight_decay: ``ω``, L2 penalty as in torch SGD.
        maximize: Maximize the objective (negates the gradient).
        foreach: Use the ``torch._foreach_*`` kernels (``None``: on CUDA).
        noise_schedule: Optional ``t -> multiplier`` of ``s`` (a pure function of
            the step count, e.g. ``lambda t: 1 / (1 + t) ** 0.55``).
        magnitude: ``"sgd"``, ``"unit"`` or ``"raw"``; see above.
        num_batches: At most this many mini-batch gradients for ``C``
            (``None``: every disjoint batch of ``data``; Z19 CIFAR: 100).
            The mini-batches are cut from each batch of ``data`` (its trailing
            partial one dropped). Under ``torch.distributed`` that happens on
            each rank's shard and ``num_batches`` counts per rank; the ranks'
            gradients are then gathered, so ``C`` uses up to
            ``world_size * num_batches`` of them.
        mode: Mode policy of the curvature source: ``"eval"`` or ``"train"``
            (see :mod:`geoopt_sgd._model`).
        loss_reduction: ``"mean"``, ``"sum"`` or ``None`` (read from
            ``loss_fn.reduction``).
        tol: Relative tolerance of the eigensolver.
        batch_fn: ``None`` or a callable mapping one batch of ``data`` (as a
            loader yields it, e.g. a dict) to ``(inputs, targets)``; inputs may
            be a tensor, a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``). See :mod:`geoopt_sgd._model`.

    Attributes:
        NOISE_KINDS: The accepted values of ``noise``.
        stats: Costs and magnitudes (plain floats and ints): ``step``,
            ``target_sq_norm`` (``E‖ξ‖²`` this step's sampler realises in
            expectation, in the units it is applied), ``realised_sq_norm``
            (``‖ξ‖²`` drawn this step) and ``realised_sq_norm_mean`` (its mean
            over steps), ``reference_sq_norm`` (``Tr C`` or the GEO/ISO
            reference, NaN when not computed), ``n_hvp``, ``n_backward``,
            ``n_refresh``, ``hvp_per_step``, ``clamped_negative`` (at the last
            refresh) and ``clamped_negative_total``, ``refresh_seconds``.

    Raises:
        ValueError: For an invalid value (unknown ``noise``, negative ``lr`` or
            ``noise_scale``, ``refresh_every < 1``, a kind that needs a curvature
            source or ``batch_size`` without one, a repeated parameter, a
            ``loss_fn`` with ``reduction="none"``, …).
        TypeError: For an argument of the wrong type (a non-floating-point
            parameter, a ``noise_schedule``, ``loss_fn`` or ``batch_fn`` that is
            not callable, a batch of a list ``data`` that is not an
            ``(inputs, targets)`` pair after ``batch_fn``).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = NoisyGD(model.parameters(), lr=0.1, noise="isotropic",
        ...               noise_scale=1e-3, seed=0)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> opt.step()
        >>> opt.stats["step"]
        1
    """

    NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        *,
        noise: NoiseKind = "none",
        noise_scale: float = 1.0,
        batch_size: int | None = None,
        k: int = 20,
        refresh_every: int = 10,
        model: nn.Module | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        data: Any = None,
        curvature: Literal["hessian", "ggn"] = "hessian",
        noise_units: Literal["grad", "param"] = "grad",
        seed: int = 0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        noise_schedule: Callable[[int], float] | None = None,
        magnitude: Literal["sgd", "unit", "raw"] = "sgd",
        num_batches: int | None = None,
        mode: Literal["eval", "train"] = "eval",
        loss_reduction: Literal["mean", "sum"] | None = None,
        tol: float = 1e-3,
        batch_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        check_number("lr", lr, ge=0, allow_tensor=True)
        check_choice("noise", noise, self.NOISE_KINDS)
        check_number("noise_scale", noise_scale, ge=0)
        check_int("batch_size", batch_size, ge=1, allow_none=True)
        check_int("k", k, ge=1)
        check_int("refresh_every", refresh_every, ge=1)
        check_choice("curvature", curvature, ("hessian", "ggn"))
        check_choice("noise_units", noise_units, ("grad", "param"))
        check_int("seed", seed, ge=0)
        check_number("weight_decay", weight_decay, ge=0)
        check_choice("magnitude", magnitude, ("sgd", "unit", "raw"))
        check_int("num_batches", num_batches, ge=2, allow_none=True)
        check_choice("mode", mode, ("eval", "train"))
        check_choice("loss_reduction", loss_reduction, ("mean", "sum", None))
        check_number("tol", tol, gt=0)
        if noise_schedule is not None and not callable(noise_schedule):
            raise TypeError(
                "`noise_schedule` must be a callable step -> multiplier or None; "
                f"got {type(noise_schedule).__name__}."
            )
        _check_source(
            noise, magnitude, batch_size, model=model, loss_fn=loss_fn, data=data
        )
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(
                f"`batch_fn` must be callable or None; got {type(batch_fn).__name__}."
            )
        if isinstance(data, (list, tuple, Mapping)):
            # batches held in memory are checked now; a loader's as it is read
            local_batches(data, batch_fn)
        if loss_fn is not None:
            if not callable(loss_fn):
                raise TypeError(
                    "`loss_fn` must be a callable (output, target) -> scalar loss; "
                    f"got {type(loss_fn).__name__}."
                )
            # a loss with reduction='none' is rejected here, not at the first step
            detect_reduction(loss_fn, loss_reduction)
        defaults = dict(
            lr=lr, weight_decay=weight_decay, maximize=maximize, foreach=foreach
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse:
                    raise RuntimeError(
                        "`params`: NoisyGD does not support sparse parameters."
                    )

        self.noise = noise
        self.noise_scale = float(noise_scale)
        self.batch_size = batch_size
        self.k = k
        self.refresh_every = refresh_every
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.batch_fn = batch_fn
        self.curvature = curvature
        self.noise_units = noise_units
        self.seed = seed
        self.noise_schedule = noise_schedule
        self.magnitude = magnitude
        self.num_batches = num_batches
        self.mode = mode
        self.loss_reduction = loss_reduction
        self.tol = float(tol)

        self._step_count = 0
        self._step_scale = 0.0
        self._cache: dict[str, Tensor] = {}
        self._src: NoiseSource | None = None
        self._workspace: dict[tuple, Tensor] = {}
        # realised ||xi||^2 of recent steps as device scalars, converted when
        # `stats` is read: a float() per step would synchronise a GPU every step
        self._pending: list[tuple[int, Any]] = []
        self._stats: dict[str, float | int] = {
            "step": 0,
            "target_sq_norm": 0.0,
            "realised_sq_norm": 0.0,
            "realised_sq_norm_mean": 0.0,
            "reference_sq_norm": math.nan,
            "n_hvp": 0,
            "n_backward": 0,
            "n_refresh": 0,
            "hvp_per_step": 0.0,
            "clamped_negative": 0,
            "clamped_negative_total": 0,
            "refresh_seconds": 0.0,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; the noise vector and its statistics then grow.

        Args:
            param_group: As for :meth:`torch.optim.Optimizer.add_param_group`.

        Raises:
            ValueError: If a parameter is listed twice or is already in a group
                (it would get the update and the noise twice).
            TypeError: If a parameter is not floating point.
        """
        check_param_group(param_group, self.param_groups, floating=True)
        super().add_param_group(param_group)
        # the curvature source and cached statistics refer to the old P
        self._src = None
        self._cache = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer state, with the noise step count and cache.

        Returns:
            torch's optimizer state dict plus a ``"noisy_gd"`` entry holding the
            integer step count, the seed, the cached noise statistics (tensors),
            the settings they were computed under (``noise``, ...) and
            :attr:`stats`; loadable with ``torch.load(weights_only=True)``.
        """
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "step": self._step_count,
            "seed": self.seed,
            "cache": {k: v.clone() for k, v in self._cache.items()},
            "settings": self._cache_settings(),
            "stats": dict(self.stats),  # reading `stats` converts pending values
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, noise stream included.

        The step count, seed and cached statistics live outside the
        per-parameter state, so :class:`torch.optim.Optimizer`'s dtype casting
        never touches them; the cached vectors are moved to the parameters'
        device (a checkpoint loaded with ``map_location="cpu"`` resumes on CUDA).
        Statistics cached under other settings than this optimizer's
        (``noise``, ``magnitude``, ``batch_size``, ``curvature``,
        ``num_batches``, ``mode``, ``loss_reduction``) are dropped, and the next
        step refreshes them. A different ``k`` keeps them: the noise is drawn
        from the checkpoint's eigenpairs until the next scheduled refresh, whose
        eigensolve starts from them.

        Args:
            state_dict: A dict from :meth:`state_dict`. A plain torch SGD state
                dict also loads: it carries no noise state, so it sets the param
                groups (``lr``, ``weight_decay``, ...) and leaves the step count,
                seed, cached statistics and :attr:`stats` as they were. A fresh
                optimizer then draws the noise of step 0 onwards (a NoisyGD run
                resumed from a checkpoint without the ``"noisy_gd"`` entry
                repeats its noise from step 0); a used one continues its own
                stream.

        Raises:
            TypeError: If ``state_dict`` is not a dict.
            ValueError: If it is not an optimizer state dict, or its
                ``"noisy_gd"`` entry is malformed (checked before anything is
                loaded).
        """
        check_state_dict("state_dict", state_dict)
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is not None:
            _check_extra(extra)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._step_count = int(extra["step"])
            self.seed = int(extra["seed"])
            # vectors follow the parameters, as torch's per-parameter state does
            # (a checkpoint loaded with map_location="cpu" into a CUDA run); the
            # scalars are read with float() and stay where they are
            device = self.param_groups[0]["params"][0].device
            self._cache = {
                k: v.to(device, copy=True) if v.dim() else v.clone()
                for k, v in extra["cache"].items()
            }
            if extra.get("settings", self._cache_settings()) != self._cache_settings():
                self._cache = {}  # stale: the next step refreshes
            self.stats = dict(extra["stats"])

    def _cache_settings(self) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in _CACHE_SETTINGS}
        loss_fn = getattr(self, "loss_fn", None)
        if loss_fn is not None:
            # as resolved: None and the loss's own reduction are the same setting
            settings["loss_reduction"] = detect_reduction(loss_fn, self.loss_reduction)
        return settings

    @property
    def stats(self) -> dict[str, float | int]:
        """Costs and magnitudes so far, as plain floats and ints (see the class)."""
        if self._pending:
            self._flush_stats()
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, float | int]) -> None:
        self._pending = []
        self._stats = value

    def _flush_stats(self) -> None:
        """Convert the pending realised ``‖ξ‖²`` values, in step order."""
        st = self._stats
        for t, realised in self._pending:
            if isinstance(realised, tuple):
                factor, parts = realised
                sq = 0.0
                for part in parts:
                    sq += float(part)
                realised = factor * sq
            st["realised_sq_norm"] = realised
            st["realised_sq_norm_mean"] += (realised - st["realised_sq_norm_mean"]) / (
                t + 1
            )
        self._pending = []

    # ----------------------------------------------------------------- helpers
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _scale(self, t: int) -> float:
        s = self.noise_scale
        if self.noise_schedule is not None:
            value = self.noise_schedule(t)
            try:
                m = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(
                    f"`noise_schedule` must return a real number; at step {t} it "
                    f"returned {type(value).__name__}."
                ) from None
            if not math.isfinite(m):
                raise ValueError(
                    f"`noise_schedule` must return a finite multiplier; at step {t} "
                    f"it returned {m!r}. No parameter was changed."
                )
            s = s * m
        return s

    def _source(self) -> NoiseSource:
        if self._src is None:
            # listing `data` may draw from the global RNG (a shuffling
            # DataLoader's sampler); the promise is that it stays untouched
            with preserve_global_rng():
                src = NoiseSource(
                    self.model,  # type: ignore[arg-type]
                    self.loss_fn,  # type: ignore[arg-type]
                    self.data,
                    self._params(),
                    mode=self.mode,
                    loss_reduction=self.loss_reduction,
                    batch_fn=self.batch_fn,
                )
            if self.noise == "sgd_matched" or needs_minibatches(
                self.noise, self.magnitude
            ):
                # these kinds weight per-sample losses (see _losses)
                check_per_sample_batches(
                    self.loss_fn, src.batches, device=src.fm.device
                )
            self._src = src
        return self._src

    def _refresh(self, t: int) -> None:
        start = time.perf_counter()
        src = self._source()
        with preserve_global_rng():
            cache = src.refresh(
                self.noise,
                t,
                seed=self.seed,
                magnitude=self.magnitude,
                batch_size=self.batch_size,
                k=self.k,
                num_batches=self.num_batches,
                curvature=self.curvature,
                tol=self.tol,
                previous=self._cache,
                stats=self._stats,
            )
        self._cache = cache
        self._stats["n_refresh"] += 1
        self._stats["refresh_seconds"] += time.perf_counter() - start

    # ------------------------------------------------------------------- noise
    def _isotropic_noise(
        self, t: int, params: list[Tensor]
    ) -> tuple[list[Tensor | None], float, float, Any]:
        """``"isotropic"``: one draw per (device, dtype) bucket, split into views."""
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        s = self._step_scale
        views: list[Tensor | None] = [None] * len(params)
        parts = []
        for b, ((device, dtype), idx) in enumerate(buckets.items()):
            gen = _noise.make_generator(self.seed, t, device, stream=b)
            n = sum(params[i].numel() for i in idx)
            # a reused workspace: filling it in place skips a P-sized
            # allocation per step (about a third of the draw's time on CPU)
            key = (device, dtype, b)
            ws = self._workspace.get(key)
            if ws is None or ws.numel() != n:
                ws = self._workspace[key] = torch.empty(n, dtype=dtype, device=device)
            z = _noise.isotropic_noise(n, s, generator=gen, out=ws).direction
            parts.append(torch.dot(z, z))
            off = 0
            for i in idx:
                m = params[i].numel()
                views[i] = z[off : off + m].view_as(params[i])
                off += m
        numel = sum(p.numel() for p in params)
        # E||xi||^2 over all buckets (each bucket's sample states its own share)
        return views, s, s * s * numel, (s * s, parts)

    def _sample(self, t: int, numel: int) -> _noise.NoiseSample:
        """This step's flat noise of every kind but ``"none"`` and ``"isotropic"``."""
        src = self._source()
        s = self._step_scale
        if self.noise == "sgd_matched":
            gen = _noise.make_generator(
                self.seed, t, src.fm.device, stream=STREAM_WEIGHTS + distributed.rank()
            )
            assert self.batch_size is not None
            # the data are held in memory since _source(): no global RNG draw
            xi = src.sgd_matched_noise(gen, self.batch_size, self._stats)
            # E‖ξ‖² = Tr(Σ)/B is not computed (it would need per-sample gradients)
            return _noise.NoiseSample(xi, s, math.nan)
        gen = _noise.make_generator(self.seed, t, src.fm.device, stream=STREAM_NOISE)
        options = _noise.DrawOptions(
            numel=numel,
            magnitude=self.magnitude,
            batch_size=self.batch_size,
            generator=gen,
            dtype=src.fm.dtype,
        )
        return _noise.SAMPLERS[self.noise](self._cache, s, options)

    def _noise_for_step(
        self, t: int, params: list[Tensor]
    ) -> tuple[list[Tensor] | None, float, float, Any]:
        """Per-parameter noise views, their multiplier, target and realised ‖ξ‖².

        The realised value is ``(factor, [device scalars])``: ``factor`` times the
        sum of the scalars, converted lazily (see :attr:`stats`).
        """
        if self.noise == "none":
            return None, 0.0, 0.0, 0.0
        if self.noise == "isotropic":
            return self._isotropic_noise(t, params)  # type: ignore[return-value]
        flat, alpha, target = self._sample(t, sum(p.numel() for p in params))
        sq = (alpha * alpha, [torch.dot(flat, flat)])
        out, off = [], 0
        for p in params:
            m = p.numel()
            out.append(flat[off : off + m].view_as(p).to(p.dtype))
            off += m
        return out, alpha, target, sq

    # -------------------------------------------------------------------- step
    # The step runs eagerly inside a torch.compile-d training step: dynamo would
    # otherwise trace the seeded generator draws and the Python step counter into
    # the graph, and the compiled run would leave the (seed, step) noise stream (the
    # compiled noise differed from eager by 6e-2 after 3 steps).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one noisy gradient-descent step.

        Args:
            closure: Optional closure that re-evaluates the model and returns the
                loss; called once, under ``torch.enable_grad()``.

        Returns:
            The closure's loss, or ``None`` without a closure.

        Raises:
            RuntimeError: If a gradient is sparse.
            ValueError: If ``noise_schedule`` returns a non-finite value (raised
                before any parameter or statistic changes).
            TypeError: If ``noise_schedule`` returns something not a number.
            FloatingPointError: If a refresh of the noise statistics meets
                non-finite parameters, mini-batch gradients or curvature-operator
                output (raised before the update).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self._step_count
        params = self._params()
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "NoisyGD does not support sparse gradients; use dense "
                    "gradients (e.g. nn.Embedding(sparse=False))."
                )
        # noise_schedule is called once per step, and a bad value fails here,
        # before the statistics or any parameter change
        self._step_scale = 0.0 if self.noise == "none" else self._scale(t)
        if self.noise not in ("none", "isotropic", "sgd_matched") and (
            t % self.refresh_every == 0 or not self._cache
        ):
            self._refresh(t)
        noises, alpha, target, realised = self._noise_for_step(t, params)
        position = {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in ps)
            zs = None if noises is None else [noises[position[id(p)]] for p in ps]
            noisy_gd_update(
                ps,
                [p.grad for p in ps],
                zs,
                lr=float(group["lr"]),
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                noise_alpha=alpha,
                noise_units=self.noise_units,
                foreach=foreach,
            )
        self._step_count = t + 1
        st = self._stats
        st["step"] = t + 1
        st["target_sq_norm"] = target
        st["hvp_per_step"] = st["n_hvp"] / (t + 1)
        self._pending.append((t, realised))
        if len(self._pending) >= _MAX_PENDING:
            self._flush_stats()
        return loss

    _PICKLED = (
        "noise",
        "noise_scale",
        "batch_size",
        "k",
        "refresh_every",
        "model",
        "loss_fn",
        "data",
        "batch_fn",
        "curvature",
        "noise_units",
        "seed",
        "noise_schedule",
        "magnitude",
        "num_batches",
        "mode",
        "loss_reduction",
        "tol",
        "_step_count",
        "_cache",
        "stats",
    )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({name: getattr(self, name) for name in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.setdefault("batch_fn", None)  # pickled before batch_fn existed
        stats = state.pop("stats", None)
        if self.__dict__.get("_pending"):
            # load_state_dict, not unpickling: convert the steps already taken
            self._flush_stats()
        self._src = None
        self._workspace = {}
        self._pending = []
        self._step_scale = 0.0
        super().__setstate__(state)
        if stats is not None:
            self._stats = stats
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("weight_decay", 0.0)
