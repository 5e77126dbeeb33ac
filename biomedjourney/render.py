"""Knowledge-driven rendering of findings on a prior: the picture an edit starts from.

`render_findings(prior, findings, anatomy, generator)` draws each finding's radiological sign
(shape from `masks`, density measured on THIS prior) inside its edit region. The result is the
`init_image` of the region-restricted sampler, which harmonises it at a low strength (SDEdit,
Meng et al. 2022, arXiv:2108.01073): the rendering says where and what, the diffusion model
makes it look acquired. A raw rendering is a schematic, not a radiograph.

Densities: pixel values are brightness (1 = white = dense). Fluid and soft tissue are drawn at
the brightness of this prior's cardiac shadow (`Levels.soft_tissue`), air at its darkest lung.
Every random choice comes from `generator` (torch.randn(generator=...)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from .anatomy import Anatomy, segmenter_path
from .findings.schema import Finding
from .masks import (airspace_region, atelectasis_band, blob_centre, blob_radius, cardiac_displacement,
                    cardiac_widening, collapse_wedge,
                    diaphragm_lift, edema_weight, edit_mask, is_lobar, lowest_row,
                    effusion_depth, finding_mask, lung_frame, pneumothorax_distance, pneumothorax_width,
                    scale_px, severity_of, sides_of, smoothstep, ATELECTASIS_THICKNESS, EFFUSION_BELOW)

RENDERED_FINDINGS = frozenset({"pleural effusion", "pulmonary edema", "consolidation", "opacity", "pneumonia",
                               "atelectasis", "cardiomegaly", "pneumothorax", "nodule", "mass"})


@dataclass
class Rendering:
    image: np.ndarray                       # (H, W) float32 in [0, 1]
    mask: np.ndarray                        # (H, W) float32 in [0, 1]: the region it changed (soft)
    notes: list[str] = field(default_factory=list)
    undrawn: list[Finding] = field(default_factory=list)   # findings it left as they were (to the model)


@dataclass(frozen=True)
class Levels:
    """Brightness of this prior's tissues (measured, not constants)."""
    soft_tissue: float                      # cardiac shadow (median inside the heart mask)
    lung: float                             # aerated lung (median inside the lungs)
    air: float                              # darkest lung (5th percentile)


def measure_levels(prior: np.ndarray, anatomy: Anatomy) -> Levels:
    """Soft-tissue, lung and air brightness of `prior` from its heart and lung masks."""
    heart = np.asarray(anatomy.heart) > 0.5
    lungs = np.asarray(anatomy.lung("bilateral")) > 0.5
    lung_px = prior[lungs] if lungs.any() else prior.ravel()
    lung, air = float(np.median(lung_px)), float(np.percentile(lung_px, 5))
    st = float(np.percentile(prior[heart], 60)) if heart.any() else float(np.percentile(prior, 80))
    return Levels(soft_tissue=max(st, lung + 0.08), lung=lung, air=min(air, lung))


# ------------------------------------------------------------------------- primitives
def noise_field(shape: tuple[int, int], gen: torch.Generator, sigma: float) -> np.ndarray:
    """(H, W) float32 smooth random field, zero mean, unit std (Gaussian-filtered white noise)."""
    n = torch.randn(shape, generator=gen, dtype=torch.float32).numpy()
    f = ndimage.gaussian_filter(n, sigma)
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


def densify(img: np.ndarray, alpha: np.ndarray, level: float | np.ndarray, keep_detail: float,
            sigma: float) -> np.ndarray:
    """Add density: raise the local mean (Gaussian `sigma`) toward `level` (never lower it) and
    damp the fine detail (vessels) to `keep_detail` where alpha (H, W) in [0, 1] is 1."""
    lp = ndimage.gaussian_filter(img, sigma)
    detail = img - lp
    target = np.maximum(lp, level)
    return img + alpha * (target - lp) - alpha * (1 - keep_detail) * detail


def warp(img: np.ndarray, dy: np.ndarray | float = 0.0, dx: np.ndarray | float = 0.0) -> np.ndarray:
    """Geometric edit: output pixel (y, x) takes the content at (y + dy, x + dx) (bicubic, edges repeated)."""
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return ndimage.map_coordinates(img, [y + dy, x + dx], order=3, mode="nearest").astype(np.float32)


def _lowpass(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma)


def _masked_lowpass(img: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Low-pass of `img` over where `weight` (H, W) is set only (normalised convolution): nothing outside bleeds in."""
    return _lowpass(img * weight, sigma) / np.maximum(_lowpass(weight, sigma), 1e-3)


# ------------------------------------------------------------------------- findings
@dataclass
class Ctx:
    """What every finding's renderer needs."""
    anatomy: Anatomy
    levels: Levels
    gen: torch.Generator
    px: float                               # pixels per pixel-at-256
    normal: np.ndarray | None = None        # NORMAL_GRID table of normal lungs' residuals (None: EXCESS_MARGIN)


DENSITY = {"mild": 0.6, "moderate": 0.8, "severe": 1.0}   # of the full effect, by severity


# Meniscus sign (Damoiseau's curve): homogeneous basal opacity, concave upper border rising laterally,
# obscuring the costophrenic angle and hemidiaphragm (Felson ch. "The pleura"; Fleischner glossary).
def draw_effusion(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    sev = severity_of(f)
    for s in sides_of(f.side):
        d = effusion_depth(c.anatomy, s, sev)                                # (H, W) px below the meniscus
        fr = lung_frame(c.anatomy, s)
        if fr is None:
            continue
        space = d > -0.5
        inside = ndimage.distance_transform_edt(space)                      # px from the pleural space's border
        alpha = (smoothstep(d / (18 * c.px)) * (0.85 + 0.15 * smoothstep(d / (36 * c.px)))   # the fluid thins upward:
                 * smoothstep(inside / (5 * c.px))                          # an ill-defined meniscus, no fluid level;
                 * smoothstep(_from_medial_end(space, fr) / (14 * c.px))    # fades into the chest wall, heart
                 * (1 - smoothstep(_below_lung(fr, img.shape[0]) / (EFFUSION_BELOW * fr.height))))   # and abdomen
        level = _fluid_level(img, fr, c) + 0.012 * noise_field(img.shape, c.gen, 10 * c.px)
        img = densify(img, alpha, level, keep_detail=0.2, sigma=4 * c.px)
    return img, (f"basal opacity of fluid (water) density, as bright as this film's soft tissue below the "
                 f"hemidiaphragm (at least its cardiac shadow, {c.levels.soft_tissue:.2f}), up to a meniscus rising "
                 "laterally (Damoiseau's curve), the costophrenic angle and hemidiaphragm obscured")


def _below_lung(fr, h: int) -> np.ndarray:
    """(H, 1) px below the lung mask's lowest row (0 above it)."""
    return np.maximum(np.arange(h, dtype=np.float32) - fr.bottom, 0)[:, None]


def _from_medial_end(space: np.ndarray, fr) -> np.ndarray:
    """(H, W) px from the medial end of each row of `space` (H, W bool), toward the chest wall; 0 outside."""
    w = space.shape[1]
    x = np.arange(w, dtype=np.float32)[None, :]
    if fr.lateral_sign > 0:                                                  # medial end = smallest column in the row
        end = np.where(space, x, w).min(1, keepdims=True)
        dist = x - end
    else:
        end = np.where(space, x, -1).max(1, keepdims=True)
        dist = end - x
    return np.where(space, np.maximum(dist, 0), 0).astype(np.float32)


def _fluid_level(img: np.ndarray, fr, c: Ctx) -> np.ndarray:
    """(1, W) brightness of fluid: water density, i.e. what lies under the hemidiaphragm in that column (liver /
    spleen), and at least this film's cardiac shadow, so the opacity merges with the diaphragm (silhouette sign)."""
    lp = _lowpass(img, 3 * c.px)
    lo, hi = sorted((fr.medial, fr.lateral))
    below = lp[min(fr.bottom + int(4 * c.px), img.shape[0] - 1):fr.bottom + int(16 * c.px) + 1]   # (k, W)
    sub = np.median(below, axis=0) if below.size else np.full(img.shape[1], c.levels.soft_tissue)
    sub[:lo], sub[hi + 1:] = sub[lo], sub[hi]
    sub = ndimage.uniform_filter1d(sub, int(15 * c.px) | 1)
    return np.maximum(np.maximum(c.levels.soft_tissue, np.minimum(sub, 1.0)), c.levels.lung + 0.08)[None, :]


# Cardiogenic edema: bilateral perihilar (bat-wing) haze with indistinct vessels, fading to the periphery;
# Kerley B lines: short horizontal lines at the lateral bases (Gluecker et al., RadioGraphics 1999;19:1507).
def draw_edema(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    sev = severity_of(f)
    lv = c.levels
    for s in sides_of(f.side):
        w = edema_weight(c.anatomy, s, sev)
        patch = 0.75 + 0.25 * np.tanh(noise_field(img.shape, c.gen, 5 * c.px))
        alpha = np.clip(w * patch * (0.55 + 0.45 * DENSITY[sev]), 0, 1)
        img = densify(img, alpha, lv.lung + 0.75 * (lv.soft_tissue - lv.lung), keep_detail=0.55, sigma=3 * c.px)
        if sev != "mild":
            img = _kerley_b(img, s, c)
    return img, "bilateral perihilar haze fading to the periphery (bat-wing), basal haze" + (
        "" if sev == "mild" else ", faint Kerley B lines at the lateral bases")


def _kerley_b(img: np.ndarray, side: str, c: Ctx) -> np.ndarray:
    """Five short (~1-2 cm) faint horizontal lines reaching the lateral pleura of the lower zone."""
    fr = lung_frame(c.anatomy, side)
    if fr is None:
        return img
    lines = np.zeros_like(img)
    u = torch.rand(5, generator=c.gen).numpy()
    for k in range(5):
        y = int(fr.top + fr.height * (0.74 + 0.18 * u[k]))
        row = np.nonzero(fr.core[y])[0]
        if row.size < 10:
            continue
        edge = row.min() if fr.lateral_sign < 0 else row.max()
        span = np.arange(8 * c.px, dtype=int)
        cols = edge - fr.lateral_sign * (2 + span)
        lines[y, np.clip(cols, 0, img.shape[1] - 1)] = 1.0
    lines = ndimage.gaussian_filter(lines, 0.6 * c.px) * (2.5 * c.px)
    return img + 0.2 * (c.levels.soft_tissue - c.levels.lung) * np.clip(lines, 0, 1)


# Air-space opacity: patchy, confluent, ill-defined; consolidation may show air bronchograms
# (Fleischner glossary: "consolidation", "air bronchogram"; Hansell et al., Radiology 2008).
# (density, fine detail kept, air bronchograms): consolidation is the dense end; an unspecified opacity keeps more
# of what lies behind it. (0.9, 0.2) for consolidation looked denser but cost re-identification (0.956 -> 0.949).
AIRSPACE = {"consolidation": (0.8, 0.35, True), "pneumonia": (0.75, 0.4, True), "opacity": (0.6, 0.5, False)}


def draw_airspace(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    dens, keep, bronchograms = AIRSPACE[f.name]
    sev = severity_of(f)
    hard = airspace_region(f, c.anatomy)
    region = ndimage.gaussian_filter(hard.astype(np.float32), 4 * c.px) * _fade_from_spared_lung(hard, f, c)
    field_ = 0.7 * noise_field(img.shape, c.gen, 9 * c.px) + 0.3 * noise_field(img.shape, c.gen, 3 * c.px)
    bias = {"mild": -0.3, "moderate": 0.4, "severe": 1.2}[sev]
    patchy = 1 / (1 + np.exp(-(field_ + bias) / 0.35))                       # smooth random field, soft threshold
    alpha = np.clip(region * patchy * dens, 0, 1)
    img = densify(img, alpha, c.levels.soft_tissue, keep_detail=keep, sigma=3 * c.px)
    note = "patchy confluent air-space opacity (soft-thresholded smooth random field)"
    if bronchograms:
        img = img - _bronchograms(alpha, c) * 0.2 * (c.levels.soft_tissue - c.levels.lung)
        note += " with air bronchograms"
    return img, note


def _fade_from_spared_lung(zone: np.ndarray, f: Finding, c: Ctx) -> np.ndarray:
    """(H, W) in [0, 1]: 0 at the border with the lung the finding spares, 1 from 20 px inside: an air-space opacity
    is ill-defined where no fissure bounds it. The minor fissure bounds a right upper lobe sharply below (Felson):
    no fade there. The lung's own edge (chest wall, diaphragm) is not faded."""
    if f.side == "right" and f.zone == "upper":
        return np.ones(zone.shape, np.float32)
    spared = (np.asarray(c.anatomy.lung(f.side if f.side in ("right", "left") else "bilateral")) > 0.5) & ~zone
    if not spared.any():
        return np.ones(zone.shape, np.float32)
    return smoothstep(ndimage.distance_transform_edt(~spared) / (20 * c.px)).astype(np.float32)


def _bronchograms(alpha: np.ndarray, c: Ctx) -> np.ndarray:
    """(H, W) in [0, 1]: a few thin branching lucent lines inside the densest part of the opacity."""
    dense = alpha > 0.6
    lines = np.zeros_like(alpha)
    if dense.sum() < 50:
        return lines
    ys, xs = np.nonzero(dense)
    r = torch.rand(3, 3, generator=c.gen).numpy()
    for k in range(3):
        i = int(r[k, 0] * (len(ys) - 1))
        angle = np.pi * (0.25 + 0.5 * r[k, 1]) + (np.pi if r[k, 2] > 0.5 else 0)
        for br in (-0.3, 0.3):                                                   # a fork: two branches
            t = np.arange(0, 11 * c.px, 0.5)
            yy = np.clip(ys[i] + np.sin(angle + br * (t / t.max())) * t, 0, alpha.shape[0] - 1).astype(int)
            xx = np.clip(xs[i] + np.cos(angle + br * (t / t.max())) * t, 0, alpha.shape[1] - 1).astype(int)
            lines[yy, xx] = 1.0
    lines = np.clip(ndimage.gaussian_filter(lines, 1.0 * c.px) * 2.5, 0, 1)
    return lines * dense * smoothstep((alpha - 0.6) / 0.2)


# Plate-like atelectasis: a linear band of increased density, horizontal or slightly oblique
# (Fleischner glossary: "atelectasis, linear"; Felson).
def draw_atelectasis(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    sev = severity_of(f)
    if is_lobar(f):
        return draw_lobar_collapse(img, f, c)
    half = ATELECTASIS_THICKNESS[sev] * c.px / 2
    for s in sides_of(f.side):
        d = np.abs(atelectasis_band(c.anatomy, s, f.zone, sev))
        ends = smoothstep(ndimage.distance_transform_edt(np.isfinite(d)) / (8 * c.px))   # tapering ends
        alpha = ndimage.gaussian_filter(smoothstep((half + 1 - d) / 2) * ends, 0.8 * c.px) * 0.5
        img = densify(img, alpha, c.levels.soft_tissue, keep_detail=0.3, sigma=1.5 * c.px)
    return img, "a linear plate-like band of soft-tissue density (no volume loss drawn)"


# Lobar collapse (shape and citations in masks.collapse_wedge): for a lower lobe the hemidiaphragm is raised first
# (a vertical warp), then the airless lobe is drawn at soft-tissue density, densest at its base, with a sharp
# fissure border and the vessels inside it lost.
def draw_lobar_collapse(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    sev = severity_of(f)
    lifted = ""
    for s in sides_of(f.side):
        fr = lung_frame(c.anatomy, s)
        if fr is None:
            continue
        if f.zone == "lower":
            dy = diaphragm_lift(c.anatomy, s, sev)                          # (H, W) px
            img = _lift_keeping_ribs(img, dy, fr, c)
            lifted = f", the hemidiaphragm raised by up to {dy.max():.0f} px (volume loss)"
        wedge = collapse_wedge(c.anatomy, s, f.zone, sev)                  # px inside the fissure border, -inf outside
        soft_lung = ndimage.gaussian_filter(np.isfinite(wedge).astype(np.float32), 3 * c.px)
        if f.zone == "middle":              # on a frontal film a collapsed middle lobe / lingula is a hazy opacity
            alpha = 0.7 * smoothstep(wedge / (10 * c.px)) * soft_lung      # that blurs the heart border (no edge)
        else:
            hy = fr.top + 0.5 * fr.height                                   # the hilum's row
            far = abs((fr.top if f.zone == "upper" else fr.bottom) - hy)
            toward_base = np.clip(np.abs(np.arange(img.shape[0]) - hy) / max(far, 1), 0, 1)   # (H,)
            alpha = (smoothstep(wedge / (1.5 * c.px) + 0.5) * soft_lung       # sharp along the fissure only
                     * (0.55 + 0.35 * smoothstep(toward_base / 0.6))[:, None])   # thin at the hilum, dense at the base
        # sigma 6 px: ribs lie over the lobe and stay (half their contrast); the vessels inside it fade
        img = densify(img, alpha, c.levels.soft_tissue, keep_detail=0.45, sigma=6 * c.px)
    return img, (f"lobar collapse of the {f.zone} lobe: a wedge of soft-tissue density from the hilum, sharply "
                 f"bounded by the displaced fissure, vessels inside it lost{lifted}")


def _keep_fine_structure(img: np.ndarray, moved: np.ndarray, keep: np.ndarray, c: Ctx) -> np.ndarray:
    """A geometric edit moves the organ, not the chest wall: where keep (H, W) in [0, 1] is 1 the moved picture's
    structure finer than 8 px (the ribs, and the vessels with them) is replaced by the prior's own."""
    band = lambda a: a - _lowpass(a, 8 * c.px)                             # ribs (~8 px) and finer
    return moved + keep * (band(img) - band(moved))


def _lift_keeping_ribs(img: np.ndarray, dy: np.ndarray, fr, c: Ctx) -> np.ndarray:
    """The hemidiaphragm and the lung above it moved up by dy (H, W) px; the ribs stay where they were. Kept where the
    pixel and its source both lie in aerated lung (above the old base, 6 px clear of the raised one); the diaphragm's
    edge and the liver below it move."""
    lung = warp(fr.core.astype(np.float32), dy=dy) > 0.5                   # the lung's extent after the lift
    h = img.shape[0]
    y = np.arange(h, dtype=np.float32)[:, None]
    base = lowest_row(lung)[None, :]                                        # (1, W) the raised dome's row
    keep = (smoothstep((base - y - 6 * c.px) / (6 * c.px)) * ndimage.gaussian_filter(lung.astype(np.float32), 2 * c.px)
            * np.clip(dy / 0.5, 0, 1))                                      # (H, W) aerated lung that moved
    return _keep_fine_structure(img, warp(img, dy=dy), keep, c)


# Cardiomegaly: the cardiac silhouette widened (cardiothoracic ratio up 10-20% by severity), mostly to
# the patient's left, displacing the adjacent lung (Felson ch. "The heart"): a horizontal warp of the heart and
# the lung beside it. The chest wall stays: the ribs are kept (away from the old and the new heart border, where
# the silhouette's own edge moves), and the hemidiaphragm under the lungs and heart does not slide sideways.
def draw_cardiomegaly(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    smaller = f.receding
    dx = cardiac_displacement(c.anatomy, severity_of(f), -1.0 if smaller else 1.0)  # (H, W) px
    heart = np.asarray(c.anatomy.heart) > 0.5
    h = img.shape[0]
    y = np.arange(h, dtype=np.float32)[:, None]
    above = heart | (np.asarray(c.anatomy.lung("bilateral")) > 0.5)
    floor = lowest_row(above, empty=h)[None, :]                             # (1, W) lowest lung/heart row
    dx = dx * (1 - smoothstep((y - floor + 8 * c.px) / (10 * c.px)))      # (H, W) the dome does not slide
    grown = warp(heart.astype(np.float32), dx=-dx) > 0.5                    # the silhouette after the warp
    edges = (heart ^ ndimage.binary_erosion(heart)) | (grown ^ ndimage.binary_erosion(grown))
    from_border = ndimage.distance_transform_edt(~edges & ~(heart ^ grown)).astype(np.float32)
    keep = smoothstep((from_border - 3 * c.px) / (5 * c.px)) * np.clip(np.abs(dx) / 0.5, 0, 1)   # (H, W)
    cs = c.anatomy.cardiac
    if cs is not None:   # the measured borders: the moved edge shows where it lands, the old one not at all
        x = np.arange(img.shape[1], dtype=np.float32)[None, :]            # (1, W)
        near = lambda cols: (np.abs(cols - cs.low) < 6 * c.px) | (np.abs(cols - cs.high) < 6 * c.px)
        edge = (near(x - dx) | near(x)) & (np.abs(dx) > 0.5)              # (H, W) new edge (its source) | old one
        keep = keep * (1 - ndimage.gaussian_filter(edge.astype(np.float32), 1.5 * c.px))
    out = _keep_fine_structure(img, warp(img, dx=-dx), keep, c)
    what = "narrowed" if smaller else "widened"
    if cs is not None:
        total = cardiac_widening(c.anatomy, severity_of(f), -1.0 if smaller else 1.0)[3]
        size = (f"cardiothoracic ratio {cs.ctr:.2f} -> {cs.ctr + total / cs.thorax:.2f}, the borders read on the "
                "film")
    else:
        size = "the heart's borders not found on the film: the estimated heart widened"
    return out, (f"the heart silhouette {what} horizontally about its centre (geometric warp, up to "
                 f"{np.abs(dx).max():.0f} px at the borders, mostly the patient's left; ribs and diaphragm kept; "
                 f"{size})")


# Pneumothorax: a thin white visceral pleural line parallel to the chest wall, no lung markings beyond it,
# the space darker (Fleischner glossary: "pneumothorax"; "visceral pleural line" sign); the ribs stay visible
# across it (bone, not lung). A running median (Tukey 1977, Exploratory Data Analysis) removes what is narrower
# than half its 7-px window (peripheral vessels, 1-3 px) and keeps steps (rib cortices); a Gaussian blurred both.
def draw_pneumothorax(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    if f.receding:
        return img, "not drawn: the lung markings of a re-expanded lung cannot be rendered (left to the model)"
    lv = c.levels
    for s in sides_of(f.side):
        d, fr = pneumothorax_distance(c.anatomy, s)
        if fr is None:
            continue
        width = pneumothorax_width(fr, severity_of(f))                     # (H, 1) px
        inside = np.where(np.isfinite(d), d, 0)
        space = smoothstep((width - inside) / (1.5 * c.px)) * smoothstep(inside / (2 * c.px))  # soft at the wall too
        space = ndimage.gaussian_filter(space, 0.8 * c.px)                 # the mask's pixel steps anti-aliased
        med = ndimage.median_filter(img, 2 * round(3 * c.px) + 1)          # vessels gone, ribs kept with their edges
        air = med - 0.35 * np.maximum(_lowpass(med, 4 * c.px) - lv.air, 0) - 0.01   # darker, the ribs' contrast kept
        img = img + space * (air - img)
        line = np.exp(-0.5 * ((d - width) / (0.6 * c.px)) ** 2) * np.isfinite(d)
        img = img + line * max(0.08, 0.35 * (lv.soft_tissue - lv.lung))
    return img, ("a thin white visceral pleural line along the apical and lateral chest wall, the space "
                 "beyond it darker and without lung markings")


# Nodule / mass: a round, soft-edged opacity (<= 3 cm nodule, > 3 cm mass, mass a little lobulated;
# Fleischner glossary).
def draw_blob(img: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    centre = blob_centre(f, c.anatomy)
    if centre is None:
        return img, "not drawn: no lung mask"
    radius = blob_radius(f, c.anatomy)
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r, theta = np.hypot(y - centre[0], x - centre[1]), np.arctan2(y - centre[0], x - centre[1])
    k = torch.rand(2, generator=c.gen).numpy()
    lob = 0.05 if f.name == "mass" else 0.02
    edge = radius * (1 + lob * np.sin(3 * theta + 6.28 * k[0]) + lob * np.sin(5 * theta + 6.28 * k[1]))
    thickness = np.sqrt(np.clip(1 - (r / edge) ** 2, 0, 1))                  # projected thickness of a sphere
    soft_edge = smoothstep((edge - r) / (1.5 * c.px) + 0.5)
    alpha = np.maximum(thickness, 0.25 * soft_edge) * soft_edge * (0.7 if f.name == "mass" else 0.55)
    img = densify(img, alpha, c.levels.soft_tissue, keep_detail=0.5, sigma=1.5 * c.px)
    return img, f"a round soft-edged opacity (projected sphere), radius {radius:.0f} px"


DRAW: dict[str, Callable[[np.ndarray, Finding, Ctx], tuple[np.ndarray, str]]] = {
    "pleural effusion": draw_effusion, "pulmonary edema": draw_edema, "consolidation": draw_airspace,
    "opacity": draw_airspace, "pneumonia": draw_airspace, "atelectasis": draw_atelectasis,
    "cardiomegaly": draw_cardiomegaly, "pneumothorax": draw_pneumothorax, "nodule": draw_blob, "mass": draw_blob}


# ------------------------------------------------------------------------- decreased / resolved
ENVELOPE_PERCENTILE = 40   # the baseline is refitted to the darker 40% of the lungs about it (a lower envelope)
EXCESS_MARGIN = 2.0        # without a normal-lung table: density above baseline + this many median absolute residuals
NORMAL_FILE = "normal_lung_residuals.json"   # in the segmenter's folder (its lung frame), train/fit_normal_lungs.py
NORMAL_GRID = (12, 6)      # cells of a lung: depth (apex -> lowest row) x lateralness (medial -> chest wall)
NORMAL_QUANTILE = 90       # what the table holds: this percentile of normal lungs' residuals in each cell


def aerated_baseline(lp: np.ndarray, lungs: np.ndarray, iterations: int = 5) -> tuple[np.ndarray, float]:
    """A smooth model of the lungs' brightness where aerated: a plane in (row, distance from the midline) plus a
    rim term (the brighter band where the chest wall and ribs overlap the lung's edge), fitted to the low-passed
    film `lp` (H, W) over both `lungs` (H, W bool) together, then refitted to its darker part about the fit
    (ENVELOPE_PERCENTILE: a lower envelope). The other lung and the stiff model keep an opacity, even one filling
    most of a lung, from lifting it. Returns ((H, W) baseline, the spread about it (median absolute residual))."""
    h, w = lp.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rim = np.exp(-ndimage.distance_transform_edt(lungs) / (0.04 * min(h, w)))  # ribs and chest wall overlap the edge
    basis = np.stack([np.ones_like(x), np.abs(x / w - 0.5), y / h - 0.5, rim], -1)   # (H, W, 4), mirror-symmetric
    keep = lungs.copy()
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(basis[keep], lp[keep], rcond=None)
        res = lp - basis @ coef
        keep = lungs & (res <= np.percentile(res[lungs], ENVELOPE_PERCENTILE))
    fit = (basis @ coef).astype(np.float32)
    return fit, float(np.median(np.abs(lp[keep] - fit[keep])))


@dataclass
class LungDensity:
    """The lungs' broad density (low-passed at 8 px, so ribs and vessels stay out) and their aerated baseline."""
    lungs: np.ndarray        # (H, W) bool: lung field, the heart left out (it is not an opacity)
    not_heart: np.ndarray    # (H, W) 1 - the heart, softened
    lp: np.ndarray           # (H, W) low-pass of the lungs alone (the chest wall and heart stay out of it)
    baseline: np.ndarray     # (H, W) aerated_baseline
    mad: float               # its spread

    @property
    def residual(self) -> np.ndarray:
        """(H, W) (lp - baseline) in units of the spread: how much denser than aerated lung, film-independent."""
        return (self.lp - self.baseline) / max(self.mad, 1e-4)


def lung_density(img: np.ndarray, anatomy: Anatomy) -> LungDensity | None:
    """LungDensity of a film (H, W) [0, 1]; None when fewer than 400 lung pixels are found."""
    px = scale_px(img.shape)
    not_heart = 1 - ndimage.gaussian_filter(np.asarray(anatomy.heart, np.float32), 6 * px)
    lungs = (np.asarray(anatomy.lung("bilateral")) > 0.5) & (not_heart > 0.5)
    if lungs.sum() < 400:
        return None
    w = lungs.astype(np.float32)
    lp = _masked_lowpass(img, w, 8 * px)
    base, mad = aerated_baseline(lp, lungs)
    return LungDensity(lungs, not_heart, lp, base, mad)


def lung_cells(anatomy: Anatomy, lungs: np.ndarray, grid: tuple[int, int] = NORMAL_GRID) -> np.ndarray:
    """(H, W) int: each lung pixel's NORMAL_GRID cell (depth row * columns + lateralness column) in its own lung's
    frame, the same cells for both lungs (mirror-symmetric); -1 outside `lungs`."""
    d, n = grid
    cells = np.full(lungs.shape, -1)
    for side in ("right", "left"):
        f = lung_frame(anatomy, side)
        if f is None:
            continue
        depth = (np.clip(f.depth(), 0, 0.999) * d).astype(int)[:, None]
        lat = (np.clip(f.lateralness(), 0, 0.999) * n).astype(int)[None, :]
        cells = np.where(f.core & lungs, depth * n + lat, cells)
    return cells


def fit_normal_residuals(films, anatomies, quantile: float = NORMAL_QUANTILE, grid: tuple[int, int] = NORMAL_GRID,
                         per_cell: int = 200, rng: np.random.Generator | None = None) -> np.ndarray:
    """(grid) table: in each cell, the `quantile` percentile of the residual (`LungDensity.residual`) over normal
    films (H, W) and their anatomies, up to `per_cell` pixels sampled per film and cell so that every film counts
    alike. A cell no film reaches gets the median of the others."""
    rng = rng if rng is not None else np.random.default_rng(0)
    values: list[list[np.ndarray]] = [[] for _ in range(grid[0] * grid[1])]
    for img, a in zip(films, anatomies):
        ld = lung_density(np.asarray(img, np.float32), a)
        if ld is None:
            continue
        res, cells = ld.residual, lung_cells(a, ld.lungs, grid)
        for k in range(len(values)):
            v = res[cells == k]
            if v.size:
                values[k].append(rng.choice(v, min(v.size, per_cell), replace=False))
    table = np.array([np.percentile(np.concatenate(v), quantile) if v else np.nan for v in values], np.float32)
    if np.isnan(table).all():
        raise ValueError("no lung field found on any of the films: nothing to fit")
    return np.where(np.isnan(table), np.nanmedian(table), table).reshape(grid)


_NORMAL_CACHE: dict[str, np.ndarray | None] = {}


def normal_residuals(folder=None) -> np.ndarray | None:
    """The shipped table (NORMAL_FILE in the segmenter's folder, `anatomy.segmenter_path()`), or None when that
    folder has none (removal then falls back to EXCESS_MARGIN); cached per path."""
    try:
        path = (Path(folder) if folder is not None else segmenter_path()) / NORMAL_FILE
    except FileNotFoundError:
        return None
    key = str(path)
    if key not in _NORMAL_CACHE:
        table = None
        if path.is_file():
            d = json.loads(path.read_text())
            table = np.asarray(d["table"], np.float32)
            if table.shape != NORMAL_GRID or not np.isfinite(table).all():
                raise ValueError(f"{path}: table of shape {table.shape} (want {NORMAL_GRID}, finite); refit it "
                                 "with python train/fit_normal_lungs.py")
        _NORMAL_CACHE[key] = table
    return _NORMAL_CACHE[key]


def undo_density(img: np.ndarray, region: np.ndarray, f: Finding, c: Ctx) -> tuple[np.ndarray, str]:
    """Approximate removal inside the lungs (resolved: fully, decreased: half): the broad density (`lung_density`) is
    lowered only where it exceeds the lungs' own aerated baseline by more than normal lungs do at that place: the
    NORMAL_QUANTILE percentile of normal films' residuals in its cell (`c.normal`, `fit_normal_residuals`; the hila,
    the bases behind the domes and the rim are denser than the baseline in every lung), or by EXCESS_MARGIN
    without a table. The lungs keep their gradient, and where they look like normal lungs nothing changes. It cannot
    restore anatomy a dense finding hid."""
    k = 1.0 if f.change == "resolved" else 0.5
    ld = lung_density(img, c.anatomy)
    if ld is None:
        return img, "not removed: no lung field found"
    w = ld.lungs.astype(np.float32)
    if c.normal is not None:
        cells = lung_cells(c.anatomy, ld.lungs, c.normal.shape)
        margin = np.where(cells >= 0, c.normal.ravel()[np.maximum(cells, 0)], 0).astype(np.float32)
        margin = _masked_lowpass(margin, w, 4 * c.px)                     # no steps between the cells
        what = f"above what {NORMAL_QUANTILE} % of normal lungs show at that place"
    else:
        margin, what = EXCESS_MARGIN, "above the lungs' aerated baseline (a smooth fit to their clear parts)"
    excess = ndimage.gaussian_filter(np.maximum(ld.lp - ld.baseline - margin * ld.mad, 0) * w, 3 * c.px)
    in_lung = ndimage.gaussian_filter(np.asarray(c.anatomy.lung("bilateral"), np.float32), 3 * c.px)
    img = img - k * region * in_lung * ld.not_heart * excess
    return img, f"{'removed' if k == 1 else 'reduced'} by lowering the broad density {what}; the removal is approximate"


# ------------------------------------------------------------------------- entry point
def render_one(img: np.ndarray, f: Finding, region: np.ndarray, c: Ctx) -> tuple[np.ndarray, str]:
    """One finding drawn on img (H, W); returns (image, what was drawn)."""
    if f.change == "unchanged":
        return img, "unchanged: nothing drawn"
    if f.name not in RENDERED_FINDINGS:
        return img, "not rendered (left to the diffusion model)"
    if f.receding and f.name not in ("cardiomegaly", "pneumothorax"):
        return undo_density(img, region, f, c)
    return DRAW[f.name](img, f, c)


def _order(f: Finding) -> int:
    return 0 if f.name == "cardiomegaly" else 1          # geometry first, then densities on the new geometry


def render_findings(prior: np.ndarray, findings: list[Finding], anatomy: Anatomy,
                    generator: torch.Generator | None = None, normal: np.ndarray | None | str = "shipped") -> Rendering:
    """Draw `findings` on `prior` (H, W) [0, 1]; the change is confined to the findings' edit regions.
    generator: every random choice (None: a fixed seed 0, so the result is reproducible). normal: the normal-lung
    table a removal measures excess density against ('shipped': `normal_residuals()`; None: EXCESS_MARGIN)."""
    prior = np.asarray(prior, np.float32)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if isinstance(normal, str):
        normal = normal_residuals() if any(f.receding for f in findings) else None
    c = Ctx(anatomy, measure_levels(prior, anatomy), gen, scale_px(prior.shape), normal)
    img, mask, notes, undrawn = prior.copy(), np.zeros_like(prior), [], []
    for f in sorted(findings, key=_order):
        region, _ = finding_mask(f, anatomy)
        before = img
        img, what = render_one(img, f, region, c)
        if np.array_equal(img, before):
            undrawn.append(f)
        notes.append(f"{f.name} ({', '.join(v for v in (f.side, f.zone, severity_of(f), f.change) if v != 'none')}): "
                     f"{what}" + (", knowledge-driven rendering" if f.name in RENDERED_FINDINGS
                                  and f.change != "unchanged" else ""))
        if f.name in RENDERED_FINDINGS and f.change != "unchanged":
            mask = np.maximum(mask, region)
    image = np.clip(prior + mask * (img - prior), 0, 1).astype(np.float32)   # nothing changes outside the regions
    return Rendering(image=image, mask=mask.astype(np.float32), notes=notes, undrawn=undrawn)


__all__ = ["Rendering", "render_findings", "RENDERED_FINDINGS", "Levels", "measure_levels", "edit_mask",
           "fit_normal_residuals", "normal_residuals", "lung_density", "lung_cells"]
