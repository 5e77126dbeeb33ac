"""Image similarity metrics in torch (used for autoencoder validation, training losses and evaluation).

SSIM follows Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), as
skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
"""
from __future__ import annotations



import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None, dtype=None) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """SSIM of (B, C, H, W) images in [0, data_range]; per-image values when reduce=False."""
    c = x.shape[1]
    w = _gaussian_window(device=x.device, dtype=x.dtype).expand(c, 1, -1, -1)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, w, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    per_image = s.flatten(1).mean(1)  # (B,)
    return per_image.mean() if reduce else per_image


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """PSNR in dB of (B, ...) images; per-image values when reduce=False (averaged in dB)."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)  # (B,)
    per_image = 10 * torch.log10(data_range ** 2 / mse)
    return per_image.mean() if reduce else per_image


def to_batch(img) -> torch.Tensor:
    """(H, W) / (C, H, W) / (B, C, H, W) array or tensor -> float (B, C, H, W) tensor."""
    t = torch.as_tensor(img, dtype=torch.float32)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def image_ssim(a, b) -> float:
    """SSIM of two single images ((H, W) arrays or tensors in [0, 1])."""
    return float(ssim(to_batch(a), to_batch(b)))


def image_psnr(a, b) -> float:
    return float(psnr(to_batch(a), to_batch(b)))


__all__ = ["ssim", "psnr", "image_ssim", "image_psnr", "to_batch"]
