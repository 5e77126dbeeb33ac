"""Configs as dataclasses with commented defaults (nanoGPT style).

`ModelConfig` describes the networks (stored as `biomedjourney.json` next to the
weights); `SamplerConfig` holds the generation defaults that ship with a model.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_text


@dataclass
class VAEConfig:
    image_channels: int = 1                     # grayscale CXR in and out
    latent_channels: int = 16                   # 8x down, 16 ch: see train/README for the channel sweep
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  # len-1 downsamples: 4 blocks -> 8x
    layers_per_block: int = 1
    norm_num_groups: int = 16
    mid_block_add_attention: bool = False       # fully convolutional: trains on crops, runs at any size


@dataclass
class UNetConfig:
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    cross_attention_dim: int = 256             # text tokens are projected to this width inside the UNet
    attention_head_dim: int = 32               # channels per head
    norm_num_groups: int = 32


@dataclass
class ModelConfig:
    resolution: int = 256                       # model input/output size in pixels (square)
    aspect: str = "crop"                        # how non-square priors are fitted: 'crop' (as the dataset) or 'pad'
    text_encoder: str = "minilm"                # 'minilm' (offline default) | 'biomedclip' (hub) | 'tiny' (tests)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    prediction_type: str = "epsilon"            # what the UNet predicts (diffusers scheduler convention)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"        # Stable Diffusion's schedule
    beta_start: float = 0.00085
    beta_end: float = 0.012

    @classmethod
    def from_dict(cls, d: dict | str, where: str = "model") -> "ModelConfig":
        """A config from its dict, or from a preset's name (MODEL_PRESETS: 'tiny')."""
        if isinstance(d, str):
            if d not in MODEL_PRESETS:
                raise ValueError(f"{where}: unknown model preset {d!r}; presets: {sorted(MODEL_PRESETS)}")
            d = MODEL_PRESETS[d]
        d = dict(d)
        vae = build(VAEConfig, _tuples(d.pop("vae", {})), f"{where}.vae")
        unet = build(UNetConfig, _tuples(d.pop("unet", {})), f"{where}.unet")
        return build(cls, {**d, "vae": vae, "unet": unet}, where)


# Named architectures a config may give instead of a `model:` block. 'tiny': the tests' model (64 px, 4 latent
# channels), the same code paths in seconds on a CPU (train/configs/tiny.yaml and pipeline.tiny_pipeline use it).
MODEL_PRESETS = {
    "tiny": {"resolution": 64, "text_encoder": "tiny",
             "vae": {"latent_channels": 4, "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4},
             "unet": {"block_out_channels": [16, 32], "layers_per_block": 1,
                      "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                      "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 16,
                      "attention_head_dim": 8, "norm_num_groups": 8}},
}

NO_CHANGE = "No significant interval change."  # the description of a follow-up that did not change

# The samplers a model can use, by short name (model.SCHEDULERS builds each; the CLI offers these).
# Kept here, not read from model.SCHEDULERS, so that naming them does not import diffusers.
SCHEDULER_NAMES = ("dpmsolver++", "ddim", "euler_a")


@dataclass
class SamplerConfig:
    num_images: int = 4                         # follow-ups per request
    num_inference_steps: int = 20               # denoising steps; fewer = faster, coarser
    guidance_scale: float = 4.0                 # text guidance: >1 follows the description more strongly
    image_guidance_scale: float = 1.5           # image guidance: >1 stays closer to the prior
    scheduler: str = "dpmsolver++"              # one of SCHEDULER_NAMES
    strength: float = 1.0                       # 1: start from pure noise (InstructPix2Pix); <1: from the noised
                                                #   prior latent (SDEdit, Meng et al. 2022): stays closer to the prior
    negative_prompt: str = ""                   # text guidance pushes from this towards the description; the
                                                #   no-change text makes it draw what the description adds
    change_transfer: bool = False               # True: prior + (sample(text) - sample(NO_CHANGE)), same noise: only
                                                #   the change is generated; the prior's detail is kept exactly
    seed: int = 0
    # --- used by the service (biomedjourney.service), not by the pipeline itself
    region: str = "auto"                        # 'auto': only the described finding's region may change (edit mask
                                                #   from findings x the prior's lungs; both lungs for a finding with no
                                                #   place); 'off': the whole film
    render: bool = False                        # draw the findings the weights cannot draw from radiological knowledge
                                                #   first, then let the model harmonise them (SDEdit)
    render_strength: float = 0.4                # the strength used to harmonise such a drawing: low keeps its shape
    noise_opt_steps: int = 0                    # >0: initial-noise optimisation steps towards the described findings
                                                #   (the model's guidance model; pipeline.NoiseOptimization); 0: off

    @classmethod
    def from_dict(cls, d: dict, where: str = "sampler") -> "SamplerConfig":
        return build(cls, d, where)

    def with_overrides(self, items: list[str]) -> "SamplerConfig":
        """A copy with KEY=VALUE strings applied (command lines: --sampler strength=0.6)."""
        out = dataclasses.replace(self)
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not hasattr(self, key):
                valid = ", ".join(f.name for f in dataclasses.fields(self))
                raise ValueError(f"Bad sampler setting {item!r}: use KEY=VALUE with KEY one of {valid}")
            old = getattr(self, key)
            if isinstance(old, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{key} must be true or false, got {value!r}")
                value = value.lower() in ("true", "1")
            setattr(out, key, type(old)(value))
        return out


def build(cls, d: dict, where: str = ""):
    """The one strict config loader: a dataclass from a dict; an unknown key is an error naming it and where."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} key(s) {unknown}{f' in {where}' if where else ''}; "
                         f"valid: {sorted(known)}")
    return cls(**d)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def write_json(obj: dict, path: str | Path) -> None:
    """Atomic JSON write (``atomic.write_text``) so an interrupted save never leaves half a file."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
