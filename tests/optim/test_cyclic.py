"""Tests for cyclic_lr and CyclicLRWrapper (issue #4 section 2)."""

import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, LRScheduler

from geoopt_sgd import CyclicLRWrapper, cyclic_lr

# (step_size_up, step_size_down) pairs: symmetric, asymmetric both ways, and
# down-phase of one step; 70 steps cover several cycles of each.
STEP_SIZES = [(4, None), (3, 7), (7, 2), (5, 1)]
N_STEPS = 70


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(
        16, 1, generator=g, dtype=torch.float64
    )


def _groups(model, lr=1.0, **kw):
    # two groups so that per-group bounds are exercised
    return [
        {"params": list(model[0].parameters()), "lr": lr, **kw},
        {"params": list(model[2].parameters()), "lr": lr, **kw},
    ]


def _loss(model, X, y):
    return nn.functional.mse_loss(model(X), y)


def _train(opt, model, X, y, n, scheduler=None):
    """Run n closure steps; return the lr of every group used at each step."""
    used = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, X, y)
        loss.backward()
        return loss

    for _ in range(n):
        if scheduler is not None:
            used.append([g["lr"] for g in opt.param_groups])
        opt.step(closure)
        if scheduler is not None:
            scheduler.step()
    return used


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- the pure schedule --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize("sizes", STEP_SIZES, ids=lambda s: f"up={s[0]},down={s[1]}")
def test_cyclic_lr_equals_torch_cyclic_lr(mode, sizes):
    up, down = sizes
    model = _model()
    opt = torch.optim.SGD(_groups(model), lr=1.0)
    base, high = [0.01, 0.02], [0.1, 0.3]
    sched = CyclicLR(
        opt, base, high, up, down, mode=mode, gamma=0.97, cycle_momentum=False
    )
    for t in range(N_STEPS):
        # torch's convention: the lr in the groups before the t-th optimizer step
        torch_lrs = [g["lr"] for g in opt.param_groups]
        ours = [cyclic_lr(t, b, h, up, down, mode=mode, gamma=0.97) for b, h in
                zip(base, high, strict=True)]  # fmt: skip
        # exact: same float operations in the same order as torch
        assert ours == torch_lrs, (t, ours, torch_lrs)
        opt.step()
        sched.step()


def test_cyclic_lr_hand_values():
    # triangular: 0.1 -> 0.5 in 2 steps, back in 2
    assert [cyclic_lr(t, 0.1, 0.5, 2) for t in (0, 2, 4, 6)] == [0.1, 0.5, 0.1, 0.5]
    # triangular2: the second peak is half as high above base_lr
    assert cyclic_lr(6, 0.0, 1.0, 2, mode="triangular2") == 0.5
    # exp_range: amplitude gamma**t at the peak t=2
    assert cyclic_lr(2, 0.0, 1.0, 2, mode="exp_range", gamma=0.5) == 0.25


def test_cyclic_lr_cosine():
    up, down, lo, hi = 4, 6, 0.1, 0.9
    for t in range(30):
        pos = t % (up + down)
        f = pos / up if pos <= up else (up + down - pos) / down
        want = lo + (hi - lo) * 0.5 * (1 - math.cos(math.pi * f))
        # 1e-15: one rounding of f differs between the two formulae
        assert cyclic_lr(t, lo, hi, up, down, mode="cosine") == pytest.approx(
            want, abs=1e-15
        )
    # same extremes at the same steps as the triangle
    assert cyclic_lr(10, lo, hi, up, down, mode="cosine") == lo
    assert cyclic_lr(14, lo, hi, up, down, mode="cosine") == hi


def test_cyclic_lr_square():
    lrs = [cyclic_lr(t, 0.1, 0.5, 3, 2, mode="square") for t in range(12)]
    # high phase first (3 steps), then low (2 steps); period 5
    assert lrs == [0.5, 0.5, 0.5, 0.1, 0.1] * 2 + [0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"step": -1}, ValueError, r"`step` must be >= 0; got -1\."),
        ({"step": 1.5}, TypeError, r"`step` must be an integer; got float\."),
        ({"step_size_up": 0}, ValueError, r"`step_size_up` must be >= 1; got 0\."),
        ({"step_size_up": 2.0}, TypeError, r"`step_size_up` must be an integer"),
        ({"step_size_down": 0}, ValueError, r"`step_size_down` must be >= 1; got 0"),
        (
            {"mode": "sine"},
            ValueError,
            r"`mode` must be one of 'triangular', 'triangular2', 'exp_range', "
            r"'cosine', 'square'; got 'sine'\.",
        ),
        ({"gamma": 0.0}, ValueError, r"`gamma` must be > 0; got 0\.0\."),
        ({"base_lr": -0.1}, ValueError, r"`base_lr` must be >= 0; got -0\.1\."),
        ({"max_lr": float("nan")}, ValueError, r"`max_lr` must be finite"),
        (
            {"base_lr": 0.5, "max_lr": 0.1},
            ValueError,
            r"`base_lr` must be <= `max_lr`; got base_lr=0\.5 > max_lr=0\.1\.",
        ),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_cyclic_lr_errors(kwargs, exc, match):
    args = {"step": 0, "base_lr": 0.1, "max_lr": 0.2, "step_size_up": 2, **kwargs}
    with pytest.raises(exc, match=match):
        cyclic_lr(**args)


# -- the wrapper ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_wrapper_matches_sgd_with_torch_cyclic_lr(mode, momentum):
    X, y = _data()
    base, high, up, down = [0.01, 0.02], [0.1, 0.2], 3, 5
    m_ref = _model()
    ref = torch.optim.SGD(_groups(m_ref), lr=1.0, momentum=momentum)
    sched = CyclicLR(
        ref, base, high, up, down, mode=mode, gamma=0.98, cycle_momentum=False
    )
    used = _train(ref, m_ref, X, y, 25, scheduler=sched)

    m = _model()
    inner = torch.optim.SGD(_groups(m), lr=1.0, momentum=momentum)
    opt = CyclicLRWrapper(inner, base, high, up, down, mode=mode, gamma=0.98)
    _train(opt, m, X, y, 25)
    assert opt.last_step == 25
    assert [opt.lr_at(t) for t in range(25)] == used
    # bit-identical trajectories: the same lrs go through the same SGD kernel
    assert _equal(_params(m), _params(m_ref))


def test_wrapper_never_touches_momentum():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    opt = CyclicLRWrapper(inner, 0.01, 0.1, 2, mode="triangular")
    X, y = _data()
    _train(opt, model, X, y, 5)
    assert inner.param_groups[0]["momentum"] == 0.0
    assert "momentum_buffer" not in str(inner.state_dict()["state"])
    # the pitfall we avoid: torch's default silently sets momentum 0.9
    control = torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.0)
    CyclicLR(control, 0.01, 0.1, 2)
    assert control.param_groups[0]["momentum"] == 0.9


def _momentum_optimizer(opt_name):
    """A builder of SGD with momentum or Adam over ``_groups(model)``."""

    def make(model):
        if opt_name == "sgd":
            return torch.optim.SGD(_groups(model), lr=1.0, momentum=0.5)
        return torch.optim.Adam(_groups(model), lr=1.0)

    return make


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_cycle_momentum_matches_torch(opt_name):
    make = _momentum_optimizer(opt_name)
    kw = {"base_momentum": [0.8, 0.7], "max_momentum": [0.9, 0.95]}
    ref = make(_model())
    sched = CyclicLR(ref, 0.01, 0.1, 3, 4, cycle_momentum=True, **kw)
    opt = CyclicLRWrapper(make(_model()), 0.01, 0.1, 3, 4, cycle_momentum=True, **kw)
    for _ in range(20):
        for g_ref, g in zip(ref.param_groups, opt.param_groups, strict=True):
            key = "betas" if opt_name == "adam" else "momentum"
            # exact: the same arithmetic as torch with the bounds swapped
            assert g[key] == g_ref[key]
            assert g["lr"] == g_ref["lr"]
        ref.step()
        sched.step()
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_as_scheduler_cycles_momentum_like_torch(opt_name):
    # as_scheduler with cycle_momentum=True writes the same momentum (betas[0])
    # and lr before every optimizer step as torch's CyclicLR, exactly
    make = _momentum_optimizer(opt_name)
    kw = {"base_momentum": [0.8, 0.7], "max_momentum": [0.9, 0.95]}
    ref = make(_model())
    ref_sched = CyclicLR(ref, 0.01, 0.1, 3, 4, cycle_momentum=True, **kw)
    wrapper = CyclicLRWrapper(
        make(_model()), 0.01, 0.1, 3, 4, cycle_momentum=True, **kw
    )
    opt, sched = wrapper.optimizer, wrapper.as_scheduler()
    key = "betas" if opt_name == "adam" else "momentum"
    for _ in range(12):
        for g_ref, g in zip(ref.param_groups, opt.param_groups, strict=True):
            assert g[key] == g_ref[key]
            assert g["lr"] == g_ref["lr"]
        ref.step()
        ref_sched.step()
        opt.step()
        sched.step()


def test_cycle_momentum_needs_momentum():
    class Plain(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            return None

    inner = Plain(_model().parameters())
    match = (
        r"`cycle_momentum=True` needs an optimizer with a `momentum` or `betas` "
        r"hyperparameter; Plain has neither\. Pass cycle_momentum=False"
    )
    with pytest.raises(ValueError, match=match):
        CyclicLRWrapper(inner, 0.01, 0.1, 2, cycle_momentum=True)
    opt = CyclicLRWrapper(inner, 0.01, 0.1, 2)
    opt.step()
    assert opt.last_step == 1


def test_closure_called_once_and_loss_returned():
    model = _model()
    X, y = _data()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=0.1), 0.01, 0.1, 2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, X, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    assert torch.equal(loss, _loss(_model(), X, y))
    # no closure (Lightning in some precisions): still steps and counts
    opt.zero_grad()
    _loss(model, X, y).backward()
    assert opt.step() is None
    assert opt.last_step == 2


def test_lr_convention():
    model = _model()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=7.0), 0.1, 0.5, 2)
    # right after construction: the lr of step 0
    assert opt.param_groups[0]["lr"] == 0.1
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for _ in range(3):
        opt.step()
    # between steps: the lr of the next step; the pre-hook sees the one to be set
    assert opt.param_groups[0]["lr"] == cyclic_lr(3, 0.1, 0.5, 2)
    assert seen == [cyclic_lr(t, 0.1, 0.5, 2) for t in range(3)]
    assert opt.lr_at(opt.last_step - 1) == [cyclic_lr(2, 0.1, 0.5, 2)]


def test_tensor_lr_written_in_place():
    model = _model()
    lr = torch.tensor(0.5, dtype=torch.float64)
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    opt = CyclicLRWrapper(inner, 0.1, 0.5, 2)
    X, y = _data()
    _train(opt, model, X, y, 3)
    assert inner.param_groups[0]["lr"] is lr
    assert lr.item() == cyclic_lr(3, 0.1, 0.5, 2)


def test_shares_groups_state_defaults():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = CyclicLRWrapper(inner, 0.01, 0.1, 2)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.optimizer is inner
    # setters forward to the inner optimizer
    opt.state = type(inner.state)(dict)
    assert opt.state is inner.state


def test_zero_grad_forwarded():
    model = _model()
    X, y = _data()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=0.1), 0.01, 0.1, 2)
    _loss(model, X, y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _checkpoint(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_resume_is_bit_exact(opt_name):
    """Save -> weights_only load -> N steps equals the uninterrupted run.

    Covers the SAM-wrapper pitfall: the inner momentum/Adam moments must survive.
    """

    def make(model):
        if opt_name == "adam":
            inner = torch.optim.Adam(_groups(model), lr=1.0)
        else:
            inner = torch.optim.SGD(_groups(model), lr=1.0, momentum=0.9)
        return CyclicLRWrapper(inner, [0.01, 0.02], [0.05, 0.1], 3, 2, "triangular2")

    X, y = _data()
    m_full = _model()
    opt_full = make(m_full)
    _train(opt_full, m_full, X, y, 14)

    m_a = _model()
    opt_a = make(m_a)
    _train(opt_a, m_a, X, y, 6)
    ckpt = _checkpoint({"model": m_a.state_dict(), "opt": opt_a.state_dict()})
    m_b = _model(seed=3)  # different init: everything must come from the checkpoint
    m_b.load_state_dict(ckpt["model"])
    opt_b = make(m_b)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.last_step == 6
    assert len(opt_b.state) == len(list(m_b.parameters()))
    _train(opt_b, m_b, X, y, 8)
    assert _equal(_params(m_b), _params(m_full))
    assert opt_b.last_step == opt_full.last_step == 14


def test_load_plain_state_dict_keeps_position():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, y = _data()
    _train(inner, model, X, y, 2)
    plain = _checkpoint(inner.state_dict())
    opt = CyclicLRWrapper(inner, 0.01, 0.1, 2)
    _train(opt, model, X, y, 3)
    opt.load_state_dict(plain)
    assert opt.last_step == 3
    assert opt.param_groups[0]["cyclic_max_lr"] == 0.1
    assert opt.param_groups[0]["lr"] == cyclic_lr(3, 0.01, 0.1, 2)


def test_state_dict_hooks_fire():
    model = _model()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=0.1), 0.01, 0.1, 2)
    events = []
    opt.register_state_dict_pre_hook(lambda o: events.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: events.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: events.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
    opt.load_state_dict(opt.state_dict())
    assert events == ["pre", "post", "load_pre", "load_post"]


def test_as_scheduler_matches_wrapper():
    X, y = _data()
    m_w = _model()
    opt = CyclicLRWrapper(
        torch.optim.SGD(_groups(m_w), lr=1.0, momentum=0.9), [0.01, 0.02], 0.1, 3
    )
    _train(opt, m_w, X, y, 12)

    m_s = _model()
    wrapper = CyclicLRWrapper(
        torch.optim.SGD(_groups(m_s), lr=1.0, momentum=0.9), [0.01, 0.02], 0.1, 3
    )
    sched = wrapper.as_scheduler()
    assert isinstance(sched, LRScheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before step()" warning
        used = _train(wrapper.optimizer, m_s, X, y, 12, scheduler=sched)
    assert used == [opt.lr_at(t) for t in range(12)]
    assert _equal(_params(m_s), _params(m_w))
    # the position is kept in the groups, so the wrapper and checkpoints see it
    assert wrapper.last_step == 12
    assert sched.get_last_lr() == opt.lr_at(12)
    assert "_wrapper" not in sched.state_dict()


def test_as_scheduler_starts_at_current_position():
    model = _model()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=1.0), 0.1, 0.5, 2)
    opt.step()
    sched = opt.as_scheduler()
    assert sched.get_last_lr() == [cyclic_lr(1, 0.1, 0.5, 2)]


def test_add_param_group_joins_schedule():
    model = _model()
    inner = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = CyclicLRWrapper(inner, 0.1, 0.5, 2)
    opt.step()
    opt.add_param_group({"params": list(model[2].parameters())})
    g = inner.param_groups[1]
    assert g["cyclic_step"] == 1 and g["lr"] == cyclic_lr(1, 0.1, 0.5, 2)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))],
                         "cyclic_base_lr": 0.0, "cyclic_max_lr": 1.0})  # fmt: skip
    assert inner.param_groups[2]["lr"] == cyclic_lr(1, 0.0, 1.0, 2)
    with pytest.raises(
        ValueError,
        match=r"`cyclic_base_lr` must be <= `cyclic_max_lr`; got cyclic_base_lr=2\.0",
    ):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.zeros(2))], "cyclic_base_lr": 2.0}
        )


def test_add_param_group_needs_bounds_for_per_group_lists():
    model = _model()
    inner = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = CyclicLRWrapper(inner, [0.1], [0.5], 2)
    match = r"the new param group needs a `cyclic_base_lr` key: `base_lr` was given"
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": list(model[2].parameters())})


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"optimizer": "sgd"}, TypeError,
         r"`optimizer` must be a torch\.optim\.Optimizer; got str\."),
        ({"base_lr": 0.5, "max_lr": 0.1}, ValueError,
         r"`base_lr\[0\]` must be <= `max_lr\[0\]`; got base_lr\[0\]=0\.5 > "
         r"max_lr\[0\]=0\.1\."),
        ({"base_lr": [0.1, 0.1]}, ValueError,
         r"`base_lr` must be a number or a list with one number per param group "
         r"\(1\); got a list of 2\."),
        ({"max_lr": [-1.0]}, ValueError, r"`max_lr\[0\]` must be >= 0; got -1\.0\."),
        ({"base_lr": "0.1"}, TypeError, r"`base_lr` must be a real number; got str"),
        ({"step_size_up": 0}, ValueError, r"`step_size_up` must be >= 1; got 0\."),
        ({"step_size_up": -3}, ValueError, r"`step_size_up` must be >= 1; got -3\."),
        ({"step_size_down": 0}, ValueError, r"`step_size_down` must be >= 1; got 0\."),
        ({"mode": "linear"}, ValueError,
         r"`mode` must be one of 'triangular', 'triangular2', 'exp_range', "
         r"'cosine', 'square'; got 'linear'\."),
        ({"gamma": -1.0}, ValueError, r"`gamma` must be > 0; got -1\.0\."),
        ({"cycle_momentum": 1}, TypeError, r"`cycle_momentum` must be a bool; got int"),
        ({"cycle_momentum": True, "base_momentum": 1.0}, ValueError,
         r"`base_momentum` must be < 1; got 1\.0\."),
        ({"cycle_momentum": True, "base_momentum": 0.95}, ValueError,
         r"`base_momentum\[0\]` must be <= `max_momentum\[0\]`"),
    ],
)  # fmt: skip
def test_wrapper_errors(kwargs, exc, match):
    model = _model()
    args = {
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "base_lr": 0.01,
        "max_lr": 0.1,
        "step_size_up": 2,
        **kwargs,
    }
    with pytest.raises(exc, match=match):
        CyclicLRWrapper(**args)


def test_lr_at_errors():
    opt = CyclicLRWrapper(torch.optim.SGD(_model().parameters(), lr=1.0), 0.1, 0.5, 2)
    with pytest.raises(ValueError, match=r"`step` must be >= 0; got -2\."):
        opt.lr_at(-2)


def test_amp_skipped_steps_do_not_count():
    model = _model()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=1.0), 0.1, 0.5, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    X, y = _data()
    scaler.scale(_loss(model, X, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.last_step == 1
    before = _params(model)
    opt.zero_grad()
    scaler.scale(_loss(model, X, y) * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the step is skipped ...
    scaler.update()
    assert opt.last_step == 1  # ... and the schedule does not advance
    assert _equal(_params(model), before)


@pytest.mark.slow
def test_compiled_step_tensor_lr_no_recompile():
    """Inside torch.compile a tensor lr is written in place: no recompiles.

    The float-lr control shows the pitfall (and that the graph count can fail).
    """
    try:
        from torch._dynamo.utils import counters
    except Exception as e:  # pragma: no cover - depends on the build
        pytest.skip(f"torch.compile unavailable: {e}")
    X, y = _data()

    def run(compiled, lr):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        # step_size_up=10: every one of the 7 steps has a different lr
        opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=lr), 0.01, 0.1, 10)

        def train_step():
            opt.zero_grad()
            _loss(model, X, y).backward()
            opt.step()

        fn = torch.compile(train_step) if compiled else train_step
        graphs = []
        for _ in range(7):
            fn()
            graphs.append(counters["stats"]["unique_graphs"])
        return _params(model), graphs

    eager, _ = run(False, torch.tensor(0.1, dtype=torch.float64))
    compiled, graphs = run(True, torch.tensor(0.1, dtype=torch.float64))
    # tolerance: compiled kernels may fuse/reorder float64 ops (a few ulps)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # all graphs (graph breaks at the eager schedule and backward) exist after
    # the second step (the first has no .grad to zero); the changing lr adds none
    assert graphs[-1] == graphs[1], graphs
    _, float_graphs = run(True, 0.1)
    assert float_graphs[-1] > graphs[-1], (float_graphs, graphs)


def test_pickle_drops_hooks_keeps_schedule():
    import pickle

    model = _model()
    opt = CyclicLRWrapper(torch.optim.SGD(model.parameters(), lr=1.0), 0.1, 0.5, 2)
    opt.register_step_post_hook(lambda o, a, k: None)  # a lambda does not pickle
    opt.step()
    copy_ = pickle.loads(pickle.dumps(opt))
    assert copy_.last_step == 1 and copy_.mode == "triangular"
    assert copy_.param_groups is copy_.optimizer.param_groups
    assert len(copy_._optimizer_step_post_hooks) == 0
    copy_.step()
    assert copy_.last_step == 2


# -- groups added to the inner optimizer, nesting ------------------------------------


def _finetune_run(route, use_scheduler):
    """Run 4 cycles; a second group joins at step 5 through ``route``.

    ``route="wrapper"`` is ``wrapper.add_param_group``; ``"inner"`` is
    ``wrapper.optimizer.add_param_group``, as Lightning's BackboneFinetuning does
    with the optimizer it is given. Returns the lrs each step used, the lrs
    after each step, the parameters and the final param groups (without params).
    """
    X, y = _data()
    model = _model()
    inner = torch.optim.SGD(model[2].parameters(), lr=1.0, momentum=0.9)
    wrapper = CyclicLRWrapper(
        inner, 0.01, 0.1, 3, 2, "triangular2", cycle_momentum=True
    )
    sched = wrapper.as_scheduler() if use_scheduler else None
    opt = inner if use_scheduler else wrapper
    used = []
    inner.register_step_post_hook(
        lambda o, a, k: used.append([(g["lr"], g["momentum"]) for g in o.param_groups])
    )
    after = []
    for t in range(20):
        if t == 5:
            group = {"params": list(model[0].parameters()), "lr": 0.5}
            if route == "wrapper":
                wrapper.add_param_group(group)
            else:
                inner.add_param_group(group)
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        after.append([g["lr"] for g in inner.param_groups])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    return used, after, _params(model), groups, wrapper


@pytest.mark.parametrize("use_scheduler", [False, True], ids=["wrapper", "scheduler"])
def test_group_added_to_inner_optimizer_joins_like_add_param_group(use_scheduler):
    # the wrapper adopts the group at its next step exactly as if it had been
    # added through wrapper.add_param_group: same keys, same position, bit for bit
    ref = _finetune_run("wrapper", use_scheduler)
    run = _finetune_run("inner", use_scheduler)
    assert run[0] == ref[0]  # the lrs and momenta every step used
    assert run[1] == ref[1]
    assert _equal(run[2], ref[2])
    assert run[3] == ref[3]
    assert run[3][1]["cyclic_step"] == run[3][0]["cyclic_step"] == 20
    # step 5 starts the second cycle: base_lr, max_momentum
    assert run[0][5][1] == (0.01, 0.9)
    assert run[0][6][1][0] == cyclic_lr(6, 0.01, 0.1, 3, 2, "triangular2")
    assert all(used[0] == used[1] for used in run[0][5:])  # the same bounds
    assert run[4].lr_at(20) == ref[4].lr_at(20)


def test_group_added_to_inner_optimizer_is_in_the_next_state_dict():
    model = _model()
    inner = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = CyclicLRWrapper(inner, 0.1, 0.5, 2)
    opt.step()
    inner.add_param_group({"params": list(model[2].parameters())})
    sd = opt.state_dict()
    assert sd["param_groups"][1]["cyclic_step"] == 1
    assert opt.lr_at(3) == [cyclic_lr(3, 0.1, 0.5, 2)] * 2


def test_adopted_group_lr_changed_outside_is_caught_at_the_next_step():
    # a group adopted by lr_at is noted as written, so a manual lr change to it
    # before the next step is refused like any other group's
    model = _model()
    X, y = _data()
    inner = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = CyclicLRWrapper(inner, 0.1, 0.5, 2)
    _train(opt, model, X, y, 1)
    inner.add_param_group({"params": list(model[2].parameters())})
    opt.lr_at(3)  # adopts the group
    inner.param_groups[1]["lr"] = 0.77
    _loss(model, X, y).backward()
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['lr'\] was changed"):
        opt.step()


def test_group_added_to_inner_optimizer_needs_bounds_for_per_group_lists():
    model = _model()
    X, y = _data()
    inner = torch.optim.SGD(model[0].parameters(), lr=1.0)
    opt = CyclicLRWrapper(inner, [0.1], [0.5], 2)
    inner.add_param_group({"params": list(model[2].parameters()), "lr": 0.3})
    _loss(model, X, y).backward()
    before = _params(model)
    match = (
        r"param_groups\[1\] was added to `wrapper\.optimizer` directly.*"
        r"needs a `cyclic_base_lr` key: `base_lr` was given per group.*"
        r"Nothing was changed\."
    )
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert _equal(_params(model), before)
    assert opt.last_step == 0 and "cyclic_step" not in inner.param_groups[1]
    assert inner.param_groups[1]["lr"] == 0.3
    inner.param_groups[1].update(cyclic_base_lr=0.2, cyclic_max_lr=0.4)
    opt.step()
    assert inner.param_groups[1]["lr"] == cyclic_lr(1, 0.2, 0.4, 2)


def test_wrapping_a_wrapper_is_refused_and_changes_nothing():
    model = _model()
    X, y = _data()
    inner = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    wrapper = CyclicLRWrapper(inner, 0.01, 0.1, 3)
    _train(wrapper, model, X, y, 4)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    match = (
        r"`optimizer` is already a CyclicLRWrapper.*Wrap the inner optimizer "
        r"once"
    )
    with pytest.raises(TypeError, match=match):
        CyclicLRWrapper(wrapper, 0.1, 0.5, 2)
    assert [{k: v for k, v in g.items() if k != "params"}
            for g in inner.param_groups] == groups  # fmt: skip
    _train(wrapper, model, X, y, 1)  # still steps: nothing was overwritten
    assert wrapper.last_step == 5
