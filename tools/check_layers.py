"""Check that the wasi package imports only downwards through its layers, with no cycle.

Usage: python tools/check_layers.py [--max-layer N] [SRC]

SRC is the folder holding the ``wasi`` package (default: src next to this file's folder).
Every import counts, wherever it is written: at module level, inside a function, under
``if TYPE_CHECKING:``, and the module names of a lazy ``_EXPORTS = {name: "module"}`` table.
``from package import name`` counts as importing the submodule ``package.name`` when there is
one, else the package. A module may import modules of its own layer (without a cycle) and of
lower layers only. Prints each violation and each cycle, then exits 1 if there was any.

``--max-layer N`` checks only the modules of layers 0 to N (their imports, and the cycles they
are part of); without it every module is checked, and a module missing from the map is an error.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# The layers, lowest first. A name covers the module itself and, with ".*", every module below it;
# the most specific entry wins.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("wasi.config", "wasi.files", "wasi.guards"),
    1: ("wasi.functional",),
    2: ("wasi.autograd",),
    3: ("wasi.modules",),
    # the multiple-choice knapsack sits with fit: fit's parameter budget (WASIConfig.param_budget, which
    # convert honours) is solved by it; it imports nothing of wasi
    # distributed: which WASI buffers each process keeps under DDP; convert marks them
    4: ("wasi.calibrate.fit", "wasi.calibrate.knapsack", "wasi.distributed"),
    # lm: chunked cross-entropy (plain torch); optim: optimizers that know WASI layers; federated:
    # factor-correct averaging of converted models (Flower only inside its strategy)
    5: ("wasi.convert", "wasi.checkpoint", "wasi.memory", "wasi.lm", "wasi.optim", "wasi.federated"),
    # the ONNX export of a converted model is library (wasi.export_onnx); scoring runs is not
    6: ("wasi", "wasi.calibrate", "wasi.calibrate.*", "wasi.export", "wasi.export.onnx", "wasi.export.quantize"),
    7: ("wasi.data", "wasi.data.*", "wasi.models", "wasi.models.*"),
    8: ("wasi.training", "wasi.training.*"),
    9: ("wasi.bench", "wasi.bench.*", "wasi.export.predict"),
    # the command fronts
    10: ("wasi.cli", "wasi.cli.*", "wasi.__main__"),
}


def layer_of(module: str) -> int | None:
    """The layer of a module by the most specific entry of :data:`LAYERS` (None: not in the map)."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for layer, names in LAYERS.items():
        for name in names:
            if name.endswith(".*"):
                prefix = name[:-2]
                if module.startswith(prefix + "."):
                    score = 2 * len(prefix)
                else:
                    continue
            elif module == name:
                score = 2 * len(name) + 1
            else:
                continue
            if best is None or score > best[0]:
                best = (score, layer)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    path: Path
    line: int
    where: str  # "module level" or "in <function>"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted((root / "wasi").rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    # the longest prefix of a dotted name that is a module of the package
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: Path, modules: dict[str, Path]) -> None:
        self.source, self.path, self.modules = source, path, modules
        self.is_package = path.name == "__init__.py"
        self.scope: list[str] = []
        self.found: list[Import] = []

    def _add(self, target: str | None, node: ast.AST) -> None:
        if target is None or target == self.source:
            return
        where = f"in {'.'.join(self.scope)}" if self.scope else "module level"
        self.found.append(Import(self.source, target, self.path, node.lineno, where))

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "wasi" or alias.name.startswith("wasi."):
                self._add(_resolve(alias.name, self.modules), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.source if self.is_package else self.source.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        if base != "wasi" and not base.startswith("wasi."):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else _resolve(base, self.modules), node)

    def visit_Assign(self, node: ast.Assign) -> None:
        # a lazy table of exports: {"name": "wasi.module"}
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets) and isinstance(
            node.value, ast.Dict
        ):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    self._add(_resolve(value.value, self.modules), value)
        self.generic_visit(node)


def collect_imports(root: Path) -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(root)
    found: list[Import] = []
    for name, path in modules.items():
        collector = _Collector(name, path, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found.extend(collector.found)
    return modules, found


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def check(root: Path, max_layer: int | None = None) -> list[str]:
    """Every problem found under ``root`` (the folder holding ``wasi``), one line each."""
    modules, imports = collect_imports(root)
    problems = []

    def checked(module: str) -> bool:
        layer = layer_of(module)
        return max_layer is None or (layer is not None and layer <= max_layer)

    if max_layer is None:
        problems += [f"{path}: module {name} is not in the layer map" for name, path in modules.items()
                     if layer_of(name) is None]
    for imp in imports:
        if not checked(imp.source):
            continue
        low, high = layer_of(imp.source), layer_of(imp.target)
        if low is not None and high is not None and high > low:
            problems.append(f"{imp.path}:{imp.line}: {imp.source} (layer {low}) imports {imp.target} "
                            f"(layer {high}) {imp.where}")
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    for cycle in find_cycles(edges):
        if any(checked(m) for m in cycle):
            problems.append("import cycle: " + " <-> ".join(cycle))
    return list(dict.fromkeys(problems))  # one line per problem, in order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parent.parent / "src"),
                        help="the folder holding the wasi package (default: src)")
    parser.add_argument("--max-layer", type=int, default=None,
                        help="check only the modules of layers 0 to this one (default: all)")
    args = parser.parse_args(argv)
    root = Path(args.src)
    if (root / "__init__.py").is_file() and root.name == "wasi":
        root = root.parent  # given the package folder itself
    if not (root / "wasi" / "__init__.py").is_file():
        print(f"check_layers: no wasi package in {str(root)!r}", file=sys.stderr)
        return 2
    problems = check(root, args.max_layer)
    for line in problems:
        print(line)
    scope = "all layers" if args.max_layer is None else f"layers 0-{args.max_layer}"
    print(f"check_layers: {len(problems)} problem(s) in {scope}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
