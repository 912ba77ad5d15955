"""One home for each piece of shared vocabulary.

The model-state prefixes ``encoder.`` and ``heads.`` are spelled only in
:mod:`strategies.state`; everything else selects tensors through its helpers. Strategy names
are never compared in the engine: it asks what a strategy declares.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HOME = REPO / "strategies" / "state.py"
PREFIXES = ("encoder.", "heads.")
FILE_SUFFIXES = (".pt", ".json")  # file names such as a base's ``encoder.pt`` are not keys


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings (f-string parts included)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def _sources() -> list[Path]:
    return sorted((REPO / "engine").rglob("*.py")) + sorted((REPO / "strategies").rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_state_prefixes_live_in_one_place(path: Path) -> None:
    if path == HOME:
        return
    found = [f"line {line}: {text!r}" for line, text in _code_strings(ast.parse(path.read_text()))
             if text.startswith(PREFIXES) and not text.endswith(FILE_SUFFIXES)]
    assert found == [], f"spell state keys with strategies.state, not literals: {found}"


BUILTIN_NAMES = ("universal", "fedavg", "fedprox", "local", "centralised")


@pytest.mark.parametrize("path", sorted((REPO / "engine").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_the_engine_never_compares_strategy_names(path: Path) -> None:
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            names = [c.value for c in (node.left, *node.comparators)
                     if isinstance(c, ast.Constant) and c.value in BUILTIN_NAMES]
            if names and any(w in ast.unparse(node) for w in ("strategy", "baselines")):
                wrong.append(f"line {node.lineno}: compares with {names}")
    assert wrong == [], "\n".join(wrong)
