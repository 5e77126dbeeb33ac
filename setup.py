"""Build hook only (all metadata lives in pyproject.toml).

A wheel / regular ``pip install .`` carries the shipped model and lung segmenter as package data:
``assets/biomedjourney-cxr`` and ``assets/segmenter`` are copied to ``biomedjourney/_assets/`` in
the build, where ``biomedjourney.resources.asset_path`` finds them (after ``$BIOMEDJOURNEY_MODEL`` /
``$BIOMEDJOURNEY_SEGMENTER``, before the repository's ``assets/``). The sdist carries the same two
folders (MANIFEST.in). An editable install copies nothing: it uses the repository's ``assets/``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("biomedjourney-cxr", "segmenter")  # = biomedjourney.resources.SHIPPED


class build_py_with_assets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in SHIPPED:
            src = ROOT / "assets" / name
            if not (src.is_dir() and any(src.iterdir())):
                raise SystemExit(f"assets/{name} is missing: a wheel without it cannot find its model. "
                                 "Build from a complete checkout (or an sdist made from one).")
            dst = Path(self.build_lib) / "biomedjourney" / "_assets" / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def get_outputs(self, include_bytecode=1):
        extra = [str(p) for p in (Path(self.build_lib) / "biomedjourney" / "_assets").rglob("*") if p.is_file()]
        return super().get_outputs(include_bytecode) + extra


setup(cmdclass={"build_py": build_py_with_assets})
