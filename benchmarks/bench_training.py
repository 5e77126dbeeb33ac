"""Training-step cost with the latent/text cache (what train/train.py does) against encoding every
batch on the fly with the frozen autoencoder and text encoder (the peer), same run, same batch.

    OMP_NUM_THREADS=2 python benchmarks/bench_training.py --config demo-cpu --vae work/runs/demo-cpu/vae

Prints seconds per optimizer step for both and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from biomedjourney import dataset  # noqa: E402
from biomedjourney.model import build_unet, to_vae_input  # noqa: E402
from biomedjourney.text_encoders import build_text_encoder  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import stack_images, to_float  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo-cpu")
    ap.add_argument("--vae", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    cfg = load_config(a.config)
    tc = cfg.stage2
    pairs = [p for p in dataset.load_pairs() if p.progression_text][: tc.batch_size]
    priors = stack_images([p.prior.path for p in pairs], cfg.model.resolution)
    follows = stack_images([p.followup.path for p in pairs], cfg.model.resolution)
    texts = [p.progression_text for p in pairs]
    vae = AutoencoderKL.from_pretrained(a.vae).eval().requires_grad_(False)
    te = build_text_encoder(cfg.model.text_encoder)
    unet = build_unet(cfg.model, vae.config.latent_channels, te.dim)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sf = vae.config.scaling_factor

    def encode(x):
        with torch.no_grad():
            return vae.encode(to_vae_input(to_float(x), vae)).latent_dist.mode() * sf

    cache = (encode(follows), encode(priors), *te(texts))

    def step(on_the_fly: bool):
        if on_the_fly:
            z, zp = encode(follows), encode(priors)
            emb, mask = te(texts)
        else:
            z, zp, emb, mask = cache
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (len(z),))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.mixed_precision == "bf16"):
            pred = unet(torch.cat([z + noise, zp], 1), t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    res = {}
    for name, fly in (("cached", False), ("on the fly", True)):
        step(fly)
        ts = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step(fly)
            ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts)
        print(f"{name:>10}: median {res[name]:.2f} s/step  {[round(x, 2) for x in ts]}")
    print(f"config {a.config}, batch {tc.batch_size}, threads {torch.get_num_threads()}: "
          f"cache speed-up {res['on the fly'] / res['cached']:.2f}x over encoding every batch")


if __name__ == "__main__":
    main()
