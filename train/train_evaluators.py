"""Train the evaluator CNN (pathology, sex, age, re-identification) on the TRAIN split.

    python train/train_evaluators.py [--data DIR] [--out assets/evaluators]
        [--steps 900] [--max-minutes 12] [--seed 0] [--threads 1]

Deterministic for a seed and thread count (CPU). Only patients with split_of(id) == 'train'
train; the VAL split gives the evaluators' own scores on real images (their ceilings), written
to OUT/metrics.json. Licence note: the ieee8023 training rows include CC BY-NC(-SA/-ND) and
unlicensed images; these weights are evaluation tools only, never part of the shipped generator.
The evaluators themselves (network, loading, scoring) are ``biomedjourney.evaluate.evaluators``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `train` and `biomedjourney` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from biomedjourney.dataset import (data_root, has_data, load_images, load_pairs, missing_data_reason, patient_group,
                                   require_data)
from biomedjourney.evaluate.evaluators import (ASSETS_EVALUATORS, EvaluatorConfig, Evaluators, label_targets,
                                               observed_labels, save_evaluators, standardise, to_resolution)
from biomedjourney.evaluate.metrics import macro_auc, pearson_r, reid_auc, roc_auc, verification_auc
from biomedjourney.imaging import load_model_input

FRAME = 256  # px: the dataset's (and the generator's) frame; the evaluators resize it to their resolution


@dataclass
class TrainConfig:
    steps: int = 600              # optimizer steps (0.5-1.5 s each at 128 px, 1 thread, shared CPU)
    batch_pairs: int = 12         # patients with >= 2 images per batch, 2 images each (contrastive positives)
    batch_singles: int = 40       # plus this many random images
    lr: float = 2e-3              # AdamW peak, linear warm-up then cosine decay
    warmup: int = 50
    weight_decay: float = 5e-4
    temperature: float = 0.1      # supervised contrastive loss (Khosla et al. 2020)
    w_pathology: float = 1.0      # loss weights
    w_sex: float = 0.5
    w_age: float = 2.0            # smooth-L1 on years / age_scale
    w_embed: float = 0.5
    rotate_deg: float = 5.0       # augmentation: small affine ...
    scale: float = 0.06
    shift: float = 0.05           # fraction of the image
    gamma: float = 0.2            # ... and brightness curve x ** exp(U(-g, g))
    noise: float = 0.01           # additive Gaussian noise std
    seed: int = 0
    threads: int = 1
    max_minutes: float = 30.0     # safety stop (and still save) after this wall time; the cosine
                                  # schedule assumes all `steps` run, so a stopped run is not annealed


# ------------------------------------------------------------------------- data
def load_arrays(rows, resolution: int) -> torch.Tensor:
    """ImageRows -> (N, 1, R, R) float32 in [0, 1]: ``imaging.load_model_input`` at the 256 px frame
    (what the generator outputs and the battery scores), then the evaluators' own resize
    (``evaluators.to_resolution``, as ``Evaluators.preprocess`` does when scoring)."""
    imgs = [load_model_input(r.path, FRAME) for r in tqdm(rows, desc="load images", leave=False)]
    return to_resolution(torch.from_numpy(np.stack(imgs))[:, None], resolution)   # (N, 1, R, R)


def targets(rows, cfg: EvaluatorConfig) -> dict[str, torch.Tensor]:
    yk = [label_targets(r.labels, r.source, cfg) for r in rows]
    sex = np.array([{"M": 1.0, "F": 0.0}.get(r.sex, np.nan) for r in rows], np.float32)
    age = np.array([np.nan if r.age is None else r.age for r in rows], np.float32)
    return {"path": torch.from_numpy(np.stack([a for a, _ in yk])), "path_known": torch.from_numpy(np.stack([b for _, b in yk])),
            "sex": torch.from_numpy(sex), "age": torch.from_numpy(age)}


def augment(x: torch.Tensor, tc: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Small random affine + brightness curve + noise on (B, 1, R, R) [0, 1] images."""
    b = len(x)
    u = lambda: torch.rand(b, generator=g) * 2 - 1  # noqa: E731 - U(-1, 1) per image
    ang, sc = u() * math.radians(tc.rotate_deg), 1 + u() * tc.scale
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, u() * tc.shift * 2], 1),
                         torch.stack([sin, cos, u() * tc.shift * 2], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    x = x.clamp(1e-4, 1) ** torch.exp(u() * tc.gamma)[:, None, None, None]
    return x + torch.randn(x.shape, generator=g) * tc.noise


def supcon_loss(emb: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over (B, D) unit embeddings; same group = positive."""
    sim = emb @ emb.T / temperature                                        # (B, B)
    eye = torch.eye(len(emb), dtype=torch.bool)
    pos = (groups[:, None] == groups[None, :]) & ~eye
    logp = sim.masked_fill(eye, -1e9).log_softmax(1)
    has = pos.any(1)
    if not has.any():
        return emb.sum() * 0
    return -((logp * pos).sum(1)[has] / pos.sum(1)[has]).mean()


def sample_batch(multi: list[list[int]], n: int, tc: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Indices: batch_pairs patients x 2 distinct images + batch_singles random images."""
    idx = []
    for p in rng.choice(len(multi), size=min(tc.batch_pairs, len(multi)), replace=False):
        idx += list(rng.choice(multi[p], size=2, replace=False))
    idx += list(rng.integers(0, n, size=tc.batch_singles))
    return np.array(idx)


# ------------------------------------------------------------------------- scores on real images
@torch.no_grad()
def scores_on(model: Evaluators, x: torch.Tensor, rows, pairs=None, index=None) -> dict:
    """The evaluators' own scores on real images (rows) and, with pairs, follow-up -> prior re-id."""
    cfg = model.cfg
    pred = model.predict(x[:, 0])
    t = targets(rows, cfg)
    path, per = macro_auc(t["path"].numpy(), pred.pathology, t["path_known"].numpy(), cfg.labels)
    sex_ok = ~np.isnan(t["sex"].numpy())
    age_ok = ~np.isnan(t["age"].numpy())
    out = {"images": len(rows), "path_auc": path, "path_auc_per_label": per,
           "path_positives": {n: int(t["path"][:, j][t["path_known"][:, j]].sum()) for j, n in enumerate(cfg.labels)},
           "sex_auc": roc_auc(t["sex"].numpy()[sex_ok], pred.sex[sex_ok]),
           "age_r": pearson_r(pred.age[age_ok], t["age"].numpy()[age_ok]),
           "age_mae": float(np.abs(pred.age[age_ok] - t["age"].numpy()[age_ok]).mean()) if age_ok.any() else float("nan"),
           "verification_auc": verification_auc(pred.embedding, [patient_group(r.patient_id) for r in rows])}
    if pairs:
        pi = [index[p.prior.image_id] for p in pairs]
        fi = [index[p.followup.image_id] for p in pairs]
        out["reid_auc_followup_vs_prior"] = reid_auc(pred.embedding[fi], pred.embedding[pi],
                                                     [patient_group(p.patient_id) for p in pairs],
                                                     [p.prior.image_id for p in pairs])
        out["pairs"] = len(pairs)
    return out


def source_only_auc(train_rows, rows, cfg: EvaluatorConfig) -> float:
    """Macro pathology AUC of a 'classifier' that only knows the image's source (train prevalence):
    how much of the pathology AUC the dataset's source/label confounding gives for free."""
    t_tr, t = targets(train_rows, cfg), targets(rows, cfg)
    src_tr = np.array([r.source for r in train_rows])
    prev = {}
    for s in set(src_tr):
        m = src_tr == s
        prev[s] = t_tr["path"].numpy()[m].mean(0)
    scores = np.stack([prev.get(r.source, np.zeros(len(cfg.labels))) for r in rows])
    return macro_auc(t["path"].numpy(), scores, t["path_known"].numpy(), cfg.labels)[0]


# ------------------------------------------------------------------------- training
def split_rows(data=None) -> tuple[list, list, list]:
    """(train ImageRows, val ImageRows, val PairRows) of a dataset folder; errors when it is absent or too small."""
    if not has_data(data):
        raise FileNotFoundError(missing_data_reason(data))
    images = load_images(data)
    pairs = load_pairs(data, images)
    tr_rows = [r for r in images.values() if r.split == "train"]
    va_rows = [r for r in images.values() if r.split == "val"]
    if len(tr_rows) < 16:
        raise ValueError(f"Only {len(tr_rows)} train-split images in {data_root(data)}; need >= 16 to train evaluators")
    return tr_rows, va_rows, [p for p in pairs if p.split == "val"]


def patient_groups(rows) -> tuple[torch.Tensor, list[list[int]]]:
    """Per row the id of its same-person group, and the row indices of every group with >= 2 images."""
    names = [patient_group(r.patient_id) for r in rows]
    gid = {g: i for i, g in enumerate(dict.fromkeys(names))}
    groups = torch.tensor([gid[g] for g in names])
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        by_group.setdefault(g, []).append(i)
    return groups, [v for v in by_group.values() if len(v) >= 2]


def batch_losses(model: Evaluators, x: torch.Tensor, t: dict, groups: torch.Tensor, tc: TrainConfig) -> dict:
    """The four head losses on a standardised batch x with targets t (rows already indexed): unknown
    pathology labels, sexes and ages are masked out."""
    o = model(x)
    yk = t["path_known"].float()
    bce = F.binary_cross_entropy_with_logits(o["pathology"], t["path"], reduction="none")  # (B, L)
    sex, age = t["sex"], t["age"]
    ms, ma = ~torch.isnan(sex), ~torch.isnan(age)
    return {
        "path": (bce * yk).sum() / yk.sum().clamp_min(1),
        "sex": F.binary_cross_entropy_with_logits(o["sex"][ms], sex[ms]) if ms.any() else o["sex"].sum() * 0,
        "age": (F.smooth_l1_loss(o["age"][ma], age[ma] / model.cfg.age_scale, beta=0.05) if ma.any()
                else o["age"].sum() * 0),
        "emb": supcon_loss(o["embedding"], groups, tc.temperature),
    }


def fit(model: Evaluators, x_tr: torch.Tensor, t_tr: dict, groups: torch.Tensor, multi: list[list[int]],
        tc: TrainConfig, t0: float) -> int:
    """AdamW with linear warm-up and cosine decay over tc.steps; stops early after tc.max_minutes
    (counted from t0). Returns the number of steps done; the model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    def lr_factor(s: int) -> float:  # linear warm-up, cosine decay to 0 at tc.steps
        return min(1.0, (s + 1) / tc.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, tc.steps) / tc.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng, g = np.random.default_rng(tc.seed), torch.Generator().manual_seed(tc.seed)
    model.train()
    bar = tqdm(range(tc.steps), desc="train evaluators")
    done = 0
    for step in bar:
        idx = torch.from_numpy(sample_batch(multi, len(x_tr), tc, rng))
        x = standardise(augment(x_tr[idx], tc, g))                        # (B, 1, R, R)
        parts = batch_losses(model, x, {k: v[idx] for k, v in t_tr.items()}, groups[idx], tc)
        loss = (tc.w_pathology * parts["path"] + tc.w_sex * parts["sex"] + tc.w_age * parts["age"]
                + tc.w_embed * parts["emb"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if step % 10 == 0:
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        if tc.max_minutes and time.time() - t0 > tc.max_minutes * 60:
            tqdm.write(f"stopping at step {done}/{tc.steps}: --max-minutes {tc.max_minutes} reached")
            break
    model.eval()
    return done


def _summary(out, metrics: dict, seconds: float) -> str:
    v = metrics["val"]
    return (f"saved {out} after {metrics['training']['steps_done']} steps in {seconds / 60:.1f} min | val: path AUC "
            f"{v['path_auc']:.3f} (source-only {metrics['source_only_path_auc']['val']:.3f}), sex AUC "
            f"{v['sex_auc']:.3f}, age r {v['age_r']:.3f} (MAE {v['age_mae']:.1f} y), re-id verification AUC "
            f"{v['verification_auc']:.3f}, follow-up->prior re-id AUC "
            f"{v.get('reid_auc_followup_vs_prior', float('nan')):.3f}")


def train(data=None, out=ASSETS_EVALUATORS, tc: TrainConfig | None = None,
          cfg: EvaluatorConfig | None = None) -> dict:
    tc, t0 = tc or TrainConfig(), time.time()
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    tr_rows, va_rows, va_pairs = split_rows(data)
    cfg = dataclasses.replace(cfg or EvaluatorConfig(), observed=observed_labels(tr_rows))
    model = Evaluators(cfg)
    x_tr = load_arrays(tr_rows, cfg.resolution)                            # (N, 1, R, R)
    groups, multi = patient_groups(tr_rows)
    done = fit(model, x_tr, targets(tr_rows, cfg), groups, multi, tc, t0)
    train_s = time.time() - t0

    x_va = load_arrays(va_rows, cfg.resolution)
    metrics = {
        "note": ("Evaluator scores on REAL images: the ceilings the generated images are measured against. "
                 "'val' = patients with split_of(id) == 'val' (never trained on). Pathology labels are confounded "
                 "with the data source (hannover = all COVID-19, nih = No Finding/Pneumonia, ieee8023 = mostly "
                 "COVID-19): 'source_only_path_auc' is what knowing only the source scores."),
        "val": scores_on(model, x_va, va_rows, va_pairs, {r.image_id: i for i, r in enumerate(va_rows)}),
        "train": scores_on(model, x_tr, tr_rows),
        "source_only_path_auc": {"val": source_only_auc(tr_rows, va_rows, cfg)},
        "training": {"steps_done": done, "seconds": round(train_s, 1), "train_images": len(tr_rows),
                     "train_patients_with_2plus_images": len(multi), "val_images": len(va_rows),
                     "val_pairs": len(va_pairs), "data": str(data_root(data)), "config": dataclasses.asdict(tc),
                     "licence": "includes NC/unlicensed ieee8023 rows: evaluation-only weights, not redistributed as a generator"},
    }
    save_evaluators(model, out, metrics)
    print(_summary(out, metrics, train_s))
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="dataset folder (default: $BIOMEDJOURNEY_DATA or ../shared/data/cxr)")
    ap.add_argument("--out", default=str(ASSETS_EVALUATORS))
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--max-minutes", type=float, default=d.max_minutes)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--resolution", type=int, default=EvaluatorConfig.resolution)
    a = ap.parse_args(argv)
    require_data(a.data)  # exit 2 with where the data comes from
    tc = dataclasses.replace(d, steps=a.steps, max_minutes=a.max_minutes, seed=a.seed, threads=a.threads)
    train(a.data, Path(a.out), tc, EvaluatorConfig(resolution=a.resolution))


if __name__ == "__main__":
    main()
