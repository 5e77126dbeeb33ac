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
import contextlib
import os

from biomedjourney.cli import DTYPE_NAMES  # light: no torch, so --help stays instant

MODEL_ENV_NAME = "BIOMEDJOURNEY_MODEL"  # == biomedjourney.pipeline.MODEL_ENV (not imported: --help stays instant)
DTYPE_ENV_NAME = "BIOMEDJOURNEY_DTYPE"  # one of biomedjourney.service.DTYPES; unset: the loader's default


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="BiomedJourney web app")
    ap.add_argument("--model", help=f"model folder or Hugging Face Hub repo id (sets ${MODEL_ENV_NAME})")
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="0.0.0.0 to listen on all interfaces (e.g. in a container)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default=os.environ.get(DTYPE_ENV_NAME),
                    help=f"weights and compute precision (sets ${DTYPE_ENV_NAME}; default: float32 on the CPU, float16 "
                         "on CUDA); bfloat16 is faster on CPUs with AMX (README, 'Speed')")
    args = ap.parse_args(argv)
    if args.model:
        os.environ[MODEL_ENV_NAME] = args.model
    if args.dtype:
        os.environ[DTYPE_ENV_NAME] = args.dtype
    return args


if __name__ == "__main__":  # before gradio and torch are imported: `python app.py --help` answers at once
    parse_args()

import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from biomedjourney import NOTICE, journey, masks, service
from biomedjourney.atomic import atomic_write
from biomedjourney.cli import check_answer, redact
from biomedjourney.config import ModelConfig, SamplerConfig
from biomedjourney.findings import Finding, extract, render as canonical_text
from biomedjourney.findings.schema import Change, FindingName, Severity, Side, Zone
from biomedjourney.imaging import (ImageLoadError, LoadedImage, to_uint8, cxr_warnings, mark_synthetic,
                                   read_image, to_model_input)
from biomedjourney.model import SCHEDULERS
from biomedjourney.pipeline import (MAX_IMAGES, MODEL_ENV, BiomedJourneyPipeline, _public_model_id,
                                    default_model_path, read_defaults)
from biomedjourney.service import ModelLoadError, check_description, load_pipeline
from biomedjourney.progression import NO_CHANGE, ProgressionError, describe_progression

ROOT = Path(__file__).resolve().parent
OUTPUT_ROOT = Path(os.environ.get("BIOMEDJOURNEY_OUTPUTS") or Path(tempfile.gettempdir()) / "biomedjourney-app")
FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"]
MAX_SAMPLES = min(8, MAX_IMAGES)
SCHEDULER_LABELS = {"dpmsolver++": "DPM-Solver++ (fast, default)", "ddim": "DDIM (deterministic)",
                    "euler_a": "Euler ancestral (more varied)"}
# What the shipped model demonstrably does in the described region (assets/eval/rendering_check.json,
# assets/MODEL_CARD.md). Cardiomegaly and pneumothorax (16 and 11 training images) only when the model's
# default is to draw them from radiological knowledge first (sampler `render`).
EXAMPLES_MODEL = ["New right pleural effusion.", "New left pleural effusion.", "Increasing left pleural effusion.",
                  "New pulmonary edema.", "Worsening pulmonary edema.", "New right upper lobe consolidation.",
                  "New left lower lobe consolidation.", "New right lower lobe pneumonia."]
EXAMPLES_RENDERED = ["Increasing cardiomegaly.", "New right pneumothorax."]
SEED_MAX = 2**31 - 2
COMPOSER_ROWS = 3
CHANGE_COLOURS = {"new": "#ef4444", "increased": "#f97316", "decreased": "#3b82f6", "resolved": "#22c55e",
                  "unchanged": "#9ca3af"}
EXAMPLE_JOURNEY = "day 3: new right lower lobe consolidation\nday 7: increasing right consolidation\n" \
                  "day 14: resolving right consolidation"
DISCLAIMER = f"⚠️ **{NOTICE}**"
# Serving limits (README, "Reliability"): one generation at a time on the CPU (generate and journey share the
# "model" queue), at most QUEUE_MAX of them waiting or running, at most JOBS_PER_USER of those from one session
# (browser tab or API client); more is refused at once with a 'busy' message. Uploads above MAX_UPLOAD_MB are
# refused by the server before they reach a handler; a session's uploads and results are removed when it ends.
MODEL_CONCURRENCY = int(os.environ.get("BIOMEDJOURNEY_CONCURRENCY", 1))
QUEUE_MAX = int(os.environ.get("BIOMEDJOURNEY_QUEUE_MAX", 16))
JOBS_PER_USER = int(os.environ.get("BIOMEDJOURNEY_JOBS_PER_USER", 2))
MAX_UPLOAD_MB = int(os.environ.get("BIOMEDJOURNEY_MAX_UPLOAD_MB", 64))
MAX_REPORT_CHARS = 20_000  # per report sent to the describer (a paid request with GPT-4)
STREAM_FIRST = 1  # generate shows this many samples first (one pipeline call), then the rest (service.iter_followups)
log = logging.getLogger("biomedjourney.app")

# ======================================================================== model (lazy, once)
_PIPE: BiomedJourneyPipeline | None = None
_PIPE_SOURCE = ""
_LOCK = threading.Lock()


def model_source() -> str:
    """$BIOMEDJOURNEY_MODEL (set by --model), else the packaged or repository model; '' when there is none
    (get_pipe then says how to get one)."""
    try:
        return str(default_model_path())
    except FileNotFoundError:
        return ""


def get_pipe() -> BiomedJourneyPipeline:
    """The loaded pipeline; gr.Error saying how to get a model when there is none."""
    global _PIPE, _PIPE_SOURCE
    src = model_source()
    with _LOCK:
        if _PIPE is None or _PIPE_SOURCE != src:
            try:
                dtype = os.environ.get(DTYPE_ENV_NAME) or None
                _PIPE, _PIPE_SOURCE = load_pipeline(src or None, dtype=dtype), src  # safetensors only; never unpickles
            except ModelLoadError as e:  # missing folder, Hub/network, bad config, truncated or mismatched weights
                raise _error(f"No model could be loaded from '{_public_model_id(src)}': {e} To fix: start the app "
                             f"with `python app.py --model PATH_OR_HUB_ID`, or set {MODEL_ENV}=PATH, or put a trained "
                             "model folder at assets/biomedjourney-cxr (see README).",
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
    """A gr.Error for bad input: shown to the user, not logged as a server traceback (never the OpenAI key)."""
    return gr.Error(redact(message), title=title, print_exception=False)


@contextlib.contextmanager
def _guard(what: str, disk: bool = False):
    """A failure inside a run -> one message for the user, and the server carries on: bad settings say what to
    change; with ``disk`` a write error says the disk may be full (files are written atomically: nothing is left
    half-written under its name); anything else (a bug, out of memory) is logged with its traceback."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as e:  # ImageLoadError included
        raise _error(str(e), title="Invalid settings") from None
    except OSError as e:
        if not disk:
            raise
        log.error("%s: %s", what, e)
        raise _error(f"{what} failed: the server could not write its files ({e.strerror or e}); its disk may be "
                     "full. Nothing half-written was kept. Try again later.", title="Could not save") from None
    except Exception as e:  # noqa: BLE001 - reported to the user, logged for the operator
        log.exception("%s failed", what)
        raise _error(f"{what} failed unexpectedly ({type(e).__name__}). The server is still running: try again, "
                     "and report it if it keeps failing.", title="Something went wrong") from None


def _run_folder(request: gr.Request | None, kind: str) -> Path:
    """A new folder for one run, inside this session's folder (earlier runs are kept)."""
    session = re.sub(r"[^A-Za-z0-9_-]", "", getattr(request, "session_hash", None) or "") or "local"
    folder = OUTPUT_ROOT / session / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


# uploaded file -> the sessions that used it (gradio keeps one copy per content, shared between sessions)
_UPLOADS: dict[Path, set[str]] = {}
_UPLOADS_LOCK = threading.Lock()


def _session(request) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", getattr(request, "session_hash", None) or "")


def _remember_upload(path, request) -> None:
    """Note an uploaded prior (a file in gradio's upload folder) as this session's, to remove it when it ends."""
    session, p = _session(request), Path(str(path))
    try:
        inside = p.resolve().is_relative_to(Path(gr.utils.get_upload_folder()).resolve())
    except (OSError, ValueError):
        inside = False
    if session and inside and p.name not in _EXAMPLE_NAMES:  # examples are shared by every session: kept
        with _UPLOADS_LOCK:
            _UPLOADS.setdefault(p, set()).add(session)


def _cleanup_session(request: gr.Request):
    """Session ended (tab closed, client gone): its results and the uploads no other session uses are removed."""
    session = _session(request)
    if not session:
        return
    shutil.rmtree(OUTPUT_ROOT / session, ignore_errors=True)
    with _UPLOADS_LOCK:
        mine = [p for p, users in _UPLOADS.items() if session in users]
        for p in mine:
            _UPLOADS[p].discard(session)
            if not _UPLOADS[p]:
                del _UPLOADS[p]
                p.unlink(missing_ok=True)
                try:
                    p.parent.rmdir()  # gradio's per-upload folder, when now empty
                except OSError:
                    pass


def _read_prior(prior_file, request=None) -> LoadedImage:
    if not prior_file:
        raise _error("No prior image: upload a PNG, JPEG or DICOM chest X-ray (drag it onto the upload "
                     "box) or click one of the example images.", title="Prior image missing")
    _remember_upload(prior_file, request)
    try:
        return read_image(prior_file)
    except ImageLoadError as e:
        raise _error(str(e), title="Cannot read the prior image") from None


def _check_description(description: str, what: str = "description") -> str:
    text = (description or "").strip() if isinstance(description, str) or description is None else description
    if not text:
        raise _error(f"The {what} is empty: write the change you want to see (e.g. 'New right pleural "
                     "effusion.'), click an example, or use 'Write it from reports'.",
                     title="Description missing")
    try:
        return check_description(text, what)
    except ValueError as e:
        raise _error(str(e), title=f"Check the {what}") from None


_ADMITTED: dict[str, list[float]] = {}   # session -> when its jobs were admitted and have not started yet
_ADMIT_LOCK = threading.Lock()
ADMIT_WINDOW_S = 10.0                   # an admission not started by then is forgotten (its client went away)


def _limit_model_jobs(demo: gr.Blocks) -> None:
    """Refuse, at submission and with a 'busy' message, a generate/journey job beyond JOBS_PER_USER of one session
    or QUEUE_MAX in all (waiting or running): gradio's queue is wrapped so that such a job is never queued. The
    refusal reaches the browser and gradio_client as a validation message on the prior image."""
    q, push = demo._queue, demo._queue.push
    model_fns = {i for i, fn in demo.fns.items() if fn.concurrency_id == "model"}

    async def limited(body, *args, **kwargs):
        refused = _foreign_file(body.data)
        if not refused and body.fn_index in model_fns:
            refused = _busy(_session(body))
        if refused:
            return False, [{**gr.validate(False, refused), "parameter_name": "prior_file"}], "validator_error"
        return await push(body, *args, **kwargs)
    q.push = limited


def _foreign_file(value) -> str:
    """Why a request names a file that was not uploaded to this server (gradio would refuse it too, with a
    traceback in the log and no message), or ''."""
    if isinstance(value, (list, tuple)):
        return next((m for m in map(_foreign_file, value) if m), "")
    if not isinstance(value, dict):
        return ""
    if isinstance(value.get("path"), str) and (value.get("meta") or {}).get("_type") == "gradio.FileData":
        if not gr.utils.is_in_or_equal(gr.utils.abspath(value["path"]), gr.utils.get_upload_folder()):
            return ("A file in this request was not uploaded to this server; upload it first (in the page, or with "
                    "gradio_client.handle_file). Server paths cannot be read.")
        return ""
    return _foreign_file(list(value.values()))


def _busy(session: str) -> str:
    """'' when a job of ``session`` may be queued now (it is then counted as admitted until it starts), else why."""
    with _ADMIT_LOCK:
        queued, everyone = _model_jobs(session)
        now = time.monotonic()
        for key in list(_ADMITTED):
            kept = [t for t in _ADMITTED[key] if now - t < ADMIT_WINDOW_S]
            if kept:
                _ADMITTED[key] = kept
            else:
                del _ADMITTED[key]
        mine = max(queued, len(_ADMITTED.get(session, [])))  # two submissions in one instant: both counted
        if session and mine >= JOBS_PER_USER:  # a call without a session (the REST API): the overall limit only
            return (f"The server is busy with your earlier requests: {mine} of yours are waiting or running (at most "
                    f"{JOBS_PER_USER} per user). Wait for them to finish, then try again.")
        if everyone >= QUEUE_MAX:
            return f"The server is busy: {everyone} generations are waiting or running (at most {QUEUE_MAX}). Try again in a minute."
        if session:
            _ADMITTED.setdefault(session, []).append(now)
    return ""


def _started(request) -> None:
    """A model job began: it is in gradio's running jobs now, no longer an admission to count."""
    with _ADMIT_LOCK:
        waiting = _ADMITTED.get(_session(request))
        if waiting:
            waiting.pop(0)


def _model_jobs(session: str) -> tuple[int, int]:
    """(this session's, everyone's) jobs on the "model" concurrency id, waiting or running, from gradio's queue."""
    q = getattr(get_demo(), "_queue", None)
    try:
        waiting = q.event_queue_per_concurrency_id.get("model")
        events = list(waiting.queue) if waiting else []
        events += [e for job in q.active_jobs if job for e in job if e.concurrency_id == "model"]
    except AttributeError:  # another gradio version: only the limits gradio itself enforces apply
        events = []
    return sum(_session(e) == session for e in events), len(events)


def _checked_by_handler(*components) -> None:
    """These inputs' API values reach the handler as sent: _number / _sampler / the service check them and name the
    field. (gradio's own check of a slider's bounds or of a choice answers an API call in its words and logs a
    server traceback.) Set on the instances: a subclass of a gradio component would make gradio write app.pyi."""
    for c in components:
        c.preprocess = lambda payload: payload


def _any_prior_file(f):
    """The prior's upload: any file name reaches read_image, which tells PNG, JPEG and DICOM apart by content (PACS
    exports often have no extension) and says what is wrong; the browser's picker still offers FILE_TYPES first.
    (gradio's own: an extension check with a server traceback, and an empty temp file left per call.)"""
    return gr.utils.NamedString(f.path)


# The numeric settings: (label in the UI, lowest, highest, whole number?). The sliders enforce these in the
# browser; the API and scripts are checked here so a bad value is a message naming the field, never a traceback.
NUMBERS = {"num_images": ("Samples", 1, MAX_SAMPLES, True), "steps": ("Denoising steps", 1, 100, True),
           "guidance": ("Text guidance", 0.0, 15.0, False), "image_guidance": ("Image guidance", 0.0, 5.0, False),
           "strength": ("Change allowed (strength)", 0.05, 1.0, False),
           "duration_ms": ("GIF frame duration (ms)", 200, 3000, True),
           "noise_opt_steps": ("Noise optimisation steps", 0, 10, True)}


def _number(value, field: str):
    """A numeric setting checked against its field's range; gr.Error naming the field otherwise."""
    label, lo, hi, whole = NUMBERS[field]
    kind = "a whole number" if whole else "a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(value, bool) or not (lo <= x <= hi) or (whole and not x.is_integer()):
        raise _error(f"{label} must be {kind} from {lo:g} to {hi:g}, got {value!r}. Change the {label} field.",
                     title=label)
    return int(x) if whole else x


def _sampler(steps, guidance, image_guidance, scheduler, strength=None, transfer=None) -> dict:
    if scheduler not in SCHEDULERS:
        raise _error(f"Unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}.")
    return {"num_inference_steps": _number(steps, "steps"),
            "guidance_scale": _number(guidance, "guidance"), "image_guidance_scale": _number(image_guidance,
                                                                                             "image_guidance"),
            "scheduler": scheduler, "strength": None if strength is None else _number(strength, "strength"),
            "change_transfer": None if transfer is None else bool(transfer)}  # strength None: model default


def _seed(seed, randomise: bool) -> int:
    if randomise:
        return random.SystemRandom().randrange(2**31 - 1)
    if seed is None or seed == "":
        raise _error("The seed is empty: enter a whole number, or tick 'Random seed'.", title="Seed")
    try:
        value = float(seed)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value.is_integer() and 0 <= value <= SEED_MAX):
        raise _error(f"Seed must be a whole number from 0 to {SEED_MAX}, got {seed}. Change the Seed field, "
                     "or tick 'Random seed'.", title="Seed")
    return int(value)


def _findings_chips(findings: list[Finding]) -> list[tuple[str, str | None]]:
    """HighlightedText value: one coloured chip per finding (colour = its change), spaced."""
    out: list[tuple[str, str | None]] = []
    for f in findings:
        out += [(f.chip(), f.change), ("  ", None)]
    return out[:-1]


def _notes_markdown(plan: service.EditPlan | None, image_warnings: list[str] = ()) -> str:
    if plan is None:
        return ""
    where = {"findings": "the described findings on the prior's lungs", "painted": "your painted region",
             "whole film": "the whole film"}[plan.mask_source]
    lines = [f"**Read as:** {plan.canonical}  \n**May change:** {where}"]
    lines += [f"- ⚠️ {w}" for w in image_warnings]  # about the prior (also said on upload): API callers see them here
    lines += [f"- {n}" for n in plan.notes]
    lines += [f"- drawn from knowledge: {r}" for r in plan.rendered]
    return "\n".join(lines)


def _alerts(plan: service.EditPlan, painted) -> list[str]:
    """The notes worth a toast: unread text, rare findings, anatomy fallback, an oversized painted mask."""
    out = list(plan.anatomy.warnings if plan.anatomy is not None else [])
    out += masks.check_user_mask(painted)
    out += [n for n in plan.notes if n.startswith("No finding recognised") or "training images" in n]
    return out


def _prior_input(prior_file, request=None):
    """(pipe, the prior as the model sees it); gr.Error when the file or the model is missing."""
    pipe = get_pipe()
    return pipe, pipe.prepare_prior(_read_prior(prior_file, request))


def _painted(paint: bool, canvas, size: int):
    """The editor's paint layers -> the painted mask at the model's resolution; empty -> None (automatic region)."""
    if not paint or not canvas:
        return None
    m = masks.painted_mask(canvas.get("layers"), size)
    if m.max() <= 0:
        gr.Warning(f"{masks.check_user_mask(m)[0]} Using the automatic region this time.", title="Painted region")
        return None
    return m


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


_EXAMPLE_NAMES = ("RG1_UNCI.dcm", "RG1_UNCI_256.png", "RG1_UNCI_256.jpg", "RG1_UNCI_low_contrast_monochrome1.dcm")


def _example_files() -> list[str]:
    """Example priors, all from pydicom's public RG1_UNCI.dcm (no dataset image is shipped): the DICOM
    itself, a 256 px PNG and JPEG export of it, and a low-contrast MONOCHROME1 DICOM variant (inverted
    stored values, as some CR systems write them) to show such inputs are handled. Written once into the
    temp folder gradio may serve."""
    import numpy as np
    import pydicom
    import pydicom.data
    from PIL import Image

    src = Path(pydicom.data.get_testdata_file("RG1_UNCI.dcm"))
    folder = OUTPUT_ROOT / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: folder / name for name in _EXAMPLE_NAMES}
    if not all(p.exists() for p in out.values()):  # atomic writes: a crash here never leaves half an example
        atomic_write(out["RG1_UNCI.dcm"], lambda tmp: shutil.copyfile(src, tmp))
        img = read_image(src).pixels  # (H, W) [0, 1], MONOCHROME2
        small = Image.fromarray(to_uint8(img)).resize((256 * img.shape[1] // img.shape[0], 256), Image.LANCZOS)
        atomic_write(out["RG1_UNCI_256.png"], lambda tmp: small.save(tmp, format="PNG"))
        atomic_write(out["RG1_UNCI_256.jpg"], lambda tmp: small.save(tmp, format="JPEG", quality=90))
        ds = pydicom.dcmread(src)
        for kw in ("WindowCenter", "WindowWidth", "VOILUTFunction", "PatientName", "PatientID"):
            if kw in ds:
                delattr(ds, kw)
        low = (1.0 - np.asarray(small, np.float32) / 255.0) * 300 + 1800  # 300 of 4096 levels, inverted
        ds.Rows, ds.Columns = low.shape
        ds.PixelSpacing = None
        ds.set_pixel_data(low.astype(np.uint16), photometric_interpretation="MONOCHROME1", bits_stored=12)
        ds.PatientName, ds.PatientID = "", ""
        atomic_write(out["RG1_UNCI_low_contrast_monochrome1.dcm"], lambda tmp: ds.save_as(tmp))
    return [str(p) for p in out.values()]


# ======================================================================== handlers
def preview_prior(prior_file, request: gr.Request | None = None):
    """Upload -> (the image as the model sees it, info markdown); a gr.Warning per plausibility issue."""
    if not prior_file:
        return None, "*No image yet.*"
    try:
        img = _read_prior(prior_file, request)
    except gr.Error as e:  # said here, beside the upload; Generate raises the one toast (not two alike)
        return None, f"❌ **{e.title}.** {e.message}"
    for w in cxr_warnings(img):
        gr.Warning(w, title="Check the image")
    try:
        pipe = get_pipe()
        size, aspect = pipe.resolution, pipe.config.aspect
    except gr.Error:  # no model yet: preview at the package default, generate will explain
        size, aspect = ModelConfig.resolution, ModelConfig.aspect
    return to_uint8(to_model_input(img.pixels, size, aspect)), _info_markdown(img, size, aspect)


def read_findings(description):
    """Live, as the user types: the findings read from the description, as chips."""
    text = (description or "").strip() if isinstance(description, str) else ""
    if len(text) > service.MAX_DESCRIPTION_CHARS:  # generate says why; not read on every keystroke
        return []
    return _findings_chips([] if text == NO_CHANGE else extract(text))


def preview_plan(prior_file, description, region, render, request: gr.Request | None = None):
    """Prior or description changed -> (the prior with the edit mask tinted, the plan's notes)."""
    if not prior_file:
        return None, ""
    try:
        _, prior = _prior_input(prior_file, request)
    except gr.Error:  # preview_prior / generate say why
        return None, ""
    try:
        if isinstance(description, str) and description.strip():
            check_description(description)
        plan = service.plan_edit(prior, description, [0], region=region, render=bool(render))
    except ValueError as e:  # a description or region generate would refuse: said here, no mask
        return masks.mask_overlay(prior, None), f"❌ {e}"
    return masks.mask_overlay(prior, plan.mask), _notes_markdown(plan)


def paint_canvas(paint, prior_file, request: gr.Request | None = None):
    """'Paint my own region' -> the editor with the prior (as the model sees it) to paint on."""
    if not paint or not prior_file:
        return gr.update(visible=bool(paint), value=None)
    try:
        _, prior = _prior_input(prior_file, request)
    except gr.Error:  # preview_prior / generate say why (one message, not one per handler)
        return gr.update(visible=True, value=None)
    grey = to_uint8(prior)
    return gr.update(visible=True, value={"background": grey, "layers": [], "composite": grey})


def compose(description, *rows):
    """Composer rows (finding, side, zone, severity, change) x N -> the canonical text added to the description."""
    try:
        found = [Finding(name=r[0], side=r[1], zone=r[2], severity=r[3], change=r[4])
                 for r in (rows[i:i + 5] for i in range(0, len(rows), 5)) if r[0]]
    except ValueError as e:  # pydantic: a value that is not one of the choices (an API call)
        raise _error(f"The composer got a value that is not one of its choices: {str(e).splitlines()[-1].strip()}. "
                     "Pick the finding, side, zone, severity and change from the lists.", title="Composer") from None
    if not found:
        gr.Warning("Pick a finding in at least one row first.", title="Composer")
        return gr.skip()
    text = (description or "").strip()
    return " ".join(t for t in (text if text != NO_CHANGE else "", canonical_text(found)) if t)


class FollowUpView(NamedTuple):
    """generate()'s outputs, in the order of the event's outputs."""
    gallery: list
    slider: tuple
    heatmaps: list
    mean_change: str
    uncertainty: str
    settings: dict
    files: list[str]
    zip: str
    seed: int
    state: dict
    chips: list
    notes: str
    mask_preview: Any


def generate(prior_file, description, num_images, steps, guidance, image_guidance, seed, randomise,
             scheduler, strength=None, transfer=None, region=None, render=None, paint=False, canvas=None,
             noise_opt=None, request: gr.Request | None = None, progress=gr.Progress()):
    """Prior + description -> follow-ups, heatmaps, comparison, settings, downloads, findings and edit region.
    Streams a FollowUpView each time: the first STREAM_FIRST samples as soon as one pipeline call has made them, then
    every sample, then everything with the heatmaps and files."""
    _started(request)
    description = _check_description(description)
    loaded = _read_prior(prior_file, request)
    sampler = _sampler(steps, guidance, image_guidance, scheduler, strength, transfer)
    seed = _seed(seed, randomise)
    n = _number(num_images, "num_images")
    pipe = get_pipe()
    d = pipe.defaults
    if render and sampler["strength"] == d.strength:  # slider untouched: the model's harmonisation strength
        sampler["strength"] = None
    painted = _painted(paint, canvas, pipe.resolution)
    with _guard("The generation"):
        results = service.iter_followups(
            pipe, loaded, description, first=STREAM_FIRST, seed=seed, num_images=n, sampler=sampler, region=region,
            painted_mask=painted, render=render,
            noise_opt_steps=None if noise_opt is None else int(_number(noise_opt, "noise_opt_steps")),
            on_step=lambda i, total: progress((i, total), desc="Generating follow-ups", unit="steps"))
        res = next(results)
        yield _partial_view(res, seed)          # the first sample now (all of them when one call makes them)
        if len(res.images) < int(n):
            res = list(results)[-1]
            yield _partial_view(res, seed)      # every sample; the heatmaps and files follow
    for alert in _alerts(res.plan, painted):
        gr.Warning(alert, title="Note")

    progress(0.95, desc="Heatmaps and files")
    with _guard("Saving the results", disk=True):
        exp = service.export_followups(res, _run_folder(request, "followup"), source=loaded, dicom=True,
                                       heatmaps=True, zip_name="biomedjourney_followups.zip")
    gallery = _gallery(res)
    heat = [(str(exp.heatmaps[f"sample{i + 1}"]), f"Sample {i + 1}") for i in range(len(res.images))]
    settings = {**res.settings, "generation_seconds": round(res.seconds, 2), "image_warnings": res.warnings,
                "note": "image i is reproduced by seed = seeds[i] with 1 sample", "disclaimer": NOTICE}
    yield FollowUpView(
        gallery=gallery, slider=(to_uint8(res.prior), gallery[0][0]), heatmaps=heat,
        mean_change=str(exp.heatmaps["mean_change"]), uncertainty=str(exp.heatmaps["uncertainty"]),
        settings=settings, files=[str(p) for p in exp.files], zip=str(exp.zip), seed=seed,
        state={"prior": res.prior, "images": res.images, "seeds": res.seeds},
        chips=_findings_chips(res.plan.findings), notes=_notes_markdown(res.plan, res.warnings),
        mask_preview=masks.mask_overlay(res.prior, res.plan.mask))


def _gallery(res: service.FollowUps) -> list:
    return [(to_uint8(mark_synthetic(im)), f"Sample {i + 1} · seed {s}")
            for i, (im, s) in enumerate(zip(res.images, res.seeds))]


def _partial_view(res: service.FollowUps, seed: int) -> FollowUpView:
    """The samples made so far: gallery, comparison, seed and findings; heatmaps, settings and files unchanged."""
    gallery = _gallery(res)
    skip = gr.skip()
    return FollowUpView(
        gallery=gallery, slider=(to_uint8(res.prior), gallery[0][0]), heatmaps=skip, mean_change=skip,
        uncertainty=skip, settings=skip, files=skip, zip=skip, seed=seed,
        state={"prior": res.prior, "images": res.images, "seeds": res.seeds},
        chips=_findings_chips(res.plan.findings), notes=_notes_markdown(res.plan, res.warnings),
        mask_preview=masks.mask_overlay(res.prior, res.plan.mask))


def compare(state, evt: gr.SelectData):
    """Clicking a follow-up shows it against the prior in the comparison slider."""
    if not state:
        return gr.skip()
    i = int(evt.index) if isinstance(evt.index, int) else int(evt.index[0])
    return to_uint8(state["prior"]), to_uint8(mark_synthetic(state["images"][i]))


def _report_inputs(prior_report, followup_report, intended_change) -> tuple[str | None, str | None]:
    """(follow-up report, intended change), exactly one of them; gr.Error saying what is missing or too long."""
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
    longest = max(len(prior_report), len(followup or intended))
    if longest > MAX_REPORT_CHARS:  # a paid request per click: a report, not a book
        raise _error(f"A report is {longest:,} characters long; at most {MAX_REPORT_CHARS:,} are sent. Paste the "
                     "findings and impression sections only.", title="Report too long")
    return followup, intended


def describe(prior_report, followup_report, intended_change, backend="auto"):
    """Two reports (or a report and an intended change) -> (description, which backend wrote it)."""
    followup, intended = _report_inputs(prior_report, followup_report, intended_change)
    try:
        res = describe_progression(prior_report, followup, intended_change=intended, backend=backend)
        check_answer(res.text, res.backend)  # the answer is checked as a typed description: never run or re-sent
    except (ValueError, ProgressionError) as e:
        raise _error(str(e), title="Could not describe the change") from None
    if res.backend == "openai":
        who = "GPT-4" if res.model.lower().startswith("gpt-4") else "LLM"
        used = f"{who} via OpenAI-compatible API (model {res.model}){' — cached answer' if res.cached else ''}"
    else:
        used = "offline rule-based differ"
    return redact(res.text), f"Written by: **{used}**. Edit it freely before generating."


def run_journey(prior_file, journey_text, steps, guidance, image_guidance, seed, randomise, scheduler,
                duration_ms=800, strength=None, transfer=None, request: gr.Request | None = None,
                progress=gr.Progress()):
    """A sequence of descriptions -> filmstrip, animated GIF and downloads (one sample per step)."""
    from biomedjourney.service import run_journey as journey_service

    _started(request)
    _check_description(journey_text, "journey")
    duration_ms = _number(duration_ms, "duration_ms")
    try:
        journey.parse_journey(journey_text)
    except ValueError as e:
        raise _error(str(e), title="Cannot read the journey") from None
    loaded = _read_prior(prior_file, request)
    sampler = _sampler(steps, guidance, image_guidance, scheduler, strength, transfer)
    seed = _seed(seed, randomise)
    pipe = get_pipe()
    with _guard("The journey", disk=True):
        r = journey_service(pipe, loaded, journey_text, seed=seed, sampler=sampler, out=_run_folder(request, "journey"),
                            frame_ms=int(duration_ms),
                            on_step=lambda i, total: progress((i, total), desc="Generating the journey", unit="steps"))
    settings = {"steps": [{"label": lab, "description": d, **o.settings} for (lab, d), o in zip(r.steps, r.results)],
                "seed": seed, "frame_ms": int(duration_ms), "disclaimer": NOTICE}
    shown = [str(r.filmstrip), str(r.gif)]
    return str(r.filmstrip), str(r.gif), settings, shown, str(r.zip), seed


def on_load():
    """Page load: load the model once and set the controls to its defaults; report its status."""
    try:
        pipe = get_pipe()
    except gr.Error as e:
        return [gr.skip()] * 10 + [f"❌ **Model not available.** {e.message}"]
    d = pipe.defaults
    note = pipe.info.get("note", "") if isinstance(pipe.info, dict) else ""
    status = f"Model: `{_public_model_id(pipe.model_id)}` · {pipe.resolution}×{pipe.resolution} px" + (f" · {note}" if note else "")
    return [d.num_images, d.num_inference_steps, d.guidance_scale, d.image_guidance_scale, d.strength,
            d.change_transfer, d.seed, d.scheduler, d.region, d.render, status]


# ======================================================================== layout
CSS = """
#disclaimer {border: 2px solid #d97706; border-radius: 8px; padding: 4px 12px; background: #fffbeb;}
#disclaimer p {color: #92400e; margin: 4px 0;}
.dark #disclaimer {background: #451a03;} .dark #disclaimer p {color: #fde68a;}
#generate, #journey-run {min-height: 48px;}
#preview img, #filmstrip img, #journey-gif img {width: 100% !important; height: 100% !important; object-fit: contain;}
/* gallery captions under the image (not over the heatmap legend), thumbnails below the block label
   (so the badge does not hide the SYNTHETIC mark) */
#followups .caption-label, #heatmaps .caption-label {position: static !important; display: block;
  margin: 2px auto 0 !important; max-width: 100% !important; transform: none !important;
  background: transparent !important; box-shadow: none !important; text-align: center;}
#followups .thumbnail-item, #heatmaps .thumbnail-item {display: flex; flex-direction: column;}
#followups .grid-wrap, #heatmaps .grid-wrap {padding-top: 40px !important;}
/* setting hints (info text) readable: darker than gradio's default grey */
[data-testid="block-info"] + span, .block-info, span[data-testid="block-info"] ~ div, label > span + div,
.info, .info-text, [class*="info"] > p {color: #374151 !important; opacity: 1 !important;}
.dark [data-testid="block-info"] + span, .dark .info, .dark .info-text {color: #e5e7eb !important;}
"""
THEME = gr.themes.Soft(primary_hue="blue")

_d = initial_defaults()
EXAMPLE_DESCRIPTIONS = EXAMPLES_MODEL + (EXAMPLES_RENDERED if _d.render else []) + [NO_CHANGE]
EXAMPLES_NOTE = ("<sub>With 'Draw the finding from radiological knowledge' (the shipped default) each example is drawn "
                 "inside its region from radiological knowledge and harmonised by the model, and the starting noise is "
                 "optimised towards the finding without darkening it (the edema haze gains most). Without these the model "
                 "alone changes the region only faintly: it learned 'abnormal', not which abnormality. See the model "
                 "card (assets/MODEL_CARD.md, 'Following the text' and 'Guidance model').</sub>")


def build_demo() -> gr.Blocks:
    """The whole UI (built on first use of app.demo or by main(), not at import)."""
    # gradio's own copies (uploads of sessions that never ended cleanly, served results): gone within ~70 minutes
    with gr.Blocks(title="BiomedJourney: counterfactual chest X-rays", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# BiomedJourney\nUpload a prior chest X-ray, describe a change, and see synthetic "
                    "follow-up images with maps of what changed and how sure the model is.")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        model_status = gr.Markdown("Model: loading when the page opens…", elem_id="model-status")
        state = gr.State(None)

        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):
                prior_file = gr.File(label="Prior chest X-ray (PNG, JPEG, DICOM)",
                                     file_types=FILE_TYPES, type="filepath", height=120)
                gr.Examples(examples=[[p] for p in _example_files()], inputs=[prior_file], examples_per_page=4,
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
                        chips = gr.HighlightedText(label="Findings read from the description", elem_id="chips",
                                                   color_map=CHANGE_COLOURS, show_inline_category=False,
                                                   show_legend=False, interactive=False)
                        plan_notes = gr.Markdown(elem_id="plan-notes")
                        gr.Examples(examples=[[t] for t in EXAMPLE_DESCRIPTIONS], inputs=[description],
                                    label="Example descriptions (click to use)",
                                    examples_per_page=len(EXAMPLE_DESCRIPTIONS))
                        gr.Markdown(EXAMPLES_NOTE, elem_id="examples-note")
                        with gr.Accordion("Compose the description", open=False):
                            composer = []
                            for _ in range(COMPOSER_ROWS):
                                with gr.Row():
                                    composer += [
                                        gr.Dropdown(typing.get_args(FindingName), value=None, label="Finding",
                                                    min_width=150),
                                        gr.Dropdown(typing.get_args(Side), value="none", label="Side", min_width=90),
                                        gr.Dropdown(typing.get_args(Zone), value="none", label="Zone", min_width=90),
                                        gr.Dropdown(typing.get_args(Severity), value="none", label="Severity",
                                                    min_width=90),
                                        gr.Dropdown(typing.get_args(Change), value="new", label="Change", min_width=90)]
                            compose_btn = gr.Button("Add to description", elem_id="compose")
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
                        mask_preview = gr.Image(label="Where it may change (orange)", type="numpy", format="png",
                                                interactive=False, height=300, elem_id="mask-preview")
                        paint = gr.Checkbox(value=False, label="Paint my own region",
                                            info="Paint where the film may change (brush adds, eraser removes); "
                                                 "an empty canvas uses the automatic region above.")
                        canvas = gr.ImageEditor(label="Your region", type="numpy", image_mode="RGBA", format="png",
                                                sources=[], transforms=[], visible=False, height=360,
                                                brush=gr.Brush(colors=["#ff8c00"], color_mode="fixed"),
                                                eraser=gr.Eraser(), layers=False, elem_id="canvas")
                        with gr.Accordion("Settings", open=True):
                            region = gr.Radio([("The described region", "auto"), ("The whole film", "off")],
                                              value=_d.region, label="Restrict to the described region",
                                              info="Only the finding's region (or your painted one) may change.")
                            render = gr.Checkbox(value=_d.render, label="Draw the finding from radiological knowledge",
                                                 info="A knowledge-driven rendering of the finding, harmonised by the "
                                                      "model; labelled as such in the settings file.")
                            noise_opt = gr.Slider(0, 10, value=_d.noise_opt_steps, step=1,
                                                  label="Noise optimisation steps (guidance model)",
                                                  info="0 = off; used only with the drawing on. Each step nudges "
                                                       "the starting noise so that a separately trained classifier "
                                                       "finds the described finding "
                                                       "and the patient is kept. The default 4 steps about double the "
                                                       "time (4 images: about 4 s instead of 2 s on 2 CPU cores); a "
                                                       "density guard keeps dense regions from darkening. The edema "
                                                       "haze comes out denser, other findings hardly change (model "
                                                       "card).")
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
                                                 info="1 starts from pure noise; lower keeps more of the prior (SDEdit). "
                                                      "Left at the default, a knowledge-driven drawing uses the model's "
                                                      "harmonisation strength.")
                            transfer = gr.Checkbox(value=_d.change_transfer, label="Keep the prior's detail",
                                                   info="On: the prior plus only the change the model draws for the "
                                                        "description (its sample minus its no-change sample, same noise). "
                                                        "Off: the model's whole redrawn image.")
                            with gr.Row():
                                seed = gr.Number(value=_d.seed, precision=None, label="Seed",
                                                 info=f"A whole number, 0 to {SEED_MAX}. Same seed + settings = same images.")
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

        gr.Markdown(f"<sub>{NOTICE} Uploads (at most {MAX_UPLOAD_MB} MB) and results are kept for this session "
                    "only and removed when you close the page. DICOM patient identifiers are never read into the "
                    "app.</sub>")

        _checked_by_handler(num_images, steps, guidance, image_guidance, strength, duration, scheduler, region, backend,
                            *composer)
        prior_file._process_single_file = _any_prior_file
        # ---------------------------------------------------------------- events
        prior_file.change(preview_prior, prior_file, [preview, prior_info], api_name="preview")
        description.change(read_findings, description, chips, queue=False, show_progress="hidden",
                           api_visibility="private")
        gr.on([prior_file.change, description.change, region.change, render.change], preview_plan,
              [prior_file, description, region, render], [mask_preview, plan_notes], trigger_mode="always_last",
              show_progress="minimal", show_progress_on=mask_preview, api_name="plan")
        gr.on([paint.change, prior_file.change], paint_canvas, [paint, prior_file], canvas,
              trigger_mode="always_last", api_visibility="private")
        compose_btn.click(compose, [description, *composer], description, api_name="compose")
        generate_btn.click(
            generate, [prior_file, description, num_images, steps, guidance, image_guidance, seed, randomise, scheduler,
                       strength, transfer, region, render, paint, canvas, noise_opt],
            [gallery, slider, heat_gallery, mean_img, std_img, settings_json, files, zip_file, seed, state,
             chips, plan_notes, mask_preview],
            api_name="generate", scroll_to_output=True, concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY,
            show_progress_on=[gallery, slider])  # progress and errors here, not over the seed box
        gallery.select(compare, state, slider, api_visibility="private", queue=False)
        describe_btn.click(describe, [prior_report, followup_report, intended_change, backend],
                           [description, describe_info], api_name="describe",
                           show_progress_on=describe_info)  # an error must not cover the description
        journey_btn.click(
            run_journey, [prior_file, journey_text, steps, guidance, image_guidance, seed, randomise, scheduler, duration,
                          strength, transfer],
            [strip_img, gif_img, journey_json, journey_files, journey_zip, seed], api_name="journey",
            concurrency_id="model", concurrency_limit=MODEL_CONCURRENCY, show_progress_on=[strip_img, gif_img])
        demo.load(on_load, None, [num_images, steps, guidance, image_guidance, strength, transfer, seed, scheduler,
                                  region, render, model_status],
                  api_visibility="private")
        demo.unload(_cleanup_session)

    # one run at a time per event; generate + journey share "model" (limited by _limit_model_jobs); gradio's own bound on
    # everything queued (previews too) is a backstop above it
    demo.queue(default_concurrency_limit=1, max_size=4 * QUEUE_MAX)
    _limit_model_jobs(demo)
    return demo


_DEMO: gr.Blocks | None = None


def get_demo() -> gr.Blocks:
    global _DEMO
    if _DEMO is None:
        _DEMO = build_demo()
    return _DEMO


def __getattr__(name):  # app.demo (tests, Hugging Face Spaces, `gradio app.py`): built lazily, once
    if name == "demo":
        return get_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def launch_options() -> dict:
    """What a launch passes (main, which a Space runs too; tests that serve the app): the look and the upload limit."""
    return {"theme": THEME, "css": CSS, "max_file_size": f"{MAX_UPLOAD_MB}mb"}


def main(argv=None):
    args = parse_args(argv)
    get_demo().launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options())


if __name__ == "__main__":
    main()
