"""Command line: `python -m biomedjourney generate|describe ...` (evaluation: `python -m biomedjourney.evaluate`).

Examples
  python -m biomedjourney generate --prior chest.dcm --text "New right pleural effusion." --num-images 4 --seed 0 --out results/
  python -m biomedjourney generate --prior prior.png --text "No significant interval change." --dicom --out results/
  python -m biomedjourney describe --prior-report "Clear lungs." --followup-report "Small left effusion."
  python -m biomedjourney findings --text "New small right basal pleural effusion."
  python -m biomedjourney anatomy --prior chest.dcm --out anatomy/
  python -m biomedjourney journey --prior chest.dcm --steps "day 3: new right pleural effusion; day 9: increasing right pleural effusion" --out journey/

Research and education only - not for diagnosis. Every generated file is marked synthetic.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import NOTICE
from .config import SCHEDULER_NAMES
from .findings.client import redact  # noqa: F401  (the app imports it from here too)



DTYPE_NAMES = ("float32", "bfloat16", "float16")  # == service.DTYPES (not imported: --help stays instant)

def _number(text: str) -> int | float:
    """A command-line number as typed (int when it is one); its range is checked with the other settings
    (service.check_settings), so '--seed 2.5' and '--steps -3' get the same message as through the API."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m biomedjourney", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{generate,describe,findings,anatomy,journey}")

    g = sub.add_parser("generate", help="generate follow-up images from a prior X-ray and a description",
                       description="Generate follow-up chest X-rays from a prior image (PNG, JPEG or DICOM) and a "
                                   "description of the disease progression. Writes PNGs (and DICOM with --dicom) "
                                   "plus settings.json with every setting, so any result can be reproduced.")
    g.add_argument("--prior", required=True, help="prior chest X-ray: PNG, JPEG or DICOM file")
    g.add_argument("--text", required=True, help='progression description, e.g. "New right pleural effusion."')
    g.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    g.add_argument("--num-images", type=_number, default=None, help="how many follow-ups (default: the model's, 4)")
    g.add_argument("--seed", type=_number, default=None, help="base seed; image i uses seed+i (default 0)")
    g.add_argument("--steps", type=_number, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--guidance-scale", type=float, default=None, help="text guidance: higher follows the text more")
    g.add_argument("--image-guidance-scale", type=float, default=None, help="image guidance: higher stays closer to the prior")
    g.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None, help="sampler (default: the model's)")
    g.add_argument("--strength", type=float, default=None,
                   help="1 = start from noise; lower starts from the noised prior and stays closer to it")
    g.add_argument("--negative-prompt", default=None,
                   help="text guidance pushes away from this (default: the model's, e.g. the no-change text)")
    g.add_argument("--change-transfer", choices=["on", "off"], default=None,
                   help="on: the prior plus only the generated change; off: the model's whole drawing (default: the model's)")
    g.add_argument("--model", default=None, help="model folder or Hugging Face Hub id (default: the shipped model)")
    g.add_argument("--dicom", action="store_true", help="also write DICOM Secondary Capture files (marked synthetic)")
    g.add_argument("--heatmaps", action="store_true",
                   help="also write difference heatmaps per sample, the mean change and the uncertainty map")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights and compute precision (default: float32 on the CPU, float16 on CUDA); bfloat16 is "
                        "faster on CPUs with AMX (README, 'Speed')")
    g.add_argument("--region", choices=["auto", "off"], default=None,
                   help="auto: only the described finding's region may change (from the findings and the prior's "
                        "lungs; both lungs for a finding with no place); off: the whole film (default: the model's)")
    g.add_argument("--mask", type=Path, default=None,
                   help="your own edit mask: a PNG in the prior's 256x256 model-input frame, white = may change")
    g.add_argument("--same-study", action="store_true",
                   help="with --dicom and a DICOM prior: the synthetic series joins the prior's study (its "
                        "StudyInstanceUID only; no patient identifier is copied); default: a new study")
    g.add_argument("--render", choices=["on", "off"], default=None,
                   help="on: draw the finding from radiological knowledge first, then let the model harmonise it "
                        "(clearly labelled in the sidecar); off: the model alone (default: the model's)")
    g.add_argument("--noise-opt-steps", type=_number, default=None,
                   help="initial-noise optimisation steps towards the described findings with the model's guidance "
                        "model (0 = off; each step costs about one extra generation; default: the model's)")

    d = sub.add_parser("describe", help="write a progression description from two reports",
                       description="Turn a prior report and a follow-up report (or an intended change) into a short "
                                   "description of change. Uses GPT-4 through an OpenAI-compatible API when "
                                   "OPENAI_API_KEY / OPENAI_BASE_URL is set, otherwise an offline rule-based differ.")
    d.add_argument("--prior-report", required=True)
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--followup-report")
    src.add_argument("--intended-change")
    d.add_argument("--backend", choices=["auto", "openai", "rules"], default="auto")

    an = sub.add_parser("anatomy", help="find the lungs and heart of a prior X-ray",
                        description="Segment the patient's right and left lungs (shipped network; the average "
                                    "anatomy when it fails) and estimate the heart, in the prior's 256x256 "
                                    "model-input frame. Writes right_lung.png, left_lung.png, heart.png (0/255) "
                                    "and overlay.png (contours, R/L on the patient's sides).")
    an.add_argument("--prior", required=True, help="prior chest X-ray: PNG, JPEG or DICOM file")
    an.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    j = sub.add_parser("journey", help="apply a sequence of descriptions one after another",
                       description="A disease journey: each step's description is applied to the previous step's "
                                   "image (step k uses seed + k). Writes a filmstrip, an animated GIF, each step's "
                                   "files and a zip. Errors accumulate along the way.")
    j.add_argument("--prior", required=True, help="prior chest X-ray: PNG, JPEG or DICOM file")
    j.add_argument("--steps", required=True,
                   help='"day 3: new right lower lobe consolidation; day 7: increasing right consolidation"')
    j.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    j.add_argument("--seed", type=_number, default=0)
    j.add_argument("--model", default=None, help="model folder or Hugging Face Hub id (default: the shipped model)")
    j.add_argument("--region", choices=["auto", "off"], default=None)
    j.add_argument("--render", choices=["on", "off"], default=None)
    j.add_argument("--device", default=None)
    j.add_argument("--dtype", choices=DTYPE_NAMES, default=None)
    from .findings.cli import add_parser as _add_findings_parser
    _add_findings_parser(sub)
    return ap


def _read_mask(path: Path, size: int):
    import numpy as np

    from .imaging import read_image, to_model_input
    return to_model_input(read_image(path).pixels, size=size).astype(np.float32)


def _fail(message) -> int:
    """One line on stderr, 'error: ...' (control characters escaped, the OpenAI key never shown); exit code 2."""
    from .imaging import printable
    print(f"error: {printable(redact(str(message)), 2000)}", file=sys.stderr)
    return 2


def _write_failed(e: OSError, out: Path) -> int:
    return _fail(f"could not write the results to {out}: {e.strerror or e}. Nothing was left half-written under a "
                 "final name; free some disk space (or choose another --out) and run again.")


def _generate(a) -> int:
    from .imaging import ImageLoadError
    from .service import (ModelLoadError, check_description, check_settings, export_followups, generate_followups,
                          load_pipeline, load_prior)
    sampler = dict(num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                   image_guidance_scale=a.image_guidance_scale, scheduler=a.scheduler, strength=a.strength,
                   negative_prompt=a.negative_prompt,
                   change_transfer=None if a.change_transfer is None else a.change_transfer == "on")
    try:  # everything the user typed is checked before the model is loaded
        check_description(a.text)
        check_settings(a.seed, a.num_images, sampler)
        loaded, warnings = load_prior(a.prior)
    except ValueError as e:  # ImageLoadError is a ValueError
        return _fail(e)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    try:
        pipe = load_pipeline(a.model, device=a.device, dtype=a.dtype)
        painted = None if a.mask is None else _read_mask(a.mask, pipe.resolution)
    except (ModelLoadError, ImageLoadError) as e:
        return _fail(e)
    try:
        r = generate_followups(pipe, loaded, a.text, seed=a.seed, num_images=a.num_images, sampler=sampler,
                               region=a.region, painted_mask=painted,
                               render=None if a.render is None else a.render == "on", noise_opt_steps=a.noise_opt_steps)
    except (ValueError, TypeError) as e:
        return _fail(e)
    r.settings["seconds"] = round(r.seconds, 2)
    for note in r.plan.notes:
        print(f"note: {note}", file=sys.stderr)
    from .imaging import dicom_study_uid
    try:
        ex = export_followups(r, a.out, source=loaded if not hasattr(loaded, "shape") else None, dicom=a.dicom,
                              heatmaps=a.heatmaps, study_uid=dicom_study_uid(a.prior) if a.same_study else None)
    except OSError as e:
        return _write_failed(e, a.out)
    print(NOTICE)
    print(f"findings: {'; '.join(r.plan.chips()) or 'none recognised'} · edit region: {r.plan.mask_source}")
    for line in r.plan.rendered:
        print(f"knowledge-driven rendering: {line}")
    print(f"{len(r.images)} follow-ups in {r.settings['seconds']} s (seeds {r.seeds}) -> {a.out}")
    for p in ex.files:
        print(f"  {p}")
    return 0


def _describe(a) -> int:
    from .progression import describe_progression
    try:
        r = describe_progression(a.prior_report, a.followup_report, intended_change=a.intended_change, backend=a.backend)
        check_answer(r.text, r.backend)
    except (ValueError, RuntimeError) as e:
        return _fail(e)
    print(r.text)
    print(json.dumps({"backend": r.backend, "model": r.model, "cached": r.cached}), file=sys.stderr)
    return 0


def check_answer(text: str, backend: str) -> str:
    """A written description checked as a typed one is (service.check_description): an LLM answer that is empty,
    too long or holds control characters (a prompt-injected report, say) is refused, never used or run."""
    from .service import check_description
    try:
        return check_description(text)
    except ValueError as e:
        who = "The LLM's answer" if backend == "openai" else "The written description"
        raise ValueError(f"{who} is not a usable description ({e}) Write the description yourself, or use the "
                         "rule-based writer (--backend rules).") from None


def _anatomy(a) -> int:
    from PIL import Image

    from .anatomy import binary_masks, overlay, segment
    from .imaging import ImageLoadError, read_image, to_model_input
    from .atomic import atomic_write
    try:
        loaded = read_image(a.prior)
    except ImageLoadError as e:
        return _fail(e)
    anat = segment(loaded)
    pictures = {f"{name}.png": Image.fromarray(m) for name, m in binary_masks(anat).items()}
    pictures["overlay.png"] = overlay(to_model_input(loaded.pixels, size=256), anat)
    try:
        for name, im in pictures.items():
            atomic_write(a.out / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
    except OSError as e:
        return _write_failed(e, a.out)
    for w in anat.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"anatomy source: {anat.source} -> {a.out} (right_lung.png, left_lung.png, heart.png, overlay.png)")
    return 0


def _journey(a) -> int:
    from .service import ModelLoadError, check_settings, load_pipeline, load_prior, run_journey
    try:
        check_settings(a.seed, None, {})
        loaded, warnings = load_prior(a.prior)
        pipe = load_pipeline(a.model, device=a.device, dtype=a.dtype)
        r = run_journey(pipe, loaded, a.steps, seed=a.seed, region=a.region, out=a.out,
                        render=None if a.render is None else a.render == "on")
    except OSError as e:
        return _write_failed(e, a.out)
    except (ModelLoadError, ValueError, TypeError) as e:
        return _fail(e)
    for w in warnings + [n for s in r.results for n in s.plan.notes]:
        print(f"note: {w}", file=sys.stderr)
    print(NOTICE)
    print(f"{len(r.steps)} steps -> {a.out}: {r.filmstrip.name}, {r.gif.name}, {r.zip.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.command == "findings":
        from .findings.cli import run as _findings
        return _findings(a)
    return {"generate": _generate, "describe": _describe, "anatomy": _anatomy, "journey": _journey}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
