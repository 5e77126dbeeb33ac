"""Sampling speed and quality: BiomedJourneyPipeline against diffusers' StableDiffusionInstructPix2PixPipeline
(the peer) driving the SAME unet, vae and scheduler config with the same text embeddings, in one process.

    python benchmarks/bench_sampling.py                          # shipped model, CPU, 1 and 4 images, 3 repeats
    python benchmarks/bench_sampling.py --device cuda --repeats 5
    python benchmarks/bench_sampling.py --sizes 4 --repeats 3 --threads 2 --json out.json

Measured, each a median over --repeats timed calls after one warm-up call, configurations interleaved
round by round (so a shared machine's drift hits every one alike):
  (a) equal settings: both 20 DPM-Solver++ steps from pure noise (our strength=1, change_transfer=False,
      no region, no render: the pipeline called directly, not the service), same guidance (the shipped
      2.0 / 1.5), same negative prompt, same initial noise: the pure overhead ratio ours / peer;
  (b) defaults: the peer at ITS defaults (100 Euler-ancestral steps, guidance 7.5 / image 1.5, empty
      negative prompt); ours at the shipped defaults (pipe.defaults: 20 DPM-Solver++ steps, strength 0.6,
      change transfer = 2 trajectories); quality: SSIM / PSNR of ours against the peer's 100-step image
      for the same seed (both the equal-settings and the default image of ours are compared);
  (c) wall time, images/s, peak memory (CPU: the process' peak RSS during the call, reset before each
      call through /proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated);
  (d) UNet utilisation: FLOPs of one UNet call at the batch each pipeline uses (FlopCounterMode) x the
      UNet calls a request makes / the device's matmul throughput measured in this run (large fp32
      matmul on CPU, bf16 on GPU) / the measured time.

The peer, and where it cannot do exactly what ours does (printed with the results):
  * components: unet, vae = ours (the same objects); scheduler = a DPMSolverMultistepScheduler (a) or an
    EulerAncestralDiscreteScheduler (b) built from our scheduler config; text_encoder, tokenizer,
    safety_checker, feature_extractor = None, requires_safety_checker=False;
  * text: prompt_embeds / negative_prompt_embeds = our MiniLM token states (1, 128, 384), unprojected:
    the UNet projects them itself (encoder_hid_dim=384, encoder_hid_dim_type='text_proj'), in both;
  * attention mask: IP2P passes no encoder_attention_mask, so it attends to the 128 - len(prompt)
    padding states that ours masks out. Measured below: ours with an all-ones mask (= no mask) is the
    peer's computation; the row 'ours, no mask' and the 'peer vs ours(no mask)' difference show it;
  * image: IP2P takes `image` either as pixels (encoded by vae.encode(...).latent_dist.mode()) or,
    only when it has exactly 4 channels, as latents (a hard-coded `image.shape[1] == 4` in
    prepare_image_latents): our latents have 16 channels, so the peer gets the prior as a 1-channel
    [0, 1] tensor (its VaeImageProcessor normalises it to [-1, 1]; our VAE is 1-channel, so no RGB);
  * image latents scale: stock IP2P conditions on UNSCALED latents (the SD-IP2P convention), our UNet was
    trained on latents x vae.config.scaling_factor; the peer is a subclass whose only change is that
    multiplication in prepare_image_latents (timing unaffected; without it its images are wrong);
  * noise: the peer gets `latents=` drawn exactly as ours draws them (one CPU generator per image, seeds
    0..n-1) and the same generators afterwards (Euler-ancestral step noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionInstructPix2PixPipeline  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from biomedjourney.metrics import image_psnr, image_ssim  # noqa: E402
from biomedjourney.model import make_scheduler  # noqa: E402
from biomedjourney.pipeline import BiomedJourneyPipeline, denoising_steps  # noqa: E402

PROMPT = "New right pleural effusion."
PEER_STEPS, PEER_GUIDANCE, PEER_IMAGE_GUIDANCE = 100, 7.5, 1.5   # StableDiffusionInstructPix2PixPipeline.__call__
PEER_SCHEDULER = "euler_a"                                      # what timbrooks/instruct-pix2pix ships
EQUAL_STEPS, EQUAL_SCHEDULER = 20, "dpmsolver++"


class InstructPix2PixPeer(StableDiffusionInstructPix2PixPipeline):
    """diffusers' InstructPix2Pix pipeline, one change: the prior's latents are scaled by the VAE's
    scaling_factor, as our UNet was trained (stock IP2P feeds the unscaled posterior mode)."""

    def prepare_image_latents(self, *args, **kwargs):
        return super().prepare_image_latents(*args, **kwargs) * self.vae.config.scaling_factor


def make_peer(pipe: BiomedJourneyPipeline, scheduler: str) -> InstructPix2PixPeer:
    peer = InstructPix2PixPeer(vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet,
                               scheduler=make_scheduler(scheduler, pipe.scheduler.config), safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
    peer.set_progress_bar_config(disable=True)
    return peer


# ----------------------------------------------------------------------------- inputs
@dataclass
class Request:
    prior: np.ndarray                        # (R, R) float32 [0, 1], the model-input frame
    emb: torch.Tensor                        # (1, T, D) prompt token states
    mask: torch.Tensor                       # (1, T)
    neg: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # negative text -> (emb, mask)


def make_request(pipe: BiomedJourneyPipeline, prior=None, prompt: str = PROMPT) -> Request:
    if prior is None:
        from pydicom.data import get_testdata_file
        prior = get_testdata_file("RG1_UNCI.dcm")
    emb, mask = pipe.encode_prompt([prompt])
    req = Request(pipe.prepare_prior(prior), emb, mask)
    for text in {pipe.defaults.negative_prompt, ""}:
        req.neg[text] = pipe.encode_prompt([text])
    return req


def initial_noise(pipe: BiomedJourneyPipeline, n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The initial latents exactly as BiomedJourneyPipeline draws them, and the generators after drawing."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    c, h = pipe.vae.config.latent_channels, pipe.unet.config.sample_size
    noise = randn_tensor((n, c, h, h), generator=gens, device=torch.device("cpu"), dtype=torch.float32)
    return noise.to(pipe.device, pipe.dtype), gens


# ----------------------------------------------------------------------------- the two pipelines
def run_ours(pipe: BiomedJourneyPipeline, req: Request, n: int, equal: bool, use_mask: bool = True,
             equal_steps: int = EQUAL_STEPS) -> list[np.ndarray]:
    """equal: 20 DPM-Solver++ steps from noise, no change transfer; else the shipped defaults."""
    d = pipe.defaults
    neg_e, neg_m = req.neg[d.negative_prompt]
    mask, neg_m = (req.mask, neg_m) if use_mask else (torch.ones_like(req.mask), torch.ones_like(neg_m))
    kw = dict(num_inference_steps=equal_steps, scheduler=EQUAL_SCHEDULER, strength=1.0, change_transfer=False) \
        if equal else {}
    return pipe(req.prior, PROMPT, num_images=n, seed=0, prompt_embeds=(req.emb, mask),
                negative_prompt_embeds=(neg_e, neg_m), **kw).images


def run_peer(peer: InstructPix2PixPeer, pipe: BiomedJourneyPipeline, req: Request, n: int, equal: bool,
             steps: int | None = None) -> list[np.ndarray]:
    """equal: our guidance and negative prompt (steps: 20 DPM-Solver++ by default); else IP2P's defaults."""
    d = pipe.defaults
    neg = req.neg[d.negative_prompt if equal else ""]
    g, gi = (d.guidance_scale, d.image_guidance_scale) if equal else (PEER_GUIDANCE, PEER_IMAGE_GUIDANCE)
    latents, gens = initial_noise(pipe, n)
    image = torch.from_numpy(req.prior)[None, None].to(pipe.device, pipe.dtype)       # (1, 1, R, R) in [0, 1]
    with warnings.catch_warnings():  # one image for n prompts: IP2P's (deprecated-warning) duplication path
        warnings.simplefilter("ignore", FutureWarning)
        out = peer(prompt_embeds=req.emb, negative_prompt_embeds=neg[0], image=image, num_images_per_prompt=n,
                   num_inference_steps=steps or (EQUAL_STEPS if equal else PEER_STEPS), guidance_scale=g,
                   image_guidance_scale=gi, latents=latents, generator=gens, output_type="np").images
    return [a[..., 0] for a in out]                                                     # (R, R) each


# ----------------------------------------------------------------------------- measuring
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _clear_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB, process lifetime


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    memory: str = ""
    out: list | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(configs: dict[str, Callable[[], list]], repeats: int, device,
            warmups: dict[str, Callable[[], list]] | None = None, log: bool = False) -> dict[str, Timing]:
    """Each config: one warm-up call (warmups[name] if given: same shapes, fewer steps), then `repeats`
    timed calls, interleaved round by round. Keeps the last output of each."""
    res = {k: Timing() for k in configs}
    for k, fn in configs.items():
        (warmups or {}).get(k, fn)()
    cuda = torch.device(device).type == "cuda"
    for _ in range(max(1, repeats)):
        for k, fn in configs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                res[k].memory = "torch.cuda.max_memory_allocated"
            else:
                res[k].memory = "peak RSS (VmHWM reset per call)" if _clear_peak_rss() else \
                    "peak RSS of the process so far (getrusage)"
            sync(device)
            t = time.perf_counter()
            res[k].out = fn()
            sync(device)
            res[k].times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _peak_rss_mb()
            res[k].peak_mb = max(res[k].peak_mb, peak)
            if log:
                print(f"  {k}: {res[k].times[-1]:.2f} s", file=sys.stderr, flush=True)
    return res


@torch.no_grad()
def unet_flops(pipe: BiomedJourneyPipeline, batch: int) -> int:
    """FLOPs of ONE UNet call at `batch` rows (the text encoder's padded token count, with a mask)."""
    from torch.utils.flop_counter import FlopCounterMode
    u = pipe.unet
    c, h = u.config.in_channels, u.config.sample_size
    x = torch.randn(batch, c, h, h, device=pipe.device, dtype=pipe.dtype)
    t = torch.tensor(500, device=pipe.device)
    tokens = int(getattr(pipe.text_encoder, "max_length", 0) or 128)
    width = u.config.encoder_hid_dim or u.config.cross_attention_dim  # the text encoder's width, projected inside
    emb = torch.randn(batch, tokens, width, device=pipe.device, dtype=pipe.dtype)
    with FlopCounterMode(display=False) as fc:
        u(x, t, encoder_hidden_states=emb, encoder_attention_mask=torch.ones(batch, tokens, device=pipe.device))
    return int(fc.get_total_flops())


def matmul_throughput(device, size: int | None = None, repeats: int = 5,
                      dtype: torch.dtype | None = None) -> tuple[float, str]:
    """FLOP/s of a large square matmul in `dtype` (None: fp32 on CPU, bf16 on GPU), median of `repeats` after a
    warm-up."""
    cuda = torch.device(device).type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    size = size or (8192 if cuda else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / statistics.median(times), f"{size}x{size} {str(dtype).replace('torch.', '')} matmul"


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"ssim": image_ssim(a, b), "psnr": image_psnr(a, b), "max_abs": float(np.abs(a - b).max())}


def mean_compare(xs: list[np.ndarray], ys: list[np.ndarray]) -> dict:
    cs = [compare(x, y) for x, y in zip(xs, ys)]
    return {k: float(np.mean([c[k] for c in cs])) if k != "max_abs" else max(c[k] for c in cs) for k in cs[0]}


# ----------------------------------------------------------------------------- the benchmark
def unet_calls(pipe: BiomedJourneyPipeline, n: int, equal_steps: int = EQUAL_STEPS,
               peer_steps: int = PEER_STEPS) -> dict[str, tuple[int, int]]:
    """config -> (UNet calls per request, rows per call)."""
    d = pipe.defaults
    k = 2 if d.change_transfer else 1
    out = {"ours_equal": (equal_steps, 3 * n), "ours_equal_nomask": (equal_steps, 3 * n),
            "peer_equal": (equal_steps, 3 * n),
            "ours_default": (denoising_steps(d.num_inference_steps, d.strength), 3 * k * n),
            "peer_default": (peer_steps, 3 * n),
            # what the app and CLI run: the service, region + rendering when the model ships them
            "ours_service_no_noise_opt": (denoising_steps(d.num_inference_steps,
                                                          d.render_strength if d.render else d.strength), 3 * k * n)}
    c, rows = out["ours_service_no_noise_opt"]
    # + each noise-optimisation step: one forward and one backward (~2 forwards) of the UNet
    out["ours_service"] = (c + 3 * (d.noise_opt_steps if _noise_opt_on(pipe) else 0), rows)
    return out


def _noise_opt_on(pipe: BiomedJourneyPipeline) -> bool:
    """Whether the service's request includes noise optimisation (it runs on top of a drawing: service docs)."""
    d = pipe.defaults
    return pipe.guidance_model is not None and d.noise_opt_steps > 0 and d.render


def run_service(pipe: BiomedJourneyPipeline, req: Request, n: int, noise_opt_steps: int | None = None) -> list[np.ndarray]:
    """The product path (biomedjourney.service): findings -> anatomy -> edit mask (-> rendering) -> pipeline."""
    from biomedjourney.service import generate_followups
    return generate_followups(pipe, req.prior, PROMPT, seed=0, num_images=n, noise_opt_steps=noise_opt_steps).images


def _configs(pipe, req, n, peer_eq, peer_def, equal_steps, peer_default_steps, low_precision) -> dict[str, Callable]:
    """configuration name -> the call it times (n images each)."""
    configs = {
        "ours_equal": lambda: run_ours(pipe, req, n, equal=True, equal_steps=equal_steps),
        "peer_equal": lambda: run_peer(peer_eq, pipe, req, n, equal=True, steps=equal_steps),
        "ours_equal_nomask": lambda: run_ours(pipe, req, n, equal=True, use_mask=False, equal_steps=equal_steps),
        "ours_default": lambda: run_ours(pipe, req, n, equal=False),
        "peer_default": lambda: run_peer(peer_def, pipe, req, n, equal=False, steps=peer_default_steps),
        "ours_service": lambda: run_service(pipe, req, n),
    }
    if _noise_opt_on(pipe):
        configs["ours_service_no_noise_opt"] = lambda: run_service(pipe, req, n, 0)
    if low_precision is not None:
        configs["ours_service_lowp"] = lambda: run_service(low_precision, req, n)
    return configs


def benchmark(pipe: BiomedJourneyPipeline, sizes=(1, 4), repeats: int = 3, req: Request | None = None,
              peer_default_steps: int = PEER_STEPS, equal_steps: int = EQUAL_STEPS,
              matmul_size: int | None = None, log: bool = False,
              low_precision: BiomedJourneyPipeline | None = None) -> dict:
    """Everything the printout shows, as a dict (tests call this on tiny_pipeline() with repeats=1).
    `low_precision`: the same model loaded in bfloat16 / float16: its service request is timed beside the others
    and its images compared with the full-precision ones (row 'ours_service_lowp')."""
    req = req or make_request(pipe)
    device = pipe.device
    peer_eq, peer_def = make_peer(pipe, EQUAL_SCHEDULER), make_peer(pipe, PEER_SCHEDULER)
    peak_flops, matmul = matmul_throughput(device, matmul_size)
    flops_per_row = unet_flops(pipe, 1)
    out = {"device": str(device), "dtype": str(pipe.dtype), "threads": torch.get_num_threads(),
           "resolution": pipe.resolution, "model": pipe.model_id, "matmul": matmul, "peak_flops": peak_flops,
           "unet_flops_per_row": flops_per_row, "defaults": dict(pipe.config.sampler),
           "peer_default_steps": peer_default_steps,
           "equal_steps": equal_steps, "sizes": {}}
    if low_precision is not None:
        out["lowp_dtype"] = str(low_precision.dtype).removeprefix("torch.")
        out["lowp_peak_flops"], out["lowp_matmul"] = matmul_throughput(device, matmul_size, dtype=low_precision.dtype)
    for n in sizes:
        configs = _configs(pipe, req, n, peer_eq, peer_def, equal_steps, peer_default_steps, low_precision)
        warm = {"peer_default": lambda: run_peer(peer_def, pipe, req, n, equal=False, steps=2)}
        if log:
            print(f"{n} image(s): warm-up, then {repeats} round(s)", file=sys.stderr, flush=True)
        t = measure(configs, repeats, device, warm, log=log)
        calls = unet_calls(pipe, n, equal_steps, peer_default_steps)
        calls["ours_service_lowp"] = calls["ours_service"]   # the same request, the model in another dtype
        flops_row = {b: unet_flops(pipe, b) for b in sorted({rows for _, rows in calls.values()})}
        rows = {}
        for k, tm in t.items():
            c, b = calls[k]
            flops = c * flops_row[b]
            peak = out["lowp_peak_flops"] if k == "ours_service_lowp" else peak_flops  # against its own dtype's peak
            rows[k] = {"median_s": tm.median, "times_s": tm.times, "images_per_s": n / tm.median,
                       "peak_mb": tm.peak_mb, "memory": tm.memory, "unet_calls": c, "rows_per_call": b,
                       "unet_gflop": flops / 1e9, "utilisation": flops / peak / tm.median,
                       "shape": [list(a.shape) for a in tm.out], "finite": all(np.isfinite(a).all() for a in tm.out)}
        o = {k: tm.out for k, tm in t.items()}
        ref = o["peer_default"]
        quality = {
            "peer_equal_vs_ours_equal_nomask": mean_compare(o["peer_equal"], o["ours_equal_nomask"]),
            "peer_equal_vs_ours_equal": mean_compare(o["peer_equal"], o["ours_equal"]),
            "ours_equal_vs_ours_equal_nomask (the mask's effect)": mean_compare(o["ours_equal"], o["ours_equal_nomask"]),
            "ours_default_vs_peer_default": mean_compare(o["ours_default"], ref),
            "ours_equal_vs_peer_default": mean_compare(o["ours_equal"], ref),
            "peer_equal_vs_peer_default": mean_compare(o["peer_equal"], ref),
        }
        if low_precision is not None:
            quality["ours_service_lowp_vs_ours_service"] = mean_compare(o["ours_service_lowp"], o["ours_service"])
        to_prior = {k: float(np.mean([image_ssim(a, req.prior) for a in v])) for k, v in o.items()}
        out["sizes"][n] = {"rows": rows, "quality": quality, "ssim_to_prior": to_prior, "images": o}
    return out


LABELS = {
    "ours_equal": "ours   (a) {e} DPM++, strength 1, no transfer",
    "peer_equal": "peer   (a) {e} DPM++, same guidance/noise",
    "ours_equal_nomask": "ours   (a) same, all-ones attention mask",
    "ours_default": "ours   (b) shipped defaults",
    "peer_default": "peer   (b) IP2P defaults ({p} Euler-a steps)",
    "ours_service": "ours   service: the app/CLI request (defaults)",
    "ours_service_no_noise_opt": "ours   service without noise optimisation",
    "ours_service_lowp": "ours   service, the model in {lp}",
}


def report(res: dict) -> str:
    d = res["defaults"]
    lines = [f"model {res['model']}  device {res['device']} {res['dtype']}  torch threads {res['threads']}  "
             f"{res['resolution']} px",
             f"device matmul throughput: {res['peak_flops'] / 1e9:.1f} GFLOP/s ({res['matmul']}); "
             f"UNet {res['unet_flops_per_row'] / 1e9:.2f} GFLOP per call per batch row (FlopCounterMode)"
             + (f"; {res['lowp_peak_flops'] / 1e9:.1f} GFLOP/s in {res['lowp_dtype']} ({res['lowp_matmul']}), the "
                f"{res['lowp_dtype']} row's utilisation is against it" if "lowp_dtype" in res else ""),
             f"ours defaults: {d['num_inference_steps']} {d['scheduler']} steps, strength {d['strength']}, change "
             f"transfer {d['change_transfer']}, guidance {d['guidance_scale']}/{d['image_guidance_scale']}, negative "
             f"{d['negative_prompt']!r}",
             f"peer defaults: {res['peer_default_steps']} Euler-ancestral steps, guidance {PEER_GUIDANCE}/"
             f"{PEER_IMAGE_GUIDANCE}, negative '' (IP2P's default), no attention mask", ""]
    hdr = f"{'n':>2} {'configuration':<46} {'median s':>9} {'img/s':>7} {'peak MB':>8} {'UNet calls x rows':>17} " \
          f"{'GFLOP':>8} {'util':>6}  times"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for n, s in res["sizes"].items():
        for k, r in s["rows"].items():
            label = LABELS[k].format(e=res['equal_steps'], p=res['peer_default_steps'], lp=res.get('lowp_dtype'))
            lines.append(f"{n:>2} {label:<46} {r['median_s']:>9.2f} {r['images_per_s']:>7.3f} {r['peak_mb']:>8.0f} "
                         f"{r['unet_calls']:>8} x {r['rows_per_call']:<6} {r['unet_gflop']:>8.1f} "
                         f"{100 * r['utilisation']:>5.1f}%  {[round(x, 2) for x in r['times_s']]}")
        r = s["rows"]
        lines.append(f"{n:>2}   equal-steps ours/peer {r['ours_equal']['median_s'] / r['peer_equal']['median_s']:.3f}x"
                     f" (ours no-mask/peer {r['ours_equal_nomask']['median_s'] / r['peer_equal']['median_s']:.3f}x);"
                     f" default peer/ours speed-up {r['peer_default']['median_s'] / r['ours_default']['median_s']:.2f}x")
    lines.append("")
    lines.append(f"{'n':>2} {'comparison (mean over the n seeds)':<58} {'SSIM':>7} {'PSNR dB':>8} {'max|d|':>8}")
    for n, s in res["sizes"].items():
        for k, q in s["quality"].items():
            lines.append(f"{n:>2} {k:<58} {q['ssim']:>7.4f} {q['psnr']:>8.2f} {q['max_abs']:>8.4f}")
        lines.append(f"{n:>2} SSIM to the prior: " + ", ".join(f"{k} {v:.3f}" for k, v in s["ssim_to_prior"].items()))
    mem = {r["memory"] for s in res["sizes"].values() for r in s["rows"].values()}
    lines.append(f"memory: {', '.join(sorted(mem))}; utilisation = UNet FLOPs x calls / matmul throughput / "
                 f"median time (UNet only: VAE and scheduler work count as overhead)")
    lines.append("peer differences: no encoder_attention_mask (attends to the padding states; see the "
                 "'no mask' rows), prior latents scaled by vae.scaling_factor through a one-method subclass "
                 "(stock IP2P: unscaled), prior given as a 1-channel pixel tensor (latents only accepted with "
                 "4 channels), initial noise passed as latents=")
    return "\n".join(lines)


def summary(res: dict) -> str:
    n = max(res["sizes"])
    s = res["sizes"][n]
    r, q = s["rows"], s["quality"]["ours_default_vs_peer_default"]
    return (f"n={n}: equal-steps overhead {r['ours_equal']['median_s'] / r['peer_equal']['median_s']:.2f}x; "
            f"default-vs-default speed-up {r['peer_default']['median_s'] / r['ours_default']['median_s']:.1f}x "
            f"(SSIM {q['ssim']:.3f} / PSNR {q['psnr']:.1f} dB of our default image vs the peer's "
            f"{res['peer_default_steps']}-step default image); "
            f"UNet utilisation {100 * r['ours_default']['utilisation']:.0f}% (ours, defaults); "
            f"the app's request (service, defaults) {r['ours_service']['median_s']:.2f} s"
            + (f", {r['ours_service']['median_s'] / r['ours_service_no_noise_opt']['median_s']:.2f}x the same request "
               f"without its {res['defaults'].get('noise_opt_steps')} noise-optimisation steps"
               if "ours_service_no_noise_opt" in r else "")
            + (f"; in {res['lowp_dtype']} {r['ours_service_lowp']['median_s']:.2f} s, "
               f"{r['ours_service']['median_s'] / r['ours_service_lowp']['median_s']:.2f}x faster (SSIM "
               f"{s['quality']['ours_service_lowp_vs_ours_service']['ssim']:.4f} to the {res['dtype'].removeprefix('torch.')} images)"
               if "ours_service_lowp" in r else ""))


def fast_low_precision(device) -> torch.dtype | None:
    """The dtype worth a row: bfloat16 on a CPU with AMX tiles (oneDNN's bf16 matmuls and convolutions), float16 is
    already the CUDA default; None on a CPU without AMX (bf16 there is emulated and slower)."""
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else None
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: $BIOMEDJOURNEY_MODEL or the shipped one)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per configuration after a warm-up (>= 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sizes", default="1,4", help="images per request, comma-separated")
    ap.add_argument("--peer-steps", type=int, default=PEER_STEPS, help="the peer's default steps (100)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--low-precision", choices=["auto", "bfloat16", "off"], default="auto",
                    help="also time the service request with the model in this dtype (auto: bfloat16 on a CPU with AMX)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.repeats < 3:
        print(f"note: --repeats {a.repeats} < 3: a development run, not a measurement", file=sys.stderr)
    pipe = BiomedJourneyPipeline.from_pretrained(a.model, device=a.device)
    lp = {"auto": fast_low_precision(a.device), "bfloat16": torch.bfloat16, "off": None}[a.low_precision]
    low = None if lp is None else BiomedJourneyPipeline.from_pretrained(a.model, device=a.device, dtype=lp)
    res = benchmark(pipe, sizes=[int(x) for x in a.sizes.split(",")], repeats=a.repeats, peer_default_steps=a.peer_steps,
                    log=True, low_precision=low)
    print(report(res))
    print(summary(res))
    if a.json:
        slim = {k: v for k, v in res.items() if k != "sizes"}
        slim["sizes"] = {n: {k: v for k, v in s.items() if k != "images"} for n, s in res["sizes"].items()}
        Path(a.json).write_text(json.dumps(slim, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
