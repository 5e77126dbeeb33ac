"""Does the follow-up show what was asked, where it was asked? Counterfactual checks on normal priors.

    python -m biomedjourney.evaluate.follow --model assets/biomedjourney-cxr --out assets/eval/follow/region \
        --priors 12 --seeds 2 --region auto --render off [--sampler KEY=VALUE ...] [--label NAME]

On No-Finding validation priors (one image per patient, the first by image id), every description of
DESCRIPTIONS is generated through `service.generate_followups` with the SAME seeds per prior (one image
per call), and measured:

    lift          evaluator P(label | description) - P(label | no-change text), same prior, same seed
    side          share of samples with > half of |generated - prior| on the named side's image half
    zone          share with > half of the lung-field change in the named vertical half of the lungs
    outside mask  share of |change| where the edit mask <= 0.05 (region off: the mask region auto would use)
    density       inside the edit mask (> 0.5): the mean change in the finding's own direction (dense findings
                  brighten the film, a pneumothorax darkens it), the share of pixels that moved the wrong way by
                  more than 0.02, and the share of samples whose mean change there has the wrong sign
    ghost         where the knowledge-driven drawing replaced the prior: the share of the prior's fine structure the
                  drawing took away (high-pass 3 px) that comes back in the output, along the edges it erased and
                  in the mask's core (0: none, 1: all of it; e.g. the hemidiaphragm through a drawn effusion)
    identity      re-identification AUC (own prior vs other patients' priors) and SSIM(no-change, prior)

Writes follow.json, follow.md and follow_grid.png. The evaluators are the evaluation battery, trained on
the same dataset's train split: this measures, it is not a target to tune the sampler or renderer against.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..anatomy import Anatomy, _resize_mask, segment
from ..config import NO_CHANGE, write_json
from ..imaging import mark_synthetic
from .metrics import mean_std, reid_auc, ssim_psnr
from .rendering_check import on_named_side

MASK_INSIDE = 0.05   # edit mask > this counts as inside
LUNG_INSIDE = 0.5    # soft lung mask > this is lung field
MASK_CORE = 0.5      # edit mask > this: the region's core, where the finding's density is judged
WRONG_WAY = 0.02     # a pixel changed by more than this against the finding's direction moved the wrong way


@dataclass(frozen=True)
class Target:
    """What a description asks for: the evaluator label that names it, the patient's side, the lung zone."""
    label: str | None
    side: str | None = None
    zone: str | None = None   # 'upper' | 'lower'
    density: int = 0          # +1: the finding is denser than lung (brighter on the film), -1: more lucent, 0: none


DESCRIPTIONS = {
    "New right pleural effusion.": Target("Effusion", "right", density=1),
    "New left pleural effusion.": Target("Effusion", "left", density=1),
    "New pulmonary edema.": Target("Edema", density=1),
    "New right upper lobe consolidation.": Target("Opacity (any)", "right", "upper", 1),  # consolidation is an opacity
    "New left lower lobe consolidation.": Target("Opacity (any)", "left", "lower", 1),
    "New right lower lobe atelectasis.": Target("Atelectasis", "right", "lower", 1),
    "New right lower lobe pneumonia.": Target("Pneumonia", "right", "lower", 1),
    "New bilateral infiltrates.": Target("Infiltration", density=1),
    "New cardiomegaly.": Target("Cardiomegaly", density=1),       # the heart's soft tissue replaces lung at its border
    "New right pneumothorax.": Target("Pneumothorax", "right", density=-1),   # air without lung markings
    "New left pneumothorax.": Target("Pneumothorax", "left", density=-1),
    NO_CHANGE: Target(None),
}
GRID = ("New right pleural effusion.", "New left pleural effusion.", "New pulmonary edema.",
        "New right upper lobe consolidation.", "New cardiomegaly.", "New right pneumothorax.", NO_CHANGE)
STD_NOTE = ("lift std: sample std (ddof=1) over seeds of the per-seed mean lift across priors; "
            "se_priors: std of the per-prior mean lift across priors / sqrt(n_priors)")


@dataclass
class Prior:
    image_id: str
    patient: str
    image: np.ndarray           # (R, R) [0, 1] as the model sees it


@dataclass
class Generated:
    """All generations of one run: images[d], masks[d], drawings[d] (P, S, R, R), NaN where there is none."""
    priors: list[Prior]
    seeds: list[int]
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    anatomy: list[Anatomy]
    seconds: float
    drawings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)   # the knowledge-driven start pictures


# ------------------------------------------------------------------------- priors
def select_priors(n: int, data=None, res: int = 256, label: str | None = None) -> list[Prior]:
    """The first n validation images, one per patient, by image id: labelled only 'No Finding', or (label given)
    labelled with that dataset label."""
    from ..dataset import load_images, split_of
    from .run import load_row
    wanted = (lambda r: r.labels == ["No Finding"]) if label is None else (lambda r: label in r.labels)
    rows = sorted((r for r in load_images(data).values()
                   if wanted(r) and split_of(r.patient_id) == "val"), key=lambda r: r.image_id)
    out, seen = [], set()
    for r in rows:
        if r.patient_id not in seen and len(out) < n:
            seen.add(r.patient_id)
            out.append(Prior(r.image_id, r.patient_id, load_row(r, res)))
    return out


# ------------------------------------------------------------------------- per-sample metrics
def side_hit(diff: np.ndarray, side: str) -> bool:
    """More than half of |diff| on the image half of the patient's `side` (anatomy.image_half)."""
    return on_named_side(diff, side)


def lung_rows(anatomy: Anatomy) -> tuple[int, int]:
    """First and last image row of the lung fields (both lungs), from the prior's anatomy."""
    rows = np.flatnonzero((anatomy.lung("bilateral") > LUNG_INSIDE).any(1))
    if len(rows) == 0:
        raise ValueError("the anatomy has no lung field")
    return int(rows[0]), int(rows[-1])


def zone_share(diff: np.ndarray, anatomy: Anatomy, zone: str) -> float:
    """Share of the lung-field |diff| in the `zone` ('upper' | 'lower') half of the lungs' vertical extent."""
    if zone not in ("upper", "lower"):
        raise ValueError(f"zone must be 'upper' or 'lower', got {zone!r}")
    a = np.abs(diff) * (anatomy.lung("bilateral") > LUNG_INSIDE)
    top, bottom = lung_rows(anatomy)
    upper = float(a[: (top + bottom + 1) // 2].sum())          # rows top .. the middle of the lungs' extent
    total = float(a.sum())
    if total <= 0:
        return float("nan")
    return upper / total if zone == "upper" else 1.0 - upper / total


def zone_hit(diff: np.ndarray, anatomy: Anatomy, zone: str) -> bool:
    """More than half of the lung-field change in the named vertical half of the lungs."""
    return bool(zone_share(diff, anatomy, zone) > 0.5)


def outside_share(diff: np.ndarray, mask: np.ndarray | None) -> float:
    """Share of |diff| where the edit mask is <= MASK_INSIDE (NaN without a mask or without change)."""
    a = np.abs(diff)
    total = float(a.sum())
    if mask is None or np.isnan(mask).any() or total <= 0:
        return float("nan")
    return float(a[mask <= MASK_INSIDE].sum() / total)


def density_change(diff: np.ndarray, mask: np.ndarray | None, direction: int) -> tuple[float, float]:
    """(mean change x direction, share of pixels changed against direction by > WRONG_WAY) inside the edit mask's
    core (mask > MASK_CORE); NaNs without a mask, a core or a direction."""
    if mask is None or np.isnan(mask).any() or not direction or not (mask > MASK_CORE).any():
        return float("nan"), float("nan")
    d = diff[mask > MASK_CORE] * direction
    return float(d.mean()), float((d < -WRONG_WAY).mean())


# ------------------------------------------------------------------------- generation
def fit(mask: np.ndarray | None, res: int) -> np.ndarray:
    """A (H, W) mask at (res, res); None -> all NaN (no mask)."""
    if mask is None:
        return np.full((res, res), np.nan, np.float32)
    return mask.astype(np.float32) if mask.shape == (res, res) else _resize_mask(mask, res)


def region_mask(prior: np.ndarray, description: str, seed: int, region: str, plan_mask) -> np.ndarray | None:
    """The mask the change is judged against: the plan's, or (region off) the one region auto would use."""
    if region != "off" or description == NO_CHANGE:
        return plan_mask
    from ..service import plan_edit
    return plan_edit(prior, description, [seed], region="auto").mask


def generate_all(pipe, priors: list[Prior], seeds: list[int], *, region: str, render: bool,
                 descriptions=tuple(DESCRIPTIONS)) -> Generated:
    """Every (prior, description, seed), one image per generate_followups call."""
    from ..service import generate_followups
    res = pipe.resolution
    P, S = len(priors), len(seeds)
    images = {d: np.zeros((P, S, res, res), np.float32) for d in descriptions}
    masks = {d: np.full((P, S, res, res), np.nan, np.float32) for d in descriptions}
    drawings = {d: np.full((P, S, res, res), np.nan, np.float32) for d in descriptions}
    secs, bar = 0.0, tqdm(total=P * S * len(descriptions), desc=f"follow-ups ({region}, render {render})")
    for i, p in enumerate(priors):
        for d in descriptions:
            for k, s in enumerate(seeds):
                t0 = time.perf_counter()
                r = generate_followups(pipe, p.image, d, seed=s, num_images=1, region=region, render=render)
                secs += time.perf_counter() - t0
                images[d][i, k] = r.images[0]
                masks[d][i, k] = fit(region_mask(r.prior, d, s, region, r.plan.mask), res)
                if r.plan.renderings is not None:
                    drawings[d][i, k] = fit(r.plan.renderings[0], res)
                bar.update()
    bar.close()
    anatomy = [segment(p.image, size=res) for p in priors]
    return Generated(priors, seeds, images, masks, anatomy, secs, drawings)


# ------------------------------------------------------------------------- summaries
def probabilities(g: Generated, ev) -> dict[str, np.ndarray]:
    """{description: (P, S, L) evaluator pathology probabilities of its images}."""
    P, S = len(g.priors), len(g.seeds)
    return {d: ev.predict(im.reshape(P * S, *im.shape[2:])).pathology.reshape(P, S, -1) for d, im in g.images.items()}


def lift(g: Generated, ev, prob: dict[str, np.ndarray] | None = None) -> dict:
    """{description: {label: {mean, std, se_priors, n}}}: P(label) minus the no-change image's, same prior and seed.
    prob: `probabilities(g, ev)` when already computed."""
    labels = list(ev.cfg.labels)
    P = len(g.priors)
    prob = probabilities(g, ev) if prob is None else prob
    out = {}
    for d in g.images:
        if d == NO_CHANGE:
            continue
        delta = prob[d] - prob[NO_CHANGE]                                       # (P, S, L)
        out[d] = {lab: {**mean_std(delta[:, :, j].mean(0)), "mean": float(delta[:, :, j].mean()),
                        "se_priors": float(delta[:, :, j].mean(1).std(ddof=1) / np.sqrt(P)) if P > 1 else 0.0}
                  for j, lab in enumerate(labels)}
    return out


def _diffs(g: Generated, d: str) -> np.ndarray:
    return g.images[d] - np.stack([p.image for p in g.priors])[:, None]     # (P, S, R, R)


def side_accuracy(g: Generated) -> dict:
    """{description: share of samples on the named side} for the descriptions with a side."""
    out = {}
    for d in g.images:
        side = DESCRIPTIONS[d].side
        if side:
            diffs = _diffs(g, d)
            out[d] = float(np.mean([side_hit(x, side) for x in diffs.reshape(-1, *diffs.shape[2:])]))
    return out


def zone_accuracy(g: Generated) -> dict:
    """{description: share of samples with most lung-field change in the named upper / lower half}."""
    out = {}
    for d in g.images:
        zone = DESCRIPTIONS[d].zone
        if zone:
            diffs = _diffs(g, d)
            out[d] = float(np.mean([zone_hit(diffs[i, k], g.anatomy[i], zone)
                                    for i in range(len(g.priors)) for k in range(len(g.seeds))]))
    return out


def outside_mask(g: Generated) -> dict:
    """{description: mean share of |change| outside the edit mask, 'mean': over the descriptions}."""
    out = {}
    for d in g.images:
        diffs = _diffs(g, d)
        v = [outside_share(diffs[i, k], g.masks[d][i, k]) for i in range(len(g.priors)) for k in range(len(g.seeds))]
        v = [x for x in v if np.isfinite(x)]
        if v:
            out[d] = float(np.mean(v))
    out["mean"] = float(np.mean(list(out.values()))) if out else None
    return out


def density(g: Generated) -> dict:
    """{description: {mean, wrong_pixels, wrong_samples}} for descriptions of a finding with a density direction:
    the change inside the edit mask's core in the finding's direction (density_change), averaged over samples, and
    the share of samples whose mean there moved the wrong way. Catches a classifier-pleasing change that darkens a
    region the text says becomes dense."""
    out = {}
    for d in g.images:
        direction = DESCRIPTIONS[d].density
        if not direction:
            continue
        diffs = _diffs(g, d)
        v = np.array([density_change(diffs[i, k], g.masks[d][i, k], direction)
                      for i in range(len(g.priors)) for k in range(len(g.seeds))])     # (P*S, 2)
        v = v[np.isfinite(v).all(1)]
        if len(v):
            out[d] = {"mean": float(v[:, 0].mean()), "wrong_pixels": float(v[:, 1].mean()),
                      "wrong_samples": float((v[:, 0] < 0).mean())}
    return out


GHOST_SIGMA = 3.0    # px at 256: the fine structure (edges, ribs, vessels) whose return the ghost measure counts


def returned_structure(out: np.ndarray, drawing: np.ndarray, prior: np.ndarray, where: np.ndarray) -> float:
    """The share of the prior's fine structure that the drawing took away and that comes back in the output, inside
    `where` (H, W bool): the regression coefficient of HP(out - drawing) on HP(prior - drawing), HP = high-pass at
    GHOST_SIGMA. 0: the output kept the drawing's structure; 1: the prior's edges are all back. NaN: too few pixels."""
    from scipy import ndimage
    sigma = GHOST_SIGMA * prior.shape[-1] / 256
    hp = lambda x: x - ndimage.gaussian_filter(x.astype(np.float32), sigma)
    ref = hp(prior - drawing)[where]
    den = float((ref ** 2).sum())
    if where.sum() < 20 or den == 0:
        return float("nan")
    return float((hp(out - drawing)[where] * ref).sum()) / den


def ghost(g: Generated) -> dict:
    """{description: {edges, core, samples}} for descriptions with a drawing: returned_structure along the prior's
    edges the drawing erased (pipeline.erased_edges > 0.5) and in the mask's core, averaged over samples."""
    from ..pipeline import erased_edges
    out = {}
    for d, drawn in g.drawings.items():
        edges, core = [], []
        for i, p in enumerate(g.priors):
            for k in range(len(g.seeds)):
                if np.isnan(drawn[i, k]).any():
                    continue
                inside = np.nan_to_num(g.masks[d][i, k]) > MASK_CORE
                e = returned_structure(g.images[d][i, k], drawn[i, k], p.image,
                                       inside & (erased_edges(drawn[i, k], p.image) > 0.5))
                c = returned_structure(g.images[d][i, k], drawn[i, k], p.image, inside)
                edges += [e] if np.isfinite(e) else []
                core += [c] if np.isfinite(c) else []
        if core:
            out[d] = {"edges": float(np.mean(edges)) if edges else float("nan"), "core": float(np.mean(core)),
                      "samples": len(core)}
    return out


def identity(g: Generated, ev) -> dict:
    """Re-identification AUC of every generated image vs its own prior (negatives: other patients' priors,
    each prior once), per seed and pooled; SSIM of the no-change output to its prior."""
    P, S = len(g.priors), len(g.seeds)
    prior_emb = ev.predict(np.stack([p.image for p in g.priors])).embedding       # (P, D)
    ds = list(g.images)
    per_seed = []
    gen_all, idx_all = [], []
    for k in range(S):
        gen = ev.predict(np.concatenate([g.images[d][:, k] for d in ds])).embedding   # (len(ds) * P, D)
        idx = np.tile(np.arange(P), len(ds))
        per_seed.append(_reid(gen, prior_emb, idx, g))
        gen_all.append(gen)
        idx_all.append(idx)
    nc = g.images[NO_CHANGE]
    ref = np.repeat(np.stack([p.image for p in g.priors])[:, None], S, 1)
    s, _ = ssim_psnr(nc.reshape(P * S, *nc.shape[2:]), ref.reshape(P * S, *nc.shape[2:]))
    return {"reid_auc": _reid(np.concatenate(gen_all), prior_emb, np.concatenate(idx_all), g),
            "reid_auc_per_seed": mean_std(per_seed), "no_change_ssim": float(s.mean())}


def _reid(gen: np.ndarray, prior_emb: np.ndarray, idx: np.ndarray, g: Generated) -> float:
    patients = [g.priors[i].patient for i in idx]
    keys = [g.priors[i].image_id for i in idx]
    return reid_auc(gen, prior_emb[idx], patients, keys)


def diagonal(lifts: dict, named: dict[str, str]) -> dict:
    """Per evaluator label that a description names: the named descriptions' mean lift, the largest lift any OTHER
    description gives that label, and whether the named one is positive and larger (the issue's diagonal target)."""
    out = {}
    for lab in sorted(set(named.values()) & {k for v in lifts.values() for k in v}):
        own = [lifts[d][lab]["mean"] for d in lifts if named.get(d) == lab]
        other = max((lifts[d][lab]["mean"] for d in lifts if named.get(d) not in (lab, None)), default=float("nan"))
        mean = float(np.mean(own))
        out[lab] = {"named_lift": mean, "best_other_lift": other, "diagonal": bool(mean > 0 and mean > other)}
    return out


def summarise(g: Generated, ev, settings: dict) -> dict:
    """follow.json (stable keys first)."""
    ident = identity(g, ev)
    n = sum(im.shape[0] * im.shape[1] for im in g.images.values())
    labels = list(ev.cfg.labels)
    lifts = lift(g, ev)
    named = {d: t.label for d, t in DESCRIPTIONS.items() if t.label}
    return {
        "settings": settings, "n_priors": len(g.priors), "seeds": list(g.seeds),
        "lift": lifts, "diagonal": diagonal(lifts, named), "side_accuracy": side_accuracy(g), "zone_accuracy": zone_accuracy(g),
        "outside_mask_share": outside_mask(g), "density": density(g), "ghost": ghost(g), "reid_auc": ident["reid_auc"],
        "no_change_ssim": ident["no_change_ssim"], "seconds_per_image": g.seconds / max(n, 1),
        "reid_auc_per_seed": ident["reid_auc_per_seed"], "generation_seconds": g.seconds, "n_images": n,
        "named_label": named,
        "no_evaluator_head": sorted({t.label for t in DESCRIPTIONS.values() if t.label} - set(labels)),
        "evaluator_labels": labels, "priors": [p.image_id for p in g.priors],
        "anatomy_sources": sorted({a.source for a in g.anatomy}), "std_definition": STD_NOTE,
    }


# ------------------------------------------------------------------------- figure and report
def grid_figure(g: Generated, path: Path, n: int = 3, title: str = "") -> Path:
    """Rows: per prior the seed-0 follow-ups (marked SYNTHETIC, edit-mask contour) and their difference maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [d for d in GRID if d in g.images]
    n = min(n, len(g.priors))
    fig, axes = plt.subplots(2 * n, len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.7 * 2 * n), squeeze=False)
    for i in range(n):
        prior = g.priors[i].image
        axes[2 * i, 0].imshow(prior, cmap="gray", vmin=0, vmax=1)
        axes[2 * i, 0].set_ylabel(g.priors[i].image_id, fontsize=5)
        axes[2 * i + 1, 0].imshow(prior, cmap="gray", vmin=0, vmax=1, alpha=0.0)
        axes[2 * i + 1, 0].text(0.5, 0.5, "generated − prior\n(red brighter,\nblue darker)", fontsize=6,
                                ha="center", va="center", transform=axes[2 * i + 1, 0].transAxes)
        for c, d in enumerate(cols, start=1):
            img, mask = g.images[d][i, 0], g.masks[d][i, 0]
            axes[2 * i, c].imshow(mark_synthetic(img), cmap="gray", vmin=0, vmax=1)
            axes[2 * i + 1, c].imshow(img - prior, cmap="bwr", vmin=-0.25, vmax=0.25)
            if not np.isnan(mask).any() and mask.max() > MASK_INSIDE:
                for ax in (axes[2 * i, c], axes[2 * i + 1, c]):
                    ax.contour(mask, levels=[0.5], colors="yellow", linewidths=0.4)
            if i == 0:
                axes[0, c].set_title(d.replace("New ", "").rstrip("."), fontsize=6)
    axes[0, 0].set_title("prior (acquired)", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title + "  (image left = patient's right; yellow: edit mask 0.5)", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return shrink_png(path)


def shrink_png(path: Path, colors: int = 96) -> Path:
    """Re-save a figure PNG with an adaptive palette (a few hundred KB instead of ~0.7 MB)."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors)
    small.save(path, optimize=True)
    return path


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def markdown(res: dict, title: str) -> str:
    """follow.md: the lift matrix, the accuracies, identity, timing and caveats."""
    labels, descs = res["evaluator_labels"], list(res["lift"])
    lines = [f"# Counterfactual follow-ups: {title}", "",
             f"{res['n_priors']} No-Finding validation priors (one per patient) × seeds {res['seeds']}; "
             f"settings: `{json.dumps({k: res['settings'][k] for k in ('region', 'render', 'overrides')})}`.", "",
             "## Evaluator lift over the no-change description (same prior, same seed): mean ± std", "",
             "| description | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for d in descs:
        named = res["named_label"].get(d)
        cells = [("**{}**" if lab == named else "{}").format(
            f"{_fmt(res['lift'][d][lab]['mean'])} ± {_fmt(res['lift'][d][lab]['std'])}") for lab in labels]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", f"Bold: the label the description names. {res['std_definition']}.", "",
              "Diagonal (the named descriptions' mean lift of a label vs the largest lift any other description gives "
              "it):", "", "| label | named lift | best other | diagonal |", "|---|---|---|---|"]
    lines += [f"| {lab} | {_fmt(v['named_lift'])} | {_fmt(v['best_other_lift'])} | {'yes' if v['diagonal'] else 'no'} |"
              for lab, v in res.get("diagonal", {}).items()]
    lines += ["",
              "## Where the change is", "", "| description | side accuracy | zone accuracy | outside-mask share |",
              "|---|---|---|---|"]
    for d in descs + [NO_CHANGE]:
        lines.append(f"| {d} | {_fmt(res['side_accuracy'].get(d))} | {_fmt(res['zone_accuracy'].get(d))} | "
                     f"{_fmt(res['outside_mask_share'].get(d))} |")
    lines += ["", f"Mean outside-mask share: {_fmt(res['outside_mask_share'].get('mean'))}.", "",
              f"## Density inside the edit mask (core > {MASK_CORE}): does the region move the finding's way?", "",
              "Dense findings should brighten it, a pneumothorax darken it. Mean: the change times that direction; "
              f"wrong pixels: share moved the other way by > {WRONG_WAY}; wrong samples: share whose mean moved "
              "the other way.", "", "| description | mean change (finding's way) | wrong pixels | wrong samples |",
              "|---|---|---|---|"]
    lines += [f"| {d} | {_fmt(v['mean'])} | {_fmt(v['wrong_pixels'])} | {_fmt(v['wrong_samples'])} |"
              for d, v in res.get("density", {}).items()]
    lines += ["", "## Ghosts: does the prior's structure that the drawing covered come back?", "",
              f"Share of the prior's fine structure (high-pass {GHOST_SIGMA:g} px) that the knowledge-driven drawing "
              "took away and that returns in the output (0 none, 1 all): along the prior's edges the drawing erased, "
              "and in the edit mask's core.", "", "| description | erased edges | mask core | samples |",
              "|---|---|---|---|"]
    lines += [f"| {d} | {_fmt(v['edges'])} | {_fmt(v['core'])} | {v['samples']} |" for d, v in res.get("ghost", {}).items()]
    lines += ["",
              "## Identity and cost", "",
              f"- re-identification AUC (generated vs own prior, other patients' priors as negatives): "
              f"{_fmt(res['reid_auc'])} (per seed {_fmt(res['reid_auc_per_seed']['mean'])} ± "
              f"{_fmt(res['reid_auc_per_seed']['std'])})",
              f"- SSIM(no-change output, prior): {_fmt(res['no_change_ssim'])}",
              f"- {res['n_images']} images in {res['generation_seconds']:.0f} s generation "
              f"({res['seconds_per_image']:.2f} s/image, CPU), {res['wall_seconds']:.0f} s wall in all", "",
              "## Caveats", "", *caveats(res)]
    return "\n".join(lines) + "\n"


def caveats(res: dict) -> list[str]:
    """The honest limits of these numbers, as markdown bullets."""
    missing = ", ".join(res["no_evaluator_head"]) or "none"
    return [
        "- The evaluators are CNNs trained in this project on the train split of the SAME dataset the generator "
        "learnt from: a lift says the image moved towards what that dataset calls the label, not that a "
        "radiologist would read it.",
        f"- No evaluator head for: {missing}; their rows only show side, zone and mask numbers. Consolidation "
        "is scored with 'Opacity (any)' (consolidation is one of its members).",
        f"- {res['n_priors']} priors × {len(res['seeds'])} seeds: a std over {len(res['seeds'])} seeds is itself "
        "noisy; se_priors in follow.json gives the spread over priors.",
        "- Side / zone / outside-mask shares use |generated − prior| in pixels: with region auto the change is "
        "confined by construction, so they check the mask and sampler plumbing more than the model. With region "
        "off, outside-mask share is measured against the mask region auto would have used.",
        *(["- change_transfer is on: every output is prior + (sample(description) - sample(no-change text)) with "
            "the same noise, so the no-change output IS the prior (SSIM 1 by construction) and each lift is "
            "also the lift over the prior itself."] if res["settings"]["sampler"].get("change_transfer") else []),
        "- Zone halves are the upper / lower half of both lungs' vertical extent (lung mask > 0.5) of the prior's "
        f"anatomy ({', '.join(res['anatomy_sources'])}); only the change inside the lung fields counts.",
    ]


# ------------------------------------------------------------------------- CLI
def common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every counterfactual check shares (this one and `removal`)."""
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sampler", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SamplerConfig default (e.g. render_strength=0.3, noise_opt_steps=0)")
    ap.add_argument("--label", default=None, help="name of this configuration (report title)")
    ap.add_argument("--data", default=None, help="dataset folder (default $BIOMEDJOURNEY_DATA / ../shared/data/cxr)")
    ap.add_argument("--evaluators", default=None, help="evaluator folder (default assets/evaluators)")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def load_run(a: argparse.Namespace):
    """(pipeline with the --sampler overrides, evaluators, model path); exits 2 with where the data comes from
    before the model is loaded when the dataset is absent."""
    import torch

    from ..dataset import require_data
    from ..pipeline import BiomedJourneyPipeline, default_model_path
    from .evaluators import load_evaluators
    require_data(a.data)
    torch.set_num_threads(a.threads)
    model = a.model or str(default_model_path())
    pipe = BiomedJourneyPipeline.from_pretrained(model, device="cpu")
    pipe.defaults = pipe.defaults.with_overrides(a.sampler)
    return pipe, load_evaluators(a.evaluators), model


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--priors", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="first seed; seeds are seed .. seed+S-1 for every prior")
    ap.add_argument("--render", choices=("on", "off"), default=None, help="default: the model's")
    ap.add_argument("--region", choices=("auto", "off"), default=None, help="default: the model's")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a, t0 = parse(argv), time.time()
    pipe, ev, model = load_run(a)
    priors = select_priors(a.priors, a.data, pipe.resolution)
    if len(priors) < 2:
        raise ValueError(f"need >= 2 No-Finding validation priors, found {len(priors)}")
    region = a.region or pipe.defaults.region
    render = pipe.defaults.render if a.render is None else a.render == "on"
    g = generate_all(pipe, priors, list(range(a.seed, a.seed + a.seeds)), region=region, render=render)
    label = a.label or a.out.name
    settings = {"label": label, "model": model, "region": region, "render": render,
                "overrides": a.sampler, "sampler": dataclasses.asdict(pipe.defaults), "resolution": pipe.resolution}
    res = summarise(g, ev, settings)
    a.out.mkdir(parents=True, exist_ok=True)
    grid_figure(g, a.out / "follow_grid.png", title=label)
    res["wall_seconds"] = time.time() - t0
    write_json(res, a.out / "follow.json")
    (a.out / "follow.md").write_text(markdown(res, label))
    print(json.dumps({k: res[k] for k in ("side_accuracy", "zone_accuracy", "reid_auc", "no_change_ssim",
                                          "seconds_per_image")}, indent=2))
    return res


if __name__ == "__main__":
    main()
