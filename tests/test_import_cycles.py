"""No import circles among the project's own modules.

The graph is read from the source with ``ast`` (nothing is imported), and it counts every import:
at module level, inside a function, under ``if TYPE_CHECKING``. A function-local import that closes
a loop still makes two modules one tangle, which is why it is no way out. ``from pkg import name``
is an import of ``pkg.name`` when that is a module of ours, else of ``pkg``. Tests, migrations and
virtual environments are left out.

Also a script for ``make lint`` (no Django, no Redis): ``python tests/test_import_cycles.py [root]``
prints each circle and exits 1 when there is one.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"tests", "migrations", "node_modules", "__pycache__", "venv", "staticfiles"}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the project (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in parts[:-1]):
            continue
        names = [*parts[:-1], path.stem]
        if names[-1] == "__init__":
            names.pop()
        if names:
            found[".".join(names)] = path
    return found


def imported_modules(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The project modules that module ``name`` (at ``path``) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, without recursion):
    each is a set of modules that all reach one another through imports, sorted by name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return sorted(cycles)


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_project_has_no_import_cycles():
    cycles = import_cycles(import_graph(ROOT))
    assert not cycles, f"{len(cycles)} import circle(s) among the project's modules:\n{describe(cycles)}"


def test_a_function_local_import_that_closes_a_loop_is_a_cycle(tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "models.py").write_text("def publish():\n    from shop import mirror\n")
    (tmp_path / "shop" / "mirror.py").write_text("from shop.api.serializers import OrderSerializer\n")
    (tmp_path / "shop" / "api").mkdir()
    (tmp_path / "shop" / "api" / "__init__.py").write_text("")
    (tmp_path / "shop" / "api" / "serializers.py").write_text("from ..models import Order\n")
    (tmp_path / "shop" / "plain.py").write_text("import shop.models\n")

    assert import_cycles(import_graph(tmp_path)) == [["shop.api.serializers", "shop.mirror", "shop.models"]]


def test_tests_and_migrations_are_not_part_of_the_graph(tmp_path):
    for folder in ("app", "app/migrations", "tests"):
        (tmp_path / folder).mkdir()
    (tmp_path / "app" / "models.py").write_text("import app.migrations.m0001\n")
    (tmp_path / "app" / "migrations" / "m0001.py").write_text("import app.models\n")
    (tmp_path / "tests" / "test_a.py").write_text("import tests.test_b\n")
    (tmp_path / "tests" / "test_b.py").write_text("import tests.test_a\n")

    assert import_cycles(import_graph(tmp_path)) == []


if __name__ == "__main__":
    found = import_cycles(import_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
    if found:
        print(f"{len(found)} import circle(s) among the project's modules:\n{describe(found)}", file=sys.stderr)
    sys.exit(1 if found else 0)
