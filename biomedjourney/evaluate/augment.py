"""Downstream augmentation test: does training on counterfactuals of the rare findings help a classifier?

    python -m biomedjourney.evaluate.augment --out assets/eval/augment [--model DIR] [--data DIR]
        [--findings Edema Effusion ...] [--rare-below 120] [--per-finding 24] [--steps 300]
        [--seeds 3] [--seed 0] [--resolution 128] [--threads 1]

The pathology classifier is the evaluator network (``evaluators.Evaluators``) trained from FRESH weights
with ``train/train_evaluators.py``'s ``fit`` (never the shipped assets/evaluators weights), on the train
split twice per seed, same TrainConfig (step budget) and seed (same initial weights, batches, augmentation):

    real                 the train-split images
    real+counterfactual  plus, per rare finding, --per-finding follow-ups generated through
                         ``service.generate_followups`` (the model's shipped defaults, one image per call,
                         seeds 0..N-1) from train-split priors labelled only "No Finding" (one per patient)

Rare findings: evaluator labels with < --rare-below known train positives that have a description in
FINDING_DESCRIPTIONS. A counterfactual row keeps its prior's patient (so the same person group: a
same-patient positive for the contrastive head, as the generator is meant to keep identity), source
(label masking stays right), sex and age; its labels are the prior's minus "No Finding" plus the finding.
The counterfactuals are generated once and cached in OUT/counterfactuals.npz (reused while the model,
priors, descriptions and seeds are the same). Reported: per-label validation AUC on real val-split
images, mean +/- std over seeds, and the paired difference (with - without) +/- its std over seeds.
Writes OUT/augment.json and OUT/augment.md.

Cost (CPU, 1 thread): generation ~2.4 s per image with the shipped defaults (3 findings x 24 = ~3 min,
once), then 2 conditions x seeds x steps at 0.5-1.5 s per step (3 seeds x 300 steps: 15-45 min).
``train.train_evaluators`` is imported lazily inside functions: train/ is part of the repository, not
of the wheel, so this command runs from the repository root.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_write
from ..config import write_json
from ..dataset import NO_FINDING, ImageRow
from .evaluators import OPACITY, EvaluatorConfig, label_targets
from .metrics import mean_std

REAL, AUGMENTED = "real", "real+counterfactual"
CONDITIONS = (REAL, AUGMENTED)
RARE_BELOW = 120      # known train-split positives below this: a rare finding
PER_FINDING = 24
CACHE_FILE = "counterfactuals.npz"
# evaluator label -> canonical descriptions that ask for it, used in turn (k-th counterfactual: k % len)
FINDING_DESCRIPTIONS = {
    "Edema": ("New pulmonary edema.",),
    "Effusion": ("New right pleural effusion.", "New left pleural effusion."),
    "Atelectasis": ("New right lower lobe atelectasis.", "New left lower lobe atelectasis."),
    "Pneumonia": ("New right lower lobe pneumonia.", "New left lower lobe pneumonia."),
    "Infiltration": ("New bilateral infiltrates.",),
    OPACITY: ("New right upper lobe consolidation.", "New left lower lobe consolidation."),
}
STD_NOTE = ("std: sample std (ddof=1) over training seeds (initial weights, batches, augmentation) on the one "
            "val split; delta = per-seed AUC(with) - AUC(without), paired by seed; it does not include the "
            "sampling noise of the few val positives")


@dataclass
class Job:
    """One counterfactual to generate: the prior, the finding it gains, the description asking for it, the seed."""
    prior: ImageRow
    finding: str
    description: str
    seed: int


@dataclass
class Data:
    """Training or scoring images with their rows: x (N, 1, R, R) float32 [0, 1] at the evaluators' resolution."""
    x: torch.Tensor
    rows: list


def _trainer():
    """train.train_evaluators (lazily: train/ is in the repository, not in the wheel)."""
    try:
        from train import train_evaluators
    except ImportError as e:
        raise ImportError("biomedjourney.evaluate.augment trains with train/train_evaluators.py: run it from the "
                          "repository root (python -m biomedjourney.evaluate.augment ...)") from e
    return train_evaluators


# ------------------------------------------------------------------------- which findings, which priors
def known_positives(rows, cfg: EvaluatorConfig) -> dict[str, int]:
    """{label: images whose label is known and positive} in cfg.labels order."""
    t = _trainer().targets(rows, cfg)
    pos = (t["path"] * t["path_known"]).sum(0)                                  # (L,)
    return {name: int(pos[j]) for j, name in enumerate(cfg.labels)}


def rare_findings(counts: dict[str, int], below: int = RARE_BELOW,
                  descriptions: dict = FINDING_DESCRIPTIONS) -> tuple[list[str], dict[str, str]]:
    """(labels with < below positives that have a description, {rare label without one: why skipped})."""
    rare = [n for n, c in counts.items() if c < below and n != NO_FINDING]
    skipped = {n: "no counterfactual description" for n in rare if n not in descriptions}
    return [n for n in rare if n in descriptions], skipped


def check_findings(findings: list[str], cfg: EvaluatorConfig) -> None:
    """ValueError naming findings that are no evaluator label or have no description."""
    bad = [f for f in findings if f not in cfg.labels or f not in FINDING_DESCRIPTIONS]
    if bad:
        raise ValueError(f"cannot augment {bad}: findings must be evaluator labels with a description, one of "
                         f"{sorted(set(cfg.labels) & set(FINDING_DESCRIPTIONS))}")


def _known(source: str, finding: str, cfg: EvaluatorConfig) -> bool:
    """Whether a source's images have the finding's label known (else its counterfactual would be masked out)."""
    return bool(label_targets([finding], source, dataclasses.replace(cfg, labels=(finding,)))[1][0])


def normal_priors(rows, finding: str, cfg: EvaluatorConfig) -> list[ImageRow]:
    """Train-split images labelled only "No Finding" whose source reports `finding`: one per patient, by image id."""
    out, seen = [], set()
    for r in sorted(rows, key=lambda r: r.image_id):
        if r.split == "train" and r.labels == [NO_FINDING] and r.patient_id not in seen \
                and _known(r.source, finding, cfg):
            seen.add(r.patient_id)
            out.append(r)
    return out


def plan_jobs(rows, findings: list[str], per_finding: int, cfg: EvaluatorConfig) -> list[Job]:
    """per_finding jobs per finding; finding i starts at prior i * per_finding (wrapping), so the findings use
    different priors while there are enough; seeds 0..per_finding-1, descriptions in turn."""
    jobs = []
    for i, f in enumerate(findings):
        pool = normal_priors(rows, f, cfg)
        if not pool:
            raise ValueError(f"no train-split 'No Finding' prior from a source that reports {f!r}")
        descs = FINDING_DESCRIPTIONS[f]
        jobs += [Job(pool[(i * per_finding + k) % len(pool)], f, descs[k % len(descs)], k) for k in range(per_finding)]
    return jobs


# ------------------------------------------------------------------------- counterfactual rows
def counterfactual_labels(labels: list[str], finding: str) -> list[str]:
    """The prior's labels minus "No Finding", plus the finding (once)."""
    out = [x for x in labels if x != NO_FINDING]
    return out if finding in out else out + [finding]


def counterfactual_row(job: Job, index: int) -> ImageRow:
    """The training row of a generated image: the prior's patient, source, sex, age; new labels and text."""
    p = job.prior
    return dataclasses.replace(p, image_id=f"cf{index:04d}:{p.image_id}", text=job.description, study_order="",
                               labels=counterfactual_labels(p.labels, job.finding), license="generated")


def cache_key(jobs: list[Job], model: str) -> dict:
    """What a cached counterfactuals.npz must match to be reused."""
    return {"model": str(model), "jobs": [[j.prior.image_id, j.finding, j.description, j.seed] for j in jobs]}


# ------------------------------------------------------------------------- generation (cached)
def generate(pipe, jobs: list[Job]) -> np.ndarray:
    """One service.generate_followups call per job (shipped defaults, num_images=1) -> (M, R, R) float32 [0, 1]."""
    from ..imaging import load_model_input
    from ..service import generate_followups
    out = []
    for j in tqdm(jobs, desc="counterfactuals"):
        prior = load_model_input(j.prior.path, pipe.resolution, pipe.config.aspect)   # (R, R)
        out.append(generate_followups(pipe, prior, j.description, seed=j.seed, num_images=1).images[0])
    return np.stack(out).astype(np.float32)                                           # (M, R, R)


def cached(path: Path, key: dict, make) -> tuple[np.ndarray, dict]:
    """(images, info): from `path` when its key matches, else ``make()`` (-> (M, R, R)) saved there atomically."""
    if path.is_file():
        with np.load(path) as z:
            if json.loads(str(z["key"])) == key:
                return z["images"], {"cached": True, "generation_seconds": float(z["seconds"])}
        print(f"{path}: made for other settings; generating again")
    t0 = time.time()
    images = make()
    secs = time.time() - t0

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, key=json.dumps(key), seconds=secs)
    atomic_write(path, write)
    return images, {"cached": False, "generation_seconds": secs}


# ------------------------------------------------------------------------- training and scoring
def combine(a: Data, b: Data) -> Data:
    return Data(torch.cat([a.x, b.x]), list(a.rows) + list(b.rows))                  # (Na + Nb, 1, R, R)


def train_and_score(data: Data, val: Data, cfg: EvaluatorConfig, tc) -> dict:
    """Fresh Evaluators (initial weights from tc.seed), ``fit`` on data, scores on the real val images."""
    from .evaluators import Evaluators
    te = _trainer()
    torch.manual_seed(tc.seed)
    model = Evaluators(cfg)
    groups, multi = te.patient_groups(data.rows)
    t0 = time.time()
    done = te.fit(model, data.x, te.targets(data.rows, cfg), groups, multi, tc, t0)
    s = te.scores_on(model, val.x, val.rows)
    keep = ("path_auc", "path_auc_per_label", "sex_auc", "age_r", "verification_auc")
    return {**{k: s[k] for k in keep}, "steps_done": done, "seconds": round(time.time() - t0, 1),
            "train_images": len(data.rows)}


def run_seeds(real: Data, extra: Data, val: Data, cfg: EvaluatorConfig, tc, seeds: list[int]) -> list[dict]:
    """[{seed, real: scores, real+counterfactual: scores}] with the same TrainConfig and seed per condition."""
    both = combine(real, extra)
    out = []
    for s in seeds:
        t = dataclasses.replace(tc, seed=s)
        out.append({"seed": s, REAL: train_and_score(real, val, cfg, t), AUGMENTED: train_and_score(both, val, cfg, t)})
    return out


# ------------------------------------------------------------------------- summary
def _finite_mean(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def compare(without: list[float], with_: list[float]) -> dict:
    """{without, with, delta}: mean_std of each over seeds; delta paired by seed (NaN pairs dropped)."""
    return {"without": mean_std(without), "with": mean_std(with_),
            "delta": mean_std([b - a for a, b in zip(without, with_)])}


def aggregate(per_seed: list[dict], labels: list[str], findings: list[str]) -> dict:
    """Per label, macro (all labels with an AUC) and rare macro (the augmented findings): compare() over seeds."""
    def per(cond: str, lab: str) -> list[float]:
        return [r[cond]["path_auc_per_label"][lab] for r in per_seed]
    rare = {c: [_finite_mean([r[c]["path_auc_per_label"][f] for f in findings]) for r in per_seed] for c in CONDITIONS}
    return {"per_label": {lab: compare(per(REAL, lab), per(AUGMENTED, lab)) for lab in labels},
            "macro": compare([r[REAL]["path_auc"] for r in per_seed], [r[AUGMENTED]["path_auc"] for r in per_seed]),
            "rare_macro": compare(rare[REAL], rare[AUGMENTED])}


def _fmt(ms: dict, sign: bool = False) -> str:
    if ms["mean"] is None:
        return "–"
    return f"{ms['mean']:{'+' if sign else ''}.3f} ± {ms['std']:.3f}"


def table(res: dict) -> str:
    """The markdown table: label | train positives | val positives | AUC without | AUC with | delta."""
    s, added = res["summary"], res["counterfactuals"]["per_finding"]
    lines = ["| label | n train positives | n val positives | AUC without | AUC with | Δ (with − without) |",
             "|---|---|---|---|---|---|"]
    for lab, c in s["per_label"].items():
        name = f"**{lab}**" if lab in added else lab
        n = f"{res['train_positives'][lab]}" + (f" (+{added[lab]} cf)" if lab in added else "")
        lines.append(f"| {name} | {n} | {res['val_positives'][lab]} | {_fmt(c['without'])} | {_fmt(c['with'])} | "
                     f"{_fmt(c['delta'], True)} |")
    for key, name in (("rare_macro", "macro, augmented findings"), ("macro", "macro, all labels")):
        c = s[key]
        lines.append(f"| *{name}* | | | {_fmt(c['without'])} | {_fmt(c['with'])} | {_fmt(c['delta'], True)} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    st = res["settings"]
    cf = res["counterfactuals"]
    lines = ["# Downstream augmentation test", "",
             f"Evaluator network trained from fresh weights on the train split ({res['train_images']} real images) "
             f"with and without {cf['n']} counterfactuals of the rare findings (bold), {st['steps']} steps, seeds "
             f"{st['seeds']}; per-label AUC on {res['val_images']} real val-split images, mean ± std over seeds.", "",
             table(res), "", f"{STD_NOTE}.", "",
             f"- Counterfactuals: {cf['per_finding']} from train-split 'No Finding' priors (one per patient), model "
             f"`{st['model']}` with its shipped sampler defaults; {'cached' if cf['cached'] else 'generated'} "
             f"({cf['generation_seconds']:.0f} s generation).",
             f"- Skipped rare labels: {res['skipped_findings'] or 'none'}.",
             f"- Steps done per run: {sorted(res['steps_done'])} (a run stopped by --max-minutes is not annealed).",
             f"- Wall time {res['wall_seconds']:.0f} s.",
             "- The classifier, the generator and the val split come from the SAME dataset; the few val positives "
             "of the rare findings make their AUCs coarse (see n val positives)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- CLI
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m biomedjourney.evaluate.augment", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="writes augment.json, augment.md, counterfactuals.npz")
    ap.add_argument("--model", default=None, help="generator folder (default: the shipped model)")
    ap.add_argument("--data", default=None, help="dataset folder (default $BIOMEDJOURNEY_DATA / ../shared/data/cxr)")
    ap.add_argument("--findings", nargs="+", default=None, help="labels to augment (default: the rare ones)")
    ap.add_argument("--rare-below", type=int, default=RARE_BELOW, help="rare: fewer known train positives than this")
    ap.add_argument("--per-finding", type=int, default=PER_FINDING, help="counterfactuals per finding")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per training run")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per condition (>= 3 for error bars)")
    ap.add_argument("--seed", type=int, default=0, help="first training seed: seeds are seed .. seed+S-1")
    ap.add_argument("--resolution", type=int, default=EvaluatorConfig.resolution, help="classifier input px")
    ap.add_argument("--max-minutes", type=float, default=30.0, help="safety stop per training run")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def _datasets(a: argparse.Namespace) -> tuple[list, list, EvaluatorConfig]:
    from .evaluators import observed_labels
    tr_rows, va_rows, _ = _trainer().split_rows(a.data)
    cfg = dataclasses.replace(EvaluatorConfig(resolution=a.resolution), observed=observed_labels(tr_rows))
    return tr_rows, va_rows, cfg


def _counterfactuals(a: argparse.Namespace, jobs: list[Job], cfg: EvaluatorConfig) -> tuple[Data, dict]:
    """The counterfactual training rows and images (cached in OUT), with how they were made."""
    from ..pipeline import BiomedJourneyPipeline, default_model_path
    from .evaluators import to_resolution
    model = a.model or str(default_model_path())
    images, info = cached(a.out / CACHE_FILE, cache_key(jobs, model),
                          lambda: generate(BiomedJourneyPipeline.from_pretrained(model, device="cpu"), jobs))
    x = to_resolution(torch.from_numpy(np.asarray(images, np.float32))[:, None], cfg.resolution)   # (M, 1, R, R)
    per = {f: sum(j.finding == f for j in jobs) for f in dict.fromkeys(j.finding for j in jobs)}
    info = {**info, "model": model, "n": len(jobs), "per_finding": per, "file": str(a.out / CACHE_FILE),
            "priors": [j.prior.image_id for j in jobs], "descriptions": [j.description for j in jobs],
            "generation_seeds": [j.seed for j in jobs]}
    return Data(x, [counterfactual_row(j, i) for i, j in enumerate(jobs)]), info


def _settings(a: argparse.Namespace, tc, findings: list[str], model: str) -> dict:
    return {"model": model, "data": a.data, "findings": findings, "rare_below": a.rare_below,
            "per_finding": a.per_finding, "steps": a.steps, "seeds": list(range(a.seed, a.seed + a.seeds)),
            "resolution": a.resolution, "threads": a.threads, "train_config": dataclasses.asdict(tc),
            "descriptions": {f: FINDING_DESCRIPTIONS[f] for f in findings},
            "counterfactual_group": "the prior's patient group (same-patient positive for the contrastive head)"}


def main(argv: list[str] | None = None) -> dict:
    from ..dataset import require_data
    a, t0 = parse(argv), time.time()
    require_data(a.data)  # exit 2 with where the data comes from
    torch.set_num_threads(a.threads)
    te = _trainer()
    tr_rows, va_rows, cfg = _datasets(a)
    counts = known_positives(tr_rows, cfg)
    findings, skipped = (a.findings, {}) if a.findings else rare_findings(counts, a.rare_below)
    check_findings(findings, cfg)
    extra, cf_info = _counterfactuals(a, plan_jobs(tr_rows, findings, a.per_finding, cfg), cfg)
    tc = te.TrainConfig(steps=a.steps, max_minutes=a.max_minutes, threads=a.threads)
    real = Data(te.load_arrays(tr_rows, cfg.resolution), tr_rows)                     # (N, 1, R, R)
    val = Data(te.load_arrays(va_rows, cfg.resolution), va_rows)
    per_seed = run_seeds(real, extra, val, cfg, tc, list(range(a.seed, a.seed + a.seeds)))
    res = {"settings": _settings(a, tc, findings, cf_info["model"]), "findings": findings, "skipped_findings": skipped,
           "train_images": len(tr_rows), "val_images": len(va_rows), "train_positives": counts,
           "val_positives": known_positives(va_rows, cfg), "counterfactuals": cf_info,
           "summary": aggregate(per_seed, list(cfg.labels), findings), "per_seed": per_seed,
           "steps_done": sorted({r[c]["steps_done"] for r in per_seed for c in CONDITIONS}),
           "std_definition": STD_NOTE, "wall_seconds": time.time() - t0}
    write_json(res, a.out / "augment.json")
    (a.out / "augment.md").write_text(markdown(res))
    print(table(res))
    return res


if __name__ == "__main__":
    main()
