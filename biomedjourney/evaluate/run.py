"""Run the battery: every row on the same pairs, with the same evaluators, in one process.

For each selected (prior, progression text, real follow-up) pair and each row, images are made
(generated rows: ``replicates`` samples per pair in one pipeline call, seeds ``base + k`` with the
same base for every row, so rows share their noise), scored by the evaluators, and the scores of
replicate k over all pairs give one value per metric; rows report mean ± std over replicates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..dataset import REPO_ROOT, data_root, has_data, load_pairs, missing_data_reason, patient_group
from ..imaging import load_model_input, to_model_input
from . import table
from .evaluators import Evaluators, evaluator_metrics, label_targets, load_evaluators
from .metrics import (change_magnitude, cmig, macro_auc, mean_std, pearson_r, reid_auc, roc_auc,
                      ssim_psnr)

REF_RES = 256  # the dataset's resolution: real rows are scored here


@dataclass
class EvalConfig:
    split: str = "val"                      # 'val' (split_of(patient) == 'val') | 'train' | 'all'
    replicates: int = 3                     # samples per pair for generated rows (--seeds)
    limit: int | None = None                # at most this many pairs (spread over patients first)
    include_no_text: bool = False           # also pairs without progression text (empty prompt)
    num_inference_steps: int | None = None  # None: each model's shipped default
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    scheduler: str | None = None
    strength: float | None = None           # None: each model's default (1 = from noise; <1 from the noised prior)
    negative_prompt: str | None = None      # None: each model's default ("" or the no-change text)
    change_transfer: bool | None = None     # None: each model's default (True: prior + the generated change)
    region: str | None = None               # None: each model's default ('auto': only the described region changes)
    render: bool | None = None              # None: each model's default (knowledge-driven rendering, harmonised)
    noise_opt_steps: int | None = None      # None: each model's default (initial-noise optimisation steps; 0 off)
    seed: int = 0                           # base of the per-pair generation seeds
    register: bool = True                   # also score against the registered follow-up
    grid_pairs: int = 4                     # pairs shown in samples.png
    rows: dict[str, str | None] = field(default_factory=dict)  # row -> model folder (text_only, single_stage, ...)
    shipped_baselines: bool = True          # rows not given use the baselines shipped in assets/baselines/


@dataclass
class PairData:
    pair_ids: list[str]
    prior_ids: list[str]
    groups: list[str]                  # patient groups (same person = same group)
    texts: list[str]
    prior: np.ndarray                  # (N, 256, 256) [0, 1]
    followup: np.ndarray               # (N, 256, 256)
    followup_reg: np.ndarray | None    # (N, 256, 256) follow-up registered onto the prior's frame
    path_y: np.ndarray                 # (N, L) follow-up labels
    path_known: np.ndarray             # (N, L)
    prior_y: np.ndarray                # (N, L) prior labels (for the changed-label AUC)
    prior_known: np.ndarray            # (N, L)
    sex: np.ndarray                    # (N,) 1 male, 0 female, NaN unknown
    age: np.ndarray                    # (N,) years at follow-up (else prior), NaN unknown


# ------------------------------------------------------------------------- pair selection
def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def select_pairs(data=None, split: str = "val", include_no_text: bool = False, limit: int | None = None):
    """Pairs of a split, ordered so that a --limit prefix covers as many patients as possible."""
    if split not in ("val", "train", "all"):
        raise ValueError(f"split must be 'val', 'train' or 'all', got {split!r}")
    pairs = [p for p in load_pairs(data) if (split == "all" or p.split == split)
             and (include_no_text or p.progression_text)]
    by_patient: dict[str, list] = {}
    for p in sorted(pairs, key=lambda p: _h(p.pair_id)):
        by_patient.setdefault(patient_group(p.patient_id), []).append(p)
    order = sorted(by_patient, key=_h)
    out = [by_patient[g][k] for k in range(max((len(v) for v in by_patient.values()), default=0))
           for g in order if k < len(by_patient[g])]  # round-robin over patients
    return out[:limit] if limit else out


def _registrar():
    """biomedjourney.register.register, or None (with the reason) when SimpleITK is missing."""
    import importlib.util

    if importlib.util.find_spec("SimpleITK") is None:
        return None, "SimpleITK is not installed (pip install SimpleITK)"
    from ..register import register
    return register, ""


def load_row(row, res: int = 256) -> np.ndarray:
    """A dataset image (an ImageRow) as the models see it: (res, res) float32 in [0, 1]."""
    return load_model_input(row.path, res)


def load_pair_data(pairs, ev: Evaluators, register: bool = True) -> tuple[PairData, str]:
    """Images and targets of the pairs; the follow-up is registered onto the PRIOR (model-independent)."""
    reg_fn, reason = _registrar() if register else (None, "registration disabled (--no-register-metrics)")
    prior, followup, followup_reg = _load_images(pairs, reg_fn)
    path_y, path_known = _label_targets(pairs, "followup", ev)
    prior_y, prior_known = _label_targets(pairs, "prior", ev)
    return PairData(
        pair_ids=[p.pair_id for p in pairs], prior_ids=[p.prior.image_id for p in pairs],
        groups=[patient_group(p.patient_id) for p in pairs], texts=[p.progression_text for p in pairs],
        prior=prior, followup=followup, followup_reg=followup_reg,
        path_y=path_y, path_known=path_known, prior_y=prior_y, prior_known=prior_known,
        sex=_sex(pairs), age=_age(pairs)), reason


def _load_images(pairs, reg_fn) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(priors, follow-ups, follow-ups registered onto their priors or None), each (N, REF_RES, REF_RES)."""
    pri, fol, reg = [], [], []
    for p in tqdm(pairs, desc="load pairs" + (" + register" if reg_fn else ""), leave=False):
        a, b = load_row(p.prior, REF_RES), load_row(p.followup, REF_RES)
        pri.append(a)
        fol.append(b)
        if reg_fn is not None:
            reg.append(reg_fn(b, a).registered)  # register(moving=follow-up, fixed=prior)
    return np.stack(pri), np.stack(fol), np.stack(reg) if reg else None


def _label_targets(pairs, image: str, ev: Evaluators) -> tuple[np.ndarray, np.ndarray]:
    """(labels, known) of each pair's ``image`` ('prior' or 'followup'), (N, L) each."""
    yk = [label_targets(getattr(p, image).labels, getattr(p, image).source, ev.cfg) for p in pairs]
    return np.stack([y for y, _ in yk]), np.stack([k for _, k in yk])


def _sex(pairs) -> np.ndarray:
    """(N,) 1 male, 0 female, NaN unknown: the follow-up's, else the prior's."""
    return np.array([{"M": 1.0, "F": 0.0}.get(p.followup.sex or p.prior.sex, np.nan) for p in pairs])


def _age(pairs) -> np.ndarray:
    """(N,) years at follow-up, else at the prior; NaN unknown."""
    ages = [p.followup.age if p.followup.age is not None else p.prior.age for p in pairs]
    return np.array([np.nan if a is None else a for a in ages], np.float64)


def resize_stack(x: np.ndarray, res: int) -> np.ndarray:
    """(N, H, W) -> (N, res, res) exactly as models see inputs (8-bit Lanczos, to_model_input)."""
    return x if x.shape[-1] == res else np.stack([to_model_input(a, res) for a in x])


# ------------------------------------------------------------------------- scoring
class Scorer:
    """Scores image sets (one per replicate) of the pairs; caches prior predictions per resolution."""

    def __init__(self, ev: Evaluators, pd: PairData):
        self.ev, self.pd = ev, pd
        self._cache: dict[int, tuple] = {}

    def refs(self, res: int):
        if res not in self._cache:
            pd = self.pd
            prior = resize_stack(pd.prior, res)
            reg = resize_stack(pd.followup_reg, res) if pd.followup_reg is not None else None
            self._cache[res] = (prior, resize_stack(pd.followup, res), reg, self.ev.predict(prior).embedding)
        return self._cache[res]

    def score(self, images: np.ndarray) -> dict:
        """images: (N, R, R) [0, 1], row i for pair i -> one value per metric (+ per-label AUCs)."""
        pd, res = self.pd, images.shape[-1]
        prior, fol, reg, prior_emb = self.refs(res)
        pred = self.ev.predict(images)
        path, per = macro_auc(pd.path_y, pred.pathology, pd.path_known, self.ev.cfg.labels)
        # only (pair, label) entries whose label differs between prior and follow-up: copying the prior
        # scores below 0.5 here, following the text scores above
        changed = pd.path_known & pd.prior_known & (pd.path_y != pd.prior_y)
        path_changed, _ = macro_auc(pd.path_y, pred.pathology, changed, self.ev.cfg.labels)
        ms, ma = ~np.isnan(pd.sex), ~np.isnan(pd.age)
        sex = roc_auc(pd.sex[ms], pred.sex[ms])
        age_r = pearson_r(pred.age[ma], pd.age[ma])
        s, p = ssim_psnr(images, fol)
        out = {"path_auc": path, "path_auc_changed": path_changed, "sex_auc": sex, "age_r": age_r,
               "cmig": cmig(path, sex, age_r),
               "age_mae": float(np.abs(pred.age[ma] - pd.age[ma]).mean()) if ma.any() else math.nan,
               "reid_auc": reid_auc(pred.embedding, prior_emb, pd.groups, pd.prior_ids),
               "ssim": float(s.mean()), "psnr": float(p.mean()),
               "change": float(change_magnitude(images, prior).mean()), "per_label": per}
        if reg is not None:
            s, p = ssim_psnr(images, reg)
            out.update(ssim_reg=float(s.mean()), psnr_reg=float(p.mean()))
        return out


def aggregate(row: str, per_rep: list[dict], extra: dict) -> dict:
    d = {m: mean_std([r.get(m, math.nan) for r in per_rep]) for m in table.METRICS}
    labels = per_rep[0]["per_label"] if per_rep else {}
    d["path_auc_per_label"] = {lab: mean_std([r["per_label"][lab] for r in per_rep]) for lab in labels}
    d["n_replicates"] = len(per_rep)
    d.update(extra)
    return table.finish_row(row, d)


# ------------------------------------------------------------------------- generation
def pair_seed(base: int, pair_id: str) -> int:
    """The first generation seed of a pair (replicate k uses seed + k): the same for every row."""
    return (base * 1_000_003 + _h(pair_id)) % (2 ** 31 - 64)


def generate_row(pipe, pd: PairData, cfg: EvalConfig, text_only: bool, desc: str) -> tuple[np.ndarray, float]:
    """(replicates, N, R, R) images and generation seconds."""
    from ..service import generate_followups
    t0, reps = time.time(), []
    sampler = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   image_guidance_scale=cfg.image_guidance_scale, scheduler=cfg.scheduler, strength=cfg.strength,
                   negative_prompt=cfg.negative_prompt, change_transfer=cfg.change_transfer)
    for i in tqdm(range(len(pd.pair_ids)), desc=desc):
        seed = pair_seed(cfg.seed, pd.pair_ids[i])
        if text_only:  # no prior: nothing to restrict, the pipeline itself
            images = pipe(None, pd.texts[i], num_images=cfg.replicates, seed=seed, **sampler).images
        else:          # what a user gets: the service (edit region from the findings, optional rendering)
            images = generate_followups(pipe, pd.prior[i], pd.texts[i], seed=seed, num_images=cfg.replicates,
                                        sampler=sampler, region=cfg.region, render=cfg.render,
                                        noise_opt_steps=cfg.noise_opt_steps).images
        reps.append(np.stack(images))                                      # (K, R, R)
    return np.stack(reps, 1), time.time() - t0                             # (K, N, R, R)


def _load_pipe(path):
    from ..pipeline import BiomedJourneyPipeline
    return BiomedJourneyPipeline.from_pretrained(str(path))  # CUDA (fp16) when available, else CPU


# ------------------------------------------------------------------------- the battery
NOTES = (
    "CMIG = sqrt(PathAUC * sqrt(SexAUC * max(AgeR, 0))): the BiomedJourney paper's combination of pathology "
    "AUC with race AUC and age correlation as reported in secondary sources, with sex AUC in place of race "
    "(the dataset has no race); negative age r is clamped to 0. All components are reported.",
    "copy_prior is a strong CMIG baseline: CMIG rewards keeping the patient, and labels often persist "
    "from prior to follow-up, so path_auc is high without following the text. path_auc_changed (labels "
    "that change between prior and follow-up) is the component that requires following the text: "
    "copying the prior scores far below 0.5 there.",
    "Pathology AUC uses the follow-up's labels; a label counts only for sources that report it "
    "(e.g. COVID-19 is unknown, not negative, for nih) and only when both classes occur among the pairs.",
    "Re-identification: cosine similarity of evaluator embeddings; negatives are the distinct priors of "
    "other patients (same-person groups count as one patient).",
    "SSIM/PSNR 'reg': the real follow-up is affinely registered onto the prior's frame (the frame generated "
    "images are in), independently of any model.",
    "Evaluators are small CNNs trained in this project on the train split; see evaluator_ceilings for "
    "their own scores on real val images.",
)


def evaluate(model=None, data=None, out="outputs/eval", cfg: EvalConfig | None = None,
             evaluators: Evaluators | str | None = None) -> dict:
    """Measure every row and write results.json, results.md, results.png and samples.png into ``out``."""
    cfg, t_start = cfg or EvalConfig(), time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not has_data(data):
        raise FileNotFoundError(missing_data_reason(data))
    in_memory = isinstance(evaluators, Evaluators)
    ev = evaluators if in_memory else load_evaluators(evaluators)
    pairs = _pairs_to_evaluate(data, cfg)
    pd, reg_reason = load_pair_data(pairs, ev, cfg.register)
    paths = _row_paths(model, cfg)
    battery = _Battery(pd, Scorer(ev, pd), cfg)
    rows = {**battery.reference_rows(), **battery.generated_rows(paths)}
    results = {
        "rows": {r: rows[r] for r in table.ROWS},
        "row_order": list(table.ROWS),
        "metrics": dict(table.METRICS),
        "evaluator_ceilings": {} if in_memory else evaluator_metrics(evaluators),
        "settings": _settings(cfg, paths, data, pd, ev, evaluators, reg_reason, t_start),
        "notes": list(NOTES),
    }
    _write_results(results, battery.grid, out)
    return results


def _pairs_to_evaluate(data, cfg: EvalConfig) -> list:
    pairs = select_pairs(data, cfg.split, cfg.include_no_text, cfg.limit)
    if len(pairs) < 2:
        raise ValueError(f"Only {len(pairs)} pair(s) in split {cfg.split!r} of {data_root(data)} "
                         f"(text required: {not cfg.include_no_text}); need >= 2. Try --split all or --include-no-text.")
    return pairs


def _row_paths(model, cfg: EvalConfig) -> dict:
    """Row -> model folder: 'full' is ``model`` (default: the shipped model) unless --row full= says
    otherwise; then the --row folders, then the shipped baselines for rows not given."""
    from ..pipeline import default_model_path

    model_path = Path(model) if model else default_model_path()
    paths = {"full": cfg.rows.get("full") or model_path, **{k: v for k, v in cfg.rows.items() if k != "full"}}
    for row in table.DEFAULT_ROW_PATHS if cfg.shipped_baselines else ():  # the shipped baseline models
        if row not in paths and (REPO_ROOT / table.EXPORTS[row]).is_dir():
            paths[row] = REPO_ROOT / table.EXPORTS[row]
    return paths


def _present(path) -> bool:
    return path is not None and Path(path).is_dir()


class _Battery:
    """The rows of one run on shared pairs and scorer; each generated row adds its first replicate to
    the sample grid."""

    def __init__(self, pd: PairData, scorer: Scorer, cfg: EvalConfig):
        self.pd, self.scorer, self.cfg = pd, scorer, cfg
        self.grid = [{"text": pd.texts[i], "prior": pd.prior[i], "real follow-up": pd.followup[i]}
                     for i in range(min(cfg.grid_pairs, len(pd.pair_ids)))]

    def reference_rows(self) -> dict[str, dict]:
        """The dataset's own follow-ups and priors: no model, one "replicate" (deterministic)."""
        n = len(self.pd.pair_ids)
        return {"real_followup": aggregate("real_followup", [self.scorer.score(self.pd.followup)], {
                    "source": "dataset follow-up images", "n_pairs": n}),
                "copy_prior": aggregate("copy_prior", [self.scorer.score(self.pd.prior)], {
                    "source": "dataset prior images", "n_pairs": n})}

    def generated_rows(self, paths: dict) -> dict[str, dict]:
        """text_only, the ablations and full, each measured or 'not computed' with the reason."""
        rows = {"text_only": self._text_only_row(paths)}
        for row in ("single_stage", "no_registration"):
            rows[row] = self._ablation_row(row, paths.get(row))
        full = paths["full"]
        rows["full"] = (self.model_row("full", full, False, f"model {full}") if _present(full)
                        else table.not_computed("full", f"no model folder at {full}"))
        return rows

    def _text_only_row(self, paths: dict) -> dict:
        """A stage-1 model when given, else the full model with the prior dropped."""
        full, stage1 = paths["full"], paths.get("text_only")
        if _present(stage1):
            return self.model_row("text_only", stage1, True, f"stage-1 model {stage1} (prior=None)")
        if _present(full):
            return self.model_row("text_only", full, True, f"full model {full} with the prior dropped (prior=None)")
        return table.not_computed("text_only", f"no model folder at {full} (nor --row text_only=PATH)")

    def _ablation_row(self, row: str, path) -> dict:
        if _present(path):
            return self.model_row(row, path, False, f"model {path}")
        return table.not_computed(row, f"no model folder at {path}" if path else
                                  f"no --row {row}=PATH and nothing at {table.EXPORTS[row]}")

    def model_row(self, row: str, path, text_only: bool, source: str) -> dict:
        pipe = _load_pipe(path)
        imgs, secs = generate_row(pipe, self.pd, self.cfg, text_only, desc=row)      # (K, N, R, R)
        per_rep = [self.scorer.score(imgs[k]) for k in range(len(imgs))]
        for i, s in enumerate(self.grid):
            s[row] = imgs[0, i]
        return aggregate(row, per_rep, {
            "source": source, "model": str(path), "n_pairs": len(self.pd.pair_ids), "seconds": round(secs, 1),
            "seconds_per_image": secs / imgs.shape[0] / imgs.shape[1], "resolution": int(imgs.shape[-1])})


def _settings(cfg: EvalConfig, paths: dict, data, pd: PairData, ev: Evaluators, evaluators, reg_reason: str,
              t_start: float) -> dict:
    in_memory = isinstance(evaluators, Evaluators)
    return {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "rows"},
            "rows": {k: str(v) for k, v in paths.items()}, "data": str(data_root(data)),
            "n_pairs": len(pd.pair_ids), "n_patients": len(set(pd.groups)),
            "evaluators": "in-memory" if in_memory else str(evaluators or "assets/evaluators"),
            "evaluator_labels": list(ev.cfg.labels),
            "registration": "follow-up registered onto the prior (biomedjourney/register.py, affine) " +
                            ("" if pd.followup_reg is not None else f"- not computed: {reg_reason}"),
            "seconds_total": round(time.time() - t_start, 1)}


def _write_results(results: dict, grid: list[dict], out: Path) -> None:
    """results.json, results.md, results.png and samples.png (the computed generated rows) in ``out``."""
    table.write_json(results, out / "results.json")
    table.write_markdown(results, out / "results.md")
    table.bar_chart(results, out / "results.png")
    rows = results["rows"]
    cols = ["prior", "real follow-up"] + [r for r in table.GENERATED_ROWS if rows[r]["status"] == "computed"]
    table.sample_grid(grid, cols, out / "samples.png")
