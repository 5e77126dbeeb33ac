"""The guidance model: a noise-aware classifier of findings and a patient-identity embedding on the latents.

Trained here (``python train/train_guidance.py``) on the generator's own training split and licence filter, for
guiding the generator, and deliberately NOT the evaluation battery's evaluators (``biomedjourney.evaluate``): another
architecture (diffusers ResNet blocks on 16-channel latents with a timestep embedding, vs a pixel-space CNN at
128 px), another seed and data order, noisy inputs. Optimising against the classifier that scores you would make
the scores meaningless.

Heads (one shared trunk):
    logits     multi-label findings over ``labels`` (lexicon names of ``biomedjourney.findings``)
    embedding  L2-normalised patient-identity vector (supervised contrastive over same-patient groups)

Uses: initial-noise optimisation (``pipeline.NoiseOptimization``; Nie et al. 2025, arXiv:2504.14450, long-tail
lever) and the identity / pathology consistency losses of stage-2 training (``train/train.py``).
Noise-aware classifier: Dhariwal & Nichol 2021, arXiv:2105.05233 §4 (a classifier on x_t, conditioned on t).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput

# guidance label (a finding name of biomedjourney.findings) -> the dataset labels that make it positive
LABEL_SOURCES: dict[str, tuple[str, ...]] = {
    "no finding": ("No Finding",),
    "pneumonia": ("Pneumonia",),
    "opacity": ("Infiltration", "Consolidation", "Pneumonia"),
    "atelectasis": ("Atelectasis",),
    "pulmonary edema": ("Edema",),
    "pleural effusion": ("Effusion",),
    "consolidation": ("Consolidation",),
    "cardiomegaly": ("Cardiomegaly",),
    "pneumothorax": ("Pneumothorax",),
}
GUIDANCE_LABELS = tuple(LABEL_SOURCES)


@dataclass
class GuidanceOutput(BaseOutput):
    logits: torch.Tensor      # (B, L) findings, config.labels order
    embedding: torch.Tensor   # (B, E) unit vectors


class GuidanceModel(ModelMixin, ConfigMixin):
    """(latents (B, C, h, w), timesteps (B,)) -> GuidanceOutput. Saved with ``save_pretrained`` (safetensors)."""

    @register_to_config
    def __init__(self, latent_channels: int = 16, block_out_channels: tuple = (48, 96, 160), embed_dim: int = 64,
                 labels: tuple = GUIDANCE_LABELS, norm_num_groups: int = 8, time_channels: int = 64):
        super().__init__()
        c = list(block_out_channels)
        t_dim = 4 * time_channels
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, t_dim)
        self.conv_in = nn.Conv2d(latent_channels, c[0], 3, padding=1)
        blocks = []
        for a, b in zip([c[0]] + c[:-1], c):  # one ResNet block per width, each halving the latent grid
            blocks.append(ResnetBlock2D(in_channels=a, out_channels=b, temb_channels=t_dim, groups=norm_num_groups,
                                        down=True))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, c[-1])
        self.classifier = nn.Linear(c[-1], len(labels))
        self.embed = nn.Sequential(nn.Linear(c[-1], c[-1]), nn.SiLU(), nn.Linear(c[-1], embed_dim))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.config.labels)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int = 0) -> GuidanceOutput:
        t = torch.as_tensor(timesteps, device=latents.device).expand(len(latents))
        temb = self.time_embedding(self.time_proj(t).to(latents.dtype))                  # (B, 4T)
        h = self.conv_in(latents)                                                          # (B, c0, h, w)
        for block in self.blocks:
            h = block(h, temb)                                                             # ... (B, cN, h/2^N, w/2^N)
        h = F.silu(self.norm_out(h)).mean((2, 3))                                          # (B, cN)
        return GuidanceOutput(logits=self.classifier(h), embedding=F.normalize(self.embed(h), dim=1))

    def targets(self, wanted: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """{label: probability} -> (targets (L,), known (L,) bool) in this model's label order; unknown names are
        ignored (the caller says which findings the model can guide)."""
        y = torch.zeros(len(self.labels))
        known = torch.zeros(len(self.labels), dtype=torch.bool)
        for i, name in enumerate(self.labels):
            if name in wanted:
                y[i], known[i] = float(wanted[name]), True
        return y, known


def dataset_targets(labels: list[str], reported: set[str] | None, names: tuple[str, ...] = GUIDANCE_LABELS
                    ) -> tuple[list[float], list[bool]]:
    """An image's dataset labels -> (targets, known) per guidance label. ``reported``: the labels its source ever
    reports (None: all), so a source that never reports a finding leaves it unknown, not negative."""
    have = set(labels)
    y, known = [], []
    for name in names:
        src = set(LABEL_SOURCES.get(name, ()))
        y.append(float(bool(have & src)))
        known.append(reported is None or bool(reported & src))
    return y, known


def identity_loss(embedding: torch.Tensor, prior_embedding: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cosine similarity of images' identity embeddings (GuidanceOutput.embedding, (B, E) or (1, E)) and
    their priors': zero for identical images, growing as the patient drifts."""
    return 1 - (embedding * prior_embedding).sum(1)


def finding_loss(logits: torch.Tensor, y: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(B,) masked binary cross-entropy of the classifier's logits (B, L) against targets y (B, L) / (L,)."""
    y, known = y.to(logits).expand_as(logits), known.to(logits.device).expand_as(logits).float()
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (bce * known).sum(1) / known.sum(1).clamp_min(1)


def luminance_probe(latent: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """(C + 1,) a linear map from a latent pixel (C,) to the mean brightness of its image block, fitted by least
    squares on one (latent (1, C, h, w), image (H, W) in [0, 1]) pair, e.g. the prior's: brightness in latent space
    without decoding (measured on the shipped autoencoder: fitted on one prior, R^2 0.90-0.94 on five others,
    correlation 0.97 of the brightness difference of two films)."""
    h, w = latent.shape[-2:]
    y = F.adaptive_avg_pool2d(image.float().reshape(1, 1, *image.shape[-2:]), (h, w)).reshape(-1, 1)   # (hw, 1)
    x = latent[:1].float().permute(0, 2, 3, 1).reshape(h * w, -1)                                       # (hw, C)
    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)                                                     # (hw, C+1)
    return torch.linalg.lstsq(x, y).solution[:, 0]


def luminance(latent: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """(B, h, w) the block brightness luminance_probe reads from latents (B, C, h, w); differentiable."""
    return torch.einsum("bchw,c->bhw", latent.float(), probe[:-1]) + probe[-1]


def density_loss(result: torch.Tensor, reference: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(B,) mean over the cells with a direction (B, h, w: +1 the finding is denser there, -1 more lucent, 0 none)
    of how far the result's brightness (B, h, w) moved against that direction from the reference's: zero while
    the result is at least as dense (or lucent) as the reference where the finding says so."""
    w = direction.abs()
    wrong = F.relu(direction * (reference - result))
    return (wrong * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1)


__all__ = ["GuidanceModel", "GuidanceOutput", "GUIDANCE_LABELS", "LABEL_SOURCES", "dataset_targets",
           "identity_loss", "finding_loss", "luminance_probe", "luminance", "density_loss"]
