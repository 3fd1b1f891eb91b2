"""The documents that describe the code stay true to it: the README's flags table lists every
`tfb serve` setting, docs/architecture.md's import graph is the code's and its request paths name
only code that exists, and the docs cite only files the repository has."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import Settings
from tfb_core._imports import graph, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_flags_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"`--{Settings.public_name(name).replace('_', '-')}`" not in readme]
    assert not missing, f"README's flags table lacks {missing}"


def test_architecture_import_graph_is_the_codes():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert markdown() in doc, "regenerate it: python -m tfb_core._imports"
    assert "server" not in {d for deps in graph().values() for d in deps}


def test_docs_cite_only_files_that_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:tfb_core|server|bench|docs|docker|tests|deploy)/[\w./-]+)`", doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} cites {path}, which does not exist"


def named_in_request_paths() -> list[tuple[str, str]]:
    """(file, name) for every `file.py:name` docs/architecture.md's request paths name."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## The path of a request"):doc.index("## Scoring")]
    return re.findall(r"`((?:server|tfb_core)/[\w/]+\.py):([\w.]+)`", section)


def defines(path: Path, name: str) -> bool:
    """Whether ``path`` defines ``name``: a function, a class, an assignment, or ``Class.method``."""
    import ast

    scope = ast.parse(path.read_text()).body
    for part in name.split("."):
        found = next((n for n in scope if getattr(n, "name", None) == part
                      or isinstance(n, ast.Assign) and any(getattr(t, "id", None) == part for t in n.targets)),
                     None)
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def test_architecture_request_paths_name_only_code_that_exists():
    named = named_in_request_paths()
    assert len(named) > 40  # the section is read
    missing = [f"{path}:{name}" for path, name in named if not (ROOT / path).exists() or not defines(ROOT / path, name)]
    assert not missing, f"docs/architecture.md's request paths name what the code lacks: {missing}"


def test_the_request_path_check_finds_a_name_the_code_lacks():
    assert defines(ROOT / "server/engine/core.py", "EngineCore.step")
    assert not defines(ROOT / "server/engine/core.py", "EngineCore.no_such_method")
    assert not defines(ROOT / "server/engine/core.py", "Scheduler")
