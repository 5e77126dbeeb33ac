"""The service: what the app, the CLI and the Python API share (like hysts' demos: this computes, app.py wires).

    plan_edit(prior, description)       -> EditPlan: structured findings, anatomy, edit mask, renderings, notes
    generate_followups(pipe, prior, ..) -> FollowUps: the generated images with their plan and settings
    export_followups(result, folder)    -> Exported: PNG / DICOM / heatmaps / edit mask / sidecar / zip

Where the description names a finding the model is told where it is: the edit mask is built from the
structured findings and the prior's own lungs (biomedjourney.masks), and only that region may change
(blended latent diffusion in the pipeline). With `render` on, findings the weights cannot draw are first
drawn from radiological knowledge (biomedjourney.render) and the diffusion model harmonises them at a
low strength (SDEdit); every such image says so in its settings and sidecar.
"""
from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .config import NO_CHANGE
from .findings import Finding, extract, render as render_text
from .imaging import BIDI_CONTROLS, ImageLoadError, LoadedImage, cxr_warnings, read_image

# Images per finding in the shipped model's training data (NIH labels of the shared dataset's 930 NIH images,
# the only labelled source; assets/MODEL_CARD.md): a finding with few gets a visible note, never silence.
TRAINING_IMAGES = {"pneumonia": 476, "opacity": 178, "atelectasis": 113, "pulmonary edema": 86,
                   "pleural effusion": 85, "consolidation": 31, "pleural thickening": 26, "nodule": 18, "mass": 17,
                   "cardiomegaly": 16, "pneumothorax": 11, "emphysema": 8, "fibrosis": 7, "hernia": 3}
RARE_BELOW = 50
REGIONS = ("auto", "off")  # auto: the findings' region (both lungs for a finding with no place); off: whole film
MAX_DESCRIPTION_CHARS = 2000  # a description (or a journey) is a few findings, not a report: longer is refused
SEED_MAX = 2**63 - 1          # torch.Generator.manual_seed takes 0 .. 2**64 - 1; seeds[i] = seed + i stays below


@dataclass
class EditPlan:
    """What will be changed, where, and how: shown to the user before and after generating."""
    findings: list[Finding]                 # the description, structured
    canonical: str                          # findings rendered back as the canonical description
    mask: np.ndarray | None                 # (R, R) soft edit mask in [0, 1]; None: the whole film may change
    mask_source: str                        # 'findings' | 'painted' | 'whole film'
    anatomy: Any = None                     # biomedjourney.anatomy.Anatomy, when the region was needed
    renderings: np.ndarray | None = None    # (B, R, R) knowledge-driven drawings the model harmonises, or None
    rendered: list[str] = field(default_factory=list)   # what was drawn from knowledge, one line per finding
    notes: list[str] = field(default_factory=list)      # for the user: rare findings, fallbacks, parse problems

    def chips(self) -> list[str]:
        return [f.chip() for f in self.findings]

    def sidecar(self) -> dict:
        return {"findings": [f.model_dump() for f in self.findings], "canonical_description": self.canonical,
                "edit_mask": self.mask_source, "knowledge_rendering": self.rendered, "notes": self.notes,
                "anatomy": None if self.anatomy is None else self.anatomy.source}


@dataclass
class FollowUps:
    images: list[np.ndarray]                # (R, R) float32 [0, 1], no label burned in
    prior: np.ndarray                       # (R, R) the prior as the model saw it
    seeds: list[int]
    settings: dict
    plan: EditPlan
    warnings: list[str] = field(default_factory=list)   # about the uploaded image
    seconds: float = 0.0

    @property
    def output(self):
        """The pipeline's GenerationOutput view (for the exporters)."""
        from .pipeline import GenerationOutput
        return GenerationOutput(images=self.images, prior=self.prior, seeds=self.seeds, settings=self.settings,
                                mask=self.plan.mask)


def _rare_notes(findings: list[Finding], render: bool) -> list[str]:
    out = []
    for f in findings:
        n = TRAINING_IMAGES.get(f.name, 0)
        if n < RARE_BELOW and f.change != "unchanged":
            drawn = render and f.name in _rendered_names()
            out.append(f"{f.name}: {n} training images; the model itself draws little of it"
                       + (" (drawn from radiological knowledge instead)" if drawn else "; expect little change"))
    return out


_SIDE_WORDS = re.compile(r"\b(right|left)\b", re.I)


def _side_notes(text: str, findings: list[Finding]) -> list[str]:
    """'right ... left' in one description but a finding read as one side only: say how it was read."""
    words = {w.lower() for w in _SIDE_WORDS.findall(text)}
    one_sided = [f for f in findings if f.side in ("right", "left")]
    if words == {"right", "left"} and one_sided and not any(f.side == "bilateral" for f in findings) \
            and len({f.side for f in one_sided}) == 1:
        return [f"The description names both right and left, but it was read as {one_sided[0].chip()}: check the "
                "chips, or use the composer to set each finding's side."]
    return []


def _rendered_names() -> frozenset:
    from .render import RENDERED_FINDINGS
    return RENDERED_FINDINGS


def _region(findings, prior_img, painted, region, notes, render) -> tuple[np.ndarray | None, str, Any]:
    from .anatomy import segment
    from .masks import check_user_mask, edit_mask
    needed = bool(findings) and (region != "off" or render)    # the lungs place the mask and the drawing
    anatomy = segment(prior_img, size=prior_img.shape[-1]) if needed else None
    if anatomy is not None:
        notes += anatomy.warnings
    if painted is not None:
        problems = check_user_mask(painted)
        if painted.max() <= 0:
            raise ValueError(problems[0] if problems else "The painted edit mask is empty.")
        notes += problems
        return painted.astype(np.float32), "painted", anatomy
    if region == "off" or not findings:
        return None, "whole film", anatomy
    m = edit_mask(findings, anatomy)
    notes += m.notes
    return m.mask, "findings", anatomy


def plan_edit(prior_img: np.ndarray, description: str, seeds: list[int], *, region: str = "auto",
              painted_mask: np.ndarray | None = None, render: bool = False) -> EditPlan:
    """Findings x anatomy -> edit mask (and optional knowledge-driven renderings, one per seed)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    text = (description or "").strip()
    findings = [] if text == NO_CHANGE else extract(text)
    changing = [f for f in findings if f.change != "unchanged"]
    notes = _text_notes(text, findings, changing, render)
    mask, source, anatomy = _region(changing, prior_img, painted_mask, region, notes, render)
    plan = EditPlan(findings=findings, canonical=render_text(findings), mask=mask, mask_source=source,
                    anatomy=anatomy, notes=notes)
    drawable = [f for f in changing if f.name in _rendered_names()]
    if render and drawable:
        _add_renderings(plan, prior_img, changing, drawable, seeds)
    return plan


def _text_notes(text: str, findings: list[Finding], changing: list[Finding], render: bool) -> list[str]:
    notes: list[str] = []
    if text and text != NO_CHANGE and not findings:
        notes.append(f"No finding recognised in {text!r}: the model gets your words as written and the whole film "
                     "may change. Use the composer or name a finding (effusion, edema, consolidation, ...).")
    return notes + _rare_notes(changing, render) + _side_notes(text, findings)


def _add_renderings(plan: EditPlan, prior_img: np.ndarray, changing: list[Finding], drawable: list[Finding],
                    seeds: list[int]) -> None:
    """The knowledge-driven drawings the sampler starts from (one per seed); their extent joins the region, and
    outside the lungs the region of what was drawn is only where the drawing changed the film
    (`masks.confine_to_drawing`), read on the seed-0 drawing: the mask is the same whichever seeds a call draws,
    so image i of a call is still image 0 of a call with its seed alone."""
    from .masks import confine_to_drawing, edit_mask
    from .render import render_findings
    draw = lambda s: render_findings(prior_img, drawable, plan.anatomy, generator=torch.Generator().manual_seed(s))
    rs = [draw(s) for s in seeds]
    plan.renderings = np.stack([r.image for r in rs]).astype(np.float32)               # (B, R, R)
    plan.rendered = rs[0].notes
    if plan.mask is not None and plan.mask_source == "findings":
        ref = rs[seeds.index(0)] if 0 in seeds else draw(0)
        undrawn = [f for f in changing if f not in drawable or f in ref.undrawn]
        free = edit_mask(undrawn, plan.anatomy).mask if undrawn else None
        plan.mask = confine_to_drawing(np.maximum(plan.mask, ref.mask), np.abs(ref.image - prior_img), plan.anatomy,
                                       free)


class ModelLoadError(RuntimeError):
    """A model folder (or Hub id) that cannot be loaded; the message names it, says why and what to do."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str | None = None):
    """``BiomedJourneyPipeline.from_pretrained(model)`` (safetensors weights only: a folder holding pickled
    weights (``*.bin``) is refused there, never unpickled). Any failure (missing, truncated or mismatched weights, a bad
    config) -> ModelLoadError with the folder's public name (no local path) and the fix. `dtype`: a DTYPES name (None:
    float32 on the CPU, float16 on CUDA; bfloat16 on a CPU with AMX: README, "Speed")."""
    from .imaging import printable
    from .pipeline import BiomedJourneyPipeline, _public_model_id
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} (--dtype, $BIOMEDJOURNEY_DTYPE).")
    try:
        return BiomedJourneyPipeline.from_pretrained(model, device=device, dtype=DTYPES.get(dtype))
    except Exception as e:  # noqa: BLE001 - diffusers raises OSError, ValueError, RuntimeError, SafetensorError, ...
        src = str(model) if model else ""
        name = _public_model_id(src) if src else "the default model"
        reason = printable(str(e).replace(src, name) if src else e, 400)
        raise ModelLoadError(f"The model '{name}' could not be loaded: {reason} A model folder holds model_index.json "
                             "and unet/, vae/, scheduler/, text_encoder/ with safetensors weights: export or download "
                             "it again, or use another one.") from None


EMPTY_DESCRIPTION = "The description is empty: write the change you want to see, e.g. 'New right pleural effusion.'"


def check_description(text: Any, what: str = "description", allow_empty: bool = False) -> str:
    """The description stripped, or ValueError naming the problem and the fix: not text, empty (unless
    ``allow_empty``), longer than MAX_DESCRIPTION_CHARS, or holding control / bidi-override characters (they would
    reach the sidecar, the DICOM and the logs; a right-to-left script or an emoji is fine)."""
    if not isinstance(text, str):
        raise ValueError(f"The {what} must be text, got {type(text).__name__}.")
    t = text.strip()
    if not t and not allow_empty:
        raise ValueError(EMPTY_DESCRIPTION.replace("description", what, 1))
    if len(t) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"The {what} is {len(t):,} characters long; at most {MAX_DESCRIPTION_CHARS:,} are accepted. "
                         "Shorten it to the findings that change.")
    bad = sorted({c for c in t if (unicodedata.category(c) == "Cc" and c not in "\t\n\r") or c in BIDI_CONTROLS})
    if bad:
        codes = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
        raise ValueError(f"The {what} contains control characters ({codes}); remove them and type or paste plain text.")
    return t


def _whole(value: Any, name: str, lo: int, hi: int) -> int:
    """An int (or a whole float) in [lo, hi]; ValueError naming the setting otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(value) and float(value).is_integer() and lo <= value <= hi
    if not ok:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}.")
    return int(value)


def check_settings(seed: Any, num_images: Any, sampler: dict) -> tuple[int | None, int | None]:
    """(seed, num_images) checked before any work (None: the model's default), and the sampler's numbers:
    whole steps, finite guidance and strength. ValueError naming the setting and its range otherwise."""
    from .pipeline import MAX_IMAGES
    n = None if num_images is None else _whole(num_images, "num_images", 1, MAX_IMAGES)
    seed = None if seed is None else _whole(seed, "seed", 0, SEED_MAX - (n or MAX_IMAGES))
    if sampler.get("num_inference_steps") is not None:
        _whole(sampler["num_inference_steps"], "num_inference_steps", 1, 1000)
    for key in ("guidance_scale", "image_guidance_scale", "strength"):
        v = sampler.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                              or not math.isfinite(v)):
            raise ValueError(f"{key} must be a finite number, got {v!r}.")
    return seed, n


def load_prior(prior: Any) -> tuple[LoadedImage | np.ndarray, list[str]]:
    """A path / bytes / LoadedImage / array -> what the pipeline takes, with warnings about the image."""
    if isinstance(prior, np.ndarray):
        if prior.dtype.kind not in "biuf" or prior.size == 0 or not np.isfinite(prior).all():
            raise ImageLoadError("The prior array is empty, not numeric or holds NaN / infinite values; pass an "
                                 "(H, W) image in [0, 1].")
        return prior, []
    loaded = prior if isinstance(prior, LoadedImage) else read_image(prior)
    return loaded, cxr_warnings(loaded)


def generate_followups(pipe, prior: Any, description: str, *, seed: int | None = None, num_images: int | None = None,
                       sampler: dict | None = None, region: str | None = None, painted_mask: np.ndarray | None = None,
                       render: bool | None = None, on_step: Callable[[int, int], None] | None = None,
                       noise_opt_steps: int | None = None) -> FollowUps:
    """Prior + description -> follow-ups restricted to the described region. Unset settings: the model's.
    ``noise_opt_steps`` > 0: the initial noise is first optimised towards the described findings (guidance_targets)."""
    *_, result = iter_followups(pipe, prior, description, seed=seed, num_images=num_images, sampler=sampler,
                                region=region, painted_mask=painted_mask, render=render, on_step=on_step,
                                noise_opt_steps=noise_opt_steps)
    return result


@dataclass
class _Request:
    """One generation request with the model's defaults filled in, its plan made (iter_followups' setup)."""
    prior_img: np.ndarray
    warnings: list[str]
    seed: int
    seeds: list[int]
    plan: EditPlan
    pipe_kwargs: dict       # the pipeline's sampler settings, noise optimisation and harmonisation strength
    steps_per_call: int     # denoising steps each pipeline call makes


def _request(pipe, prior, description, seed, num_images, sampler, region, painted_mask, render,
             noise_opt_steps) -> _Request:
    d = pipe.defaults
    empty = not check_description(description, allow_empty=True)  # the API may ask for no text (evaluation does)
    seed, num_images = check_settings(seed, num_images, sampler or {})
    loaded, warnings = load_prior(prior)
    prior_img = pipe.prepare_prior(loaded)
    n = d.num_images if num_images is None else int(num_images)
    seed = d.seed if seed is None else int(seed)
    seeds = [seed + i for i in range(n)]
    render = d.render if render is None else bool(render)
    plan = plan_edit(prior_img, description, seeds, region=region or d.region, painted_mask=painted_mask,
                     render=render)
    if empty:
        plan.notes.insert(0, EMPTY_DESCRIPTION + " Without one the model gets no text and the whole film may change.")
    kw = dict(sampler or {})
    steps_opt = d.noise_opt_steps if noise_opt_steps is None else _whole(noise_opt_steps, "noise_opt_steps", 0, 50)
    kw["noise_optimization"] = noise_optimization(pipe, plan, steps_opt)
    if plan.renderings is not None and kw.get("strength") is None:
        # SDEdit harmonisation of the drawing: a low strength keeps its shape (at least one denoising step)
        steps = kw.get("num_inference_steps") or d.num_inference_steps
        kw["strength"] = max(d.render_strength, 1.0 / steps)
    from .pipeline import denoising_steps
    per = denoising_steps(kw.get("num_inference_steps") or d.num_inference_steps, kw.get("strength") or d.strength)
    return _Request(prior_img, warnings, seed, seeds, plan, kw, per)


def iter_followups(pipe, prior: Any, description: str, *, first: int | None = None, seed: int | None = None,
                   num_images: int | None = None, sampler: dict | None = None, region: str | None = None,
                   painted_mask: np.ndarray | None = None, render: bool | None = None,
                   on_step: Callable[[int, int], None] | None = None, noise_opt_steps: int | None = None
                   ) -> Iterator[FollowUps]:
    """generate_followups, streamed: with 0 < `first` < num_images it yields the first `first` images as soon as one
    pipeline call has made them, then all of them after a second call for the rest (otherwise it yields once). The
    images are the ones a single call makes: the plan (findings, mask, one drawing per seed) is made once for all
    seeds, and image i depends only on seeds[i] (its own generator; pipeline `_Settings.seeds`). `on_step(k, total)`:
    denoising steps done over all calls, and their number (a harmonised drawing takes fewer than the strength
    slider says: `render_strength`)."""
    from .pipeline import progress_callback
    q = _request(pipe, prior, description, seed, num_images, sampler, region, painted_mask, render, noise_opt_steps)
    images, reports, seconds = [], [], 0.0
    chunks = _chunks(len(q.seeds), first)
    total = q.steps_per_call * len(chunks)
    for c, (a, b) in enumerate(chunks):
        tick = None if on_step is None else progress_callback(
            lambda i, off=c * q.steps_per_call: on_step(off + i, total))
        t0 = time.perf_counter()
        out = pipe(q.prior_img, description, num_images=b - a, seed=q.seed + a, mask_image=q.plan.mask,
                   init_image=None if q.plan.renderings is None else q.plan.renderings[a:b], callback_on_step_end=tick,
                   **q.pipe_kwargs)
        seconds += time.perf_counter() - t0
        images += out.images
        reports.append((b - a, out.settings["noise_optimization"]))
        settings = {**out.settings, "num_images": b, "seed": q.seed, "seeds": q.seeds[:b],
                    "noise_optimization": _merged_reports(reports), **q.plan.sidecar()}
        yield FollowUps(images=list(images), prior=out.prior, seeds=q.seeds[:b], settings=settings, plan=q.plan,
                        warnings=q.warnings, seconds=seconds)


def _chunks(n: int, first: int | None) -> list[tuple[int, int]]:
    """The images each pipeline call makes: [(0, n)], or [(0, first), (first, n)] when streaming."""
    return [(0, first), (first, n)] if first is not None and 0 < first < n else [(0, n)]


def pipeline_calls(num_images: int, first: int | None) -> int:
    """How many pipeline calls iter_followups makes (progress bars: steps per call x calls)."""
    return len(_chunks(num_images, first))


def _merged_reports(reports: list[tuple[int, dict | None]]) -> dict | None:
    """Noise optimisation's reports of several calls as one: seconds added, the objective and the density term per
    step averaged over all images (each call's figures are means over its own images), as one call would report."""
    if reports[0][1] is None or len(reports) == 1:
        return reports[0][1]
    merged, total = dict(reports[-1][1]), sum(k for k, _ in reports)
    merged["seconds"] = round(sum(r["seconds"] for _, r in reports), 3)
    merged["steps"] = min(r["steps"] for _, r in reports)
    for key in ("objective", "against_density"):
        merged[key] = [round(sum(k * r[key][i] for k, r in reports) / total, 6) for i in range(
            min(len(r[key]) for _, r in reports))]
    return merged


# a finding's change -> the probability noise optimisation asks the guidance model for
_TARGET_OF_CHANGE = {"new": 1.0, "increased": 1.0, "decreased": 0.0, "resolved": 0.0}
# a new finding that is also a broader one (guidance.LABEL_SOURCES: opacity counts consolidation and pneumonia)
_IMPLIES = {"consolidation": ("opacity",), "pneumonia": ("opacity",)}


def noise_optimization(pipe, plan: EditPlan, steps: int):
    """The pipeline's NoiseOptimization for the plan's findings (None when off or impossible, with a note saying why).
    New / increased findings are asked for (1), decreased / resolved ones asked away (0), unchanged ones left alone;
    only findings with >= RARE_BELOW training images, the ones the guidance model had enough examples to learn
    (a consolidation is guided as the opacity it implies), and only on top of a knowledge-driven drawing. A changing
    finding too rare to be guided is `free`: not held at the prior's level either."""
    if steps <= 0:
        return None
    from .pipeline import NoiseOptimization
    gm = getattr(pipe, "guidance_model", None)
    if gm is None:
        plan.notes.append("Noise optimisation is on, but this model has no guidance model "
                          "(train/train_guidance.py); generated without it.")
        return None
    if plan.renderings is None:
        plan.notes.append("Noise optimisation runs only on top of the knowledge-driven drawing: without it, the "
                          "optimised noise darkened the region instead of drawing the finding (model card, 'Guidance "
                          "model'); skipped.")
        return None
    targets: dict[str, float] = {}
    changed: set[str] = set()                 # every label the description changes: never held at the prior's level
    for f in plan.findings:
        p = _TARGET_OF_CHANGE.get(f.change)
        for name in (f.name, *(_IMPLIES.get(f.name, ()) if p == 1.0 else ())):
            if p is None or name not in gm.labels:
                continue
            changed.add(name)
            if TRAINING_IMAGES.get(name, 0) >= RARE_BELOW:
                targets.setdefault(name, p)
    if not targets:
        known = [n for n in gm.labels if TRAINING_IMAGES.get(n, 0) >= RARE_BELOW]
        plan.notes.append(f"Noise optimisation guides only findings with at least {RARE_BELOW} training images "
                          f"({', '.join(known)}); none of them changes in this description, so it was skipped.")
        return None
    return NoiseOptimization(targets=targets, steps=steps, free=tuple(sorted(changed - set(targets))))


@dataclass
class Exported:
    files: list[Path]                       # everything written, the sidecar last
    heatmaps: dict[str, Path]               # 'sample1'..., 'mean_change', 'uncertainty'
    mask: Path | None = None                # edit_mask.png
    zip: Path | None = None


def export_followups(result: FollowUps, folder: str | Path, *, source: LoadedImage | None = None, dicom: bool = True,
                     heatmaps: bool = True, prefix: str = "followup", zip_name: str | None = None,
                     study_uid: str | None = None) -> Exported:
    """Write the images (PNG, DICOM SC marked synthetic), heatmaps, the edit mask and the sidecar.
    `study_uid`: the series joins this study (the prior's, imaging.dicom_study_uid) instead of a new one."""
    from .export import save_outputs
    from .imaging import save_png
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = []
    if result.plan.mask is not None:
        extra.append(save_png(result.plan.mask, folder / "edit_mask.png", synthetic=False, burn_in=False,
                              description=f"Edit mask ({result.plan.mask_source}) for: {result.settings.get('prompt', '')}"))
    files = save_outputs(result.output, folder, dicom=dicom, source=source, prefix=prefix, heatmaps=heatmaps,
                         extra_files=[p.name for p in extra], study_uid=study_uid)
    files = extra + files
    maps = {p.stem.removeprefix("heatmap_"): p for p in files if p.name.startswith("heatmap_")}
    zip_path = None
    if zip_name:
        from .journey import make_zip
        zip_path = make_zip(files, folder / zip_name)
    return Exported(files=files, heatmaps=maps, mask=extra[0] if extra else None, zip=zip_path)


@dataclass
class Journey:
    """A sequence of descriptions applied one after another; step k's first image is step k+1's prior."""
    steps: list[tuple[str, str]]            # (label, description)
    results: list[FollowUps]                # one per step (1 image each)
    frames: list[np.ndarray]                # prior, then each step's image
    filmstrip: Path | None = None
    gif: Path | None = None
    files: list[Path] = field(default_factory=list)
    zip: Path | None = None


def run_journey(pipe, prior: Any, journey_text: str, *, seed: int = 0, sampler: dict | None = None,
                region: str | None = None, render: bool | None = None, out: str | Path | None = None,
                frame_ms: int = 800, on_step: Callable[[int, int], None] | None = None) -> Journey:
    """'day 3: new right lower lobe consolidation; day 7: ...' -> frames (and with `out`: filmstrip, GIF, files, zip).
    Step k uses seed + k, so a journey is reproducible from one number; errors accumulate along the way."""
    from . import journey as jr
    from .imaging import save_png
    if not isinstance(journey_text, str) or journey_text.strip():  # an empty one: parse_journey says how to write it
        check_description(journey_text, "journey")
    plan = jr.parse_journey(journey_text)
    loaded, _ = load_prior(prior)
    kw = dict(sampler or {})
    current, results, done = loaded, [], [0, 0]   # steps of the finished steps, of the current one
    for k, (_, description) in enumerate(plan):
        def tick(i, total, left=len(plan) - k):   # the steps still to come are estimated as this one's
            done[1] = total
            on_step(done[0] + i, done[0] + total * left)
        r = generate_followups(pipe, current, description, seed=seed + k, num_images=1, sampler=kw, region=region,
                               render=render, on_step=None if on_step is None else tick)
        done[0] += done[1]
        results.append(r)
        current = r.images[0]
    frames = [results[0].prior] + [r.images[0] for r in results]
    result = Journey(steps=plan, results=results, frames=frames)
    if out is None:
        return result
    folder = Path(out)
    labels, marks = ["prior (input)"] + [lab for lab, _ in plan], [False] + [True] * len(results)
    strip = jr.filmstrip(frames, labels, synthetic=marks)
    result.filmstrip = save_png(strip / 255.0, folder / "journey_filmstrip.png", burn_in=False,
                                description=" | ".join(f"{lab}: {desc}" for lab, desc in plan))
    result.gif = jr.write_gif(frames, labels, folder / "journey.gif", int(frame_ms), synthetic=marks)
    source = loaded if isinstance(loaded, LoadedImage) else None
    result.files = [result.filmstrip, result.gif] + [
        p for k, r in enumerate(results, 1)
        for p in export_followups(r, folder / f"step{k:02d}", source=source, heatmaps=False, prefix=f"step{k:02d}").files]
    result.zip = jr.make_zip(result.files, folder / "biomedjourney_journey.zip")
    return result
