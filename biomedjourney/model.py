"""The networks: a 1-channel CXR AutoencoderKL and a prior-conditioned UNet2DConditionModel.

The UNet's input is the noisy latent concatenated with the prior image's latent
(InstructPix2Pix §3.2: in_channels = 2 x latent_channels); text enters through
cross-attention. All classes are diffusers' own; this file only configures them.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, UNet2DConditionModel)

from .config import ModelConfig

# name -> (scheduler class, extra config); every one reads the same training schedule config
SCHEDULERS = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": (DDIMScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
}


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    v = cfg.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=v.image_channels, out_channels=v.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
        sample_size=cfg.resolution, mid_block_add_attention=v.mid_block_add_attention,
        scaling_factor=1.0,  # set from the data after autoencoder training (1 / std of latents)
    )


def build_unet(cfg: ModelConfig, latent_channels: int, text_dim: int) -> UNet2DConditionModel:
    u = cfg.unet
    heads = tuple(max(1, c // u.attention_head_dim) for c in u.block_out_channels)
    project = text_dim != u.cross_attention_dim
    return UNet2DConditionModel(
        sample_size=cfg.resolution // vae_downsample(cfg),
        in_channels=2 * latent_channels,       # [noisy latent ; prior latent]
        out_channels=latent_channels,
        down_block_types=u.down_block_types, up_block_types=u.up_block_types,
        block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
        cross_attention_dim=u.cross_attention_dim, attention_head_dim=heads,
        norm_num_groups=u.norm_num_groups,
        # learned projection of the text encoder's width to the cross-attention width
        encoder_hid_dim=text_dim if project else None,
        encoder_hid_dim_type="text_proj" if project else None,
    )


def vae_downsample(cfg: ModelConfig) -> int:
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def widen_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> UNet2DConditionModel:
    """Give a pretrained text-to-image UNet `extra_channels` more input channels (the prior latent).

    Old weights and bias are copied, new input channels start at zero, so the widened UNet
    gives exactly the original output while the extra input is zero (InstructPix2Pix §3.2).
    """
    old = unet.conv_in
    new = torch.nn.Conv2d(old.in_channels + extra_channels, old.out_channels, old.kernel_size,
                          old.stride, old.padding, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra_channels)
    return unet


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name, from a stored scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(dict(config), **extra)


def training_scheduler_config(cfg: ModelConfig) -> dict:
    """The noise schedule the UNet is trained with; every sampler is built from it."""
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def predicted_clean(alphas_cumprod: torch.Tensor, noisy: torch.Tensor, pred: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """The clean latent a UNet prediction implies at noise level alphas_cumprod (a scalar, or (B, 1, 1, 1) per row):
    x0 = sqrt(a) x_t - sqrt(1-a) v (v-prediction) or (x_t - sqrt(1-a) eps) / sqrt(a) (epsilon)."""
    a = alphas_cumprod
    if prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    return (noisy - (1 - a).sqrt() * pred) / a.sqrt()


def to_vae_input(x: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    """(B, 1, H, W) grey in [-1, 1] -> the autoencoder's channels (repeated for an RGB VAE such as SD's)."""
    c = vae.config.in_channels
    return x if c == x.shape[1] else x.repeat(1, c // x.shape[1], 1, 1)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
