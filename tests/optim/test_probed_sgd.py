"""ProbedSGD is torch.optim.SGD, bit for bit, with a probe that changes nothing."""

import copy
import io
import itertools

import pytest
import torch
from cases import make_data, mlp

from geoopt_sgd import NoiseProbe, ProbedSGD


def _params(seed=0, shapes=((3, 4), (4,), (2, 3))):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
        for s in shapes
    ]


def _grads(params, step, *, none_index=None):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        if none_index is not None and i == none_index and step % 2 == 0:
            p.grad = None  # skipped parameter on even steps
        else:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(cls, kwargs, *, steps=5, groups=False, none_index=2):
    params = _params()
    if groups:  # mixed-lr param groups
        spec = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    else:
        spec = params
    opt = cls(spec, **kwargs)
    for t in range(steps):
        _grads(params, t, none_index=none_index)
        opt.step()
    return params, opt


def _assert_same(pa, oa, pb, ob):
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)  # bit-for-bit: same kernels, same order of ops
    sa, sb = oa.state_dict(), ob.state_dict()
    sa.pop("probe", None)
    sb.pop("probe", None)
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for key in sa["state"][k]:
            x, y = sa["state"][k][key], sb["state"][k][key]
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y)


_GRID = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx, foreach=fe)
    for m, d, n, wd, mx, fe in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.01), (False, True), (False, True)
    )
    if not (n and (m == 0 or d != 0))
]


def _id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kwargs", _GRID, ids=[_id(k) for k in _GRID])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["lr=float", "lr=tensor"])
def test_matches_torch_sgd_bit_for_bit(kwargs, tensor_lr):
    lr = torch.tensor(0.1, dtype=torch.float64) if tensor_lr else 0.1
    kw = dict(kwargs, lr=lr)
    pa, oa = _run(torch.optim.SGD, copy.deepcopy(kw))
    pb, ob = _run(ProbedSGD, copy.deepcopy(kw))
    _assert_same(pa, oa, pb, ob)


@pytest.mark.parametrize(
    "extra",
    [dict(groups=True), dict(none_index=None)],
    ids=["mixed-lr-groups", "all-grads"],
)
def test_matches_torch_sgd_groups_and_skips(extra):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    pa, oa = _run(torch.optim.SGD, kw, **extra)
    pb, ob = _run(ProbedSGD, kw, **extra)
    _assert_same(pa, oa, pb, ob)


def test_matches_torch_sgd_fused():
    kw = {"lr": 0.1, "momentum": 0.9, "fused": True}
    # all grads present: torch's fused kernel itself fails when a parameter first
    # gets a gradient after step 1 (its is_first_step looks at buffer 0 only)
    try:
        pa, oa = _run(torch.optim.SGD, kw, none_index=None)
    except RuntimeError as e:  # fused not supported on this device/dtype
        pytest.skip(str(e))
    pb, ob = _run(ProbedSGD, kw, none_index=None)
    _assert_same(pa, oa, pb, ob)


def _differentiable_run(cls):
    # differentiable=True steps non-leaf tensors; the result keeps a graph back to
    # the leaves, so the step itself can be differentiated
    leaves = _params()
    params = [p.clone() for p in leaves]
    for p in params:
        p.retain_grad()
    opt = cls(params, lr=0.1, momentum=0.9, differentiable=True)
    for t in range(3):
        g = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    total = sum((p**2).sum() for p in params)
    return params, torch.autograd.grad(total, leaves)


def test_matches_torch_sgd_differentiable():
    pa, ga = _differentiable_run(torch.optim.SGD)
    pb, gb = _differentiable_run(ProbedSGD)
    for a, b in zip(pa + list(ga), pb + list(gb), strict=True):
        assert torch.equal(a, b)


def test_with_probe_matches_torch_sgd(measure):
    # a probe whose measurement is a no-op still leaves the trajectory equal
    model = mlp()
    measure(_noop)
    probe = NoiseProbe(model, torch.nn.MSELoss(), make_data(), every=2)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True)
    pa, oa = _run(torch.optim.SGD, kw)
    params = _params()
    ob = ProbedSGD(params, **kw, probe=probe)
    for t in range(5):
        _grads(params, t, none_index=2)
        ob.step()
    _assert_same(pa, oa, params, ob)
    assert probe.step_count == 5 and probe.num_probes == 2


def _noop(model, loss_fn, data, **kwargs):
    class R:
        values = {"loss": 1.0}
        eigenvectors = None

        def as_dict(self):
            return dict(self.values)

    return R()


def test_defaults_and_signature_match_torch():
    import inspect

    a = inspect.signature(torch.optim.SGD.__init__).parameters
    b = inspect.signature(ProbedSGD.__init__).parameters
    for name, p in a.items():
        assert b[name].default == p.default and b[name].kind == p.kind, name
    assert list(b)[: len(a)] == list(a)
    assert b["probe"].kind is inspect.Parameter.KEYWORD_ONLY
    opt = ProbedSGD(_params())
    assert opt.defaults == torch.optim.SGD(_params()).defaults  # no probe in groups
    assert "probe" not in opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)


def test_named_parameters_keep_names():
    model = mlp()
    a = torch.optim.SGD(model.named_parameters(), lr=0.1)
    b = ProbedSGD(model.named_parameters(), lr=0.1)
    assert a.param_groups[0]["param_names"] == b.param_groups[0]["param_names"]
    assert b.state_dict()["param_groups"][0]["param_names"][0] == "0.weight"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(lr=-0.1), ValueError, "Invalid learning rate: -0.1"),
        (dict(momentum=-0.5), ValueError, "Invalid momentum value: -0.5"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum"),
        (
            dict(lr=torch.tensor([0.1, 0.2])),
            ValueError,
            "Tensor lr must be 1-element",
        ),
        (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
    ],
    ids=["lr", "momentum", "weight_decay", "nesterov", "tensor-lr", "fused-foreach"],
)
def test_validation_same_as_torch(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        torch.optim.SGD(_params(), **kwargs)
    with pytest.raises(exc, match=match):
        ProbedSGD(_params(), **kwargs)


def test_probe_already_attached_raises(measure):
    model = mlp()
    measure(_noop)
    probe = NoiseProbe(model, torch.nn.MSELoss(), make_data())
    ProbedSGD(model.parameters(), lr=0.1, probe=probe)
    with pytest.raises(RuntimeError, match="already attached"):
        ProbedSGD(model.parameters(), lr=0.1, probe=probe)


def test_closure_called_once_returns_loss():
    model = mlp()
    X, y = make_data(classification=False)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), y)
        loss.backward()
        return loss

    opt = ProbedSGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


@pytest.mark.parametrize("direction", ["sgd->probed", "probed->sgd"])
def test_state_dict_round_trip_with_torch_sgd(direction):
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    first, second = (
        (torch.optim.SGD, ProbedSGD)
        if direction == "sgd->probed"
        else (ProbedSGD, torch.optim.SGD)
    )
    # reference: 6 uninterrupted steps of torch SGD
    ref = _params()
    ref_opt = torch.optim.SGD(ref, **kw)
    for t in range(6):
        _grads(ref, t, none_index=2)
        ref_opt.step()
    # 3 steps, save through torch.save / torch.load(weights_only=True), 3 more
    params = _params()
    opt = first(params, **kw)
    for t in range(3):
        _grads(params, t, none_index=2)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = second(params, **kw)
    opt2.load_state_dict(sd)
    for t in range(3, 6):
        _grads(params, t, none_index=2)
        opt2.step()
    _assert_same(ref, ref_opt, params, opt2)


def test_probe_counters_in_state_dict_and_loaded_by_sgd(measure):
    model = mlp()
    X, y = make_data()
    loss_fn = torch.nn.CrossEntropyLoss()
    measure(_noop)
    probe = NoiseProbe(model, loss_fn, (X, y), every=2)
    opt = ProbedSGD(model.parameters(), lr=0.1, momentum=0.9, probe=probe)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["probe"] == {"step_count": 5, "num_probes": 2, "num_nonfinite": 0}
    # a fresh run resumes the schedule: next probe after step 6, not step 2
    measure(_noop)
    probe2 = NoiseProbe(model, loss_fn, (X, y), every=2)
    opt2 = ProbedSGD(model.parameters(), lr=0.1, momentum=0.9, probe=probe2)
    opt2.load_state_dict(sd)
    assert probe2.step_count == 5 and probe2.num_probes == 2
    opt2.step()
    assert [r["step"] for r in probe2.history] == [6]
    # torch.optim.SGD ignores the extra entry
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(sd)
    assert "probe" not in sgd.state_dict()


def test_hooks_scheduler_repr_deepcopy(measure):
    model = mlp()
    measure(_noop)
    probe = NoiseProbe(model, torch.nn.MSELoss(), make_data())
    opt = ProbedSGD(model.parameters(), lr=0.1, momentum=0.9, probe=probe)
    fired = []
    opt.register_step_pre_hook(lambda o, a, k: fired.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: fired.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    X, y = make_data()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        sched.step()
    assert fired == ["pre", "post", "pre", "post"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert repr(opt).startswith("ProbedSGD (")
    twin = copy.deepcopy(opt)
    assert twin.probe is None and opt.probe is probe  # copies carry no probe
    assert twin.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    # load_state_dict keeps the attached probe
    opt.load_state_dict(twin.state_dict())
    assert opt.probe is probe and probe.attached


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), ("3", TypeError)]
)
@pytest.mark.parametrize("key", ["step_count", "num_probes"])
def test_bad_probe_counter_is_refused_before_anything_loads(measure, key, value, error):
    model = mlp()
    measure(_noop)
    probe = NoiseProbe(model, torch.nn.MSELoss(), make_data())
    opt = ProbedSGD(model.parameters(), lr=0.1, momentum=0.9, probe=probe)
    X, y = make_data()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    sd = opt.state_dict()
    bad = {**sd, "probe": {**sd["probe"], key: value}}
    fresh = ProbedSGD(
        model.parameters(),
        lr=0.5,
        momentum=0.9,
        probe=NoiseProbe(model, torch.nn.MSELoss(), make_data()),
    )
    with pytest.raises(error, match=rf"state_dict\['probe'\]\['{key}'\]"):
        fresh.load_state_dict(bad)
    assert fresh.param_groups[0]["lr"] == 0.5 and not fresh.state
    assert fresh.probe.step_count == 0
    # a counter saved as a one-element integer tensor still loads
    good = {**sd, "probe": {**sd["probe"], key: torch.tensor(sd["probe"][key])}}
    fresh.load_state_dict(good)
    assert fresh.probe.step_count == sd["probe"]["step_count"]
