"""train/prepare_data.py and train/manifest.py: the shared dataset, a fake MIMIC-CXR-JPG tree, the generic CSV."""
import csv
import gzip
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biomedjourney.dataset import has_data, licence_ok_for_weights, missing_data_reason, split_of
from train.manifest import (STAGE1_COLUMNS, STAGE2_COLUMNS, manifest_hash, read_manifest,
                            write_manifest)
from train.prepare_data import finding_report, finding_table, main, report_sections

REPO = Path(__file__).resolve().parents[1]


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_image(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth grey image (two dark 'lungs' on a bright body), uint8 (h, w)."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.6 + 0.2 * y
    for cx in (.32, .68):
        img -= 0.35 * (((x - cx) / .15) ** 2 + ((y - .45) / .3) ** 2 < 1)
    img += 0.03 * np.random.default_rng(seed).standard_normal((h, w))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def check_common(out: Path) -> tuple[list[dict], list[dict], dict]:
    """Columns exact, paths exist, no patient in two splits, prepare.json hashes = files."""
    assert header(out / "stage1.csv") == STAGE1_COLUMNS
    assert header(out / "stage2.csv") == STAGE2_COLUMNS
    s1, s2 = read_manifest(out / "stage1.csv"), read_manifest(out / "stage2.csv")
    rep = json.loads((out / "prepare.json").read_text())
    assert rep["sha256"] == {"stage1.csv": sha256(out / "stage1.csv"), "stage2.csv": sha256(out / "stage2.csv")}
    assert rep["data_manifest_hash"] == manifest_hash(out)
    split = {}
    for r in s1 + s2:
        assert split.setdefault(r["patient_id"], r["split"]) == r["split"], r["patient_id"]
    for r in s1:
        assert Path(r["image"]).is_file()
    for r in s2:
        for c in ("prior", "prior_original", "followup"):
            assert Path(r[c]).is_file(), (c, r[c])
    return s1, s2, rep


# ------------------------------------------------------------------------------------------
# the shared dataset
# ------------------------------------------------------------------------------------------
@pytest.mark.data
@pytest.mark.skipif(not has_data(), reason=missing_data_reason())
def test_shared_dataset_limited_run(tmp_path):
    from biomedjourney.dataset import data_root

    out = tmp_path / "prep"
    # script mode (the preamble), registration and licence filter on (defaults), 2 workers
    cmd = [sys.executable, str(REPO / "train" / "prepare_data.py"), "--source", "cxr", "--data", str(data_root()),
           "--out", str(out), "--limit", "3", "--workers", "2"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    s1, s2, rep = check_common(out)
    assert s1 and s2 and all(licence_ok_for_weights(r["license"]) for r in s1)
    assert rep["settings"]["match_exposure"] and rep["settings"]["fill_out_of_view"]
    for v in rep["registration"]["train_target_change"].values():  # what the kept train pairs teach
        assert v["n"] > 0 and 0 <= v["inside_lung_mask_fraction"] <= 1 and 0 < v["mean_abs_change"] < 1
    assert all(r["kept"] == (r["reg_score"] >= rep["registration"]["threshold"]) for r in s2)
    for r in s2:
        if r["kept"]:  # registered prior written on the follow-up's grid
            assert Path(r["prior"]).parent == out / "registered"
            assert Image.open(r["prior"]).size == Image.open(r["followup"]).size
            # harmonised with its follow-up (defaults on): no black out-of-view wedge is added
            black = lambda f: (np.asarray(Image.open(f)) == 0).mean()  # noqa: E731
            assert black(r["prior"]) <= max(black(r["prior_original"]), black(r["followup"])) + 0.01
        else:
            assert r["prior"] == r["prior_original"]
        assert r["reg_score_before"] is not None and r["reg_score"] >= r["reg_score_before"]

    # the same selection without filter and registration: the filter removed exactly the ND/blank rows
    raw = tmp_path / "raw"
    main(["--source", "cxr", "--data", str(data_root()), "--out", str(raw), "--limit", "3",
          "--no-licence-filter", "--no-register", "--workers", "1"])
    r1, r2, rrep = check_common(raw)
    dropped = {r["image_id"] for r in r1} - {r["image_id"] for r in s1}
    assert dropped, "this --limit selection should include ND or blank-licence images; pick another limit"
    assert dropped == {r["image_id"] for r in r1 if not licence_ok_for_weights(r["license"])}
    assert rep["licence_filter"]["images_excluded"] == len(dropped)
    assert rep["licence_filter"]["pairs_excluded"] == len(r2) - len(s2)
    assert all(r["kept"] and r["reg_score"] is None and r["prior"] == r["prior_original"] for r in r2)
    assert {r["split"] for r in r1} <= {"train", "val"}
    assert rrep["finding_counts"]["stage2"]["train"]["pairs"] == sum(r["split"] == "train" for r in r2)
    assert all(r["split"] == split_of(r["patient_id"]) for r in r1)


# ------------------------------------------------------------------------------------------
# fake MIMIC-CXR-JPG
# ------------------------------------------------------------------------------------------
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough, evaluate for effusion

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""

# subject -> studies (study_id, date, time, [(dicom_id, view)], findings, impression, chexpert positives)
MIMIC = {
    "10000001": [
        ("50000003", "21800105", "101500.5", [("d1c", "PA"), ("d1c_lat", "LATERAL")],
         "Small right pleural effusion.", "Right effusion.", ["Pleural Effusion"]),
        ("50000001", "21800101", "090000", [("d1a_lat", "LATERAL"), ("d1a", "PA"), ("d1a2", "PA")],
         "No pleural effusion. Lungs are clear.", "No acute process.", ["No Finding"]),
        ("50000002", "21800101", "230000", [("d1b_lat", "LATERAL")],  # no PA: not used
         "Lateral only.", "Nothing.", []),
        ("50000004", "21800110", "80000", [("d1d", "PA")],
         "Large right pleural effusion.", "Increased effusion.", ["Pleural Effusion"]),
    ],
    "10000002": [
        ("50000010", "21900301", "120000", [("d2a", "PA"), ("d2a_lat", "LATERAL")],
         "Heart size normal. No pneumothorax.", "Normal.", ["No Finding"]),
        ("50000011", "21900302", "120000", [("d2b", "PA")],
         "New left pneumothorax.", "Left pneumothorax.", ["Pneumothorax"]),
    ],
    "11000003": [
        ("50000020", "21700601", "083000", [("d3a", "PA")],
         "Bibasilar atelectasis.", "Atelectasis.", ["Atelectasis"]),
        ("50000021", "21700604", "083000", [("d3b", "AP")],  # AP: not used
         "Worse.", "Worse.", []),
        ("50000022", "21700609", "083000", [("d3c", "PA")],
         "Atelectasis has resolved.", "Clear lungs.", []),
    ],
}
MIMIC_SPLIT = {"10000001": "train", "10000002": "validate", "11000003": "test"}


def build_mimic(root: Path) -> None:
    meta, split, chex = [], [], []
    labels = ["Atelectasis", "No Finding", "Pleural Effusion", "Pneumothorax"]
    seed = 0
    for subj, studies in MIMIC.items():
        for study, date, time_, images, findings, impression, pos in studies:
            folder = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
            folder.mkdir(parents=True)
            for dicom, view in images:
                seed += 1
                Image.fromarray(blob_image(80, 96, seed)).save(folder / f"{dicom}.jpg", quality=90)
                meta.append([dicom, subj, study, view, date, time_])
                split.append([dicom, study, subj, MIMIC_SPLIT[subj]])
            rep = root / "reports" / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}.txt"
            rep.parent.mkdir(parents=True, exist_ok=True)
            rep.write_text(REPORT.format(findings=findings, impression=impression))
            chex.append([subj, study] + ["1.0" if l in pos else "" for l in labels])
    for name, cols, rows in (
            ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"], meta),
            ("split", ["dicom_id", "study_id", "subject_id", "split"], split),
            ("chexpert", ["subject_id", "study_id"] + labels, chex)):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)


def test_fake_mimic(tmp_path):
    root, out = tmp_path / "mimic", tmp_path / "out"
    build_mimic(root)
    main(["--source", "mimic", "--data", str(root), "--reports", str(root / "reports"), "--out", str(out),
          "--no-licence-filter", "--reg-threshold", "-1", "--reg-max-size", "64", "--workers", "1"])
    s1, s2, rep = check_common(out)
    # PA only, first PA row of a study, ordered by StudyDate + StudyTime
    assert [r["image_id"] for r in s1] == ["mimic_d1a", "mimic_d1c", "mimic_d1d", "mimic_d2a", "mimic_d2b",
                                           "mimic_d3a", "mimic_d3c"]
    assert {r["view"] for r in s1} == {"PA"}
    assert [r["pair_id"] for r in s2] == ["mimic_d1a__mimic_d1c", "mimic_d1c__mimic_d1d",
                                          "mimic_d2a__mimic_d2b", "mimic_d3a__mimic_d3c"]
    assert [r["days_between"] for r in s2] == ["4", "5", "1", "8"]
    split = {r["patient_id"]: r["split"] for r in s1}
    assert split == {"mimic_p10000001": "train", "mimic_p10000002": "val", "mimic_p11000003": "test"}
    by_id = {r["image_id"]: r for r in s1}
    assert by_id["mimic_d1c"]["text"] == "Small right pleural effusion. Right effusion."  # FINDINGS + IMPRESSION only
    assert by_id["mimic_d1c"]["labels"] == "Pleural Effusion"
    # descriptions from the rules backend (default for mimic): they differ and name the change
    texts = [r["text"] for r in s2]
    assert all(texts) and len(set(texts)) == len(texts), texts
    assert "effusion" in texts[1].lower() and "pneumothorax" in texts[2].lower()
    assert {r["text_origin"] for r in s2} == {"rules"}
    # registration: written at the follow-up's aspect with the shorter side capped at 64 px
    for r in s2:
        assert r["kept"] and Path(r["prior"]).parent == out / "registered"
        assert Image.open(r["prior"]).size == (64, 77)  # 80x96 -> 64x77
    assert rep["source_stats"]["non_pa_images"] == 5


def test_report_sections():
    assert report_sections(REPORT.format(findings="A  b.\n c.", impression="D.")) == "A b. c. D."
    assert report_sections("FINDINGS AND IMPRESSION: Clear.\nRECOMMENDATION(S): none") == "Clear."
    assert report_sections("Some header\n\nLast paragraph\nhere.") == "Last paragraph here."


# ------------------------------------------------------------------------------------------
# generic CSV
# ------------------------------------------------------------------------------------------
def write_generic(folder: Path, license_col: bool = True) -> Path:
    (folder / "img").mkdir(parents=True)
    rows = [  # patient, file, order, text, progression_text, license
        ("A", "a0.png", "0", "Clear lungs.", "", "CC BY 4.0"),
        ("A", "a1.png", "2", "Right effusion.", "New right effusion.", "CC BY 4.0"),
        ("A", "a1b.png", "2", "Right effusion, second view.", "", "CC BY 4.0"),
        ("A", "a2.png", "5", "Effusion resolved.", "Effusion resolved.", "CC BY-NC-ND 4.0"),
        ("B", "b0.png", "1", "", "", "CC BY 4.0"),
        ("B", "b1.png", "", "Unknown date.", "", "CC BY 4.0"),  # blank order: stage 1 only
    ]
    for i, r in enumerate(rows):
        Image.fromarray(blob_image(70, 70, i)).save(folder / "img" / r[1])
    cols = ["patient_id", "image", "order", "text", "progression_text"] + (["license"] if license_col else [])
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[0], f"img/{r[1]}", r[2], r[3], r[4]] + ([r[5]] if license_col else []))
    return folder / "data.csv"


def test_generic_csv(tmp_path):
    path = write_generic(tmp_path / "d")
    out = tmp_path / "out"
    main(["--source", "csv", "--data", str(path), "--out", str(out), "--no-licence-filter", "--no-register"])
    s1, s2, _ = check_common(out)
    assert len(s1) == 6 and {r["split"] for r in s1} <= {"train", "val"}
    assert all(r["split"] == split_of(r["patient_id"]) for r in s1)
    pairs = {r["pair_id"]: r for r in s2}
    # each image pairs with every image at the NEXT order value of its patient
    assert set(pairs) == {"a0__a1", "a0__a1b", "a1__a2", "a1b__a2"}
    assert pairs["a0__a1"]["text"] == "New right effusion." and pairs["a0__a1"]["text_origin"] == "csv"
    assert pairs["a0__a1b"]["text"] == "" and pairs["a0__a1b"]["text_origin"] == "none"
    assert pairs["a1__a2"]["text"] == "Effusion resolved."
    assert {r["image_id"]: r["text"] for r in s1}["b0"].startswith("Frontal chest radiograph")  # caption_for

    # licence filter on: the ND image and its pairs go
    out2 = tmp_path / "out2"
    rep = main(["--source", "csv", "--data", str(path.parent), "--out", str(out2), "--no-register"])
    assert rep["licence_filter"]["images_excluded"] == 1 and rep["licence_filter"]["pairs_excluded"] == 2
    assert {r["pair_id"] for r in read_manifest(out2 / "stage2.csv")} == {"a0__a1", "a0__a1b"}

    # no license column + filter on: a clear error instead of an empty manifest
    bare = write_generic(tmp_path / "bare", license_col=False)
    with pytest.raises(SystemExit, match="license"):
        main(["--source", "csv", "--data", str(bare), "--out", str(tmp_path / "o3"), "--no-register"])


# ------------------------------------------------------------------------------------------
# manifest helpers
# ------------------------------------------------------------------------------------------
def test_manifest_roundtrip_and_hash(tmp_path):
    (tmp_path / "registered").mkdir()
    (tmp_path / "registered" / "p.png").write_bytes(b"x")
    rows = [{"pair_id": "p", "prior": "registered/p.png", "followup": "/abs/f.png", "kept": False,
             "reg_score": -math.inf, "reg_score_before": 0.25, "same_view": True},
            {"pair_id": "q", "prior": "/abs/q.png", "kept": True, "reg_score": None}]
    write_manifest(rows, tmp_path / "stage2.csv", STAGE2_COLUMNS)
    back = read_manifest(tmp_path / "stage2.csv")
    assert back[0]["prior"] == str(tmp_path.resolve() / "registered" / "p.png")
    assert back[0]["followup"] == "/abs/f.png"
    assert back[0]["kept"] is False and back[1]["kept"] is True
    assert back[0]["reg_score"] == -math.inf and back[0]["reg_score_before"] == 0.25
    assert back[1]["reg_score"] is None and back[0]["same_view"] is True and back[1]["same_view"] is False
    with pytest.raises(ValueError, match="not in the manifest columns"):
        write_manifest([{"pair_id": "p", "bogus": 1}], tmp_path / "x.csv", STAGE2_COLUMNS)
    assert not (tmp_path / "x.csv").exists() and not list(tmp_path.glob(".x.csv*"))
    with pytest.raises(FileNotFoundError, match="stage1.csv"):
        manifest_hash(tmp_path)
    write_manifest([{"image_id": "i", "age": 41.0}], tmp_path / "stage1.csv", STAGE1_COLUMNS)
    h = manifest_hash(tmp_path)
    assert len(h) == 64 and h != manifest_hash(tmp_path / "stage1.csv")
    assert read_manifest(tmp_path / "stage1.csv")[0]["age"] == 41.0
    write_manifest([{"image_id": "j"}], tmp_path / "stage1.csv", STAGE1_COLUMNS)
    assert manifest_hash(tmp_path) != h
    # the registered priors' pixels are part of the data: other harmonisation, other hash
    h = manifest_hash(tmp_path)
    (tmp_path / "registered").mkdir(exist_ok=True)
    (tmp_path / "registered" / "q.png").write_bytes(b"one")
    h1 = manifest_hash(tmp_path)
    (tmp_path / "registered" / "q.png").write_bytes(b"two")
    assert len({h, h1, manifest_hash(tmp_path)}) == 3


def test_finding_counts_per_stage_and_split():
    s1 = [{"split": "train", "labels": "Edema|Effusion"}, {"split": "train", "labels": "Edema"},
          {"split": "train", "labels": ""}, {"split": "val", "labels": "No Finding"}]
    s2 = [{"split": "train", "kept": True, "prior_labels": "No Finding", "followup_labels": "Edema|Effusion"},
          {"split": "train", "kept": True, "prior_labels": "Edema|Effusion", "followup_labels": "Edema"},
          {"split": "train", "kept": False, "prior_labels": "", "followup_labels": "Mass"}]  # not trained on
    fc = finding_report(s1, s2)
    assert fc["stage1"] == {"train": {"Edema": 2, "(no labels)": 1, "Effusion": 1}, "val": {"No Finding": 1}}
    assert fc["stage2"]["train"] == {"pairs": 2, "followup": {"Edema": 2, "Effusion": 1},
                                     "new": {"Edema": 1, "Effusion": 1}, "resolved": {"Effusion": 1}}
    assert fc["stage2"]["val"]["pairs"] == 0
    table = finding_table(fc, "train").splitlines()
    assert table[0].startswith("| finding (train) | stage-1 images | stage-2 follow-ups (2 pairs)")
    assert table[2:] == ["| Edema | 2 | 2 | 1 | 0 |", "| Effusion | 1 | 1 | 1 | 1 |", "| (no labels) | 1 | 0 | 0 | 0 |"]


def test_module_mode_runs():
    r = subprocess.run([sys.executable, "-m", "train.prepare_data", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--reg-threshold" in r.stdout


def test_describe_backends_on_generic_csv(tmp_path, monkeypatch):
    from biomedjourney import progression

    path = write_generic(tmp_path / "d")
    base = ["--source", "csv", "--data", str(path), "--no-licence-filter", "--no-register"]
    main(base + ["--out", str(tmp_path / "rules"), "--describe", "rules"])  # from the two image texts
    pairs = {r["pair_id"]: r for r in read_manifest(tmp_path / "rules" / "stage2.csv")}
    assert pairs["a0__a1"]["text_origin"] == "rules" and "effusion" in pairs["a0__a1"]["text"].lower()

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        main(base + ["--out", str(tmp_path / "none"), "--describe", "openai"])

    calls = []

    class FakeDescriber:  # stands in for the OpenAI client: one instance for the whole run
        def __init__(self, config):
            calls.append("init")

        def describe(self, prior, followup):
            calls.append((prior, followup))
            return progression.ProgressionResult(text=f"LLM: {followup}", backend="openai")

        def usage_summary(self):
            return {"calls": len(calls) - 1}

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setattr(progression, "OpenAIDescriber", FakeDescriber)
    rep = main(base + ["--out", str(tmp_path / "llm"), "--describe", "openai"])
    pairs = {r["pair_id"]: r for r in read_manifest(tmp_path / "llm" / "stage2.csv")}
    assert pairs["a0__a1"]["text"] == "LLM: Right effusion." and pairs["a0__a1"]["text_origin"] == "openai"
    assert calls.count("init") == 1 and rep["describe_usage"] == {"calls": 4}
