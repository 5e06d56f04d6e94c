"""Bad inputs to the public API: a clear error naming the argument, no side effects.

Each row calls a public entry point (NoisyGD, ProbedSGD, CyclicLRWrapper,
cyclic_lr, NoiseProbe, noise_geometry, per_sample_gradients, the curvature
operators, sharpness, the eigensolvers and spectral_density) with one mistake
and gives the exception type and a substring of the message that names the
argument. After each row the model's parameters, every optimizer's
``state_dict()`` and torch's global RNG state must be bit-identical to what
they were before the call.
"""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from geoopt_sgd import (
    CyclicLRWrapper,
    DenseOperator,
    GGNOperator,
    HalfSquaredError,
    HessianOperator,
    NoiseProbe,
    NoisyGD,
    ProbedSGD,
    cyclic_lr,
    expected_sharpness,
    noise_geometry,
    per_sample_gradients,
    sharpness,
    spectral_density,
    top_eigenpairs,
)

NAN, INF = math.nan, math.inf


class Env:
    """A small model with gradients, and one optimizer of each kind on it."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.X = torch.randn(16, 3, generator=g)
        self.y = torch.randn(16, 2, generator=g)
        self.w = self.model[0].weight
        self.b = self.model[0].bias
        self.loss_fn = nn.MSELoss()
        self.data = (self.X, self.y)
        self.noisy = NoisyGD(
            self.model.parameters(), lr=0.1, noise="isotropic", noise_scale=1e-3
        )
        self.probed = ProbedSGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.cyclic = CyclicLRWrapper(
            torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9),
            base_lr=0.01,
            max_lr=0.1,
            step_size_up=2,
        )
        for opt in (self.noisy, self.probed, self.cyclic):
            self.grad()
            opt.step()
        self.grad()

    def params(self):
        return list(self.model.parameters())

    def grad(self):
        self.model.zero_grad()
        self.loss_fn(self.model(self.X), self.y).backward()

    def noisy_gd(self, **kw):
        """A NoisyGD over the model with a curvature source, overridden by kw."""
        args = dict(
            lr=0.1,
            noise="hessian",
            magnitude="raw",
            k=2,
            model=self.model,
            loss_fn=self.loss_fn,
            data=self.data,
        )
        args.update(kw)
        return NoisyGD(self.params(), **args)

    def wrapper(self, **kw):
        args = dict(base_lr=0.01, max_lr=0.1, step_size_up=2)
        args.update(kw)
        return CyclicLRWrapper(torch.optim.SGD(self.params(), lr=0.1), **args)


def _inf_loss(out, target):
    return ((out - target) ** 2).mean() * INF


def _step(opt):
    opt.step()


def _sparse():
    return torch.ones(3).to_sparse().requires_grad_()


# (id, call, exception type, substring naming the argument)
ROWS = [
    # ---------------------------------------------------------------- NoisyGD
    ("noisy/lr<0", lambda e: NoisyGD(e.params(), lr=-1.0), ValueError, "`lr`"),
    ("noisy/lr-nan", lambda e: NoisyGD(e.params(), lr=NAN), ValueError, "`lr`"),
    ("noisy/lr-str", lambda e: NoisyGD(e.params(), lr="0.1"), TypeError, "`lr`"),
    (
        "noisy/lr-2-tensor",
        lambda e: NoisyGD(e.params(), lr=torch.ones(2)),
        ValueError,
        "`lr`",
    ),
    (
        "noisy/noise",
        lambda e: NoisyGD(e.params(), noise="gauss"),
        ValueError,
        "`noise`",
    ),
    (
        "noisy/noise_scale<0",
        lambda e: NoisyGD(e.params(), noise_scale=-1.0),
        ValueError,
        "`noise_scale`",
    ),
    (
        "noisy/noise_scale-inf",
        lambda e: NoisyGD(e.params(), noise_scale=INF),
        ValueError,
        "`noise_scale`",
    ),
    (
        "noisy/batch_size=0",
        lambda e: NoisyGD(e.params(), batch_size=0),
        ValueError,
        "`batch_size`",
    ),
    (
        "noisy/batch_size-float",
        lambda e: NoisyGD(e.params(), batch_size=2.5),
        TypeError,
        "`batch_size`",
    ),
    ("noisy/k=0", lambda e: NoisyGD(e.params(), k=0), ValueError, "`k`"),
    (
        "noisy/refresh_every=0",
        lambda e: NoisyGD(e.params(), refresh_every=0),
        ValueError,
        "`refresh_every`",
    ),
    (
        "noisy/curvature",
        lambda e: NoisyGD(e.params(), curvature="fisher"),
        ValueError,
        "`curvature`",
    ),
    (
        "noisy/noise_units",
        lambda e: NoisyGD(e.params(), noise_units="lr"),
        ValueError,
        "`noise_units`",
    ),
    ("noisy/seed<0", lambda e: NoisyGD(e.params(), seed=-1), ValueError, "`seed`"),
    ("noisy/seed-float", lambda e: NoisyGD(e.params(), seed=1.0), TypeError, "`seed`"),
    (
        "noisy/weight_decay<0",
        lambda e: NoisyGD(e.params(), weight_decay=-0.1),
        ValueError,
        "`weight_decay`",
    ),
    (
        "noisy/magnitude",
        lambda e: NoisyGD(e.params(), magnitude="big"),
        ValueError,
        "`magnitude`",
    ),
    (
        "noisy/num_batches=1",
        lambda e: NoisyGD(e.params(), num_batches=1),
        ValueError,
        "`num_batches`",
    ),
    ("noisy/mode", lambda e: NoisyGD(e.params(), mode="test"), ValueError, "`mode`"),
    (
        "noisy/loss_reduction",
        lambda e: NoisyGD(e.params(), loss_reduction="none"),
        ValueError,
        "`loss_reduction`",
    ),
    ("noisy/tol=0", lambda e: NoisyGD(e.params(), tol=0.0), ValueError, "`tol`"),
    (
        "noisy/noise_schedule-not-callable",
        lambda e: NoisyGD(e.params(), noise_schedule=0.5),
        TypeError,
        "`noise_schedule`",
    ),
    (
        "noisy/missing-model",
        lambda e: e.noisy_gd(model=None),
        ValueError,
        "`model`",
    ),
    (
        "noisy/missing-data",
        lambda e: e.noisy_gd(data=None),
        ValueError,
        "`data`",
    ),
    (
        "noisy/missing-batch_size",
        lambda e: e.noisy_gd(noise="diagonal"),
        ValueError,
        "`batch_size`",
    ),
    (
        "noisy/loss_fn-reduction-none",
        lambda e: e.noisy_gd(loss_fn=nn.MSELoss(reduction="none")),
        ValueError,
        "`loss_fn`",
    ),
    (
        "noisy/loss_fn-not-callable",
        lambda e: e.noisy_gd(loss_fn="mse"),
        TypeError,
        "`loss_fn`",
    ),
    (
        "noisy/params-repeated",
        lambda e: NoisyGD([e.w, e.w], lr=0.1),
        ValueError,
        "`params`",
    ),
    (
        "noisy/params-across-groups",
        lambda e: NoisyGD([{"params": [e.w]}, {"params": [e.b, e.w]}], lr=0.1),
        ValueError,
        "`params`",
    ),
    (
        "noisy/params-int",
        lambda e: NoisyGD([torch.zeros(3, dtype=torch.long)]),
        TypeError,
        "`params`",
    ),
    (
        "noisy/params-sparse",
        lambda e: NoisyGD([_sparse()]),
        RuntimeError,
        "`params`",
    ),
    (
        "noisy/add_param_group-repeated",
        lambda e: e.noisy.add_param_group({"params": [e.w]}),
        ValueError,
        "`params`",
    ),
    (
        "noisy/add_param_group-int",
        lambda e: e.noisy.add_param_group(
            {"params": [torch.zeros(2, dtype=torch.int32)]}
        ),
        TypeError,
        "`params`",
    ),
    (
        "noisy/step-schedule-nan",
        lambda e: _step(
            NoisyGD(e.params(), noise="isotropic", noise_schedule=lambda t: NAN)
        ),
        ValueError,
        "`noise_schedule`",
    ),
    (
        "noisy/step-schedule-inf-hessian",
        lambda e: _step(e.noisy_gd(noise_schedule=lambda t: -INF)),
        ValueError,
        "`noise_schedule`",
    ),
    (
        "noisy/step-schedule-str",
        lambda e: _step(
            NoisyGD(e.params(), noise="isotropic", noise_schedule=lambda t: "x")
        ),
        TypeError,
        "`noise_schedule`",
    ),
    (
        "noisy/step-nonfinite-minibatch-gradients",
        lambda e: _step(e.noisy_gd(noise="diagonal", batch_size=4, loss_fn=_inf_loss)),
        FloatingPointError,
        "`loss_fn`",
    ),
    (
        "noisy/step-nonfinite-curvature",
        lambda e: _step(e.noisy_gd(loss_fn=_inf_loss)),
        FloatingPointError,
        "`data`",
    ),
    (
        "noisy/step-too-few-minibatches",
        lambda e: _step(e.noisy_gd(noise="diagonal", batch_size=16)),
        ValueError,
        "batch_size",
    ),
    (
        "noisy/load_state_dict-list",
        lambda e: e.noisy.load_state_dict([]),
        TypeError,
        "`state_dict`",
    ),
    (
        "noisy/load_state_dict-empty",
        lambda e: e.noisy.load_state_dict({}),
        ValueError,
        "`state_dict`",
    ),
    (
        "noisy/load_state_dict-extra-missing-keys",
        lambda e: e.noisy.load_state_dict(
            {**e.noisy.state_dict(), "noisy_gd": {"step": 3}}
        ),
        ValueError,
        "state_dict['noisy_gd']",
    ),
    (
        "noisy/load_state_dict-extra-negative-step",
        lambda e: e.noisy.load_state_dict(
            {
                **e.noisy.state_dict(),
                "noisy_gd": {**e.noisy.state_dict()["noisy_gd"], "step": -1},
            }
        ),
        ValueError,
        "state_dict['noisy_gd']['step']",
    ),
    (
        "noisy/load_state_dict-group-count",
        lambda e: e.noisy.load_state_dict({"state": {}, "param_groups": []}),
        ValueError,
        "parameter groups",
    ),
    # -------------------------------------------------------------- ProbedSGD
    (
        "probed/lr<0",
        lambda e: ProbedSGD(e.params(), lr=-1.0),
        ValueError,
        "learning rate",
    ),
    (
        "probed/momentum<0",
        lambda e: ProbedSGD(e.params(), momentum=-0.5),
        ValueError,
        "momentum",
    ),
    (
        "probed/weight_decay<0",
        lambda e: ProbedSGD(e.params(), weight_decay=-1.0),
        ValueError,
        "weight_decay",
    ),
    (
        "probed/nesterov-without-momentum",
        lambda e: ProbedSGD(e.params(), nesterov=True),
        ValueError,
        "Nesterov",
    ),
    (
        "probed/fused-and-foreach",
        lambda e: ProbedSGD(e.params(), fused=True, foreach=True),
        RuntimeError,
        "fused",
    ),
    (
        "probed/probe-str",
        lambda e: ProbedSGD(e.params(), probe="x"),
        TypeError,
        "`probe`",
    ),
    (
        "probed/probe-int",
        lambda e: ProbedSGD(e.params(), probe=3),
        TypeError,
        "`probe`",
    ),
    (
        "probed/params-repeated",
        lambda e: ProbedSGD([e.w, e.b, e.w], lr=0.1),
        ValueError,
        "`params`",
    ),
    (
        "probed/params-named-repeated",
        lambda e: ProbedSGD([("a", e.w), ("b", e.w)], lr=0.1),
        ValueError,
        "`params`",
    ),
    (
        "probed/params-across-groups",
        lambda e: ProbedSGD([{"params": [e.w]}, {"params": [e.w]}], lr=0.1),
        ValueError,
        "`params`",
    ),
    (
        "probed/params-empty",
        lambda e: ProbedSGD([], lr=0.1),
        ValueError,
        "parameter list",
    ),
    ("probed/params-tensor", lambda e: ProbedSGD(e.w, lr=0.1), TypeError, "params"),
    (
        "probed/add_param_group-repeated",
        lambda e: e.probed.add_param_group({"params": [e.b]}),
        ValueError,
        "`params`",
    ),
    (
        "probed/load_state_dict-list",
        lambda e: e.probed.load_state_dict([]),
        TypeError,
        "`state_dict`",
    ),
    (
        "probed/load_state_dict-no-groups",
        lambda e: e.probed.load_state_dict({"state": {}}),
        ValueError,
        "`state_dict`",
    ),
    (
        "probed/load_state_dict-group-count",
        lambda e: e.probed.load_state_dict({"state": {}, "param_groups": []}),
        ValueError,
        "parameter groups",
    ),
    # ------------------------------------------------------- CyclicLRWrapper
    (
        "cyclic/optimizer-str",
        lambda e: CyclicLRWrapper("sgd", 0.1, 0.5, 2),
        TypeError,
        "`optimizer`",
    ),
    ("cyclic/base_lr<0", lambda e: e.wrapper(base_lr=-0.1), ValueError, "`base_lr`"),
    ("cyclic/max_lr-nan", lambda e: e.wrapper(max_lr=NAN), ValueError, "`max_lr`"),
    (
        "cyclic/base_lr>max_lr",
        lambda e: e.wrapper(base_lr=0.5, max_lr=0.1),
        ValueError,
        "`base_lr[0]`",
    ),
    (
        "cyclic/base_lr-list-length",
        lambda e: e.wrapper(base_lr=[0.01, 0.02]),
        ValueError,
        "`base_lr`",
    ),
    (
        "cyclic/step_size_up=0",
        lambda e: e.wrapper(step_size_up=0),
        ValueError,
        "`step_size_up`",
    ),
    (
        "cyclic/step_size_up-float",
        lambda e: e.wrapper(step_size_up=2.0),
        TypeError,
        "`step_size_up`",
    ),
    (
        "cyclic/step_size_down=0",
        lambda e: e.wrapper(step_size_down=0),
        ValueError,
        "`step_size_down`",
    ),
    ("cyclic/mode", lambda e: e.wrapper(mode="sine"), ValueError, "`mode`"),
    ("cyclic/gamma=0", lambda e: e.wrapper(gamma=0.0), ValueError, "`gamma`"),
    (
        "cyclic/cycle_momentum-str",
        lambda e: e.wrapper(cycle_momentum="yes"),
        TypeError,
        "`cycle_momentum`",
    ),
    (
        "cyclic/cycle_momentum-without-momentum",
        lambda e: CyclicLRWrapper(
            torch.optim.Adagrad(e.params()), 0.01, 0.1, 2, cycle_momentum=True
        ),
        ValueError,
        "`cycle_momentum=True`",
    ),
    (
        "cyclic/base_momentum=1",
        lambda e: e.wrapper(cycle_momentum=True, base_momentum=1.0),
        ValueError,
        "`base_momentum`",
    ),
    (
        "cyclic/base_momentum>max_momentum",
        lambda e: e.wrapper(cycle_momentum=True, base_momentum=0.95, max_momentum=0.9),
        ValueError,
        "`base_momentum[0]`",
    ),
    (
        "cyclic/optimizer-repeated-param",
        lambda e: CyclicLRWrapper(_sgd_with_repeat(e), 0.01, 0.1, 2),
        ValueError,
        "`optimizer`",
    ),
    (
        "cyclic/add_param_group-repeated",
        lambda e: e.cyclic.add_param_group({"params": [e.w]}),
        ValueError,
        "`params`",
    ),
    (
        "cyclic/add_param_group-needs-bounds",
        lambda e: _add_group_to_per_group_wrapper(e),
        ValueError,
        "`base_lr`",
    ),
    ("cyclic/lr_at-negative", lambda e: e.cyclic.lr_at(-1), ValueError, "`step`"),
    ("cyclic/lr_at-float", lambda e: e.cyclic.lr_at(1.0), TypeError, "`step`"),
    (
        "cyclic/StepLR-on-wrapper",
        lambda e: torch.optim.lr_scheduler.StepLR(e.cyclic, step_size=2),
        TypeError,
        "`optimizer`",
    ),
    (
        "cyclic/CosineAnnealingLR-on-wrapper",
        lambda e: torch.optim.lr_scheduler.CosineAnnealingLR(e.cyclic, T_max=10),
        TypeError,
        "`optimizer`",
    ),
    (
        "cyclic/OneCycleLR-on-wrapper",
        lambda e: torch.optim.lr_scheduler.OneCycleLR(e.cyclic, 0.1, total_steps=10),
        TypeError,
        "`optimizer`",
    ),
    (
        "cyclic/load_state_dict-list",
        lambda e: e.cyclic.load_state_dict([]),
        TypeError,
        "`state_dict`",
    ),
    (
        "cyclic/load_state_dict-empty",
        lambda e: e.cyclic.load_state_dict({}),
        ValueError,
        "`state_dict`",
    ),
    # --------------------------------------------------------------- cyclic_lr
    ("cyclic_lr/step<0", lambda e: cyclic_lr(-1, 0.1, 0.5, 2), ValueError, "`step`"),
    (
        "cyclic_lr/step-float",
        lambda e: cyclic_lr(1.5, 0.1, 0.5, 2),
        TypeError,
        "`step`",
    ),
    (
        "cyclic_lr/base>max",
        lambda e: cyclic_lr(0, 0.5, 0.1, 2),
        ValueError,
        "`base_lr`",
    ),
    (
        "cyclic_lr/gamma<0",
        lambda e: cyclic_lr(0, 0.1, 0.5, 2, gamma=-1.0),
        ValueError,
        "`gamma`",
    ),
]


def _sgd_with_repeat(e):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns
        return torch.optim.SGD([e.w, e.b, e.w], lr=0.1)


def _add_group_to_per_group_wrapper(e):
    opt = CyclicLRWrapper(
        torch.optim.SGD([e.w], lr=0.1), base_lr=[0.01], max_lr=[0.1], step_size_up=2
    )
    opt.add_param_group({"params": [e.b]})


# ------------------------------------------------- probes and curvature (#13)
class _NaNOperator(DenseOperator):
    """A finite matrix whose products come out NaN (a NaN loss, say)."""

    def _matmat(self, V):
        return super()._matmat(V) * NAN


def _nan_op(e):
    return _NaNOperator(torch.eye(6, dtype=torch.float64))


def _probe(e, **kw):
    return NoiseProbe(e.model, e.loss_fn, e.data, **kw)


def _ng(e, **kw):
    args = dict(model=e.model, loss_fn=e.loss_fn, data=e.data, k=2)
    args.update(kw)
    return noise_geometry(
        args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args
    )


def _hess(e, **kw):
    args = dict(model=e.model, loss_fn=e.loss_fn, data=e.data)
    args.update(kw)
    return HessianOperator(
        args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args
    )


def _ggn(e, **kw):
    args = dict(model=e.model, loss_fn=e.loss_fn, data=e.data)
    args.update(kw)
    return GGNOperator(args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args)


def _sharp(e, **kw):
    args = dict(model=e.model, loss_fn=e.loss_fn, data=e.data, k=1, trace_probes=0)
    args.update(kw)
    return sharpness(args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args)


def _P(e):
    return sum(p.numel() for p in e.model.parameters())


_SHORT = lambda e: (e.X, e.y[:15])  # noqa: E731  16 inputs, 15 targets
_NONE = nn.MSELoss(reduction="none")
_PER_SAMPLE = lambda o, t: ((o - t) ** 2).sum(1)  # noqa: E731  one loss per sample

ROWS += [
    # NoiseProbe: everything the first probe would reject, at construction
    ("probe/k>P", lambda e: _probe(e, k=1000), ValueError, "`k`"),
    (
        "probe/curvature",
        lambda e: _probe(e, curvature="fisher"),
        ValueError,
        "`curvature`",
    ),
    ("probe/cov", lambda e: _probe(e, cov="full"), ValueError, "`cov`"),
    # too few samples for a covariance raised at the first probe, in the
    # training loop (audit)
    (
        "probe/one-sample",
        lambda e: NoiseProbe(e.model, e.loss_fn, (e.X[:1], e.y[:1])),
        ValueError,
        "`probe_data`",
    ),
    (
        "probe/one-sample-list",
        lambda e: NoiseProbe(e.model, e.loss_fn, [(e.X[:1], e.y[:1])]),
        ValueError,
        "`probe_data`",
    ),
    (
        "probe/one-minibatch",
        lambda e: _probe(e, cov="minibatch", batch_size=9),
        ValueError,
        "`probe_data`",
    ),
    (
        "probe/max_samples-one-minibatch",
        lambda e: _probe(e, cov="minibatch", batch_size=4, max_samples=7),
        ValueError,
        "`probe_data`",
    ),
    ("probe/route", lambda e: _probe(e, route="fast"), ValueError, "`route`"),
    ("probe/tol<0", lambda e: _probe(e, tol=-1.0), ValueError, "`tol`"),
    (
        "probe/minibatch-no-B",
        lambda e: _probe(e, cov="minibatch"),
        ValueError,
        "`batch_size`",
    ),
    ("probe/mode", lambda e: _probe(e, mode="test"), ValueError, "`mode`"),
    (
        "probe/model-None",
        lambda e: NoiseProbe(None, e.loss_fn, e.data),
        TypeError,
        "`model`",
    ),
    (
        "probe/no-params",
        lambda e: NoiseProbe(nn.ReLU(), e.loss_fn, e.data),
        ValueError,
        "`model`",
    ),
    (
        "probe/loss_fn-None",
        lambda e: NoiseProbe(e.model, None, e.data),
        TypeError,
        "`loss_fn`",
    ),
    (
        "probe/reduction-none",
        lambda e: NoiseProbe(e.model, _NONE, e.data),
        ValueError,
        "`loss_fn`",
    ),
    (
        "probe/len-mismatch",
        lambda e: NoiseProbe(e.model, e.loss_fn, _SHORT(e)),
        ValueError,
        "`data`",
    ),
    (
        "probe/len-mismatch-list",
        lambda e: NoiseProbe(e.model, e.loss_fn, [e.data, _SHORT(e)]),
        ValueError,
        "`data` (batch 1)",
    ),
    ("probe/sinks-int", lambda e: _probe(e, sinks=3), TypeError, "`sinks`"),
    ("probe/sinks-None-item", lambda e: _probe(e, sinks=[None]), ValueError, "`sinks`"),
    (
        "probe/sinks-directory",
        lambda e: _probe(e, sinks=__import__("tempfile").gettempdir()),
        ValueError,
        "`sinks`",
    ),
    (
        "probe/params-foreign",
        lambda e: _probe(e, params=[torch.ones(2, requires_grad=True)]),
        ValueError,
        "`params`",
    ),
    ("probe/every-neg", lambda e: _probe(e, every=-1), ValueError, "`every`"),
    (
        "probe/displacement-shape",
        lambda e: _probe(e, displacement=torch.ones(3)),
        ValueError,
        "`displacement`",
    ),
    (
        "probe/displacement-nan",
        lambda e: _probe(e, displacement=torch.full((_P(e),), NAN)),
        ValueError,
        "`displacement`",
    ),
    (
        "probe/displacement-type",
        lambda e: _probe(e, displacement="x"),
        TypeError,
        "`displacement`",
    ),
    # noise_geometry
    ("ng/model-None", lambda e: _ng(e, model=None), TypeError, "`model`"),
    ("ng/no-params", lambda e: _ng(e, model=nn.ReLU()), ValueError, "`model`"),
    ("ng/loss_fn-None", lambda e: _ng(e, loss_fn=None), TypeError, "`loss_fn`"),
    ("ng/reduction-none", lambda e: _ng(e, loss_fn=_NONE), ValueError, "`loss_fn`"),
    ("ng/len-mismatch", lambda e: _ng(e, data=_SHORT(e)), ValueError, "`data`"),
    (
        "ng/list-target",
        lambda e: _ng(e, data=[(e.X, e.y.tolist())]),
        TypeError,
        "`data`",
    ),
    ("ng/k>P", lambda e: _ng(e, k=1000), ValueError, "`k`"),
    ("ng/curvature", lambda e: _ng(e, curvature="fisher"), ValueError, "`curvature`"),
    (
        "ng/displacement-nan",
        lambda e: _ng(e, displacement=torch.full((_P(e),), NAN)),
        ValueError,
        "`displacement`",
    ),
    (
        "ng/displacement-list-inf",
        lambda e: _ng(e, displacement=[torch.full_like(p, INF) for p in e.params()]),
        ValueError,
        "`displacement`",
    ),
    (
        "ng/displacement-shape",
        lambda e: _ng(e, displacement=torch.ones(3)),
        ValueError,
        "`displacement`",
    ),
    # per_sample_gradients
    (
        "psg/len-mismatch",
        lambda e: per_sample_gradients(e.model, e.loss_fn, e.X, e.y[:15]),
        ValueError,
        "`targets`",
    ),
    (
        "psg/list-target",
        lambda e: per_sample_gradients(e.model, e.loss_fn, e.X, e.y.tolist()),
        TypeError,
        "`targets`",
    ),
    (
        "psg/loss_fn-None",
        lambda e: per_sample_gradients(e.model, None, e.X, e.y),
        TypeError,
        "`loss_fn`",
    ),
    (
        "psg/model-None",
        lambda e: per_sample_gradients(None, e.loss_fn, e.X, e.y),
        TypeError,
        "`model`",
    ),
    # HessianOperator / GGNOperator
    ("hess/model-None", lambda e: _hess(e, model=None), TypeError, "`model`"),
    ("hess/no-params", lambda e: _hess(e, model=nn.ReLU()), ValueError, "`model`"),
    ("hess/loss_fn-None", lambda e: _hess(e, loss_fn=None), TypeError, "`loss_fn`"),
    ("hess/reduction-none", lambda e: _hess(e, loss_fn=_NONE), ValueError, "`loss_fn`"),
    ("hess/len-mismatch", lambda e: _hess(e, data=_SHORT(e)), ValueError, "`data`"),
    (
        "hess/len-mismatch-loader",
        lambda e: _hess(e, data=(b for b in [_SHORT(e)])),
        ValueError,
        "`data`",
    ),
    ("ggn/model-None", lambda e: _ggn(e, model=None), TypeError, "`model`"),
    ("ggn/loss_fn-None", lambda e: _ggn(e, loss_fn=None), TypeError, "`loss_fn`"),
    ("ggn/len-mismatch", lambda e: _ggn(e, data=_SHORT(e)), ValueError, "`data`"),
    (
        "hess/matvec-complex",
        lambda e: _hess(e).matvec(torch.ones(_P(e), dtype=torch.complex64)),
        TypeError,
        "`v`",
    ),
    (
        "hess/matvec-meta",
        lambda e: _hess(e).matvec(torch.ones(_P(e), device="meta")),
        ValueError,
        "`v`",
    ),
    (
        "hess/matmat-complex",
        lambda e: _hess(e).matmat(torch.ones(_P(e), 2, dtype=torch.complex64)),
        TypeError,
        "`V`",
    ),
    # sharpness
    ("sharp/model-None", lambda e: _sharp(e, model=None), TypeError, "`model`"),
    ("sharp/loss_fn-None", lambda e: _sharp(e, loss_fn=None), TypeError, "`loss_fn`"),
    ("sharp/len-mismatch", lambda e: _sharp(e, data=_SHORT(e)), ValueError, "`data`"),
    (
        "sharp/v0-nan",
        lambda e: _sharp(e, v0=torch.full((_P(e),), NAN)),
        ValueError,
        "`v0`",
    ),
    ("sharp/v0-shape", lambda e: _sharp(e, v0=torch.ones(3)), ValueError, "`v0`"),
    # a parameter selected twice gave it a zero Hessian block (audit)
    (
        "hess/params-repeated",
        lambda e: _hess(e, params=[e.w, e.b, e.w]),
        ValueError,
        "`params`",
    ),
    (
        "hess/params-repeated-name",
        lambda e: _hess(e, params=["0.weight", "0.weight"]),
        ValueError,
        "`params`",
    ),
    (
        "ggn/params-repeated",
        lambda e: _ggn(e, params=[e.w, e.w]),
        ValueError,
        "`params`",
    ),
    (
        "psg/params-repeated",
        lambda e: per_sample_gradients(e.model, e.loss_fn, e.X, e.y, params=[e.w, e.w]),
        ValueError,
        "`params`",
    ),
    ("ng/params-repeated", lambda e: _ng(e, params=[e.w, e.w]), ValueError, "`params`"),
    (
        "sharp/params-repeated",
        lambda e: _sharp(e, params=[e.w, e.w]),
        ValueError,
        "`params`",
    ),
    # a single tensor or name was split into rows or characters (audit)
    ("hess/params-one-tensor", lambda e: _hess(e, params=e.w), TypeError, "`params`"),
    (
        "hess/params-one-name",
        lambda e: _hess(e, params="0.weight"),
        TypeError,
        "`params`",
    ),
    (
        "psg/params-one-tensor",
        lambda e: per_sample_gradients(e.model, e.loss_fn, e.X, e.y, params=e.w),
        TypeError,
        "`params`",
    ),
    # complex or meta v0 was accepted (complex: imaginary part dropped) (audit)
    (
        "sharp/v0-complex",
        lambda e: _sharp(e, v0=torch.ones(_P(e), dtype=torch.complex64)),
        TypeError,
        "`v0`",
    ),
    (
        "ng/v0-complex",
        lambda e: _ng(e, v0=torch.ones(_P(e), dtype=torch.complex64)),
        TypeError,
        "`v0`",
    ),
    ("ng/v0-shape", lambda e: _ng(e, v0=torch.ones(3)), ValueError, "`v0`"),
    ("ng/v0-nan", lambda e: _ng(e, v0=torch.full((_P(e),), NAN)), ValueError, "`v0`"),
    (
        "eig/v0-complex",
        lambda e: top_eigenpairs(
            DenseOperator(torch.eye(6)), 2, v0=torch.ones(6, dtype=torch.complex64)
        ),
        TypeError,
        "`v0`",
    ),
    (
        "eig/v0-meta",
        lambda e: top_eigenpairs(
            DenseOperator(torch.eye(6)), 2, v0=torch.ones(6, device="meta")
        ),
        ValueError,
        "`v0`",
    ),
    # a per-sample loss raised torch's "grad can be implicitly created only for
    # scalar outputs" (or a shape error) at the first product (audit)
    (
        "hess/reduction-none-explicit",
        lambda e: _hess(e, loss_fn=_NONE, loss_reduction="mean"),
        ValueError,
        "`loss_fn`",
    ),
    (
        "hess/per-sample-loss",
        lambda e: _hess(e, loss_fn=_PER_SAMPLE).matvec(torch.ones(_P(e))),
        ValueError,
        "`loss_fn`",
    ),
    (
        "hess/per-sample-loss-fwd_rev",
        lambda e: _hess(e, loss_fn=_PER_SAMPLE, method="fwd_rev").matvec(
            torch.ones(_P(e))
        ),
        ValueError,
        "`loss_fn`",
    ),
    (
        "hess/per-sample-loss-gradient",
        lambda e: _hess(e, loss_fn=_PER_SAMPLE).gradient(),
        ValueError,
        "`loss_fn`",
    ),
    (
        "ggn/per-sample-loss",
        lambda e: _ggn(e, loss_fn=_PER_SAMPLE).matvec(torch.ones(_P(e))),
        ValueError,
        "`loss_fn`",
    ),
    (
        "sharp/per-sample-loss",
        lambda e: _sharp(e, loss_fn=_PER_SAMPLE),
        ValueError,
        "`loss_fn`",
    ),
    (
        "esharp/per-sample-loss",
        lambda e: expected_sharpness(e.model, _PER_SAMPLE, e.data, num_samples=2),
        ValueError,
        "`loss_fn`",
    ),
    (
        "hess/loss-not-tensor",
        lambda e: _hess(e, loss_fn=lambda o, t: 1.0).matvec(torch.ones(_P(e))),
        TypeError,
        "`loss_fn`",
    ),
    # DenseOperator, eigensolvers, spectral density
    (
        "dense/numpy",
        lambda e: DenseOperator(torch.eye(3).numpy()),
        TypeError,
        "`matrix`",
    ),
    (
        "dense/complex",
        lambda e: DenseOperator(torch.eye(3, dtype=torch.complex64)),
        TypeError,
        "`matrix`",
    ),
    (
        "dense/matvec-complex",
        lambda e: DenseOperator(torch.eye(3)).matvec(
            torch.ones(3, dtype=torch.complex64)
        ),
        TypeError,
        "`v`",
    ),
    (
        "dense/non-square",
        lambda e: DenseOperator(torch.zeros(3, 2)),
        ValueError,
        "`matrix`",
    ),
    (
        "dense/matvec-short",
        lambda e: DenseOperator(torch.eye(3)).matvec(torch.ones(2)),
        ValueError,
        "`v`",
    ),
    (
        "dense/matmat-short",
        lambda e: DenseOperator(torch.eye(3)).matmat(torch.ones(2, 4)),
        ValueError,
        "`V`",
    ),
    (
        "hess/matvec-short",
        lambda e: _hess(e).matvec(torch.ones(_P(e) - 1)),
        ValueError,
        "`v`",
    ),
    (
        "dense/matvec-meta",
        lambda e: DenseOperator(torch.eye(3)).matvec(torch.ones(3, device="meta")),
        ValueError,
        "`v`",
    ),
    (
        "eig/nan-operator",
        lambda e: top_eigenpairs(_nan_op(e), 2),
        ValueError,
        "operator's output is non-finite",
    ),
    (
        "eig/nan-operator-k=P",
        lambda e: top_eigenpairs(_nan_op(e), 6),
        ValueError,
        "operator's output is non-finite",
    ),
    (
        "eig/v0-nan",
        lambda e: top_eigenpairs(
            DenseOperator(torch.eye(6)), 2, v0=torch.full((6,), NAN)
        ),
        ValueError,
        "`v0`",
    ),
    (
        "eig/verify-str",
        lambda e: top_eigenpairs(DenseOperator(torch.eye(6)), 2, verify="yes"),
        TypeError,
        "`verify`",
    ),
    (
        "eig/which",
        lambda e: top_eigenpairs(DenseOperator(torch.eye(6)), 2, which="XX"),
        ValueError,
        "`which`",
    ),
    (
        "losses/half-squared-none",
        lambda e: HalfSquaredError(reduction="none"),
        ValueError,
        "`reduction`",
    ),
    (
        "density/grid-nan",
        lambda e: spectral_density(
            DenseOperator(torch.eye(6)), grid=torch.tensor([0.0, NAN])
        ),
        ValueError,
        "`grid`",
    ),
    (
        "density/grid-complex",
        lambda e: spectral_density(
            DenseOperator(torch.eye(6)), grid=torch.ones(3, dtype=torch.complex64)
        ),
        TypeError,
        "`grid`",
    ),
]


def _equal(a, b):
    """Bit-for-bit equality of nested state (tensors, containers, floats)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
            and torch.equal(a.isnan(), b.isnan())
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _snapshot(e):
    return {
        "params": [p.detach().clone() for p in e.model.parameters()],
        "grads": [p.grad.clone() for p in e.model.parameters()],
        "optimizers": [
            copy.deepcopy(o.state_dict()) for o in (e.noisy, e.probed, e.cyclic)
        ],
        "rng": torch.get_rng_state(),
    }


def test_enough_rows():
    assert len(ROWS) >= 150
    assert len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    "call, exc, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_bad_input(call, exc, needle):
    e = Env()
    before = _snapshot(e)
    with pytest.raises(exc) as info:
        call(e)
    assert needle in str(info.value), str(info.value)
    after = _snapshot(e)
    for key in before:
        assert _equal(before[key], after[key]), key
