"""Change maps between a prior and generated follow-ups, and their overlays on the prior.

Sign convention (everywhere): map = follow-up − prior, so POSITIVE (red) means brighter in the
follow-up (denser: new opacity, effusion, consolidation) and NEGATIVE (blue) means darker
(more lucent: clearing, pneumothorax, resolved effusion).

    difference(prior, followup)   one sample's signed change, (R, R)
    mean_change(prior, samples)   mean over samples of (sample − prior): the change they agree on
    uncertainty(samples)          per-pixel std over samples: where the samples disagree
    overlay_figure(prior, map)    the map on the grey prior with a colorbar and a legend, (H, W, 3) uint8

Rendering uses matplotlib's object API on an Agg canvas (no pyplot state: safe in a server).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

DIFF_CMAP = "RdBu_r"      # diverging, red = positive; centred at 0 by a symmetric norm
STD_CMAP = "inferno"      # sequential for the (non-negative) std map
FIXED_VMAX = {"difference": 0.25, "std": 0.125}  # default colour range (scale='fixed'): the same for every
                          # image, so a faint change looks faint; 0.25 = a quarter of the grey range (0-1)
SCALES = ("fixed", "robust")
VMAX_PERCENTILE = 99.0    # scale='robust' (per image): the 99th percentile of |map| ...
DIFF_VMAX_FLOOR = 0.05    # ... but never below 5% of the grey range (~13/255) for a difference,
STD_VMAX_FLOOR = 0.03     # ... or 3% for a std: pure sampling noise then stays faint, not full colour
TRANSPARENT_BELOW = 0.15  # |map| < 15% of vmax is fully transparent (the prior shows through)
MAX_ALPHA = 0.85          # opacity at |map| >= vmax
SMOOTH_SIGMA = 1.0        # px Gaussian blur of the map before display (pixel noise -> regions); 0 = off
LEGEND = {
    "difference": "red: brighter/denser in follow-up (e.g. new opacity/effusion)\n"
                  "blue: darker/more lucent (e.g. clearing)",
    "std": "bright: samples disagree (uncertain change)\n"
           "transparent: samples agree",
}
AXES_RECT = (0.03, 0.12, 0.6875, 0.751)  # image axes (left, bottom, width, height) in figure fractions
FIGSIZE = (5.9, 5.4)                  # inches; the image axes are square at this size, and the colorbar's
                                      # two-line label fits inside the right edge (tests check the bbox)
CBAR_RECT = (0.75, AXES_RECT[1] + 0.06, 0.03, AXES_RECT[3] - 0.12)
DPI = 100


def _stack(samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    s = np.asarray(samples, dtype=np.float32)
    if s.ndim == 2:
        s = s[None]
    if s.ndim != 3 or len(s) == 0:
        raise ValueError(f"expected a list of (H, W) samples, got an array of shape {s.shape}")
    return s  # (N, H, W)


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prior is {a.shape} but follow-up is {b.shape}; both must be the "
                         "model-resolution images (GenerationOutput.prior and .images)")


def difference(prior: np.ndarray, followup: np.ndarray) -> np.ndarray:
    """(H, W) signed change followup − prior (positive = brighter in the follow-up), float32."""
    p, f = np.asarray(prior, np.float32), np.asarray(followup, np.float32)
    _same_shape(p, f, "difference")
    return f - p


def mean_change(prior: np.ndarray, samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(H, W) mean over samples of (sample − prior), float32 (accumulated in float64)."""
    s, p = _stack(samples), np.asarray(prior, np.float32)
    _same_shape(p, s[0], "mean_change")
    return (s.mean(axis=0, dtype=np.float64) - p).astype(np.float32)


def uncertainty(samples: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(H, W) per-pixel standard deviation across samples (population std, ddof=0), float32.
    Accumulated in float64, so identical samples give exactly 0; one sample gives zeros."""
    return _stack(samples).std(axis=0, dtype=np.float64).astype(np.float32)


def robust_vmax(signed_map: np.ndarray, kind: str = "difference") -> float:
    """Colour range: the VMAX_PERCENTILE of |map|, floored so that noise is not stretched to full colour."""
    floor = DIFF_VMAX_FLOOR if kind == "difference" else STD_VMAX_FLOOR
    return max(float(np.percentile(np.abs(signed_map), VMAX_PERCENTILE)), floor)


def _check_kind(kind: str) -> None:
    if kind not in LEGEND:
        raise ValueError(f"kind must be 'difference' or 'std', got {kind!r}")


def colour_range(signed_map: np.ndarray, kind: str = "difference", scale: str = "fixed",
                 vmax: float | None = None) -> float:
    """The vmax a map is drawn with: ``vmax`` when given; scale='fixed' -> FIXED_VMAX[kind] (the same for
    every image: comparable across samples and runs); scale='robust' -> robust_vmax (per image)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be 'fixed' or 'robust', got {scale!r}")
    if vmax is not None:
        if not float(vmax) > 0:
            raise ValueError(f"vmax must be > 0, got {vmax!r}")
        return float(vmax)
    return FIXED_VMAX[kind] if scale == "fixed" else robust_vmax(signed_map, kind)


def scale_label(kind: str, vmax: float, scale: str) -> str:
    """The colorbar label: what is shown, the numeric range and whether it is fixed or per image."""
    what = "follow-up − prior" if kind == "difference" else "std across samples"
    rng = f"±{vmax:.3g}" if kind == "difference" else f"0–{vmax:.3g}"
    how = "fixed scale" if scale == "fixed" else "per-image scale (99th pct)"
    return f"{what} (grey levels 0–1)\n{how}: {rng}"


def overlay_rgb(prior: np.ndarray, signed_map: np.ndarray, *, vmax: float | None = None,
                kind: str = "difference", smooth: float = SMOOTH_SIGMA,
                scale: str = "fixed") -> tuple[np.ndarray, float]:
    """The map composited on the grey prior, no decorations: ((H, W, 3) float32 [0, 1], vmax used).
    The colour range is ``colour_range(map, kind, scale, vmax)``: fixed by default.

    Colour = cmap(map / vmax); opacity ramps from 0 at TRANSPARENT_BELOW * vmax to MAX_ALPHA at vmax.
    """
    _check_kind(kind)
    p, m = np.asarray(prior, np.float32), np.asarray(signed_map, np.float32)
    _same_shape(p, m, "overlay")
    if smooth > 0:
        from scipy.ndimage import gaussian_filter
        m = gaussian_filter(m, smooth)
    vmax = colour_range(m, kind, scale, vmax)
    if kind == "difference":
        norm, cmap = Normalize(-vmax, vmax), colormaps[DIFF_CMAP]
    else:
        norm, cmap = Normalize(0.0, vmax), colormaps[STD_CMAP]
    colour = cmap(norm(m))[..., :3].astype(np.float32)                          # (H, W, 3)
    strength = np.clip(np.abs(m) / vmax, 0.0, 1.0)
    alpha = MAX_ALPHA * np.clip((strength - TRANSPARENT_BELOW) / (1 - TRANSPARENT_BELOW), 0.0, 1.0)
    grey = np.repeat(np.clip(p, 0, 1)[..., None], 3, axis=2)                   # (H, W, 3)
    return (grey * (1 - alpha[..., None]) + colour * alpha[..., None]).astype(np.float32), vmax


def overlay_figure(prior: np.ndarray, signed_map: np.ndarray, *, title: str, vmax: float | None = None,
                   kind: str = "difference", smooth: float = SMOOTH_SIGMA, scale: str = "fixed") -> np.ndarray:
    """A rendered figure: the overlay (see overlay_rgb), a title, a colorbar and a legend.

    kind='difference': diverging RdBu_r centred at 0 (red = brighter in follow-up);
    kind='std': sequential inferno from 0. Colour range: scale='fixed' (default) -> FIXED_VMAX[kind],
    the same for every image; scale='robust' -> robust_vmax (99th percentile of |map|, floored, per
    image); an explicit vmax wins (and is labelled fixed). The colorbar label states the range and
    which scale. Returns (H, W, 3) uint8, (540, 590, 3) at FIGSIZE and DPI; the image sits in AXES_RECT.
    """
    fig = figure(prior, signed_map, title=title, vmax=vmax, kind=kind, smooth=smooth, scale=scale)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8


def figure(prior: np.ndarray, signed_map: np.ndarray, *, title: str, vmax: float | None = None,
           kind: str = "difference", smooth: float = SMOOTH_SIGMA, scale: str = "fixed") -> Figure:
    """The matplotlib Figure (on an Agg canvas, not yet drawn) that overlay_figure renders."""
    shown = "robust" if scale == "robust" and vmax is None else "fixed"  # an explicit vmax is a fixed scale
    rgb, vmax = overlay_rgb(prior, signed_map, vmax=vmax, kind=kind, smooth=smooth, scale=scale)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes(AXES_RECT)
    ax.imshow(rgb, interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title, fontsize=13)
    cax = fig.add_axes(CBAR_RECT)
    if kind == "difference":
        sm = ScalarMappable(Normalize(-vmax, vmax), colormaps[DIFF_CMAP])
    else:
        sm = ScalarMappable(Normalize(0.0, vmax), colormaps[STD_CMAP])
    fig.colorbar(sm, cax=cax).set_label(scale_label(kind, vmax, shown), fontsize=9)
    cax.tick_params(labelsize=9)
    fig.text(0.03, 0.02, LEGEND[kind], fontsize=10.5, va="bottom", ha="left")
    return fig


def output_figures(prior: np.ndarray, images: Sequence[np.ndarray], seeds: Sequence[int], *,
                   scale: str = "fixed") -> dict[str, np.ndarray]:
    """The standard figures of one generation: a difference map per sample, the mean change and the
    uncertainty (std across samples), as {file name: (H, W, 3) uint8}; one definition for app, CLI, API.
    scale='fixed' (default): every figure of every run uses FIXED_VMAX, so colours compare across samples
    and runs and a faint change stays faint; scale='robust': each figure stretched to its own range."""
    n = len(images)
    figures = {f"heatmap_sample{i + 1}.png": overlay_figure(
        prior, difference(prior, im), title=f"Sample {i + 1} (seed {s}): follow-up − prior", scale=scale)
        for i, (im, s) in enumerate(zip(images, seeds))}
    figures["heatmap_mean_change.png"] = overlay_figure(
        prior, mean_change(prior, images), title=f"Mean change over {n} sample{'s' * (n > 1)}", scale=scale)
    figures["heatmap_uncertainty.png"] = overlay_figure(
        prior, uncertainty(images), kind="std", scale=scale,
        title="Uncertainty: std across samples" if n > 1 else "Uncertainty needs ≥ 2 samples")
    return figures


def axes_box(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of AXES_RECT in a figure image of ``shape`` (H, W) (for tests)."""
    h, w = shape
    left, bottom, width, height = AXES_RECT
    return (round(left * w), round((1 - bottom - height) * h), round((left + width) * w), round((1 - bottom) * h))


__all__ = ["difference", "mean_change", "uncertainty", "robust_vmax", "colour_range", "scale_label",
           "FIXED_VMAX", "overlay_rgb", "overlay_figure",
           "output_figures", "axes_box", "LEGEND"]
