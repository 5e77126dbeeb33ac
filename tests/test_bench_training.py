"""Smoke test of benchmarks/bench_training.py on the tiny preset (seconds): both paths take real training
steps on the same rows, the figures and the one summary line come out."""
import importlib.util
import sys
from pathlib import Path

import pytest

from biomedjourney import dataset

pytestmark = pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"


def test_cached_and_on_the_fly_steps_give_images_per_second(tiny_prep, capsys):
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    bench.main(["--config", "tiny", "--vae", str(tiny_prep / "vae"), "--steps", "3", "--warmup", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config tiny, stage-2 steps, batch 2, 64 px")
    assert [line.split()[0] for line in out[3:5]] == ["cached", "on"]
    assert len(out) == 6 and out[-1].startswith("summary: cached ") and out[-1].endswith("MFU: on CUDA only")
    paths, _ = bench.cached_and_on_the_fly(bench.load_config("tiny"), tiny_prep / "vae", "cpu")
    res = bench.measure(paths, 2, 3, 1, "cpu")
    for r in res["paths"].values():
        assert r["images_per_s"] > 0 and len(r["times_s"]) == 3 and r["mfu"] is None
    assert res["train_step_flops"] > 0 and res["peak_flops"] is None
