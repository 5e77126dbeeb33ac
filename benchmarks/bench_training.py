"""Training throughput: images/s of stage-2 optimizer steps as train/train.py takes them (its make_batch,
diffusion_loss and optimise: conditioning dropout, UNet forward and backward under the preset's mixed
precision, gradient clipping, AdamW, EMA) on the latent/text cache, against encoding every batch on the fly
with the frozen autoencoder and text encoder (the peer: train.py's own encode_latents / encode_texts run
each step, then the same batch), same run, same rows, same UNet.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --config demo-cpu --threads 1
    python benchmarks/bench_training.py --config demo-gpu --device cuda      # needs a CUDA GPU

Each path: --warmup untimed steps, then --steps timed ones (median). On CUDA, model FLOP utilisation
(MFU) = FLOPs of one training step (FlopCounterMode over the UNet's forward and backward) / median step
time / the bf16 matmul peak measured in this run on the same device (8192^3, benchmarks/bench_sampling.py's
matmul_throughput); on a CPU, whose bf16 autocast has no such peak to hand, the FLOPs only. Prints a table
and one summary line of ratios; --json writes the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from benchmarks.bench_sampling import matmul_throughput, sync  # noqa: E402
from biomedjourney import dataset  # noqa: E402
from biomedjourney.config import NO_CHANGE  # noqa: E402
from biomedjourney.model import count_parameters  # noqa: E402
from biomedjourney.text_encoders import build_text_encoder  # noqa: E402
from train.config import RunConfig, load_config  # noqa: E402
from train.data import stack_images, step_generator  # noqa: E402
from train.train import (Trainee, build_cache, build_trainee, diffusion_loss, encode_latents, encode_texts,  # noqa: E402
                         index_rows, make_batch, optimise, text_index)

Batch = Callable[[int], tuple]  # step -> (latents, prior latents, text embeddings, masks)


def make_trainee(cfg: RunConfig, vae: AutoencoderKL, text_dim: int, device: str):
    """A fresh stage-2 UNet with its EMA, AdamW and schedules, prepared by accelerate as train.py does."""
    from accelerate import Accelerator
    tc = cfg.stage2
    acc = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision=tc.mixed_precision)
    return build_trainee(cfg, tc, 2, vae, text_dim, Path("."), False, acc), acc


def step_fn(t: Trainee, acc, cfg: RunConfig, batch: Batch) -> Callable[[int], None]:
    """One optimizer step at `step`: train.py's run_steps without logging and checkpoints."""
    tc = cfg.stage2

    def step(i: int) -> None:
        g = step_generator(cfg.seed, i)
        loss = diffusion_loss(t, acc, cfg.model.prediction_type, batch(i), g)
        optimise(t, acc, loss, tc.max_grad_norm)
    return step


def time_steps(step: Callable[[int], None], steps: int, warmup: int, device) -> list[float]:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def step_flops(step: Callable[[int], None]) -> int:
    """FLOPs of one training step: the UNet's forward and backward (the optimizer's element-wise work and
    the batch assembly have no FLOP formula and count nothing)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step(0)
    return int(fc.get_total_flops())


def figures(times: list[float], batch_size: int, flops: int, peak_flops: float | None) -> dict:
    s = statistics.median(times)
    return {"median_s_per_step": s, "images_per_s": batch_size / s, "times_s": [round(x, 4) for x in times],
            "mfu": flops / s / peak_flops if peak_flops else None}


def measure(paths: dict[str, Callable[[int], None]], batch_size: int, steps: int, warmup: int, device) -> dict:
    """Times every path; FLOPs of the first one's step; on CUDA the bf16 matmul peak and MFU."""
    cuda = torch.device(device).type == "cuda"
    peak_flops, matmul = matmul_throughput(device) if cuda else (None, "none measured on a CPU")
    flops = step_flops(next(iter(paths.values())))
    res = {"device": device_name(device), "batch_size": batch_size, "train_step_flops": flops,
           "peak_flops": peak_flops, "matmul": matmul, "warmup_steps": warmup, "timed_steps": steps, "paths": {}}
    for name, step in paths.items():
        res["paths"][name] = figures(time_steps(step, steps, warmup, device), batch_size, flops, peak_flops)
    return res


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"CPU, {torch.get_num_threads()} torch thread(s)"


# ---------------------------------------------------------------- the two paths on the shared dataset
def bench_rows(n: int) -> list[dict]:
    """n stage-2 rows (prior, description, follow-up) of the shared dataset, in training_rows' format."""
    pairs = [p for p in dataset.load_pairs() if p.progression_text][:n]
    return [dict(target=str(p.followup.path), prior=str(p.prior.path), text=p.progression_text) for p in pairs]


def cached_and_on_the_fly(cfg: RunConfig, vae_path: Path, device: str) -> tuple[dict, Trainee]:
    """The cached batch (build_cache once, then make_batch) and the peer (encode every step, then make_batch)."""
    tc = cfg.stage2
    rows = bench_rows(tc.batch_size)
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(rows, vae, cfg.model.text_encoder, cfg.model.resolution, Path(tmp) / "c.safetensors", device)
    te = build_text_encoder(cfg.model.text_encoder).to(device)
    t, acc = make_trainee(cfg, vae, te.dim, device)
    idx, b = index_rows(rows, cache), torch.arange(len(rows))
    empty, no_change = text_index("", cache), text_index(NO_CHANGE, cache)
    images = stack_images([r["target"] for r in rows] + [r["prior"] for r in rows], cfg.model.resolution)
    texts = [r["text"] for r in rows] + ["", NO_CHANGE]
    n = len(rows)
    fly_idx = {"target": torch.arange(n), "prior": torch.arange(n, 2 * n), "text": torch.arange(n)}

    def cached(i):
        return make_batch(b, idx, cache, tc, 2, step_generator(cfg.seed, i), empty, no_change)

    def on_the_fly(i):
        emb, mask = encode_texts(te, texts)
        fly = {"latents": encode_latents(vae, images, device, batch=len(images)), "text_emb": emb, "text_mask": mask}
        return make_batch(b, fly_idx, fly, tc, 2, step_generator(cfg.seed, i), n, n + 1)

    paths = {"cached": step_fn(t, acc, cfg, cached), "on the fly": step_fn(t, acc, cfg, on_the_fly)}
    return paths, t


def table(res: dict) -> str:
    lines = [f"config {res['config']}, stage-2 steps, batch {res['batch_size']}, {res['resolution']} px, "
             f"UNet {res['unet_params_m']:.2f}M params, {res['mixed_precision']} mixed precision, on {res['device']}",
             f"UNet FLOPs per training step (forward + backward, FlopCounterMode): {res['train_step_flops'] / 1e9:.1f} "
             f"GFLOP; matmul peak {_tflops(res['peak_flops'])} ({res['matmul']})",
             f"{'path':<12} {'median s/step':>13} {'images/s':>9} {'MFU':>7}  timed steps (s)"]
    for name, r in res["paths"].items():
        lines.append(f"{name:<12} {r['median_s_per_step']:>13.3f} {r['images_per_s']:>9.2f} {pct(r['mfu']):>7}  "
                     f"{r['times_s']}")
    return "\n".join(lines)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _tflops(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e12:.1f} TFLOP/s"


def summary(res: dict) -> str:
    c, f = res["paths"]["cached"], res["paths"]["on the fly"]
    mfu = f"; MFU {pct(c['mfu'])} vs {pct(f['mfu'])} of the {res['matmul']}" if c["mfu"] is not None else \
        "; MFU: on CUDA only"
    return (f"summary: cached {c['images_per_s']:.2f} images/s = {c['images_per_s'] / f['images_per_s']:.2f}x "
            f"on-the-fly encoding ({f['images_per_s']:.2f} images/s){mfu}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo-cpu")
    ap.add_argument("--vae", type=Path, default=None, help="autoencoder folder (default: the shipped model's vae/)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if torch.device(a.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: as scripts/train_gpu_short.py trains
    if a.vae is None:
        from biomedjourney.pipeline import default_model_path
        a.vae = default_model_path() / "vae"
    cfg = load_config(a.config)
    paths, t = cached_and_on_the_fly(cfg, a.vae, a.device)
    res = measure(paths, cfg.stage2.batch_size, a.steps, a.warmup, a.device)
    res.update(config=cfg.name, resolution=cfg.model.resolution, unet_params_m=count_parameters(t.raw) / 1e6,
               mixed_precision=cfg.stage2.mixed_precision)
    print(table(res))
    print(summary(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
