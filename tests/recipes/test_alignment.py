from __future__ import annotations

import copy
import dataclasses
import math

import _common as C
import alignment as R
import cases
import pytest
import torch
from torch.func import functional_call, jacrev, vmap


def tiny(tmp_path, **kw):
    """A config small enough for a unit test (the verdict is not expected)."""
    base = dict(
        out_dir=str(tmp_path),
        families=("rfm", "linear_net", "fcn", "cnn"),
        rfm_dim=5,
        rfm_samples=20,
        rfm_widths=(10, 40),
        linear_dim=5,
        linear_samples=20,
        linear_depth=2,
        linear_widths=(2, 4),
        fcn_samples=20,
        fcn_widths=(3, 6),
        cnn_samples=20,
        cnn_widths=(2, 3),
        max_steps=40,
        every=20,
        tail=2,
        tail_every=5,
        nsweep_dim=10,
        nsweep_samples=(5, 40),
        nsweep_steps=40,
        nsweep_every=20,
        nsweep_draws=2,
        k=2,
    )
    base.update(kw)
    return dataclasses.replace(R.Config(), **base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny")
    cfg = tiny(tmp_path)
    return cfg, R.main(cfg)


# ------------------------------------------------------------ dense references


def _dense(model, x, y):
    """alpha, beta, mu, mu1, mu2, gamma, the loss, Sigma and G of the papers'
    square loss 1/2 (f - y)^2 (one output), from the dense Jacobian (n, P)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(())

    model.eval()
    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    J = torch.cat([jac[k].reshape(len(x), -1) for k in names], 1).double()
    with torch.no_grad():
        r = (model(x).reshape(-1) - y.reshape(-1)).double()
    n = len(r)
    L = float((0.5 * r**2).mean())
    D = r[:, None] * J  # per-sample loss gradients
    g = D.mean(0)
    S1 = D.T @ D / n
    S2 = torch.outer(g, g)
    S = S1 - S2
    G = J.T @ J / n
    fro_G2 = float((G * G).sum())
    chi = torch.einsum("ip,pq,iq->i", J, G, J)
    return {
        "loss": L,
        "alpha": float((S * G).sum() / (S.norm() * G.norm())),
        "beta": float(S.norm() / (2 * L * G.norm())),
        "mu": float((S * G).sum() / (2 * L * fro_G2)),
        "mu1": float((S1 * G).sum() / (2 * L * fro_G2)),
        "mu2": float((S2 * G).sum() / (2 * L * fro_G2)),
        "gradient_uniformity": float(chi.min() / chi.mean()),
        "S": S,
        "G": G,
    }


def test_the_loss_is_the_papers_half_square(tiny_run):
    cfg, res = tiny_run
    task = R.load_task("fcn", cfg, torch.device("cpu"))
    model = R.build_model("fcn", 3, task, cfg, cfg.seed)
    with torch.no_grad():
        f = model(task["x"])
    # L = (1/n) sum_i 1/2 (f_i - y_i)^2, not nn.MSELoss's mean square
    ref = float(((f - task["y"]) ** 2).sum()) / (2 * len(f))
    assert res["arrays"]["runs"]["fcn/3"]["loss"][0] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("key", ["rfm/10", "linear_net/4", "fcn/6", "cnn/2", "cnn/3"])
def test_metrics_at_init_match_dense(tiny_run, key):
    cfg, res = tiny_run
    fam, width = key.split("/")
    task = R.load_task(fam, cfg, torch.device("cpu"))
    model = R.build_model(fam, int(width), task, cfg, cfg.seed)
    ref = _dense(model, task["x"], task["y"])
    rec = res["arrays"]["runs"][key]
    assert rec["step"][0] == 0
    assert rec["num_params"] == sum(p.numel() for p in model.parameters())
    for name in R.TRAIN_METRICS:
        assert rec[name][0] == pytest.approx(ref[name], rel=1e-8, abs=1e-12), name
    # mu = alpha * beta and mu = mu1 - mu2 (WWS22 §2)
    assert rec["mu"][0] == pytest.approx(rec["alpha"][0] * rec["beta"][0], rel=1e-10)
    assert rec["mu"][0] == pytest.approx(rec["mu1"][0] - rec["mu2"][0], rel=1e-8)


@pytest.mark.parametrize("spectrum", R.SPECTRA)
def test_nsweep_at_init_matches_dense(tiny_run, spectrum):
    cfg, res = tiny_run
    n = 40
    task = R.nsweep_inputs(spectrum, n, cfg, torch.device("cpu"))
    model = R.nsweep_model(cfg)
    # WWS22 Prop. 2.3's ordinary linear model f = theta^T x: no bias
    assert [p.shape for p in model.parameters()] == [(1, cfg.nsweep_dim)]
    ref = _dense(model, task["x"], task["y"])
    rec = res["arrays"]["nsweep"][f"{spectrum}/{n}"]["draws"][0]
    assert rec["mu"][0] == pytest.approx(ref["mu"], rel=1e-8)
    assert rec["mu1"][0] == pytest.approx(ref["mu1"], rel=1e-8)
    # g(u) = u^T Sigma u / (2L u^T G u) on the top-k eigenvectors of G (the GGN
    # of a linear model: constant)
    evals, evecs = torch.linalg.eigh(ref["G"])
    U = evecs[:, -cfg.k :]
    g = torch.einsum("pk,pq,qk->k", U, ref["S"], U) / (
        2 * ref["loss"] * evals[-cfg.k :]
    )
    assert rec["g_top"][0] == pytest.approx(float(g.min()), rel=1e-5)
    # the learning rate is nsweep_lr_factor / lambda_max(G)
    assert rec["lr"] == pytest.approx(
        cfg.nsweep_lr_factor / float(evals[-1]), rel=1e-10
    )
    # the input spectrum: d_eff = Tr S / ||S||
    want = (
        cfg.nsweep_dim
        if spectrum == "isotropic"
        else ((1 - cfg.nsweep_decay**cfg.nsweep_dim) / (1 - cfg.nsweep_decay))
    )
    assert rec["d_eff"] == pytest.approx(want, rel=1e-12)
    # the draws are independent data sets
    other = R.nsweep_inputs(spectrum, n, cfg, torch.device("cpu"), draw=1)
    assert not torch.equal(other["x"], task["x"])
    assert len(res["arrays"]["nsweep"][f"{spectrum}/{n}"]["draws"]) == cfg.nsweep_draws


# ------------------------------------------------------------ the run


def test_schema_table_figure_and_resume(tmp_path, tiny_run, interrupt_at):
    cfg0, res = tiny_run
    out = tmp_path / "a" / "alignment"
    cfg = dataclasses.replace(cfg0, out_dir=str(tmp_path / "a"))
    with interrupt_at(3):  # the fourth training run
        R.main(cfg)
    resumed = R.main(dataclasses.replace(cfg, resume=True))
    assert resumed["arrays"] == res["arrays"]
    assert resumed["verdict"] == res["verdict"]
    on_disk = cases.check_results(out, "alignment")
    assert len(on_disk["verdict"]) == 13  # 3 + 4 flatness + 1 + 2x2 + 1
    runs = on_disk["arrays"]["runs"]
    assert sorted(runs) == sorted(
        f"{f}/{w}" for f in cfg.families for w in R.widths_of(cfg, f)
    )
    for rec in runs.values():
        # measured at step 0, every 20 steps to 40, then tail - 1 = 1 more, 5 later
        assert rec["step"] == [0, 20, 40, 45]
        assert rec["tail_from"] == 2
        for name in R.TRAIN_METRICS:
            assert len(rec[name]) == 4
    text = R.table(on_disk)
    assert "| rfm/10 |" in text and "| isotropic/5 |" in text
    png = out / "alignment.png"
    assert png.stat().st_size > 1000
    png.unlink()
    assert R.plot(out / "results.json") == png and png.exists()


def test_timm_family_builds_and_measures(tmp_path):
    cfg = tiny(tmp_path, families=("timm",), timm_samples=20, timm_widths=(4,))
    res = R.main(cfg)
    rec = res["arrays"]["runs"]["timm/4"]
    task = R.load_task("timm", cfg, torch.device("cpu"))
    model = R.build_model("timm", 4, task, cfg, cfg.seed)
    assert type(model).__module__.startswith("timm.")
    # GroupNorm: a per-sample function, so the measured loss is the trained one
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    ref = _dense(model, task["x"], task["y"])
    assert rec["mu"][0] == pytest.approx(ref["mu"], rel=1e-8)
    # one width: no flatness row for it, and no size sweep at all here
    claims = [r["claim"] for r in res["verdict"]]
    assert not any("flat in model size" in c for c in claims)


# ------------------------------------------------------------ every row can fail


def _rec(P, mu, alpha=None, converged=True):
    k = len(mu)
    return {
        "num_params": P,
        "width": P,
        "lr": 0.1,
        "step": list(range(k)),
        "loss": [1.0] * k,
        "alpha": alpha or [0.9] * k,
        "beta": [1.0] * k,
        "mu": list(mu),
        "mu1": list(mu),
        "mu2": [0.0] * k,
        "gradient_uniformity": [0.5] * k,
        "converged_at": 1 if converged else None,
        "tail_from": 1,
    }


def _ns(n, mu, g):
    draw = {
        "lr": 0.1,
        "step": [0, 1],
        "loss": [1.0, 1.0],
        "mu": [mu, mu],
        "mu1": [mu, mu],
        "g_top": [g, g],
        "g_random": [1.0, 1.0],
    }
    return {"n": n, "spectrum": "", "d_eff": 10.0, "draws": [draw, dict(draw)]}


def _fake(cfg):
    runs = {}
    for fam in cfg.families:
        for i, w in enumerate(R.widths_of(cfg, fam)):
            runs[f"{fam}/{w}"] = _rec(10 * 1000**i, [1.0, 1.0, 1.0])
    nsweep = {}
    for sp in R.SPECTRA:
        for n in cfg.nsweep_samples:
            big = n == max(cfg.nsweep_samples)
            nsweep[f"{sp}/{n}"] = _ns(n, 1.05 if big else 0.8, 0.9 if big else 0.5)
    return runs, nsweep


def test_every_row_can_fail():
    cfg = tiny("unused")
    runs, nsweep = _fake(cfg)
    _, rows = R.summarise(runs, nsweep, cfg)
    assert all(r["passed"] for r in rows), C.verdict_table(rows)
    claims = [r["claim"] for r in rows]

    def failed(runs_, nsweep_, cfg_=cfg):
        _, rows_ = R.summarise(runs_, nsweep_, cfg_)
        return [r["claim"] for r in rows_ if not r["passed"]]

    def one(pred):
        [c] = [c for c in claims if pred(c)]
        return c

    r, ns = copy.deepcopy(runs), nsweep
    r["fcn/3"]["alpha"][0] = 0.3
    assert failed(r, ns) == [one(lambda c: c.startswith("alpha near 1"))]
    r = copy.deepcopy(runs)
    r["rfm/10"]["mu"][0] = 0.1
    assert failed(r, ns) == [one(lambda c: c.startswith("mu clearly positive"))]
    r = copy.deepcopy(runs)
    r["cnn/2"]["converged_at"] = None
    assert failed(r, ns) == [one(lambda c: c.startswith("every run converged"))]
    for fam, mu in (("cnn", 1.15), ("linear_net", 1.3)):
        r = copy.deepcopy(runs)
        w = R.widths_of(cfg, fam)[-1]
        r[f"{fam}/{w}"]["mu"] = [1.0, mu, mu]
        assert failed(r, ns) == [one(lambda c, f=fam: f"size ({f})" in c)]
    r = copy.deepcopy(runs)
    r["fcn/6"]["num_params"] = 500
    assert failed(r, ns) == [one(lambda c: c.startswith("the size sweeps span"))]
    for sp in R.SPECTRA:
        ns = copy.deepcopy(nsweep)
        ns[f"{sp}/5"]["draws"][0]["mu"] = [1.5, 1.5]  # mean over draws 1.15
        assert failed(runs, ns) == [
            one(lambda c, s=sp: c.startswith(f"alignment weaker at small n ({s}"))
        ]
        ns = copy.deepcopy(nsweep)
        ns[f"{sp}/5"]["draws"][1]["g_top"] = [1.4, 1.4]  # mean 0.95
        assert failed(runs, ns) == [
            one(
                lambda c, s=sp: c.startswith(
                    f"directional alignment weaker at small n ({s})"
                )
            )
        ]
    ns = copy.deepcopy(nsweep)
    ns["decaying/40"]["draws"][0]["mu"] = [0.93, 0.93]  # mean over draws 0.99
    assert failed(runs, ns) == [
        one(lambda c: c.startswith("large-n linear regression"))
    ]


# ------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"families": ("rfm", "resnet")}, r"`families` must be among"),
        ({"families": ()}, r"`families` must name at least one"),
        ({"families": ("rfm", "rfm")}, r"`families` must not repeat"),
        ({"fcn_lr": 0.0}, r"`fcn_lr` must be > 0; got 0.0."),
        ({"families": ("timm",), "timm_model": "no_such"}, r"timm.list_models"),
        ({"cnn_widths": ()}, r"`cnn_widths` must hold distinct widths"),
        ({"linear_widths": (4, 4)}, r"`linear_widths` must hold distinct widths"),
        ({"nsweep_samples": (20,)}, r"`nsweep_samples` must hold >= 2 sizes"),
        ({"k": 11}, r"`k` must be <= nsweep_dim = 10; got 11."),
        ({"fcn_samples": 5000}, r"`fcn_samples` must be in \[2, 1347\]"),
        ({"nsweep_decay": 0.0}, r"`nsweep_decay` must be in \(0, 1\]"),
        ({"stop_loss": 0.0}, r"`stop_loss` must be > 0"),
        ({"tail": 0}, r"`tail` must be >= 1; got 0."),
        ({"cnn_flat_max": 0.9}, r"`cnn_flat_max` must be >= 1"),
        ({"dtype": "int8"}, r"`dtype` must be one of 'float32', 'float64'"),
        ({"cnn_activation": "elu"}, r"`cnn_activation` must be one of 'relu', 'gelu'"),
        ({"cnn_pool": "min"}, r"`cnn_pool` must be one of 'max', 'avg'"),
    ],
)
def test_bad_config(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        R.main(tiny(tmp_path, **change))
    assert not (tmp_path / "alignment").exists()


def test_cnn_activation_and_pool_options(tmp_path):
    cfg = tiny(tmp_path)
    assert (cfg.cnn_activation, cfg.cnn_pool) == ("relu", "max")  # the defaults
    task = R.load_task("cnn", cfg, torch.device("cpu"))
    kinds = [type(m) for m in R.build_model("cnn", 3, task, cfg, 0).features]
    assert kinds == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.MaxPool2d] * 2
    cfg = tiny(tmp_path, cnn_activation="softplus", cnn_pool="avg")
    kinds = [type(m) for m in R.build_model("cnn", 3, task, cfg, 0).features]
    assert kinds == [torch.nn.Conv2d, torch.nn.Softplus, torch.nn.AvgPool2d] * 2


def test_diverging_run_names_its_lr(tmp_path):
    with pytest.raises(C.Diverged, match="pass a smaller --linear-lr"):
        R.main(tiny(tmp_path, families=("linear_net",), linear_lr=1e6))


@pytest.mark.slow  # about 5 minutes on the loaded 2-core machine
def test_quick_verdict(tmp_path):
    res = R.main(dataclasses.replace(R.Config.quick(), out_dir=str(tmp_path)))
    assert math.isfinite(res["metrics"]["seconds"])
    rows = res["verdict"]
    assert len(rows) == 13
    # measured on seeds 0-2 (recipes/README.md): row 7 (CNN flatness, the paper's
    # 10%) fails on seeds 0 and 1 (1.152, 1.212); seed 2 passes every row. The
    # other rows pass on every seed (row 1's lowest: 0.5009, timm/8, seed 1; row
    # 13: 1.010-1.011), and must keep passing.
    robust = [r for i, r in enumerate(rows, 1) if i != 7]
    assert all(r["passed"] for r in robust), C.verdict_table(rows)
    # three initialisations per size of every swept family, one for timm
    runs = res["arrays"]["runs"]
    assert len(runs) == 4 * 3 * 3 + 1


# ------------------------------------------------------------ initialisations


def test_inits_seed_the_model_and_average_mu_at_convergence(tmp_path):
    cfg = tiny(tmp_path, families=("fcn", "timm"), timm_samples=20, timm_widths=(4,))
    cfg = dataclasses.replace(cfg, inits=2)
    res = R.main(cfg)
    runs = res["arrays"]["runs"]
    # two initialisations per fcn size, one for timm's single size
    assert sorted(runs) == ["fcn/3", "fcn/3/1", "fcn/6", "fcn/6/1", "timm/4"]
    task = R.load_task("fcn", cfg, torch.device("cpu"))
    for w in (3, 6):
        # the second initialisation is seeded with seed + 1000, on the same data
        model = R.build_model("fcn", w, task, cfg, cfg.seed + 1000)
        ref = _dense(model, task["x"], task["y"])
        assert runs[f"fcn/{w}/1"]["init"] == 1
        assert runs[f"fcn/{w}/1"]["mu"][0] == pytest.approx(ref["mu"], rel=1e-8)
        assert runs[f"fcn/{w}/1"]["mu"][0] != pytest.approx(runs[f"fcn/{w}"]["mu"][0])
    # a size's mu at convergence is the mean over its initialisations' tails
    m = res["metrics"]
    size = []
    for w in (3, 6):
        tails = [
            runs[k]["mu"][runs[k]["tail_from"] :] for k in (f"fcn/{w}", f"fcn/{w}/1")
        ]
        want = (sum(tails[0]) / len(tails[0]) + sum(tails[1]) / len(tails[1])) / 2
        assert m[f"fcn/{w}/mu_converged_size"] == pytest.approx(want, rel=1e-12)
        size.append(want)
    [row] = [r for r in res["verdict"] if "size (fcn)" in r["claim"]]
    assert row["value"] == pytest.approx(max(size) / min(size), rel=1e-3)
    assert "mean over 2 initialisations" in row["note"]


def test_flatness_row_reads_the_mean_over_inits():
    cfg = dataclasses.replace(tiny("unused"), inits=2)
    runs, nsweep = _fake(dataclasses.replace(cfg, inits=1))
    for key in list(runs):
        runs[key + "/1"] = copy.deepcopy(runs[key])
    # one initialisation of the largest cnn at 1.3: alone it fails the 10% row,
    # averaged with the other initialisation (1.0) it is 1.15, still a failure;
    # at 1.15 the mean 1.075 passes
    w = R.widths_of(cfg, "cnn")[-1]
    r = copy.deepcopy(runs)
    r[f"cnn/{w}/1"]["mu"] = [1.0, 1.3, 1.3]
    _, rows = R.summarise(r, nsweep, cfg)
    [row] = [x for x in rows if "size (cnn)" in x["claim"]]
    assert row["value"] == pytest.approx(1.15) and not row["passed"]
    r[f"cnn/{w}/1"]["mu"] = [1.0, 1.15, 1.15]
    _, rows = R.summarise(r, nsweep, cfg)
    assert all(x["passed"] for x in rows), C.verdict_table(rows)
    # every initialisation's run counts for the alpha and convergence rows
    r[f"fcn/{R.widths_of(cfg, 'fcn')[0]}/1"]["converged_at"] = None
    _, rows = R.summarise(r, nsweep, cfg)
    assert [x["claim"] for x in rows if not x["passed"]] == [
        x["claim"] for x in rows if x["claim"].startswith("every run converged")
    ]


def test_rows_fail_on_a_nan_init_a_zero_baseline_and_skip_zero_loss():
    cfg = dataclasses.replace(tiny("unused"), inits=2)
    runs, nsweep = _fake(dataclasses.replace(cfg, inits=1))
    for key in list(runs):
        runs[key + "/1"] = copy.deepcopy(runs[key])

    def failed(runs_, nsweep_):
        _, rows = R.summarise(runs_, nsweep_, cfg)
        return [x["claim"] for x in rows if not x["passed"]]

    assert failed(runs, nsweep) == []
    # one initialisation of the largest cnn has no mu at convergence (NaN): the
    # size's mean is NaN and the flatness row fails (not the other init alone)
    w = R.widths_of(cfg, "cnn")[-1]
    r = copy.deepcopy(runs)
    r[f"cnn/{w}/1"]["mu"] = [1.0, math.nan, math.nan]
    [c] = failed(r, nsweep)
    assert "size (cnn)" in c
    # a negative mu at convergence (smallest cnn) fails the flatness row too
    r = copy.deepcopy(runs)
    for i in ("", "/1"):
        r[f"cnn/{R.widths_of(cfg, 'cnn')[0]}{i}"]["mu"] = [1.0, -0.5, -0.5]
    assert any("size (cnn)" in c for c in failed(r, nsweep))
    # no directional alignment at large n (0): the ratio is undefined, a failure
    sp, n_lo, n_hi = R.SPECTRA[0], min(cfg.nsweep_samples), max(cfg.nsweep_samples)
    ns = copy.deepcopy(nsweep)
    for draw in ns[f"{sp}/{n_hi}"]["draws"]:
        draw["g_top"] = [0.0, 0.0]
    assert failed(runs, ns) == [
        f"directional alignment weaker at small n ({sp}): median over training "
        f"of min_j g(u_j), j <= {cfg.k}, n = {n_lo} over n = {n_hi}"
    ]
    # no finite mu at large n for either spectrum: the "min over the two
    # spectra" is NaN and the row fails, whichever spectrum it is
    for sp in R.SPECTRA:
        ns = copy.deepcopy(nsweep)
        for draw in ns[f"{sp}/{n_hi}"]["draws"]:
            draw["mu"] = [math.nan, math.nan]
        assert any(c.startswith("large-n linear regression") for c in failed(runs, ns))
    # a measurement at L = 0 is left out (alpha and mu are 0/0 there)
    r = copy.deepcopy(runs)
    r["fcn/3"].update(loss=[1.0, 1.0, 0.0], alpha=[0.9, 0.9, 0.0])
    r["fcn/3"]["mu"][2] = math.nan
    assert failed(r, nsweep) == []
    # the P span is max/min over the sizes whatever their order
    r = copy.deepcopy(runs)
    ws = R.widths_of(cfg, "fcn")
    for i in ("", "/1"):
        a, b = f"fcn/{ws[0]}{i}", f"fcn/{ws[-1]}{i}"
        r[a]["num_params"], r[b]["num_params"] = r[b]["num_params"], r[a]["num_params"]
    assert failed(r, nsweep) == []
