"""The import graph, read from the source: no cycle between packages, function bodies included."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from service.config import PROJECT_ROOT

ROOTS = ("service", "workers")


def module_name(path: Path) -> str:
    """`service/search/service.py` -> `service.search.service`."""
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The package a module belongs to: `service.search.strategies.exact` -> `service.search`."""
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    return ".".join(parts[:2])


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """Every module of ours that a file imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and _type_checking_only(node) for n in ast.walk(node)}
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ROOTS}


def package_graph() -> dict[str, set[str]]:
    """Package -> the other packages its modules import."""
    graph: dict[str, set[str]] = defaultdict(set)
    for root in ROOTS:
        for path in sorted((PROJECT_ROOT / root).rglob("*.py")):
            source = unit(module_name(path))
            graph[source]
            for target in imports_of(path):
                if unit(target) != source:
                    graph[source].add(unit(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    path = PROJECT_ROOT / "service" / "search" / "service.py"
    assert any(unit(m) != "service.search" for m in imports_of(path))


def test_no_import_cycle_between_packages() -> None:
    found = cycles(package_graph())
    assert found == [], f"import cycles between packages: {found}"


def test_service_never_imports_workers() -> None:
    graph = package_graph()
    offenders = sorted(p for p, targets in graph.items() if p != "workers" and "workers" in targets)
    assert offenders == []


def test_long_modules_say_why_and_no_comment_names_an_issue() -> None:
    """Modules over 300 lines say why in their first docstring; history belongs to git."""
    import re

    too_long, history = [], []
    for root in (*ROOTS, "tests"):
        for path in sorted((PROJECT_ROOT / root).rglob("*.py")):
            text = path.read_text()
            if root != "tests" and text.count("\n") > 300:
                doc = ast.get_docstring(ast.parse(text)) or ""
                if "Over 300 lines" not in doc:
                    too_long.append(str(path.relative_to(PROJECT_ROOT)))
            if re.search(r"\b[Ii]ssues? [0-9]+\b", text):
                history.append(str(path.relative_to(PROJECT_ROOT)))
    assert too_long == [], f"over 300 lines without a reason: {too_long}"
    assert history == [], f"name an issue number: {history}"
