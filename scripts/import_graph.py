"""The import graph of the ``jaxprune`` package (``kernels/`` included, as ``jaxprune.kernels``), read from the
source with ``ast``: every ``import`` statement, at module level or inside a function.

    python scripts/import_graph.py            # prints the layers, the edges that break them, cycles, local imports

``tests/test_import_graph.py`` asserts what the README's design section states: imports point one way
(down ``LAYERS``), no cycle, no function-local import of a jaxprune module, argparse only in the command
layer, no private name imported across packages.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The layers of the README's diagram, bottom first. A module may import from its own layer or below.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("jaxprune.kernels", "jaxprune.kernels.*")),
    ("base", ("jaxprune", "jaxprune.errors", "jaxprune.fileio", "jaxprune.ops", "jaxprune.ops.*", "jaxprune.config",
              "jaxprune.deci", "jaxprune.rope", "jaxprune.fixtures",
              "jaxprune.registry", "jaxprune.plugins", "jaxprune.meshes", "jaxprune.families", "jaxprune.families.*")),
    ("layers", ("jaxprune.layers",)),
    ("model", ("jaxprune.model", "jaxprune.weights", "jaxprune.partition", "jaxprune.quantize")),
    ("adapters", ("jaxprune.adapters", "jaxprune.adapters.*")),
    ("io", ("jaxprune.padding", "jaxprune.hf", "jaxprune.gguf_io", "jaxprune.gguf_reader", "jaxprune.gguf_families", "jaxprune.gguf_vocab", "jaxprune.llamacpp",
            "jaxprune.checkpoint", "jaxprune.load",
            "jaxprune.data", "jaxprune.evaluate", "jaxprune.generate", "jaxprune.sharding", "jaxprune.lm_eval_model",
            "jaxprune.lm_eval_tasks", "jaxprune.lm_tasks", "jaxprune.lm_tasks.*")),
    ("train", ("jaxprune.train", "jaxprune.train.*")),
    ("runs", ("jaxprune.runs",)),
    ("pretrain", ("jaxprune.pretrain", "jaxprune.pretrain.*")),
    ("prune", ("jaxprune.prune", "jaxprune.prune.*")),
    ("commands", ("jaxprune.commands", "jaxprune.commands.*", "jaxprune.cli")),
)
#: Third-party packages a function may import lazily: heavy and needed only on some paths.
LAZY_OK = {"torch", "transformers", "datasets", "matplotlib", "lm_eval"}


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    local_imports: list[tuple[str, int, str]] = field(default_factory=list)   # (module, line, imported)
    private_imports: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, "pkg._name")
    importers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # third-party -> modules


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts if rel.parts[0] != "kernels" else ("jaxprune", *rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rsplit(".", 1)[0]


def build_graph(repo: Path = REPO) -> ImportGraph:
    files = sorted((repo / "jaxprune").rglob("*.py")) + sorted((repo / "kernels").rglob("*.py"))
    g = ImportGraph({module_name(p): p for p in files})

    def resolve(name: str) -> str | None:
        while name and name not in g.modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in g.modules.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = package_of(mod, path)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [(f"{source}.{a.name}" if f"{source}.{a.name}" in g.modules else source, a.name)
                           for a in node.names]
            else:
                continue
            for target, name in targets:
                local = id(node) in in_function
                if not target.startswith("jaxprune"):
                    top = target.split(".")[0]
                    g.importers[top].add(mod)
                    if local and top not in LAZY_OK:
                        g.local_imports.append((mod, node.lineno, target))
                    continue
                dep = resolve(target)
                if dep is None or dep == mod:
                    continue
                g.edges[mod].add(dep)
                if local:
                    g.local_imports.append((mod, node.lineno, dep))
                dep_pkg = package_of(dep, g.modules[dep])
                if name and name.startswith("_") and not name.startswith("__") and dep_pkg != pkg:
                    g.private_imports.append((mod, node.lineno, f"{dep}.{name}"))
    return g


def cycles(g: ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(g.modules):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise KeyError(f"{module} is in no layer of LAYERS (add it to scripts/import_graph.py and the README)")


def upward_edges(g: ImportGraph) -> list[tuple[str, str]]:
    """Imports that point up the layer order (a lower layer importing a higher one)."""
    return sorted((a, b) for a, deps in g.edges.items() for b in deps if layer_of(b) > layer_of(a))


def main() -> int:
    g = build_graph()
    for i, (name, _) in enumerate(LAYERS):
        mods = sorted(m for m in g.modules if layer_of(m) == i)
        print(f"{i} {name:11s} {', '.join(m.removeprefix('jaxprune.') for m in mods)}")
    problems = {"upward imports": upward_edges(g), "cycles": cycles(g), "function-local imports": g.local_imports,
                "private names across packages": g.private_imports,
                "argparse outside commands": sorted(m for m in g.importers.get("argparse", ())
                                                    if LAYERS[layer_of(m)][0] != "commands")}
    for what, items in problems.items():
        print(f"{what}: {len(items)}" + "".join(f"\n  {x}" for x in items))
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
