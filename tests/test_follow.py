"""biomedjourney.evaluate.follow: the counterfactual metrics on synthetic priors, tiny models (no dataset)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from biomedjourney.anatomy import atlas_anatomy
from biomedjourney.config import NO_CHANGE
from biomedjourney.evaluate import follow
from biomedjourney.evaluate.evaluators import save_evaluators, tiny_evaluators
from biomedjourney.evaluate.follow import (DESCRIPTIONS, Generated, Prior, outside_mask, outside_share, side_accuracy,
                                           side_hit, zone_accuracy, zone_hit)

R = 64
RIGHT, LEFT = "New right pleural effusion.", "New left pleural effusion."
UPPER, LOWER = "New right upper lobe consolidation.", "New left lower lobe consolidation."


def synthetic_priors(n: int = 3) -> list[Prior]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.clip(0.45 + 0.08 * rng.standard_normal((R, R)), 0, 1).astype(np.float32)
        out.append(Prior(f"img{i}", f"patient{i}", img))
    return out


def blob(rows: slice, cols: slice, value: float = 0.3) -> np.ndarray:
    d = np.zeros((R, R), np.float32)
    d[rows, cols] = value
    return d


def hand_generated(changes: dict[str, np.ndarray], masks: dict[str, np.ndarray] | None = None) -> Generated:
    """A Generated whose every sample of description d is prior + changes[d]."""
    priors = synthetic_priors(2)
    base = np.stack([p.image for p in priors])[:, None]                       # (P, 1, R, R)
    images = {d: np.repeat(base + c, 2, 1) for d, c in changes.items()}       # 2 seeds
    masks = {d: np.broadcast_to((masks or {}).get(d, np.full((R, R), np.nan, np.float32)), (2, 2, R, R)).copy()
             for d in changes}
    return Generated(priors, [0, 1], images, masks, [atlas_anatomy((R, R))] * 2, 1.0)


# ----------------------------------------------------------------------------- side
def test_side_follows_the_radiological_convention():
    image_left = blob(slice(20, 40), slice(5, 25))
    assert side_hit(image_left, "right") and not side_hit(image_left, "left")   # patient's right = image left
    mirrored = image_left[:, ::-1]
    assert side_hit(mirrored, "left") and not side_hit(mirrored, "right")


def test_side_accuracy_is_one_on_the_named_side_and_zero_mirrored():
    image_left = blob(slice(20, 40), slice(5, 25))
    acc = side_accuracy(hand_generated({RIGHT: image_left, LEFT: image_left[:, ::-1]}))
    assert acc == {RIGHT: 1.0, LEFT: 1.0}
    acc = side_accuracy(hand_generated({RIGHT: image_left[:, ::-1], LEFT: image_left}))
    assert acc == {RIGHT: 0.0, LEFT: 0.0}


def test_descriptions_without_a_side_get_no_side_accuracy():
    assert side_accuracy(hand_generated({"New pulmonary edema.": blob(slice(0, 5), slice(0, 5))})) == {}
    assert DESCRIPTIONS[NO_CHANGE].label is None and DESCRIPTIONS[RIGHT].side == "right"


# ----------------------------------------------------------------------------- zone
def test_zone_upper_and_lower_halves_of_the_lung_fields():
    a = atlas_anatomy((R, R))
    top, bottom = follow.lung_rows(a)
    mid = (top + bottom + 1) // 2
    upper = blob(slice(top, mid - 2), slice(0, R))
    lower = blob(slice(mid + 2, bottom + 1), slice(0, R))
    assert zone_hit(upper, a, "upper") and not zone_hit(upper, a, "lower")
    assert zone_hit(lower, a, "lower") and not zone_hit(lower, a, "upper")
    outside_lungs = blob(slice(0, top), slice(0, R), 5.0)      # huge change above the lungs does not count
    assert zone_hit(outside_lungs + lower, a, "lower")
    assert math.isnan(follow.zone_share(np.zeros((R, R)), a, "upper"))
    with pytest.raises(ValueError):
        follow.zone_share(upper, a, "middle")


def test_zone_accuracy_per_zoned_description():
    a = atlas_anatomy((R, R))
    top, bottom = follow.lung_rows(a)
    mid = (top + bottom + 1) // 2
    upper, lower = blob(slice(top, mid - 2), slice(0, R)), blob(slice(mid + 2, bottom + 1), slice(0, R))
    assert zone_accuracy(hand_generated({UPPER: upper, LOWER: lower, RIGHT: upper})) == {UPPER: 1.0, LOWER: 1.0}
    assert zone_accuracy(hand_generated({UPPER: lower, LOWER: upper})) == {UPPER: 0.0, LOWER: 0.0}


# ----------------------------------------------------------------------------- edit mask
def test_outside_share_of_a_masked_generation_is_zero():
    from biomedjourney.pipeline import tiny_pipeline
    torch.manual_seed(0)
    pipe, prior = tiny_pipeline(), synthetic_priors(1)[0].image
    mask = blob(slice(20, 40), slice(5, 25), 1.0)
    out = pipe(prior, RIGHT, num_images=1, seed=0, mask_image=mask, num_inference_steps=2)
    diff = out.images[0] - out.prior
    assert np.abs(diff).sum() > 0
    assert outside_share(diff, mask) == pytest.approx(0.0, abs=1e-6)
    assert outside_share(diff, 1.0 - mask) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(outside_share(diff, None))


def test_outside_mask_summary():
    mask = blob(slice(20, 40), slice(5, 25), 1.0)
    g = hand_generated({RIGHT: blob(slice(20, 40), slice(5, 25)), LEFT: blob(slice(0, 10), slice(40, 60)),
                        NO_CHANGE: np.zeros((R, R), np.float32)}, masks={RIGHT: mask, LEFT: mask})
    out = outside_mask(g)
    assert out[RIGHT] == pytest.approx(0.0) and out[LEFT] == pytest.approx(1.0)
    assert NO_CHANGE not in out and out["mean"] == pytest.approx(0.5)


def test_density_sees_a_region_darkened_where_the_text_asks_for_density():
    from biomedjourney.evaluate.follow import density, density_change
    mask = blob(slice(20, 40), slice(5, 25), 1.0)
    brighter, darker = blob(slice(20, 40), slice(5, 25), 0.1), blob(slice(20, 40), slice(5, 25), -0.1)
    assert density_change(brighter, mask, 1) == pytest.approx((0.1, 0.0))
    assert density_change(darker, mask, 1) == pytest.approx((-0.1, 1.0))
    assert density_change(darker, mask, -1) == pytest.approx((0.1, 0.0))        # a pneumothorax darkens
    half = brighter.copy()
    half[30:40] = -0.05                                                           # half the core the wrong way
    assert density_change(half, mask, 1)[1] == pytest.approx(0.5)
    assert all(math.isnan(x) for x in density_change(brighter, None, 1) + density_change(brighter, mask, 0))
    g = hand_generated({RIGHT: brighter, LEFT: darker, "New right pneumothorax.": darker,
                        NO_CHANGE: np.zeros((R, R), np.float32)},
                       masks={RIGHT: mask, LEFT: mask, "New right pneumothorax.": mask})
    out = density(g)
    assert set(out) == {RIGHT, LEFT, "New right pneumothorax."}                 # the reference has no direction
    assert out[RIGHT]["wrong_samples"] == 0.0 and out[LEFT]["wrong_samples"] == 1.0
    assert out[LEFT]["wrong_pixels"] == pytest.approx(1.0) and out["New right pneumothorax."]["mean"] > 0


def test_ghost_measures_how_much_of_the_covered_prior_comes_back():
    """A drawing covers a sharp edge of the prior; an output that draws the edge back scores its share of it, one
    that keeps the drawing scores 0, and descriptions without a drawing are not scored."""
    from biomedjourney.evaluate.follow import ghost, returned_structure
    y, _ = np.mgrid[0:256, 0:256]
    prior = np.where(y < 160, 0.3, 0.8).astype(np.float32)
    drawing = prior.copy()
    drawing[112:208, :128] = 0.8                                   # fluid over the edge (left half)
    where = np.zeros_like(prior, bool)
    where[112:208, :128] = True
    assert returned_structure(drawing, drawing, prior, where) == pytest.approx(0.0, abs=1e-6)
    assert returned_structure(prior, drawing, prior, where) == pytest.approx(1.0)
    half_back = drawing + 0.5 * (prior - drawing)
    assert returned_structure(half_back, drawing, prior, where) == pytest.approx(0.5)
    assert math.isnan(returned_structure(prior, drawing, prior, np.zeros_like(where)))
    mask = where.astype(np.float32)
    g = Generated([Prior("a", "pa", prior)], [0], {RIGHT: prior[None, None], LEFT: drawing[None, None]},
                  {RIGHT: mask[None, None], LEFT: mask[None, None]}, [atlas_anatomy((256, 256))], 1.0,
                  {RIGHT: drawing[None, None], LEFT: np.full((1, 1, 256, 256), np.nan, np.float32)})
    out = ghost(g)
    assert set(out) == {RIGHT} and out[RIGHT]["samples"] == 1
    assert out[RIGHT]["edges"] == pytest.approx(1.0) and out[RIGHT]["core"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- generation, lift, CLI
@pytest.fixture(scope="module")
def generated():
    from biomedjourney.pipeline import tiny_pipeline
    pipe = tiny_pipeline()
    pipe.defaults = pipe.defaults.with_overrides(["num_inference_steps=2"])
    return follow.generate_all(pipe, synthetic_priors(3), [0, 1], region="auto", render=False,
                               descriptions=(RIGHT, "New pulmonary edema.", NO_CHANGE))


def test_generate_all_uses_the_same_seeds_and_records_masks(generated):
    g = generated
    assert g.images[RIGHT].shape == (3, 2, R, R) and g.masks[RIGHT].shape == (3, 2, R, R)
    assert not np.isnan(g.masks[RIGHT]).any() and np.isnan(g.masks[NO_CHANGE]).all()
    assert not np.allclose(g.images[RIGHT][:, 0], g.images[RIGHT][:, 1])       # two seeds, two samples
    assert follow.outside_mask(g)[RIGHT] < 0.05                                # region auto stays inside


def test_lift_matrix_keys_and_identity(generated):
    ev = tiny_evaluators(seed=0)
    lift = follow.lift(generated, ev)
    assert set(lift) == {RIGHT, "New pulmonary edema."}                        # no row for the reference
    for row in lift.values():
        assert set(row) == set(ev.cfg.labels)
        assert {"mean", "std", "se_priors", "n"} <= set(row["Effusion"]) and row["Effusion"]["n"] == 2
    ident = follow.identity(generated, ev)
    assert 0.0 <= ident["reid_auc"] <= 1.0 and -1.0 <= ident["no_change_ssim"] <= 1.0


def test_cli_writes_follow_json(tmp_path, tiny_model_dir, monkeypatch):
    save_evaluators(tiny_evaluators(seed=0), tmp_path / "ev")
    monkeypatch.setattr(follow, "select_priors", lambda n, data=None, res=256: synthetic_priors(n))
    out = tmp_path / "follow"
    follow.main(["--model", str(tiny_model_dir), "--out", str(out), "--priors", "2", "--seeds", "1",
                 "--evaluators", str(tmp_path / "ev"), "--region", "off", "--sampler", "num_inference_steps=2",
                 "--label", "tiny"])
    res = json.loads((out / "follow.json").read_text())
    assert {"settings", "n_priors", "seeds", "lift", "side_accuracy", "zone_accuracy", "outside_mask_share",
            "reid_auc", "no_change_ssim", "seconds_per_image", "density", "ghost"} <= set(res)
    assert res["n_priors"] == 2 and res["seeds"] == [0] and res["settings"]["region"] == "off"
    assert res["settings"]["sampler"]["num_inference_steps"] == 2
    assert set(res["lift"]) == set(DESCRIPTIONS) - {NO_CHANGE}
    assert set(res["side_accuracy"]) == {d for d, t in DESCRIPTIONS.items() if t.side}
    assert set(res["zone_accuracy"]) == {d for d, t in DESCRIPTIONS.items() if t.zone} >= {UPPER, LOWER}
    assert 0.0 <= res["outside_mask_share"]["mean"] <= 1.0              # region off: vs the auto region's mask
    assert {"Cardiomegaly", "Pneumothorax"} <= set(res["no_evaluator_head"])
    md = (out / "follow.md").read_text()
    assert "| New right pleural effusion. |" in md and "train split" in md and "## Density inside" in md
    assert set(res["density"]) <= {d for d, t in DESCRIPTIONS.items() if t.density}
    assert (out / "follow_grid.png").stat().st_size > 1000


def test_diagonal_compares_the_named_lift_with_the_best_other_description():
    from biomedjourney.evaluate.follow import diagonal
    m = lambda x: {"mean": x}  # noqa: E731
    lifts = {"New right pleural effusion.": {"Effusion": m(0.05), "Edema": m(0.01)},
             "New left pleural effusion.": {"Effusion": m(0.03), "Edema": m(0.0)},
             "New pulmonary edema.": {"Effusion": m(0.02), "Edema": m(0.00)},
             "New cardiomegaly.": {"Effusion": m(0.9), "Edema": m(0.9)}}   # names no evaluator label: not "other"
    named = {"New right pleural effusion.": "Effusion", "New left pleural effusion.": "Effusion",
             "New pulmonary edema.": "Edema"}
    d = diagonal(lifts, named)
    assert d["Effusion"] == {"named_lift": 0.04, "best_other_lift": 0.02, "diagonal": True}
    assert d["Edema"]["best_other_lift"] == 0.01 and d["Edema"]["diagonal"] is False  # zero lift is not positive
