"""Knowledge-driven rendering: each finding drawn inside its region, with the right sign of density."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from biomedjourney import dataset
from biomedjourney.anatomy import atlas_anatomy
from biomedjourney.findings.schema import Finding
from biomedjourney.masks import (EFFUSION_BELOW, EFFUSION_WALL, cardiac_displacement, diaphragm_lift, effusion_depth,
                                 finding_mask, lowest_row, lung_frame, pneumothorax_distance, pneumothorax_width)
from biomedjourney.render import RENDERED_FINDINGS, measure_levels, render_findings

A = atlas_anatomy((256, 256))


def phantom(heart_level: float = 0.85, seed: int = 0) -> np.ndarray:
    """(256, 256) chest phantom on the atlas: bright soft tissue, dark lungs with fine vessel-like texture."""
    rng = np.random.default_rng(seed)
    lungs = A.lung("bilateral")
    fine = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 1.0)
    img = 0.7 - 0.4 * lungs + 0.25 * fine * lungs
    img = np.where(A.heart > 0.5, heart_level, img)
    return np.clip(img, 0, 1).astype(np.float32)


PRIOR = phantom()


def rib_phantom(slope: float = 0.0) -> np.ndarray:
    """(256, 256) dark lungs crossed by bright 8-px ribs every 22 px (rising `slope` px per column away from the
    midline, as posterior ribs do), nothing else: what must stay put."""
    y, x = np.mgrid[0:256, 0:256]
    lungs = A.lung("bilateral")
    ribs = np.sin(2 * np.pi * (y + slope * np.abs(x - 128)) / 22) > 0.3
    return (0.7 - 0.4 * lungs + 0.12 * ribs * lungs).astype(np.float32)


def render(*findings, seed=0, prior=PRIOR):
    return render_findings(prior, list(findings), A, torch.Generator().manual_seed(seed))


CASES = [Finding(name="pleural effusion", side="right"), Finding(name="pulmonary edema", severity="severe"),
         Finding(name="consolidation", side="right", zone="upper"), Finding(name="atelectasis", side="left"),
         Finding(name="cardiomegaly", severity="severe"), Finding(name="pneumothorax", side="right"),
         Finding(name="nodule", side="left", zone="upper"), Finding(name="mass", side="right", zone="lower"),
         Finding(name="opacity"), Finding(name="pleural effusion", side="left", change="decreased")]


@pytest.mark.parametrize("f", CASES, ids=lambda f: f.chip())
def test_changes_only_inside_its_region(f):
    prior = render(Finding(name="pleural effusion", side="left", severity="severe")).image \
        if f.change == "decreased" else PRIOR
    r = render(f, prior=prior)
    change = np.abs(r.image - prior)
    assert change.sum() > 5, "nothing was drawn"
    region = finding_mask(f, A)[0]
    assert change[region < 0.01].sum() < 0.01 * change.sum()
    assert r.image.dtype == np.float32 and 0 <= r.image.min() and r.image.max() <= 1
    assert np.allclose(r.mask, region) and "knowledge-driven rendering" in r.notes[0]


def test_effusion_brightens_the_base_on_its_side():
    r = render(Finding(name="pleural effusion", side="right", severity="moderate"))
    f = lung_frame(A, "right")
    base = np.zeros_like(PRIOR, bool)
    base[f.bottom - int(0.15 * f.height):f.bottom] = True
    base &= (A.right_lung > 0.5) & (A.heart < 0.5)
    gain = r.image - PRIOR
    assert gain[base].mean() > 0.15
    assert gain[: f.top + f.height // 2].max() < 0.02                              # not the upper lung
    assert np.abs(gain[:, :128]).sum() > 0.97 * np.abs(gain).sum()                # image left = patient's right
    assert "meniscus" in r.notes[0]


def test_effusion_edges_fade_no_box():
    """The fluid thins toward the meniscus and fades into the heart medially: no straight cut at the region's medial
    column where fluid (as bright as the liver below) is brighter than a dim cardiac shadow, no sharp fluid level."""
    f = lung_frame(A, "right")
    prior = phantom(heart_level=0.6)
    prior[f.bottom + 2:] = np.maximum(prior[f.bottom + 2:], 0.9)                  # liver / abdomen brighter than heart
    gain = render(Finding(name="pleural effusion", side="right", severity="moderate"), prior=prior).image - prior
    d = effusion_depth(A, "right", "moderate")
    row = f.bottom - 5
    cols = np.nonzero(d[row] > 0)[0]
    medial_end = cols.max()                                                      # right lung: medial = higher columns
    assert gain[row, medial_end - 3:medial_end + 1].max() < 0.25 * gain[row, cols].max()
    col = (f.medial + f.lateral) // 2
    top = np.nonzero(d[:, col] > 0)[0].min()
    assert gain[top + 4, col] < 0.3 * gain[top + 30, col]                        # hazy meniscus, not a level


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_stays_inside_the_ribs(side):
    """The fluid lies inside the chest wall: lateral to the lung's edge of each row (plus EFFUSION_WALL) and below
    the costophrenic angle the chest and abdominal wall keep their brightness, so no vertical box edge appears there
    on a film whose wall is darker than fluid; inside the lung the base does brighten."""
    f = lung_frame(A, side)
    prior = phantom()
    prior[f.bottom + 2:] = np.maximum(prior[f.bottom + 2:], 0.9)                  # liver / spleen: brighter than wall
    gain = render(Finding(name="pleural effusion", side=side, severity="severe"), prior=prior).image - prior
    edge = f.lateral_edge()                                                       # (H,) lateral lung column per row
    x = np.arange(256)[None, :]
    wall = (x - edge[:, None]) * f.lateral_sign > EFFUSION_WALL + 1               # the chest / abdominal wall
    wall[: f.top] = False
    assert np.abs(gain[wall]).max() < 0.02
    base = (lung_frame(A, side).core & (np.arange(256)[:, None] > f.bottom - 0.2 * f.height))
    assert gain[base & (A.heart < 0.5)].mean() > 0.1


def test_effusion_fades_out_below_the_lung():
    """Below the lung mask's lowest row (the pleural space past the hemidiaphragm) the fluid fades out, so a gastric
    bubble there keeps most of its lucency instead of ending in a horizontal edge."""
    f = lung_frame(A, "left")
    below = int(EFFUSION_BELOW * f.height)
    prior = PRIOR.copy()
    prior[f.bottom + 3:f.bottom + below + 3] = 0.35                              # gas under the left hemidiaphragm
    gain = render(Finding(name="pleural effusion", side="left", severity="moderate"), prior=prior).image - prior
    col = (f.medial + f.lateral) // 2
    assert gain[f.bottom + int(0.75 * below), col] < 0.3 * gain[f.bottom - 10, col]


def test_lower_lobe_collapse_raises_the_hemidiaphragm_and_densifies_a_medial_wedge():
    f = lung_frame(A, "right")
    r = render(Finding(name="atelectasis", side="right", zone="lower", severity="moderate"))
    gain = r.image - PRIOR
    col = int(f.medial + 0.8 * (f.lateral - f.medial))                           # lateral base: outside the wedge
    def dome(img):                                                               # first row, from mid-lung down, of the
        rows = np.arange(f.top + f.height // 2, 256)                             # body below the lung
        return int(rows[np.argmax(ndimage.uniform_filter1d(img[rows, col], 5) > 0.6)])
    assert dome(PRIOR) - dome(r.image) >= 0.5 * 0.07 * f.height                   # raised (DIAPHRAGM_LIFT moderate)
    rows = slice(f.bottom - int(0.3 * f.height), f.bottom - int(0.1 * f.height))
    lungs = (A.right_lung > 0.5) & (A.heart < 0.5)
    medial = np.zeros_like(lungs)
    medial[rows, f.medial - 25:f.medial - 5] = True                              # right lung: medial = higher columns
    lateral = np.zeros_like(lungs)
    lateral[rows, col - 10:col] = True
    assert gain[medial & lungs].mean() > 0.15                                    # the airless lobe, medially
    assert gain[lateral & lungs].mean() < 0.5 * gain[medial & lungs].mean()
    assert "lobar collapse" in r.notes[0]
    assert "plate-like" in render(Finding(name="atelectasis", side="right", zone="base")).notes[0]


def test_lower_lobe_collapse_moves_the_hemidiaphragm_not_the_ribs():
    """The ribs are the chest wall: they stay where they are when the lobe collapses and the dome rises."""
    y, prior = np.mgrid[0:256, 0:256][0], rib_phantom()
    r = render(Finding(name="atelectasis", side="right", zone="lower", severity="severe"), prior=prior)
    f = lung_frame(A, "right")
    lateral = np.abs(np.arange(256) - f.lateral) < 0.4 * abs(f.lateral - f.medial)   # outside the medial wedge
    in_lung = A.right_lung > 0.5
    dome = lowest_row(in_lung, empty=255)                                         # (W,) each column's lowest lung row
    lift = int(np.ceil(diaphragm_lift(A, "right", "severe").max()))
    reg = in_lung & lateral[None, :] & (y > f.top + 0.5 * f.height) & (y < dome[None, :] - lift - 12)  # stays lung
    fine = lambda img: img - ndimage.gaussian_filter(img, 6)
    c = np.corrcoef(fine(prior)[reg], fine(r.image)[reg])[0, 1]
    assert reg.sum() > 500 and c > 0.95, f"rib pattern correlation {c:.2f} over {reg.sum()} px"   # plain warp: 0.57


def test_airspace_opacity_is_ill_defined_toward_spared_lung_but_sharp_at_the_minor_fissure():
    from biomedjourney.masks import airspace_region
    lungs = (A.right_lung > 0.5) & (A.heart < 0.5)
    def band_gain(f, rows_from_edge, edge):                                     # mean gain over seeds in a row band
        g = np.mean([render(f, seed=k).image - PRIOR for k in range(4)], 0)
        rows = np.arange(256)[:, None]
        band = (rows >= edge + rows_from_edge[0]) & (rows < edge + rows_from_edge[1]) & lungs
        return g[band].mean()
    pna = Finding(name="pneumonia", side="right", severity="severe")             # no zone: lower two thirds
    top = np.nonzero(airspace_region(pna, A).any(1))[0].min()
    assert band_gain(pna, (0, 5), top) < 0.4 * band_gain(pna, (25, 35), top)
    rul = Finding(name="consolidation", side="right", zone="upper", severity="severe")
    bottom = np.nonzero(airspace_region(rul, A).any(1))[0].max()
    assert band_gain(rul, (-5, 0), bottom) > 0.6 * band_gain(rul, (-35, -25), bottom)


def test_effusion_density_follows_this_prior():
    bright, dim = (render(Finding(name="pleural effusion", side="right"), prior=phantom(h)).image for h in (0.9, 0.6))
    f = lung_frame(A, "right")
    rows = slice(f.bottom - 12, f.bottom - 4)
    cols = slice(f.lateral + 20, f.lateral + 40)
    assert bright[rows, cols].mean() > dim[rows, cols].mean() + 0.1
    assert measure_levels(phantom(0.9), A).soft_tissue > measure_levels(phantom(0.6), A).soft_tissue


def _heart_width(img: np.ndarray) -> int:
    """Columns of the bright central band on the heart's middle row (run around the heart centre)."""
    rows, cols = np.nonzero(A.heart > 0.5)
    y, cx = int(rows.mean()), int(cols.mean())
    bright = ndimage.uniform_filter1d(img[y - 2:y + 3].mean(0), 3) > 0.6
    lab, _ = ndimage.label(bright)
    return int((lab == lab[cx]).sum())


def test_cardiomegaly_widens_the_heart():
    before = _heart_width(PRIOR)
    widths = [_heart_width(render(Finding(name="cardiomegaly", severity=s)).image) for s in ("mild", "severe")]
    assert before * 1.05 < widths[0] < widths[1]
    assert widths[1] > before * 1.12
    smaller = _heart_width(render(Finding(name="cardiomegaly", change="decreased")).image)
    assert smaller < before


@pytest.mark.parametrize("low,high", [(100, 168), (92, 178), (80, 192)])
def test_cardiomegaly_reaches_the_ctr_its_severity_names(low, high):
    """With the borders read from the film, the drawn heart's widest extent grows by CTR_STEP of the thorax
    (measured here by a threshold on the film, not by the measurement the drawing used)."""
    import dataclasses

    from biomedjourney.anatomy import measure_cardiac
    from biomedjourney.masks import CTR_FLOOR, CTR_STEP
    y, x = np.mgrid[0:256, 0:256]
    lungs = A.lung("bilateral") > 0.5
    rows = np.nonzero((A.heart > 0.5).any(1))[0]
    prior = np.where((x >= low) & (x <= high) & (y >= rows[0]) & (y <= rows[-1] + 10), np.float32(0.8),
                     (0.7 - 0.4 * lungs).astype(np.float32))
    an = dataclasses.replace(A, cardiac=measure_cardiac(prior, A.heart > 0.5, lungs))
    cols = np.nonzero(lungs.any(0))[0]
    thorax = cols[-1] - cols[0] + 1
    assert an.cardiac is not None and an.cardiac.ctr == pytest.approx((high - low) / thorax, abs=0.03)

    def ctr(img):   # the bright run around the heart's centre, median over the rows of its lower half
        band = img[rows[0] + (rows[-1] - rows[0]) // 2: rows[-1] - 20] > 0.75
        runs = [int((ndimage.label(r)[0] == ndimage.label(r)[0][(low + high) // 2]).sum()) for r in band]
        return float(np.median(runs)) / thorax

    before = ctr(prior)
    drawn = {s: ctr(render_findings(prior, [Finding(name="cardiomegaly", severity=s)], an).image)
             for s in ("mild", "moderate", "severe")}
    for s, v in drawn.items():
        if high - low < 100:   # (a heart as wide as 0.6 of the thorax has little lung left to widen into)
            assert v - before == pytest.approx(CTR_STEP[s], abs=0.025), (s, before, v)
    assert before < drawn["mild"] < drawn["moderate"] < drawn["severe"]
    note = render_findings(prior, [Finding(name="cardiomegaly", severity="severe")], an).notes[0]
    assert f"cardiothoracic ratio {an.cardiac.ctr:.2f} -> {an.cardiac.ctr + CTR_STEP['severe']:.2f}" in note
    smaller = ctr(render_findings(prior, [Finding(name="cardiomegaly", change="decreased")], an).image)
    assert smaller == pytest.approx(max(before - CTR_STEP["moderate"], min(before, CTR_FLOOR)), abs=0.025)


def test_cardiomegaly_moves_the_heart_not_the_ribs_or_the_diaphragm():
    """The widened heart pushes the lung aside; the chest wall (sloping ribs) and the domes under it stay put."""
    heart = A.heart > 0.5
    prior = np.where(heart, np.float32(0.85), rib_phantom(slope=0.4))
    out = render(Finding(name="cardiomegaly", severity="severe"), prior=prior).image
    dx = cardiac_displacement(A, "severe")
    grown = ndimage.binary_dilation(heart, iterations=int(np.abs(dx).max()) + 1)   # the widest the heart gets
    beside = ((np.abs(dx) > 1) & ~ndimage.binary_dilation(grown, iterations=8)
              & ndimage.binary_erosion(A.lung("bilateral") > 0.5, iterations=3))     # lung that the warp moved
    fine = lambda a: (a - ndimage.gaussian_filter(a, 8))[beside]
    assert beside.sum() > 500 and np.corrcoef(fine(out), fine(prior))[0, 1] > 0.97      # warp alone: 0.70
    thorax = heart | (A.lung("bilateral") > 0.5)
    floor = lowest_row(thorax, empty=256)[None, :]                                   # (1, W) lowest row
    dome = (np.abs(np.arange(256)[:, None] - floor) <= 3) & (np.abs(dx).max(0) > 1)[None, :] & ~grown
    assert dome.sum() > 50 and np.abs(out - prior)[dome].mean() < 0.03                 # warp alone: 0.061
    assert _heart_width(out) > _heart_width(prior) * 1.12


INNER_RIGHT = ndimage.binary_erosion(A.right_lung > 0.99, iterations=3)     # off the lung's own border


def test_pneumothorax_space_is_darker_and_smoother():
    r = render(Finding(name="pneumothorax", side="right", severity="moderate"))
    d, fr = pneumothorax_distance(A, "right")
    space = (d < pneumothorax_width(fr, "moderate") - 2) & (d > 3) & INNER_RIGHT   # off the soft wall edge
    def fine(img):                                                                 # high-pass: the lung markings
        return img - ndimage.gaussian_filter(img, 2)
    assert r.image[space].mean() < PRIOR[space].mean() - 0.02
    assert fine(r.image)[space].std() < 0.5 * fine(PRIOR)[space].std()
    line = (np.abs(d - pneumothorax_width(fr, "moderate")) < 0.7) & (A.right_lung > 0.99)
    assert r.image[line].mean() > r.image[space].mean() + 0.05                    # the white pleural line


def test_pneumothorax_keeps_the_ribs_sharp_across_the_space():
    """Ribs are bone and stay visible across a pneumothorax, edges and all; only the lung markings go."""
    prior = rib_phantom()
    r = render(Finding(name="pneumothorax", side="right", severity="moderate"), prior=prior)
    d, fr = pneumothorax_distance(A, "right")
    space = (d < pneumothorax_width(fr, "moderate") - 2) & (d > 3) & INNER_RIGHT
    edges = lambda img: img - ndimage.gaussian_filter(img, 2)                      # the ribs' cortical edges
    kept = edges(r.image)[space].std() / edges(prior)[space].std()
    assert kept > 0.8, f"rib edges kept {kept:.2f}"


def test_same_seed_same_image_different_seeds_differ():
    f = Finding(name="consolidation", side="right")
    assert np.array_equal(render(f, seed=3).image, render(f, seed=3).image)
    assert np.abs(render(f, seed=3).image - render(f, seed=4).image).mean() > 1e-3
    assert np.array_equal(render_findings(PRIOR, [f], A).image, render_findings(PRIOR, [f], A).image)


def test_decreased_effusion_darkens_the_base():
    effused = render(Finding(name="pleural effusion", side="left", severity="severe")).image
    r = render(Finding(name="pleural effusion", side="left", change="resolved"), prior=effused)
    f = lung_frame(A, "left")
    base = np.zeros_like(PRIOR, bool)
    base[f.bottom - 20:f.bottom - 5] = True
    base &= (A.left_lung > 0.5) & (A.heart < 0.5)
    assert r.image[base].mean() < effused[base].mean() - 0.1
    assert "approximate" in r.notes[0]


def test_resolved_removes_only_excess_density_and_keeps_the_lungs_gradient():
    rows = np.linspace(0, 0.12, 256, dtype=np.float32)[:, None]                  # bases brighter than apices
    prior = np.clip(PRIOR + rows * A.lung("bilateral"), 0, 1).astype(np.float32)
    lungs = (A.lung("bilateral") > 0.5) & (A.heart < 0.5)
    for f in (Finding(name="atelectasis", side="right", change="resolved"),
              Finding(name="pneumonia", change="resolved")):
        clear = render(f, prior=prior).image                                    # nothing there to remove
        assert np.abs(clear - prior)[lungs].max() < 0.03, f.chip()              # no lucent band, no flattening
    sick = render(Finding(name="pneumonia", side="right", severity="severe"), prior=prior).image
    healed = render(Finding(name="pneumonia", side="right", change="resolved"), prior=sick).image
    region = (finding_mask(Finding(name="pneumonia", side="right"), A)[0] > 0.5) & lungs
    added = (sick - prior)[region].mean()
    assert added > 0.1 and (healed - prior)[region].mean() < 0.35 * added     # most of the opacity is gone
    assert "removed" in render(Finding(name="pneumonia", side="right", change="resolved"), prior=sick).notes[0]


def test_unchanged_and_unrendered_findings_leave_the_prior():
    r = render(Finding(name="pleural effusion", side="right", change="unchanged"), Finding(name="fracture"))
    assert np.array_equal(r.image, PRIOR) and r.mask.max() == 0
    assert "nothing drawn" in r.notes[0] and "not rendered" in r.notes[1]
    assert {"pleural effusion", "pulmonary edema", "cardiomegaly", "pneumothorax", "consolidation"} <= RENDERED_FINDINGS
    assert "fracture" not in RENDERED_FINDINGS


def test_edema_is_bilateral():
    gain = render(Finding(name="pulmonary edema")).image - PRIOR
    left, right = np.abs(gain[:, :128]).sum(), np.abs(gain[:, 128:]).sum()
    assert 0.5 < left / right < 2 and gain.sum() > 0


def _hilar_phantom(seed: int = 0, blob: bool = False) -> np.ndarray:
    """PRIOR-like film whose lungs are denser at their medial third in every row (as hila and the mediastinal
    edge make normal lungs), optionally with a dense lateral blob in the right lung (a finding)."""
    img = phantom(seed=seed)
    for side in ("right", "left"):
        f = lung_frame(A, side)
        img = img + 0.12 * ((f.lateralness() < 0.33)[None, :] * f.core)
    if blob:
        f = lung_frame(A, "right")
        y, x = np.mgrid[0:256, 0:256]
        cx = f.medial + 0.75 * (f.lateral - f.medial)
        img = img + 0.25 * np.exp(-(((y - (f.top + 0.55 * f.height)) / 14) ** 2 + ((x - cx) / 10) ** 2)) * f.core
    return np.clip(img, 0, 1).astype(np.float32)


def test_removal_lowers_only_density_beyond_what_normal_lungs_show():
    """A normal-lung table fitted on films that are all denser medially keeps that density; the same removal without
    a table (the EXCESS_MARGIN fallback) takes it away; a lateral opacity goes either way."""
    from biomedjourney.render import fit_normal_residuals
    table = fit_normal_residuals([_hilar_phantom(seed=s) for s in range(4)], [A] * 4)
    assert table.shape == (12, 6) and table[:, 0].mean() > table[:, 3].mean() + 2    # the medial cells are denser
    sick = _hilar_phantom(seed=9, blob=True)
    f = lung_frame(A, "right")
    medial = f.core & (f.lateralness() < 0.25)[None, :] & (A.heart < 0.05)
    blob = f.core & (np.abs(np.arange(256)[:, None] - (f.top + 0.55 * f.height)) < 8) \
        & (np.abs(f.lateralness() - 0.75) < 0.08)[None, :]
    resolved = Finding(name="pneumonia", change="resolved")
    lost = lambda img, r, where: (img - r.image)[where].mean()                    # noqa: E731
    with_table = render_findings(sick, [resolved], A, normal=table)
    without = render_findings(sick, [resolved], A, normal=None)
    assert lost(sick, with_table, blob) > 0.08 and lost(sick, without, blob) > 0.08   # the finding goes either way
    assert lost(sick, with_table, medial) < 0.6 * lost(sick, without, medial)
    normal = _hilar_phantom(seed=9)                                               # nothing to remove: little goes
    assert lost(normal, render_findings(normal, [resolved], A, normal=table), medial) \
        < 0.4 * lost(normal, render_findings(normal, [resolved], A, normal=None), medial)
    assert "normal lungs" in with_table.notes[0] and "aerated baseline" in without.notes[0]


def test_the_shipped_normal_lung_table_is_read_and_denser_medially_and_at_the_bases():
    import json

    from biomedjourney.anatomy import segmenter_path
    from biomedjourney.render import NORMAL_FILE, NORMAL_GRID, normal_residuals
    table = normal_residuals()
    meta = json.loads((segmenter_path() / NORMAL_FILE).read_text())
    assert table.shape == NORMAL_GRID and np.isfinite(table).all() and meta["films"] >= 100
    assert table[:, 0].mean() > table[:, 2].mean() and table[-2:].mean() > table[3:6].mean()   # hila, domes


def test_a_bad_normal_lung_table_is_refused(tmp_path):
    import json

    from biomedjourney.render import NORMAL_FILE, normal_residuals
    (tmp_path / NORMAL_FILE).write_text(json.dumps({"table": [[1.0, 2.0]]}))
    with pytest.raises(ValueError, match="fit_normal_lungs"):
        normal_residuals(tmp_path)
    assert normal_residuals(tmp_path / "none") is None                            # no table: the fallback


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_fit_normal_lungs_writes_a_table_the_removal_reads(tmp_path):
    import importlib.util
    from pathlib import Path

    from biomedjourney.render import NORMAL_FILE, normal_residuals
    script = Path(__file__).resolve().parents[1] / "train" / "fit_normal_lungs.py"
    spec = importlib.util.spec_from_file_location("fit_normal_lungs", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--limit", "6", "--out", str(tmp_path / NORMAL_FILE)])
    assert out["films"] + out["left_out_segmenter_fallback"] == 6 and out["quantile"] == 90
    assert normal_residuals(tmp_path).shape == (12, 6)
    assert all(r.labels == ["No Finding"] for r in mod.normal_training_rows())


def test_outside_the_lungs_the_region_is_only_where_the_drawing_changed_the_film():
    """The pleural space reaches below the dome, but where the film there is already denser than fluid (the liver)
    the drawing changes nothing, and the edit region then stops short of it; inside the lungs it stays whole, and
    the region of a finding nobody drew (`free`) is kept."""
    from biomedjourney.masks import DRAWN_AT, confine_to_drawing, finding_mask
    f = lung_frame(A, "right")
    prior = phantom()
    prior[f.bottom + 2:] = np.maximum(prior[f.bottom + 2:], 0.9)                  # liver: denser than fluid
    effusion = Finding(name="pleural effusion", side="right", severity="moderate")
    drawn = render_findings(prior, [effusion], A)
    region = finding_mask(effusion, A)[0]
    change = np.abs(drawn.image - prior)
    out = confine_to_drawing(region, change, A)
    lungs = A.lung("bilateral") > 0.5
    far = ndimage.distance_transform_edt(~(lungs | (change > DRAWN_AT))) > 18     # beyond every margin and feather
    assert region[far].max() > 0.9 and out[far].max() < 1e-3
    np.testing.assert_array_equal(out[lungs], region[lungs])
    free = np.zeros_like(region)
    free[far] = 1
    assert confine_to_drawing(region, change, A, free)[far].min() == 1
    assert drawn.undrawn == [] and effusion not in drawn.undrawn
    gone = Finding(name="pneumothorax", side="right", change="resolved")
    assert render_findings(prior, [effusion, gone], A).undrawn == [gone]   # a re-expanded lung is not drawn
