"""The documents that describe the code stay true to it: the README's flags table lists every
`tfb serve` setting, docs/architecture.md's import graph is the code's, and the README cites
only files the repository has."""

from __future__ import annotations

import re
from pathlib import Path

from server.settings import Settings
from tfb_core._imports import graph, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_flags_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`--{name.replace('_', '-')}`" not in readme]
    assert not missing, f"README's flags table lacks {missing}"


def test_architecture_import_graph_is_the_codes():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert markdown() in doc, "regenerate it: python -m tfb_core._imports"
    assert "server" not in {d for deps in graph().values() for d in deps}


def test_docs_cite_only_files_that_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"`((?:tfb_core|server|bench|docs|docker|tests|deploy)/[\w./-]+)`", doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} cites {path}, which does not exist"
