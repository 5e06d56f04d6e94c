from __future__ import annotations

import dataclasses
import math

import _common as C
import anisotropic_escape as R
import cases
import pytest
import torch
from torch.func import hessian


def tiny_net(tmp_path, **kw):
    """A net-part config small enough for a unit test (a few seconds)."""
    base = dict(
        part="net",
        out_dir=str(tmp_path),
        num_seeds=1,
        num_train=200,
        num_corrupt=20,
        width=8,
        gd_steps=20,
        steps=20,
        eval_every=5,
        batch_size=10,
        dynamics=("gd", "const", "hess", "sgd"),
        k=3,
        refresh_every=5,
        sharpness_samples=10,
        geometry_every=10,
        geometry_k=2,
        top_k=3,
    )
    base.update(kw)
    return R.Config(**base)


def tiny_toy(tmp_path, **kw):
    base = dict(part="toy", out_dir=str(tmp_path), toy_runs=8, toy_steps=30)
    base.update(kw)
    return R.Config(**base)


# ------------------------------------------------------------------ the 2-D toy


def _point_loss(w, x):
    c = s = math.cos(math.pi / 4)
    a, b = w[0] - x[0] - 1, w[1] - x[1] - 1
    sharp = 10 * (c * a - s * b) ** 2 + 100 * (c * a + s * b) ** 2
    flat = (w[0] - x[0] + 1) ** 2 + (w[1] - x[1] + 1) ** 2
    return torch.minimum(sharp, flat)


@pytest.mark.parametrize("where", ["sharp", "flat", "between"])
def test_toy_terms_match_autograd(where):
    gen = torch.Generator().manual_seed(0)
    x = R.toy_data(1, 7, gen)
    start = {"sharp": [1.02, 0.97], "flat": [-0.9, -1.1], "between": [0.1, 0.3]}
    w = torch.tensor([start[where]], dtype=torch.float64)
    loss, grads, h = R.toy_terms(w, x, R.toy_basins())
    for i in range(7):
        wi = w[0].clone().requires_grad_(True)
        li = _point_loss(wi, x[0, i])
        (gi,) = torch.autograd.grad(li, wi)
        # float64 closed forms of quadratics: agreement to rounding
        torch.testing.assert_close(loss[0, i], li.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[0, i], gi, rtol=1e-12, atol=1e-12)
    # the mean loss is piecewise quadratic: its exact Hessian is the mean of the
    # active pieces' Hessians
    h_ref = hessian(lambda v: torch.stack([_point_loss(v, xi) for xi in x[0]]).mean())(
        w[0]
    )
    torch.testing.assert_close(h[0], h_ref, rtol=1e-12, atol=1e-12)


def test_toy_basins_geometry():
    b = R.toy_basins()
    ev, U = torch.linalg.eigh(b["h_sharp"])
    torch.testing.assert_close(ev, torch.tensor([20.0, 200.0], dtype=torch.float64))
    # the stiff axis points from (1, 1) toward (-1, -1)
    assert abs(abs(float(U[:, 1] @ torch.tensor([1.0, 1.0]).double())) - 2**0.5) < 1e-12


@pytest.mark.parametrize("kind", ["const", "diag", "lead", "hess", "1eig"])
def test_toy_noise_has_the_target_variance(kind):
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(5, 2, 2, generator=gen, dtype=torch.float64)
    c = A @ A.transpose(1, 2)
    h = A.transpose(1, 2) @ A + torch.eye(2, dtype=torch.float64)
    s = R.toy_noise_covariance(kind, c, h, 0.01)
    # every non-GD dynamic injects E||eps||^2 = 0.01 exactly (Z19 Fig. 2)
    torch.testing.assert_close(
        s.diagonal(dim1=1, dim2=2).sum(-1), torch.full((5,), 0.01, dtype=torch.float64)
    )
    if kind == "lead":
        torch.testing.assert_close(
            s / 0.01, c / c.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
        )
    if kind == "1eig":
        u1 = torch.linalg.eigh(h)[1][..., -1]
        torch.testing.assert_close(s, 0.01 * u1[:, :, None] * u1[:, None, :])
    assert torch.equal(R.toy_noise_covariance("gd", c, h, 0.01), torch.zeros_like(c))


def test_toy_noise_covariance_unknown_kind():
    c = torch.eye(2, dtype=torch.float64)[None]
    with pytest.raises(ValueError, match="`kind` must be one of 'gd'.*got 'iso'"):
        R.toy_noise_covariance("iso", c, c, 0.01)


def test_toy_alignment_ratio_against_dense_loop():
    gen = torch.Generator().manual_seed(3)
    x = R.toy_data(3, 20, gen)
    ratios = []
    for r in range(3):
        w = torch.ones(2, dtype=torch.float64)
        g = torch.stack([torch.func.grad(_point_loss)(w, xi) for xi in x[r]])  # (n, 2)
        c = torch.cov(g.T, correction=0)
        xr = x[r]
        h = hessian(
            lambda v, xr=xr: torch.stack([_point_loss(v, xi) for xi in xr]).mean()
        )(w)
        ratios.append(float(torch.trace(h @ c) / (torch.trace(h) * torch.trace(c) / 2)))
    # same float64 quantities by two routes
    assert math.isclose(R.toy_alignment_ratio(x), sum(ratios) / 3, rel_tol=1e-10)


def test_toy_smoke_schema_and_png(tmp_path):
    res = R.main(tiny_toy(tmp_path))
    out = tmp_path / "anisotropic_escape"
    cases.check_results(out, "anisotropic_escape")
    assert (out / "toy.png").stat().st_size > 0
    assert len(res["verdict"]) == 7
    dyn = res["arrays"]["toy"]["dynamics"]
    assert set(dyn) == set(R.TOY_DYNAMICS)
    assert len(dyn["lead"]["tr_hs"]) == 30
    assert dyn["gd"]["success_rate"] == 0.0  # GD from the sharp minimum stays
    # plot() redraws from the JSON alone
    (out / "toy.png").unlink()
    assert R.plot(out / "results.json") == [out / "toy.png"]


@pytest.mark.slow
def test_toy_verdict_full_runs(tmp_path):
    # the quick config keeps the paper's 100 runs x 500 steps for the toy
    res = R.main(
        dataclasses.replace(R.Config.quick(), part="toy", out_dir=str(tmp_path))
    )
    assert res["passed"], C.verdict_table(res["verdict"])


# --------------------------------------------------------------------- net part


@pytest.mark.slow  # three recipe runs: ~30 s alone, minutes on shared cores
def test_net_smoke_schema_png_and_resume(tmp_path, interrupt_at):
    cfg = tiny_net(tmp_path / "a")
    res = R.main(cfg)
    out = tmp_path / "a" / "anisotropic_escape"
    assert (out / "net.png").stat().st_size > 0
    assert set(res) >= cases.RESULT_KEYS
    net = res["arrays"]["net"]["0"]
    assert set(net["dynamics"]) == set(cfg.dynamics)
    assert len(net["at_gd"]["top_eigenvalues"]) == 3
    assert net["dynamics"]["sgd"]["geometry"][0]["step"] == 10
    assert len(net["dynamics"]["gd"]["test_acc"]) == 1 + 20 // 5
    assert len(res["verdict"]) == 4
    # interrupt in the middle of the first dynamic, then resume
    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    with interrupt_at(12):
        R.main(cfg_b)
    res_b = R.main(dataclasses.replace(cfg_b, resume=True))
    assert res_b["arrays"] == res["arrays"]
    assert res_b["verdict"] == res["verdict"]


@pytest.mark.slow
def test_quick_passes_verdict(tmp_path):
    res = R.main(dataclasses.replace(R.Config.quick(), out_dir=str(tmp_path)))
    out = tmp_path / "anisotropic_escape"
    assert (out / "toy.png").exists() and (out / "net.png").exists()
    assert res["passed"], C.verdict_table(res["verdict"])


# ------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (
            dict(model="no_such_model"),
            ValueError,
            "`model` must be one of .*no_such_model",
        ),
        (dict(dataset="imagenet"), ValueError, "`dataset` must be one of .*'imagenet'"),
        (dict(lr=0.0), ValueError, "`lr` must be > 0; got 0.0"),
        (dict(toy_lr=-1.0), ValueError, "`toy_lr` must be > 0; got -1.0"),
        (dict(k=10**6), ValueError, "`k` must be <= the parameter count"),
        (dict(part="all"), ValueError, "`part` must be one of 'toy', 'net', 'both'"),
        (dict(dynamics=("sgd", "adam")), ValueError, "`dynamics` must be a non-empty"),
        (dict(num_corrupt=500, num_train=200), ValueError, "`num_corrupt` must be in"),
        (dict(batch_size=150), ValueError, "`batch_size` must be <= num_train/2"),
        (dict(dataset="mnist"), ValueError, "pass --data-dir DIR"),
        # counts and radii the run used to accept: negative step counts gave an
        # empty run and a FAIL verdict (exit 1); the sharpness draws and radius
        # failed only after GD, with the output folder written
        (dict(steps=-1), ValueError, "`steps` must be >= 1; got -1"),
        (dict(steps=0), ValueError, "`steps` must be >= 1; got 0"),
        (dict(gd_steps=-5), ValueError, "`gd_steps` must be >= 1; got -5"),
        (dict(geometry_every=-1), ValueError, "`geometry_every` must be >= 0"),
        (dict(toy_traj_runs=-1), ValueError, "`toy_traj_runs` must be >= 0"),
        (dict(sharpness_samples=0), ValueError, "`sharpness_samples` must be >= 1"),
        (dict(sharpness_sigma=0.0), ValueError, "`sharpness_sigma` must be > 0"),
        (dict(sharpness_sigma=-1.0), ValueError, "`sharpness_sigma` must be > 0"),
        (dict(sharpness_sigma=math.inf), ValueError, "`sharpness_sigma` must be > 0"),
        (dict(toy_noise_var=math.inf), ValueError, "`toy_noise_var` must be >= 0 an"),
        (dict(const_noise=math.inf), ValueError, "`const_noise` must be >= 0 and f"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, kw, error, match):
    cfg = tiny_net(tmp_path, **kw)
    with pytest.raises(error, match=match):
        R.main(cfg)
    assert not (tmp_path / "anisotropic_escape").exists()


def test_missing_dataset_names_download_flag(tmp_path):
    cfg = tiny_net(tmp_path, dataset="fashion_mnist", data_dir=str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="--download"):
        R.main(cfg)
    assert not (tmp_path / "anisotropic_escape").exists()


class _ToyModule(torch.nn.Module):
    """The toy as a model whose "outputs" are the per-point losses (for NoisyGD)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        loss, _, _ = R.toy_terms(self.w[None], x[None], R.toy_basins())
        return loss[0][:, None]


class _MeanOutput(torch.nn.Module):
    reduction = "mean"

    def forward(self, out, target):
        return out.mean()


@pytest.mark.parametrize("kind, noise", [("1eig", "top_eigvec"), ("hess", "hessian")])
def test_toy_noise_agrees_with_noisy_gd(kind, noise):
    # The recipe writes the toy's dynamics out (vectorised over runs); the library's
    # NoisyGD with parameter-unit noise of unit-trace shape must realise the same law.
    from geoopt_sgd import NoisyGD

    x = R.toy_data(1, 50, torch.Generator().manual_seed(0))[0]
    model, loss_fn = _ToyModule([0.9, 1.05]), _MeanOutput()
    opt = NoisyGD(
        model.parameters(),
        lr=0.005,
        noise=noise,
        noise_scale=0.1,  # total variance 0.1^2 = 0.01 (Z19 Fig. 2)
        k=2,
        refresh_every=1,
        model=model,
        loss_fn=loss_fn,
        data=(x, torch.zeros(50, dtype=torch.float64)),
        noise_units="param",
        magnitude="unit",
        seed=3,
    )
    w0 = model.w.detach().clone()
    loss_fn(model(x), None).backward()
    opt.step()
    _, grads, h = R.toy_terms(w0[None], x[None], R.toy_basins())
    xi = model.w.detach() - (w0 - 0.005 * grads[0].mean(0))
    dev = grads[0] - grads[0].mean(0)
    s = R.toy_noise_covariance(kind, (dev.T @ dev / 50)[None], h, 0.01)[0]
    # same total variance; float64 sums of 2 terms
    assert math.isclose(
        opt.stats["target_sq_norm"], float(torch.trace(s)), rel_tol=1e-12
    )
    # the realised noise lies in the support of the recipe's covariance: for 1eig
    # exactly along u_1 (rank one), for Hess anywhere (full rank)
    evals, evecs = torch.linalg.eigh(s)
    off_support = evecs[:, evals < 1e-15]
    assert float((xi @ off_support).norm()) <= 1e-12 * float(xi.norm())
    assert float(xi.norm()) > 0


def _toy_rows(**rates):
    base = dict(gd=0.0, const=0.05, diag=0.05, lead=0.2, hess=0.2)
    base["1eig"] = 0.2
    base.update(rates)
    ratio = base.pop("ratio", 1.7)
    toy = {"dynamics": {k: {"success_rate": v} for k, v in base.items()}}
    toy["tr_hc_ratio"] = ratio
    return [r["passed"] for r in R._toy_verdict(toy, {})]


def test_toy_rows_at_and_past_their_thresholds():
    assert _toy_rows() == [True] * 7  # every rate at its threshold passes
    assert _toy_rows(gd=0.01) == [False] + [True] * 6
    assert _toy_rows(diag=0.051) == [True, True, False] + [True] * 4
    assert _toy_rows(hess=0.19) == [True] * 4 + [False, True, True]
    assert _toy_rows(ratio=1.0) == [True] * 6 + [False]  # Tr(HC) ratio must be > 1
    assert _toy_rows(lead=math.nan, ratio=math.nan) == [True] * 3 + [False] + [
        True
    ] * 2 + [False]


def _net_rows(iso=(0.80, 2.0), aniso=(0.82, 1.0), geo=None):
    geo = geo or [
        {"tr_ratio": 4.0, "projection_coefficient": 0.9},
        {"tr_ratio": 6.0, "projection_coefficient": 1.2},
        {"tr_ratio": 7.0, "projection_coefficient": 1.5},
    ]
    dyn = {}
    for group, (acc, sharp) in ((R.ISOTROPIC_GROUP, iso), (R.ANISOTROPIC_GROUP, aniso)):
        for k in group:
            dyn[k] = {
                "final_test_acc": acc,
                "final_train_acc": acc,
                "expected_sharpness": sharp,
            }
    dyn["sgd"]["geometry"] = geo
    metrics = {}
    rows = R._net_verdict(R.Config(), {"0": {"dynamics": dyn}}, metrics)
    return metrics, [r["passed"] for r in rows]


def test_net_rows_on_constructed_runs():
    metrics, passed = _net_rows()
    assert passed == [True] * 4
    # the medians over the geometry records, not their extremes
    assert metrics["tr_ratio_median_along_sgd"] == 6.0
    assert metrics["projection_coefficient_median_along_sgd"] == 1.2
    assert _net_rows(aniso=(0.8099, 1.0))[1] == [False, True, True, True]  # < 1 pp
    assert _net_rows(iso=(0.80, 1.0))[1] == [True, False, True, True]  # ratio 1
    # zero or NaN expected sharpness of the isotropic group: no ratio, a failure
    assert _net_rows(iso=(0.80, 0.0))[1] == [True, False, True, True]
    assert _net_rows(iso=(math.nan, math.nan))[1] == [False, False, True, True]
    low = [{"tr_ratio": v, "projection_coefficient": 1.0} for v in (4.9, 9.0, 1.0)]
    assert _net_rows(geo=low)[1] == [True, True, False, False]  # median 4.9; a-hat 1
    nan = [{"tr_ratio": math.nan}]  # no finite measurement: NaN medians fail
    assert _net_rows(geo=nan)[1] == [True, True, False, False]
