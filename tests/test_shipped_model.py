"""The embedded default model in assets/: small, fp16 safetensors, loads offline and generates at 256 px."""
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from biomedjourney.pipeline import BiomedJourneyPipeline, default_model_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
pytestmark = [pytest.mark.weights,
              pytest.mark.skipif(not (ASSETS / "biomedjourney-cxr").is_dir(), reason="no shipped model in assets/")]


def test_shipped_folder_is_small_fp16_safetensors_only():
    folder = ASSETS / "biomedjourney-cxr"
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 60e6
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.__str__() == "torch.float16"


def test_default_model_generates_at_256_px_reproducibly(rg1_path, monkeypatch):
    monkeypatch.delenv("BIOMEDJOURNEY_MODEL", raising=False)
    assert default_model_path() == ASSETS / "biomedjourney-cxr"
    pipe = BiomedJourneyPipeline.from_pretrained(device="cpu")
    assert pipe.resolution == 256 and pipe.info["stage"] == 2 and pipe.info["registration"] is True
    a = pipe(rg1_path, "New right pleural effusion.", num_images=1, seed=3)
    b = pipe(rg1_path, "New right pleural effusion.", num_images=1, seed=3)
    assert a.images[0].shape == (256, 256)
    np.testing.assert_array_equal(a.images[0], b.images[0])
    # the model's own drawing keeps the patient: closer to its own prior than to a flipped one
    # (not under change transfer, which starts from the prior by construction)
    own = pipe(rg1_path, "New right pleural effusion.", num_images=1, seed=3, change_transfer=False).images[0]
    assert np.abs(own - a.prior).mean() < 0.75 * np.abs(own - a.prior[:, ::-1]).mean()  # measured 0.039 vs 0.063


# the images the shipped model gave for these calls before the pipeline became a diffusers DiffusionPipeline
# (tests/fixtures: 8x8-pixel means of two 256 px images per case, seed 3; text-only: seed 1)
BEFORE_REFACTOR = {
    "default": dict(),
    "plain": dict(change_transfer=False),
    "plain_strength1_ddim": dict(change_transfer=False, strength=1.0, scheduler="ddim", guidance_scale=3.0,
                                 image_guidance_scale=1.2),
    "euler_a": dict(change_transfer=False, scheduler="euler_a", strength=0.8),
}


@pytest.mark.parametrize("case", [*BEFORE_REFACTOR, "text_only"])
def test_same_seed_same_images_as_before_the_diffusers_refactor(rg1_path, case):
    expected = np.load(Path(__file__).parent / "fixtures" / "shipped_images_pre_diffusers_refactor.npz")[case]
    pipe = BiomedJourneyPipeline.from_pretrained(ASSETS / "biomedjourney-cxr", device="cpu")
    if case == "text_only":
        out = pipe(None, "PA chest radiograph, 58-year-old male. Findings: Effusion.", num_images=2, seed=1)
    else:
        out = pipe(rg1_path, "New right pleural effusion.", num_images=2, seed=3, **BEFORE_REFACTOR[case])
    got = np.stack(out.images).reshape(2, 32, 8, 32, 8).mean((2, 4))
    # NHWC weights (channels_last) sum in another order: measured up to 2.5e-5 off at 1 thread (NCHW: exactly 0)
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)


def test_shipped_model_keeps_the_patient_for_no_change_and_changes_more_for_a_finding(rg1_path):
    """On a radiograph from outside the dataset (pydicom's RG1_UNCI), the model's own drawing (no change
    transfer): measured 0.81 SSIM to the prior for "no change" and 1.4x more change for a new effusion."""
    from biomedjourney.config import NO_CHANGE
    from biomedjourney.metrics import image_ssim
    pipe = BiomedJourneyPipeline.from_pretrained(ASSETS / "biomedjourney-cxr", device="cpu")
    d = pipe.defaults
    assert (d.strength, d.negative_prompt, d.change_transfer) == (0.6, NO_CHANGE, True)
    assert (d.region, d.render, d.render_strength) == ("auto", True, 0.3)   # assets/MODEL_CARD.md, "Following the text"
    assert d.noise_opt_steps == 4 and pipe.guidance_model is not None       # assets/MODEL_CARD.md, "Guidance model"
    same = pipe(rg1_path, NO_CHANGE, num_images=1, seed=0, change_transfer=False)
    new = pipe(rg1_path, "New right pleural effusion.", num_images=1, seed=0, change_transfer=False)
    assert image_ssim(same.images[0], same.prior) > 0.75
    assert np.abs(new.images[0] - new.prior).mean() > 1.2 * np.abs(same.images[0] - same.prior).mean()
    shipped = pipe(rg1_path, "New right pleural effusion.", num_images=1, seed=0)   # default: change transfer
    np.testing.assert_allclose(shipped.images[0], np.clip(new.prior + new.images[0] - same.images[0], 0, 1), atol=2e-3)


def test_model_card_states_use_licence_and_results():
    card = (ASSETS / "MODEL_CARD.md").read_text()
    for needle in ("not for diagnosis", "CC BY-NC-SA 4.0", "PSNR", "validation_grid.png", "train/configs/demo-cpu.yaml",
                   "--identity-prob 0.2", "--latent-noise 0.3", "lung_mask.png", "Following the text",
                   "Knowledge-driven rendering", "CC BY 4.0", "Dice"):
        assert needle in card
    for png in ("validation_grid.png", "validation_grid_plain.png", "lung_mask.png"):
        assert (ASSETS / png).stat().st_size > 20_000, png
