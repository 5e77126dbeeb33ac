"""Change maps: sign convention, mean/std maths, and the colours the overlay actually draws."""
import numpy as np
import pytest

from biomedjourney import heatmaps as hm

R = 64


def _prior() -> np.ndarray:
    return np.tile(np.linspace(0.2, 0.8, R, dtype=np.float32), (R, 1))  # (R, R) grey ramp


def _followup(prior: np.ndarray, delta: float = 0.3) -> np.ndarray:
    """Brighter block on the left (rows 20-40, cols 5-25), darker block on the right (cols 40-60)."""
    f = prior.copy()
    f[20:40, 5:25] += delta
    f[20:40, 40:60] -= delta
    return f


def _figure_pixel(fig: np.ndarray, row: float, col: float) -> np.ndarray:
    """RGB of the figure pixel showing image pixel (row, col) (the image fills the square AXES_RECT)."""
    x0, y0, x1, y1 = hm.axes_box(fig.shape[:2])
    side = min(x1 - x0, y1 - y0)  # aspect 'equal': the square image is centred in the axes
    ox, oy = x0 + (x1 - x0 - side) / 2, y0 + (y1 - y0 - side) / 2
    return fig[int(oy + (row + 0.5) / R * side), int(ox + (col + 0.5) / R * side)].astype(int)


def _image_area(fig: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = hm.axes_box(fig.shape[:2])
    return fig[y0 + 3:y1 - 3, x0 + 3:x1 - 3].astype(int)


# ----------------------------------------------------------------------------- maths
def test_difference_sign_brighter_followup_is_positive():
    p = _prior()
    d = hm.difference(p, _followup(p))
    assert d.dtype == np.float32 and d.shape == (R, R)
    assert np.allclose(d[20:40, 5:25], 0.3, atol=1e-6)    # brighter in follow-up -> +
    assert np.allclose(d[20:40, 40:60], -0.3, atol=1e-6)  # darker -> -
    assert np.all(d[:20] == 0)


def test_mean_change_and_uncertainty_match_numpy():
    rng = np.random.default_rng(0)
    p = rng.random((R, R), dtype=np.float32)
    s = rng.random((5, R, R), dtype=np.float32)
    np.testing.assert_allclose(hm.mean_change(p, list(s)), s.mean(axis=0) - p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hm.uncertainty(list(s)), np.std(s, axis=0), rtol=1e-5, atol=1e-6)
    # samples that agree: std 0; one sample: std 0 (nothing to disagree with)
    assert np.all(hm.uncertainty([p, p, p]) == 0)
    assert np.all(hm.uncertainty([s[0]]) == 0)
    # the mean of symmetric changes is zero although each sample changed
    assert np.allclose(hm.mean_change(p, [p + 0.1, p - 0.1]), 0, atol=1e-6)


def test_shape_mismatch_and_bad_kind_are_errors():
    with pytest.raises(ValueError, match="prior is"):
        hm.difference(np.zeros((R, R)), np.zeros((R, R + 1)))
    with pytest.raises(ValueError, match="prior is"):
        hm.mean_change(np.zeros((R, R)), [np.zeros((R - 1, R))])
    with pytest.raises(ValueError, match="list of"):
        hm.uncertainty([])
    with pytest.raises(ValueError, match="kind"):
        hm.overlay_figure(np.zeros((R, R)), np.zeros((R, R)), title="x", kind="ratio")


def test_robust_vmax_is_a_percentile_with_a_noise_floor():
    rng = np.random.default_rng(1)
    noise = rng.uniform(-0.01, 0.01, (R, R)).astype(np.float32)
    assert hm.robust_vmax(noise) == hm.DIFF_VMAX_FLOOR
    assert hm.robust_vmax(np.abs(noise), "std") == hm.STD_VMAX_FLOOR
    big = np.zeros((R, R), np.float32)
    big[:, : R // 2] = -0.4
    assert hm.robust_vmax(big) == pytest.approx(0.4)
    # one hot pixel does not set the range (it is above the 99th percentile)
    spike = big.copy()
    spike[0, -1] = 5.0
    assert hm.robust_vmax(spike) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- rendering
def test_overlay_rgb_is_the_prior_where_nothing_changed():
    p = _prior()
    rgb, vmax = hm.overlay_rgb(p, hm.difference(p, _followup(p)), smooth=0, scale="robust")
    assert vmax == pytest.approx(0.3, rel=1e-3)
    assert hm.overlay_rgb(p, hm.difference(p, _followup(p)), smooth=0)[1] == hm.FIXED_VMAX["difference"]
    np.testing.assert_allclose(rgb[:10], np.repeat(p[:10, :, None], 3, axis=2), atol=1e-6)  # untouched rows
    r, g, b = rgb[30, 15]
    assert r > b + 0.2 and r > g + 0.2            # brighter -> red
    r, g, b = rgb[30, 50]
    assert b > r + 0.2                            # darker -> blue


def test_overlay_figure_draws_red_where_brighter_and_blue_where_darker():
    p = _prior()
    fig = hm.overlay_figure(p, hm.difference(p, _followup(p)), title="Sample 1")
    assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
    r, g, b = _figure_pixel(fig, 30, 15)
    assert r > b + 60 and r > g + 60, (r, g, b)
    r, g, b = _figure_pixel(fig, 30, 50)
    assert b > r + 60, (r, g, b)
    r, g, b = _figure_pixel(fig, 5, 32)          # unchanged: plain grey
    assert max(r, g, b) - min(r, g, b) <= 3
    # the colorbar and the legend are drawn outside the image: colour to the right of it
    x0, y0, x1, y1 = hm.axes_box(fig.shape[:2])
    right = fig[y0:y1, x1 + 5:].astype(int)
    assert (right.max(axis=2) - right.min(axis=2)).max() > 100


def test_zero_difference_renders_no_strong_colour():
    p = _prior()
    rng = np.random.default_rng(2)
    for m in (np.zeros((R, R), np.float32), rng.normal(0, 0.003, (R, R)).astype(np.float32)):  # none / 8-bit noise
        area = _image_area(hm.overlay_figure(p, m, title="none"))
        assert (area.max(axis=2) - area.min(axis=2)).max() <= 12


def test_std_overlay_colours_only_where_samples_disagree():
    p = np.full((R, R), 0.5, np.float32)
    samples = np.stack([p, p, p])
    samples[0, 10:30, 10:30] += 0.3  # the samples disagree only in this block
    fig = hm.overlay_figure(p, hm.uncertainty(samples), title="std", kind="std")
    r, g, b = _figure_pixel(fig, 20, 20)
    assert max(r, g, b) - min(r, g, b) > 60       # coloured
    r, g, b = _figure_pixel(fig, 50, 50)
    assert max(r, g, b) - min(r, g, b) <= 3       # grey


# ----------------------------------------------------------------------------- colour scale
def test_fixed_scale_is_the_same_for_different_change_magnitudes():
    p = _prior()
    faint, strong = hm.difference(p, _followup(p, 0.03)), hm.difference(p, _followup(p, 0.3))
    assert hm.overlay_rgb(p, faint)[1] == hm.overlay_rgb(p, strong)[1] == hm.FIXED_VMAX["difference"] == 0.25
    assert hm.colour_range(faint, "std") == hm.colour_range(strong, "std") == hm.FIXED_VMAX["std"]
    # the per-image (robust) scale is the option that differs
    assert hm.overlay_rgb(p, faint, scale="robust")[1] < hm.overlay_rgb(p, strong, scale="robust")[1]
    # a faint change stays faint on the fixed scale (but is stretched to full colour per image)
    faint_fixed = hm.overlay_figure(p, faint, title="faint")
    faint_robust = hm.overlay_figure(p, faint, title="faint", scale="robust")
    spread = lambda fig: int(np.ptp(_figure_pixel(fig, 30, 15)))  # noqa: E731
    assert spread(faint_fixed) <= 12 and spread(faint_robust) > 60
    assert spread(hm.overlay_figure(p, strong, title="strong")) > 60
    with pytest.raises(ValueError, match="scale"):
        hm.colour_range(faint, scale="auto")


def test_figure_states_the_scale_and_nothing_is_clipped():
    p = _prior()
    m = hm.difference(p, _followup(p, 0.1))
    for kw, needle in [({}, "fixed scale: ±0.25"), ({"scale": "robust"}, "per-image scale"),
                       ({"vmax": 0.5}, "fixed scale: ±0.5"), ({"kind": "std"}, "fixed scale: 0–0.125")]:
        arg = np.abs(m) if kw.get("kind") == "std" else m
        fig = hm.figure(p, arg, title="Sample 1 (seed 0): follow-up − prior", **kw)
        fig.canvas.draw()
        cax = fig.axes[1]
        label = cax.yaxis.label
        assert needle in label.get_text(), (kw, label.get_text())
        renderer = fig.canvas.get_renderer()
        box, page = fig.get_tightbbox(renderer), fig.bbox_inches
        assert page.x0 <= box.x0 and box.x1 <= page.x1 - 0.05, (kw, box, page)  # inches, >= 5 px margin
        assert page.y0 <= box.y0 and box.y1 <= page.y1, (kw, box, page)
        lab = label.get_window_extent(renderer)
        assert 0 <= lab.x0 and lab.x1 <= fig.bbox.x1 - 5 and 0 <= lab.y0 and lab.y1 <= fig.bbox.y1, (kw, lab)
    assert hm.overlay_figure(p, m, title="x").shape == (540, 590, 3)
