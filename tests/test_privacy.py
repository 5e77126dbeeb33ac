"""Patient data and secrets: a DICOM with identifiers planted at the top level, inside sequences and in private
tags goes through the CLI, the Python API and the app (gradio_client, downloading everything), and none of them
appears in the page, the logs, the outputs, the sidecars, the zips or the exported DICOM; every exported file
carries the synthetic markers; uploads are removed when the session ends; the OpenAI key never appears in a
message, a log or the page. (Text burned into the pixels is out of scope: it would pass through unseen.)"""
from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile import film
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_app import _has_label
from test_imaging import _dicom
from test_progression_llm import _Handler, _Stub

from biomedjourney import cli
from biomedjourney.service import export_followups, generate_followups, load_pipeline

PLANTED = {"PatientName": "Plantedname^Zebulon", "PatientID": "PID7731PLANT", "PatientBirthDate": "19230417",
           "InstitutionName": "Planted General Hospital", "AccessionNumber": "ACCPLANT5521",
           "OtherPatientIDs": "PIDOTHER8842", "ReferringPhysicianName": "Refdoctor^Quillon"}
IN_SEQUENCES = {"PIDSEQ0042", "ACCSEQ9090", "Seqname^Yardley"}
PRIVATE = {"PRIVATEPHI3141", "Privname^Xavier"}
TOKENS = [*(v.split("^")[0] for v in PLANTED.values()), *(v.split("^")[0] for v in IN_SEQUENCES | PRIVATE)]
KEY = "sk-planted-privacy-9f8e7d6c5b4a3210"
NOT_SYNTHETIC = {"prior_input.png", "edit_mask.png"}  # the prior as the model saw it, and the region mask


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    ds = pydicom.dcmread(io.BytesIO(_dicom((film(128, 128).astype(np.uint16) * 16), Modality="CR",
                                           ViewPosition="PA", BodyPartExamined="CHEST")))
    for kw, v in PLANTED.items():
        setattr(ds, kw, v)
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "PIDSEQ0042", "Seqname^Yardley"
    ds.OtherPatientIDsSequence = Sequence([other])
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureID = "ACCSEQ9090", "RP1"
    ds.RequestAttributesSequence = Sequence([request])
    block = ds.private_block(0x0011, "PLANTED CREATOR", create=True)
    block.add_new(0x01, "LO", "PRIVATEPHI3141")
    block.add_new(0x02, "PN", "Privname^Xavier")
    path = tmp_path_factory.mktemp("phi") / "Plantedname_Zebulon.dcm"  # the file name: the upload's own name
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.OtherPatientIDsSequence[0].PatientID == "PIDSEQ0042" and back[0x0011, 0x1001].value == "PRIVATEPHI3141"
    return path


def _leaks(blobs: dict[str, bytes]) -> list[str]:
    """'where: token' for every planted token found in any of the blobs (zip members opened)."""
    found = []
    for where, data in blobs.items():
        if where.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                found += _leaks({f"{where}/{n}": z.read(n) for n in z.namelist()})
            continue
        found += [f"{where}: {t}" for t in TOKENS if t.encode() in data or t.upper().encode() in data]
    return found


def _files(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for f in folders for p in Path(f).rglob("*") if p.is_file()}


def _marked(name: str, data: bytes) -> bool:
    """Whether an exported file says it is synthetic (PNG text chunk or burned-in label, DICOM, GIF, sidecar)."""
    suffix = Path(name).suffix
    if suffix == ".png":
        with Image.open(io.BytesIO(data)) as im:
            text = im.info.get("Software") == "BiomedJourney" and "SYNTHETIC" in im.info.get("Description", "")
            return text or (im.mode == "L" and _has_label(np.asarray(im)))  # gallery copies: the burned-in label
    if suffix == ".dcm":
        ds = pydicom.dcmread(io.BytesIO(data))
        return ds.ConversionType == "SYN" and "SYNTHETIC" in ds.ImageComments and ds.PatientIdentityRemoved == "YES"
    if suffix == ".gif":
        with Image.open(io.BytesIO(data)) as im:
            return b"SYNTHETIC" in im.info.get("comment", b"")
    if suffix == ".json":
        return "not for diagnosis" in json.loads(data)["notice"]
    if suffix == ".zip":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return all(_marked(n, z.read(n)) for n in z.namelist() if Path(n).name not in NOT_SYNTHETIC)
    raise AssertionError(f"unexpected exported file {name}")


def _check_outputs(blobs: dict[str, bytes]) -> None:
    assert blobs
    assert not _leaks(blobs), _leaks(blobs)
    unmarked = [n for n, d in blobs.items() if Path(n).name not in NOT_SYNTHETIC and not _marked(n, d)]
    assert not unmarked, unmarked


# --------------------------------------------------------------------------------------- CLI and API
def test_no_identifier_leaves_through_the_cli(planted, tiny_model_dir, tmp_path, capfd):
    base = ["--prior", str(planted), "--model", str(tiny_model_dir)]
    assert cli.main(["generate", *base, "--text", "New right pleural effusion.", "--out", str(tmp_path / "gen"),
                     "--num-images", "2", "--steps", "2", "--dicom", "--heatmaps"]) == 0
    assert cli.main(["journey", *base, "--out", str(tmp_path / "journey"),
                     "--steps", "day 1: new right pleural effusion; day 2: increasing right pleural effusion"]) == 0
    log = capfd.readouterr()
    assert not _leaks({"stdout": log.out.encode(), "stderr": log.err.encode()})
    _check_outputs(_files(tmp_path / "gen", tmp_path / "journey"))


def test_no_identifier_leaves_through_the_python_api(planted, tiny_model_dir, tmp_path, caplog):
    from biomedjourney.service import load_prior
    pipe = load_pipeline(str(tiny_model_dir))
    loaded, warnings = load_prior(planted)
    assert not _leaks({"meta": repr(loaded.meta).encode(), "warnings": repr(warnings).encode()})
    r = generate_followups(pipe, loaded, "New left pleural effusion.", seed=1, num_images=2,
                           sampler={"num_inference_steps": 2})
    assert not _leaks({"settings": json.dumps(r.settings, default=str).encode()})
    export_followups(r, tmp_path / "api", source=loaded, zip_name="all.zip")
    _check_outputs(_files(tmp_path / "api"))
    assert not _leaks({"log": caplog.text.encode()})


# --------------------------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client
    return Client(app_url, verbose=False)


def _local_paths(value) -> list[Path]:
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _local_paths(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_paths(v)]
    return [Path(value)] if isinstance(value, str) and Path(value).is_file() else []


def test_no_identifier_reaches_the_page_the_log_or_any_download(planted, app_module, app_url, client, capfd):
    import httpx
    from gradio_client import handle_file
    preview, info = client.predict(handle_file(str(planted)), api_name="/preview")
    gen = client.predict(handle_file(str(planted)), "New right pleural effusion.", 2, 2, 4.0, 1.5, 5, False, "ddim",
                         0.8, True, "auto", False, False, None, 0, api_name="/generate")
    jour = client.predict(handle_file(str(planted)), "day 1: new right pleural effusion; day 2: increasing right "
                          "pleural effusion", 2, 4.0, 1.5, 5, False, "ddim", 300, 0.8, True, api_name="/journey")
    texts = {"info": info, "generate": json.dumps(gen, default=str), "journey": json.dumps(jour, default=str)}
    page = {"page": httpx.get(app_url).text, "config": httpx.get(f"{app_url}config").text}
    assert "Planted" not in info and "Zebulon" not in json.dumps(texts)
    downloads = _local_paths([preview, gen, jour])
    assert len(downloads) > 10
    blobs = {str(p): p.read_bytes() for p in downloads}
    assert not _leaks(blobs) and not _leaks({k: v.encode() for k, v in {**texts, **page}.items()})
    session = app_module.OUTPUT_ROOT / client.session_hash  # what the runs exported: downloads and zips
    _check_outputs({**_files(session), **{str(p): p.read_bytes() for p in _local_paths([gen[6:8], jour[3:5]])}})
    assert all(_has_label(np.asarray(Image.open(g["image"]))) for g in gen[0])  # the gallery as shown
    log = capfd.readouterr()
    assert not _leaks({"log": (log.out + log.err).encode()})


def test_uploads_and_results_are_removed_when_the_session_ends(app_module, app_url, monkeypatch, tmp_path):
    from gradio_client import Client, handle_file
    from test_imaging import _png
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # the served app notices a closed client sooner (15 s)
    prior = tmp_path / "mine.png"  # content no other session uploaded (gradio keeps one copy per content)
    prior.write_bytes(_png(np.roll(film(), 7, 1)))
    c = Client(app_url, verbose=False, download_files=False)
    c.predict(handle_file(str(prior)), "New right pleural effusion.", 1, 2, 4.0, 1.5, 5, False, "ddim", 0.8, True,
              "auto", False, False, None, 0, api_name="/generate")
    session = c.session_hash
    uploads = [p for p, users in app_module._UPLOADS.items() if session in users]
    results = app_module.OUTPUT_ROOT / session
    assert len(uploads) == 1 and uploads[0].is_file() and results.is_dir()
    c.close()  # the heartbeat ends: gradio runs the app's unload handler
    deadline = time.monotonic() + 15
    while (uploads[0].exists() or results.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not uploads[0].exists() and not results.exists()


# --------------------------------------------------------------------------------------- the OpenAI key
class _EchoesTheKey(_Handler):
    """An OpenAI-compatible server that refuses the key and repeats it in its error (as a careless one might)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self._send(401, {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})


def test_the_openai_key_never_appears_in_messages_logs_or_the_page(app_url, client, monkeypatch, tmp_path, capfd):
    import httpx
    from gradio_client.exceptions import AppError
    stub = _Stub()
    stub.server.RequestHandlerClass = _EchoesTheKey
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("BIOMEDJOURNEY_LLM_CACHE", "off")
        with pytest.raises(AppError) as e:
            client.predict("Lungs clear.", "Small right effusion.", "", "auto", api_name="/describe")
        assert "HTTP 401" in str(e.value) and "[redacted]" in str(e.value) and KEY not in str(e.value)
        rc = cli.main(["describe", "--prior-report", "Lungs clear.", "--followup-report", "Small right effusion.",
                       "--backend", "openai"])
        log = capfd.readouterr()
        assert rc == 2 and "[redacted]" in log.err
        page = httpx.get(app_url).text + httpx.get(f"{app_url}config").text
        assert KEY not in log.out + log.err + page
    finally:
        stub.server.shutdown()
        stub.server.server_close()
