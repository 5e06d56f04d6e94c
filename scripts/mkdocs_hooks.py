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


class ExampleSections(griffe.Extension):
    """Read a Google-style ``Example:`` section as griffe's ``Examples:``.

    The package's docstrings title their doctests ``Example:`` (singular), which
    griffe renders as a Markdown admonition: the ``>>>`` lines would then be parsed
    as Markdown (``x[0]["lr"]`` as a reference link). As an examples section they
    are rendered as code. Registered in ``mkdocs.yml`` under the Python handler's
    ``extensions``.
    """

    _TITLE = re.compile(r"^Example:$", re.MULTILINE)

    def on_object(self, *, obj, loader, **kwargs) -> None:
        """Retitle the object's ``Example:`` section before it is parsed."""
        if obj.docstring is not None:
            obj.docstring.value = self._TITLE.sub("Examples:", obj.docstring.value)
