"""Inside a drawn pneumothorax space: do the ribs stay, and do the lung markings stay gone?

For No-Finding validation priors (the follow evaluation's selection), "New right/left pneumothorax." at the
shipped defaults, inside the moderate rim's space (2 px off the wall and the pleural line): the correlation of
the drawing's and the output's rib-scale structure (band-pass 1.5-6 px) with the prior's, and of their thin
lines (vessels: the residual of a 5-px running median, which keeps steps such as rib cortices) with the
prior's. Ribs are bone and stay visible across a pneumothorax; only the lung markings go.

    python scripts/measure_pneumothorax_ribs.py --priors 12 --seeds 2
"""
import argparse

import numpy as np
import torch
from scipy import ndimage

from biomedjourney.anatomy import segment
from biomedjourney.evaluate.follow import select_priors
from biomedjourney.masks import pneumothorax_distance, pneumothorax_width
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline()
    rows: dict[str, list[float]] = {}
    for side in ("right", "left"):
        for p in select_priors(a.priors):
            prior = p.image.astype(np.float32)
            d, fr = pneumothorax_distance(segment(prior, size=prior.shape[-1]), side)
            if fr is None:
                continue
            space = ndimage.binary_erosion((d < pneumothorax_width(fr, "moderate")) & np.isfinite(d), iterations=2)
            for s in range(a.seeds):
                r = generate_followups(pipe, prior, f"New {side} pneumothorax.", seed=s, num_images=1)
                for what, img in (("drawing", r.plan.renderings[0]), ("output", r.images[0])):
                    rows.setdefault(f"ribs, {what}", []).append(corr(rib_scale(img), rib_scale(prior), space))
                    rows.setdefault(f"vessels, {what}", []).append(corr(thin_lines(img), thin_lines(prior), space))
    print("| correlation with the prior inside the space | mean ± s.e. | samples |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {np.mean(v):.3f} ± {np.std(v) / np.sqrt(len(v)):.3f} | {len(v)} |")


if __name__ == "__main__":
    main()
