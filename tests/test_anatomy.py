"""Lung anatomy of a prior: the side convention, zones, heart, segment() with its atlas fallback, the CLI,
and the shipped segmenter's validation Dice."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from biomedjourney import anatomy as A
from biomedjourney.dataset import has_data, missing_data_reason

SHIPPED = A.segmenter_path()
needs_segmenter = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                                     reason=f"no shipped segmenter at {SHIPPED}")


pytestmark = pytest.mark.usefixtures("one_thread")


def _centroid_x(m: np.ndarray) -> float:
    return float(np.nonzero(np.asarray(m) > 0.5)[1].mean())


# ------------------------------------------------------------------------------ side convention
def test_patient_right_is_the_image_left():
    assert A.PATIENT_RIGHT_ON_IMAGE == "left"
    assert A.image_half("right", 256) == slice(0, 128)
    assert A.image_half("left", 256) == slice(128, 256)
    img = np.full((256, 256), 0.8, np.float32)
    img[50:210, 30:110] = 0.1                     # dark lung only on the IMAGE's left half
    right, left = A.split_lungs_by_side(img < 0.5)
    assert right.sum() == (img < 0.5).sum() > 0
    assert right[:, 128:].sum() == 0 and left.sum() == 0
    two = img < 0.5
    two[60:200, 150:225] = True                   # add the image-right lung
    right, left = A.split_lungs_by_side(two)
    assert _centroid_x(right) < 128 < _centroid_x(left)
    atlas = A.atlas_anatomy((256, 256))
    assert _centroid_x(atlas.right_lung) < 128 < _centroid_x(atlas.left_lung)
    assert atlas.lung("right") is atlas.right_lung


# ------------------------------------------------------------------------------ zones
@pytest.mark.parametrize("side", ["right", "left"])
def test_zones_partition_each_lung(side):
    an = A.atlas_anatomy((256, 256))
    lung = an.lung(side)
    thirds = [an.zone(side, z) for z in ("upper", "middle", "lower")]
    np.testing.assert_allclose(sum(thirds), lung, atol=1e-6)
    assert all(((a > 0) & (b > 0)).sum() == 0 for i, a in enumerate(thirds) for b in thirds[i + 1:])
    assert all(0.2 < t.sum() / lung.sum() < 0.5 for t in thirds)
    for z in A.ZONES:
        m = an.zone(side, z)
        assert m.dtype == np.float32 and m.shape == lung.shape and (m <= lung + 1e-6).all()
        assert m.sum() > 0, z
    np.testing.assert_array_equal(an.zone(side, "none"), lung)
    assert (an.zone(side, "apex") <= an.zone(side, "upper")).all()
    assert (an.zone(side, "base") <= an.zone(side, "lower")).all()
    rows = lambda m: np.nonzero(m > 0.5)[0]  # noqa: E731
    assert rows(an.zone(side, "apex")).max() < rows(an.zone(side, "base")).min()
    # perihilar is medial, the costophrenic angle lateral and low
    mid = 128
    dist = lambda m: abs(_centroid_x(m) - mid)  # noqa: E731
    assert dist(an.zone(side, "perihilar")) < dist(lung) < dist(an.zone(side, "costophrenic angle"))
    assert rows(an.zone(side, "costophrenic angle")).mean() > rows(lung).mean()


def test_bilateral_zone_aliases_and_errors():
    an = A.atlas_anatomy((256, 256))
    both = an.zone("bilateral", "base")
    np.testing.assert_array_equal(both, np.maximum(an.zone("right", "base"), an.zone("left", "base")))
    np.testing.assert_array_equal(an.zone("none", "none"), an.lung("bilateral"))
    np.testing.assert_array_equal(an.zone("right", "costophrenic"), an.zone("right", "costophrenic angle"))
    np.testing.assert_array_equal(an.region("heart"), an.heart)
    with pytest.raises(ValueError, match="unknown zone"):
        an.zone("right", "elbow")


def test_heart_is_estimated_between_the_lungs():
    an = A.atlas_anatomy((256, 256))
    heart = A.estimate_heart(an.right_lung, an.left_lung) > 0.5
    atlas_heart = an.heart > 0.5
    assert (heart & atlas_heart).sum() > 0.5 * heart.sum()   # mostly where the atlas puts the heart
    assert 0.03 < heart.mean() < 0.15
    assert _centroid_x(an.right_lung) < _centroid_x(heart) < _centroid_x(an.left_lung)
    lung_rows = np.nonzero(an.lung("bilateral") > 0.5)[0]
    assert np.nonzero(heart)[0].max() <= lung_rows.max()
    assert np.nonzero(heart)[0].mean() > lung_rows.mean()
    assert A.estimate_heart(an.right_lung, np.zeros_like(an.left_lung)).sum() == 0


# ------------------------------------------------------------------------------ segment()
@needs_segmenter
@pytest.mark.parametrize("kind", ["noise", "near-blank"])
def test_atlas_fallback_with_warning(kind):
    rng = np.random.default_rng(0)
    img = rng.random((300, 300)) if kind == "noise" else 0.5 + 0.01 * rng.random((300, 300))
    an = A.segment(img)
    assert an.source == "atlas"
    assert len(an.warnings) == 1 and "using the average anatomy" in an.warnings[0]
    assert "could not be found reliably" in an.warnings[0]
    np.testing.assert_array_equal(an.right_lung, A.atlas_anatomy((256, 256)).right_lung)


def test_missing_segmenter_falls_back(monkeypatch, tmp_path, rg1_path):
    monkeypatch.setenv(A.SEGMENTER_ENV, str(tmp_path / "nothing"))
    assert A.segmenter_path() == tmp_path / "nothing"
    an = A.segment(rg1_path)
    assert an.source == "atlas" and "segmenter is not available" in an.warnings[0]


def test_unreadable_input_raises_the_image_error(tmp_path):
    from biomedjourney.imaging import ImageLoadError
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError):
        A.segment(bad)


@needs_segmenter
def test_segment_real_radiograph(rg1_path):
    an = A.segment(rg1_path)
    assert an.source == "network", an.warnings
    assert an.warnings == []
    assert an.shape == (256, 256) and an.right_lung.dtype == np.float32
    r, l = an.right_lung > 0.5, an.left_lung > 0.5
    for m in (r, l):
        assert 0.05 < m.mean() < 0.3
    assert r[:, 128:].sum() < 0.1 * r.sum() and l[:, :128].sum() < 0.1 * l.sum()
    assert (r & l).sum() == 0
    assert A.plausibility_problems(r, l) == []
    h = an.heart > 0.5
    assert 0.02 < h.mean() < 0.2 and _centroid_x(r) < _centroid_x(h) < _centroid_x(l)
    np.testing.assert_allclose(sum(an.zone("left", z) for z in ("upper", "middle", "lower")), an.left_lung,
                               atol=1e-6)
    small = A.segment(rg1_path, size=128)
    assert small.shape == (128, 128)
    assert A.default_segmenter() is A.default_segmenter()  # loaded once
    cs = an.cardiac                                       # the heart's borders read from the film
    assert cs is not None and 0.35 < cs.ctr < 0.6 and cs.low < _centroid_x(h) < cs.high
    assert small.cardiac is not None and small.cardiac.ctr == pytest.approx(cs.ctr)


def _heart_film(low: int, high: int, seed: int = 0):
    """(256, 256) film: dark lungs with rib-like stripes and vessel noise, a bright heart between image columns
    low..high in the heart's rows; with the atlas masks (the estimated heart is NOT where this one is)."""
    an = A.atlas_anatomy((256, 256))
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256]
    lungs = an.lung("bilateral") > 0.5
    ribs = np.sin(2 * np.pi * (y + 0.4 * np.abs(x - 128)) / 22) > 0.3
    img = 0.7 - 0.4 * lungs + 0.08 * ribs * lungs + 0.03 * rng.standard_normal((256, 256)) * lungs
    rows = np.nonzero((an.heart > 0.5).any(1))[0]
    heart = (x >= low) & (x <= high) & (y >= rows[0]) & (y <= rows[-1] + 10)
    return np.clip(np.where(heart, 0.8, img), 0, 1).astype(np.float32), an


@pytest.mark.parametrize("low,high", [(95, 175), (100, 168), (88, 181)])
def test_measure_cardiac_finds_the_borders_on_the_film(low, high):
    img, an = _heart_film(low, high)
    cs = A.measure_cardiac(img, an.heart > 0.5, an.lung("bilateral") > 0.5)
    assert cs is not None and abs(cs.low - low) <= 2 and abs(cs.high - high) <= 2
    cols = np.nonzero((an.lung("bilateral") > 0.5).any(0))[0]
    assert cs.ctr == pytest.approx((high - low) / (cols[-1] - cols[0] + 1), abs=0.02)
    flat = np.full((256, 256), 0.5, np.float32)                                  # no border: not measured
    assert A.measure_cardiac(flat, an.heart > 0.5, an.lung("bilateral") > 0.5) is None


@needs_segmenter
@pytest.mark.parametrize("change", ["low contrast", "gamma", "blur+noise"])
def test_segment_is_robust_to_intensity_changes(rg1_path, change):
    from scipy import ndimage

    from biomedjourney.imaging import read_image, to_model_input
    x = to_model_input(read_image(rg1_path).pixels)
    y = {"low contrast": lambda: 0.35 + 0.3 * x, "gamma": lambda: x ** 2,
         "blur+noise": lambda: ndimage.gaussian_filter(x, 1.5)
         + 0.03 * np.random.default_rng(0).standard_normal(x.shape)}[change]()
    ref, an = A.segment(x), A.segment(np.clip(y, 0, 1).astype(np.float32))
    assert an.source == "network", an.warnings
    for side in ("right", "left"):
        a, b = ref.lung(side) > 0.5, an.lung(side) > 0.5
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


@needs_segmenter
def test_shipped_segmenter_files():
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["classes"] == list(A.SEGMENTER_CLASSES)
    assert cfg["dtype"] == "float16" and cfg["data"]["masks_licence"].startswith("CC BY 4.0")
    assert (SHIPPED / "model.safetensors").stat().st_size <= 6.5e6
    from safetensors import safe_open
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} <= {"torch.float16", "torch.int64"}


@needs_segmenter
@pytest.mark.skipif(not has_data(), reason=missing_data_reason())
def test_shipped_metrics_dice():
    m = json.loads((SHIPPED / "metrics.json").read_text())
    assert m["split"] == "val" and m["n_images"] >= 30
    assert m["dice"]["right_lung"] >= 0.90 and m["dice"]["left_lung"] >= 0.90, m["dice"]


# ------------------------------------------------------------------------------ CLI
@needs_segmenter
def test_cli_anatomy_writes_four_pngs(tmp_path, rg1_path, capsys):
    from biomedjourney.cli import main
    out = tmp_path / "anat"
    assert main(["anatomy", "--prior", rg1_path, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "source: network" in printed.out
    for name in ("right_lung", "left_lung", "heart"):
        a = np.asarray(Image.open(out / f"{name}.png"))
        assert a.shape == (256, 256) and set(np.unique(a)) <= {0, 255} and a.max() == 255
    r = np.asarray(Image.open(out / "right_lung.png"))
    assert _centroid_x(r) < 128
    ov = Image.open(out / "overlay.png")
    assert ov.mode == "RGB" and ov.size == (256, 256)


def test_cli_anatomy_unreadable_file(tmp_path, capsys):
    from biomedjourney.cli import main
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["anatomy", "--prior", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "o").exists()
