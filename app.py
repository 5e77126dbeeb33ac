"""BiomedJourney web app: prior chest X-ray + progression text -> synthetic follow-ups.

    python app.py                          # the model in assets/biomedjourney-cxr
    python app.py --model PATH_OR_HUB_ID   # another model folder or a Hub repo id
    python app.py --share --port 7861

Wiring only: every computation lives in the biomedjourney package. The model is loaded
lazily, once ($BIOMEDJOURNEY_MODEL, set by --model, else assets/); when it is missing the app
still starts and says how to get one. Results of each run are kept in a per-session folder
under $BIOMEDJOURNEY_OUTPUTS (default: the system temp dir), removed when the session ends.
"""
import argparse
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from biomedjourney import NOTICE, journey
from biomedjourney.config import ModelConfig, SamplerConfig
from biomedjourney.imaging import (ImageLoadError, LoadedImage, to_uint8, cxr_warnings, mark_synthetic,
                                   read_image, save_png, to_model_input)
from biomedjourney.model import SCHEDULERS
from biomedjourney.pipeline import (MAX_IMAGES, MODEL_ENV, BiomedJourneyPipeline, default_model_path, denoising_steps,
                                    progress_callback, read_defaults)
from biomedjourney.progression import NO_CHANGE, ProgressionError, describe_progression

ROOT = Path(__file__).resolve().parent
OUTPUT_ROOT = Path(os.environ.get("BIOMEDJOURNEY_OUTPUTS") or Path(tempfile.gettempdir()) / "biomedjourney-app")
FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"]
MAX_SAMPLES = min(8, MAX_IMAGES)
SCHEDULER_LABELS = {"dpmsolver++": "DPM-Solver++ (fast, default)", "ddim": "DDIM (deterministic)",
                    "euler_a": "Euler ancestral (more varied)"}
EXAMPLE_DESCRIPTIONS = [
    "New right pleural effusion.", "Increasing left pleural effusion.", "Resolving bilateral pleural effusions.",
    "New right lower lobe consolidation.", "Increasing left basilar consolidation.", "Resolving right consolidation.",
    "New pulmonary edema.", "Worsening pulmonary edema.", "Improving pulmonary edema.",
    "New cardiomegaly.", "Increasing cardiomegaly.", "Decreased heart size.",
    "New right pneumothorax.", "Increasing left pneumothorax.", "Resolved right pneumothorax.",
    NO_CHANGE,
]
EXAMPLE_JOURNEY = "day 3: new right lower lobe consolidation\nday 7: increasing right consolidation\n" \
                  "day 14: resolving right consolidation"
DISCLAIMER = f"⚠️ **{NOTICE}**"

# ======================================================================== model (lazy, once)
_PIPE: BiomedJourneyPipeline | None = None
_PIPE_SOURCE = ""
_LOCK = threading.Lock()


def model_source() -> str:
    return str(default_model_path())  # $BIOMEDJOURNEY_MODEL (set by --model) or assets/


def get_pipe() -> BiomedJourneyPipeline:
    """The loaded pipeline; gr.Error saying how to get a model when there is none."""
    global _PIPE, _PIPE_SOURCE
    src = model_source()
    with _LOCK:
        if _PIPE is None or _PIPE_SOURCE != src:
            try:
                _PIPE, _PIPE_SOURCE = BiomedJourneyPipeline.from_pretrained(src), src
            except Exception as e:  # noqa: BLE001 - missing folder, Hub/network, bad config or weights
                raise gr.Error(f"No model could be loaded from '{src}': {e} To fix: start the app with "
                               f"`python app.py --model PATH_OR_HUB_ID`, or set {MODEL_ENV}=PATH, or put "
                               "a trained model folder at assets/biomedjourney-cxr (see README).",
                               title="Model not available") from None
    return _PIPE


def initial_defaults() -> SamplerConfig:
    """The model's sampler defaults read from its config file (no weights loaded), else the package's."""
    try:
        return read_defaults(model_source())
    except (OSError, ValueError):
        return SamplerConfig()


# ======================================================================== helpers
def _error(message: str, title: str = "Error") -> gr.Error:
    """A gr.Error for bad input: shown to the user, not logged as a server traceback."""
    return gr.Error(message, title=title, print_exception=False)


def _run_folder(request: gr.Request | None, kind: str) -> Path:
    """A new folder for one run, inside this session's folder (earlier runs are kept)."""
    session = re.sub(r"[^A-Za-z0-9_-]", "", getattr(request, "session_hash", None) or "") or "local"
    folder = OUTPUT_ROOT / session / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def _cleanup_session(request: gr.Request):
    session = re.sub(r"[^A-Za-z0-9_-]", "", getattr(request, "session_hash", None) or "")
    if session:
        shutil.rmtree(OUTPUT_ROOT / session, ignore_errors=True)


def _read_prior(prior_file) -> LoadedImage:
    if not prior_file:
        raise _error("No prior image: upload a PNG, JPEG or DICOM chest X-ray (drag it onto the upload "
                     "box) or click one of the example images.", title="Prior image missing")
    try:
        return read_image(prior_file)
    except ImageLoadError as e:
        raise _error(str(e), title="Cannot read the prior image") from None


def _check_description(description: str, what: str = "description") -> str:
    text = (description or "").strip()
    if not text:
        raise _error(f"The {what} is empty: write the change you want to see (e.g. 'New right pleural "
                     "effusion.'), click an example, or use 'Write it from reports'.",
                     title="Description missing")
    return text


def _sampler(num_images, steps, guidance, image_guidance, scheduler, strength=None, transfer=None) -> dict:
    if scheduler not in SCHEDULERS:
        raise _error(f"Unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
    return {"num_images": int(num_images), "num_inference_steps": int(steps),
            "guidance_scale": float(guidance), "image_guidance_scale": float(image_guidance),
            "scheduler": scheduler, "strength": None if strength is None else float(strength),  # None: model default
            "change_transfer": None if transfer is None else bool(transfer)}


def _seed(seed, randomise: bool) -> int:
    if randomise:
        return random.SystemRandom().randrange(2**31 - 1)
    if seed is None:
        raise _error("The seed is empty: enter a whole number, or tick 'Random seed'.")
    return int(seed)


def _progress(progress, label: str, total: int):
    return progress_callback(lambda i: progress((i, total), desc=label, unit="steps"))


def _info_markdown(img: LoadedImage, resolution: int, aspect: str) -> str:
    m = img.meta
    rows = [("File", f"{str(m.get('format', '?')).upper()}, {m.get('mode', '')}".rstrip(", ")),
            ("Size", f"{m.get('width')}×{m.get('height')} px"),
            ("View", m.get("view_position") or "not stated"),
            ("Modality / body part",
             " / ".join(x for x in (m.get("modality"), m.get("body_part")) if x) or "not stated"),
            ("Model input", f"{resolution}×{resolution} px ({'centre crop' if aspect == 'crop' else 'padded'})")]
    if m.get("pixel_spacing"):
        rows.insert(2, ("Pixel spacing", " × ".join(f"{v:g}" for v in m["pixel_spacing"]) + " mm"))
    if m.get("synthetic"):
        rows.append(("Note", "marked SYNTHETIC"))
    return "\n".join(f"- **{k}:** {v}" for k, v in rows)


def _example_files() -> list[str]:
    """pydicom's RG1_UNCI.dcm plus assets/examples/*, copied into the temp dir gradio may serve."""
    import pydicom.data

    sources = [Path(pydicom.data.get_testdata_file("RG1_UNCI.dcm"))]
    sources += sorted(p for p in (ROOT / "assets" / "examples").glob("*") if p.suffix.lower() in FILE_TYPES)
    folder = OUTPUT_ROOT / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        dst = folder / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
        out.append(str(dst))
    return out


# ======================================================================== handlers
def preview_prior(prior_file):
    """Upload -> (the image as the model sees it, info markdown); a gr.Warning per plausibility issue."""
    if not prior_file:
        return None, "*No image yet.*"
    img = _read_prior(prior_file)
    for w in cxr_warnings(img):
        gr.Warning(w, title="Check the image")
    try:
        pipe = get_pipe()
        size, aspect = pipe.resolution, pipe.config.aspect
    except gr.Error:  # no model yet: preview at the package default, generate will explain
        size, aspect = ModelConfig.resolution, ModelConfig.aspect
    return to_uint8(to_model_input(img.pixels, size, aspect)), _info_markdown(img, size, aspect)


def generate(prior_file, description, num_images, steps, guidance, image_guidance, seed, randomise,
             scheduler, strength=None, transfer=None, request: gr.Request | None = None, progress=gr.Progress()):
    """Prior + description -> follow-ups, heatmaps, comparison, settings and downloads."""
    from biomedjourney.export import save_outputs

    description = _check_description(description)
    loaded = _read_prior(prior_file)
    sampler = _sampler(num_images, steps, guidance, image_guidance, scheduler, strength, transfer)
    seed = _seed(seed, randomise)
    pipe = get_pipe()
    t0 = time.perf_counter()
    try:
        total = denoising_steps(sampler["num_inference_steps"], sampler["strength"] or pipe.defaults.strength)
        out = pipe(loaded, description, seed=seed, callback_on_step_end=_progress(progress, "Generating follow-ups", total),
                   **sampler)
    except ValueError as e:
        raise _error(str(e), title="Invalid settings") from None
    seconds = time.perf_counter() - t0

    progress(0.95, desc="Heatmaps and files")
    folder = _run_folder(request, "followup")
    files = [Path(p) for p in save_outputs(out, folder, prompt=description, dicom=True, source=loaded, heatmaps=True)]
    prior, imgs = out.prior, out.images
    n = len(imgs)
    maps = [p for p in files if p.name.startswith("heatmap_")]  # per sample, mean change, uncertainty
    zip_path = journey.make_zip(files, folder / "biomedjourney_followups.zip")

    gallery = [(to_uint8(mark_synthetic(im)), f"Sample {i + 1} · seed {s}")
               for i, (im, s) in enumerate(zip(imgs, out.seeds))]
    heat_gallery = [(str(p), f"Sample {i + 1}") for i, p in enumerate(maps[:n])]
    settings = {**out.settings, "generation_seconds": round(seconds, 2),
                "note": "image i is reproduced by seed = seeds[i] with 1 sample", "disclaimer": NOTICE}
    state = {"prior": prior, "images": imgs, "seeds": out.seeds}
    return (gallery, (to_uint8(prior), gallery[0][0]), heat_gallery, str(maps[n]), str(maps[n + 1]), settings,
            [str(p) for p in files], str(zip_path), seed, state)


def compare(state, evt: gr.SelectData):
    """Clicking a follow-up shows it against the prior in the comparison slider."""
    if not state:
        return gr.skip()
    i = int(evt.index) if isinstance(evt.index, int) else int(evt.index[0])
    return to_uint8(state["prior"]), to_uint8(mark_synthetic(state["images"][i]))


def describe(prior_report, followup_report, intended_change, backend="auto"):
    """Two reports (or a report and an intended change) -> (description, which backend wrote it)."""
    followup = (followup_report or "").strip() or None
    intended = (intended_change or "").strip() or None
    if not (prior_report or "").strip():
        raise _error("Paste the prior report first.", title="Prior report missing")
    if followup and intended:
        raise _error("Fill in either the follow-up report or the intended change, not both.",
                     title="Two targets given")
    if not followup and not intended:
        raise _error("Paste a follow-up report, or write the intended change (e.g. 'new right "
                     "effusion').", title="Follow-up missing")
    try:
        res = describe_progression(prior_report, followup, intended_change=intended, backend=backend)
    except (ValueError, ProgressionError) as e:
        raise _error(str(e), title="Could not describe the change") from None
    if res.backend == "openai":
        who = "GPT-4" if res.model.lower().startswith("gpt-4") else "LLM"
        used = f"{who} via OpenAI-compatible API (model {res.model}){' — cached answer' if res.cached else ''}"
    else:
        used = "offline rule-based differ"
    return res.text, f"Written by: **{used}**. Edit it freely before generating."


def run_journey(prior_file, journey_text, steps, guidance, image_guidance, seed, randomise, scheduler,
                duration_ms=800, strength=None, transfer=None, request: gr.Request | None = None,
                progress=gr.Progress()):
    """A sequence of descriptions -> filmstrip, animated GIF and downloads (one sample per step)."""
    from biomedjourney.export import save_outputs

    _check_description(journey_text, "journey")
    try:
        plan = journey.parse_journey(journey_text)
    except ValueError as e:
        raise _error(str(e), title="Cannot read the journey") from None
    loaded = _read_prior(prior_file)
    sampler = _sampler(1, steps, guidance, image_guidance, scheduler, strength, transfer)
    seed = _seed(seed, randomise)
    pipe = get_pipe()
    try:
        outs = journey.generate_journey(pipe, loaded, [d for _, d in plan], seed=seed,
                                        callback=lambda i, total: progress((i, total), desc="Generating the journey",
                                                                           unit="steps"), **sampler)
    except ValueError as e:
        raise _error(str(e), title="Invalid settings") from None

    progress(0.97, desc="Filmstrip and GIF")
    folder = _run_folder(request, "journey")
    frames = [outs[0].prior] + [o.images[0] for o in outs]
    labels = ["prior (input)"] + [label for label, _ in plan]
    marks = [False] + [True] * len(outs)  # the uploaded prior is real: labelled, not marked synthetic
    strip = journey.filmstrip(frames, labels, synthetic=marks)
    shown = [save_png(strip / 255.0, folder / "journey_filmstrip.png", burn_in=False,
                      description=" | ".join(f"{lab}: {d}" for lab, d in plan)),
             journey.write_gif(frames, labels, folder / "journey.gif", int(duration_ms), synthetic=marks)]
    step_files = [p for k, ((_, desc), out) in enumerate(zip(plan, outs), 1)
                  for p in save_outputs(out, folder / f"step{k:02d}", prompt=desc, dicom=True, source=loaded,
                                       prefix=f"step{k:02d}")]
    zip_path = journey.make_zip(shown + step_files, folder / "biomedjourney_journey.zip")
    settings = {"steps": [{"label": lab, "description": d, **o.settings} for (lab, d), o in zip(plan, outs)],
                "seed": seed, "frame_ms": int(duration_ms), "disclaimer": NOTICE}
    return strip, str(shown[1]), settings, [str(p) for p in shown], str(zip_path), seed


def on_load():
    """Page load: load the model once and set the controls to its defaults; report its status."""
    try:
        pipe = get_pipe()
    except gr.Error as e:
        return [gr.skip()] * 8 + [f"❌ **Model not available.** {e.message}"]
    d = pipe.defaults
    note = pipe.info.get("note", "") if isinstance(pipe.info, dict) else ""
    status = f"Model: `{pipe.model_id}` · {pipe.resolution}×{pipe.resolution} px" + (f" · {note}" if note else "")
    return [d.num_images, d.num_inference_steps, d.guidance_scale, d.image_guidance_scale, d.strength,
            d.change_transfer, d.seed, d.scheduler, status]


# ======================================================================== layout
CSS = """
#disclaimer {border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb;}
#disclaimer p {color: #92400e; margin: 4px 0;}
.dark #disclaimer {background: #451a03;} .dark #disclaimer p {color: #fde68a;}
#generate, #journey-run {min-height: 48px;}
#preview img, #filmstrip img, #journey-gif img {width: 100% !important; height: 100% !important; object-fit: contain;}
"""
THEME = gr.themes.Soft(primary_hue="blue")

_d = initial_defaults()
with gr.Blocks(title="BiomedJourney: counterfactual chest X-rays", delete_cache=(3600, 24 * 3600)) as demo:
    gr.Markdown("# BiomedJourney\nUpload a prior chest X-ray, describe a change, and see synthetic "
                "follow-up images with maps of what changed and how sure the model is.")
    gr.Markdown(DISCLAIMER, elem_id="disclaimer")
    model_status = gr.Markdown("Model: loading when the page opens…", elem_id="model-status")
    state = gr.State(None)

    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            prior_file = gr.File(label="Prior chest X-ray (PNG, JPEG, DICOM)",
                                 file_types=FILE_TYPES, type="filepath", height=120)
            gr.Examples(examples=[[p] for p in _example_files()], inputs=[prior_file],
                        label="Example prior (click to use)")
        with gr.Column(scale=1, min_width=260):
            preview = gr.Image(label="What the model sees", type="numpy", image_mode="L", format="png",
                               interactive=False, height=300, buttons=["fullscreen"], elem_id="preview")
        with gr.Column(scale=1, min_width=220):
            prior_info = gr.Markdown("*No image yet.*", label="Image information")

    with gr.Tabs():
        with gr.Tab("Follow-up", id="followup"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    description = gr.Textbox(label="Describe the change (editable)", lines=2, max_lines=6,
                                             placeholder="e.g. New right pleural effusion.")
                    gr.Examples(examples=[[t] for t in EXAMPLE_DESCRIPTIONS], inputs=[description],
                                label="Example descriptions (click to use)",
                                examples_per_page=len(EXAMPLE_DESCRIPTIONS))
                    with gr.Accordion("Write it from reports", open=False):
                        prior_report = gr.Textbox(label="Prior report", lines=3)
                        followup_report = gr.Textbox(label="Follow-up report", lines=3)
                        intended_change = gr.Textbox(label="…or the intended change (instead of a follow-up report)",
                                                     lines=1, placeholder="e.g. effusion gets bigger")
                        backend = gr.Radio([("Automatic (GPT-4 when an API key is configured)", "auto"),
                                            ("Offline rule-based differ", "rules")], value="auto",
                                           label="Writer")
                        describe_btn = gr.Button("Describe the change")
                        describe_info = gr.Markdown()
                with gr.Column(scale=2):
                    with gr.Accordion("Settings", open=True):
                        num_images = gr.Slider(1, MAX_SAMPLES, value=_d.num_images, step=1, label="Samples",
                                               info="More samples show where the model is unsure (uncertainty map).")
                        steps = gr.Slider(1, 100, value=_d.num_inference_steps, step=1, label="Denoising steps",
                                          info="More steps: finer detail but slower.")
                        guidance = gr.Slider(0, 15, value=_d.guidance_scale, step=0.5, label="Text guidance",
                                             info="Higher follows the description more strongly (too high: artefacts).")
                        image_guidance = gr.Slider(0, 5, value=_d.image_guidance_scale, step=0.1,
                                                   label="Image guidance",
                                                   info="Higher stays closer to the prior image (less change).")
                        strength = gr.Slider(0.05, 1.0, value=_d.strength, step=0.05, label="Change allowed (strength)",
                                             info="1 starts from pure noise; lower starts from the noised prior and "
                                                  "keeps more of it (SDEdit).")
                        transfer = gr.Checkbox(value=_d.change_transfer, label="Keep the prior's detail",
                                               info="On: the prior plus only the change the model draws for the "
                                                    "description (its sample minus its no-change sample, same noise). "
                                                    "Off: the model's whole redrawn image.")
                        with gr.Row():
                            seed = gr.Number(value=_d.seed, precision=0, minimum=0, maximum=2**31 - 2, label="Seed",
                                             info="Same seed + settings = same images.")
                            randomise = gr.Checkbox(value=False, label="Random seed each run")
                        scheduler = gr.Dropdown([(SCHEDULER_LABELS.get(k, k), k) for k in SCHEDULERS],
                                                value=_d.scheduler, label="Scheduler")
                    generate_btn = gr.Button("Generate follow-ups", variant="primary", elem_id="generate")

            with gr.Row(equal_height=False):
                gallery = gr.Gallery(label="Synthetic follow-ups (click one to compare)", columns=4, height="auto",
                                     format="png", object_fit="contain", elem_id="followups", scale=3)
                slider = gr.ImageSlider(label="Before / after (prior | follow-up)", type="numpy", format="png",
                                        image_mode="L", max_height=330, elem_id="compare", scale=2)
            with gr.Row(equal_height=False):
                heat_gallery = gr.Gallery(label="Difference per sample (follow-up − prior)", columns=2,
                                          height=380, format="png", object_fit="contain", elem_id="heatmaps",
                                          scale=2)
                mean_img = gr.Image(label="Mean change", format="png", interactive=False, height=380,
                                    elem_id="mean-change", scale=1)
                std_img = gr.Image(label="Uncertainty", format="png", interactive=False, height=380,
                                   elem_id="uncertainty", scale=1)
            gr.Markdown("**Reading the maps:** <span style='color:#b2182b'>■ red</span> = brighter/denser in the "
                        "follow-up (e.g. new opacity or effusion) · <span style='color:#2166ac'>■ blue</span> = "
                        "darker/more lucent (e.g. clearing) · uncertainty = where the samples disagree. The colour "
                        "range is robust (99th percentile of the change), so tiny changes stay faint.")
            with gr.Row(equal_height=False):
                settings_json = gr.JSON(label="Seed and settings", open=False)
                with gr.Column():
                    zip_file = gr.File(label="Download everything (zip)", elem_id="zip", interactive=False)
                    files = gr.File(label="PNG + DICOM per sample, settings, heatmaps", file_count="multiple",
                                    elem_id="downloads", interactive=False)

        with gr.Tab("Journey", id="journey"):
            gr.Markdown("Apply changes one after another: each step starts from the previous step's image. "
                        "Uses the settings of the Follow-up tab, one sample per step. Errors accumulate: later "
                        "frames are less reliable.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    journey_text = gr.Textbox(label="Steps (one per line or separated by ';', optional 'label:')",
                                              lines=4, value=EXAMPLE_JOURNEY)
                with gr.Column(scale=1):
                    duration = gr.Slider(200, 3000, value=800, step=100, label="GIF frame duration (ms)")
                    journey_btn = gr.Button("Generate journey", variant="primary", elem_id="journey-run")
            strip_img = gr.Image(label="Filmstrip", format="png", interactive=False, height=300, elem_id="filmstrip")
            with gr.Row(equal_height=False):
                gif_img = gr.Image(label="Animation (GIF)", type="filepath", interactive=False, height=320,
                                   elem_id="journey-gif")
                with gr.Column():
                    journey_zip = gr.File(label="Download everything (zip)", interactive=False)
                    journey_files = gr.File(label="Filmstrip and GIF (per-step PNG + DICOM are in the zip)",
                                            file_count="multiple", interactive=False)
                    journey_json = gr.JSON(label="Seeds and settings", open=False)

    gr.Markdown(f"<sub>{NOTICE} Images you upload are processed in memory; results are kept in a temporary "
                "folder for this session only. DICOM patient identifiers are never read into the app.</sub>")

    # ---------------------------------------------------------------- events
    prior_file.change(preview_prior, prior_file, [preview, prior_info], api_name="preview")
    generate_btn.click(
        generate, [prior_file, description, num_images, steps, guidance, image_guidance, seed, randomise, scheduler,
                   strength, transfer],
        [gallery, slider, heat_gallery, mean_img, std_img, settings_json, files, zip_file, seed, state],
        api_name="generate", scroll_to_output=True, concurrency_id="model",
        show_progress_on=[gallery, slider])  # progress and errors here, not over the seed box
    gallery.select(compare, state, slider, api_visibility="private", queue=False)
    describe_btn.click(describe, [prior_report, followup_report, intended_change, backend],
                       [description, describe_info], api_name="describe",
                       show_progress_on=describe_info)  # an error must not cover the description
    journey_btn.click(
        run_journey, [prior_file, journey_text, steps, guidance, image_guidance, seed, randomise, scheduler, duration,
                      strength, transfer],
        [strip_img, gif_img, journey_json, journey_files, journey_zip, seed], api_name="journey",
        concurrency_id="model", show_progress_on=[strip_img, gif_img])
    demo.load(on_load, None, [num_images, steps, guidance, image_guidance, strength, transfer, seed, scheduler,
                              model_status],
              api_visibility="private")
    demo.unload(_cleanup_session)

demo.queue(default_concurrency_limit=1)  # one run at a time per event; generate + journey share "model"


def main(argv=None):
    ap = argparse.ArgumentParser(description="BiomedJourney web app")
    ap.add_argument("--model", help=f"model folder or Hugging Face Hub repo id (sets ${MODEL_ENV})")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="0.0.0.0 to listen on all interfaces (e.g. in a container)")
    args = ap.parse_args(argv)
    if args.model:
        os.environ[MODEL_ENV] = args.model
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
