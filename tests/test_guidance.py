"""The guidance model, initial-noise optimisation and the identity / pathology consistency losses, on tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biomedjourney import dataset
from biomedjourney.guidance import (GUIDANCE_LABELS, GuidanceModel, dataset_targets, density_loss, finding_loss,
                                    identity_loss, luminance, luminance_probe)
from biomedjourney.pipeline import BiomedJourneyPipeline, NoiseOptimization, tiny_pipeline


def _tiny_guidance(seed: int = 0) -> GuidanceModel:
    torch.manual_seed(seed)
    return GuidanceModel(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4, time_channels=8).eval()


@pytest.fixture(scope="module")
def gpipe():
    p = tiny_pipeline(seed=0)
    p.register_modules(guidance_model=_tiny_guidance())
    return p


def test_identity_loss_is_zero_for_identical_images_and_grows_with_a_shift():
    gm = _tiny_guidance()
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = lambda x: gm(x, 0).embedding  # noqa: E731
    same = identity_loss(emb(z), emb(z.clone()))
    assert same.shape == (3,) and same.abs().max() < 1e-5
    shifted = identity_loss(emb(torch.roll(z, 3, dims=3)), emb(z))
    other = identity_loss(emb(torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))), emb(z))
    assert (shifted > 1e-4).all() and (other > 1e-4).all()


def test_finding_loss_masks_unknown_labels_and_prefers_the_right_answer():
    gm = _tiny_guidance()
    z = torch.randn(2, 4, 8, 8)
    p = torch.sigmoid(gm(z, 0).logits)
    known = torch.zeros(len(gm.labels), dtype=torch.bool)
    known[0] = True
    y_right, y_wrong = (p[:, 0] > 0.5).float(), (p[:, 0] <= 0.5).float()
    full = lambda y: torch.cat([y[:, None], torch.full((2, len(gm.labels) - 1), 0.5)], 1)  # noqa: E731
    logits = gm(z, 0).logits
    assert (finding_loss(logits, full(y_right), known) < finding_loss(logits, full(y_wrong), known)).all()
    # only the known label counts: changing the others changes nothing
    assert torch.allclose(finding_loss(logits, full(y_right), known),
                          finding_loss(logits, torch.cat([y_right[:, None], torch.ones(2, len(gm.labels) - 1)], 1), known))


def test_dataset_targets_leave_labels_a_source_never_reports_unknown():
    y, known = dataset_targets(["Effusion", "Infiltration"], {"Effusion", "Infiltration", "No Finding"})
    i = {n: k for k, n in enumerate(GUIDANCE_LABELS)}
    assert y[i["pleural effusion"]] == 1 and y[i["opacity"]] == 1 and y[i["pulmonary edema"]] == 0
    assert known[i["pleural effusion"]] and not known[i["pulmonary edema"]] and known[i["no finding"]]
    y, known = dataset_targets(["COVID-19"], {"COVID-19"})
    assert not any(known)


def test_noise_optimisation_lowers_its_objective_and_keeps_its_step_bound(gpipe, prior):
    opt = NoiseOptimization(targets={"pleural effusion": 1.0}, steps=4, lr=0.5)
    out = gpipe(prior, "New right pleural effusion.", num_images=2, seed=3, strength=0.6, change_transfer=True,
                noise_optimization=opt)
    rep = out.settings["noise_optimization"]
    assert rep["steps"] == 4 and len(rep["objective"]) == 4
    assert rep["objective"][-1] < rep["objective"][0]
    plain = gpipe(prior, "New right pleural effusion.", num_images=2, seed=3, strength=0.6, change_transfer=True)
    assert plain.settings["noise_optimization"] is None
    assert max(np.abs(a - b).max() for a, b in zip(out.images, plain.images)) > 1e-4  # the noise did change


def test_luminance_probe_recovers_a_linear_brightness_and_density_loss_is_one_sided():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    w = torch.tensor([0.3, -0.2, 0.1, 0.05])
    block = torch.einsum("bchw,c->bhw", z, w)[0] + 0.5                                   # (8, 8) brightness per cell
    image = block.repeat_interleave(4, 0).repeat_interleave(4, 1)                        # (32, 32): 4x4 blocks
    probe = luminance_probe(z, image)
    torch.testing.assert_close(probe, torch.cat([w, torch.tensor([0.5])]), atol=1e-4, rtol=0)
    torch.testing.assert_close(luminance(z, probe)[0], block, atol=1e-4, rtol=0)
    ref = torch.zeros(1, 8, 8)
    up = torch.zeros(1, 8, 8)
    up[:, :4] = 1                                                                        # the finding is dense here
    assert density_loss(ref + 0.1, ref, up).item() == 0.0                               # brighter: fine
    assert density_loss(ref - 0.1, ref, up).item() == pytest.approx(0.1)                # darker where dense: penalised
    assert density_loss(ref - 0.1, ref, -up).item() == 0.0                              # a lucent finding may darken
    assert density_loss(ref - 0.1, ref, torch.zeros(1, 8, 8)).item() == 0.0             # no direction: free


def test_density_guard_keeps_the_drawn_region_from_darkening(gpipe, prior):
    drawing = prior.copy()
    drawing[8:24, 4:16] = np.clip(drawing[8:24, 4:16] + 0.4, 0, 1)                       # a dense region drawn in
    mask = np.zeros_like(prior)
    mask[6:26, 2:18] = 1
    kw = dict(num_images=2, seed=3, strength=0.6, change_transfer=True, mask_image=mask, init_image=drawing)
    # ask the guidance model to take the effusion away with big steps: free, the region's brightness drifts
    free = NoiseOptimization(targets={"pleural effusion": 0.0}, steps=6, lr=3.0, identity_weight=0, others_weight=0,
                             density_weight=0)
    guarded = NoiseOptimization(targets={"pleural effusion": 0.0}, steps=6, lr=3.0, identity_weight=0,
                                others_weight=0, density_weight=1e3)
    rep_free = gpipe(prior, "New right pleural effusion.", noise_optimization=free, **kw).settings["noise_optimization"]
    rep = gpipe(prior, "New right pleural effusion.", noise_optimization=guarded, **kw).settings["noise_optimization"]
    assert rep["density_weight"] == 1e3 and rep_free["density_weight"] == 0.0
    assert rep_free["against_density"][0] == 0.0 and rep_free["against_density"][-1] > 1e-3    # drifted the wrong way
    assert rep["against_density"][-1] < 0.2 * rep_free["against_density"][-1]                 # pulled back by the guard
    # without a drawing there is no direction to guard
    no_drawing = gpipe(prior, "New right pleural effusion.", num_images=1, seed=3, noise_optimization=guarded)
    assert no_drawing.settings["noise_optimization"]["against_density"] == []
    assert no_drawing.settings["noise_optimization"]["density_weight"] == 0.0


def test_a_free_label_is_neither_asked_for_nor_held(gpipe, prior):
    """`free`: the description changes it, unguided: with others_weight alone, freeing every other label leaves
    nothing in the objective but the targets, so it equals the run that holds nothing (others_weight 0)."""
    kw = dict(num_images=1, seed=3, strength=0.6, change_transfer=True)
    others = tuple(n for n in gpipe.guidance_model.labels if n not in ("pulmonary edema", "no finding"))
    run = lambda **o: gpipe(prior, "New pulmonary edema.", noise_optimization=NoiseOptimization(
        targets={"pulmonary edema": 1.0}, steps=1, identity_weight=0, **o), **kw).settings["noise_optimization"]
    held, freed, none = run(), run(free=others), run(others_weight=0)
    assert freed["objective"] == none["objective"] != held["objective"] and freed["free"] == list(others)


def test_noise_optimisation_respects_its_time_budget(gpipe, prior):
    opt = NoiseOptimization(targets={"pleural effusion": 1.0}, steps=10, max_seconds=1e-9)
    out = gpipe(prior, "New right pleural effusion.", num_images=1, seed=3, noise_optimization=opt)
    plain = gpipe(prior, "New right pleural effusion.", num_images=1, seed=3)
    assert out.settings["noise_optimization"]["steps"] == 0
    np.testing.assert_allclose(out.images[0], plain.images[0], atol=1e-6)  # no step: the same noise


def test_noise_optimisation_errors_name_the_problem(pipe, gpipe, prior):
    with pytest.raises(ValueError, match="guidance model"):
        pipe(prior, "New effusion.", num_images=1, noise_optimization=NoiseOptimization(targets={"pleural effusion": 1}))
    with pytest.raises(ValueError, match="knows"):
        gpipe(prior, "New effusion.", num_images=1, noise_optimization=NoiseOptimization(targets={"hernia": 1}))
    with pytest.raises(ValueError, match="steps"):
        gpipe(prior, "New effusion.", num_images=1,
              noise_optimization=NoiseOptimization(targets={"pleural effusion": 1}, steps=0))


def test_guidance_model_is_saved_and_loaded_with_the_pipeline(gpipe, tmp_path, tiny_model_dir):
    folder = gpipe.save_pretrained(tmp_path / "m")
    assert (folder / "guidance_model" / "diffusion_pytorch_model.safetensors").is_file()
    back = BiomedJourneyPipeline.from_pretrained(folder, device="cpu")
    assert isinstance(back.guidance_model, GuidanceModel) and back.guidance_model.labels == GUIDANCE_LABELS
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(back.guidance_model(z, 0).logits, gpipe.guidance_model(z, 0).logits)
    assert BiomedJourneyPipeline.from_pretrained(tiny_model_dir, device="cpu").guidance_model is None


def test_service_asks_for_new_findings_and_notes_when_it_cannot(gpipe, pipe, prior):
    from biomedjourney import service
    r = service.generate_followups(gpipe, prior, "New right pleural effusion. Resolved atelectasis.", seed=0,
                                   num_images=1, region="off", render=True, noise_opt_steps=2)
    assert r.settings["noise_optimization"]["targets"] == {"pleural effusion": 1.0, "atelectasis": 0.0}
    r = service.generate_followups(gpipe, prior, "New pulmonary edema. New cardiomegaly.", seed=0, num_images=1,
                                   region="off", render=True, noise_opt_steps=2)
    rep = r.settings["noise_optimization"]          # cardiomegaly: 16 training images, not guided, and not held
    assert rep["targets"] == {"pulmonary edema": 1.0} and rep["free"] == ["cardiomegaly"]
    r = service.generate_followups(pipe, prior, "New right pleural effusion.", seed=0, num_images=1, region="off",
                                   render=True, noise_opt_steps=2)
    assert r.settings["noise_optimization"] is None and any("no guidance model" in n for n in r.plan.notes)
    r = service.generate_followups(gpipe, prior, "New hernia.", seed=0, num_images=1, region="off", render=True,
                                   noise_opt_steps=2)
    assert any("skipped" in n for n in r.plan.notes)
    r = service.generate_followups(gpipe, prior, "New right pleural effusion.", seed=0, num_images=1, region="off",
                                   render=False, noise_opt_steps=2)   # the model alone: no optimisation
    assert r.settings["noise_optimization"] is None and any("darkened" in n for n in r.plan.notes)
    with pytest.raises(ValueError, match="noise_opt_steps"):
        service.generate_followups(gpipe, prior, "New effusion.", num_images=1, noise_opt_steps=-1)


def test_streamed_followups_are_the_images_of_one_call(gpipe, prior, one_thread):
    """iter_followups(first=1): the first image after one call, then all; the same images and one merged report."""
    from biomedjourney import service
    kw = dict(seed=5, num_images=3, render=True, noise_opt_steps=2, sampler={"num_inference_steps": 4})
    whole = service.generate_followups(gpipe, prior, "New pulmonary edema.", **kw)
    ticks = []
    parts = list(service.iter_followups(gpipe, prior, "New pulmonary edema.", first=1,
                                        on_step=lambda i, total: ticks.append((i, total)), **kw))
    assert [len(p.images) for p in parts] == [1, 3] and [p.seeds for p in parts] == [[5], [5, 6, 7]]
    for a, b in zip(whole.images, parts[-1].images):
        # batches of 1 and 3 round apart, and Adam's first step (the gradient's sign) turns that into a few 1e-3 on a
        # few % of the pixels; another seed, or another image's noise, differs by 0.1 and more over the whole image
        d = np.abs(a - b)
        assert d.mean() < 2e-4 and d.max() < 0.02, (d.mean(), d.max())
    per = len(ticks) // 2           # a drawing is harmonised at render_strength: fewer steps than the 4 asked for
    assert 1 <= per < 4 and ticks == [(i, 2 * per) for i in range(1, 2 * per + 1)] and service.pipeline_calls(3, 1) == 2
    rep, one = parts[-1].settings["noise_optimization"], whole.settings["noise_optimization"]
    assert rep["steps"] == one["steps"] == 2 and rep["targets"] == one["targets"]
    np.testing.assert_allclose(rep["objective"], one["objective"], rtol=1e-3)  # the mean over all 3 images
    assert parts[-1].settings["num_images"] == 3 and parts[-1].settings["seeds"] == [5, 6, 7]
    assert parts[-1].plan is parts[0].plan  # one plan (mask, drawings) for every seed


def test_consistency_loss_is_zero_at_high_noise_and_counts_identity_and_findings():
    from train.config import DiffusionTrain
    from train.train import consistency_loss
    gm = _tiny_guidance()
    tc = DiffusionTrain(identity_weight=1.0, pathology_weight=1.0, consistency_max_t=400)
    x0, prior = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    y = torch.zeros(4, len(gm.labels))
    known = torch.ones(4, len(gm.labels), dtype=torch.bool)
    high = torch.full((4,), 900)
    assert consistency_loss(gm, x0, prior, high, y, known, tc) == 0
    low = torch.full((4,), 100)
    both = consistency_loss(gm, x0, prior, low, y, known, tc)
    only_path = consistency_loss(gm, prior, prior, low, y, known, tc)  # identical to its prior: no identity term
    assert both > only_path > 0
    tc.pathology_weight = 0.0
    assert consistency_loss(gm, prior, prior, low, y, known, tc).abs() < 1e-5


def test_canonical_text_renders_findings_and_keeps_what_it_cannot_read():
    from train.train import canonical_text
    assert canonical_text("New Edema. Pneumonia unchanged.") == "New pulmonary edema."
    assert canonical_text("") == ""
    note = "Three days cough, myalgias and fever. No recent overseas travel."
    assert canonical_text(note) == note


def test_noise_optimisation_holds_the_other_findings_at_the_prior(gpipe, prior):
    run = lambda w: gpipe(prior, "New right pleural effusion.", num_images=1, seed=5, strength=0.6,  # noqa: E731
                          noise_optimization=NoiseOptimization(targets={"pleural effusion": 1.0}, steps=1,
                                                               others_weight=w)).settings["noise_optimization"]
    free, held = run(0.0), run(1.0)
    assert held["others_weight"] == 1.0 and held["objective"][0] > free["objective"][0]  # the extra BCE term counts


def test_service_asks_for_the_broader_finding_a_new_consolidation_implies(gpipe, prior):
    from biomedjourney import service
    r = service.generate_followups(gpipe, prior, "New right upper lobe consolidation.", seed=0, num_images=1,
                                   region="off", render=True, noise_opt_steps=1)
    assert r.settings["noise_optimization"]["targets"] == {"opacity": 1.0}  # consolidation: 31 images, too few
    r = service.generate_followups(gpipe, prior, "New right pneumothorax.", seed=0, num_images=1, region="off",
                                   render=True, noise_opt_steps=1)
    assert r.settings["noise_optimization"] is None and any("at least 50 training images" in n for n in r.plan.notes)


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_train_guidance_exports_a_loadable_model_and_resumes(tiny_prep, tiny_model_dir, tmp_path):
    import json

    from train.train_guidance import main
    args = ["--data", str(tiny_prep), "--model", str(tiny_model_dir), "--out", str(tmp_path / "gm"),
            "--work", str(tmp_path / "work")]
    assert main(args + ["--steps", "2"]) == 0
    gm = GuidanceModel.from_pretrained(tmp_path / "gm")
    assert gm.labels == GUIDANCE_LABELS and gm.config.latent_channels == 4
    m = json.loads((tmp_path / "gm" / "metrics.json").read_text())
    assert m["steps"] == 2 and m["n_train"] > 0 and "macro_auc" in m["val"]["t0"]
    assert main(args + ["--steps", "3", "--resume", "latest"]) == 0          # continues from step 2
    assert json.loads((tmp_path / "gm" / "metrics.json").read_text())["steps"] == 3
