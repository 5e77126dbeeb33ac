"""Do the ribs stay where a drawing should leave them: across a pneumothorax, above a collapsed lower lobe, beside
a widened heart?

For No-Finding validation priors (the follow evaluation's selection), at the shipped defaults, the correlation of
the drawing's and the output's rib-scale structure (band-pass 1.5-6 px) with the prior's. Ribs are bone, the chest
wall: they stay visible across a pneumothorax (only the lung markings go) and stay in place when a lower lobe
collapses and the hemidiaphragm rises (only the dome and the lung near it move).
- pneumothorax ("New right/left pneumothorax."): inside the moderate rim's space, 2 px off the wall and the
  pleural line; also the thin lines (vessels: the residual of a 5-px running median, which keeps steps such as
  rib cortices), which should be gone;
- collapse ("New right lower lobe atelectasis."): in the lateral half of the right lung (outside the wedge), from
  the hilum down to 12 px above the raised dome;
- cardiomegaly ("New cardiomegaly."): in the lung that the widening warp moved, 8 px clear of the widest heart.

    python scripts/measure_ribs.py --priors 12 --seeds 2 [--only pneumothorax collapse cardiomegaly]
"""
import argparse

import numpy as np
import torch
from scipy import ndimage

from biomedjourney.anatomy import segment
from biomedjourney.evaluate.follow import select_priors
from biomedjourney.masks import (cardiac_displacement, diaphragm_lift, lowest_row, lung_frame,
                                 pneumothorax_distance, pneumothorax_width)
from biomedjourney.service import generate_followups, load_pipeline


def rib_scale(a: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(a, 1.5) - ndimage.gaussian_filter(a, 6)


def thin_lines(a: np.ndarray) -> np.ndarray:
    return a - ndimage.median_filter(a, 5)


def corr(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    a, b = a[m] - a[m].mean(), b[m] - b[m].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--priors", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=("pneumothorax", "collapse", "cardiomegaly"),
                    default=("pneumothorax", "collapse", "cardiomegaly"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline()
    rows: dict[str, list[float]] = {}
    for p in select_priors(a.priors):
        prior = p.image.astype(np.float32)
        anatomy = segment(prior, size=prior.shape[-1])
        for side in ("right", "left") if "pneumothorax" in a.only else ():
            d, fr = pneumothorax_distance(anatomy, side)
            if fr is None:
                continue
            space = ndimage.binary_erosion((d < pneumothorax_width(fr, "moderate")) & np.isfinite(d), iterations=2)
            for s in range(a.seeds):
                r = generate_followups(pipe, prior, f"New {side} pneumothorax.", seed=s, num_images=1)
                for what, img in (("drawing", r.plan.renderings[0]), ("output", r.images[0])):
                    rows.setdefault(f"pneumothorax: ribs, {what}", []).append(
                        corr(rib_scale(img), rib_scale(prior), space))
                    rows.setdefault(f"pneumothorax: thin lines, {what}", []).append(
                        corr(thin_lines(img), thin_lines(prior), space))
        for name, text, region in (("lower lobe collapse", "New right lower lobe atelectasis.",
                                    above_the_raised_dome(anatomy) if "collapse" in a.only else None),
                                   ("cardiomegaly", "New cardiomegaly.",
                                    beside_the_heart(anatomy) if "cardiomegaly" in a.only else None)):
            for s in range(a.seeds) if region is not None else ():
                r = generate_followups(pipe, prior, text, seed=s, num_images=1)
                for what, img in (("drawing", r.plan.renderings[0]), ("output", r.images[0])):
                    rows.setdefault(f"{name}: ribs, {what}", []).append(corr(rib_scale(img), rib_scale(prior), region))
    print("| correlation with the prior | mean ± s.e. | samples |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {np.mean(v):.3f} ± {np.std(v) / np.sqrt(len(v)):.3f} | {len(v)} |")


def above_the_raised_dome(anatomy) -> np.ndarray | None:
    """(H, W) bool: the right lung's lateral half from the hilum down to 12 px above the raised dome (or None)."""
    fr = lung_frame(anatomy, "right")
    if fr is None:
        return None
    h, w = fr.core.shape
    y = np.arange(h)[:, None]
    dome = lowest_row(fr.core)[None, :]                                    # (1, W) each column's lowest lung row
    lift = float(diaphragm_lift(anatomy, "right", "moderate").max())
    lateral = (np.abs(np.arange(w) - fr.lateral) < 0.5 * abs(fr.lateral - fr.medial))[None, :]
    region = fr.core & lateral & (y > fr.top + 0.5 * fr.height) & (y < dome - lift - 12)
    return region if region.sum() > 50 else None


def beside_the_heart(anatomy) -> np.ndarray | None:
    """(H, W) bool: lung that the moderate widening moves by more than 1 px, 8 px clear of the widest heart: the
    estimated one grown by the largest move, and (borders read on the film) the content between them where it
    lands."""
    dx = cardiac_displacement(anatomy, "moderate")
    heart = np.asarray(anatomy.heart) > 0.5
    cs = anatomy.cardiac
    if cs is not None:
        src = np.arange(heart.shape[1], dtype=np.float32)[None, :] - dx    # (H, W) where each pixel's content was
        heart = heart | ((src >= cs.low) & (src <= cs.high) & heart.any(1, keepdims=True))
    grown = ndimage.binary_dilation(heart, iterations=int(np.abs(dx).max()) + 9)
    lung = ndimage.binary_erosion(np.asarray(anatomy.lung("bilateral")) > 0.5, iterations=2)
    region = (np.abs(dx) > 1) & lung & ~grown
    return region if region.sum() > 50 else None


if __name__ == "__main__":
    main()
