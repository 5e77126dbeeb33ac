"""The app scripted through its named API endpoints with gradio_client (server in-process)."""
from pathlib import Path

import pytest

from biomedjourney.imaging import read_dicom_markers


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def test_api_lists_the_named_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/describe", "/journey"} <= names


def _settings(**kw):
    return {"num_images": 2, "steps": 3, "guidance": 4.0, "image_guidance": 1.5, "seed": 5, "randomise": False,
            "scheduler": "ddim", "strength": 0.8, "transfer": True, **kw}


def test_generate_through_the_api(client, rg1_path):
    from gradio_client import handle_file

    out = client.predict(prior_file=handle_file(rg1_path), description="New right pleural effusion.",
                         **_settings(), region="auto", render=False, api_name="/generate")
    gallery, slider, heat, mean_map, std_map, settings, files, zip_path, seed, chips, notes, mask = out  # no State
    assert seed == 5 and settings["seeds"] == [5, 6] and settings["prompt"] == "New right pleural effusion."
    assert settings["strength"] == 0.8 and settings["change_transfer"] is True
    assert settings["edit_mask"] == "findings" and "Read as:" in notes
    assert [c["token"] for c in chips] == ["pleural effusion · right · new"]
    assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["Sample 1 · seed 5", "Sample 2 · seed 6"]
    assert all(Path(g["image"]).is_file() for g in gallery + heat)
    assert len(slider) == 2 and all(Path(p).is_file() for p in slider)
    assert Path(mean_map).is_file() and Path(std_map).is_file() and Path(zip_path).is_file() and Path(mask).is_file()
    dicoms = [Path(f) for f in files if f.endswith(".dcm")]
    assert len(dicoms) == 2
    m = read_dicom_markers(dicoms[0])
    assert m["ConversionType"] == "SYN" and "DERIVED" in m["ImageType"] and m["PatientName"] == ""


def test_plan_and_compose_through_the_api(client, rg1_path):
    from gradio_client import handle_file

    mask, notes = client.predict(handle_file(rg1_path), "New left pleural effusion.", "auto", False, api_name="/plan")
    assert Path(mask).is_file() and "Read as:** New left pleural effusion." in notes
    rows = ["consolidation", "right", "upper", "none", "new"] + [None, "none", "none", "none", "new"] * 2
    assert client.predict("", *rows, api_name="/compose") == "New right upper zone consolidation."


def test_describe_and_errors_through_the_api(client, rg1_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    text, info = client.predict("Small left pleural effusion.", "Large left pleural effusion.", "", "rules",
                                api_name="/describe")
    assert text == "Increased left pleural effusion." and "rule-based" in info
    with pytest.raises(AppError, match="description is empty"):
        client.predict(prior_file=handle_file(rg1_path), description="", **_settings(), api_name="/generate")
    with pytest.raises(AppError, match="Seed must be a whole number from 0"):
        client.predict(prior_file=handle_file(rg1_path), description="New right pleural effusion.",
                       **_settings(seed=-5), api_name="/generate")
