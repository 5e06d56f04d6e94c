"""timm registry integration (issue #4 section 3)."""

import logging
import sys

import pytest
import torch
from torch import nn

from geoopt_sgd import NoisyGD, ProbedSGD
from geoopt_sgd.optim import register_timm_optimizers
from geoopt_sgd.optim.registry import TIMM_NAMES

timm_optim = pytest.importorskip("timm.optim")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()


def _grads(model):
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_register_and_create_probed_sgd():
    assert register_timm_optimizers() == TIMM_NAMES == ("probedsgd", "noisygd")
    assert set(TIMM_NAMES) <= set(timm_optim.list_optimizers())
    model = _model()
    opt = timm_optim.create_optimizer_v2(
        model, "probedsgd", lr=0.1, momentum=0.0, weight_decay=1e-2
    )
    assert type(opt) is ProbedSGD
    # timm's grouping: no weight decay on biases and norm parameters
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-2]
    assert all(not g["nesterov"] and g["momentum"] == 0.0 for g in opt.param_groups)

    # the same groups through torch SGD give the same step, bit for bit
    ref_model = _model()
    ref = timm_optim.create_optimizer_v2(
        ref_model, "momentum", lr=0.1, momentum=0.0, weight_decay=1e-2
    )
    assert type(ref) is torch.optim.SGD
    for m, o in ((model, opt), (ref_model, ref)):
        _grads(m)
        o.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_timm_defaults_momentum_and_sgd_is_nesterov():
    register_timm_optimizers()
    # timm passes momentum=0.9 unless told otherwise (documented pitfall)
    opt = timm_optim.create_optimizer_v2(_model(), "probedsgd", lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["nesterov"] is False
    # timm's own "sgd" is Nesterov SGD
    sgd = timm_optim.create_optimizer_v2(_model(), "sgd", lr=0.1)
    assert sgd.param_groups[0]["nesterov"] is True


def test_create_noisy_gd():
    register_timm_optimizers()
    opt = timm_optim.create_optimizer_v2(
        _model(), "noisygd", lr=0.1, noise="isotropic", noise_scale=1e-3, seed=3
    )
    assert type(opt) is NoisyGD
    assert opt.noise == "isotropic" and opt.seed == 3
    assert "momentum" not in opt.defaults


def test_lookahead_prefix():
    register_timm_optimizers()
    opt = timm_optim.create_optimizer_v2(
        _model(), "lookahead_probedsgd", lr=0.1, momentum=0.0
    )
    assert type(opt).__name__ == "Lookahead"
    assert type(opt._base_optimizer) is ProbedSGD


def test_underscore_names_would_be_misparsed():
    # why the names have no underscore: timm keeps only the part after the last
    # "_", so "probed_sgd" silently means timm's Nesterov "sgd"
    opt = timm_optim.create_optimizer_v2(_model(), "probed_sgd", lr=0.1)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["nesterov"]


def test_register_twice_is_silent(caplog):
    register_timm_optimizers()
    with caplog.at_level(logging.WARNING):
        register_timm_optimizers()
    assert "already registered" not in caplog.text


def test_custom_registry():
    registry = timm_optim.OptimizerRegistry()
    register_timm_optimizers(registry)
    assert sorted(registry.list_optimizers()) == sorted(TIMM_NAMES)
    opt = registry.create_optimizer(_model(), "probedsgd", lr=0.1, momentum=0.0)
    assert type(opt) is ProbedSGD


def test_bad_registry():
    with pytest.raises(
        TypeError,
        match=r"`registry` must be a timm\.optim\.OptimizerRegistry or None; got dict",
    ):
        register_timm_optimizers({})


def test_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    with pytest.raises(ImportError, match=r"register_timm_optimizers needs timm"):
        register_timm_optimizers()
