"""No module imports a layer above its own: entry points above api above dispatch above the
domain packages (producers, pricing, ledger, metering, keys, wire) above the leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import tokenworks

SRC = Path(tokenworks.__file__).parent

# Higher imports lower (or its own rank), never the reverse. Every top-level module or
# package must be ranked, so a new one is placed on purpose.
RANKS = {
    # entry points and tools
    "__main__": 5, "cli": 5, "server": 5, "sim": 5, "app": 4,
    "api": 3,
    "dispatch": 2, "retention": 2,
    "producers": 1, "pricing": 1, "ledger": 1, "metering": 1, "keys": 1, "wire": 1,
    "config": 1,
    "money": 0, "metrics": 0, "db": 0, "__init__": 0,
}  # fmt: skip


def _top(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "tokenworks" and len(parts) > 1 else None


def imported_tops(path: Path) -> set[str]:
    """The tokenworks top-level modules `path` imports, at any depth (lazy imports too)."""
    tops: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "tokenworks":  # `from tokenworks import api`
                names = [f"tokenworks.{alias.name}" for alias in node.names]
        else:
            continue
        tops.update(t for t in map(_top, names) if t is not None)
    return tops


def layer_violations(src: Path) -> list[str]:
    found = []
    for path in sorted(src.rglob("*.py")):
        top = path.relative_to(src).parts[0].removesuffix(".py")
        assert top in RANKS, f"{top} has no layer in RANKS"
        for imported in imported_tops(path):
            assert imported in RANKS, f"{imported} has no layer in RANKS"
            if RANKS[imported] > RANKS[top]:
                found.append(f"{path.relative_to(src)} imports {imported} (a layer above)")
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    assert layer_violations(SRC) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "dispatch").mkdir()
    (tmp_path / "dispatch" / "x.py").write_text(
        "def f():\n    from tokenworks.api.errors import ApiError\n"
    )
    (tmp_path / "ledger.py").write_text("from tokenworks import dispatch\n")
    assert layer_violations(tmp_path) == [
        "dispatch/x.py imports api (a layer above)",
        "ledger.py imports dispatch (a layer above)",
    ]
