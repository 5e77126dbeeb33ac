"""Evaluator networks: one small CNN backbone with four heads, trained in this project.

No pretrained chest X-ray classifiers are available offline, so the battery trains its own
(`python train/train_evaluators.py`, in the repository) on the TRAIN split of the shared dataset:

    pathology  multi-label logits over ``labels`` (incl. an "Opacity (any)" aggregate)
    sex        one logit, P(male)
    age        years (regression; nih + ieee8023 ages, hannover ages are redacted)
    embedding  L2-normalised patient re-identification vector (supervised contrastive)

Inputs are (H, W) images in [0, 1] at any size: resized (antialiased) to ``resolution`` and
standardised per image (zero mean, unit std), so global brightness/contrast shifts of a
generator do not move the scores. The evaluators are not part of the shipped generator; their
training images include NC-licensed ieee8023 rows (allowed for evaluation-only weights here).

Folder: ``config.json`` (EvaluatorConfig) + ``evaluators.safetensors`` (fp16) + ``metrics.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import atomic_write, write_text

ASSETS_EVALUATORS = Path(__file__).resolve().parents[2] / "assets" / "evaluators"
WEIGHTS_FILE = "evaluators.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
TRAIN_COMMAND = "python train/train_evaluators.py --out assets/evaluators"  # in the repository: train/ is not installed

OPACITY = "Opacity (any)"
# Opacity-type findings: airspace disease of any cause (the "lung opacity" grouping of CheXpert /
# RSNA, extended with the ieee8023 pneumonia aetiologies).
OPACITY_MEMBERS = (
    "Pneumonia", "Infiltration", "Consolidation", "COVID-19", "ARDS", "SARS", "MERS",
    "Pneumocystis", "Klebsiella", "Legionella", "Streptococcus", "Staphylococcus", "E.Coli",
    "Varicella", "Influenza", "Bacterial", "Viral", "Fungal", "Mycoplasma", "Chlamydophila",
    "Aspergillosis", "Nocardia", "Lipoid", "Tuberculosis",
)
DEFAULT_LABELS = ("No Finding", "Pneumonia", "COVID-19", "Infiltration", "Atelectasis", "Edema",
                  "Effusion", OPACITY)


@dataclass
class EvaluatorConfig:
    resolution: int = 128                          # px: inputs are resized to this square
    channels: tuple[int, ...] = (24, 32, 64, 128, 192)  # stem, then one stride-2 residual stage each
    embed_dim: int = 64                            # re-identification embedding size
    labels: tuple[str, ...] = DEFAULT_LABELS       # pathology heads, in order
    opacity_members: tuple[str, ...] = OPACITY_MEMBERS
    # source -> labels that source ever reports: elsewhere a label is unknown (masked), not negative
    # (hannover only says COVID-19; nih predates COVID-19 but has no such label). Sources not listed
    # (new data folders) treat every label as reported.
    observed: dict[str, list[str]] = field(default_factory=dict)
    age_scale: float = 100.0                       # the age head predicts years / age_scale

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluatorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) and k != "observed" else v) for k, v in d.items() if k in known}
        return cls(**d)


# ------------------------------------------------------------------------- labels
def label_targets(labels: list[str], source: str, cfg: EvaluatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """An image's label list -> (targets (L,) float32 {0,1}, known (L,) bool) in cfg.labels order."""
    have = set(labels)
    seen = cfg.observed.get(source)
    y = np.zeros(len(cfg.labels), np.float32)
    known = np.ones(len(cfg.labels), bool)
    for i, name in enumerate(cfg.labels):
        if name == OPACITY:
            y[i] = float(bool(have & set(cfg.opacity_members)))
            known[i] = seen is None or bool(set(seen) & set(cfg.opacity_members))
        else:
            y[i] = float(name in have)
            known[i] = seen is None or name in seen
    return y, known


def observed_labels(rows) -> dict[str, list[str]]:
    """source -> sorted labels that occur in ``rows`` (ImageRows): fills EvaluatorConfig.observed."""
    out: dict[str, set] = {}
    for r in rows:
        out.setdefault(r.source, set()).update(r.labels)
    return {s: sorted(v) for s, v in sorted(out.items())}


# ------------------------------------------------------------------------- network
class _Stage(nn.Module):
    """Stride-2 residual stage: conv-BN-ReLU-conv-BN + 1x1 stride-2 shortcut (ResNet basic block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


@dataclass
class Predictions:
    pathology: np.ndarray  # (N, L) probabilities, cfg.labels order
    sex: np.ndarray        # (N,) P(male)
    age: np.ndarray        # (N,) years
    embedding: np.ndarray  # (N, D) unit vectors


class Evaluators(nn.Module):
    def __init__(self, cfg: EvaluatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or EvaluatorConfig()
        c = cfg.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 5, 2, 2, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(*[_Stage(a, b) for a, b in zip(c[:-1], c[1:])])
        self.pathology = nn.Linear(c[-1], len(cfg.labels))
        self.sex = nn.Linear(c[-1], 1)
        self.age = nn.Linear(c[-1], 1)
        self.embed = nn.Sequential(nn.Linear(c[-1], c[-1]), nn.ReLU(inplace=True), nn.Linear(c[-1], cfg.embed_dim))

    def preprocess(self, images) -> torch.Tensor:
        """(N, H, W) / (N, 1, H, W) / list of (H, W) in [0, 1] -> standardised (N, 1, R, R)."""
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(a, np.float32) for a in images])
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.dim() == 3:
            x = x[:, None]                                                  # (N, 1, H, W)
        return standardise(to_resolution(x, self.cfg.resolution))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 1, R, R) standardised -> logits / raw outputs per head."""
        h = self.stages(self.stem(x)).mean((2, 3))                          # (N, C)
        return {"pathology": self.pathology(h),                            # (N, L)
                "sex": self.sex(h)[:, 0],                                   # (N,)
                "age": self.age(h)[:, 0],                                   # (N,) years / age_scale
                "embedding": F.normalize(self.embed(h), dim=1)}            # (N, D)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 64) -> Predictions:
        """Scores for a stack/list of (H, W) images in [0, 1] (eval mode, no augmentation)."""
        was_training = self.training
        self.eval()
        x = self.preprocess(images)
        outs = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        cat = {k: torch.cat([o[k] for o in outs]).float() for k in outs[0]}
        return Predictions(pathology=torch.sigmoid(cat["pathology"]).numpy(),
                           sex=torch.sigmoid(cat["sex"]).numpy(),
                           age=(cat["age"] * self.cfg.age_scale).numpy(),
                           embedding=cat["embedding"].numpy())


def to_resolution(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, r, r): the evaluators' resize (bilinear, antialiased; unchanged when
    already r x r), the same for the images they score and the images they train on."""
    if x.shape[-2:] != (r, r):
        x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
    return x


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-image zero mean, unit std: (N, 1, H, W) -> same."""
    m = x.mean((1, 2, 3), keepdim=True)
    s = x.std((1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - m) / s


# ------------------------------------------------------------------------- save / load
def save_evaluators(model: Evaluators, folder: str | os.PathLike, metrics: dict | None = None) -> Path:
    """config.json + evaluators.safetensors (fp16) [+ metrics.json], each written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    write_text(folder / CONFIG_FILE, json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    if metrics is not None:
        write_text(folder / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    return folder


def load_evaluators(folder: str | os.PathLike | None = None) -> Evaluators:
    """Evaluators from a folder (default assets/evaluators), float32, eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder or ASSETS_EVALUATORS)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"No evaluator weights in {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                f"train them in the repository with: {TRAIN_COMMAND}")
    cfg = EvaluatorConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    model = Evaluators(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    model.load_state_dict(state)
    return model.eval()


def evaluator_metrics(folder: str | os.PathLike | None = None) -> dict:
    """metrics.json of an evaluator folder ({} when absent)."""
    p = Path(folder or ASSETS_EVALUATORS) / METRICS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def tiny_evaluators(seed: int = 0, labels: tuple[str, ...] = DEFAULT_LABELS) -> Evaluators:
    """Randomly initialised small evaluators (32 px) for tests."""
    cfg = EvaluatorConfig(resolution=32, channels=(4, 8, 16), embed_dim=8, labels=labels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Evaluators(cfg).eval()


__all__ = ["EvaluatorConfig", "Evaluators", "Predictions", "label_targets", "observed_labels",
           "save_evaluators", "load_evaluators", "evaluator_metrics", "tiny_evaluators", "to_resolution",
           "standardise", "OPACITY",
           "DEFAULT_LABELS", "ASSETS_EVALUATORS", "TRAIN_COMMAND"]
