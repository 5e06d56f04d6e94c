"""The recipes compute on ``--device``, never on the default device.

No GPU runs these tests, so ``--device cuda`` is checked in two CPU stand-ins:

* Every recipe runs (a tiny config, ``device="cpu"``) under a *meta* default
  device, as ``tests/test_default_device.py`` runs the library's tools: an
  allocation that names no device (``torch.zeros(n)``, ``torch.randn(...,
  generator=g)``, a module built without ``device=``) lands on meta, so it either
  fails or its result differs. On CUDA the same allocation is a CPU tensor that
  meets CUDA ones. The recipes' seeded draws and model builds say ``device="cpu"``
  (or build under ``with torch.device("cpu")``) and move to the run's device
  after, as before: the results equal those of the plain run.
* A resumed run gets its checkpoint back on the CPU (``map_location="cpu"``),
  whatever its device. :class:`_Elsewhere` stands for such a tensor: it raises
  when it meets a live tensor of more than one element in an operation (as a
  CPU tensor meets a CUDA one), unless moved with ``.to(...)`` first, or copied
  into one (``load_state_dict``).
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

META = torch.device("meta")

# tiny settings of every recipe (seconds each); the toy and the net of
# anisotropic_escape, both families of stability_bound's parts
TINY = {
    "alignment": dict(
        families=("rfm", "linear_net", "fcn", "cnn"),
        rfm_dim=5,
        rfm_samples=12,
        rfm_widths=(6,),
        linear_dim=4,
        linear_samples=12,
        linear_widths=(3,),
        fcn_samples=12,
        fcn_widths=(3,),
        cnn_samples=12,
        cnn_widths=(2,),
        max_steps=6,
        every=3,
        tail=2,
        tail_every=2,
        nsweep_dim=6,
        nsweep_samples=(4, 8),
        nsweep_steps=6,
        nsweep_every=3,
        nsweep_draws=1,
        k=2,
    ),
    "anisotropic_escape": dict(
        part="both",
        toy_runs=4,
        toy_steps=5,
        num_seeds=1,
        num_train=60,
        num_corrupt=6,
        width=4,
        gd_steps=4,
        steps=6,
        eval_every=3,
        batch_size=10,
        dynamics=("gd", "const", "hess", "sgd"),
        k=2,
        refresh_every=3,
        sharpness_samples=3,
        geometry_every=3,
        geometry_k=2,
        top_k=2,
    ),
    "escape_direction": dict(
        model="mlp",
        num_train=24,
        width=4,
        train_steps=6,
        checkpoint_every=3,
        num_eigs=3,
        ks=(1, 3),
        trace_probes=4,
        batch_size=4,
        control_batch_size=12,
        runs=1,
        gd_runs=1,
        noisy_runs=1,
        noisy_kinds=("isotropic_matched",),
        max_steps=4,
    ),
    "flat_minima_clr": dict(
        model="mlp",
        num_seeds=1,
        num_train=60,
        width=4,
        pretrain_steps=4,
        phase_steps=2,
        cycles=2,
        trace_probes=4,
    ),
    "power_law": dict(
        width=4, num_train=60, epochs=2, measure_every=1, top_n=8, rotations=2
    ),
    "sharpness_report": dict(
        model="mlp",
        width=4,
        image_size=8,
        num_train=40,
        dtype="float64",
        epochs=1,
        batch_size=20,
        curvature_samples=20,
        k=2,
        trace_probes=4,
        density_probes=2,
        density_steps=6,
        sharpness_samples=3,
    ),
    "stability_bound": dict(
        families=("mlp", "cnn"),
        mlp_widths=(2, 3),
        cnn_widths=(2, 3),
        num_train=20,
        batch_sizes=(2, 5),
        steps=10,
        num_evals=2,
        tail_evals=2,
        trace_probes=4,
        mu_samples=10,
        exact_max=200,
        z19_widths=(4, 6),
        z19_samples=20,
        z19_epochs=2,
        z19_decay_epoch=1,
    ),
}


def _config(name, out_dir, **kw):
    recipe = importlib.import_module(name)
    cfg = dataclasses.replace(
        recipe.Config(), **TINY[name], out_dir=str(out_dir), device="cpu"
    )
    return recipe, dataclasses.replace(cfg, **kw)


def _comparable(results):
    """The results without what differs from run to run: the wall time, the
    environment and the output folder."""
    out = {k: v for k, v in results.items() if k != "env"}
    out["config"] = {k: v for k, v in out["config"].items() if k != "out_dir"}
    out["metrics"] = {k: v for k, v in out["metrics"].items() if k != "seconds"}
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_recipe_under_meta_default(tmp_path, name):
    recipe, cfg = _config(name, tmp_path / "ref")
    ref = recipe.main(cfg)
    recipe, cfg = _config(name, tmp_path / "meta")
    with torch.device(META):
        out = recipe.main(cfg)
    assert _comparable(out) == _comparable(ref)


# ------------------------------------------------------------ resumed on a device


class _Elsewhere(torch.Tensor):
    """A checkpoint tensor, as if on the CPU while the run is on another device.

    An operation that mixes it with a live (plain) tensor of more than one
    element raises, as CPU and CUDA tensors do; ``.to(...)`` gives a live
    tensor; ``copy_`` into a live tensor (``load_state_dict``) is allowed, and so
    are operations among checkpoint tensors (their results stay elsewhere).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and _moves(*args[1:], **kwargs):
            return _live(super().__torch_function__(func, types, args, kwargs))
        if func not in _ALLOWED:
            tensors = [
                a
                for a in (*args, *kwargs.values())
                for a in (a if isinstance(a, (list, tuple)) else (a,))
                if isinstance(a, torch.Tensor)
            ]
            with torch._C.DisableTorchFunctionSubclass():
                away = [t.dim() for t in tensors if isinstance(t, _Elsewhere)]
                here = [t.dim() for t in tensors if not isinstance(t, _Elsewhere)]
            if any(away) and any(here):
                raise RuntimeError(
                    f"{getattr(func, '__name__', func)}: a checkpoint tensor "
                    "(on the CPU) meets a tensor on the run's device"
                )
        return super().__torch_function__(func, types, args, kwargs)


# a copy into a live tensor, or a module's tensor replaced by its moved copy
_ALLOWED = (
    torch.Tensor.copy_,
    torch.Tensor.__setstate__,
    torch._has_compatible_shallow_copy_type,
    torch.Tensor.data.__set__,  # param.data = moved
)


def _moves(*args, **kwargs):
    """Whether ``Tensor.to(*args, **kwargs)`` names a device."""
    return "device" in kwargs or any(
        isinstance(a, (str, torch.device, torch.Tensor)) for a in args
    )


def _live(obj):
    if isinstance(obj, _Elsewhere):
        return obj.as_subclass(torch.Tensor)
    return obj


def _elsewhere(obj):
    """Every tensor of a loaded checkpoint (CPU generator states excepted: they
    stay on the CPU on every device) as an :class:`_Elsewhere`."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.dtype == torch.uint8 else obj.as_subclass(_Elsewhere)
    if isinstance(obj, dict):
        return {k: _elsewhere(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_elsewhere(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_elsewhere(v) for v in obj)
    return obj


def test_elsewhere_stands_for_another_device():
    a = torch.ones(3).as_subclass(_Elsewhere)
    live = torch.ones(3)
    with pytest.raises(RuntimeError, match="meets a tensor on the run's device"):
        live - a
    assert type(live - a.to(live.device)) is torch.Tensor
    assert torch.equal((a + a).as_subclass(torch.Tensor), 2 * live)
    live.copy_(a)  # load_state_dict
    assert float(live @ torch.ones(3)) == 3.0
    assert float(a.sum() * live[0]) == 3.0  # 0-dim: allowed, as on CUDA


# recipe: (the unit of work to stop at, inside a stage after a snapshot; settings);
# alignment and stability_bound keep no tensors in their checkpoints
RESUMES = {
    "anisotropic_escape": (4, {}),  # the GD dynamic, after its first evaluation
    # the training, after a snapshot (not later: the curvature stage is CPU
    # tensors by design, which meet .cpu() ones, and this stand-in cannot tell)
    "escape_direction": (4, {}),
    "flat_minima_clr": (6, {}),  # the GD arm's second cycle (period 4)
    "power_law": (1, {}),  # CE's second epoch
    "sharpness_report": (3, {"epochs": 2}),  # the second epoch (2 steps each)
}


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_resume_moves_the_checkpoint_to_the_device(
    tmp_path, name, monkeypatch, interrupt_at
):
    unit, kw = RESUMES[name]
    recipe, cfg = _config(name, tmp_path / "ref", **kw)
    ref = recipe.main(cfg)
    recipe, cfg = _config(name, tmp_path / "resumed", **kw)
    with interrupt_at(unit):
        recipe.main(cfg)
    load, loaded = torch.load, []

    def load_elsewhere(*args, **kwargs):
        out = _elsewhere(load(*args, **kwargs))
        loaded.append(_count_elsewhere(out))
        return out

    monkeypatch.setattr(torch, "load", load_elsewhere)
    out = recipe.main(dataclasses.replace(cfg, resume=True))
    assert out["arrays"] == ref["arrays"]
    # the run resumed from a checkpoint with tensors besides the RNG states
    assert sum(loaded) > 0


def _count_elsewhere(obj):
    if isinstance(obj, _Elsewhere):
        return 1
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_elsewhere(v) for v in obj)
    return 0
