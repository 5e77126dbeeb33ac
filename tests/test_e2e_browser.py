"""End to end in a real browser: upload a DICOM, pick a description, generate, download the DICOM.

Debian chromium driven by Playwright's sync API; screenshots go to artifacts/screenshots/.
"""
import os
import re
import time
from pathlib import Path

import pytest

from biomedjourney.imaging import read_dicom_markers

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")]


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=ARGS, headless=True,
            accept_downloads=True, viewport={"width": 1400, "height": 1000})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def test_upload_generate_download(page, app_url, rg1_path, tmp_path):
    from playwright.sync_api import expect

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_default_timeout(60_000)
    page.goto(app_url)
    page.get_by_text("Research and education only").first.wait_for()
    page.locator("#model-status").get_by_text(re.compile(r"\d+×\d+ px")).wait_for()  # demo.load loaded the model
    page.screenshot(path=SCREENSHOTS / "01_start.png", full_page=True)

    # generating with nothing filled in is an error toast, and the seed box stays usable
    page.locator("#generate").click()
    page.locator(".toast-body.error", has_text="description is empty").wait_for()
    expect(page.get_by_label("Seed", exact=True)).to_be_visible()

    # upload the DICOM prior: the model-input preview and identifier-free info appear
    page.locator("input[type=file]").first.set_input_files(rg1_path)
    page.get_by_text("1841×1955 px").wait_for()
    assert page.get_by_text("View: PA").count() == 1

    # click an example description; it lands in the editable box
    page.get_by_text("New right pleural effusion.", exact=True).first.click()
    box = page.get_by_label("Describe the change (editable)")
    expect(box).to_have_value("New right pleural effusion.")
    page.screenshot(path=SCREENSHOTS / "02_ready.png", full_page=True)

    t0 = time.perf_counter()
    page.locator("#generate").click()
    page.locator("#followups img").first.wait_for()
    first_image_s = time.perf_counter() - t0
    model = os.environ.get("BIOMEDJOURNEY_TEST_MODEL") or "tiny model"
    print(f"\nclick -> first follow-up image: {first_image_s:.2f} s ({model}, CPU)")
    page.locator("#heatmaps img").first.wait_for()
    page.locator("#mean-change img").first.wait_for()
    page.locator("#uncertainty img").first.wait_for()
    dcm_link = page.locator("#downloads a[download$='.dcm']").first
    dcm_link.wait_for()
    expect(box).to_have_value("New right pleural effusion.")  # generating keeps the description
    page.screenshot(path=SCREENSHOTS / "03_results.png", full_page=True)

    with page.expect_download() as dl:
        dcm_link.click()
    path = tmp_path / dl.value.suggested_filename
    dl.value.save_as(path)
    markers = read_dicom_markers(path)
    assert markers["ConversionType"] == "SYN"
    assert "DERIVED" in markers["ImageType"]
    assert markers["PatientName"] == "" and markers["PatientID"] == ""
    assert "SYNTHETIC" in markers["SeriesDescription"]

    # click the second follow-up: the comparison slider switches to it (no error toast)
    def slider_srcs():
        return page.locator("#compare img").evaluate_all("els => els.map(e => e.src)")
    shown = slider_srcs()
    page.locator("#followups").get_by_label(re.compile(r"Thumbnail 2 of \d+")).click()
    deadline = time.monotonic() + 30
    while slider_srcs() == shown and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert slider_srcs() != shown
    page.screenshot(path=SCREENSHOTS / "04_compare.png", full_page=True)
    assert page.locator(".toast-body.error", has_not_text="description is empty").count() == 0
