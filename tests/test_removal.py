"""biomedjourney.evaluate.removal: does '<finding> resolved.' take it away (synthetic priors, a fake evaluator)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from biomedjourney.anatomy import atlas_anatomy
from biomedjourney.config import NO_CHANGE
from biomedjourney.evaluate import removal
from biomedjourney.evaluate.follow import Generated, Prior

R = 64
TEXT = removal.REMOVALS["Pneumonia"]


class BrightnessEvaluator:
    """P(label) = the image's mean brightness: a denser film is 'more' of every finding."""
    cfg = SimpleNamespace(labels=("Pneumonia", "Opacity (any)"))

    def predict(self, x):
        p = np.asarray(x, np.float64).mean((1, 2))
        return SimpleNamespace(pathology=np.stack([p, p], 1))


def generated(change_per_prior: list[float]) -> Generated:
    """Two priors x two seeds; the resolved text adds change_per_prior[i] inside the lungs of prior i."""
    a = atlas_anatomy((R, R))
    lungs = (a.lung("bilateral") > 0.5).astype(np.float32)
    priors = [Prior(f"img{i}", f"p{i}", np.full((R, R), 0.5, np.float32)) for i in range(2)]
    base = np.stack([p.image for p in priors])[:, None].repeat(2, 1)           # (P, S, R, R)
    resolved = base + np.asarray(change_per_prior, np.float32)[:, None, None, None] * lungs
    return Generated(priors, [0, 1], {TEXT: resolved, NO_CHANGE: base.copy()}, {}, [a, a], 1.0)


def test_a_darker_lung_is_a_removal_a_brighter_one_is_not():
    ev = BrightnessEvaluator()
    g = generated([-0.1, -0.2])
    r = removal.summarise_one(g, ev, "Pneumonia", TEXT)
    assert r["lift"]["mean"] < 0 and r["lowered"] == 1.0
    assert r["lung_change"] == pytest.approx(-0.15, abs=1e-6)
    mixed = removal.summarise_one(generated([-0.1, 0.1]), ev, "Pneumonia", TEXT)
    assert mixed["lowered"] == 0.5 and mixed["lung_change"] == pytest.approx(0.0, abs=1e-6)


def test_every_removal_text_reads_as_its_finding_going_away():
    from biomedjourney.findings import extract
    names = {"Pneumonia": "pneumonia", "Atelectasis": "atelectasis", "Infiltration": "opacity",
             "Effusion": "pleural effusion", "Edema": "pulmonary edema"}
    for label, text in removal.REMOVALS.items():
        fs = extract(text)
        assert [(f.name, f.change) for f in fs] == [(names[label], "resolved")], text


def test_report_has_a_row_per_finding():
    ev = BrightnessEvaluator()
    res = {"settings": {"region": "auto", "render": True, "overrides": []}, "seeds": [0, 1], "max_priors": 2,
           "findings": {"Pneumonia": removal.summarise_one(generated([-0.1, -0.2]), ev, "Pneumonia", TEXT)}}
    md = removal.markdown(res, "test")
    assert "| Pneumonia | Pneumonia resolved. | 2 |" in md and "1.00" in md


def test_cli_writes_removal_json(tmp_path, tiny_model_dir, monkeypatch):
    import json

    from biomedjourney.evaluate.evaluators import save_evaluators, tiny_evaluators
    save_evaluators(tiny_evaluators(seed=0), tmp_path / "ev")
    rng = np.random.default_rng(0)
    fake = [Prior(f"img{i}", f"p{i}", np.clip(0.45 + 0.08 * rng.standard_normal((R, R)), 0, 1).astype(np.float32))
            for i in range(2)]
    monkeypatch.setattr(removal, "select_priors", lambda n, data=None, res=256, label=None: fake[:n])
    out = tmp_path / "removal"
    removal.main(["--model", str(tiny_model_dir), "--out", str(out), "--priors", "2", "--seeds", "1",
                  "--evaluators", str(tmp_path / "ev"), "--sampler", "num_inference_steps=2", "--label", "tiny"])
    res = json.loads((out / "removal.json").read_text())
    assert set(res["findings"]) == set(removal.REMOVALS) and res["seeds"] == [0]
    for r in res["findings"].values():
        assert len(r["priors"]) == 2 and 0.0 <= r["lowered"] <= 1.0 and np.isfinite(r["lung_change"])
        assert np.isfinite(r["lung_change_normal"])                              # the No-Finding control
    assert res["settings"]["sampler"]["num_inference_steps"] == 2
    assert "# Removal: tiny" in (out / "removal.md").read_text()
