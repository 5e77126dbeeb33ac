"""Command line: `python -m biomedjourney generate|describe ...` (evaluation: `python -m biomedjourney.evaluate`).

Examples
  python -m biomedjourney generate --prior chest.dcm --text "New right pleural effusion." --num-images 4 --seed 0 --out results/
  python -m biomedjourney generate --prior prior.png --text "No significant interval change." --dicom --out results/
  python -m biomedjourney describe --prior-report "Clear lungs." --followup-report "Small left effusion."

Research and education only - not for diagnosis. Every generated file is marked synthetic.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import NOTICE

SCHEDULER_NAMES = ("dpmsolver++", "ddim", "euler_a")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m biomedjourney", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{generate,describe}")

    g = sub.add_parser("generate", help="generate follow-up images from a prior X-ray and a description",
                       description="Generate follow-up chest X-rays from a prior image (PNG, JPEG or DICOM) and a "
                                   "description of the disease progression. Writes PNGs (and DICOM with --dicom) "
                                   "plus settings.json with every setting, so any result can be reproduced.")
    g.add_argument("--prior", required=True, help="prior chest X-ray: PNG, JPEG or DICOM file")
    g.add_argument("--text", required=True, help='progression description, e.g. "New right pleural effusion."')
    g.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    g.add_argument("--num-images", type=int, default=None, help="how many follow-ups (default: the model's, 4)")
    g.add_argument("--seed", type=int, default=None, help="base seed; image i uses seed+i (default 0)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
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

    d = sub.add_parser("describe", help="write a progression description from two reports",
                       description="Turn a prior report and a follow-up report (or an intended change) into a short "
                                   "description of change. Uses GPT-4 through an OpenAI-compatible API when "
                                   "OPENAI_API_KEY / OPENAI_BASE_URL is set, otherwise an offline rule-based differ.")
    d.add_argument("--prior-report", required=True)
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--followup-report")
    src.add_argument("--intended-change")
    d.add_argument("--backend", choices=["auto", "openai", "rules"], default="auto")
    return ap


def _generate(a) -> int:
    from .export import save_outputs
    from .imaging import ImageLoadError, cxr_warnings, read_image
    from .pipeline import BiomedJourneyPipeline
    try:
        loaded = read_image(a.prior)
    except ImageLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in cxr_warnings(loaded):
        print(f"warning: {w}", file=sys.stderr)
    try:
        pipe = BiomedJourneyPipeline.from_pretrained(a.model, device=a.device)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        out = pipe(loaded, a.text, num_images=a.num_images, num_inference_steps=a.steps,
                   guidance_scale=a.guidance_scale, image_guidance_scale=a.image_guidance_scale,
                   seed=a.seed, scheduler=a.scheduler, strength=a.strength, negative_prompt=a.negative_prompt,
                   change_transfer=None if a.change_transfer is None else a.change_transfer == "on")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.settings["seconds"] = round(time.time() - t0, 2)
    paths = save_outputs(out, a.out, prompt=a.text, dicom=a.dicom, source=loaded, heatmaps=a.heatmaps)
    print(NOTICE)
    print(f"{len(out.images)} follow-ups in {out.settings['seconds']} s (seeds {out.seeds}) -> {a.out}")
    for p in paths:
        print(f"  {p}")
    return 0


def _describe(a) -> int:
    from .progression import describe_progression
    try:
        r = describe_progression(a.prior_report, a.followup_report, intended_change=a.intended_change, backend=a.backend)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r.text)
    print(json.dumps({"backend": r.backend, "model": r.model, "cached": r.cached}), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return {"generate": _generate, "describe": _describe}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
