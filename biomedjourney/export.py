"""Writing generation results: PNGs and DICOM Secondary Capture marked synthetic, plus a JSON sidecar.

The one exporter used by the CLI, the app and the evaluation, so every file on disk carries the
same synthetic markers and the settings that reproduce it.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import NOTICE
from .imaging import LoadedImage, atomic_write, save_png, write_dicom
from .pipeline import GenerationOutput


def save_outputs(out: GenerationOutput, folder: str | Path, *, prompt: str | None = None, dicom: bool = True,
                 source: LoadedImage | None = None, prefix: str = "followup", heatmaps: bool = False,
                 extra_files: list[str] = ()) -> list[Path]:
    """Write `prefix_<i>_seed<seed>.png` (+ `.dcm`), `prior_input.png`, with `heatmaps` the
    `heatmap_*.png` figures (per sample, mean change, uncertainty), and `settings.json`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = out.settings.get("prompt", "") if prompt is None else prompt
    paths: list[Path] = []
    if out.prior is not None:
        paths.append(save_png(out.prior, folder / "prior_input.png", synthetic=False))
    for i, (img, seed) in enumerate(zip(out.images, out.seeds)):
        stem = f"{prefix}_{i + 1}_seed{seed}"
        desc = f"Progression description: {prompt}"
        paths.append(save_png(img, folder / f"{stem}.png", description=desc))
        if dicom:
            settings = {**out.settings, "seed": seed, "num_images": 1}
            paths.append(write_dicom(img, folder / f"{stem}.dcm", description=desc, settings=settings, source=source))
    if heatmaps and out.prior is not None:
        from PIL import Image

        from .heatmaps import output_figures
        for name, fig in output_figures(out.prior, out.images, out.seeds).items():
            paths.append(atomic_write(folder / name, lambda tmp, fig=fig: Image.fromarray(fig).save(tmp, format="PNG")))
    text = json.dumps({"notice": NOTICE, **out.settings, "files": [*extra_files, *(p.name for p in paths)]},
                      indent=2, default=str) + "\n"
    sidecar = atomic_write(folder / "settings.json", lambda tmp: Path(tmp).write_text(text))
    return paths + [sidecar]
