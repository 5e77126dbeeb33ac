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
VMAX_PERCENTILE = 99.0    # robust colour range: the 99th percentile of |map| ...
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
AXES_RECT = (0.03, 0.12, 0.78, 0.751)  # image axes (left, bottom, width, height) in figure fractions
FIGSIZE = (5.2, 5.4)                  # inches; the image axes are square at this size
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


def overlay_rgb(prior: np.ndarray, signed_map: np.ndarray, *, vmax: float | None = None,
                kind: str = "difference", smooth: float = SMOOTH_SIGMA) -> tuple[np.ndarray, float]:
    """The map composited on the grey prior, no decorations: ((H, W, 3) float32 [0, 1], vmax used).

    Colour = cmap(map / vmax); opacity ramps from 0 at TRANSPARENT_BELOW * vmax to MAX_ALPHA at vmax.
    """
    _check_kind(kind)
    p, m = np.asarray(prior, np.float32), np.asarray(signed_map, np.float32)
    _same_shape(p, m, "overlay")
    if smooth > 0:
        from scipy.ndimage import gaussian_filter
        m = gaussian_filter(m, smooth)
    vmax = robust_vmax(m, kind) if vmax is None else float(vmax)
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
                   kind: str = "difference", smooth: float = SMOOTH_SIGMA) -> np.ndarray:
    """A rendered figure: the overlay (see overlay_rgb), a title, a colorbar and a legend.

    kind='difference': diverging RdBu_r centred at 0 (red = brighter in follow-up);
    kind='std': sequential inferno from 0. vmax=None -> robust_vmax (99th percentile of |map|,
    floored). Returns (H, W, 3) uint8, (540, 520, 3) at FIGSIZE and DPI; the image sits in AXES_RECT.
    """
    rgb, vmax = overlay_rgb(prior, signed_map, vmax=vmax, kind=kind, smooth=smooth)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes(AXES_RECT)
    ax.imshow(rgb, interpolation="bilinear")
    ax.set_axis_off()
    ax.set_title(title, fontsize=13)
    cax = fig.add_axes((0.84, AXES_RECT[1] + 0.06, 0.035, AXES_RECT[3] - 0.12))
    if kind == "difference":
        sm = ScalarMappable(Normalize(-vmax, vmax), colormaps[DIFF_CMAP])
        label = "follow-up − prior (grey levels, 0–1)"
    else:
        sm = ScalarMappable(Normalize(0.0, vmax), colormaps[STD_CMAP])
        label = "std across samples (grey levels)"
    fig.colorbar(sm, cax=cax).set_label(label, fontsize=10)
    cax.tick_params(labelsize=9)
    fig.text(0.03, 0.02, LEGEND[kind], fontsize=10.5, va="bottom", ha="left")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3) uint8


def output_figures(prior: np.ndarray, images: Sequence[np.ndarray], seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The standard figures of one generation: a difference map per sample, the mean change and the
    uncertainty (std across samples), as {file name: (H, W, 3) uint8}; one definition for app, CLI, API."""
    n = len(images)
    figures = {f"heatmap_sample{i + 1}.png": overlay_figure(
        prior, difference(prior, im), title=f"Sample {i + 1} (seed {s}): follow-up − prior")
        for i, (im, s) in enumerate(zip(images, seeds))}
    figures["heatmap_mean_change.png"] = overlay_figure(
        prior, mean_change(prior, images), title=f"Mean change over {n} sample{'s' * (n > 1)}")
    figures["heatmap_uncertainty.png"] = overlay_figure(
        prior, uncertainty(images), kind="std",
        title="Uncertainty: std across samples" if n > 1 else "Uncertainty needs ≥ 2 samples")
    return figures


def axes_box(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of AXES_RECT in a figure image of ``shape`` (H, W) (for tests)."""
    h, w = shape
    left, bottom, width, height = AXES_RECT
    return (round(left * w), round((1 - bottom - height) * h), round((left + width) * w), round((1 - bottom) * h))


__all__ = ["difference", "mean_change", "uncertainty", "robust_vmax", "overlay_rgb", "overlay_figure",
           "output_figures", "axes_box", "LEGEND"]
