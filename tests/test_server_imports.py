"""The server's modules import each other without cycles (read from the files, as tfb_core._imports does)."""

import ast
from pathlib import Path

SERVER = Path(__file__).parent.parent / "server"


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The server modules ``node`` imports (a relative or absolute ``from ... import``)."""
    if node.level:
        base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("server"):
        return []
    # "from . import loader" and "from .engine import core" import modules; else the module itself
    return [f"{target}.{a.name}" for a in node.names if (SERVER.parent / f"{target}.{a.name}".replace(".", "/")
            ).with_suffix(".py").exists()] or [target]


def graph() -> dict[str, set[str]]:
    out = {}
    for path in sorted(SERVER.rglob("*.py")):
        name = module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                deps.update(resolve(name, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("server."))
        out[name] = {d for d in deps if d != name}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once per back edge)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    return found


def test_the_server_has_no_import_cycle():
    g = graph()
    assert "server.engine.core" in g and "server.loader" in g["server.engine.core"]  # the graph is read
    assert cycles(g) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_engine_process_and_the_cli_import_no_module_that_imports_them_back():
    g = graph()
    assert "server.app" not in g["server.engine.proc"]
    assert "server.cli" not in g["server.ray_serve"]
