"""Where an edit may happen: the soft edit mask of a list of findings on a prior's anatomy.

Each finding gets its own radiological shape (effusion: the dependent base up to a meniscus;
edema: bat-wing + bases; pneumothorax: a rim along the chest wall; ...), built from the
prior's lung and heart masks (`Anatomy`) and feathered with a Gaussian. The edit mask is their
union. The region-restricted sampler (blended latent diffusion) changes the image only inside
it; `render.render_findings` draws the finding's density inside the same regions.

Also the one home of the fixed lung-and-heart evaluation mask (`LUNG_HEART`, `lung_mask`,
`inside_fraction`), and `check_user_mask` for a mask painted by the user.

Every side is the PATIENT's side; `anatomy.image_half` / the lung masks place it on the image
(patient's right = image left on a frontal film).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .anatomy import ATLAS_ELLIPSES, Anatomy, image_half, lowest_row
from .findings.schema import Finding

# ------------------------------------------------------------------------- evaluation mask
# Lung fields and heart of a centred frontal CXR (the atlas ellipses, cx, cy, rx, ry as fractions of
# width/height, drawn on the mean of the 1,337 training-split images; assets/lung_mask.png). They cover
# 32% of the image: the chance level of "change inside".
LUNG_HEART = ATLAS_ELLIPSES


@functools.lru_cache(maxsize=8)
def lung_mask(shape: tuple[int, int], ellipses=LUNG_HEART) -> np.ndarray:
    """Boolean (H, W) mask of the lung fields and the heart (built once per shape; read-only)."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    x, y = (x + 0.5) / w, (y + 0.5) / h
    m = np.zeros(shape, bool)
    for cx, cy, rx, ry in ellipses:
        m |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
    m.setflags(write=False)
    return m


def inside_fraction(diff: np.ndarray, ellipses=LUNG_HEART) -> float:
    """Share of the absolute change that falls inside the lung-and-heart mask."""
    a = np.abs(diff)
    return float(a[lung_mask(tuple(a.shape), ellipses)].sum() / max(a.sum(), 1e-12))


# ------------------------------------------------------------------------- painted masks
EMPTY_MASK_ERROR = ("The painted edit mask is empty: paint the region that should change, "
                    "or clear the mask to use the automatic one.")
FULL_MASK_WARNING = ("The painted edit mask covers {share:.0%} of the film: the whole film will be "
                     "regenerated, not only the region of the finding.")
FULL_MASK_SHARE = 0.9


def check_user_mask(mask: np.ndarray | None) -> list[str]:
    """Plain messages about a painted (H, W) mask in [0, 1] ([] when fine); an empty one starts with 'The painted'.

    Empty (nothing above 0.5) -> EMPTY_MASK_ERROR (an error: the caller should refuse it);
    > 90% of the film -> FULL_MASK_WARNING (a warning: the edit is no longer regional)."""
    if mask is None:
        return []
    m = np.asarray(mask, np.float32)
    if m.ndim != 2:
        return [f"The painted edit mask must be a single-channel image, got shape {m.shape}."]
    share = float((m > 0.5).mean())
    if share == 0.0:
        return [EMPTY_MASK_ERROR]
    if share > FULL_MASK_SHARE:
        return [FULL_MASK_WARNING.format(share=share)]
    return []


# ------------------------------------------------------------------------- lung geometry
@dataclass(frozen=True)
class LungFrame:
    """One lung's extent on the image: rows top..bottom, columns medial..lateral (image columns)."""
    core: np.ndarray      # (H, W) bool, the lung mask > 0.5
    top: int
    bottom: int
    medial: int           # the column nearest the midline
    lateral: int          # the column nearest the chest wall

    @property
    def height(self) -> int:
        return max(self.bottom - self.top, 1)

    @property
    def lateral_sign(self) -> int:
        """+1 when the chest wall is at higher column indices (the image-right lung)."""
        return 1 if self.lateral > self.medial else -1

    def lateralness(self) -> np.ndarray:
        """(W,) 0 at the medial edge, 1 at the lateral edge (clipped outside)."""
        x = np.arange(self.core.shape[1], dtype=np.float32)
        return np.clip((x - self.medial) / (self.lateral - self.medial + 1e-6), 0, 1)

    def lateral_edge(self) -> np.ndarray:
        """(H,) float32: the lung's outermost column in each row (the inner chest wall); rows without lung take the
        nearest row's (above the apex the apex's, below the lowest row the lowest row's)."""
        has = self.core.any(1)
        x = np.arange(self.core.shape[1])
        per_row = np.where(self.core, x, -1).max(1) if self.lateral_sign > 0 else np.where(self.core, x, x.size).min(1)
        rows = np.nonzero(has)[0]
        return np.interp(np.arange(self.core.shape[0]), rows, per_row[rows]).astype(np.float32)

    def depth(self) -> np.ndarray:
        """(H,) 0 at the apex, 1 at the lowest row of the lung (< 0 above it, > 1 below)."""
        y = np.arange(self.core.shape[0], dtype=np.float32)
        return (y - self.top) / self.height


def lung_frame(anatomy: Anatomy, side: str) -> LungFrame | None:
    """The frame of the patient's 'right' | 'left' lung, None when its mask is empty."""
    core = np.asarray(anatomy.lung(side)) > 0.5
    if not core.any():
        return None
    rows, cols = np.nonzero(core)
    mid = core.shape[1] / 2
    lo, hi = int(cols.min()), int(cols.max())
    medial, lateral = (hi, lo) if cols.mean() < mid else (lo, hi)
    return LungFrame(core, int(rows.min()), int(rows.max()), medial, lateral)


def sides_of(finding_side: str) -> list[str]:
    """A finding's side -> the lungs it involves (no side or bilateral: both)."""
    return [finding_side] if finding_side in ("right", "left") else ["right", "left"]


def scale_px(shape: tuple[int, int]) -> float:
    """Pixels per pixel-at-256: sizes below are written for a 256 px image."""
    return min(shape) / 256.0


# ------------------------------------------------------------------------- zones
def zone_mask(anatomy: Anatomy, side: str, zone: str) -> np.ndarray:
    """(H, W) float32 zone of the patient's `side` (both lungs for bilateral / none), `Anatomy.zone`:
    upper/middle/lower = thirds of that lung's height, base = lowest 25%, apex = top 20%,
    costophrenic angle = lowest-lateral corner, perihilar = medial-central; 'none' = the whole lung."""
    return np.asarray(anatomy.zone(side, zone), np.float32)


# ------------------------------------------------------------------------- helpers
SEVERITY_DEFAULT = "moderate"


def severity_of(f: Finding) -> str:
    """mild / moderate / severe ('none' counts as moderate)."""
    return f.severity if f.severity != "none" else SEVERITY_DEFAULT


def _dilate(core: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by a disk of `radius` px (distance transform)."""
    if radius <= 0:
        return core.astype(bool)
    return ndimage.distance_transform_edt(~core.astype(bool)) <= radius


def feather_mask(hard: np.ndarray, sigma: float) -> np.ndarray:
    """Soft border: dilate by ~sigma so the region itself stays ~1, then Gaussian blur (truncated at 3 sigma)."""
    if sigma <= 0:
        return hard.astype(np.float32)
    grown = _dilate(hard > 0.5, sigma)
    return np.clip(ndimage.gaussian_filter(grown.astype(np.float32), sigma, truncate=3.0), 0, 1)


# ------------------------------------------------------------------------- shapes per finding
# Damoiseau's (Ellis-Damoiseau) line: free pleural fluid in an erect patient fills the costophrenic
# angle first and climbs the lateral chest wall (meniscus, concave upwards); ~200 ml blunt the
# lateral angle, a moderate effusion fills the lower third, a large one half the hemithorax
# (Felson's Principles of Chest Roentgenology, 4th ed., ch. "The pleura"; Fleischner glossary,
# Hansell et al., Radiology 2008;246:697).
EFFUSION_MARGIN = 8.0   # px at 256: the pleural space beyond the lung mask (hemidiaphragm, mediastinum)
EFFUSION_WALL = 3.0     # px at 256: how far the fluid reaches beyond the lung's lateral edge of its row: it lies inside
#                         the ribs, the chest wall and the abdominal wall below the costophrenic angle stay as they were
EFFUSION_BELOW = 0.2    # of the lung's height: how far below the lung mask's lowest row the pleural space may reach
# (medial height, lateral rise) of the fluid as fractions of the lung's height. The lung masks (V7) include the
# lung behind the hemidiaphragm dome, already as dense as fluid there, so the heights count from the mask's lowest
# row: "moderate" reaches about the visible lower third. The rise is the meniscus: fluid climbs the lateral chest wall
# well above its medial level (a mild one is mostly a blunted lateral angle), steepest at the wall (lateralness^2.5).
EFFUSION_HEIGHT = {"mild": (0.06, 0.22), "moderate": (0.24, 0.30), "severe": (0.38, 0.22)}
MENISCUS_POWER = 2.5


def effusion_depth(anatomy: Anatomy, side: str, severity: str) -> np.ndarray:
    """(H, W) float32: px below the meniscus (<= 0 above it or outside) in the pleural space of that
    hemithorax: the lung grown by EFFUSION_MARGIN, and its lower part widened to the lung's columns and
    extended down past the hemidiaphragm (a lung mask often stops short of the diaphragm), in that side's
    image half, never more than EFFUSION_WALL beyond the lung's lateral edge of the row (inside the ribs).
    Where the film is already as dense as fluid (heart, liver) the rendering changes nothing."""
    f = lung_frame(anatomy, side)
    h, w = anatomy.shape
    if f is None:
        return np.full((h, w), -1.0, np.float32)
    base, rise = EFFUSION_HEIGHT[severity]
    edge = f.bottom - f.height * (base + rise * f.lateralness() ** MENISCUS_POWER)   # (W,) meniscus row
    rows, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w)
    lo, hi = sorted((f.medial, f.lateral))
    half = np.zeros(w, bool)
    half[image_half(side, w)] = True
    cols = half & (x >= lo - 4 * scale_px((h, w))) & (x <= hi + 4 * scale_px((h, w)))   # (W,)
    lower = cols[None, :] & (rows >= f.bottom - 0.5 * f.height) & (rows <= f.bottom + EFFUSION_BELOW * f.height)
    beyond_wall = (x[None, :] - f.lateral_edge()[:, None]) * f.lateral_sign                   # (H, W) px
    region = ((_dilate(f.core, EFFUSION_MARGIN * scale_px((h, w))) | lower) & half[None, :]
              & (beyond_wall <= EFFUSION_WALL * scale_px((h, w))))
    return np.where(region, rows - edge[None, :], -1.0).astype(np.float32)


def _effusion(f: Finding, a: Anatomy) -> np.ndarray:
    sev = "mild" if f.zone == "costophrenic angle" and f.severity == "none" else severity_of(f)
    return np.maximum.reduce([effusion_depth(a, s, sev) > 0 for s in sides_of(f.side)])


# Cardiogenic edema: bilateral perihilar ("bat-wing") air-space opacity with basal interstitial
# lines, sparing the periphery (Gluecker et al., RadioGraphics 1999;19:1507; Fleischner glossary).
def edema_weight(anatomy: Anatomy, side: str, severity: str) -> np.ndarray:
    """(H, W) float32 in [0, 1]: perihilar haze fading to the periphery, plus the lung base."""
    f = lung_frame(anatomy, side)
    if f is None:
        return np.zeros(anatomy.shape, np.float32)
    grow = {"mild": 0.85, "moderate": 1.0, "severe": 1.3}[severity]
    h, w = anatomy.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    hx = f.medial + 0.1 * (f.lateral - f.medial)                          # the hilum: medial, mid-height
    hy = f.top + 0.5 * f.height
    rx, ry = 0.5 * grow * abs(f.lateral - f.medial), 0.24 * grow * f.height
    hilar = np.exp(-0.5 * (((x - hx) / rx) ** 2 + ((y - hy) / ry) ** 2))
    basal = np.clip((f.depth()[:, None] - 0.75) / 0.2, 0, 1) * 0.8
    soft_core = ndimage.gaussian_filter(f.core.astype(np.float32), 5 * scale_px(anatomy.shape)) * f.core
    return (np.maximum(hilar, basal) * soft_core).astype(np.float32)   # fading at the lung's edge


def _edema(f: Finding, a: Anatomy) -> np.ndarray:
    sev = severity_of(f)
    return np.maximum.reduce([edema_weight(a, s, sev) > 0.4 for s in sides_of(f.side)])


# Air-space opacity / consolidation fills the named lobe or zone (Fleischner glossary: "consolidation");
# without a zone, the lower two thirds (pneumonia is most often basal; Felson).
# Going away ("resolved", "decreased") with no place named: it may have been anywhere, so the whole lung(s).
def airspace_region(f: Finding, a: Anatomy) -> np.ndarray:
    if f.zone != "none":
        return zone_mask(a, f.side, f.zone) > 0.5
    if f.receding:
        return zone_mask(a, f.side, "none") > 0.5
    return np.maximum(zone_mask(a, f.side, "middle"), zone_mask(a, f.side, "lower")) > 0.5


# Plate-like (discoid) atelectasis: a horizontal or slightly oblique linear band 1-3 mm to a few cm
# thick, usually at the bases (Fleischner glossary: "atelectasis, linear"; Felson).
ATELECTASIS_THICKNESS = {"mild": 4.0, "moderate": 6.0, "severe": 10.0}  # px at 256


def atelectasis_band(anatomy: Anatomy, side: str, zone: str, severity: str) -> np.ndarray:
    """(H, W) float32: signed px distance from the band's centre line (|d| < thickness/2 is the band) or inf."""
    f = lung_frame(anatomy, side)
    if f is None:
        return np.full(anatomy.shape, np.inf, np.float32)
    rows_in = np.nonzero((zone_mask(anatomy, side, zone) > 0.5).any(1))[0] if zone != "none" else []
    yc = float(np.mean(rows_in)) if len(rows_in) else f.top + 0.7 * f.height   # no zone: top of the lower zone
    centre = yc - 0.06 * f.height * (f.lateralness() - 0.5)              # (W,) rising a little laterally
    rows = np.arange(anatomy.shape[0], dtype=np.float32)[:, None]
    inside = f.core & ((f.lateralness() > 0.08) & (f.lateralness() < 0.92))[None, :]
    return np.where(inside, rows - centre[None, :], np.inf).astype(np.float32)


# Lobar collapse (a named lobe: zone upper / middle / lower): the airless lobe is a wedge of soft-tissue density with
# its apex at the hilum and a sharp border along the displaced fissure, plus signs of volume loss. Lower lobe: a
# triangle in the medial base (behind the heart on the left), the medial hemidiaphragm obscured and the hemidiaphragm
# raised; upper lobe: a wedge along the upper mediastinum under an elevated fissure; middle lobe / lingula: a triangle
# on the lower heart border, apex lateral (Proto & Tocino, Semin Roentgenol 1980;15:117; Felson ch. "Lobar collapse").
LOBAR_ZONES = ("upper", "middle", "lower")
COLLAPSE_WIDTH = {"mild": 0.45, "moderate": 0.55, "severe": 0.65}     # wedge base, share of the lung's width
DIAPHRAGM_LIFT = {"mild": 0.04, "moderate": 0.07, "severe": 0.10}     # of the lung's height (lower lobe)


def is_lobar(f: Finding) -> bool:
    """Atelectasis of a named lobe (zone upper / middle / lower) is drawn as lobar collapse, else plate-like."""
    return f.name == "atelectasis" and f.zone in LOBAR_ZONES


def collapse_wedge(anatomy: Anatomy, side: str, zone: str, severity: str) -> np.ndarray:
    """(H, W) float32: signed px inside the collapsed lobe's fissure border (> 0 inside; the border is where it is
    0), within that side's lung (a lower / middle lobe: the lung grown 4 px, to reach the mediastinum); -inf outside."""
    f = lung_frame(anatomy, side)
    h, w = anatomy.shape
    if f is None or zone not in LOBAR_ZONES:
        return np.full((h, w), -np.inf, np.float32)
    px = scale_px((h, w))
    span = float(f.lateral - f.medial)                                      # signed: toward the chest wall
    hy = f.top + 0.5 * f.height                                             # the hilum's row
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    lat = (x - f.medial) / span * abs(span)                                 # px from the medial edge, toward the wall
    b = COLLAPSE_WIDTH[severity] * abs(span)
    if zone == "middle":                    # middle lobe / lingula: base on the heart border, apex lateral, below
        yc = f.top + 0.68 * f.height        # the hilum (the heart border's silhouette is lost)
        reach = 0.85 * b * (1 - np.abs(y - yc) / (0.16 * f.height))
    else:                                                                   # apex at the hilum, base at apex / base
        far = f.bottom if zone == "lower" else f.top
        t = np.clip((y - hy) / (far - hy), 0, 1)
        if zone == "upper":                 # the collapsed upper lobe lies against the apex and upper mediastinum:
            t, b = np.sqrt(t), min(b + 0.3 * abs(span), abs(span))          # wide at the apex, the raised fissure
        reach = 0.12 * abs(span) + t * (b - 0.12 * abs(span))               # sloping up and out from the hilum
        reach = np.where((y - hy) * (far - hy) >= 0, reach, -np.inf)
    lung = f.core if zone == "upper" else _dilate(f.core, 4 * px)           # lower / middle: up to the mediastinum
    half = np.zeros((h, w), bool)
    half[:, image_half(side, w)] = True
    lung &= half
    return np.where(lung, reach - lat, -np.inf).astype(np.float32)


def diaphragm_lift(anatomy: Anatomy, side: str, severity: str) -> np.ndarray:
    """(H, W) float32 px: how far up the content of each pixel comes from (a raised hemidiaphragm after lower lobe
    collapse): largest at the lung's base, zero at the hilum and 30% of the lung's height below the base."""
    f = lung_frame(anatomy, side)
    h, w = anatomy.shape
    if f is None:
        return np.zeros((h, w), np.float32)
    lift = DIAPHRAGM_LIFT[severity] * f.height
    y = np.arange(h, dtype=np.float32)
    hy, low = f.top + 0.5 * f.height, f.bottom + 0.3 * f.height
    v = np.where(y <= f.bottom, smoothstep((y - hy) / (f.bottom - hy)),          # (H,) up to the base, then down
                 1 - smoothstep((y - f.bottom) / (low - f.bottom)))
    lo, hi = sorted((f.medial, f.lateral))
    x, ramp = np.arange(w, dtype=np.float32), 10 * scale_px((h, w))
    cols = smoothstep((x - lo) / ramp) * smoothstep((hi - x) / ramp)        # (W,) the lung's columns, soft ends
    return (lift * v[:, None] * cols[None, :]).astype(np.float32)


def _atelectasis(f: Finding, a: Anatomy) -> np.ndarray:
    sev = severity_of(f)
    if f.receding and f.zone == "none":
        return zone_mask(a, f.side, "none") > 0.5
    if is_lobar(f):
        parts = [collapse_wedge(a, s, f.zone, sev) > -2 * scale_px(a.shape) for s in sides_of(f.side)]
        if f.zone == "lower":
            parts += [_dilate(diaphragm_lift(a, s, sev) > 0.3, 2 * scale_px(a.shape)) for s in sides_of(f.side)]
        return np.maximum.reduce(parts)
    t = ATELECTASIS_THICKNESS[sev] * scale_px(a.shape)
    return np.maximum.reduce([np.abs(atelectasis_band(a, s, f.zone, sev)) <= t / 2 + 1 for s in sides_of(f.side)])


# Cardiomegaly: cardiothoracic ratio > 0.5 on a PA film; the silhouette widens, mostly to the left
# (left ventricle), displacing the adjacent lung (Felson ch. "The heart"; Danzer 1919 CTR).
# With the heart's borders read from the film (`Anatomy.cardiac`), the cardiothoracic ratio changes by CTR_STEP of
# the thorax's width (a decreasing heart not below CTR_FLOOR). The steps are this project's choice, not a
# published grading; larger ones tear the lung beside the border and the domes under the warp.
CTR_STEP = {"mild": 0.05, "moderate": 0.08, "severe": 0.12}
CTR_FLOOR = 0.45
# Without measured borders: the estimated heart (`anatomy.estimate_heart`) widened by this share of its width.
CTR_INCREASE = {"mild": 0.10, "moderate": 0.15, "severe": 0.20}
COMPRESSION = 0.4   # the lung beside the new border is squeezed by at most this share (the fade-out's slope)


def cardiac_widening(anatomy: Anatomy, severity: str, sign: float = 1.0) -> tuple[float, float, float, float]:
    """(centre column, low-side half-width, high-side half-width, total widening px; < 0 narrows) of the heart
    for `severity` (sign -1: decreasing): from the measured borders when known, else from the estimated heart."""
    cs = anatomy.cardiac
    if cs is not None:
        change = CTR_STEP[severity] if sign > 0 else -min(CTR_STEP[severity], max(cs.ctr - CTR_FLOOR, 0.0))
        cx = (cs.low + cs.high) / 2
        return cx, cx - cs.low, cs.high - cx, change * cs.thorax
    cols = np.nonzero(np.asarray(anatomy.heart) > 0.5)[1]
    cx = float(cols.mean())
    return cx, cx - cols.min(), cols.max() - cx, CTR_INCREASE[severity] * (cols.max() - cols.min()) * sign


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Hermite 3t^2 - 2t^3 of t clipped to [0, 1]: a soft 0 -> 1 ramp (masks, drawings)."""
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def cardiac_displacement(anatomy: Anatomy, severity: str, sign: float = 1.0) -> np.ndarray:
    """(H, W) float32: how far (px, signed, image columns) the output pixel's content came from, for the heart
    widened as `cardiac_widening` says (sign -1: narrowed, for 'decreased'). Each border moves by its share of
    the widening (the patient's left, the left ventricle, 65 %), fully from the border's widest column to where
    it lands, fading inside towards the centre and outside over the lung beside it (squeezed by at most
    COMPRESSION). Zero far from the heart."""
    heart = np.asarray(anatomy.heart) > 0.5
    h, w = anatomy.shape
    if not heart.any():
        return np.zeros((h, w), np.float32)
    rows = np.nonzero(heart.any(1))[0]
    top, bottom = rows.min(), rows.max()
    cx, r_low, r_high, total = cardiac_widening(anatomy, severity, sign)
    u = np.arange(w, dtype=np.float32) - cx
    left_on_high = image_half("left", w).start > 0                        # the patient's left: the LV side
    dx = np.zeros(w, np.float32)
    for high, r in ((True, r_high), (False, r_low)):
        move = (0.65 if high == left_on_high else 0.35) * total
        ramp_out = max(0.6 * r, abs(move) / COMPRESSION)
        s = u if high else -u
        new_border = r + max(move, 0.0)                                   # a widening border lands here
        phi = smoothstep((s - 0.35 * r) / (0.65 * r)) * (1 - smoothstep((s - new_border) / ramp_out))
        dx += np.where(s > 0, phi * move * (1 if high else -1), 0)
    y = np.arange(h, dtype=np.float32)
    hh = max(bottom - top, 1)
    v = smoothstep((y - (top - 0.35 * hh)) / (0.35 * hh)) * (1 - smoothstep((y - bottom) / (0.3 * hh)))
    return (v[:, None] * dx[None, :]).astype(np.float32)


def _cardiomegaly(f: Finding, a: Anatomy) -> np.ndarray:
    sign = -1.0 if f.receding else 1.0
    d = np.abs(cardiac_displacement(a, severity_of(f), sign))
    return _dilate(d > 0.2, 3 * scale_px(a.shape)) | (np.asarray(a.heart) > 0.5)


# Pneumothorax: in an erect patient air collects apically and laterally; a thin visceral pleural line
# with no lung markings beyond it (Fleischner glossary: "pneumothorax"; BTS 2010 rim size at the hilum).
PNEUMOTHORAX_RIM = {"mild": 0.12, "moderate": 0.22, "severe": 0.38}     # of the lung's width, at the apex


def pneumothorax_distance(anatomy: Anatomy, side: str) -> tuple[np.ndarray, LungFrame | None]:
    """((H, W) px from the apical/lateral chest wall inside the lung (inf outside), the lung's frame).
    Not from the hemidiaphragm: on an upright film the air collects at the apex and along the lateral wall.
    The lung outline is smoothed first (sigma 8 px at 256) so the pleural line runs smoothly, not along the ribs."""
    f = lung_frame(anatomy, side)
    if f is None:
        return np.full(anatomy.shape, np.inf, np.float32), None
    smooth = ndimage.gaussian_filter(f.core.astype(np.float32), 8 * scale_px(anatomy.shape)) > 0.5
    f = LungFrame(smooth & f.core if (smooth & f.core).any() else f.core, f.top, f.bottom, f.medial, f.lateral)
    h, w = anatomy.shape
    y, x = np.mgrid[0:h, 0:w]
    lateral_of = (x - (f.medial + f.lateral) / 2) * f.lateral_sign > 0
    above = (y < f.top + 0.35 * f.height) & ((x - (2 * f.medial + f.lateral) / 3) * f.lateral_sign > 0)
    below = np.maximum.accumulate(f.core, axis=0) & ~f.core                # under the lung: the hemidiaphragm
    wall = ~f.core & ~below & (lateral_of | above)                        # chest wall: lateral of / above the lung
    d = ndimage.distance_transform_edt(~wall).astype(np.float32)
    return np.where(f.core, d, np.inf).astype(np.float32), f


def pneumothorax_width(f: LungFrame, severity: str) -> np.ndarray:
    """(H, 1) px: the rim's width per row, widest at the apex, tapering to a third at the base."""
    width = PNEUMOTHORAX_RIM[severity] * abs(f.lateral - f.medial)
    return (width * (1 - 0.65 * np.clip(f.depth(), 0, 1)))[:, None].astype(np.float32)


def _pneumothorax(f: Finding, a: Anatomy) -> np.ndarray:
    parts = []
    for s in sides_of(f.side):
        d, fr = pneumothorax_distance(a, s)
        if fr is not None:
            parts.append(d <= pneumothorax_width(fr, severity_of(f)) + 2 * scale_px(a.shape))
    return np.maximum.reduce(parts) if parts else np.zeros(a.shape, bool)


# Nodule: a rounded opacity <= 3 cm; mass: > 3 cm (Fleischner glossary). At 256 px 1 cm ~ 7 px.
BLOB_RADIUS = {("nodule", "mild"): 5.0, ("nodule", "moderate"): 7.0, ("nodule", "severe"): 10.0,
               ("mass", "mild"): 13.0, ("mass", "moderate"): 17.0, ("mass", "severe"): 22.0}  # px at 256


def blob_centre(f: Finding, a: Anatomy) -> tuple[float, float] | None:
    """(row, col): the centroid of the named zone (middle zone when none) of the named lung (right when none)."""
    side = f.side if f.side in ("right", "left") else "right"
    z = zone_mask(a, side, "middle" if f.zone == "none" else f.zone) > 0.5
    if not z.any():
        return None
    r, c = np.nonzero(z)
    return float(r.mean()), float(c.mean())


def blob_radius(f: Finding, a: Anatomy) -> float:
    return BLOB_RADIUS[(f.name, severity_of(f))] * scale_px(a.shape)


def _blob(f: Finding, a: Anatomy) -> np.ndarray:
    c = blob_centre(f, a)
    if c is None:
        return np.zeros(a.shape, bool)
    y, x = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return np.hypot(y - c[0], x - c[1]) <= 1.35 * blob_radius(f, a) + 2


def _lung_zone(f: Finding, a: Anatomy) -> np.ndarray:
    """Findings without a shape of their own: the named zone of the named lung(s)."""
    return zone_mask(a, f.side, f.zone) > 0.5


SHAPES = {"pleural effusion": _effusion, "pulmonary edema": _edema, "consolidation": airspace_region,
          "opacity": airspace_region, "pneumonia": airspace_region, "atelectasis": _atelectasis,
          "cardiomegaly": _cardiomegaly, "pneumothorax": _pneumothorax, "nodule": _blob, "mass": _blob}
SHAPE_NOTES = {"pleural effusion": "dependent base and costophrenic angle up to a meniscus rising laterally",
               "pulmonary edema": "perihilar (bat-wing) and basal regions of both lungs",
               "consolidation": "the named zone (without one: the lower two thirds; going away: the whole lung)",
               "opacity": "the named zone (without one: the lower two thirds; going away: the whole lung)",
               "pneumonia": "the named zone (without one: the lower two thirds; going away: the whole lung)",
               "atelectasis": "a named lobe: its collapsed wedge (apex at the hilum) and, for a lower lobe, the raised "
                              "hemidiaphragm; otherwise a plate-like band in the named zone (top of the lower zone)",
               "cardiomegaly": "the heart and its borders, widened",
               "pneumothorax": "a rim along the apical and lateral chest wall",
               "nodule": "a round region in the named zone", "mass": "a round region in the named zone"}


# ------------------------------------------------------------------------- the edit mask
@dataclass
class EditMask:
    """The union edit mask and each finding's own."""
    mask: np.ndarray                                            # (H, W) float32 in [0, 1], soft border
    per_finding: list[tuple[Finding, np.ndarray]] = field(default_factory=list)  # each (H, W) float32
    notes: list[str] = field(default_factory=list)


def _where(f: Finding) -> str:
    parts = [v for v in (f.side, f.zone, f.severity) if v != "none"]
    return f"{f.name} ({', '.join(parts + [f.change])})"


def finding_mask(f: Finding, anatomy: Anatomy, feather: float = 3.0) -> tuple[np.ndarray, str]:
    """(H, W) float32 soft region of one finding and a note saying what it is."""
    if f.change == "unchanged":
        return np.zeros(anatomy.shape, np.float32), f"{_where(f)}: unchanged, nothing to edit"
    shape = SHAPES.get(f.name, _lung_zone)
    hard = np.asarray(shape(f, anatomy), bool)
    what = SHAPE_NOTES.get(f.name, "the named zone of the lung(s) (no shape of its own)")
    if f.receding:
        what += ", where the finding would be"
    if not hard.any():
        return np.zeros(anatomy.shape, np.float32), f"{_where(f)}: no region (empty lung/heart mask)"
    return feather_mask(hard, feather * scale_px(anatomy.shape)), f"{_where(f)}: {what}"


def edit_mask(findings: list[Finding], anatomy: Anatomy, *, feather: float = 3.0) -> EditMask:
    """The union of each finding's soft region (feather: Gaussian sigma in px at 256)."""
    out = EditMask(mask=np.zeros(anatomy.shape, np.float32))
    for f in findings:
        m, note = finding_mask(f, anatomy, feather)
        out.per_finding.append((f, m))
        out.notes.append(note)
        out.mask = np.maximum(out.mask, m)
    if anatomy.source != "network":
        out.notes.append(f"regions drawn on the {anatomy.source} lung masks")
    return out


# Outside the lung fields a drawn finding's region is only where its drawing changed the film: the pleural space
# below the dome, the heart and the chest wall are in a finding's region so that the drawing may reach them, but
# where it did not (the liver under a drawn effusion already as dense as fluid) there is nothing for the model to
# harmonise, and it darkened the liver there (blended latent diffusion edits exactly where the mask says; Avrahami
# et al. 2023, arXiv:2206.02779). Inside the lungs the region stays whole: a removal changes what it finds there.
DRAWN_AT = 0.01       # a drawing changed a pixel by more than this (0-1 intensity)
DRAWN_MARGIN = 6.0    # px at 256 kept around what the drawing changed (under one 8-px latent cell)
LUNG_MARGIN = 2.0     # px at 256 kept around the lung fields


def confine_to_drawing(mask: np.ndarray, change: np.ndarray, anatomy: Anatomy, free: np.ndarray | None = None
                       ) -> np.ndarray:
    """(H, W) float32: `mask` kept inside the lung fields and where `change` (H, W, the drawings' largest |change|)
    exceeds DRAWN_AT, each grown by its margin and feathered; `free` (the region of findings nobody drew) is kept
    whole."""
    px = scale_px(anatomy.shape)
    lungs = _dilate(np.asarray(anatomy.lung("bilateral")) > 0.5, LUNG_MARGIN * px)
    drawn = _dilate(np.asarray(change) > DRAWN_AT, DRAWN_MARGIN * px)
    keep = np.maximum(feather_mask(lungs | drawn, 3 * px), lungs | drawn)              # 1 on both, soft beyond
    out = (np.asarray(mask, np.float32) * keep).astype(np.float32)
    return out if free is None else np.maximum(out, np.asarray(free, np.float32))


# ------------------------------------------------------------------------- for the app: show and paint
MASK_COLOUR = (255, 140, 0)   # orange: reads on a grey film, distinct from the heatmaps' red / blue


def mask_overlay(prior: np.ndarray, mask: np.ndarray | None, colour=MASK_COLOUR, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the [0, 1] prior with the edit mask tinted in `colour` and its border drawn;
    mask None (the whole film may change) tints the whole film."""
    g = np.clip(np.asarray(prior, np.float32), 0, 1)
    m = np.ones_like(g) if mask is None else np.clip(np.asarray(mask, np.float32), 0, 1)
    if m.shape != g.shape:
        raise ValueError(f"mask shape {m.shape} differs from the prior's {g.shape}")
    c = np.asarray(colour, np.float32) / 255.0
    a = (alpha * m)[..., None]
    rgb = g[..., None] * (1 - a) + c * a
    hard = m > 0.5
    rgb[hard & ~ndimage.binary_erosion(hard, border_value=0)] = c
    return np.round(rgb * 255).astype(np.uint8)


def mask_layer(mask: np.ndarray | None, colour=MASK_COLOUR, alpha: int = 150) -> np.ndarray | None:
    """(H, W, 4) uint8 RGBA paint layer of a mask (> 0.5), to pre-fill an image editor; None for None."""
    if mask is None:
        return None
    hard = np.asarray(mask) > 0.5
    out = np.zeros((*hard.shape, 4), np.uint8)
    out[hard] = (*colour, alpha)
    return out


def painted_mask(layers, size: int) -> np.ndarray:
    """Paint layers ((H, W, 4) RGBA, or (H, W) grey; any size) -> (size, size) float32 mask in [0, 1]:
    painted where any layer is not transparent, averaged over each output pixel."""
    from PIL import Image
    union = None
    for layer in layers or []:
        a = np.asarray(layer)
        on = a[..., 3] > 0 if a.ndim == 3 and a.shape[2] == 4 else (a.max(-1) if a.ndim == 3 else a) > 0
        union = on if union is None else union | on
    if union is None:
        return np.zeros((size, size), np.float32)
    im = Image.fromarray(union.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BOX)
    return np.clip(np.asarray(im, np.float32), 0, 1)


__all__ = ["LUNG_HEART", "lung_mask", "inside_fraction", "check_user_mask", "EditMask", "edit_mask",
           "confine_to_drawing",
           "finding_mask", "zone_mask", "lung_frame", "LungFrame", "feather_mask", "cardiac_displacement",
           "cardiac_widening",
           "airspace_region", "effusion_depth", "edema_weight", "atelectasis_band", "collapse_wedge", "diaphragm_lift",
           "is_lobar", "pneumothorax_distance", "pneumothorax_width",
           "blob_centre", "blob_radius", "severity_of", "sides_of", "EMPTY_MASK_ERROR", "FULL_MASK_WARNING",
           "mask_overlay", "mask_layer", "painted_mask", "MASK_COLOUR"]
