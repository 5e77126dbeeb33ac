"""Edit masks: each finding's radiological shape on the prior's anatomy, on the right side and zone."""
import numpy as np
import pytest
from scipy import ndimage

from biomedjourney.anatomy import ATLAS_ELLIPSES, atlas_anatomy
from biomedjourney.findings.schema import Finding
from biomedjourney.masks import (EMPTY_MASK_ERROR, LUNG_HEART, check_user_mask, edit_mask, finding_mask,
                                 inside_fraction, lung_frame, lung_mask)

A = atlas_anatomy((256, 256))


def m(**kw) -> np.ndarray:
    return finding_mask(Finding(**kw), A)[0]


def image_left_share(mask: np.ndarray) -> float:
    return float(mask[:, :128].sum() / mask.sum())


def centroid(mask: np.ndarray) -> tuple[float, float]:
    return tuple(float(c) for c in ndimage.center_of_mass(mask))


def test_sides_follow_the_radiological_convention():
    assert image_left_share(m(name="pleural effusion", side="right")) > 0.97     # patient's right = image left
    assert image_left_share(m(name="pleural effusion", side="left")) < 0.03
    assert image_left_share(m(name="pneumothorax", side="right")) > 0.97
    assert image_left_share(m(name="nodule", side="left", zone="upper")) < 0.03
    assert image_left_share(m(name="consolidation", side="right", zone="lower")) > 0.97


def test_zones_upper_above_base():
    up, base = m(name="consolidation", side="right", zone="upper"), m(name="consolidation", side="right", zone="base")
    assert centroid(up)[0] + 40 < centroid(base)[0]
    f = lung_frame(A, "right")
    assert np.nonzero(up > 0.5)[0].max() < f.top + 0.45 * f.height                 # the top third (+ feather)
    nod_up, nod_low = m(name="nodule", side="left", zone="upper"), m(name="nodule", side="left", zone="lower")
    assert centroid(nod_up)[0] + 40 < centroid(nod_low)[0]
    assert m(name="opacity", side="right").sum() > up.sum()                       # no zone: lower two thirds


def test_effusion_is_basal_and_grows_with_severity():
    areas = [m(name="pleural effusion", side="right", severity=s).sum() for s in ("mild", "moderate", "severe")]
    assert areas[0] < areas[1] < areas[2]
    f = lung_frame(A, "right")
    severe = m(name="pleural effusion", side="right", severity="severe")
    assert centroid(severe)[0] > f.top + 0.5 * f.height                           # dependent: the lower half
    assert (severe[: f.top + int(0.3 * f.height)] < 0.01).all()                   # not the upper lung
    p = [m(name="pneumothorax", side="left", severity=s).sum() for s in ("mild", "moderate", "severe")]
    assert p[0] < p[1] < p[2]


@pytest.mark.parametrize("side", ["right", "left"])
def test_effusion_meniscus_rises_laterally(side):
    mask = m(name="pleural effusion", side=side, severity="moderate") > 0.5
    f = lung_frame(A, side)
    span = f.lateral - f.medial
    def top_row(frac):                                                             # topmost mask row in a column
        col = int(round(f.medial + frac * span))
        return np.nonzero(mask[:, col])[0].min()
    assert top_row(0.92) + 6 < top_row(0.55)                                      # higher (smaller row) laterally
    assert top_row(0.92) < top_row(0.74) <= top_row(0.55)                         # monotone
    assert top_row(0.55) - top_row(0.74) < top_row(0.74) - top_row(0.92)          # concave-up: steeper laterally


def test_named_lobe_atelectasis_is_a_collapse_wedge_else_a_plate():
    f = lung_frame(A, "right")
    low, up = m(name="atelectasis", side="right", zone="lower"), m(name="atelectasis", side="right", zone="upper")
    plate = m(name="atelectasis", side="right", zone="base")
    assert centroid(low)[0] > f.top + 0.55 * f.height and centroid(up)[0] < f.top + 0.45 * f.height
    for wedge in (low, up):                                                      # medial: apex at the hilum
        assert abs(centroid(wedge)[1] - f.medial) < abs(centroid(wedge)[1] - f.lateral)
    assert plate.sum() < 0.6 * low.sum()                                          # a band, not a lobe
    apex_row = f.top + int(0.2 * f.height)                                        # upper lobe: against the apex,
    assert (up[apex_row] > 0.5).sum() > 0.75 * ((A.right_lung > 0.5)[apex_row]).sum()  # most of its width there
    mid = m(name="atelectasis", side="right", zone="middle")                      # middle lobe: on the heart border,
    assert f.top + 0.55 * f.height < centroid(mid)[0] < f.top + 0.8 * f.height    # below the hilum
    assert abs(centroid(mid)[1] - f.medial) < abs(centroid(mid)[1] - f.lateral)
    assert low[f.bottom + 5:, :128].sum() > 0                                     # the raised hemidiaphragm is edited
    assert low[:, 128:].sum() < 0.02 * low.sum()                                  # patient's right (image left)


def test_receding_finding_with_no_place_may_have_been_anywhere_in_the_lungs():
    lungs = A.lung("bilateral") > 0.5
    f = lung_frame(A, "right")
    apex = np.zeros_like(lungs)
    apex[: f.top + int(0.25 * f.height)] = True
    for name in ("pneumonia", "opacity", "atelectasis"):
        assert m(name=name, change="resolved")[lungs & apex].mean() > 0.9, name   # the upper zones too
        assert m(name=name, change="new")[lungs & apex].max() < 0.5, name           # new: where it usually appears
    assert m(name="pneumonia", zone="upper", change="resolved")[lungs & ~apex].sum() < lungs.sum() / 2


def test_edema_is_bilateral_and_perihilar():
    e = m(name="pulmonary edema")
    assert 0.35 < image_left_share(e) < 0.65
    lungs = A.lung("bilateral") > 0.5
    assert e[lungs].mean() < 0.9                                                   # spares part of the periphery
    fr = lung_frame(A, "right")
    hilum_row = fr.top + fr.height // 2
    assert e[hilum_row, fr.medial - 5] > 0.9 and e[hilum_row, fr.lateral + 3] < 0.5   # medial yes, lateral edge no


def test_no_side_uses_both_lungs():
    for name in ("opacity", "pulmonary edema", "consolidation"):
        assert 0.3 < image_left_share(m(name=name)) < 0.7, name


def test_union_notes_and_unchanged():
    a, b = Finding(name="pleural effusion", side="right"), Finding(name="pneumothorax", side="left")
    em = edit_mask([a, b], A)
    assert np.allclose(em.mask, np.maximum(finding_mask(a, A)[0], finding_mask(b, A)[0]))
    assert [f for f, _ in em.per_finding] == [a, b] and len(em.notes) >= 2
    assert "meniscus" in em.notes[0] and "chest wall" in em.notes[1]
    assert edit_mask([Finding(name="pleural effusion", side="right", change="unchanged")], A).mask.max() == 0
    new = m(name="pleural effusion", side="left")
    assert np.allclose(m(name="pleural effusion", side="left", change="resolved"), new)   # where it would be


def test_feather_is_soft_but_bounded():
    hard = edit_mask([Finding(name="nodule", side="right")], A, feather=0).mask
    soft = edit_mask([Finding(name="nodule", side="right")], A, feather=3).mask
    assert set(np.unique(hard)) <= {0.0, 1.0}
    assert soft.min() >= 0 and soft.max() <= 1 and ((soft > 0.05) & (soft < 0.95)).sum() > 50
    dist = ndimage.distance_transform_edt(hard < 0.5)
    assert soft[dist > 6 * 3].max() == 0                                           # nothing beyond ~6 sigma (18 px)
    assert soft[hard > 0.5].min() > 0.8                                            # the region itself stays edited


def test_cardiomegaly_covers_the_heart_and_its_borders():
    c = m(name="cardiomegaly", severity="severe") > 0.5
    heart = A.heart > 0.5
    assert c[heart].all()
    cols_h, cols_c = np.nonzero(heart.any(0))[0], np.nonzero(c.any(0))[0]
    assert cols_c.min() < cols_h.min() - 5 and cols_c.max() > cols_h.max() + 5


def test_pneumothorax_runs_along_the_lateral_chest_wall():
    p = m(name="pneumothorax", side="right") > 0.5
    f = lung_frame(A, "right")
    lat = f.lateralness()[np.nonzero(p)[1]]
    assert lat.mean() > 0.5
    assert centroid(p)[0] < f.top + 0.6 * f.height                                 # apical-lateral, not basal


def test_pneumothorax_does_not_run_along_the_hemidiaphragm():
    # Upright film: the air rises to the apex and the lateral wall; no pleural line along the dome's top.
    p = m(name="pneumothorax", side="right") > 0.5
    f = lung_frame(A, "right")
    y, x = np.nonzero(f.core)
    dome = (f.depth()[y] > 0.85) & (f.lateralness()[x] > 0.5) & (f.lateralness()[x] < 0.85)
    assert dome.sum() > 100 and p[y[dome], x[dome]].mean() < 0.05                # was 0.83 from the dome's edge


def test_painted_mask_messages():
    assert check_user_mask(np.zeros((64, 64))) == [EMPTY_MASK_ERROR]
    assert "paint" in EMPTY_MASK_ERROR and "clear" in EMPTY_MASK_ERROR
    full = check_user_mask(np.ones((64, 64)))
    assert len(full) == 1 and "whole film" in full[0] and "100%" in full[0]
    part = np.zeros((64, 64)); part[10:30, 10:30] = 1
    assert check_user_mask(part) == [] and check_user_mask(None) == []
    assert "single-channel" in check_user_mask(np.ones((4, 4, 3)))[0]


def test_evaluation_mask_has_one_home():
    from biomedjourney.evaluate import fidelity
    assert LUNG_HEART == ATLAS_ELLIPSES
    assert fidelity.lung_mask is lung_mask and fidelity.inside_fraction is inside_fraction
