"""Prepare training manifests (stage1.csv, stage2.csv, prepare.json; see train/manifest.py).

    python train/prepare_data.py --source cxr   --data /work/shared/data/cxr --out work/data/cxr-prep
    python train/prepare_data.py --source mimic --data MIMIC-CXR-JPG/2.1.0 --reports mimic-cxr-reports --out OUT
    python train/prepare_data.py --source csv   --data my_data.csv --out OUT --no-licence-filter

Sources
-------
Each source is read by its adapter in ``biomedjourney/sources.py`` (one function per source).

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

The long tail: per split, the images carrying each finding (stage 1) and, over kept pairs, the
follow-ups carrying it and the pairs where it is new or resolved (stage 2) are printed as a table
and written to prepare.json ("finding_counts"; ``finding_report``). The trainer can draw rows by
them: ``sampling`` in train/config.py.

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
import hashlib
import math
import multiprocessing as mp
import re
import time
from collections import Counter, defaultdict

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from biomedjourney.config import write_json
from biomedjourney.dataset import (NO_FINDING, ImageRow, PairRow, caption_for, finding_counts, licence_ok_for_weights,
                                   parse_labels)
from biomedjourney.imaging import read_image, save_png, to_uint8
from biomedjourney.register import DEFAULT_THRESHOLD, harmonise, register
from biomedjourney.sources import load_cxr, load_generic_csv, load_mimic, report_sections  # noqa: F401 - re-exported
from train.manifest import STAGE1_COLUMNS, STAGE2_COLUMNS, manifest_hash, write_manifest

DEFAULT_DESCRIBE = {"cxr": "dataset", "mimic": "rules", "csv": "dataset"}


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
    """Downscale (Lanczos in 8 bits, like the dataset) so the shorter side is at most ``max_short`` px."""
    if max_short <= 0 or min(a.shape) <= max_short:
        return a
    f = max_short / min(a.shape)
    size = (max(1, round(a.shape[1] * f)), max(1, round(a.shape[0] * f)))
    return np.asarray(Image.fromarray(to_uint8(a)).resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def registration_input(path: str | Path, max_short: int) -> np.ndarray:
    """An image as registration sees it: ``imaging.read_image`` (any format, as inference reads it) at its
    own aspect, the shorter side capped at ``max_short`` px (speed; 0 = full size). Not the model input:
    the registered prior is written on the follow-up's grid and framed (``load_model_input``) at training."""
    return _fit_short_side(read_image(path).pixels, max_short)


def _register_job(job: tuple) -> tuple[float, float, str, tuple[float, float] | None]:
    """Worker: register one pair, write the registered prior when it passes the threshold, and measure
    what the written pair teaches: (mean |follow-up - prior|, share of it inside the lung-and-heart mask)."""
    from biomedjourney.evaluate.fidelity import inside_fraction  # lazy: pulls in the pipeline stack

    prior_path, followup_path, out_png, threshold, max_short, match_exposure, fill = job
    prior, followup = registration_input(prior_path, max_short), registration_input(followup_path, max_short)
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


def finding_report(s1: list[dict], s2: list[dict]) -> dict:
    """prepare.json's "finding_counts" (the long tail), per split. stage1: images carrying each finding;
    stage2, over the kept pairs (what trains): "followup" = follow-ups carrying each finding, "new" = pairs
    whose follow-up has a finding its prior lacks, "resolved" = the reverse (No Finding is not a change)."""
    out = {"stage1": {}, "stage2": {}}
    for sp in sorted({r["split"] for r in s1} | {r["split"] for r in s2}):
        out["stage1"][sp] = finding_counts(parse_labels(r["labels"]) for r in s1 if r["split"] == sp)
        pairs = [(set(parse_labels(r["prior_labels"])), set(parse_labels(r["followup_labels"])))
                 for r in s2 if r["split"] == sp and r["kept"]]
        out["stage2"][sp] = {"pairs": len(pairs), "followup": finding_counts(f for _, f in pairs),
                             "new": finding_counts((f - p - {NO_FINDING} for p, f in pairs), None),
                             "resolved": finding_counts((p - f - {NO_FINDING} for p, f in pairs), None)}
    return out


def finding_table(fc: dict, split: str) -> str:
    """``finding_report``'s counts of one split as a Markdown table, rarest last (by stage-1 images)."""
    s1 = fc["stage1"].get(split, {})
    s2 = fc["stage2"].get(split, {"pairs": 0, "followup": {}, "new": {}, "resolved": {}})
    cols = [s1, s2["followup"], s2["new"], s2["resolved"]]
    names = sorted(set().union(*cols), key=lambda f: tuple(-c.get(f, 0) for c in cols) + (f,))
    lines = [f"| finding ({split}) | stage-1 images | stage-2 follow-ups ({s2['pairs']} pairs) | new | resolved |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(str(c.get(n, 0)) for c in cols) + " |" for n in names]
    return "\n".join(lines)


def load_source(args: argparse.Namespace, data: Path, describe: str) -> tuple[list[ImageRow], list[PairRow], dict, dict]:
    """(images, pairs, split of each patient, source stats) of --source (``biomedjourney.sources``)."""
    if args.source == "cxr":
        return (*load_cxr(data), {})
    if args.source == "mimic":
        if describe == "dataset":
            raise SystemExit("--source mimic has no given pair descriptions: use --describe rules or openai")
        return load_mimic(data, Path(args.reports).resolve() if args.reports else data)
    images, pairs, splits = load_generic_csv(data)
    if args.licence_filter and not any(im.license for im in images):
        raise SystemExit(f"{data}: no row has a `license`, so the licence filter would drop everything; "
                         "add a license column or pass --no-licence-filter (weights not for release)")
    return images, pairs, splits, {}


def select(images: list[ImageRow], pairs: list[PairRow], args: argparse.Namespace) -> tuple[list, list, dict]:
    """--limit, then the licence filter; the counts before and after each (prepare.json) go in the dict."""
    found = {"images": len(images), "pairs": len(pairs)}
    if args.limit:
        images, pairs = limit_patients(images, pairs, args.limit)
    selected = {"images": len(images), "pairs": len(pairs)}
    lic = {"on": bool(args.licence_filter)}
    if args.licence_filter:
        images, pairs, stats = licence_filter(images, pairs)
        lic.update(stats)
    return images, pairs, {"found": found, "selected_by_limit": selected, "licence_filter": lic}


def stage1_rows(images: list[ImageRow], splits: dict[str, str]) -> list[dict]:
    """One stage1.csv row per image; text = ``caption_for`` (its own text, else a generated caption)."""
    return [{"image_id": im.image_id, "image": str(im.path), "patient_id": im.patient_id,
             "split": splits[im.patient_id], "text": caption_for(im), "labels": "|".join(im.labels), "sex": im.sex,
             "age": im.age, "view": im.view, "license": im.license, "source": im.source} for im in images]


def stage2_row(p: PairRow, text: str, origin: str, result: tuple, split: str, threshold: float) -> dict:
    """One stage2.csv row. ``result``: the pair's registration result (score None = registration off,
    then the pair is kept with its original prior); kept = the score rounded to 4 places >= threshold."""
    score, before, _, rel, _ = result
    score = None if score is None else round(score, 4)
    kept = score is None or score >= threshold
    lics = dict.fromkeys([p.prior.license, p.followup.license])
    return {"pair_id": p.pair_id, "patient_id": p.patient_id, "split": split,
            "prior": rel if (score is not None and kept) else str(p.prior.path),
            "prior_original": str(p.prior.path), "followup": str(p.followup.path),
            "text": text, "text_origin": origin,
            "reg_score": score, "kept": kept,
            "prior_labels": "|".join(p.prior.labels), "followup_labels": "|".join(p.followup.labels),
            "days_between": p.days_between, "license": " ; ".join(lics),
            "same_view": p.same_view,
            "reg_score_before": None if before is None else round(before, 4), "source": p.prior.source}


def check_split_disjoint(s1: list[dict]) -> None:
    """No patient in more than one split (a bug in the split code otherwise)."""
    leaked = {r["patient_id"] for r in s1 if r["split"] == "train"} & {r["patient_id"] for r in s1 if r["split"] != "train"}
    if leaked:
        raise RuntimeError(f"{len(leaked)} patients are in more than one split; this is a bug in the split code")


FALLBACKS = {"identity_kept": "identity kept", "affine_rejected_as_degenerate": "affine rejected",
             "similarity_rejected_as_degenerate": "similarity rejected", "optimiser_failed": "optimiser failed"}


def fallback_counts(reasons: list[str]) -> dict[str, int]:
    """How many registration results' reasons (``RegistrationResult.reason``) name each fallback."""
    return {key: sum(phrase in w for w in reasons) for key, phrase in FALLBACKS.items()}


def registration_report(s2: list[dict], results: list[tuple], args: argparse.Namespace) -> dict:
    """prepare.json's "registration": threshold, kept/dropped, why pairs fell back, score distributions and
    what the kept train pairs teach (``target_change``)."""
    reg = {"on": bool(args.register)}
    if not args.register:
        return reg
    scores = [r["reg_score"] for r in s2]
    reg.update({"threshold": args.reg_threshold, "max_size": args.reg_max_size,
                "kept": sum(r["kept"] for r in s2), "dropped": sum(not r["kept"] for r in s2),
                "score_minus_inf": sum(s == -math.inf for s in scores),
                **fallback_counts([why for _, _, why, _, _ in results]),
                "match_exposure": bool(args.match_exposure), "fill_out_of_view": bool(args.fill_out_of_view),
                "train_target_change": target_change(s2, [c for *_, c in results]),
                "score": _dist(scores), "score_before": _dist([r["reg_score_before"] for r in s2]),
                "score_by_source": {src: _dist([r["reg_score"] for r in s2 if r["source"] == src])
                                    for src in sorted({r["source"] for r in s2})}})
    return reg


def remove_stale_registered(out: Path, s2: list[dict]) -> None:
    """Delete registered priors of an earlier run in OUT/registered/ that this manifest no longer uses."""
    if not (out / "registered").is_dir():
        return
    used = {out / r["prior"] for r in s2 if r["kept"] and r["prior"].startswith("registered/")}
    for f in list((out / "registered").glob("*.png")):
        if f not in used:
            f.unlink()


def prepare(args: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(args.out).resolve()
    data = Path(args.data).resolve()
    describe = args.describe or DEFAULT_DESCRIBE[args.source]
    images, pairs, splits, source_stats = load_source(args, data, describe)
    if not images:
        raise SystemExit(f"no images found in {data} for --source {args.source}")
    images, pairs, selection = select(images, pairs, args)

    texts, usage = describe_pairs(pairs, describe)
    if args.register:
        results = register_pairs(pairs, out, args.reg_threshold, args.workers, args.reg_max_size,
                                 args.match_exposure, args.fill_out_of_view)
    else:
        results = [(None, None, "", "", None)] * len(pairs)
    s1 = stage1_rows(images, splits)
    s2 = [stage2_row(p, text, origin, res, splits[p.patient_id], args.reg_threshold)
          for p, (text, origin), res in zip(pairs, texts, results)]
    check_split_disjoint(s1)

    write_manifest(s1, out / "stage1.csv", STAGE1_COLUMNS)
    write_manifest(s2, out / "stage2.csv", STAGE2_COLUMNS)
    remove_stale_registered(out, s2)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"describe": describe},
        "data": str(data),
        "found": selection["found"], "selected_by_limit": selection["selected_by_limit"], "source_stats": source_stats,
        "licence_filter": selection["licence_filter"], "registration": registration_report(s2, results, args),
        "describe_usage": usage,
        "counts": _counts(s1, s2),
        "finding_counts": finding_report(s1, s2),
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
    for split in rep["finding_counts"]["stage1"]:
        print(f"\nper-finding counts, {split} split (prepare.json finding_counts):\n"
              + finding_table(rep["finding_counts"], split))
    return rep


if __name__ == "__main__":
    main()
