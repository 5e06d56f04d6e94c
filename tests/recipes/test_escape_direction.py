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
    for key in ("L_star", "lambda_1", "fro2", "mu_0", "eta", "gamma0_sgd"):
        assert key in on_disk["metrics"]
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
    assert len(on_disk["verdict"]) == 9
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
    # gamma_0 = eta^2 mu ||H||_F^2 / B * (n - B) / (n - 1), n = 48, B = 4
    expect = m["eta"] ** 2 * m["mu_0"] * m["fro2"] / 4 * 44 / 47
    assert abs(m["gamma0_sgd"] - expect) <= 1e-12 * expect


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
    assert ed.model_kwargs(ed.Config()) == {}


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
