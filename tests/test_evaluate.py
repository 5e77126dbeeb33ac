"""Evaluation battery: metric definitions, row bookkeeping, evaluator I/O and the CLI end to end."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from biomedjourney.dataset import split_of
from biomedjourney.evaluate import table
from biomedjourney.evaluate.evaluators import (OPACITY, EvaluatorConfig, Evaluators, label_targets, load_evaluators,
                                               save_evaluators, tiny_evaluators)
from biomedjourney.evaluate.metrics import (change_magnitude, cmig, macro_auc, mean_std, pearson_r, reid_auc,
                                            roc_auc, ssim_psnr, verification_auc)
from biomedjourney.evaluate.run import PairData, Scorer, select_pairs
from train.train_evaluators import supcon_loss


# ----------------------------------------------------------------------------- metric definitions
def test_auc_and_r_match_sklearn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.3, 0.5])
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))  # one class: undefined

    # macro over labels: column 1 has a single class among known rows -> excluded
    Y = np.stack([y, np.ones(8, int), 1 - y], 1)
    S = np.stack([s, s, s[::-1]], 1)
    known = np.ones_like(Y, bool)
    known[:2, 2] = False
    macro, per = macro_auc(Y, S, known, ["a", "b", "c"])
    want_c = roc_auc_score(Y[2:, 2], S[2:, 2])
    assert math.isnan(per["b"])
    assert per["c"] == pytest.approx(want_c)
    assert macro == pytest.approx((roc_auc_score(y, s) + want_c) / 2)

    x = np.array([1.0, 2.0, 4.0, 3.0, 7.0, 5.5])
    z = np.array([2.0, 1.5, 5.0, 2.5, 6.0, 7.0])
    assert pearson_r(x, z) == pytest.approx(pearsonr(x, z).statistic)
    assert math.isnan(pearson_r([1, 2], [3, 4]))          # too few points
    assert math.isnan(pearson_r([1, 1, 1], [3, 4, 5]))    # constant


def test_cmig_formula():
    assert cmig(0.8, 0.9, 0.5) == pytest.approx(math.sqrt(0.8 * math.sqrt(0.9 * 0.5)))
    assert cmig(0.7, 0.6, 0.25) == pytest.approx(math.sqrt(0.7 * math.sqrt(0.15)))
    assert cmig(0.8, 0.9, -0.3) == 0.0  # negative r clamped to 0
    assert math.isnan(cmig(float("nan"), 0.9, 0.5))


def test_ssim_psnr_identical_and_different():
    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32)).astype(np.float32)
    s, p = ssim_psnr(x, x)
    assert np.allclose(s, 1.0, atol=1e-5)
    assert np.all(np.isfinite(p)) and np.allclose(p, 120.0)  # capped, not inf
    s2, p2 = ssim_psnr(x, np.clip(x + 0.1, 0, 1))
    assert np.all(s2 < 0.99) and np.all(p2 < 25)
    assert np.allclose(change_magnitude(x, x), 0.0)
    assert change_magnitude(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))[0] == pytest.approx(1.0)


def test_reid_auc_identity_vs_shuffled_patients():
    rng = np.random.default_rng(1)
    n = 150
    ident = rng.normal(size=(n, 16))
    ident /= np.linalg.norm(ident, axis=1, keepdims=True)            # one vector per patient (by construction)
    groups = [f"p{i}" for i in range(n)]

    def noisy(e):
        e = e + 0.1 * rng.normal(size=e.shape)   # noise norm ~0.4 vs unit identity
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    priors = noisy(ident)
    assert reid_auc(priors, priors, groups) == 1.0                   # copy of the prior: maximal
    assert reid_auc(noisy(ident), priors, groups) > 0.95             # same patient, new image
    shuffled = noisy(ident[rng.permutation(n)])                      # another patient's identity
    assert abs(reid_auc(shuffled, priors, groups) - 0.5) < 0.06
    # verification AUC over all pairs: two images per patient
    emb = np.concatenate([noisy(ident), noisy(ident)])
    assert verification_auc(emb, groups + groups) > 0.95
    assert abs(verification_auc(emb[rng.permutation(2 * n)], groups + groups) - 0.5) < 0.1


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([float("nan")]) == {"mean": None, "std": None, "n": 0}


# ----------------------------------------------------------------------------- labels / evaluators
def test_label_targets_mask_unreported_labels():
    cfg = EvaluatorConfig(observed={"hannover": ["COVID-19"], "nih": ["No Finding", "Pneumonia", "Effusion"]})
    names = list(cfg.labels)
    y, known = label_targets(["COVID-19"], "hannover", cfg)
    assert y[names.index("COVID-19")] == 1 and known[names.index("COVID-19")]
    assert not known[names.index("No Finding")]                      # hannover never reports it
    assert y[names.index(OPACITY)] == 1 and known[names.index(OPACITY)]
    y, known = label_targets(["No Finding"], "nih", cfg)
    assert not known[names.index("COVID-19")] and known[names.index(OPACITY)] and y[names.index(OPACITY)] == 0
    y, known = label_targets(["Effusion"], "new-source", cfg)        # unknown source: absence = negative
    assert known.all() and y[names.index("Effusion")] == 1 and y.sum() == 1


def test_evaluators_save_load_roundtrip(tmp_path):
    ev = tiny_evaluators(seed=3)
    imgs = np.random.default_rng(0).random((3, 50, 40)).astype(np.float32)
    save_evaluators(ev, tmp_path / "ev", {"val": {"path_auc": 0.5}})
    ev2 = load_evaluators(tmp_path / "ev")
    a, b = ev.predict(imgs), ev2.predict(imgs)
    assert a.pathology.shape == (3, len(ev.cfg.labels)) and a.embedding.shape == (3, ev.cfg.embed_dim)
    assert np.allclose(a.embedding, b.embedding, atol=2e-2)          # fp16 weights
    assert np.allclose(np.linalg.norm(b.embedding, axis=1), 1.0, atol=1e-5)
    # per-image standardisation: a brightness/contrast change does not move the scores
    c = ev2.predict(imgs * 0.5 + 0.2)
    assert np.allclose(b.embedding, c.embedding, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="train_evaluators"):
        load_evaluators(tmp_path / "missing")


def test_supcon_loss_prefers_grouped_embeddings():
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    e = torch.nn.functional.normalize(torch.eye(6)[[0, 0, 1, 1, 2, 2]] + 0.01, dim=1)
    shuffled = e[[0, 2, 4, 1, 3, 5]]
    assert supcon_loss(e, g, 0.1) < supcon_loss(shuffled, g, 0.1) - 1.0


def test_scorer_copy_prior_is_maximal_reid_and_zero_change():
    rng = np.random.default_rng(2)
    n = 6
    base = [rng.random((8, 8)) for _ in range(n)]
    up = lambda a: np.kron(a, np.ones((8, 8))).astype(np.float32)  # noqa: E731 - (64, 64) blocky patient pattern
    prior = np.stack([up(b) for b in base])
    follow = np.stack([up(np.clip(b + 0.05 * rng.normal(size=b.shape), 0, 1)) for b in base])
    ev = tiny_evaluators(seed=0)
    L = len(ev.cfg.labels)
    pd = PairData(pair_ids=[f"x{i}" for i in range(n)], prior_ids=[f"p{i}" for i in range(n)],
                  groups=[f"g{i}" for i in range(n)], texts=[""] * n, prior=prior, followup=follow, followup_reg=None,
                  path_y=np.tile([[1] * L, [0] * L], (n // 2, 1)).astype(np.float32), path_known=np.ones((n, L), bool),
                  prior_y=np.tile([[0] * L, [1] * L], (n // 2, 1)).astype(np.float32), prior_known=np.ones((n, L), bool),
                  sex=np.array([1, 0] * (n // 2), float), age=np.linspace(20, 80, n))
    sc = Scorer(ev, pd).score(prior)
    assert sc["reid_auc"] == 1.0 and sc["change"] == 0.0
    # changed-label AUC: only entries whose label differs prior -> follow-up (here label 0 of pairs 0..3)
    pd.prior_y = pd.path_y.copy()
    pd.prior_y[:4, 0] = 1 - pd.prior_y[:4, 0]
    sc = Scorer(ev, pd).score(prior)
    pred = ev.predict(prior).pathology[:4, 0]
    assert sc["path_auc_changed"] == pytest.approx(roc_auc(pd.path_y[:4, 0], pred))
    pd.prior_y = pd.path_y.copy()                                   # nothing changes -> undefined
    assert math.isnan(Scorer(ev, pd).score(prior)["path_auc_changed"])
    assert sc["ssim"] < 1.0                                        # vs the (different) follow-up
    real = Scorer(ev, pd).score(follow)
    assert real["ssim"] == pytest.approx(1.0, abs=1e-5) and real["psnr"] == pytest.approx(120.0)
    assert 0 < real["change"] < 0.1


# ----------------------------------------------------------------------------- rows / schema
def test_not_computed_row_has_command_and_stable_keys():
    r = table.not_computed("single_stage", "no model given")
    assert r["status"] == "not computed" and "--no-curriculum" in r["command"] and "--row single_stage=" in r["reason"]
    assert "--no-register" in table.not_computed("no_registration", "x")["command"]
    done = table.finish_row("full", {"cmig": {"mean": 0.5, "std": 0.1, "n": 3}})
    assert set(r) == set(done)                                       # same keys whatever the status
    for m in table.METRICS:
        assert r[m] == {"mean": None, "std": None, "n": 0}


# ----------------------------------------------------------------------------- fake dataset + CLI
def _patients(n_val: int, n_train: int) -> list[str]:
    val, train, i = [], [], 0
    while len(val) < n_val or len(train) < n_train:
        pid = f"nih_{i}"
        (val if split_of(pid) == "val" else train).append(pid)
        i += 1
    return val[:n_val] + train[:n_train]


def write_fake_dataset(root, n_val: int = 4, n_train: int = 6, per_patient: int = 3, size: int = 64):
    """A folder in the shared format: images/*.png, images.csv, pairs.csv (synthetic patterns per patient)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    img_rows, pair_rows = [], []
    for k, pid in enumerate(_patients(n_val, n_train)):
        pattern = rng.random((8, 8))
        ids = []
        for j in range(per_patient):
            a = np.kron(np.clip(pattern + 0.1 * rng.normal(size=(8, 8)), 0, 1), np.ones((size // 8, size // 8)))
            iid = f"{pid}_{j}"
            Image.fromarray((a * 255).astype(np.uint8)).save(root / "images" / f"{iid}.png")
            labels = "Pneumonia" if (k + j) % 2 else "No Finding"
            img_rows.append({"image_id": iid, "file": f"images/{iid}.png", "source": "nih", "patient_id": pid,
                             "study_order": str(j + 1), "offset_days": "", "view": "PA", "sex": "MF"[k % 2],
                             "age": str(30 + 5 * k), "labels": labels, "text": "", "license": "test"})
            ids.append((iid, labels))
        for a in range(per_patient):
            for b in range(a + 1, per_patient):
                pair_rows.append({"pair_id": f"{ids[a][0]}__{ids[b][0]}", "patient_id": pid,
                                  "prior_image_id": ids[a][0], "followup_image_id": ids[b][0], "days_between": "",
                                  "same_view": "True", "prior_labels": ids[a][1], "followup_labels": ids[b][1],
                                  "progression_text": f"New {ids[b][1]}.", "text_origin": "labels"})
    for name, rows in (("images.csv", img_rows), ("pairs.csv", pair_rows)):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def test_select_pairs_limit_spreads_over_patients(tmp_path):
    root = write_fake_dataset(tmp_path / "data")
    val = select_pairs(root, "val")
    assert len(val) == 4 * 3 and all(split_of(p.patient_id) == "val" for p in val)
    first = select_pairs(root, "val", limit=4)
    assert len({p.patient_id for p in first}) == 4                   # one pair per patient first
    assert len(select_pairs(root, "all")) == 10 * 3


def test_cli_end_to_end_on_fake_split(tmp_path):
    from biomedjourney.evaluate.__main__ import main
    from biomedjourney.pipeline import tiny_pipeline

    root = write_fake_dataset(tmp_path / "data")
    model = tiny_pipeline(seed=0).save_pretrained(tmp_path / "tiny-model")
    save_evaluators(tiny_evaluators(seed=0), tmp_path / "ev", {"val": {"path_auc": 0.7}})
    out = tmp_path / "eval"
    main(["--model", str(model), "--data", str(root), "--split", "val", "--out", str(out), "--seeds", "2",
          "--limit", "3", "--num-inference-steps", "2", "--evaluators", str(tmp_path / "ev"), "--threads", "1",
          "--row", f"single_stage={model}", "--row", f"no_registration={tmp_path / 'absent'}",
          "--no-shipped-baselines", "--negative-prompt", "No significant interval change.", "--change-transfer", "true"])
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["negative_prompt"] == "No significant interval change."
    assert res["settings"]["change_transfer"] is True
    assert list(res["rows"]) == list(table.ROWS) == res["row_order"]
    assert {"rows", "row_order", "metrics", "evaluator_ceilings", "settings", "notes"} <= set(res)
    rows = res["rows"]
    keys = set(rows["full"])
    assert all(set(r) == keys for r in rows.values())
    for name in ("real_followup", "copy_prior", "text_only", "single_stage", "full"):
        assert rows[name]["status"] == "computed", name
    assert rows["no_registration"]["status"] == "not computed"
    assert "--no-register" in rows["no_registration"]["command"]
    assert rows["full"]["n_pairs"] == 3 and rows["full"]["n_replicates"] == 2 and rows["full"]["cmig"]["n"] <= 2
    assert "with the prior dropped" in rows["text_only"]["source"]
    assert rows["copy_prior"]["reid_auc"]["mean"] == 1.0 and rows["copy_prior"]["change"]["mean"] == 0.0
    assert rows["real_followup"]["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows["real_followup"]["ssim_reg"]["mean"] is not None    # registration ran
    assert res["evaluator_ceilings"] == {"val": {"path_auc": 0.7}}
    md = (out / "results.md").read_text()
    assert "not computed" in md and "| full |" in md and "CMIG" in md
    for png in ("results.png", "samples.png"):
        assert (out / png).stat().st_size > 1000
