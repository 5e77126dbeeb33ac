"""Copy an exported pipeline folder into assets/ as fp16 safetensors (optionally with another autoencoder
whose ENCODER is identical, e.g. the decoder-fine-tuned one), with the sampler defaults of a training preset
(its `sampler:` block is the one place they are written), and print its size.

    python train/ship.py --export work/runs/demo-cpu/stage2/export --to assets/biomedjourney-cxr --config demo-cpu
    python train/ship.py --export work/runs/demo-cpu/stage1/export --vae work/runs/demo-cpu/vae-ft/vae --to assets/baselines/stage1
    python train/ship.py --export assets/biomedjourney-cxr --to assets/biomedjourney-cxr --config demo-cpu   # new defaults only
    python train/ship.py --export assets/biomedjourney-cxr --to assets/biomedjourney-cxr --guidance-model GM  # + guidance model
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from biomedjourney.atomic import atomic_write
from biomedjourney.pipeline import BiomedJourneyPipeline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--to", required=True, type=Path)
    ap.add_argument("--vae", type=Path, default=None, help="autoencoder folder to ship instead (same encoder)")
    ap.add_argument("--note", default="", help="added to the model's info")
    ap.add_argument("--guidance-model", type=Path, default=None,
                    help="a train/train_guidance.py export to ship as the pipeline's guidance_model component")
    ap.add_argument("--config", default=None,
                    help="training preset (name or YAML) whose sampler: block becomes the shipped defaults "
                         "(default: keep the export's)")
    a = ap.parse_args(argv)
    pipe = BiomedJourneyPipeline.from_pretrained(a.export, device="cpu", dtype=torch.float32)
    if a.vae is not None:
        vae = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32)
        enc_old = {k: v for k, v in pipe.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
        enc_new = load_file(a.vae / "diffusion_pytorch_model.safetensors")
        drift = max(float((enc_old[k] - enc_new[k].float()).abs().max()) for k in enc_old)
        if drift > 1e-2:  # fp16 export rounding is ~1e-3; anything larger is another encoder
            raise SystemExit(f"{a.vae} has a different encoder (max weight difference {drift:.3g}): latents would not match")
        pipe.vae = vae
        pipe.info["autoencoder"] = str(a.vae)
    if a.guidance_model is not None:
        from biomedjourney.guidance import GuidanceModel
        pipe.register_modules(guidance_model=GuidanceModel.from_pretrained(a.guidance_model, torch_dtype=torch.float32).eval())
        m = a.guidance_model / "metrics.json"
        pipe.info["guidance_model"] = json.loads(m.read_text()).get("command", str(a.guidance_model)) if m.is_file() \
            else str(a.guidance_model)
    if a.note:
        pipe.info["note"] = a.note
    if a.config:
        from train.config import load_config
        pipe.defaults = load_config(a.config).sampler
    # written beside --to and renamed into place: an interrupted ship never leaves a half-written model
    def write(tmp: str) -> None:
        pipe.save_pretrained(tmp, dtype=torch.float16)
        metrics = a.guidance_model / "metrics.json" if a.guidance_model is not None else None
        if metrics is not None and metrics.is_file():  # its validation scores travel with it
            shutil.copyfile(metrics, Path(tmp) / "guidance_model" / "metrics.json")

    atomic_write(a.to, write, directory=True)
    size = sum(f.stat().st_size for f in a.to.rglob("*") if f.is_file())
    print(f"shipped {a.export} -> {a.to}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
