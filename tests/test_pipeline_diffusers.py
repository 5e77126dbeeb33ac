"""The pipeline as a diffusers DiffusionPipeline: loading, call conventions, what each guidance branch
receives, and region-restricted editing (blended latent diffusion + keep mask). Tiny random models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biomedjourney.config import NO_CHANGE
from biomedjourney.model import SCHEDULERS
from biomedjourney.pipeline import BiomedJourneyPipeline, _compose_from_start, _Settings, erased_edges

TEXT = "New right pleural effusion."


@pytest.fixture
def box():
    m = np.zeros((64, 64), np.float32)
    m[36:60, 4:30] = 1.0  # the image-left base: the patient's right
    return m


def test_diffusion_pipeline_loads_the_folder_through_its_custom_pipeline_file(pipe, prior, tmp_path):
    from diffusers import DiffusionPipeline
    folder = pipe.save_pretrained(tmp_path / "m")
    generic = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)
    assert type(generic).__name__ == "BiomedJourneyPipeline"
    assert set(generic.components) == {"unet", "vae", "scheduler", "text_encoder", "guidance_model"}
    assert generic.guidance_model is None  # optional: a folder without one loads without one
    ours = BiomedJourneyPipeline.from_pretrained(folder, device="cpu")
    a = generic(prior, TEXT, num_images=1, seed=2, num_inference_steps=3)
    b = ours(prior, TEXT, num_images=1, seed=2, num_inference_steps=3)
    np.testing.assert_allclose(a.images[0], b.images[0], atol=1e-5, rtol=0)  # ours loads NHWC (channels_last)
    assert ours.defaults == pipe.defaults and ours.info == pipe.info


def test_output_types_and_return_dict(pipe, prior):
    kw = dict(num_images=2, seed=1, num_inference_steps=2)
    arr = pipe(prior, TEXT, **kw).images
    pil = pipe(prior, TEXT, output_type="pil", **kw).images
    lat = pipe(prior, TEXT, output_type="latent", **kw).images
    (tup,) = pipe(prior, TEXT, return_dict=False, **kw)
    assert pil[0].size == (64, 64) and pil[0].mode == "L"
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, arr[0], atol=0.5 / 255 + 1e-6)
    assert lat[0].shape == (4, 32, 32)
    np.testing.assert_array_equal(tup[1], arr[1])


def test_callback_on_step_end_sees_and_replaces_the_latents(pipe, prior):
    seen = []

    def zero_latents(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    kw = dict(num_images=1, seed=1, num_inference_steps=3, change_transfer=False)
    out = pipe(prior, TEXT, callback_on_step_end=zero_latents, **kw)
    assert seen == [(0, (1, 4, 32, 32)), (1, (1, 4, 32, 32)), (2, (1, 4, 32, 32))]
    zero = pipe.decode_latents(torch.zeros(1, 4, 32, 32))[0]
    np.testing.assert_allclose(out.images[0], zero, atol=1e-6)


class _Recorder:
    """Wraps the UNet's forward: records (noisy+prior input, text embedding) of every call."""

    def __init__(self, unet):
        self.forward, self.calls = unet.forward, []

    def __call__(self, x, t, encoder_hidden_states=None, **kw):
        self.calls.append((x.detach().clone(), encoder_hidden_states.detach().clone()))
        return self.forward(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


def _states(pipe, text: str, used: int) -> torch.Tensor:
    """`text`'s token states up to the call's length `used` (the padding no row attends to is dropped)."""
    emb, mask = pipe.encode_prompt([text])
    assert not mask[0, used:].any(), f"{text!r} has tokens beyond the {used} the UNet got"
    return emb[0, :used]


@pytest.mark.parametrize("transfer", [False, True])
def test_each_guidance_branch_receives_its_own_prior_and_text(pipe, prior, monkeypatch, transfer):
    """Rows of the one batched call: [text+prior, prior only, neither] (x k trajectories), at scales != 1."""
    rec = _Recorder(pipe.unet)
    monkeypatch.setattr(pipe.unet, "forward", rec)
    neg = "No significant interval change."
    n = 2
    pipe(prior, TEXT, num_images=n, seed=0, num_inference_steps=2, guidance_scale=3.0, image_guidance_scale=1.7,
         negative_prompt=neg, change_transfer=transfer)
    k = 2 if transfer else 1
    z = pipe.encode_images(torch.from_numpy(prior)[None, None])[0]          # (C, h, w)
    assert len(rec.calls) == 2
    for x, emb in rec.calls:
        text, empty_or_neg, no_change = (_states(pipe, s, emb.shape[1]) for s in (TEXT, neg, NO_CHANGE))
        c = x.shape[1] // 2
        rows = k * n
        assert x.shape[0] == 3 * rows
        cond = x[:, c:]                                                        # (3kB, C, h, w)
        for r in range(2 * rows):                                              # text+prior, prior only: the prior
            torch.testing.assert_close(cond[r], z)
        assert cond[2 * rows:].abs().max() == 0                                # neither: the zero latent
        for r in range(n):
            torch.testing.assert_close(emb[r], text)                           # the description ...
            if transfer:
                torch.testing.assert_close(emb[n + r], no_change)              # ... and the reference trajectory
        for r in range(rows, 3 * rows):
            torch.testing.assert_close(emb[r], empty_or_neg)                   # image-only and neither: negative
        noisy = x[:, :c]
        torch.testing.assert_close(noisy[:rows], noisy[rows:2 * rows])         # one latent per trajectory, 3 views
        torch.testing.assert_close(noisy[:rows], noisy[2 * rows:])


def test_text_only_mode_has_two_branches_and_no_prior(pipe, monkeypatch):
    rec = _Recorder(pipe.unet)
    monkeypatch.setattr(pipe.unet, "forward", rec)
    pipe(None, "Findings: Effusion.", num_images=1, seed=0, num_inference_steps=2, guidance_scale=4.0)
    x, emb = rec.calls[0]
    assert x.shape[0] == 2 and x[:, x.shape[1] // 2:].abs().max() == 0
    torch.testing.assert_close(emb[0], _states(pipe, "Findings: Effusion.", emb.shape[1]))
    torch.testing.assert_close(emb[1], _states(pipe, "", emb.shape[1]))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("transfer", [False, True])
def test_mask_keeps_the_prior_outside_and_changes_inside(pipe, prior, box, scheduler, transfer):
    kw = dict(num_images=2, seed=3, num_inference_steps=4, scheduler=scheduler, strength=0.75,
              change_transfer=transfer, guidance_scale=3.0)
    out = pipe(prior, TEXT, mask_image=box, **kw)
    whole = pipe(prior, TEXT, **kw)
    assert out.settings["region_restricted"] is True and out.mask is box
    for im, w in zip(out.images, whole.images):
        d = np.abs(im - prior)
        assert d[box == 0].max() == 0                                         # not one pixel outside
        assert d[box == 1].mean() > 1e-3                                      # the region did change
        assert np.abs(w - prior)[box == 0].mean() > 1e-3                      # (unmasked, it changes everywhere)


def test_soft_mask_scales_the_change_at_its_border(pipe, prior):
    soft = np.zeros((64, 64), np.float32)
    soft[:, :32] = 1.0
    soft[:, 32:40] = 0.5
    kw = dict(num_images=1, seed=3, num_inference_steps=4, strength=0.75, change_transfer=True)
    out = pipe(prior, TEXT, mask_image=soft, **kw).images[0]
    hard = pipe(prior, TEXT, mask_image=(soft > 0).astype(np.float32), **kw).images[0]
    inner = (slice(None), slice(32, 40))
    np.testing.assert_allclose((out - prior)[inner], 0.5 * (hard - prior)[inner], atol=2e-2)


def test_init_image_starts_the_described_trajectory_from_that_picture(pipe, prior, box, monkeypatch):
    """SDEdit from a rendering: the description's trajectory starts from the noised init image, the NO_CHANGE
    reference from the noised prior (same noise); change transfer then carries the rendering's own fine detail and,
    along the prior's edges that the rendering erased (w), leaves out the NO_CHANGE sample's error:
    out = prior + mask * (init + (a - D(E(init))) - (1 - w) (b - D(E(prior))) - prior)."""
    rendered = prior.copy()
    rendered[box == 1] = np.clip(rendered[box == 1] + 0.5, 0, 1)
    kw = dict(num_images=2, seed=0, num_inference_steps=10, strength=0.3, mask_image=box, change_transfer=True)
    firsts = []
    for init in (None, rendered):
        rec = _Recorder(pipe.unet)
        monkeypatch.setattr(pipe.unet, "forward", rec)
        out = pipe(prior, TEXT, init_image=init, **kw)
        firsts.append(rec.calls[0][0][:, :4])                                 # (3kB, C, h, w) noisy latents
        assert np.abs(out.images[0] - prior)[box == 0].max() == 0
    assert out.settings["transfer_detail"] == "start picture"
    (a, b), n = firsts, 2
    assert (a[:n] - b[:n]).abs().max() > 1e-2                                 # the description's rows moved
    torch.testing.assert_close(a[n:2 * n], b[n:2 * n])                        # the reference rows did not
    z_prior, z_init = (pipe.encode_images(torch.from_numpy(x)[None, None]) for x in (prior, rendered))
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    sched.set_timesteps(10)
    t0 = sched.timesteps[7:8]
    noise = torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(0))[None]
    expect = sched.scale_model_input(sched.add_noise(z_init, noise, t0), t0[0])
    torch.testing.assert_close(b[:1], expect, atol=1e-5, rtol=1e-5)
    lat = torch.stack(pipe(prior, TEXT, init_image=rendered, output_type="latent", **kw).images)   # (B, C, h, w)
    text_kw = {**kw, "change_transfer": False}
    ref = torch.stack(pipe(prior, NO_CHANGE, output_type="latent", **text_kw).images)      # from the prior
    rec_init, rec_prior = pipe.decode_latents(z_init)[0], pipe.decode_latents(z_prior)[0]
    w = erased_edges(rendered, prior)
    for im, x, y in zip(out.images, pipe.decode_latents(lat), pipe.decode_latents(ref)):
        follow = rendered + (x - rec_init) - (1 - w) * (y - rec_prior)
        np.testing.assert_allclose(im, np.clip(prior + box * (follow - prior), 0, 1), atol=2e-4)
    same = pipe(prior, NO_CHANGE, init_image=rendered, **kw)
    assert not np.allclose(same.images[0], prior)   # a rendering is a change even under the no-change text


def test_an_edge_the_drawing_erased_is_not_drawn_back_as_a_ghost():
    """Where a drawing covered an edge of the prior (a drawn effusion over the hemidiaphragm), the NO_CHANGE sample's
    error along that edge is the prior's structure, not the model's noise: it is left out there (no ghost line). Where
    the drawing kept the prior, nothing changes from plain change transfer (prior + a - b + the drawing's detail in
    place of the prior's), so the model's shared blur still cancels. 256 px: the shipped resolution."""
    r = _Settings(n=1, steps=4, g_text=1.0, g_img=1.0, scheduler="ddim", strength=0.3, negative_prompt="",
                  transfer=True, seed=0, text_only=False)
    y, _ = np.mgrid[0:256, 0:256]
    prior = np.where(y < 160, 0.3, 0.8).astype(np.float32)                # a sharp horizontal edge at row 160
    drawing = prior.copy()
    drawing[112:208, :128] = 0.8                                           # fluid over the edge, left half only
    w = erased_edges(drawing, prior)
    assert w[158:162, 8:120].min() == 1.0 and w[:, 140:].max() == 0.0 and w[60:100].max() == 0.0
    edge_error = np.where(np.abs(y - 160) < 3, 0.1, 0.0).astype(np.float32)  # the model's error at the prior's edge
    blur = np.full_like(prior, 0.02)                                         # shared by both samples (same noise)
    prior_recon, start_recon = prior - 0.01, drawing - 0.01
    a = start_recon + blur                                                   # the description: the drawing, harmonised
    b = prior_recon + blur + edge_error                                      # NO_CHANGE from the prior, with the edge
    out = _compose_from_start([a, b], drawing, [start_recon], prior, prior_recon, None, r)[0]
    plain = np.clip(prior + a - b + (drawing - start_recon) - (prior - prior_recon), 0, 1)
    assert np.abs(out - drawing)[120:200, 10:118].max() < 0.021            # inside the drawing: no ghost of the edge
    assert np.abs(plain - drawing)[120:200, 10:118].max() > 0.09           # (plain transfer drew it back)
    np.testing.assert_allclose(out[:, 140:], plain[:, 140:], atol=1e-6)    # the kept half: plain change transfer


def test_from_pretrained_never_unpickles(tmp_path, monkeypatch):
    """A folder whose UNet has only pickled (.bin) weights is refused, not unpickled."""
    import pickle
    from safetensors.torch import load_file
    from biomedjourney.pipeline import tiny_pipeline
    folder = tiny_pipeline(seed=0).save_pretrained(tmp_path / "m")
    st = next((folder / "unet").glob("*.safetensors"))
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")   # the test makes the pickle
    st.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    with pytest.raises((OSError, EnvironmentError, ValueError)):
        BiomedJourneyPipeline.from_pretrained(folder)
