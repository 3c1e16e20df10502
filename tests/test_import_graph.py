"""The project's import graph: no cycles, and the layering DESIGN.md promises.

Every `import` / `from ... import` in every module of compression/, evolve/ and search/ is an
edge, those inside functions included (a lazy import is still a dependency); only the lines
under `if __name__ == "__main__":` (they run when a module is a script) and `if TYPE_CHECKING:`
(never run) are left out. A
`from package import name` is an edge to `package.name` when that is a module, else to the
package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compression", "evolve", "search")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` (script code) or `if TYPE_CHECKING:` (annotations only)."""
    if not isinstance(node, ast.If):
        return False
    if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return True
    return isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"


def imported_names(path: Path, name: str, modules: set[str] | None = None) -> set[str]:
    """Every module `path` imports, relative imports resolved; `from pkg import x` counts as
    importing `pkg.x` when `modules` holds it, else `pkg`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if modules is not None and sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {t for t in imported_names(path, name, set(modules)) if t in modules and t != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("package, forbidden", [("compression", ("search", "evolve")), ("evolve", ("search", "compression"))])
def test_layering(package, forbidden):
    offenders = [f"{name} imports {target}"
                 for name, path in project_modules().items() if name.split(".")[0] == package
                 for target in imported_names(path, name) if target.split(".")[0] in forbidden]
    assert offenders == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
