"""Issue #13 on the optimizer side: repeated parameters, non-finite values, the
global RNG, argument types, and CyclicLRWrapper with probes and schedulers."""

import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from geoopt_sgd import CyclicLRWrapper, NoiseProbe, NoisyGD, ProbedSGD


def _problem(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return model, X, y


def _grad(model, X, y):
    model.zero_grad()
    nn.functional.mse_loss(model(X), y).backward()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------- duplicates
def test_noisy_gd_rejects_repeated_parameter():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="`params` lists the same tensor twice"):
        NoisyGD([w, w], lr=0.1, noise="isotropic")
    with pytest.raises(ValueError, match="`params`.*already in another param group"):
        NoisyGD([{"params": [w]}, {"params": [w]}], lr=0.1)
    opt = NoisyGD([w], lr=0.1)
    with pytest.raises(ValueError, match="already in another param group"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1


def test_noisy_gd_params_from_a_generator_still_work():
    model, X, y = _problem()
    opt = NoisyGD(model.parameters(), lr=0.1)
    ref = torch.optim.SGD(_problem()[0].parameters(), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == len(ref.param_groups[0]["params"])


@pytest.mark.parametrize("named", [False, True])
def test_probed_sgd_rejects_repeated_parameter(named):
    w = nn.Parameter(torch.ones(3))
    entry = ("w", w) if named else w
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # raised, not torch's warning
        with pytest.raises(ValueError, match="`params` lists the same tensor twice"):
            ProbedSGD([entry, entry], lr=0.1)
    with pytest.raises(ValueError, match="`params`.*already in another"):
        ProbedSGD([{"params": [w]}, {"params": [w]}], lr=0.1)


def test_cyclic_wrapper_rejects_repeated_parameter():
    w, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(1))
    with pytest.warns(UserWarning, match="duplicate"):
        inner = torch.optim.SGD([w, w], lr=0.1)  # torch only warns
    with pytest.raises(ValueError, match="`optimizer` lists the same tensor twice"):
        CyclicLRWrapper(inner, 0.1, 0.5, 2)
    opt = CyclicLRWrapper(torch.optim.SGD([w], lr=0.1), 0.1, 0.5, 2)
    with pytest.raises(ValueError, match="`params`.*already in another"):
        opt.add_param_group({"params": [b, w]})
    with pytest.raises(ValueError, match="`params` lists the same tensor twice"):
        opt.add_param_group({"params": [b, b]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("noise", ["isotropic", "diagonal", "hessian"])
def test_non_finite_noise_schedule_raises_before_any_change(noise, bad):
    model, X, y = _problem()
    opt = NoisyGD(
        model.parameters(),
        lr=0.1,
        noise=noise,
        batch_size=4,
        k=2,
        model=model,
        loss_fn=nn.MSELoss(),
        data=(X, y),
        noise_schedule=lambda t: 1.0 if t < 2 else bad,
    )
    for _ in range(2):
        _grad(model, X, y)
        opt.step()
    before, sd = _params(model), opt.state_dict()
    _grad(model, X, y)
    with pytest.raises(ValueError, match=r"`noise_schedule`.*at step 2"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))
    assert opt.state_dict()["noisy_gd"]["step"] == sd["noisy_gd"]["step"] == 2


def test_noise_schedule_must_return_a_number():
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    opt = NoisyGD([w], noise="isotropic", noise_schedule=lambda t: "fast")
    with pytest.raises(TypeError, match="`noise_schedule` must return a real number"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(3))


def test_noise_schedule_called_once_per_step():
    calls = []
    w = nn.Parameter(torch.ones(3))
    opt = NoisyGD([w], noise="isotropic", noise_schedule=lambda t: calls.append(t) or 1)
    for _ in range(3):
        w.grad = torch.ones(3)
        opt.step()
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("noise", ["none", "isotropic"])
def test_non_finite_gradient_propagates_like_sgd(noise):
    # the per-step path checks nothing: NaN reaches the parameter as in SGD
    w = nn.Parameter(torch.ones(3))
    w_ref = nn.Parameter(torch.ones(3))
    opt = NoisyGD([w], lr=0.1, noise=noise, noise_scale=1e-3)
    ref = torch.optim.SGD([w_ref], lr=0.1)
    for p in (w, w_ref):
        p.grad = torch.tensor([1.0, math.nan, math.inf])
    opt.step()
    ref.step()
    assert torch.equal(w.isfinite(), w_ref.isfinite())
    assert w[0].isfinite() and not w[1:].isfinite().any()


@pytest.mark.parametrize(
    "noise", ["diagonal", "sgd_leading", "hessian", "geometry_aware"]
)
def test_refresh_on_non_finite_parameters_names_them(noise):
    model, X, y = _problem()
    opt = NoisyGD(
        model.parameters(), lr=0.1, noise=noise, batch_size=4, k=2,
        refresh_every=1, model=model, loss_fn=nn.MSELoss(), data=(X, y),
    )  # fmt: skip
    _grad(model, X, y)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    before = _params(model)
    with pytest.raises(FloatingPointError, match="the parameters are non-finite"):
        opt.step()
    got = _params(model)
    for a, b in zip(before, got, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def _inf_loss(out, target):
    # finite parameters and gradients direction, but an infinite loss scale
    return ((out - target) ** 2).mean() * math.inf


def test_refresh_on_non_finite_gradients_names_them():
    model, X, y = _problem()
    opt = NoisyGD(
        model.parameters(), lr=0.1, noise="diagonal", batch_size=4,
        model=model, loss_fn=_inf_loss, data=(X, y),
    )  # fmt: skip
    _grad(model, X, y)
    before = _params(model)
    with pytest.raises(
        FloatingPointError, match="mini-batch gradients .* are non-finite"
    ):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_refresh_on_non_finite_curvature_names_the_operator(curvature):
    model, X, y = _problem()
    opt = NoisyGD(
        model.parameters(), lr=0.1, noise="hessian", magnitude="raw", k=2,
        curvature=curvature, model=model, loss_fn=_inf_loss, data=(X, y),
    )  # fmt: skip
    _grad(model, X, y)
    before = _params(model)
    with pytest.raises(FloatingPointError, match=f"the {curvature} operator's output"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


# ------------------------------------------------------------------ global RNG
@pytest.mark.parametrize(
    "noise",
    [
        "isotropic_matched",
        "diagonal",
        "hessian",
        "sgd_matched",
        "geometry_aware_isotropic",
    ],
)
def test_refresh_with_shuffling_loader_leaves_global_rng(noise):
    model, X, y = _problem()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True
    )
    opt = NoisyGD(
        model.parameters(), lr=0.01, noise=noise, batch_size=4, k=2,
        refresh_every=1, model=model, loss_fn=nn.MSELoss(), data=loader,
    )  # fmt: skip
    torch.manual_seed(123)
    for _ in range(2):
        _grad(model, X, y)
        state = torch.get_rng_state()
        opt.step()
        assert torch.equal(state, torch.get_rng_state())
    # the loader itself does draw from the global generator
    state = torch.get_rng_state()
    list(loader)
    assert not torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------ argument types
def test_probed_sgd_probe_type():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(
        TypeError, match="`probe` must be a NoiseProbe or None; got str"
    ):
        ProbedSGD([w], probe="x")


@pytest.mark.parametrize(
    "dtype", [torch.long, torch.int32, torch.bool, torch.complex64]
)
def test_noisy_gd_needs_floating_parameters(dtype):
    with pytest.raises(TypeError, match=f"`params` must be floating point.*{dtype}"):
        NoisyGD([torch.zeros(3, dtype=dtype)], lr=0.1)
    opt = NoisyGD([torch.zeros(3)], lr=0.1)
    with pytest.raises(TypeError, match="`params` must be floating point"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=dtype)]})


def test_noisy_gd_rejects_reduction_none_at_construction():
    model, X, y = _problem()
    with pytest.raises(ValueError, match="`loss_fn` has reduction='none'"):
        NoisyGD(
            model.parameters(), noise="isotropic", loss_fn=nn.MSELoss(reduction="none")
        )
    with pytest.raises(ValueError, match="`loss_fn` has reduction='none'"):
        NoisyGD(
            model.parameters(), noise="hessian", magnitude="raw",
            model=model, loss_fn=nn.MSELoss(reduction="none"), data=(X, y),
        )  # fmt: skip
    with pytest.raises(TypeError, match="`loss_fn` must be a callable"):
        NoisyGD(
            model.parameters(), noise="hessian", magnitude="raw",
            model=model, loss_fn="mse", data=(X, y),
        )  # fmt: skip


# --------------------------------------------------------- CyclicLRWrapper
def _wrapper():
    model, X, y = _problem()
    inner = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    return model, X, y, CyclicLRWrapper(inner, 0.01, 0.1, step_size_up=3)


def test_post_hook_sees_the_lr_the_step_used():
    model, X, y, opt = _wrapper()
    seen = []
    handle = opt.register_step_post_hook(
        lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"])
    )
    for _ in range(7):
        _grad(model, X, y)
        opt.step()
    assert seen == [opt.lr_at(t)[0] for t in range(7)]
    handle.remove()
    _grad(model, X, y)
    opt.step()
    assert len(seen) == 7
    assert pickle.loads(pickle.dumps(opt))._cyclic_post_hooks == {}


def test_noise_probe_on_wrapper_records_the_step_lr(measure):
    model, X, y, opt = _wrapper()

    class Result:
        values = {"loss": 0.0}
        eigenvectors = None

        def as_dict(self):
            return dict(self.values)

    measure(lambda *args, **kwargs: Result())
    probe = NoiseProbe(model, nn.MSELoss(), (X, y), every=2, k=2)
    probe.attach(opt)
    for _ in range(6):
        _grad(model, X, y)
        opt.step()
    lrs = [r["lr"] for r in probe.history]
    assert lrs == [opt.lr_at(t)[0] for t in (1, 3, 5)]


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10),
    ],
    ids=["StepLR", "CosineAnnealingLR", "LambdaLR", "OneCycleLR"],
)
@pytest.mark.parametrize("steps", [0, 1])
def test_torch_scheduler_on_wrapper_raises_and_changes_nothing(make, steps):
    model, X, y, opt = _wrapper()
    for _ in range(steps):
        _grad(model, X, y)
        opt.step()
    sd = opt.state_dict()
    with pytest.raises(
        TypeError, match="cannot take a CyclicLRWrapper as its `optimizer`"
    ):
        make(opt)
    assert opt.state_dict() == sd
    assert all("initial_lr" not in g for g in opt.param_groups)
    # the wrapper still steps, and as_scheduler still works on the inner one
    _grad(model, X, y)
    opt.step()
    sched = opt.as_scheduler()
    assert "initial_lr" in opt.param_groups[0]
    with pytest.raises(TypeError, match="CyclicLRWrapper"):
        make(opt)
    assert "initial_lr" in opt.param_groups[0]  # kept: as_scheduler put it there
    del sched


def test_refresh_on_non_finite_loss_names_the_loss():
    # a linear model under MSE plus an infinite constant: finite Hessian
    # products, infinite loss (L enters the GEO magnitude)
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(32, 3).double(), torch.randn(32, 2).double()

    def loss_fn(out, target):
        return ((out - target) ** 2).mean() + INF_CONSTANT

    opt = NoisyGD(
        model.parameters(), lr=0.1, noise="geometry_aware", batch_size=4, k=2,
        model=model, loss_fn=loss_fn, data=(X, y),
    )  # fmt: skip
    _grad(model, X, y)
    before = _params(model)
    with pytest.raises(FloatingPointError, match="the loss of `loss_fn` on `data`"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


INF_CONSTANT = torch.tensor(math.inf, dtype=torch.float64)


@pytest.mark.parametrize("noise", ["sgd_matched"])
def test_sgd_matched_non_finite_propagates(noise):
    model, X, y = _problem()
    opt = NoisyGD(
        model.parameters(), lr=0.1, noise=noise, batch_size=4,
        model=model, loss_fn=_inf_loss, data=(X, y),
    )  # fmt: skip
    _grad(model, X, y)
    opt.step()  # no refresh: no error, the noise is non-finite as SGD's would be
    assert not all(p.isfinite().all() for p in model.parameters())


def _plateau(opt):
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for loss in (1.0, 2.0, 3.0):  # no improvement: the lr is halved
        sched.step(loss)


def _inner_step_lr(opt):
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    sched.step()


def _manual(opt):
    opt.param_groups[0]["lr"] = 0.123


@pytest.mark.parametrize(
    "writer", [_plateau, _inner_step_lr, _manual], ids=["plateau", "inner", "manual"]
)
def test_an_outside_lr_write_is_refused_at_the_next_step(writer):
    # ReduceLROnPlateau builds without touching the step, a scheduler on the inner
    # optimizer never sees the wrapper, a manual write neither: all three would be
    # overwritten silently, so the next step refuses before changing anything
    model, X, y, opt = _wrapper()
    for _ in range(2):
        _grad(model, X, y)
        opt.step()
    writer(opt)
    params = [p.detach().clone() for p in model.parameters()]
    step_before = opt.last_step
    _grad(model, X, y)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['lr'\] was changed"):
        opt.step()
    assert all(
        torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True)
    )
    assert opt.last_step == step_before
