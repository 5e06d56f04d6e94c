"""NoisyGD: drop-in contract, exact coupling, covariance of every noise kind, resume."""

import copy
import io
import itertools
import math

import pytest
import torch
from cases import assert_same_state, image_data, make_data, mlp, model_state, tiny_cnn
from torch import nn

from geoopt_sgd import NoisyGD
from geoopt_sgd.optim._noise_source import STREAM_PARTITION, STREAM_WEIGHTS
from geoopt_sgd.optim.noise import make_generator
from geoopt_sgd.testing import noisy_gd_covariance, per_sample_gradients_loop

# ------------------------------------------------------------------ helpers


def _design(n=8, seed=0):
    # Columns of a Sylvester-Hadamard matrix: orthogonal to each other and to the
    # all-ones (bias) column, scaled 1, 2, 3. For MSE the Hessian of the linear
    # model is then diagonal, diag(2, 2, 8, 18) in (w1, w2, w3, b) order... up
    # to the ordering below, so Hutchinson with Rademacher probes is exact and
    # the top-2 eigenpairs are well separated (18, 8 vs 2).
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H8 = torch.kron(torch.kron(H2, H2), H2)
    X = H8[:, 1:4] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return X, y


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 1).to(torch.float64)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _draw(opt, model, num):
    """Noise vectors xi of `num` steps at a fixed theta (zero grads, lr = 1)."""
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    out = []
    for _ in range(num):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        out.append(
            torch.cat(
                [
                    (t0 - p.detach()).reshape(-1)
                    for p, t0 in zip(params, theta0, strict=True)
                ]
            )
        )
        with torch.no_grad():
            for p, t0 in zip(params, theta0, strict=True):
                p.copy_(t0)
    return torch.stack(out)


def _moment_tolerance(S, num):
    # Each entry of the empirical second moment of num Gaussian samples with
    # covariance S has variance (S_aa S_bb + S_ab^2)/num <= 2 max(S_aa)^2/num;
    # 5 standard deviations bound all 16 entries except with probability ~1e-5.
    return 5 * math.sqrt(2 / num) * float(S.diagonal().max())


# -------------------------------------------------- drop-in contract


@pytest.mark.parametrize("foreach", [False, True], ids=lambda f: f"foreach={f}")
@pytest.mark.parametrize("maximize", [False, True], ids=lambda m: f"maximize={m}")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=lambda w: f"wd={w}")
def test_noise_none_equals_torch_sgd_bit_for_bit(foreach, maximize, weight_decay):
    X, y = make_data(n=10)
    loss_fn = nn.CrossEntropyLoss()
    m1, m2 = mlp(), mlp()
    o1 = torch.optim.SGD(
        m1.parameters(),
        lr=0.1,
        weight_decay=weight_decay,
        maximize=maximize,
        foreach=foreach,
    )
    o2 = NoisyGD(
        m2.parameters(),
        lr=0.1,
        weight_decay=weight_decay,
        maximize=maximize,
        foreach=foreach,
    )
    for _ in range(4):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            loss_fn(m(X), y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)  # the gradients are left as they were


@pytest.mark.parametrize("units", ["grad", "param"])
@pytest.mark.parametrize("maximize", [False, True], ids=lambda m: f"maximize={m}")
def test_foreach_matches_forloop_float64(units, maximize):
    X, y = make_data(n=10)
    loss_fn = nn.CrossEntropyLoss()
    models = [mlp(), mlp()]
    opts = [
        NoisyGD(
            [
                {"params": list(m.parameters())[:2], "lr": 0.05},
                {"params": list(m.parameters())[2:]},
            ],
            lr=0.1,
            noise="isotropic",
            noise_scale=0.01,
            noise_units=units,
            weight_decay=0.01,
            maximize=maximize,
            foreach=fe,
            seed=3,
        )
        for m, fe in zip(models, (False, True), strict=True)
    ]
    for _ in range(3):
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            loss_fn(m(X), y).backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_with_closure_returns_its_loss_and_hooks_fire():
    X, y = make_data(n=10)
    model = mlp()
    opt = NoisyGD(model.parameters(), lr=0.1, noise="isotropic", noise_scale=0.01)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(o.stats["step"]))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad
    assert calls == [1]
    assert opt.step() is None


def test_params_without_grad_are_skipped_and_global_rng_untouched():
    X, y = make_data(n=10)
    model = mlp()
    model[2].weight.requires_grad_(False)
    frozen = model[2].weight.detach().clone()
    opt = NoisyGD(model.parameters(), lr=0.1, noise="isotropic", noise_scale=0.1)
    rng = torch.get_rng_state()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    assert torch.equal(model[2].weight, frozen)
    assert torch.equal(rng, torch.get_rng_state())


def test_sparse_gradient_raises():
    emb = nn.Embedding(5, 2, sparse=True)
    opt = NoisyGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_repr_and_deepcopy_keep_the_noise_settings():
    model = mlp()
    opt = NoisyGD(
        model.parameters(), lr=0.1, noise="isotropic", noise_scale=0.5, seed=4
    )
    assert "NoisyGD" in repr(opt)
    clone = copy.deepcopy(opt)
    assert (clone.noise, clone.noise_scale, clone.seed) == ("isotropic", 0.5, 4)


def test_lr_is_read_every_step_so_schedulers_work():
    model = mlp()
    opt = NoisyGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = _flat(model)
    opt.step()
    sched.step()
    mid = _flat(model)
    opt.step()
    torch.testing.assert_close(
        before - mid, 2 * (mid - _flat(model)), rtol=0, atol=1e-15
    )


# ------------------------------------------------------------ coupling


@pytest.mark.parametrize("units", ["grad", "param"])
def test_isotropic_coupling_two_scales_differ_exactly_by_the_scale(units):
    # theta = 0, grad = 0, lr = 1: the step writes -s z (grad) or +s z (param)
    # exactly, and the same seed at 2s writes exactly twice that.
    outs = []
    for s in (0.25, 0.5):
        p = torch.zeros(50, dtype=torch.float64, requires_grad=True)
        opt = NoisyGD(
            [p], lr=1.0, noise="isotropic", noise_scale=s, seed=9, noise_units=units
        )
        p.grad = torch.zeros_like(p)
        opt.step()
        outs.append(p.detach().clone())
    assert torch.equal(2 * outs[0], outs[1])
    assert outs[0].abs().sum() > 0


@pytest.mark.parametrize("foreach", [False, True], ids=lambda f: f"foreach={f}")
@pytest.mark.parametrize("kind", ["isotropic", "sgd_matched"])
def test_learning_rate_scales_gradient_unit_noise_only(kind, foreach):
    # The other covariance tests run at lr = 1, where eta cannot show. Gradient
    # units: theta moves by -eta xi, so the parameters get eta^2 S (SGD's
    # eta^2 Sigma / B); parameter units: by +xi whatever eta is. Same seed and
    # step, zero gradient: the displacements must be exact multiples.
    def displacement(lr, units):
        X, y = _design()
        model = _linear()
        opt = NoisyGD(
            model.parameters(),
            lr=lr,
            noise=kind,
            noise_scale=0.5,
            batch_size=2,
            model=model,
            loss_fn=nn.MSELoss(),
            data=(X, y),
            noise_units=units,
            seed=11,
            foreach=foreach,
        )
        return _draw(opt, model, 1)[0]  # theta_0 - theta_1

    ref = displacement(1.0, "grad")  # = xi (the noise in gradient units)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(displacement(0.3, "grad"), 0.3 * ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(displacement(0.3, "param"), -ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(displacement(1.0, "param"), -ref, rtol=1e-12, atol=0)


def test_noise_schedule_multiplies_the_scale():
    # theta reset to 0 and zero grads with lr = 1: each step writes -s(t) z_t
    # exactly, and a multiplier of 2 is exact in floating point
    outs = []
    for sched in (None, lambda t: 2.0 if t == 1 else 1.0):
        p = torch.zeros(20, dtype=torch.float64, requires_grad=True)
        opt = NoisyGD(
            [p],
            lr=1.0,
            noise="isotropic",
            noise_scale=0.5,
            seed=1,
            noise_schedule=sched,
        )
        steps = []
        for _ in range(2):
            with torch.no_grad():
                p.zero_()
            p.grad = torch.zeros_like(p)
            opt.step()
            steps.append(p.detach().clone())
        outs.append(steps)
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(2 * outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[0][1])


def test_different_seeds_and_steps_give_different_noise():
    p = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = NoisyGD([p], lr=1.0, noise="isotropic", seed=0)
    p.grad = torch.zeros_like(p)
    opt.step()
    a = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach() - a, a)


# ------------------------------------------------- covariance of each kind


def _source(batch_size, **kw):
    X, y = _design()
    model = _linear()
    loss_fn = nn.MSELoss()
    opt = NoisyGD(
        model.parameters(),
        lr=1.0,
        batch_size=batch_size,
        model=model,
        loss_fn=loss_fn,
        data=(X, y),
        refresh_every=10**6,
        seed=5,
        **kw,
    )
    return opt, model, loss_fn, X, y


@pytest.mark.parametrize(
    "kind, B",
    [
        ("isotropic", 1),
        ("isotropic_matched", 1),
        ("diagonal", 1),
        ("sgd_leading", 1),
        ("hessian", 1),
        ("top_eigvec", 1),
        ("sgd_matched", 2),
        ("geometry_aware", 2),
        ("geometry_aware_isotropic", 2),
    ],
    ids=lambda v: f"noise={v}" if isinstance(v, str) else f"B={v}",
)
def test_empirical_covariance_matches_definition(kind, B):
    k, num = 2, 3000
    opt, model, loss_fn, X, y = _source(B, noise=kind, k=k, noise_scale=1.5)
    S = 1.5**2 * noisy_gd_covariance(kind, model, loss_fn, X, y, batch_size=B, k=k)
    samples = _draw(opt, model, num)
    emp = samples.T @ samples / num
    assert (emp - S).abs().max() < _moment_tolerance(S, num), (emp, S)
    if kind != "sgd_matched":
        # the recorded target is the trace of the covariance; Lanczos tol 1e-3
        # and exact Hutchinson (diagonal H) leave ~1e-6 relative error
        assert opt.stats["target_sq_norm"] == pytest.approx(float(S.trace()), rel=1e-5)
    assert opt.stats["realised_sq_norm_mean"] == pytest.approx(
        float(S.trace()), rel=10 * math.sqrt(2 / num)
    )


@pytest.mark.parametrize("magnitude", ["unit", "raw"])
@pytest.mark.parametrize(
    "kind", ["isotropic_matched", "diagonal", "sgd_leading", "hessian", "top_eigvec"]
)
def test_target_is_the_trace_of_the_dense_covariance(kind, magnitude):
    # deterministic: the recorded E||xi||^2 of the other magnitudes; Lanczos tol
    # 1e-3 on exact eigenvalues leaves ~1e-6 relative error
    opt, model, loss_fn, X, y = _source(1, noise=kind, k=2, magnitude=magnitude)
    S = noisy_gd_covariance(
        kind, model, loss_fn, X, y, batch_size=1, k=2, magnitude=magnitude
    )
    _draw(opt, model, 1)
    assert opt.stats["target_sq_norm"] == pytest.approx(float(S.trace()), rel=1e-5)


@pytest.mark.parametrize("kind", ["isotropic_matched", "diagonal", "sgd_leading"])
def test_minibatch_covariance_of_batches_of_two_replays_the_partition(kind):
    # B > 1: C is the covariance (1/M) of the means of M = n / B disjoint batches
    # of a random partition (randperm from the refresh's partition stream, step
    # 0), replayed here on explicit per-sample gradients: E||xi||^2 = s^2 Tr C
    B = 2
    opt, model, loss_fn, X, y = _source(B, noise=kind, k=2, noise_scale=1.5)
    D = per_sample_gradients_loop(model, loss_fn, X, y)
    n = D.shape[0]
    gen = make_generator(5, 0, "cpu", stream=STREAM_PARTITION)
    means = D[torch.randperm(n, generator=gen)].reshape(n // B, B, -1).mean(1)
    dev = means - means.mean(0)
    C = dev.T @ dev / (n // B)
    _draw(opt, model, 1)
    want = 1.5**2 * float(C.trace())
    assert opt.stats["target_sq_norm"] == pytest.approx(want, rel=1e-10)
    assert opt.stats["reference_sq_norm"] == pytest.approx(want / 1.5**2, rel=1e-10)


def test_reference_sq_norm_of_iso_is_its_trace_at_unit_scale():
    # ISO's reference: 2 L Tr H / B, the trace of its covariance at noise_scale=1
    opt, model, loss_fn, X, y = _source(2, noise="geometry_aware_isotropic")
    S = noisy_gd_covariance(
        "geometry_aware_isotropic", model, loss_fn, X, y, batch_size=2, k=2
    )
    _draw(opt, model, 1)
    assert opt.stats["reference_sq_norm"] == pytest.approx(float(S.trace()), rel=1e-10)


def test_dense_covariance_twin_errors():
    X, y = _design()
    model, loss_fn = _linear(), nn.MSELoss()
    with pytest.raises(
        ValueError, match=r"random partition unless batch_size=1; got 2"
    ):
        noisy_gd_covariance("diagonal", model, loss_fn, X, y, batch_size=2, k=1)
    with pytest.raises(
        ValueError, match=r"`kind` must be one of 'none', .*got 'gauss'"
    ):
        noisy_gd_covariance("gauss", model, loss_fn, X, y, batch_size=1, k=1)


@pytest.mark.parametrize("noise", ["isotropic", "isotropic_matched"])
def test_realised_norm_is_exact_however_often_stats_are_read(noise):
    # stats convert the per-step ||xi||^2 lazily (no device sync per step); the
    # values must be those of an eager float() per step, read at any cadence
    runs = []
    for read_every in (1, 7, None):
        opt, model, *_ = _source(2, noise=noise, noise_scale=0.5)
        seen = []
        for t in range(300):  # beyond the bound on pending steps
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            if read_every and t % read_every == 0:
                seen.append(opt.stats["realised_sq_norm"])
        runs.append((dict(opt.stats), seen))
        assert not opt._pending
    (eager, eager_seen), (sparse, sparse_seen), (never, _) = runs
    (
        eager.pop("refresh_seconds"),
        sparse.pop("refresh_seconds"),
        never.pop("refresh_seconds"),
    )
    assert eager == sparse == never
    assert eager_seen[::7] == sparse_seen
    # and it is the exact squared norm of the step's noise
    p = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    opt = NoisyGD([p], lr=1.0, noise="isotropic", seed=3, noise_scale=1.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.stats["realised_sq_norm"] == float(p.detach() @ p.detach())


def test_realised_norm_mean_is_the_mean_over_steps():
    # stats["realised_sq_norm_mean"] is the plain mean of the steps' ||xi||^2
    p = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    opt = NoisyGD([p], lr=1.0, noise="isotropic", seed=3, noise_scale=0.5)
    norms = []
    for _ in range(5):
        p.grad = torch.zeros_like(p)
        p.detach().zero_()
        opt.step()
        norms.append(float(p.detach() @ p.detach()))
        assert opt.stats["realised_sq_norm"] == pytest.approx(norms[-1], rel=1e-14)
        want = math.fsum(norms) / len(norms)
        assert opt.stats["realised_sq_norm_mean"] == pytest.approx(want, rel=1e-14)


def test_ggn_curvature_equals_hessian_on_a_linear_model():
    # linear model + MSE: GGN = Hessian exactly, so both give the same top-2 mass
    stats = []
    for curvature in ("hessian", "ggn"):
        opt, model, *_ = _source(
            None, noise="hessian", k=2, magnitude="raw", curvature=curvature
        )
        _draw(opt, model, 1)
        stats.append(opt.stats["target_sq_norm"])
    # Lanczos tol 1e-3 on the exact eigenvalues 18 and 8
    assert stats[0] == pytest.approx(stats[1], rel=1e-6)


@pytest.mark.parametrize(
    "kind", ["sgd_matched", "diagonal"], ids=lambda k: f"noise={k}"
)
def test_sum_reduction_scales_the_sgd_noise_by_n(kind):
    # L_sum = n L_mean, so the SGD estimator (n/B) sum_b grad L_i has n times the
    # noise of the mean convention; the same streams give xi_sum = n xi_mean up
    # to float64 round-off of the extra multiplication
    X, y = _design()
    out = []
    for reduction in ("mean", "sum"):
        model = _linear()
        opt = NoisyGD(
            model.parameters(),
            lr=1.0,
            noise=kind,
            batch_size=2,
            model=model,
            loss_fn=nn.MSELoss(reduction=reduction),
            data=(X, y),
            seed=2,
        )
        out.append(_draw(opt, model, 2))
    torch.testing.assert_close(out[1], X.shape[0] * out[0], rtol=1e-12, atol=1e-13)


def _partitions(items, B):
    """Every split of ``items`` into unordered groups of ``B`` (len divisible by B)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, B - 1):
        left = [i for i in rest if i not in others]
        for tail in _partitions(left, B):
            yield [[first, *others], *tail]


@pytest.mark.parametrize("B", [2, 4])
@pytest.mark.parametrize("kind", ["isotropic_matched", "diagonal", "sgd_leading"])
def test_minibatch_covariance_at_b_above_1_is_that_of_one_partition(kind, B):
    # The C kinds at B > 1 (the B = 1 tests cannot see a factor of B): every
    # refresh cuts the n samples into n/B disjoint batches at random, so Tr C
    # must be (1/M) sum_b ||mean_{i in b} grad L_i - grad L||^2 of one of the
    # partitions, computed here from per-sample gradients by a loop. Over all
    # partitions its mean is Tr(Sigma) / B * (n - B) / (n - 1), the
    # without-replacement covariance, not Tr(Sigma) / B.
    X, y = _design()
    model, loss_fn = _linear(), nn.MSELoss()
    D = per_sample_gradients_loop(model, loss_fn, X, y).double()
    n = D.shape[0]
    grad = D.mean(0)
    candidates = []
    for part in _partitions(list(range(n)), B):
        dev = torch.stack([D[g].mean(0) - grad for g in part])
        candidates.append(float((dev * dev).sum()) / len(part))
    cand = torch.tensor(candidates, dtype=torch.float64)
    assert len(candidates) == (105 if B == 2 else 35)
    tr_sigma = float(((D - grad) ** 2).sum()) / n
    assert float(cand.mean()) == pytest.approx(
        tr_sigma / B * (n - B) / (n - 1), rel=1e-12
    )
    opt = NoisyGD(
        model.parameters(),
        lr=0.0,
        noise=kind,
        batch_size=B,
        model=model,
        loss_fn=loss_fn,
        data=(X, y),
        refresh_every=1,
        k=2,
        seed=3,
    )
    seen = []
    for _ in range(6):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        trace_c = opt.stats["reference_sq_norm"]
        assert float((cand - trace_c).abs().min()) <= 1e-12 * trace_c, trace_c
        seen.append(trace_c)
    assert len(set(seen)) > 1  # the partition is redrawn at every refresh


def test_sgd_matched_is_the_same_for_one_batch_or_a_list_of_batches():
    # the weights are drawn for all n samples up front, so splitting the data
    # into batches only changes the summation order (float64 round-off)
    X, y = _design()
    out = []
    for data in ((X, y), [(X[:3], y[:3]), (X[3:], y[3:])]):
        model = _linear()
        opt = NoisyGD(
            model.parameters(),
            lr=1.0,
            noise="sgd_matched",
            batch_size=2,
            model=model,
            loss_fn=nn.MSELoss(),
            data=data,
            seed=4,
        )
        out.append(_draw(opt, model, 3))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_sgd_matched_replays_its_weight_stream():
    # xi = sum_i w_i grad L_i with w = (z - mean z) / sqrt(n B), z the n normals
    # of the weight stream of step t: replayed on explicit per-sample gradients
    B = 2
    opt, model, loss_fn, X, y = _source(B, noise="sgd_matched", noise_scale=1.5)
    D = per_sample_gradients_loop(model, loss_fn, X, y)
    n = D.shape[0]
    samples = _draw(opt, model, 2)
    for t in range(2):
        gen = make_generator(5, t, "cpu", stream=STREAM_WEIGHTS)
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        w = (z - z.mean()) / math.sqrt(n * B)
        torch.testing.assert_close(samples[t], 1.5 * D.T @ w, rtol=1e-12, atol=1e-14)


def test_isotropic_noise_over_mixed_dtypes():
    p32 = torch.zeros(4, requires_grad=True)
    p64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = NoisyGD([p32, p64], lr=1.0, noise="isotropic", noise_scale=1.0)
    p32.grad, p64.grad = torch.zeros_like(p32), torch.zeros_like(p64)
    opt.step()
    assert p32.dtype == torch.float32 and p64.dtype == torch.float64
    assert (p32 != 0).all() and (p64 != 0).all()
    assert opt.stats["target_sq_norm"] == 7.0


def test_isotropic_buckets_draw_from_their_own_streams():
    # one draw per (device, dtype) bucket, bucket b from stream b of step t:
    # replayed here, bit for bit (lr = 1, zero gradients: theta moves by -z)
    p32 = torch.zeros(4, requires_grad=True)
    p64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q32 = torch.zeros(2, requires_grad=True)
    opt = NoisyGD([p32, p64, q32], lr=1.0, noise="isotropic", seed=9)
    for t in range(2):
        for p in (p32, p64, q32):
            p.grad = torch.zeros_like(p)
            p.detach().zero_()
        opt.step()
        z32 = torch.randn(6, generator=make_generator(9, t, "cpu", stream=0))
        z64 = torch.randn(
            3, generator=make_generator(9, t, "cpu", stream=1), dtype=torch.float64
        )
        assert torch.equal(p32.detach(), -z32[:4])
        assert torch.equal(q32.detach(), -z32[4:])
        assert torch.equal(p64.detach(), -z64)


def test_magnitude_unit_and_raw():
    opt, model, loss_fn, X, y = _source(1, noise="hessian", k=2, magnitude="unit")
    _draw(opt, model, 1)
    assert opt.stats["target_sq_norm"] == pytest.approx(1.0, rel=1e-12)
    opt, model, loss_fn, X, y = _source(None, noise="hessian", k=2, magnitude="raw")
    _draw(opt, model, 1)
    # top-2 of diag(2, 2, 8, 18): 8 + 18 (Lanczos tol 1e-3 on exact eigenvalues)
    assert opt.stats["target_sq_norm"] == pytest.approx(26.0, rel=1e-5)


def test_k_larger_than_p_uses_the_whole_spectrum():
    opt, model, *_ = _source(None, noise="hessian", k=20, magnitude="raw")
    _draw(opt, model, 1)
    # all of diag(2, 2, 8, 18); a full Krylov space is exact up to round-off
    assert opt.stats["target_sq_norm"] == pytest.approx(30.0, rel=1e-9)


def test_top_eigvec_solves_for_one_eigenpair_only():
    # rank one: the refresh asks the eigensolver for the top pair alone, not k
    opt, model, *_ = _source(1, noise="top_eigvec", k=3)
    _draw(opt, model, 1)
    assert opt._cache["eigenvalues"].shape == (1,)
    assert opt._cache["eigenvectors"].shape == (4, 1)
    # the top of diag(2, 2, 8, 18), e_w3 up to sign (Lanczos tol 1e-3)
    assert float(opt._cache["eigenvalues"][0]) == pytest.approx(18.0, rel=1e-5)


def test_negative_curvature_is_clamped_and_counted_never_nan():
    X, y = _design()
    model = _linear()

    def loss_fn(out, target):  # concave: every Hessian eigenvalue is negative
        return -((out - target) ** 2).mean()

    opt = NoisyGD(
        model.parameters(),
        lr=1.0,
        noise="hessian",
        k=2,
        batch_size=1,
        model=model,
        loss_fn=loss_fn,
        data=(X, y),
        loss_reduction="mean",
    )
    samples = _draw(opt, model, 2)
    assert opt.stats["clamped_negative"] == 2
    assert opt.stats["clamped_negative_total"] == 2
    assert torch.equal(samples, torch.zeros_like(samples))
    assert opt.stats["target_sq_norm"] == 0.0


def test_refresh_cadence_and_hvp_accounting():
    opt, model, *_ = _source(1, noise="hessian", k=2, noise_scale=1.0)
    opt.refresh_every = 3
    counts = []
    for _ in range(7):  # refreshes at steps 0, 3, 6
        _draw(opt, model, 1)
        counts.append(opt.stats["n_refresh"])
    assert counts == [1, 1, 1, 2, 2, 2, 3]
    assert opt.stats["n_hvp"] > 0
    assert opt.stats["hvp_per_step"] == pytest.approx(opt.stats["n_hvp"] / 7)


def _classifier_noisy_gd(model, X, y, **kw):
    """NoisyGD on a full-batch cross-entropy source, mini-batches of 3."""
    return NoisyGD(
        model.parameters(),
        batch_size=3,
        refresh_every=2,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        data=(X, y),
        **kw,
    )


def _train(model, opt, X, y, steps):
    """Full-batch cross-entropy steps with ``opt``."""
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def _spy_eigensolves(monkeypatch):
    """Record ``(v0, result)`` of every eigensolve of NoisyGD's refresh."""
    from geoopt_sgd.optim import _noise_source

    calls = []
    real = _noise_source.top_eigenpairs

    def spy(op, k, **kw):
        res = real(op, k, **kw)
        calls.append((kw.get("v0"), res))
        return res

    monkeypatch.setattr(_noise_source, "top_eigenpairs", spy)
    return calls


HESSIAN_NOISE = {"lr": 0.05, "noise": "hessian", "noise_scale": 0.1, "seed": 1}


def test_refresh_warm_starts_from_the_eigenvectors_and_the_guards(monkeypatch):
    # each refresh after the first starts from the last one's eigenvectors and
    # its guards' Ritz vectors (the block warm start needs both), exactly
    calls = _spy_eigensolves(monkeypatch)
    X, y = make_data(n=12)
    model = mlp()
    opt = _classifier_noisy_gd(model, X, y, k=3, **HESSIAN_NOISE)
    _train(model, opt, X, y, 5)
    assert len(calls) == 3 and calls[0][0] is None
    for (_, prev), (v0, res) in zip(calls, calls[1:], strict=False):
        assert prev.next_eigenvectors.shape[1] >= 1
        assert torch.equal(v0, prev.warm_start().to(v0.dtype))
        assert not res.verified  # a periodic refresh skips the skip check
    assert torch.equal(opt._cache["guard_vectors"], calls[-1][1].next_eigenvectors)


def test_state_without_guard_vectors_and_a_smaller_k_still_warm_start(monkeypatch):
    # a checkpoint from before the guards were kept (no "guard_vectors") resumes
    # with the eigenvectors alone; a smaller k takes the first k of them
    X, y = make_data(n=12)
    model = mlp()
    opt = _classifier_noisy_gd(model, X, y, k=3, **HESSIAN_NOISE)
    _train(model, opt, X, y, 1)
    sd = opt.state_dict()
    sd["noisy_gd"]["cache"].pop("guard_vectors")
    calls = _spy_eigensolves(monkeypatch)
    for k in (3, 2):
        resumed = copy.deepcopy(model)
        ropt = _classifier_noisy_gd(resumed, X, y, k=k, **HESSIAN_NOISE)
        ropt.load_state_dict(copy.deepcopy(sd))
        _train(resumed, ropt, X, y, 2)  # the refresh at step 2
        v0 = calls[-1][0]
        assert torch.equal(v0, sd["noisy_gd"]["cache"]["eigenvectors"][:, :k])
        assert ropt._cache["guard_vectors"].shape[1] >= 1  # kept from now on
        assert ropt._cache["eigenvectors"].shape[1] == k


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_curvature_source_is_side_effect_free(mode):
    # lr = 0: the step leaves theta unchanged, so everything must be as before:
    # params, grads, BatchNorm buffers, module modes and the global RNG
    X, y = image_data(n=12)
    model = tiny_cnn()
    nn.functional.cross_entropy(model(X), y).backward()
    opt = NoisyGD(
        model.parameters(),
        lr=0.0,
        noise="sgd_leading",
        batch_size=3,
        k=2,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        data=(X, y),
        mode=mode,
    )
    before = model_state(model)
    opt.step()
    assert opt.stats["n_refresh"] == 1
    assert_same_state(before, model_state(model))


# -------------------------------------------------------------- resume


def _resume(model, opt, make, *, map_location=None, device="cpu"):
    """Save ``model`` and ``opt`` to bytes, load them (``map_location``) into a
    fresh model on ``device`` and ``make(model)``; return both."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location=map_location, weights_only=True)
    resumed = mlp(seed=123).to(device)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(ckpt["opt"])
    return resumed, resumed_opt


@pytest.mark.parametrize(
    "kind",
    ["isotropic", "diagonal", "hessian", "sgd_matched"],
    ids=lambda k: f"noise={k}",
)
def test_resume_from_state_dict_is_bit_exact(kind):
    X, y = make_data(n=12)

    def make(model):
        return _classifier_noisy_gd(
            model, X, y, lr=0.1, noise=kind, noise_scale=0.05, k=2, seed=7
        )

    ref = mlp()
    ref_opt = make(ref)
    _train(ref, ref_opt, X, y, 5)

    model = mlp()
    opt = make(model)
    _train(model, opt, X, y, 3)
    resumed, resumed_opt = _resume(model, opt, make)
    _train(resumed, resumed_opt, X, y, 2)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_opt.stats["step"] == 5


def test_resume_takes_the_checkpoints_seed():
    # the seed is part of the noise state: a checkpoint loaded into an optimizer
    # built with another seed continues the checkpoint's stream, bit for bit
    X, y = make_data(n=12)

    def make(seed):
        return lambda model: _classifier_noisy_gd(
            model, X, y, lr=0.1, noise="isotropic", noise_scale=0.05, seed=seed
        )

    ref = mlp()
    ref_opt = make(7)(ref)
    _train(ref, ref_opt, X, y, 4)

    model = mlp()
    opt = make(7)(model)
    _train(model, opt, X, y, 2)
    resumed, resumed_opt = _resume(model, opt, make(8))
    assert resumed_opt.seed == 7
    _train(resumed, resumed_opt, X, y, 2)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_plain_sgd_state_dict_loads():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.3)
    opt = NoisyGD(model.parameters(), lr=0.1)
    opt.load_state_dict(sgd.state_dict())
    assert opt.param_groups[0]["lr"] == 0.3


def _refreshing_noisy_gd(model, X, y, **kw):
    """A NoisyGD whose statistics refresh at step 0 and every 10 steps."""
    kw = {"k": 2, "batch_size": 3, **kw}
    return NoisyGD(
        model.parameters(),
        lr=0.1,
        noise_scale=0.05,
        seed=7,
        refresh_every=10,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        data=(X, y),
        **kw,
    )


@pytest.mark.parametrize(
    "saved, now",
    [
        (dict(noise="hessian"), dict(noise="diagonal")),
        (dict(noise="diagonal"), dict(noise="hessian")),
        (dict(noise="hessian", magnitude="raw"), dict(noise="hessian")),
        (dict(noise="hessian", batch_size=3), dict(noise="hessian", batch_size=2)),
        (dict(noise="geometry_aware"), dict(noise="geometry_aware_isotropic")),
    ],
    ids=["hessian-diagonal", "diagonal-hessian", "raw-sgd", "B", "geo-iso"],
)
def test_statistics_cached_under_other_settings_are_refreshed(saved, now):
    # a checkpoint's statistics belong to its noise settings: loaded into an
    # optimizer built with other ones, the next step refreshes them (as a fresh
    # optimizer with those settings would), never samples from the stale ones
    X, y = make_data(n=12)

    def make(model, **kw):
        return _refreshing_noisy_gd(model, X, y, **kw)

    model = mlp()
    opt = make(model, **saved)
    _train(model, opt, X, y, 3)  # refresh at step 0; steps 1, 2 use the cache
    sd = opt.state_dict()
    assert sd["noisy_gd"]["cache"] and sd["noisy_gd"]["stats"]["n_refresh"] == 1
    # the reference: the same checkpoint without its cache
    no_cache = {**sd, "noisy_gd": {**sd["noisy_gd"], "cache": {}}}
    runs = []
    for state in (sd, no_cache):
        resumed = mlp(seed=123)
        resumed.load_state_dict(model.state_dict())
        opt = make(resumed, **now)
        opt.load_state_dict(state)
        _train(resumed, opt, X, y, 2)
        assert opt.stats["n_refresh"] == 2
        runs.append(_flat(resumed))
    assert torch.equal(*runs)


def test_loss_reduction_none_and_the_losss_own_are_the_same_setting():
    # a checkpoint saved with loss_reduction=None (read from the loss: "mean")
    # keeps its statistics in an optimizer built with loss_reduction="mean"
    X, y = make_data(n=12)

    def make(model, reduction):
        return _refreshing_noisy_gd(
            model, X, y, noise="hessian", loss_reduction=reduction
        )

    model = mlp()
    opt = make(model, None)
    _train(model, opt, X, y, 3)
    twin = mlp(seed=123)
    twin.load_state_dict(model.state_dict())
    resumed = make(twin, "mean")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.state_dict()["noisy_gd"]["cache"]  # kept, not dropped
    _train(twin, resumed, X, y, 2)
    assert resumed.stats["n_refresh"] == 1  # no refresh before step 10


@pytest.mark.parametrize("steps_before", [0, 3])
def test_plain_sgd_state_dict_leaves_the_noise_stream_as_it_was(steps_before):
    # a plain state dict carries no noise state: it sets the groups (the lr here)
    # and the optimizer goes on with its own step count and seed, so a fresh one
    # draws the noise of step 0 on and a used one continues its own stream
    X, y = make_data(n=12)
    runs = []
    for load in (False, True):
        model = mlp()
        opt = NoisyGD(
            model.parameters(), lr=0.1, noise="isotropic", noise_scale=0.5, seed=3
        )
        _train(model, opt, X, y, steps_before)
        if load:
            opt.load_state_dict(
                torch.optim.SGD(model.parameters(), lr=0.3).state_dict()
            )
        else:
            opt.param_groups[0]["lr"] = 0.3
        _train(model, opt, X, y, 2)
        assert opt.stats["step"] == steps_before + 2
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(*runs)


def test_plain_state_dict_keeps_the_stats_of_the_steps_taken():
    # the realised ||xi||^2 of the last steps wait unconverted; loading a state
    # dict without a "noisy_gd" entry keeps the step count and must keep them too
    stats = []
    for load in (False, True):
        model = mlp()
        X, y = make_data(n=12)
        opt = NoisyGD(model.parameters(), lr=0.1, noise="isotropic", noise_scale=0.5)
        _train(model, opt, X, y, 3)
        if load:
            plain = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.load_state_dict(plain.state_dict())
        stats.append(dict(opt.stats))
    assert stats[1]["step"] == 3
    assert stats[1]["realised_sq_norm"] > 0
    for key in ("realised_sq_norm", "realised_sq_norm_mean"):
        assert stats[1][key] == stats[0][key]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["diagonal", "hessian"], ids=lambda k: f"noise={k}")
def test_resume_on_cuda_from_a_cpu_mapped_checkpoint(kind):
    # torch.load(map_location="cpu") then load_state_dict on CUDA parameters (timm's
    # resume does this): the cached statistics must follow the parameters, as
    # torch's per-parameter state does, and the run continue exactly
    X, y = make_data(n=12)
    X, y = X.cuda(), y.cuda()

    def make(model):
        return _classifier_noisy_gd(
            model, X, y, lr=0.1, noise=kind, noise_scale=0.05, k=2, seed=7
        )

    ref = mlp().cuda()
    ref_opt = make(ref)
    _train(ref, ref_opt, X, y, 4)
    model = mlp().cuda()
    opt = make(model)
    _train(model, opt, X, y, 3)  # refresh at step 2: step 3 draws from the cache
    resumed, resumed_opt = _resume(model, opt, make, map_location="cpu", device="cuda")
    _train(resumed, resumed_opt, X, y, 1)
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# -------------------------------------------------------------- errors


def _err_kwargs(**kw):
    X, y = make_data(n=12)
    model = mlp()
    base = dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(X, y), batch_size=3)
    base.update(kw)
    return model, base


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (
            dict(noise="gauss"),
            ValueError,
            r"`noise` must be one of 'none', 'isotropic',"
            r" .*'geometry_aware_isotropic'; got 'gauss'",
        ),
        (dict(lr=-1.0), ValueError, r"`lr` must be >= 0; got -1.0"),
        (dict(noise_scale=-0.1), ValueError, r"`noise_scale` must be >= 0; got -0.1"),
        (dict(refresh_every=0), ValueError, r"`refresh_every` must be >= 1; got 0"),
        (dict(refresh_every=1.5), TypeError, r"`refresh_every` must be an integer"),
        (dict(k=0), ValueError, r"`k` must be >= 1; got 0"),
        (dict(batch_size=0), ValueError, r"`batch_size` must be >= 1; got 0"),
        (
            dict(curvature="fisher"),
            ValueError,
            r"`curvature` must be one of 'hessian', 'ggn'; got 'fisher'",
        ),
        (
            dict(noise_units="lr"),
            ValueError,
            r"`noise_units` must be one of 'grad', 'param'; got 'lr'",
        ),
        (dict(seed=-1), ValueError, r"`seed` must be >= 0; got -1"),
        (dict(weight_decay=-1.0), ValueError, r"`weight_decay` must be >= 0; got -1.0"),
        (
            dict(magnitude="big"),
            ValueError,
            r"`magnitude` must be one of 'sgd', 'unit', 'raw'; got 'big'",
        ),
        (dict(num_batches=1), ValueError, r"`num_batches` must be >= 2; got 1"),
        (dict(mode="test"), ValueError, r"`mode` must be one of 'eval', 'train'"),
        (
            dict(loss_reduction="none"),
            ValueError,
            r"`loss_reduction` must be one of 'mean', 'sum', None; got 'none'",
        ),
        (dict(tol=0.0), ValueError, r"`tol` must be > 0; got 0.0"),
        (dict(noise_schedule=2.0), TypeError, r"`noise_schedule` must be a callable"),
        (
            dict(noise="hessian", model=None),
            ValueError,
            r"noise='hessian' needs a curvature source: pass `model`, `loss_fn` and "
            r"`data` \(missing: `model`\)",
        ),
        (
            dict(noise="diagonal", loss_fn=None, data=None),
            ValueError,
            r"\(missing: `loss_fn`, `data`\)",
        ),
        (
            dict(noise="sgd_matched", batch_size=None),
            ValueError,
            r"noise='sgd_matched' needs `batch_size`, the SGD batch size B",
        ),
    ],
    ids=lambda v: None,
)
def test_invalid_arguments(kw, exc, match):
    model, base = _err_kwargs(**kw)
    with pytest.raises(exc, match=match):
        NoisyGD(model.parameters(), **base)


def test_too_few_minibatches_raises_with_the_fix():
    X, y = make_data(n=5)
    model = mlp()
    opt = NoisyGD(
        model.parameters(),
        noise="diagonal",
        batch_size=3,
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        data=(X, y),
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(
        ValueError,
        match=r"holds only 1 of them; pass more data or a "
        r"smaller batch_size",
    ):
        opt.step()


def test_params_outside_the_model_raise():
    X, y = make_data(n=12)
    opt = NoisyGD(
        [torch.zeros(3, requires_grad=True)],
        noise="diagonal",
        batch_size=3,
        model=mlp(),
        loss_fn=nn.CrossEntropyLoss(),
        data=(X, y),
    )
    opt.param_groups[0]["params"][0].grad = torch.zeros(3)
    with pytest.raises(ValueError, match=r"`params` must hold parameters of `model`"):
        opt.step()


def test_finite_check_is_exact_when_the_sum_overflows():
    # the refresh's check sums each tensor first; a finite tensor whose float32
    # sum overflows must still count as finite (then every element is checked)
    from geoopt_sgd.optim._noise_source import _all_finite

    big = torch.full((4,), 3e38)
    assert not bool(torch.isfinite(big.sum()))
    assert _all_finite([big, torch.ones(2, dtype=torch.float64)])
    assert not _all_finite([big, torch.tensor([1.0, math.inf])])
    assert not _all_finite([torch.tensor([math.nan, 1.0])])
    assert _all_finite([torch.tensor([2**62, 2**62])])  # integers are skipped
