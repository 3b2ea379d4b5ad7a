"""The import graph of ``devec_core``, read from the source (nothing is imported or run).

    python docs/import_graph.py              # Mermaid graph of the units (docs/ARCHITECTURE.md's figure)
    python docs/import_graph.py --lazy       # also list imports of siblings made inside functions
    python docs/import_graph.py --modules    # one node per module instead of per unit
    python docs/import_graph.py --update docs/ARCHITECTURE.md   # rewrite the figure in that file

A *unit* is a top-level module (``devec_core/pool.py`` → ``pool``) or a subpackage
(``devec_core/formats/…`` → ``formats``). Edges are module-level imports between units; imports
inside functions are "lazy" and drawn dotted with ``--lazy``. ``tests/test_layers.py`` uses
``graph()`` to check that the dependencies point one way.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "devec_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, modules: set[str]) -> list[str]:
    """Modules a ``from … import …`` statement reads: ``mod.name`` where that is a module, else ``mod``."""
    if node.level:
        base = current.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1]


def _known(modules: set[str], name: str) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def graph(unit_level: bool = True) -> dict[str, dict[str, str]]:
    """{importer: {imported: "module" | "lazy"}} for every module (or unit) of the package.

    "module": imported at module level (also under ``if``/``try`` at the top); "lazy": only
    inside a function or method. Self-imports within a unit are left out at the unit level.
    """
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {_module_name(f) for f in files}
    out: dict[str, dict[str, str]] = {}
    for f in files:
        me = _module_name(f)
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        edges: dict[str, str] = {}

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    names = _resolve(me, f.name == "__init__.py", child, modules)
                for n in names:
                    target = _known(modules, n)
                    if target is None or target == me:
                        continue
                    kind = "lazy" if in_function else "module"
                    if edges.get(target) != "module":
                        edges[target] = kind
                visit(child, inner)

        visit(tree, False)
        out[me] = edges
    if not unit_level:
        return out
    units: dict[str, dict[str, str]] = {}
    for me, edges in out.items():
        u = _unit(me)
        if u is None:
            continue
        dst = units.setdefault(u, {})
        for target, kind in edges.items():
            t = _unit(target)
            if t is None or t == u:
                continue
            if dst.get(t) != "module":
                dst[t] = kind
    return units


def cycles(g: dict[str, dict[str, str]], kinds=("module",)) -> list[list[str]]:
    """Strongly connected groups of more than one node, over edges of the given kinds."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, k in g.get(v, {}).items():
            if k not in kinds:
                continue
            if w not in index:
                strong(w)
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def layers(g: dict[str, dict[str, str]]) -> dict[str, int]:
    """Layer of each node over module-level edges: 0 imports no sibling; else 1 + its deepest import."""
    memo: dict[str, int] = {}

    def depth(v, seen=()):
        if v in memo:
            return memo[v]
        if v in seen:  # a cycle: cut it here (cycles() reports it)
            return 0
        deps = [w for w, k in g.get(v, {}).items() if k == "module"]
        memo[v] = 1 + max((depth(w, seen + (v,)) for w in deps), default=-1)
        return memo[v]

    for v in g:
        depth(v)
    return memo


def mermaid(g: dict[str, dict[str, str]], lazy: bool = False) -> str:
    """The graph as Mermaid, nodes grouped by layer (bottom layer last)."""
    lay = layers(g)
    lines = ["graph TD"]
    for level in sorted(set(lay.values()), reverse=True):
        nodes = sorted(v for v in g if lay[v] == level)
        lines.append(f"  subgraph L{level}[\"layer {level}\"]")
        lines += [f"    {v.replace('.', '_')}[{v}]" for v in nodes]
        lines.append("  end")
    for v in sorted(g):
        for w, k in sorted(g[v].items()):
            if k == "module":
                lines.append(f"  {v.replace('.', '_')} --> {w.replace('.', '_')}")
            elif lazy:
                lines.append(f"  {v.replace('.', '_')} -.-> {w.replace('.', '_')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lazy", action="store_true", help="draw imports made inside functions (dotted) and list them")
    ap.add_argument("--modules", action="store_true", help="one node per module, not per unit")
    ap.add_argument("--update", type=Path, metavar="MARKDOWN", help="replace the first mermaid block of this file with the graph")
    args = ap.parse_args()
    g = graph(unit_level=not args.modules)
    if args.update:
        text = args.update.read_text(encoding="utf-8")
        start = text.index("```mermaid\n")
        end = text.index("```", start + len("```mermaid\n"))
        args.update.write_text(text[:start] + "```mermaid\n" + mermaid(g, lazy=args.lazy) + "\n" + text[end:], encoding="utf-8")
        print(f"updated the graph in {args.update}")
        return
    print("```mermaid")
    print(mermaid(g, lazy=args.lazy))
    print("```")
    cyc = cycles(g)
    if cyc:
        print("\nmodule-level cycles: " + "; ".join(" ↔ ".join(c) for c in cyc))
    if args.lazy:
        lazy = sorted((v, w) for v, es in g.items() for w, k in es.items() if k == "lazy")
        print(f"\nimports inside functions ({len(lazy)}): " + ", ".join(f"{v} → {w}" for v, w in lazy))


if __name__ == "__main__":
    main()
