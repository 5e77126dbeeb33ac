"""The short GPU training run from a bundle (train/build_gpu_bundle.py): benchmark, both stages of the
curriculum sized to the time budget, the export loaded back and sampled; it stops by itself.

    bash scripts/train_gpu_short.sh OUT_DIR [--preset demo-gpu] [--minutes 8]   # installs the wheels, runs this
    python scripts/train_gpu_short.py --out OUT_DIR [--bundle work/gpu-bundle] [--preset demo-gpu] [--minutes 8]

1. BUNDLE/bundle.json: the preset must match its resolution and text encoder, the autoencoder its sha256.
2. Benchmark (benchmarks/bench_training.py's measure): --bench-steps stage-2 steps on the bundle's cache at
   the preset's batch, as train.py takes them: images/s, the UNet's FLOPs per step (FlopCounterMode), the
   bf16 matmul throughput of this device measured now (the peak), MFU.
3. Plan: the time left before the deadline (--minutes from the shell script's start), less a reserve for
   the exports and the check, split between the stages in the preset's step ratio; each stage's step count
   = its share / the measured step time, at most the preset's, so the cosine schedule ends inside the
   budget; a checkpoint halfway, validation at the end; each stage's --minutes as the hard stop. Written
   to OUT/plan.json: a rerun takes the same plan and resumes (--resume latest) where the last one stopped.
4. train.py's train(): stage 1, then stage 2 from stage 1's export, on the bundle's cache (no image read),
   exported fp16, the text encoder written from the bundle's spec (its weights need not be on this machine).
5. OUT/model: the stage-2 export, loaded with BiomedJourneyPipeline.from_pretrained (the real text encoder
   where its package is installed, else a stand-in holding its spec) and sampled on the validation rows
   from cached embeddings (OUT/model-check.png); OUT/figures.json: benchmark, plan, results, check.
--report-to DIR copies the small outputs (figures, logs, grids: at most 8 files) there, e.g. the device
tool's $OUT; the model itself (about 200 MB at fp16 for demo-gpu) stays in OUT_DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks.bench_training import make_trainee, measure, pct, step_fn  # noqa: E402
from biomedjourney.config import write_json  # noqa: E402
from biomedjourney.resources import file_sha256  # noqa: E402
from train.build_gpu_bundle import CACHE, REPO  # noqa: E402
from train.config import RunConfig, load_config  # noqa: E402

RESERVE_S = 30.0         # after stage 2: moving the export, loading it back, the check grid, figures
STAGE_OVERHEAD_S = 20.0  # per stage: model build, cache load, final checkpoint, validation grid, export
SLACK = 1.25             # a stage's hard stop: its planned time x this (never past the deadline)


def read_bundle(folder: Path, cfg: RunConfig) -> tuple[dict, Path]:
    """bundle.json and the autoencoder's folder, checked against the preset."""
    info = json.loads((folder / "bundle.json").read_text())
    spec = cfg.model.text_encoder
    name = spec if isinstance(spec, str) else spec.get("name")
    if info["resolution"] != cfg.model.resolution or info["text_encoder"]["name"] != name:
        raise SystemExit(f"{folder} was built for {info['config']} ({info['resolution']} px, text encoder "
                         f"{info['text_encoder']['name']}), not {cfg.name}: rebuild it with --config {cfg.name}")
    vae = (REPO if info["vae"]["in"] == "repo" else folder) / info["vae"]["path"]
    if file_sha256(vae / "diffusion_pytorch_model.safetensors") != info["vae"]["sha256"]:
        raise SystemExit(f"{vae} is not the autoencoder the bundle's latents were encoded with")
    return info, vae


def benchmark(cfg: RunConfig, bundle: Path, vae_path: Path, device: str, steps: int, warmup: int) -> dict:
    """Stage-2 steps on the bundle's cache, batches drawn as run_steps draws them."""
    from diffusers import AutoencoderKL

    from biomedjourney.model import count_parameters
    from train.data import batch_indices, step_generator
    from train.train import load_stage_data, make_batch
    tc = cfg.stage2
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval().requires_grad_(False)
    t, acc = make_trainee(cfg, vae, load_file(bundle / CACHE)["text_emb"].shape[-1], device)
    d = load_stage_data(acc, cfg, 2, bundle, True, vae, vae_path, bundle, bundle / CACHE)

    def batch(i):
        b = batch_indices(len(d.rows), tc.batch_size, i, cfg.seed)
        return make_batch(b, d.idx, d.cache, tc, 2, step_generator(cfg.seed, i), d.empty, d.no_change)

    res = measure({"cached": step_fn(t, acc, cfg, batch)}, tc.batch_size, steps, warmup, device)
    res["unet_params_m"] = count_parameters(t.raw) / 1e6
    acc.free_memory()  # drop accelerate's references: train() builds its own
    del t
    if device == "cuda":
        res["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.empty_cache()
    return res


def make_plan(cfg: RunConfig, s_per_step: float, seconds_left: float) -> dict:
    """Steps per stage that fit the time left (the preset's step ratio; at most its step counts)."""
    n1, n2 = cfg.stage1.steps, cfg.stage2.steps
    train_s = max(0.0, seconds_left - RESERVE_S - 2 * STAGE_OVERHEAD_S)
    plan = {"seconds_left": seconds_left, "s_per_step": s_per_step}
    for stage, n, share in ((1, n1, n1 / (n1 + n2)), (2, n2, n2 / (n1 + n2))):
        steps = max(1, min(n, int(train_s * share / s_per_step)))
        plan[f"stage{stage}"] = {"steps": steps, "preset_steps": n, "planned_s": steps * s_per_step}
    return plan


def apply_plan(cfg: RunConfig, plan: dict) -> None:
    for stage in (1, 2):
        tc, steps = getattr(cfg, f"stage{stage}"), plan[f"stage{stage}"]["steps"]
        tc.steps = steps
        tc.warmup_steps = min(tc.warmup_steps, max(1, steps // 10))
        tc.checkpoint_every = max(1, (steps + 1) // 2)   # one halfway (what a rerun resumes from), one at the end
        tc.val_every = steps                              # the validation grid at the end only
        tc.log_every = max(1, min(tc.log_every, steps // 20 or 1))


def stage_minutes(plan: dict, stage: int, deadline: float) -> float:
    """The hard stop of one stage: its planned time with slack, never past what the deadline leaves."""
    left = deadline - time.time() - RESERVE_S - STAGE_OVERHEAD_S
    if stage == 1:
        left -= plan["stage2"]["planned_s"] + STAGE_OVERHEAD_S
        left = min(left, plan["stage1"]["planned_s"] * SLACK + STAGE_OVERHEAD_S)
    return max(left, 1.0) / 60


def export_spec(spec: dict) -> dict | None:
    """None where the text encoder can be built here (the export saves it as usual, weights too for encoders
    that keep them in the model folder), else its full spec, which the export writes without loading it."""
    from biomedjourney.text_encoders import build_text_encoder
    try:
        build_text_encoder(spec)
        return None
    except (ImportError, FileNotFoundError):  # e.g. MiniLM's weights package is not installed on the GPU machine
        return spec


def run_stage(cfg: RunConfig, stage: int, bundle: Path, text_spec: dict | None, vae: Path, run: Path,
              minutes: float) -> dict:
    from train.train import train
    done = run / f"stage{stage}" / "result.json"
    steps = getattr(cfg, f"stage{stage}").steps
    if done.is_file() and json.loads(done.read_text())["steps"] >= steps and (done.parent / "export").is_dir():
        return json.loads(done.read_text())  # a rerun: this stage already finished
    return train(cfg, stage, bundle, vae, run, resume="latest", minutes=minutes, cache_file=bundle / CACHE,
                 text_spec=text_spec, export_dtype="fp16", command=" ".join(sys.argv))


def load_model(folder: Path, spec: dict, device: str):
    """The exported folder as a pipeline; the text encoder's stand-in where its weights are not installed."""
    from biomedjourney.pipeline import BiomedJourneyPipeline
    from train.train import _SpecOnly
    try:
        return BiomedJourneyPipeline.from_pretrained(folder, device=device), "loaded"
    except (ImportError, FileNotFoundError) as e:
        pipe = BiomedJourneyPipeline.from_pretrained(folder, device=device, text_encoder=_SpecOnly(spec))
        return pipe, f"loaded with a stand-in text encoder ({type(e).__name__}: {str(e)[:120]})"


def check_model(folder: Path, cfg: RunConfig, bundle: Path, info: dict, device: str, grid: Path) -> dict:
    """Load the export back and sample the validation rows from the cached embeddings (validation_grid)."""
    from train.train import index_rows, text_index, training_rows, validation_grid
    pipe, how = load_model(folder, info["text_encoder"], device)
    cache = load_file(bundle / CACHE)
    rows = (training_rows(bundle, 2, True, "val") or training_rows(bundle, 2, True))[:cfg.stage2.val_pairs]
    validation_grid(pipe, rows, cache, index_rows(rows, cache), text_index("", cache), 2, cfg.stage2.val_steps,
                    grid, cfg.seed)
    finite = all(bool(torch.isfinite(p).all()) for p in pipe.unet.parameters())
    return {"model": how, "unet_dtype": str(pipe.unet.dtype), "weights_finite": finite, "grid": grid.name}


def achieved(result: dict, batch_size: int) -> dict:
    """+ images/s over the stage's training wall time (its checkpoints and validation included)."""
    return {**result, "images_per_s_wall": batch_size * result["steps"] / max(result["seconds"], 1e-9)}


def report_to(out: Path, dest: Path) -> list[str]:
    """The small outputs, flat (the device tool brings back at most 8 files)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {"figures.json": out / "figures.json", "train.log": out / "train.log",
             "stage1-log.csv": out / "run" / "stage1" / "log.csv", "stage2-log.csv": out / "run" / "stage2" / "log.csv",
             "model-check.png": out / "model-check.png"}
    grids = sorted((out / "run" / "stage2").glob("val-*.png"))
    if grids:
        files["stage2-val.png"] = grids[-1]
    copied = []
    for name, src in files.items():
        if src.is_file() and src.resolve() != (dest / name).resolve():
            shutil.copy2(src, dest / name)
            copied.append(name)
    return copied


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=REPO / "work" / "gpu-bundle")
    ap.add_argument("--preset", default="demo-gpu")
    ap.add_argument("--minutes", type=float, default=8.0, help="the whole run's wall time, from --t0")
    ap.add_argument("--t0", type=float, default=None, help="start (Unix time; the shell script passes its own)")
    ap.add_argument("--bench-steps", type=int, default=20, help="timed benchmark steps (median)")
    ap.add_argument("--bench-warmup", type=int, default=5)
    ap.add_argument("--report-to", type=Path, default=None, help="copy figures, logs and grids here")
    a = ap.parse_args(argv)
    t0 = a.t0 or time.time()
    deadline = t0 + a.minutes * 60
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes
    cfg = load_config(a.preset)
    info, vae = read_bundle(a.bundle, cfg)
    a.out.mkdir(parents=True, exist_ok=True)
    plan_file = a.out / "plan.json"
    if plan_file.is_file():  # a rerun: the same plan, resumed
        plan = json.loads(plan_file.read_text())
    else:
        bench = benchmark(cfg, a.bundle, vae, device, a.bench_steps, a.bench_warmup)
        plan = make_plan(cfg, bench["paths"]["cached"]["median_s_per_step"], deadline - time.time())
        plan["benchmark"] = bench
        write_json(plan, plan_file)
    apply_plan(cfg, plan)
    c = plan["benchmark"]["paths"]["cached"]
    print(f"plan: stage 1 {plan['stage1']['steps']} steps, stage 2 {plan['stage2']['steps']} steps at "
          f"{plan['s_per_step']:.3f} s/step; benchmark {c['images_per_s']:.1f} images/s, MFU {pct(c['mfu'])}", flush=True)
    run = a.out / "run"
    results, text_spec = {}, export_spec(info["text_encoder"])
    for stage in (1, 2):
        r = run_stage(cfg, stage, a.bundle, text_spec, vae, run, stage_minutes(plan, stage, deadline))
        results[f"stage{stage}"] = achieved(r, getattr(cfg, f"stage{stage}").batch_size)
    model = a.out / "model"
    shutil.rmtree(model, ignore_errors=True)
    os.replace(run / "stage2" / "export", model)
    check = check_model(model, cfg, a.bundle, info, device, a.out / "model-check.png")
    figures = {"device": plan["benchmark"]["device"], "torch": torch.__version__, "python": platform.python_version(),
               "preset": cfg.name, "bundle_rows": info["rows"], "benchmark": plan["benchmark"],
               "plan": {k: v for k, v in plan.items() if k != "benchmark"}, "training": results, "check": check,
               "model": "model", "wall_s": time.time() - t0, "budget_s": a.minutes * 60,
               "within_budget": time.time() <= deadline}
    write_json(figures, a.out / "figures.json")
    if a.report_to:
        figures["reported"] = report_to(a.out, a.report_to)
    print(f"done in {figures['wall_s'] / 60:.1f} min: {c['images_per_s']:.1f} images/s benchmarked, MFU {pct(c['mfu'])} "
          f"of {plan['benchmark']['matmul']}; model {model}; figures {a.out / 'figures.json'}", flush=True)
    return figures


if __name__ == "__main__":
    main()
