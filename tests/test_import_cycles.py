"""No import cycle among the modules of training/ and prefops/, counting imports inside functions: a
function-level import that closes a cycle only hides it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path, package: str) -> set[str]:
    """Sibling modules a file imports by relative import (package-relative dotted names), anywhere in it."""
    here = path.relative_to(ROOT / package).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[:len(here) - node.level])
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:
                found.update(".".join(base + [alias.name]) for alias in node.names)
    return found


def cycles(package: str) -> list[list[str]]:
    files = {".".join(p.relative_to(ROOT / package).with_suffix("").parts): p
             for p in (ROOT / package).rglob("*.py")}
    graph = {name: {d for d in imports_of(path, package) if d in files and d != name}
             for name, path in files.items() if not name.endswith("__init__")}
    found, state = [], {}

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_training_has_no_import_cycle():
    assert cycles("training") == []


def test_prefops_has_no_import_cycle():
    assert cycles("prefops") == []
