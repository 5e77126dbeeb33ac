"""save_outputs: the samples of one run are one DICOM series of one study, marked synthetic,
with no local path and no patient identifier anywhere in the files."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from biomedjourney.export import public_settings, save_outputs, series_description
from biomedjourney.imaging import SYNTHETIC_NOTE, read_image
from biomedjourney.pipeline import GenerationOutput

PROMPT = "New right pleural effusion."
IDENTIFIERS = {"PatientName": "Doe^Johnathan", "PatientID": "MRN-98765-XYZ", "PatientBirthDate": "19700101"}


@pytest.fixture
def source_with_identifiers(tmp_path):
    """RG1_UNCI.dcm with a patient name, ID and birth date written into it."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    for kw, value in IDENTIFIERS.items():
        setattr(ds, kw, value)
    path = tmp_path / "identified.dcm"
    ds.save_as(path)
    back = pydicom.dcmread(path)
    assert all(str(back.get(kw)) == v for kw, v in IDENTIFIERS.items())
    return read_image(path)


def _output(tmp_path, n=3):
    rng = np.random.default_rng(0)
    prior = rng.random((64, 64), dtype=np.float32)
    model = tmp_path / "secret-home" / "models" / "biomedjourney-cxr"  # an absolute local path
    settings = {"prompt": PROMPT, "num_images": n, "seed": 5, "seeds": list(range(5, 5 + n)),
                "model": str(model), "mask_file": str(tmp_path / "secret-home" / "mask.png"), "steps": 2}
    images = [np.clip(prior + 0.05 * (i + 1), 0, 1) for i in range(n)]
    return GenerationOutput(images=images, prior=prior, seeds=list(range(5, 5 + n)), settings=settings)


def test_samples_are_one_series_of_one_study(tmp_path, source_with_identifiers):
    out_dir = tmp_path / "out"
    files = save_outputs(_output(tmp_path), out_dir, source=source_with_identifiers)
    dcms = sorted(p for p in files if p.suffix == ".dcm")
    assert len(dcms) == 3
    sets = [pydicom.dcmread(p) for p in dcms]
    assert len({ds.StudyInstanceUID for ds in sets}) == 1
    assert len({ds.SeriesInstanceUID for ds in sets}) == 1
    assert sets[0].StudyInstanceUID != sets[0].SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in sets}) == 3
    assert sorted(int(ds.InstanceNumber) for ds in sets) == [1, 2, 3]
    assert [int(ds.InstanceNumber) for ds in sets] == [1, 2, 3]  # followup_1.., in file order
    assert len({(ds.StudyDate, ds.StudyTime) for ds in sets}) == 1
    for ds in sets:
        assert ds.SeriesDescription == series_description(PROMPT)
        assert "SYNTHETIC" in ds.SeriesDescription and PROMPT in ds.SeriesDescription
        assert len(ds.SeriesDescription.encode()) <= 64
        # still marked synthetic everywhere
        assert ds.ConversionType == "SYN" and "DERIVED" in ds.ImageType and ds.Modality == "OT"
        assert ds.ImageComments.startswith(SYNTHETIC_NOTE)
        assert "synthetic" in ds.DerivationDescription.lower()
        assert read_image(dcms[0]).meta["synthetic"]
        # the progression text, labelled once
        assert f"Progression description: {PROMPT}" in ds.ImageComments
        assert ds.ImageComments.count("Progression") == 1 and "Progression text" not in ds.ImageComments
        assert ds.DerivationDescription.count("Progression description") == 1
    # a second call is a new study and a new series
    again = [pydicom.dcmread(p) for p in save_outputs(_output(tmp_path), tmp_path / "again") if p.suffix == ".dcm"]
    assert again[0].StudyInstanceUID != sets[0].StudyInstanceUID
    assert again[0].SeriesInstanceUID != sets[0].SeriesInstanceUID


def test_no_absolute_path_and_no_patient_identifier(tmp_path, source_with_identifiers):
    out_dir = tmp_path / "out"
    files = save_outputs(_output(tmp_path), out_dir, source=source_with_identifiers)
    secret = str(tmp_path / "secret-home")
    sidecar = json.loads((out_dir / "settings.json").read_text())
    assert sidecar["model"] == "biomedjourney-cxr" and sidecar["mask_file"] == "mask.png"
    for path in files:
        raw = path.read_bytes()
        assert secret.encode() not in raw and str(tmp_path).encode() not in raw, path.name
        for value in IDENTIFIERS.values():
            assert value.encode() not in raw, (path.name, value)
    for p in (f for f in files if f.suffix == ".dcm"):
        ds = pydicom.dcmread(p)
        assert str(ds.PatientName) == "" and ds.PatientID == "" and ds.PatientBirthDate == ""
        assert ds.PatientIdentityRemoved == "YES"
        settings = json.loads(ds.ImageComments.split("Settings: ", 1)[1])
        assert settings["model"] == "biomedjourney-cxr" and settings["num_images"] == 1
        assert "ViewPosition" not in ds  # not in the Secondary Capture IOD (dciodvfy), so not copied


def test_public_settings_keeps_text_and_relative_ids():
    s = {"prompt": "/ odd text", "negative_prompt": "/x", "model": "org/hub-model", "nested": {"p": "/a/b/c.png"},
         "list": ["/tmp/q/r", "rel/path"], "steps": 3}
    assert public_settings(s) == {"prompt": "/ odd text", "negative_prompt": "/x", "model": "org/hub-model",
                                  "nested": {"p": "c.png"}, "list": ["r", "rel/path"], "steps": 3}
