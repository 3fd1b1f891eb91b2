"""tfb_core's public face: what ``tfb_core`` exports, who imports what.

The server needs a handful of names from ``tfb_core`` (the package), never a module's internals;
the face is pinned name by name;
``tfb_core`` never imports ``server``; building the command line imports no torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tfb_core

ROOT = Path(__file__).resolve().parents[1]
# server modules not moved to the public face yet
PENDING: set[str] = set()


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


#: the whole face: what the server and the library's users need, nothing internal
FACE = ["Criterion", "DEMO_MODEL", "Decoder", "Engine", "GenSequence", "MCItem", "Metric", "Mode", "Posterior",
        "SamplingParams", "Score", "ScoreOptions", "SearchConfig", "TFBError", "TokenInfo", "bayesianize",
        "cache_dir", "encoding", "generate", "load_base_model"]


def test_the_face_is_these_twenty_names():
    assert tfb_core.__all__ == FACE and len(FACE) <= 20


@pytest.mark.parametrize("name", tfb_core.__all__)
def test_every_export_resolves(name):
    assert getattr(tfb_core, name) is not None
    assert name in dir(tfb_core)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tfb_core.nope  # noqa: B018


def test_the_server_imports_the_package_not_its_modules():
    problems = []
    for path in sorted((ROOT / "server").glob("*.py")):
        if path.name in PENDING:
            continue
        for module, names, line in imports(path):
            # tfb_core.cli is the command registry the console script extends
            if module.startswith("tfb_core.") and module != "tfb_core.cli":
                problems.append(f"server/{path.name}:{line}: from {module} import {', '.join(names)}")
            if module == "tfb_core":
                problems += [f"server/{path.name}:{line}: {n} is not in tfb_core.__all__"
                             for n in names if n not in tfb_core.__all__]
    assert not problems, "\n".join(problems)


def test_tfb_core_never_imports_server():
    bad = [f"tfb_core/{p.relative_to(ROOT / 'tfb_core')}:{line}: {module}"
           for p in sorted((ROOT / "tfb_core").rglob("*.py"))
           for module, _, line in imports(p) if module == "server" or module.startswith("server.")]
    assert not bad, bad


def test_the_command_line_parser_imports_no_torch():
    code = ("import sys, tfb_core, tfb_core.cli as c; c.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_tokenizing_an_item_imports_no_torch():
    """The API process tokenizes requests with tfb_core's encoding, which has no model code."""
    code = ("import sys, tfb_core; e = tfb_core.encoding; e.encode_item, e.apply_chat, e.Encoded, e.letter_limit, "
            "tfb_core.ScoreOptions, tfb_core.MCItem, tfb_core.Mode; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_tfb_core_s_import_graph_has_no_cycle():
    """Drawn from every import, lazy ones included (tfb_core._imports)."""
    from tfb_core._imports import graph

    g, state, cycles = graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in g.get(module, []):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [module, dep])
            elif dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in g:
        if module not in state:
            visit(module, [])
    assert not cycles, cycles
