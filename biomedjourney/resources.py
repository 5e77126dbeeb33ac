"""Where the shipped model and lung segmenter are found, installed or not.

Lookup order for an asset folder (``biomedjourney-cxr``, ``segmenter``):

1. the environment variable (``$BIOMEDJOURNEY_MODEL`` / ``$BIOMEDJOURNEY_SEGMENTER``), used as given;
2. the copy packaged in the wheel: ``<site-packages>/biomedjourney/_assets/<name>`` (``setup.py``'s
   build step copies ``assets/biomedjourney-cxr`` and ``assets/segmenter`` there; a regular
   ``pip install .`` or a wheel has it);
3. the repository's ``assets/<name>`` next to the package (a source checkout or an editable install).

None of them there: FileNotFoundError naming all three.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_ASSETS = PACKAGE_DIR / "_assets"          # inside the installed package (wheel)
REPO_ASSETS = PACKAGE_DIR.parent / "assets"        # the source tree (editable install / checkout)
SHIPPED = ("biomedjourney-cxr", "segmenter")       # the folders the wheel carries


def asset_candidates(name: str) -> list[Path]:
    """The packaged copy, then the repository's assets/ folder (the env variable comes first; see asset_path)."""
    return [PACKAGED_ASSETS / name, REPO_ASSETS / name]


def asset_path(name: str, env: str) -> Path:
    """$env if set (as given, even when missing: the caller reports that), else the first existing
    candidate folder; FileNotFoundError naming all three places when there is none."""
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    candidates = asset_candidates(name)
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"No '{name}' folder found. Looked for: ${env} (not set); the packaged copy {candidates[0]} "
        f"(in a wheel / regular pip install); the repository's {candidates[1]} (source checkout / editable "
        f"install). Set {env}=PATH, or reinstall the package from a checkout that has assets/{name}.")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights, manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
