"""Writing generation results: PNGs and DICOM Secondary Capture marked synthetic, plus a JSON sidecar.

The one exporter used by the CLI, the app and the evaluation, so every file on disk carries the
same synthetic markers and the settings that reproduce it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from . import NOTICE
from .imaging import PROGRESSION_LABEL, SYNTHETIC_DESCRIPTION, LoadedImage, atomic_write, save_png, write_dicom
from .pipeline import GenerationOutput, _public_model_id

_FREE_TEXT_KEYS = ("prompt", "negative_prompt")  # user text, never treated as a path


def public_settings(settings: dict) -> dict:
    """``settings`` fit for files that leave the machine: the model as its folder name
    (``pipeline._public_model_id``) and any other absolute local path reduced to its last part."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: v2 if k in _FREE_TEXT_KEYS else clean(v2) for k, v2 in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, os.PathLike) or (isinstance(v, str) and os.path.isabs(v) and len(v) > 1):
            return Path(v).name
        return v
    out = clean(dict(settings))
    if isinstance(settings.get("model"), (str, os.PathLike)):
        out["model"] = _public_model_id(str(settings["model"]))
    return out


def series_description(prompt: str) -> str:
    """DICOM SeriesDescription (LO, 64 bytes) naming the run: still says SYNTHETIC first."""
    head, text = "SYNTHETIC, not for diagnosis: ", " ".join(str(prompt).split())
    room = 64 - len(head.encode())
    if len(text.encode()) > room:
        text = text.encode()[:room - 3].decode("utf-8", errors="ignore").rstrip() + "..."
    return head + text if text else head.rstrip(": ")


def save_outputs(out: GenerationOutput, folder: str | Path, *, prompt: str | None = None, dicom: bool = True,
                 source: LoadedImage | None = None, prefix: str = "followup", heatmaps: bool = False,
                 extra_files: list[str] = (), study_uid: str | None = None) -> list[Path]:
    """Write `prefix_<i>_seed<seed>.png` (+ `.dcm`), `prior_input.png`, with `heatmaps` the
    `heatmap_*.png` figures (per sample, mean change, uncertainty), and `settings.json`; returns the paths.

    The DICOM files of one call are one series of one study (shared Study/SeriesInstanceUID, made
    here with pydicom's generate_uid; InstanceNumber 1..N; SeriesDescription names the run), and
    neither they nor settings.json carry an absolute local path (see public_settings). A new study unless
    ``study_uid`` is given (the prior's, from ``imaging.dicom_study_uid``, when the user asks the series to join
    the prior's study: only that UID is used; patient identifiers are never copied). settings.json records
    the model's folder name and ``model_sha256`` (the pipeline's: first 16 hex digits of its unet weights file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = out.settings.get("prompt", "") if prompt is None else prompt
    public = public_settings(out.settings)
    # one study, one series per call: the N samples are instances 1..N of the same series
    study_uid, series_uid, when = study_uid or generate_uid(), generate_uid(), datetime.now()
    paths: list[Path] = []
    if out.prior is not None:
        paths.append(save_png(out.prior, folder / "prior_input.png", synthetic=False))
    for i, (img, seed) in enumerate(zip(out.images, out.seeds)):
        stem = f"{prefix}_{i + 1}_seed{seed}"
        paths.append(save_png(img, folder / f"{stem}.png", description=f"{PROGRESSION_LABEL}{prompt}"))
        if dicom:
            settings = {**public, "seed": seed, "num_images": 1}
            paths.append(write_dicom(img, folder / f"{stem}.dcm", description=prompt, settings=settings,
                                     source=source, study_uid=study_uid, series_uid=series_uid,
                                     instance_number=i + 1, series_description=series_description(prompt),
                                     when=when))
    if heatmaps and out.prior is not None:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        from .heatmaps import output_figures
        info = PngInfo()  # the maps are of generated images: marked like them (tests/test_hostile.py checks every file)
        info.add_text("Software", "BiomedJourney")
        info.add_text("Description", f"{SYNTHETIC_DESCRIPTION} Change map of the generated follow-ups.")
        for name, fig in output_figures(out.prior, out.images, out.seeds).items():
            paths.append(atomic_write(folder / name, lambda tmp, fig=fig: Image.fromarray(fig).save(
                tmp, format="PNG", pnginfo=info)))
    text = json.dumps({"notice": NOTICE, **public, "files": [*extra_files, *(p.name for p in paths)]},
                      indent=2, default=str) + "\n"
    sidecar = atomic_write(folder / "settings.json", lambda tmp: Path(tmp).write_text(text))
    return paths + [sidecar]
