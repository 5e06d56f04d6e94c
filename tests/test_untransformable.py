"""A model whose forward torch.func cannot transform gets a clear error.

Per-sample gradients, the probes and the ``fwd_rev``/``rev_rev`` HVP routes
run the model under ``torch.func`` (``grad``, ``jvp``, ``vmap``). A packed
sequence, ``.item()`` control flow or a random draw in ``forward`` makes torch
raise from deep inside a transform ("Cannot access data pointer of Tensor that
doesn't have storage"); the package names the cause and the route that works.
The user's own errors in ``forward`` pass through unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geoopt_sgd import (
    GGNOperator,
    HessianOperator,
    noise_geometry,
    per_sample_gradients,
    top_eigenpairs,
)
from tests.cases import PackedGRUNet

SUM = nn.CrossEntropyLoss(reduction="sum")


class ItemNet(nn.Module):
    """Branches on ``.item()`` of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return h if h.abs().max().item() < 1e6 else h / 2


class ShapeBugNet(nn.Module):
    """A user error: the head expects 5 features, the body makes 4."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lin(x))


def packed_batch():
    torch.manual_seed(0)
    model = PackedGRUNet(0.0).double()
    X = torch.randn(6, 3, 4, dtype=torch.float64)
    return model, X, torch.randint(0, 2, (6,))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(
    "call",
    [
        lambda m, X, y: per_sample_gradients(m, SUM, X, y),
        lambda m, X, y: noise_geometry(m, SUM, (X, y), k=2, route="exact"),
        lambda m, X, y: noise_geometry(m, SUM, (X, y), k=2, route="sketch"),
        lambda m, X, y: HessianOperator(m, SUM, (X, y), method="fwd_rev").to_dense(),
        lambda m, X, y: HessianOperator(m, SUM, (X, y), method="rev_rev").to_dense(),
    ],
    ids=["per_sample", "ng_exact", "ng_sketch", "fwd_rev", "rev_rev"],
)
def test_packed_sequence_gets_a_clear_error(call):
    model, X, y = packed_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="torch.func's transforms") as info:
        call(model, X, y)
    msg = str(info.value)
    assert "pack_padded_sequence" in msg and "double_backward" in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error kept
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_packed_sequence_runs_on_the_transform_free_routes():
    # what the message recommends works: H v against plain autograd (double
    # backward of the model's own loss, written out here), and the GGN's solve
    model, X, y = packed_batch()
    H = HessianOperator(model, SUM, (X, y))
    params = [p for p in model.parameters()]
    g = torch.autograd.grad(SUM(model.eval()(X), y), params, create_graph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=gen, dtype=torch.float64)
        vs = torch.split(v, [p.numel() for p in params])
        dot = sum(
            (gi * vi.reshape(gi.shape)).sum() for gi, vi in zip(g, vs, strict=True)
        )
        Hv = torch.cat(
            [h.reshape(-1) for h in torch.autograd.grad(dot, params, retain_graph=True)]
        )
        torch.testing.assert_close(H.matvec(v), Hv, rtol=1e-10, atol=1e-12)
    G = GGNOperator(model, SUM, (X, y))
    assert top_eigenpairs(G, k=2).converged


def test_item_control_flow_gets_a_clear_error():
    torch.manual_seed(0)
    model = ItemNet().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match=r"torch.func's transforms.*\.item\(\)"):
        per_sample_gradients(model, SUM, X, y)


@pytest.mark.parametrize("method", ["fwd_rev", "rev_rev", "double_backward"])
def test_a_users_own_error_passes_through(method):
    model = ShapeBugNet().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError) as info:
        HessianOperator(model, SUM, (X, y), method=method).to_dense()
    assert "torch.func's transforms" not in str(info.value)
    assert "shapes cannot be multiplied" in str(info.value)
    with pytest.raises(RuntimeError) as info:
        per_sample_gradients(model, SUM, X, y)
    assert "torch.func's transforms" not in str(info.value)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_noise_probe_refuses_it_at_construction():
    # not at the first probe, inside the user's training loop
    from geoopt_sgd import NoiseProbe

    model, X, y = packed_batch()
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="pack_padded_sequence"):
        NoiseProbe(model, SUM, (X, y), every=1, k=2)
    with pytest.raises(RuntimeError, match="pack_padded_sequence"):
        NoiseProbe(model, SUM, [(X[:3], y[:3]), (X[3:], y[3:])], every=1, k=2)
    assert torch.equal(rng, torch.get_rng_state())


def test_noise_probe_construction_leaves_rng_and_model_alone():
    # the construction check runs the model on two samples: nothing moves
    from geoopt_sgd import NoiseProbe

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5), nn.Linear(3, 2)
    )
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    NoiseProbe(model, SUM, (X, y), every=1, k=2, mode="train")
    NoiseProbe(model, SUM, (X, y), every=1, k=2)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class StorageMessageNet(nn.Module):
    """A user's own error whose message happens to read like torch.func's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        raise RuntimeError("my_kernel: this tensor doesn't have storage yet")


def test_a_users_storage_error_outside_the_transforms_passes_through():
    # "doesn't have storage" is a transform's refusal only when it is raised
    # on transformed parameters; the transform-free route passes it as it is
    model = StorageMessageNet().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError) as info:
        HessianOperator(model, SUM, (X, y), method="double_backward").to_dense()
    assert type(info.value) is RuntimeError
    assert "torch.func's transforms" not in str(info.value)


class OwnVmapItemNet(nn.Module):
    """A user error: its own ``vmap`` calls ``.item()`` (fails in training too)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)
        return torch.func.vmap(lambda r: r / r.abs().max().item())(h)


@pytest.mark.parametrize("op", [HessianOperator, GGNOperator])
def test_a_vmap_error_outside_the_package_transforms_passes_through(op):
    # the default route runs no transform: the model's own vmap refusal is
    # its bug (a plain forward raises it too), not one of the package's routes
    model = OwnVmapItemNet().double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match=r"^vmap: .*\.item\(\)") as info:
        op(model, SUM, (X, y)).to_dense()
    assert type(info.value) is RuntimeError


def test_noise_probe_keeps_a_model_the_sketch_route_runs():
    # `.item()` on the batch's activations fails only under vmap over samples
    # (per-sample gradients, the exact route); the sketch route's vjp and
    # vmapped jvp of the batch forward run it, so route="sketch" is not refused
    from geoopt_sgd import NoiseProbe

    torch.manual_seed(0)
    model = ItemNet().double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    with pytest.raises(RuntimeError, match=r"torch.func's transforms.*\.item\(\)"):
        NoiseProbe(model, SUM, (X, y), k=2, route="exact")
    bn = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5), model).double()
    bn[0].running_mean.fill_(0.3)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    rng = torch.get_rng_state()
    NoiseProbe(bn, SUM, (X, y), k=2, route="sketch")  # the check's second pass
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, state[k]) for k, v in bn.state_dict().items())
    assert bn.training and all(p.grad is None for p in bn.parameters())
    probe = NoiseProbe(model, SUM, (X, y), k=2, route="sketch", num_probes=3)
    ref = noise_geometry(model, SUM, (X, y), k=2, route="sketch", num_probes=3, seed=0)
    rec = probe.measure()
    assert rec["route"] == "sketch"
    assert rec["tr_sigma"] == pytest.approx(ref.values["tr_sigma"], rel=1e-10)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_noise_probe_refuses_a_packed_sequence_on_the_sketch_route_too():
    from geoopt_sgd import NoiseProbe

    model, X, y = packed_batch()
    with pytest.raises(RuntimeError, match="pack_padded_sequence"):
        NoiseProbe(model, SUM, (X, y), every=1, k=2, route="sketch")


def test_noise_probe_refuses_it_where_auto_picks_the_exact_route(monkeypatch):
    # route="auto" (the default) takes the exact route on this small model,
    # whose per-sample gradients fail: refused at construction, not at the
    # first probe inside the training loop
    from geoopt_sgd import NoiseProbe
    from geoopt_sgd.probes import metrics

    torch.manual_seed(0)
    model = ItemNet().double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=r"torch.func's transforms.*\.item\(\)"):
        NoiseProbe(model, SUM, (X, y), k=2)
    with pytest.raises(RuntimeError, match=r"torch.func's transforms.*\.item\(\)"):
        NoiseProbe(model, SUM, [(X[:4], y[:4]), (X[4:], y[4:])], k=2, route="auto")
    assert torch.equal(rng, torch.get_rng_state())
    # where "auto" picks the sketch route (here: a smaller exact budget), it runs
    monkeypatch.setattr(metrics, "_EXACT_MAX", 1)
    probe = NoiseProbe(model, SUM, (X, y), k=2, num_probes=3)
    assert probe.measure()["route"] == "sketch"
