import cases
import pytest
import torch
from torch import nn

from geoopt_sgd import per_sample_gradients
from geoopt_sgd.testing import per_sample_gradients_loop

# float64 throughout: vmap(grad) and the loop run the same arithmetic in a
# different order, so they agree to a few ulps of the gradient's magnitude.
ATOL = 1e-12


def _case(name):
    return cases.problem(name)


@pytest.mark.parametrize("chunk_size", [None, 1, 5], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("name", ["mlp-ce", "mlp-mse", "linear-mse", "cnn-ce"])
def test_matches_loop_eval(name, chunk_size):
    model, loss_fn, X, y = _case(name)
    before = cases.model_state(model)
    got = per_sample_gradients(model, loss_fn, X, y, chunk_size=chunk_size)
    cases.assert_same_state(before, cases.model_state(model))
    ref = per_sample_gradients_loop(model, loss_fn, X, y)
    P = sum(p.numel() for p in model.parameters())
    assert got.shape == (y.shape[0], P)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_loop_train_mode_batchnorm(chunk_size):
    # train mode: BatchNorm batch statistics couple the samples; row i is the
    # gradient of sample i's loss in the batch forward pass.
    model, loss_fn, X, y = _case("cnn-ce")
    before = cases.model_state(model)
    got = per_sample_gradients(
        model, loss_fn, X, y, mode="train", chunk_size=chunk_size
    )
    cases.assert_same_state(before, cases.model_state(model))
    ref = per_sample_gradients_loop(model, loss_fn, X, y, mode="train")
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    # and it differs from eval mode (non-trivial running statistics)
    ev = per_sample_gradients(model, loss_fn, X, y)
    assert (got - ev).abs().max() > 1e-3


def test_rows_sum_to_batch_gradient():
    # mean reduction: the batch gradient is the mean of the per-sample rows
    model, loss_fn, X, y = _case("mlp-ce")
    G = per_sample_gradients(model, loss_fn, X, y)
    loss_fn(model(X), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(G.mean(0), g, rtol=0, atol=ATOL)


def test_params_subset_by_name_and_tensor():
    model, loss_fn, X, y = _case("mlp-ce")
    full = per_sample_gradients(model, loss_fn, X, y)
    last = per_sample_gradients(model, loss_fn, X, y, params=["2.weight", "2.bias"])
    n_last = model[2].weight.numel() + model[2].bias.numel()
    torch.testing.assert_close(last, full[:, -n_last:], rtol=0, atol=ATOL)
    by_tensor = per_sample_gradients(model, loss_fn, X, y, params=[model[0].weight])
    torch.testing.assert_close(
        by_tensor, full[:, : model[0].weight.numel()], rtol=0, atol=ATOL
    )


def test_closed_form_linear_square_loss():
    # nn.MSELoss on a batch of one with K outputs: grad = (2/K) r_i x_i^T
    torch.manual_seed(0)
    lin = nn.Linear(4, 2, bias=False).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    r = lin(X).detach() - y
    expected = (2 / 2) * torch.einsum("ik,id->ikd", r, X).reshape(5, -1)
    got = per_sample_gradients(lin, nn.MSELoss(), X, y)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def test_errors():
    model, loss_fn, X, y = _case("mlp-ce")
    with pytest.raises(ValueError, match="`chunk_size` must be >= 1; got 0"):
        per_sample_gradients(model, loss_fn, X, y, chunk_size=0)
    with pytest.raises(TypeError, match="`chunk_size` must be an integer; got float"):
        per_sample_gradients(model, loss_fn, X, y, chunk_size=2.0)
    with pytest.raises(ValueError, match="`mode` must be one of 'eval', 'train'"):
        per_sample_gradients(model, loss_fn, X, y, mode="test")
    with pytest.raises(ValueError, match="`targets` is empty"):
        per_sample_gradients(model, loss_fn, X[:0], y[:0])


@pytest.mark.parametrize(
    "net", [
        cases.AttentionNet,
        cases.InlineDropNet,
        cases.LSTMNet,
        cases.SDPANet,
        cases.SDPAPositionalNet,
    ],
    ids=lambda c: c.__name__,
)  # fmt: skip
def test_train_mode_turns_functional_dropout_off(net):
    # dropout without a Dropout submodule (nn.MultiheadAttention's, F.dropout
    # in a forward, between an LSTM's layers): in train mode it must be off
    # too, leaving the global RNG alone; noise_geometry raised a vmap
    # randomness error before.
    from geoopt_sgd import noise_geometry

    model, plain, X, y = cases.dropout_twins(net)
    loss_fn = nn.CrossEntropyLoss()
    rng = torch.get_rng_state()
    G = per_sample_gradients(model, loss_fn, X, y, mode="train")
    ng = noise_geometry(model, loss_fn, (X, y), mode="train", k=2, metrics=["tr_sigma"])
    assert torch.equal(rng, torch.get_rng_state())
    G_ref = per_sample_gradients(plain, loss_fn, X, y, mode="train")
    torch.testing.assert_close(G, G_ref, rtol=1e-12, atol=1e-12)
    ref = noise_geometry(
        plain, loss_fn, (X, y), mode="train", k=2, metrics=["tr_sigma"]
    )
    assert ng.values["tr_sigma"] == pytest.approx(ref.values["tr_sigma"], rel=1e-12)


def test_batchnorm_without_running_stats_couples_samples_in_eval_mode():
    # BatchNorm(track_running_stats=False) normalises with the batch's
    # statistics in eval mode too: the rows must be gradients of L_i in the
    # batch forward (their mean the batch gradient), not on batches of one (audit)
    from geoopt_sgd import HessianOperator, noise_geometry

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    X = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    out = model.eval()(X)
    per = nn.functional.cross_entropy(out, y, reduction="none")
    params = list(model.parameters())
    ref = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(per[i], params, retain_graph=True)
                ]
            )
            for i in range(6)
        ]
    ).detach()
    G = per_sample_gradients(model, loss_fn, X, y)
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    grad = HessianOperator(model, loss_fn, (X, y)).gradient()
    torch.testing.assert_close(G.mean(0), grad, rtol=1e-10, atol=1e-12)
    ng = noise_geometry(
        model, loss_fn, (X, y), k=2, metrics=["tr_sigma"], route="exact"
    )
    tr_sigma = torch.cov(ref.T, correction=0).trace().item()
    assert ng.values["tr_sigma"] == pytest.approx(tr_sigma, rel=1e-10)


class _Optional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, mask=None, scale=1.0):
        out = self.lin(x) * scale
        return out if mask is None else out * mask


@pytest.mark.parametrize(
    "make",
    [
        lambda X: (X, None, 2.0),
        lambda X: {"x": X, "mask": None, "scale": torch.tensor(2.0)},
    ],
    ids=["tuple-None-float", "dict-None-0dim"],
)
def test_non_tensor_and_0dim_inputs_are_kept(make):
    # entries without a sample dimension (None, a float, a 0-dim tensor) are
    # passed as they are, as the operators do; vmap raised on them (audit)
    from geoopt_sgd import noise_geometry

    torch.manual_seed(0)
    model = _Optional().double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    ref = []
    for i in range(5):
        model.zero_grad()
        loss_fn(model(X[i : i + 1], scale=2.0), y[i : i + 1]).backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    ref = torch.stack(ref)
    G = per_sample_gradients(model, loss_fn, make(X), y, chunk_size=2)
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-12)
    ng = noise_geometry(
        model,
        loss_fn,
        (make(X), y),
        k=2,
        metrics=["tr_sigma"],
        route="exact",
        max_samples=4,
    )
    tr_sigma = torch.cov(ref[:4].T, correction=0).trace().item()
    assert ng.values["tr_sigma"] == pytest.approx(tr_sigma, rel=1e-10)


def _loop_rows(model, loss_fn, X, y):
    # explicit loop: the gradient of loss_fn on each batch of one
    rows = []
    for i in range(y.shape[0]):
        loss = loss_fn(model(X[i : i + 1]), y[i : i + 1]).reshape(())
        g = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_class_weighted_cross_entropy_without_mean_carries_the_weight(reduction):
    # only reduction="mean" divides by the summed weights (refused); with
    # "none" or "sum" row i is w[y_i] times the unweighted sample gradient
    model, _, X, y = _case("mlp-ce")
    w = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(weight=w, reduction=reduction)
    got = per_sample_gradients(model, loss_fn, X, y)
    ref = _loop_rows(model, loss_fn, X, y)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    plain = _loop_rows(model, nn.CrossEntropyLoss(), X, y)
    torch.testing.assert_close(got, w[y].unsqueeze(1) * plain, rtol=0, atol=ATOL)


def test_probe_weighted_gradient_over_batches_of_different_sizes():
    # grad sum_i c_i L_i over several probe batches: each batch takes its own
    # slice of the weights (sizes 2, 3, 5), one weighting or several
    from geoopt_sgd._model import FunctionalModel
    from geoopt_sgd.probes.primitives import ProbeSet

    model, loss_fn, X, y = _case("mlp-ce")
    cuts = [0, 2, 5, 10]
    batches = [(X[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    probe = ProbeSet(FunctionalModel(model), loss_fn, batches)
    rows = _loop_rows(model, loss_fn, X[:10], y[:10])
    C = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(
        probe.weighted_gradient(C[:, 0]), C[:, 0] @ rows, rtol=1e-12, atol=ATOL
    )
    torch.testing.assert_close(
        probe.weighted_gradient(C), C.T @ rows, rtol=1e-12, atol=ATOL
    )
