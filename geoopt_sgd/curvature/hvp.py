r"""Hessian-vector product routes and the data-averaging machinery of the operators.

Three routes compute :math:`Hv = \partial_\varepsilon \nabla f(\theta +
\varepsilon v)` for a scalar function ``f`` of a list (or dict) of tensors:

* ``"fwd_rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``.
  Each product recomputes the forward and the gradient.
* ``"rev_rev"``: reverse-over-reverse, ``torch.func.vjp`` of ``torch.func.grad``;
  the gradient's graph is built once per batch and reused by every column of a
  block. Widest operator coverage (no forward-mode AD needed).
* ``"double_backward"``: ``torch.autograd.grad(..., create_graph=True)`` once,
  then ``torch.autograd.grad(g, params, v, retain_graph=True)`` per product. The
  operators keep these first-order graphs across products when the data is a
  small list of batches (see ``max_cached_batches``).

Every route runs under the math backend of ``scaled_dot_product_attention``
(selected locally with a context manager): the fused CPU/CUDA kernels have
neither forward-mode AD nor a double backward. Gradients are taken with
``torch.autograd.grad``/``torch.func``, never ``.backward()``, so no
``create_graph`` reference cycle through ``.grad`` is ever created.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import check_choice, check_int
from .._model import (
    Batch,
    FunctionalModel,
    batch_size,
    check_batch,
    detect_reduction,
    full_precision,
    local_batches,
    outside_inference,
    preserve_global_rng,
    scalar_loss,
    to_device,
)
from .linop import LinearOperator

__all__ = ["HVP_METHODS", "hessian_vector_product", "make_hvp"]

HVPMethod = Literal["fwd_rev", "rev_rev", "double_backward"]
HVP_METHODS: tuple[str, ...] = ("fwd_rev", "rev_rev", "double_backward")
"""The explicit HVP routes; the operators also accept ``"auto"``."""
BLOCK_ROUTES: tuple[str, ...] = ("auto", "loop", "batched")
"""How the operators apply a block of columns (their ``block`` argument)."""


@contextlib.contextmanager
def math_sdpa() -> Iterator[None]:
    """Select the math backend of scaled-dot-product attention inside the block.

    The fused kernels (flash, memory-efficient, the CPU flash kernel) have no
    forward-mode AD and no double backward; the math backend decomposes into
    differentiable ops. The previous backend selection is restored on exit.

    Yields:
        Nothing; the backend is active for the duration of the block.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - a torch without torch.nn.attention
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


class _ListAdapter:
    """Present a list or a dict of tensors to ``f`` as a list, and back."""

    def __init__(self, params: Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        if isinstance(params, Mapping):
            self.keys: list[str] | None = list(params.keys())
            self.values = list(params.values())
        else:
            self.keys = None
            self.values = list(params)

    def to_list(self, x: Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
        if self.keys is None:
            return list(x)  # type: ignore[arg-type]
        return [x[k] for k in self.keys]  # type: ignore[index]

    def back(self, xs: Sequence[Tensor]) -> Any:
        if self.keys is None:
            return list(xs)
        return dict(zip(self.keys, xs, strict=True))


def make_hvp(
    f: Callable[..., Tensor],
    params: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    method: HVPMethod = "double_backward",
    constants: Sequence[Tensor] = (),
    batched: bool = False,
) -> Callable[[Any], Any]:
    """Build ``v -> H v`` for the Hessian of ``f`` at ``params``, reusable across ``v``.

    The reverse routes build the gradient's graph here, once; every call of the
    returned function is then one backward pass through it. Drop the returned
    function to free that graph. With ``batched=True`` every tangent carries a
    leading dimension ``q`` and the ``q`` products are one vectorised pass
    (``torch.func.vmap`` of the route; ``is_grads_batched`` for
    ``"double_backward"``): fewer kernel launches for many small products.

    Args:
        f: A scalar function ``f(params, *constants)`` of a list (or dict) of
            tensors shaped like ``params``.
        params: The point, a list or a dict of tensors (not modified).
        method: ``"double_backward"`` (default), ``"rev_rev"`` or ``"fwd_rev"``.
        constants: Extra tensors passed to ``f`` and not differentiated (e.g.
            regression targets). Under ``"fwd_rev"`` the floating-point ones get
            an explicit zero tangent: torch 2.14's ``mse_loss`` backward fails
            under forward AD ("ZeroTensors are immutable") when its target has
            none.
        batched: Tangents and products have a leading dimension ``q`` (one
            block of ``q`` directions per call).

    Returns:
        A function mapping tangents ``v`` (same structure as ``params``) to
        ``H v`` (same structure), detached.

    Raises:
        ValueError: If ``method`` is unknown.

    Example:
        >>> import torch
        >>> f = lambda p: (p[0] ** 2 * p[1]).sum()
        >>> hvp = make_hvp(f, [torch.tensor([1.0]), torch.tensor([3.0])])
        >>> hvp([torch.tensor([1.0]), torch.tensor([0.0])])
        [tensor([6.]), tensor([2.])]
    """
    one, block = _hvp_routes(f, params, method=method, constants=constants)
    return block if batched else one


def _hvp_routes(
    f: Callable[..., Tensor],
    params: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    method: HVPMethod = "double_backward",
    constants: Sequence[Tensor] = (),
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Build both ``v -> H v`` and its batched form on one shared graph.

    The first function is :func:`make_hvp`'s, the second its ``batched=True``
    form (tangents with a leading dimension ``q``); the reverse routes build the
    gradient's graph once and both backpropagate through it, so an operator can
    apply single vectors and blocks of columns without building it twice.

    Args:
        f: As in :func:`make_hvp`.
        params: As in :func:`make_hvp`.
        method: As in :func:`make_hvp`.
        constants: As in :func:`make_hvp`.

    Returns:
        ``(hvp, hvp_batched)``.

    Raises:
        ValueError: If ``method`` is unknown.
    """
    check_choice("method", method, HVP_METHODS)
    ad = _ListAdapter(params)
    primals = [p.detach() for p in ad.values]
    consts = list(constants)

    def f_list(ps: Sequence[Tensor], *cs: Tensor) -> Tensor:
        return f(ad.back(ps), *cs)

    if method == "fwd_rev":
        dual = [i for i, c in enumerate(consts) if c.is_floating_point()]
        zeros = [torch.zeros_like(consts[i]) for i in dual]

        def f_fwd(ps: Sequence[Tensor], ds: Sequence[Tensor]) -> list[Tensor]:
            cs = list(consts)
            for i, d in zip(dual, ds, strict=True):
                cs[i] = d
            return torch.func.grad(f_list)(ps, *cs)

        def push_fwd(tangents: list[Tensor]) -> list[Tensor]:
            return torch.func.jvp(
                f_fwd, (primals, [consts[i] for i in dual]), (tangents, zeros)
            )[1]

        def fwd(
            apply: Callable[[list[Tensor]], list[Tensor]], cast: bool
        ) -> Callable[..., Any]:
            def hvp_fwd(v: Any) -> Any:
                ts = [t.detach() for t in ad.to_list(v)]
                if cast:  # vmap of jvp needs each tangent in its primal's dtype
                    ts = [t.to(p.dtype) for t, p in zip(ts, primals, strict=True)]
                out = apply(ts)
                return ad.back([o.detach() for o in out])

            return hvp_fwd

        return fwd(push_fwd, False), fwd(torch.func.vmap(push_fwd), True)

    if method == "rev_rev":
        _, vjp_fn = torch.func.vjp(
            lambda ps: torch.func.grad(f_list)(ps, *consts), primals
        )

        def rev(apply: Callable[[list[Tensor]], Any]) -> Callable[..., Any]:
            def hvp_rev(v: Any) -> Any:
                (out,) = apply([t.detach() for t in ad.to_list(v)])
                return ad.back([o.detach() for o in out])

            return hvp_rev

        return rev(vjp_fn), rev(torch.func.vmap(vjp_fn))

    leaves = [p.clone().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        g = torch.autograd.grad(
            f_list(leaves, *consts), leaves, create_graph=True, materialize_grads=True
        )
    live = [i for i, gi in enumerate(g) if gi.requires_grad]

    def db(batched: bool) -> Callable[..., Any]:
        def hvp_db(v: Any) -> Any:
            vs = ad.to_list(v)
            if not live:  # f is at most linear in params: H = 0
                return ad.back(
                    [p.new_zeros(v.shape) for p, v in zip(primals, vs, strict=True)]
                )
            out = torch.autograd.grad(
                [g[i] for i in live],
                leaves,
                [vs[i].detach() for i in live],
                retain_graph=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )
            return ad.back([o.detach() for o in out])

        return hvp_db

    return db(False), db(True)


def hessian_vector_product(
    f: Callable[[Any], Tensor],
    params: Sequence[Tensor] | Mapping[str, Tensor],
    v: Sequence[Tensor] | Mapping[str, Tensor],
    *,
    method: HVPMethod = "double_backward",
) -> Any:
    """Return ``H v`` for the Hessian ``H`` of the scalar ``f`` at ``params``.

    Args:
        f: A scalar function of a list (or dict) of tensors shaped like ``params``.
        params: The point, a list or a dict of tensors (not modified).
        v: The tangent, same structure and shapes as ``params``.
        method: ``"double_backward"`` (default), ``"rev_rev"`` or ``"fwd_rev"``.

    Returns:
        ``H v`` in the structure of ``params``, detached.

    Raises:
        ValueError: If ``method`` is unknown.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> hessian_vector_product(f, {"w": torch.tensor([2.0])}, {"w": torch.ones(1)})
        {'w': tensor([12.])}
    """
    return make_hvp(f, params, method=method)(v)


# --- data-averaged operators ---------------------------------------------------


@contextlib.contextmanager
def _no_context() -> Iterator[None]:
    yield


class BatchTerm:
    """One batch's contribution: ``apply(vs)`` is the batch matrix times ``vs``.

    ``needs_context``: whether ``apply`` evaluates the model (and so must run
    under the mode policy and the math SDPA backend), not just a kept graph.
    """

    needs_context = True

    def apply(self, vs: list[Tensor]) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_block(self, vs: list[Tensor]) -> list[Tensor]:
        """The batch matrix times ``q`` columns at once (leading dimension ``q``).

        This fallback loops over the columns; terms with a vectorised pass
        override it.
        """
        cols = [self.apply([v[j] for v in vs]) for j in range(vs[0].shape[0])]
        return [torch.stack(c) for c in zip(*cols, strict=True)]


class DataOperator(LinearOperator):
    """A matrix that is the sample-weighted sum of per-batch matrices.

    Handles the data (one batch or an iterable of batches), the weights
    ``n_b / N`` (mean) or ``1`` (sum), the all-reduce under
    ``torch.distributed``, the mode policy, the per-batch cache and its
    invalidation when parameters or buffers change in place, the route of
    block products (``block``, ``max_block``, :meth:`choose_block`), and the
    full-data ``loss()``/``gradient()``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        data: Any,
        *,
        params: Iterable[Tensor] | Iterable[str] | None = None,
        mode: Literal["eval", "train"] = "eval",
        loss_reduction: Literal["mean", "sum"] | None = None,
        max_cached_batches: int = 4,
        batch_fn: Callable[[Any], Any] | None = None,
        block: Literal["auto", "loop", "batched"] = "auto",
        max_block: int = 8,
    ) -> None:
        check_int("max_cached_batches", max_cached_batches, ge=0)
        check_choice("block", block, BLOCK_ROUTES)
        check_int("max_block", max_block, ge=1)
        if not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be callable; got {type(loss_fn).__name__}."
            )
        self.fmodel = FunctionalModel(model, params, mode=mode)  # type: ignore[arg-type]
        self.loss_fn = loss_fn
        self.loss_reduction = detect_reduction(loss_fn, loss_reduction)
        # an empty shard joins with zeros
        batches = local_batches(data, batch_fn)
        self.cacheable = (
            isinstance(batches, (list, tuple)) and len(batches) <= max_cached_batches
        )
        if isinstance(batches, (list, tuple)):
            dev = self.fmodel.device
            # an empty batch would add a NaN mean loss: it contributes nothing
            batches = [
                (to_device(x, dev), to_device(y, dev))
                for x, y in batches
                if batch_size(y) > 0
            ]
            with torch.inference_mode(False):
                batches = [outside_inference((x, y)) for x, y in batches]
        self._data = batches
        self.num_samples = self.fmodel.total_count(self._batches())
        if self.num_samples == 0:
            where = " on every rank" if distributed.is_distributed() else ""
            raise ValueError(f"`data` is empty{where}: it yields no samples.")
        super().__init__(
            self.fmodel.numel,
            self.fmodel.dtype,
            self.fmodel.device,
            self.fmodel.shapes,
        )
        self._cache: list[BatchTerm] | None = None
        self._cache_key: tuple[int, ...] | None = None
        self.block = block
        self.max_block = max_block
        self.block_used: str = "loop" if block == "auto" else block

    # --- data ------------------------------------------------------------------
    def _batches(self) -> Iterator[Batch]:
        dev = self.fmodel.device
        if isinstance(self._data, list):
            yield from self._data
            return
        # A shuffling DataLoader draws its order from the global CPU RNG: restore
        # it afterwards, so the caller's RNG is untouched and every pass sees the
        # same batches (a fixed operator, also in train mode).
        with preserve_global_rng():
            for i, (x, y) in enumerate(self._data):
                check_batch(x, y, index=i)
                if batch_size(y) > 0:
                    with torch.inference_mode(False):
                        x, y = outside_inference((to_device(x, dev), to_device(y, dev)))
                    yield x, y

    def _weight(self, targets: Tensor) -> float:
        if self.loss_reduction == "sum":
            return 1.0
        return batch_size(targets) / self.num_samples

    def _batch_loss(self, params: Sequence[Tensor], x: Any, y: Tensor) -> Tensor:
        return scalar_loss(self.loss_fn, self.fmodel(params, x), y)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        # inference_mode(False): the graphs are built even when the caller is
        # inside torch.inference_mode (e.g. a Lightning validation hook)
        with (
            self.fmodel.policy(),
            math_sdpa(),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            yield

    # --- cache -----------------------------------------------------------------
    def _state_key(self) -> tuple[int, ...]:
        model = self.fmodel.model
        tensors = [*model.parameters(), *model.buffers()]
        return tuple(t._version for t in tensors)

    def _make_term(self, x: Any, y: Tensor) -> BatchTerm:  # pragma: no cover
        raise NotImplementedError

    def _terms(self) -> Iterator[tuple[BatchTerm, float]]:
        """Yield each batch's term and weight (from the cache when it is valid).

        Terms are built under the mode policy; cached reverse-mode terms are then
        applied without it (a backward through a kept graph runs no module code),
        which on small models halves the cost of a product. Terms that rerun the
        model per product (``needs_context``) are applied under it.
        """
        if self.cacheable:
            key = self._state_key()
            if self._cache is None or key != self._cache_key:
                self.release()
                with self._context():
                    self._cache = [self._make_term(x, y) for x, y in self._batches()]
                self._cache_key = key
            weights = [self._weight(y) for _, y in self._data]
            for term, w in zip(self._cache, weights, strict=True):
                with self._context() if term.needs_context else _no_context():
                    yield term, w
            return
        with self._context():
            for x, y in self._batches():
                yield self._make_term(x, y), self._weight(y)

    def release(self) -> None:
        """Free the cached per-batch graphs (rebuilt on the next product if needed)."""
        self._cache = None
        self._cache_key = None

    close = release

    def __enter__(self) -> DataOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    # --- products ----------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:
        # ordinary tensors throughout, also under torch.inference_mode (the
        # products are written in place while the graphs' context is active)
        with torch.inference_mode(False):
            V = outside_inference(V)
            if V.shape[1] > 1 and self.block_used == "batched":
                return self._matmat_batched(V)
            return self._matmat_loop(V)

    @full_precision
    def choose_block(
        self, k: int | None = None, *, repeats: int = 3, seed: int = 0
    ) -> dict[str, float]:
        """Time both block routes on this operator and keep the faster one.

        Applies a seeded random ``(P, k)`` block once to build the cached graphs,
        then ``repeats`` times per route, interleaved, and sets
        :attr:`block_used` to the route of the smaller median. Under
        ``torch.distributed`` the times are summed over ranks first, so every
        rank picks the same route. These products are not counted in
        :attr:`n_matvec`. The choice depends on timing, and the two routes agree
        to rounding only: pass ``block=`` explicitly where results must be
        reproducible bit for bit.

        Args:
            k: Columns per timed product; default :attr:`max_block`.
            repeats: Timed products per route. Default: ``3``.
            seed: Seed of the random block. Default: ``0``.

        Returns:
            Median seconds per column of each route, ``{"loop": ..., "batched": ...}``.

        Raises:
            ValueError: If ``k`` < 2 or ``repeats`` < 1.
        """
        k = self.max_block if k is None else k
        check_int("k", k, ge=2)
        check_int("repeats", repeats, ge=1)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        V = torch.randn(self._size, k, generator=gen, dtype=self.dtype, device="cpu")
        V = V.to(self.device)
        routes = {"loop": self._matmat_loop, "batched": self._matmat_batched}
        times: dict[str, list[float]] = {r: [] for r in routes}
        routes["loop"](V)  # builds (and caches) the per-batch graphs

        def sync() -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        for i in range(repeats):
            for r in sorted(routes, reverse=i % 2 == 1):
                sync()
                t0 = time.perf_counter()
                routes[r](V)
                sync()
                times[r].append(time.perf_counter() - t0)
        med = torch.tensor(
            [statistics.median(times[r]) / k for r in routes],
            dtype=torch.float64,
            device="cpu",
        )
        med = distributed.all_reduce_sum(med.to(self.device)).cpu()
        self.block_used = "batched" if med[1] < med[0] else "loop"
        return {r: float(t) for r, t in zip(routes, med, strict=True)}

    def _matmat_batched(self, V: Tensor) -> Tensor:
        """Each batch term on ``max_block`` columns at a time, in one pass each.

        Works on the transposed block ``(k, P)``, whose rows (the columns of
        ``V``) split into per-parameter views with a leading dimension; the
        weighting is the loop's, operation for operation.
        """
        k = V.shape[1]
        VT = V.T.contiguous()
        outT = torch.empty_like(VT)
        spans, i = [], 0
        for s in self.param_shapes:
            spans.append((i, i + s.numel(), s))
            i += s.numel()
        chunks = [
            slice(a, min(a + self.max_block, k)) for a in range(0, k, self.max_block)
        ]
        first = True
        for term, w in self._terms():
            for c in chunks:
                q = c.stop - c.start
                vs = [VT[c, a:b].view(q, *s) for a, b, s in spans]
                hv = term.apply_block(vs)
                dst = outT[c]
                for (a, b, s), h in zip(spans, hv, strict=True):
                    d = dst[:, a:b].view(q, *s)
                    if first:
                        d.copy_(h)
                    else:
                        d.add_(h, alpha=w)
                if first and w != 1.0:
                    dst.mul_(w)
            first = False
        if first:  # no local batch (an empty shard or loader): contributes zero
            outT.zero_()
        return distributed.all_reduce_sum(outT.T.contiguous())

    def _matmat_loop(self, V: Tensor) -> Tensor:
        out = torch.empty_like(V, memory_format=torch.contiguous_format)
        first = True
        for term, w in self._terms():
            for j in range(V.shape[1]):
                hv = term.apply(self.unflatten(V[:, j]))
                col = out[:, j]
                if first:
                    # one copy per parameter straight into the output column
                    # (no zero fill, no intermediate concatenation)
                    for dst, h in zip(self.unflatten(col), hv, strict=True):
                        dst.copy_(h)
                    if w != 1.0:
                        col.mul_(w)
                else:
                    for dst, h in zip(self.unflatten(col), hv, strict=True):
                        dst.add_(h, alpha=w)
            first = False
        if first:  # no local batch (an empty shard or loader): contributes zero
            out.zero_()
        return distributed.all_reduce_sum(out)

    # --- full-data loss and gradient --------------------------------------------
    def _loss_and_grad(self) -> tuple[Tensor, Tensor]:
        params = [p.detach() for p in self.fmodel.params]
        with self._context():  # ordinary tensors, also under torch.inference_mode
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            grad = torch.zeros(self._size, dtype=self.dtype, device=self.device)
            for x, y in self._batches():
                g, val = torch.func.grad_and_value(
                    lambda ps, x=x, y=y: self._batch_loss(ps, x, y)
                )(params)
                w = self._weight(y)
                loss += w * val.detach()
                grad += w * torch.cat([t.detach().reshape(-1) for t in g])
        both = distributed.all_reduce_sum(torch.cat([loss.reshape(1), grad]))
        return both[0], both[1:]

    def loss(self) -> float:
        """Return the full-data loss (mean or sum over all samples, all ranks).

        Returns:
            The loss as a Python float.
        """
        return float(self._loss_and_grad()[0])

    def gradient(self) -> Tensor:
        """Return the full-data gradient, flat.

        Returns:
            The gradient, shape ``(P,)``, in the operator's dtype and device.
        """
        return self._loss_and_grad()[1]
