"""Does the drawn and harmonised heart reach the cardiothoracic ratio its severity asks for? Read from the image.

For No-Finding validation priors (the follow evaluation's selection), at the shipped defaults, the CTR of the prior,
the drawing and the output, each read from the image's brightness by `anatomy.measure_cardiac` (the heart's
borders as continuous paths of the strongest brightness step near the heart's edge; the largest distances of the
two borders from the midline, Danzer 1919; the lungs' outer extent as the thorax). The prior is searched about
the estimated heart (`anatomy.estimate_heart`); the drawing and the output about that heart moved by the
drawing's own displacement (`masks.cardiac_displacement`), since a border moved by more than the search window
would not be found otherwise. So a drawing that moves the mask but not the film's edge still reads as the old
width only if the old edge is within the window: look at the pictures as well. `--search PX` instead searches all
three images within PX of the unmoved estimated heart (32: wide enough for the largest step; the same window for
any package, so it compares drawings fairly). Prints a table and the mean CTR change against `masks.CTR_STEP`.

    python scripts/measure_heart_width.py --priors 12 --seeds 1 [--text "New severe cardiomegaly."] [--search 32]
"""
import argparse

import numpy as np
import torch

from biomedjourney.anatomy import CARDIAC_SEARCH_PX, measure_cardiac
from biomedjourney.evaluate.follow import select_priors
from biomedjourney.findings import extract
from biomedjourney.masks import CTR_STEP, cardiac_displacement, severity_of
from biomedjourney.render import warp
from biomedjourney.service import generate_followups, load_pipeline


def ctr(img: np.ndarray, heart: np.ndarray, lungs: np.ndarray, search: float = CARDIAC_SEARCH_PX) -> float:
    m = measure_cardiac(img, heart, lungs, search)
    return m.ctr if m is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--priors", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--text", default="New severe cardiomegaly.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search", type=int, default=None, help="px about the UNMOVED estimated heart, all images")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    (f,) = [f for f in extract(a.text) if f.name == "cardiomegaly"]
    pipe, rows = load_pipeline(), []
    print("| prior | seed | CTR prior | drawing | output |\n|---|---|---|---|---|")
    for p in select_priors(a.priors):
        for seed in range(a.seeds):
            r = generate_followups(pipe, p.image, a.text, seed=seed, num_images=1)
            an = r.plan.anatomy
            heart, lungs = np.asarray(an.heart) > 0.5, np.asarray(an.lung("bilateral")) > 0.5
            dx = cardiac_displacement(an, severity_of(f), -1.0 if f.receding else 1.0)
            moved = warp(heart.astype(np.float32), dx=-dx) > 0.5                # where the drawing put the heart
            drawing = r.plan.renderings[0] if r.plan.renderings is not None else r.prior
            if a.search is not None:
                moved = heart
            px = a.search or CARDIAC_SEARCH_PX
            v = [ctr(x, m, lungs, px) for x, m in ((r.prior, heart), (drawing, moved), (r.images[0], moved))]
            rows.append(v)
            print(f"| {p.image_id} | {seed} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} |", flush=True)
    v = np.array(rows)
    d = v - v[:, :1]
    print(f"\nmean CTR {np.nanmean(v[:, 0]):.3f} -> drawing {np.nanmean(v[:, 1]):.3f}, output {np.nanmean(v[:, 2]):.3f}"
          f" (change {np.nanmean(d[:, 1]):+.3f} / {np.nanmean(d[:, 2]):+.3f}; CTR_STEP[{severity_of(f)}] "
          f"{CTR_STEP[severity_of(f)]:+.2f}); outputs >= 0.50: {int((v[:, 2] >= 0.5).sum())}/{len(v)} "
          f"(priors {int((v[:, 0] >= 0.5).sum())}); not measured: {int(np.isnan(v).sum())}")


if __name__ == "__main__":
    main()
