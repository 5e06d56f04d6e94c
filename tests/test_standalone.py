"""The repository stands alone: no file points to material outside it.

A clone has no sibling folders, so a reference to one (a relative path that leaves
the repository, or the name of a specification file that is not shipped) is a
dead end for a reader. The science lives in ``docs/``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match its own patterns.
_OUTSIDE = "shared"
PATTERNS = [
    re.escape("../" + _OUTSIDE),
    re.escape(_OUTSIDE + "/science"),
    re.escape("SP" + "EC.md"),
    r"\b" + "SP" + r"EC\b",  # the specification's name as a citation ("... R10")
]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".sh", ".cfg", ""}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # an sdist: no git
        skip = {".git", ".venv", "runs", "site", "build", "dist", "__pycache__"}
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]


def test_no_reference_outside_the_repository():
    pattern = re.compile("|".join(PATTERNS))
    hits = []
    for path in _tracked_files():
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not hits, f"{len(hits)} references outside the repository:\n" + "\n".join(
        hits[:60]
    )
