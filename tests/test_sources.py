"""biomedjourney.sources (the data-source adapters) and the helpers prepare_data builds its manifests with."""
from __future__ import annotations

import argparse
import csv
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from biomedjourney import sources
from biomedjourney.dataset import ImageRow, PairRow


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    return path


def _row(**kw) -> dict:
    return {"patient_id": "A", "image": "img/x.png", "order": "1", **kw}


# ------------------------------------------------------------------------------------------ generic CSV
def test_generic_image_defaults_and_paths(tmp_path):
    im, order, days, prog = sources.generic_image(_row(), tmp_path)
    assert im.path == tmp_path / "img" / "x.png" and im.image_id == "x" and im.source == "csv"
    assert (order, days, prog, im.age, im.labels, im.text, im.license) == (1.0, None, "", None, [], "", "")
    im, order, days, prog = sources.generic_image(
        _row(image="/abs/y.png", image_id=" y1 ", order=" 2.5 ", age="41", days="7", labels="Effusion|Edema",
             sex=" F ", view="PA", progression_text=" New effusion. ", source=" mine "), tmp_path)
    assert im.path == Path("/abs/y.png") and im.image_id == "y1" and im.study_order == "2.5"
    assert (order, days, prog, im.age, im.sex, im.source) == (2.5, 7.0, "New effusion.", 41.0, "F", "mine")
    assert im.labels == ["Effusion", "Edema"]
    assert sources.generic_image(_row(order=""), tmp_path)[1] is None      # blank order: never paired
    with pytest.raises(ValueError):
        sources.generic_image(_row(age="forty"), tmp_path)


def test_generic_csv_errors_name_the_line_and_the_columns(tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", [_row(image="a.png"), _row(image="b.png", days="soon")])
    with pytest.raises(ValueError, match=r"line 3: .*order, age and days must be numbers"):
        sources.load_generic_csv(bad)
    dup = _write_csv(tmp_path / "dup.csv", [_row(image="a.png"), _row(image="sub/a.png", order="2")])
    with pytest.raises(ValueError, match=r"image_id \['a'\] occurs more than once"):
        sources.load_generic_csv(dup)
    cols = _write_csv(tmp_path / "cols.csv", [{"patient_id": "A", "image": "a.png"}])
    with pytest.raises(ValueError, match=r"lacks columns \['order'\]"):
        sources.load_generic_csv(cols)


def _im(image_id: str, view: str = "PA") -> ImageRow:
    return ImageRow(image_id=image_id, path=Path(f"{image_id}.png"), source="csv", patient_id="A", study_order="",
                    view=view, sex="", age=None, labels=[], text="", license="")


def test_next_order_pairs_link_each_level_to_the_next_only():
    ims = [_im("c"), _im("a"), _im("b", view="AP"), _im("d")]
    orders = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 3.0}
    days = {"a": 10.0, "b": 12.5, "c": None, "d": 20.0}
    prog = {"a": "", "b": "New effusion.", "c": "", "d": "Resolved."}
    pairs = sources.next_order_pairs("A", ims, orders, days, prog)
    assert [p.pair_id for p in pairs] == ["a__b", "a__c", "b__d", "c__d"]   # never a -> d (not the next level)
    by = {p.pair_id: p for p in pairs}
    assert by["a__b"].days_between == "2.5" and by["a__c"].days_between == "" and by["b__d"].days_between == "7.5"
    assert by["a__b"].same_view is False and by["a__c"].same_view is True
    assert (by["a__b"].text_origin, by["a__c"].text_origin) == ("csv", "none")
    assert by["c__d"].progression_text == "Resolved."


# ------------------------------------------------------------------------------------------ MIMIC helpers
def test_study_time_reads_short_and_fractional_times():
    assert sources._study_time("21800110", "80000") == datetime(2180, 1, 10, 8, 0, 0)
    assert sources._study_time("21800105", "101500.5") == datetime(2180, 1, 5, 10, 15, 0)
    assert sources._study_time("21800105", "") == datetime(2180, 1, 5)


def test_chexpert_positives_and_first_pa_per_study():
    chex = [{"subject_id": "1", "study_id": "s1", "Edema": "1.0", "Effusion": "-1.0", "Pneumonia": ""},
            {"subject_id": "1", "study_id": "s2", "Edema": "0", "Effusion": "1", "Pneumonia": " 1 "}]
    assert sources.chexpert_positives(chex) == {"s1": ["Edema"], "s2": ["Effusion", "Pneumonia"]}
    meta = [{"study_id": "s1", "dicom_id": "lat", "ViewPosition": "LATERAL"},
            {"study_id": "s1", "dicom_id": "pa1", "ViewPosition": " pa "},
            {"study_id": "s1", "dicom_id": "pa2", "ViewPosition": "PA"},
            {"study_id": "s2", "dicom_id": "ap", "ViewPosition": "AP"}]
    stats = Counter()
    first = sources.first_pa_per_study(meta, stats)
    assert {k: v["dicom_id"] for k, v in first.items()} == {"s1": "pa1"} and stats["non_pa_images"] == 2


def test_mimic_subject_in_two_official_splits_is_an_error(tmp_path):
    import gzip
    from PIL import Image
    for study, dicom in (("50", "d1"), ("51", "d2")):
        folder = tmp_path / "files" / "p10" / "p10000001" / f"s{study}"
        folder.mkdir(parents=True)
        Image.new("L", (70, 70), 128).save(folder / f"{dicom}.jpg")
    tables = {"metadata": [["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"],
                           ["d1", "10000001", "50", "PA", "21800101", "0"], ["d2", "10000001", "51", "PA", "21800102", "0"]],
              "split": [["dicom_id", "study_id", "subject_id", "split"],
                        ["d1", "50", "10000001", "train"], ["d2", "51", "10000001", "test"]]}
    for name, rows in tables.items():
        with gzip.open(tmp_path / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", newline="") as f:
            csv.writer(f).writerows(rows)
    with pytest.raises(ValueError, match="is in splits 'train' and 'test'"):
        sources.load_mimic(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="MIMIC-CXR-JPG"):
        sources.load_mimic(tmp_path / "nothing", tmp_path)


# ------------------------------------------------------------------------------------------ prepare_data helpers
def test_stage2_row_keeps_by_the_rounded_score_and_uses_the_registered_prior():
    from train.prepare_data import stage2_row

    a, b = _im("a"), _im("b")
    a.license, b.license = "CC BY 4.0", "CC BY 4.0"
    p = PairRow(pair_id="a__b", patient_id="A", prior=a, followup=b, days_between="", same_view=True,
                progression_text="", text_origin="none")
    kept = stage2_row(p, "t", "csv", (0.649951, 0.5, "", "registered/a__b.png", None), "train", 0.65)
    assert kept["kept"] and kept["reg_score"] == 0.65 and kept["prior"] == "registered/a__b.png"
    assert kept["license"] == "CC BY 4.0"                                  # one licence, not "x ; x"
    dropped = stage2_row(p, "t", "csv", (0.6494, 0.5, "", "registered/a__b.png", None), "train", 0.65)
    assert not dropped["kept"] and dropped["prior"] == str(a.path) == dropped["prior_original"]
    off = stage2_row(p, "t", "csv", (None, None, "", "", None), "val", 0.65)   # --no-register
    assert off["kept"] and off["reg_score"] is None and off["prior"] == str(a.path) and off["split"] == "val"


def test_fallback_counts_and_stale_registered_priors(tmp_path):
    from train.prepare_data import fallback_counts, remove_stale_registered

    reasons = ["affine; identity kept", "similarity rejected as degenerate; identity kept", "", "optimiser failed"]
    assert fallback_counts(reasons) == {"identity_kept": 2, "affine_rejected_as_degenerate": 0,
                                        "similarity_rejected_as_degenerate": 1, "optimiser_failed": 1}
    (tmp_path / "registered").mkdir()
    for n in ("keep", "old", "dropped"):
        (tmp_path / "registered" / f"{n}.png").write_bytes(b"x")
    s2 = [{"prior": "registered/keep.png", "kept": True}, {"prior": "registered/dropped.png", "kept": False},
          {"prior": "/data/a.png", "kept": True}]
    remove_stale_registered(tmp_path, s2)
    assert sorted(p.name for p in (tmp_path / "registered").iterdir()) == ["keep.png"]
    remove_stale_registered(tmp_path / "none", s2)                         # no registered/ folder: nothing to do


def test_load_source_checks_before_reading(tmp_path):
    from train.prepare_data import load_source

    args = argparse.Namespace(source="mimic", reports=None, licence_filter=False)
    with pytest.raises(SystemExit, match="--describe rules or openai"):
        load_source(args, tmp_path, "dataset")
    data = _write_csv(tmp_path / "data.csv", [_row(image="a.png")])
    with pytest.raises(SystemExit, match="no row has a `license`"):
        load_source(argparse.Namespace(source="csv", licence_filter=True), data, "dataset")
    images, pairs, splits, stats = load_source(argparse.Namespace(source="csv", licence_filter=False), tmp_path, "dataset")
    assert [im.image_id for im in images] == ["a"] and pairs == [] and set(splits) == {"A"} and stats == {}
