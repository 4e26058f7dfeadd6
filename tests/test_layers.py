"""The package's layers (STYLE.md rules 13-15), read from the source with `ast`: no import cycle, counting
imports inside functions; no function-level import of the package's own modules (they hide cycles); no stage
imports another stage, and the data layer imports no stage (what they share lives a layer below)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alignment"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str:
    """The longest prefix of a dotted name that is a module of the package (`a.b.func` -> `a.b`)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def internal_imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of the package's own modules."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((_known(a.name), child.lineno, in_function) for a in child.names
                           if a.name.split(".")[0] == "alignment")
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[:len(package) - child.level + 1] + [child.module or ""]).strip(".") \
                    if child.level else child.module
                if base.split(".")[0] == "alignment":
                    out.extend((_known(f"{base}.{a.name}"), child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (anywhere in it), plus the packages whose __init__ an import runs."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for target, _, _ in internal_imports(module):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[module] = {t for t in targets if t in MODULES and t != module and not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_checker_finds_a_cycle_and_its_members():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_level_import_of_the_package():
    """Heavy optional engines (torch on the fast CLI path, deepspeed, vllm, matplotlib, ...) may be imported
    inside a function; the package's own modules are imported at the top, where their dependency shows."""
    found = sorted({f"{MODULES[m].relative_to(REPO)}:{line} imports {target}"
             for m in MODULES for target, line, in_function in internal_imports(m) if in_function})
    assert not found, f"{len(found)} function-level imports of alignment modules:\n" + "\n".join(found)


def _is_stage(module: str) -> bool:
    """A stage module (alignment/stages/<name>.py); the package's __init__ is the registry, not a stage."""
    return module.startswith("alignment.stages.")


def test_no_stage_imports_another_stage():
    found = sorted({f"{m} imports {target}" for m in MODULES if _is_stage(m)
                    for target, _, _ in internal_imports(m) if _is_stage(target) and target != m})
    assert not found, "stages importing stages:\n" + "\n".join(found)


def test_the_data_layer_imports_no_stage():
    found = sorted({f"{m} imports {target}" for m in MODULES if m.startswith("alignment.data")
                    for target, _, _ in internal_imports(m) if target.startswith("alignment.stages")})
    assert not found, "data modules importing stages:\n" + "\n".join(found)
