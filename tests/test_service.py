"""The service the app, CLI and API share: plan (findings, region, rendering, notes) and generation."""
from __future__ import annotations

import numpy as np
import pytest

from biomedjourney.config import NO_CHANGE
from biomedjourney.service import generate_followups, plan_edit


@pytest.fixture(scope="module")
def film():
    y, x = np.mgrid[0:64, 0:64] / 63.0
    lungs = (((x - 0.3) / 0.16) ** 2 + ((y - 0.45) / 0.28) ** 2 < 1) | (((x - 0.7) / 0.16) ** 2 + ((y - 0.45) / 0.28) ** 2 < 1)
    return np.where(lungs, 0.25, 0.75).astype(np.float32)                 # (64, 64): dark lungs, bright rest


def test_rendering_harmonises_in_at_least_one_step_however_few_steps(pipe, film):
    r = generate_followups(pipe, film, "New right pleural effusion.", seed=0, num_images=1, render=True,
                           sampler={"num_inference_steps": 2})
    assert r.settings["strength"] == 0.5 and r.plan.renderings is not None and r.plan.rendered
    assert r.settings["knowledge_rendering"] == r.plan.rendered and r.settings["edit_mask"] == "findings"


def test_plan_says_what_it_read_and_where(film):
    p = plan_edit(film, "New right pleural effusion on the left.", [0])
    assert p.chips() == ["pleural effusion · right · new"] and p.mask_source == "findings"
    assert any("both right and left" in n for n in p.notes)
    rare = plan_edit(film, "New right pneumothorax.", [0], render=False)
    assert any(n.startswith("pneumothorax: 11 training images") and "expect little change" in n for n in rare.notes)
    unknown = plan_edit(film, "Something odd happened.", [0])
    assert unknown.mask is None and unknown.mask_source == "whole film" and "No finding recognised" in unknown.notes[0]
    same = plan_edit(film, NO_CHANGE, [0])
    assert same.findings == [] and same.mask is None and same.notes == []


def test_an_empty_painted_mask_is_refused_with_the_reason(film):
    with pytest.raises(ValueError, match="empty"):
        plan_edit(film, "New right pleural effusion.", [0], painted_mask=np.zeros((64, 64), np.float32))


def test_the_model_loads_in_the_precision_asked_for_and_says_so(tiny_model_dir, film):
    import torch

    from biomedjourney import cli, service
    assert cli.DTYPE_NAMES == tuple(service.DTYPES)            # the CLI's and app's choices are the loader's
    pipe = service.load_pipeline(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    r = generate_followups(pipe, film, "New right pleural effusion.", seed=0, num_images=1,
                           sampler={"num_inference_steps": 2})
    assert r.settings["dtype"] == "bfloat16" and np.isfinite(r.images[0]).all() and r.images[0].dtype == np.float32
    with pytest.raises(service.ModelLoadError, match="Unknown dtype 'fp8'.*float32, bfloat16, float16"):
        service.load_pipeline(str(tiny_model_dir), device="cpu", dtype="fp8")


def test_a_drawn_region_stops_where_the_drawing_changed_nothing_outside_the_lungs(film):
    """The rendered plan's mask: an effusion's pleural space below the dome, where this film is already denser than
    fluid, is left out (masks.confine_to_drawing); drawn without rendering, it is the findings' region."""
    from biomedjourney.masks import edit_mask
    plain = plan_edit(film, "New right pleural effusion.", [0, 1], render=False)
    drawn = plan_edit(film, "New right pleural effusion.", [0, 1], render=True)
    whole = edit_mask(drawn.findings, drawn.anatomy).mask
    np.testing.assert_array_equal(plain.mask, whole)
    lungs = drawn.anatomy.lung("bilateral") > 0.5
    changed = np.abs(drawn.renderings - film).max(0) > 0.01
    np.testing.assert_array_equal(drawn.mask[lungs], np.maximum(whole, drawn.mask)[lungs])
    from scipy import ndimage
    far = ndimage.distance_transform_edt(~(lungs | changed)) > 6         # 64 px: beyond every margin (256's / 4)
    assert whole[far].max() > 0.5 and drawn.mask[far].max() < 1e-3


def test_each_rendered_image_is_reproduced_alone_with_its_seed(pipe, film):
    """With drawings (one per seed) and the region they confine, image i of a call is image 0 of a call with
    seed=seeds[i], num_images=1: the same mask, the same picture."""
    kw = dict(render=True, sampler={"num_inference_steps": 3})
    many = generate_followups(pipe, film, "New right pleural effusion. New cardiomegaly.", seed=3, num_images=2, **kw)
    for i, s in enumerate(many.seeds):
        one = generate_followups(pipe, film, "New right pleural effusion. New cardiomegaly.", seed=s, num_images=1,
                                 **kw)
        np.testing.assert_array_equal(one.plan.mask, many.plan.mask)
        np.testing.assert_allclose(one.images[0], many.images[i], atol=1e-4)
