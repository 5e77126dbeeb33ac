"""Load: the app as it is launched (`python app.py`, its own process, the tiny model, one CPU thread) takes 16
gradio_client jobs at once, from 13 users. Every job completes, or is refused at once with a 'busy' message (one
user beyond its JOBS_PER_USER); none is lost or mixed up: each image equals a solo run of its own seed and
description, bit for bit. The server's peak RSS is reported and bounded, oversized uploads are refused, it serves
normally afterwards, and when the users leave their uploads and results are gone."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hostile import film
from PIL import Image
from test_imaging import _png

REPO = Path(__file__).resolve().parents[1]
TEXTS = ("New right pleural effusion.", "New left pleural effusion.")
JOBS_PER_USER = 2  # app.JOBS_PER_USER, its default
MAX_UPLOAD_MB = 64  # app.MAX_UPLOAD_MB, its default
RSS_LIMIT_MB = 2500  # the tiny model's server; the shipped model adds its weights (~0.5 GB)
REPORT = {}


def _rss_mb(pid: int, field: str) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`python app.py` on a free port, the tiny model, its uploads and results in a temp folder."""
    folder = tmp_path_factory.mktemp("served")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIOMEDJOURNEY_MODEL": str(tiny_model_dir),
           "BIOMEDJOURNEY_OUTPUTS": str(folder / "outputs"), "GRADIO_TEMP_DIR": str(folder / "gradio"),
           "GRADIO_HEARTBEAT_INTERVAL": "0.5", "GRADIO_ANALYTICS_ENABLED": "False",
           "BIOMEDJOURNEY_JOBS_PER_USER": str(JOBS_PER_USER), "BIOMEDJOURNEY_QUEUE_MAX": "16",
           "BIOMEDJOURNEY_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB)}
    log = folder / "server.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert p.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    prior = folder / "load_prior.png"
    prior.write_bytes(_png(film()))
    try:
        yield {"url": url, "pid": p.pid, "log": log, "folder": folder, "prior": prior}
    finally:
        p.terminate()
        p.wait(30)


def _client(url):
    from gradio_client import Client
    return Client(url, verbose=False, download_files=False)  # outputs stay on the server (same machine: read there)


def _submit(client, prior, seed: int):
    from gradio_client import handle_file
    return client.submit(handle_file(str(prior)), TEXTS[seed % 2], 1, 3, 4.0, 1.5, seed, False, "ddim", 0.8, True,
                         "auto", False, False, None, 0, api_name="/generate")


def _image(outputs) -> np.ndarray:
    with Image.open(outputs[0][0]["image"]["path"]) as im:  # the gallery's only image, as the server wrote it
        return np.asarray(im).copy()


def _outcome(job):
    try:
        return "done", job.result(timeout=300)
    except Exception as e:  # noqa: BLE001 - refused: gradio_client raises its own types
        return "refused", str(e)


def test_sixteen_concurrent_jobs_complete_or_are_refused_and_match_solo_runs(server):
    url, prior = server["url"], server["prior"]
    warm = _client(url)
    _outcome(_submit(warm, prior, 99))  # the model is loaded on the first request
    rss_before = _rss_mb(server["pid"], "VmRSS")
    with ThreadPoolExecutor(16) as pool:
        users = list(pool.map(lambda _: _client(url), range(13)))
    t0 = time.perf_counter()
    jobs = [(u, seed, _submit(users[u], prior, seed)) for u, seed in [(i, i) for i in range(12)] + [(12, s) for s in
                                                                                                  range(12, 16)]]
    results = [(u, seed, *_outcome(job)) for u, seed, job in jobs]
    wall = time.perf_counter() - t0
    done = [(u, seed, out) for u, seed, status, out in results if status == "done"]
    refused = [(u, seed, msg) for u, seed, status, msg in results if status == "refused"]
    assert all("busy" in msg for _, _, msg in refused), refused
    assert {u for u, _, _ in done} >= set(range(12)), refused       # every single-job user is served
    mine = [seed for u, seed, _ in done if u == 12]
    assert len(mine) == JOBS_PER_USER and len(refused) == 4 - JOBS_PER_USER, (mine, refused)
    for _, seed, out in done:  # nothing mixed up: each result is its own seed and description
        assert out[5]["seeds"] == [seed] and out[5]["prompt"] == TEXTS[seed % 2]
    peak = _rss_mb(server["pid"], "VmHWM")
    solo = _client(url)  # it serves normally afterwards: each job again, alone
    t1 = time.perf_counter()
    for _, seed, out in done:
        alone = _submit(solo, prior, seed).result(timeout=120)
        assert np.array_equal(_image(out), _image(alone)), f"seed {seed}: the concurrent image differs from a solo run"
    REPORT.update(jobs=len(jobs), completed=len(done), refused_busy=len(refused), wall_s=round(wall, 1),
                  solo_s_per_job=round((time.perf_counter() - t1) / len(done), 2), rss_before_mb=round(rss_before),
                  peak_rss_mb=round(peak), bit_identical=True)
    print("\nload:", json.dumps(REPORT))
    assert peak < RSS_LIMIT_MB, REPORT
    for c in [warm, solo, *users]:
        c.close()


def test_an_oversized_upload_is_refused_and_the_server_carries_on(server):
    big = server["folder"] / "big.dcm"
    with open(big, "wb") as f:  # a sparse file: (MAX_UPLOAD_MB + 1) MiB of zeros
        f.truncate((MAX_UPLOAD_MB + 1) * 2**20)
    with open(big, "rb") as f:
        r = httpx.post(f"{server['url']}gradio_api/upload", files={"files": ("big.dcm", f)}, timeout=120)
    assert r.status_code == 413 and f"maximum allowed size of {MAX_UPLOAD_MB * 2**20} bytes" in r.text, r.text
    assert not list((server["folder"] / "gradio").rglob("big.dcm"))
    small = io.BytesIO(_png(film()))
    assert httpx.post(f"{server['url']}gradio_api/upload", files={"files": ("ok.png", small)}).status_code == 200


def test_when_the_users_leave_their_uploads_and_results_are_removed(server):
    deadline = time.monotonic() + 20
    left = None
    while time.monotonic() < deadline:
        uploads = [p for p in (server["folder"] / "gradio").rglob("load_prior.png")]
        runs = [p for p in (server["folder"] / "outputs").iterdir() if p.name != "examples"]
        left = uploads + runs
        if not left:
            break
        time.sleep(0.3)
    assert not left, left
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-3000:]
