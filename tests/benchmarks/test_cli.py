"""The benchmark scripts' command lines, as a user meets them.

``--help`` of every script answers at once (and runs nothing); bad arguments end
in argparse's exit status 2 with a message, not a traceback or a silent run of
something else; a peer tool that is not installed is reported as such. The
measurements themselves are not run here (they take minutes to hours).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", [*SCRIPTS, "_noisy_gd_bench.py"])
def test_help_answers_and_runs_nothing(script, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    before = {p: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*.json")}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    after = {p: p.stat().st_mtime_ns for p in (BENCH / "results").glob("*.json")}
    assert after == before  # no recorded result was rewritten
    assert list(tmp_path.iterdir()) == []


def test_warm_start_quick_reproduces_the_recorded_synthetic_rows(bench, tmp_path):
    import json

    out = tmp_path / "ws.json"
    result = bench("warm_start").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["synthetic"] == result["synthetic"]
    assert "tracking" not in result and result["quick"] is True
    recorded = json.loads((BENCH / "results" / "warm_start.json").read_text())
    got = [r["products"] for r in result["synthetic"]]
    assert got == [r["products"] for r in recorded["synthetic"]]


def _exit_code(fn, *args):
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    return exc.value.code


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "MLP"],  # a typo used to run the CNN (resnet18 without --quick)
        ["--models", "clustered", "--tools", "geoopt"],
        ["--models", "clustered", "--seeds", "0"],
        ["--models", "clustered", "--ks", "0"],
        ["--models", "clustered", "--tol", "0"],
        ["--models", "clustered", "--hvp-reps", "0"],
    ],
)
def test_curvature_rejects_bad_arguments(bench, monkeypatch, tmp_path, capsys, argv):
    curvature = bench("curvature")

    def no_cnn(quick):
        raise AssertionError("built the CNN")

    monkeypatch.setattr(curvature, "make_cnn", no_cnn)
    out = tmp_path / "c.json"
    assert _exit_code(curvature.main, [*argv, "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_curvature_names_a_missing_peer(bench, monkeypatch, tmp_path, capsys):
    import json

    curvature = bench("curvature")
    for name in ("hessian_eigenthings", "pyhessian", "pyhessian.hessian"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    out = tmp_path / "c.json"
    argv = ["--quick", "--models", "mlp", "--ks", "3", "--seeds", "2"]
    argv += ["--hvp-reps", "1", "--tools", "geoopt_sgd", "hessian_eigenthings"]
    curvature.main([*argv, "pyhessian@acc", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "crashed" not in printed
    assert printed.count("not installed") == 2
    runs = {r["tool"]: r for r in json.loads(out.read_text())["problems"][0]["runs"]}
    assert "hessian_eigenthings" in runs["hessian_eigenthings"]["not_installed"]
    assert "pyhessian" in runs["pyhessian@acc"]["not_installed"]
    assert "crashed" not in runs["pyhessian@acc"]
    assert len(runs["geoopt_sgd"]["seeds"]) == 2


@pytest.mark.parametrize(
    "script, argv",
    [
        ("probes", ["--sections", "step-time"]),  # used to run nothing, silently
        ("probes", ["--models", "no_such_model", "--sections", "step_time"]),
        ("probes", ["--every", "0", "--models", "test_resnet", "--sections", "x"]),
        ("probes", ["--k", "0", "--models", "test_resnet", "--sections", "x"]),
        ("probes", ["--quick", "--models", "test_resnet", "--lean-metrics", "mu,nu"]),
        (
            "probes",
            ["--quick", "--models", "test_resnet", "--sections", "overhead"]
            + ["--steps", "3", "--run-every", "4"],  # no probe in the run
        ),
        ("block_products", ["--models", "resnet"]),
        ("block_products", ["--models", "mlp", "--blocks", "0"]),
        ("block_products", ["--models", "mlp", "--reps", "0"]),
        ("optimizers", ["--repeats", "-1", "--no-hessian"]),
        ("optimizers", ["--block", "0", "--no-hessian"]),
        ("optimizers", ["--model", "no_such_model", "--no-hessian"]),
    ],
)
def test_bad_arguments_exit_2(bench, tmp_path, capsys, script, argv):
    out = tmp_path / "r.json"
    assert _exit_code(bench(script).main, [*argv, "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_probes_quick_keeps_the_full_settings_file(bench, monkeypatch, tmp_path):
    import json

    probes = bench("probes")
    monkeypatch.setattr(probes, "RESULTS", tmp_path)
    monkeypatch.setattr(probes, "bench_step_time", lambda *a, **kw: {"stub": True})
    probes.main(["--quick", "--models", "test_resnet", "--sections", "step_time"])
    assert [p.name for p in tmp_path.iterdir()] == ["probes_quick.json"]
    saved = json.loads((tmp_path / "probes_quick.json").read_text())
    assert saved["quick"] is True and saved["step_time"] == {"stub": True}


def test_gpu_timings_synchronise(bench, monkeypatch):
    """On CUDA every timed step waits for its kernels (counted on a CPU stand-in)."""
    import torch
    from torch import nn

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    common = bench("_common")
    common.median_seconds(lambda: None, repeats=2, warmup=0, device="cpu")
    assert calls == []
    common.median_seconds(lambda: None, repeats=2, warmup=0, device="cuda:0")
    assert len(calls) == 4
    calls.clear()
    model = nn.Linear(3, 2)  # stays on the CPU: only the device string is "cuda"
    bench("_noisy_gd_bench")._step_times(model, repeats=2, warmup=0, device="cuda")
    assert len(calls) == 2 * 3 * 2  # 2 repeats x 3 optimizers, before and after


def documented_commands() -> list[tuple[str, list[str]]]:
    """``python benchmarks/<script>.py ...`` lines of the benchmark pages."""
    import re
    import shlex

    found = []
    for page in (BENCH / "README.md", ROOT / "docs" / "benchmarks.md"):
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            m = re.match(r"\s*(?:\w+=\S+ )*python (benchmarks/\w+\.py)(.*)", line)
            if m:
                args = shlex.split(m.group(2).split("#")[0])
                found.append((m.group(1), args))
    return found


COMMANDS = documented_commands()


def test_the_pages_document_every_script():
    assert {Path(s).name for s, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize(
    "script, args", COMMANDS, ids=[" ".join(c[1]) or c[0] for c in COMMANDS]
)
def test_documented_command_parses(bench_modules, monkeypatch, script, args):
    """Each documented command's arguments are accepted (parsed, not run)."""
    import argparse
    import runpy

    import torch

    if "cuda" in args and not torch.cuda.is_available():
        pytest.skip("a CUDA command: its --device is refused without CUDA")
    parsed = []
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, *a, **kw):
        parsed.append(original(self, *a, **kw))
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exc.value.code == 0 and len(parsed) == 1


def test_cluster_skips_quick_keeps_explicit_ks_and_starts(bench, monkeypatch, tmp_path):
    import json

    out = tmp_path / "cs.json"
    argv = ["--quick", "--ks", "8", "--starts", "1", "--tools", "unchecked"]
    monkeypatch.setattr(sys, "argv", ["cluster_skips.py", *argv, "--out", str(out)])
    bench("cluster_skips").main()
    config = json.loads(out.read_text())["config"]
    assert config["ks"] == [8] and config["starts"] == 1 and config["quick"]


@pytest.mark.parametrize("script", ["block_products", "optimizers"])
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_unusable_device_exits_2(bench, tmp_path, capsys, script, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = ["--device", device, "--out", str(tmp_path / "r.json")]
    if script == "block_products":
        argv += ["--models", "mlp"]
    else:
        argv += ["--quick", "--no-hessian"]
    assert _exit_code(bench(script).main, argv) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv",
    [
        ("curvature", ["--models", "clustered", "--ks", "3", "--seeds", "1"]),
        ("block_products", ["--models", "mlp", "--blocks", "1", "--reps", "1"]),
    ],
)
def test_out_file_in_the_current_folder(bench, monkeypatch, tmp_path, script, argv):
    """``--out name.json`` (no folder) is written where the user stands."""
    monkeypatch.chdir(tmp_path)
    extra = ["--tools", "geoopt_sgd"] if script == "curvature" else ["--threads", "1"]
    bench(script).main([*argv, *extra, "--out", "r.json"])
    assert (tmp_path / "r.json").stat().st_size > 0


def test_multiplicities_quick_restores_the_rule(bench, monkeypatch, tmp_path):
    import json

    from geoopt_sgd.curvature import lanczos

    rule = lanczos._may_hide_copies
    out = tmp_path / "m.json"
    argv = ["multiplicities.py", "--quick", "--starts", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench("multiplicities").main()
    assert lanczos._may_hide_copies is rule
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["checked"]["wrong"] == 0 for r in rows)
    assert sum(r["one_copy_per_chain"]["wrong_verified"] for r in rows) >= 1
