"""Rows, result files and figures of the evaluation battery.

results.json schema (keys are stable; a row that was not computed has every metric key with
``{"mean": null, "std": null, "n": 0}``):

    {"rows": {ROW: {"status": "computed" | "not computed", "description", "source", "reason",
                    "command", "model", "resolution", "n_pairs", "n_replicates", "seconds", "seconds_per_image",
                    METRIC: {"mean", "std", "n"}, ..., "path_auc_per_label": {LABEL: {...}}}},
     "row_order": [...], "metrics": {METRIC: description}, "evaluator_ceilings": {...},
     "settings": {...}, "notes": [...]}
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np

ROWS = ("real_followup", "copy_prior", "text_only", "single_stage", "no_registration", "full")
ROW_DESCRIPTIONS = {
    "real_followup": "reference: the real follow-up images",
    "copy_prior": "baseline: the prior returned unchanged",
    "text_only": "text only: prior dropped (prior=None, zero prior latent)",
    "single_stage": "ablation: stage 2 only, no stage-1 pre-training / curriculum",
    "no_registration": "ablation: trained without prior->follow-up registration",
    "full": "BiomedJourney: prior + progression text",
}
GENERATED_ROWS = ("text_only", "single_stage", "no_registration", "full")
# How to produce each row's model with train/ (see train/run_recipe.sh), and the folder it ships in.
_PREP = "--config demo-cpu --data work/data/cxr-prep --vae work/runs/demo-cpu/vae-ft/vae"
TRAIN_COMMANDS = {
    "full": "bash train/run_recipe.sh demo-cpu  # then copy work/runs/demo-cpu/stage2/export to assets/biomedjourney-cxr",
    "text_only": "bash train/run_recipe.sh demo-cpu  # then copy work/runs/demo-cpu/stage1/export to assets/baselines/stage1",
    "single_stage": f"python train/train.py --stage 2 --no-curriculum {_PREP} --out work/runs/single-stage"
                    "  # then copy work/runs/single-stage/stage2/export to assets/baselines/single-stage",
    "no_registration": f"python train/train.py --stage 2 --no-register {_PREP} "
                       "--init-unet work/runs/demo-cpu/stage1/export --out work/runs/no-register"
                       "  # then copy work/runs/no-register/stage2/export to assets/baselines/no-registration",
}
EXPORTS = {  # relative to the repository root; baseline rows use these by default when they exist
    "full": "assets/biomedjourney-cxr",
    "text_only": "assets/baselines/stage1",
    "single_stage": "assets/baselines/single-stage",
    "no_registration": "assets/baselines/no-registration",
}
DEFAULT_ROW_PATHS = ("text_only", "single_stage", "no_registration")


METRICS = {
    "cmig": "CMIG-style combined score sqrt(PathAUC * sqrt(SexAUC * max(AgeR, 0))) (sex in place of race)",
    "path_auc": "pathology AUC: evaluator on the image vs the follow-up's labels (macro over labels with both classes)",
    "path_auc_changed": "pathology AUC restricted to (pair, label) entries that CHANGE from prior to follow-up "
                        "(copying the prior scores < 0.5; few entries on small splits)",
    "sex_auc": "sex AUC: evaluator P(male) on the image vs the patient's sex",
    "age_r": "age Pearson r: evaluator age on the image vs the patient's age at follow-up",
    "age_mae": "age mean absolute error (years)",
    "reid_auc": "re-identification AUC: image vs its own prior (positive) / other patients' priors (negatives)",
    "ssim": "SSIM vs the real follow-up",
    "psnr": "PSNR (dB, capped at 120) vs the real follow-up",
    "ssim_reg": "SSIM vs the real follow-up registered (affine) onto the prior's frame",
    "psnr_reg": "PSNR (dB) vs the registered follow-up",
    "change": "change magnitude: mean |image - prior| (intensity in [0, 1])",
}
TABLE_COLUMNS = ("cmig", "path_auc", "path_auc_changed", "sex_auc", "age_r", "reid_auc", "ssim", "psnr", "ssim_reg", "psnr_reg", "change")
CHART_METRICS = ("cmig", "path_auc", "path_auc_changed", "sex_auc", "age_r", "reid_auc")
EMPTY = {"mean": None, "std": None, "n": 0}


def not_computed(row: str, reason: str, command: str | None = None) -> dict:
    """A row that was not measured, with the command that makes its model."""
    flag = "--model" if row == "full" else f"--row {row}=FOLDER"
    reason = f"{reason}; the command below exports {EXPORTS.get(row, 'a model folder')} (pass it with {flag})"
    return finish_row(row, {"status": "not computed", "reason": reason,
                            "command": command if command is not None else TRAIN_COMMANDS.get(row, "")})


def finish_row(row: str, d: dict) -> dict:
    """Fill every stable key of a row (missing metrics -> EMPTY)."""
    out = {"status": "computed", "description": ROW_DESCRIPTIONS.get(row, row), "source": "", "reason": "",
           "command": "", "model": "", "resolution": None, "n_pairs": 0, "n_replicates": 0, "seconds": None,
           "seconds_per_image": None}
    out.update(d)
    for m in METRICS:
        out.setdefault(m, dict(EMPTY))
    out.setdefault("path_auc_per_label", {})
    return out


def fmt(ms: dict, digits: int = 3) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    if ms.get("n", 0) > 1:
        return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"
    return f"{ms['mean']:.{digits}f}"


def write_markdown(results: dict, path: Path) -> Path:
    rows, s = results["rows"], results["settings"]
    lines = ["# BiomedJourney evaluation", "",
             f"Split **{s['split']}** of `{s['data']}`: {s['n_pairs']} (prior, text, follow-up) pairs, "
             f"{s['n_patients']} patients; {s['replicates']} sample(s) per pair for generated rows "
             f"(mean ± sample std over replicates). Total time {s['seconds_total']:.0f} s.", "",
             "| row | " + " | ".join(TABLE_COLUMNS) + " | s/image |",
             "|---|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    lines += [_table_line(name, rows[name]) for name in results["row_order"]]
    lines += ["", "Rows:", ""] + [_row_line(name, rows[name]) for name in results["row_order"]]
    lines += ["", "Metrics:", ""] + [f"- `{k}`: {v}" for k, v in results["metrics"].items()]
    lines += _per_label_lines(rows) + _ceiling_lines(results.get("evaluator_ceilings") or {})
    lines += ["", "Notes:", ""] + [f"- {n}" for n in results.get("notes", [])]
    lines += ["", "Settings:", "", "```json", json.dumps(s, indent=2, default=str), "```", ""]
    path.write_text("\n".join(lines))
    return path


def _table_line(name: str, r: dict) -> str:
    """One row of the results table: its metrics and seconds per image, or why it was not computed."""
    if r["status"] != "computed":
        return f"| {name} | not computed: {r['reason']}: `{r['command']}` |" + " |" * len(TABLE_COLUMNS)
    cells = [fmt(r[m], 1 if m.startswith("psnr") else 3) for m in TABLE_COLUMNS]
    spi = r.get("seconds_per_image")
    return f"| {name} | " + " | ".join(cells) + (f" | {spi:.2f} |" if spi is not None else " | – |")


def _row_line(name: str, r: dict) -> str:
    src = f" Source: {r['source']}." if r.get("source") else ""
    return f"- `{name}`: {r['description']}.{src}"


def _per_label_lines(rows: dict) -> list[str]:
    """The per-label pathology AUC table of the computed rows that have one ([] when none has)."""
    per = {n: r["path_auc_per_label"] for n, r in rows.items() if r["status"] == "computed" and r["path_auc_per_label"]}
    if not per:
        return []
    labels = sorted({lab for d in per.values() for lab in d})
    return (["", "Pathology AUC per label (labels without both classes among the pairs are –):", "",
             "| row | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
            + [f"| {n} | " + " | ".join(fmt(d.get(lab, {})) for lab in labels) + " |" for n, d in per.items()])


def _ceiling_lines(ce: dict) -> list[str]:
    """The evaluators' own val scores on real images ([] when unknown)."""
    v, nan = ce.get("val", {}), float("nan")
    if not v:
        return []
    return ["", "Evaluator ceilings (the evaluators' own scores on REAL val images, assets/evaluators/metrics.json):", "",
            f"- pathology macro AUC {v.get('path_auc', nan):.3f} "
            f"(a source-only guess scores {ce.get('source_only_path_auc', {}).get('val', nan):.3f}); "
            f"sex AUC {v.get('sex_auc', nan):.3f}; age r {v.get('age_r', nan):.3f} "
            f"(MAE {v.get('age_mae', nan):.1f} y); re-id verification AUC "
            f"{v.get('verification_auc', nan):.3f}"]


def write_json(results: dict, path: Path) -> Path:
    def clean(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        return o
    path.write_text(json.dumps(clean(results), indent=2, default=str) + "\n")
    return path


def bar_chart(results: dict, path: Path) -> Path:
    """Grouped bars (one group per metric, one bar per computed row) with std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [n for n in results["row_order"] if results["rows"][n]["status"] == "computed"]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(rows))
    xs = np.arange(len(CHART_METRICS))
    for i, n in enumerate(rows):
        r = results["rows"][n]
        mean = [r[m]["mean"] if r[m]["mean"] is not None else np.nan for m in CHART_METRICS]
        std = [r[m]["std"] or 0.0 for m in CHART_METRICS]
        ax.bar(xs + (i - (len(rows) - 1) / 2) * width, mean, width, yerr=std, capsize=3, label=n)
    ax.set_xticks(xs, CHART_METRICS)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    lows = [results["rows"][n][m]["mean"] - results["rows"][n][m]["std"] for n in rows for m in CHART_METRICS
            if results["rows"][n][m]["mean"] is not None]
    ax.set_ylim(max(-1.0, min([0.0] + lows) - 0.05), 1.05)
    ax.set_ylabel("score (AUCs: 0.5 = chance)")
    ax.set_title(f"BiomedJourney evaluation, split {results['settings']['split']} "
                 f"({results['settings']['n_pairs']} pairs; error bars: std over samples)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_grid(samples: list[dict], columns: list[str], path: Path) -> Path:
    """One line per pair: [prior, real follow-up, generated rows...]; samples[i] = {'text', col: image}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, m = max(1, len(samples)), max(1, len(columns))
    fig, axes = plt.subplots(n, m, figsize=(2.1 * m, 2.5 * n), squeeze=False)
    for i, s in enumerate(samples):
        for j, c in enumerate(columns):
            ax = axes[i, j]
            ax.axis("off")
            if c in s and s[c] is not None:
                ax.imshow(s[c], cmap="gray", vmin=0, vmax=1)
            if i == 0:
                ax.set_title(c, fontsize=8)
        axes[i, 0].text(0, -0.02, textwrap.shorten(s.get("text", ""), 110), transform=axes[i, 0].transAxes,
                        fontsize=6, va="top", wrap=True)
    fig.suptitle("Generated images are SYNTHETIC (research only, not for diagnosis)", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.03, wspace=0.05, hspace=0.35)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
