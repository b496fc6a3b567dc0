"""Plugins: modules outside jaxprune that register methods (``prune.registry.register_structured`` ...).

    jaxprune prune MODEL --plugin my_scores.py --method my-score ...     # a file
    jaxprune prune MODEL --plugin my_package.scores --method my-score    # an importable module

An installed package can also declare them, and every command loads them::

    [project.entry-points."jaxprune.methods"]
    my-score = "my_package.scores"

Loading a plugin imports it once; its registrations are what it adds. A file or module that cannot be
imported is one UserError line naming it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from .errors import UserError

ENTRY_POINT_GROUP = "jaxprune.methods"
_LOADED: set[str] = set()


def load_plugin(spec: str) -> None:
    """Import ``spec``: a ``.py`` file (path) or a dotted module name. Importing twice is a no-op."""
    path = Path(spec)
    key = str(path.resolve()) if spec.endswith(".py") else spec
    if key in _LOADED:
        return
    try:
        if spec.endswith(".py"):
            if not path.is_file():
                raise UserError("no such file", field="plugin", value=spec)
            name = f"jaxprune_plugin_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses look their module up there
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except UserError:
        raise
    except Exception as e:  # a plugin's own error: one line naming it
        raise UserError(f"{type(e).__name__}: {e}", field="plugin", value=spec) from None
    _LOADED.add(key)


def load_entry_point_plugins() -> None:
    """Import every module declared in the ``jaxprune.methods`` entry-point group."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        load_plugin(ep.module)


def plugin_args(argv: list[str]) -> list[str]:
    """The values of ``--plugin X`` / ``--plugin=X`` in ``argv`` (read before the parser is built, so the
    plugins' methods are among its choices)."""
    out = []
    for i, a in enumerate(argv):
        if a == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--plugin="):
            out.append(a.split("=", 1)[1])
    return out
