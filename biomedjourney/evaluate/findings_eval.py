"""How well does the rule-based extractor read real reports? Indiana University chest X-ray
reports (Demner-Fushman et al., JAMIA 2016; CC BY-NC-ND 4.0) against their MeSH "major" codes.

    python -m biomedjourney.evaluate.findings_eval --ids odd --out assets/eval/findings_extraction.json

The reports are read at run time from the copy shipped inside the installed torchxrayvision
wheel (``torchxrayvision/data/NLMCXR_reports.tgz``); nothing of them is copied or written out,
only counts. Report-level presence of six findings, from ``extract()`` on FINDINGS + IMPRESSION:

  effusion      MeSH "Pleural Effusion"
  atelectasis   MeSH "Pulmonary Atelectasis"
  cardiomegaly  MeSH "Cardiomegaly"
  edema         MeSH "Pulmonary Edema" or "Pulmonary Congestion" (our "pulmonary edema" covers
                vascular congestion, as its lexicon does)
  pneumothorax  MeSH "Pneumothorax" or "Hydropneumothorax"
  opacity       MeSH "Opacity", "Consolidation", "Infiltrate", "Pneumonia" or "Airspace Disease"
                (extractor: opacity, consolidation or pneumonia)

A finding is present when extract() returns it with a change other than 'resolved'. Side
accuracy: over reports where both sides name the finding and MeSH gives it a side, whether the
combined side (left + right -> bilateral) agrees, counted where the extractor states a side
(``side_accuracy``); ``side_coverage`` is the share of those reports where it states one, and
``side_accuracy_strict`` counts an unstated side as wrong. Tune on even ids, report on odd ids.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path
from xml.etree import ElementTree

from ..findings import extract

LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "effusion": {"mesh": ("pleural effusion",), "ours": ("pleural effusion",)},
    "atelectasis": {"mesh": ("pulmonary atelectasis",), "ours": ("atelectasis",)},
    "cardiomegaly": {"mesh": ("cardiomegaly",), "ours": ("cardiomegaly",)},
    "edema": {"mesh": ("pulmonary edema", "pulmonary congestion"), "ours": ("pulmonary edema",)},
    "pneumothorax": {"mesh": ("pneumothorax", "hydropneumothorax"), "ours": ("pneumothorax",)},
    "opacity": {"mesh": ("opacity", "consolidation", "infiltrate", "pneumonia", "airspace disease"),
                "ours": ("opacity", "consolidation", "pneumonia")},
}
SIDES = ("left", "right", "bilateral")
# MeSH locations that imply a side: the lingula is in the left lung, the middle lobe in the right
IMPLIED_SIDE = {"lingula": "left", "middle lobe": "right"}


def reports_path() -> Path:
    """NLMCXR_reports.tgz inside the installed torchxrayvision package (ImportError when missing)."""
    import torchxrayvision
    return Path(os.path.dirname(torchxrayvision.__file__)) / "data" / "NLMCXR_reports.tgz"


def _combine(sides: set[str]) -> str:
    if "bilateral" in sides or {"left", "right"} <= sides:
        return "bilateral"
    return next(iter(sides)) if sides else ""


def _parse(xml: bytes) -> dict:
    root = ElementTree.fromstring(xml)
    texts = {a.get("Label"): (a.text or "") for a in root.iter("AbstractText")}
    majors = [(m.text or "").strip().lower() for m in root.iter("major")]
    return {"id": int(root.find("IUXRId").get("id")),
            "text": " ".join(t for t in (texts.get("FINDINGS"), texts.get("IMPRESSION")) if t and t.strip()),
            "majors": majors}


def load_reports(path: Path | None = None) -> list[dict]:
    """[{id, text, majors}] for every report with findings or impression text, by id."""
    out = []
    with tarfile.open(path or reports_path()) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".xml"):
                r = _parse(tar.extractfile(m).read())
                if r["text"].strip():
                    out.append(r)
    return sorted(out, key=lambda r: r["id"])


def _mesh_sides(parts: list[str]) -> set[str]:
    """Sides named in a MeSH code's qualifiers, else implied by its location (lingula, middle lobe)."""
    sides = {p for p in parts if p in SIDES}
    return sides or {IMPLIED_SIDE[p] for p in parts if p in IMPLIED_SIDE}


def mesh_labels(majors: list[str]) -> dict[str, str]:
    """label -> combined side ('' when none stated) for the labels the MeSH majors code."""
    found: dict[str, set] = {}
    for major in majors:
        parts = [p.strip() for p in major.split("/")]
        for label, spec in LABELS.items():
            if parts[0] in spec["mesh"]:
                found.setdefault(label, set()).update(_mesh_sides(parts[1:]))
    return {k: _combine(v) for k, v in found.items()}


def our_labels(text: str) -> dict[str, str]:
    """label -> combined side for the labels extract() finds present in a report."""
    found: dict[str, set] = {}
    for f in extract(text):
        if f.change == "resolved":
            continue
        for label, spec in LABELS.items():
            if f.name in spec["ours"]:
                found.setdefault(label, set()).update({f.side} - {"none"})
    return {k: _combine(v) for k, v in found.items()}


def _prf(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f1, 4), "tp": tp, "fp": fp, "fn": fn}


def _tally(c: list[int], gold: bool, ours: bool) -> None:
    """tp, fp, fn counts of one label."""
    if gold or ours:
        c[0 if gold and ours else 1 if ours else 2] += 1


def _score(gold: dict, ours: dict, counts: dict, side: dict) -> list[str]:
    """Add one report to the counts; returns its error kinds ('effusion:fp', 'opacity:side', ...)."""
    errors = []
    for label in LABELS:
        g, o = label in gold, label in ours
        _tally(counts[label], g, o)
        if g != o:
            errors.append(f"{label}:{'fp' if o else 'fn'}")
        if g and o and gold[label] and not _score_side(gold[label], ours[label], side):
            errors.append(f"{label}:side{'' if ours[label] else '-unstated'}")
    return errors


def _score_side(gold: str, ours: str, side: dict) -> bool:
    """Count one finding found by both with a MeSH side; True when the sides agree."""
    side["n"] += 1
    side["stated"] += bool(ours)
    side["ok"] += ours == gold
    return ours == gold


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def evaluate(reports: list[dict], errors: dict | None = None) -> dict:
    """Per-label P/R/F1, macro F1 and side accuracy; ``errors`` (optional) collects ids per error kind."""
    counts = {k: [0, 0, 0] for k in LABELS}  # tp, fp, fn
    side = {"ok": 0, "stated": 0, "n": 0}
    for r in reports:
        for kind in _score(mesh_labels(r["majors"]), our_labels(r["text"]), counts, side):
            if errors is not None:
                errors.setdefault(kind, []).append(r["id"])
    per = {k: _prf(*v) for k, v in counts.items()}
    return {"reports": len(reports), "per_finding": per,
            "macro_f1": round(sum(v["f1"] for v in per.values()) / len(per), 4),
            "side_accuracy": _ratio(side["ok"], side["stated"]), "side_coverage": _ratio(side["stated"], side["n"]),
            "side_accuracy_strict": _ratio(side["ok"], side["n"]), "side_n": side["n"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m biomedjourney.evaluate.findings_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", choices=["even", "odd", "all"], default="even",
                    help="which report ids (develop on even, report on odd)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--errors", action="store_true", help="print the report ids of each error kind (no text)")
    a = ap.parse_args(argv)
    try:
        reports = load_reports()
    except (ImportError, OSError) as e:
        print(f"error: Indiana reports not available ({e}); pip install torchxrayvision", file=sys.stderr)
        return 2
    parity = {"even": 0, "odd": 1}.get(a.ids)
    reports = [r for r in reports if parity is None or r["id"] % 2 == parity]
    errors: dict | None = {} if a.errors else None
    res = {"dataset": "Indiana University CXR reports (NLMCXR, via torchxrayvision), FINDINGS + IMPRESSION",
           "ids": a.ids, "extractor": "biomedjourney.findings.extract (rules)",
           "labels": {k: {"mesh": list(v["mesh"]), "ours": list(v["ours"])} for k, v in LABELS.items()},
           **evaluate(reports, errors)}
    print(json.dumps(res, indent=2))
    if errors is not None:
        for kind in sorted(errors):
            print(f"{kind}: {len(errors[kind])} {errors[kind][:40]}", file=sys.stderr)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
