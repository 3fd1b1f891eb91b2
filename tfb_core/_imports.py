"""The import graph of tfb_core's modules, for docs/architecture.md (``python -m tfb_core._imports``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent


def graph() -> dict[str, list[str]]:
    """module -> the tfb_core modules it imports (at any depth of its code), sorted."""
    out = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        if name.startswith("_") and name != "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1 and node.module is None:  # from . import benchmarks
                deps.update(alias.name for alias in node.names)
            elif node.level == 1:
                deps.add(node.module.split(".")[0])
            elif (node.module or "").startswith("tfb_core."):
                deps.add(node.module.split(".")[1])
        out[name] = sorted(d for d in deps if d != name
                           and ((PACKAGE / f"{d}.py").exists() or (PACKAGE / d).is_dir()))
    return out


def markdown() -> str:
    return "\n".join(f"- `{m}`: " + (", ".join(f"`{d}`" for d in deps) if deps else "nothing")
                     for m, deps in graph().items())


if __name__ == "__main__":
    print(markdown())
