"""Journey mode: a sequence of descriptions applied one after another.

    steps = parse_journey("day 3: worsening opacities; day 10: partial resolution")
    filmstrip(frames, labels), write_gif(frames, labels, path), make_zip(paths, zip_path)

The generation loop is biomedjourney.service.run_journey (each step region-restricted like a single request).

Each step's first sample becomes the next step's prior, so errors accumulate along the way:
a long journey drifts further from anything real than a single step does.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .imaging import SYNTHETIC_DESCRIPTION, atomic_write, to_uint8, mark_synthetic

MAX_STEPS = 12          # a journey longer than this is refused (each step is a full generation)
MAX_LABEL_CHARS = 30    # "label: description": a longer prefix is part of the description
GAP = 4                 # px of black between filmstrip frames

_SPLIT = re.compile(r"[;\n]+")
_LABEL = re.compile(rf"^\s*([^:]{{1,{MAX_LABEL_CHARS}}}?)\s*:\s*(.*)$", re.S)


def parse_journey(text: str, max_steps: int = MAX_STEPS) -> list[tuple[str, str]]:
    """'day 3: worsening opacities; day 10: partial resolution' -> [('day 3', ...), ('day 10', ...)].

    Steps are separated by semicolons or new lines; each may start with a short 'label:'
    (default label 'step N'). Raises ValueError (saying what to write) on empty input, a step
    with a label but no description, or more than ``max_steps`` steps.
    """
    pieces = [p.strip() for p in _SPLIT.split(text or "") if p.strip()]
    if not pieces:
        raise ValueError("The journey is empty: write one change per line or separate them with ';', "
                         "e.g. 'day 3: worsening opacities; day 10: partial resolution'.")
    if len(pieces) > max_steps:
        raise ValueError(f"The journey has {len(pieces)} steps; at most {max_steps} are allowed "
                         "(each step is a full generation). Merge or drop some steps.")
    steps = []
    for i, piece in enumerate(pieces, 1):
        m = _LABEL.match(piece)
        label, desc = (m.group(1).strip(), m.group(2).strip()) if m else (f"step {i}", piece)
        if not desc:
            raise ValueError(f"Step {i} ('{label}') has a label but no description; write the change "
                             f"after the colon, e.g. '{label}: increasing right pleural effusion'.")
        steps.append((label or f"step {i}", desc))
    return steps


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # pragma: no cover - bitmap fallback
        return ImageFont.load_default()


def _captioned(img: np.ndarray, label: str, synthetic: bool) -> np.ndarray:
    """(H, W) [0, 1] -> (H + bar, W) uint8 with ``label`` in a black bar below, SYNTHETIC burned in."""
    a = to_uint8(mark_synthetic(img) if synthetic else img)                   # (H, W)
    h, w = a.shape
    px = max(10, round(w / 16))
    bar = px + px // 2 + 4
    out = Image.new("L", (w, h + bar), 0)
    out.paste(Image.fromarray(a), (0, 0))
    draw, font = ImageDraw.Draw(out), _font(px)
    text = label
    while text and draw.textlength(text, font=font) > w - 4:  # shorten to fit the frame
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((2, h + 2), text, fill=255, font=font)
    return np.asarray(out)


def _frames(images: Sequence[np.ndarray], labels: Sequence[str],
            synthetic: Sequence[bool] | None) -> list[np.ndarray]:
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; give one label per image")
    if not images:
        raise ValueError("no images to show")
    synthetic = [True] * len(images) if synthetic is None else list(synthetic)
    if len(synthetic) != len(images):
        raise ValueError(f"{len(images)} images but {len(synthetic)} synthetic flags")
    shapes = {np.shape(i) for i in images}
    if len(shapes) != 1:
        raise ValueError(f"all frames must have the same shape, got {sorted(shapes)}")
    return [_captioned(i, lab, s) for i, lab, s in zip(images, labels, synthetic)]


def filmstrip(images: Sequence[np.ndarray], labels: Sequence[str],
              synthetic: Sequence[bool] | None = None) -> np.ndarray:
    """Frames side by side with their labels below: (H + bar, N·W + (N−1)·GAP) uint8.

    Every frame is marked SYNTHETIC (imaging.mark_synthetic) unless ``synthetic[i]`` is False
    (the app passes False for the uploaded prior, which is not generated, and labels it so).
    """
    frames = _frames(images, labels, synthetic)
    h, w = frames[0].shape
    strip = np.zeros((h, len(frames) * w + (len(frames) - 1) * GAP), np.uint8)
    for i, f in enumerate(frames):
        strip[:, i * (w + GAP):i * (w + GAP) + w] = f
    return strip


def write_gif(images: Sequence[np.ndarray], labels: Sequence[str], path: str | os.PathLike,
              duration_ms: int = 800, synthetic: Sequence[bool] | None = None) -> Path:
    """An animated GIF (looping) of the labelled frames, atomically; the GIF comment says SYNTHETIC."""
    if duration_ms <= 0:
        raise ValueError(f"duration_ms must be positive, got {duration_ms}")
    frames = [Image.fromarray(f) for f in _frames(images, labels, synthetic)]
    return atomic_write(path, lambda tmp: frames[0].save(
        tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(duration_ms), loop=0,
        comment=SYNTHETIC_DESCRIPTION.encode()))


def make_zip(paths: Sequence[str | os.PathLike], zip_path: str | os.PathLike) -> Path:
    """A zip of ``paths``, each stored under its path relative to their common folder, atomically."""
    paths = [Path(p) for p in paths]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot zip missing files: {', '.join(missing)}")
    if not paths:
        raise ValueError("make_zip needs at least one file")
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for p in paths:
                z.write(p, arcname=p.resolve().relative_to(root).as_posix())
    return atomic_write(zip_path, write)


__all__ = ["parse_journey", "filmstrip", "write_gif", "make_zip", "MAX_STEPS"]
