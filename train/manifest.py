"""The prepared-data manifest format: what train/prepare_data.py writes and the trainers read.

A prepared-data folder OUT holds:

* ``stage1.csv`` - image-text pairs, one row per image (``STAGE1_COLUMNS``).
* ``stage2.csv`` - prior / description / follow-up triples (``STAGE2_COLUMNS``). ``prior``
  is the registered prior (a PNG under OUT/registered/, on the follow-up's grid) when
  registration ran and the pair was kept, else the original file (``prior_original``).
  ``kept`` False = dropped by the registration quality threshold: trainers use only
  kept rows, the file lists all of them for transparency. ``text`` may be '' (no
  description): such pairs train only the image-conditioned branch (the text is then
  the empty prompt, as in the trainer's text dropout). ``same_view`` records whether
  the two views match (AP vs PA pairs are kept; filter on it if you want).
* ``prepare.json`` - settings, counts, per-finding counts (``finding_counts``), registration
  score distribution and the sha256 of both CSVs (``manifest_hash(OUT)`` combines them with the registered priors'
  pixels: the model card's "data manifest hash").

Paths in the CSVs are absolute, or relative to the CSV's folder (registered priors);
``read_manifest`` returns them absolute.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path

from biomedjourney.atomic import atomic_write
from biomedjourney.resources import file_sha256

STAGE1_COLUMNS = ["image_id", "image", "patient_id", "split", "text", "labels", "sex", "age", "view",
                  "license", "source"]
STAGE2_COLUMNS = ["pair_id", "patient_id", "split", "prior", "prior_original", "followup", "text",
                  "text_origin", "reg_score", "kept", "prior_labels", "followup_labels", "days_between",
                  "license",
                  # beyond the core format: for filtering and audits
                  "same_view", "reg_score_before", "source"]
PATH_COLUMNS = ("image", "prior", "prior_original", "followup")
BOOL_COLUMNS = ("kept", "same_view")
FLOAT_COLUMNS = ("reg_score", "reg_score_before", "age")
MANIFEST_FILES = ("stage1.csv", "stage2.csv")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return "-inf" if v == -math.inf else ("" if math.isnan(v) else f"{v:.6g}")
    return str(v)


def write_manifest(rows: list[dict], path: str | os.PathLike, columns: list[str]) -> Path:
    """Write ``rows`` as a CSV with exactly ``columns``, atomically (``biomedjourney.atomic``).

    Missing keys are written empty; a key not in ``columns`` is an error (it would be lost).
    Booleans -> True/False, None -> '', floats -> 6 significant digits.
    """
    path = Path(path)
    cols = set(columns)
    for i, r in enumerate(rows):
        extra = set(r) - cols
        if extra:
            raise ValueError(f"row {i} of {path.name} has columns {sorted(extra)} that are not in the "
                             f"manifest columns {columns}: add them to the column list or drop them")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in rows:
                w.writerow([_cell(r.get(c)) for c in columns])

    return atomic_write(path, write)


def _parse_bool(v: str, col: str, path: Path) -> bool:
    if v in ("True", "true", "1"):
        return True
    if v in ("False", "false", "0", ""):
        return False
    raise ValueError(f"{path}: column {col!r} holds {v!r}; expected True or False")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """A manifest CSV as dicts: paths absolute (relative ones resolved against the CSV's folder),
    ``kept``/``same_view`` bool, ``reg_score``/``reg_score_before``/``age`` float or None."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found: run train/prepare_data.py --out {path.parent}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in PATH_COLUMNS:
            if r.get(c):
                r[c] = str(path.parent / r[c]) if not os.path.isabs(r[c]) else r[c]
        for c in BOOL_COLUMNS:
            if c in r:
                r[c] = _parse_bool(r[c], c, path)
        for c in FLOAT_COLUMNS:
            if c in r:
                r[c] = float(r[c]) if r[c] not in ("", None) else None
    return rows




def manifest_hash(path: str | os.PathLike) -> str:
    """sha256 of a manifest file; for a prepared-data folder, one hash over its stage1.csv and
    stage2.csv hashes and the pixels of its registered priors (registered/*.png: the same CSVs
    with other registration or harmonisation settings are other data) - the "data manifest
    hash" for model cards and the stage-2 cache key."""
    path = Path(path)
    if path.is_dir():
        missing = [n for n in MANIFEST_FILES if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lacks {missing}: run train/prepare_data.py --out {path}")
        text = "".join(f"{n}:{file_sha256(path / n)}\n" for n in MANIFEST_FILES)
        if (path / "registered").is_dir():
            text += "".join(f"registered/{f.name}:{file_sha256(f)}\n"
                            for f in sorted((path / "registered").glob("*.png")))
        return hashlib.sha256(text.encode()).hexdigest()
    return file_sha256(path)
