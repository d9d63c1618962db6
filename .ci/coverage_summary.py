"""Line coverage of tokenworks per package, and in total, from the data `pytest --cov` left.

coverage.py reports per file (70 lines here); a newcomer wants the room, not the file.
Modules at the top of the package count as `(top)`. Only this process's lines count: code the
tests run in a subprocess (CLI runs, crash tests) is not measured.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import coverage


def main() -> int:
    cov = coverage.Coverage()  # [tool.coverage] in pyproject.toml
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        files = json.loads(out.read_text())["files"]
    totals: dict[str, tuple[int, int]] = {}
    for name, info in files.items():
        inside = Path(name).parts[Path(name).parts.index("tokenworks") + 1 :]
        package = inside[0] if len(inside) > 1 else "(top)"
        covered, statements = totals.get(package, (0, 0))
        summary = info["summary"]
        totals[package] = (
            covered + summary["covered_lines"],
            statements + summary["num_statements"],
        )
    print("coverage by package (lines run / lines):")
    for package, (covered, statements) in sorted(totals.items()):
        print(f"  {package:<10} {_percent(covered, statements):>4} {covered:>6} / {statements}")
    covered = sum(c for c, _ in totals.values())
    statements = sum(s for _, s in totals.values())
    print(f"coverage: {_percent(covered, statements)} of {statements} lines")
    return 0


def _percent(covered: int, statements: int) -> str:
    return f"{100 * covered / statements:.0f}%" if statements else "n/a"


if __name__ == "__main__":
    sys.exit(main())
