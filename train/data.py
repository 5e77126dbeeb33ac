"""Loading prepared manifests into memory for training (images are small: 256x256 uint8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from biomedjourney.dataset import NO_LABELS, finding_counts, parse_labels
from biomedjourney.imaging import load_model_input, to_uint8

# train/config.py DiffusionTrain.sampling -> q of Kang et al. 2020 (arXiv:1910.09217, "sampling strategies"):
# a finding seen n times is drawn with probability proportional to n^q, so each of its rows weighs n^(q-1)
SAMPLING_Q = {"uniform": 1.0, "sqrt": 0.5, "balanced": 0.0}


def load_gray(path: str | Path, size: int) -> np.ndarray:
    """A training image as (size, size) uint8: ``imaging.load_model_input`` (the inference path:
    PNG of any bit depth, JPEG, DICOM; the dataset's framing), rounded to 8 bits (lossless: the
    model input is a multiple of 1/255)."""
    return to_uint8(load_model_input(path, size))


def stack_images(paths: list, size: int) -> torch.Tensor:
    """(N, 1, size, size) uint8 tensor."""
    return torch.from_numpy(np.stack([load_gray(p, size) for p in paths]))[:, None]


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the autoencoder's input range)."""
    return x.float() / 127.5 - 1.0


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) only, so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of this rank's batch at global `step` (each step consumes world*batch_size items)."""
    per_step = batch_size * world
    steps_per_epoch = max(1, n // per_step)
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    if n < per_step:  # tiny data: repeat the order
        order = order.repeat(per_step // n + 1)
    start = i * per_step + rank * batch_size
    return order[start:start + batch_size]


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A fresh generator per (seed, step, rank): noise, timesteps and dropout are exactly reproducible on resume.
    ``stream`` > 0: an independent generator of the same (seed, step, rank) for another use (1: batch draws)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + rank + (stream << 56))


def sampling_weights(labels: list[str], mode: str) -> torch.Tensor | None:
    """Per-row draw weights from each row's '|'-separated findings (stage 1: the image's labels, stage 2: the
    follow-up's), for ``draw_batch``. 'uniform': None (every row once per epoch: ``batch_indices``); 'sqrt':
    a finding seen n times weighs 1/sqrt(n) (square-root sampling: Mahajan et al. 2018, arXiv:1805.00932);
    'balanced': 1/n (class-balanced: Kang et al. 2020, arXiv:1910.09217), so every finding is drawn equally
    often. A row with several findings takes the weight of its rarest one; a row without labels counts as the
    finding NO_LABELS."""
    if mode not in SAMPLING_Q:
        raise ValueError(f"sampling {mode!r}: expected one of {sorted(SAMPLING_Q)}")
    if mode == "uniform":
        return None
    findings = [parse_labels(x) or [NO_LABELS] for x in labels]
    n = finding_counts(findings)
    return torch.tensor([min(n[f] for f in fs) ** (SAMPLING_Q[mode] - 1) for fs in findings], dtype=torch.float64)


def draw_batch(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's batch at global ``step``: ``batch_indices`` without weights; with ``sampling_weights``,
    ``batch_size`` draws with replacement in proportion to them from a generator of (seed, step, rank) alone,
    so a resumed run draws the same batches."""
    if weights is None:
        return batch_indices(n, batch_size, step, seed, rank, world)
    return torch.multinomial(weights, batch_size, replacement=True, generator=step_generator(seed, step, rank, 1))
