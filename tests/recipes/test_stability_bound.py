from __future__ import annotations

import copy
import dataclasses
import math

import _common as C
import cases
import pytest
import stability_bound as R
import torch
from torch import nn

from geoopt_sgd import HalfSquaredError, HessianOperator, noise_geometry


def tiny(tmp_path, **kw):
    """A config small enough for a unit test: 2 sizes of one family, 2 widths."""
    base = dict(
        out_dir=str(tmp_path),
        families=("mlp",),
        mlp_widths=(2, 8),
        num_train=100,
        steps=40,
        num_evals=2,
        tail_evals=2,
        trace_probes=4,
        mu_samples=50,
        exact_max=200,
        z19_widths=(4, 8),
        z19_samples=100,
        z19_epochs=3,
        z19_decay_epoch=2,
    )
    base.update(kw)
    return R.Config(**base)


def test_eval_steps_cover_the_run_and_its_last_tenth():
    cfg = R.Config(steps=2000, num_evals=10, tail_evals=4)
    steps = R.eval_steps(cfg)
    assert steps[0] == 0 and steps[-1] == 2000
    assert [s for s in steps if s >= 1800] == [1800, 1850, 1900, 1950, 2000]
    assert len(steps) == 11 + 5 - 2  # 1800 and 2000 are in both lists


def test_hessian_norms_exact_and_hutchinson():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    loss_fn = HalfSquaredError()
    H = HessianOperator(model, loss_fn, (x, y)).to_dense()
    cfg = R.Config(exact_max=100, trace_probes=100)
    exact = R.hessian_norms(model, loss_fn, (x, y), cfg, seed=0)
    assert exact["fro"] == pytest.approx(float(H.norm()), rel=1e-12)
    assert exact["trace"] == pytest.approx(float(H.trace()), rel=1e-12)
    assert exact["fro_se"] == exact["trace_se"] == 0.0
    est = R.hessian_norms(
        model, loss_fn, (x, y), dataclasses.replace(cfg, exact_max=0), seed=0
    )
    # Hutchinson with 100 probes: within 4 of its own standard errors
    assert abs(est["fro"] - float(H.norm())) <= 4 * est["fro_se"]
    assert abs(est["trace"] - float(H.trace())) <= 4 * est["trace_se"]
    assert 0 < est["fro_se"] < 0.2 * est["fro"]


def test_one_hidden_layer_is_z19s_net():
    torch.manual_seed(0)
    net = R.OneHiddenLayer(6).double()
    assert sum(p.numel() for p in net.parameters()) == 18  # P = 3h
    assert net.a.tolist() == [1, 1, 1, -1, -1, -1]
    assert float(net.weight.detach().abs().max()) <= math.sqrt(3 / 18)
    x = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    with torch.no_grad():
        pre = float(torch.relu(x @ net.weight.T + net.bias) @ net.a)
        out = float(net(x))
    assert out == pytest.approx(min(max(pre, 1e-3), 1 - 1e-3))


def test_tr_h_sigma_ratio_matches_a_dense_computation():
    """The widths part's numbers against the dense Hessian and explicit batch
    gradients (Z19's estimator: covariance of the batch-mean gradients)."""
    cfg = R.Config(z19_samples=60, z19_batch=10)
    x, y = R.z19_data(cfg, torch.device("cpu"))
    torch.manual_seed(3)
    net = R.OneHiddenLayer(8).double()
    # move into a region where some samples are clipped and some are not
    with torch.no_grad():
        net.weight.mul_(3.0)
    loss_fn = nn.MSELoss()
    H = HessianOperator(net, loss_fn, (x, y)).to_dense()
    grads = []
    for b in range(6):
        net.zero_grad()
        loss_fn(net(x[10 * b : 10 * b + 10]), y[10 * b : 10 * b + 10]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    D = torch.stack(grads)
    D = D - D.mean(0)
    Cov = D.T @ D / 6
    P = H.shape[0]
    ref = float(torch.trace(H @ Cov)) / (float(H.trace()) * float(Cov.trace()) / P)
    geo = noise_geometry(
        net,
        loss_fn,
        (x, y),
        metrics=["tr_h_sigma", "tr_h_sigma_iso"],
        cov="minibatch",
        batch_size=10,
        max_samples=60,
    )
    got = geo.values["tr_h_sigma"] / geo.values["tr_h_sigma_iso"]
    assert got == pytest.approx(ref, rel=1e-9)
    assert float(torch.trace(H @ Cov)) == pytest.approx(
        geo.values["tr_h_sigma"], rel=1e-9
    )


@pytest.mark.slow  # two tiny recipe runs and a resume: ~65 s on the loaded 2 cores
def test_smoke_schema_png_resume_and_each_row_can_fail(tmp_path, interrupt_at):
    cfg = tiny(tmp_path / "a")
    res = R.main(cfg)
    out = tmp_path / "a" / "stability_bound"
    cases.check_results(out, "stability_bound")
    assert len(res["verdict"]) == 5
    runs = res["arrays"]["bound"]
    assert [r["method"] for r in runs] == ["exact"] * 2 + ["hutchinson"] * 2
    assert [(r["width"], r["B"]) for r in runs] == [(2, 5), (2, 40), (8, 5), (8, 40)]
    for r in runs:
        assert r["step"] == R.eval_steps(cfg)
        assert r["method"] == ("exact" if r["P"] <= cfg.exact_max else "hutchinson")
        assert r["bound"] == pytest.approx(math.sqrt(r["B"] / r["mu0"]) / cfg.lr)
        assert r["lr"] == cfg.lr
        assert r["ratio"] == pytest.approx([f / r["bound"] for f in r["fro"]])
        tail = [
            m for s, m in zip(r["step"], r["mu"], strict=True) if s >= 0.9 * cfg.steps
        ]
        assert r["mu0"] == pytest.approx(R._median(tail))
    assert [w["P"] for w in res["arrays"]["widths"]] == [12, 24]
    assert all(len(w["ratio"]) == 3 for w in res["arrays"]["widths"])
    # plot() redraws from the JSON alone
    for name in ("bound.png", "widths.png"):
        (out / name).unlink()
    assert R.plot(out / "results.json") == [out / "bound.png", out / "widths.png"]

    # each row fails when its measurement says so (the same arrays, changed)
    def verdict_of(arrays):
        return {r["claim"].split(":")[0]: r for r in R.summarise(arrays, cfg)[1]}

    assert [r for r in verdict_of(res["arrays"]).values()] == res["verdict"]
    sharp = copy.deepcopy(res["arrays"])
    for r in sharp["bound"]:
        r["ratio"] = [10 * v for v in r["ratio"]]
    assert not next(v for k, v in verdict_of(sharp).items() if "along" in k)["passed"]
    swapped = copy.deepcopy(res["arrays"])
    for r in swapped["bound"]:
        r["final_ratio"] = 1.0 if r["B"] == 40 else 0.5
    row = next(v for k, v in verdict_of(swapped).items() if "tighter" in k)
    assert row["value"] == 0.5 and not row["passed"]
    flat = copy.deepcopy(res["arrays"])
    for r in flat["bound"]:
        r["final_trace"] = 3.0 * r["final_fro"]  # Tr H grows like ||H||_F
    row = next(v for k, v in verdict_of(flat).items() if "Tr H grows" in k)
    assert row["value"] == pytest.approx(1.0) and not row["passed"]
    iso = copy.deepcopy(res["arrays"])
    iso["widths"][0]["ratio"][1] = 4.0
    iso["widths"][1]["ratio"] = [1.0, 1.0, 1.0]
    rows = verdict_of(iso)
    assert not next(v for k, v in rows.items() if ">>" in k)["passed"]
    assert not next(v for k, v in rows.items() if "decrease" in k)["passed"]

    # interrupted at the third run, then resumed: same results
    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    with interrupt_at(2):
        R.main(cfg_b)
    res_b = R.main(dataclasses.replace(cfg_b, resume=True))
    assert res_b["arrays"] == res["arrays"]
    assert res_b["verdict"] == res["verdict"]


def test_a_diverging_run_fails_the_bound_row(tmp_path):
    cfg = tiny(
        tmp_path,
        part="bound",
        lr=50.0,
        mlp_widths=(2, 4),
        steps=10,
        num_evals=1,
        tail_evals=1,
    )
    res = R.main(cfg)
    row = res["verdict"][0]
    assert res["metrics"]["diverged_runs"]
    assert row["value"] is None and not row["passed"]
    assert not res["passed"]


def _bound_arrays():
    """Constructed runs of both parts on which every row passes."""
    runs = []
    for fam in ("mlp", "cnn"):
        for w, P, trace, fro in ((2, 10, 1.0, 1.0), (8, 100, 10.0, 2.0)):
            for B, final in ((5, 0.8), (40, 0.4)):
                runs.append(
                    {
                        "family": fam,
                        "width": w,
                        "P": P,
                        "B": B,
                        # step 0 (the initialisation) is above the bound
                        "step": [0, 10, 20],
                        "ratio": [1.5, 0.5, 0.9],
                        "diverged": False,
                        "final_ratio": final,
                        "final_trace": trace,
                        "final_fro": fro,
                    }
                )
    wide = [{"width": 4, "ratio": [6.0, 5.0, 7.0]}, {"width": 8, "ratio": [7.0, 8.0]}]
    return {"bound": runs, "widths": wide}


def _failed_rows(change=None):
    cfg = R.Config(families=("mlp", "cnn"), mlp_widths=(2, 8), cnn_widths=(2, 8))
    arrays = _bound_arrays()
    if change:
        change(arrays["bound"], arrays["widths"])
    _, rows = R.summarise(arrays, cfg)
    assert len(rows) == 5
    return [i for i, r in enumerate(rows) if not r["passed"]]


def _set(run, **kw):
    run.update(kw)


@pytest.mark.parametrize(
    "change, failed",
    [
        (None, []),
        # one evaluation after step 0 above the bound, in one run
        (lambda b, w: b[5]["ratio"].__setitem__(2, 1.01), [0]),
        # a run that diverged fails the bound row even where its ratios are finite
        (lambda b, w: _set(b[3], diverged=True), [0]),
        (lambda b, w: _set(b[1], final_ratio=0.8), [1]),  # 0.8 / 0.8 is not > 1
        # a NaN ratio in one family fails the row though the other family passes
        (lambda b, w: _set(b[7], final_ratio=math.nan), [1]),
        (lambda b, w: _set(b[6], final_trace=3.9), [2]),  # cnn: 3.9 / 2 < 2
        (lambda b, w: _set(b[4], final_trace=math.nan), [2]),
        (lambda b, w: w[1]["ratio"].__setitem__(0, 4.9), [3]),
        (lambda b, w: w[1].update(ratio=[5.0, 6.0]), [4]),  # median 6 -> 5.5
    ],
)
def test_each_row_fails_on_its_side_of_the_threshold(change, failed):
    assert _failed_rows(change) == failed


@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_nan_ratio_fails_the_iso_row_wherever_it_is(where):
    # a NaN Tr(H Sigma) / Tr(H Sigma_iso) (a diverged epoch) fails the "min over
    # widths and epochs" row, whichever epoch it is in
    def change(b, w):
        w[0]["ratio"][where] = math.nan

    assert 3 in _failed_rows(change)


def test_a_width_without_a_finite_ratio_fails_the_width_row():
    # the widest width has no finite ratio: its median is NaN, and so is the last
    # step of "median ratio(wider) / median ratio(narrower)"
    def change(b, w):
        w.append({"width": 16, "ratio": [math.nan, math.nan]})

    assert _failed_rows(change) == [3, 4]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(part="both"), "`part` must be one of 'bound', 'widths', 'all'"),
        (dict(families=("vgg",)), "`families` entries must be one of"),
        (dict(mlp_widths=(8,)), "`mlp_widths` must hold >= 2 sizes"),
        (dict(batch_sizes=(40, 5)), "`batch_sizes` must be two sizes"),
        (dict(batch_sizes=(5, 400)), "`batch_sizes` must be <= num_train"),
        (dict(z19_widths=(32, 33)), "`z19_widths` must hold >= 2 even widths"),
        (dict(lr=0.0), "`lr` must be > 0"),
        (dict(steps=5), "`steps` must be >= 10"),
        (dict(trace_probes=1), "`trace_probes` must be >= 2"),
        (dict(z19_decay_epoch=9), "`z19_decay_epoch` must be in"),
    ],
)
def test_bad_config_stops_before_anything_is_written(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        R.main(tiny(tmp_path, **kw))
    assert not (tmp_path / "stability_bound").exists()


@pytest.mark.slow
def test_quick_run(tmp_path):
    cfg = dataclasses.replace(R.Config.quick(), out_dir=str(tmp_path))
    res = R.main(cfg)
    table = C.verdict_table(res["verdict"])
    # every row passes but the size-growth row, which fails in this setting (Tr H
    # and ||H||_F grow by similar factors; recipes/README.md has the measurements)
    for row in res["verdict"]:
        if row["claim"].startswith("Tr H grows"):
            assert not row["passed"], table
        else:
            assert row["passed"], table
    runs = res["arrays"]["bound"]
    for fam in cfg.families:
        P = sorted({r["P"] for r in runs if r["family"] == fam})
        assert P[-1] >= 10 * P[0]  # the sweep spans >= 10x in parameter count


def _effective_sp_copy(model: nn.Module) -> nn.Module:
    """The standard-parametrised net a muP-rescaled one computes: every
    ``Scaled(layer, m)`` replaced by ``layer`` with its parameters times ``m``."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, R.Scaled):
            inner = mod.layer
            with torch.no_grad():
                for p in inner.parameters():
                    p.mul_(mod.mult)
            parent_name, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent_name), attr, inner)
    return ref


@pytest.mark.parametrize("family, width", [("mlp", 32), ("cnn", 4)])
def test_mup_is_sp_with_first_and_last_layer_rescaled(family, width):
    """muP against a dense reference: the same hidden function at the start, the
    output 1/sqrt(r) times the standard one, and the gradients in the trained
    (raw) parameters m times those in the effective ones, i.e. SGD's step on
    the effective first layer r times larger and on the last r times smaller."""
    cfg = R.Config(families=(family,), num_train=60, targets="onehot", base_width=8)
    task = R.load_digits(cfg, torch.device("cpu"))
    sp, x = R.build_model(cfg, task, family, width, torch.device("cpu"))
    mup_cfg = dataclasses.replace(cfg, parametrisation="mup")
    mup, _ = R.build_model(mup_cfg, task, family, width, torch.device("cpu"))
    r = width / 8
    scaled = [m for m in mup.modules() if isinstance(m, R.Scaled)]
    assert [m.mult for m in scaled] == pytest.approx([math.sqrt(r), 1 / math.sqrt(r)])
    assert sum(p.numel() for p in mup.parameters()) == sum(
        p.numel() for p in sp.parameters()
    )
    with torch.no_grad():
        assert torch.allclose(mup(x), sp(x) / math.sqrt(r), rtol=1e-12, atol=1e-14)
    ref = _effective_sp_copy(mup)
    raw = dict(mup.named_parameters())
    eff = dict(ref.named_parameters())
    loss_fn = HalfSquaredError()
    y = task["y"]
    g_raw = torch.autograd.grad(loss_fn(mup(x), y), list(raw.values()))
    g_eff = torch.autograd.grad(loss_fn(ref(x), y), list(eff.values()))
    with torch.no_grad():
        assert torch.allclose(ref(x), mup(x), rtol=1e-12, atol=1e-14)
    first, last = scaled
    for (name, _), gr, ge in zip(raw.items(), g_raw, g_eff, strict=True):
        plain = name.replace(".layer.", ".")
        assert plain in eff
        if any(p is raw[name] for p in first.parameters()):
            m = first.mult
        elif any(p is raw[name] for p in last.parameters()):
            m = last.mult
        else:
            m = 1.0
        assert torch.allclose(gr, m * ge, rtol=1e-10, atol=1e-14), name


def test_mup_at_the_base_width_is_sp():
    cfg = R.Config(num_train=60, parametrisation="mup", base_width=8)
    task = R.load_digits(cfg, torch.device("cpu"))
    mup, x = R.build_model(cfg, task, "mlp", 8, torch.device("cpu"))
    sp, _ = R.build_model(
        dataclasses.replace(cfg, parametrisation="sp"),
        task,
        "mlp",
        8,
        torch.device("cpu"),
    )
    for a, b in zip(mup.parameters(), sp.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(mup(x), sp(x))


def test_onehot_targets_give_ten_outputs():
    cfg = R.Config(num_train=60, targets="onehot")
    task = R.load_digits(cfg, torch.device("cpu"))
    y = task["y"]
    assert y.shape == (60, 10) and y.dtype == torch.float64
    assert torch.equal(y.argmax(1), task["flat"].y_train)
    assert torch.equal(y.sum(1), torch.ones(60, dtype=torch.float64))
    model, x = R.build_model(cfg, task, "mlp", 4, torch.device("cpu"))
    assert model(x).shape == (60, 10)
    parity = R.load_digits(R.Config(num_train=60), torch.device("cpu"))["y"]
    assert parity.shape == (60, 1) and set(parity.flatten().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(targets="ten"), "`targets` must be one of 'parity', 'onehot'"),
        (dict(parametrisation="ntk"), "`parametrisation` must be one of 'sp', 'mup'"),
        (
            dict(parametrisation="mup", families=("mlp", "rfm")),
            "rescales only the families 'mlp', 'cnn'; got rfm",
        ),
        (dict(base_width=0), "`base_width` must be >= 1"),
    ],
)
def test_bad_new_options_stop_before_anything_is_written(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        R.main(tiny(tmp_path, **kw))
    assert not (tmp_path / "stability_bound").exists()


def test_a_mup_onehot_run_end_to_end(tmp_path):
    cfg = tiny(
        tmp_path,
        part="bound",
        families=("mlp", "cnn"),
        mlp_widths=(4, 16),
        cnn_widths=(2, 4),
        targets="onehot",
        parametrisation="mup",
        steps=10,
        num_evals=1,
        tail_evals=1,
    )
    res = R.main(cfg)
    runs = res["arrays"]["bound"]
    # ten outputs: P of the mlp 64 -> w -> w -> 10 and of the cnn with a 10-way head
    P = {(r["family"], r["width"]): r["P"] for r in runs}
    assert P[("mlp", 4)] == 64 * 4 + 4 + 4 * 4 + 4 + 4 * 10 + 10
    assert P[("cnn", 2)] == 9 * 2 + 2 + 2 * 2 * 9 + 2 + 2 * 4 * 10 + 10
    assert len(res["verdict"]) == 3
    assert res["config"]["targets"] == "onehot"
    assert res["config"]["parametrisation"] == "mup"
    assert not res["metrics"]["diverged_runs"]
