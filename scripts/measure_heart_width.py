"""Does the harmonised output keep the heart the cardiomegaly drawing widened? Measured on the image, not the mask.

For No-Finding validation priors (the follow evaluation's selection), at the shipped defaults, the cardiac width
(px) of the prior, the drawing and the output, read from each image's brightness: per row, each heart border is
the steepest brightness step within 16 px of the estimated heart's edge (rising into the heart on the image's
left, falling out of it on the right; gradient of a 2-px Gaussian low-pass); rows from 40 % of the estimated
heart's height down to 10 px above the lungs' floor; the width is the 90th percentile over rows (the maximal
transverse cardiac diameter of the cardiothoracic ratio, Danzer 1919). The thorax width is the lungs' outer
extent, so width / thorax is a CTR estimate. The estimated heart comes from the lung masks (anatomy.estimate_heart),
so a prior whose real border lies more than 16 px from the estimate is measured wrongly: read the per-prior rows.

    python scripts/measure_heart_width.py --priors 12 --seeds 1 [--text "New severe cardiomegaly."]
"""
import argparse

import numpy as np
import torch
from scipy import ndimage

from biomedjourney.evaluate.follow import select_priors
from biomedjourney.masks import lowest_row
from biomedjourney.service import generate_followups, load_pipeline

SEARCH_PX = 16     # how far from the estimated heart's edge a border is looked for
FLOOR_PX = 10      # rows this close to the lungs' floor are left out (the domes)


def cardiac_width(img: np.ndarray, heart: np.ndarray, lungs: np.ndarray) -> float:
    """(H, W) image, heart and lung masks (bool) -> the maximal transverse cardiac diameter in px (NaN if none)."""
    gx = ndimage.sobel(ndimage.gaussian_filter(img.astype(np.float32), 2), axis=1)   # (H, W) d/dx brightness
    rows = np.nonzero(heart.any(1))[0]
    if not len(rows) or not lungs.any():
        return float("nan")
    floor = int(lowest_row(lungs).max())
    lo, hi = int(rows[0] + 0.4 * (rows[-1] - rows[0])), min(int(rows[-1]), floor - FLOOR_PX)
    w, widths = img.shape[1], []
    for y in range(lo, hi + 1):
        c = np.nonzero(heart[y])[0]
        if len(c) < 10:
            continue
        left = np.arange(max(c[0] - SEARCH_PX, 0), min(c[0] + SEARCH_PX, w))
        right = np.arange(max(c[-1] - SEARCH_PX, 0), min(c[-1] + SEARCH_PX, w))
        widths.append(right[np.argmin(gx[y, right])] - left[np.argmax(gx[y, left])])
    return float(np.percentile(widths, 90)) if widths else float("nan")


def thorax_width(lungs: np.ndarray) -> float:
    cols = np.nonzero(lungs.any(0))[0]
    return float(cols[-1] - cols[0] + 1) if len(cols) else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--priors", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--text", default="New severe cardiomegaly.")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe, rows = load_pipeline(), []
    print("| prior | seed | prior px | drawing px | output px | CTR prior -> output |\n|---|---|---|---|---|---|")
    for p in select_priors(a.priors):
        for seed in range(a.seeds):
            r = generate_followups(pipe, p.image, a.text, seed=seed, num_images=1)
            heart = np.asarray(r.plan.anatomy.heart) > 0.5
            lungs = np.asarray(r.plan.anatomy.lung("bilateral")) > 0.5
            drawing = r.plan.renderings[0] if r.plan.renderings is not None else r.prior
            w = [cardiac_width(x, heart, lungs) for x in (r.prior, drawing, r.images[0])]
            t = thorax_width(lungs)
            rows.append(w)
            print(f"| {p.image_id} | {seed} | {w[0]:.0f} | {w[1]:.0f} | {w[2]:.0f} "
                  f"| {w[0] / t:.2f} -> {w[2] / t:.2f} |", flush=True)
    d = np.array(rows) - np.array(rows)[:, :1]
    print(f"\nwidth change (px, mean over {len(d)} samples): drawing {d[:, 1].mean():+.1f}, "
          f"output {d[:, 2].mean():+.1f}; "
          f"outputs no wider than the prior: {int((d[:, 2] <= 0).sum())}/{len(d)}")


if __name__ == "__main__":
    main()
