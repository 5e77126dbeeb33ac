"""Fit the normal-lung table a removal ("X resolved.") measures excess density against.

    python train/fit_normal_lungs.py --out assets/segmenter/normal_lung_residuals.json

On every training-split image labelled only "No Finding" whose licence allows derivatives
(`biomedjourney.dataset.split_of`, `licence_ok_for_weights`), the shipped lung segmenter finds the lungs, and
`biomedjourney.render.fit_normal_residuals` records, per cell of each lung (NORMAL_GRID: depth x lateralness, both
lungs alike), the NORMAL_QUANTILE percentile of how much denser than the film's own aerated baseline the lung is
(`LungDensity.residual`). Normal lungs are denser than that baseline at their hila, behind the domes and along the
rim; `render.undo_density` lowers only the density beyond what normal lungs show there. The table belongs to the
segmenter's lung frame, so it lives in the segmenter's folder (it travels with it into the wheel). Deterministic
(sampling seed 0); about 26 s for 387 films on one CPU core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biomedjourney.anatomy import segment  # noqa: E402
from biomedjourney.atomic import write_text  # noqa: E402
from biomedjourney.dataset import NO_FINDING, data_root, licence_ok_for_weights, load_images, split_of  # noqa: E402
from biomedjourney.imaging import load_model_input  # noqa: E402
from biomedjourney.render import NORMAL_GRID, NORMAL_QUANTILE, fit_normal_residuals  # noqa: E402


def normal_training_rows(data=None) -> list:
    """Training-split images labelled only 'No Finding' whose licence allows derivatives, by image id."""
    rows = [r for r in load_images(data).values() if r.labels == [NO_FINDING] and split_of(r.patient_id) == "train"
            and licence_ok_for_weights(r.license)]
    return sorted(rows, key=lambda r: r.image_id)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset folder (default $BIOMEDJOURNEY_DATA / ../shared/data/cxr)")
    ap.add_argument("--out", type=Path, default=Path("assets/segmenter/normal_lung_residuals.json"))
    ap.add_argument("--limit", type=int, default=None, help="at most N films (a quick check)")
    a = ap.parse_args(argv)
    t0 = time.time()
    rows = normal_training_rows(a.data)[:a.limit]
    if not rows:
        raise SystemExit(f"no normal training films under {data_root(a.data)}")
    films, anatomies, sources, fallbacks = [], [], {}, 0
    for r in rows:
        img = load_model_input(r.path, 256)
        an = segment(img)
        if an.source != "network":
            fallbacks += 1                      # the atlas is not this film's lungs: leave it out
            continue
        films.append(img)
        anatomies.append(an)
        sources[r.source] = sources.get(r.source, 0) + 1
    table = fit_normal_residuals(films, anatomies, NORMAL_QUANTILE, NORMAL_GRID)
    out = {"table": np.round(table.astype(float), 3).tolist(), "grid": list(NORMAL_GRID), "quantile": NORMAL_QUANTILE,
           "films": len(films), "sources": sources, "left_out_segmenter_fallback": fallbacks,
           "what": "per lung cell (rows: depth apex -> lowest row, columns: lateralness medial -> chest wall), the "
                   "quantile of (low-passed lung brightness - the film's aerated baseline) / its spread on normal "
                   "training films (biomedjourney.render.fit_normal_residuals)",
           "command": "python train/fit_normal_lungs.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(a.out, json.dumps(out, indent=1) + "\n")
    print(f"{len(films)} films ({fallbacks} left out: segmenter fallback) in {time.time() - t0:.0f} s -> {a.out}")
    print(np.round(table, 1))
    return out


if __name__ == "__main__":
    main()
