"""The OpenAI progression backend (findings/describe_llm.py through findings/client.py) over real HTTP
against a local OpenAI-compatible stub server, and through an httpx MockTransport (no network, no key):
how the client is built, that retries and timeouts are the openai SDK's, the answer cache, the usage
tally and the messages a user sees when the API finally fails. Then the backend choice."""
from __future__ import annotations

import json
import multiprocessing
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from biomedjourney import cli
from biomedjourney.findings import client as C
from biomedjourney.findings import describe_llm as D
from biomedjourney.findings import extract_llm
from biomedjourney.progression import (SYSTEM_PROMPT, LLMConfig, OpenAIDescriber, ProgressionError,
                                       describe_progression)

# ---------------------------------------------------------------------------------------
# a local OpenAI-compatible stub server
# ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        stub = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with stub.lock:
            stub.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "json": body, "t": time.monotonic()})
            step = stub.script.pop(0) if stub.script else None
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        if step is not None:
            status, headers, delay = step
            time.sleep(delay)
            if status != 200:
                return self._send(status, {"error": {"message": f"stub error {status}", "type": "server_error",
                                                      "code": None}}, headers)
        n_in = sum(len(m["content"].split()) for m in body["messages"])
        self._send(200, {
            "id": f"chatcmpl-{len(stub.requests)}", "object": "chat.completion", "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": stub.answer}}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": 7, "total_tokens": n_in + 7}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # keep-alive handler threads must not block teardown

    def handle_error(self, request, client_address):
        # A client that gave up (the timeout tests) leaves the stub writing into a closed socket; that
        # is the stub's noise, printed asynchronously into whichever test runs next, not the app's.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Stub:
    def __init__(self):
        self.requests, self.script, self.lock = [], [], threading.Lock()
        self.answer = '"Description: New right pleural effusion."'
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.stub = self
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def retry_counts(self) -> list[str]:
        """The SDK's own retry counter header of each request it sent."""
        return [r["headers"].get("x-stainless-retry-count") for r in self.requests]


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _config(stub, tmp_path, **kw) -> LLMConfig:
    kw = {"model": "gpt-4o-mini", "base_url": stub.base_url, "api_key": "sk-test", "timeout": 5.0,
          "max_retries": 3, "cache_path": str(tmp_path / "cache.jsonl"), **kw}
    return LLMConfig(**kw)


PRIOR, FOLLOW = "Heart size normal. No effusion.", "Small right pleural effusion."
FAST_RETRY = {"Retry-After": "0.01"}  # the SDK honours it: no backoff sleep in these tests


# ---------------------------------------------------------------------------------------
# the client: built in one place, with the configured retries, timeout and server
# ---------------------------------------------------------------------------------------

def test_client_has_the_configured_retries_timeout_and_server(stub, tmp_path):
    d = OpenAIDescriber(_config(stub, tmp_path, max_retries=2, timeout=7.5))
    assert (d.client.max_retries, d.client.timeout) == (2, 7.5)
    assert str(d.client.base_url).rstrip("/") == stub.base_url and d.client.api_key == "sk-test"
    # a local server needs no key; the SDK still wants one
    assert OpenAIDescriber(_config(stub, tmp_path, api_key=None)).client.api_key == "not-needed"


def test_both_llm_clients_are_built_by_make_client(monkeypatch, tmp_path):
    """The describer and the structured-findings extractor build their client the same way: one
    `openai.OpenAI(...)` call, in findings/client.py, with the SDK's retries and timeout."""
    import openai
    made = []

    class FakeOpenAI:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(openai, "OpenAI", FakeOpenAI)
    cfg = LLMConfig(base_url="http://llm.test/v1", api_key="k", max_retries=5, timeout=12.0,
                    cache_path=str(tmp_path / "c.jsonl"))
    OpenAIDescriber(cfg)
    with pytest.raises(AttributeError):  # the fake has no .chat: we only look at how it was built
        extract_llm("Left pneumothorax.", config=cfg)
    expected = {"api_key": "k", "base_url": "http://llm.test/v1", "max_retries": 5, "timeout": 12.0,
                "http_client": None}
    assert made == [expected, expected]


def test_unconfigured_describer_says_what_to_set():
    with pytest.raises(ProgressionError, match="not configured: set OPENAI_API_KEY.*backend='rules'"):
        OpenAIDescriber(LLMConfig(api_key=None, base_url=None))


# ---------------------------------------------------------------------------------------
# requests, retries and timeouts (the SDK's)
# ---------------------------------------------------------------------------------------

def test_openai_request_format(stub, tmp_path):
    d = OpenAIDescriber(_config(stub, tmp_path, temperature=0.0))
    r = d.describe(PRIOR, FOLLOW)
    assert (r.text, r.backend, r.model, r.cached) == ("New right pleural effusion.", "openai", "gpt-4o-mini", False)
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["authorization"] == "Bearer sk-test"
    body = req["json"]
    assert (body["model"], body["temperature"]) == ("gpt-4o-mini", 0.0)
    system, user = body["messages"]
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert user["role"] == "user" and PRIOR in user["content"] and FOLLOW in user["content"]
    assert user["content"].index("PRIOR REPORT") < user["content"].index("FOLLOW-UP REPORT")
    assert r.usage == {"prompt_tokens": len((SYSTEM_PROMPT + " " + user["content"]).split()), "completion_tokens": 7}

    d.describe(PRIOR, intended_change="new left pneumothorax")
    user = stub.requests[1]["json"]["messages"][1]["content"]
    assert "INTENDED CHANGE:\nnew left pneumothorax" in user and "FOLLOW-UP" not in user


def test_sdk_retries_429_honouring_retry_after(stub, tmp_path):
    stub.script = [(429, {"Retry-After": "0.3"}, 0.0)]
    d = OpenAIDescriber(_config(stub, tmp_path))
    assert d.describe(PRIOR, FOLLOW).text == "New right pleural effusion."
    assert stub.retry_counts() == ["0", "1"]  # the SDK's retry, not ours
    assert 0.25 <= stub.requests[1]["t"] - stub.requests[0]["t"] < 3.0  # it waited as asked
    assert d.usage_summary()["retries"] == 1
    assert d.describe(PRIOR + "  \n", " " + FOLLOW).cached  # whitespace at the ends does not change the key


def test_sdk_retries_429_then_200_through_a_mock_transport(tmp_path):
    """The same through `http_client=` (an httpx MockTransport): no socket, no Retry-After, the SDK's
    own backoff (about half a second for the first retry)."""
    httpx2 = pytest.importorskip("httpx2", reason="the openai SDK's HTTP client")
    seen = []

    def handler(request):
        seen.append(request.headers.get("x-stainless-retry-count"))
        if len(seen) == 1:
            return httpx2.Response(429, json={"error": {"message": "slow down", "type": "rate_limit"}})
        return httpx2.Response(200, json={
            "id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Resolved left pneumothorax."}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}})

    cfg = LLMConfig(base_url="http://llm.test/v1", api_key="k", model="gpt-4o", max_retries=1, timeout=2.0,
                    cache_path=None)
    d = OpenAIDescriber(cfg, http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    assert d.describe(PRIOR, FOLLOW).text == "Resolved left pneumothorax."
    assert seen == ["0", "1"]
    s = d.usage_summary()
    assert (s["calls"], s["retries"], s["prompt_tokens"], s["completion_tokens"]) == (1, 1, 30, 4)


def test_sdk_retries_timeouts(stub, tmp_path):
    stub.script = [(200, {}, 1.0)]  # the first answer comes after the client's timeout
    d = OpenAIDescriber(_config(stub, tmp_path, timeout=0.3))
    assert d.describe(PRIOR, FOLLOW).text == "New right pleural effusion."
    assert stub.retry_counts() == ["0", "1"]


# ---------------------------------------------------------------------------------------
# what the user sees when the API finally fails
# ---------------------------------------------------------------------------------------

def test_gives_up_after_max_retries_with_a_clear_message(stub, tmp_path):
    stub.script = [(500, FAST_RETRY, 0.0)] * 10
    d = OpenAIDescriber(_config(stub, tmp_path, max_retries=2))
    with pytest.raises(ProgressionError, match=r"failed with HTTP 500.*busy or failing.*max_retries \(now 2\)") as e:
        d.describe(PRIOR, FOLLOW)
    assert stub.base_url in str(e.value)
    assert len(stub.requests) == 3
    assert not (tmp_path / "cache.jsonl").exists()  # failures are never cached


def test_client_errors_are_not_retried_and_name_the_key(stub, tmp_path):
    stub.script = [(401, {}, 0.0)]
    with pytest.raises(ProgressionError, match="HTTP 401.*check OPENAI_API_KEY"):
        OpenAIDescriber(_config(stub, tmp_path)).describe(PRIOR, FOLLOW)
    assert len(stub.requests) == 1
    stub.script = [(404, {}, 0.0)]
    with pytest.raises(ProgressionError, match="HTTP 404.*model name 'gpt-4o-mini'.*OPENAI_BASE_URL"):
        OpenAIDescriber(_config(stub, tmp_path, model="gpt-4o-mini")).describe(PRIOR, "Other report.")


def test_timeout_and_unreachable_server_messages(stub, tmp_path):
    stub.script = [(200, {}, 1.0)]
    with pytest.raises(ProgressionError, match=r"timed out after 0.2 s \(1 attempt\(s\)\).*LLMConfig.timeout"):
        OpenAIDescriber(_config(stub, tmp_path, timeout=0.2, max_retries=0)).describe(PRIOR, FOLLOW)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = LLMConfig(base_url=dead, max_retries=0, timeout=2.0, cache_path=None)
    with pytest.raises(ProgressionError, match=f"could not connect to {dead}.*check OPENAI_BASE_URL"):
        OpenAIDescriber(cfg).describe(PRIOR, FOLLOW)


def test_cli_prints_the_message_not_a_traceback(stub, tmp_path, monkeypatch, capsys):
    _clear_env(monkeypatch)
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_CACHE", "off")
    stub.script = [(403, {}, 0.0)]
    rc = cli.main(["describe", "--prior-report", PRIOR, "--followup-report", FOLLOW, "--backend", "openai"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: OpenAI request to") and "HTTP 403" in err and "OPENAI_API_KEY" in err
    assert "Traceback" not in err


def test_failure_message_for_other_api_errors():
    import openai
    cfg = LLMConfig(base_url="http://llm.test/v1")
    e = openai.APIError("the answer was not JSON", request=None, body=None)
    assert C.failure_message(e, cfg) == ("OpenAI request to http://llm.test/v1 failed (APIError: the answer was "
                                         "not JSON); check OPENAI_BASE_URL and the model name")


# ---------------------------------------------------------------------------------------
# the answer cache and the usage tally
# ---------------------------------------------------------------------------------------

def test_openai_cache_and_usage_summary(stub, tmp_path):
    cache = tmp_path / "cache.jsonl"
    d = OpenAIDescriber(_config(stub, tmp_path))
    first = d.describe(PRIOR, FOLLOW)
    second = d.describe(PRIOR, FOLLOW)
    assert len(stub.requests) == 1
    assert (second.cached, second.text) == (True, first.text)
    assert second.usage == {"prompt_tokens": 0, "completion_tokens": 0}
    # another process (a fresh describer) reads the same file: still no request
    assert OpenAIDescriber(_config(stub, tmp_path)).describe(PRIOR, FOLLOW).cached
    assert len(stub.requests) == 1
    # the cache holds no report text
    assert PRIOR not in cache.read_text() and FOLLOW not in cache.read_text()
    # another model or another input is a miss
    OpenAIDescriber(_config(stub, tmp_path, model="my-local-model")).describe(PRIOR, FOLLOW)
    third = d.describe(PRIOR, "A large right pleural effusion.")
    assert len(stub.requests) == 3

    s = d.usage_summary()
    prompt = first.usage["prompt_tokens"] + third.usage["prompt_tokens"]
    assert third.usage["prompt_tokens"] == first.usage["prompt_tokens"] + 1  # one word longer
    assert {k: s[k] for k in ("calls", "cache_hits", "retries", "prompt_tokens", "completion_tokens")} == \
        {"calls": 2, "cache_hits": 1, "retries": 0, "prompt_tokens": prompt, "completion_tokens": 14}
    assert s["estimated_cost_usd"] == pytest.approx((prompt * 0.00015 + 14 * 0.0006) / 1000)
    unknown = OpenAIDescriber(_config(stub, tmp_path, model="my-local-model"))
    assert unknown.usage_summary()["estimated_cost_usd"] is None
    assert D._price("gpt-4o-2024-08-06") == D.PRICES_PER_1K["gpt-4o"] and D._price("gpt-4-0613") == (0.03, 0.06)


def test_cache_tolerates_truncated_line(stub, tmp_path):
    cache = tmp_path / "cache.jsonl"
    OpenAIDescriber(_config(stub, tmp_path)).describe(PRIOR, FOLLOW)
    with open(cache, "ab") as f:
        f.write(b'{"key": "abc", "te')  # a writer died mid-line
    d = OpenAIDescriber(_config(stub, tmp_path))
    assert d.describe(PRIOR, FOLLOW).cached
    d.describe(PRIOR, "Large right pleural effusion.")  # appended on a fresh line
    assert len(stub.requests) == 2
    d2 = OpenAIDescriber(_config(stub, tmp_path))
    assert d2.describe(PRIOR, FOLLOW).cached and d2.describe(PRIOR, "Large right pleural effusion.").cached
    assert len(stub.requests) == 2


def _append_many(path: str, worker: int) -> None:
    d = OpenAIDescriber(LLMConfig(cache_path=path), client=object())
    for i in range(40):
        d._append_cache({"key": f"{worker}-{i}", "text": str(worker) * 3000})


def test_cache_concurrent_appends(tmp_path):
    path = str(tmp_path / "cache.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = open(path).read().splitlines()
    assert len(lines) == 160
    entries = [json.loads(line) for line in lines]  # no interleaved writes
    assert all(e["text"] == e["key"].split("-")[0] * 3000 for e in entries)


# ---------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------

def _clear_env(monkeypatch):
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BIOMEDJOURNEY_LLM_MODEL", "BIOMEDJOURNEY_LLM_CACHE"):
        monkeypatch.delenv(k, raising=False)


def test_auto_uses_rules_without_configuration(monkeypatch):
    _clear_env(monkeypatch)
    assert not LLMConfig.from_env().configured()
    r = describe_progression(PRIOR, FOLLOW)
    assert (r.backend, r.text) == ("rules", "New right pleural effusion.")
    with pytest.raises(ProgressionError, match="OPENAI_API_KEY.*OPENAI_BASE_URL"):
        describe_progression(PRIOR, FOLLOW, backend="openai")


def test_auto_uses_openai_when_configured(monkeypatch, stub, tmp_path):
    _clear_env(monkeypatch)
    stub.answer = "New small right effusion."  # differs from the rules answer
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)  # a local server needs no key
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_MODEL", "local-model")
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_CACHE", str(tmp_path / "env-cache.jsonl"))
    cfg = LLMConfig.from_env()
    assert (cfg.model, cfg.base_url, cfg.api_key, cfg.cache_path) == \
        ("local-model", stub.base_url, None, str(tmp_path / "env-cache.jsonl"))
    r = describe_progression(PRIOR, FOLLOW)
    assert (r.backend, r.model, r.text) == ("openai", "local-model", "New small right effusion.")
    assert stub.requests[0]["json"]["model"] == "local-model"
    assert (tmp_path / "env-cache.jsonl").is_file()
    # forcing rules never touches the server
    assert describe_progression(PRIOR, FOLLOW, backend="rules").backend == "rules"
    assert len(stub.requests) == 1
    monkeypatch.setenv("BIOMEDJOURNEY_LLM_CACHE", "off")
    assert LLMConfig.from_env().cache_path is None


def test_failure_message_never_carries_the_api_key(monkeypatch):
    """A server that echoes the key in its error: the Python API's message has it redacted too."""
    import httpx
    import openai
    from biomedjourney.findings.client import LLMConfig, failure_message
    key = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    resp = httpx.Response(401, request=httpx.Request("POST", "http://x/v1/chat/completions"))
    err = openai.AuthenticationError(f"Incorrect API key provided: {key}", response=resp, body=None)
    msg = failure_message(err, LLMConfig())
    assert key not in msg and "[redacted]" in msg and "OPENAI_API_KEY" in msg
