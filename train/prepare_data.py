"""Prepare training manifests (stage1.csv, stage2.csv, prepare.json; see train/manifest.py).

    python train/prepare_data.py --source cxr   --data /work/shared/data/cxr --out work/data/cxr-prep
    python train/prepare_data.py --source mimic --data MIMIC-CXR-JPG/2.1.0 --reports mimic-cxr-reports --out OUT
    python train/prepare_data.py --source csv   --data my_data.csv --out OUT --no-licence-filter

Sources
-------
cxr   The shared dataset format (images.csv + pairs.csv, /work/shared/data/cxr/README.md).
      Stage 1: every image, text = ``caption_for`` (its own text, else a caption from
      view/age/sex/labels). Stage 2: every pairs.csv pair (all n(n-1)/2 per patient).
      ``--describe dataset`` (default) takes pairs.csv ``progression_text`` as given;
      ``rules``/``openai`` describe (prior text, follow-up text) with
      ``biomedjourney.progression`` (pairs where either image has no own text get '').
      AP-vs-PA pairs are KEPT (``same_view`` is recorded): they are 8% of pairs, the
      follow-up view is the target the model must learn to produce anyway, and
      registration + its quality threshold drop the pairs whose geometry is too
      different; filter on ``same_view`` in the trainer to exclude them.
mimic The MIMIC-CXR-JPG layout: ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]`` and
      ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``; free-text reports at
      ``REPORTS/files/pXX/pSUBJECT/sSTUDY.txt`` (``--reports``, default DATA). PA views only
      (as in the paper), one image per study (the first PA row of the metadata CSV);
      stage-1 text = the FINDINGS + IMPRESSION sections (else the last paragraph);
      labels = CheXpert positives. Stage 2: CONSECUTIVE studies of a subject ordered by
      StudyDate + StudyTime, text = describe_progression(prior sections, follow-up
      sections) (``--describe rules`` default, or ``openai``). Split = the official split
      CSV ('validate' -> 'val', 'test' stays 'test'). Licence string: PhysioNet
      Credentialed Health Data License 1.5.0 (check its terms before shipping weights).
csv   A generic CSV (``--data`` = the CSV file, or a folder holding ``data.csv``), one row
      per image. Required columns: ``patient_id``, ``image`` (path, absolute or relative to
      the CSV's folder), ``order`` (number: time order within the patient; blank = never
      paired). Optional: ``text`` (the image's report), ``progression_text`` (on a
      follow-up row: the change since the patient's previous order value), ``image_id``
      (default: the file stem), ``view``, ``sex`` (M/F), ``age``, ``labels`` (|-separated),
      ``license``, ``source`` (default 'csv'), ``days`` (days_between = difference).
      Each image is paired with every image at the patient's NEXT larger order value.
      Split by patient hash (``biomedjourney.dataset.split_of``).

Stage-2 rows with text '' (no description) train only the image-conditioned branch
(the trainer sees the empty prompt, as in its text dropout).

Options
-------
--licence-filter (default on, for shipped weights): drop every image whose licence
fails ``biomedjourney.dataset.licence_ok_for_weights`` (ND or blank) and every pair
touching one; counts go to prepare.json.
--register (default on): affine registration of each pair's prior onto its follow-up
(biomedjourney/register.py); the registered prior is written to OUT/registered/<pair_id>.png
for kept pairs; pairs scoring below --reg-threshold get kept=False. The written prior is
harmonised with its follow-up (``biomedjourney.register.harmonise``): --match-exposure (default
on) maps its grey levels onto the follow-up's histogram (central window), --fill-out-of-view (default
on) fills the wedges the moved prior does not cover with the follow-up's pixels. prepare.json
(registration.train_target_change) reports what the kept train pairs teach. On the shared dataset's
1,321 train pairs, share of |follow-up - prior| inside the lung-and-heart mask (32% of the area;
biomedjourney/evaluate/fidelity.py): registered only 0.18, mean |diff| 0.155 (the black wedges
dominate); harmonised 0.32, 0.057 (on a 441-pair sample the fill alone gave 0.34: a gain change
shows most in the dark lungs, and it is not disease). The rest is devices, cables and
positioning: real change is not mostly in the lungs.
--limit N: quick runs: per source at most N patients (those with pairs first, in a
fixed hash order) and at most N pairs.

Registration threshold (default 0.65, NCC over the central window at 128 px): measured
on all 1,746 shared-dataset pairs; the distribution and the reasoning are next to
``DEFAULT_THRESHOLD`` in biomedjourney/register.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import gzip
import hashlib
import math
import multiprocessing as mp
import re
import time
from collections import Counter, defaultdict
from datetime import datetime

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from biomedjourney.config import write_json
from biomedjourney.dataset import (ImageRow, PairRow, caption_for, licence_ok_for_weights, load_images,
                                   load_pairs, split_of)
from biomedjourney.imaging import read_image, save_png
from train.manifest import STAGE1_COLUMNS, STAGE2_COLUMNS, manifest_hash, write_manifest
from biomedjourney.register import DEFAULT_THRESHOLD, harmonise, register

MIMIC_LICENSE = "PhysioNet Credentialed Health Data License 1.5.0"
MIMIC_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
DEFAULT_DESCRIBE = {"cxr": "dataset", "mimic": "rules", "csv": "dataset"}


# ------------------------------------------------------------------------------------------
# sources -> (images, pairs, split of each patient)
# ------------------------------------------------------------------------------------------
def load_cxr(data: Path) -> tuple[list[ImageRow], list[PairRow], dict[str, str]]:
    images = load_images(data)
    pairs = load_pairs(data, images)
    rows = list(images.values())
    return rows, pairs, {r.patient_id: split_of(r.patient_id) for r in rows}


def _open_csv(folder: Path, stem: str, required: bool = True) -> list[dict] | None:
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


def _study_time(date: str, time_: str) -> datetime:
    t = float(time_ or 0)
    hh, mm, ss = int(t // 10000), int(t // 100 % 100), t % 100
    return datetime.strptime(date, "%Y%m%d").replace(hour=min(hh, 23), minute=min(mm, 59),
                                                     second=min(int(ss), 59))


def load_mimic(data: Path, reports: Path) -> tuple[list[ImageRow], list[PairRow], dict[str, str], dict]:
    """PA images (first per study) and consecutive-study pairs; reports read for stage-1 text."""
    meta = _open_csv(data, "mimic-cxr-2.0.0-metadata")
    split_rows = _open_csv(data, "mimic-cxr-2.0.0-split")
    chex = _open_csv(data, "mimic-cxr-2.0.0-chexpert", required=False) or []
    split_of_dicom = {r["dicom_id"]: MIMIC_SPLITS.get(r["split"].strip().lower(), r["split"]) for r in split_rows}
    labels_of = {}
    for r in chex:
        labels_of[r["study_id"]] = [k for k, v in r.items()
                                    if k not in ("subject_id", "study_id") and v.strip() in ("1", "1.0")]
    first_pa: dict[str, dict] = {}
    stats = Counter()
    for r in meta:
        if r.get("ViewPosition", "").strip().upper() != "PA":
            stats["non_pa_images"] += 1
            continue
        first_pa.setdefault(r["study_id"], r)
    by_subject: dict[str, list[tuple[datetime, ImageRow]]] = defaultdict(list)
    splits: dict[str, str] = {}
    for study, r in first_pa.items():
        subj = r["subject_id"]
        folder = data / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        path = folder / f"{r['dicom_id']}.jpg"
        if not path.is_file():
            stats["missing_image_files"] += 1
            continue
        rep = reports / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
        text = report_sections(rep.read_text(encoding="utf-8", errors="replace")) if rep.is_file() else ""
        stats["studies_with_report" if text else "studies_without_report"] += 1
        pid = f"mimic_p{subj}"
        when = _study_time(r["StudyDate"], r.get("StudyTime", ""))
        by_subject[pid].append((when, ImageRow(
            image_id=f"mimic_{r['dicom_id']}", path=path, source="mimic", patient_id=pid,
            study_order=when.isoformat(), view="PA", sex="", age=None, labels=labels_of.get(study, []),
            text=text, license=MIMIC_LICENSE)))
        split = split_of_dicom.get(r["dicom_id"]) or split_of(pid)
        if splits.setdefault(pid, split) != split:
            raise ValueError(f"MIMIC subject {pid} is in splits {splits[pid]!r} and {split!r} in the split CSV; "
                             "the official split is per subject: check the file")
    images, pairs = [], []
    for pid in sorted(by_subject):
        seq = sorted(by_subject[pid], key=lambda t: (t[0], t[1].image_id))
        images += [im for _, im in seq]
        for (t0, a), (t1, b) in zip(seq, seq[1:]):
            if t1 <= t0:
                stats["same_time_studies_not_paired"] += 1
                continue
            pairs.append(PairRow(pair_id=f"{a.image_id}__{b.image_id}", patient_id=pid, prior=a, followup=b,
                                 days_between=str((t1.date() - t0.date()).days), same_view=True,
                                 progression_text="", text_origin="none"))
    return images, pairs, splits, dict(stats)


def load_generic_csv(data: Path) -> tuple[list[ImageRow], list[PairRow], dict[str, str]]:
    """The generic CSV format (module docstring)."""
    path = data / "data.csv" if data.is_dir() else data
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"patient_id", "image", "order"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}; the csv source needs patient_id, image, "
                         "order (see `python train/prepare_data.py --help` / the module docstring)")
    images, orders, prog, days = [], {}, {}, {}
    for i, r in enumerate(rows, start=2):
        img = Path(r["image"])
        img = img if img.is_absolute() else path.parent / img
        image_id = (r.get("image_id") or "").strip() or img.stem
        try:
            order = float(r["order"]) if r["order"].strip() else None
            age = float(r["age"]) if (r.get("age") or "").strip() else None
            days[image_id] = float(r["days"]) if (r.get("days") or "").strip() else None
        except ValueError as e:
            raise ValueError(f"{path} line {i}: {e}; order, age and days must be numbers or blank") from None
        row = ImageRow(image_id=image_id, path=img, source=(r.get("source") or "csv").strip(),
                       patient_id=r["patient_id"].strip(), study_order=r["order"].strip(),
                       view=(r.get("view") or "").strip(), sex=(r.get("sex") or "").strip(), age=age,
                       labels=[x for x in (r.get("labels") or "").split("|") if x],
                       text=(r.get("text") or "").strip(), license=(r.get("license") or "").strip())
        images.append(row)
        orders[image_id] = order
        prog[image_id] = (r.get("progression_text") or "").strip()
    dup = [k for k, n in Counter(im.image_id for im in images).items() if n > 1]
    if dup:
        raise ValueError(f"{path}: image_id {dup[:3]} occurs more than once; give unique image_id values")
    by_patient = defaultdict(list)
    for im in images:
        if orders[im.image_id] is not None:
            by_patient[im.patient_id].append(im)
    pairs = []
    for pid in sorted(by_patient):
        levels = sorted({orders[im.image_id] for im in by_patient[pid]})
        at = {o: sorted((im for im in by_patient[pid] if orders[im.image_id] == o), key=lambda im: im.image_id)
              for o in levels}
        for o0, o1 in zip(levels, levels[1:]):
            for a in at[o0]:
                for b in at[o1]:
                    d = days[b.image_id] - days[a.image_id] if None not in (days[a.image_id], days[b.image_id]) else None
                    text = prog[b.image_id]
                    pairs.append(PairRow(
                        pair_id=f"{a.image_id}__{b.image_id}", patient_id=pid, prior=a, followup=b,
                        days_between="" if d is None else f"{d:g}", same_view=a.view == b.view,
                        progression_text=text, text_origin="csv" if text else "none"))
    return images, pairs, {im.patient_id: split_of(im.patient_id) for im in images}


# ------------------------------------------------------------------------------------------
# selection: --limit, licence filter
# ------------------------------------------------------------------------------------------
def _hash(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def limit_patients(images: list[ImageRow], pairs: list[PairRow], n: int) -> tuple[list[ImageRow], list[PairRow]]:
    """Per source: at most ``n`` patients (those with pairs first, fixed hash order), at most ``n`` pairs."""
    pairs_of = defaultdict(list)
    for p in pairs:
        pairs_of[p.patient_id].append(p)
    patients_by_source = defaultdict(set)
    for im in images:
        patients_by_source[im.source].add(im.patient_id)
    keep_patients, keep_pairs = set(), []
    for source in sorted(patients_by_source):
        chosen, chosen_pairs = [], []
        for pid in sorted(patients_by_source[source], key=lambda p: (not pairs_of[p], _hash(p))):
            if len(chosen) >= n or len(chosen_pairs) >= n:
                break
            chosen.append(pid)
            chosen_pairs += pairs_of[pid]
        keep_patients.update(chosen)
        keep_pairs += chosen_pairs[:n]
    ids = {p.pair_id for p in keep_pairs}
    return [im for im in images if im.patient_id in keep_patients], [p for p in pairs if p.pair_id in ids]


def licence_filter(images: list[ImageRow], pairs: list[PairRow]) -> tuple[list[ImageRow], list[PairRow], dict]:
    """Drop images whose licence fails licence_ok_for_weights, and every pair touching one."""
    bad = {im.image_id for im in images if not licence_ok_for_weights(im.license)}
    kept_images = [im for im in images if im.image_id not in bad]
    kept_pairs = [p for p in pairs if p.prior.image_id not in bad and p.followup.image_id not in bad]
    by_licence = Counter((im.license.strip() or "(blank)") for im in images if im.image_id in bad)
    patients_before = {im.patient_id for im in images}
    patients_after = {im.patient_id for im in kept_images}
    stats = {"images_excluded": len(bad), "pairs_excluded": len(pairs) - len(kept_pairs),
             "patients_excluded": len(patients_before - patients_after),
             "excluded_by_licence": dict(sorted(by_licence.items()))}
    return kept_images, kept_pairs, stats


# ------------------------------------------------------------------------------------------
# descriptions
# ------------------------------------------------------------------------------------------
def describe_pairs(pairs: list[PairRow], backend: str) -> tuple[list[tuple[str, str]], dict]:
    """(text, text_origin) per pair. 'dataset': as given; 'rules'/'openai': from the two reports."""
    if backend == "dataset":
        return [(p.progression_text, p.text_origin if p.progression_text else "none") for p in pairs], {}
    from biomedjourney import progression  # lazy: only these backends need it

    if backend == "openai":
        config = progression.LLMConfig.from_env()
        if not config.configured():
            raise SystemExit("--describe openai needs an OpenAI-compatible endpoint: set OPENAI_API_KEY and/or "
                             "OPENAI_BASE_URL (see biomedjourney/progression.py), or use --describe rules")
        describer = progression.OpenAIDescriber(config)  # one client: shared answer cache + usage tally
        fn = describer.describe
    else:
        describer = None
        fn = lambda a, b: progression.describe_progression(a, b, backend="rules")  # noqa: E731
    out = []
    for p in tqdm(pairs, desc=f"describe ({backend})", unit="pair"):
        if p.prior.text.strip() and p.followup.text.strip():
            out.append((fn(p.prior.text, p.followup.text).text.strip(), backend))
        else:
            out.append(("", "none"))
    return out, (describer.usage_summary() if describer is not None else {})


# ------------------------------------------------------------------------------------------
# registration (multiprocessing)
# ------------------------------------------------------------------------------------------
def _fit_short_side(a: np.ndarray, max_short: int) -> np.ndarray:
    """Downscale (Lanczos, like the dataset) so the shorter side is at most ``max_short`` px."""
    if max_short <= 0 or min(a.shape) <= max_short:
        return a
    f = max_short / min(a.shape)
    size = (max(1, round(a.shape[1] * f)), max(1, round(a.shape[0] * f)))
    im = Image.fromarray(np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255.0


def _register_job(job: tuple) -> tuple[float, float, str, tuple[float, float] | None]:
    """Worker: register one pair, write the registered prior when it passes the threshold, and measure
    what the written pair teaches: (mean |follow-up - prior|, share of it inside the lung-and-heart mask)."""
    from biomedjourney.evaluate.fidelity import inside_fraction  # lazy: pulls in the pipeline stack

    prior_path, followup_path, out_png, threshold, max_short, match_exposure, fill = job
    prior = _fit_short_side(read_image(prior_path).pixels, max_short)
    followup = _fit_short_side(read_image(followup_path).pixels, max_short)
    r = register(prior, followup)
    change = None
    if round(r.score, 4) >= threshold:  # the rule prepare() applies to the rounded reg_score
        written = harmonise(r, followup, match_exposure, fill)
        save_png(written, out_png, synthetic=False)
        d = followup - written
        change = (float(np.abs(d).mean()), inside_fraction(d))
    return r.score, r.score_before, r.reason, change


def register_pairs(pairs: list[PairRow], out: Path, threshold: float, workers: int,
                   max_short: int, match_exposure: bool = True, fill: bool = True) -> list[tuple]:
    """(score, score_before, reason, registered path relative to OUT, change measures or None) per pair, in order."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", p.pair_id) for p in pairs]
    if len(set(names)) != len(names):  # sanitising made two ids equal: disambiguate by hash
        names = [f"{n}_{_hash(p.pair_id)[:8]}" for n, p in zip(names, pairs)]
    rel = [f"registered/{n}.png" for n in names]
    jobs = [(str(p.prior.path), str(p.followup.path), str(out / r), threshold, max_short, match_exposure, fill)
            for p, r in zip(pairs, rel)]
    bar = dict(total=len(jobs), desc=f"register ({workers} workers)", unit="pair")
    if workers <= 1:
        res = [_register_job(j) for j in tqdm(jobs, **bar)]
    else:
        with mp.get_context().Pool(workers) as pool:
            res = list(tqdm(pool.imap(_register_job, jobs, chunksize=4), **bar))
    return [(s, b, why, r, change) for (s, b, why, change), r in zip(res, rel)]


# ------------------------------------------------------------------------------------------
# manifests + report
# ------------------------------------------------------------------------------------------
def _dist(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0}
    q = np.percentile(xs, [0, 5, 25, 50, 75, 95, 100])
    return {"n": len(xs), **{k: round(float(v), 4) for k, v in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)}}


def _by(rows: list[dict], key: str, pred=lambda r: True) -> dict:
    return dict(sorted(Counter(r[key] for r in rows if pred(r)).items()))


def target_change(s2: list[dict], changes: list[tuple[float, float] | None], split: str = "train") -> dict:
    """What the kept training pairs teach the model to change, per source and overall: the mean
    |follow-up - prior| (prior as written: registered and harmonised) and the share of it inside the
    lung-and-heart mask of the model-card validation (32% of the area: chance level). ``changes``: the
    registration workers' measures, one per row of ``s2`` (None where no prior was written)."""
    per = defaultdict(list)
    for r, c in zip(s2, changes):
        if r["kept"] and r["split"] == split and c is not None:
            per[r["source"]].append(c)
    per["all"] = [m for v in list(per.values()) for m in v]
    return {k: {"n": len(v), "mean_abs_change": round(float(np.mean([a for a, _ in v])), 4),
                "inside_lung_mask_fraction": round(float(np.mean([f for _, f in v])), 4)} for k, v in per.items() if v}


def _counts(s1: list[dict], s2: list[dict]) -> dict:
    patients = {(r["patient_id"], r["split"], r["source"]) for r in s1}
    return {
        "images": {"total": len(s1), "by_split": _by(s1, "split"), "by_source": _by(s1, "source"),
                   "by_split_source": {sp: _by(s1, "source", lambda r, sp=sp: r["split"] == sp)
                                       for sp in sorted({r["split"] for r in s1})}},
        "patients": {"total": len(patients),
                     "by_split": dict(sorted(Counter(p[1] for p in patients).items())),
                     "by_source": dict(sorted(Counter(p[2] for p in patients).items()))},
        "pairs": {"total": len(s2), "kept": sum(r["kept"] for r in s2),
                  "by_split": _by(s2, "split"), "by_source": _by(s2, "source"),
                  "kept_by_split": _by(s2, "split", lambda r: r["kept"]),
                  "kept_by_source": _by(s2, "source", lambda r: r["kept"]),
                  "kept_with_text_by_split": _by(s2, "split", lambda r: r["kept"] and r["text"]),
                  "kept_different_view": sum(r["kept"] and not r["same_view"] for r in s2),
                  "text_origin": _by(s2, "text_origin")},
    }


def prepare(args: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(args.out).resolve()
    data = Path(args.data).resolve()
    describe = args.describe or DEFAULT_DESCRIBE[args.source]
    source_stats = {}
    if args.source == "cxr":
        images, pairs, splits = load_cxr(data)
    elif args.source == "mimic":
        if describe == "dataset":
            raise SystemExit("--source mimic has no given pair descriptions: use --describe rules or openai")
        images, pairs, splits, source_stats = load_mimic(data, Path(args.reports).resolve() if args.reports else data)
    else:
        images, pairs, splits = load_generic_csv(data)
        if args.licence_filter and not any(im.license for im in images):
            raise SystemExit(f"{data}: no row has a `license`, so the licence filter would drop everything; "
                             "add a license column or pass --no-licence-filter (weights not for release)")
    if not images:
        raise SystemExit(f"no images found in {data} for --source {args.source}")
    found = {"images": len(images), "pairs": len(pairs)}
    if args.limit:
        images, pairs = limit_patients(images, pairs, args.limit)
    selected = {"images": len(images), "pairs": len(pairs)}
    lic = {"on": bool(args.licence_filter)}
    if args.licence_filter:
        images, pairs, stats = licence_filter(images, pairs)
        lic.update(stats)

    texts, usage = describe_pairs(pairs, describe)
    reg = {"on": bool(args.register)}
    if args.register:
        results = register_pairs(pairs, out, args.reg_threshold, args.workers, args.reg_max_size,
                                 args.match_exposure, args.fill_out_of_view)
    else:
        results = [(None, None, "", "", None)] * len(pairs)

    s1 = [{"image_id": im.image_id, "image": str(im.path), "patient_id": im.patient_id,
           "split": splits[im.patient_id], "text": caption_for(im), "labels": "|".join(im.labels), "sex": im.sex,
           "age": im.age, "view": im.view, "license": im.license, "source": im.source} for im in images]
    s2 = []
    for p, (text, origin), (score, before, _, rel, _) in zip(pairs, texts, results):
        score = None if score is None else round(score, 4)
        kept = score is None or score >= args.reg_threshold
        lics = dict.fromkeys([p.prior.license, p.followup.license])
        s2.append({"pair_id": p.pair_id, "patient_id": p.patient_id, "split": splits[p.patient_id],
                   "prior": rel if (score is not None and kept) else str(p.prior.path),
                   "prior_original": str(p.prior.path), "followup": str(p.followup.path),
                   "text": text, "text_origin": origin,
                   "reg_score": score, "kept": kept,
                   "prior_labels": "|".join(p.prior.labels), "followup_labels": "|".join(p.followup.labels),
                   "days_between": p.days_between, "license": " ; ".join(lics),
                   "same_view": p.same_view,
                   "reg_score_before": None if before is None else round(before, 4), "source": p.prior.source})
    leaked = {r["patient_id"] for r in s1 if r["split"] == "train"} & {r["patient_id"] for r in s1 if r["split"] != "train"}
    if leaked:
        raise RuntimeError(f"{len(leaked)} patients are in more than one split; this is a bug in the split code")
    if args.register:
        scores = [r["reg_score"] for r in s2]
        reasons = [why for _, _, why, _, _ in results]
        reg.update({"threshold": args.reg_threshold, "max_size": args.reg_max_size,
                    "kept": sum(r["kept"] for r in s2), "dropped": sum(not r["kept"] for r in s2),
                    "score_minus_inf": sum(s == -math.inf for s in scores),
                    "identity_kept": sum("identity kept" in w for w in reasons),
                    "affine_rejected_as_degenerate": sum("affine rejected" in w for w in reasons),
                    "similarity_rejected_as_degenerate": sum("similarity rejected" in w for w in reasons),
                    "optimiser_failed": sum("optimiser failed" in w for w in reasons),
                    "match_exposure": bool(args.match_exposure), "fill_out_of_view": bool(args.fill_out_of_view),
                    "train_target_change": target_change(s2, [c for *_, c in results]),
                    "score": _dist(scores), "score_before": _dist([r["reg_score_before"] for r in s2]),
                    "score_by_source": {src: _dist([r["reg_score"] for r in s2 if r["source"] == src])
                                        for src in sorted({r["source"] for r in s2})}})

    write_manifest(s1, out / "stage1.csv", STAGE1_COLUMNS)
    write_manifest(s2, out / "stage2.csv", STAGE2_COLUMNS)
    used = {out / r["prior"] for r in s2 if r["kept"] and r["prior"].startswith("registered/")}
    stale = [f for f in (out / "registered").glob("*.png") if f not in used] if (out / "registered").is_dir() else []
    for f in stale:  # registered priors of an earlier run that this manifest no longer uses
        f.unlink()
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"describe": describe},
        "data": str(data),
        "found": found, "selected_by_limit": selected, "source_stats": source_stats,
        "licence_filter": lic, "registration": reg, "describe_usage": usage,
        "counts": _counts(s1, s2),
        "sha256": {n: manifest_hash(out / n) for n in ("stage1.csv", "stage2.csv")},
        "data_manifest_hash": manifest_hash(out),
        "versions": _versions(),
        "wall_time_s": round(time.time() - t0, 1),
    }
    write_json(report, out / "prepare.json")
    return report


def _versions() -> dict:
    v = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import SimpleITK as sitk

        v["SimpleITK"] = sitk.Version.VersionString()
    except ImportError:
        pass
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Prepare stage-1/stage-2 training manifests (see module docstring).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--source", required=True, choices=("cxr", "mimic", "csv"))
    ap.add_argument("--data", required=True, help="dataset folder (csv: the CSV file or a folder with data.csv)")
    ap.add_argument("--out", required=True, help="output folder for stage1.csv, stage2.csv, prepare.json")
    ap.add_argument("--reports", help="mimic: root of the report .txt files (default: --data)")
    ap.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                    help="affinely register each prior onto its follow-up")
    ap.add_argument("--reg-threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="drop pairs whose registration score (NCC) is below this")
    ap.add_argument("--reg-max-size", type=int, default=512,
                    help="register (and write registered priors) with the shorter side at most this many px; 0 = full size")
    ap.add_argument("--match-exposure", action=argparse.BooleanOptionalAction, default=True,
                    help="registered priors: histogram-match to the follow-up over the central window")
    ap.add_argument("--fill-out-of-view", action=argparse.BooleanOptionalAction, default=True,
                    help="registered priors: pixels the moved prior does not cover take the follow-up's values")
    ap.add_argument("--licence-filter", action=argparse.BooleanOptionalAction, default=True,
                    help="drop images whose licence forbids derivatives or is blank (for shipped weights)")
    ap.add_argument("--describe", choices=("dataset", "rules", "openai"),
                    help="stage-2 text: 'dataset' = as given (cxr, csv default), 'rules'/'openai' = from the two "
                         "reports with biomedjourney.progression (mimic default: rules)")
    ap.add_argument("--limit", type=int, default=0, help="quick run: per source at most N patients and N pairs")
    ap.add_argument("--workers", type=int, default=2, help="registration processes")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    rep = prepare(args)
    c, r, lic = rep["counts"], rep["registration"], rep["licence_filter"]
    print(f"wrote {args.out}: {c['images']['total']} images, {c['patients']['total']} patients, "
          f"{c['pairs']['total']} pairs ({c['pairs']['kept']} kept) in {rep['wall_time_s']} s")
    print(f"  images by split {c['images']['by_split']}; pairs kept by split {c['pairs']['kept_by_split']}")
    if lic["on"]:
        print(f"  licence filter: {lic['images_excluded']} images / {lic['pairs_excluded']} pairs excluded")
    if r["on"]:
        print(f"  registration: {r['kept']} kept, {r['dropped']} dropped (threshold {r['threshold']}); "
              f"score {r['score']}")
        t = r["train_target_change"].get("all", {})
        print(f"  train pairs' |follow-up - prior|: mean {t.get('mean_abs_change')}, "
              f"{t.get('inside_lung_mask_fraction')} of it inside the lung-and-heart mask (32% of the area)")
    print(f"  data manifest hash {rep['data_manifest_hash']}")
    return rep


if __name__ == "__main__":
    main()
