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
    # it keeps the patient: closer to its own prior than to a flipped one
    err_own = np.abs(a.images[0] - a.prior).mean()
    err_other = np.abs(a.images[0] - a.prior[:, ::-1]).mean()
    assert err_own < err_other


def test_model_card_states_use_licence_and_results():
    card = (ASSETS / "MODEL_CARD.md").read_text()
    for needle in ("not for diagnosis", "CC BY-NC-SA 4.0", "PSNR", "validation_grid.png", "train/configs/demo-cpu.yaml"):
        assert needle in card
    assert (ASSETS / "validation_grid.png").stat().st_size > 50_000
