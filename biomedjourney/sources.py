"""Data-source adapters: a chest X-ray collection on disk -> (images, pairs, split of each patient).

One function per source, each returning ``ImageRow`` / ``PairRow`` lists (``biomedjourney.dataset``)
and a patient -> split map; ``train/prepare_data.py`` turns them into training manifests.

``load_cxr(data)``
    The shared dataset format (images.csv + pairs.csv; the dataset folder's README.md). Every
    pairs.csv pair (all n(n-1)/2 per patient); split = ``dataset.split_of``.
``load_mimic(data, reports)``
    The MIMIC-CXR-JPG layout: ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]`` and
    ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``; free-text reports at
    ``REPORTS/files/pXX/pSUBJECT/sSTUDY.txt``. PA views only, one image per study (the first PA
    row of the metadata CSV); text = the FINDINGS + IMPRESSION sections (``report_sections``);
    labels = CheXpert positives. Pairs: CONSECUTIVE studies of a subject ordered by StudyDate +
    StudyTime. Split = the official split CSV ('validate' -> 'val').
``load_generic_csv(data)``
    A CSV (the file, or a folder holding ``data.csv``), one row per image. Required columns:
    ``patient_id``, ``image`` (path, absolute or relative to the CSV's folder), ``order`` (number:
    time order within the patient; blank = never paired). Optional: ``text``,
    ``progression_text`` (on a follow-up row: the change since the patient's previous order
    value), ``image_id`` (default: the file stem), ``view``, ``sex`` (M/F), ``age``, ``labels``
    (|-separated), ``license``, ``source`` (default 'csv'), ``days`` (days_between = difference).
    Each image is paired with every image at the patient's NEXT larger order value. Split by
    patient hash (``dataset.split_of``).
"""
from __future__ import annotations

import csv
import gzip
import re
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

from .dataset import ImageRow, PairRow, load_images, load_pairs, parse_labels, split_of

MIMIC_LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
MIMIC_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
GENERIC_REQUIRED = ("patient_id", "image", "order")

Source = tuple[list[ImageRow], list[PairRow], dict[str, str]]


# ------------------------------------------------------------------------------------------
# the shared dataset
# ------------------------------------------------------------------------------------------
def load_cxr(data: Path) -> Source:
    """The shared dataset format: every image and every pairs.csv pair."""
    images = load_images(data)
    pairs = load_pairs(data, images)
    rows = list(images.values())
    return rows, pairs, {r.patient_id: split_of(r.patient_id) for r in rows}


# ------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ------------------------------------------------------------------------------------------
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{1,60}):", re.M)


def report_sections(report: str) -> str:
    """FINDINGS + IMPRESSION text of a free-text report (else its last paragraph), one line."""
    heads = list(_HEADING.finditer(report))
    parts = []
    for i, m in enumerate(heads):
        if "FINDING" in m.group(1) or "IMPRESSION" in m.group(1):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(report)
            parts.append(report[m.end():end])
    if not parts:
        paras = [p for p in re.split(r"\n\s*\n", report) if p.strip()]
        parts = paras[-1:]
    return " ".join(" ".join(parts).split())


def _open_csv(folder: Path, stem: str, required: bool = True) -> list[dict] | None:
    """Rows of ``folder/stem.csv.gz`` (or ``.csv``); None (or an error when required) if absent."""
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = folder / name
        if p.is_file():
            with (gzip.open(p, "rt", newline="", encoding="utf-8") if name.endswith(".gz")
                  else open(p, newline="", encoding="utf-8")) as f:
                return list(csv.DictReader(f))
    if required:
        raise FileNotFoundError(f"{folder} has no {stem}.csv(.gz): point --data at the MIMIC-CXR-JPG "
                                "root (the folder with files/ and the mimic-cxr-2.0.0-*.csv.gz tables)")
    return None


def _study_time(date: str, time_: str) -> datetime:
    """StudyDate (YYYYMMDD) + StudyTime (HHMMSS[.frac], may be short or blank) as a datetime."""
    t = float(time_ or 0)
    hh, mm, ss = int(t // 10000), int(t // 100 % 100), t % 100
    return datetime.strptime(date, "%Y%m%d").replace(hour=min(hh, 23), minute=min(mm, 59),
                                                     second=min(int(ss), 59))


def chexpert_positives(rows: list[dict]) -> dict[str, list[str]]:
    """study_id -> the CheXpert labels marked 1 (positive) in the chexpert table."""
    return {r["study_id"]: [k for k, v in r.items() if k not in ("subject_id", "study_id") and v.strip() in ("1", "1.0")]
            for r in rows}


def first_pa_per_study(meta: list[dict], stats: Counter) -> dict[str, dict]:
    """study_id -> its first PA metadata row (other views are counted in stats['non_pa_images'])."""
    first: dict[str, dict] = {}
    for r in meta:
        if r.get("ViewPosition", "").strip().upper() != "PA":
            stats["non_pa_images"] += 1
            continue
        first.setdefault(r["study_id"], r)
    return first


def _mimic_image(data: Path, reports: Path, study: str, r: dict, labels: list[str],
                 stats: Counter) -> tuple[datetime, ImageRow] | None:
    """(study time, ImageRow) of one study's PA image with its report sections; None if the JPG is missing."""
    subj = r["subject_id"]
    tail = Path(f"p{subj[:2]}") / f"p{subj}"
    path = data / "files" / tail / f"s{study}" / f"{r['dicom_id']}.jpg"
    if not path.is_file():
        stats["missing_image_files"] += 1
        return None
    rep = reports / "files" / tail / f"s{study}.txt"
    text = report_sections(rep.read_text(encoding="utf-8", errors="replace")) if rep.is_file() else ""
    stats["studies_with_report" if text else "studies_without_report"] += 1
    pid = f"mimic_p{subj}"
    when = _study_time(r["StudyDate"], r.get("StudyTime", ""))
    return when, ImageRow(image_id=f"mimic_{r['dicom_id']}", path=path, source="mimic", patient_id=pid,
                          study_order=when.isoformat(), view="PA", sex="", age=None, labels=labels,
                          text=text, license=MIMIC_LICENSE)


def _consecutive_pairs(pid: str, seq: list[tuple[datetime, ImageRow]], stats: Counter) -> list[PairRow]:
    """Pairs of consecutive studies of one subject (``seq`` time-ordered); equal times are not paired."""
    pairs = []
    for (t0, a), (t1, b) in zip(seq, seq[1:]):
        if t1 <= t0:
            stats["same_time_studies_not_paired"] += 1
            continue
        pairs.append(PairRow(pair_id=f"{a.image_id}__{b.image_id}", patient_id=pid, prior=a, followup=b,
                             days_between=str((t1.date() - t0.date()).days), same_view=True,
                             progression_text="", text_origin="none"))
    return pairs


def load_mimic(data: Path, reports: Path) -> tuple[list[ImageRow], list[PairRow], dict[str, str], dict]:
    """PA images (first per study) and consecutive-study pairs; reports read for the image text.
    Returns (images, pairs, splits, stats: counts of what was left out)."""
    meta = _open_csv(data, "mimic-cxr-2.0.0-metadata")
    split_of_dicom = {r["dicom_id"]: MIMIC_SPLITS.get(r["split"].strip().lower(), r["split"])
                      for r in _open_csv(data, "mimic-cxr-2.0.0-split")}
    labels_of = chexpert_positives(_open_csv(data, "mimic-cxr-2.0.0-chexpert", required=False) or [])
    stats = Counter()
    by_subject: dict[str, list[tuple[datetime, ImageRow]]] = defaultdict(list)
    splits: dict[str, str] = {}
    for study, r in first_pa_per_study(meta, stats).items():
        item = _mimic_image(data, reports, study, r, labels_of.get(study, []), stats)
        if item is None:
            continue
        pid = item[1].patient_id
        by_subject[pid].append(item)
        split = split_of_dicom.get(r["dicom_id"]) or split_of(pid)
        if splits.setdefault(pid, split) != split:
            raise ValueError(f"MIMIC subject {pid} is in splits {splits[pid]!r} and {split!r} in the split CSV; "
                             "the official split is per subject: check the file")
    images, pairs = [], []
    for pid in sorted(by_subject):
        seq = sorted(by_subject[pid], key=lambda t: (t[0], t[1].image_id))
        images += [im for _, im in seq]
        pairs += _consecutive_pairs(pid, seq, stats)
    return images, pairs, splits, dict(stats)


# ------------------------------------------------------------------------------------------
# generic CSV
# ------------------------------------------------------------------------------------------
def _cell(r: dict, key: str) -> str:
    """A row's value for an optional column, stripped ('' when the column or value is absent)."""
    return (r.get(key) or "").strip()


def _number(r: dict, key: str) -> float | None:
    """An optional numeric column: float, or None when blank (ValueError when not a number)."""
    v = _cell(r, key)
    return float(v) if v else None


def _read_generic_rows(path: Path) -> list[dict]:
    """The CSV's rows, after checking that the required columns are there."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = set(GENERIC_REQUIRED) - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; the csv source needs patient_id, image, "
                         "order (see `python train/prepare_data.py --help` / biomedjourney/sources.py)")
    return rows


def generic_image(r: dict, folder: Path) -> tuple[ImageRow, float | None, float | None, str]:
    """One generic-CSV row -> (ImageRow, order, days, progression_text); ValueError on a bad number."""
    img = Path(r["image"])
    img = img if img.is_absolute() else folder / img
    order, age, days = _number(r, "order"), _number(r, "age"), _number(r, "days")
    row = ImageRow(image_id=_cell(r, "image_id") or img.stem, path=img, source=(r.get("source") or "csv").strip(),
                   patient_id=r["patient_id"].strip(), study_order=r["order"].strip(), view=_cell(r, "view"),
                   sex=_cell(r, "sex"), age=age, labels=parse_labels(r.get("labels")),
                   text=_cell(r, "text"), license=_cell(r, "license"))
    return row, order, days, _cell(r, "progression_text")


def _check_unique_ids(images: list[ImageRow], path: Path) -> None:
    dup = [k for k, n in Counter(im.image_id for im in images).items() if n > 1]
    if dup:
        raise ValueError(f"{path}: image_id {dup[:3]} occurs more than once; give unique image_id values")


def next_order_pairs(pid: str, images: list[ImageRow], orders: dict[str, float],
                     days: dict[str, float | None], prog: dict[str, str]) -> list[PairRow]:
    """One patient's pairs: every image with every image at the NEXT larger order value (ties by image_id)."""
    levels = sorted({orders[im.image_id] for im in images})
    at = {o: sorted((im for im in images if orders[im.image_id] == o), key=lambda im: im.image_id) for o in levels}
    pairs = []
    for o0, o1 in zip(levels, levels[1:]):
        for a in at[o0]:
            for b in at[o1]:
                d0, d1 = days[a.image_id], days[b.image_id]
                text = prog[b.image_id]
                pairs.append(PairRow(
                    pair_id=f"{a.image_id}__{b.image_id}", patient_id=pid, prior=a, followup=b,
                    days_between="" if d0 is None or d1 is None else f"{d1 - d0:g}", same_view=a.view == b.view,
                    progression_text=text, text_origin="csv" if text else "none"))
    return pairs


def load_generic_csv(data: Path) -> Source:
    """The generic CSV format (module docstring)."""
    path = data / "data.csv" if data.is_dir() else data
    images, orders, days, prog = [], {}, {}, {}
    for i, r in enumerate(_read_generic_rows(path), start=2):
        try:
            row, order, day, text = generic_image(r, path.parent)
        except ValueError as e:
            raise ValueError(f"{path} line {i}: {e}; order, age and days must be numbers or blank") from None
        images.append(row)
        orders[row.image_id], days[row.image_id], prog[row.image_id] = order, day, text
    _check_unique_ids(images, path)
    by_patient = defaultdict(list)
    for im in images:
        if orders[im.image_id] is not None:
            by_patient[im.patient_id].append(im)
    pairs = [p for pid in sorted(by_patient) for p in next_order_pairs(pid, by_patient[pid], orders, days, prog)]
    return images, pairs, {im.patient_id: split_of(im.patient_id) for im in images}


__all__ = ["load_cxr", "load_mimic", "load_generic_csv", "report_sections", "chexpert_positives",
           "first_pa_per_study", "generic_image", "next_order_pairs", "MIMIC_LICENSE", "MIMIC_SPLITS"]
