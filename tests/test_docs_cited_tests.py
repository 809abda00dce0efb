"""The tests README.md and docs/*.md cite as proof of a behaviour exist: a test renamed or removed
left its name in the docs, pointing a reader at nothing (and the behaviour unproven)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A test's name, or a test file's (`tests/test_retention.py`); not a method such as
# `agent.test_context()`, which Faust's agents have.
_CITED = re.compile(r"(?<![\w.])test_\w+")


def defined_test_names() -> set[str]:
    """Every test function (at any depth, classes included) and every test file's name in tests/."""
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def cited_test_names() -> dict[str, list[str]]:
    """Each test name the documents cite, with where (`docs/delivery.md:42`)."""
    cited: dict[str, list[str]] = {}
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text().splitlines(), 1):
            for name in _CITED.findall(line):
                cited.setdefault(name, []).append(f"{document.relative_to(ROOT)}:{number}")
    return cited


def test_every_test_the_docs_cite_exists() -> None:
    cited = cited_test_names()
    assert len(cited) > 100  # the pattern still finds the citations (there were about 130 on 29 Nov)
    defined = defined_test_names()
    missing = {name: places for name, places in cited.items() if name not in defined}
    assert not missing, f"cited in the docs, but no such test in tests/: {missing}"


def test_a_cited_name_is_found_with_where_it_is_cited_and_a_method_named_test_is_not(tmp_path, monkeypatch) -> None:
    document = tmp_path / "page.md"
    document.write_text("Proven by `test_a_behaviour_nobody_tests` and `agent.test_context()`.\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "DOCUMENTS", [document])
    assert cited_test_names() == {"test_a_behaviour_nobody_tests": ["page.md:1"]}
