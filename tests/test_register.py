"""Affine registration (biomedjourney/register.py) on synthetic chest-X-ray-like images."""
import math

import numpy as np
import pytest
from scipy import ndimage

from biomedjourney.register import DEFAULT_THRESHOLD, AffineLimits, central_window, degenerate, harmonise, ncc, register


def synthetic_cxr(size: int = 256, seed: int = 0) -> np.ndarray:
    """Body ellipse, two dark lungs, heart, ribs and a vertical gradient: (size, size) in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.3 + 0.4 * y
    body = ((x - .5) / .42) ** 2 + ((y - .55) / .5) ** 2 < 1
    img = np.where(body, img + 0.3, img * 0.3)
    for cx in (.32, .68):
        img = np.where(((x - cx) / .14) ** 2 + ((y - .45) / .28) ** 2 < 1, img - 0.35, img)
    img = np.where(((x - .55) / .13) ** 2 + ((y - .65) / .12) ** 2 < 1, img + 0.2, img)
    for k in range(6):
        img += 0.06 * np.exp(-((y - (.22 + .09 * k) - .15 * (x - .5) ** 2) / .012) ** 2) * body
    img = ndimage.gaussian_filter(img, 1.5) + 0.01 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def move(img: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Apply the (x, y) pixel affine ``t`` to an image: out(t p) = img(p)."""
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])  # (x, y) <-> (row, col)
    m = swap @ np.linalg.inv(t) @ swap
    return ndimage.affine_transform(img, m[:2, :2], m[:2, 2], order=1, mode="constant", cval=0.0)


def about_centre(linear: np.ndarray, shift, c: float = 127.5) -> np.ndarray:
    to0 = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]])
    back = np.array([[1, 0, c + shift[0]], [0, 1, c + shift[1]], [0, 0, 1.0]])
    a = np.eye(3)
    a[:2, :2] = linear
    return back @ a @ to0


def test_recovers_known_affine():
    prior = synthetic_cxr()
    th = math.radians(6)
    linear = np.array([[1.08 * math.cos(th), -math.sin(th)], [math.sin(th), 0.97 * math.cos(th)]])  # rot+scale+shear
    t = about_centre(linear, (9.0, -6.0))
    followup = move(prior, t)
    r = register(prior, followup)
    assert r.registered.shape == followup.shape
    assert r.score_before < 0.9 and r.score > 0.99, (r.score_before, r.score)
    assert r.score - r.score_before > 0.1
    inv = np.linalg.inv(t)
    np.testing.assert_allclose(r.matrix[:2, :2], inv[:2, :2], atol=0.02)  # linear part
    np.testing.assert_allclose(r.matrix[:2, 2], inv[:2, 2], atol=1.5)  # shift, px
    c = (slice(40, -40), slice(40, -40))
    err_after = np.abs(r.registered - followup)[c].mean()
    err_before = np.abs(prior - followup)[c].mean()
    assert err_after < 0.01 and err_before > 0.05, (err_after, err_before)


def test_identical_images_give_identity():
    img = synthetic_cxr(seed=1)
    r = register(img, img)
    assert r.score == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(r.matrix, np.eye(3), atol=1e-2)
    np.testing.assert_allclose(r.registered, img, atol=1e-3)


def test_different_sizes_registered_on_followup_grid():
    # same anatomy at another resolution (e.g. a 2x larger prior file): identity in physical space
    small = synthetic_cxr(128, seed=2)
    big = ndimage.zoom(small, 2.0, order=1)
    r = register(big, small)
    assert r.registered.shape == small.shape
    assert r.score > 0.98
    # the matrix maps follow-up pixels to prior pixels: x_prior ~= 2 x + 0.5
    np.testing.assert_allclose(r.matrix[:2, :2], 2 * np.eye(2), atol=0.05)


def test_unrelated_images_score_below_threshold():
    cxr = synthetic_cxr(seed=3)
    noise = ndimage.gaussian_filter(np.random.default_rng(4).random((256, 256)), 2).astype(np.float32)
    for prior, followup in ((noise, cxr), (cxr, noise)):
        r = register(prior, followup)
        assert r.score < DEFAULT_THRESHOLD, r.score
        assert math.isfinite(r.score)


def test_degenerate_transforms_rejected():
    lim = AffineLimits()
    assert degenerate(np.eye(2), np.zeros(2), lim) == ""
    assert "scale" in degenerate(np.eye(2) * 2.0, np.zeros(2), lim)
    assert "anisotropy" in degenerate(np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), lim)
    assert "reflection" in degenerate(np.diag([1.0, -1.0]), np.zeros(2), lim)
    assert "rotation" in degenerate(np.array([[0.0, -1.0], [1.0, 0.0]]), np.zeros(2), lim)
    assert "shift" in degenerate(np.eye(2), np.array([200.0, 0.0]), lim)


def test_registration_never_lowers_the_score_and_is_deterministic():
    a, b = synthetic_cxr(seed=5), np.flipud(synthetic_cxr(seed=6)).copy()  # upside-down: no good affine
    r1, r2 = register(a, b), register(a, b)
    assert r1.score >= r1.score_before
    assert r1.score == r2.score and np.array_equal(r1.matrix, r2.matrix)


def test_ncc_window_and_coverage():
    a = synthetic_cxr(seed=7)
    assert ncc(a, a) == pytest.approx(1.0)
    assert ncc(a, 1 - a) == pytest.approx(-1.0)
    assert ncc(a, a, mask=np.zeros_like(a, bool)) == -math.inf  # nothing covered


def test_harmonise_fills_out_of_view_and_matches_exposure():
    follow = synthetic_cxr(seed=3)
    t = about_centre(np.eye(2), (18.0, -12.0))  # a shift: the moved prior leaves a wedge uncovered
    prior = np.clip(0.6 * move(follow, t) + 0.25, 0, 1)  # same anatomy, other exposure (gain 0.6, offset 0.25)
    r = register(prior, follow)
    assert r.coverage is not None and r.coverage.shape == follow.shape
    assert 0.05 < (~r.coverage).mean() < 0.3  # a wedge of film edge
    assert np.abs(r.registered[~r.coverage]).max() == 0.0  # ... that resampling filled with black
    h = harmonise(r, follow)
    np.testing.assert_array_equal(h[~r.coverage], follow[~r.coverage])  # filled from the follow-up
    win = central_window(follow.shape) & r.coverage
    assert abs(h[win].mean() - follow[win].mean()) < 5e-3 and abs(h[win].std() - follow[win].std()) < 5e-3
    assert (h[r.coverage] == 0).mean() <= (follow == 0).mean() + 1e-3  # nothing crushed to black
    before, after = np.abs(r.registered - follow).mean(), np.abs(h - follow).mean()
    assert after < 0.3 * before, (before, after)
    # both switches off: the registered prior as it was
    np.testing.assert_allclose(harmonise(r, follow, match_exposure=False, fill_out_of_view=False), r.registered)
    with pytest.raises(ValueError, match="differ in shape"):
        harmonise(r, follow[:100])
