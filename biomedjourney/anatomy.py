"""Lung anatomy of a prior: right / left lung fields, their zones, costophrenic angles, heart.

Radiological convention (written here once): a frontal chest film is viewed as if facing the
patient, so the PATIENT's right lung is on the IMAGE's left (low column indices) and the
patient's left on the image's right. Every side in this package is the patient's side;
`image_half(side)` is the only place that turns it into image columns.

INTERFACE SKELETON (filled in by the anatomy work): `segment()` estimates the masks with the
shipped segmentation network, falling back to an atlas with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PATIENT_RIGHT_ON_IMAGE = "left"  # frontal film: the patient's right is the image's left


def image_half(side: str, width: int) -> slice:
    """Image columns of the patient's `side` ('right' | 'left') on a frontal film."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    on_image_left = (side == "right") == (PATIENT_RIGHT_ON_IMAGE == "left")
    return slice(0, width // 2) if on_image_left else slice(width // 2, width)


@dataclass
class Anatomy:
    """Soft masks (H, W) float32 in [0, 1] in the prior's model-input frame."""
    right_lung: np.ndarray              # the patient's right lung (image left)
    left_lung: np.ndarray               # the patient's left lung (image right)
    heart: np.ndarray                   # cardiac silhouette
    source: str = "atlas"               # 'network' | 'atlas'
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.right_lung.shape

    def lung(self, side: str) -> np.ndarray:
        """'right' | 'left' | 'bilateral' / 'none' (both lungs)."""
        if side == "right":
            return self.right_lung
        if side == "left":
            return self.left_lung
        return np.maximum(self.right_lung, self.left_lung)


# Lung fields and heart of a centred frontal CXR: three ellipses (cx, cy, rx, ry) as fractions of width/height,
# drawn on the mean of the 1,337 training-split images (assets/lung_mask.png). Image-left ellipse first.
ATLAS_ELLIPSES = ((0.29, 0.43, 0.16, 0.27), (0.71, 0.43, 0.16, 0.27), (0.53, 0.64, 0.17, 0.13))


def _ellipse(shape: tuple[int, int], cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    x, y = (x + 0.5) / w, (y + 0.5) / h
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1).astype(np.float32)


def atlas_anatomy(shape: tuple[int, int], warning: str | None = None) -> Anatomy:
    """The fixed atlas (ellipses of the mean training image): the fallback when no network is available."""
    img_left, img_right, heart = (_ellipse(shape, *e) for e in ATLAS_ELLIPSES)
    right, left = (img_left, img_right) if PATIENT_RIGHT_ON_IMAGE == "left" else (img_right, img_left)
    return Anatomy(right_lung=right, left_lung=left, heart=heart, source="atlas",
                   warnings=[warning] if warning else [])
