"""Block products: ``block="batched"`` against the column loop and dense references.

Every route (the three Hessian HVP routes and the GGN) applies a block of columns
either column by column (``block="loop"``) or ``max_block`` columns per pass
(``block="batched"``). The two are the same float64 sums evaluated with and
without a batch dimension: they agree to rounding (measured 0 to 1e-16 relative
here), checked at rtol 1e-12; both are checked against the dense ``torch.func``
references of :mod:`geoopt_sgd.testing` at the operators' tests' rtol 1e-10.
"""

import pytest
import torch
from cases import image_data, linear, make_data, mlp, tiny_cnn
from torch import nn

from geoopt_sgd.curvature import GGNOperator, HessianOperator
from geoopt_sgd.curvature import hvp as hvp_module
from geoopt_sgd.testing.curvature import assert_close_report, dense_ggn, dense_hessian

RTOL, ATOL = 1e-10, 1e-12  # against the dense references
SAME = 1e-12  # batched against the loop: rounding only
CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()
ROUTES = [
    ("hessian", "double_backward"),
    ("hessian", "rev_rev"),
    ("hessian", "fwd_rev"),
    ("ggn", None),
]
ROUTE_IDS = [f"{op}-{m}" if m else op for op, m in ROUTES]


def _op(kind, method, *args, **kwargs):
    if kind == "hessian":
        return HessianOperator(*args, method=method, **kwargs)
    return GGNOperator(*args, **kwargs)


def _dense(kind, *args, **kwargs):
    return (dense_hessian if kind == "hessian" else dense_ggn)(*args, **kwargs)


def _block(P, k, seed=0):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed)).double()


_REFS = {}


def assert_block_products_match(
    kind, method, model, loss_fn, data, *, key, k=11, max_block=4, **kw
):
    """Batched (ragged chunks: ``k`` not a multiple of ``max_block``), loop, dense.

    The dense reference is computed once per ``(kind, key)``: the Hessian routes
    share it.
    """
    if (kind, key) not in _REFS:
        _REFS[kind, key] = _dense(kind, model, loss_fn, data, **kw)
    ref = _REFS[kind, key]
    loop = _op(kind, method, model, loss_fn, data, block="loop", **kw)
    fast = _op(
        kind, method, model, loss_fn, data, block="batched", max_block=max_block, **kw
    )
    assert fast.block_used == "batched" and loop.block_used == "loop"
    V = _block(ref.shape[0], k)
    got, want = fast.matmat(V), loop.matmat(V)
    scale = float(want.abs().max())
    assert_close_report(got, want, SAME, 1e-14 * scale)
    assert_close_report(got, ref @ V, RTOL, ATOL * max(scale, 1.0))
    assert fast.n_matvec == k
    # the whole matrix, chunk by chunk
    assert_close_report(fast.to_dense(), ref, RTOL, ATOL)
    return fast


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("case", ["mlp-ce", "mlp-mse", "ragged-list", "loader"])
def test_small_models(kind, method, case):
    X, y = make_data(12, classification=case != "mlp-mse")
    loss_fn = MSE if case == "mlp-mse" else CE
    data = (X, y)
    if case == "ragged-list":  # cached terms of unequal weights
        data = [(X[:5], y[:5]), (X[5:10], y[5:10]), (X[10:], y[10:])]
    elif case == "loader":  # streamed: the terms are rebuilt for every product
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X, y), batch_size=5
        )
    op = assert_block_products_match(kind, method, mlp(), loss_fn, data, key=case)
    assert op.cacheable == (case != "loader")


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_modes(kind, method, mode):
    # train mode: batch statistics fixed per batch, through every route's
    # vectorised pass (forward-over-reverse included: vmap of jvp)
    Xi, yi = image_data(10)
    data = [(Xi[:6], yi[:6]), (Xi[6:], yi[6:])]
    model = tiny_cnn()
    before = {k: b.clone() for k, b in model.state_dict().items()}
    assert_block_products_match(
        kind, method, model, CE, data, key=mode, mode=mode, k=7, max_block=3
    )
    # the batched passes leave the running statistics and the flags untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
def test_sum_reduction_and_subset(kind, method):
    X, y = make_data(12)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model = mlp()
    model.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    sel = ["unused", "0.bias", "2.weight"]  # zero rows for the unused one
    op = assert_block_products_match(
        kind,
        method,
        model,
        loss_fn,
        [(X[:7], y[:7]), (X[7:], y[7:])],
        key="sum",
        params=sel,
    )
    # the unused parameter comes first in `sel`: its two rows are exactly zero
    assert torch.equal(
        op.matmat(_block(op.shape[0], 3))[:2], torch.zeros(2, 3).double()
    )


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
def test_zero_curvature_blocks(kind, method):
    # the outputs do not depend on the selected parameter (GGN), or the loss is
    # linear in the parameters (Hessian): an exact zero block of the right shape
    model, X = linear(5, 1), torch.randn(4, 5, dtype=torch.float64)
    model.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def loss_fn(out, target):
        return (out * target).mean()

    data = (X, torch.ones(4, 1, dtype=torch.float64))
    selections = [["unused", "weight"]] + ([["unused"]] if kind == "ggn" else [])
    for sel in selections:
        op = _op(kind, method, model, loss_fn, data, params=sel, block="batched")
        V = _block(op.shape[0], 5)
        assert torch.equal(op.matmat(V), torch.zeros_like(V))


class _Mixed(nn.Module):
    """A float32 layer feeding a float64 layer: float64 vectors, mixed tangents."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.to(self.a.weight.dtype))).double())


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
def test_mixed_float32_float64_parameters(kind, method):
    torch.manual_seed(0)
    model = _Mixed()
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(12, 4, generator=g, dtype=torch.float64),
        torch.randn(12, 2, generator=g, dtype=torch.float64),
    )
    loop = _op(kind, method, model, MSE, data, block="loop")
    fast = _op(kind, method, model, MSE, data, block="batched", max_block=3)
    assert fast.dtype == torch.float64
    V = _block(37, 5)
    want = loop.matmat(V)
    # the float32 layer's products round at float32: agreement to ~1e-7
    assert_close_report(fast.matmat(V), want, 1e-5, 1e-6 * float(want.abs().max()))


class _TwoIn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x1, x2=None, *, mask=None):
        return self.b(torch.tanh(self.a(x1)) * (x2 if mask is None else mask))


def _raw(n_batches=3, b=4):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "x1": torch.randn(b, 3, generator=g, dtype=torch.float64),
            "x2": torch.randn(b, 4, generator=g, dtype=torch.float64),
            "label": torch.randn(b, 2, generator=g, dtype=torch.float64),
        }
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize(("kind", "method"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("inputs", ["tuple", "dict"])
def test_multi_input_and_dict_batches_with_batch_fn(kind, method, inputs):
    torch.manual_seed(0)
    model = _TwoIn().double()
    raw = _raw()
    if inputs == "tuple":
        fn = lambda b: ((b["x1"], b["x2"]), b["label"])  # noqa: E731
    else:
        fn = lambda b: ({"x1": b["x1"], "mask": b["x2"]}, b["label"])  # noqa: E731
    ref = _dense(kind, model, MSE, [fn(b) for b in raw])
    V = _block(ref.shape[0], 6)
    loop = _op(kind, method, model, MSE, raw, batch_fn=fn, block="loop").matmat(V)
    fast = _op(kind, method, model, MSE, raw, batch_fn=fn, block="batched", max_block=4)
    got = fast.matmat(V)
    assert_close_report(got, loop, SAME, 1e-14 * float(loop.abs().max()))
    assert_close_report(got, ref @ V, RTOL, ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_timm_test_resnet(kind):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).double()
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
        torch.tensor([0, 2]),
    )
    method = "double_backward" if kind == "hessian" else None
    # all 374k parameters: batched against the loop
    loop = _op(kind, method, model, CE, data, block="loop")
    fast = _op(kind, method, model, CE, data, block="batched", max_block=2)
    V = _block(loop.shape[0], 3)
    want = loop.matmat(V)
    assert_close_report(fast.matmat(V), want, SAME, 1e-14 * float(want.abs().max()))
    # a subset before the residual blocks and the head: against the dense matrix
    sel = ["conv1.1.weight", "fc.bias"]
    ref = _dense(kind, model, CE, data, params=sel)
    V = _block(ref.shape[0], 5)
    got = _op(kind, method, model, CE, data, params=sel, block="batched").matmat(V)
    assert_close_report(got, ref @ V, RTOL, 1e-12 * float((ref @ V).abs().max()))


def test_matvec_and_default_unchanged_and_block_cap(monkeypatch):
    X, y = make_data(12)
    model = mlp()
    default = HessianOperator(model, CE, (X, y))
    assert default.block == "auto" and default.block_used == "loop"
    loop = HessianOperator(model, CE, (X, y), block="loop")
    fast = HessianOperator(model, CE, (X, y), block="batched", max_block=4)
    v = _block(57, 1)[:, 0]
    # one column is always the single-vector product: bit for bit
    assert torch.equal(fast.matvec(v), loop.matvec(v))
    assert torch.equal(fast.matmat(v[:, None]), loop.matvec(v)[:, None])
    assert torch.equal(default.matmat(_block(57, 5)), loop.matmat(_block(57, 5)))
    # memory is bounded: no pass carries more than max_block columns
    seen = []
    apply_block = hvp_module.BatchTerm.apply_block

    def spy(self, vs):
        seen.append(vs[0].shape[0])
        return apply_block(self, vs)

    monkeypatch.setattr(hvp_module.BatchTerm, "apply_block", spy)
    # the generic column-loop fallback of a term without a vectorised pass
    term = hvp_module.BatchTerm()
    term.apply = lambda vs: [2 * v for v in vs]
    out = term.apply_block([torch.ones(3, 2), torch.ones(3)])
    assert [tuple(t.shape) for t in out] == [(3, 2), (3,)] and seen == [3]
    seen.clear()
    monkeypatch.setattr(
        hvp_module.DataOperator,
        "_terms",
        lambda self, orig=hvp_module.DataOperator._terms: (
            (_Spied(t), w) for t, w in orig(self)
        ),
    )
    fast.matmat(_block(57, 10))
    assert seen == [4, 4, 2]


class _Spied(hvp_module.BatchTerm):
    """Route a term's block products through ``BatchTerm.apply_block`` (spied)."""

    def __init__(self, term):
        self.term = term

    def apply(self, vs):
        return self.term.apply(vs)


@pytest.mark.parametrize("Op", [HessianOperator, GGNOperator])
def test_choose_block_times_both_routes_and_keeps_one(Op):
    X, y = make_data(12)
    op = Op(mlp(), CE, [(X[:6], y[:6]), (X[6:], y[6:])], max_block=3)
    V = _block(57, 5)
    want = Op(mlp(), CE, (X, y), block="loop").matmat(V)
    per_column = op.choose_block(repeats=2)
    assert set(per_column) == {"loop", "batched"}
    assert all(t > 0 for t in per_column.values())
    faster = min(per_column, key=per_column.get)
    assert op.block_used == faster and op.block == "auto"
    assert op.n_matvec == 0  # timing products are not counted
    assert_close_report(op.matmat(V), want, SAME, 1e-14 * float(want.abs().max()))
    with pytest.raises(ValueError, match="`k` must be >= 2; got 1"):
        op.choose_block(1)


def test_errors():
    X, y = make_data(12)
    with pytest.raises(ValueError, match="`block` must be one of 'auto', 'loop'"):
        HessianOperator(mlp(), CE, (X, y), block="vmap")
    with pytest.raises(ValueError, match="`max_block` must be >= 1; got 0"):
        GGNOperator(mlp(), CE, (X, y), max_block=0)
