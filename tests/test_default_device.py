"""Every public tool allocates on its inputs' device, never on the default device.

A tensor made without ``device=`` (``torch.zeros(n)``, ``torch.arange(n)``, ...)
lands on the *default* device. On a CUDA model that is the classic CPU/GPU
mismatch, which a CPU-only test suite never sees. Here the default device is
``meta`` while the model, data and every input live on the CPU (built outside
the ``with torch.device("meta")`` block): any allocation that neither names a
device nor derives it from an input (``*_like``, ``new_*``, ``.to(x.device)``)
becomes a meta tensor, which either fails (no data to read) or leaks into the
result. Each call must return CPU tensors equal to the same call made without
the context (the default device changes nothing else).

A ``torch.Generator()`` made without ``device=`` is always a CPU generator (the
default device does not apply to it), so CPU generators used with device
tensors are not caught here; ``test_no_deviceless_generator`` checks the source.
"""

import ast
import dataclasses
import math
import pathlib

import pytest
import torch
from torch import nn

import geoopt_sgd as g
from geoopt_sgd import testing as T

META = torch.device("meta")


# ------------------------------------------------------------------ comparison


def _timing(name):
    """Wall-clock fields differ from run to run: not compared."""
    return "seconds" in str(name) or "time" in str(name)


def _leaves(obj, path="out"):
    """Yield ``(path, value)`` for every tensor and number inside ``obj``."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (bool, int, float, str)) or obj is None:
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            if _timing(f.name):
                continue
            yield from _leaves(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            if _timing(key):
                continue
            yield from _leaves(obj[key], f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        raise TypeError(f"{path}: cannot compare a {type(obj).__name__}")


def _differences(out, ref):
    """Where ``out`` differs from ``ref`` (paths, types, devices, values): a list
    of messages, empty when every leaf is the same (tensors on the CPU, equal
    exactly, NaN equal to NaN)."""
    got, want = list(_leaves(out)), list(_leaves(ref))
    if [p for p, _ in got] != [p for p, _ in want]:
        return [f"leaves {[p for p, _ in got]} != {[p for p, _ in want]}"]
    found = []
    for (path, a), (_, b) in zip(got, want, strict=True):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                found.append(f"{path}: {type(a).__name__}, not a tensor")
            elif a.device.type != "cpu":
                found.append(f"{path} is on {a.device}")
            else:
                try:
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
                except AssertionError as err:
                    found.append(f"{path}: {err}")
        elif isinstance(b, float) and math.isnan(b):
            if not (isinstance(a, float) and math.isnan(a)):
                found.append(f"{path}: {a!r}, not NaN")
        elif a != b:
            found.append(f"{path}: {a!r} != {b!r}")
    return found


def _both(setup, call):
    """``call(*setup())`` under a meta default device, and without one (run first)."""
    results = []
    for device in (None, META):
        torch.manual_seed(0)
        args = setup()  # built on the CPU, outside the context
        torch.manual_seed(1)
        if device is None:
            out = call(*args)
        else:
            with torch.device(device):
                out = call(*args)
        results.append(out)
    ref, out = results
    return out, ref


# ------------------------------------------------------------------ problems


def _mlp(out=3):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()


def _cls():
    """A small classifier: model, cross-entropy, inputs, integer targets."""
    model = _mlp()
    X = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, nn.CrossEntropyLoss(), X, y


def _reg():
    """A small regression: model, MSE, inputs, targets."""
    model = _mlp(out=2)
    X = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    return model, nn.MSELoss(), X, y


def _op(cls=g.HessianOperator):
    def setup():
        model, loss, X, y = _cls()
        return (cls(model, loss, (X, y)),)

    return setup


# ------------------------------------------------------------------ curvature


def _products(op):
    """Products and the other public methods of a data operator."""
    V = torch.linspace(-1, 1, 2 * op.shape[0], dtype=torch.float64, device="cpu")
    V = V.reshape(op.shape[0], 2)
    out = (
        op.matvec(V[:, 0]),
        op.matvec(op.unflatten(V[:, 1])),
        op.matmat(V),
        op.to_dense(),
        op.loss(),
        op.gradient(),
    )
    # last: the route it picks (by timing) changes later products' rounding
    return (*out, sorted(op.choose_block(k=2, repeats=1)))


CURVATURE = {
    "HessianOperator": (
        _cls,
        lambda m, lf, X, y: _products(g.HessianOperator(m, lf, (X, y))),
    ),
    "GGNOperator": (
        _cls,
        lambda m, lf, X, y: _products(g.GGNOperator(m, lf, (X, y))),
    ),
    "top_eigenpairs": (_op(), lambda H: g.top_eigenpairs(H, 3, seed=0)),
    "top_eigenpairs_v0": (
        _op(),
        lambda H: g.top_eigenpairs(
            H, 2, v0=torch.ones(43, 3, dtype=torch.float64, device="cpu")
        ),
    ),
    "top_eigenpairs_magnitude": (
        _op(),
        lambda H: g.top_eigenpairs(H, 2, which="LM", seed=0),
    ),
    "bottom_eigenpairs": (_op(), lambda H: g.bottom_eigenpairs(H, 2, seed=0)),
    "hutchinson_trace": (_op(), lambda H: g.hutchinson_trace(H, num_probes=4, seed=0)),
    "hutchpp_trace": (_op(), lambda H: g.hutchpp_trace(H, num_matvecs=9, seed=0)),
    "hutchinson_diagonal": (
        _op(),
        lambda H: g.hutchinson_diagonal(H, num_probes=4, seed=0),
    ),
    "squared_frobenius": (
        _op(),
        lambda H: g.squared_frobenius(H, num_probes=4, seed=0),
    ),
    "spectral_density": (
        _op(g.GGNOperator),
        lambda H: g.spectral_density(
            H, num_probes=2, num_steps=5, num_points=50, seed=0
        ),
    ),
    "sharpness": (
        _cls,
        lambda m, lf, X, y: g.sharpness(m, lf, (X, y), k=2, lr=0.1, seed=0),
    ),
    "expected_sharpness": (
        _cls,
        lambda m, lf, X, y: g.expected_sharpness(
            m, lf, (X, y), sigma=0.01, num_samples=2, seed=0
        ),
    ),
    "DenseOperator": (
        lambda: (torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64)),),
        lambda A: g.top_eigenpairs(g.DenseOperator(A), 2, seed=0),
    ),
}


@pytest.mark.parametrize("name", list(CURVATURE))
def test_curvature_under_meta_default(name):
    out, ref = _both(*CURVATURE[name])
    assert not _differences(out, ref)


# ------------------------------------------------------------------ probes

PROBES = {
    "per_sample_gradients": (
        _cls,
        lambda m, lf, X, y: g.per_sample_gradients(m, lf, X, y),
    ),
    "noise_geometry_exact": (
        _cls,
        lambda m, lf, X, y: g.noise_geometry(m, lf, (X, y), k=2, route="exact", seed=0),
    ),
    "noise_geometry_exact_hessian_minibatch": (
        _reg,
        lambda m, lf, X, y: g.noise_geometry(
            m,
            lf,
            (X, y),
            k=2,
            route="exact",
            curvature="hessian",
            cov="minibatch",
            batch_size=3,
            seed=0,
        ),
    ),
    "noise_geometry_sketch": (
        _cls,
        lambda m, lf, X, y: g.noise_geometry(
            m, lf, (X, y), k=2, route="sketch", seed=0
        ),
    ),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_probes_under_meta_default(name):
    out, ref = _both(*PROBES[name])
    assert not _differences(out, ref)


# ------------------------------------------------------------------ testing helpers


def _report(A):
    """The message of a failing ``assert_close_report``."""
    with pytest.raises(AssertionError) as info:
        T.assert_close_report(A + 1.0, A, rtol=1e-3, atol=0.0, worst=2)
    return str(info.value)


TESTING = {
    "dense_hessian": (_cls, lambda m, lf, X, y: T.dense_hessian(m, lf, (X, y))),
    "dense_ggn": (_cls, lambda m, lf, X, y: T.dense_ggn(m, lf, (X, y))),
    "flat_params": (_cls, lambda m, lf, X, y: T.flat_params(m)),
    "dense_curvature_hessian": (
        _cls,
        lambda m, lf, X, y: T.dense_curvature(m, lf, X, y, kind="hessian"),
    ),
    "dense_curvature_ggn": (
        _cls,
        lambda m, lf, X, y: T.dense_curvature(m, lf, X, y, kind="ggn"),
    ),
    "assert_close_report": (
        lambda: (torch.arange(6.0, dtype=torch.float64).reshape(2, 3),),
        lambda A: _report(A),
    ),
    "dense_metrics": (_cls, lambda m, lf, X, y: T.dense_metrics(m, lf, X, y, k=2)),
    "per_sample_gradients_loop": (
        _cls,
        lambda m, lf, X, y: T.per_sample_gradients_loop(m, lf, X, y),
    ),
    "gradient_covariance": (
        lambda: (torch.randn(12, 5, dtype=torch.float64),),
        lambda G: T.gradient_covariance(G, batch_size=3),
    ),
}
TESTING.update(
    {
        f"noisy_gd_covariance_{kind}": (
            _reg,
            lambda m, lf, X, y, kind=kind: T.noisy_gd_covariance(
                kind, m, lf, X, y, batch_size=1, k=2
            ),
        )
        for kind in g.NoisyGD.NOISE_KINDS
    }
)


@pytest.mark.parametrize("name", list(TESTING))
def test_testing_helpers_under_meta_default(name):
    out, ref = _both(*TESTING[name])
    assert not _differences(out, ref)


# ------------------------------------------------------------------ optimizers


def _train(make_opt, steps=3, problem=_reg):
    """``setup, call`` for a few training steps of ``make_opt(model, lf, X, y)``.

    Construction, forward, backward and ``step`` all run in the context; the
    result is the final parameters, the optimizer's state and its ``stats``.
    """

    def call(model, lf, X, y):
        opt, extra = make_opt(model, lf, X, y)
        for _ in range(steps):
            opt.zero_grad()
            lf(model(X), y).backward()
            opt.step()
        state = opt.state_dict()["state"]
        return {
            "params": [p.detach().clone() for p in model.parameters()],
            "state": {k: dict(v) for k, v in state.items()},
            "stats": dict(getattr(opt, "stats", {})),
            "extra": extra,
        }

    return problem, call


def _noisy(kind):
    def make(model, lf, X, y):
        opt = g.NoisyGD(
            model.parameters(),
            lr=0.05,
            noise=kind,
            noise_scale=0.1,
            model=model,
            loss_fn=lf,
            data=(X, y),
            batch_size=None if kind in ("none", "isotropic") else 3,
            k=2,
            refresh_every=2,
            seed=0,
        )
        return opt, None

    return make


def _probed(model, lf, X, y):
    records = []
    probe = g.NoiseProbe(
        model,
        lf,
        (X, y),
        every=2,
        k=2,
        metrics=None,
        callback=records.append,
    )
    opt = g.ProbedSGD(model.parameters(), lr=0.05, momentum=0.9, probe=probe)
    return opt, records


def _cyclic(model, lf, X, y):
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = g.CyclicLRWrapper(inner, 0.01, 0.1, 2, cycle_momentum=True)
    return opt, None


OPTIMIZERS = {
    "ProbedSGD": _train(
        lambda m, lf, X, y: (g.ProbedSGD(m.parameters(), lr=0.05, momentum=0.9), None)
    ),
    "ProbedSGD_NoiseProbe": _train(_probed, steps=4),
    "CyclicLRWrapper": _train(_cyclic),
}
OPTIMIZERS.update({f"NoisyGD_{k}": _train(_noisy(k)) for k in g.NoisyGD.NOISE_KINDS})


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_under_meta_default(name):
    out, ref = _both(*OPTIMIZERS[name])
    assert not _differences(out, ref)


# ------------------------------------------------------------------ generators


def test_no_deviceless_generator():
    """``torch.Generator()`` without ``device=`` is a CPU generator whatever the
    default device; a library draw with one and ``device=`` a CUDA tensor fails.
    The meta default above cannot see this, so the source is checked instead."""
    root = pathlib.Path(g.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "Generator"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"torch.Generator() without device=: {found}"
