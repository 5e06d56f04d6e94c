import pytest
import torch

from geoopt_sgd._checks import check_finite_tensor


def test_finite_check_accepts_finite_vector_whose_sum_overflows():
    # the fast path sums the vector; an overflowing sum of finite entries must fall
    # back to the exact check, not raise
    v = torch.full((4,), 3.0e38, dtype=torch.float32)
    assert not torch.isfinite(v.sum())
    check_finite_tensor("v", v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_rejects_nonfinite_entries(bad):
    v = torch.ones(1000, dtype=torch.float32)
    v[17] = bad
    with pytest.raises(ValueError, match=r"`v` must be finite; it has 1 non-finite"):
        check_finite_tensor("v", v)


def test_finite_check_integer_tensor():
    # integer tensors skip the floating-point fast path and are always finite
    assert check_finite_tensor("v", torch.arange(5)) is None
