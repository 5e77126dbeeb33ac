"""Does "<finding> resolved." take the finding away? Removal checks on validation priors that have it.

    python -m biomedjourney.evaluate.removal --out assets/eval/removal/shipped [--priors 8] [--seeds 2] \
        [--sampler KEY=VALUE ...] [--label NAME]

For each finding of REMOVALS, the first N validation images labelled with it (one per patient, by image id) are
generated with "<finding> resolved." and with the no-change text, same seeds, one image per call
(`follow.generate_all`), and measured:

    lift      evaluator P(label | resolved text) - P(label | no-change text), same prior and seed: < 0 takes it away
    lowered   share of samples whose P(label) fell
    darker    mean change inside the lungs (lung mask > 0.5; < 0: the lungs became more lucent)
    control   the same lung change for the same text on No-Finding validation priors (nothing to remove: a specific
              removal leaves them nearly as they were)

The counterpart of `follow` (which asks for new findings on normal priors) and of the battery's
path_auc_changed, where a resolved label must score below a new one. The evaluators are the evaluation
battery: this measures, it is not a target to tune against. Writes removal.json and removal.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from ..config import NO_CHANGE, write_json
from .follow import (LUNG_INSIDE, Generated, common_args, generate_all, lift, load_run, probabilities,
                     select_priors)

REMOVALS = {"Pneumonia": "Pneumonia resolved.", "Atelectasis": "Atelectasis resolved.",
            "Infiltration": "Infiltrates resolved.", "Effusion": "Pleural effusion resolved.",
            "Edema": "Pulmonary edema resolved."}


def lowered(prob: dict[str, np.ndarray], labels, text: str, label: str) -> float:
    """Share of (prior, seed) samples whose evaluator P(label) is lower for `text` than for the no-change text.
    prob: `follow.probabilities`."""
    j = list(labels).index(label)
    return float((prob[text][..., j] < prob[NO_CHANGE][..., j]).mean())


def lung_change(g: Generated, text: str) -> float:
    """Mean (generated - prior) inside each prior's lung fields, over priors and seeds."""
    vals = [float((g.images[text][i] - p.image)[:, g.anatomy[i].lung("bilateral") > LUNG_INSIDE].mean())
            for i, p in enumerate(g.priors)]
    return float(np.mean(vals))


def summarise_one(g: Generated, ev, label: str, text: str) -> dict:
    prob = probabilities(g, ev)                                         # once: the lift and the lowered share
    lifts = lift(g, ev, prob)[text]
    return {"text": text, "priors": [p.image_id for p in g.priors], "lift": lifts[label],
            "lift_opacity": lifts.get("Opacity (any)"), "lowered": lowered(prob, ev.cfg.labels, text, label),
            "lung_change": lung_change(g, text), "seconds": g.seconds}


def markdown(res: dict, title: str) -> str:
    shown = json.dumps({k: res["settings"][k] for k in ("region", "render", "overrides")})
    lines = [f"# Removal: {title}", "",
             f"Validation priors labelled with the finding (one per patient, up to {res['max_priors']}) × seeds "
             f"{res['seeds']}; settings: `{shown}`.",
             "", "| finding | text | priors | lift of its label (mean ± std over seeds) | Opacity (any) lift | "
             "samples lowered | lung change | lung change, No-Finding priors |", "|---|---|---|---|---|---|---|---|"]
    for label, r in res["findings"].items():
        op = "–" if r["lift_opacity"] is None else f"{r['lift_opacity']['mean']:+.3f}"
        ctl = "–" if r.get("lung_change_normal") is None else f"{r['lung_change_normal']:+.4f}"
        lines.append(f"| {label} | {r['text']} | {len(r['priors'])} | {r['lift']['mean']:+.3f} ± "
                     f"{r['lift']['std']:.3f} | {op} | {r['lowered']:.2f} | {r['lung_change']:+.4f} | {ctl} |")
    lines += ["", "Lift < 0 and 'samples lowered' near 1: the text took the finding away. The evaluators are CNNs "
              "trained on this dataset's train split; a prior keeps most of what made it positive (the patient, "
              "devices, acquisition), so even a perfect removal need not bring the probability down to a normal "
              "film's.", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--priors", type=int, default=8, help="at most this many priors per finding")
    ap.add_argument("--seeds", type=int, default=2)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a, t0 = parse(argv), time.time()
    pipe, ev, model = load_run(a)
    seeds = list(range(a.seeds))
    settings = {"model": model, "region": pipe.defaults.region, "render": pipe.defaults.render,
                "overrides": a.sampler, "sampler": dataclasses.asdict(pipe.defaults)}
    res = {"settings": settings, "seeds": seeds, "max_priors": a.priors, "findings": {}}
    for label, text in REMOVALS.items():
        priors = select_priors(a.priors, a.data, pipe.resolution, label=label)
        if len(priors) < 2:
            print(f"{label}: only {len(priors)} validation prior(s) with the label; skipped")
            continue
        g = generate_all(pipe, priors, seeds, region=pipe.defaults.region, render=pipe.defaults.render,
                         descriptions=(text, NO_CHANGE))
        res["findings"][label] = summarise_one(g, ev, label, text)
    normal = select_priors(a.priors, a.data, pipe.resolution)           # the control: nothing there to remove
    if len(normal) >= 2 and res["findings"]:
        texts = tuple(r["text"] for r in res["findings"].values())
        g = generate_all(pipe, normal, seeds, region=pipe.defaults.region, render=pipe.defaults.render,
                         descriptions=(*texts, NO_CHANGE))
        for r in res["findings"].values():
            r["lung_change_normal"] = lung_change(g, r["text"])
    res["wall_seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(res, a.out / "removal.json")
    (a.out / "removal.md").write_text(markdown(res, a.label or a.out.name))
    print(json.dumps({k: {"lift": round(v["lift"]["mean"], 4), "lowered": v["lowered"]}
                      for k, v in res["findings"].items()}, indent=2))
    return res


if __name__ == "__main__":
    main()
