from __future__ import annotations

import dataclasses
import math

import cases
import pytest
import sharpness_report as sr
import torch
from torch.func import functional_call


def tiny(tmp_path, **kw):
    base = dict(
        model="mlp",
        width=8,
        image_size=8,
        num_train=96,
        dtype="float64",
        epochs=2,
        batch_size=32,
        curvature_samples=40,
        k=3,
        trace_probes=4,
        density_probes=2,
        density_steps=8,
        sharpness_samples=3,
        out_dir=str(tmp_path),
    )
    base.update(kw)
    return dataclasses.replace(sr.Config(), **base)


def _comparable(res):
    out = {k: v for k, v in res.items() if k not in ("env", "metrics", "config")}
    out["metrics"] = {k: v for k, v in res["metrics"].items() if k != "seconds"}
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    return tmp_path, sr.main(tiny(tmp_path))


def test_schema_table_and_figure(tiny_run):
    tmp_path, res = tiny_run
    out = tmp_path / "sharpness_report"
    on_disk = cases.check_results(out, "sharpness_report")
    m = on_disk["metrics"]
    for key in ("lambda_max", "lambda_min", "top_eigenvalues", "trace", "frobenius"):
        assert key in m
    assert len(m["top_eigenvalues"]) == 3 and m["top_eigenvalues"][0] == m["lambda_max"]
    assert len(on_disk["arrays"]["train_loss"]) == 2 * 3  # 2 epochs of 96/32 batches
    assert len(on_disk["arrays"]["density"]) == len(on_disk["arrays"]["density_grid"])
    assert (out / "sharpness.png").stat().st_size > 1000
    assert (out / "config.json").exists()
    text = sr.table(res)
    assert "| λ_max |" in text and "| Tr H |" in text and "| λ_min |" in text


def test_measures_match_dense_hessian(tiny_run):
    tmp_path, res = tiny_run
    # rebuild the trained model from the checkpoint and compare with eigh of the
    # dense Hessian on the same 40 samples (float64, P = 682: dense is cheap)
    cfg = tiny(tmp_path)
    model, data = sr.build(cfg, torch.device("cpu"))
    state = torch.load(
        tmp_path / "sharpness_report" / "checkpoint.pt", weights_only=True
    )
    model.load_state_dict(state["state"]["done"]["train"]["model"])
    model.eval()
    # torch.func.hessian (vectorised jacfwd of jacrev) on the flat parameters:
    # an independent dense reference, fast for P = 682
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = data.x_train[:40], data.y_train[:40]

    def loss(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: v.view(s) for n, v, s in zip(names, parts, shapes, strict=True)}
        return torch.nn.functional.cross_entropy(
            functional_call(model, params, (x,)), y
        )

    evals = torch.linalg.eigvalsh(torch.func.hessian(loss)(theta))
    top = sorted(evals.tolist(), reverse=True)[:3]
    # Lanczos at tol=1e-3 (relative residual): eigenvalues agree to well under 1e-3
    for got, want in zip(res["metrics"]["top_eigenvalues"], top, strict=True):
        assert abs(got - want) <= 1e-3 * abs(top[0])
    assert abs(res["metrics"]["lambda_min"] - float(evals[0])) <= 1e-3 * abs(top[0])
    # Hutchinson with 4 probes: within 5 standard errors of the exact trace
    tr = float(evals.sum())
    assert abs(res["metrics"]["trace"] - tr) <= 5 * res["metrics"]["trace_stderr"]


def test_timm_default_builds():
    cfg = sr.Config.quick()
    model, data = sr.build(cfg, torch.device("cpu"))
    assert data.x_train.shape[1:] == (1, 16, 16)
    assert model(data.x_train[:2]).shape == (2, 10)


def test_resume_matches_uninterrupted(tmp_path, tiny_run, interrupt_at):
    cfg = tiny(tmp_path)
    with interrupt_at(4):  # in the second epoch
        sr.main(cfg)
    resumed = sr.main(dataclasses.replace(cfg, resume=True))
    assert _comparable(resumed) == _comparable(tiny_run[1])


def test_dense_check_model_is_small():
    model, _ = sr.build(tiny("unused"), torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == 682


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model": "not_a_model"}, "timm.list_models"),
        ({"dataset": "imagenet"}, r"`dataset` must be one of 'digits'"),
        ({"lr": 0.0}, r"`lr` must be > 0; got 0.0."),
        ({"k": 10**7}, r"`k` must be <= the parameter count P = "),
        ({"k": 0}, r"`k` must be >= 1; got 0."),
        ({"dtype": "int8"}, r"`dtype` must be one of 'float32', 'float64'"),
        ({"epochs": -1}, r"`epochs` must be >= 0; got -1."),
        ({"trace_probes": 1}, r"`trace_probes` must be 0 or >= 2"),
        ({"density_steps": 1}, r"`density_steps` must be >= 2; got 1."),
        ({"sharpness_samples": 0}, r"`sharpness_samples` must be >= 1; got 0."),
        ({"momentum": 1.0}, r"`momentum` must be in \[0, 1\); got 1.0."),
        ({"tol": 0.0}, r"`tol` and `sharpness_sigma` must be > 0."),
        # accepted before; sigma = inf failed after training, with the folder written
        ({"tol": math.inf}, r"`tol` and `sharpness_sigma` must be > 0 and finite"),
        ({"sharpness_sigma": math.inf}, r"finite; got `sharpness_sigma` = inf\."),
    ],
)
def test_bad_config(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        sr.main(tiny(tmp_path, **change))
    assert not (tmp_path / "sharpness_report" / "checkpoint.pt").exists()


def test_missing_dataset_names_download_flag(tmp_path):
    cfg = tiny(tmp_path, dataset="cifar10", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="--download"):
        sr.main(cfg)


@pytest.mark.slow
def test_quick_default(tmp_path):
    res = sr.main(dataclasses.replace(sr.Config.quick(), out_dir=str(tmp_path)))
    assert res["passed"], [r["claim"] for r in res["verdict"] if not r["passed"]]
    assert (tmp_path / "sharpness_report" / "sharpness.png").exists()


def _verdict(**kw):
    m = dict(
        converged=True,
        lambda_max=5.0,
        lambda_min=-1.0,
        density_mass=1.0,
        frobenius=6.0,  # 36 >= 5^2 + 3^2 = 34
        frobenius_stderr=0.0,
        top_eigenvalues=[5.0, 3.0],
    )
    m.update(kw)
    return [r["passed"] for r in sr.verdict(m)]


def test_each_verdict_row_fails_on_its_side_of_the_threshold():
    assert _verdict() == [True] * 4
    assert _verdict(converged=False) == [False, True, True, True]
    assert _verdict(lambda_min=5.5) == [True, False, True, True]
    assert _verdict(lambda_min=5.0) == [True] * 4  # lambda_min = lambda_max
    for mass, ok in ((1.04, True), (0.96, True), (1.06, False), (0.94, False)):
        assert _verdict(density_mass=mass) == [True, True, ok, True], mass
    assert _verdict(density_mass=math.nan) == [True, True, False, True]
    # ||H||_F^2 = 25 < 34, short by 9 = 3 standard errors of ||H||_F^2 at 0.3
    # (the s.e. of ||H||_F^2 is 2 ||H||_F s.e.(||H||_F) = 3)
    assert _verdict(frobenius=5.0) == [True, True, True, False]
    assert _verdict(frobenius=5.0, frobenius_stderr=0.29) == [True, True, True, False]
    assert _verdict(frobenius=5.0, frobenius_stderr=0.3) == [True] * 4
    assert _verdict(frobenius=None) == [True] * 3  # no Frobenius row
