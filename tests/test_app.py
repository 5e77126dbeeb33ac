"""The app's handlers called directly (no server), with the tiny model; and journey.py's pieces."""
import json
import re
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pydicom
import pytest
from PIL import Image

from biomedjourney import journey, masks
from biomedjourney.config import SamplerConfig
from biomedjourney.imaging import read_dicom_markers, synthetic_label_box
from biomedjourney.progression import ProgressionResult

DESC = "New right pleural effusion."


def _views(app, prior, seed=7, randomise=False, n=2, **kw):
    """Every FollowUpView generate() streams (the first sample, then everything)."""
    args = dict(description=DESC, num_images=n, steps=3, guidance=4.0, image_guidance=1.5, seed=seed,
                randomise=randomise, scheduler="ddim")
    args.update(kw)
    return list(app.generate(prior, **args))


def _generate(app, prior, **kw):
    return _views(app, prior, **kw)[-1]


def _has_label(img: np.ndarray) -> bool:
    """The burned-in SYNTHETIC label: a black box with white text, top-left."""
    x0, y0, x1, y1 = synthetic_label_box(img.shape)
    box = img[y0:y1, x0:x1]
    return (box == 0).mean() > 0.3 and box.max() > 150  # at 64 px the text is antialiased grey


# ----------------------------------------------------------------------------- upload
def test_preview_dicom_shows_model_input_and_no_identifiers(app_module, rg1_path):
    preview, info = app_module.preview_prior(rg1_path)
    assert preview.shape == (64, 64) and preview.dtype == np.uint8  # the tiny model's resolution
    assert "1841×1955 px" in info and "PA" in info and "CR / CHEST" in info
    ds = pydicom.dcmread(rg1_path, stop_before_pixels=True)
    for kw in ("PatientName", "PatientID", "InstitutionName", "StudyDate", "AccessionNumber"):
        value = str(ds.get(kw, "") or "").strip()
        if len(value) > 2:
            assert value not in info, kw
    assert "patient" not in info.lower()


def test_preview_warns_for_a_colour_image_and_clears(app_module, tmp_path):
    rgb = np.zeros((128, 128, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 128, dtype=np.uint8)  # a red ramp: a figure, not an X-ray
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    with pytest.warns(UserWarning, match="colour"):
        preview, _ = app_module.preview_prior(str(tmp_path / "photo.png"))
    assert preview.shape == (64, 64)
    assert app_module.preview_prior(None) == (None, "*No image yet.*")


def test_bad_file_is_a_gr_error_with_the_reason(app_module, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    preview, info = app_module.preview_prior(str(bad))  # said beside the upload, not as a second toast
    assert preview is None and "not an image that can be read" in info
    with pytest.raises(gr.Error, match="not an image that can be read"):
        _generate(app_module, str(bad))


def test_generate_refuses_missing_inputs(app_module, rg1_path):
    with pytest.raises(gr.Error, match="No prior image"):
        _generate(app_module, None)
    with pytest.raises(gr.Error, match="description is empty"):
        _generate(app_module, rg1_path, description="   ")
    with pytest.raises(gr.Error, match="Unknown scheduler"):
        _generate(app_module, rg1_path, scheduler="plms")
    with pytest.raises(gr.Error, match="seed is empty"):
        _generate(app_module, rg1_path, seed=None)
    for bad in (-5, 2.5):  # our message naming the Seed field, not gradio's "less than minimum value"
        with pytest.raises(gr.Error, match=rf"Seed must be a whole number from 0 to \d+, got {bad}\. Change the Seed"):
            _generate(app_module, rg1_path, seed=bad)
    with pytest.raises(gr.Error, match=r"Change allowed \(strength\) must be a number from 0.05 to 1, got 1.5"):
        _generate(app_module, rg1_path, strength=1.5)
    for field, bad, label in [("steps", 0, "Denoising steps"), ("steps", "abc", "Denoising steps"),
                              ("guidance", -1, "Text guidance"), ("image_guidance", float("nan"), "Image guidance"),
                              ("num_images", 99, "Samples")]:
        with pytest.raises(gr.Error, match=rf"{re.escape(label)} must be .* Change the {re.escape(label)} field"):
            _generate(app_module, rg1_path, **{field: bad})


def test_help_answers_before_gradio_is_imported():
    import subprocess
    import sys
    import time
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "app.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and all(f in res.stdout for f in ("--model", "--port", "--host", "--share"))
    assert time.perf_counter() - t0 < 3.0


def test_example_priors_come_from_rg1_and_raise_no_warning(app_module):
    from biomedjourney.imaging import cxr_warnings, read_image
    files = app_module._example_files()
    assert len(files) == 4 and all(Path(f).name.startswith("RG1_UNCI") for f in files)
    assert {Path(f).suffix for f in files} == {".dcm", ".png", ".jpg"}
    for f in files:
        img = read_image(f)
        assert not img.meta.get("synthetic") and cxr_warnings(img) == [], f


def test_model_status_shows_no_absolute_path(app_module, tiny_model_dir):
    status = app_module.on_load()[-1]
    assert str(tiny_model_dir) not in status and tiny_model_dir.name in status


# ----------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def generated(app_module, rg1_path):
    """One generate() run on the DICOM example: 2 samples, seed 7."""
    return _generate(app_module, rg1_path, seed=7)


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    """A 96×96 grey PNG prior (cheaper to read than the 7 MB DICOM)."""
    path = tmp_path_factory.mktemp("prior") / "prior.png"
    Image.fromarray(np.tile(np.linspace(30, 220, 96).astype(np.uint8), (96, 1))).save(path)
    return str(path)


def test_generate_returns_marked_images_heatmaps_and_files(app_module, generated):
    out = generated
    settings = out.settings
    assert out.seed == 7 and settings["seeds"] == [7, 8] and settings["scheduler"] == "ddim"
    assert settings["prompt"] == DESC and settings["num_inference_steps"] == 3
    assert [cap for _, cap in out.gallery] == ["Sample 1 · seed 7", "Sample 2 · seed 8"]
    for img, _ in out.gallery:
        assert img.shape == (64, 64) and img.dtype == np.uint8 and _has_label(img)
    before, after = out.slider
    assert not _has_label(before) and _has_label(after)  # the prior is shown as it is
    assert [cap for _, cap in out.heatmaps] == ["Sample 1", "Sample 2"]
    names = [Path(h).name for h, _ in out.heatmaps] + [Path(out.mean_change).name, Path(out.uncertainty).name]
    assert names == ["heatmap_sample1.png", "heatmap_sample2.png", "heatmap_mean_change.png",
                     "heatmap_uncertainty.png"]
    for path in [h for h, _ in out.heatmaps] + [out.mean_change, out.uncertainty]:
        with Image.open(path) as im:  # rendered figures (RGB), saved with the run
            assert im.mode == "RGB" and im.height > 300 and Path(path).parent == Path(out.zip).parent

    paths = [Path(p) for p in out.files]
    assert all(p.is_file() for p in paths)
    dicoms = [p for p in paths if p.suffix == ".dcm"]
    assert len(dicoms) == 2 and sum(p.suffix == ".png" for p in paths) >= 2 + 4  # samples + heatmaps
    for d in dicoms:
        m = read_dicom_markers(d)
        assert m["ConversionType"] == "SYN" and "DERIVED" in m["ImageType"] and m["PatientName"] == ""
    assert Path(out.zip).is_file()
    with zipfile.ZipFile(out.zip) as z:
        assert sorted(Path(n).name for n in z.namelist()) == sorted(p.name for p in paths)
    assert Path(out.zip).parent.parent.parent == app_module.OUTPUT_ROOT  # OUTPUT_ROOT/session/run


def test_generate_streams_the_first_sample_then_everything(app_module, small_png):
    first, every, last = _views(app_module, small_png, seed=3, n=3)
    assert [cap for _, cap in first.gallery] == ["Sample 1 · seed 3"] and len(last.gallery) == 3
    assert [cap for _, cap in every.gallery] == [cap for _, cap in last.gallery] and every.files == gr.skip()
    np.testing.assert_allclose(first.gallery[0][0], last.gallery[0][0], atol=1)  # the same image, shown earlier
    assert first.seed == 3 and first.chips == last.chips and len(first.state["images"]) == 1
    for name in ("heatmaps", "mean_change", "uncertainty", "settings", "files", "zip"):  # sent once, at the end
        assert getattr(first, name) == gr.skip(), name
    assert last.settings["seeds"] == [3, 4, 5] and Path(last.zip).is_file()
    one = _views(app_module, small_png, n=1)                 # one call: its image, then the heatmaps and files
    assert len(one) == 2 and len(one[0].gallery) == 1 and one[0].zip == gr.skip() and Path(one[1].zip).is_file()


def test_generate_shows_the_findings_and_the_region(app_module, generated):
    out = generated
    assert out.chips == [("pleural effusion · right · new", "new")]
    assert "**Read as:** New right pleural effusion." in out.notes and "described findings" in out.notes
    assert out.settings["edit_mask"] == "findings" and out.settings["region_restricted"] is True
    assert out.settings["findings"][0]["side"] == "right"
    assert out.mask_preview.shape == (64, 64, 3) and out.mask_preview.dtype == np.uint8
    sidecar = json.loads((Path(out.zip).parent / "settings.json").read_text())
    assert sidecar["edit_mask"] == "findings" and "edit_mask.png" in sidecar["files"]


def test_same_seed_same_images_random_seed_is_reported(app_module, small_png):
    c = _generate(app_module, small_png, seed=11, n=1, randomise=True)
    assert c.seed != 11 and c.settings["seed"] == c.seed   # the seed actually used goes back to the box
    d = _generate(app_module, small_png, seed=c.seed, n=1)
    assert np.array_equal(c.gallery[0][0], d.gallery[0][0])   # same seed + settings = same image
    assert Path(c.zip).parent != Path(d.zip).parent           # each run keeps its own folder
    assert c.settings["strength"] == app_module.get_pipe().defaults.strength   # no slider value: the model's
    e = _generate(app_module, small_png, seed=c.seed, n=1, strength=0.5)
    assert e.settings["strength"] == 0.5 and not np.array_equal(e.gallery[0][0], d.gallery[0][0])
    t = _generate(app_module, small_png, seed=c.seed, n=1, transfer=True)
    assert t.settings["change_transfer"] is True and c.settings["change_transfer"] is False
    assert not np.array_equal(t.gallery[0][0], d.gallery[0][0])


def test_clicking_a_sample_compares_it_with_the_prior(app_module, generated):
    before, after = app_module.compare(generated.state, gr.SelectData(None, {"index": 1, "value": None}))
    assert np.array_equal(before, generated.slider[0])
    assert np.array_equal(after, generated.gallery[1][0])  # the second gallery image


# ----------------------------------------------------------------------------- findings, region, composer
def test_chips_follow_the_description_as_typed(app_module):
    assert app_module.read_findings("New right basal pleural effusion") == [
        ("pleural effusion · right · base · new", "new")]
    two = app_module.read_findings("Increased cardiomegaly. New left pneumothorax.")
    assert {c for c, _ in two if c.strip()} == {"cardiomegaly · increased", "pneumothorax · left · new"}
    assert app_module.read_findings("") == [] and app_module.read_findings("No significant interval change.") == []


def test_mask_preview_tints_the_region_and_lists_the_notes(app_module, small_png):
    img, notes = app_module.preview_plan(small_png, "New left pleural effusion.", "auto", False)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    tinted = (img[..., 0].astype(int) - img[..., 2]) > 20
    assert 0 < tinted.mean() < 0.6                          # part of the film, not all of it
    assert "average anatomy" in notes                      # a grey ramp has no lungs: the stated fallback
    img, notes = app_module.preview_plan(small_png, "New left pleural effusion.", "off", False)
    assert "the whole film" in notes
    _, notes = app_module.preview_plan(small_png, "the patient looks fine", "auto", False)
    assert "No finding recognised in 'the patient looks fine'" in notes
    _, notes = app_module.preview_plan(small_png, "New right pneumothorax.", "auto", False)
    assert "pneumothorax: 11 training images" in notes
    assert app_module.preview_plan(None, "x", "auto", False) == (None, "")


def test_paint_canvas_shows_the_prior_as_the_model_sees_it(app_module, small_png):
    up = app_module.paint_canvas(True, small_png)
    assert up["visible"] is True and up["value"]["layers"] == []
    assert up["value"]["background"].shape == (64, 64)     # painted at the model-input frame
    assert app_module.paint_canvas(False, small_png)["visible"] is False


def _canvas(mask):
    return {"background": None, "layers": [masks.mask_layer(mask)], "composite": None}


def test_an_empty_painted_mask_falls_back_to_the_automatic_region(app_module, small_png):
    empty = {"background": None, "layers": [np.zeros((64, 64, 4), np.uint8)], "composite": None}
    with pytest.warns(UserWarning, match="painted edit mask is empty.*automatic region"):
        out = _generate(app_module, small_png, n=1, paint=True, canvas=empty)
    assert out.settings["edit_mask"] == "findings"


def test_a_painted_box_is_the_only_place_that_changes(app_module, small_png):
    box = np.zeros((64, 64), np.float32)
    box[20:40, 8:28] = 1
    out = _generate(app_module, small_png, n=2, paint=True, canvas=_canvas(box), strength=1.0)
    assert out.settings["edit_mask"] == "painted" and "your painted region" in out.notes
    prior, outside = out.state["prior"], box == 0
    for img in out.state["images"]:
        assert np.array_equal(img[outside], prior[outside])
        assert not np.array_equal(img[~outside], prior[~outside])
    sidecar = json.loads((Path(out.zip).parent / "settings.json").read_text())
    assert sidecar["edit_mask"] == "painted"
    full = np.ones((64, 64), np.float32)
    with pytest.warns(UserWarning, match="covers 100% of the film"):
        _generate(app_module, small_png, n=1, paint=True, canvas=_canvas(full))


def test_composer_writes_the_canonical_text(app_module):
    rows = ["pleural effusion", "right", "base", "moderate", "new",
            "pulmonary edema", "bilateral", "none", "none", "increased",
            None, "none", "none", "none", "new"]
    text = app_module.compose("", *rows)
    assert text == "New moderate right basal pleural effusion. Increased bilateral pulmonary edema."
    assert app_module.read_findings(text)[0] == ("pleural effusion · right · base · moderate · new", "new")
    assert app_module.compose("Keep my words.", *rows).startswith("Keep my words. New moderate right")
    with pytest.warns(UserWarning, match="Pick a finding"):
        assert isinstance(app_module.compose("typed", *([None, "none", "none", "none", "new"] * 3)),
                          type(gr.skip()))


def test_examples_are_what_the_model_draws(app_module):
    d = app_module.get_pipe().defaults
    assert ("New right pneumothorax." in app_module.EXAMPLE_DESCRIPTIONS) == d.render
    assert "New right pleural effusion." in app_module.EXAMPLE_DESCRIPTIONS
    assert "drawn inside its region from radiological knowledge and harmonised by the model" in app_module.EXAMPLES_NOTE


# ----------------------------------------------------------------------------- describe
def test_describe_with_the_rules_backend(app_module):
    text, info = app_module.describe("Small left pleural effusion. No pneumothorax.",
                                     "Large left pleural effusion. New right pneumothorax.", "", "rules")
    assert text == "New right pneumothorax. Increased left pleural effusion."
    assert "offline rule-based differ" in info
    text, _ = app_module.describe("Clear lungs.", "", "new right pleural effusion", "rules")
    assert "right pleural effusion" in text.lower()
    with pytest.raises(gr.Error, match="not both"):
        app_module.describe("Clear lungs.", "Effusion.", "new effusion", "rules")
    with pytest.raises(gr.Error, match="follow-up report"):
        app_module.describe("Clear lungs.", " ", "", "rules")
    with pytest.raises(gr.Error, match="prior report"):
        app_module.describe("", "Effusion.", "", "rules")


def test_describe_names_the_llm_backend(app_module, monkeypatch):
    monkeypatch.setattr(app_module, "describe_progression", lambda *a, **k: ProgressionResult(
        "New left pleural effusion.", backend="openai", model="gpt-4o", cached=True))
    text, info = app_module.describe("Clear.", "Left effusion.", "", "auto")
    assert text == "New left pleural effusion."
    assert "GPT-4 via OpenAI-compatible API (model gpt-4o)" in info and "cached" in info


# ----------------------------------------------------------------------------- journey (app)
def test_journey_returns_a_gif_and_a_filmstrip(app_module, small_png):
    strip, gif, settings, files, zip_path, seed = app_module.run_journey(
        small_png, "day 3: new effusion; day 10: partial resolution", 3, 4.0, 1.5, 5, False, "ddim", 300)
    with Image.open(strip) as im:
        assert im.width == 3 * 64 + 2 * journey.GAP
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 3 and im.info["duration"] == 300
        assert b"SYNTHETIC" in im.info["comment"]
    assert [s["label"] for s in settings["steps"]] == ["day 3", "day 10"]
    assert [s["seed"] for s in settings["steps"]] == [5, 6]
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
    assert "journey.gif" in names and sum(n.endswith(".dcm") for n in names) == 2
    with pytest.raises(gr.Error, match="journey is empty"):
        app_module.run_journey(small_png, " ;\n ", 3, 4.0, 1.5, 5, False, "ddim", 300)
    with pytest.raises(gr.Error, match="no description"):
        app_module.run_journey(small_png, "day 3:", 3, 4.0, 1.5, 5, False, "ddim", 300)


# ----------------------------------------------------------------------------- model and launch
def test_missing_model_is_explained(app_module, monkeypatch, tmp_path):
    monkeypatch.setenv("BIOMEDJOURNEY_MODEL", str(tmp_path / "no-model-here"))
    with pytest.raises(gr.Error, match="--model PATH_OR_HUB_ID"):
        app_module.get_pipe()
    assert "Model not available" in app_module.on_load()[-1]
    assert isinstance(app_module.initial_defaults(), SamplerConfig)


def test_on_load_sets_the_models_defaults(app_module, tiny_model_dir):
    values = app_module.on_load()
    d = app_module.get_pipe().defaults
    assert values[:10] == [d.num_images, d.num_inference_steps, d.guidance_scale, d.image_guidance_scale,
                           d.strength, d.change_transfer, d.seed, d.scheduler, d.region, d.render]
    assert "64×64" in values[-1]
    assert app_module.initial_defaults() == d  # read from the folder's config without loading weights


def test_main_flags_set_the_model_and_launch_options(app_module, monkeypatch):
    seen = {}
    monkeypatch.setattr(app_module.demo, "launch", lambda **kw: seen.update(kw))
    monkeypatch.setenv("BIOMEDJOURNEY_MODEL", "x")
    app_module.main(["--model", "/some/model", "--port", "7999", "--host", "0.0.0.0", "--share"])
    import os
    assert os.environ["BIOMEDJOURNEY_MODEL"] == "/some/model"
    assert seen["server_port"] == 7999 and seen["server_name"] == "0.0.0.0" and seen["share"] is True


def test_named_api_endpoints(app_module):
    names = {d.api_name for d in app_module.demo.fns.values()}
    assert {"generate", "describe", "journey", "plan", "compose"} <= names


# ----------------------------------------------------------------------------- journey.py
def test_parse_journey():
    assert journey.parse_journey("day 3: worsening opacities; day 10: partial resolution") == [
        ("day 3", "worsening opacities"), ("day 10", "partial resolution")]
    assert journey.parse_journey("New effusion\n\nIncreasing effusion;") == [
        ("step 1", "New effusion"), ("step 2", "Increasing effusion")]
    long = "a" * 40 + ": b"  # a long prefix is part of the description, not a label
    assert journey.parse_journey(long) == [("step 1", long)]
    for bad, msg in [("", "empty"), (" ; \n", "empty"), ("day 3:", "no description"),
                     (";".join(["x"] * 13), "at most 12")]:
        with pytest.raises(ValueError, match=msg):
            journey.parse_journey(bad)


def test_journey_service_chains_each_steps_image_into_the_next_prior(tmp_path):
    from biomedjourney.pipeline import tiny_pipeline
    from biomedjourney.service import run_journey
    pipe, ticks = tiny_pipeline(seed=0), []
    start = np.random.default_rng(0).uniform(0.2, 0.8, (64, 64)).astype(np.float32)
    r = run_journey(pipe, start, "a: new right pleural effusion; b: new left pleural effusion; c: edema", seed=4,
                    sampler={"num_inference_steps": 3, "change_transfer": False}, region="off", render=False,
                    on_step=lambda i, total: ticks.append((i, total)))
    assert [x.seeds for x in r.results] == [[4], [5], [6]] and [lab for lab, _ in r.steps] == ["a", "b", "c"]
    np.testing.assert_array_equal(r.results[0].prior, start)
    for k in (1, 2):  # step k starts from step k-1's image
        np.testing.assert_array_equal(r.results[k].prior, r.results[k - 1].images[0])
    assert ticks == [(i, 9) for i in range(1, 10)] and len(r.frames) == 4 and r.filmstrip is None
    with pytest.raises(ValueError, match="journey is empty"):
        run_journey(pipe, start, " ; ", seed=0)


def test_journey_progress_ends_full_when_drawings_are_harmonised():
    """A drawn finding is harmonised at render_strength, fewer steps than the strength setting: the bar still ends
    at its total (it stopped at 40 % when the total was counted at the default strength)."""
    from biomedjourney.pipeline import tiny_pipeline
    from biomedjourney.service import run_journey
    pipe, ticks = tiny_pipeline(seed=0), []
    start = np.random.default_rng(1).uniform(0.2, 0.8, (64, 64)).astype(np.float32)
    run_journey(pipe, start, "a: new right pleural effusion; b: new left pleural effusion", seed=0,
                sampler={"num_inference_steps": 5}, render=True, on_step=lambda i, total: ticks.append((i, total)))
    assert ticks[-1][0] == ticks[-1][1] == len(ticks) < 10
    assert [i for i, _ in ticks] == list(range(1, len(ticks) + 1))


def test_filmstrip_and_gif_mark_generated_frames(tmp_path):
    frames = [np.full((64, 64), v, np.float32) for v in (0.5, 0.6, 0.7)]
    strip = journey.filmstrip(frames, ["prior (input)", "day 3", "day 10"], synthetic=[False, True, True])
    h, w = strip.shape
    assert w == 3 * 64 + 2 * journey.GAP and h > 64
    assert not _has_label(strip[:64, :64])                    # the real prior is not marked
    for i in (1, 2):
        assert _has_label(strip[:64, i * (64 + journey.GAP):i * (64 + journey.GAP) + 64])
    assert strip[64:, :64].max() > 150                        # its caption is drawn below
    gif = journey.write_gif(frames, ["a", "b", "c"], tmp_path / "j.gif", duration_ms=250)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.info["duration"] == 250 and im.info["loop"] == 0
        for k in range(3):
            im.seek(k)
            assert _has_label(np.asarray(im.convert("L"))[:64, :64])  # default: every frame marked
    with pytest.raises(ValueError, match="labels"):
        journey.filmstrip(frames, ["a"])
    with pytest.raises(ValueError, match="same shape"):
        journey.filmstrip([frames[0], np.zeros((32, 32))], ["a", "b"])


def test_make_zip_keeps_sub_folders(tmp_path):
    (tmp_path / "step01").mkdir()
    a, b = tmp_path / "a.gif", tmp_path / "step01" / "s.dcm"
    a.write_bytes(b"gif")
    b.write_bytes(b"dcm")
    z = journey.make_zip([a, b], tmp_path / "out" / "all.zip")
    with zipfile.ZipFile(z) as f:
        assert sorted(f.namelist()) == ["a.gif", "step01/s.dcm"] and f.read("step01/s.dcm") == b"dcm"
    with pytest.raises(FileNotFoundError, match="missing"):
        journey.make_zip([tmp_path / "nope.png"], tmp_path / "x.zip")
