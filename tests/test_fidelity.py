"""Model-card fidelity measures: the lung-box share of change and the end-to-end run on a tiny model."""
import json

import numpy as np
import pytest

from biomedjourney import dataset
from biomedjourney.evaluate.fidelity import LUNG_BOX, box_mask, inside_fraction


def test_inside_fraction_counts_where_the_change_is():
    d = np.zeros((100, 100))
    d[40:60, 40:60] = 0.3                      # centre: inside the lung box
    assert inside_fraction(d) == pytest.approx(1.0)
    d2 = np.zeros((100, 100))
    d2[:5, :5] = -0.5                          # corner only: outside
    assert inside_fraction(d2) == pytest.approx(0.0)
    uniform = np.ones((256, 256))
    assert inside_fraction(uniform) == pytest.approx(box_mask((256, 256)).mean())
    x0, y0, x1, y1 = LUNG_BOX
    assert box_mask((256, 256)).mean() == pytest.approx((x1 - x0) * (y1 - y0), abs=0.02)


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_fidelity_cli_on_a_tiny_model(tiny_model_dir, tmp_path):
    from biomedjourney.evaluate.fidelity import main
    main(["--model", str(tiny_model_dir), "--limit", "3", "--out", str(tmp_path)])
    r = json.loads((tmp_path / "fidelity.json").read_text())
    assert r["pairs"] == 3
    assert 0 <= r["no_change_ssim_generated_vs_prior"]["mean"] <= 1
    assert r["real_followup_ssim_vs_prior"]["n"] == 3
    assert (tmp_path / "validation_grid.png").stat().st_size > 10_000
