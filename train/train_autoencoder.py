"""Train the 1-channel CXR autoencoder (diffusers AutoencoderKL) on random crops.

    python train/train_autoencoder.py --config demo-cpu --data work/data/cxr-prep --out work/runs/demo-cpu
    python train/train_autoencoder.py --config demo-cpu --data ... --out ... --sweep 4,8,16 --minutes 4

Writes OUT/vae/ (save_pretrained, scaling_factor set to 1/std of the training latents),
OUT/vae_metrics.json (val PSNR/SSIM at full resolution), OUT/vae_log.csv, checkpoints in
OUT/checkpoints-vae/ (resume with --resume latest). --sweep trains one short run per latent
channel count and records the reconstruction-vs-channels curve (sweep.csv, sweep.png).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from biomedjourney.atomic import atomic_write
from biomedjourney.config import write_json
from biomedjourney.metrics import psnr, ssim
from biomedjourney.model import build_vae, count_parameters
from train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from train.config import RunConfig, config_dict, load_config
from train.data import batch_indices, stack_images, step_generator, to_float
from train.manifest import read_manifest


def load_split_images(data: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = read_manifest(Path(data) / "stage1.csv")
    train = [r["image"] for r in rows if r["split"] == "train"]
    val = [r["image"] for r in rows if r["split"] == "val"]
    if not train:
        raise SystemExit(f"No training images in {data}/stage1.csv: run train/prepare_data.py first")
    return stack_images(train, size), stack_images(val, size)


@torch.no_grad()
def evaluate_vae(vae, images: torch.Tensor, batch_size: int = 16, latent_noise: float = 0.2) -> dict:
    """Full-resolution reconstruction PSNR/SSIM on [0, 1] images (posterior mode), and SSIM when the latent is
    perturbed by latent_noise x its std (seeded): how much a sampler's small latent errors would cost."""
    vae.eval()
    dev = next(vae.parameters()).device
    g = torch.Generator().manual_seed(0)
    ps, ss, sn = [], [], []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size]).to(dev)             # (B, 1, H, W) in [-1, 1]
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        x01, y01 = (x + 1) / 2, ((y + 1) / 2).clamp(0, 1)
        ps.append(psnr(y01, x01, reduce=False).cpu())
        ss.append(ssim(y01, x01, reduce=False).cpu())
        zn = z + latent_noise * z.std() * torch.randn(z.shape, generator=g).to(dev)
        sn.append(ssim(((vae.decode(zn).sample + 1) / 2).clamp(0, 1), x01, reduce=False).cpu())
    vae.train()
    p, s = torch.cat(ps), torch.cat(ss)
    return {"psnr": float(p.mean()), "psnr_std": float(p.std()), "ssim": float(s.mean()),
            "ssim_std": float(s.std()), f"ssim_latent_noise_{latent_noise:g}": float(torch.cat(sn).mean()),
            "n": len(p)}


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, n: int = 256) -> float:
    """1 / std of posterior-mode latents (LDM §4.3's rescaling), so latents enter diffusion at ~unit variance."""
    dev = next(vae.parameters()).device
    zs = [vae.encode(to_float(images[i:i + 16]).to(dev)).latent_dist.mode().cpu() for i in range(0, min(n, len(images)), 16)]
    return float(1.0 / torch.cat(zs).std())


class _ReconstructStep(torch.nn.Module):
    """encode -> reparameterised sample -> decode in one forward, so DDP syncs every gradient."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, noise, extra_noise=None):
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * noise                                     # (B, C, h, w)
        if extra_noise is not None:  # decoder robustness: scaled by this batch's latent spread
            z = z + extra_noise * z.detach().std()
        y = self.vae.decode(z).sample
        return y, post.kl().mean() / x[0].numel()


def init_autoencoder(cfg: RunConfig, init: Path | None, decoder_only: bool):
    """A new AutoencoderKL (cfg.model), else the config's pretrained one, else ``init``; with decoder_only
    the encoder (and quant_conv) are frozen."""
    from diffusers import AutoencoderKL
    vae = build_vae(cfg.model)
    if cfg.autoencoder.pretrained:
        src = cfg.autoencoder.pretrained
        sub = None if (Path(src) / "config.json").is_file() else "vae"  # hub pipelines: vae/ subfolder
        vae = AutoencoderKL.from_pretrained(src, subfolder=sub)
    if init is not None:
        vae = AutoencoderKL.from_pretrained(init, torch_dtype=torch.float32)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    return vae


def crop_batch(images: torch.Tensor, idx: torch.Tensor, cfg: RunConfig, g: torch.Generator,
               device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x: one random crop position for the batch, in [-1, 1]; reparameterisation noise; extra latent noise or None),
    all drawn from ``g``."""
    tc = cfg.autoencoder
    x = to_float(images[idx])                                      # (B, 1, 256, 256)
    oy, ox = torch.randint(0, x.shape[-1] - tc.crop + 1, (2,), generator=g).tolist()
    x = x[..., oy:oy + tc.crop, ox:ox + tc.crop].to(device)        # (B, 1, crop, crop)
    f = 2 ** (len(cfg.model.vae.block_out_channels) - 1)
    noise = torch.randn(len(x), cfg.model.vae.latent_channels, tc.crop // f, tc.crop // f, generator=g)
    extra = None
    if tc.latent_noise > 0:
        extra = tc.latent_noise * torch.rand(len(x), 1, 1, 1, generator=g) * torch.randn(noise.shape, generator=g)
        extra = extra.to(device)
    return x, noise.to(device), extra


def reconstruction_loss(model, x: torch.Tensor, noise: torch.Tensor, extra, tc) -> dict[str, torch.Tensor]:
    """L1 + ssim_weight x (1 - SSIM) + kl_weight x KL of one batch; returns all four."""
    y, kl = model(x, noise, extra)                                 # (B, 1, crop, crop)
    y = y.float()
    l1 = (y - x).abs().mean()
    s = ssim((y.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
    return {"loss": l1 + tc.ssim_weight * (1 - s) + tc.kl_weight * kl, "l1": l1, "ssim": s, "kl": kl}


class Bookkeeping:
    """Around the training steps: resume from OUT/checkpoints-vae, and on the main process OUT/vae_log.csv
    (every 10 steps), checkpoints and validation on the first 64 val images."""
    LOG = {"loss": ".5f", "l1": ".5f", "ssim": ".4f", "kl": ".3f"}  # vae_log.csv columns after step

    def __init__(self, raw, opt, lr_sched, cfg: RunConfig, out: Path, val_imgs: torch.Tensor):
        self.raw, self.opt, self.lr_sched, self.cfg, self.val_imgs = raw, opt, lr_sched, cfg, val_imgs
        self.ckdir = out / "checkpoints-vae"
        log_path = out / "vae_log.csv"
        self.log = open(log_path, "a", newline="")
        self.writer = csv.writer(self.log)
        if log_path.stat().st_size == 0:
            self.writer.writerow(["step", *self.LOG, "seconds"])

    def resume(self, which: str | None, acc) -> int:
        """The step to start from: that of checkpoint ``which`` ('latest' or a folder), restored; else 0."""
        ck = find_checkpoint(self.ckdir, which) if which else None
        if ck is None:
            return 0
        meta = load_checkpoint(ck, models={"vae": self.raw}, optimizer=self.opt)
        self.lr_sched.load_state_dict(meta["extra"]["lr_sched"])
        acc.print(f"resumed from {ck} at step {meta['step']}")
        return meta["step"]

    def after_step(self, step: int, parts: dict, seconds: float, out_of_time: bool, bar) -> None:
        tc = self.cfg.autoencoder
        if step % 10 == 0:
            self.writer.writerow([step, *(f"{parts[k].item():{f}}" for k, f in self.LOG.items()), f"{seconds:.1f}"])
            self.log.flush()
        if step % tc.checkpoint_every == 0 or out_of_time:
            save_checkpoint(self.ckdir, step, models={"vae": self.raw}, optimizer=self.opt,
                            extra={"config": config_dict(self.cfg), "lr_sched": self.lr_sched.state_dict()})
        if step % tc.val_every == 0:
            m = evaluate_vae(self.raw, self.val_imgs[:64])
            bar.write(f"step {step}: val PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}")


def export_autoencoder(raw, cfg: RunConfig, out: Path, train_imgs: torch.Tensor, val_imgs: torch.Tensor,
                       result: dict, decoder_only: bool, init: Path | None) -> dict:
    """Validate, set the latent scaling factor (unless only the decoder trained), save OUT/vae and vae_metrics.json."""
    result.update(evaluate_vae(raw, val_imgs))
    if not decoder_only:  # the encoder (and so the latent scale) is unchanged when only the decoder trains
        raw.register_to_config(scaling_factor=latent_scaling_factor(raw, train_imgs))
    atomic_write(out / "vae", lambda tmp: raw.save_pretrained(tmp, safe_serialization=True), directory=True)
    result.update(latent_channels=cfg.model.vae.latent_channels, params=count_parameters(raw),
                  scaling_factor=raw.config.scaling_factor, config=dataclasses.asdict(cfg.autoencoder),
                  decoder_only=decoder_only, init=str(init or ""))
    write_json(result, out / "vae_metrics.json")
    return result


def train(cfg: RunConfig, data: Path, out: Path, resume: str | None = None, minutes: float | None = None,
          init: Path | None = None, decoder_only: bool = False) -> dict:
    """Train (or, with decoder_only, fine-tune only the decoder of `init`: latents stay identical,
    so a UNet trained on the frozen encoder's latents keeps working; as SD's ft-MSE VAE)."""
    from diffusers.optimization import get_scheduler
    tc = cfg.autoencoder
    # cpu=True on a machine without CUDA: under torchrun, accelerate then opens a gloo group (MULTI_CPU)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    train_imgs, val_imgs = load_split_images(data, cfg.model.resolution)
    raw = init_autoencoder(cfg, init, decoder_only)
    opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=tc.lr, weight_decay=0.0)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=min(100, tc.steps // 10), num_training_steps=tc.steps)
    model, opt = acc.prepare(_ReconstructStep(raw), opt)
    book = Bookkeeping(raw, opt, lr_sched, cfg, out, val_imgs)
    step = book.resume(resume, acc)
    budget = (minutes if minutes is not None else tc.max_minutes) * 60
    acc.print(f"autoencoder: {count_parameters(raw) / 1e6:.2f}M params, {len(train_imgs)} train / "
              f"{len(val_imgs)} val images, crop {tc.crop}, latent channels {cfg.model.vae.latent_channels}")
    t0 = time.time()
    bar = tqdm(total=tc.steps, initial=step, desc="autoencoder", disable=not acc.is_main_process)
    while step < tc.steps:
        g = step_generator(cfg.seed, step, acc.process_index)
        idx = batch_indices(len(train_imgs), tc.batch_size, step, cfg.seed, acc.process_index, acc.num_processes)
        parts = reconstruction_loss(model, *crop_batch(train_imgs, idx, cfg, g, acc.device), tc)
        opt.zero_grad(set_to_none=True)
        acc.backward(parts["loss"])
        opt.step()
        lr_sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss'].item():.4f}", ssim=f"{parts['ssim'].item():.3f}")
        out_of_time = budget > 0 and time.time() - t0 > budget
        if acc.is_main_process:
            book.after_step(step, parts, time.time() - t0, out_of_time, bar)
        if out_of_time:
            acc.print(f"time budget reached at step {step}")
            break
    bar.close()
    book.log.close()
    acc.wait_for_everyone()
    result = {"steps": step, "train_seconds": time.time() - t0}
    if acc.is_main_process:
        export_autoencoder(raw, cfg, out, train_imgs, val_imgs, result, decoder_only, init)
        acc.print(f"autoencoder val ({result['n']} images, full {cfg.model.resolution}px): "
                  f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}; exported {out / 'vae'}")
    return result


def sweep(cfg: RunConfig, data: Path, out: Path, channels: list[int], minutes: float) -> None:
    """Same wall-time budget per latent channel count: reconstruction vs channels and time."""
    rows = []
    for c in channels:
        cfg.model.vae.latent_channels = c
        r = train(cfg, data, out / f"sweep-c{c}", minutes=minutes)
        rows.append({"latent_channels": c, "steps": r["steps"], "seconds": round(r["train_seconds"], 1),
                     "psnr": round(r["psnr"], 3), "ssim": round(r["ssim"], 4)})
        print(rows[-1])
    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "sweep.csv", write_csv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    ch = [r["latent_channels"] for r in rows]
    ax[0].plot(ch, [r["psnr"] for r in rows], "o-")
    ax[0].axhline(30, ls="--", c="gray")
    ax[0].set(xlabel="latent channels (8x down)", ylabel="val PSNR (dB)", xticks=ch)
    ax[1].plot(ch, [r["ssim"] for r in rows], "o-")
    ax[1].axhline(0.85, ls="--", c="gray")
    ax[1].set(xlabel="latent channels (8x down)", ylabel="val SSIM", xticks=ch)
    fig.suptitle(f"Autoencoder reconstruction after {minutes:g} min CPU training each")
    fig.tight_layout()
    atomic_write(out / "sweep.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print(json.dumps(rows, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo-cpu", help="preset name (tiny, demo-cpu, demo-gpu, full) or YAML path")
    ap.add_argument("--data", required=True, type=Path, help="folder written by train/prepare_data.py")
    ap.add_argument("--out", required=True, type=Path, help="run folder")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget (overrides the config)")
    ap.add_argument("--steps", type=int, default=None, help="override the config's step count")
    ap.add_argument("--latent-channels", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="override the config's learning rate")
    ap.add_argument("--init", type=Path, default=None, help="start from this autoencoder folder")
    ap.add_argument("--decoder-only", action="store_true", help="fine-tune only the decoder (latents unchanged)")
    ap.add_argument("--latent-noise", type=float, default=None,
                    help="decode noisy latents (x latent std) so the decoder tolerates sampler errors, e.g. 0.3")
    ap.add_argument("--sweep", default="", help="comma-separated latent channel counts, e.g. 4,8,16")
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    if a.steps:
        cfg.autoencoder.steps = a.steps
    if a.lr:
        cfg.autoencoder.lr = a.lr
    if a.latent_channels:
        cfg.model.vae.latent_channels = a.latent_channels
    if a.latent_noise is not None:
        cfg.autoencoder.latent_noise = a.latent_noise
    if a.sweep:
        sweep(cfg, a.data, a.out, [int(c) for c in a.sweep.split(",")], a.minutes or 4.0)
    else:
        train(cfg, a.data, a.out, a.resume, a.minutes, init=a.init, decoder_only=a.decoder_only)


if __name__ == "__main__":
    main()
