"""Model-card fidelity measures: the lung-box share of change and the end-to-end run on a tiny model."""
import json

import numpy as np
import pytest

from biomedjourney import dataset
from biomedjourney.evaluate.fidelity import LUNG_HEART, inside_fraction, lung_mask


def test_inside_fraction_counts_where_the_change_is():
    d = np.zeros((100, 100))
    d[35:50, 22:36] = 0.3                      # middle of the right lung (image left): inside
    assert inside_fraction(d) == pytest.approx(1.0)
    for sl in [np.s_[:5, :5], np.s_[5:15, 45:55], np.s_[90:, :]]:   # corner, above the mediastinum, abdomen
        d2 = np.zeros((100, 100))
        d2[sl] = -0.5
        assert inside_fraction(d2) == pytest.approx(0.0)
    uniform = np.ones((256, 256))
    assert inside_fraction(uniform) == pytest.approx(lung_mask((256, 256)).mean())
    area = sum(np.pi * rx * ry for _, _, rx, ry in LUNG_HEART)          # ellipses, minus their overlap
    assert 0.25 < lung_mask((256, 256)).mean() < area
    m = lung_mask((256, 256))
    assert m[:, :128].sum() == pytest.approx(m[:, 128:].sum(), rel=0.2)   # both lungs, heart a little to one side


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_fidelity_cli_on_a_tiny_model(tiny_model_dir, tmp_path):
    from biomedjourney.evaluate.fidelity import main
    main(["--model", str(tiny_model_dir), "--limit", "3", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "fidelity.json").read_text())
    assert r["pairs"] == 3
    assert 0 <= r["no_change_ssim_generated_vs_prior"]["mean"] <= 1
    assert r["real_followup_ssim_vs_prior"]["n"] == 3
    assert r["text_effect_mean_abs"]["n"] == r["change_pairs"]
    assert 0 <= r["lung_mask_area_fraction"] <= 1 and (tmp_path / "lung_mask.png").is_file()
    assert (tmp_path / "validation_grid.png").stat().st_size > 10_000
    if r["change_pairs"]:
        assert (tmp_path / "change_location.png").stat().st_size > 5_000


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_tune_reports_the_measures_for_every_setting(tiny_model_dir, tmp_path):
    from biomedjourney.evaluate.fidelity import main
    main(["--model", str(tiny_model_dir), "--tune", "--limit", "2", "--strengths", "1.0", "0.5",
          "--image-scales", "1.5", "--negative-prompts", "", "No significant interval change.", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "tuning.json").read_text())
    assert [(r["strength"], r["negative_prompt"]) for r in rows] == [
        (1.0, ""), (1.0, "No significant interval change."), (0.5, ""), (0.5, "No significant interval change.")]
    for r in rows:
        assert r["pairs"] == 2 and r["text_effect_mean_abs"] > 0 and 0 <= r["no_change_ssim_generated_vs_prior"] <= 1
