"""Every script in examples/ runs at its tiny size (``--tiny``), as a user runs it.

Each test starts the script in a fresh interpreter (the examples are programs, not
modules), with this checkout first on ``PYTHONPATH`` and its outputs under
``tmp_path``, and checks what it writes. Optional frameworks (TensorBoard,
Lightning) skip their test when not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def run(args: list[str], tmp_path: Path, timeout: float = 240) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        args,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def script(name: str) -> str:
    return str(EXAMPLES / name)


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    """Run ``examples/<name> --tiny *args`` in ``tmp_path``; return its stdout."""
    return run([sys.executable, script(name), "--tiny", *args], tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@_needs("timm", "sklearn", "matplotlib")
def test_timm_noise_probe(tmp_path):
    out = tmp_path / "out"
    run_example("timm_noise_probe.py", tmp_path, "--out-dir", str(out))
    records = read_jsonl(out / "noise.jsonl")
    assert [r["step"] for r in records] == [5, 10]
    for r in records:
        for name in ("alpha", "mu", "tr_h_sigma", "tr_h_sigma_iso", "eigenvalues"):
            assert name in r
    assert (out / "noise.png").stat().st_size > 0


def run_failing(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


@_needs("timm", "sklearn", "matplotlib")
@pytest.mark.parametrize(
    "flags",
    [
        ["--steps", "3", "--every", "5"],  # no probe would run: nothing to plot
        ["--every", "0"],
        ["--steps", "-1"],
    ],
)
def test_timm_noise_probe_bad_settings_exit_2(tmp_path, flags):
    out = tmp_path / "out"
    proc = run_failing(
        [sys.executable, script("timm_noise_probe.py"), *flags, "--out-dir", str(out)],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


@_needs("timm", "sklearn", "matplotlib")
def test_timm_noise_probe_tiny_keeps_explicit_flags(tmp_path):
    out = tmp_path / "out"
    run_example("timm_noise_probe.py", tmp_path, "--every", "2", "--out-dir", str(out))
    assert [r["step"] for r in read_jsonl(out / "noise.jsonl")] == [2, 4, 6, 8, 10]


@_needs("timm", "sklearn", "tensorboard")
def test_tensorboard_noise_probe(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    logdir = tmp_path / "tb"
    run_example("tensorboard_noise_probe.py", tmp_path, "--log-dir", str(logdir))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"noise/alpha", "noise/mu", "noise/tr_h_sigma", "train/loss"} <= tags
    assert [e.step for e in acc.Scalars("noise/mu")] == [5, 10]


@_needs("lightning", "sklearn")
def test_lightning_cyclic_lr(tmp_path):
    log = tmp_path / "noise.jsonl"
    stdout = run_example("lightning_cyclic_lr.py", tmp_path, "--out", str(log))
    records = read_jsonl(log)
    assert [r["step"] for r in records] == [4, 8]
    # triangular, base 0.02, max 0.1, 2 steps up: the lr of steps 4 and 8 (t = 3, 7)
    assert [r["lr"] for r in records] == pytest.approx([0.06, 0.06])
    assert "2 probes" in stdout


@_needs("sklearn")
def test_noisy_gd_hessian(tmp_path):
    stdout = run_example("noisy_gd_hessian.py", tmp_path)
    lines = {line.split(":")[0].strip(): line for line in stdout.splitlines()}
    assert {"hessian", "isotropic_matched", "none"} <= set(lines)
    assert "HVPs 0" not in lines["hessian"]  # the Hessian kind ran its eigensolver


@_needs("sklearn")
def test_track_sharpness(tmp_path):
    out = tmp_path / "runs" / "sharpness.jsonl"  # a folder that does not exist yet
    stdout = run_example("track_sharpness.py", tmp_path, "--out", str(out))
    records = read_jsonl(out)
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        assert r["converged"] and len(r["top_eigenvalues"]) == 3
        assert r["stability_ratio"] == pytest.approx(0.1 * r["lambda_max"] / 2)
    assert "warm-started" in stdout


@pytest.mark.distributed
def test_ddp_probe_noisy_gd(tmp_path):
    out = tmp_path / "ddp.jsonl"
    stdout = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node", "2", script("ddp_probe_noisy_gd.py"), "--tiny"]
        + ["--out", str(out)],
        tmp_path,
    )
    assert "replicas identical: True" in stdout
    records = read_jsonl(out)
    assert len(records) == 2  # rank 0 only writes
    assert all(r["num_samples"] == 128 for r in records)  # both shards of 64


def test_ddp_example_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    proc = run_failing(
        [sys.executable, script("ddp_probe_noisy_gd.py"), "--tiny"], tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torchrun" in proc.stderr and "Traceback" not in proc.stderr


@_needs("timm")
def test_timm_create_optimizer(tmp_path):
    stdout = run_example("timm_create_optimizer.py", tmp_path)
    assert "probedsgd: ProbedSGD" in stdout
    assert "noisygd: NoisyGD" in stdout
