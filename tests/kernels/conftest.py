"""Make ``from jaxprune import kernels`` work before packaging exists.

``kernels/`` is mapped to ``jaxprune.kernels`` by pyproject's ``package-dir``; in a source checkout
without an editable install that mapping is missing, so load ``<repo>/kernels`` under that name.
(Never import it as a top-level ``kernels``: that name belongs to the HF kernels hub.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ensure_jaxprune_kernels() -> None:
    try:
        importlib.import_module("jaxprune.kernels")
        return
    except ImportError:
        pass
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    parent = importlib.import_module("jaxprune")
    spec = importlib.util.spec_from_file_location(
        "jaxprune.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["jaxprune.kernels"] = module
    spec.loader.exec_module(module)
    parent.kernels = module


_ensure_jaxprune_kernels()
