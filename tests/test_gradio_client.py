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


def test_generate_through_the_api(client, rg1_path):
    from gradio_client import handle_file

    gallery, slider, heat, mean_map, std_map, settings, files, zip_path, seed = client.predict(
        handle_file(rg1_path), "New right pleural effusion.", 2, 3, 4.0, 1.5, 5, False, "ddim", 0.8, True,
        api_name="/generate")
    assert seed == 5 and settings["seeds"] == [5, 6] and settings["prompt"] == "New right pleural effusion."
    assert settings["strength"] == 0.8 and settings["change_transfer"] is True
    assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["Sample 1 · seed 5", "Sample 2 · seed 6"]
    assert all(Path(g["image"]).is_file() for g in gallery + heat)
    assert len(slider) == 2 and all(Path(p).is_file() for p in slider)
    assert Path(mean_map).is_file() and Path(std_map).is_file() and Path(zip_path).is_file()
    dicoms = [Path(f) for f in files if f.endswith(".dcm")]
    assert len(dicoms) == 2
    m = read_dicom_markers(dicoms[0])
    assert m["ConversionType"] == "SYN" and "DERIVED" in m["ImageType"] and m["PatientName"] == ""


def test_describe_and_errors_through_the_api(client, rg1_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    text, info = client.predict("Small left pleural effusion.", "Large left pleural effusion.", "", "rules",
                                api_name="/describe")
    assert text == "Increased left pleural effusion." and "rule-based" in info
    with pytest.raises(AppError, match="description is empty"):
        client.predict(handle_file(rg1_path), "", 1, 2, 4.0, 1.5, 0, False, "ddim", api_name="/generate")
