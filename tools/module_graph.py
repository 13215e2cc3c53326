"""Which ttsearch subpackage imports which, read from the source with ``ast`` (nothing is imported).

    python tools/module_graph.py [--root PATH]

Prints one line per package (``ttsearch.search -> ttsearch.engine, ttsearch.ops``; a top-level
module such as ``ttsearch/api.py`` counts as a package of its own), then flags:

- upward imports: two packages that import each other, or a package below the entry points
  importing one of them (``ttsearch.api``, ``ttsearch.serve``, ``ttsearch.cli``; ``cli`` may
  import ``serve`` and ``api``, ``serve`` may import ``api``);
- module-level import cycles: modules that import each other, directly or around a loop, with
  imports run at import time (imports inside functions and the implicit import of a parent
  package's ``__init__`` do not count);
- type-annotation loops, listed apart: loops closed by an import under ``if TYPE_CHECKING:``,
  where a type annotation names a module that imports this one. They import nothing at run
  time and do not fail the check.

The package graph counts every import, deferred ones included: a function-level import is
still a dependency. Exit status 1 when an upward import or an import cycle is found, so a
check can run it.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections import defaultdict

PACKAGE = "ttsearch"
# entry points, top-down: each may import the ones after it, nothing below may import any
ENTRY_POINTS = ["ttsearch.cli", "ttsearch.serve", "ttsearch.api"]
# the package's own __init__ and ``python -m ttsearch`` sit above everything
ROOTS = {"ttsearch", "ttsearch.__main__"}


def find_modules(root: str) -> dict[str, str]:
    """Module name -> file path for every .py file under ``root/ttsearch`` (following the
    ``ttsearch/kernels`` link to the top-level kernels/)."""
    modules = {}
    base = os.path.join(root, PACKAGE)
    for directory, dirs, files in os.walk(base, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(directory, root)
        parts = rel.split(os.sep)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            module = ".".join(parts if stem == "__init__" else parts + [stem])
            modules[module] = os.path.join(directory, name)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(node, kind) for every import statement in the module, kind one of "eager" (run at
    import time), "typing" (module level, under ``if TYPE_CHECKING:``) or "deferred"."""
    def walk(node, eager):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, eager
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "deferred")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing" if eager == "eager" else eager)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), eager)
            else:
                yield from walk(child, eager)
    yield from walk(tree, "eager")


def resolve(module: str, is_package: bool, node, modules: dict[str, str]) -> set[str]:
    """The ttsearch modules one import statement names."""
    targets = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
        return targets
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
        return targets
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            targets.add(f"{source}.{alias.name}")  # a submodule
        elif source in modules:
            targets.add(source)  # a name defined in the module (or package __init__)
    if not targets and source in modules:
        targets.add(source)
    return targets


def package_of(module: str) -> str:
    """``ttsearch.engine.engine`` -> ``ttsearch.engine``; ``ttsearch.api`` stays itself."""
    return ".".join(module.split(".")[:2])


def build(root: str):
    modules = find_modules(root)
    all_edges = defaultdict(set)     # module -> modules, every import
    module_edges = defaultdict(set)  # module -> modules, module-level imports (TYPE_CHECKING included)
    eager_edges = defaultdict(set)   # module -> modules, imports run at import time
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = os.path.basename(path) == "__init__.py"
        for node, kind in _imports(tree):
            for target in resolve(module, is_package, node, modules):
                if target == module:
                    continue
                all_edges[module].add(target)
                if kind != "deferred":
                    module_edges[module].add(target)
                if kind == "eager":
                    eager_edges[module].add(target)
    return modules, all_edges, module_edges, eager_edges


def package_graph(modules, all_edges):
    graph = defaultdict(set)
    for module in modules:
        graph[package_of(module)]
    for module, targets in all_edges.items():
        source = package_of(module)
        for target in targets:
            dest = package_of(target)
            if dest != source:
                graph[source].add(dest)
    return graph


def upward_imports(graph) -> list[str]:
    found = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if a in ROOTS or b in ROOTS:
                continue
            if a < b and a in graph[b]:
                found.append(f"{a} <-> {b} (each imports the other)")
            if b in ENTRY_POINTS and not (a in ENTRY_POINTS and ENTRY_POINTS.index(a) < ENTRY_POINTS.index(b)):
                found.append(f"{a} -> {b} (a lower layer imports an entry point)")
    return found


def cycles(eager_edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(eager_edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(eager_edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the repository root (default: this file's)")
    args = parser.parse_args(argv)
    modules, all_edges, module_edges, eager_edges = build(args.root)
    graph = package_graph(modules, all_edges)
    for package in sorted(graph):
        targets = ", ".join(sorted(graph[package])) or "-"
        print(f"{package} -> {targets}")
    upward = upward_imports(graph)
    eager_loops = cycles(eager_edges)
    typing_loops = [c for c in cycles(module_edges) if not any(set(e) <= set(c) for e in eager_loops)]
    print()
    print(f"upward imports: {len(upward)}")
    for line in upward:
        print(f"  {line}")
    print(f"module-level import cycles: {len(eager_loops)}")
    for component in eager_loops:
        print(f"  {' <-> '.join(component)}")
    # a loop closed only by an import under TYPE_CHECKING: a type annotation names a module
    # that imports this one; nothing is imported in a loop when the program runs
    print(f"type-annotation loops (no import at run time): {len(typing_loops)}")
    for component in typing_loops:
        print(f"  {' <-> '.join(component)}")
    return 1 if upward or eager_loops else 0

if __name__ == "__main__":
    sys.exit(main())
