"""The code's shape, kept: no function over 60 lines, and no module over about 350 lines
unless the top of the module says why (the phrase below). Static: reads the source."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for d in ("gpserve", "workers", "cache") for p in (ROOT / d).rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 360             # "about 350"
REASON = "Over 350 lines on purpose"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short_and_long_modules_say_why(path):
    source = path.read_text()
    tree = ast.parse(source)
    long_functions = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions, f"split these: {long_functions}"
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        assert REASON in (ast.get_docstring(tree) or ""), (
            f"{lines} lines: split the module, or say at its top why not ({REASON!r})")
