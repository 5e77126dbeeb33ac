"""The diffusion curriculum on the tiny config over a handful of real images from the shared dataset."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biomedjourney import dataset
from biomedjourney.pipeline import BiomedJourneyPipeline, tiny_pipeline

pytestmark = pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
REPO = Path(__file__).resolve().parents[1]


def _train(prep, out, stage, steps=None, resume=None, stop_after=None, identity_prob=0.0):
    from train.config import load_config
    from train.train import train
    cfg = load_config("tiny")
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    tc.identity_prob = identity_prob
    if steps:
        tc.steps = steps
    return train(cfg, stage, prep, prep / "vae", out, resume=resume, stop_after=stop_after)


def test_two_stages_export_a_loadable_pipeline(tiny_prep, tmp_path):
    r1 = _train(tiny_prep, tmp_path, 1)
    assert r1["steps"] == 4 and np.isfinite(r1["final_loss"])
    r2 = _train(tiny_prep, tmp_path, 2)
    assert r2["steps"] == 4
    for stage in (1, 2):
        sd = tmp_path / f"stage{stage}"
        assert (sd / "log.csv").read_text().count("\n") == 5  # header + 4 steps
        assert list(sd.glob("val-*.png")), "validation grid missing"
        assert (sd / "checkpoints").is_dir()
    pipe = BiomedJourneyPipeline.from_pretrained(tmp_path / "stage2" / "export")
    assert pipe.info["stage"] == 2 and pipe.info["curriculum"] is True
    out = pipe(np.full((64, 64), 0.5, np.float32), "New right pleural effusion.", num_images=2, seed=0)
    assert len(out.images) == 2 and out.images[0].shape == (64, 64)
    # stage 2 started from the stage-1 export, not from scratch
    s1 = load_file(tmp_path / "stage1" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    s2 = load_file(tmp_path / "stage2" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    scratch = tiny_pipeline().unet.state_dict()
    k = "conv_out.weight"
    assert (s2[k].float() - s1[k].float()).abs().max() < (s2[k].float() - scratch[k]).abs().max()


def test_resume_latest_matches_uninterrupted_run(tiny_prep, tmp_path):
    _train(tiny_prep, tmp_path / "straight", 1, steps=4)
    _train(tiny_prep, tmp_path / "split", 1, steps=4, stop_after=2)   # "interrupted" after 2 steps
    shutil.rmtree(tmp_path / "split" / "stage1" / "export")
    _train(tiny_prep, tmp_path / "split", 1, steps=4, resume="latest")
    a = load_file(tmp_path / "straight" / "stage1" / "checkpoints" / "step-00000004" / "unet.safetensors")
    b = load_file(tmp_path / "split" / "stage1" / "checkpoints" / "step-00000004" / "unet.safetensors")
    ea = load_file(tmp_path / "straight" / "stage1" / "checkpoints" / "step-00000004" / "ema.safetensors")
    eb = load_file(tmp_path / "split" / "stage1" / "checkpoints" / "step-00000004" / "ema.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(ea[key], eb[key]), key
    # and the run really changed the weights
    assert not torch.equal(a["conv_out.weight"], tiny_pipeline().unet.state_dict()["conv_out.weight"])


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tiny_prep, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "train" / "train.py"), "--stage", "1", "--config", "tiny", "--data", str(tiny_prep),
           "--vae", str(tiny_prep / "vae"), "--out", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x 2 processes" in r.stdout + r.stderr
    h0 = (tmp_path / "stage1" / "weights-rank0.sha256").read_text()
    h1 = (tmp_path / "stage1" / "weights-rank1.sha256").read_text()
    assert h0 == h1
    assert (tmp_path / "stage1" / "export" / "model_index.json").is_file()


def test_v_prediction_is_trained_and_exported_with_its_scheduler(tiny_prep, tmp_path):
    from train.config import load_config
    from train.train import train
    cfg = load_config("tiny")
    cfg.model.prediction_type = "v_prediction"
    cfg.stage1.steps = 2
    train(cfg, 1, tiny_prep, tiny_prep / "vae", tmp_path)
    pipe = BiomedJourneyPipeline.from_pretrained(tmp_path / "stage1" / "export")
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    out = pipe(None, "Findings: Effusion.", num_images=1, seed=0)
    assert np.isfinite(out.images[0]).all()


def test_autoencoder_training_exports_and_decoder_only_keeps_the_encoder(tiny_prep, tmp_path):
    import json

    from diffusers import AutoencoderKL

    from train.config import load_config
    from train.train_autoencoder import train as train_ae
    cfg = load_config("tiny")
    r = train_ae(cfg, tiny_prep, tmp_path / "ae")
    m = json.loads((tmp_path / "ae" / "vae_metrics.json").read_text())
    assert r["steps"] == 4 and m["n"] > 0 and np.isfinite(m["psnr"]) and 0 < m["ssim"] <= 1
    assert (tmp_path / "ae" / "vae_log.csv").is_file() and list((tmp_path / "ae" / "checkpoints-vae").glob("step-*"))
    vae = AutoencoderKL.from_pretrained(tmp_path / "ae" / "vae")
    assert vae.config.in_channels == 1 and vae.config.scaling_factor != 1.0   # set from the data
    train_ae(cfg, tiny_prep, tmp_path / "ft", init=tmp_path / "ae" / "vae", decoder_only=True)
    ft = AutoencoderKL.from_pretrained(tmp_path / "ft" / "vae")
    for k, v in vae.encoder.state_dict().items():
        assert torch.equal(v, ft.encoder.state_dict()[k]), k
    assert not torch.equal(vae.decoder.conv_out.weight, ft.decoder.conv_out.weight)
    assert ft.config.scaling_factor == vae.config.scaling_factor
    assert 0 < m["ssim_latent_noise_0.2"] <= 1
    cfg.autoencoder.latent_noise = 0.5                          # decoder trained on perturbed latents
    train_ae(cfg, tiny_prep, tmp_path / "ft-noise", init=tmp_path / "ae" / "vae", decoder_only=True)
    ftn = AutoencoderKL.from_pretrained(tmp_path / "ft-noise" / "vae")
    assert torch.equal(ftn.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(ftn.decoder.conv_out.weight, ft.decoder.conv_out.weight)


def test_identity_rows_turn_only_rows_with_a_prior_into_no_change_copies():
    from train.train import identity_rows
    n = 4000
    zi, pi = torch.arange(n), torch.where(torch.arange(n) % 4 == 0, -1, torch.arange(n) + n)
    ti, drop = torch.full((n,), 7), torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.1
    z2, t2, d2 = identity_rows(zi, pi, ti, drop, 0.2, no_change=3, g=torch.Generator().manual_seed(0))
    same = z2 != zi
    assert torch.equal(z2[same], pi[same]) and (t2[same] == 3).all() and not d2[same].any()
    assert torch.equal(t2[~same], ti[~same]) and torch.equal(d2[~same], drop[~same])
    assert (pi[same] >= 0).all()                                 # rows without a prior (stage 1 style) never swap
    assert abs(same.sum().item() / (pi >= 0).sum().item() - 0.2) < 0.03
    z1, t1, d1 = identity_rows(zi, pi, ti, drop, 1.0, no_change=3, g=torch.Generator().manual_seed(0))
    assert torch.equal(z1[pi >= 0], pi[pi >= 0]) and (t1[pi >= 0] == 3).all()


def test_stage2_with_identity_rows_rebuilds_a_cache_without_the_no_change_prompt(tiny_prep, tmp_path):
    from safetensors.torch import save_file
    from biomedjourney.config import NO_CHANGE
    from train.train import _keys
    _train(tiny_prep, tmp_path, 1)
    r = _train(tiny_prep, tmp_path, 2, identity_prob=0.5)
    assert r["steps"] == 4 and np.isfinite(r["final_loss"])
    cache_path = next(tmp_path.glob("cache-stage2-*.safetensors"))
    cache = load_file(cache_path)
    assert _keys([NO_CHANGE])[0] in cache["text_keys"]
    keep = cache["text_keys"] != _keys([NO_CHANGE])[0]          # an older cache, written before NO_CHANGE was needed
    save_file({**cache, "text_keys": cache["text_keys"][keep], "text_emb": cache["text_emb"][keep],
               "text_mask": cache["text_mask"][keep]}, cache_path)
    shutil.rmtree(tmp_path / "stage2")
    _train(tiny_prep, tmp_path, 2, identity_prob=0.5)
    assert _keys([NO_CHANGE])[0] in load_file(cache_path)["text_keys"]


def test_conditioning_dropout_proportions_match_instructpix2pix():
    """5 % text only, 5 % image only, 5 % both (InstructPix2Pix §3.2.1); stage 1 always drops the prior."""
    from train.config import DiffusionTrain
    from train.train import conditioning_dropout
    tc = DiffusionTrain(drop_text=0.05, drop_image=0.05, drop_both=0.05)
    text, image = conditioning_dropout(200_000, tc, stage=2, g=torch.Generator().manual_seed(0))
    both = (text & image).float().mean().item()
    text_only = (text & ~image).float().mean().item()
    image_only = (image & ~text).float().mean().item()
    assert abs(both - 0.05) < 0.003 and abs(text_only - 0.05) < 0.003 and abs(image_only - 0.05) < 0.003
    assert abs(text.float().mean().item() - 0.10) < 0.004 and abs(image.float().mean().item() - 0.10) < 0.004
    _, image1 = conditioning_dropout(1000, tc, stage=1, g=torch.Generator().manual_seed(0))
    assert image1.all()


def test_stage2_with_consistency_losses_canonical_text_and_sqrt_sampling_trains(tiny_prep, tmp_path):
    from biomedjourney.guidance import GuidanceModel
    from train.config import load_config
    from train.train import train
    torch.manual_seed(0)
    GuidanceModel(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                  time_channels=8).save_pretrained(tmp_path / "gm")
    cfg = load_config("tiny")
    tc = cfg.stage2
    tc.steps, tc.text, tc.sampling = 3, "canonical", "sqrt"
    tc.guidance_model, tc.identity_weight, tc.pathology_weight, tc.consistency_max_t = str(tmp_path / "gm"), 1.0, 1.0, 1000
    r = train(cfg, 2, tiny_prep, tiny_prep / "vae", tmp_path / "run", curriculum=False)
    assert r["steps"] == 3 and np.isfinite(r["final_loss"])
    tc.guidance_model = ""
    with pytest.raises(SystemExit, match="guidance_model"):
        train(cfg, 2, tiny_prep, tiny_prep / "vae", tmp_path / "run2", curriculum=False)
