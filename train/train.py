"""Two-stage diffusion training of the prior-conditioned UNet (BiomedJourney curriculum), on accelerate.

    # stage 1: image-report pairs, dummy (all-zero) prior latent
    python train/train.py --stage 1 --config demo-cpu --data work/data/cxr-prep --vae work/runs/demo-cpu/vae --out work/runs/demo-cpu
    # stage 2: (prior, description, follow-up) triples, initialised from the stage-1 export
    python train/train.py --stage 2 --config demo-cpu --data work/data/cxr-prep --vae work/runs/demo-cpu/vae --out work/runs/demo-cpu
    # resume exactly after an interruption
    python train/train.py --stage 2 ... --resume latest
    # several GPUs / machines: accelerate launch --multi_gpu [--num_machines N --machine_rank R --main_process_ip IP] train/train.py ...
    # two CPU processes (gloo): torchrun --nproc_per_node 2 train/train.py ...

The autoencoder and the text encoder are frozen, so every latent (posterior mode x scaling
factor) and every text embedding is computed once and cached (OUT/cache-stage<N>.safetensors,
or a prebuilt one: train/build_gpu_bundle.py); the UNet trains on the cache. Writes OUT/stage<N>/: log.csv, TensorBoard logs, validation grids
(val-<step>.png: prior | generated | real), atomic checkpoints (checkpoints/step-*), and the
export for inference (export/: a pipeline folder with the EMA weights).
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from biomedjourney.atomic import atomic_write, write_text as atomic_text
from biomedjourney.config import NO_CHANGE, write_json
from biomedjourney.model import (build_unet, count_parameters, predicted_clean, to_vae_input, training_scheduler_config,
                                 widen_conv_in)
from biomedjourney.pipeline import BiomedJourneyPipeline, assemble
from biomedjourney.text_encoders import TextEncoder, build_text_encoder
from train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from train.config import DiffusionTrain, RunConfig, config_dict, load_config
from biomedjourney.findings import extract, render
from biomedjourney.guidance import GuidanceModel, finding_loss, identity_loss
from train.data import draw_batch, sampling_weights, stack_images, step_generator, to_float
from train.train_guidance import label_arrays
from train.manifest import manifest_hash, read_manifest


# ---------------------------------------------------------------- data and cache
def training_rows(data: Path, stage: int, register: bool, split: str = "train") -> list[dict]:
    """Stage 1: image-text rows. Stage 2: triples kept by registration (or all, original priors, with register=False)."""
    if stage == 1:
        rows = read_manifest(data / "stage1.csv")
        return [dict(target=r["image"], prior="", text=r["text"], labels=r.get("labels", "")) for r in rows
                if r["split"] == split]
    rows = read_manifest(data / "stage2.csv")
    out = []
    for r in rows:
        if r["split"] != split or (register and not r["kept"]):
            continue
        out.append(dict(target=r["followup"], prior=r["prior"] if register else r["prior_original"], text=r["text"],
                        labels=r.get("followup_labels", ""), source=r.get("source", "")))
    return out


def canonical_text(text: str) -> str:
    """A description read into findings and rendered back (the app's canonical form); kept as written when no
    finding is recognised (a narrative note) or empty."""
    findings = extract(text) if text.strip() else []
    return render(findings) if findings else text


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, device, batch: int = 16) -> torch.Tensor:
    """uint8 (N, 1, H, W) -> scaled posterior-mode latents (N, C, H/8, W/8) fp16 on CPU."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode latents", leave=False):
        x = to_vae_input(to_float(images[i:i + batch]).to(device, vae.dtype), vae)
        out.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).half().cpu())
    return torch.cat(out)


def build_cache(rows: list[dict], vae: AutoencoderKL, text_spec, resolution: int, path: Path, device) -> dict:
    """Latents of every image and embeddings of every text (+ the empty and the no-change prompt), computed once."""
    images = sorted({r["target"] for r in rows} | {r["prior"] for r in rows if r["prior"]})
    texts = sorted({r["text"] for r in rows} | {"", NO_CHANGE})
    if path.is_file():
        cache = load_file(path)
        if set(_keys(texts).tolist()) <= set(cache["text_keys"].tolist()):
            return cache
        path.unlink()  # written before a prompt it now needs (e.g. NO_CHANGE): rebuild
    lat = encode_latents(vae, stack_images(images, resolution), device)
    emb, mask = encode_texts(build_text_encoder(text_spec).to(device), texts)
    cache = {"latents": lat, "text_emb": emb, "text_mask": mask, "image_keys": _keys(images), "text_keys": _keys(texts)}
    meta = {"images": json.dumps(images), "texts": json.dumps(texts)}
    atomic_write(path, lambda tmp: save_file(cache, tmp, metadata=meta))  # a run sharing the cache never reads half a file
    return load_file(path)


@torch.no_grad()
def encode_texts(te: TextEncoder, texts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 embeddings (N, T, D) and int8 masks (N, T) on CPU, T = the longest prompt's token count: the
    UNet masks padding out (encoder_attention_mask), so the padded tail would add bytes, not information."""
    embs, masks = [], []
    for i in tqdm(range(0, len(texts), batch), desc="encode texts", leave=False):
        e, m = te(texts[i:i + batch])
        embs.append(e.half().cpu())
        masks.append(m.to(torch.int8).cpu())
    emb, mask = torch.cat(embs), torch.cat(masks)
    t = max(1, int(mask.sum(1).max()))
    return emb[:, :t].contiguous(), mask[:, :t].contiguous()


def _keys(items: list[str]) -> torch.Tensor:
    return torch.tensor([int(hashlib.sha1(s.encode()).hexdigest()[:12], 16) for s in items], dtype=torch.int64)


def text_index(text: str, cache: dict) -> int:
    """Row of `text` in the cache's text embeddings."""
    return int((cache["text_keys"] == _keys([text])[0]).nonzero()[0, 0])


def index_rows(rows: list[dict], cache: dict) -> dict[str, torch.Tensor]:
    im = {int(k): i for i, k in enumerate(cache["image_keys"])}
    tx = {int(k): i for i, k in enumerate(cache["text_keys"])}
    key = lambda s: int(_keys([s])[0])  # noqa: E731
    return {"target": torch.tensor([im[key(r["target"])] for r in rows]),
            "prior": torch.tensor([im[key(r["prior"])] if r["prior"] else -1 for r in rows]),
            "text": torch.tensor([tx[key(r["text"])] for r in rows])}


# ---------------------------------------------------------------- model setup
def init_unet(cfg: RunConfig, tc: DiffusionTrain, stage: int, vae: AutoencoderKL, text_dim: int,
              out: Path, curriculum: bool) -> UNet2DConditionModel:
    lc = vae.config.latent_channels
    src = tc.init_unet or (str(out / "stage1" / "export") if stage == 2 and curriculum else "")
    if not src:
        torch.manual_seed(cfg.seed)
        return build_unet(cfg.model, lc, text_dim)
    local = Path(src).is_dir()
    sub = "unet" if (Path(src) / "unet").is_dir() or not local else None  # hub ids: the repo's unet/ folder
    unet = UNet2DConditionModel.from_pretrained(src, subfolder=sub, torch_dtype=torch.float32)
    if unet.config.in_channels == lc:  # a text-to-image UNet (e.g. SD 1.5): add the prior's channels
        unet = widen_conv_in(unet, lc)
    if unet.config.in_channels != 2 * lc:
        raise ValueError(f"UNet expects {unet.config.in_channels} input channels, got {lc}+{lc}")
    return unet


def conditioning_dropout(b: int, tc: DiffusionTrain, stage: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (True = drop) for text and prior: InstructPix2Pix §3.2.1 (5% text, 5% image, 5% both)."""
    u = torch.rand(b, generator=g)
    both = u < tc.drop_both
    text = both | ((u >= tc.drop_both) & (u < tc.drop_both + tc.drop_text))
    image = both | ((u >= tc.drop_both + tc.drop_text) & (u < tc.drop_both + tc.drop_text + tc.drop_image))
    if stage == 1:
        image = torch.ones(b, dtype=torch.bool)  # stage 1: the prior is always the dummy (zero latent)
    return text, image


def identity_rows(zi: torch.Tensor, pi: torch.Tensor, ti: torch.Tensor, drop_image: torch.Tensor, p: float,
                  no_change: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn a share p of the rows that have a prior into (prior, NO_CHANGE, prior): the target is the prior itself,
    the prior is kept (never dropped) and the text says no change. Identity mapping (CycleGAN §5.2) as data."""
    same = (torch.rand(len(zi), generator=g) < p) & (pi >= 0)
    return torch.where(same, pi, zi), torch.where(same, no_change, ti), drop_image & ~same


# ---------------------------------------------------------------- validation and export
def make_pipeline(unet, vae, cfg: RunConfig, text_spec, info: dict, load_text: bool = True) -> BiomedJourneyPipeline:
    te = build_text_encoder(text_spec) if load_text else _SpecOnly(text_spec)
    return assemble(unet, vae, te, cfg.model, cfg.sampler, info)


class _SpecOnly(TextEncoder):
    """Stands in for the text encoder during validation (embeddings come from the cache); exports its spec."""

    def __init__(self, spec):
        super().__init__()
        self._spec = {"name": spec} if isinstance(spec, str) else dict(spec)

    def spec(self):
        return self._spec


@torch.no_grad()
def validation_grid(pipe: BiomedJourneyPipeline, val: list[dict], cache: dict, idx: dict, empty: int,
                    stage: int, steps: int, path: Path, seed: int) -> None:
    """Rows: prior | generated | real follow-up (stage 1: text-only generation | real image)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(val)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i, r in enumerate(val):
        emb = (cache["text_emb"][idx["text"][i]][None].float(), cache["text_mask"][idx["text"][i]][None].long())
        prior = None
        if stage == 2:
            z = cache["latents"][idx["prior"][i]][None].to(pipe.device, pipe.dtype)
            prior = pipe.decode_latents(z)[0]
        neg = (cache["text_emb"][empty][None].float(), cache["text_mask"][empty][None].long())
        out = pipe(prior, r["text"], num_images=1, num_inference_steps=steps, seed=seed + i, prompt_embeds=emb,
                   negative_prompt_embeds=neg, change_transfer=False)  # the cache has no encoder for NO_CHANGE
        real = pipe.decode_latents(cache["latents"][idx["target"][i]][None].to(pipe.device, pipe.dtype))[0]
        for ax, im, title in zip(axes[i], [prior if prior is not None else np.zeros_like(real), out.images[0], real],
                                 ["prior (decoded)" if stage == 2 else "(no prior: stage 1)", "generated", "real"]):
            ax.imshow(im, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        axes[i][1].set_xlabel(r["text"][:60], fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------- training
@dataclass
class Trainee:
    """What one stage trains: the (accelerate-wrapped) UNet, its EMA, optimizer and schedules."""
    model: torch.nn.Module            # acc.prepare'd UNet (DDP-wrapped on several processes)
    raw: UNet2DConditionModel         # the unwrapped UNet
    ema: EMAModel
    ema_module: UNet2DConditionModel  # holds EMA weights for checkpoints/validation/export
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    noise_sched: DDPMScheduler
    guidance: GuidanceModel | None = None  # frozen, for the consistency losses (tc.guidance_model)

    def ema_weights(self) -> UNet2DConditionModel:
        """The UNet with the EMA weights (copied in now)."""
        self.ema.copy_to(self.ema_module.parameters())
        return self.ema_module


def cache_path_for(data: Path, stage: int, register: bool, vae_path: Path, text_spec, folder: Path) -> Path:
    """The latent/text cache file: keyed on the data (stage 2: the whole folder, since the registered priors'
    pixels are part of its data), registration, the autoencoder's weights and the text encoder, so runs on
    the same data share it."""
    tag = hashlib.sha256(f"{manifest_hash(data / 'stage1.csv' if stage == 1 else data)}:{register}:"
                         f"{(Path(vae_path) / 'diffusion_pytorch_model.safetensors').stat().st_mtime_ns}:"
                         f"{json.dumps(text_spec)}".encode()).hexdigest()[:12]
    return folder / f"cache-stage{stage}-{tag}.safetensors"


def make_ema(unet: UNet2DConditionModel, tc: DiffusionTrain) -> EMAModel:
    """EMA of the UNet's weights, from its current ones. foreach: two multi-tensor kernels per step, not
    three small ones per parameter tensor (on a GPU those launches cost as much as a small UNet's step)."""
    return EMAModel(unet.parameters(), decay=tc.ema_decay, use_ema_warmup=tc.ema_warmup, foreach=True,
                    model_cls=UNet2DConditionModel, model_config=unet.config)


def build_trainee(cfg: RunConfig, tc: DiffusionTrain, stage: int, vae: AutoencoderKL, text_dim: int, out: Path,
                  curriculum: bool, acc: Accelerator) -> Trainee:
    """UNet (init_unet), EMA, AdamW, cosine LR schedule and the DDPM noise schedule, prepared by accelerate."""
    unet = init_unet(cfg, tc, stage, vae, text_dim, out, curriculum)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = make_ema(unet, tc)
    opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)
    noise_sched = DDPMScheduler.from_config(training_scheduler_config(cfg.model))
    model, opt = acc.prepare(unet, opt)
    raw = acc.unwrap_model(model)
    ema.to(acc.device)
    guidance = None
    if tc.guidance_model and (tc.identity_weight or tc.pathology_weight):
        guidance = GuidanceModel.from_pretrained(tc.guidance_model, torch_dtype=torch.float32)
        guidance = guidance.to(acc.device).eval().requires_grad_(False)
    elif tc.identity_weight or tc.pathology_weight:
        raise SystemExit("identity_weight / pathology_weight need stage2.guidance_model (train/train_guidance.py)")
    return Trainee(model, raw, ema, copy.deepcopy(raw).requires_grad_(False), opt, lr_sched, noise_sched, guidance)


def resume_trainee(t: Trainee, ckdir: Path, resume: str | None, tc: DiffusionTrain, acc: Accelerator) -> int:
    """Restore weights, EMA, optimizer and LR schedule from a checkpoint (``resume``: 'latest' or a folder);
    returns the step to continue from (0 when there is nothing to resume)."""
    ck = find_checkpoint(ckdir, resume) if resume else None
    if ck is None:
        return 0
    meta = load_checkpoint(ck, models={"unet": t.raw, "ema": t.ema_module}, optimizer=t.opt)
    t.ema = make_ema(t.ema_module, tc)
    t.ema.optimization_step = meta["extra"]["ema_step"]
    t.lr_sched.load_state_dict(meta["extra"]["lr_sched"])
    acc.print(f"resumed from {ck} at step {meta['step']}")
    return meta["step"]


def save_trainee(t: Trainee, ckdir: Path, step: int, cfg: RunConfig) -> None:
    t.ema_weights()
    save_checkpoint(ckdir, step, models={"unet": t.raw, "ema": t.ema_module}, optimizer=t.opt,
                    extra={"ema_step": t.ema.optimization_step, "lr_sched": t.lr_sched.state_dict(),
                           "config": config_dict(cfg)})


def make_batch(b: torch.Tensor, idx: dict, cache: dict, tc: DiffusionTrain, stage: int, g: torch.Generator,
               empty: int, no_change: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``b`` -> (target latents, prior latents (zero where dropped or absent), text embeddings, masks),
    with conditioning dropout and (stage 2) identity rows drawn from ``g``."""
    latents = cache["latents"]
    drop_text, drop_image = conditioning_dropout(len(b), tc, stage, g)
    pi, zi, ti = idx["prior"][b], idx["target"][b], torch.where(drop_text, empty, idx["text"][b])
    if stage == 2 and tc.identity_prob > 0:
        zi, ti, drop_image = identity_rows(zi, pi, ti, drop_image, tc.identity_prob, no_change, g)
    z = latents[zi].float()                                                 # (B, C, h, w)
    prior = torch.where((drop_image | (pi < 0))[:, None, None, None], torch.zeros_like(z),
                        latents[pi.clamp(min=0)].float())                     # (B, C, h, w)
    return z, prior, cache["text_emb"][ti].float(), cache["text_mask"][ti].long()  # + (B, T, D), (B, T)


def diffusion_loss(t: Trainee, acc: Accelerator, prediction_type: str, batch: tuple, g: torch.Generator,
                   consistency: tuple | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction on a noised batch and its target (epsilon or v); with ``consistency``
    (tc, targets (B, L), known (B, L)) plus the identity / pathology consistency losses."""
    z, prior, emb, mask = batch
    noise = torch.randn(z.shape, generator=g)
    ts = torch.randint(0, t.noise_sched.config.num_train_timesteps, (len(z),), generator=g)
    noisy = t.noise_sched.add_noise(z, noise, ts)
    target = noise if prediction_type == "epsilon" else t.noise_sched.get_velocity(z, noise, ts)
    x = torch.cat([noisy, prior], 1).to(acc.device)                          # (B, 2C, h, w)
    with acc.autocast():
        pred = t.model(x, ts.to(acc.device), encoder_hidden_states=emb.to(acc.device),
                       encoder_attention_mask=mask.to(acc.device)).sample
    loss = F.mse_loss(pred.float(), target.to(acc.device))
    if consistency is None or t.guidance is None:
        return loss
    tc, y, known = consistency
    known = known & ~(z == prior).flatten(1).all(1)[:, None]  # identity rows: the target is the prior, not the follow-up
    a = t.noise_sched.alphas_cumprod.to(acc.device)[ts.to(acc.device)][:, None, None, None]   # (B, 1, 1, 1)
    x0 = predicted_clean(a, noisy.to(acc.device), pred.float(), prediction_type)
    return loss + consistency_loss(t.guidance, x0, prior.to(acc.device), ts.to(acc.device), y, known, tc)


def consistency_loss(gm: GuidanceModel, x0: torch.Tensor, prior: torch.Tensor, ts: torch.Tensor, y: torch.Tensor,
                     known: torch.Tensor, tc: DiffusionTrain) -> torch.Tensor:
    """Identity-pathology separation (the aim of Nie et al. 2025, arXiv:2504.14450, whose group supervision swaps
    pathology features in a VAE latent; here consistency losses through a frozen guidance model): on rows noised below
    tc.consistency_max_t, the predicted clean follow-up keeps its prior's identity embedding (the same-patient group)
    and the frozen guidance classifier finds the follow-up's own findings in it (the same-finding group). Rows whose
    prior is dropped (zero latent) take no identity term."""
    low = ts < tc.consistency_max_t                                                   # (B,)
    if not low.any():
        return x0.sum() * 0
    with_prior = low & (prior.flatten(1).abs().sum(1) > 0)
    out = gm(x0[low], 0)                                                              # one guidance call
    loss = x0.sum() * 0
    if tc.identity_weight and with_prior.any():
        with torch.no_grad():
            on_prior = gm(prior[with_prior], 0).embedding                                  # the priors are data
        sel = with_prior[low]
        loss = loss + tc.identity_weight * identity_loss(out.embedding[sel], on_prior).sum() / low.sum()
    if tc.pathology_weight:
        loss = loss + tc.pathology_weight * finding_loss(out.logits, y[low.cpu()].to(x0), known[low.cpu()]).mean()
    return loss


def optimise(t: Trainee, acc: Accelerator, loss: torch.Tensor, max_grad_norm: float) -> None:
    t.opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    acc.clip_grad_norm_(t.model.parameters(), max_grad_norm)
    t.opt.step()
    t.lr_sched.step()
    t.ema.step(t.raw.parameters())


class LossLog:
    """log.csv (step, loss, lr, seconds) and TensorBoard: one mean over all processes per log line."""

    def __init__(self, path: Path, acc: Accelerator):
        self.acc, new = acc, not path.is_file()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "loss", "lr", "seconds"])
        self.means: list[float] = []
        self.window: list[torch.Tensor] = []

    def write(self, step: int, lr: float, seconds: float) -> float:
        """Gather and log the mean of the losses since the last line (one all-gather, on every process)."""
        self.means.append(self.acc.gather(torch.stack(self.window)[None]).mean().item())
        self.window.clear()
        if self.acc.is_main_process:
            self.writer.writerow([step, f"{self.means[-1]:.5f}", f"{lr:.2e}", f"{seconds:.1f}"])
            self.file.flush()
            self.acc.log({"loss": self.means[-1], "lr": lr}, step=step)
        return self.means[-1]

    def final_loss(self, log_every: int) -> float | None:
        return float(np.mean(self.means[-max(1, 50 // log_every):])) if self.means else None


def write_rank_fingerprint(unet: torch.nn.Module, sdir: Path, rank: int) -> None:
    """sdir/weights-rank<N>.sha256: a hash of this process's weights. Every rank must end with the same
    weights (the data-parallel check; tests compare the files of a two-process run)."""
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in unet.parameters())).hexdigest()
    atomic_text(sdir / f"weights-rank{rank}.sha256", digest + "\n")


def export_stage(t: Trainee, vae, cfg: RunConfig, text_spec, sdir: Path, export_dtype: str, info: dict,
                 load_text: bool = True) -> None:
    """The EMA weights as a pipeline folder (sdir/export) that BiomedJourneyPipeline.from_pretrained loads.
    load_text=False: ``text_spec`` is the encoder's full spec (``encoder.spec()``), written without loading
    the encoder (a machine without its weights writes the same folder)."""
    pipe = make_pipeline(t.ema_weights().eval(), vae, cfg, text_spec, info, load_text=load_text)
    dtype = {"fp16": torch.float16, "fp32": None, "bf16": torch.bfloat16}[export_dtype]
    atomic_write(sdir / "export", lambda tmp: pipe.save_pretrained(tmp, dtype=dtype), directory=True)


@dataclass
class StageData:
    """The rows of one stage and their cache: latents of every image, embeddings of every text."""
    rows: list[dict]
    val_rows: list[dict]
    cache: dict
    idx: dict[str, torch.Tensor]
    val_idx: dict[str, torch.Tensor]
    empty: int       # cache row of the empty prompt (text dropout)
    no_change: int   # cache row of NO_CHANGE (identity rows)


def load_stage_data(acc: Accelerator, cfg: RunConfig, stage: int, data: Path, register: bool, vae: AutoencoderKL,
                    vae_path: Path, cache_folder: Path, cache_file: Path | None = None) -> StageData:
    """Training and validation rows, and the latent/text cache (the main process builds it, the others read it;
    ``cache_file``: a prebuilt cache holding every row's image and text, used as is)."""
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    rows = training_rows(data, stage, register)
    val_rows = training_rows(data, stage, register, split="val")[: tc.val_pairs]
    if tc.text == "canonical":
        rows, val_rows = ([dict(r, text=canonical_text(r["text"])) for r in x] for x in (rows, val_rows))
    elif tc.text != "raw":
        raise SystemExit(f"text {tc.text!r}: expected 'raw' or 'canonical'")
    if not rows:
        raise SystemExit(f"No stage-{stage} training rows in {data}: run train/prepare_data.py first")
    path = cache_file or cache_path_for(data, stage, register, vae_path, cfg.model.text_encoder, cache_folder)
    if acc.is_main_process and cache_file is None:
        build_cache(rows + val_rows, vae, cfg.model.text_encoder, cfg.model.resolution, path, acc.device)
    acc.wait_for_everyone()
    cache = load_file(path)
    try:
        return StageData(rows, val_rows, cache, index_rows(rows, cache), index_rows(val_rows, cache),
                         text_index("", cache), text_index(NO_CHANGE, cache))
    except (KeyError, IndexError) as e:
        raise SystemExit(f"{path} lacks an image or text of {data}'s stage-{stage} rows: rebuild it") from e


def checkpoint_and_validate(t: Trainee, cfg: RunConfig, stage: int, d: StageData, vae, sdir: Path, step: int,
                            stopping: bool) -> None:
    """Main process, after a step: a checkpoint and a validation grid when they are due (always at the end)."""
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    last = stopping or step == tc.steps
    if step % tc.checkpoint_every == 0 or last:
        save_trainee(t, sdir / "checkpoints", step, cfg)
    if d.val_rows and (step % tc.val_every == 0 or last):
        pipe = make_pipeline(t.ema_weights().eval(), vae, cfg, cfg.model.text_encoder, {}, load_text=False)
        validation_grid(pipe, d.val_rows, d.cache, d.val_idx, int(d.empty), stage, tc.val_steps,
                        sdir / f"val-{step:06d}.png", cfg.seed)


def run_steps(t: Trainee, acc: Accelerator, cfg: RunConfig, stage: int, d: StageData, vae, sdir: Path, step: int,
              budget_s: float, stop_after: int | None, log: LossLog, t0: float) -> int:
    """Train from ``step`` until the schedule ends, the time budget (from t0) runs out or ``stop_after``;
    returns the last step done."""
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    bar = tqdm(total=tc.steps, initial=step, desc=f"stage {stage}", disable=not acc.is_main_process)
    t.model.train()
    weights = sampling_weights([r.get("labels", "") for r in d.rows], tc.sampling)  # None: uniform
    labels = label_arrays(d.rows, t.guidance.labels) if t.guidance is not None else None
    while step < tc.steps:
        g = step_generator(cfg.seed, step, acc.process_index)
        b = draw_batch(len(d.rows), tc.batch_size, step, cfg.seed, acc.process_index, acc.num_processes, weights)
        batch = make_batch(b, d.idx, d.cache, tc, stage, g, d.empty, d.no_change)
        consistency = None if labels is None else (tc, labels[0][b], labels[1][b])
        loss = diffusion_loss(t, acc, cfg.model.prediction_type, batch, g, consistency)
        optimise(t, acc, loss, tc.max_grad_norm)
        step += 1
        log.window.append(loss.detach())
        bar.update(1)
        if step % tc.log_every == 0 or step in (tc.steps, stop_after):  # one all-gather per log line, not every step
            bar.set_postfix(loss=f"{log.write(step, t.lr_sched.get_last_lr()[0], time.time() - t0):.4f}")
        out_of_time = (budget_s > 0 and time.time() - t0 > budget_s) or step == stop_after
        if acc.is_main_process:
            checkpoint_and_validate(t, cfg, stage, d, vae, sdir, step, out_of_time)
        if out_of_time:
            acc.print(f"stopping at step {step} (time budget or --stop-after); continue with --resume latest")
            break
    bar.close()
    return step


def train(cfg: RunConfig, stage: int, data: Path, vae_path: Path, out: Path, resume: str | None = None,
          minutes: float | None = None, curriculum: bool = True, register: bool = True,
          export_dtype: str = "fp16", command: str = "", stop_after: int | None = None,
          cache_dir: Path | None = None, cache_file: Path | None = None, text_spec: dict | None = None) -> dict:
    """One stage. ``cache_file``: a prebuilt latent/text cache (no image is read); ``text_spec``: the text
    encoder's full spec, exported without loading the encoder (with a prebuilt cache the encoder's weights
    need not be on this machine)."""
    tc = cfg.stage1 if stage == 1 else cfg.stage2
    # cpu=True on a machine without CUDA: under torchrun, accelerate then opens a gloo group (MULTI_CPU)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision,
                      log_with="tensorboard", project_dir=str(out / f"stage{stage}"))
    sdir = out / f"stage{stage}"
    sdir.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).to(acc.device).eval().requires_grad_(False)
    # 1. Rows and the latent/text cache
    d = load_stage_data(acc, cfg, stage, data, register, vae, vae_path, cache_dir or out, cache_file)
    # 2. Model, EMA, optimizer, LR schedule
    t = build_trainee(cfg, tc, stage, vae, d.cache["text_emb"].shape[-1], out, curriculum, acc)
    step = start_step = resume_trainee(t, sdir / "checkpoints", resume, tc, acc)
    acc.init_trackers(f"stage{stage}", config={"lr": tc.lr, "batch_size": tc.batch_size, "steps": tc.steps})
    acc.print(f"stage {stage}: UNet {count_parameters(t.raw) / 1e6:.2f}M params, {len(d.rows)} training rows, "
              f"batch {tc.batch_size} x {acc.num_processes} processes, {tc.steps} steps")
    # 3. Train on the cache
    log, t0 = LossLog(sdir / "log.csv", acc), time.time()
    budget_s = (minutes if minutes is not None else tc.max_minutes) * 60
    step = run_steps(t, acc, cfg, stage, d, vae, sdir, step, budget_s, stop_after, log, t0)
    log.file.close()
    write_rank_fingerprint(t.raw, sdir, acc.process_index)
    acc.wait_for_everyone()
    acc.end_training()
    seconds = time.time() - t0
    result = {"stage": stage, "steps": step, "seconds": seconds, "rows": len(d.rows),
              "seconds_per_step": seconds / max(1, step - start_step), "final_loss": log.final_loss(tc.log_every)}
    # 4. Export the EMA weights as a pipeline folder
    if acc.is_main_process:
        info = {"stage": stage, "config": config_dict(cfg), "command": command, "seed": cfg.seed,
                "manifest_sha256": manifest_hash(data / ("stage1.csv" if stage == 1 else "stage2.csv")),
                "training_rows": len(d.rows), "steps": step, "wall_seconds": round(seconds, 1),
                "curriculum": curriculum, "registration": register, "processes": acc.num_processes}
        export_stage(t, vae, cfg, text_spec or cfg.model.text_encoder, sdir, export_dtype, info,
                     load_text=text_spec is None)
        write_json(result, sdir / "result.json")
        acc.print(f"stage {stage}: {step} steps in {seconds / 60:.1f} min; exported {sdir / 'export'}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=[1, 2], required=True)
    ap.add_argument("--config", default="demo-cpu", help="preset (tiny, demo-cpu, demo-gpu, full) or YAML path")
    ap.add_argument("--data", type=Path, required=True, help="folder written by train/prepare_data.py")
    ap.add_argument("--vae", type=Path, required=True, help="autoencoder folder (train/train_autoencoder.py's OUT/vae)")
    ap.add_argument("--out", type=Path, required=True, help="run folder (stage1/ and stage2/ go inside)")
    ap.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    ap.add_argument("--steps", type=int, default=None, help="override the config's step count")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget; checkpoints and exports when reached")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (checkpoint + export) at this step, schedule unchanged")
    ap.add_argument("--identity-prob", type=float, default=None, help="override stage 2's identity_prob")
    ap.add_argument("--init-unet", default=None, help="UNet to start from (stage 2 default: OUT/stage1/export)")
    ap.add_argument("--no-curriculum", action="store_true", help="stage 2 from random init (single-stage baseline)")
    ap.add_argument("--no-register", action="store_true", help="stage 2 on unregistered priors, all pairs (ablation)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where latent/text caches live (default: --out)")
    ap.add_argument("--export-dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    tc = cfg.stage1 if a.stage == 1 else cfg.stage2
    if a.steps:
        tc.steps = a.steps
    if a.init_unet is not None:
        tc.init_unet = a.init_unet
    if a.identity_prob is not None:
        tc.identity_prob = a.identity_prob
    train(cfg, a.stage, a.data, a.vae, a.out, a.resume, a.minutes, curriculum=not a.no_curriculum,
          register=not a.no_register, export_dtype=a.export_dtype, command=" ".join(sys.argv), stop_after=a.stop_after,
          cache_dir=a.cache_dir)


if __name__ == "__main__":
    main()
