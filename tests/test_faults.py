"""Faults: training killed with SIGKILL at three random steps and resumed ends with the weights of an uninterrupted
run; the batch describer killed while a paid answer is in flight loses no answer it had received (the rerun asks
only for the rest); an exception inside a generation does not take the app down; a full disk while exporting
leaves no half-written file under a final name (CLI, Python API, app)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pydicom
import pytest
from hostile import DESCRIPTION, film
from PIL import Image
from test_imaging import _png
from test_progression_llm import _Stub

from biomedjourney import cli, dataset
from biomedjourney.service import export_followups, generate_followups, load_pipeline

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
STEPS = 12  # the tiny config checkpoints every 2 steps


# ----------------------------------------------------------------------------------- training, kill -9
# train/train.py's imports take most of a run on a small CPU: one process imports them once and forks each
# training run from there (nothing has run in torch yet, so forking is safe); every run is its own process,
# killed with SIGKILL from here.
_WARM = """
import json, os, sys, traceback
import train.train as T
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1), os.dup2(fd, 2)
        try:
            T.main(argv)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Trainer:
    """train/train.py runs, each a fresh process forked from one that has done the imports."""

    def __init__(self, prep: Path, folder: Path):
        self.prep, self.folder, self.n = prep, folder, 0
        self.p = subprocess.Popen([sys.executable, "-c", _WARM], env=ENV, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def run(self, out: Path, *extra: str, kill_at: int | None = None) -> tuple[int, int, str]:
        """(exit code, the step its progress bar showed last, its output); SIGKILL once it shows ``kill_at``."""
        self.n += 1
        log = self.folder / f"run{self.n}.log"
        argv = ["--stage", "1", "--config", "tiny", "--data", str(self.prep), "--vae", str(self.prep / "vae"),
                "--out", str(out), "--steps", str(STEPS), "--threads", "1", *extra]
        self.p.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.p.stdin.flush()
        pid, seen = int(self.p.stdout.readline()), 0
        while kill_at is not None and seen < kill_at and Path(f"/proc/{pid}").exists():
            done = re.findall(r"\| *(\d+)/%d \[" % STEPS, log.read_text(errors="replace")) if log.exists() else []
            seen = int(done[-1]) if done else 0
            if seen < kill_at:
                threading.Event().wait(0.02)
        if kill_at is not None:
            with contextlib.suppress(ProcessLookupError):  # it ended first: said by the exit code
                os.kill(pid, signal.SIGKILL)
        return os.waitstatus_to_exitcode(int(self.p.stdout.readline())), seen, log.read_text(errors="replace")

    def close(self):
        self.p.stdin.close()
        self.p.wait(30)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file
    ck = run / "stage1" / "checkpoints" / f"step-{STEPS:08d}"
    return {name: load_file(ck / f"{name}.safetensors") for name in ("unet", "ema")} | {
        "export": load_file(run / "stage1" / "export" / "unet" / "diffusion_pytorch_model.safetensors")}


@pytest.mark.skipif(not dataset.has_data(), reason=dataset.missing_data_reason())
def test_training_killed_at_three_random_steps_resumes_to_the_uninterrupted_weights(tiny_prep, tmp_path):
    import torch
    kills, at = sorted(random.sample(range(1, STEPS), 3)), []
    trainer = Trainer(tiny_prep, tmp_path)
    try:
        code, _, log = trainer.run(tmp_path / "straight")
        assert code == 0, log[-2000:]
        for i, step in enumerate(kills):
            code, seen, log = trainer.run(tmp_path / "killed", *(["--resume", "latest"] if i else []), kill_at=step)
            assert code == -signal.SIGKILL, f"run {i + 1} ended by itself at step {seen} (to be killed at {step})"
            at.append(seen)
        code, _, log = trainer.run(tmp_path / "killed", "--resume", "latest")
        assert code == 0 and "resumed from" in log, log[-2000:]
    finally:
        trainer.close()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs (killed at steps {at}, aimed {kills})"
    from train.checkpoint import find_checkpoint  # 'latest' is the last complete checkpoint
    assert find_checkpoint(tmp_path / "killed" / "stage1" / "checkpoints").name == f"step-{STEPS:08d}"


# ----------------------------------------------------------------------------------- describing, kill -9
_DESCRIBE = """
import json, sys
from types import SimpleNamespace as R
from train.prepare_data import describe_pairs
pairs = [R(prior=R(text=f"Report {i}: lungs clear."), followup=R(text=f"Report {i}: small right effusion."))
         for i in range(int(sys.argv[1]))]
out, usage = describe_pairs(pairs, "openai")
print(json.dumps({"texts": [t for t, _ in out], "usage": usage}))
"""


def test_describer_killed_mid_run_keeps_every_paid_answer_and_resumes_from_the_cache(tmp_path):
    stub, n = _Stub(), 6
    paid = random.randint(1, n - 1)          # answers received before the kill; the next one never comes
    stub.script = [(200, {}, 0.0)] * paid + [(200, {}, 120.0)]
    stub.answer = "New right pleural effusion."
    cache = tmp_path / "answers.jsonl"
    env = {**ENV, "OPENAI_BASE_URL": stub.base_url, "OPENAI_API_KEY": "sk-test", "BIOMEDJOURNEY_LLM_MODEL": "gpt-4",
           "BIOMEDJOURNEY_LLM_CACHE": str(cache)}
    cmd = [sys.executable, "-c", _DESCRIBE, str(n)]
    try:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(600):  # until the request after the paid ones is in flight
            if len(stub.requests) > paid:
                break
            threading.Event().wait(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert len(stub.requests) == paid + 1
        assert len(cache.read_text().splitlines()) == paid  # every answer received is on disk
        stub.script = []
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["texts"] == ["New right pleural effusion."] * n
        assert out["usage"]["cache_hits"] == paid and out["usage"]["calls"] == n - paid  # only the rest was paid for
        assert len(stub.requests) == paid + 1 + (n - paid)
    finally:
        stub.server.shutdown()
        stub.server.server_close()


# ----------------------------------------------------------------------------------- a failing generation
def test_an_exception_inside_a_generation_does_not_take_the_app_down(app_module, app_url, monkeypatch, caplog, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    prior = tmp_path / "p.png"
    prior.write_bytes(_png(film()))
    client = Client(app_url, verbose=False, download_files=False)
    args = (DESCRIPTION, 1, 3, 4.0, 1.5, 5, False, "ddim", 0.8, True, "auto", False, False, None, 0)
    unet, calls = app_module.get_pipe().unet, []

    def fails_on_the_second_step(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated fault inside the denoiser")
        return type(unet).forward(unet, *a, **kw)
    monkeypatch.setattr(unet, "forward", fails_on_the_second_step)
    with pytest.raises(AppError, match=r"The generation failed unexpectedly \(RuntimeError\)\. The server is still"):
        client.predict(handle_file(str(prior)), *args, api_name="/generate")
    assert "simulated fault inside the denoiser" in caplog.text and "Traceback" in caplog.text  # for the operator
    monkeypatch.undo()
    out = client.predict(handle_file(str(prior)), *args, api_name="/generate")  # the next job runs normally
    assert out[5]["seeds"] == [5] and len(out[0]) == 1


# ----------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many KiB (unmounted afterwards); skips where mount is not allowed."""
    mounted = []

    def mount(kib: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True)
        if r.returncode:
            pytest.skip(f"a small tmpfs cannot be mounted here (needs root): {r.stderr.decode().strip()}")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def _whole(path: Path) -> None:
    """Each file under its final name reads to its end."""
    data = path.read_bytes()
    if path.suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".dcm":
        _ = pydicom.dcmread(path).pixel_array
    elif path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None
    else:
        raise AssertionError(f"unexpected file {path.name}")


def _no_half_files(folder: Path) -> list[str]:
    names = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            assert not p.name.endswith(".tmp"), f"a temporary file was left behind: {p.name}"
            _whole(p)
            names.append(p.name)
    return names


def test_a_full_disk_while_exporting_leaves_no_half_written_file(small_disk, tiny_model_dir, tmp_path, capfd):
    prior = tmp_path / "p.png"
    prior.write_bytes(_png(film(128, 128)))
    pipe = load_pipeline(str(tiny_model_dir))
    r = generate_followups(pipe, prior, DESCRIPTION, seed=0, num_images=2, sampler={"num_inference_steps": 2})
    full = tmp_path / "room"
    export_followups(r, full, zip_name="all.zip")
    total = sum(p.stat().st_size for p in full.iterdir()) // 1024
    failures = 0
    for kib in (8, total // 3, 2 * total // 3):  # the disk fills before the first file, midway, near the end
        folder = small_disk(kib)
        try:
            export_followups(r, folder / "out", zip_name="all.zip")
        except OSError as e:
            failures += 1
            assert e.errno == 28  # ENOSPC
        _no_half_files(folder)
    assert failures == 3
    rc = cli.main(["generate", "--prior", str(prior), "--text", DESCRIPTION, "--out", str(small_disk(total // 2)),
                   "--model", str(tiny_model_dir), "--steps", "2", "--dicom", "--heatmaps"])
    err = capfd.readouterr().err
    assert rc == 2 and "could not write the results" in err and "No space left on device" in err
    assert "Traceback" not in err


def test_a_full_disk_in_the_app_is_one_message(app_module, app_url, small_disk, monkeypatch, tmp_path, capfd):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    prior = tmp_path / "p.png"
    prior.write_bytes(_png(film()))
    disk = small_disk(64)
    monkeypatch.setattr(app_module, "OUTPUT_ROOT", disk)  # the runs' folders on the small disk
    client = Client(app_url, verbose=False, download_files=False)
    with pytest.raises(AppError, match="could not write its files .*disk may be full"):
        client.predict(handle_file(str(prior)), DESCRIPTION, 2, 2, 4.0, 1.5, 5, False, "ddim", 0.8, True, "auto",
                       False, False, None, 0, api_name="/generate")
    assert "Traceback" not in "".join(capfd.readouterr())
    _no_half_files(disk)
