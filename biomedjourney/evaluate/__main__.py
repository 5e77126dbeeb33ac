"""python -m biomedjourney.evaluate --model PATH --data DIR --split val|all --out DIR [--seeds 3] [--limit N]
    [--row text_only=PATH --row single_stage=PATH --row no_registration=PATH] [--num-inference-steps N]

Writes OUT/results.md (the table), OUT/results.json, OUT/results.png (bars with error bars) and
OUT/samples.png. Rows whose model folder is absent are reported as "not computed" with the
command that trains them. Cost: generation dominates (~2 s per image for the demo model on a
2-core CPU): pairs x seeds x generated rows. Default: every val pair with progression text (135 on
the shared data) x 3 seeds x (text_only + full) = 810 images (~30 min), plus 405 per ablation row;
--limit 40 --seeds 2 is a ~5 min check. Registration adds ~1 s per pair (--no-register-metrics).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..dataset import require_data
from . import table
from .run import EvalConfig, evaluate


def parse_rows(items: list[str]) -> dict[str, str]:
    rows = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or name not in table.GENERATED_ROWS or not path:
            raise SystemExit(f"--row expects NAME=PATH with NAME one of {', '.join(table.GENERATED_ROWS)}; got {it!r}")
        rows[name] = path
    return rows


def main(argv: list[str] | None = None) -> None:
    d = EvalConfig()
    ap = argparse.ArgumentParser(prog="python -m biomedjourney.evaluate", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model", default=None,
                    help="model folder for the 'full' row (default: $BIOMEDJOURNEY_MODEL or assets/biomedjourney-cxr)")
    ap.add_argument("--data", default=None,
                    help="dataset folder in the shared format (default: $BIOMEDJOURNEY_DATA or ../shared/data/cxr)")
    ap.add_argument("--split", default=d.split, choices=["val", "train", "all"])
    ap.add_argument("--out", default="outputs/eval")
    ap.add_argument("--seeds", type=int, default=d.replicates,
                    help="samples per pair for generated rows (mean ± std over them)")
    ap.add_argument("--seed", type=int, default=d.seed, help="base of the per-pair generation seeds")
    ap.add_argument("--limit", type=int, default=None, help="at most N pairs (spread over patients)")
    ap.add_argument("--include-no-text", action="store_true", help="also pairs without progression text (empty prompt)")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=PATH",
                    help=f"model folder for a row ({', '.join(table.GENERATED_ROWS)}); repeatable")
    ap.add_argument("--no-shipped-baselines", action="store_true",
                    help="don't use assets/baselines/* for rows not given with --row")
    ap.add_argument("--num-inference-steps", type=int, default=None)
    ap.add_argument("--guidance-scale", type=float, default=None)
    ap.add_argument("--image-guidance-scale", type=float, default=None)
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--strength", type=float, default=None, help="same strength for every row (default: each model's)")
    ap.add_argument("--negative-prompt", default=None, help="same negative prompt for every row (default: each model's)")
    ap.add_argument("--change-transfer", choices=["true", "false"], default=None,
                    help="same change-transfer setting for every row (default: each model's)")
    ap.add_argument("--region", choices=["auto", "off"], default=None,
                    help="same edit-region setting for every row (default: each model's)")
    ap.add_argument("--render", choices=["true", "false"], default=None,
                    help="same knowledge-driven rendering setting for every row (default: each model's)")
    ap.add_argument("--noise-opt-steps", type=int, default=None,
                    help="same initial-noise optimisation steps for every row (0 off; default: each model's)")
    ap.add_argument("--evaluators", default=None, help="evaluator folder (default assets/evaluators)")
    ap.add_argument("--no-register-metrics", action="store_true", help="skip SSIM/PSNR against the registered follow-up")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args(argv)
    require_data(a.data)  # exit 2 with where the data comes from, before any model is loaded
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {a.seeds}")
    cfg = EvalConfig(split=a.split, replicates=a.seeds, limit=a.limit, include_no_text=a.include_no_text,
                     num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale,
                     image_guidance_scale=a.image_guidance_scale, scheduler=a.scheduler, strength=a.strength,
                     negative_prompt=a.negative_prompt, seed=a.seed,
                     change_transfer=None if a.change_transfer is None else a.change_transfer == "true",
                     region=a.region, render=None if a.render is None else a.render == "true",
                     noise_opt_steps=a.noise_opt_steps,
                     register=not a.no_register_metrics, rows=parse_rows(a.row),
                     shipped_baselines=not a.no_shipped_baselines)
    t0 = time.time()
    res = evaluate(a.model, a.data, a.out, cfg, a.evaluators)
    print((Path(a.out) / "results.md").read_text().split("\nRows:")[0])
    done = [r for r, v in res["rows"].items() if v["status"] == "computed"]
    print(f"rows computed: {', '.join(done)}; {res['settings']['n_pairs']} pairs; {time.time() - t0:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
