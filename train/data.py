"""Loading prepared manifests into memory for training (images are small: 256x256 uint8)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from biomedjourney.imaging import load_model_input, to_uint8


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


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A fresh generator per (seed, step, rank): noise, timesteps and dropout are exactly reproducible on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 131 + rank)
