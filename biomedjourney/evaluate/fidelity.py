"""Model-card validation of a model on a split: does it keep the prior when told nothing changed,
and does it change the chest (not the corners) when told something did?

    python -m biomedjourney.evaluate.fidelity --model assets/biomedjourney-cxr --out assets/ --limit 40

Writes fidelity.json, validation_grid.png (prior | 3 samples | real follow-up, 8 pairs) and
change_location.png (mean |change| of generated and real follow-ups, with the lung-and-heart mask).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import NO_CHANGE, to_dict
from ..dataset import data_root, require_data
from ..imaging import read_image, to_model_input
# the lung-and-heart evaluation mask: one home, biomedjourney.masks (re-exported for fidelity's importers)
from ..masks import LUNG_HEART, inside_fraction, lung_mask  # noqa: F401
from ..metrics import image_ssim
from ..pipeline import BiomedJourneyPipeline
from .run import load_row, select_pairs


def lung_mask_figure(image: np.ndarray, path: Path) -> Path:
    """The mask drawn on an image (the model card shows it on the pydicom-data radiograph)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.contour(lung_mask(image.shape), levels=[0.5], colors="red", linewidths=1.2)
    ax.set_title(f"lung-and-heart mask ({lung_mask(image.shape).mean():.0%} of the image)", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def change_location_figure(maps: dict[str, list[np.ndarray]], path: Path) -> Path:
    """Mean |change| over pairs, one panel per kind (generated, real follow-up), with the mask and its share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [k for k, v in maps.items() if v]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.0 * len(kinds), 3.35), squeeze=False)
    for ax, k in zip(axes[0], kinds):
        m = np.mean(np.abs(np.stack(maps[k])), axis=0)  # (H, W)
        share = np.mean([inside_fraction(d) for d in maps[k]])
        ax.imshow(m, cmap="magma", vmin=0, vmax=float(np.percentile(m, 99.5)))
        ax.contour(lung_mask(m.shape), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"{k}\nmean |change| {m.mean():.3f}, {share:.0%} inside", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Where the change is ({len(maps[kinds[0]])} validation pairs with a change description)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def pair_measures(pipe: BiomedJourneyPipeline, prior: np.ndarray, follow: np.ndarray, text: str, seed: int = 0,
                  maps: dict[str, list] | None = None, **sampler) -> dict[str, float]:
    """One validation pair: generate with the no-change text and (if it is one) the pair's change text, same seed.
    ``maps``: where to append the change-text pair's signed changes ("generated", "real follow-up")."""
    g0 = pipe(prior, NO_CHANGE, num_images=1, seed=seed, **sampler).images[0]
    m = {"no_change_ssim_generated_vs_prior": image_ssim(g0, prior),
         "real_followup_ssim_vs_prior": image_ssim(follow, prior),
         "no_change_mean_abs_change": float(np.abs(g0 - prior).mean()),
         "real_change_inside_lung_mask_fraction": inside_fraction(follow - prior)}
    if text.strip() != NO_CHANGE:
        g1 = pipe(prior, text, num_images=1, seed=seed, **sampler).images[0]
        m.update({"change_mean_abs_change": float(np.abs(g1 - prior).mean()),
                  "change_inside_lung_mask_fraction": inside_fraction(g1 - prior),
                  # what the description itself draws: same seed, same noise, only the text differs
                  "text_effect_mean_abs": float(np.abs(g1 - g0).mean()),
                  "text_effect_inside_lung_mask_fraction": inside_fraction(g1 - g0),
                  "change_ssim_to_real_followup": image_ssim(g1, follow)})
        if maps is not None:
            maps.setdefault("generated", []).append(g1 - prior)
            maps.setdefault("real follow-up", []).append(follow - prior)
    return m


def _aggregate(measures: list[dict]) -> dict:
    keys = dict.fromkeys(k for m in measures for k in m)
    return {k: _ms([m[k] for m in measures if k in m]) for k in keys}


def fidelity(pipe: BiomedJourneyPipeline, data=None, split: str = "val", limit: int = 40, seed: int = 0,
             grid_path: Path | None = None, grid_pairs: int = 8, location_path: Path | None = None) -> dict:
    """Every generation uses the pipeline's default sampler settings (pipe.defaults).
    ``location_path``: also draw where the change falls (change_location_figure)."""
    res = pipe.resolution
    load = lambda row: load_row(row, res)  # noqa: E731
    pairs = select_pairs(data, split, limit=limit)
    change_pairs = [p for p in pairs if p.progression_text.strip() != NO_CHANGE]
    t0 = time.time()
    maps: dict[str, list] = {}
    measures = [pair_measures(pipe, load(p.prior), load(p.followup), p.progression_text, seed, maps)
                for p in tqdm(pairs, desc="fidelity")]
    out = {"split": split, "pairs": len(pairs), "change_pairs": len(change_pairs), "seed": seed,
           "settings": to_dict(pipe.defaults), **_aggregate(measures),
           "lung_mask": LUNG_HEART, "lung_mask_area_fraction": float(lung_mask((res, res)).mean()),
           "seconds": round(time.time() - t0, 1)}
    if location_path is not None and maps:
        change_location_figure(maps, location_path)
    if grid_path is not None:
        validation_grid(pipe, change_pairs[:grid_pairs] or pairs[:grid_pairs], load, seed, grid_path)
    return out


def tune(pipe: BiomedJourneyPipeline, data=None, split: str = "val", limit: int = 12, seed: int = 0,
         image_scales=(1.5, 3.0), strengths=(1.0, 0.8, 0.6), text_scales=(3.0,), negative_prompts=("",)) -> list[dict]:
    """Grid over sampler settings on pairs with a change description: the fidelity measures (means) per setting.
    Pick defaults that keep the patient (no-change SSIM) yet follow the text (text effect)."""
    res = pipe.resolution
    pairs = [p for p in select_pairs(data, split, limit=None) if p.progression_text.strip() != NO_CHANGE][:limit]
    imgs = [(load_row(p.prior, res), load_row(p.followup, res), p.progression_text) for p in pairs]
    rows = []
    for gi, st, gt, neg in itertools.product(image_scales, strengths, text_scales, negative_prompts):
        kw = dict(image_guidance_scale=gi, strength=st, guidance_scale=gt, negative_prompt=neg)
        ms = [pair_measures(pipe, prior, follow, text, seed, **kw)
              for prior, follow, text in tqdm(imgs, desc=f"img {gi} strength {st} text {gt} neg {neg!r}", leave=False)]
        rows.append({**kw, "pairs": len(imgs), **{k: v["mean"] for k, v in _aggregate(ms).items()}})
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
    ap.add_argument("--sampler", action="append", default=[], metavar="KEY=VALUE",
                    help="override a default of the model, e.g. change_transfer=false")
    ap.add_argument("--tune", action="store_true", help="grid over sampler settings instead (writes tuning.json)")
    ap.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.8, 0.6], help="--tune grid")
    ap.add_argument("--image-scales", type=float, nargs="+", default=[1.5, 3.0], help="--tune grid")
    ap.add_argument("--text-scales", type=float, nargs="+", default=[3.0], help="--tune grid")
    ap.add_argument("--negative-prompts", nargs="+", default=[""], help="--tune grid ('' = the empty prompt)")
    a = ap.parse_args(argv)
    require_data(a.data)  # exit 2 with where the data comes from, before the model is loaded
    pipe = BiomedJourneyPipeline.from_pretrained(a.model, device="cpu")
    pipe.defaults = pipe.defaults.with_overrides(a.sampler)
    if a.tune:
        a.out.mkdir(parents=True, exist_ok=True)
        rows = tune(pipe, data_root(a.data), a.split, min(a.limit, 12), a.seed, a.image_scales, a.strengths, a.text_scales,
                    a.negative_prompts)
        (a.out / "tuning.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    r = fidelity(pipe, data_root(a.data), a.split, a.limit, a.seed, grid_path=a.out / "validation_grid.png",
                 location_path=a.out / "change_location.png")
    import pydicom.data
    example = to_model_input(read_image(pydicom.data.get_testdata_file("RG1_UNCI.dcm")).pixels, pipe.resolution)
    lung_mask_figure(example, a.out / "lung_mask.png")
    r["model"] = pipe.model_id
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fidelity.json").write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
