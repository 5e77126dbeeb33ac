"""Class-balanced sampling (train/config.py DiffusionTrain.sampling, train/data.py sampling_weights/draw_batch)."""
from __future__ import annotations

import pytest
import torch

from biomedjourney import dataset
from train.data import draw_batch, sampling_weights, step_generator

LABELS = ["Pneumonia"] * 90 + ["Edema"] * 10  # two findings at 9:1


def _share_of_rare(mode: str, steps: int = 400, batch: int = 64) -> float:
    w = sampling_weights(LABELS, mode)
    drawn = torch.cat([draw_batch(len(LABELS), batch, s, seed=0, weights=w) for s in range(steps)])
    return (drawn >= 90).double().mean().item()


@pytest.mark.parametrize("mode, share", [("uniform", 0.1), ("sqrt", 0.25), ("balanced", 0.5)])
def test_draws_follow_the_intended_proportions(mode, share):
    # uniform 9:1 (epoch order: exact over whole epochs), sqrt sqrt(9):1 = 3:1, balanced 1:1
    assert _share_of_rare(mode) == pytest.approx(share, abs=0.02)


def test_a_multi_label_row_weighs_as_its_rarest_finding_and_unlabelled_rows_form_a_finding():
    w = sampling_weights(["A", "A", "A", "A|B", "", ""], "balanced")
    # A on 4 rows, B on 1, (no labels) on 2
    assert w.tolist() == pytest.approx([1 / 4, 1 / 4, 1 / 4, 1.0, 1 / 2, 1 / 2])
    assert sampling_weights(["A", "B"], "uniform") is None
    with pytest.raises(ValueError, match="balanced"):
        sampling_weights(["A"], "balance")


def test_draws_are_a_function_of_seed_step_and_rank_only():
    w = sampling_weights(LABELS, "balanced")
    in_a_run = [draw_batch(100, 8, s, seed=3, rank=1, world=2, weights=w) for s in range(10)]
    resumed = draw_batch(100, 8, 7, seed=3, rank=1, world=2, weights=w)  # a fresh process at step 7
    assert torch.equal(in_a_run[7], resumed)
    others = [draw_batch(100, 8, 7, seed=4, rank=1, weights=w), draw_batch(100, 8, 8, seed=3, rank=1, weights=w),
              draw_batch(100, 8, 7, seed=3, rank=0, weights=w)]
    assert not any(torch.equal(resumed, o) for o in others)
    # the noise/timestep/dropout generator is the one checkpoints of earlier runs were made with
    assert step_generator(3, 7, 1).initial_seed() == (3 * 1_000_003 + 7) * 131 + 1
    assert step_generator(3, 7, 1, stream=1).initial_seed() != step_generator(3, 7, 1).initial_seed()


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_tiny_stage2_run_with_balanced_sampling(tiny_prep, tmp_path, monkeypatch):
    import train.train as tt
    from train.config import load_config
    seen = []
    draw = tt.draw_batch
    monkeypatch.setattr(tt, "draw_batch", lambda *a: seen.append(a[-1]) or draw(*a))
    cfg = load_config("tiny")
    cfg.stage2.sampling, cfg.stage2.steps, cfg.stage2.val_every = "balanced", 2, 1000
    r = tt.train(cfg, 2, tiny_prep, tiny_prep / "vae", tmp_path, curriculum=False)
    assert r["steps"] == 2 and r["final_loss"] is not None
    followups = [row["labels"] for row in tt.training_rows(tiny_prep, 2, True)]
    assert len(seen) == 2 and torch.equal(seen[0], sampling_weights(followups, "balanced"))
