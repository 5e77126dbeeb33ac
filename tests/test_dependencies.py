"""No pinned dependency is unused: each one in requirements*.txt is imported by the project, required by one that
is, or a plugin the project relies on (named below with what uses it)."""
from __future__ import annotations

import ast
import re
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ["app.py", "biomedjourney", "train", "benchmarks", "scripts", "tests"]
PLUGINS = {  # found at run time, never imported by name
    "pylibjpeg": "pydicom's JPEG / JPEG 2000 / JPEG-LS decoders (compressed DICOM priors)",
    "pylibjpeg-libjpeg": "pylibjpeg's JPEG and JPEG-LS decoder",
    "pylibjpeg-openjpeg": "pylibjpeg's JPEG 2000 decoder",
    "pydicom-data": "pydicom.data.get_testdata_file('RG1_UNCI.dcm'): the app's example prior and the README's",
    "tensorboard": "accelerate's log_with='tensorboard' in train/train.py",
    "pytest-timeout": "pytest's per-test timeout (pyproject: timeout = 900)",
}


def _pins() -> set[str]:
    names = set()
    for f in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / f).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.add(_norm(re.split(r"[=<>~!;\[ ]", line)[0]))
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported() -> set[str]:
    mods = set()
    for c in CODE:
        for p in [ROOT / c] if c.endswith(".py") else (ROOT / c).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(), str(p))):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    mods.add(node.module.split(".")[0])
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("importorskip", "import_module") \
                        and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    mods.add(node.args[0].value.split(".")[0])  # pytest.importorskip("radon.complexity")
    return mods


def _requires(dist: str) -> set[str]:
    return {_norm(re.split(r"[=<>~!;\[ (]", r)[0]) for r in distribution(dist).requires or [] if "extra ==" not in r}


def test_every_pinned_dependency_is_used():
    pins, by_module = _pins(), packages_distributions()
    used = {_norm(d) for m in _imported() for d in by_module.get(m, [])} & pins
    while True:  # and what those need
        more = {r for d in used for r in _requires(d)} & pins - used
        if not more:
            break
        used |= more
    unused = sorted(pins - used - set(PLUGINS))
    assert not unused, f"pinned but unused (drop them, or say in PLUGINS what uses them): {unused}"
    assert set(PLUGINS) <= pins, f"PLUGINS names what is not pinned: {sorted(set(PLUGINS) - pins)}"
    assert not set(PLUGINS) & used, f"imported after all (drop from PLUGINS): {sorted(set(PLUGINS) & used)}"
