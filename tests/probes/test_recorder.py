"""NoiseProbe: schedule, sinks, warm start, non-finite handling, and no side effects."""

import io
import json
import math
import warnings

import pytest
import torch
from cases import image_data, make_data, mlp, tiny_cnn
from torch import nn

from geoopt_sgd import NoiseProbe, ProbedSGD


class FakeResult:
    def __init__(self, values, eigenvectors=None):
        self.values = values
        self.eigenvectors = eigenvectors

    def as_dict(self):
        out = dict(self.values)
        out["eigenvalues"] = [2.0, 1.0]
        out["cost_n_hvp"] = 3.0
        return out


class RecordingWriter:
    """A duck-typed ``SummaryWriter``: keeps every ``add_scalar`` call."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


class Vandal:
    """A measurement that does everything a probe must not leave behind.

    It consumes the global RNG, runs a train-mode forward (updating BatchNorm
    running statistics and using dropout), back-propagates into ``.grad``, flips
    module modes, and returns eigenvectors built from the parameters.
    """

    def __init__(self, values=None):
        self.calls = []
        self.values = values

    def __call__(self, model, loss_fn, data, *, metrics=None, k=10, v0=None, seed=None):
        self.calls.append(dict(metrics=metrics, k=k, v0=v0, seed=seed))
        torch.rand(3)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed(123)
        inputs, targets = data
        model.train()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        model.eval()
        P = sum(p.numel() for p in model.parameters())
        V = torch.ones(P, k, dtype=torch.float64) * (len(self.calls))
        values = self.values if self.values is not None else {"loss": loss.item()}
        return FakeResult(dict(values), V)


def _snapshot(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [
            None if p.grad is None else p.grad.clone() for p in model.parameters()
        ],
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "state": [
            {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()
        ],
        "rng": torch.get_rng_state(),
    }


def _assert_equal_snapshots(a, b):
    # torch.equal everywhere: the probe must not change a single bit
    for x, y in zip(a["params"] + a["grads"], b["params"] + b["grads"], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x, y)
    assert a["buffers"].keys() == b["buffers"].keys()
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n], b["buffers"][n]), n
    assert a["modes"] == b["modes"]
    for sa, sb in zip(a["state"], b["state"], strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert torch.equal(a["rng"], b["rng"])


class DropoutCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_cnn()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


def _train(model_fn, *, probe_factory=None, optimizer="sgd", steps=12):
    model = model_fn()
    model.train()
    X, y = image_data(n=16, seed=1)
    probe_X, probe_y = image_data(n=8, seed=2)
    loss_fn = nn.CrossEntropyLoss()
    probe = None
    if probe_factory is not None:
        probe = probe_factory(model, loss_fn, (probe_X, probe_y))
    if optimizer == "probed":
        opt = ProbedSGD(model.parameters(), lr=0.05, momentum=0.9, probe=probe)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if probe is not None:
            probe.attach(opt)
    torch.manual_seed(7)
    for _ in range(steps):
        i = torch.randint(0, 16, (8,))  # consumes the global RNG
        opt.zero_grad()
        loss_fn(model(X[i]), y[i]).backward()
        opt.step()
    return _snapshot(model, opt), probe


@pytest.mark.parametrize("optimizer", ["sgd", "probed"])
@pytest.mark.parametrize("model_fn", [tiny_cnn, DropoutCNN], ids=["bn", "bn+dropout"])
def test_probe_never_changes_trajectory_vandal(model_fn, optimizer, measure):
    ref, _ = _train(model_fn, optimizer=optimizer)

    def factory(model, loss_fn, data):
        measure(Vandal())
        return NoiseProbe(model, loss_fn, data, every=3, k=2)

    got, probe = _train(model_fn, probe_factory=factory, optimizer=optimizer)
    assert probe.num_probes == 4
    _assert_equal_snapshots(ref, got)


def test_probe_never_changes_trajectory_real_metrics():
    # BatchNorm in train mode and dropout (consumes the RNG) with noise_geometry
    ref, _ = _train(DropoutCNN, optimizer="probed")

    def factory(model, loss_fn, data):
        return NoiseProbe(model, loss_fn, data, every=6, k=2, metrics=["loss", "mu"])

    got, probe = _train(DropoutCNN, probe_factory=factory, optimizer="probed")
    assert [r["step"] for r in probe.history] == [6, 12]
    assert all(math.isfinite(r["mu"]) for r in probe.history)
    _assert_equal_snapshots(ref, got)


def _loop(model, opt, steps, X, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()


def test_schedule_records_and_warm_start(measure):
    model = mlp()
    X, y = make_data()
    vandal = Vandal()
    measure(vandal)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=2, k=3, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert probe.attach(opt) is probe
    _loop(model, opt, 7, X, y)
    assert [r["step"] for r in probe.history] == [2, 4, 6]
    assert [c["seed"] for c in vandal.calls] == [5, 6, 7]
    assert all(c["k"] == 3 and c["metrics"] is None for c in vandal.calls)
    # the first probe starts cold, each later one from the previous eigenvectors
    assert vandal.calls[0]["v0"] is None
    assert torch.equal(vandal.calls[1]["v0"], torch.full_like(vandal.calls[1]["v0"], 1))
    assert torch.equal(vandal.calls[2]["v0"], torch.full_like(vandal.calls[2]["v0"], 2))
    rec = probe.history[0]
    assert rec["lr"] == 0.1 and rec["eigenvalues"] == [2.0, 1.0]
    assert rec["cost_n_hvp"] == 3.0 and rec["probe_seconds"] >= 0
    assert probe.step_count == 7 and probe.num_probes == 3
    probe.detach()
    _loop(model, opt, 2, X, y)
    assert probe.step_count == 7 and len(probe.history) == 3 and not probe.attached


def test_warm_start_off_and_lr_of_groups(measure):
    model = mlp()
    X, y = make_data()
    vandal = Vandal()
    measure(vandal)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, warm_start=False)
    params = list(model.parameters())
    opt = torch.optim.Adam(  # any optimizer
        [{"params": params[:2]}, {"params": params[2:], "lr": torch.tensor(0.5)}],
        lr=0.25,
    )
    probe.attach(opt)
    _loop(model, opt, 2, X, y)
    assert [c["v0"] for c in vandal.calls] == [None, None]
    assert probe.history[0]["lr"] == [0.25, 0.5]
    assert probe.measure()["lr"] == [0.25, 0.5]  # manual probe, attached optimizer


def test_sinks_jsonl_writer_callback(tmp_path, measure):
    model = mlp()
    X, y = make_data()

    writer, seen = RecordingWriter(), []
    path = tmp_path / "noise.jsonl"
    values = {"loss": 0.5, "mu": float("nan"), "alpha": float("inf")}
    measure(Vandal(values))
    probe = NoiseProbe(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        every=1,
        sinks=[path, str(tmp_path / "b.jsonl"), writer],
        callback=seen.append,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _loop(model, opt, 2, X, y)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "b.jsonl").read_text().splitlines() == lines
    first = json.loads(lines[0])  # strict JSON: NaN and inf written as null
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert first["step"] == 1 and first["loss"] == 0.5
    assert first["mu"] is None and first["alpha"] is None
    assert first["eigenvalues"] == [2.0, 1.0]
    # in memory, non-finite values are NaN floats (inf too)
    assert math.isnan(probe.history[0]["mu"]) and math.isnan(probe.history[0]["alpha"])
    assert seen == probe.history
    tags = {t for t, _, s in writer.calls if s == 1}
    assert {"noise/loss", "noise/mu", "noise/lr", "noise/eigenvalues/0"} <= tags
    assert ("noise/loss", 0.5, 2) in writer.calls
    assert "noise/step" not in tags


def test_nonfinite_metrics_warn_once_and_training_continues(measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": float("nan"), "mu": 1.0}))
    probe = NoiseProbe(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        every=1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _loop(model, opt, 3, X, y)
    runtime = [x for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(runtime) == 1 and "NoiseProbe" in str(runtime[0].message)
    assert probe.num_nonfinite == 3 and len(probe.history) == 3
    assert math.isnan(probe.history[2]["loss"]) and probe.history[2]["mu"] == 1.0


def test_nonfinite_parameters_skip_measurement(measure):
    model = mlp()
    X, y = make_data()
    vandal = Vandal()
    measure(vandal)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, metrics=["loss"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="recorded as NaN"):
        opt.step()  # no grads: the step is a no-op, the probe still runs
    assert vandal.calls == []
    assert math.isnan(probe.history[0]["loss"]) and probe.num_nonfinite == 1


def _raiser(model, loss_fn, data, **kwargs):
    raise RuntimeError("eigensolver broke down")


def test_exception_on_nonfinite_probe_loss_recorded_as_nan(measure):
    model = mlp()
    X, y = make_data()
    X = X.clone()
    X[0, 0] = float("nan")  # the probe loss is NaN
    measure(_raiser)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, metrics=["mu"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert math.isnan(probe.history[0]["mu"])
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.gpu
def test_exception_on_nonfinite_cpu_probe_batch_of_a_cuda_model(measure):
    # the NaN check reads the batch on the model's device, as noise_geometry does:
    # a CPU probe batch of a CUDA model is recorded as NaN, not a device error
    model = mlp().cuda()
    X, y = make_data()
    X = X.clone()
    X[0, 0] = float("nan")
    measure(_raiser)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, metrics=["mu"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert math.isnan(probe.history[0]["mu"])


def test_exception_on_finite_inputs_propagates(measure):
    model = mlp()
    X, y = make_data()
    measure(_raiser)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    grads_before = [p.grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="eigensolver broke down"):
        opt.step()
    assert [p.grad for p in model.parameters()] == grads_before


def test_state_dict_round_trip_weights_only(measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal())
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    _loop(model, opt, 4, X, y)
    buf = io.BytesIO()
    torch.save(probe.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["step_count"] == 4 and sd["num_probes"] == 2
    vandal = Vandal()
    measure(vandal)
    probe2 = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=2)
    probe2.load_state_dict(sd)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    probe2.attach(opt2)
    _loop(model, opt2, 2, X, y)
    assert probe2.history[0]["step"] == 6
    assert vandal.calls[0]["seed"] == 2  # probe index continues
    assert torch.equal(vandal.calls[0]["v0"], sd["eigenvectors"])
    assert "eigenvectors" not in probe.state_dict(include_eigenvectors=False)
    with pytest.raises(ValueError, match="has no 'num_probes' entry"):
        probe2.load_state_dict({"step_count": 1})
    with pytest.raises(ValueError, match=r"`state_dict\['step_count'\]` must be >= 0"):
        probe2.load_state_dict({"step_count": -1, "num_probes": 0})


def test_load_state_dict_refuses_eigenvectors_of_another_size():
    # a checkpoint's warm start for another parameter count raised at the next
    # probe, inside the training loop (audit)
    model = mlp()
    X, y = make_data()
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, k=2)
    P = sum(p.numel() for p in model.parameters())
    before = probe.state_dict()
    for bad in (torch.ones(P + 1, 2), torch.ones(2, P), torch.ones(P, 2, 1)):
        with pytest.raises(ValueError, match=r"`state_dict\['eigenvectors'\]`"):
            probe.load_state_dict(
                {"step_count": 5, "num_probes": 1, "eigenvectors": bad}
            )
        assert probe.state_dict() == before  # nothing loaded
    probe.load_state_dict(
        {"step_count": 5, "num_probes": 1, "eigenvectors": torch.ones(P, 2)}
    )
    assert probe.step_count == 5
    sub = NoiseProbe(
        model, nn.CrossEntropyLoss(), (X, y), k=2, params=[model[0].weight]
    )
    with pytest.raises(ValueError, match=r"`state_dict\['eigenvectors'\]`"):
        sub.load_state_dict(
            {"step_count": 0, "num_probes": 0, "eigenvectors": torch.ones(P, 2)}
        )


def _probe(**kwargs):
    model = mlp()
    return NoiseProbe(model, nn.CrossEntropyLoss(), make_data(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(every=0), ValueError, "`every` must be >= 1; got 0."),
        (dict(every=2.5), TypeError, "`every` must be an integer; got float."),
        (dict(k=0), ValueError, "`k` must be >= 1; got 0."),
        (dict(seed="a"), TypeError, "`seed` must be an integer; got str."),
        (dict(seed=-1), ValueError, "`seed` must be >= 0; got -1."),
        (dict(metrics="mu"), TypeError, "`metrics` must be a sequence"),
        (dict(sinks=[3]), ValueError, "each sink must be a path"),
        (dict(callback=3), TypeError, "`callback` must be callable or None"),
        (dict(v0=None), ValueError, "`v0` is set by NoiseProbe itself"),
    ],
    ids=["every=0", "every=float", "k=0", "seed", "seed<0", "metrics=str", "sink", "cb"]
    + ["v0"],
)
def test_bad_arguments(kwargs, exc, match, measure):
    with pytest.raises(exc, match=match):
        measure(Vandal())
        _probe(**kwargs)


def test_bad_probe_data(measure):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match="got a one-shot iterator"):
        measure(Vandal())
        NoiseProbe(model, loss_fn, iter([make_data()]))
    with pytest.raises(TypeError, match="`data` must be an"):
        measure(Vandal())
        NoiseProbe(model, loss_fn, 3)
    with pytest.raises(ValueError, match="`data` is empty"):
        measure(Vandal())
        NoiseProbe(model, loss_fn, [])


def test_unknown_metric_and_option_listed():
    with pytest.raises(
        ValueError, match="`metrics` must be one of 'loss', .*got 'mew'"
    ):
        _probe(metrics=["loss", "mew"])
    with pytest.raises(ValueError, match="`option` must be one of .*'curvature'"):
        _probe(curvatur="ggn")
    probe = _probe(curvature="hessian", max_samples=8)  # forwarded options are fine
    assert probe.options == {"curvature": "hessian", "max_samples": 8}


def test_attach_errors(measure):
    measure(Vandal())
    probe = _probe()
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        probe.attach(object())
    opt = torch.optim.SGD(probe.model.parameters(), lr=0.1)
    probe.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        probe.attach(opt)
    assert "attached=True" in repr(probe)
    probe.detach()
    probe.attach(opt)  # re-attaching after detach is fine


def test_only_rank0_writes_sinks(tmp_path, monkeypatch, measure):
    # under torch.distributed every rank measures and keeps the history, but only
    # rank 0 writes files / writers / callback
    from geoopt_sgd import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    seen = []
    path = tmp_path / "noise.jsonl"
    measure(Vandal())
    probe = _probe(every=1, sinks=[path], callback=seen.append)
    opt = torch.optim.SGD(probe.model.parameters(), lr=0.1)
    probe.attach(opt)
    opt.step()
    assert len(probe.history) == 1 and seen == [] and not path.exists()


def test_skipped_amp_steps_are_not_counted(measure):
    # GradScaler skips optimizer.step() on inf gradients: no hook, no count
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    vandal = Vandal()
    measure(vandal)
    probe = _probe(every=1)
    opt = torch.optim.SGD(probe.model.parameters(), lr=0.1)
    probe.attach(opt)
    scaler.scale(torch.tensor(1.0))  # initialises the scaler's state
    for p in probe.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    scaler.step(opt)
    scaler.update()
    assert probe.step_count == 0 and vandal.calls == []
    for p in probe.model.parameters():
        p.grad = torch.ones_like(p)
    scaler.step(opt)
    assert probe.step_count == 1 and len(vandal.calls) == 1


@pytest.mark.gpu
def test_cuda_rng_restored(measure):
    model = mlp().cuda()
    X, y = make_data()
    measure(Vandal())
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X.cuda(), y.cuda()), every=1)
    torch.rand(1, device="cuda")  # initialise CUDA's generator
    before = torch.cuda.get_rng_state_all()
    probe.measure()
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --- sinks: paths made at construction, failures never raised (#13) ---------------
def test_sink_folder_created_and_str_is_one_path(tmp_path, measure, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": 0.5}))
    nested = tmp_path / "runs" / "deep" / "noise.jsonl"
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, sinks=[nested])
    assert nested.parent.is_dir()  # made when the probe is built
    single = NoiseProbe(
        model, nn.CrossEntropyLoss(), (X, y), every=1, sinks="run.jsonl"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt)
    single.attach(opt)
    _loop(model, opt, 2, X, y)
    assert len(nested.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl", "runs"]
    assert len((tmp_path / "run.jsonl").read_text().splitlines()) == 2
    assert probe.sink_errors == [] and single.sink_errors == []


@pytest.mark.parametrize(
    "sinks, exc, match",
    [
        (3, TypeError, "`sinks` must be a path or a sequence"),
        (b"x.jsonl", TypeError, "`sinks` must be a path or a sequence"),
        ([None], ValueError, "in `sinks`"),
        ("DIR", ValueError, "`sinks`: .* is a directory"),
        ("FILE/x.jsonl", ValueError, "`sinks`: cannot create the folder"),
    ],
    ids=["int", "bytes", "None-item", "directory", "parent-is-file"],
)
def test_bad_sinks(tmp_path, sinks, exc, match):
    (tmp_path / "FILE").write_text("")
    if isinstance(sinks, str):
        sinks = str(tmp_path / sinks.replace("DIR", ""))
    with pytest.raises(exc, match=match):
        _probe(sinks=sinks)


def test_failing_sinks_never_raise(tmp_path, measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": 0.5}))
    path = tmp_path / "noise.jsonl"

    class BadWriter:
        def add_scalar(self, tag, value, step):
            raise OSError("disk full")

    def bad_callback(record):
        raise RuntimeError("callback bug")

    probe = NoiseProbe(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        every=1,
        sinks=[path, BadWriter()],
        callback=bad_callback,
    )
    path.mkdir()  # the file cannot be opened any more
    opt = ProbedSGD(model.parameters(), lr=0.1, probe=probe)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(model, opt, 3, X, y)
    sink_warnings = [w for w in caught if "a sink failed" in str(w.message)]
    assert len(sink_warnings) == 1 and sink_warnings[0].category is RuntimeWarning
    assert len(probe.history) == 3 and probe.history[2]["step"] == 3
    assert len(probe.sink_errors) == 9  # 3 sinks x 3 probes
    assert "noise.jsonl: IsADirectoryError" in probe.sink_errors[0]
    assert "BadWriter: OSError: disk full" in probe.sink_errors[1]
    assert "callback: RuntimeError: callback bug" in probe.sink_errors[2]
    after = list(model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# --- undefined ratios on a saturated network; k = 1 (#13) ---------------------------
def _saturated():
    """A tanh net whose units all saturate: the GGN and Sigma are exactly zero."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Tanh())
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e6)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 2, generator=g, dtype=torch.float64)
    return model, X, y


@pytest.mark.parametrize("route", ["exact", "sketch"])
def test_saturated_noise_geometry_gives_nan_ratios(route):
    from geoopt_sgd import noise_geometry

    model, X, y = _saturated()
    res = noise_geometry(model, nn.MSELoss(), (X, y), k=2, route=route)
    v = res.values
    assert math.isfinite(v["loss"]) and v["tr_sigma"] == 0.0
    for name in ("alpha", "beta", "mu", "mu1", "mu2", "projection_coefficient"):
        assert math.isnan(v[name]), name
    assert v["n_nonfinite"] == sum(math.isnan(x) for x in v.values())


def test_saturated_probe_keeps_training_and_writes(tmp_path):
    model, X, y = _saturated()
    path = tmp_path / "noise.jsonl"
    probe = NoiseProbe(
        model, nn.MSELoss(), (X, y), every=1, k=2, metrics=["loss", "mu"], sinks=path
    )
    opt = ProbedSGD(model.parameters(), lr=0.1, probe=probe)
    with pytest.warns(
        RuntimeWarning, match="mu recorded as NaN .*probe loss is finite"
    ):
        _loop(model, opt, 2, X, y, loss_fn=nn.MSELoss())
    assert len(probe.history) == 2 and probe.num_nonfinite == 2
    rec = probe.history[-1]
    assert math.isnan(rec["mu"]) and rec["n_nonfinite"] == 1.0
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["mu"] is None and lines[0]["n_nonfinite"] == 1


def test_every_record_has_n_nonfinite(measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": 0.5}))
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1)
    assert probe.measure()["n_nonfinite"] == 0.0
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="parameters, or the probe loss"):
        rec = probe.measure()
    assert rec["n_nonfinite"] == len(probe._names()) and math.isnan(rec["mu"])


def test_k1_undefined_metrics_do_not_warn():
    model = mlp()
    X, y = make_data()
    probe = NoiseProbe(
        model,
        nn.CrossEntropyLoss(),
        (X, y),
        every=1,
        k=1,
        metrics=["loss", "mu", "power_law_exponent", "spearman", "eigen_alignment"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = probe.measure()
    assert math.isnan(rec["power_law_exponent"]) and math.isnan(rec["spearman"])
    assert math.isfinite(rec["mu"]) and math.isfinite(rec["eigen_alignment"])
    assert rec["n_nonfinite"] == 3.0 and probe.num_nonfinite == 0


# --- autocast: a probe step inside torch.autocast (#13) -----------------------------
def _conv_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    X = torch.randn(8, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, X, y


def test_probe_step_inside_autocast():
    from geoopt_sgd import noise_geometry

    model, X, y = _conv_problem()
    loss_fn = nn.CrossEntropyLoss()
    ref = noise_geometry(model, loss_fn, (X, y), k=2, seed=0)
    probe = NoiseProbe(model, loss_fn, (X, y), every=1, k=2, warm_start=False)
    opt = ProbedSGD(model.parameters(), lr=0.0, probe=probe)  # lr 0: same point
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step()
            got = noise_geometry(model, loss_fn, (X, y), k=2, seed=0)
    assert got.values == ref.values  # bit for bit, in float32
    assert torch.equal(got.eigenvectors, ref.eigenvectors)
    assert got.eigenvectors.dtype == torch.float32
    rec = probe.history[0]
    assert rec["n_nonfinite"] == 0.0 and probe.num_nonfinite == 0
    assert rec["mu"] == ref.values["mu"]


def test_warm_start_off_never_keeps_or_passes_eigenvectors(measure):
    # warm_start=False: no eigenvectors are kept (the checkpoint holds None) and
    # none are passed as v0, not even ones loaded from a checkpoint
    model = mlp()
    X, y = make_data()
    vandal = Vandal()
    measure(vandal)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, warm_start=False)
    probe.measure()
    assert probe.state_dict()["eigenvectors"] is None
    P = sum(p.numel() for p in model.parameters())
    probe.load_state_dict(
        {"step_count": 1, "num_probes": 1, "eigenvectors": torch.ones(P, 2)}
    )
    probe.measure()
    assert [c["v0"] for c in vandal.calls] == [None, None]


class NaNVectors(Vandal):
    """A Vandal whose second measurement returns NaN eigenvectors."""

    def __call__(self, *args, **kwargs):
        result = super().__call__(*args, **kwargs)
        if len(self.calls) == 2:
            result.eigenvectors = torch.full_like(result.eigenvectors, math.nan)
        return result


def test_non_finite_eigenvectors_are_not_a_warm_start(measure):
    # the next probe starts from the last finite eigenvectors, never from NaN ones
    model = mlp()
    X, y = make_data()
    vandal = NaNVectors()
    measure(vandal)
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1, k=2)
    for _ in range(3):
        probe.measure()
    assert vandal.calls[0]["v0"] is None
    for call in vandal.calls[1:]:
        assert torch.equal(call["v0"], torch.ones_like(call["v0"]))


def test_writers_get_the_tag_prefix(measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": 0.5}))
    writer = RecordingWriter()
    probe = NoiseProbe(
        model, nn.CrossEntropyLoss(), (X, y), sinks=[writer], tag_prefix="geo/run1"
    )
    probe.measure()
    tags = {t for t, _, _ in writer.calls}
    assert ("geo/run1/loss", 0.5, 0) in writer.calls
    assert {"geo/run1/eigenvalues/0", "geo/run1/cost_n_hvp"} <= tags
    assert all(t.startswith("geo/run1/") for t in tags)
    # the step is add_scalar's own argument; the probe's wall time stays in the
    # record and the JSON lines (the docstring's exceptions)
    assert not {"geo/run1/step", "geo/run1/probe_seconds"} & tags
    assert "probe_seconds" in probe.history[-1]


def test_state_dict_round_trip_keeps_the_non_finite_count(measure):
    model = mlp()
    X, y = make_data()
    measure(Vandal({"loss": float("nan")}))
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        probe.measure()
    probe.measure()
    sd = probe.state_dict()
    assert sd["num_nonfinite"] == 2
    probe2 = NoiseProbe(model, nn.CrossEntropyLoss(), (X, y), every=1)
    probe2.load_state_dict(sd)
    assert probe2.num_nonfinite == 2
    probe2.load_state_dict({"step_count": 0, "num_probes": 0})  # older checkpoint
    assert probe2.num_nonfinite == 0


def test_exception_with_an_empty_probe_batch_still_propagates(measure):
    # an empty batch's loss is a NaN mean over no sample, not a non-finite loss:
    # the error of a probe on finite data is raised, not recorded as NaN
    model = mlp()
    X, y = make_data()
    measure(_raiser)
    data = [(X, y), (X[:0], y[:0])]
    probe = NoiseProbe(model, nn.CrossEntropyLoss(), data, every=1)
    with pytest.raises(RuntimeError, match="eigensolver broke down"):
        probe.measure()


def test_too_few_samples_for_a_covariance_refused_at_construction():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = make_data(n=6)
    with pytest.raises(ValueError, match="at least 2 samples .* got 1 samples"):
        NoiseProbe(model, loss_fn, (X[:1], y[:1]))
    NoiseProbe(model, loss_fn, (X[:2], y[:2]))
    # cov="minibatch": two batches of batch_size, among the first max_samples
    with pytest.raises(ValueError, match="at least 2 batches of 4 .* got 6 samples"):
        NoiseProbe(model, loss_fn, (X, y), cov="minibatch", batch_size=4)
    NoiseProbe(model, loss_fn, (X, y), cov="minibatch", batch_size=3)
    with pytest.raises(ValueError, match="at least 2 batches of 3 .* got 5 samples"):
        NoiseProbe(model, loss_fn, (X, y), cov="minibatch", batch_size=3, max_samples=5)
