"""The package's import graph (``scripts/import_graph.py``, read from the source with ``ast``) is what the
README's design section draws: imports point down the layers, no cycle, no function-local import of a
jaxprune module, argparse only in the command layer, no private name imported across packages."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
ig = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = ig  # dataclasses look their module up there
_spec.loader.exec_module(ig)


@pytest.fixture(scope="module")
def graph():
    return ig.build_graph()


def test_graph_sees_every_module_and_the_known_edges(graph):
    assert len(graph.modules) == len(list((REPO / "jaxprune").rglob("*.py"))) + len(list((REPO / "kernels").rglob("*.py")))
    # a few edges the code is known to have, so that a parser that finds nothing cannot pass
    assert "jaxprune.kernels" in graph.edges["jaxprune.layers"]
    assert "jaxprune.ops.int8" in graph.edges["jaxprune.layers"]
    assert "jaxprune.prune.importance" in graph.edges["jaxprune.prune.loraprune"]
    assert "jaxprune.runs" in graph.edges["jaxprune.commands.finetune"]


def test_no_import_cycle(graph):
    assert ig.cycles(graph) == []


def test_imports_point_down_the_layers(graph):
    assert ig.upward_edges(graph) == []


def test_no_function_local_import_of_jaxprune_or_light_packages(graph):
    assert graph.local_imports == []


def test_only_commands_read_argparse_and_no_private_names_cross_packages(graph):
    assert set(graph.importers["argparse"]) <= {m for m in graph.modules if ig.layer_of(m) == len(ig.LAYERS) - 1}
    assert graph.private_imports == []


def test_the_checks_catch_a_cycle_an_upward_import_and_a_local_import(tmp_path, monkeypatch):
    """The detector on a made-up package: a <-> b cycle, layers importing commands, a lazy jaxprune import."""
    pkg = tmp_path / "jaxprune"
    (pkg / "commands").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    files = {
        "__init__.py": "",
        "errors.py": "from .layers import Linear\n",          # base -> layers: upward
        "layers.py": "from .errors import UserError\n",       # ... and a cycle with errors
        "model.py": "def f():\n    from . import layers\n",  # function-local
        "commands/__init__.py": "",
        "commands/common.py": "import argparse\nfrom ..model import _private\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.setattr(ig, "REPO", tmp_path)
    g = ig.build_graph(tmp_path)
    assert ig.cycles(g) == [["jaxprune.errors", "jaxprune.layers"]]
    assert ("jaxprune.errors", "jaxprune.layers") in ig.upward_edges(g)
    assert [(m, d) for m, _, d in g.local_imports] == [("jaxprune.model", "jaxprune.layers")]
    assert [p for _, _, p in g.private_imports] == ["jaxprune.model._private"]
