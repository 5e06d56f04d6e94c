"""The benchmark scripts' command lines, as a user meets them.

``--help`` of every script answers at once (and runs nothing); bad arguments end
in argparse's exit status 2 with a message, not a traceback or a silent run of
something else; a peer tool that is not installed is reported as such. The
measurements themselves are not run here (they take minutes to hours).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def bench(monkeypatch):
    """Import ``benchmarks/<name>.py`` as its command line does (its folder first)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str):
        return importlib.import_module(name)

    return load


@pytest.mark.parametrize("script", SCRIPTS)
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
