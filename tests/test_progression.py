"""Progression text: the offline differ on hand-written report pairs, and the OpenAI path
over real HTTP against a local OpenAI-compatible stub server (no network, no key)."""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from biomedjourney import progression as P
from biomedjourney.progression import (
    NO_CHANGE, SYSTEM_PROMPT, LLMConfig, OpenAIDescriber, ProgressionError, describe_progression,
    diff_findings, extract_findings, rule_based_description)

# ---------------------------------------------------------------------------------------
# rules backend
# ---------------------------------------------------------------------------------------

PAIRS = [  # (prior, follow-up, expected description)
    ("Heart size normal. No pleural effusion.", "New small right pleural effusion.",
     "New right pleural effusion."),
    ("Small left apical pneumothorax.", "The left pneumothorax has resolved.",
     "Resolved left pneumothorax."),
    ("No pneumothorax. Lungs are clear.", "No pneumothorax or pleural effusion. Bibasilar atelectasis.",
     "New bilateral atelectasis."),
    ("Mild pulmonary edema.", "Worsening pulmonary edema.", "Increased pulmonary edema."),
    ("Mild left pleural effusion.", "Moderate left pleural effusion.", "Increased left pleural effusion."),
    ("Large right pleural effusion.", "Small right pleural effusion.", "Decreased right pleural effusion."),
    ("Stable cardiomegaly.", "Cardiomegaly, unchanged.", NO_CHANGE),
    ("No lines or tubes.", "Endotracheal tube and right internal jugular central venous catheter in place.",
     "Support devices placed."),
    ("Endotracheal tube in place.", "Patient has been extubated.", "Support devices removed."),
    ("No acute cardiopulmonary process.", "No acute cardiopulmonary process.", NO_CHANGE),
    ("PA chest radiograph, 58-year-old male. Findings: Cardiomegaly, Emphysema.",
     "PA chest radiograph, 58-year-old male. Findings: Cardiomegaly.", "Resolved emphysema."),
    ("AP chest radiograph, 30-year-old female. No finding.",
     "AP chest radiograph, 30-year-old female. Findings: Effusion, Infiltration.",
     "New pleural effusion. New opacity."),
    ("Right effusion. Left lower lobe consolidation.",
     "Right effusion has increased and left consolidation has improved.",
     "Increased right pleural effusion. Decreased left consolidation."),
    ("Left and right pleural effusions. Pneumothorax on the right.",
     "Pneumothorax resolved, with new left lower lobe consolidation. No change in the bilateral effusions.",
     "New left consolidation. Resolved right pneumothorax."),
    # a change word spreads over a coordinated list; the follow-up's own "increase" wins
    # over the prior's silence on the effusion (reports often omit known findings)
    ("Opacity in the left lower lobe.", "Interval increase in bilateral opacities and right effusion.",
     "Increased right pleural effusion. Increased bilateral opacity."),
]


@pytest.mark.parametrize("prior, followup, expected", PAIRS)
def test_rules_on_report_pairs(prior, followup, expected):
    r = rule_based_description(prior, followup)
    assert (r.text, r.backend, r.model, r.cached) == (expected, "rules", "", False)


def test_negation_is_not_presence():
    f = extract_findings("There is no evidence of pneumothorax or pleural effusion. "
                         "No focal consolidation to suggest pneumonia.")
    assert {k: v["present"] for k, v in f.items()} == {
        "pleural effusion": False, "pneumothorax": False, "consolidation": False, "pneumonia": False}
    # scope ends at "but"; "no change in" and "no new" are not negations of presence
    f = extract_findings("No pneumothorax, but small left effusion. No change in the mild cardiomegaly. "
                         "No new consolidation. No pericardial effusion elsewhere.")
    assert f["pneumothorax"]["present"] is False
    assert f["pleural effusion"] == {"present": True, "laterality": "left", "severity": "mild", "change": ""}
    assert f["cardiomegaly"] == {"present": True, "laterality": "", "severity": "mild", "change": "unchanged"}
    assert "consolidation" not in f


def test_extract_change_words_laterality_severity():
    f = extract_findings("In comparison with the prior study, there is a new moderate left effusion and the "
                         "right pneumothorax has increased. Mildly increased bibasilar opacities. "
                         "Effusion and consolidation on the right have partially resolved.")
    assert f["pneumothorax"] == {"present": True, "laterality": "right", "severity": "", "change": "increased"}
    # "mildly" grades the change, not the opacity
    assert f["opacity"] == {"present": True, "laterality": "bilateral", "severity": "", "change": "increased"}
    assert f["pleural effusion"]["laterality"] == "bilateral"  # left (sentence 1) + right (sentence 3)
    assert (f["pleural effusion"]["severity"], f["pleural effusion"]["change"]) == ("moderate", "new")
    assert f["consolidation"] == {"present": True, "laterality": "right", "severity": "", "change": "decreased"}
    assert extract_findings("Effusion and pneumothorax have resolved.") == {
        k: {"present": False, "laterality": "", "severity": "", "change": "resolved"}
        for k in ("pleural effusion", "pneumothorax")}


def test_diff_order_is_deterministic_and_findings_reported():
    prior = extract_findings("Right pneumothorax. Mild edema. Small left effusion. Cardiomegaly.")
    follow = extract_findings("Moderate edema. Left effusion is smaller. Cardiomegaly. "
                              "New right lower lobe consolidation and new fracture.")
    expected = ["New right consolidation", "New fracture", "Increased pulmonary edema",
                "Decreased left pleural effusion", "Resolved right pneumothorax"]
    assert diff_findings(prior, follow) == expected
    # same input in a different dict order -> same output
    assert diff_findings(dict(reversed(prior.items())), dict(reversed(follow.items()))) == expected
    r = rule_based_description("Right pneumothorax. Cardiomegaly.", "Cardiomegaly.")
    assert r.findings == {"cardiomegaly": "unchanged", "pneumothorax": "resolved"}


def test_intended_change_is_normalised():
    assert rule_based_description("Small left pleural effusion.",
                                  intended_change="worsening of the left effusion").text \
        == "Increased left pleural effusion."
    # laterality taken from the prior when the user leaves it out
    assert rule_based_description("Right pneumothorax. Cardiomegaly.",
                                  intended_change="resolve the pneumothorax").text == "Resolved right pneumothorax."
    assert rule_based_description("Clear lungs.", intended_change="new right lower lobe consolidation").text \
        == "New right consolidation."
    # nothing recognised: the user's words, tidied
    assert rule_based_description("Clear lungs.", intended_change="  make it   look sicker ").text \
        == "Make it look sicker."


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        describe_progression("Cardiomegaly.", backend="rules")
    with pytest.raises(ValueError, match="both"):
        describe_progression("Cardiomegaly.", "Cardiomegaly.", intended_change="new effusion", backend="rules")
    with pytest.raises(ValueError, match="prior_report is empty"):
        describe_progression("  \n", "Cardiomegaly.", backend="rules")
    with pytest.raises(ValueError, match="followup_report is empty"):
        describe_progression("Cardiomegaly.", " ", backend="rules")
    with pytest.raises(ValueError, match="intended_change is empty"):
        describe_progression("Cardiomegaly.", intended_change="", backend="rules")
    with pytest.raises(ValueError, match="backend"):
        describe_progression("Cardiomegaly.", "Cardiomegaly.", backend="gpt")


@pytest.mark.data
def test_rules_agree_with_nih_label_changes():
    """On every NIH pair, the differ over the two generated captions finds exactly the
    new / resolved labels that pairs.csv's label-derived progression_text names."""
    from biomedjourney.dataset import caption_for, has_data, load_pairs, missing_data_reason
    if not has_data():
        pytest.skip(missing_data_reason())
    names = {"Effusion": "pleural effusion", "Infiltration": "opacity", "Edema": "pulmonary edema"}
    pairs = [p for p in load_pairs() if p.text_origin == "labels"]
    assert pairs
    for p in pairs:
        expected = {}
        for clause in p.progression_text.rstrip(".").split(". "):
            for kind, head, tail in (("new", "New ", ""), ("resolved", "", " resolved")):
                if clause.startswith(head) and clause.endswith(tail) and (head or tail):
                    for label in clause[len(head):len(clause) - len(tail)].split(", "):
                        expected[names.get(label, label.lower())] = kind
        r = rule_based_description(caption_for(p.prior), caption_for(p.followup))
        got = {k: v for k, v in r.findings.items() if v != "unchanged"}
        assert got == expected, (p.pair_id, p.progression_text, r.text)
        assert (r.text == NO_CHANGE) == (not expected)


# ---------------------------------------------------------------------------------------
# OpenAI backend against a local stub server
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
                                  "json": body})
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


class _Stub:
    def __init__(self):
        self.requests, self.script, self.lock = [], [], threading.Lock()
        self.answer = '"Description: New right pleural effusion."'
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.stub = self
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.server.daemon_threads = True  # keep-alive handler threads must not block teardown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _config(stub, tmp_path, **kw) -> LLMConfig:
    kw = {"model": "gpt-4o-mini", "base_url": stub.base_url, "api_key": "sk-test", "timeout": 5.0,
          "max_retries": 3, "backoff_base": 0.001, "backoff_cap": 0.004,
          "cache_path": str(tmp_path / "cache.jsonl"), **kw}
    return LLMConfig(**kw)


PRIOR, FOLLOW = "Heart size normal. No effusion.", "Small right pleural effusion."


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


def test_openai_retries_429_honouring_retry_after(stub, tmp_path):
    sleeps = []
    stub.script = [(429, {"Retry-After": "0.02"}, 0.0)]
    d = OpenAIDescriber(_config(stub, tmp_path), sleep=lambda s: sleeps.append(s))
    assert d.describe(PRIOR, FOLLOW).text == "New right pleural effusion."
    assert len(stub.requests) == 2 and sleeps == [0.02]
    assert d.usage_summary()["retries"] == 1
    assert d.describe(PRIOR + "  \n", " " + FOLLOW).cached  # whitespace at the ends does not change the key


def test_openai_retries_500_with_exponential_backoff(stub, tmp_path):
    sleeps = []
    stub.script = [(500, {}, 0.0), (503, {}, 0.0), (502, {}, 0.0)]
    d = OpenAIDescriber(_config(stub, tmp_path, backoff_base=0.001, backoff_cap=0.003),
                        sleep=lambda s: sleeps.append(s))
    assert d.describe(PRIOR, FOLLOW).cached is False
    assert len(stub.requests) == 4
    # jittered U(0.5, 1) * min(cap, base * 2**attempt): 1 ms, 2 ms, then capped at 3 ms
    for s, full in zip(sleeps, [0.001, 0.002, 0.003], strict=True):
        assert 0.5 * full <= s <= full


def test_openai_retries_timeouts(stub, tmp_path):
    stub.script = [(200, {}, 1.0)]  # first answer comes after the client's timeout
    d = OpenAIDescriber(_config(stub, tmp_path, timeout=0.3))
    assert d.describe(PRIOR, FOLLOW).text == "New right pleural effusion."
    assert len(stub.requests) == 2


def test_openai_gives_up_after_max_retries(stub, tmp_path):
    stub.script = [(500, {}, 0.0)] * 10
    d = OpenAIDescriber(_config(stub, tmp_path, max_retries=2))
    with pytest.raises(ProgressionError, match=r"failed after 3 attempts \(last error: HTTP 500\).*max_retries"):
        d.describe(PRIOR, FOLLOW)
    assert len(stub.requests) == 3
    assert not (tmp_path / "cache.jsonl").exists()  # failures are never cached


def test_openai_client_errors_are_not_retried(stub, tmp_path):
    stub.script = [(401, {}, 0.0)]
    with pytest.raises(ProgressionError, match="HTTP 401"):
        OpenAIDescriber(_config(stub, tmp_path)).describe(PRIOR, FOLLOW)
    assert len(stub.requests) == 1


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
    assert P._price("gpt-4o-2024-08-06") == P.PRICES_PER_1K["gpt-4o"] and P._price("gpt-4-0613") == (0.03, 0.06)


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


def test_retry_after_parsing():
    assert P._retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert P._retry_after({"retry-after": "3"}) == 3.0
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < P._retry_after({"retry-after": when}) <= 31
    assert P._retry_after({}) is None and P._retry_after({"retry-after": "soon"}) is None


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
