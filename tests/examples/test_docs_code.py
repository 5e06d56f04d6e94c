"""The code on the documentation's user-journey pages runs as printed.

Every fenced block whose info string is exactly ``python`` on a page of
``docs/journeys/`` is run, the page's blocks in order in one fresh interpreter (a
page's blocks continue each other), in a temporary directory. Blocks meant only to
be read (they need a finished recipe run or a long training) are fenced as ``py``
and are not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs" / "journeys").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def test_every_journey_has_runnable_code():
    with_code = [p.name for p in PAGES if blocks(p)]
    assert len(PAGES) == 4
    assert set(with_code) >= {
        "swap-optimizer.md",
        "measure-noise.md",
        "track-sharpness.md",
    }


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sklearn", "matplotlib")),
    reason="needs scikit-learn and matplotlib (the recipes extra)",
)
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.stem)
def test_journey_code_runs(page, tmp_path):
    code = "\n\n".join(blocks(page))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_recipe_is_listed_where_a_reader_chooses_one():
    """Each script in recipes/ has a row in the journey's table and the overview's."""
    recipes = sorted(
        p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_")
    )
    assert recipes
    journey = (ROOT / "docs" / "journeys" / "reproduce-a-paper.md").read_text(
        encoding="utf-8"
    )
    overview = (ROOT / "docs" / "recipes" / "index.md").read_text(encoding="utf-8")
    for name in recipes:
        assert f"[`{name}.py`](../recipes/{name}.md)" in journey, name
        assert f"[{name}]({name}.md)" in overview, name
