"""BiomedJourneyPipeline: prior chest X-ray + progression text -> generated follow-up images.

Conditioning as InstructPix2Pix (Brooks et al. 2023): the prior's latent is concatenated to the
noisy latent, the text enters through cross-attention, and dual classifier-free guidance mixes
three predictions computed in ONE batched UNet call per step.

A model folder (diffusers conventions, safetensors only):
    model_index.json        component classes (diffusers layout)
    biomedjourney.json      ModelConfig + sampler defaults + training provenance
    unet/  vae/  scheduler/  text_encoder/
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from . import __version__
from .config import NO_CHANGE, ModelConfig, SamplerConfig, to_dict, write_json
from .imaging import LoadedImage, read_image, to_model_input
from .model import SCHEDULERS, build_unet, build_vae, make_scheduler, to_vae_input, training_scheduler_config
from .text_encoders import TextEncoder, TinyTextEncoder, build_text_encoder, load_text_encoder

MODEL_ENV = "BIOMEDJOURNEY_MODEL"
CONFIG_FILE = "biomedjourney.json"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_IMAGES = 16


def default_model_path() -> Path:
    """$BIOMEDJOURNEY_MODEL if set, else the model shipped in assets/."""
    return Path(os.environ.get(MODEL_ENV) or ASSETS / "biomedjourney-cxr")


@dataclass
class GenerationOutput:
    images: list[np.ndarray]                 # each (R, R) float32 in [0, 1], no label burned in
    prior: np.ndarray | None                 # (R, R) the prior as the model saw it; None in text-only mode
    seeds: list[int]                         # image i == a rerun with seed=seeds[i], num_images=1
    settings: dict = field(default_factory=dict)


class BiomedJourneyPipeline:
    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: TextEncoder,
                 model_config: ModelConfig, defaults: SamplerConfig | None = None,
                 scheduler_config: dict | None = None, info: dict | None = None, model_id: str = ""):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.config = model_config
        self.defaults = defaults or SamplerConfig()
        self.scheduler_config = scheduler_config or training_scheduler_config(model_config)
        self.info = info or {}
        self.model_id = model_id
        self._fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # "", negative prompt, NO_CHANGE
        lc = vae.config.latent_channels
        if unet.config.in_channels != 2 * lc:
            raise ValueError(f"UNet expects {unet.config.in_channels} input channels, got {lc}+{lc} "
                             f"(noisy latent + prior latent of a {lc}-channel autoencoder)")

    # ----------------------------------------------------------------- properties
    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BiomedJourneyPipeline":
        for m in (self.unet, self.vae):
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)  # text encoders stay fp32 (small, and run once per call)
        self._fixed = {}
        return self

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """One folder, safetensors, config with the weights. dtype=torch.float16 for a small export."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, m in (("unet", self.unet), ("vae", self.vae)):
            src = m if dtype is None else _copy_to(m, dtype)
            src.save_pretrained(folder / name, safe_serialization=True)
        sched = make_scheduler(self.defaults.scheduler, self.scheduler_config)
        sched.save_pretrained(folder / "scheduler")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        write_json({
            "_class_name": "BiomedJourneyPipeline", "_diffusers_version": _diffusers_version(),
            "_biomedjourney_version": __version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", type(sched).__name__],
            "text_encoder": ["biomedjourney", type(self.text_encoder).__name__],
        }, folder / "model_index.json")
        write_json({"model": to_dict(self.config), "sampler": to_dict(self.defaults),
                    "scheduler_config": self.scheduler_config, "info": self.info}, folder / CONFIG_FILE)
        return folder

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike | None = None, device=None,
                        dtype: torch.dtype | None = None) -> "BiomedJourneyPipeline":
        """A local model folder, or a Hugging Face Hub repo id (downloaded only when asked for)."""
        src = str(path_or_hub_id) if path_or_hub_id else str(default_model_path())
        folder = Path(src).expanduser()
        if not folder.exists():
            if path_or_hub_id is None or src.startswith((".", "/", "~")) or src.count("/") != 1:
                raise FileNotFoundError(
                    f"No model folder at {folder}. Pass --model PATH_OR_HUB_ID, set ${MODEL_ENV}, "
                    f"or train one (README: 'Training').")
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a BiomedJourney model folder: {CONFIG_FILE} is missing")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype)
        text_encoder = load_text_encoder(folder / "text_encoder")
        pipe = cls(unet, vae, text_encoder, ModelConfig.from_dict(meta["model"]),
                   SamplerConfig.from_dict(meta.get("sampler", {})), meta.get("scheduler_config"),
                   meta.get("info", {}), model_id=src)
        return pipe.to(device)

    # ----------------------------------------------------------------- steps
    def check_inputs(self, prompt: Any, num_images: int, steps: int, guidance_scale: float,
                     image_guidance_scale: float, scheduler: str, strength: float = 1.0,
                     negative_prompt: str = "") -> None:
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise TypeError(f"{name} must be a string, got {type(text).__name__}")
        if not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
        if not 1 <= steps <= 1000:
            raise ValueError(f"num_inference_steps must be between 1 and 1000, got {steps}")
        if guidance_scale < 0 or image_guidance_scale < 0:
            raise ValueError(f"guidance scales must be >= 0, got text {guidance_scale}, image {image_guidance_scale}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

    def prepare_prior(self, prior: Any) -> np.ndarray:
        """Any accepted input -> (R, R) float32 [0, 1] as the model sees it."""
        if isinstance(prior, np.ndarray) and prior.shape == (self.resolution, self.resolution):
            return prior.astype(np.float32)
        loaded = prior if isinstance(prior, LoadedImage) else read_image(prior)
        return to_model_input(loaded.pixels, size=self.resolution, aspect=self.config.aspect)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.text_encoder(prompts)                      # (B, T, D), (B, T)
        return emb.to(self.device, self.dtype), mask.to(self.device)

    def _fixed_embedding(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts every call repeats (the empty one, the negative one, NO_CHANGE), encoded once each."""
        if text not in self._fixed:
            self._fixed[text] = self.encode_prompt([text])
        return self._fixed[text]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, R, R) in [0, 1] -> scaled posterior-mode latents (B, C, R/8, R/8)."""
        x = to_vae_input(images.to(self.device, self.dtype) * 2 - 1, self.vae)
        return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch: int = 4) -> list[np.ndarray]:
        out = []
        for i in range(0, len(latents), batch):
            x = self.vae.decode(latents[i:i + batch] / self.vae.config.scaling_factor).sample
            x = x.mean(1, keepdim=True)  # (B, 1, R, R): an RGB autoencoder (SD's) is averaged back to grey
            out += [a[0] for a in ((x.float() + 1) / 2).clamp(0, 1).cpu().numpy()]
        return out

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(self, prior: Any, prompt: str, num_images: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 image_guidance_scale: float | None = None, seed: int | None = None,
                 generator: list[torch.Generator] | torch.Generator | None = None,
                 scheduler: str | None = None, strength: float | None = None,
                 negative_prompt: str | None = None, change_transfer: bool | None = None,
                 callback: Callable[[int, int], None] | None = None,
                 prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> GenerationOutput:
        """Generate `num_images` follow-ups of `prior` (None: text-only, stage-1 mode) described by `prompt`.

        Unset settings come from `self.defaults` (shipped with the model). `prompt_embeds` =
        precomputed (emb (1, T, D), mask (1, T)) skips the text encoder (training validation);
        `negative_prompt_embeds` likewise replaces the negative prompt's embedding. `change_transfer`: each image is
        the prior plus the difference between the sample for `prompt` and the sample for NO_CHANGE drawn with the
        same noise (common random numbers), so the model's own blur cancels and only the described change is added."""
        d = self.defaults
        n = d.num_images if num_images is None else int(num_images)
        steps = d.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        g_text = d.guidance_scale if guidance_scale is None else guidance_scale
        g_img = d.image_guidance_scale if image_guidance_scale is None else image_guidance_scale
        sched_name = scheduler or d.scheduler
        strength = d.strength if strength is None else float(strength)
        negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
        self.check_inputs(prompt, n, steps, g_text, g_img, sched_name, strength, negative_prompt)
        seed = d.seed if seed is None else int(seed)
        seeds = [seed + i for i in range(n)]
        if generator is None:
            generator = [torch.Generator().manual_seed(s) for s in seeds]  # one per image: each reproducible alone
        elif isinstance(generator, torch.Generator):
            generator = [generator] * n
        text_only = prior is None
        if text_only:
            strength = 1.0  # nothing to start from
        transfer = (d.change_transfer if change_transfer is None else bool(change_transfer)) and not text_only
        k = 2 if transfer else 1  # trajectories: [prompt] or [prompt, NO_CHANGE]
        settings = {"prompt": prompt, "num_images": n, "num_inference_steps": steps,
                    "guidance_scale": g_text, "image_guidance_scale": g_img, "scheduler": sched_name,
                    "strength": strength, "negative_prompt": negative_prompt, "change_transfer": transfer,
                    "seed": seed, "seeds": seeds, "text_only": text_only, "resolution": self.resolution,
                    "model": self.model_id, "biomedjourney_version": __version__}
        if transfer and prompt_embeds is None and prompt.strip() == NO_CHANGE:
            # both trajectories would be the same sample, so prior + (a - a): nothing to denoise
            prior_img = self.prepare_prior(prior)
            return GenerationOutput(images=[prior_img.copy() for _ in range(n)], prior=prior_img, seeds=seeds,
                                    settings=settings)

        # 1. Encode prompt: [text, negative, negative] for (text+image, image only, neither); negative "" by default
        if prompt_embeds is not None:
            cond, cond_mask = (x.to(self.device) for x in prompt_embeds)
            cond = cond.to(self.dtype)
        else:
            cond, cond_mask = self.encode_prompt([prompt])          # (1, T, D)
        if transfer:
            ref, ref_mask = self._fixed_embedding(NO_CHANGE)
            cond = torch.cat([cond.expand(n, -1, -1), ref.expand(n, -1, -1)])           # (kB, T, D)
            cond_mask = torch.cat([cond_mask.expand(n, -1), ref_mask.expand(n, -1)])
        else:
            cond, cond_mask = cond.expand(n, -1, -1), cond_mask.expand(n, -1)          # (B, T, D)
        if negative_prompt_embeds is not None:
            unc, unc_mask = negative_prompt_embeds[0].to(self.device, self.dtype), negative_prompt_embeds[1].to(self.device)
        else:
            unc, unc_mask = self._fixed_embedding(negative_prompt)  # (1, T, D)
        branches = 2 if text_only else 3
        unc, unc_mask = unc.expand(k * n, -1, -1), unc_mask.expand(k * n, -1)
        emb = torch.cat([cond] + [unc] * (branches - 1))                      # (branches*kB, T, D)
        mask = torch.cat([cond_mask] + [unc_mask] * (branches - 1))           # (branches*kB, T)

        # 2. Encode prior (zero latent = the dummy prior of stage 1 and of image dropout)
        lc, f = self.vae.config.latent_channels, self.resolution // self.unet.config.sample_size
        shape = (n, lc, self.resolution // f, self.resolution // f)
        if text_only:
            prior_img = None
            prior_lat = torch.zeros(shape, device=self.device, dtype=self.dtype)              # (B, C, h, w)
        else:
            prior_img = self.prepare_prior(prior)
            z = self.encode_images(torch.from_numpy(prior_img)[None, None])                   # (1, C, h, w)
            prior_lat = z.expand(k * n, -1, -1, -1)                                         # (kB, C, h, w)
        zero = torch.zeros_like(prior_lat)
        image_cond = torch.cat([prior_lat, zero] if text_only else [prior_lat, prior_lat, zero])  # (kB, C, h, w)

        # 3. Prepare timesteps and initial latents: pure noise, or the noised prior (strength < 1, SDEdit)
        sched = make_scheduler(sched_name, self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generator])      # (B, C, h, w)
        noise = noise.to(self.device, self.dtype).repeat(k, 1, 1, 1)                       # (kB, C, h, w)
        if transfer:  # the NO_CHANGE trajectory replays every image's random numbers (ancestral samplers)
            generator = list(generator) + [_clone(g) for g in generator]
        skip = min(steps - 1, int(round(steps * (1 - strength))))
        timesteps = sched.timesteps[skip:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(skip)
        if skip:
            latents = sched.add_noise(prior_lat.float(), noise.float(), timesteps[:1].repeat(k * n)).to(self.dtype)
        else:
            latents = noise * sched.init_noise_sigma

        # 4. Denoise: one batched UNet call per step, dual guidance (InstructPix2Pix eq. 3)
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(torch.cat([latents] * branches), t)               # (branches*kB, C, h, w)
            x = torch.cat([x, image_cond], dim=1)                                          # (branches*kB, 2C, h, w)
            eps = self.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
            eps = eps.float()
            if text_only:
                e_text, e_unc = eps.chunk(2)
                eps = e_unc + g_text * (e_text - e_unc)
            else:
                eps = dual_guidance(*eps.chunk(3), g_text, g_img)
            latents = sched.step(eps, t, latents.float(), generator=generator).prev_sample.to(self.dtype)
            if callback is not None:
                callback(i + 1, len(timesteps))

        # 5. Decode (change transfer: prior + sample(prompt) - sample(NO_CHANGE), in pixels)
        images = self.decode_latents(latents)
        if transfer:
            images = [np.clip(prior_img + a - b, 0.0, 1.0) for a, b in zip(images[:n], images[n:])]
        return GenerationOutput(images=images, prior=prior_img, seeds=seeds, settings=settings)


def dual_guidance(e_full: torch.Tensor, e_image: torch.Tensor, e_uncond: torch.Tensor,
                  text_scale: float, image_scale: float) -> torch.Tensor:
    """InstructPix2Pix eq. 3: e_u + s_I (e_image - e_u) + s_T (e_full - e_image).

    e_full: text+prior, e_image: prior only, e_uncond: neither. s_T = s_I = 1 gives e_full.
    """
    return e_uncond + image_scale * (e_image - e_uncond) + text_scale * (e_full - e_image)


def _clone(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


def _copy_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy
    return copy.deepcopy(module).to(dtype=dtype)


def _diffusers_version() -> str:
    import diffusers
    return diffusers.__version__


def tiny_model_config() -> ModelConfig:
    """The tiny architecture used by tests (64 px, 4 latent channels): same code paths, seconds on CPU."""
    from .config import UNetConfig, VAEConfig
    return ModelConfig(
        resolution=64, text_encoder="tiny",
        vae=VAEConfig(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4),
        unet=UNetConfig(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                        attention_head_dim=8, norm_num_groups=8))


def build_pipeline(cfg: ModelConfig, text_encoder: TextEncoder | None = None, seed: int = 0,
                   defaults: SamplerConfig | None = None, vae: AutoencoderKL | None = None) -> BiomedJourneyPipeline:
    """A randomly initialised pipeline for `cfg` (training starts here)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = text_encoder or build_text_encoder(cfg.text_encoder)
        vae = vae or build_vae(cfg)
        unet = build_unet(cfg, vae.config.latent_channels, te.dim)
    return BiomedJourneyPipeline(unet, vae, te, cfg, defaults)


def tiny_pipeline(seed: int = 0) -> BiomedJourneyPipeline:
    """A tiny random pipeline (64 px) for tests and for developing the app without weights."""
    pipe = build_pipeline(tiny_model_config(), TinyTextEncoder(dim=32, max_length=16, seed=seed), seed=seed,
                          defaults=SamplerConfig(num_images=2, num_inference_steps=4))
    pipe.model_id = "tiny-random"
    pipe.info = {"note": "tiny randomly initialised model for tests; generates noise"}
    return pipe


__all__ = ["BiomedJourneyPipeline", "GenerationOutput", "default_model_path", "dual_guidance",
           "tiny_pipeline", "build_pipeline", "tiny_model_config", "SCHEDULERS"]
