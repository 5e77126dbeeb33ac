"""Train the guidance model (biomedjourney/guidance.py): a noise-aware findings classifier + identity embedding on latents.

    python train/train_guidance.py --data work/data/cxr-prep --model assets/biomedjourney-cxr \
        --out assets/biomedjourney-cxr/guidance_model --minutes 10
    python train/train_guidance.py ... --resume latest

Data: the prepared stage-1 manifest (train/prepare_data.py: the generator's own licence filter and patient split),
encoded once with the model's autoencoder (posterior mode x scaling factor, as the UNet sees them; cached in --work).
Trained on the TRAIN split only; validated on the val split by patient. Separate from the evaluation battery's
evaluators by design (another network, inputs, seed and data order): never guide with the classifier that scores you.

Each step: 8 patients x 2 images + 16 random images; a timestep per image, biased to low noise (t = T u^2), the
latent noised by the model's own training schedule and shifted by up to 2 latent pixels (never flipped: a flip
swaps the patient's sides). Loss = masked BCE of the findings (a label its source never reports is unknown, not
negative) + supervised contrastive loss of the identity embedding over same-patient groups (Khosla et al. 2020,
arXiv:2004.11362). AdamW, warm-up then cosine. Checkpoints: atomic, pickle-free (train.checkpoint) in --work.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from biomedjourney.atomic import atomic_write, write_text
from biomedjourney.dataset import parse_labels
from biomedjourney.evaluate.metrics import macro_auc, verification_auc
from biomedjourney.guidance import GUIDANCE_LABELS, GuidanceModel, dataset_targets
from train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from train.data import stack_images, step_generator
from train.manifest import manifest_hash, read_manifest
from train.train_evaluators import patient_groups, sample_batch, supcon_loss


@dataclass
class GuidanceTrain:
    steps: int = 2000
    batch_pairs: int = 8          # patients per batch, two images each (the identity head's positives)
    batch_singles: int = 16       # plus random images
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    temperature: float = 0.1      # supervised contrastive temperature
    embed_weight: float = 0.5     # loss = BCE + embed_weight * SupCon
    max_shift: int = 2            # latent pixels of random translation
    seed: int = 1                 # the evaluators train with seed 0: another seed and data order
    checkpoint_every: int = 250


# ------------------------------------------------------------------------- data
def load_rows(data: Path) -> list[dict]:
    rows = read_manifest(data / "stage1.csv")
    if not rows:
        raise SystemExit(f"{data}/stage1.csv has no rows: run train/prepare_data.py first")
    return rows


def encode_all(rows: list[dict], model: Path, cache: Path) -> torch.Tensor:
    """(N, C, h, w) fp16 latents of every row's image, encoded once (cached, keyed on manifest and autoencoder)."""
    if cache.is_file():
        return load_file(cache)["latents"]
    from biomedjourney.pipeline import BiomedJourneyPipeline
    from train.train import encode_latents
    pipe = BiomedJourneyPipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    lat = encode_latents(pipe.vae, stack_images([r["image"] for r in rows], pipe.resolution), "cpu")
    atomic_write(cache, lambda tmp: save_file({"latents": lat.contiguous()}, tmp))
    return lat


def label_arrays(rows: list[dict], names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (N, L), known (N, L)): a label is known where the row's source ever reports one of its labels."""
    reported: dict[str, set] = {}
    for r in rows:
        reported.setdefault(r["source"], set()).update(parse_labels(r["labels"]))
    yk = [dataset_targets(parse_labels(r["labels"]), reported[r["source"]], names) for r in rows]
    return torch.tensor([y for y, _ in yk]), torch.tensor([k for _, k in yk])


def noisy_batch(z: torch.Tensor, sched: DDPMScheduler, tc: GuidanceTrain, g: torch.Generator):
    """Clean latents (B, C, h, w) -> (noised and shifted latents, timesteps (B,)), t biased to low noise."""
    t = (torch.rand(len(z), generator=g) ** 2 * sched.config.num_train_timesteps).long().clamp(max=sched.config.num_train_timesteps - 1)
    dx, dy = (torch.randint(-tc.max_shift, tc.max_shift + 1, (2,), generator=g)).tolist()
    z = torch.roll(z, shifts=(dy, dx), dims=(2, 3))
    return sched.add_noise(z, torch.randn(z.shape, generator=g), t), t


# ------------------------------------------------------------------------- training
def lr_factor(step: int, tc: GuidanceTrain) -> float:
    return min(1.0, (step + 1) / tc.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(step, tc.steps) / tc.steps))


def train_step(model, opt, lat, y, known, groups, multi, sched, tc: GuidanceTrain, step: int) -> dict:
    g = step_generator(tc.seed, step)
    # batch_pairs patients x 2 images + batch_singles random ones, drawn from (seed, step) alone: exact resume
    b = torch.from_numpy(sample_batch(multi, len(lat), tc, np.random.default_rng([tc.seed, step])))
    x, t = noisy_batch(lat[b].float(), sched, tc, g)
    out = model(x, t)
    k = known[b].float()
    bce = (F.binary_cross_entropy_with_logits(out.logits, y[b], reduction="none") * k).sum() / k.sum().clamp_min(1)
    sc = supcon_loss(out.embedding, groups[b], tc.temperature)
    loss = bce + tc.embed_weight * sc
    for group in opt.param_groups:
        group["lr"] = tc.lr * lr_factor(step, tc)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"bce": bce.item(), "supcon": sc.item()}


@torch.no_grad()
def validate(model: GuidanceModel, lat, y, known, patients: list[str], sched: DDPMScheduler) -> dict:
    """Per-label AUC at t = 0 and t = 400 (the latent noised with a fixed generator), identity verification AUC."""
    model.eval()
    out = {}
    for t in (0, 400):
        x = sched.add_noise(lat.float(), torch.randn(lat.shape, generator=torch.Generator().manual_seed(0)),
                            torch.full((len(lat),), t)) if t else lat.float()
        o = model(x, torch.full((len(lat),), t))
        macro, per = macro_auc(y.numpy(), torch.sigmoid(o.logits).numpy(), known.numpy(), list(model.labels))
        out[f"t{t}"] = {"macro_auc": macro, "per_label_auc": per}
        if t == 0:
            out["identity_verification_auc"] = verification_auc(o.embedding.numpy(), patients)
    model.train()
    return out


def export(model: GuidanceModel, out: Path, metrics: dict) -> None:
    """fp16 save_pretrained (config.json + safetensors) and metrics.json, written atomically as one folder."""
    def write(tmp: str) -> None:
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        write_text(Path(tmp) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out, write, directory=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a train/prepare_data.py output folder")
    ap.add_argument("--model", type=Path, default=Path("assets/biomedjourney-cxr"), help="whose autoencoder and schedule")
    ap.add_argument("--out", type=Path, required=True, help="export folder (e.g. MODEL/guidance_model)")
    ap.add_argument("--work", type=Path, default=Path("work/runs/guidance"), help="checkpoints and the latent cache")
    ap.add_argument("--steps", type=int, default=GuidanceTrain.steps)
    ap.add_argument("--minutes", type=float, default=0.0, help=">0: stop, checkpoint and export after this wall time")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tc = GuidanceTrain(steps=a.steps)
    t0 = time.time()
    rows = load_rows(a.data)
    lat = encode_all(rows, a.model, a.work / f"latents-{manifest_hash(a.data / 'stage1.csv')[:12]}.safetensors")
    y, known = label_arrays(rows, GUIDANCE_LABELS)
    tr = [i for i, r in enumerate(rows) if r["split"] == "train"]
    va = [i for i, r in enumerate(rows) if r["split"] == "val"]
    groups, multi = patient_groups([SimpleNamespace(patient_id=rows[i]["patient_id"]) for i in tr])
    sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    torch.manual_seed(tc.seed)
    model = GuidanceModel(latent_channels=lat.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ck = find_checkpoint(a.work / "checkpoints", a.resume) if a.resume else None
    step = load_checkpoint(ck, models={"model": model}, optimizer=opt)["step"] if ck else 0
    model.train()
    ltr, ytr, ktr = lat[tr], y[tr], known[tr]
    while step < tc.steps and not (a.minutes and time.time() - t0 > a.minutes * 60):
        losses = train_step(model, opt, ltr, ytr, ktr, groups, multi, sched, tc, step)
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{tc.steps} bce {losses['bce']:.4f} supcon {losses['supcon']:.4f}", flush=True)
        if step % tc.checkpoint_every == 0:
            save_checkpoint(a.work / "checkpoints", step, models={"model": model}, optimizer=opt)
    save_checkpoint(a.work / "checkpoints", step, models={"model": model}, optimizer=opt)
    metrics = {"val": validate(model, lat[va], y[va], known[va], [rows[i]["patient_id"] for i in va], sched),
               "steps": step, "n_train": len(tr), "n_val": len(va), "seconds_this_call": round(time.time() - t0, 1),
               "config": asdict(tc), "data_manifest_sha256": manifest_hash(a.data / "stage1.csv"),
               "command": "python train/train_guidance.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    export(model, a.out, metrics)
    v = metrics["val"]
    print(f"val macro AUC t=0 {v['t0']['macro_auc']:.3f}, t=400 {v['t400']['macro_auc']:.3f}; identity "
          f"verification AUC {v['identity_verification_auc']:.3f}; exported {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
