"""biomedjourney.evaluate.augment: counterfactual rows, rare findings, priors, cache, aggregation, and one
end-to-end run of the CLI on a tiny synthetic dataset with the tiny random pipeline (no shared dataset)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biomedjourney.dataset import ImageRow, split_of
from biomedjourney.evaluate import augment as ag
from biomedjourney.evaluate.evaluators import OPACITY, EvaluatorConfig, label_targets
from biomedjourney.evaluate.follow import DESCRIPTIONS as FOLLOW_DESCRIPTIONS
from biomedjourney.findings import extract
from train.train_evaluators import patient_groups

LABELS = EvaluatorConfig().labels  # No Finding .. Effusion, Opacity (any): DEFAULT_LABELS


def patients(split: str, n: int, start: int = 0) -> list[str]:
    """The first n ids 'p<i>' (i >= start) that the hash split puts in `split`."""
    out, i = [], start
    while len(out) < n:
        if split_of(f"p{i}") == split:
            out.append(f"p{i}")
        i += 1
    return out


def row(image_id: str, patient: str, labels: list[str], source: str = "nih", sex: str = "F", age=50.0,
        path: Path = Path("x.png")) -> ImageRow:
    return ImageRow(image_id=image_id, path=path, source=source, patient_id=patient, study_order="1", view="PA",
                    sex=sex, age=age, labels=labels, text="", license="CC0")


# ------------------------------------------------------------------------- counterfactual rows
def test_counterfactual_labels_drop_no_finding_and_add_the_finding_once():
    assert ag.counterfactual_labels(["No Finding"], "Edema") == ["Edema"]
    assert ag.counterfactual_labels(["Infiltration", "No Finding"], "Effusion") == ["Infiltration", "Effusion"]
    assert ag.counterfactual_labels(["Edema"], "Edema") == ["Edema"]


def test_counterfactual_row_keeps_patient_source_sex_age_and_has_exact_targets():
    cfg = EvaluatorConfig(observed={"nih": list(LABELS[:-1]), "hannover": ["COVID-19"]})
    prior = row("nih_1", "nih_7", ["No Finding"], sex="M", age=61.0)
    r = ag.counterfactual_row(ag.Job(prior, "Edema", "New pulmonary edema.", 3), 5)
    assert (r.patient_id, r.source, r.sex, r.age, r.labels) == ("nih_7", "nih", "M", 61.0, ["Edema"])
    assert r.image_id != prior.image_id and r.text == "New pulmonary edema."
    assert prior.labels == ["No Finding"]  # the prior row is not changed
    y, known = label_targets(r.labels, r.source, cfg)
    np.testing.assert_array_equal(y, [0, 0, 0, 0, 0, 1, 0, 0])
    assert known.all()
    # a pneumonia counterfactual is also an opacity; a hannover one has only COVID-19 known
    y, known = label_targets(ag.counterfactual_labels(["No Finding"], "Pneumonia"), "hannover", cfg)
    np.testing.assert_array_equal(y, [0, 1, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(known, [0, 0, 1, 0, 0, 0, 0, 1])


def test_counterfactual_joins_its_priors_patient_group():
    rows = [row("a", "pa", ["No Finding"]), row("b", "pb", ["Edema"]), row("c", "pc", ["No Finding"])]
    cf = ag.counterfactual_row(ag.Job(rows[2], "Effusion", "New left pleural effusion.", 0), 0)
    groups, multi = patient_groups(rows + [cf])
    assert groups.tolist() == [0, 1, 2, 2]
    assert multi == [[2, 3]]


# ------------------------------------------------------------------------- rare findings and priors
def test_rare_findings_from_counts():
    counts = {"No Finding": 5, "Pneumonia": 428, "COVID-19": 0, "Infiltration": 120, "Atelectasis": 95,
              "Edema": 80, "Effusion": 119, OPACITY: 925}
    rare, skipped = ag.rare_findings(counts)
    assert rare == ["Atelectasis", "Edema", "Effusion"]      # < 120; No Finding never; 120 is not rare
    assert skipped == {"COVID-19": "no counterfactual description"}
    assert ag.rare_findings(counts, below=81)[0] == ["Edema"]


def test_known_positives_counts_only_known_labels():
    cfg = EvaluatorConfig(observed={"nih": ["Edema", "No Finding", "Pneumonia"], "hannover": ["COVID-19"]})
    rows = [row("1", "a", ["Edema"]), row("2", "b", ["Edema", "Pneumonia"]), row("3", "c", ["No Finding"]),
            row("4", "d", ["COVID-19"], source="hannover"), row("5", "e", ["Edema"], source="hannover")]
    assert ag.known_positives(rows, cfg) == {"No Finding": 1, "Pneumonia": 1, "COVID-19": 1, "Infiltration": 0,
                                             "Atelectasis": 0, "Edema": 2, "Effusion": 0, OPACITY: 2}


def test_plan_jobs_uses_train_no_finding_priors_one_per_patient_from_reporting_sources():
    tr, va = patients("train", 5), patients("val", 1)
    cfg = EvaluatorConfig(observed={"nih": ["Edema", "Effusion", "No Finding"], "ieee8023": ["Edema", "No Finding"]})
    rows = [row("i0", tr[0], ["No Finding"]), row("i1", tr[0], ["No Finding"]),     # same patient: i0 only
            row("i2", tr[1], ["No Finding", "Edema"]),                               # not only No Finding
            row("i3", va[0], ["No Finding"]),                                        # val split
            row("i4", tr[2], ["No Finding"], source="ieee8023"),                     # reports Edema, not Effusion
            row("i5", tr[3], ["No Finding"]), row("i6", tr[4], ["No Finding"])]
    assert [r.image_id for r in ag.normal_priors(rows, "Edema", cfg)] == ["i0", "i4", "i5", "i6"]
    assert [r.image_id for r in ag.normal_priors(rows, "Effusion", cfg)] == ["i0", "i5", "i6"]
    jobs = ag.plan_jobs(rows, ["Edema", "Effusion"], 2, cfg)
    assert [(j.prior.image_id, j.finding, j.description, j.seed) for j in jobs] == [
        ("i0", "Edema", "New pulmonary edema.", 0), ("i4", "Edema", "New pulmonary edema.", 1),
        ("i6", "Effusion", "New right pleural effusion.", 0), ("i0", "Effusion", "New left pleural effusion.", 1)]
    with pytest.raises(ValueError, match="Atelectasis"):
        ag.plan_jobs(rows, ["Atelectasis"], 1, cfg)


def test_check_findings_refuses_unknown_or_undescribed_labels():
    ag.check_findings(["Edema", "Effusion", "Atelectasis"], EvaluatorConfig())
    for bad in (["Cardiomegaly"], ["COVID-19"], ["No Finding"]):
        with pytest.raises(ValueError, match="cannot augment"):
            ag.check_findings(bad, EvaluatorConfig())


def test_descriptions_are_canonical_new_findings_that_agree_with_follow():
    for label, descs in ag.FINDING_DESCRIPTIONS.items():
        assert label in LABELS
        for d in descs:
            fs = extract(d)
            assert len(fs) == 1 and fs[0].change == "new", d
            if d in FOLLOW_DESCRIPTIONS:
                assert FOLLOW_DESCRIPTIONS[d].label == label, d


# ------------------------------------------------------------------------- cache
def test_cached_generates_once_per_key(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return np.full((2, 8, 8), 0.25 * len(calls), np.float32)
    key = {"model": "m", "jobs": [["a", "Edema", "New pulmonary edema.", 0]]}
    a, info = ag.cached(tmp_path / "cf.npz", key, make)
    assert not info["cached"] and len(calls) == 1
    b, info = ag.cached(tmp_path / "cf.npz", key, make)
    assert info["cached"] and len(calls) == 1
    np.testing.assert_array_equal(a, b)
    c, info = ag.cached(tmp_path / "cf.npz", {**key, "model": "other"}, make)
    assert not info["cached"] and len(calls) == 2 and float(c[0, 0, 0]) == 0.5


# ------------------------------------------------------------------------- aggregation
def fake_scores(per_label: dict) -> dict:
    vals = [v for v in per_label.values() if math.isfinite(v)]
    return {"path_auc": float(np.mean(vals)), "path_auc_per_label": per_label}


def test_aggregate_means_stds_and_paired_deltas():
    nan = float("nan")
    per_seed = [{"seed": 0, ag.REAL: fake_scores({"A": 0.6, "B": 0.8, "C": nan}),
                 ag.AUGMENTED: fake_scores({"A": 0.7, "B": 0.8, "C": nan})},
                {"seed": 1, ag.REAL: fake_scores({"A": 0.5, "B": 0.9, "C": nan}),
                 ag.AUGMENTED: fake_scores({"A": 0.8, "B": 0.7, "C": 0.6})},
                {"seed": 2, ag.REAL: fake_scores({"A": 0.7, "B": 0.7, "C": 0.5}),
                 ag.AUGMENTED: fake_scores({"A": 0.6, "B": 0.9, "C": 0.7})}]
    s = ag.aggregate(per_seed, ["A", "B", "C"], ["A", "C"])
    a = s["per_label"]["A"]
    assert a["without"]["mean"] == pytest.approx(0.6) and a["without"]["std"] == pytest.approx(0.1)
    assert a["with"]["mean"] == pytest.approx(0.7) and a["with"]["std"] == pytest.approx(0.1)
    assert a["delta"]["mean"] == pytest.approx(0.1)                    # deltas 0.1, 0.3, -0.1
    assert a["delta"]["std"] == pytest.approx(0.2) and a["delta"]["n"] == 3
    c = s["per_label"]["C"]                                            # NaN seeds are dropped, pairs too
    assert (c["without"]["n"], c["with"]["n"], c["delta"]["n"]) == (1, 2, 1)
    assert c["delta"]["mean"] == pytest.approx(0.2) and c["delta"]["std"] == 0.0
    # rare macro: per seed the mean over A and C with an AUC -> real 0.6, 0.5, 0.6; augmented 0.7, 0.7, 0.65
    r = s["rare_macro"]
    assert r["without"]["mean"] == pytest.approx(17 / 30) and r["with"]["mean"] == pytest.approx(41 / 60)
    assert r["delta"]["mean"] == pytest.approx(np.mean([0.1, 0.2, 0.05]))
    assert s["macro"]["without"]["mean"] == pytest.approx(np.mean([0.7, 0.7, 1.9 / 3]))


# ------------------------------------------------------------------------- end to end (tiny, synthetic)
def write_dataset(root: Path) -> None:
    """A tiny dataset in the shared format: 19 train patients (2 images each), 5 val patients; nih only."""
    design = [("train", ["No Finding"], 8), ("train", ["Pneumonia"], 3), ("train", ["Infiltration"], 3),
              ("train", ["Atelectasis"], 3), ("train", ["Edema"], 1), ("train", ["Effusion"], 1),
              ("val", ["No Finding"], 1), ("val", ["Pneumonia"], 1), ("val", ["Edema"], 1), ("val", ["Effusion"], 1),
              ("val", ["Atelectasis"], 1)]
    ids = {"train": iter(patients("train", 19)), "val": iter(patients("val", 5))}
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for split, labels, n in design:
        for _ in range(n):
            p = next(ids[split])
            for k in range(2):
                name = f"images/{p}_{k}.png"
                Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / name)
                rows.append({"image_id": f"{p}_{k}", "file": name, "source": "nih", "patient_id": p,
                             "study_order": str(k), "view": "PA", "sex": "MF"[len(rows) % 2], "age": "50",
                             "labels": "|".join(labels), "text": "", "license": "CC0"})
    with open(root / "images.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "pairs.csv").write_text("pair_id,patient_id,prior_image_id,followup_image_id,days_between,same_view,"
                                    "progression_text,text_origin\n")


def test_cli_end_to_end_on_a_tiny_dataset_and_the_tiny_pipeline(tmp_path, tiny_model_dir, capsys):
    write_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--data", str(tmp_path / "data"), "--model", str(tiny_model_dir), "--rare-below", "5",
            "--per-finding", "2", "--steps", "3", "--seeds", "3", "--resolution", "32"]
    res = ag.main(argv)
    assert res["findings"] == ["Edema", "Effusion"]                     # 2 positives each; COVID-19 has none
    assert res["skipped_findings"] == {"COVID-19": "no counterfactual description"}
    assert res["train_positives"]["Edema"] == 2 and res["train_positives"][OPACITY] == 12
    cf = res["counterfactuals"]
    assert not cf["cached"] and cf["n"] == 4 and cf["per_finding"] == {"Edema": 2, "Effusion": 2}
    assert cf["descriptions"] == ["New pulmonary edema.", "New pulmonary edema.", "New right pleural effusion.",
                                  "New left pleural effusion."]
    assert len(set(cf["priors"])) == 4                                  # different priors per finding
    with np.load(out / ag.CACHE_FILE) as z:
        assert z["images"].shape == (4, 64, 64) and z["images"].dtype == np.float32
    assert [r["seed"] for r in res["per_seed"]] == [0, 1, 2] and res["steps_done"] == [3]
    assert {r[ag.REAL]["train_images"] for r in res["per_seed"]} == {38}
    assert {r[ag.AUGMENTED]["train_images"] for r in res["per_seed"]} == {42}
    assert list(res["summary"]["per_label"]) == list(LABELS)
    nf = res["summary"]["per_label"]["No Finding"]
    assert nf["without"]["n"] == 3 and nf["with"]["n"] == 3 and nf["delta"]["n"] == 3
    assert res["summary"]["per_label"]["Infiltration"]["without"]["n"] == 0   # no val positive: no AUC
    saved = json.loads((out / "augment.json").read_text())
    assert saved["settings"]["seeds"] == [0, 1, 2] and saved["settings"]["train_config"]["steps"] == 3
    md = (out / "augment.md").read_text()
    assert "| label | n train positives |" in md and "| **Edema** | 2 (+2 cf) | 2 |" in md
    assert "| label | n train positives |" in capsys.readouterr().out
    again = ag.main(argv)                                               # cached counterfactuals, same results
    assert again["counterfactuals"]["cached"]
    for a, b in zip(res["per_seed"], again["per_seed"]):
        for c in ag.CONDITIONS:
            np.testing.assert_equal(a[c]["path_auc_per_label"], b[c]["path_auc_per_label"])


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        ag.parse(["--help"])
    assert e.value.code == 0
