import geoopt_sgd


def test_every_public_name_imports_and_is_documented():
    for name in geoopt_sgd.__all__:
        obj = getattr(geoopt_sgd, name)
        if name == "__version__":
            assert isinstance(obj, str)
            continue
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_the_issues_names_import_from_the_top_level():
    # the public API the issues name, importable as `from geoopt_sgd import X`
    names = (
        "HessianOperator GGNOperator top_eigenpairs sharpness per_sample_gradients "
        "noise_geometry NoiseProbe ProbedSGD NoisyGD CyclicLRWrapper "
        "hutchinson_trace hutchpp_trace hutchinson_diagonal squared_frobenius "
        "spectral_density expected_sharpness METRICS DEFAULT_METRICS "
        "register_timm_optimizers"
    ).split()
    for name in names:
        assert name in geoopt_sgd.__all__, name
        assert getattr(geoopt_sgd, name) is not None
    assert set(geoopt_sgd.DEFAULT_METRICS) <= set(geoopt_sgd.METRICS)


_WITHOUT_EXTRAS = r"""
import sys

BLOCKED = {"timm", "torchvision", "matplotlib", "tqdm", "sklearn", "scipy"}

for name in BLOCKED:  # `import name` now raises ImportError, as if not installed
    sys.modules[name] = None

import torch
from torch import nn

import geoopt_sgd
import geoopt_sgd.testing

for name in geoopt_sgd.__all__:
    getattr(geoopt_sgd, name)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
X, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
loss_fn = nn.CrossEntropyLoss()
top = geoopt_sgd.top_eigenpairs(geoopt_sgd.HessianOperator(model, loss_fn, (X, y)), k=2)
assert top.converged
probe = geoopt_sgd.NoiseProbe(model, loss_fn, (X, y), every=1, k=2)
opt = geoopt_sgd.ProbedSGD(model.parameters(), lr=0.1, probe=probe)
noisy = geoopt_sgd.NoisyGD(model.parameters(), lr=0.1, noise="isotropic", seed=0)
for o in (opt, noisy):
    o.zero_grad()
    loss_fn(model(X), y).backward()
    o.step()
assert len(probe.history) == 1
try:
    geoopt_sgd.register_timm_optimizers()
except ImportError as e:
    assert "timm" in str(e)
else:
    raise AssertionError("register_timm_optimizers ran without timm")
assert not BLOCKED & {m.split(".")[0] for m, v in sys.modules.items() if v}
print("ok")
"""


def test_the_core_runs_without_the_optional_dependencies():
    # "The core depends on torch only": importing every public name and a short
    # run of the eigensolver, a probe and both optimizers need none of the extras
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
