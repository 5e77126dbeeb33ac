"""No function in the project above cyclomatic complexity 15, as `radon cc` counts it."""
from pathlib import Path

import pytest

radon_complexity = pytest.importorskip("radon.complexity", reason="radon is in requirements-dev.txt")

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("biomedjourney", "train", "benchmarks", "app.py")
LIMIT = 15


def blocks(path: Path):
    for b in radon_complexity.cc_visit(path.read_text()):
        yield b
        for m in getattr(b, "methods", []):   # a class's methods are reported inside it
            yield m


def test_no_function_above_the_complexity_limit():
    files = [p for c in CHECKED for p in ([ROOT / c] if c.endswith(".py") else sorted((ROOT / c).rglob("*.py")))]
    assert len(files) > 20
    over = sorted(f"{p.relative_to(ROOT)}:{b.lineno} {b.name} ({b.complexity})"
                  for p in files for b in blocks(p) if b.complexity > LIMIT and type(b).__name__ != "Class")
    assert not over, f"cyclomatic complexity above {LIMIT} (split into named helpers):\n" + "\n".join(over)
