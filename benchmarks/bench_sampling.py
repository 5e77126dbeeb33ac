"""Sampling speed: BiomedJourneyPipeline (dual guidance in ONE batched UNet call per step) against
the same model run with three separate UNet calls per step (diffusers' pipelines before batching;
the peer), measured in the same run on the same inputs.

    python benchmarks/bench_sampling.py                      # shipped model, default settings, CPU
    python benchmarks/bench_sampling.py --model PATH --num-images 4 --repeats 3

Prints seconds per request (4 follow-ups by default, model's default steps) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from biomedjourney.imaging import read_image  # noqa: E402
from biomedjourney.pipeline import BiomedJourneyPipeline  # noqa: E402


class _UnbatchedUNet(torch.nn.Module):
    """The peer: evaluates the three guidance branches with three UNet calls instead of one."""

    def __init__(self, unet):
        super().__init__()
        self.inner, self.config = unet, unet.config

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None):
        outs = [self.inner(xi, t, encoder_hidden_states=ei, encoder_attention_mask=mi).sample
                for xi, ei, mi in zip(x.chunk(3), encoder_hidden_states.chunk(3), encoder_attention_mask.chunk(3))]
        return type("Out", (), {"sample": torch.cat(outs)})()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from pydicom.data import get_testdata_file
    pipe = BiomedJourneyPipeline.from_pretrained(a.model, device="cpu")
    prior = read_image(get_testdata_file("RG1_UNCI.dcm"))
    n = a.num_images or pipe.defaults.num_images
    text = "New right pleural effusion."
    run = lambda: pipe(prior, text, num_images=n, seed=0)  # noqa: E731
    ours = timed(run, a.repeats)
    batched_unet = pipe.unet
    pipe.unet = _UnbatchedUNet(batched_unet)
    peer = timed(run, a.repeats)
    pipe.unet = batched_unet
    mo, mp = statistics.median(ours), statistics.median(peer)
    print(f"model {pipe.model_id}: {n} follow-ups, {pipe.defaults.num_inference_steps} steps, "
          f"{pipe.defaults.scheduler}, {pipe.resolution}px, torch threads {torch.get_num_threads()}")
    print(f"BiomedJourneyPipeline (one batched UNet call/step): median {mo:.2f} s  {[round(x, 2) for x in ours]}")
    print(f"peer: three UNet calls/step (unbatched guidance):   median {mp:.2f} s  {[round(x, 2) for x in peer]}")
    print(f"speed-up vs peer: {mp / mo:.2f}x;  target <= 15 s for 4 images on a 2-core CPU: "
          f"{'MET' if mo <= 15 else 'NOT MET'}")


if __name__ == "__main__":
    main()
