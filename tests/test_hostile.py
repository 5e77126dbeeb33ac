"""Every kind of the hostile-input corpus (tests/hostile.py) through the three entry points: the CLI
(`python -m biomedjourney ...`, run in-process), the Python API (biomedjourney.service) and the app's API endpoint
(gradio_client against the app served in-process; raw HTTP where gradio_client cannot send the input: NaN, a
server path). Each ends in its one outcome: one clear message naming the problem (CLI: exactly one 'error:'
line, exit code 2), or images with the warning; never a traceback in the output or the server log, and the
server still serves afterwards."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hostile import CASES, DESCRIPTION, INJECTION, film
from test_imaging import _png
from test_progression_llm import _Stub

from biomedjourney import cli
from biomedjourney.findings.client import LLMConfig
from biomedjourney.progression import SYSTEM_PROMPT, ProgressionError, describe_progression
from biomedjourney.service import ModelLoadError, export_followups, generate_followups, load_pipeline

SETTINGS = {"seed": 3, "num_images": 1, "steps": 2, "guidance": 4.0}
KEY = "sk-planted-hostile-0123456789abcdef"
ENTRIES = ("cli", "api", "app")
COMPOSE_ROWS = ["consolidation", "right", "upper", "none", "new"] + [None, "none", "none", "none", "new"] * 2


@dataclass
class Outcome:
    status: str          # 'error' or 'ok'
    text: str            # the error message, or the warnings and notes
    errors: int = 1      # how many error messages were given (the CLI must give exactly one)
    log: str = ""        # what the CLI printed


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    return tmp_path_factory.mktemp("hostile"), Path(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir))


@pytest.fixture(scope="module")
def llm():
    s = _Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client
    return Client(app_url, verbose=False, download_files=False)  # the outputs stay on the server: faster


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Nothing is unpickled anywhere (a pickled weights file included): torch.load and pickle fail the test."""
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)


def _inputs(name: str, entry: str, corpus) -> dict:
    root, tiny = corpus
    folder = root / name / entry
    folder.mkdir(parents=True)
    if CASES[name].group == "model" and not (folder / "tiny").exists():
        shutil.copytree(tiny, folder / "tiny")
    prior = folder / "prior.png"
    prior.write_bytes(_png(film()))
    made = CASES[name].make(folder)
    return {"prior": prior, "text": DESCRIPTION, "model": tiny, "folder": folder, **made,
            "settings": {**SETTINGS, **made.get("settings", {})}}


@pytest.fixture
def llm_env(llm, monkeypatch, tmp_path):
    """The GPT-4 path pointed at the stub (a fresh answer cache); the stub forgets earlier requests."""
    monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_MODEL", "gpt-4")
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_CACHE", str(tmp_path / "llm-cache.jsonl"))
    llm.requests.clear()
    return llm


# ------------------------------------------------------------------------------------------- the CLI
def _cli_argv(inp: dict, out: Path) -> list[str]:
    if "reports" in inp:
        prior, follow = inp["reports"]
        return ["describe", "--prior-report", prior, "--followup-report", follow, "--backend", "openai"]
    s = inp["settings"]
    return ["generate", "--prior", str(inp["prior"]), f"--text={inp['text']}", "--out", str(out),
            "--model", str(inp["model"]), f"--seed={s['seed']}", f"--num-images={s['num_images']}",
            f"--steps={s['steps']}", f"--guidance-scale={s['guidance']}"]


def run_cli(inp: dict, capfd) -> Outcome:
    try:
        rc = cli.main(_cli_argv(inp, inp["folder"] / "out-cli"))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capfd.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err  # a hostile name or text never reaches the terminal
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if rc:
        assert rc == 2
        return Outcome("error", "\n".join(errors), len(errors), out + err)
    said = [line for line in (out + err).splitlines() if line.startswith(("warning:", "note:"))]
    return Outcome("ok", "\n".join(said), log=out + err)


# ------------------------------------------------------------------------------------------- the Python API
def run_api(inp: dict, tiny_pipe) -> Outcome:
    s = inp["settings"]
    try:
        text = inp["text"]
        if "reports" in inp:  # the answer is used as a description: checked like a typed one
            llm = LLMConfig.from_env()
            text = describe_progression(*inp["reports"], backend="openai", llm=llm).text
        pipe = tiny_pipe if inp["model"] == inp["tiny"] else load_pipeline(str(inp["model"]))
        r = generate_followups(pipe, inp["prior"], text, seed=s["seed"], num_images=s["num_images"],
                               sampler={"num_inference_steps": s["steps"], "guidance_scale": s["guidance"]})
        export_followups(r, inp["folder"] / "out-api", heatmaps=False)
    except (ValueError, TypeError, ModelLoadError, ProgressionError) as e:
        return Outcome("error", str(e))
    return Outcome("ok", "\n".join(r.warnings + r.plan.notes))


# ------------------------------------------------------------------------------------------- the app
def rest_call(url: str, api: str, data: list) -> Outcome:
    """POST /gradio_api/call/<api> as raw JSON (NaN included), then read its event stream."""
    r = httpx.post(f"{url}gradio_api/call/{api}", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=60)
    if r.status_code != 200:
        return Outcome("error", " ".join(d.get("message", "") for d in r.json()["detail"]))
    event, payload = None, None
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                break
    if event == "error":
        return Outcome("error", payload["error"] if isinstance(payload, dict) else str(payload))
    return Outcome("ok", _notes(payload))


def _notes(outputs: list) -> str:
    return "\n".join(o for o in outputs if isinstance(o, str) and "**Read as:**" in o)


def _upload(url: str, path: Path, name: str) -> dict:
    """Upload ``path`` under the file name ``name`` (as a browser would send it): the server's FileData."""
    with open(path, "rb") as f:
        r = httpx.post(f"{url}gradio_api/upload", files={"files": (name, f, "application/octet-stream")})
    r.raise_for_status()
    server_path = r.json()[0]
    from gradio.utils import get_upload_folder  # the name was made safe: the file is inside gradio's upload folder
    assert Path(server_path).resolve().is_relative_to(Path(get_upload_folder()).resolve())
    assert all(c.isprintable() and c not in "\\" for c in Path(server_path).name)
    return {"path": server_path, "meta": {"_type": "gradio.FileData"}, "orig_name": Path(server_path).name}


def run_app(inp: dict, client, url: str, monkeypatch) -> Outcome:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    if "reports" in inp:
        prior, follow = inp["reports"]
        try:
            text, _ = client.predict(prior, follow, "", "auto", api_name="/describe")
        except AppError as e:
            return Outcome("error", str(e))
        assert KEY not in text
        return Outcome("ok", text)
    if inp["model"] != inp["tiny"]:
        monkeypatch.setenv("BIOMEDJOURNEY_MODEL", str(inp["model"]))  # the served app reads it per request
    s = inp["settings"]
    numbers = [s["num_images"], s["steps"], s["guidance"], 1.5, s["seed"], False, "ddim", 0.8, True, "auto", False]
    if inp.get("missing"):  # a path on the server that nobody uploaded
        prior = {"path": str(inp["prior"]), "meta": {"_type": "gradio.FileData"}}
    elif inp.get("upload_name", inp["prior"].name) != inp["prior"].name:
        prior = _upload(url, inp["prior"], inp["upload_name"])
    else:
        prior = None
    if prior is not None or any(isinstance(v, float) and not math.isfinite(v) for v in numbers):  # not JSON
        prior = prior or _upload(url, inp["prior"], inp["prior"].name)
        return rest_call(url, "generate", [prior, inp["text"], *numbers, False, None, 0])
    try:
        out = client.predict(handle_file(str(inp["prior"])), inp["text"], *numbers, False, None, 0, api_name="/generate")
    except AppError as e:
        return Outcome("error", str(e))
    return Outcome("ok", _notes(list(out)) + "\n" + "\n".join(out[5].get("image_warnings", [])))


# ------------------------------------------------------------------------------------------- the corpus
def test_the_corpus_has_at_least_30_kinds_of_each_outcome_mix():
    assert len(CASES) >= 30
    assert {c.outcome for c in CASES.values() if isinstance(c.outcome, str)} == {"error", "warning", "ok"}
    assert {c.group for c in CASES.values()} == {"image", "name", "text", "number", "model", "reports"}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_input_ends_in_one_clear_message(name, entry, corpus, tiny_pipe, request, capfd, caplog,
                                                      monkeypatch):
    case = CASES[name]
    inp = {**_inputs(name, entry, corpus), "tiny": corpus[1]}
    if case.group == "reports":
        request.getfixturevalue("llm_env").answer = inp["answer"]
    if entry == "cli":
        got = run_cli(inp, capfd)
    elif entry == "api":
        got = run_api(inp, tiny_pipe)
    else:
        client, url = request.getfixturevalue("client"), request.getfixturevalue("app_url")
        got = run_app(inp, client, url, monkeypatch)
        assert client.predict("", *COMPOSE_ROWS, api_name="/compose") == "New right upper zone consolidation."
    log = got.log + "".join(capfd.readouterr()) + caplog.text  # the CLI's output, the served app's output, the log
    assert "Traceback" not in log, log[-3000:]
    outcome = case.outcome if isinstance(case.outcome, str) else case.outcome[entry]
    assert got.status == ("error" if outcome == "error" else "ok"), (got.text, entry)
    phrase = case.phrase if isinstance(case.phrase, str) else case.phrase[entry]
    assert phrase.lower() in got.text.lower(), (phrase, got.text)
    assert got.errors == 1
    if case.group == "reports":
        _only_in_the_report_field(request.getfixturevalue("llm_env"))
    assert KEY not in got.text + log


def _only_in_the_report_field(llm) -> None:
    """The injected report reached the model only inside its own field of the user message; the system prompt is
    ours, word for word; nothing else was sent."""
    assert llm.requests, "the stub LLM was not asked"
    for r in llm.requests:
        messages = r["json"]["messages"]
        assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == SYSTEM_PROMPT
        user = messages[1]["content"]
        assert user.count(INJECTION) == 1
        prior_field = user.split("PRIOR REPORT:\n", 1)[1].split("\n\nFOLLOW-UP REPORT:\n", 1)[0]
        assert INJECTION in prior_field
        assert r["headers"]["authorization"] == f"Bearer {KEY}"
