"""The optimizer contract, as one table (issue #4 section 3).

Modelled on torch's ``torch/testing/_internal/common_optimizers.py``: every
optimizer configuration is an :class:`OptimInfo` entry (a builder, kwarg sets with
ids, error inputs with type + regex) and every entry goes through the same tests.
torch.optim.SGD is in the table as a control.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from cases import make_data, mlp
from torch import nn

from geoopt_sgd import CyclicLRWrapper, NoisyGD, ProbedSGD

LOSS = nn.CrossEntropyLoss()


@dataclass(frozen=True)
class OptimInput:
    desc: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class ErrorInput:
    kwargs: dict[str, Any]
    error_type: type[Exception]
    error_regex: str


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer: ``build(groups, model=, data=, foreach=, **kwargs)``.

    ``groups`` is a list of ``{"params": [...], "lr": float}`` dicts.
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    inputs: list[OptimInput]
    errors: list[ErrorInput] = field(default_factory=list)
    # None: sparse gradients are supported (torch SGD); else the expected message
    sparse_error: str | None = None
    supports_foreach: bool = True


def _sgd(groups, *, model, data, foreach=None, **kw):
    return torch.optim.SGD(groups, foreach=foreach, **kw)


def _probed(groups, *, model, data, foreach=None, **kw):
    return ProbedSGD(groups, foreach=foreach, **kw)


def _noisy(groups, *, model, data, foreach=None, **kw):
    source = {}
    if kw.get("noise", "none") not in ("none", "isotropic"):
        source = {"model": model, "loss_fn": LOSS, "data": data}
    return NoisyGD(groups, foreach=foreach, **source, **kw)


def _schedule_kwargs(groups, kw):
    # per-group bounds from the groups' lrs: max = lr, base = lr / 2
    kw = dict(kw)
    kw.setdefault("max_lr", [g["lr"] for g in groups])
    kw.setdefault("base_lr", [g["lr"] / 2 for g in groups])
    kw.setdefault("step_size_up", 2)
    return kw


def _wrap(make_inner):
    def build(groups, *, model, data, foreach=None, inner=None, **kw):
        opt = make_inner(groups, model=model, data=data, foreach=foreach, **inner or {})
        return CyclicLRWrapper(opt, **_schedule_kwargs(groups, kw))

    return build


def _adam(groups, *, model, data, foreach=None, **kw):
    return torch.optim.Adam(groups, foreach=foreach, **kw)


_SGD_INPUTS = [
    OptimInput("plain", {}),
    OptimInput("momentum", {"momentum": 0.9}),
    OptimInput("nesterov", {"momentum": 0.9, "nesterov": True}),
    OptimInput(
        "wd_dampening", {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.1}
    ),  # fmt: skip
    OptimInput("maximize", {"maximize": True, "momentum": 0.5}),
]
_SGD_ERRORS = [
    ErrorInput({"momentum": -0.5}, ValueError, r"Invalid momentum value: -0\.5"),
    ErrorInput({"lr": -1.0}, ValueError, r"Invalid learning rate: -1\.0"),
    ErrorInput(
        {"nesterov": True},
        ValueError,
        r"Nesterov momentum requires a momentum and zero dampening",
    ),  # fmt: skip
]

# source settings for the curvature / statistics kinds: small k and batch size,
# refresh every 2 steps so that resumes cross a refresh
_SOURCE = {"batch_size": 4, "k": 2, "refresh_every": 2, "noise_scale": 0.1, "seed": 7}


def _noisy_inputs(kind):
    inputs = [OptimInput(f"noise={kind}", {"noise": kind, **_SOURCE})]
    if kind == "isotropic":
        inputs.append(
            OptimInput(
                "noise=isotropic,wd,maximize",
                {"noise": kind, **_SOURCE, "weight_decay": 0.1, "maximize": True},
            )  # fmt: skip
        )
    if kind == "hessian":
        inputs.append(
            OptimInput(
                "noise=hessian,ggn,unit",
                {"noise": kind, **_SOURCE, "curvature": "ggn", "magnitude": "unit"},
            )  # fmt: skip
        )
    return inputs


_NOISY_ERRORS = [
    ErrorInput({"noise": "gauss"}, ValueError,
               r"`noise` must be one of 'none', 'isotropic', .*; got 'gauss'\."),
    ErrorInput({"lr": -1.0}, ValueError, r"`lr` must be >= 0; got -1\.0\."),
    ErrorInput({"noise": "isotropic", "noise_scale": -0.1}, ValueError,
               r"`noise_scale` must be >= 0; got -0\.1\."),
    ErrorInput({"noise": "isotropic", "refresh_every": 0}, ValueError,
               r"`refresh_every` must be >= 1; got 0\."),
]  # fmt: skip

_WRAPPER_ERRORS = [
    ErrorInput({"base_lr": 0.5, "max_lr": 0.1}, ValueError,
               r"`base_lr\[0\]` must be <= `max_lr\[0\]`"),
    ErrorInput({"step_size_up": 0}, ValueError,
               r"`step_size_up` must be >= 1; got 0\."),
    ErrorInput({"mode": "sawtooth"}, ValueError,
               r"`mode` must be one of 'triangular', 'triangular2', 'exp_range', "
               r"'cosine', 'square'; got 'sawtooth'\."),
]  # fmt: skip

OPTIMIZERS: list[OptimInfo] = [
    # the control: torch's own SGD (one kwarg set; torch tests the rest)
    OptimInfo("torch_sgd", _sgd, [_SGD_INPUTS[1]], _SGD_ERRORS),
    OptimInfo("probed_sgd", _probed, _SGD_INPUTS, _SGD_ERRORS),
    *[
        OptimInfo(
            f"noisy_gd[{kind}]",
            _noisy,
            _noisy_inputs(kind),
            _NOISY_ERRORS if kind == "none" else [],
            sparse_error=r"NoisyGD does not support sparse gradients",
        )
        for kind in NoisyGD.NOISE_KINDS
    ],
    OptimInfo(
        "cyclic[sgd]",
        _wrap(_sgd),
        [
            OptimInput("triangular", {}),
            OptimInput(
                "square,momentum",
                {"mode": "square", "step_size_down": 1, "inner": {"momentum": 0.9}},
            ),
            OptimInput(
                "cosine,nesterov",
                {"mode": "cosine", "inner": {"momentum": 0.9, "nesterov": True}},
            ),
            OptimInput(
                "exp_range,cycle_momentum",
                {
                    "mode": "exp_range",
                    "gamma": 0.9,
                    "cycle_momentum": True,
                    "inner": {"momentum": 0.9},
                },
            ),
        ],
        _WRAPPER_ERRORS,
    ),  # fmt: skip
    OptimInfo(
        "cyclic[adam]",
        _wrap(_adam),
        [
            OptimInput("triangular2", {"mode": "triangular2"}),
            OptimInput("cycle_momentum", {"cycle_momentum": True}),
        ],
        sparse_error=r"Adam does not support sparse gradients",
    ),
    OptimInfo(
        "cyclic[probed_sgd]",
        _wrap(_probed),
        [OptimInput("momentum", {"inner": {"momentum": 0.9}})],
    ),
    OptimInfo(
        "cyclic[noisy_gd]",
        _wrap(_noisy),
        [
            OptimInput("noise=isotropic", {"inner": {"noise": "isotropic", **_SOURCE}}),
            OptimInput("noise=hessian", {"inner": {"noise": "hessian", **_SOURCE}}),
        ],
        sparse_error=r"NoisyGD does not support sparse gradients",
    ),
]

CASES = [
    pytest.param(info, inp, id=f"{info.name}-{inp.desc}")
    for info in OPTIMIZERS
    for inp in info.inputs
]
ERROR_CASES = [
    pytest.param(info, err, id=f"{info.name}-{i}")
    for info in OPTIMIZERS
    for i, err in enumerate(info.errors)
]


# -- helpers -----------------------------------------------------------------------


def _problem(seed=0):
    model = mlp(d=5, h=6, k=3, seed=seed)
    data = make_data(n=12, d=5, k=3, seed=1)
    return model, data


def _split(model, n_groups):
    params = list(model.parameters())
    if n_groups == 1:
        return [params]
    return [params[:2], params[2:]]


def _make(info, inp, model, data, *, lrs=(0.1,), foreach=None):
    groups = [
        {"params": ps, "lr": lr}
        for ps, lr in zip(_split(model, len(lrs)), lrs, strict=True)
    ]
    return info.build(groups, model=model, data=data, foreach=foreach, **inp.kwargs)


def _closure(opt, model, data, calls=None):
    X, y = data

    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = LOSS(model(X), y)
        loss.backward()
        return loss

    return closure


def _run(opt, model, data, n):
    for _ in range(n):
        opt.step(_closure(opt, model, data))


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


# -- the contract -------------------------------------------------------------------


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_step_closure_returns_loss(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    calls = []
    loss = opt.step(_closure(opt, model, data, calls))
    assert len(calls) == 1
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(loss, LOSS(mlp(seed=0)(data[0]), data[1]))
    # and without a closure
    _closure(opt, model, data)()
    before = _params(model)
    assert opt.step() is None
    assert any(
        not torch.equal(p, q) for p, q in zip(before, _params(model), strict=True)
    )


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_mixed_lr_groups(info, inp):
    # groups (lr, 0): after one step the first group has moved exactly as in a
    # one-group run at lr (noise is one vector over all parameters, drawn the
    # same way), the second not at all, then or later
    model_1, data = _problem()
    opt_1 = _make(info, inp, model_1, data, lrs=(0.1,))
    _run(opt_1, model_1, data, 1)
    model_2, _ = _problem()
    start = _params(model_2)
    opt_2 = _make(info, inp, model_2, data, lrs=(0.1, 0.0))
    assert len(opt_2.param_groups) == 2
    _run(opt_2, model_2, data, 1)
    after_1, after_2 = _params(model_1), _params(model_2)
    _assert_equal(after_2[:2], after_1[:2])
    _assert_equal(after_2[2:], start[2:])
    _run(opt_2, model_2, data, 2)
    _assert_equal(_params(model_2)[2:], start[2:])


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_grad_none_skipped(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    frozen = list(model.parameters())[-1]
    before = frozen.detach().clone()
    for _ in range(3):
        _closure(opt, model, data)()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    assert not opt.state.get(frozen), opt.state.get(frozen)


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_sparse_grad(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    _closure(opt, model, data)()
    p = list(model.parameters())[0]
    p.grad = p.grad.to_sparse()
    if info.sparse_error is None:
        if inp.kwargs.get("momentum") or inp.kwargs.get("weight_decay"):
            pytest.skip("torch SGD supports sparse grads only without momentum/wd")
        opt.step()  # supported, as in torch.optim.SGD
    else:
        before = _params(model)
        with pytest.raises(RuntimeError, match=info.sparse_error):
            opt.step()
        _assert_equal(_params(model), before)


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_step_hooks_fire(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append(("pre", o)))
    h = opt.register_step_post_hook(lambda o, a, k: events.append(("post", o)))
    opt.step(_closure(opt, model, data))
    assert events == [("pre", opt), ("post", opt)]
    h.remove()
    opt.step(_closure(opt, model, data))
    assert [e for e, _ in events] == ["pre", "post", "pre"]


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_repr(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    text = repr(opt)
    assert type(opt).__name__ in text
    assert "lr" in text


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_deepcopy(info, inp):
    model, data = _problem()
    opt = _make(info, inp, model, data)
    _run(opt, model, data, 2)
    model_c, opt_c = copy.deepcopy((model, opt))
    assert type(opt_c) is type(opt)
    assert all(
        p is not q
        for p, q in zip(model.parameters(), model_c.parameters(), strict=True)
    )
    _run(opt, model, data, 3)
    _run(opt_c, model_c, data, 3)
    # the copy continues exactly as the original (state, counters, noise stream)
    _assert_equal(_params(model_c), _params(model))


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_foreach_matches_forloop(info, inp):
    if not info.supports_foreach:
        pytest.skip("no foreach implementation")
    results = []
    for foreach in (False, True):
        model, data = _problem()
        opt = _make(info, inp, model, data, lrs=(0.1, 0.05), foreach=foreach)
        _run(opt, model, data, 4)
        results.append(_params(model))
    # float64; the multi-tensor kernels may round a fused multiply-add differently
    # from the per-tensor loop, a few ulps per step
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("info", "inp"), CASES)
def test_resume_is_bit_exact(info, inp):
    # uninterrupted: 5 steps
    model, data = _problem()
    opt = _make(info, inp, model, data, lrs=(0.1, 0.05))
    _run(opt, model, data, 5)
    # interrupted after 3: save, weights_only load into fresh objects, 2 more
    model_a, _ = _problem()
    opt_a = _make(info, inp, model_a, data, lrs=(0.1, 0.05))
    _run(opt_a, model_a, data, 3)
    ckpt = _roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    model_b, _ = _problem(seed=5)  # a different init: all must come from ckpt
    model_b.load_state_dict(ckpt["model"])
    opt_b = _make(info, inp, model_b, data, lrs=(0.1, 0.05))
    opt_b.load_state_dict(ckpt["opt"])
    _run(opt_b, model_b, data, 2)
    _assert_equal(_params(model_b), _params(model))


@pytest.mark.parametrize(("info", "err"), ERROR_CASES)
def test_invalid_arguments(info, err):
    model, data = _problem()
    kwargs = dict(err.kwargs)
    groups = [{"params": list(model.parameters())}]
    if "lr" not in kwargs:
        groups[0]["lr"] = 0.1
    with pytest.raises(err.error_type, match=err.error_regex):
        info.build(groups, model=model, data=data, **kwargs)


def test_table_covers_every_noise_kind():
    names = {info.name for info in OPTIMIZERS}
    assert {f"noisy_gd[{k}]" for k in NoisyGD.NOISE_KINDS} <= names


# -- torch.compile -------------------------------------------------------------------

_COMPILE_IDS = {
    "torch_sgd-momentum": (),
    "probed_sgd-momentum": (),
    "noisy_gd[none]-noise=none": (),
    "noisy_gd[isotropic]-noise=isotropic": (),
    "cyclic[sgd]-square,momentum": (),
}
COMPILE_CASES = [
    pytest.param(*c.values, id=c.id, marks=_COMPILE_IDS[c.id])
    for c in CASES
    if c.id in _COMPILE_IDS
]


@pytest.mark.slow
@pytest.mark.parametrize(("info", "inp"), COMPILE_CASES)
def test_compiled_training_step(info, inp):
    """A torch.compile-d training step gives the eager trajectory."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model, data = _problem()
        opt = _make(info, inp, model, data)
        closure = _closure(opt, model, data)

        def train_step(opt=opt, closure=closure):
            closure()
            opt.step()

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(4):
            fn()
        results.append(_params(model))
    # compiled kernels may reorder float64 arithmetic: a few ulps
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
