"""Any batch structure through `batch_fn`: dict batches and multi-input models.

Every entry point that takes data gives, with `batch_fn`, the result it gives on
the equivalent plain `(tensor, tensor)` data with a wrapper model that splits one
input tensor into the same arguments (the same operations, so bit for bit).
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from geoopt_sgd import (
    GGNOperator,
    HessianOperator,
    NoiseProbe,
    NoisyGD,
    expected_sharpness,
    noise_geometry,
    per_sample_gradients,
    sharpness,
)

D = torch.float64


class TwoIn(nn.Module):
    """A model of two inputs, ``model(x1, x2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x1, x2):
        return self.b(torch.tanh(self.a(x1)) * x2)


class KwIn(nn.Module):
    """An HF-style model of keyword inputs, ``model(input_ids=..., mask=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, input_ids=None, mask=None):
        return self.b(torch.tanh(self.a(input_ids)) * mask)


class Flat(nn.Module):
    """The same model on one tensor ``cat(x1, x2)``: the plain-data reference."""

    def __init__(self, inner: nn.Module, keywords: bool) -> None:
        super().__init__()
        self.inner, self.keywords = inner, keywords

    def forward(self, x):
        x1, x2 = x[:, :3], x[:, 3:]
        if self.keywords:
            return self.inner(input_ids=x1, mask=x2)
        return self.inner(x1, x2)


def _raw(n_batches: int = 3, b: int = 4):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "x1": torch.randn(b, 3, generator=g, dtype=D),
            "x2": torch.randn(b, 4, generator=g, dtype=D),
            "label": torch.randn(b, 2, generator=g, dtype=D),
        }
        for _ in range(n_batches)
    ]


def _plain(raw):
    return [(torch.cat([r["x1"], r["x2"]], 1), r["label"]) for r in raw]


def _tuple_fn(b):
    return (b["x1"], b["x2"]), b["label"]


def _list_fn(b):
    return [b["x1"], b["x2"]], b["label"]


def _dict_fn(b):
    return {"input_ids": b["x1"], "mask": b["x2"]}, b["label"]


class _Rows(Dataset):
    def __init__(self, raw):
        self.rows = [
            {k: v[i] for k, v in r.items()} for r in raw for i in range(len(r["x1"]))
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _loader(raw):
    return DataLoader(_Rows(raw), batch_size=len(raw[0]["x1"]), shuffle=False)


CASES = [
    ("tuple", TwoIn, _tuple_fn),
    ("list", TwoIn, _list_fn),
    ("dict", KwIn, _dict_fn),
]


def _models(make):
    torch.manual_seed(0)
    inner = make().double()
    return inner, Flat(inner, keywords=make is KwIn)


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, make, fn = request.param
    inner, flat = _models(make)
    return inner, flat, fn


@pytest.mark.parametrize("container", ["list", "loader"])
@pytest.mark.parametrize("Op", [HessianOperator, GGNOperator])
def test_operators(case, Op, container):
    inner, flat, fn = case
    raw = _raw()
    data = raw if container == "list" else _loader(raw)
    got = Op(inner, nn.MSELoss(), data, batch_fn=fn).to_dense()
    want = Op(flat, nn.MSELoss(), _plain(raw)).to_dense()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_one_dict_batch(case):
    inner, flat, fn = case
    raw = _raw(1)
    got = HessianOperator(inner, nn.MSELoss(), raw[0], batch_fn=fn).to_dense()
    want = HessianOperator(flat, nn.MSELoss(), _plain(raw)[0]).to_dense()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_multi_input_batch_without_batch_fn():
    """`((x1, x2), y)` is one batch as is, no list around it needed."""
    inner, flat = _models(TwoIn)
    raw = _raw(1)
    batch = _tuple_fn(raw[0])
    got = HessianOperator(inner, nn.MSELoss(), batch).to_dense()
    want = HessianOperator(flat, nn.MSELoss(), _plain(raw)[0]).to_dense()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sharpness(case):
    inner, flat, fn = case
    raw = _raw()
    kw = dict(k=2, trace_probes=3, seed=1)
    got = sharpness(inner, nn.MSELoss(), _loader(raw), batch_fn=fn, **kw)
    want = sharpness(flat, nn.MSELoss(), _plain(raw), **kw)
    assert got.lambda_max == pytest.approx(want.lambda_max, abs=1e-12)
    assert got.lambda_min == pytest.approx(want.lambda_min, abs=1e-12)
    assert got.trace == pytest.approx(want.trace, abs=1e-12)
    assert got.frobenius == pytest.approx(want.frobenius, abs=1e-12)


def test_expected_sharpness(case):
    inner, flat, fn = case
    raw = _raw()
    kw = dict(sigma=0.1, num_samples=4, seed=2)
    got = expected_sharpness(inner, nn.MSELoss(), raw, batch_fn=fn, **kw)
    want = expected_sharpness(flat, nn.MSELoss(), _plain(raw), **kw)
    assert got.value == pytest.approx(want.value, abs=1e-12)
    assert got.stderr == pytest.approx(want.stderr, abs=1e-12)


@pytest.mark.parametrize("route", ["exact", "sketch"])
def test_noise_geometry(case, route):
    inner, flat, fn = case
    raw = _raw()
    kw = dict(k=3, seed=3, route=route, chunk_size=5)
    got = noise_geometry(inner, nn.MSELoss(), _loader(raw), batch_fn=fn, **kw)
    want = noise_geometry(flat, nn.MSELoss(), _plain(raw), **kw)
    assert got.values.keys() == want.values.keys()
    for name, v in want.values.items():
        assert got.values[name] == pytest.approx(v, abs=1e-12, nan_ok=True), name
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=0, atol=1e-12)


def test_noise_geometry_minibatch_train_mode(case):
    inner, flat, fn = case
    raw = _raw()
    kw = dict(k=2, seed=3, cov="minibatch", batch_size=4, mode="train")
    got = noise_geometry(inner, nn.MSELoss(), raw, batch_fn=fn, **kw)
    want = noise_geometry(flat, nn.MSELoss(), _plain(raw), **kw)
    for name, v in want.values.items():
        assert got.values[name] == pytest.approx(v, abs=1e-12, nan_ok=True), name


def _train(model, opt, plain, steps=3):
    for _ in range(steps):
        for x, y in plain:
            opt.zero_grad()
            nn.MSELoss()(model(x), y).backward()
            opt.step()


def test_noise_probe(case):
    inner, flat, fn = case
    raw = _raw()
    plain = _plain(raw)
    records = []
    for model, data, extra in [
        (inner, _loader(raw), {"batch_fn": fn}),
        (flat, plain, {}),
    ]:
        m = copy.deepcopy(flat)
        target = m.inner if model is inner else m
        probe = NoiseProbe(target, nn.MSELoss(), data, every=2, k=2, **extra)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        probe.attach(opt)
        _train(m, opt, plain, steps=2)
        records.append(probe.history)
    got, want = records
    assert len(got) == len(want) >= 2
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name, v in w.items():
            if isinstance(v, float) and "seconds" not in name:
                assert g[name] == pytest.approx(v, abs=1e-12, nan_ok=True), name


@pytest.mark.parametrize("noise", ["hessian", "sgd_matched"])
def test_noisy_gd(case, noise):
    inner, flat, fn = case
    raw = _raw()
    plain = _plain(raw)
    finals = []
    for use_fn in (True, False):
        m = copy.deepcopy(flat)
        src_model = m.inner if use_fn else m
        extra = {"batch_fn": fn} if use_fn else {}
        opt = NoisyGD(
            m.parameters(),
            lr=0.05,
            noise=noise,
            noise_scale=0.5,
            batch_size=4,
            k=2,
            refresh_every=2,
            model=src_model,
            loss_fn=nn.MSELoss(),
            data=_loader(raw) if use_fn else plain,
            seed=4,
            **extra,
        )
        _train(m, opt, plain, steps=2)
        finals.append([p.detach().clone() for p in m.parameters()])
    for g, w in zip(*finals, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_per_sample_gradients(case, mode):
    inner, flat, fn = case
    raw = _raw(1)
    inputs, targets = fn(raw[0])
    ((x, _),) = _plain(raw)
    got = per_sample_gradients(
        inner, nn.MSELoss(), inputs, targets, mode=mode, chunk_size=3
    )
    want = per_sample_gradients(flat, nn.MSELoss(), x, targets, mode=mode, chunk_size=3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# --- without batch_fn: a clear error naming the argument, before any torch call --
def _bad_calls(data):
    inner, _ = _models(KwIn)
    loss = nn.MSELoss()
    return {
        "HessianOperator": lambda: HessianOperator(inner, loss, data),
        "GGNOperator": lambda: GGNOperator(inner, loss, data),
        "sharpness": lambda: sharpness(inner, loss, data),
        "expected_sharpness": lambda: expected_sharpness(inner, loss, data),
        "noise_geometry": lambda: noise_geometry(inner, loss, data, k=2),
        "NoiseProbe": lambda: NoiseProbe(inner, loss, data, k=2),
    }


@pytest.mark.parametrize("container", ["list", "loader", "one"])
@pytest.mark.parametrize(
    "entry",
    [
        "HessianOperator",
        "GGNOperator",
        "sharpness",
        "expected_sharpness",
        "noise_geometry",
        "NoiseProbe",
    ],
)
def test_dict_batches_without_batch_fn(entry, container):
    raw = _raw()
    data = {"list": raw, "loader": _loader(raw), "one": raw[0]}[container]
    call = _bad_calls(data)[entry]
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"`(probe_)?data`.*batch_fn"):
        call()
    assert torch.equal(torch.get_rng_state(), rng)


def test_noise_geometry_keeps_the_global_rng_with_a_shuffling_loader():
    # a shuffling DataLoader draws its sampler's seed from the global generator
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=8, shuffle=True
    )
    model = nn.Linear(3, 2).double()
    rng = torch.get_rng_state()
    noise_geometry(model, nn.MSELoss(), loader, metrics=["mu"], k=2)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("container", ["list", "loader"])
def test_noisy_gd_dict_batches_without_batch_fn(container):
    raw = _raw()
    inner, _ = _models(KwIn)
    data = raw if container == "list" else _loader(raw)

    def build():
        return NoisyGD(
            inner.parameters(),
            lr=0.1,
            noise="hessian",
            k=2,
            batch_size=4,
            model=inner,
            loss_fn=nn.MSELoss(),
            data=data,
        )

    if container == "list":  # checked when built
        with pytest.raises(TypeError, match=r"`data` \(batch 0\).*batch_fn"):
            build()
        return
    opt = build()  # a loader is read at the first refresh, before the update
    before = [p.detach().clone() for p in inner.parameters()]
    inner(input_ids=raw[0]["x1"], mask=raw[0]["x2"]).sum().backward()
    with pytest.raises(TypeError, match=r"`data` \(batch 0\).*batch_fn"):
        opt.step()
    for p, q in zip(inner.parameters(), before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda b: b["x1"], r"returned a Tensor, not an \(inputs, targets\) pair"),
        (lambda b: (b["x1"], b["x2"], b["label"]), r"tuple of length 3"),
        (lambda b: ({"input_ids": b["x1"]}, [1.0]), r"targets must be a tensor"),
        (lambda b: ("text", b["label"]), r"inputs must be a tensor"),
        (lambda b: b, r"a dict with keys"),
    ],
)
def test_batch_fn_returning_a_bad_structure(bad, match):
    inner, _ = _models(KwIn)
    with pytest.raises(TypeError, match=r"`data` \(batch 0\): `batch_fn` returned"):
        HessianOperator(inner, nn.MSELoss(), _raw(), batch_fn=bad)
    with pytest.raises(TypeError, match=match):
        HessianOperator(inner, nn.MSELoss(), _raw(), batch_fn=bad)


def test_batch_fn_not_callable():
    inner, _ = _models(KwIn)
    with pytest.raises(TypeError, match="`batch_fn` must be callable"):
        HessianOperator(inner, nn.MSELoss(), _raw(), batch_fn="x1")
    with pytest.raises(TypeError, match="`batch_fn` must be callable"):
        NoisyGD(
            inner.parameters(),
            lr=0.1,
            noise="hessian",
            batch_size=4,
            model=inner,
            loss_fn=nn.MSELoss(),
            data=_raw(),
            batch_fn=1,
        )


def test_batch_fn_length_mismatch():
    inner, _ = _models(KwIn)

    def short(b):
        return {"input_ids": b["x1"], "mask": b["x2"][:-1]}, b["label"]

    with pytest.raises(ValueError, match="inputs have 3 samples but the targets 4"):
        HessianOperator(inner, nn.MSELoss(), _raw(), batch_fn=short)
    i, t = short(_raw(1)[0])
    with pytest.raises(ValueError, match="inputs have 3 samples"):
        per_sample_gradients(inner, nn.MSELoss(), i, t)


def test_only_empty_data_is_an_empty_shard_under_distributed(monkeypatch):
    # under torch.distributed an empty shard joins the reductions with zeros;
    # a malformed batch (or a batch_fn raising ValueError) is still an error
    from geoopt_sgd import _model, distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    X, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    assert _model.local_batches((X[:0], y[:0])) == []
    assert _model.local_batches([]) == []
    with pytest.raises(ValueError, match="differ|length|samples"):
        _model.local_batches((X, y[:2]))

    def bad_fn(batch):
        raise ValueError("no label in this batch")

    with pytest.raises(ValueError, match="no label"):
        _model.local_batches([{"x": X}], bad_fn)
