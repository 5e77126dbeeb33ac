"""Diagnostic of the knowledge-driven renderings (raw, before any diffusion harmonisation).

    python -m biomedjourney.evaluate.rendering_check [--limit 20] [--out assets/eval]

On No-Finding validation priors: the evaluator CNNs' probability lift (rendering - prior) of every
label for every rendering (a labels x renderings matrix), and side accuracy (share of samples
with more than half of |rendered - prior| on the named side's image half). Writes
rendering_check.json and rendering_grid.png (3 priors, renderings marked SYNTHETIC).
The evaluators are the evaluation battery: this reports, it is not a target to tune against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .. import anatomy as anat
from ..anatomy import image_half
from ..dataset import load_images, split_of
from ..findings.schema import Finding
from ..imaging import mark_synthetic, read_image, to_model_input
from ..render import render_findings
from .evaluators import evaluator_metrics, load_evaluators

RENDERINGS = {  # name -> (findings, the evaluator label it names, side)
    "right effusion": ([Finding(name="pleural effusion", side="right")], "Effusion", "right"),
    "left effusion": ([Finding(name="pleural effusion", side="left")], "Effusion", "left"),
    "edema": ([Finding(name="pulmonary edema")], "Edema", None),
    "right upper lobe consolidation": ([Finding(name="consolidation", side="right", zone="upper")],
                                       "Pneumonia", "right"),
    "left lower consolidation": ([Finding(name="consolidation", side="left", zone="lower")], "Pneumonia", "left"),
    "right atelectasis": ([Finding(name="atelectasis", side="right")], "Atelectasis", "right"),
    "cardiomegaly": ([Finding(name="cardiomegaly", severity="moderate")], "Cardiomegaly", None),
    "right pneumothorax": ([Finding(name="pneumothorax", side="right")], "Pneumothorax", "right"),
}
GRID = ("right effusion", "left effusion", "edema", "right upper lobe consolidation", "cardiomegaly",
        "right pneumothorax")


def no_finding_val_priors(limit: int) -> list[tuple[str, np.ndarray]]:
    """(image_id, (256, 256) model input) of the first `limit` validation images labelled only No Finding."""
    rows = sorted((r for r in load_images().values() if r.labels == ["No Finding"] and split_of(r.patient_id) == "val"),
                  key=lambda r: r.image_id)[:limit]
    return [(r.image_id, to_model_input(read_image(str(r.path)).pixels)) for r in rows]


def on_named_side(diff: np.ndarray, side: str) -> bool:
    a = np.abs(diff)
    return bool(a[:, image_half(side, a.shape[1])].sum() > 0.5 * a.sum())


def run(limit: int = 20) -> tuple[dict, dict]:
    """(the check's JSON, {image_id: {rendering: image}} for the grid)."""
    ev = load_evaluators()
    labels = list(ev.cfg.labels)
    priors = no_finding_val_priors(limit)
    lifts = {k: [] for k in RENDERINGS}
    sides = {k: [] for k in RENDERINGS if RENDERINGS[k][2]}
    images, sources = {}, []
    for i, (image_id, prior) in enumerate(priors):
        a = anat.segment(prior)
        sources.append(a.source)
        outs = {k: render_findings(prior, fs, a, torch.Generator().manual_seed(i)).image
                for k, (fs, _, _) in RENDERINGS.items()}
        p = ev.predict([prior] + list(outs.values())).pathology        # (1 + R, L)
        for j, k in enumerate(outs):
            lifts[k].append(p[j + 1] - p[0])
            if k in sides:
                sides[k].append(on_named_side(outs[k] - prior, RENDERINGS[k][2]))
        images[image_id] = {"prior": prior, **outs}
    return summary(lifts, sides, labels, sources), images


def summary(lifts: dict, sides: dict, labels: list[str], sources: list[str]) -> dict:
    """The check's JSON from the per-prior lifts ((L,) arrays) and side hits."""
    matrix = {k: {lab: round(float(np.mean([v[n] for v in lifts[k]])), 4) for n, lab in enumerate(labels)}
              for k in RENDERINGS}
    named = {k: (matrix[k].get(lab) if lab in labels else None) for k, (_, lab, _) in RENDERINGS.items()}
    return {"priors": len(sources), "split": "val", "prior_labels": "No Finding only",
            "anatomy_sources": {s: sources.count(s) for s in sorted(set(sources))},
            "evaluator_labels": labels, "lift_matrix": matrix,
            "named_label": {k: v[1] for k, v in RENDERINGS.items()}, "named_label_lift": named,
            "no_evaluator_head": sorted({v[1] for v in RENDERINGS.values()} - set(labels)),
            "side_accuracy": {k: round(float(np.mean(v)), 3) for k, v in sides.items()},
            "evaluator_val_auc_on_real_images": evaluator_metrics().get("val", {}).get("path_auc_per_label"),
            "note": ("raw knowledge-driven renderings vs their priors (no diffusion); lift = mean over priors of "
                     "P(label | rendering) - P(label | prior). A diagnostic, not a tuning target.")}


def grid_figure(images: dict, path: Path, n: int = 3) -> Path:
    """prior | the GRID renderings, on the first n priors; renderings marked SYNTHETIC."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ids = list(images)[:n]
    cols = ("prior",) + GRID
    fig, axes = plt.subplots(len(ids), len(cols), figsize=(2.2 * len(cols), 2.35 * len(ids)), squeeze=False)
    for r, image_id in enumerate(ids):
        for c, k in enumerate(cols):
            img = images[image_id][k] if k == "prior" else mark_synthetic(images[image_id][k])
            axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title("prior (acquired)" if k == "prior" else k, fontsize=7)
    fig.suptitle("Knowledge-driven renderings (raw, before diffusion harmonisation)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("assets/eval"))
    a = ap.parse_args(argv)
    out, images = run(a.limit)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rendering_check.json").write_text(json.dumps(out, indent=2) + "\n")
    grid_figure(images, a.out / "rendering_grid.png")
    print(json.dumps({k: out[k] for k in ("named_label_lift", "side_accuracy", "anatomy_sources")}, indent=2))
    return out


if __name__ == "__main__":
    main()
