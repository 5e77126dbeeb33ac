"""Model-card validation of a model on a split: does it keep the prior when told nothing changed,
and does it change the chest (not the corners) when told something did?

    python -m biomedjourney.evaluate.fidelity --model assets/biomedjourney-cxr --out assets/ --limit 40

Writes fidelity.json and validation_grid.png (prior | 3 samples | real follow-up, 8 pairs).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import to_dict
from ..dataset import data_root
from ..metrics import image_ssim
from ..pipeline import BiomedJourneyPipeline
from ..progression import NO_CHANGE
from .run import load_row, select_pairs

# Lung fields and heart of a centred frontal CXR, as fractions of width/height (x0, y0, x1, y1).
# Chosen on the dataset's 256x256 centre crops: the thorax spans ~8-92% of the width and ~8-90% of
# the height; the box covers 70% of the image, so 0.70 is the chance level of "change inside".
LUNG_BOX = (0.08, 0.08, 0.92, 0.90)


def box_mask(shape: tuple[int, int], box=LUNG_BOX) -> np.ndarray:
    h, w = shape
    m = np.zeros(shape, bool)
    m[int(box[1] * h):int(box[3] * h), int(box[0] * w):int(box[2] * w)] = True
    return m


def inside_fraction(diff: np.ndarray, box=LUNG_BOX) -> float:
    """Share of the absolute change that falls inside the box."""
    a = np.abs(diff)
    return float(a[box_mask(a.shape, box)].sum() / max(a.sum(), 1e-12))


def fidelity(pipe: BiomedJourneyPipeline, data=None, split: str = "val", limit: int = 40, seed: int = 0,
             grid_path: Path | None = None, grid_pairs: int = 8) -> dict:
    res = pipe.resolution
    load = lambda row: load_row(row, res)  # noqa: E731
    pairs = select_pairs(data, split, limit=limit)
    change_pairs = [p for p in pairs if p.progression_text.strip() != NO_CHANGE]
    t0 = time.time()
    same, real_ssim, nochange_mag, change_mag, inside, real_inside = [], [], [], [], [], []
    for p in tqdm(pairs, desc="fidelity"):
        prior, follow = load(p.prior), load(p.followup)
        g0 = pipe(prior, NO_CHANGE, num_images=1, seed=seed).images[0]
        same.append(image_ssim(g0, prior))
        real_ssim.append(image_ssim(follow, prior))
        nochange_mag.append(float(np.abs(g0 - prior).mean()))
        real_inside.append(inside_fraction(follow - prior))
        if p in change_pairs:
            g1 = pipe(prior, p.progression_text, num_images=1, seed=seed).images[0]
            change_mag.append(float(np.abs(g1 - prior).mean()))
            inside.append(inside_fraction(g1 - prior))
    out = {
        "split": split, "pairs": len(pairs), "change_pairs": len(change_pairs), "seed": seed,
        "settings": to_dict(pipe.defaults),  # every generation above used the model's defaults
        "no_change_ssim_generated_vs_prior": _ms(same),
        "real_followup_ssim_vs_prior": _ms(real_ssim),
        "no_change_mean_abs_change": _ms(nochange_mag),
        "change_mean_abs_change": _ms(change_mag),
        "change_inside_lung_box_fraction": _ms(inside),
        "real_change_inside_lung_box_fraction": _ms(real_inside),
        "lung_box": LUNG_BOX, "lung_box_area_fraction": float(box_mask((256, 256)).mean()),
        "seconds": round(time.time() - t0, 1),
    }
    if grid_path is not None:
        validation_grid(pipe, change_pairs[:grid_pairs] or pairs[:grid_pairs], load, seed, grid_path)
    return out


def tune(pipe: BiomedJourneyPipeline, data=None, split: str = "val", limit: int = 12, seed: int = 0,
         image_scales=(1.5, 3.0), strengths=(1.0, 0.8, 0.6), text_scales=(3.0,)) -> list[dict]:
    """Grid over sampler settings on a split: no-change SSIM to the prior, change magnitude, SSIM to the real
    follow-up. Pick defaults that keep the patient (no-change SSIM) yet follow the text (change gap)."""
    res = pipe.resolution
    pairs = [p for p in select_pairs(data, split, limit=None) if p.progression_text.strip() != NO_CHANGE][:limit]
    imgs = [(load_row(p.prior, res), load_row(p.followup, res), p.progression_text) for p in pairs]
    rows = []
    for gi in image_scales:
        for st in strengths:
            for gt in text_scales:
                kw = dict(num_images=1, seed=seed, image_guidance_scale=gi, strength=st, guidance_scale=gt)
                same, mag0, mag1, real = [], [], [], []
                for prior, follow, text in tqdm(imgs, desc=f"img {gi} strength {st} text {gt}", leave=False):
                    g0 = pipe(prior, NO_CHANGE, **kw).images[0]
                    g1 = pipe(prior, text, **kw).images[0]
                    same.append(image_ssim(g0, prior))
                    mag0.append(float(np.abs(g0 - prior).mean()))
                    mag1.append(float(np.abs(g1 - prior).mean()))
                    real.append(image_ssim(g1, follow))
                rows.append({"image_guidance_scale": gi, "strength": st, "guidance_scale": gt,
                             "no_change_ssim": float(np.mean(same)), "no_change_abs": float(np.mean(mag0)),
                             "change_abs": float(np.mean(mag1)), "ssim_to_real": float(np.mean(real)), "pairs": len(imgs)})
                print(rows[-1])
    return rows


def _ms(v) -> dict:
    v = np.asarray(v, float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std()) if len(v) else None, "n": len(v)}


def validation_grid(pipe, pairs, load, seed: int, path: Path) -> Path:
    """Rows: prior | 3 generated samples | real follow-up, with the description under each row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(pairs), 5, figsize=(11, 2.45 * len(pairs)), squeeze=False)
    for i, p in enumerate(tqdm(pairs, desc="grid")):
        prior, follow = load(p.prior), load(p.followup)
        gen = pipe(prior, p.progression_text, num_images=3, seed=seed).images
        for j, (im, title) in enumerate(zip([prior, *gen, follow],
                                            ["prior", "generated 1", "generated 2", "generated 3", "real follow-up"])):
            ax = axes[i][j]
            ax.imshow(im, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        text = p.progression_text if len(p.progression_text) < 110 else p.progression_text[:107] + "..."
        axes[i][0].set_ylabel(p.pair_id.split("__")[0][:18], fontsize=6)
        axes[i][2].set_xlabel(text, fontsize=7)
    fig.suptitle("Validation patients (never trained on). Generated images are SYNTHETIC.", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/fidelity"))
    ap.add_argument("--tune", action="store_true", help="grid over sampler settings instead (writes tuning.json)")
    a = ap.parse_args(argv)
    pipe = BiomedJourneyPipeline.from_pretrained(a.model, device="cpu")
    if a.tune:
        a.out.mkdir(parents=True, exist_ok=True)
        rows = tune(pipe, data_root(a.data), a.split, min(a.limit, 12), a.seed)
        (a.out / "tuning.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    r = fidelity(pipe, data_root(a.data), a.split, a.limit, a.seed, grid_path=a.out / "validation_grid.png")
    r["model"] = pipe.model_id
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fidelity.json").write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
