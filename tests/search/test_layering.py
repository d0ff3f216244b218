"""Search's layering, read from the source: no import circles, strategies below the orchestrator."""

from __future__ import annotations

import ast
from pathlib import Path

from service.search.registry import STRATEGIES

SERVICE = Path(__file__).resolve().parents[2] / "service"
# The packages whose seams the search path crosses: none may reach back into search.
SEARCH_NEIGHBOURS = ("service.graph", "service.hashing", "service.text")
# Modules that order others about: only the HTTP edge and the orchestrator may import them.
ORCHESTRATORS = ("service.search.service", "service.search.registry")


def module_name(path: Path) -> str:
    """`service/search/types.py` -> `service.search.types`."""
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import, wherever it is written."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, in_function))
                # `from service.text import sentence` imports the module service.text.sentence.
                found.extend((f"{child.module}.{alias.name}", child.lineno, in_function)
                             for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def service_graph() -> dict[str, set[str]]:
    """Module -> the service modules it imports (function-level and TYPE_CHECKING ones too)."""
    files = {module_name(p): p for p in SERVICE.rglob("*.py")}
    return {name: {m for m, _, _ in imports_of(path) if m in files and m != name}
            for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_no_search_module_is_on_an_import_circle() -> None:
    graph = service_graph()
    circles = sorted(m for m in graph if m.startswith("service.search")
                     and m in reachable(graph, m))
    assert circles == []


def test_the_neighbouring_packages_never_import_search() -> None:
    graph = service_graph()
    back = sorted((m, t) for m, targets in graph.items() if m.startswith(SEARCH_NEIGHBOURS)
                  for t in targets if t.startswith("service.search"))
    assert back == []


def test_nothing_below_the_orchestrator_imports_it() -> None:
    graph = service_graph()
    above = {"service.search.service", "service.api.search"}
    wrong = sorted((m, t) for m, targets in graph.items() if m not in above
                   for t in targets if t in ORCHESTRATORS)
    assert wrong == []


def explained(lines: list[str], line: int) -> bool:
    """Whether an import has a comment on its line or above its block of imports."""
    index = line - 1
    if "#" in lines[index]:
        return True
    while index > 0 and lines[index - 1].strip().startswith(("from ", "import ")):
        index -= 1
    return index > 0 and lines[index - 1].strip().startswith("#")


def test_imports_inside_functions_say_why() -> None:
    unexplained = []
    for path in sorted((SERVICE / "search").rglob("*.py")):
        lines = path.read_text().splitlines()
        unexplained += [f"{path.relative_to(SERVICE)}:{line} {module}"
                        for module, line, in_function in imports_of(path)
                        if in_function and not explained(lines, line)]
    assert sorted(set(unexplained)) == []


def test_every_strategy_module_is_in_the_registry() -> None:
    modules = {p.stem for p in (SERVICE / "search" / "strategies").glob("*.py")} - {"__init__"}
    assert {fn.__module__.rsplit(".", 1)[-1] for fn in STRATEGIES.values()} == modules
