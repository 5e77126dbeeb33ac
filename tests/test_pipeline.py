"""Core model and pipeline: tiny random models on CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biomedjourney.model import SCHEDULERS, make_scheduler, widen_conv_in
from biomedjourney.pipeline import BiomedJourneyPipeline, dual_guidance, progress_callback, tiny_pipeline


def test_shapes_ranges_and_seeds(pipe, prior):
    out = pipe(prior, "New right pleural effusion.", num_images=3, seed=7, num_inference_steps=3)
    assert out.seeds == [7, 8, 9]
    assert len(out.images) == 3 and out.prior.shape == (64, 64)
    for im in out.images:
        assert im.shape == (64, 64) and im.dtype == np.float32
        assert im.min() >= 0.0 and im.max() <= 1.0 and im.std() > 0
    assert not np.allclose(out.images[0], out.images[1])          # different seeds differ
    assert out.settings["seed"] == 7 and out.settings["prompt"] == "New right pleural effusion."


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_same_seed_same_images_and_each_image_reproducible_alone(pipe, prior, scheduler):
    kw = dict(num_inference_steps=3, scheduler=scheduler)
    a = pipe(prior, "worse opacities", num_images=2, seed=3, **kw)
    b = pipe(prior, "worse opacities", num_images=2, seed=3, **kw)
    c = pipe(prior, "worse opacities", num_images=2, seed=4, **kw)
    alone = pipe(prior, "worse opacities", num_images=1, seed=a.seeds[1], **kw)
    for x, y in zip(a.images, b.images):
        np.testing.assert_array_equal(x, y)
    assert np.abs(a.images[0] - c.images[0]).max() > 1e-3
    np.testing.assert_allclose(alone.images[0], a.images[1], atol=1e-4)


def test_dual_guidance_formula():
    g = torch.Generator().manual_seed(0)
    full, img, unc = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(dual_guidance(full, img, unc, 1.0, 1.0), full)   # scales 1 -> fully conditioned
    torch.testing.assert_close(dual_guidance(full, img, unc, 0.0, 0.0), unc)
    torch.testing.assert_close(dual_guidance(full, img, unc, 0.0, 1.0), img)
    torch.testing.assert_close(dual_guidance(full, img, unc, 2.0, 1.5), unc + 1.5 * (img - unc) + 2.0 * (full - img))


def test_scales_of_one_equal_the_fully_conditioned_denoiser(pipe, prior):
    """With text and image scales 1 the 3-branch batch reduces to the conditioned branch alone."""
    out = pipe(prior, "new effusion", num_images=1, seed=11, num_inference_steps=3, guidance_scale=1.0,
               image_guidance_scale=1.0, scheduler="ddim")
    sched = make_scheduler("ddim", pipe.scheduler_config)
    sched.set_timesteps(3)
    emb, mask = pipe.encode_prompt(["new effusion"])
    z_p = pipe.encode_images(torch.from_numpy(prior)[None, None])
    lat = torch.randn((4, 32, 32), generator=torch.Generator().manual_seed(11))[None]  # (1, 4, 32, 32) as the pipeline draws it
    with torch.no_grad():
        for t in sched.timesteps:
            eps = pipe.unet(torch.cat([lat, z_p], 1), t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
            lat = sched.step(eps, t, lat).prev_sample
    np.testing.assert_allclose(pipe.decode_latents(lat)[0], out.images[0], atol=1e-4)


def test_text_only_mode_uses_no_prior(pipe):
    out = pipe(None, "Findings: Cardiomegaly.", num_images=2, seed=0, num_inference_steps=2)
    assert out.prior is None and out.settings["text_only"] is True and len(out.images) == 2


def test_widen_conv_in_is_exact_when_the_prior_latent_is_zero():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=8)
    x, emb, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([10, 500])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb).sample
        widened = widen_conv_in(unet, 4)
        assert widened.config.in_channels == 8 and widened.conv_in.in_channels == 8
        out = widened(torch.cat([x, torch.zeros_like(x)], 1), t, encoder_hidden_states=emb).sample
        moved = widened(torch.cat([x, torch.ones_like(x)], 1), t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(moved, ref)  # new channels start at zero weight: no effect until trained
    assert widened.conv_in.weight[:, 4:].abs().sum() == 0


def test_save_load_round_trip_gives_identical_images(pipe, prior, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    loaded = BiomedJourneyPipeline.from_pretrained(tmp_path / "m", device="cpu")
    a = pipe(prior, "new effusion", num_images=2, seed=5, num_inference_steps=3)
    b = loaded(prior, "new effusion", num_images=2, seed=5, num_inference_steps=3)
    for x, y in zip(a.images, b.images):  # the loaded weights are the same numbers in NHWC order (channels_last)
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    assert loaded.defaults == pipe.defaults
    assert (loaded.config.resolution, loaded.config.aspect) == (pipe.config.resolution, pipe.config.aspect)


def test_loaded_weights_are_channels_last_and_save_back_bit_identical(pipe, tmp_path):
    from safetensors.torch import load_file
    pipe.save_pretrained(tmp_path / "a")
    loaded = BiomedJourneyPipeline.from_pretrained(tmp_path / "a", device="cpu")
    assert loaded.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    loaded.save_pretrained(tmp_path / "b")      # safetensors refuses non-contiguous tensors: contiguous copies
    assert loaded.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)   # the pipeline keeps NHWC
    for sub in ("unet", "vae"):
        a = load_file(tmp_path / "a" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_export_is_half_the_size_and_still_generates(pipe, prior, tmp_path):
    pipe.save_pretrained(tmp_path / "fp32")
    pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("diffusion_pytorch_model.safetensors"))  # noqa: E731
    assert size(tmp_path / "fp16") < 0.6 * size(tmp_path / "fp32")
    out = BiomedJourneyPipeline.from_pretrained(tmp_path / "fp16", device="cpu")(prior, "x", num_images=1, num_inference_steps=2)
    assert np.isfinite(out.images[0]).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=0), "num_images must be between 1 and 16, got 0"),
    (dict(num_images=17), "got 17"),
    (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 1000, got 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
    (dict(image_guidance_scale=float("nan")), "image_guidance_scale must be a finite number >= 0, got nan"),
    (dict(strength=0.1, num_inference_steps=5), "strength 0.1 x 5 steps leaves no denoising step"),
    (dict(output_type="tensor"), "output_type must be 'np', 'pil' or 'latent'"),
    (dict(mask_image=np.zeros((64, 64), np.float32)), "mask_image is empty"),
    (dict(mask_image=np.ones((32, 32), np.float32)), r"mask_image must be a finite array of shape \(64, 64\) in"),
    (dict(scheduler="nope"), "Unknown scheduler 'nope'"),
])
def test_bad_settings_raise_with_the_numbers(pipe, prior, kwargs, message):
    with pytest.raises(ValueError, match=message if "\\(" in message else message.replace("(", r"\(").replace(")", r"\)")):
        pipe(prior, "x", **kwargs)


def test_mismatched_unet_and_autoencoder_are_refused():
    p = tiny_pipeline()
    from biomedjourney.model import build_vae
    from biomedjourney.pipeline import tiny_model_config
    cfg = tiny_model_config()
    cfg.vae.latent_channels = 8
    with pytest.raises(ValueError, match=r"UNet expects 8 input channels, got 8\+8"):
        BiomedJourneyPipeline(p.unet, build_vae(cfg), p.scheduler, p.text_encoder)


def test_missing_model_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model"):
        BiomedJourneyPipeline.from_pretrained(tmp_path / "nothing-here")


def test_cli_generate_on_the_pydicom_chest_radiograph(tiny_model_dir, rg1_path, tmp_path, capsys):
    from biomedjourney.cli import main
    from biomedjourney.imaging import read_dicom_markers
    rc = main(["generate", "--prior", rg1_path, "--text", "New right pleural effusion.", "--num-images", "2",
               "--seed", "0", "--out", str(tmp_path), "--model", str(tiny_model_dir), "--dicom", "--steps", "2",
               "--heatmaps", "--change-transfer", "on", "--negative-prompt", "No significant interval change."])
    assert rc == 0
    side = json.loads((tmp_path / "settings.json").read_text())
    assert side["seeds"] == [0, 1] and side["prompt"] == "New right pleural effusion." and side["num_inference_steps"] == 2
    assert side["change_transfer"] is True and side["negative_prompt"] == "No significant interval change."
    assert sorted(p.name for p in tmp_path.glob("followup_*")) == [
        "followup_1_seed0.dcm", "followup_1_seed0.png", "followup_2_seed1.dcm", "followup_2_seed1.png"]
    assert sorted(p.name for p in tmp_path.glob("heatmap_*.png")) == [
        "heatmap_mean_change.png", "heatmap_sample1.png", "heatmap_sample2.png", "heatmap_uncertainty.png"]
    m = read_dicom_markers(tmp_path / "followup_1_seed0.dcm")
    assert "DERIVED" in m["ImageType"] and m["ConversionType"] == "SYN" and not m["PatientName"]
    assert "not for diagnosis" in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(tiny_model_dir, tmp_path, capsys):
    from biomedjourney.cli import main
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    rc = main(["generate", "--prior", str(bad), "--text", "x", "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir)])
    assert rc == 2 and "empty" in capsys.readouterr().err.lower()


def test_strength_starts_from_the_noised_prior_and_runs_fewer_steps(pipe, prior):
    calls = []
    out = pipe(prior, "x", num_images=1, seed=0, num_inference_steps=8, strength=0.5,
               callback_on_step_end=progress_callback(calls.append))
    assert calls == [1, 2, 3, 4] and out.settings["strength"] == 0.5
    full = pipe(prior, "x", num_images=1, seed=0, num_inference_steps=8)
    assert full.settings["strength"] == 1.0 and not np.allclose(out.images[0], full.images[0])
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 0"):
        pipe(prior, "x", strength=0.0)


def test_negative_prompt_replaces_the_empty_prompt_in_the_guidance_branches(pipe, prior):
    kw = dict(num_images=1, seed=3, num_inference_steps=3)
    neg = "No significant interval change."
    out = pipe(prior, "New right pleural effusion.", negative_prompt=neg, **kw)
    same = pipe(prior, "New right pleural effusion.", negative_prompt_embeds=pipe.encode_prompt([neg]), **kw)
    plain = pipe(prior, "New right pleural effusion.", **kw)
    assert np.array_equal(out.images[0], same.images[0]) and out.settings["negative_prompt"] == neg
    assert plain.settings["negative_prompt"] == "" and not np.allclose(out.images[0], plain.images[0])
    with pytest.raises(TypeError, match="negative_prompt must be a string, got int"):
        pipe(prior, "x", negative_prompt=3)


def test_padding_no_row_attends_to_is_dropped_and_changes_nothing(pipe, prior):
    """The cross-attention spans the longest text of the batch: what lies beyond it never reaches the UNet,
    and its last token still does."""
    emb, mask = pipe.encode_prompt(["New large right pleural effusion with some basal atelectasis."])
    used, neg_used = int(mask.sum()), int(pipe.encode_prompt([""])[1].sum())
    assert neg_used < used < mask.shape[1]
    seen = []
    kw = dict(num_images=1, seed=2, num_inference_steps=3, negative_prompt="")
    out = pipe(prior, "x", prompt_embeds=(emb, mask), callback_on_step_end=lambda p, i, t, d: seen.append(d),
               callback_on_step_end_tensor_inputs=["emb", "emb_mask"], **kw)
    assert seen[0]["emb"].shape[1] == used and seen[0]["emb_mask"].shape[1] == used
    garbage = emb.clone()
    garbage[:, used:] = 10 * torch.randn_like(garbage[:, used:])                  # padding: never attended to
    assert np.array_equal(pipe(prior, "x", prompt_embeds=(garbage, mask), **kw).images[0], out.images[0])
    last = emb.clone()
    last[:, used - 1] += 1                                                          # the longest text's last token
    assert not np.allclose(pipe(prior, "x", prompt_embeds=(last, mask), **kw).images[0], out.images[0])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_change_transfer_adds_only_the_described_change_to_the_prior(pipe, prior, scheduler):
    from biomedjourney.config import NO_CHANGE
    kw = dict(num_images=2, seed=4, num_inference_steps=4, scheduler=scheduler, strength=0.75)
    out = pipe(prior, "New right pleural effusion.", change_transfer=True, **kw)
    a = pipe(prior, "New right pleural effusion.", **kw).images       # the same noise, drawn call by call
    b = pipe(prior, NO_CHANGE, **kw).images
    assert out.settings["change_transfer"] is True
    for i in range(2):  # image i = prior + sample_i(text) - sample_i(no change): also for the ancestral sampler
        np.testing.assert_allclose(out.images[i], np.clip(out.prior + a[i] - b[i], 0, 1), atol=1e-5)
    steps = []
    same = pipe(prior, NO_CHANGE, change_transfer=True, callback_on_step_end=progress_callback(steps.append), **kw)
    np.testing.assert_allclose(same.images[0], same.prior, atol=1e-6)  # nothing described, nothing added
    assert steps == [] and same.settings["change_transfer"] is True    # ... and nothing denoised to find that out
    assert not np.allclose(out.images[0], out.prior, atol=1e-3)


def test_change_transfer_is_off_without_a_prior(pipe):
    out = pipe(None, "Findings: Effusion.", num_images=1, num_inference_steps=2, change_transfer=True)
    assert out.settings["change_transfer"] is False and out.images[0].shape == (64, 64)


def test_sampler_overrides_from_the_command_line():
    from biomedjourney.config import SamplerConfig
    d = SamplerConfig()
    o = d.with_overrides(["strength=0.6", "change_transfer=false", "negative_prompt=No significant interval change.",
                          "num_images=2"])
    assert (o.strength, o.change_transfer, o.negative_prompt, o.num_images) == (
        0.6, False, "No significant interval change.", 2)
    assert d.with_overrides(["change_transfer=True"]).change_transfer is True and d.strength == 1.0  # a copy
    with pytest.raises(ValueError, match="use KEY=VALUE with KEY one of num_images"):
        d.with_overrides(["strenght=0.6"])
    with pytest.raises(ValueError, match="change_transfer must be true or false, got 'yes please'"):
        d.with_overrides(["change_transfer=yes please"])


def test_tiny_model_is_defined_once():
    """The tests' architecture is one preset: the training config names it, the pipeline builds it."""
    import pytest
    from biomedjourney.config import ModelConfig
    from biomedjourney.pipeline import tiny_model_config
    from train.config import load_config
    assert load_config("tiny").model == tiny_model_config() == ModelConfig.from_dict("tiny")
    with pytest.raises(ValueError, match="unknown model preset 'tinyy'"):
        ModelConfig.from_dict("tinyy")
