"""mkdocs hook: a public name without a docstring is a build warning.

The API reference renders the modules below with mkdocstrings (static analysis by
griffe, no import of torch). mkdocstrings itself renders an undocumented object
silently, so this hook loads the same modules with griffe and logs one warning per
exported name (each module's ``__all__``), and per public method of an exported
class, that has no docstring. ``mkdocs build --strict`` turns warnings into a
failure.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import griffe

log = logging.getLogger("mkdocs.hooks.docstrings")

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("geoopt_sgd", "geoopt_sgd.testing", "geoopt_sgd.distributed")
# torch.nn.Module protocol methods, documented by torch
INHERITED_PROTOCOL = {"extra_repr"}


def _target(obj):
    return obj.final_target if obj.is_alias else obj


def missing_docstrings() -> list[str]:
    """Return the public names (``module.name[.method]``) without a docstring."""
    pkg = griffe.load(
        "geoopt_sgd",
        search_paths=[str(ROOT)],
        resolve_aliases=True,
        resolve_external=False,
    )
    missing = []
    for path in MODULES:
        module = pkg if path == "geoopt_sgd" else pkg[path.split(".", 1)[1]]
        for name in module.exports or ():
            obj = _target(module[name])
            if obj.is_attribute:
                continue  # documented in the module's or class's docstring
            if not obj.docstring:
                missing.append(f"{path}.{name}")
            if obj.is_class:
                for mname, member in obj.members.items():
                    if mname.startswith("_") or mname in INHERITED_PROTOCOL:
                        continue
                    m = _target(member)
                    if m.is_function and not m.docstring:
                        missing.append(f"{path}.{name}.{mname}")
    return missing


def on_pre_build(config, **kwargs) -> None:
    """Warn about every public name without a docstring."""
    for name in missing_docstrings():
        log.warning("public name without a docstring: %s", name)


class RestructuredTextToMarkdown(griffe.Extension):
    """Render the reStructuredText in the package's docstrings as Markdown.

    The docstrings are written for Python's ``help()`` and for doctests, in
    Google style with a little reStructuredText (torch's convention). Before
    griffe parses a docstring this extension rewrites, on a copy used only for
    the site:

    * an ``Example:`` section title to griffe's ``Examples:``, so doctests render
      as code (an ``Example:`` admonition would parse ``x[0]["lr"]`` as a
      Markdown reference link);
    * ``.. math::`` blocks to display math and ``:math:`x``` to inline math;
    * ``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``,
      ``:exc:`` roles to code spans;
    * ``.. note::`` to a note admonition, simple tables (rows of ``=``) to
      Markdown tables, and ``::`` literal blocks to code blocks.

    Registered in ``mkdocs.yml`` under the Python handler's ``extensions``.
    """

    _EXAMPLE = re.compile(r"^Example:$", re.MULTILINE)
    _ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
    _MATH_ROLE = re.compile(r":math:`([^`]+)`")

    def on_object(self, *, obj, loader, **kwargs) -> None:
        """Rewrite the object's docstring before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = self.convert(obj.docstring.value)

    def convert(self, text: str) -> str:
        """Return ``text`` with the reStructuredText constructs above rewritten."""
        text = self._EXAMPLE.sub("Examples:", text)
        text = self._MATH_ROLE.sub(lambda m: r"\(" + m.group(1) + r"\)", text)
        text = self._ROLE.sub(lambda m: "`" + m.group(1).split(".")[-1] + "`", text)
        lines = text.split("\n")
        out: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            indent = line[: len(line) - len(line.lstrip())]
            if stripped in (".. math::", ".. note::") or (
                stripped.endswith("::") and not stripped.startswith("..")
            ):
                block, i = self._indented_block(lines, i + 1, len(indent))
                if stripped == ".. math::":
                    body = "\n".join(block).strip("\n")
                    if "&" in body:
                        body = "\\begin{aligned}\n" + body + "\n\\end{aligned}"
                    out += [indent + "\\[", *[indent + b for b in body.split("\n")]]
                    out += [indent + "\\]", ""]
                elif stripped == ".. note::":
                    out += [indent + '!!! note ""']
                    out += ["    " + indent + b for b in block] + [""]
                else:  # a paragraph ending in "::" introduces a literal block
                    out += [line[:-1], "", indent + "```text"]
                    out += [indent + b for b in block] + [indent + "```", ""]
                continue
            if stripped and set(stripped) <= {"=", " "} and "==" in stripped:
                table, i = self._simple_table(lines, i)
                out += ["", *[indent + row for row in self._markdown_table(table)], ""]
                continue
            out.append(line)
            i += 1
        return "\n".join(out)

    @staticmethod
    def _indented_block(lines: list[str], i: int, indent: int) -> tuple[list, int]:
        """Collect the lines indented deeper than ``indent`` (dedented) from ``i``."""
        block: list[str] = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        while block and not block[0].strip():
            block.pop(0)
        depth = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
        return [b[depth:] for b in block], i

    @staticmethod
    def _markdown_table(table: list[str]) -> list[str]:
        """Turn a simple table's lines into Markdown table rows."""
        rule = table[0]
        cols = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
        rows = []
        for line in table:
            stripped = line.strip()
            if not stripped or set(stripped) <= {"=", " "}:
                continue
            cells = [
                line[a : (b if k < len(cols) - 1 else None)].strip()
                for k, (a, b) in enumerate(cols)
            ]
            rows.append("| " + " | ".join(cells) + " |")
        if rows:
            rows.insert(1, "|" + "---|" * len(cols))
        return rows

    @staticmethod
    def _simple_table(lines: list[str], i: int) -> tuple[list, int]:
        """Collect a reStructuredText simple table (three rule lines) from ``i``."""
        table, rules = [], 0
        while i < len(lines) and rules < 3:
            stripped = lines[i].strip()
            if stripped and set(stripped) <= {"=", " "}:
                rules += 1
            table.append(lines[i])
            i += 1
        return table, i
