"""The operator base class a user subclasses: its constructor and conversions."""

import pytest
import torch

from geoopt_sgd import LinearOperator, top_eigenpairs


class _Matrix(LinearOperator):
    def __init__(self, A, param_shapes=None):
        super().__init__(A.shape[0], A.dtype, A.device, param_shapes)
        self.A = A

    def _matmat(self, V):
        return self.A @ V


def test_a_user_subclass_runs_the_eigensolver_against_the_dense_spectrum():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 10.0, 30, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    op = _Matrix(A, [(5, 4), (10,)])
    res = top_eigenpairs(op, 3, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, lam.flip(0)[:3], rtol=1e-8, atol=0)
    assert op.n_matvec == res.n_matvec > 0
    parts = op.unflatten(torch.arange(30.0, dtype=torch.float64))
    assert [tuple(p.shape) for p in parts] == [(5, 4), (10,)]
    assert parts[1][0] == 20.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"size": 0}, ValueError, r"`size` must be >= 1; got 0"),
        ({"size": 3.0}, TypeError, r"`size` must be an integer; got float"),
        ({"size": True}, TypeError, r"`size` must be an integer; got bool"),
        ({"dtype": torch.int64}, TypeError, r"`dtype` must be a floating.*int64"),
        ({"dtype": "float32"}, TypeError, r"`dtype` must be a floating.*str"),
        ({"device": "gpu"}, ValueError, r"`device`.*'gpu'"),
        ({"param_shapes": [(2,), (2,)]}, ValueError, r"`param_shapes`.*4.*size 6"),
        ({"param_shapes": [(2, -1)]}, ValueError, r"`param_shapes`"),
        ({"param_shapes": 6}, TypeError, r"`param_shapes`"),
    ],
)
def test_the_constructor_refuses_bad_arguments_by_name(kwargs, error, match):
    args = {"size": 6, "dtype": torch.float64, "device": "cpu"} | kwargs
    with pytest.raises(error, match=match):
        LinearOperator(**args)


def test_unflatten_refuses_a_vector_of_the_wrong_length():
    op = _Matrix(torch.eye(6, dtype=torch.float64), [(2, 2), (2,)])
    for bad in (torch.zeros(5), torch.zeros(7), torch.zeros(6, 1)):
        with pytest.raises(ValueError, match=r"`v`: expected shape \(6,\)"):
            op.unflatten(bad)


def test_a_subclass_without_matmat_says_what_to_implement():
    class NoProduct(LinearOperator):
        pass

    op = NoProduct(3, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="NoProduct.*_matmat"):
        op.matvec(torch.ones(3))
    assert op.n_matvec == 0
