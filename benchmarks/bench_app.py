"""The web app end to end: cold start of `python app.py --port P` to a served page, then request ->
first image for N samples through gradio_client (the app's named `generate` endpoint).

    python benchmarks/bench_app.py                       # shipped model ($BIOMEDJOURNEY_MODEL if set), 4 samples
    python benchmarks/bench_app.py --model PATH --num-images 4 --requests 3

The endpoint's inputs are discovered at run time (client.view_api(return_format='dict')): the prior goes
to the first file input, the description to the text input named `description`, `num_images` and `seed`
(and `randomise`=False) are set, every other input keeps the app's default. The app loads its model
lazily, so request 1 includes the model load; later requests are the warm latency. The app's own
timing (settings 'generation_seconds', when it reports it) is printed beside the client's.
Server peak RSS: VmHWM of the server process (Linux /proc), read before it is stopped.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "New right pleural effusion."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until GET url answers 200 (the server process must stay alive)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


def peak_rss_mb(pid: int) -> float | None:
    """The process' peak resident set (VmHWM), plus its children's current RSS when psutil is installed."""
    try:
        hwm = next(int(line.split()[1]) / 1024 for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    try:
        import psutil
        hwm += sum(c.memory_info().rss for c in psutil.Process(pid).children(recursive=True)) / 2 ** 20
    except Exception:  # noqa: BLE001 - psutil missing or a child gone
        pass
    return hwm


def generate_inputs(api: dict, prior_path: str, n: int, seed: int = 0) -> dict:
    """Keyword arguments for /generate from the live API description; a clear error when it is missing."""
    from gradio_client import handle_file
    endpoints = api.get("named_endpoints", {})
    if "/generate" not in endpoints:
        raise SystemExit(f"the app has no '/generate' endpoint (named endpoints: {sorted(endpoints)}); "
                         "app.py's generate button must keep api_name='generate'")
    kwargs, missing, file_done = {}, [], False
    for p in endpoints["/generate"]["parameters"]:
        name = p.get("parameter_name") or p.get("label")
        comp = str(p.get("component", "")).lower()
        if not file_done and (comp in ("file", "image", "uploadbutton") or name in ("prior_file", "prior")):
            kwargs[name], file_done = handle_file(prior_path), True
        elif name == "description":
            kwargs[name] = PROMPT
        elif name == "num_images":
            kwargs[name] = n
        elif name == "seed":
            kwargs[name] = seed
        elif name == "randomise":
            kwargs[name] = False
        elif not p.get("parameter_has_default"):
            missing.append(name)
    if not file_done:
        raise SystemExit(f"/generate has no file input for the prior: {endpoints['/generate']['parameters']}")
    if missing:
        raise SystemExit(f"/generate needs inputs this benchmark does not know how to fill: {missing}")
    return kwargs


def first_image(client, kwargs: dict) -> tuple[float, float, list, dict]:
    """Seconds from submit to the first output holding images (the app streams the first sample before the others),
    seconds to the last output (all samples, heatmaps and files); the final gallery and the settings."""
    t0 = time.perf_counter()
    job = client.submit(api_name="/generate", **kwargs)
    first = None
    for out in job:                                  # gradio_client: each output as the app yields it
        if first is None and isinstance(out, (list, tuple)) and out and out[0]:
            first = time.perf_counter() - t0
    out = job.result()
    done = time.perf_counter() - t0
    gallery = out[0] if isinstance(out, (list, tuple)) else out
    settings = next((o for o in out if isinstance(o, dict) and "seeds" in o), {}) if isinstance(out, (list, tuple)) else {}
    return done if first is None else first, done, gallery, settings


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="sets BIOMEDJOURNEY_MODEL (default: as set, else the shipped model)")
    ap.add_argument("--port", type=int, default=0, help="0: a free port")
    ap.add_argument("--num-images", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2, help="request 1 includes the lazy model load")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: inherit)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--prior", default=None, help="prior image (default: pydicom's RG1_UNCI.dcm)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="the server's model precision (sets BIOMEDJOURNEY_DTYPE; default: the app's)")
    return ap


def server_env(model: str | None, threads: int, dtype: str | None = None) -> dict:
    """The app server's environment: offline, no analytics, the model to serve, optionally its threads and dtype."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["BIOMEDJOURNEY_MODEL"] = model or env.get("BIOMEDJOURNEY_MODEL") or str(ROOT / "assets" / "biomedjourney-cxr")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if dtype:
        env["BIOMEDJOURNEY_DTYPE"] = dtype
    return env


def default_prior() -> str:
    from pydicom.data import get_testdata_file
    return get_testdata_file("RG1_UNCI.dcm")


def measure(proc: subprocess.Popen, url: str, prior: str, a) -> tuple[float, float | None, list, float | None]:
    """(cold start s, server peak RSS when idle, per request (seconds, images, the app's seconds), peak RSS)."""
    try:
        cold = wait_for_page(url, proc, a.timeout)
    except (RuntimeError, TimeoutError) as e:
        err = proc.stderr.read()[-3000:] if proc.poll() is not None else ""
        raise SystemExit(f"{e}\n{err}") from None
    rss_idle = peak_rss_mb(proc.pid)
    from gradio_client import Client
    client = Client(url, verbose=False)
    kwargs = generate_inputs(client.view_api(print_info=False, return_format="dict"), prior, a.num_images)
    rows = []
    for _ in range(a.requests):
        dt, done, gallery, settings = first_image(client, kwargs)
        if not gallery:
            raise SystemExit(f"/generate returned no image: {gallery!r}")
        rows.append((dt, len(gallery), settings.get("generation_seconds"), done))
    return cold, rss_idle, rows, peak_rss_mb(proc.pid)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def report(a, env: dict, port: int, cold: float, rss_idle: float | None, rows: list, rss: float | None) -> None:
    print(f"app.py  model {env['BIOMEDJOURNEY_MODEL']}  port {port}  server OMP_NUM_THREADS "
          f"{env.get('OMP_NUM_THREADS', '(unset)')}  dtype {env.get('BIOMEDJOURNEY_DTYPE', '(the default)')}  "
          f"{a.num_images} samples  prompt {PROMPT!r}")
    print(f"cold start to a served page (GET / = 200): {cold:.2f} s  (server peak RSS then "
          f"{rss_idle:.0f} MB)" if rss_idle else f"cold start to a served page (GET / = 200): {cold:.2f} s")
    for i, (dt, k, gen, done) in enumerate(rows, 1):
        note = " (includes the lazy model load)" if i == 1 else ""
        app_t = f"; the app's generation_seconds {gen:.2f}" if isinstance(gen, (int, float)) else ""
        print(f"request {i}: submit -> first image {dt:.2f} s, {k} images{note}{app_t}; "
              f"with heatmaps and files {done:.2f} s")
    print(f"server peak RSS: {rss:.0f} MB" if rss else "server peak RSS: not measurable (no /proc)")
    print(f"summary: cold start {cold:.1f} s; first request {rows[0][0]:.1f} s; "
          f"warm request {min(r[0] for r in rows[1:]) if len(rows) > 1 else float('nan'):.1f} s to the first image "
          f"({min(r[3] for r in rows[1:]) if len(rows) > 1 else float('nan'):.1f} s with heatmaps and files) "
          f"for {a.num_images} images; server peak RSS {rss or float('nan'):.0f} MB")


def main(argv=None):
    a = _parser().parse_args(argv)
    port = a.port or free_port()
    env = server_env(a.model, a.threads, a.dtype)
    prior = a.prior if a.prior is not None else default_prior()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        cold, rss_idle, rows, rss = measure(proc, f"http://127.0.0.1:{port}/", prior, a)
    finally:
        stop(proc)
    report(a, env, port, cold, rss_idle, rows, rss)


if __name__ == "__main__":
    main()
