"""Smoke test of benchmarks/bench_sampling.py's measurement functions on the tiny pipeline (seconds):
the peer (diffusers' StableDiffusionInstructPix2PixPipeline on our unet/vae) and ours give images of
the right shape, and at equal settings with an all-ones attention mask (IP2P passes none) the same
images: same UNet, same scheduler, same initial noise."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sampling", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_peer_matches_ours_at_equal_settings(bench):
    from biomedjourney.pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    r = pipe.resolution
    req = bench.make_request(pipe, prior=np.random.RandomState(0).rand(r, r).astype(np.float32))
    res = bench.benchmark(pipe, sizes=(2,), repeats=1, req=req, peer_default_steps=3, equal_steps=3, matmul_size=256)
    s = res["sizes"][2]
    assert set(s["rows"]) == {"ours_equal", "peer_equal", "ours_equal_nomask", "ours_default", "peer_default",
                              "ours_service"}
    for name, row in s["rows"].items():
        assert row["shape"] == [[r, r]] * 2 and row["finite"], name
        assert row["median_s"] > 0 and row["unet_gflop"] > 0 and row["peak_mb"] > 0, name
    q = s["quality"]
    assert q["peer_equal_vs_ours_equal_nomask"]["max_abs"] < 1e-4         # the same computation
    assert q["ours_equal_vs_ours_equal_nomask (the mask's effect)"]["max_abs"] > 1e-4  # padding is masked in ours
    assert 0 < res["peak_flops"] and "equal-steps overhead" in bench.summary(res)
    assert "peer differences" in bench.report(res)


def test_a_model_with_a_guidance_model_gets_the_noise_optimisation_row(bench):
    import torch

    from biomedjourney.guidance import GuidanceModel
    from biomedjourney.pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.defaults = pipe.defaults.with_overrides(["noise_opt_steps=2", "render=true"])
    torch.manual_seed(0)
    pipe.register_modules(guidance_model=GuidanceModel(latent_channels=4, block_out_channels=(8, 16),
                                                       norm_num_groups=4, time_channels=8).eval())
    r = pipe.resolution
    req = bench.make_request(pipe, prior=np.random.RandomState(0).rand(r, r).astype(np.float32))
    res = bench.benchmark(pipe, sizes=(1,), repeats=1, req=req, peer_default_steps=2, equal_steps=2, matmul_size=256)
    rows = res["sizes"][1]["rows"]
    assert rows["ours_service"]["unet_calls"] == rows["ours_service_no_noise_opt"]["unet_calls"] + 3 * 2
    assert "without its 2 noise-optimisation steps" in bench.summary(res)


def test_the_low_precision_row_times_the_same_request_and_compares_its_images(bench):
    import torch

    from biomedjourney.pipeline import tiny_pipeline

    pipe, low = tiny_pipeline(), tiny_pipeline().to(dtype=torch.bfloat16)
    r = pipe.resolution
    req = bench.make_request(pipe, prior=np.random.RandomState(0).rand(r, r).astype(np.float32))
    res = bench.benchmark(pipe, sizes=(1,), repeats=1, req=req, peer_default_steps=2, equal_steps=2, matmul_size=256,
                          low_precision=low)
    s = res["sizes"][1]
    row, q = s["rows"]["ours_service_lowp"], s["quality"]["ours_service_lowp_vs_ours_service"]
    assert row["unet_calls"] == s["rows"]["ours_service"]["unet_calls"] and row["finite"]
    assert res["lowp_dtype"] == "bfloat16" and "bfloat16" in res["lowp_matmul"] and res["lowp_peak_flops"] > 0
    assert 0 < q["max_abs"] < 0.2 and q["ssim"] > 0.9       # the same images up to rounding, not other images
    assert "in bfloat16" in bench.summary(res) and "the model in bfloat16" in bench.report(res)
