"""Lung anatomy of a prior: right / left lung fields, their zones, costophrenic angles, heart.

Radiological convention (written here once): a frontal chest film is viewed as if facing the
patient, so the PATIENT's right lung is on the IMAGE's left (low column indices) and the
patient's left on the image's right. Every side in this package is the patient's side;
`image_half(side)` is the only place that turns it into image columns.

INTERFACE SKELETON (filled in by the anatomy work): `segment()` estimates the masks with the
shipped segmentation network, falling back to an atlas with a warning.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PATIENT_RIGHT_ON_IMAGE = "left"  # frontal film: the patient's right is the image's left


def image_half(side: str, width: int) -> slice:
    """Image columns of the patient's `side` ('right' | 'left') on a frontal film."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    on_image_left = (side == "right") == (PATIENT_RIGHT_ON_IMAGE == "left")
    return slice(0, width // 2) if on_image_left else slice(width // 2, width)


@dataclass(frozen=True)
class CardiacSize:
    """The heart's horizontal extent read from the film (`measure_cardiac`), image columns and px of the frame."""
    low: float                          # the border at low image columns (on a frontal film the patient's right)
    high: float                         # the border at high image columns
    thorax: float                       # the lungs' outer extent: the internal thoracic diameter's stand-in

    @property
    def width(self) -> float:
        """The transverse cardiac diameter (px)."""
        return self.high - self.low

    @property
    def ctr(self) -> float:
        """The cardiothoracic ratio (Danzer 1919): > 0.5 on a PA film is cardiomegaly."""
        return self.width / self.thorax

    def scaled(self, factor: float) -> "CardiacSize":
        return CardiacSize(self.low * factor, self.high * factor, self.thorax * factor)


@dataclass
class Anatomy:
    """Soft masks (H, W) float32 in [0, 1] in the prior's model-input frame."""
    right_lung: np.ndarray              # the patient's right lung (image left)
    left_lung: np.ndarray               # the patient's left lung (image right)
    heart: np.ndarray                   # cardiac silhouette (estimated from the lungs)
    source: str = "atlas"               # 'network' | 'atlas'
    warnings: list[str] = field(default_factory=list)
    cardiac: CardiacSize | None = None  # the heart's borders read from the film (None: not measured)

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

    def zone(self, side: str, zone: str) -> np.ndarray:
        """(H, W) float32 soft zone of the patient's `side` lung ('bilateral' / 'none': both lungs, each
        zoned on its own extent). Zones: see `lung_zone` ('none' = the whole lung)."""
        if side in ("right", "left"):
            return lung_zone(self.lung(side), side, zone)
        return np.maximum(lung_zone(self.right_lung, "right", zone), lung_zone(self.left_lung, "left", zone))

    def region(self, name: str, side: str = "none") -> np.ndarray:
        """'heart' -> the heart mask; any lung zone name -> `zone(side, name)`."""
        if name in ("heart", "cardiac", "cardiac silhouette"):
            return np.asarray(self.heart, np.float32)
        return self.zone(side, name)


def lowest_row(mask: np.ndarray, empty: int = -1) -> np.ndarray:
    """(W,) int: each column's lowest True row of mask (H, W) (`empty` where the column has none)."""
    h = mask.shape[0]
    return np.where(mask.any(0), h - 1 - np.argmax(mask[::-1], axis=0), empty)


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


# ==========================================================================================
# the shipped lung segmenter (trained by train/train_segmenter.py)
# ==========================================================================================
SEGMENTER_ENV = "BIOMEDJOURNEY_SEGMENTER"
SEGMENTER_CLASSES = ("background", "right_lung", "left_lung")  # the PATIENT's sides


def build_segmenter_model(arch: dict):
    """An untrained segmentation_models_pytorch model from config.json's "architecture"."""
    import segmentation_models_pytorch as smp
    if arch.get("library") != "segmentation_models_pytorch" or arch.get("class") != "Unet":
        raise ValueError(f"unsupported segmenter architecture {arch!r}")
    return smp.Unet(arch["encoder_name"], encoder_weights=None, in_channels=int(arch["in_channels"]),
                    classes=int(arch["classes"]), decoder_channels=tuple(arch["decoder_channels"]))


# ==========================================================================================
# zones
# ==========================================================================================
ZONES = ("upper", "middle", "lower", "base", "apex", "perihilar", "costophrenic angle", "none")
_ZONE_ALIASES = {"costophrenic": "costophrenic angle", "costophrenic_angle": "costophrenic angle",
                 "cp angle": "costophrenic angle", "hilar": "perihilar", "hilum": "perihilar",
                 "mid": "middle", "basal": "base", "bases": "base", "basilar": "base", "apical": "apex",
                 "apices": "apex", "whole": "none", "lung": "none", "": "none"}


def _canonical_zone(zone: str | None) -> str:
    z = (zone or "none").strip().lower().replace("-", " ")
    z = _ZONE_ALIASES.get(z, z)
    if z not in ZONES:
        raise ValueError(f"unknown zone {zone!r}; expected one of {', '.join(ZONES)}")
    return z


def _medial_is_high_cols(side: str, width: int) -> bool:
    """True when the patient's `side` lung has its medial border at its highest columns."""
    return image_half(side, width).start == 0  # a lung on the image's left has the midline to its right


def lung_zone(lung: np.ndarray, side: str, zone: str) -> np.ndarray:
    """(H, W) float32 zone of ONE lung's soft mask (the patient's `side`: 'right' | 'left').

    Measured on the lung's own extent (rows/columns of mask > 0.5), depth 0 at its top, 1 at its lowest row:
    upper / middle / lower = thirds of the height (an exact partition of the soft mask: fringe rows above
    the top count as upper, below the bottom as lower); apex = top 20%; base = lowest 25%;
    perihilar = medial-central part near the hilum (depth 0.3-0.7, the medial 45% of the lung's width);
    costophrenic angle = the lowest-lateral corner (a disc of 20% of the lung's height around the lung
    pixel that is lowest and most lateral, lower 40% only); 'none' = the whole lung.
    """
    z = _canonical_zone(zone)
    soft = np.asarray(lung, np.float32)
    core = soft > 0.5
    if z == "none" or not core.any():
        return soft.copy() if z == "none" else np.zeros_like(soft)
    h, w = soft.shape
    rows, cols = np.nonzero(core)
    top, bottom = rows.min(), rows.max()
    height = float(bottom - top + 1)
    depth = ((np.arange(h, dtype=np.float32) - top) / height)[:, None]           # (H, 1)
    lo, hi = cols.min(), cols.max()
    x = np.arange(w, dtype=np.float32)[None, :]
    medial, lateral = (hi, lo) if _medial_is_high_cols(side, w) else (lo, hi)
    lat = np.clip((x - medial) / (lateral - medial if lateral != medial else 1.0), 0, 1)  # 0 medial .. 1 lateral
    bands = {"upper": (-np.inf, 1 / 3), "middle": (1 / 3, 2 / 3), "lower": (2 / 3, np.inf),
             "apex": (-np.inf, 0.2), "base": (0.75, np.inf)}
    if z in bands:
        a, b = bands[z]
        sel = np.broadcast_to((depth >= a) & (depth < b), (h, w))
    elif z == "perihilar":
        sel = (depth >= 0.3) & (depth < 0.7) & (lat <= 0.45)
    else:  # costophrenic angle
        score = (rows - top) / height + np.clip((cols - medial) / (lateral - medial or 1.0), 0, 1)
        cy, cx = rows[np.argmax(score)], cols[np.argmax(score)]
        yy, xx = np.mgrid[0:h, 0:w]
        sel = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (0.2 * height) ** 2) & (depth >= 0.6)
    return (soft * sel).astype(np.float32)


# ==========================================================================================
# heart (estimated from the lungs)
# ==========================================================================================
def estimate_heart(right_lung: np.ndarray, left_lung: np.ndarray) -> np.ndarray:
    """(H, W) float32 soft cardiac silhouette ESTIMATED FROM THE LUNG MASKS (no network sees the heart:
    the V7 Labs masks the segmenter learned are lungs only, and they include the lung behind the heart).

    An ellipse placed by the lungs: centred 7% of the thorax width (outer lung borders) to the patient's
    left of the midline between the lungs' medial borders (lower half), at 76% of the lungs' height from
    their top, radii 23% of the thorax width and 27% of the lung height (set by eye on training-split
    radiographs: the V7 lungs reach down into the posterior recesses), and cut off below the lungs'
    lowest row. A geometric estimate, not a segmentation. Empty when a lung is empty.
    """
    r, l = np.asarray(right_lung) > 0.5, np.asarray(left_lung) > 0.5
    h, w = r.shape
    if not r.any() or not l.any():
        return np.zeros((h, w), np.float32)
    ys = np.nonzero(r | l)[0]
    top, bottom = ys.min(), ys.max()
    lung_h = float(bottom - top + 1)
    lower = np.zeros_like(r)
    lower[int(top + lung_h / 2):] = True

    def medial_border(m: np.ndarray, side: str) -> float:
        mm = m & lower if (m & lower).any() else m
        cols = np.nonzero(mm)[1]
        return float(np.percentile(cols, 98 if _medial_is_high_cols(side, w) else 2))

    def lateral_border(m: np.ndarray, side: str) -> float:
        cols = np.nonzero(m)[1]
        return float(cols.min() if _medial_is_high_cols(side, w) else cols.max())

    mid = (medial_border(r, "right") + medial_border(l, "left")) / 2
    thorax_w = abs(lateral_border(l, "left") - lateral_border(r, "right")) + 1
    toward_left = 1.0 if not _medial_is_high_cols("left", w) else -1.0  # image direction of the patient's left
    cx = mid + toward_left * 0.07 * thorax_w
    cy = top + 0.76 * lung_h
    rx, ry = 0.23 * thorax_w, 0.27 * lung_h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt(((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2)
    soft = np.clip((1.0 - d) * min(rx, ry) / 2.0 + 0.5, 0, 1)  # ~2 px soft edge
    soft[bottom + 1:] = 0
    return soft.astype(np.float32)


CARDIAC_SEARCH_PX = 16      # a heart border is looked for this far either side of the estimated heart's edge
CARDIAC_DOME_PX = 10        # rows this close to the lungs' floor are left out (the domes)
CARDIAC_MIN_ROWS = 8        # fewer measured rows: not measured
CARDIAC_CTR_RANGE = (0.3, 0.8)   # a CTR outside it: another edge was found, not measured
CARDIAC_MIN_STEP = 0.005    # mean x-gradient along a border below it: no border there (a flat film)


def _border_path(score: np.ndarray, max_step: int = 1) -> np.ndarray:
    """(R, K) per-row candidate scores -> (R,) indices of the path maximising the summed score with at most
    `max_step` candidates between neighbouring rows (dynamic programming: a border is continuous)."""
    r, k = score.shape
    total, back = score[0].copy(), np.zeros((r, k), int)
    for i in range(1, r):
        prev = np.stack([np.roll(total, d) if d else total for d in range(-max_step, max_step + 1)])  # (2s+1, K)
        for j, d in enumerate(range(-max_step, max_step + 1)):  # a roll wraps around: forbid it
            if d > 0:
                prev[j, :d] = -np.inf
            elif d < 0:
                prev[j, d:] = -np.inf
        best = prev.argmax(0)
        back[i] = np.arange(k) - (best - max_step)
        total = prev.max(0) + score[i]
    path = np.zeros(r, int)
    path[-1] = int(total.argmax())
    for i in range(r - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    return path


def measure_cardiac(image: np.ndarray, heart: np.ndarray, lungs: np.ndarray,
                    search_px: float = CARDIAC_SEARCH_PX) -> CardiacSize | None:
    """The heart's borders read from the film's brightness, near the estimated heart (`estimate_heart`).

    image (H, W) [0, 1]; heart, lungs (H, W) bool. Over the rows from 40 % of the estimated heart's height down
    to CARDIAC_DOME_PX above the lungs' floor, each border is the continuous path (`_border_path`) of the
    strongest brightness step within `search_px` (at 256 px) of the estimated edge: rising into the heart
    at low columns, falling out of it at high columns (x-gradient of a 3-px Gaussian low-pass: rib and vessel
    edges are finer and do not run down the rows). The CTR's transverse diameter adds the largest distances of
    the two borders from the midline, at whatever rows they occur (Danzer 1919): here the 10th percentile of the
    low-column border and the 90th of the high-column one. None when too few rows are measured, a border has no
    step (CARDIAC_MIN_STEP) or the ratio is implausible (the search found another edge)."""
    from scipy import ndimage
    heart, lungs = np.asarray(heart, bool), np.asarray(lungs, bool)
    rows = np.nonzero(heart.any(1))[0]
    cols = np.nonzero(lungs.any(0))[0]
    if not len(rows) or not len(cols):
        return None
    w, px = image.shape[1], image.shape[1] / 256
    gx = ndimage.sobel(ndimage.gaussian_filter(np.asarray(image, np.float32), 3 * px), axis=1)  # (H, W) d/dx
    floor = int(lowest_row(lungs).max())
    lo = int(rows[0] + 0.4 * (rows[-1] - rows[0]))
    hi = min(int(rows[-1]), floor - round(CARDIAC_DOME_PX * px))
    search = round(search_px * px)
    ys = [y for y in range(lo, hi + 1) if heart[y].sum() >= 10 * px]
    if len(ys) < CARDIAC_MIN_ROWS:
        return None
    offs = np.arange(-search, search + 1)
    borders = []
    for edge, sign in ((lambda c: c[0], 1.0), (lambda c: c[-1], -1.0)):   # rising into / falling out of the heart
        cand = np.array([np.clip(edge(np.nonzero(heart[y])[0]) + offs, 0, w - 1) for y in ys])   # (R, K) columns
        score = sign * gx[np.array(ys)[:, None], cand]                                          # (R, K)
        path = _border_path(score)
        if score[np.arange(len(ys)), path].mean() < CARDIAC_MIN_STEP:
            return None
        borders.append(cand[np.arange(len(ys)), path])
    size = CardiacSize(float(np.percentile(borders[0], 10)), float(np.percentile(borders[1], 90)),
                       float(cols[-1] - cols[0] + 1))
    return size if CARDIAC_CTR_RANGE[0] <= size.ctr <= CARDIAC_CTR_RANGE[1] else None


# ==========================================================================================
# segment(): network -> post-processing -> plausibility -> Anatomy (or the atlas)
# ==========================================================================================
FALLBACK_NOTE = "using the average anatomy."
# plausible lung share of the 256x256 model-input frame, per lung
LUNG_AREA_RANGE = (0.03, 0.45)


def segmenter_path() -> Path:
    """Where the shipped segmenter lives: $BIOMEDJOURNEY_SEGMENTER, else the copy packaged in the wheel
    (biomedjourney/_assets/segmenter), else the repository's assets/segmenter (editable install);
    FileNotFoundError naming all three when none exists (segment() then uses the average anatomy)."""
    from .resources import asset_path
    return asset_path("segmenter", SEGMENTER_ENV)


class Segmenter:
    """The lung segmenter: config.json + model.safetensors (fp16, loaded with safetensors only)."""

    def __init__(self, model, config: dict, path: Path | None = None):
        self.model, self.config, self.path = model, config, path
        self.input_size = int(config["input_size"])
        norm = config.get("normalization", {})
        self.mean, self.std = float(norm.get("mean", 0.5)), float(norm.get("std", 0.25))
        self.classes = tuple(config["classes"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Segmenter":
        from safetensors.torch import load_file
        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"no lung segmenter at {path} (needs config.json and model.safetensors); "
                                    f"set {SEGMENTER_ENV} or run train/train_segmenter.py")
        config = json.loads(cfg_file.read_text())
        model = build_segmenter_model(config["architecture"])
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
        model.load_state_dict(sd)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, config, path)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(H, W) [0, 1] model-input image -> (classes, H, W) float32 softmax, upsampled to (H, W)."""
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
        s = self.input_size
        with torch.no_grad():
            ti = F.interpolate(t, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            lo = self.model((ti - self.mean) / self.std)
            lo = F.interpolate(lo, size=t.shape[-2:], mode="bilinear", align_corners=False)
            return lo.softmax(1)[0].numpy().astype(np.float32)


_SEGMENTERS: dict[str, Segmenter] = {}


def default_segmenter() -> Segmenter:
    """The shipped segmenter, loaded once per path (raises FileNotFoundError when it is missing)."""
    path = segmenter_path().resolve()
    key = str(path)
    if key not in _SEGMENTERS:
        _SEGMENTERS[key] = Segmenter.load(path)
    return _SEGMENTERS[key]


def _clean(binary: np.ndarray) -> np.ndarray:
    """Largest component, holes filled, lightly smoothed (open/close with a small disc)."""
    from scipy import ndimage
    lab, n = ndimage.label(binary)
    if n == 0:
        return binary
    areas = ndimage.sum(binary, lab, range(1, n + 1))
    m = lab == (int(np.argmax(areas)) + 1)
    m = ndimage.binary_fill_holes(m)
    disc = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2.0
    m = ndimage.binary_closing(np.pad(m, 3), structure=disc)[3:-3, 3:-3]
    m = ndimage.binary_opening(m, structure=disc)
    lab, n = ndimage.label(m)
    if n > 1:
        areas = ndimage.sum(m, lab, range(1, n + 1))
        m = lab == (int(np.argmax(areas)) + 1)
    return ndimage.binary_fill_holes(m)


def _soft(binary: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    return np.clip(ndimage.gaussian_filter(binary.astype(np.float32), 1.0), 0, 1).astype(np.float32)


# lungs must be darker than the estimated heart by this many image standard deviations (real radiographs:
# >= 0.66 on 151 checked training/validation/nih images; uniform or smooth noise: <= 0.14)
MIN_HEART_LUNG_CONTRAST = 0.35


def plausibility_problems(right: np.ndarray, left: np.ndarray, image: np.ndarray | None = None) -> list[str]:
    """Why two binary lung masks are not believable (empty list: plausible): each lung's area, its side,
    its shape (height/width, solidity), the size ratio of the two, and - given the model-input `image` -
    that the lung fields are darker than the heart estimated from them (air vs soft tissue)."""
    h, w = right.shape
    out = [p for p in (_lung_problem("right", right, h, w), _lung_problem("left", left, h, w)) if p]
    if out:
        return out
    problem = _sides_problem(right, left) or _size_ratio_problem(right, left)
    if problem is None and image is not None:
        problem = _contrast_problem(right, left, image)
    return [problem] if problem else []


def _lung_problem(side: str, m: np.ndarray, h: int, w: int) -> str | None:
    """What is wrong with one lung mask on its own (area, side of the image, shape), or None."""
    from skimage.morphology import convex_hull_image
    frac = m.mean()
    if frac < LUNG_AREA_RANGE[0] or frac > LUNG_AREA_RANGE[1]:
        return f"{side} lung {100 * frac:.0f}% of the image"
    half = image_half(side, w)
    if abs(np.nonzero(m)[1].mean() - (half.start + half.stop) / 2) > 0.35 * w:
        return f"{side} lung not on the patient's {side} side of the image"
    rows, cols = np.nonzero(m)
    bh, bw = np.ptp(rows) + 1, np.ptp(cols) + 1
    solidity = m.sum() / max(1, convex_hull_image(m).sum())
    if not (0.9 <= bh / bw <= 5.0) or solidity < 0.6 or bh < 0.25 * h:
        return f"{side} lung has an implausible shape"
    return None


def _sides_problem(right: np.ndarray, left: np.ndarray) -> str | None:
    cr, cl = np.nonzero(right)[1].mean(), np.nonzero(left)[1].mean()
    if (cr < cl) != (image_half("right", right.shape[1]).start == 0):
        return "the lungs are on the wrong sides"
    return None


def _size_ratio_problem(right: np.ndarray, left: np.ndarray) -> str | None:
    ra, la = right.sum(), left.sum()
    if max(ra, la) > 4 * min(ra, la):
        return (f"the lungs differ in size more than 4-fold (right {100 * right.mean():.0f}%, "
                f"left {100 * left.mean():.0f}% of the image)")
    return None


def _contrast_problem(right: np.ndarray, left: np.ndarray, image: np.ndarray) -> str | None:
    """The lung fields must be darker than the heart estimated from them (air vs soft tissue)."""
    x = np.asarray(image, np.float32)
    heart = (estimate_heart(right, left) > 0.5) & ~(right | left)
    lungs = right | left
    contrast = (x[heart].mean() - x[lungs].mean()) / (x.std() + 1e-6) if heart.any() else 0.0
    if contrast < MIN_HEART_LUNG_CONTRAST:
        return f"the lung fields are not darker than the heart (contrast {contrast:.2f} SD)"
    return None


def segment(image, segmenter: Segmenter | None = None, size: int = 256) -> Anatomy:
    """Lungs (network), heart (estimated from the lungs) and its borders (read from the film, `measure_cardiac`)
    of a prior in its (size x size) model-input frame.

    `image`: anything `imaging.read_image` accepts (path, bytes, PIL, array, LoadedImage); it goes through
    `imaging.to_model_input` like every model input. `segmenter`: default the shipped one
    (`segmenter_path()`). Post-processing: largest component per lung, holes filled, light smoothing.
    When the segmenter is missing, or its lungs are implausible (area, side, shape, not darker than the
    heart), the atlas is returned with the reason in `warnings` (source 'atlas'). Raises
    `imaging.ImageLoadError` for unreadable input.
    """
    from .imaging import read_image, to_model_input
    loaded = read_image(image)
    x = to_model_input(loaded.pixels, size=256)
    if segmenter is None:
        try:
            segmenter = default_segmenter()
        except (FileNotFoundError, ImportError, OSError, ValueError, KeyError) as e:
            return atlas_anatomy((size, size), f"The lung segmenter is not available ({e}); {FALLBACK_NOTE}")
    probs = segmenter.probabilities(x)
    label = probs.argmax(0)
    idx = {c: i for i, c in enumerate(segmenter.classes)}
    right = _clean(label == idx["right_lung"])
    left = _clean(label == idx["left_lung"])
    problems = plausibility_problems(right, left, x)
    if problems:
        return atlas_anatomy((size, size), f"The lungs could not be found reliably ({'; '.join(problems)}); "
                                           f"{FALLBACK_NOTE}")
    heart = estimate_heart(right, left)
    cardiac = measure_cardiac(x, heart > 0.5, right | left)
    right_s, left_s = _soft(right), _soft(left)
    if size != 256:
        right_s, left_s, heart = (_resize_mask(m, size) for m in (right_s, left_s, heart))
        cardiac = cardiac.scaled(size / 256) if cardiac is not None else None
    return Anatomy(right_lung=right_s, left_lung=left_s, heart=heart, source="network", warnings=[], cardiac=cardiac)


def _resize_mask(m: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.clip(np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR)), 0, 1).astype(np.float32)


def binary_masks(anatomy: Anatomy) -> dict[str, np.ndarray]:
    """{'right_lung', 'left_lung', 'heart'} -> uint8 0/255 (mask > 0.5)."""
    return {k: np.where(np.asarray(getattr(anatomy, k)) > 0.5, 255, 0).astype(np.uint8)
            for k in ("right_lung", "left_lung", "heart")}


def overlay(image: np.ndarray, anatomy: Anatomy):
    """PIL RGB: the (H, W) [0, 1] prior with lung (R red-ish, L blue-ish) and heart (yellow) contours and
    the labels R / L on the sides where the patient's right / left lungs are."""
    from PIL import Image, ImageDraw
    from scipy import ndimage
    g = (np.clip(np.asarray(image, np.float32), 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], -1)
    colours = {"right_lung": (255, 64, 64), "left_lung": (64, 160, 255), "heart": (255, 220, 0)}
    for k, c in colours.items():
        m = np.asarray(getattr(anatomy, k)) > 0.5
        edge = m & ~ndimage.binary_erosion(m, iterations=1)
        edge = ndimage.binary_dilation(edge, iterations=1) if min(m.shape) >= 256 else edge
        rgb[edge] = c
    im = Image.fromarray(rgb)
    d = ImageDraw.Draw(im)
    h, w = g.shape
    for side, letter in (("right", "R"), ("left", "L")):
        m = np.asarray(anatomy.lung(side)) > 0.5
        half = image_half(side, w)
        cx = (np.nonzero(m)[1].mean() if m.any() else (half.start + half.stop) / 2)
        x = int(np.clip(cx - 4, 2, w - 12))
        d.rectangle([x - 2, 2, x + 9, 15], fill=(0, 0, 0))
        d.text((x, 3), letter, fill=colours[f"{side}_lung"])
    return im


def split_lungs_by_side(lungs: np.ndarray, min_frac: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """A binary both-lungs mask (one class, as the V7 Labs masks) -> (patient-right, patient-left) masks.

    The two largest components (each >= min_frac of the image) are the lungs, the one on the IMAGE's
    left being the patient's right (`image_half`); smaller pieces join the lung on their side of the
    midpoint between the two. A single blob is cut at the emptiest column of the central band (35-65%
    of the width). Either result may be empty (e.g. one lung only in the mask).
    """
    from scipy import ndimage
    lungs = np.asarray(lungs, bool)
    h, w = lungs.shape
    right_on_low_cols = image_half("right", w).start == 0
    lab, n = ndimage.label(lungs)
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    if n == 0:
        return np.zeros_like(lungs), np.zeros_like(lungs)
    areas = ndimage.sum(lungs, lab, range(1, n + 1))
    order = np.argsort(areas)[::-1]
    if n >= 2 and areas[order[1]] >= min_frac * h * w:
        a, b = order[0] + 1, order[1] + 1
        ca, cb = ndimage.center_of_mass(lab == a)[1], ndimage.center_of_mass(lab == b)[1]
        mid = (ca + cb) / 2
        low, high = lungs & (cols < mid), lungs & (cols >= mid)
        low[lab == (a if ca < cb else b)] = True
        high[lab == (a if ca < cb else b)] = False
        high[lab == (b if ca < cb else a)] = True
        low[lab == (b if ca < cb else a)] = False
    else:
        cs = lungs.sum(0)
        lo, hi = int(0.35 * w), int(0.65 * w)
        mid = lo + int(np.argmin(cs[lo:hi]))
        low, high = lungs & (cols < mid), lungs & (cols >= mid)
    return (low, high) if right_on_low_cols else (high, low)
