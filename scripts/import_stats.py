"""Import statistics of shiva_export/ from its AST (the numbers issue 18's closing note asks for).

    python scripts/import_stats.py [--list]

Prints: package-level import cycles (strongly connected components of the package graph, function-level
imports included, TYPE_CHECKING blocks excluded), function-level imports split into those of shiva_export modules,
of optional heavy packages (legitimately lazy) and of other packages, and import lines that take another
module's private ``_name``. ``--list`` prints every function-level shiva_export import and private-name import.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "shiva_export"
OPTIONAL = {"onnxruntime", "tensorrt", "tensorrt_rtx", "ray", "peft", "matplotlib", "polygraphy"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def enclosing(node: ast.AST, parents: dict) -> tuple[bool, bool]:
    """(inside a function, inside an ``if TYPE_CHECKING`` block)."""
    in_func = in_tc = False
    while node in parents:
        node = parents[node]
        in_func |= isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        in_tc |= isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    return in_func, in_tc


def package(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else "<root>"


def scan():
    edges: dict[str, set[str]] = defaultdict(set)
    deferred: dict[str, list] = {"shiva_export": [], "optional": [], "other": []}
    private = []
    for path in sorted(PKG.rglob("*.py")):
        mod, is_pkg = module_name(path), path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets, names = [a.name for a in node.names], []
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, node, is_pkg)
                names = [a.name for a in node.names]
                targets = [base] + [f"{base}.{n}" for n in names]
            else:
                continue
            in_func, in_tc = enclosing(node, parents)
            where = (str(path.relative_to(ROOT)), node.lineno, ast.unparse(node))
            if in_func:
                top = targets[0].split(".")[0]
                deferred[
                    "shiva_export" if top == "shiva_export" else "optional" if top in OPTIONAL else "other"
                ].append(where)
            if isinstance(node, ast.ImportFrom) and targets[0].startswith("shiva_export") and targets[0] != mod:
                if any(n.startswith("_") and not n.startswith("__") for n in names):
                    private.append(where)
            if not in_tc:
                for t in targets:
                    if t.startswith("shiva_export.") and package(t) != package(mod):
                        edges[package(mod)].add(package(t))
    return edges, deferred, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list every counted import")
    args = ap.parse_args()
    edges, deferred, private = scan()
    mutual = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    print("package import cycles (SCCs):", cycles(edges) or "none")
    print("packages importing each other:", mutual or "none")
    total = sum(len(v) for v in deferred.values())
    print(
        f"function-level imports: {total} (shiva_export modules {len(deferred['shiva_export'])}, "
        f"optional heavy packages {len(deferred['optional'])}, other packages {len(deferred['other'])})"
    )
    print("import lines taking another module's private names:", len(private))
    if args.list:
        for tag, rows in (("deferred", deferred["shiva_export"]), ("private", private)):
            for path, line, text in rows:
                print(f"  {tag} {path}:{line}: {text}")


if __name__ == "__main__":
    main()
