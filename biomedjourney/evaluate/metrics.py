"""Scores of the evaluation battery: AUCs, correlation, re-identification, CMIG, image similarity.

AUC = sklearn ``roc_auc_score``; correlation = scipy ``pearsonr``; SSIM/PSNR come from
``biomedjourney.metrics`` (PSNR of identical images is capped there at 120 dB by its MSE floor
of 1e-12). Undefined scores (one class only, fewer than 3 points, constant input) are NaN.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics import psnr as _psnr
from ..metrics import ssim as _ssim

PSNR_CAP_DB = 120.0  # = 10 log10(1 / 1e-12): biomedjourney.metrics.psnr's MSE floor


def roc_auc(y_true, scores) -> float:
    """ROC AUC of binary labels vs scores; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def macro_auc(y_true: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None,
              names: list[str] | tuple[str, ...] | None = None, min_per_class: int = 1) -> tuple[float, dict]:
    """Macro AUC over labels (columns) whose known entries hold both classes.

    y_true, scores, known: (N, L). Returns (macro mean or NaN, {name: auc or NaN}); a label
    counts only with >= min_per_class known positives and negatives.
    """
    y, s = np.asarray(y_true), np.asarray(scores)
    k = np.ones_like(y, bool) if known is None else np.asarray(known, bool)
    names = list(names) if names is not None else [str(i) for i in range(y.shape[1])]
    per = {}
    for j, name in enumerate(names):
        yj = y[k[:, j], j].astype(int)
        pos = int(yj.sum())
        ok = pos >= min_per_class and (len(yj) - pos) >= min_per_class
        per[name] = roc_auc(yj, s[k[:, j], j]) if ok else float("nan")
    vals = [v for v in per.values() if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else float("nan")), per


def pearson_r(x, y) -> float:
    """Pearson r (scipy); NaN with fewer than 3 finite pairs or a constant input."""
    from scipy.stats import pearsonr

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(pearsonr(x, y).statistic)


def cmig(path_auc: float, sex_auc: float, age_r: float) -> float:
    """CMIG-style combined score: sqrt(PathAUC * sqrt(SexAUC * max(AgeCorr, 0))).

    BiomedJourney (Gu et al. 2023) combines pathology AUC (the counterfactual shows the described
    findings) with race AUC and age correlation (it is still the same patient); this is that
    combination as reported in secondary sources, with SEX AUC in place of race AUC (the shared
    dataset has no race). A negative age correlation is clamped to 0 so the root is defined.
    """
    vals = (path_auc, sex_auc, age_r)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return float("nan")
    return math.sqrt(max(path_auc, 0.0) * math.sqrt(max(sex_auc, 0.0) * max(age_r, 0.0)))


def reid_auc(generated: np.ndarray, priors: np.ndarray, patient_ids, prior_keys=None) -> float:
    """Re-identification AUC: is a generated image closer to its own prior than to other patients'?

    generated, priors: (N, D) unit embeddings, row i = pair i. Positives: cos(gen_i, prior_i).
    Negatives: cos(gen_i, prior_j) for every j of ANOTHER patient (patient_ids differ); with
    ``prior_keys`` each distinct prior image counts once among the negatives.
    """
    g, p = np.asarray(generated, np.float64), np.asarray(priors, np.float64)
    pid = np.asarray(patient_ids)
    keep = np.ones(len(p), bool)
    if prior_keys is not None:
        _, first = np.unique(np.asarray(prior_keys), return_index=True)
        keep[:] = False
        keep[first] = True
    sim = g @ p.T                                                   # (N, N)
    pos = np.diag(sim)
    other = (pid[:, None] != pid[None, :]) & keep[None, :]         # (N, N)
    neg = sim[other]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return roc_auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])


def verification_auc(embeddings: np.ndarray, patient_ids) -> float:
    """Same-patient vs different-patient AUC over all unordered image pairs (evaluator ceiling)."""
    e = np.asarray(embeddings, np.float64)
    pid = np.asarray(patient_ids)
    iu = np.triu_indices(len(e), 1)
    sim = (e @ e.T)[iu]
    same = (pid[:, None] == pid[None, :])[iu]
    return roc_auc(same, sim)


def change_magnitude(generated, prior) -> np.ndarray:
    """Mean |generated - prior| per image: (N, H, W) x 2 -> (N,)."""
    g, p = np.asarray(generated, np.float32), np.asarray(prior, np.float32)
    return np.abs(g - p).reshape(len(g), -1).mean(1)


def ssim_psnr(images, references) -> tuple[np.ndarray, np.ndarray]:
    """Per-image SSIM and PSNR (dB, capped at PSNR_CAP_DB) of (N, H, W) images vs references."""
    x = torch.as_tensor(np.asarray(images, np.float32))[:, None]      # (N, 1, H, W)
    y = torch.as_tensor(np.asarray(references, np.float32))[:, None]  # (N, 1, H, W)
    s = _ssim(x, y, reduce=False).numpy()
    p = np.minimum(_psnr(x, y, reduce=False).numpy(), PSNR_CAP_DB)
    return s, p


def mean_std(values) -> dict:
    """{'mean', 'std', 'n'} over the finite values (std: sample std, ddof=1; 0 for one value)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


__all__ = ["roc_auc", "macro_auc", "pearson_r", "cmig", "reid_auc", "verification_auc",
           "change_magnitude", "ssim_psnr", "mean_std", "PSNR_CAP_DB"]
