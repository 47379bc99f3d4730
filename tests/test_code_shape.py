"""No function over 60 lines outside the tests: a reader sees each one whole."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60

# Known and owned, being split (issue 16): remove a line when its function gets short.
KNOWN: set[str] = set()


def long_functions() -> dict[str, int]:
    """``path::name`` -> lines, for every function over ``LIMIT`` lines in the code outside the tests."""
    found = {}
    for folder in ("stylize", "flows", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LIMIT:
                        found[f"{path.relative_to(ROOT).as_posix()}::{node.name}"] = lines
    return found


def test_no_new_function_over_60_lines():
    new = {name: lines for name, lines in long_functions().items() if name not in KNOWN}
    assert not new, f"functions over {LIMIT} lines (split them): {new}"
