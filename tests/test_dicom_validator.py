"""Exported DICOM checked by an external validator (dicom3tools' dciodvfy); study linking; model hash."""
import json
import shutil
import subprocess

import pytest

from biomedjourney.export import save_outputs
from biomedjourney.imaging import dicom_study_uid, read_image

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, rg1_path, tmp_path_factory):
    from biomedjourney.pipeline import BiomedJourneyPipeline
    mp = pytest.MonkeyPatch()
    mp.setenv("BIOMEDJOURNEY_MODEL", str(tiny_model_dir))  # the configured model, as in the app and CLI
    pipe = BiomedJourneyPipeline.from_pretrained(str(tiny_model_dir))
    src = read_image(rg1_path)
    out = pipe(pipe.prepare_prior(src), "New right pleural effusion.", num_images=2, seed=0, num_inference_steps=2)
    folder = tmp_path_factory.mktemp("export")
    new = save_outputs(out, folder / "new", source=src)
    same = save_outputs(out, folder / "same", source=src, study_uid=dicom_study_uid(rg1_path))
    mp.undo()
    return src, new, same, tiny_model_dir


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian dicom3tools) not installed: scripts/install-dev.sh")
def test_dciodvfy_finds_no_errors(exported):
    dcm = next(p for p in exported[1] if p.suffix == ".dcm")
    res = subprocess.run([DCIODVFY, str(dcm)], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    assert "Error" not in report, report
    # Accepted, by design: PatientID and StudyID are present but empty (Type 2 in the SC IOD; a synthetic
    # image never carries the source patient's values), which dciodvfy notes would not suffice for a DICOMDIR.
    accepted = ("needed to build DICOMDIR - Patient ID", "needed to build DICOMDIR - Study ID")
    warnings = [l for l in report.splitlines() if l.startswith("Warning") and not l.endswith(accepted)]
    assert warnings == [], report


def test_same_study_joins_the_priors_study_only_when_asked(exported, rg1_path):
    import pydicom
    src, new, same, _ = exported
    prior = pydicom.dcmread(rg1_path, stop_before_pixels=True)
    a = [pydicom.dcmread(p) for p in new if p.suffix == ".dcm"]
    b = [pydicom.dcmread(p) for p in same if p.suffix == ".dcm"]
    assert {d.StudyInstanceUID for d in a} != {prior.StudyInstanceUID}
    assert {d.StudyInstanceUID for d in b} == {prior.StudyInstanceUID}
    assert len({d.SeriesInstanceUID for d in b}) == 1 and b[0].SeriesInstanceUID != prior.get("SeriesInstanceUID")
    for d in a + b:  # never the source patient's identifiers
        assert d.PatientID == "" and d.PatientName == "" and d.StudyID == ""


def test_sidecar_records_the_models_content_hash(exported):
    from biomedjourney.resources import file_sha256
    _, new, _, model_dir = exported
    side = json.loads(next(p for p in new if p.name == "settings.json").read_text())
    weights = sorted((model_dir / "unet").glob("*.safetensors"))[0]
    assert side["model_sha256"] == file_sha256(weights)[:16]
