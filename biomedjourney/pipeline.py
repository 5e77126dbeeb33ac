"""BiomedJourneyPipeline: prior chest X-ray + progression text -> generated follow-up images.

A diffusers `DiffusionPipeline` (components: unet, vae, scheduler, text_encoder). Conditioning as
InstructPix2Pix (Brooks et al. 2023, arXiv:2211.09800): the prior's latent is concatenated to the noisy
latent, the text enters through cross-attention, and dual classifier-free guidance mixes three
predictions computed in ONE batched UNet call per step. Region-restricted editing as blended latent
diffusion (Avrahami et al. 2023, arXiv:2206.02779) with RadEdit's keep mask (Pérez-García et al. 2024,
arXiv:2312.12865): outside the edit mask the prior is restored, in latents every step and in pixels at
the end.

A model folder is a diffusers folder (safetensors only):
    model_index.json        components + resolution, aspect and the shipped sampler defaults
    pipeline.py             one import of this class, so that `DiffusionPipeline.from_pretrained(folder,
                            custom_pipeline="pipeline", trust_remote_code=True)` finds it (diffusers' way for a
                            pipeline class that lives outside diffusers); this class itself runs no folder code
    biomedjourney.json      provenance only (training data, steps, notes)
    unet/  vae/  scheduler/  text_encoder/
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import __version__
from .config import NO_CHANGE, ModelConfig, SamplerConfig, to_dict, write_json
from .guidance import GuidanceModel, density_loss, finding_loss, identity_loss, luminance, luminance_probe
from .imaging import LoadedImage, read_image, to_model_input
from .model import (SCHEDULERS, build_unet, build_vae, make_scheduler, predicted_clean, to_vae_input,
                    training_scheduler_config)
from .text_encoders import ENCODERS, TextEncoder, TinyTextEncoder, build_text_encoder

MODEL_ENV = "BIOMEDJOURNEY_MODEL"
CONFIG_FILE = "biomedjourney.json"  # provenance only
SHIM_FILE = "pipeline.py"
SHIM = ('"""Lets `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` find the class '
        '(pip install biomedjourney)."""\nfrom biomedjourney.pipeline import BiomedJourneyPipeline  # noqa: F401\n')
ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_IMAGES = 16


def default_model_path() -> Path:
    """$BIOMEDJOURNEY_MODEL if set, else the model packaged in the wheel (biomedjourney/_assets/), else the
    repository's assets/ (editable install); FileNotFoundError naming all three when none exists."""
    from .resources import asset_path
    return asset_path("biomedjourney-cxr", MODEL_ENV)


@dataclass
class GenerationOutput(BaseOutput):
    images: list                             # output_type 'np': (R, R) float32 in [0, 1] each; 'pil'; 'latent'
    prior: np.ndarray | None = None          # (R, R) the prior as the model saw it; None in text-only mode
    seeds: list[int] = field(default_factory=list)  # image i == a rerun with seed=seeds[i], num_images=1
    settings: dict = field(default_factory=dict)
    mask: np.ndarray | None = None           # (R, R) the edit mask used (None: the whole film)


@dataclass
class NoiseOptimization:
    """Initial-noise optimisation (Nie et al. 2025, arXiv:2504.14450, long-tail lever; as InitNO, Guo et al. 2024,
    arXiv:2404.04650, optimises the initial latent): a few Adam steps on each image's initial noise so that the
    guidance model (``guidance.GuidanceModel``, trained apart from the evaluators) finds ``targets`` in the predicted
    clean result of the first denoising step, while its identity embedding keeps the patient. The noise is
    renormalised to its starting norm after every step (it stays a plausible Gaussian draw)."""
    targets: dict[str, float]        # guidance label -> wanted probability (1: the finding appears, 0: it goes)
    free: tuple[str, ...] = ()       # labels neither asked for nor held (the text changes them, unguided)
    steps: int = 3                   # Adam steps (each one UNet forward + backward over all guidance branches)
    lr: float = 0.3                  # Adam step size on the unit-variance noise (the objective plateaus by ~4 steps)
    identity_weight: float = 1.0     # weight of 1 - cos(identity(result), identity(prior))
    others_weight: float = 1.0       # weight holding every other finding at its probability on the prior: "this
                                     #   finding AND NOT the others" (composable guidance, Liu et al. 2022,
                                     #   arXiv:2206.01714, on the classifier); 'no finding' is left free
    max_seconds: float = 20.0        # stop before a step that would end past this budget
    density_weight: float = 100.0    # weight of guidance.density_loss (0: off): the result's block brightness may not move
                                     #   against the drawing's own direction (denser where the drawing brightened the
                                     #   prior, more lucent where it darkened it) compared with the unoptimised result:
                                     #   the classifier's gradient may not darken a region the text says grows dense
    density_threshold: float = 0.01  # a latent cell has a direction where the drawing moved its brightness by more
                                     #   than this (0-1 intensity range)


class BiomedJourneyPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["guidance_model"]

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler, text_encoder: TextEncoder,
                 guidance_model: GuidanceModel | None = None, resolution: int = 256, aspect: str = "crop",
                 sampler: dict | None = None):
        super().__init__()
        lc = vae.config.latent_channels
        if unet.config.in_channels != 2 * lc:
            raise ValueError(f"UNet expects {unet.config.in_channels} input channels, got {lc}+{lc} "
                             f"(noisy latent + prior latent of a {lc}-channel autoencoder)")
        if guidance_model is not None and guidance_model.config.latent_channels != lc:
            raise ValueError(f"guidance model reads {guidance_model.config.latent_channels}-channel latents, the "
                             f"autoencoder makes {lc}")
        self.register_modules(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler, text_encoder=text_encoder.eval(),
                              guidance_model=None if guidance_model is None else guidance_model.eval())
        self.register_to_config(resolution=int(resolution), aspect=aspect,
                                sampler=to_dict(SamplerConfig.from_dict(sampler or {})))
        self.info: dict = {}          # provenance, saved as biomedjourney.json
        self.model_id = ""            # where it was loaded from (settings.json records it)
        self.model_sha256 = ""        # short content hash of the loaded unet weights (settings.json records it)
        self._fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # "", negative prompt, NO_CHANGE

    # ----------------------------------------------------------------- properties
    @property
    def resolution(self) -> int:
        return int(self.config.resolution)

    @property
    def defaults(self) -> SamplerConfig:
        """The shipped sampler settings (model_index.json's `sampler`)."""
        return SamplerConfig.from_dict(dict(self.config.sampler))

    @defaults.setter
    def defaults(self, value: SamplerConfig) -> None:
        self.register_to_config(sampler=to_dict(value))

    @property
    def scheduler_config(self) -> dict:
        return dict(self.scheduler.config)

    @property
    def device(self) -> torch.device:  # the first parameter's: ModelMixin.device walks every module (~1 ms a call)
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, *args, **kwargs) -> "BiomedJourneyPipeline":
        self._fixed = {}  # cached embeddings live on the old device
        return super().to(*args, **kwargs)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        **kwargs) -> Path:
        """diffusers' save_pretrained (safetensors), plus provenance and the class shim.
        dtype=torch.float16 writes a half-precision copy without touching this pipeline's weights."""
        folder = Path(save_directory)
        pipe = self
        convs = [m for m in (self.unet, self.vae, self.guidance_model) if m is not None]
        if dtype is not None or not all(p.is_contiguous() for m in convs for p in m.parameters()):  # channels_last
            gm = None if self.guidance_model is None else _copy_to(self.guidance_model, dtype)
            pipe = type(self)(unet=_copy_to(self.unet, dtype), vae=_copy_to(self.vae, dtype), scheduler=self.scheduler,
                              text_encoder=self.text_encoder, guidance_model=gm, resolution=self.resolution,
                              aspect=self.config.aspect, sampler=dict(self.config.sampler))
        DiffusionPipeline.save_pretrained(pipe, folder, safe_serialization=True, **kwargs)
        index = json.loads((folder / "model_index.json").read_text())
        index["text_encoder"] = ["biomedjourney.text_encoders", ENCODERS[self.text_encoder.spec()["name"]].__name__]
        index["_biomedjourney_version"] = __version__
        write_json(index, folder / "model_index.json")
        (folder / SHIM_FILE).write_text(SHIM)
        write_json({"info": self.info}, folder / CONFIG_FILE)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None, device=None,
                        dtype: torch.dtype | None = None, **kwargs) -> "BiomedJourneyPipeline":
        """A local model folder, or a Hugging Face Hub repo id (downloaded only when asked for).
        None: $BIOMEDJOURNEY_MODEL or the shipped model. Other kwargs go to diffusers' from_pretrained."""
        src, folder, local = _model_source(pretrained_model_name_or_path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or kwargs.pop("torch_dtype", None) or (torch.float16 if device.type == "cuda" else torch.float32)
        kwargs.setdefault("local_files_only", local)
        kwargs.setdefault("use_safetensors", True)   # never unpickle: a folder with only .bin weights is refused
        pipe = super().from_pretrained(str(folder) if local else src, dtype=dtype, **kwargs)
        if not isinstance(pipe, BiomedJourneyPipeline):
            raise TypeError(f"{src} holds a {type(pipe).__name__}, not a BiomedJourneyPipeline")
        info_file = Path(pipe.config._name_or_path) / CONFIG_FILE
        pipe.info = json.loads(info_file.read_text()).get("info", {}) if info_file.is_file() else {}
        pipe.model_id = src
        pipe.model_sha256 = _weights_sha256(Path(pipe.config._name_or_path))  # once per load: settings carry it
        pipe.set_progress_bar_config(disable=True)  # callers show progress (tqdm in the CLI, gr.Progress in the app)
        return pipe.to(device).channels_last()

    def channels_last(self) -> "BiomedJourneyPipeline":
        """The convolutional models' weights in NHWC order (PyTorch's channels_last memory format), as diffusers
        recommends for speed: the same numbers (outputs within 3e-5), measured 10-11 % faster per request on the
        2-core CPU. save_pretrained writes contiguous copies (safetensors needs them)."""
        for m in (self.unet, self.vae, self.guidance_model):
            if m is not None:
                m.to(memory_format=torch.channels_last)
        return self

    # ----------------------------------------------------------------- steps
    def check_inputs(self, prompt: Any, num_images: int, steps: int, guidance_scale: float,
                     image_guidance_scale: float, scheduler: str, strength: float = 1.0,
                     negative_prompt: str = "", mask_image: np.ndarray | None = None,
                     init_image: np.ndarray | None = None, output_type: str = "np") -> None:
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise TypeError(f"{name} must be a string, got {type(text).__name__}")
        _check_numbers(num_images, steps, guidance_scale, image_guidance_scale, scheduler, strength)
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        self._check_arrays(num_images, mask_image, init_image)

    def _check_arrays(self, num_images: int, mask_image, init_image) -> None:
        r = self.resolution
        for name, a, shapes in (("mask_image", mask_image, [(r, r)]), ("init_image", init_image, [(r, r), (num_images, r, r)])):
            if a is not None and (not isinstance(a, np.ndarray) or a.shape not in shapes or not np.isfinite(a).all()):
                shape = getattr(a, "shape", type(a).__name__)
                raise ValueError(f"{name} must be a finite array of shape {' or '.join(map(str, shapes))} in the "
                                 f"prior's model-input frame, got {shape}")
        if mask_image is not None and float(mask_image.max()) <= 0:
            raise ValueError("mask_image is empty (all zero): nothing could change; pass None to edit the whole film")

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

    def get_timesteps(self, scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
        """img2img's schedule: skip the first (1 - strength) of the steps (diffusers' get_timesteps)."""
        init_timestep = denoising_steps(num_inference_steps, strength)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        return timesteps

    def _embeddings(self, prompt, n, k, branches, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """[text, negative, negative] for (text+prior, prior only, neither); text = [prompt, NO_CHANGE] when k = 2."""
        if prompt_embeds is not None:
            cond, cond_mask = prompt_embeds[0].to(self.device, self.dtype), prompt_embeds[1].to(self.device)
        else:
            cond, cond_mask = self.encode_prompt([prompt])                                   # (1, T, D)
        cond, cond_mask = cond.expand(n, -1, -1), cond_mask.expand(n, -1)                    # (B, T, D)
        if k == 2:
            ref, ref_mask = self._fixed_embedding(NO_CHANGE)
            cond = torch.cat([cond, ref.expand(n, -1, -1)])                                  # (kB, T, D)
            cond_mask = torch.cat([cond_mask, ref_mask.expand(n, -1)])
        if negative_prompt_embeds is not None:
            unc, unc_mask = negative_prompt_embeds[0].to(self.device, self.dtype), negative_prompt_embeds[1].to(self.device)
        else:
            unc, unc_mask = self._fixed_embedding(negative_prompt)                           # (1, T, D)
        unc, unc_mask = unc.expand(k * n, -1, -1), unc_mask.expand(k * n, -1)
        emb = torch.cat([cond] + [unc] * (branches - 1))                                     # (branches*kB, T, D)
        mask = torch.cat([cond_mask] + [unc_mask] * (branches - 1))                          # (branches*kB, T)
        # The padding no row attends to is dropped (the cross-attention then spans the longest text, not T tokens),
        # and an all-ones mask is no mask: both give the same attention, computed on less.
        used = int(torch.nonzero(mask.any(0)).max()) + 1 if bool(mask.any()) else mask.shape[1]
        emb, mask = emb[:, :used], mask[:, :used]                                            # (branches*kB, T', ...)
        return emb, (None if bool(mask.all()) else mask)

    def _latent_mask(self, mask_image: np.ndarray, h: int) -> torch.Tensor:
        """(R, R) soft pixel mask -> (1, 1, h, w) latent mask, area-averaged then dilated by one latent pixel
        so thin regions keep room to change (the pixel mask cuts the edit precisely at the end)."""
        m = torch.from_numpy(mask_image.astype(np.float32))[None, None]
        m = F.interpolate(m, size=(h, h), mode="area")
        return F.max_pool2d(m, 3, stride=1, padding=1).clamp(0, 1).to(self.device, self.dtype)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(self, prior: Any, prompt: str, num_images: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 image_guidance_scale: float | None = None, seed: int | None = None,
                 generator: list[torch.Generator] | torch.Generator | None = None,
                 scheduler: str | None = None, strength: float | None = None,
                 negative_prompt: str | None = None, change_transfer: bool | None = None,
                 mask_image: np.ndarray | None = None, init_image: np.ndarray | None = None,
                 output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 noise_optimization: NoiseOptimization | None = None):
        """Generate `num_images` follow-ups of `prior` (None: text-only, stage-1 mode) described by `prompt`.

        Unset settings come from `self.defaults` (shipped with the model). `prompt_embeds` = precomputed
        (emb (1, T, D), mask (1, T)) skips the text encoder (training validation); `negative_prompt_embeds`
        likewise. `change_transfer`: each image is the prior plus the difference between the sample for
        `prompt` and the sample for NO_CHANGE drawn with the same noise (common random numbers), so the
        model's own blur cancels and only the described change is added. `mask_image` ((R, R) in [0, 1]):
        only this region may change (blended latent diffusion; the prior is kept outside). `init_image`
        ((R, R), or (B, R, R): one per image): the trajectory starts from this picture noised to `strength` instead
        of the prior (e.g. a knowledge-driven rendering of the finding, harmonised by the model: SDEdit, Meng et al.
        2022, arXiv:2108.01073); the NO_CHANGE reference still starts from the prior (same noise), and change
        transfer adds the start picture's fine detail in place of the prior's (`_compose_from_start`). `noise_optimization`:
        the initial noise is first optimised towards its targets by the guidance model (`NoiseOptimization`); what
        it did goes in settings['noise_optimization']."""
        r = self._resolve(prior is None, dict(num_images=num_images, num_inference_steps=num_inference_steps,
                                              guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                                              scheduler=scheduler, strength=strength, negative_prompt=negative_prompt,
                                              change_transfer=change_transfer, seed=seed))
        if r.text_only:
            mask_image, init_image = None, None  # nothing to keep or to start from
        r = replace(r, from_start=init_image is not None and r.transfer)  # the start's detail, not the prior's (step 5)
        self.check_inputs(prompt, r.n, r.steps, r.g_text, r.g_img, r.scheduler, r.strength, r.negative_prompt,
                          mask_image, init_image, output_type)
        self._check_noise_optimization(noise_optimization, r)
        settings = {"prompt": prompt, **r.settings(), "region_restricted": mask_image is not None,
                    "init_image": init_image is not None, "noise_optimization": None, "resolution": self.resolution,
                    "dtype": str(self.dtype).removeprefix("torch."),
                    "model": _public_model_id(self.model_id), "model_sha256": self.model_sha256,
                    "biomedjourney_version": __version__}
        prior_img = None if r.text_only else self.prepare_prior(prior)
        if r.k == 2 and init_image is None and prompt_embeds is None and prompt.strip() == NO_CHANGE:
            # both trajectories would be the same sample, so prior + (a - a): nothing to denoise
            return self._output([prior_img.copy() for _ in range(r.n)], prior_img, r.seeds, settings, mask_image,
                                output_type, return_dict)
        generator = _generators(generator, r)

        # 1. Encode prompt: [text (, NO_CHANGE)] x [text+prior, prior only, neither]
        emb, emb_mask = self._embeddings(prompt, r.n, r.k, r.branches, r.negative_prompt, prompt_embeds,
                                         negative_prompt_embeds)
        # 2. Encode the prior (zero latent = stage 1's dummy prior) and the picture the edit starts from
        prior_lat, start_lat = self._encode_prior(prior_img, init_image, r)                  # (kB, C, h, w) each
        image_cond = torch.cat([prior_lat] * (r.branches - 1) + [torch.zeros_like(prior_lat)])  # (branches*kB, C, h, w)
        latent_mask = None if mask_image is None else self._latent_mask(mask_image, prior_lat.shape[2])
        # 3. Timesteps (img2img: strength) and initial latents: pure noise, or the noised start picture (SDEdit)
        sched = make_scheduler(r.scheduler, self.scheduler.config)  # a fresh instance: concurrent calls share no state
        sched.set_timesteps(r.steps, device=self.device)
        timesteps = self.get_timesteps(sched, r.steps, r.strength)
        latents, noise, generator = self._initial_latents(sched, timesteps, start_lat, generator, r)
        step = dict(sched=sched, timesteps=timesteps, noise=noise, image_cond=image_cond, emb=emb, emb_mask=emb_mask,
                    prior_lat=prior_lat, latent_mask=latent_mask, generator=generator)
        if noise_optimization is not None:  # 3b. the initial noise, optimised towards the guidance targets
            noise, settings["noise_optimization"] = self._optimise_noise(noise, start_lat, step, r, noise_optimization,
                                                                         prior_img)
            latents = self._noised(sched, timesteps, start_lat, noise, r)
            step["noise"] = noise
        # 4. Denoise: one batched UNet call per step, dual guidance; outside the mask the prior is restored
        latents = self._denoise(latents, step, r, callback_on_step_end,
                                callback_on_step_end_tensor_inputs or self._callback_tensor_inputs)
        # 5. Decode; change transfer: prior + sample(prompt) - sample(NO_CHANGE) (from a start picture, with its
        #    detail in place of the prior's); keep mask: the prior outside
        if output_type == "latent":
            return self._output(list(latents[:r.n]), prior_img, r.seeds, settings, mask_image, output_type, return_dict)
        images = self.decode_latents(latents)
        if r.from_start:
            images = _compose_from_start(images, init_image, self.decode_latents(start_lat[:r.n]), prior_img,
                                         self.decode_latents(prior_lat[:1])[0], mask_image, r)
        else:
            images = _compose(images, prior_img, mask_image, r)
        return self._output(images, prior_img, r.seeds, settings, mask_image, output_type, return_dict)

    def _initial_latents(self, sched, timesteps, start_lat, generator, r: "_Settings"):
        """(latents, noise, generators): pure noise, or the start picture noised to the first timestep (img2img)."""
        noise = randn_tensor(start_lat[:r.n].shape, generator=generator, device=torch.device("cpu"),
                             dtype=torch.float32).to(self.device, self.dtype).repeat(r.k, 1, 1, 1)   # (kB, C, h, w)
        if r.k == 2:  # the NO_CHANGE trajectory replays every image's random numbers (ancestral samplers)
            generator = generator + [_clone(g) for g in generator]
        return self._noised(sched, timesteps, start_lat, noise, r), noise, generator

    def _noised(self, sched, timesteps, start_lat, noise, r: "_Settings") -> torch.Tensor:
        """The first latents: the start picture noised to the first timestep (img2img), or pure noise."""
        if len(timesteps) < len(sched.timesteps):
            return sched.add_noise(start_lat.float(), noise.float(), timesteps[:1].repeat(r.k * r.n)).to(self.dtype)
        return noise * sched.init_noise_sigma

    def _check_noise_optimization(self, opt: NoiseOptimization | None, r: "_Settings") -> None:
        if opt is None:
            return
        if self.guidance_model is None:
            raise ValueError("noise optimisation needs a guidance model, and this model folder has none: train one "
                             "with train/train_guidance.py, or turn noise optimisation off")
        if r.text_only:
            raise ValueError("noise optimisation keeps the prior's identity: it needs a prior")
        if not 1 <= opt.steps <= 50 or not opt.lr > 0 or not opt.max_seconds > 0 or min(
                opt.identity_weight, opt.others_weight, opt.density_weight, opt.density_threshold) < 0:
            raise ValueError(f"noise optimisation needs 1 <= steps <= 50, lr > 0, max_seconds > 0 and weights and "
                             f"threshold >= 0; got steps {opt.steps}, lr {opt.lr}, max_seconds {opt.max_seconds}, "
                             f"identity_weight {opt.identity_weight}, others_weight {opt.others_weight}, "
                             f"density_weight {opt.density_weight}, density_threshold {opt.density_threshold}")
        unknown = sorted(set(opt.targets) - set(self.guidance_model.labels))
        if not opt.targets or unknown:
            raise ValueError(f"noise optimisation targets {unknown or 'none'}: the guidance model knows "
                             f"{', '.join(self.guidance_model.labels)}")

    def _optimise_noise(self, noise, start_lat, s: dict, r: "_Settings", opt: NoiseOptimization,
                        prior_img: np.ndarray | None = None):
        """Adam on each image's initial noise (shared by its NO_CHANGE reference: change transfer still cancels the
        model's blur). Objective: the guidance model's BCE against the targets on the predicted clean result of the
        first step (prior + change, the prior outside the mask) + others_weight x its BCE against the prior's own
        probabilities on every other finding + identity_weight x its identity distance to the prior (+ density_weight
        x the density guard, `_density_direction`). Returns (noise (kB, C, h, w), report: steps done, seconds,
        objective before each step)."""
        t0, gm, n = time.perf_counter(), self.guidance_model, r.n
        y, known = gm.targets(opt.targets)
        with torch.no_grad():  # the prior, once: its findings' probabilities and its identity
            on_prior = gm(s["prior_lat"][:1].to(gm.dtype), 0)
        held = torch.sigmoid(on_prior.logits[0])                                            # (L,)
        others = ~known & torch.tensor([name != "no finding" and name not in opt.free for name in gm.labels])
        t = s["timesteps"][0]
        ac = s["sched"].alphas_cumprod.to(self.device)[t].float()
        a, sg = ac.sqrt(), (1 - ac).sqrt()            # VP noise level of the first step (the UNet's training inputs)
        eps = noise[:n].detach().float().clone().requires_grad_(True)                        # (B, C, h, w)
        norm = eps.detach().flatten(1).norm(dim=1)[:, None, None, None]
        adam = torch.optim.Adam([eps], lr=opt.lr)
        guard = self._density_direction(start_lat, s, r, opt, prior_img)   # (probe, direction (B, h, w)) or None
        reference = None                   # the unoptimised result's block brightness, fixed at the first step
        objective, density, last = [], [], 0.0
        for _ in range(opt.steps):
            if time.perf_counter() - t0 + last > opt.max_seconds:
                break
            ts = time.perf_counter()
            with torch.enable_grad():
                x = a * start_lat.float() + sg * eps.repeat(r.k, 1, 1, 1)                    # (kB, C, h, w)
                pred = self._guided_prediction(x.to(self.dtype), t, s["image_cond"], s["emb"], s["emb_mask"], r)
                x0 = predicted_clean(ac, x, pred, self.scheduler.config.prediction_type)
                result = self._predicted_result(x0, s, r)                                     # (B, C, h, w)
                out = gm(result.to(gm.dtype), 0)                                              # one guidance call
                loss = (finding_loss(out.logits, y, known)
                        + opt.identity_weight * identity_loss(out.embedding, on_prior.embedding))
                if opt.others_weight and others.any():
                    loss = loss + opt.others_weight * finding_loss(out.logits, held, others)
                if guard is not None:  # measured whenever there is a drawing; in the objective with a weight
                    lum = luminance(result, guard[0])                                         # (B, h, w)
                    reference = lum.detach() if reference is None else reference
                    against = density_loss(lum, reference, guard[1])                          # (B,)
                    density.append(round(float(against.detach().mean()), 6))
                    loss = loss + opt.density_weight * against
                # each image's own objective (B,): the gradient of the sum leaves every image's noise independent of
                # the others in the batch (image i == a rerun with seed=seeds[i], num_images=1, and streaming)
                eps.grad = torch.autograd.grad(loss.sum(), eps)[0]
            adam.step()
            with torch.no_grad():
                eps.mul_(norm / eps.flatten(1).norm(dim=1)[:, None, None, None])
            objective.append(round(float(loss.mean()), 5))
            last = time.perf_counter() - ts
        report = {"steps": len(objective), "seconds": round(time.perf_counter() - t0, 3), "objective": objective,
                  "targets": dict(opt.targets), "free": list(opt.free), "lr": opt.lr,
                  "identity_weight": opt.identity_weight,
                  "others_weight": opt.others_weight, "density_weight": opt.density_weight if guard is not None else 0.0,
                  "against_density": density}     # density_loss before each step (the drawing's way; [] without one)
        return eps.detach().to(self.dtype).repeat(r.k, 1, 1, 1), report

    def _density_direction(self, start_lat, s: dict, r: "_Settings", opt: NoiseOptimization,
                           prior_img: np.ndarray | None):
        """The density guard's (probe (C+1,), direction (B, h, w)): the sign of the brightness change the drawing
        (the start picture) made to the prior in each latent cell inside the mask's core (guidance.luminance_probe,
        fitted on the prior), where it exceeds density_threshold. Computed whatever density_weight is (the report
        carries it); None without a drawing or a prior, or where the drawing changed nothing inside the mask."""
        if prior_img is None or start_lat is s["prior_lat"]:
            return None
        probe = luminance_probe(s["prior_lat"][:1], torch.from_numpy(np.asarray(prior_img, np.float32)))
        delta = luminance(start_lat[:r.n], probe) - luminance(s["prior_lat"][:r.n], probe)         # (B, h, w)
        direction = torch.sign(delta) * (delta.abs() > opt.density_threshold)
        m = s["latent_mask"]
        if m is not None:
            direction = direction * (m[:r.n, 0].float() > 0.5)
        return (probe, direction) if direction.any() else None

    def _predicted_result(self, x0: torch.Tensor, s: dict, r: "_Settings") -> torch.Tensor:
        """The clean result a prediction implies, in latents: prior + (text - NO_CHANGE) with change transfer, the
        prior outside the mask."""
        prior = s["prior_lat"][:r.n].float()
        out = prior + x0[:r.n] - x0[r.n:] if r.transfer else x0[:r.n]
        m = s["latent_mask"]
        return out if m is None else m.float() * out + (1 - m.float()) * prior

    def _denoise(self, latents: torch.Tensor, s: dict, r: "_Settings", callback, names: list[str]) -> torch.Tensor:
        """The sampling loop. s: sched, timesteps, noise, image_cond, emb, emb_mask, prior_lat, latent_mask, generator.
        `callback(pipe, i, t, tensors)` gets {name: tensor} for `names` (latents or any entry of s) after each step."""
        sched, timesteps, mask = s["sched"], s["timesteps"], s["latent_mask"]
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                eps = self._guided_eps(sched, latents, t, s["image_cond"], s["emb"], s["emb_mask"], r)
                latents = sched.step(eps, t, latents.float(), generator=s["generator"]).prev_sample.to(self.dtype)
                if mask is not None:  # blended latent diffusion: outside the mask, the prior at this noise level
                    kept = s["prior_lat"] if i + 1 == len(timesteps) else sched.add_noise(
                        s["prior_lat"].float(), s["noise"].float(), timesteps[i + 1:i + 2].repeat(r.k * r.n)).to(self.dtype)
                    latents = mask * latents + (1 - mask) * kept                          # (kB, C, h, w)
                if callback is not None:
                    here = {**s, "latents": latents}
                    latents = (callback(self, i, t, {k: here[k] for k in names}) or {}).get("latents", latents)
                progress.update()
        return latents

    def _resolve(self, text_only: bool, given: dict) -> "_Settings":
        """Unset (None) arguments take the model's shipped defaults."""
        d = to_dict(self.defaults)
        v = {k: d[k] if val is None else val for k, val in given.items()}
        return _Settings(n=int(v["num_images"]), steps=int(v["num_inference_steps"]), g_text=float(v["guidance_scale"]),
                         g_img=float(v["image_guidance_scale"]), scheduler=v["scheduler"] or d["scheduler"],
                         strength=1.0 if text_only else float(v["strength"]), negative_prompt=v["negative_prompt"],
                         transfer=bool(v["change_transfer"]) and not text_only, seed=int(v["seed"]),
                         text_only=text_only)

    def _encode_prior(self, prior_img, init_image, r: "_Settings") -> tuple[torch.Tensor, torch.Tensor]:
        lc, f = self.vae.config.latent_channels, self.resolution // self.unet.config.sample_size
        if r.text_only:
            z = torch.zeros((r.n, lc, self.resolution // f, self.resolution // f), device=self.device, dtype=self.dtype)
            return z, z                                                                        # (B, C, h, w)
        prior_lat = self.encode_images(torch.from_numpy(prior_img)[None, None]).expand(r.k * r.n, -1, -1, -1)
        if init_image is None:
            return prior_lat, prior_lat
        x = torch.from_numpy(init_image.astype(np.float32)).reshape(-1, 1, *init_image.shape[-2:])  # one, or one per image
        zi = self.encode_images(x).expand(r.n, -1, -1, -1)                                     # (B, C, h, w)
        return prior_lat, torch.cat([zi] + [prior_lat[r.n:]] * (r.k - 1))      # the NO_CHANGE reference: the prior

    def _guided_eps(self, sched, latents, t, image_cond, emb, emb_mask, r: "_Settings") -> torch.Tensor:
        return self._guided_prediction(sched.scale_model_input(latents, t), t, image_cond, emb, emb_mask, r)

    def _guided_prediction(self, x, t, image_cond, emb, emb_mask, r: "_Settings") -> torch.Tensor:
        """The guided model output (epsilon or v) for scaled model inputs x (kB, C, h, w): one batched UNet call."""
        x = torch.cat([torch.cat([x] * r.branches), image_cond], dim=1)                        # (branches*kB, 2C, h, w)
        eps = self.unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=emb_mask).sample.float()
        if r.text_only:
            e_text, e_unc = eps.chunk(2)
            return e_unc + r.g_text * (e_text - e_unc)
        return dual_guidance(*eps.chunk(3), r.g_text, r.g_img)

    def _output(self, images, prior_img, seeds, settings, mask_image, output_type, return_dict):
        if output_type == "pil":
            from PIL import Image
            images = [Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L") for a in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return GenerationOutput(images=images, prior=prior_img, seeds=seeds, settings=settings, mask=mask_image)


def _model_source(name_or_path) -> tuple[str, Path, bool]:
    """(source string, local folder, is local) for from_pretrained; None means $BIOMEDJOURNEY_MODEL or the shipped model."""
    src = str(name_or_path) if name_or_path else str(default_model_path())
    folder = Path(src).expanduser()
    local = folder.exists()
    hub_like = name_or_path is not None and not src.startswith((".", "/", "~")) and src.count("/") == 1
    if not local and not hub_like:
        raise FileNotFoundError(f"No model folder at {folder}. Pass --model PATH_OR_HUB_ID, set ${MODEL_ENV}, "
                                f"or train one (README: 'Training').")
    if local and not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a BiomedJourney model folder: model_index.json is missing")
    return src, folder, local


def _check_numbers(num_images: int, steps: int, guidance_scale: float, image_guidance_scale: float,
                   scheduler: str, strength: float) -> None:
    if not 1 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images must be between 1 and {MAX_IMAGES}, got {num_images}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"num_inference_steps must be between 1 and 1000, got {steps}")
    for name, g in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
        if not np.isfinite(g) or g < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {g}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if denoising_steps(steps, strength) < 1:
        raise ValueError(f"strength {strength} x {steps} steps leaves no denoising step: raise either")


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """How many UNet steps a call makes (img2img skips the first 1 - strength of the schedule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def progress_callback(report: Callable[[int], None]) -> Callable:
    """A `callback_on_step_end` that calls report(steps done) after every denoising step (progress bars)."""
    def on_step_end(pipe, i, t, tensors):
        report(i + 1)
        return tensors
    return on_step_end


def read_defaults(folder: str | os.PathLike) -> SamplerConfig:
    """A model folder's shipped sampler settings, read from model_index.json without loading weights."""
    return SamplerConfig.from_dict(json.loads((Path(folder) / "model_index.json").read_text()).get("sampler", {}))


@dataclass
class _Settings:
    """One call's settings, the model's defaults filled in."""
    n: int
    steps: int
    g_text: float
    g_img: float
    scheduler: str
    strength: float
    negative_prompt: str
    transfer: bool
    seed: int
    text_only: bool
    from_start: bool = False   # change transfer from a start picture (init_image): its fine detail, not the prior's

    @property
    def k(self) -> int:  # trajectories: [prompt] or [prompt, NO_CHANGE]
        return 2 if self.transfer else 1

    @property
    def branches(self) -> int:  # guidance branches: [text+prior, prior only, neither] (text-only: [text, neither])
        return 2 if self.text_only else 3

    @property
    def seeds(self) -> list[int]:  # image i == a rerun with seed=seeds[i], num_images=1
        return [self.seed + i for i in range(self.n)]

    def settings(self) -> dict:
        return {"num_images": self.n, "num_inference_steps": self.steps, "guidance_scale": self.g_text,
                "image_guidance_scale": self.g_img, "scheduler": self.scheduler, "strength": self.strength,
                "negative_prompt": self.negative_prompt, "change_transfer": self.transfer, "seed": self.seed,
                "seeds": self.seeds, "text_only": self.text_only,
                "transfer_detail": ("start picture" if self.from_start else "prior") if self.transfer else None}


def _generators(generator, r: _Settings) -> list[torch.Generator]:
    """One generator per image, so that each image is reproducible alone."""
    if generator is None:
        return [torch.Generator().manual_seed(s) for s in r.seeds]
    return [generator] * r.n if isinstance(generator, torch.Generator) else list(generator)


def _compose(images: list[np.ndarray], prior_img, mask_image, r: _Settings) -> list[np.ndarray]:
    """Change transfer: prior + sample(prompt) - sample(NO_CHANGE); a mask keeps the prior outside it."""
    n = r.n
    m = 1.0 if mask_image is None else mask_image.astype(np.float32)
    if r.transfer:
        return [np.clip(prior_img + m * (a - b), 0.0, 1.0) for a, b in zip(images[:n], images[n:])]
    if mask_image is not None:
        return [np.clip(prior_img + m * (a - prior_img), 0.0, 1.0) for a in images]
    return images


ERASED_AT = 0.03    # a drawing that lowered the prior's edge strength by this much per pixel (at 256 px) erased it


def erased_edges(start: np.ndarray, prior_img: np.ndarray) -> np.ndarray:
    """(R, R) in [0, 1]: the prior's edges (hemidiaphragm, heart border, vessels) that a start picture erased, grown by
    ~3 px at 256 px: where its gradient magnitude fell by ERASED_AT or more. 0 wherever the drawing kept the prior."""
    px = prior_img.shape[-1] / 256
    grad = lambda im: ndimage.gaussian_gradient_magnitude(im.astype(np.float32), max(px, 0.5)) / px   # per 256-px pixel
    lost = ndimage.maximum_filter(np.maximum(grad(prior_img) - grad(start), 0), 2 * int(3 * px) + 1)
    t = np.clip(lost / ERASED_AT, 0, 1)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def _compose_from_start(images: list[np.ndarray], init_image: np.ndarray, start_recon: list[np.ndarray],
                        prior_img: np.ndarray, prior_recon: np.ndarray, mask_image, r: _Settings) -> list[np.ndarray]:
    """Change transfer from a start picture S (a drawing), per image: S + (a - D(E(S))) - (1 - w) (b - D(E(prior))),
    a = sample(prompt) from S, b = sample(NO_CHANGE) from the prior, w = erased_edges(S, prior). Where the drawing kept
    the prior's structure (w = 0) this is prior + a - b + the drawing's fine detail in place of the prior's (the
    autoencoder drops both): the model's blur and noise cancel between the two samples (same noise). Along an edge of
    the prior that the drawing erased (w = 1), b's error there is the prior's own structure, which is no longer in the
    picture: subtracted, it drew the hemidiaphragm back as a ghost line through a drawn effusion (no silhouette
    sign), so it is left out there. A mask keeps the prior outside it."""
    n = r.n
    m = 1.0 if mask_image is None else mask_image.astype(np.float32)
    starts = np.broadcast_to(init_image.astype(np.float32), (n, *prior_img.shape))
    out = []
    for s, a, b, ds in zip(starts, images[:n], images[n:], start_recon):
        follow = s + (a - ds) - (1 - erased_edges(s, prior_img)) * (b - prior_recon)
        out.append(np.clip(prior_img + m * (follow - prior_img), 0.0, 1.0))
    return out


def dual_guidance(e_full: torch.Tensor, e_image: torch.Tensor, e_uncond: torch.Tensor,
                  text_scale: float, image_scale: float) -> torch.Tensor:
    """InstructPix2Pix eq. 3: e_u + s_I (e_image - e_u) + s_T (e_full - e_image).

    e_full: text+prior, e_image: prior only, e_uncond: neither. s_T = s_I = 1 gives e_full.
    """
    return e_uncond + image_scale * (e_image - e_uncond) + text_scale * (e_full - e_image)


def _weights_sha256(folder: Path, digits: int = 16) -> str:
    """First `digits` hex digits of the sha256 of the folder's unet weights file ('' when there is none)."""
    from .resources import file_sha256
    weights = sorted((folder / "unet").glob("*.safetensors")) if folder.is_dir() else []
    return file_sha256(weights[0])[:digits] if weights else ""


def _public_model_id(model_id: str) -> str:
    """The model's name for settings and exports: a folder's name, never a local absolute path."""
    p = Path(model_id)
    return p.name if model_id and (p.is_absolute() or p.exists()) else model_id


def _clone(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


def _copy_to(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A copy in `dtype` (None: its own) with contiguous (NCHW) weights, as safetensors saves them."""
    import copy
    return copy.deepcopy(module).to(dtype=dtype or module.dtype, memory_format=torch.contiguous_format)


def tiny_model_config() -> ModelConfig:
    """The tiny architecture used by tests (config.MODEL_PRESETS['tiny']): same code paths, seconds on CPU."""
    return ModelConfig.from_dict("tiny")


def assemble(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: TextEncoder, cfg: ModelConfig,
             defaults: SamplerConfig | None = None, info: dict | None = None) -> BiomedJourneyPipeline:
    """A pipeline from trained networks and the config they were built from (training exports through this)."""
    defaults = defaults or SamplerConfig()
    scheduler = make_scheduler(defaults.scheduler, training_scheduler_config(cfg))
    pipe = BiomedJourneyPipeline(unet, vae, scheduler, text_encoder, resolution=cfg.resolution, aspect=cfg.aspect,
                                 sampler=to_dict(defaults))
    pipe.info = dict(info or {})
    return pipe


def build_pipeline(cfg: ModelConfig, text_encoder: TextEncoder | None = None, seed: int = 0,
                   defaults: SamplerConfig | None = None, vae: AutoencoderKL | None = None) -> BiomedJourneyPipeline:
    """A randomly initialised pipeline for `cfg` (training starts here)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = text_encoder or build_text_encoder(cfg.text_encoder)
        vae = vae or build_vae(cfg)
        unet = build_unet(cfg, vae.config.latent_channels, te.dim)
    return assemble(unet, vae, te, cfg, defaults)


def tiny_pipeline(seed: int = 0) -> BiomedJourneyPipeline:
    """A tiny random pipeline (64 px) for tests and for developing the app without weights."""
    pipe = build_pipeline(tiny_model_config(), TinyTextEncoder(dim=32, max_length=16, seed=seed), seed=seed,
                          defaults=SamplerConfig(num_images=2, num_inference_steps=4))
    pipe.model_id = "tiny-random"
    pipe.info = {"note": "tiny randomly initialised model for tests; generates noise"}
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["BiomedJourneyPipeline", "GenerationOutput", "NoiseOptimization", "default_model_path", "dual_guidance", "assemble",
           "denoising_steps", "progress_callback", "read_defaults",
           "tiny_pipeline", "build_pipeline", "tiny_model_config", "SCHEDULERS"]
