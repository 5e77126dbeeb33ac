"""The shared CXR dataset format (images.csv + pairs.csv + images/): paths, tables, patient split.

One setting finds the data: the environment variable ``BIOMEDJOURNEY_DATA``
(default ``../shared/data/cxr`` next to the repository root). The same format is
what ``train/prepare_data.py`` reads and what ``python -m biomedjourney.evaluate``
takes, so any folder laid out like it works unchanged.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "BIOMEDJOURNEY_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "cxr"

# ieee8023 patient ids that are (or may be) the same person (dataset README):
# each group stays together in one split.
SAME_PERSON_GROUPS = [
    ("78", "201"), ("97", "178", "188"), ("192", "196"), ("193", "195"),
    ("137", "202"), ("30", "31"), ("321", "322"), ("342", "343"),
]
_GROUP_OF = {f"ieee8023_{p}": f"ieee8023_{g[0]}" for g in SAME_PERSON_GROUPS for p in g}

VAL_FRACTION = 0.15  # of patients (groups), by hash: stable when rows are added
_SPLIT_SALT = "biomedjourney-val-v1"

# licence strings that forbid derivatives, or name no licence: never in shipped weights
_LICENCE_EXCLUDE_WORDS = ("-nd", " nd")


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The dataset folder: ``path`` if given, else $BIOMEDJOURNEY_DATA, else ../shared/data/cxr."""
    return Path(path or os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser().resolve()


def has_data(path: str | os.PathLike | None = None) -> bool:
    root = data_root(path)
    return (root / "images.csv").is_file() and (root / "pairs.csv").is_file()


def missing_data_reason(path: str | os.PathLike | None = None) -> str:
    return (f"CXR dataset not found at {data_root(path)} (needs images.csv and pairs.csv); "
            f"set {DATA_ENV} to the dataset folder")


def missing_data_help(path: str | os.PathLike | None = None) -> str:
    """What a command line prints when the dataset is absent: where it is looked for and what it must hold."""
    if path:
        where = f"--data {path}"
    elif os.environ.get(DATA_ENV):
        where = f"${DATA_ENV}={os.environ[DATA_ENV]}"
    else:
        where = f"the default ../shared/data/cxr next to the repository ({DEFAULT_DATA})"
    return (f"error: no CXR dataset at {data_root(path)} (from {where}): it needs images.csv and pairs.csv.\n"
            f"The dataset folder is --data DIR, else ${DATA_ENV}, else ../shared/data/cxr next to the "
            "repository. Its format (images.csv: one row per 256x256 PNG under images/; pairs.csv: "
            "prior -> follow-up pairs of one patient with progression_text) is described in the README.md "
            "of the dataset folder; train/prepare_data.py reads the same format. Example:\n"
            f"  {DATA_ENV}=/path/to/cxr python -m biomedjourney.evaluate --split val --out eval/")


def require_data(path: str | os.PathLike | None = None) -> Path:
    """The dataset folder, or exit with status 2 and missing_data_help() on stderr (for command lines)."""
    if not has_data(path):
        import sys
        print(missing_data_help(path), file=sys.stderr)
        raise SystemExit(2)
    return data_root(path)


def patient_group(patient_id: str) -> str:
    """Representative id of a patient's same-person group (itself when it has none)."""
    return _GROUP_OF.get(patient_id, patient_id)


def split_of(patient_id: str, val_fraction: float = VAL_FRACTION) -> str:
    """'train' or 'val' for a patient, by a SHA-256 hash of its group: never by image."""
    h = hashlib.sha256(f"{_SPLIT_SALT}:{patient_group(patient_id)}".encode()).hexdigest()
    return "val" if int(h[:8], 16) / 0x1_0000_0000 < val_fraction else "train"


def licence_ok_for_weights(licence: str) -> bool:
    """True when an image may train redistributed weights: a licence is named and allows derivatives."""
    s = (licence or "").strip().lower()
    if not s:
        return False
    return not any(w in s for w in _LICENCE_EXCLUDE_WORDS) and "no derivatives" not in s


@dataclass
class ImageRow:
    image_id: str
    path: Path
    source: str
    patient_id: str
    study_order: str
    view: str
    sex: str  # 'M', 'F' or ''
    age: float | None
    labels: list[str]
    text: str
    license: str

    @property
    def split(self) -> str:
        return split_of(self.patient_id)


@dataclass
class PairRow:
    pair_id: str
    patient_id: str
    prior: ImageRow
    followup: ImageRow
    days_between: str
    same_view: bool
    progression_text: str
    text_origin: str

    @property
    def split(self) -> str:
        return split_of(self.patient_id)


NO_FINDING = "No Finding"     # a label of its own (NIH), not a finding that appears or resolves
NO_LABELS = "(no labels)"     # the finding an image without any label is counted under


def parse_labels(cell: str | None) -> list[str]:
    """A labels cell ('|'-separated: images.csv, the manifests, the generic CSV) -> its list of labels."""
    return [x for x in (cell or "").split("|") if x]


def finding_counts(label_lists: Iterable[list[str]], unlabelled: str | None = NO_LABELS) -> dict[str, int]:
    """How many items carry each finding, most frequent first: an item with several findings counts once
    for each; an item with none counts under ``unlabelled`` (None: not at all)."""
    c = Counter()
    for labels in label_lists:
        c.update(set(labels) or ([unlabelled] if unlabelled else []))
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_images(root: str | os.PathLike | None = None) -> dict[str, ImageRow]:
    """images.csv as ``{image_id: ImageRow}`` with absolute image paths."""
    root = data_root(root)
    out = {}
    for r in _read_csv(root / "images.csv"):
        age = r.get("age", "").strip()
        out[r["image_id"]] = ImageRow(
            image_id=r["image_id"], path=root / r["file"], source=r.get("source", ""),
            patient_id=r["patient_id"], study_order=r.get("study_order", ""), view=r.get("view", ""),
            sex=r.get("sex", "").strip(), age=float(age) if age else None,
            labels=parse_labels(r.get("labels")), text=r.get("text", "").strip(),
            license=r.get("license", ""))
    return out


def load_pairs(root: str | os.PathLike | None = None, images: dict[str, ImageRow] | None = None) -> list[PairRow]:
    """pairs.csv joined with images.csv (rows whose images are missing are skipped)."""
    root = data_root(root)
    images = images if images is not None else load_images(root)
    out = []
    for r in _read_csv(root / "pairs.csv"):
        p, f = images.get(r["prior_image_id"]), images.get(r["followup_image_id"])
        if p is None or f is None:
            continue
        out.append(PairRow(
            pair_id=r["pair_id"], patient_id=r["patient_id"], prior=p, followup=f,
            days_between=r.get("days_between", ""), same_view=r.get("same_view", "") == "True",
            progression_text=r.get("progression_text", "").strip(), text_origin=r.get("text_origin", "")))
    return out


def caption_for(row: ImageRow) -> str:
    """The image's own text, or a caption made from view, age, sex and labels when it has none."""
    if row.text:
        return row.text
    who = []
    if row.age is not None:
        who.append(f"{int(row.age)}-year-old")
    who.append({"M": "male", "F": "female"}.get(row.sex, "patient"))
    labels = [l.replace("_", " ") for l in row.labels if l != NO_FINDING]
    findings = f"Findings: {', '.join(labels)}." if labels else "No finding."
    return f"{row.view or 'Frontal'} chest radiograph, {' '.join(who)}. {findings}"
