from __future__ import annotations

import dataclasses
import math
import re

import _common as common
import cases
import escape_direction as ed
import pytest
import torch


def tiny(tmp_path, **kw):
    """The smallest setting that exercises every arm (the verdict is not expected)."""
    base = dict(
        model="mlp",
        num_train=48,
        width=8,
        train_steps=30,
        checkpoint_every=10,
        num_eigs=5,
        ks=(1, 5),
        trace_probes=4,
        batch_size=4,
        control_batch_size=24,
        runs=2,
        gd_runs=1,
        noisy_runs=1,
        noisy_kinds=("isotropic_matched",),
        max_steps=6,
        out_dir=str(tmp_path),
    )
    base.update(kw)
    return dataclasses.replace(ed.Config(), **base)


def _comparable(res):
    out = {k: v for k, v in res.items() if k not in ("env", "metrics")}
    out["metrics"] = {k: v for k, v in res["metrics"].items() if k != "seconds"}
    out["config"] = {
        k: v for k, v in res["config"].items() if k not in ("resume", "out_dir")
    }
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    return tmp_path, ed.main(tiny(tmp_path))


def test_tiny_run_schema_and_figures(tiny_run):
    tmp_path, res = tiny_run
    out = tmp_path / "escape_direction"
    on_disk = cases.check_results(out, "escape_direction")
    assert on_disk["seed"] == 0
    for key in ("torch", "timm", "device", "git_sha"):
        assert key in on_disk["env"]
    for key in (
        "L_star",
        "lambda_1",
        "fro2",
        "mu_0",
        "eta",
        "gamma0_sgd",
        "tr_h_sigma",
        "trace_H",
        "tau_1",
        "tau_5",
        "tau_20",
        "rho_1_sgd",
        "rho_5_over_tau_5_sgd",
        "lambda2_over_lambda1",
        "growth_over_gamma0_sgd",
        "perron_rho_5_sgd",
    ):
        assert key in on_disk["metrics"], key
    arms = on_disk["arrays"]["arms"]
    assert set(arms) == {
        "sgd",
        "control",
        "gd_unstable",
        "sgd_unstable",
        "isotropic_matched",
    }
    for name, arm in arms.items():
        assert arm["runs_done"] == len(arm["loss"]) == arm["runs"]
        assert len(arm["mean_loss"]) == 6
        assert set(arm["rho_at_escape"]) == {"1", "5"}
        assert len(arm["shares_at_escape"]) == 5, name
        # shares are fractions of ||delta||^2 and rho_k their partial sums
        assert 0 <= sum(arm["shares_at_escape"]) <= 1 + 1e-9
        assert abs(sum(arm["loss_shares_at_escape"]) - 1) < 1e-9
    assert len(arms["sgd"]["perron_profile"]) == 5
    assert len(on_disk["verdict"]) == 10
    for row in on_disk["verdict"]:
        assert set(row) >= {"claim", "value", "threshold", "passed", "op"}
    assert on_disk["passed"] == all(r["passed"] for r in on_disk["verdict"])
    assert res["passed"] == on_disk["passed"]
    assert (out / "config.json").exists()
    for png in ("escape_loss.png", "escape_direction.png"):
        assert (out / png).stat().st_size > 1000
    # figures are redrawn from the JSON alone
    (out / "escape_loss.png").unlink()
    ed.plot(out / "results.json")
    assert (out / "escape_loss.png").exists()


def test_eta_is_gd_stable_and_rho_consistent(tiny_run):
    _, res = tiny_run
    m = res["metrics"]
    # eta = 0.9 * 2 / lambda_1 by construction: eta * lambda_1 = 1.8 to rounding
    assert abs(m["eta"] * m["lambda_1"] - 1.8) < 1e-12
    assert abs(m["eta_unstable"] * m["lambda_1"] - 2.2) < 1e-12
    sgd = res["arrays"]["arms"]["sgd"]
    # rho_1 <= rho_5 <= 1 at every step (partial sums of shares; 1e-12 for rounding)
    for a, b in zip(sgd["rho_mean"]["1"], sgd["rho_mean"]["5"], strict=True):
        assert 0 <= a <= b <= 1 + 1e-12
    # gamma_0 = eta^2 Tr(H Sigma) / (2 L B) * (n - B) / (n - 1), n = 48, B = 4
    expect = m["eta"] ** 2 * m["tr_h_sigma"] / (2 * m["L_star"] * 4) * 44 / 47
    assert abs(m["gamma0_sgd"] - expect) <= 1e-9 * expect


@pytest.mark.parametrize("stop_at", [15, 30 + 3], ids=["in-training", "in-runs"])
def test_resume_matches_uninterrupted(tmp_path, tiny_run, stop_at, interrupt_at):
    ref = tiny_run[1]
    cfg = tiny(tmp_path / "cut")
    with interrupt_at(stop_at):
        ed.main(cfg)
    assert (tmp_path / "cut" / "escape_direction" / "checkpoint.pt").exists()
    assert not (tmp_path / "cut" / "escape_direction" / "results.json").exists()
    resumed = ed.main(dataclasses.replace(cfg, resume=True))
    assert _comparable(resumed) == _comparable(ref)


def test_resume_rejects_other_config(tmp_path, interrupt_at):
    cfg = tiny(tmp_path)
    with interrupt_at(12):
        ed.main(cfg)
    other = dataclasses.replace(cfg, resume=True, batch_size=8)
    with pytest.raises(ValueError, match=r"different config \(fields 'batch_size'\)"):
        ed.main(other)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"model": "no_such_model"}, ValueError, "timm.list_models"),
        ({"dataset": "svhn"}, ValueError, r"`dataset` must be one of 'digits'"),
        ({"train_lr": 0.0}, ValueError, r"`train_lr` must be > 0; got 0.0."),
        ({"train_lr": -1.0}, ValueError, r"`train_lr` must be > 0; got -1.0."),
        ({"lr_factor": 1.0}, ValueError, r"`lr_factor` must be in \(0, 1\)"),
        ({"unstable_factor": 1.0}, ValueError, r"`unstable_factor` must be > 1"),
        ({"num_eigs": 10**6}, ValueError, r"`num_eigs` must be <= the parameter count"),
        ({"ks": (1, 9)}, ValueError, r"`ks` must hold values in \[1, num_eigs=5\]"),
        ({"batch_size": 48}, ValueError, r"`batch_size` must be in \[1, num_train\)"),
        ({"control_batch_size": 0}, ValueError, r"`control_batch_size` must be in"),
        ({"target": "x"}, ValueError, r"`target` must be one of 'parity', 'onehot'"),
        ({"dtype": "half"}, ValueError, r"`dtype` must be one of 'float64', 'float32'"),
        ({"noisy_kinds": ("gauss",)}, ValueError, r"`noisy_kinds` must hold NoisyGD"),
        ({"runs": 0}, ValueError, r"`runs` must be >= 1; got 0."),
        ({"gd_runs": -1}, ValueError, r"`gd_runs` must be >= 0; got -1."),
        ({"trace_probes": 1}, ValueError, r"`trace_probes` must be >= 2; got 1."),
        ({"num_train": 1}, ValueError, r"`num_train` must be >= 2; got 1."),
        ({"escape_factor": 0.0}, ValueError, r"`escape_factor` must be > 0; got 0.0."),
        ({"device": "tpu"}, ValueError, r"`device` must be one of 'cpu', 'cuda'"),
        ({"seed": -1}, ValueError, r"`seed` must be >= 0; got -1."),
        ({"pre_steps": -1}, ValueError, r"`pre_steps` must be >= 0; got -1."),
        ({"pre_steps": 5}, ValueError, r"`pre_lr` must be set when `pre_steps` > 0"),
        ({"pre_lr": 0.0, "pre_steps": 5}, ValueError, r"`pre_lr` must be > 0"),
        (
            {"model_kwargs": ("depth",)},
            ValueError,
            r"`model_kwargs` entries must be 'key=value'; got 'depth'.",
        ),
        (
            {"model_kwargs": ("=3",)},
            ValueError,
            r"`model_kwargs` entries must be 'key=value'; got '=3'.",
        ),
        (
            {"model_kwargs": ("depth=1",)},
            ValueError,
            r"`model_kwargs` are passed to timm.create_model; model 'mlp' is not",
        ),
        (
            {"model": "test_vit", "model_kwargs": ("no_such_arg=1",)},
            ValueError,
            r"`model_kwargs` \('no_such_arg=1',\): .*no_such_arg",
        ),
        (
            {"model": "test_vit", "model_kwargs": ("in_chans=3",)},
            ValueError,
            r"`timm_args` repeats keyword arguments: \['in_chans'\]",
        ),
        (
            {"model": "test_convnext", "image_size": 16},
            ValueError,
            r"model 'test_convnext' cannot run on 16x16 inputs .*`--image-size`",
        ),
    ],
)
def test_bad_config_stops_before_training(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        ed.main(tiny(tmp_path, **change))
    assert not (tmp_path / "escape_direction" / "checkpoint.pt").exists()


def test_missing_dataset_names_download_flag(tmp_path):
    cfg = tiny(tmp_path, dataset="mnist", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="--download"):
        ed.main(cfg)
    assert not (tmp_path / "escape_direction" / "checkpoint.pt").exists()


def test_model_kwargs_parsed_as_literals():
    cfg = ed.Config(
        model="test_vit",
        model_kwargs=("depth=1", " embed_dim = 16", "global_pool='avg'", "act=gelu"),
    )
    assert ed.model_kwargs(cfg) == {
        "depth": 1,
        "embed_dim": 16,
        "global_pool": "avg",
        "act": "gelu",  # a bare word is a string
    }
    assert ed.model_kwargs(ed.Config(model="mlp")) == {}


def test_model_kwargs_cli_keeps_tuples_and_quoted_strings():
    cfg = common.parse_config(
        ed.Config,
        [
            "--model",
            "test_vit",
            "--model-kwargs",
            "img_size=(8, 8),patch_size=[4,4] depth=1,global_pool='a, b'",
        ],
    )
    assert cfg.model_kwargs == (
        "img_size=(8, 8)",
        "patch_size=[4,4]",
        "depth=1",
        "global_pool='a, b'",
    )
    assert ed.model_kwargs(cfg) == {
        "img_size": (8, 8),
        "patch_size": [4, 4],
        "depth": 1,
        "global_pool": "a, b",
    }


def test_model_kwargs_reach_timm(tmp_path):
    cfg = tiny(
        tmp_path,
        model="test_vit",
        model_kwargs=("img_size=8", "patch_size=8", "depth=1", "embed_dim=16"),
    )
    model, X, Y = ed.build(cfg, torch.device("cpu"))
    assert len(model.blocks) == 1 and model.embed_dim == 16
    assert not model.training  # eval mode throughout
    assert model(X[:2]).shape == Y[:2].shape == (2, 1)


def test_pre_stage_runs_first_at_pre_lr(tmp_path):
    res = ed.main(tiny(tmp_path / "a", pre_lr=0.02, pre_steps=10, train_steps=20))
    loss = res["arrays"]["train_loss"]
    assert len(loss) == 30
    # the first 10 steps are those of a plain run at lr 0.02, the rest are not
    ref = ed.main(tiny(tmp_path / "b", train_lr=0.02, train_steps=12))
    ref_loss = ref["arrays"]["train_loss"]
    assert loss[:11] == ref_loss[:11]  # step 11 reports the loss before its update
    assert loss[11] != ref_loss[11]
    # theta* is checked for GD-stability at train_lr, the final stage's lr
    lam1 = res["metrics"]["lambda_1"]
    assert res["verdict"][0]["value"] == pytest.approx(0.1 * lam1, rel=1e-12)


def test_resume_inside_pre_stage(tmp_path, interrupt_at):
    cfg = tiny(tmp_path / "cut", pre_lr=0.02, pre_steps=15, train_steps=15)
    ref = ed.main(dataclasses.replace(cfg, out_dir=str(tmp_path / "ref")))
    with interrupt_at(12):
        ed.main(cfg)
    resumed = ed.main(dataclasses.replace(cfg, resume=True))
    assert _comparable(resumed) == _comparable(ref)


def test_cli_generated_from_config():
    cfg = common.parse_config(
        ed.Config, ["--quick", "--batch-size", "8", "--ks", "1,5"]
    )
    assert cfg == dataclasses.replace(ed.Config.quick(), batch_size=8, ks=(1, 5))
    cfg = common.parse_config(
        ed.Config, ["--model-kwargs", "depth=1,embed_dim=16", "--pre-lr", "0.2"]
    )
    assert cfg.model_kwargs == ("depth=1", "embed_dim=16") and cfg.pre_lr == 0.2


# ---------------------------------------------------------------- Perron profile


def test_perron_single_direction_closed_form():
    # one direction, no bulk: 1 = (eta^2/B) g lam^2 / (r - c)
    # =>  r = c + eta^2 g lam^2 / B
    lam = torch.tensor([3.0], dtype=torch.float64)
    g, eta, B = torch.tensor([0.7], dtype=torch.float64), 0.5, 2.0
    r, m = ed.perron_profile(lam, g, eta, B, bulk=0.0, mu=1.0)
    c = (1 - eta * 3.0) ** 2
    # bisection to 200 halvings: exact to float64 rounding
    assert abs(r - max(c + eta**2 * 0.7 * 9.0 / B, 1.0)) < 1e-9
    assert torch.allclose(m, torch.tensor([1.0], dtype=torch.float64))


def test_perron_equation_and_profile():
    lam = torch.tensor([10.0, 4.0, 1.0, 0.1], dtype=torch.float64)
    g = torch.tensor([1.0, 0.8, 1.2, 0.9], dtype=torch.float64)
    eta, B, bulk, mu = 0.18, 4.0, 3.0, 1.1
    r, m = ed.perron_profile(lam, g, eta, B, bulk=bulk, mu=mu)
    c = (1 - eta * lam) ** 2
    lhs = (eta**2 / B) * (float((g * lam**2 / (r - c)).sum()) + mu * bulk / (r - 1))
    assert abs(lhs - 1) < 1e-9  # the root of the growth-rate equation
    expect = g * lam / (r - c)
    torch.testing.assert_close(m, expect / expect.sum(), rtol=1e-12, atol=0)
    # growth beyond the bulk-free rate (the bulk only adds energy)
    r0, _ = ed.perron_profile(lam, g, eta, B, bulk=0.0, mu=mu)
    assert r > r0


@pytest.mark.slow
def test_quick_passes_verdict(tmp_path):
    res = ed.main(dataclasses.replace(ed.Config.quick(), out_dir=str(tmp_path)))
    failed = [r["claim"] for r in res["verdict"] if not r["passed"]]
    assert res["passed"], failed


def test_diverging_training_stops_with_message(tmp_path):
    # stops at the first non-finite loss, not after the remaining steps
    with pytest.raises(
        RuntimeError, match=r"GD training diverged .*lower --train-lr"
    ) as e:
        ed.main(tiny(tmp_path, train_lr=1e6, train_steps=4000, checkpoint_every=1))
    step = int(re.search(r"at step (\d+),", str(e.value)).group(1))
    assert step < 50
    saved = torch.load(
        tmp_path / "escape_direction" / "checkpoint.pt", weights_only=False
    )
    state = saved["state"]["current"]["snapshot"]  # the unfinished stage "train"
    assert state["step"] == step  # the diverged step is never checkpointed
    assert all(math.isfinite(v) for v in state["train_loss"])


# ---------------------------------------------- gamma_0, spectrum, Perron shares


def _dense_setting(tmp_path):
    cfg = ed.resolved(tiny(tmp_path, num_train=12, width=4, depth=1, num_eigs=4))
    model, X, Y = ed.build(cfg, torch.device("cpu"))
    return cfg, model, X, Y


def test_tr_h_sigma_and_spectrum_match_dense(tmp_path):
    cfg, model, X, Y = _dense_setting(tmp_path)
    loss_fn = torch.nn.MSELoss()
    curv = ed.curvature_at_minimum(model, loss_fn, X, Y, cfg)
    names = [n for n, _ in model.named_parameters()]
    theta = common.flat_parameters(model)
    shapes = [p.shape for p in model.parameters()]

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def f(v, x):
        return torch.func.functional_call(model, unflat(v), (x,))

    H = torch.autograd.functional.hessian(lambda v: loss_fn(f(v, X), Y), theta)
    grads = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda v, i=i: loss_fn(f(v, X[i : i + 1]), Y[i : i + 1]), theta
            )
            for i in range(len(Y))
        ]
    )
    gbar = grads.mean(0)
    Sigma = grads.T @ grads / len(Y) - torch.outer(gbar, gbar)
    tr_hs = float(torch.trace(H @ Sigma))
    assert curv["tr_h_sigma"] == pytest.approx(tr_hs, rel=1e-9)
    assert curv["noise_loss"] == pytest.approx(
        float(loss_fn(f(theta, X), Y)), rel=1e-12
    )
    # Gauss-Newton matrix of nn.MSELoss: (2 / (n K)) J^T J, every eigenvalue
    J = torch.autograd.functional.jacobian(lambda v: f(v, X).reshape(-1), theta)
    G = J.T @ J * 2 / J.shape[0]
    dense = torch.linalg.eigvalsh(G).flip(0)[: len(curv["spectrum"])]
    torch.testing.assert_close(
        curv["spectrum"], dense.clamp_min(0), rtol=0, atol=1e-10 * float(dense[0])
    )
    assert curv["trace"] == pytest.approx(float(torch.trace(G)), rel=1e-10)
    assert curv["spectrum_route"] == "gauss_newton_kernel"
    assert curv["noise_route"] == "exact"


def test_beyond_exact_limit_estimates_spectrum_and_trace(tmp_path):
    cfg, model, X, Y = _dense_setting(tmp_path)
    cfg = dataclasses.replace(cfg, exact_max_entries=1, trace_probes=200)
    curv = ed.curvature_at_minimum(model, torch.nn.MSELoss(), X, Y, cfg)
    assert curv["spectrum_route"] == "top_k_and_bulk_level"
    assert curv["noise_route"] == "sketch"
    # the top K eigenvalues and a bulk level fitted to the Hutchinson Tr H, ||H||_F^2
    assert curv["trace_stderr"] > 0
    vals, w = ed.bulk_spectrum(curv["lam"], curv["trace"], curv["fro2"])
    torch.testing.assert_close(curv["spectrum"], vals)
    torch.testing.assert_close(curv["spectrum_weights"], w)


def test_bulk_spectrum_fits_trace_and_frobenius():
    lam = torch.tensor([5.0, 3.0], dtype=torch.float64)
    vals, w = ed.bulk_spectrum(lam, trace=8.0 + 2.0, fro2=34.0 + 1.0)
    # bulk: w b = 2, w b^2 = 1  ->  b = 0.5, w = 4
    torch.testing.assert_close(vals, torch.tensor([5.0, 3.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))
    # no bulk when the top K already hold the trace
    vals, w = ed.bulk_spectrum(lam, trace=7.0, fro2=40.0)
    torch.testing.assert_close(vals, lam)


def test_perron_shares_closed_form_and_limits():
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0], dtype=torch.float64)
    eta, r = 0.4, 1.7
    got = ed.perron_shares(lam, w, eta, r, (1, 3, 5))
    m = w * lam / (r - (1 - eta * lam) ** 2)
    for k in (1, 3, 5):
        assert got[k] == pytest.approx(float(m[:k].sum() / m.sum()), rel=1e-12)
    # a very fast growth gives the trace shares tau_k
    tau = ed.trace_shares(lam, w, (1, 3))
    far = ed.perron_shares(lam, w, eta, 1e9, (1, 3))
    assert far[1] == pytest.approx(tau[1], rel=1e-6)
    assert tau[1] == pytest.approx(4.0 / (4 + 2 + 1 + 0.5 + 1.0), rel=1e-12)
    with pytest.raises(ValueError, match="not above"):
        ed.perron_shares(lam, w, 1.0, 8.0, (1,))  # (1 - 4)^2 = 9 > 8


def test_measured_growth_rate_of_exponential_runs():
    L0, r = 1e-8, 2.5
    recs = []
    for t_esc in (6, 7):
        recs.append({"loss": [L0 * r**t for t in range(1, 9)], "escape_step": t_esc})
    recs.append({"loss": [L0] * 8, "escape_step": None})  # not escaped: ignored
    assert ed.measured_growth_rate(recs, L0) == pytest.approx(r, rel=1e-12)
    assert ed.measured_growth_rate(recs[2:], L0) is None


def test_unstable_directions_count():
    lam = torch.tensor([10.0, 9.5, 8.0, 1.0])
    assert ed.unstable_directions(lam, 1.1) == 2  # 1.1 * 9.5 / 10 > 1
    assert ed.unstable_directions(lam, 1.01) == 1
    assert ed.unstable_directions(lam, 1.3) == 3
    # eta' lambda_j = 2 exactly (1.25 * 8 / 10 = 1): |1 - eta' lambda_j| = 1, stable
    assert ed.unstable_directions(lam, 1.25) == 2


def test_summarise_arm_reads_the_early_growth_and_the_escaped_fraction():
    cfg = ed.Config(model="mlp", max_steps=4, growth_steps=3)
    L0 = 1e-3
    minimum = ed.Minimum(
        theta=torch.zeros(2), U=torch.eye(2), lam=torch.tensor([2.0, 1.0]), loss=L0
    )
    # one run escapes at step 2 and stops (its last loss is held), one never does
    escaping = {
        "loss": [2 * L0, 8 * L0],
        "escape_step": 2,
        "rho": {"1": [0.5, 0.6]},
        "rho_at_escape": {"1": 0.6},
        "shares_at_escape": [0.6, 0.3],
        "loss_shares_at_escape": [0.7, 0.2],
    }
    staying = {
        "loss": [L0] * 4,
        "escape_step": None,
        "rho": {"1": [0.1] * 4},
        "rho_at_escape": {"1": 0.2},
        "shares_at_escape": [0.2, 0.1],
        "loss_shares_at_escape": [0.3, 0.1],
    }
    arm = {"name": "gd_unstable", "kind": "gd", "lr": 1.0, "batch": None}
    out = ed.summarise_arm(arm, [escaping, staying], cfg, minimum, {})
    assert out["mean_loss"] == pytest.approx([1.5 * L0, 4.5 * L0, 4.5 * L0, 4.5 * L0])
    # the mean loss at step growth_steps = 3 over L(theta*), per step
    assert out["growth_factor"] == pytest.approx(4.5 ** (1 / 3), rel=1e-12)
    assert out["escaped_fraction"] == 0.5
    assert out["escape_steps"] == [2, None]
    assert out["shares_at_escape"] == pytest.approx([0.4, 0.2])
    assert out["rho_k_at_escape"] == pytest.approx({"1": 0.4, "2": 0.6})


# ---------------------------------------------------------------- verdict rows


def _passing():
    """Summaries and metrics on which every verdict row passes."""
    K = 20
    gd_shares = [0.97] + [0.001] * (K - 1)
    sgd_shares = [0.05] + [0.02] * (K - 1)  # rho_20 = 0.43
    sgd = {
        "shares_at_escape": sgd_shares,
        "escaped_fraction": 1.0,
        "gamma0": 2.0,
        "growth_factor": 2.4,
        "growth_rate_measured": 2.2,
        "perron_rho_at_measured_rate": {"1": 0.06, "5": 0.15, "20": 0.45},
    }
    summaries = {
        "sgd": sgd,
        "control": {"gamma0": 0.3, "escaped_fraction": 0.0},
        "gd_unstable": {"shares_at_escape": gd_shares},
    }
    metrics = {
        "lambda_1": 10.0,
        "lambda2_over_lambda1": 0.8,
        "unstable_directions": 1,
        "tr_h_sigma": 1.0,
    }
    cfg = ed.Config(model="mlp")  # train_lr 0.1: 0.1 * 10 = 1 < 2
    return summaries, metrics, cfg


def _failed(summaries, metrics, cfg):
    return [
        i for i, r in enumerate(ed.verdict(summaries, metrics, cfg)) if not r["passed"]
    ]


def _two_unstable_and_sgd_close_to_gd(s, m):
    m.update(unstable_directions=2, lambda2_over_lambda1=0.95)
    s["gd_unstable"]["shares_at_escape"] = [0.5, 0.46] + [0.001] * 18
    s["sgd"]["shares_at_escape"] = [0.3] + [0.0075] * 19  # rho_20 = 0.4425


def test_verdict_passes_on_passing_case():
    assert _failed(*_passing()) == []


@pytest.mark.parametrize(
    ("row", "change"),
    [
        (0, lambda s, m: m.update(lambda_1=25.0)),  # 0.1 * 25 >= 2
        # GD spread over more than the unstable direction
        (1, lambda s, m: s["gd_unstable"].update(shares_at_escape=[0.8] + [0.01] * 19)),
        # two directions unstable at eta', GD split between them (row 1 passes on
        # rho_2) and SGD's rho_1 = 0.3: rho_1(GD) - rho_1(SGD) = 0.2 < 0.3
        (2, _two_unstable_and_sgd_close_to_gd),
        # SGD mostly along u_1 (its rho_20 stays within 0.12 of Perron's)
        (3, lambda s, m: s["sgd"].update(shares_at_escape=[0.55] + [0.0] * 19)),
        (4, lambda s, m: s["sgd"].update(escaped_fraction=0.875)),  # 7 of 8
        (5, lambda s, m: s["sgd"]["perron_rho_at_measured_rate"].update({"20": 0.56})),
        (6, lambda s, m: s["sgd"].update(gamma0=0.9, growth_factor=0.9)),
        (7, lambda s, m: s["sgd"].update(growth_factor=0.9)),  # 0.45 gamma_0
        (8, lambda s, m: s["control"].update(gamma0=1.0)),
        (9, lambda s, m: s["control"].update(escaped_fraction=0.125)),
    ],
)
def test_each_verdict_row_can_fail(row, change):
    summaries, metrics, cfg = _passing()
    change(summaries, metrics)
    assert _failed(summaries, metrics, cfg) == [row]


@pytest.mark.parametrize(
    ("rows", "change"),
    [
        ([0], lambda s, m: m.update(lambda_1=20.0)),  # train_lr * lambda_1 = 2: not < 2
        ([6], lambda s, m: s["sgd"].update(gamma0=1.0)),  # gamma_0 = 1: not > 1
        ([8], lambda s, m: s["control"].update(gamma0=1.0)),  # not < 1
        ([], lambda s, m: s["sgd"].update(escaped_fraction=0.9)),  # >= 0.9
        ([], lambda s, m: s["control"].update(escaped_fraction=0.1)),  # <= 0.1
        # NaN shares fail every row that reads them, NaN growth its row
        ([2, 3, 5], lambda s, m: s["sgd"].update(shares_at_escape=[math.nan] * 20)),
        ([7], lambda s, m: s["sgd"].update(growth_factor=math.nan)),
    ],
)
def test_verdict_rows_at_their_thresholds_and_on_nan(rows, change):
    summaries, metrics, cfg = _passing()
    change(summaries, metrics)
    assert _failed(summaries, metrics, cfg) == rows


def test_gd_row_reads_every_unstable_direction():
    summaries, metrics, cfg = _passing()
    # two directions unstable at eta' (1.1 lambda_2 / lambda_1 > 1): GD splits
    # between them, which passes row 1 on rho_2 but would fail on rho_1
    summaries["gd_unstable"]["shares_at_escape"] = [0.5, 0.46] + [0.001] * 18
    metrics.update(unstable_directions=2, lambda2_over_lambda1=0.95)
    rows = ed.verdict(summaries, metrics, cfg)
    assert rows[1]["passed"] and "rho_2" in rows[1]["claim"]
    assert rows[1]["value"] == pytest.approx(0.96)


def test_perron_row_fails_without_a_measured_rate():
    summaries, metrics, cfg = _passing()
    summaries["sgd"]["perron_rho_at_measured_rate"] = {"20": None}
    summaries["sgd"]["growth_rate_measured"] = None
    assert _failed(summaries, metrics, cfg) == [5]


def test_default_is_timm_and_mlp_keeps_its_setting():
    vit = ed.resolved(ed.Config())
    assert vit.model == "test_vit" and vit.train_lr == 0.03 and vit.train_steps == 3000
    assert vit.batch_size == 4
    assert "patch_size=8" in vit.model_kwargs
    mlp = ed.resolved(ed.Config(model="mlp"))
    assert (mlp.train_lr, mlp.train_steps, mlp.model_kwargs) == (0.1, 2000, ())
    assert mlp.batch_size == 16
    assert (mlp.whiten, mlp.target, mlp.dtype) == (True, "parity", "float64")
    # an explicit value wins over the per-model default
    own = ed.resolved(ed.Config(train_lr=0.05, model_kwargs=("depth=1",)))
    assert own.train_lr == 0.05 and own.model_kwargs == ("depth=1",)
    other = ed.resolved(ed.Config(model="test_resnet"))
    assert (other.train_lr, other.train_steps, other.model_kwargs) == (0.1, 2000, ())
