"""A minimal symmetric linear operator on flat parameter vectors.

Every curvature matrix in the package (Hessian, GGN, explicit matrices in tests)
is a :class:`LinearOperator`: it knows its size ``P``, dtype and device, applies
itself to vectors ``(P,)`` and blocks ``(P, k)``, and counts its matrix-vector
products in :attr:`LinearOperator.n_matvec` (a block of ``k`` columns counts ``k``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_finite_tensor, check_int
from .._model import full_precision

__all__ = ["DenseOperator", "LinearOperator"]


class LinearOperator:
    """Base class: a symmetric ``P x P`` operator.

    Subclasses implement :meth:`_matmat` on a validated ``(P, k)`` block in the
    operator's dtype and device. Inputs may also be given as a list of tensors
    shaped like :attr:`param_shapes` (one per parameter); the result then comes
    back in the same form. The eigensolvers, the trace, diagonal and Frobenius
    estimators and :func:`~geoopt_sgd.spectral_density` take any such operator, so
    a curvature matrix of your own (a damped Hessian, a Kronecker factorisation)
    runs through them by subclassing.

    Args:
        size: The dimension ``P``.
        dtype: The floating dtype of the vectors it takes and returns.
        device: Where those vectors live.
        param_shapes: Shapes whose sizes add up to ``P``, for the per-parameter
            form (:meth:`flatten` / :meth:`unflatten`); ``None`` for one flat
            part.

    Attributes:
        n_matvec: Matrix-vector products applied so far.

    Raises:
        TypeError: If ``size`` is not an integer, ``dtype`` is not a floating
            ``torch.dtype`` or ``param_shapes`` is not a sequence of shapes.
        ValueError: If ``size`` is below 1, ``device`` is not a device, or the
            sizes of ``param_shapes`` do not add up to ``size``.

    Example:
        >>> import torch
        >>> class Damped(LinearOperator):
        ...     def __init__(self, base, damping):
        ...         super().__init__(base.shape[0], base.dtype, base.device)
        ...         self.base, self.damping = base, damping
        ...
        ...     def _matmat(self, V):
        ...         return self.base.matmat(V) + self.damping * V
        >>> A = Damped(DenseOperator(torch.diag(torch.tensor([3.0, 1.0]))), 0.5)
        >>> A.matvec(torch.tensor([1.0, 1.0]))
        tensor([3.5000, 1.5000])
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        param_shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        check_int("size", size, ge=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(
                "`dtype` must be a floating torch.dtype (e.g. torch.float32); "
                f"got {dtype!r} ({type(dtype).__name__})."
            )
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"`device` must be a torch.device or a device string; got {device!r}."
            ) from err
        if param_shapes is None:
            shapes = [torch.Size([size])]
        else:
            if isinstance(param_shapes, (Tensor, str)) or not isinstance(
                param_shapes, Sequence
            ):
                raise TypeError(
                    "`param_shapes` must be a sequence of shapes; got "
                    f"{type(param_shapes).__name__}."
                )
            try:
                shapes = [torch.Size(s) for s in param_shapes]
            except (TypeError, ValueError) as err:
                raise TypeError(
                    "`param_shapes` must be a sequence of shapes; got "
                    f"{param_shapes!r}."
                ) from err
            if any(d < 0 for s in shapes for d in s):
                raise ValueError(
                    f"`param_shapes` has a negative dimension: {param_shapes!r}."
                )
            total = sum(s.numel() for s in shapes)
            if total != size:
                raise ValueError(
                    f"`param_shapes` hold {total} entries in all; the operator has "
                    f"size {size}."
                )
        self._size = size
        self.dtype = dtype
        self.device = device
        self.param_shapes = shapes
        self.n_matvec = 0

    @property
    def shape(self) -> tuple[int, int]:
        """The operator's shape ``(P, P)``."""
        return (self._size, self._size)

    def reset_counter(self) -> None:
        """Set :attr:`n_matvec` back to zero."""
        self.n_matvec = 0

    # --- conversion between flat vectors and per-parameter lists ---------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat ``(P,)`` vector.

        Args:
            tensors: One tensor per parameter, shaped like :attr:`param_shapes`.

        Returns:
            The flat vector, in the operator's dtype and device.

        Raises:
            ValueError: If the number or shapes of the tensors do not match.
        """
        if len(tensors) != len(self.param_shapes):
            raise ValueError(
                f"expected {len(self.param_shapes)} per-parameter tensors, "
                f"got {len(tensors)}."
            )
        for i, (t, s) in enumerate(zip(tensors, self.param_shapes, strict=True)):
            if t.shape != s:
                raise ValueError(
                    f"per-parameter tensor {i}: expected shape {tuple(s)}, "
                    f"got {tuple(t.shape)}."
                )
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.device, self.dtype)

    def unflatten(self, v: Tensor) -> list[Tensor]:
        """Split a flat ``(P,)`` vector into per-parameter tensors (views).

        Args:
            v: A flat vector ``(P,)``.

        Returns:
            One view of ``v`` per entry of :attr:`param_shapes`.

        Raises:
            TypeError: If ``v`` is not a tensor.
            ValueError: If ``v`` is not ``(P,)``.
        """
        if not isinstance(v, Tensor):
            raise TypeError(f"`v` must be a torch.Tensor; got {type(v).__name__}.")
        if v.dim() != 1 or v.shape[0] != self._size:
            raise ValueError(
                f"`v`: expected shape ({self._size},), got {tuple(v.shape)}."
            )
        out, i = [], 0
        for s in self.param_shapes:
            n = s.numel()
            out.append(v[i : i + n].view(s))
            i += n
        return out

    # --- products -------------------------------------------------------------
    def _prepare(self, name: str, V: Tensor) -> Tensor:
        if not isinstance(V, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor; got {type(V).__name__}.")
        if V.shape[0] != self._size:
            raise ValueError(
                f"`{name}`: expected leading dimension P = {self._size}, "
                f"got shape {tuple(V.shape)}."
            )
        if V.is_complex():
            raise TypeError(
                f"`{name}` must be real; got dtype {V.dtype} (the operator is real "
                "symmetric: apply it to the real and imaginary parts separately)."
            )
        if V.is_meta:
            raise ValueError(
                f"`{name}` is on the meta device (it has no data); pass a tensor on "
                f"{self.device}."
            )
        check_finite_tensor(name, V)
        return V.to(device=self.device, dtype=self.dtype)

    @full_precision
    def matvec(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Apply the operator to one vector.

        Args:
            v: A flat vector ``(P,)``, or a list of per-parameter tensors.

        Returns:
            ``A v`` in the same form as ``v``, in the operator's dtype and device.

        Raises:
            TypeError: If ``v`` is not a tensor or a list of tensors, or is complex.
            ValueError: If ``v`` has the wrong length or non-finite entries, or
                is on the meta device.
        """
        if isinstance(v, (list, tuple)):
            return self.unflatten(self.matvec(self.flatten(v)))
        if not isinstance(v, Tensor):
            raise TypeError(f"`v` must be a torch.Tensor; got {type(v).__name__}.")
        if v.dim() != 1:
            raise ValueError(
                f"`v`: expected shape ({self._size},), got {tuple(v.shape)}."
            )
        v = self._prepare("v", v)
        out = self._matmat(v.unsqueeze(1)).squeeze(1)
        self.n_matvec += 1
        return out

    @full_precision
    def matmat(self, V: Tensor) -> Tensor:
        """Apply the operator to a block of vectors.

        Args:
            V: A block ``(P, k)``.

        Returns:
            ``A V``, shape ``(P, k)``.

        Raises:
            TypeError: If ``V`` is not a tensor, or is complex.
            ValueError: If ``V`` is not ``(P, k)``, has non-finite entries or is on
                the meta device.
        """
        if not isinstance(V, Tensor):
            raise TypeError(f"`V` must be a torch.Tensor; got {type(V).__name__}.")
        if V.dim() != 2:
            raise ValueError(
                f"`V`: expected shape ({self._size}, k), got {tuple(V.shape)}."
            )
        V = self._prepare("V", V)
        if V.shape[1] == 0:
            return V.clone()
        out = self._matmat(V)
        self.n_matvec += V.shape[1]
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)  # type: ignore[return-value]

    def _matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} must implement `_matmat(V)`: the product with a "
            "(P, k) block, in the operator's dtype and device."
        )

    @full_precision
    def to_dense(self) -> Tensor:
        """Materialise the operator as a dense ``(P, P)`` matrix (P products).

        Meant for small operators in tests and debugging.
        """
        eye = torch.eye(self._size, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self._size}, dtype={self.dtype}, "
            f"device={self.device}, n_matvec={self.n_matvec})"
        )


class DenseOperator(LinearOperator):
    """Wrap an explicit symmetric matrix as a :class:`LinearOperator`.

    Args:
        matrix: A symmetric ``(P, P)`` tensor.

    Raises:
        TypeError: If ``matrix`` is not a tensor, or is complex.
        ValueError: If ``matrix`` is not square.

    Example:
        >>> import torch
        >>> A = DenseOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> A.matvec(torch.tensor([1.0, 1.0]))
        tensor([3., 1.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor):
            raise TypeError(
                f"`matrix` must be a torch.Tensor; got {type(matrix).__name__} "
                "(convert with torch.as_tensor)."
            )
        if matrix.is_complex():
            raise TypeError(f"`matrix` must be real; got dtype {matrix.dtype}.")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"`matrix` must be square (P, P); got shape {tuple(matrix.shape)}."
            )
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V
