"""Training presets: one YAML per preset in train/configs/ filling these dataclasses.

`tiny` (tests), `demo-cpu` (2-core CPU, about an hour end to end), `demo-gpu`
(one H100, under 25 minutes), `full` (SD 1.5 UNet widened + SD VAE + BiomedCLIP,
MIMIC-CXR, many GPUs through `accelerate launch`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from biomedjourney.config import ModelConfig, SamplerConfig, build

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class AutoencoderTrain:
    steps: int = 3000                  # optimizer steps
    batch_size: int = 16
    crop: int = 128                    # random crops: the autoencoder is fully convolutional
    lr: float = 3e-4
    kl_weight: float = 1e-6            # small KL keeps the latent near N(0, I) without blurring (LDM §3)
    ssim_weight: float = 0.2           # (1 - SSIM) added to L1 for structure
    val_every: int = 500
    checkpoint_every: int = 500
    mixed_precision: str = "no"        # 'no' | 'bf16' (CPU autocast too) | 'fp16' (accelerate)
    max_minutes: float = 0.0           # >0: stop (and export) after this wall time
    pretrained: str = ""               # optional: a diffusers AutoencoderKL folder/hub id to start from (full: SD VAE)
    latent_noise: float = 0.0          # >0: decode latents + U(0, latent_noise) x latent std x N(0, I) so the decoder
                                       #   tolerates a sampler's latent errors (conditioning augmentation: CDM §4.1)


@dataclass
class DiffusionTrain:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    ema_decay: float = 0.999           # EMA of UNet weights (exported)
    ema_warmup: bool = True            # decay ramps up early: min(decay, (1+n)/(10+n))
    drop_text: float = 0.05            # conditioning dropout: InstructPix2Pix §3.2.1 (5% text,
    drop_image: float = 0.05           #   5% image, 5% both)
    drop_both: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"        # 'no' | 'bf16' | 'fp16' (accelerate)
    gradient_checkpointing: bool = False
    val_every: int = 500               # validation grid (prior | generated | real) PNG
    val_pairs: int = 4
    val_steps: int = 20                # sampler steps for validation grids
    checkpoint_every: int = 250
    log_every: int = 10
    max_minutes: float = 0.0           # >0: stop (checkpoint + export) after this wall time
    init_unet: str = ""                # stage 2: the stage-1 export; full: SD 1.5 UNet (widened)
    min_reg_score: float | None = None  # None: trust prepare_data's `kept`
    identity_prob: float = 0.0         # stage 2: share of rows turned into (prior, "No significant interval
                                       #   change.", prior): identity mapping (CycleGAN §5.2) as data
    sampling: str = "uniform"          # 'uniform' (each row once per epoch) | 'sqrt' | 'balanced': rows drawn with
                                       #   per-finding inverse square-root / inverse frequency weights (the image's,
                                       #   stage 2: the follow-up's rarest finding; Kang et al. 2020 arXiv:1910.09217,
                                       #   Mahajan et al. 2018 arXiv:1805.00932); train/data.py sampling_weights
    text: str = "raw"                  # 'raw': the manifest's descriptions | 'canonical': each read into findings and
                                       #   rendered back (biomedjourney.findings), the form the app's composer writes
    guidance_model: str = ""           # stage 2: a guidance model folder (train/train_guidance.py) for the two
                                       #   consistency losses below (identity-pathology separation, causal-
                                       #   disentanglement, Nie et al. 2025, arXiv:2504.14450); frozen
    identity_weight: float = 0.0       # x (1 - cos) of identity(predicted clean follow-up) vs identity(prior)
    pathology_weight: float = 0.0      # x BCE of the guidance classifier on the predicted clean follow-up vs its labels
    consistency_max_t: int = 400       # both losses only on rows noised below this timestep (a sharp clean estimate)


@dataclass
class RunConfig:
    name: str = "demo-cpu"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    autoencoder: AutoencoderTrain = field(default_factory=AutoencoderTrain)
    stage1: DiffusionTrain = field(default_factory=DiffusionTrain)
    stage2: DiffusionTrain = field(default_factory=DiffusionTrain)




def load_config(name_or_path: str) -> RunConfig:
    """A preset name ('tiny', 'demo-cpu', 'demo-gpu', 'full') or a YAML path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"No config {name_or_path!r}; presets: {presets} or a YAML path")
    d = yaml.safe_load(p.read_text()) or {}
    build(RunConfig, {k: None for k in d}, str(p))  # unknown top-level keys
    return RunConfig(
        name=d.get("name", p.stem), seed=d.get("seed", 0),
        model=ModelConfig.from_dict(d.get("model", {}), f"{p}: model"),
        sampler=SamplerConfig.from_dict(d.get("sampler", {}), f"{p}: sampler"),
        autoencoder=build(AutoencoderTrain, d.get("autoencoder", {}), f"{p}: autoencoder"),
        stage1=build(DiffusionTrain, d.get("stage1", {}), f"{p}: stage1"),
        stage2=build(DiffusionTrain, d.get("stage2", {}), f"{p}: stage2"),
    )


def config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
