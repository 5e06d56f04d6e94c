from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import types

import cases
import numpy as np
import power_law as pl
import pytest
import torch
from scipy import stats

from geoopt_sgd import noise_geometry


def tiny(tmp_path, **kw):
    base = dict(
        width=6,
        num_train=300,
        epochs=4,
        measure_every=2,
        top_n=20,
        rotations=2,
        out_dir=str(tmp_path),
    )
    base.update(kw)
    return dataclasses.replace(pl.Config(), **base)


def _comparable(res):
    out = {k: v for k, v in res.items() if k not in ("env", "metrics", "config")}
    out["metrics"] = {k: v for k, v in res["metrics"].items() if k != "seconds"}
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    return tmp_path, pl.main(tiny(tmp_path))


def test_schema_table_and_figure(tiny_run):
    tmp_path, res = tiny_run
    out = tmp_path / "power_law"
    on_disk = cases.check_results(out, "power_law")
    for loss in pl.LOSS_NAMES:
        recs = on_disk["arrays"][loss]["records"]
        assert [r["epoch"] for r in recs] == [0, 2, 4]
        assert set(pl.PER_MEASURE) <= set(recs[-1])
        assert len(recs[-1]["lambda"]) == 20 and len(recs[-1]["c_diag"]) == 20
        assert len(on_disk["arrays"][loss]["train_loss"]) == 4 * 6  # 300 / 50
        assert on_disk["metrics"][loss]["epoch"] == 4
    assert on_disk["metrics"]["block_size"] == 36
    assert len(on_disk["verdict"]) == 9
    assert (out / "power_law.png").stat().st_size > 1000
    text = pl.table(res)
    assert "| ce | 4 |" in text and "| mse | 4 |" in text
    # the figure is drawn from the JSON alone
    (out / "power_law.png").unlink()
    pl.plot(out / "results.json")
    assert (out / "power_law.png").exists()


def test_resume_matches_uninterrupted(tmp_path, tiny_run, interrupt_at):
    cfg = tiny(tmp_path)
    with interrupt_at(5):  # the MSE run's second epoch (units: epochs)
        pl.main(cfg)
    resumed = pl.main(dataclasses.replace(cfg, resume=True))
    assert _comparable(resumed) == _comparable(tiny_run[1])


def _model_and_data(width=5, n=60, seed=0):
    cfg = tiny("unused", width=width, seed=seed)
    data = pl.load(cfg, torch.device("cpu"))
    model = pl.build_model(cfg, data.input_dim, data.num_classes)
    # move away from the initialisation so that both losses have curvature
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    return model, data.x_train[:n], data.y_train[:n]


@pytest.mark.parametrize("loss", pl.LOSS_NAMES)
def test_layer_hessian_matches_torch_func(loss):
    model, x, y = _model_and_data()
    lf = pl.make_loss(loss)
    f, w = pl._block_loss(model, lf, pl.BLOCK)
    ref = torch.func.hessian(lambda v: f(v, x.double(), y))(w).reshape(25, 25)
    H = pl.layer_hessian(model, lf, x, y, data_chunk=17)  # uneven chunks
    assert torch.allclose(H, ref, rtol=0, atol=1e-12 * ref.abs().max())


@pytest.mark.parametrize("loss", pl.LOSS_NAMES)
def test_minibatch_covariance_is_the_exact_batch_covariance(loss):
    # all C(8, 3) batches of distinct samples, equally likely: the covariance of
    # the batch-mean gradient, from the dense per-batch gradients
    model, x, y = _model_and_data(n=8)
    lf = pl.make_loss(loss)
    f, w = pl._block_loss(model, lf, pl.BLOCK)
    grads = []
    for idx in itertools.combinations(range(8), 3):
        idx = list(idx)
        grads.append(torch.func.grad(f)(w, x[idx].double(), y[idx]).reshape(-1))
    G = torch.stack(grads)
    ref = (G - G.mean(0)).T @ (G - G.mean(0)) / len(G)
    C = pl.minibatch_covariance(model, lf, x, y, 3, data_chunk=5)
    assert torch.allclose(C, ref, rtol=0, atol=1e-12 * ref.abs().max())


def _spd(p, gen, power=1.0):
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    lam = torch.logspace(0, -4, p, dtype=torch.float64)
    return Q, lam


def test_zyt_metrics_match_dense_definitions():
    gen = torch.Generator().manual_seed(1)
    p, top = 30, 12
    Q, lam = _spd(p, gen)
    H = Q @ torch.diag(lam) @ Q.T
    A = torch.randn(p, p, generator=gen, dtype=torch.float64)
    C = Q @ torch.diag(lam**1.3) @ Q.T + 1e-3 * A @ A.T
    m = pl.zyt_metrics(H, C, top, 3, torch.Generator().manual_seed(7))
    # eigenbasis, descending (eigenvector signs do not matter below)
    ev, V = torch.linalg.eigh(H)
    ev, V = ev.flip(0), V.flip(1)
    Ct = V.T @ C @ V
    d = torch.diagonal(Ct)
    x, yv = ev[:top].log10().numpy(), d[:top].log10().numpy()
    slope, _ = np.polyfit(x, yv, 1)
    assert m["gamma"] == pytest.approx(slope, rel=1e-9)
    resid = yv - np.polyval(np.polyfit(x, yv, 1), x)
    r2 = 1 - (resid**2).sum() / ((yv - yv.mean()) ** 2).sum()
    assert m["r2"] == pytest.approx(r2, rel=1e-9)
    se = math.sqrt((resid**2).sum() / (top - 2) / ((x - x.mean()) ** 2).sum())
    half = stats.t.ppf(0.975, top - 2) * se
    assert m["gamma_ci_low"] == pytest.approx(slope - half, rel=1e-9)
    assert m["gamma_ci_high"] == pytest.approx(slope + half, rel=1e-9)
    assert m["spearman"] == pytest.approx(stats.spearmanr(x, yv).statistic)
    assert m["num_points"] == top
    assert m["eigen_alignment"] == pytest.approx(
        float((d * d).sum() / (Ct * Ct).sum()), rel=1e-9
    )

    def comm(Cm, Hm):
        return float(torch.linalg.norm(Cm @ Hm - Hm @ Cm) / torch.linalg.norm(Cm @ Hm))

    assert m["comm_error"] == pytest.approx(comm(C, H), rel=1e-9)
    # H -> R H R^T with R = V Q V^T, Q the recipe's Haar draws (R is Haar too)
    g = torch.Generator().manual_seed(7)
    base = [comm(C, (R := V @ pl.haar(p, g) @ V.T) @ H @ R.T) for _ in range(3)]
    assert m["comm_baseline"] == pytest.approx(sum(base) / 3, rel=1e-9)
    P = V[:, :top] @ V[:, :top].T
    top_err = torch.linalg.norm(P @ (C @ H - H @ C) @ P) / torch.linalg.norm(
        P @ C @ H @ P
    )
    assert m["comm_error_top"] == pytest.approx(float(top_err), rel=1e-9)
    assert m["lambda"] == pytest.approx(ev[:top].tolist())


def test_zyt_metrics_exact_power_law():
    gen = torch.Generator().manual_seed(2)
    Q, lam = _spd(40, gen)
    H = Q @ torch.diag(lam) @ Q.T
    C = Q @ torch.diag(lam**1.5) @ Q.T  # commutes with H, C_ii = lambda_i^1.5
    m = pl.zyt_metrics(H, C, 25, 2, torch.Generator().manual_seed(0))
    assert m["gamma"] == pytest.approx(1.5, abs=1e-8)
    assert m["r2"] == pytest.approx(1.0, abs=1e-10)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["comm_error"] < 1e-8 and m["comm_error_top"] < 1e-8
    assert m["eigen_alignment"] == pytest.approx(1.0, abs=1e-10)
    # a rotated H does not commute with C: the baseline is of order sqrt(2)
    assert 0.5 < m["comm_baseline"] < 2


def test_zyt_metrics_leave_out_numerical_zeros():
    # 5 dead directions (zero curvature and noise, up to eigh's rounding) inside
    # the top N: left out of the fit, which stays exact on the other 35
    gen = torch.Generator().manual_seed(3)
    Q, lam = _spd(40, gen)
    lam[-5:] = 0.0
    H = Q @ torch.diag(lam) @ Q.T
    C = Q @ torch.diag(lam**1.5) @ Q.T
    m = pl.zyt_metrics(H, C, 40, 1, torch.Generator().manual_seed(0))
    assert m["num_points"] == 35
    assert m["gamma"] == pytest.approx(1.5, abs=1e-8)


def test_library_top_k_metrics_agree_on_the_block():
    """noise_geometry restricted to the block (params=, Hessian, per-sample Σ)
    gives the top-k form; with C = Σ (B = 1) it matches zyt_metrics' top-k."""
    model, x, y = _model_and_data(width=5, n=40)
    lf = pl.make_loss("ce")
    H = pl.layer_hessian(model, lf, x, y)
    C = pl.minibatch_covariance(model, lf, x, y, 1)  # (n-1)/(n-1) Σ = Σ
    mine = pl.zyt_metrics(H, C, 6, 1, torch.Generator().manual_seed(0))
    model64 = copy.deepcopy(model).double()
    ng = noise_geometry(
        model64,
        lf,
        (x.double(), y),
        metrics=["power_law_exponent", "spearman", "commutativity_error"],
        k=6,
        curvature="hessian",
        cov="per_sample",
        params=[pl.BLOCK],
        route="exact",
        tol=1e-10,
        max_samples=len(y),
    )
    assert ng.values["power_law_exponent"] == pytest.approx(mine["gamma"], rel=1e-5)
    assert ng.values["spearman"] == pytest.approx(mine["spearman"])
    assert ng.values["commutativity_error"] == pytest.approx(
        mine["comm_error_top"], rel=1e-5
    )


def _passing_metrics():
    row = {k: 0.0 for k in pl.PER_MEASURE}
    row.update(epoch=10, num_points=100, comm_error=0.3, comm_baseline=1.4)
    ce = dict(row, gamma=1.4, spearman=0.99)
    mse = dict(row, gamma=1.1, spearman=0.95)
    return {"ce": ce, "mse": mse, "gamma_gap": 0.3}


FAILS = {
    "gamma_ce >= 1": lambda m: m["ce"].update(gamma=0.99),
    "gamma_ce <= 2": lambda m: m["ce"].update(gamma=2.01),
    "gamma_mse >= 1": lambda m: m["mse"].update(gamma=0.99),
    "gamma_mse <= 2": lambda m: m["mse"].update(gamma=2.01),
    "gamma_ce - gamma_mse": lambda m: m.update(gamma_gap=0.14),
    "commutativity error / random baseline (ce)": lambda m: m["ce"].update(
        comm_error=0.71
    ),
    "commutativity error / random baseline (mse)": lambda m: m["mse"].update(
        comm_error=0.71
    ),
    "Spearman rho of C_ii and lambda_i (ce)": lambda m: m["ce"].update(spearman=0.79),
    "Spearman rho of C_ii and lambda_i (mse)": lambda m: m["mse"].update(spearman=0.79),
}


def test_verdict_passes_on_passing_values():
    rows = pl.verdict(_passing_metrics())
    assert {r["claim"] for r in rows} == set(FAILS)
    assert all(r["passed"] for r in rows)


@pytest.mark.parametrize("claim", sorted(FAILS))
def test_each_verdict_row_can_fail(claim):
    m = _passing_metrics()
    FAILS[claim](m)
    failed = [r["claim"] for r in pl.verdict(m) if not r["passed"]]
    assert failed == [claim]


def test_verdict_at_the_thresholds_and_on_a_nan_or_zero_baseline():
    m = _passing_metrics()
    m["ce"].update(gamma=2.0, spearman=0.8, comm_error=0.7)  # 0.7 / 1.4 = 0.5
    m["mse"].update(gamma=1.0)
    m["gamma_gap"] = 0.15
    assert all(r["passed"] for r in pl.verdict(m))  # every threshold is inclusive
    m = _passing_metrics()
    m["mse"].update(gamma=math.nan, comm_baseline=0.0)
    failed = {r["claim"] for r in pl.verdict(m) if not r["passed"]}
    assert failed == {
        "gamma_mse >= 1",
        "gamma_mse <= 2",
        "commutativity error / random baseline (mse)",
    }


def test_summarise_reads_the_last_measurement_and_gamma_ce_minus_gamma_mse():
    def rec(gamma):
        return dict.fromkeys(pl.PER_MEASURE, 0.0) | {"gamma": gamma}

    runs = {
        "ce": {"records": [rec(0.5), rec(1.6)]},
        "mse": {"records": [rec(1.9), rec(1.2)]},
    }
    data = types.SimpleNamespace(y_train=torch.zeros(7))
    m = pl.summarise(runs, pl.Config(width=3), data)
    assert m["ce"]["gamma"] == 1.6 and m["mse"]["gamma"] == 1.2
    assert m["gamma_gap"] == pytest.approx(0.4, rel=1e-12)
    assert m["num_train"] == 7 and m["block_size"] == 9
    runs["mse"]["records"][-1]["gamma"] = None  # no fit: no gap
    assert pl.summarise(runs, pl.Config(width=3), data)["gamma_gap"] is None


def test_missing_gamma_fails():
    m = _passing_metrics()
    m["ce"]["gamma"] = None
    m["gamma_gap"] = None
    failed = {r["claim"] for r in pl.verdict(m) if not r["passed"]}
    assert failed == {"gamma_ce >= 1", "gamma_ce <= 2", "gamma_ce - gamma_mse"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dataset": "cifar10"}, r"`dataset` must be one of 'digits', 'mnist'"),
        # an unknown name listed all four datasets, cifar10 and fashion_mnist too
        ({"dataset": "nope"}, r"`dataset` must be one of 'digits', 'mnist'; got 'n"),
        ({"lr": 0.0}, r"`lr` must be > 0; got 0.0."),
        ({"top_n": 37}, r"`top_n` must be <= the block's size width\^2 = 36"),
        ({"top_n": 2}, r"`top_n` must be >= 3; got 2."),
        ({"width": 0}, r"`width` must be >= 1; got 0."),
        ({"epochs": -1}, r"`epochs` must be >= 0; got -1."),
        ({"rotations": 0}, r"`rotations` must be >= 1; got 0."),
        ({"grad_clip": 0.0}, r"`grad_clip` must be > 0; got 0.0."),
        ({"lr_min_ratio": float("nan")}, r"`lr_min_ratio` must be > 0"),
        ({"batch_size": 301}, r"`batch_size` must be <= the training set size 300"),
    ],
)
def test_bad_config(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        pl.main(tiny(tmp_path, **change))
    assert not (tmp_path / "power_law").exists()


def test_missing_dataset_names_download_flag(tmp_path):
    cfg = tiny(tmp_path, dataset="mnist", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="--download"):
        pl.main(cfg)


def test_diverged_training_stops_with_a_message(tmp_path):
    with pytest.raises(pl.common.Diverged, match="lower `lr`"):
        pl.main(tiny(tmp_path, lr=1e30, grad_clip=1e300, epochs=2))


@pytest.mark.slow
def test_quick_default(tmp_path):
    res = pl.main(dataclasses.replace(pl.Config.quick(), out_dir=str(tmp_path)))
    assert res["passed"], pl.common.verdict_table(res["verdict"])
    assert (tmp_path / "power_law" / "power_law.png").exists()
