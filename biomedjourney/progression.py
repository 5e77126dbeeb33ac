"""Two radiology reports (prior, follow-up), or a prior report plus an intended change,
-> a short findings-focused description of the change ("New right pleural effusion.").

The description conditions the diffusion model (stage-2 training text) and fills the
app's "write it from reports" panel. Two backends:

* ``openai``: any OpenAI-compatible chat-completions server (``OpenAIDescriber``), with
  our own logged retries, a JSONL answer cache (a rerun never pays twice) and a token
  and cost tally.
* ``rules``: an offline, deterministic differ: regex finding synonyms, NegEx-style
  negation (Chapman et al., J Biomed Inform 2001), change words, laterality and
  severity, then a per-finding comparison of the two reports.

``describe_progression`` picks between them (``backend='auto'``: OpenAI when an API key
or a base URL is configured, else rules). Report text is never logged or cached.
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import NO_CHANGE

try:
    import fcntl  # POSIX advisory locks for the shared answer cache
except ImportError:  # Windows: O_APPEND alone
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "ProgressionResult", "LLMConfig", "OpenAIDescriber", "ProgressionError", "describe_progression",
    "FINDINGS", "extract_findings", "diff_findings", "rule_based_description",
    "SYSTEM_PROMPT", "PROMPT_VERSION", "NO_CHANGE", "PRICES_PER_1K",
]



class ProgressionError(RuntimeError):
    """The OpenAI backend could not produce a description (unconfigured, HTTP error, empty answer)."""


@dataclass
class ProgressionResult:
    text: str                     # the description
    backend: str                  # 'openai' or 'rules'
    model: str = ""               # LLM model name when backend == 'openai'
    cached: bool = False          # answer came from the JSONL cache (no request made)
    usage: dict = field(default_factory=dict)     # prompt/completion tokens for this call
    findings: dict = field(default_factory=dict)  # rules backend: finding -> change, for display/debug


def _check_inputs(prior_report, followup_report, intended_change) -> None:
    if (followup_report is None) == (intended_change is None):
        raise ValueError("give exactly one of followup_report (a second report to compare with) "
                         "or intended_change (the change you want), not "
                         + ("both" if followup_report is not None else "neither"))
    for name, value in (("prior_report", prior_report), ("followup_report", followup_report),
                        ("intended_change", intended_change)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not (prior_report or "").strip():
        raise ValueError("prior_report is empty: paste the prior study's report text")
    if followup_report is not None and not followup_report.strip():
        raise ValueError("followup_report is empty: paste the follow-up study's report text")
    if intended_change is not None and not intended_change.strip():
        raise ValueError("intended_change is empty: describe the change, e.g. 'new right pleural effusion'")


# ----------------------------------------------------------------------------------------
# Offline rule-based differ
# ----------------------------------------------------------------------------------------

# The lexicon (finding synonyms, change, severity, side and zone words, NegEx triggers) lives in
# findings/lexicon.py and the sentence machinery in findings/rules.py; the differ below uses both.
from .findings.lexicon import CHANGES, FINDINGS  # noqa: E402  (FINDINGS: public name kept here)
from .findings.lexicon import NO_LATERALITY as _NO_LATERALITY  # noqa: E402,F401
from .findings.lexicon import SENTENCE_SPLIT as _SENTENCE_SPLIT  # noqa: E402
from .findings.lexicon import SEVERITY_RANK as _SEVERITY_RANK  # noqa: E402
from .findings.lexicon import VERB as _VERB  # noqa: E402
from .findings.rules import laterality_of as _laterality_of  # noqa: E402
from .findings.rules import normalise as _normalise  # noqa: E402
from .findings.rules import sentence_findings as _sentence_findings  # noqa: E402

_PHRASE_OVERRIDE = {("support devices", "new"): "Support devices placed",
                    ("support devices", "resolved"): "Support devices removed"}


def extract_findings(report: str) -> dict[str, dict]:
    """Findings named in a report: ``{finding: {present, laterality, severity, change}}``.

    ``present`` is False for findings that are only mentioned negated ("no pneumothorax")
    or as resolved; findings never mentioned are left out. Several mentions of one finding
    merge: present if any mention is affirmed, lateralities combine ("left" + "right" ->
    "bilateral"), the highest severity wins, the first change word wins.
    """
    out: dict[str, dict] = {}
    for sentence in _SENTENCE_SPLIT.split(_normalise(report or "")):
        for r in _sentence_findings(sentence.strip()):
            if r["neg"] == "skip":
                continue
            present = not r["neg"]
            cur = out.setdefault(r["finding"], {"present": False, "laterality": "", "severity": "", "change": ""})
            if present and not cur["present"]:  # affirmed mentions override negated ones
                cur.update(present=True, laterality="", severity="",
                           change="" if cur["change"] == "resolved" else cur["change"])
            if present != cur["present"]:
                continue
            lats = [x for x in (cur["laterality"], r["laterality"]) if x]
            cur["laterality"] = _laterality_of([w for x in lats for w in x.split()]) if lats else ""
            if _SEVERITY_RANK[r["severity"]] > _SEVERITY_RANK[cur["severity"]]:
                cur["severity"] = r["severity"]
            cur["change"] = cur["change"] or r["change"]
    return {k: out[k] for k in FINDINGS if k in out}  # canonical order


def _phrase(finding: str, change: str, laterality: str) -> str:
    if (finding, change) in _PHRASE_OVERRIDE:
        return _PHRASE_OVERRIDE[finding, change]
    return " ".join(x for x in (_VERB[change], laterality, finding) if x)


def _changes(prior: dict, followup: dict) -> dict[str, tuple[str, str]]:
    """finding -> (change, laterality) for every finding present in either report."""
    out = {}
    for f in FINDINGS:
        p, q = prior.get(f) or {}, followup.get(f) or {}
        pp, qp = bool(p.get("present")), bool(q.get("present"))
        if not pp and not qp:
            continue
        lat = (q.get("laterality") or p.get("laterality", "")) if qp else p.get("laterality", "")
        if not pp:  # absent -> present; trust the follow-up's own change word when it has one
            change = q.get("change") if q.get("change") in ("increased", "decreased", "unchanged") else "new"
        elif not qp:
            change = "resolved"
        elif q.get("change") in ("new", "increased", "decreased"):
            change = q["change"]
        else:
            ps, qs = _SEVERITY_RANK[p.get("severity", "")], _SEVERITY_RANK[q.get("severity", "")]
            pl, ql = p.get("laterality", ""), q.get("laterality", "")
            if ps and qs and ps != qs:
                change = "increased" if qs > ps else "decreased"
            elif pl and ql and pl != ql and "bilateral" in (pl, ql):
                change = "increased" if ql == "bilateral" else "decreased"
            else:
                change = "unchanged"
        out[f] = (change, lat)
    return out


def diff_findings(prior: dict, followup: dict) -> list[str]:
    """Change phrases ("New right pleural effusion", "Resolved consolidation") between two
    ``extract_findings`` results, ordered by change kind then by ``FINDINGS`` order.
    Unchanged findings give no phrase: an empty list means no significant interval change."""
    changes = _changes(prior, followup)
    return [_phrase(f, c, lat) for kind in CHANGES[:-1] for f, (c, lat) in changes.items() if c == kind]


def _join(phrases: list[str]) -> str:
    return ". ".join(phrases) + "." if phrases else NO_CHANGE


def _clean_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip("\"'").strip()
    text = text.rstrip(" .")
    return (text[:1].upper() + text[1:] + ".") if text else ""


def rule_based_description(prior_report: str, followup_report: str | None = None,
                           intended_change: str | None = None) -> ProgressionResult:
    """The offline backend: deterministic, no network."""
    _check_inputs(prior_report, followup_report, intended_change)
    prior = extract_findings(prior_report)
    if followup_report is not None:
        followup = extract_findings(followup_report)
    else:
        wanted = extract_findings(intended_change)
        if not wanted:  # nothing we recognise: pass the user's words through, tidied
            return ProgressionResult(text=_clean_text(intended_change), backend="rules")
        followup = {k: v for k, v in prior.items() if v["present"]}
        for f, w in wanted.items():
            w = dict(w)
            if w["present"] and not w["laterality"]:
                w["laterality"] = prior.get(f, {}).get("laterality", "")
            followup[f] = w
    changes = _changes(prior, followup)
    return ProgressionResult(text=_join(diff_findings(prior, followup)), backend="rules",
                             findings={f: c for f, (c, _) in changes.items()})


# ----------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ----------------------------------------------------------------------------------------

PROMPT_VERSION = "v1"  # bump whenever SYSTEM_PROMPT or the user-message layout changes
SYSTEM_PROMPT = """\
You compare two chest X-ray reports of the same patient, a PRIOR study and a FOLLOW-UP study, \
and write what CHANGED between them.
Rules:
- At most 2 sentences and at most 40 words.
- Findings only: name each finding that is new, increased, decreased or resolved, with its laterality \
(left, right, bilateral) when stated, e.g. "New right pleural effusion. Increased bilateral opacities."
- Mention unchanged findings only when nothing else changed.
- If nothing changed, answer exactly: No significant interval change.
- No diagnosis, no advice or recommendations, no patient details (names, ages, sex, dates, identifiers), \
no hedging, no preamble.
- If you are given an INTENDED CHANGE instead of a follow-up report, rewrite that change in the same style, \
as a change relative to the prior report.
Answer with the description only."""

# USD per 1K tokens (prompt, completion): list prices of OpenAI's API when this was written.
# An ESTIMATE only: check your provider's current prices; unknown models -> cost None.
PRICES_PER_1K: dict[str, tuple[float, float]] = {
    "gpt-4": (0.03, 0.06),
    "gpt-4-32k": (0.06, 0.12),
    "gpt-4-turbo": (0.01, 0.03),
    "gpt-4o": (0.0025, 0.01),
    "gpt-4o-mini": (0.00015, 0.0006),
    "gpt-4.1": (0.002, 0.008),
    "gpt-4.1-mini": (0.0004, 0.0016),
    "gpt-4.1-nano": (0.0001, 0.0004),
    "gpt-3.5-turbo": (0.0005, 0.0015),
}
MAX_RETRY_AFTER_S = 60.0  # a Retry-After longer than this is capped (and logged)
_ENV = "OPENAI_API_KEY, OPENAI_BASE_URL (optional, any OpenAI-compatible server), BIOMEDJOURNEY_LLM_MODEL"


def _price(model: str) -> tuple[float, float] | None:
    """Price of a model, also for dated names ("gpt-4o-2024-08-06" -> "gpt-4o")."""
    best = None
    for name in PRICES_PER_1K:
        if (model == name or model.startswith(name + "-")) and (best is None or len(name) > len(best)):
            best = name
    return PRICES_PER_1K[best] if best else None


@dataclass
class LLMConfig:
    model: str = "gpt-4"                    # BIOMEDJOURNEY_LLM_MODEL
    base_url: str | None = None             # OPENAI_BASE_URL (any OpenAI-compatible server)
    api_key: str | None = None              # OPENAI_API_KEY
    timeout: float = 30.0                   # seconds per request
    max_retries: int = 4                    # retries on 429/408/409/5xx/timeouts/connection errors
    temperature: float = 0.0
    cache_path: str | None = "~/.cache/biomedjourney/progression.jsonl"  # BIOMEDJOURNEY_LLM_CACHE; None disables
    backoff_base: float = 0.5               # s; delay ~ U(0.5, 1) * min(cap, base * 2**attempt)
    backoff_cap: float = 8.0                # s

    @classmethod
    def from_env(cls) -> "LLMConfig":
        """Defaults overridden by the environment ('', 'none' or 'off' in BIOMEDJOURNEY_LLM_CACHE: no cache)."""
        cache = os.environ.get("BIOMEDJOURNEY_LLM_CACHE")
        return cls(model=os.environ.get("BIOMEDJOURNEY_LLM_MODEL") or cls.model,
                   base_url=os.environ.get("OPENAI_BASE_URL") or None,
                   api_key=os.environ.get("OPENAI_API_KEY") or None,
                   cache_path=cls.cache_path if cache is None else
                   (None if cache.strip().lower() in ("", "none", "off") else cache))

    def configured(self) -> bool:
        return bool(self.api_key or self.base_url)


def _user_message(prior_report: str, followup_report: str | None, intended_change: str | None) -> str:
    second = (f"FOLLOW-UP REPORT:\n{followup_report.strip()}" if followup_report is not None
              else f"INTENDED CHANGE:\n{intended_change.strip()}")
    return f"PRIOR REPORT:\n{prior_report.strip()}\n\n{second}"


def _clean_llm_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text or "").strip().strip("\"'`").strip()
    text = re.sub(r"^(?:description|answer|change)s?\s*:\s*", "", text, flags=re.I)
    if len(text.split()) > 40:  # keep the first two sentences of an over-long answer
        text = " ".join(re.split(r"(?<=[.!?])\s+", text)[:2])
        logger.warning("LLM answer exceeded 40 words; kept its first two sentences (%d words)", len(text.split()))
    return text


class OpenAIDescriber:
    """Chat-completions client with logged retries, a JSONL cache and a usage tally.

    ``sleep`` and ``rng`` are injectable so tests see (and shorten) the backoff."""

    def __init__(self, config: LLMConfig, client=None, *, sleep=time.sleep, rng: random.Random | None = None):
        if client is None and not config.configured():
            raise ProgressionError(f"OpenAI backend is not configured: set {_ENV}, or use backend='rules'")
        if client is None:
            import openai  # lazy: the rules backend must not pay for this import
            client = openai.OpenAI(api_key=config.api_key or "not-needed", base_url=config.base_url,
                                   timeout=config.timeout, max_retries=0)  # retries are ours (logged, tested)
        self.config, self.client = config, client
        self._sleep, self._rng = sleep, rng or random.Random()
        self._cache: dict[str, dict] = {}
        self._cache_offset = 0
        self._stats = {"calls": 0, "cache_hits": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}

    # -- cache ------------------------------------------------------------------------
    def _cache_file(self) -> Path | None:
        return Path(self.config.cache_path).expanduser() if self.config.cache_path else None

    def cache_key(self, prior_report, followup_report=None, intended_change=None) -> str:
        strip = lambda x: None if x is None else x.strip()  # noqa: E731
        payload = {"model": self.config.model, "prompt_version": PROMPT_VERSION, "system": SYSTEM_PROMPT,
                   "temperature": self.config.temperature, "prior": strip(prior_report),
                   "followup": strip(followup_report), "intended": strip(intended_change)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _refresh_cache(self) -> None:
        """Read lines appended since the last read (other processes may be writing too).
        A last line without its newline is left for the next read; bad lines are skipped."""
        path = self._cache_file()
        if path is None or not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(self._cache_offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._cache_offset += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
                self._cache[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # truncated or foreign line

    def _append_cache(self, entry: dict) -> None:
        path = self._cache_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with open(path, "ab", buffering=0) as f:  # O_APPEND: one write per line
            if fcntl is not None:  # the partial-line check and the write are one step across processes
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            if f.tell() > 0:
                with open(path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":  # a crashed writer left a partial line: start a fresh one
                        line = b"\n" + line
            f.write(line)

    # -- request ----------------------------------------------------------------------
    def _delay(self, attempt: int, exc) -> float:
        retry_after = _retry_after(getattr(getattr(exc, "response", None), "headers", None))
        if retry_after is not None:
            if retry_after > MAX_RETRY_AFTER_S:
                logger.warning("server asked to wait %.0f s; waiting %.0f s", retry_after, MAX_RETRY_AFTER_S)
            return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
        d = min(self.config.backoff_cap, self.config.backoff_base * 2 ** attempt)
        return d * self._rng.uniform(0.5, 1.0)

    def _create(self, request: dict):
        import openai
        where = self.config.base_url or "api.openai.com"
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            try:
                return self.client.chat.completions.create(**request)
            except openai.APIStatusError as e:
                if not (e.status_code in (408, 409, 429) or e.status_code >= 500):
                    raise ProgressionError(f"OpenAI request to {where} failed with HTTP {e.status_code} "
                                           f"(not retried): {e.message}; check the model name "
                                           f"'{self.config.model}' and your key") from e
                err = f"HTTP {e.status_code}"
                last = e
            except openai.APIConnectionError as e:  # includes APITimeoutError
                err, last = type(e).__name__, e
            if attempt + 1 == attempts:
                raise ProgressionError(
                    f"OpenAI request to {where} failed after {attempts} attempts (last error: {err}); "
                    f"try again later or raise LLMConfig.max_retries (now {self.config.max_retries})") from last
            delay = self._delay(attempt, last)
            self._stats["retries"] += 1
            logger.warning("OpenAI request failed (%s), attempt %d/%d; retrying in %.2f s",
                           err, attempt + 1, attempts, delay)
            self._sleep(delay)

    def describe(self, prior_report, followup_report=None, intended_change=None) -> ProgressionResult:
        _check_inputs(prior_report, followup_report, intended_change)
        key = self.cache_key(prior_report, followup_report, intended_change)
        if key not in self._cache:
            self._refresh_cache()
        if key in self._cache:
            self._stats["cache_hits"] += 1
            return ProgressionResult(text=self._cache[key]["text"], backend="openai", model=self.config.model,
                                     cached=True, usage={"prompt_tokens": 0, "completion_tokens": 0})
        request = {"model": self.config.model, "temperature": self.config.temperature,
                   "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": _user_message(prior_report, followup_report,
                                                                          intended_change)}]}
        resp = self._create(request)
        u = getattr(resp, "usage", None)
        usage = {"prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                 "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
        self._stats["calls"] += 1
        self._stats["prompt_tokens"] += usage["prompt_tokens"]
        self._stats["completion_tokens"] += usage["completion_tokens"]
        text = _clean_llm_text(resp.choices[0].message.content if resp.choices else "")
        if not text:
            raise ProgressionError(f"model '{self.config.model}' returned an empty answer "
                                   f"(finish_reason={resp.choices[0].finish_reason if resp.choices else None}); "
                                   "try again or use backend='rules'")
        entry = {"key": key, "model": self.config.model, "prompt_version": PROMPT_VERSION, "text": text,
                 "usage": usage, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._cache[key] = entry
        self._append_cache(entry)
        return ProgressionResult(text=text, backend="openai", model=self.config.model, usage=usage)

    def usage_summary(self) -> dict:
        """Requests made, cache hits, tokens, and an ESTIMATED cost (PRICES_PER_1K; None for unknown models)."""
        s = {"model": self.config.model, **self._stats}
        price = _price(self.config.model)
        s["estimated_cost_usd"] = (None if price is None else
                                   round((s["prompt_tokens"] * price[0] + s["completion_tokens"] * price[1]) / 1000, 8))
        return s


def _retry_after(headers) -> float | None:
    """Seconds from 'retry-after-ms' or 'retry-after' (seconds or an HTTP date), else None."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / scale
        except ValueError:
            try:
                return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    return None


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------

def describe_progression(prior_report: str, followup_report: str | None = None, *,
                         intended_change: str | None = None, backend: str = "auto",
                         llm: LLMConfig | None = None) -> ProgressionResult:
    """Describe the change from ``prior_report`` to ``followup_report`` (or to ``intended_change``).

    backend: 'auto' (OpenAI when an API key or base URL is configured, else rules),
    'openai' (error when unconfigured) or 'rules' (offline, deterministic). ``llm``
    defaults to ``LLMConfig.from_env()``. OpenAI failures raise ProgressionError; they do
    not fall back to rules silently. Batch callers who want ``usage_summary()`` should
    keep one ``OpenAIDescriber`` instead.
    """
    _check_inputs(prior_report, followup_report, intended_change)
    if backend not in ("auto", "openai", "rules"):
        raise ValueError(f"backend must be 'auto', 'openai' or 'rules', got {backend!r}")
    if backend == "rules":
        return rule_based_description(prior_report, followup_report, intended_change)
    llm = llm or LLMConfig.from_env()
    if not llm.configured():
        if backend == "openai":
            raise ProgressionError(f"backend='openai' but no API key or base URL is configured: set {_ENV} "
                                   "(or pass llm=LLMConfig(...)), or use backend='rules'")
        return rule_based_description(prior_report, followup_report, intended_change)
    return OpenAIDescriber(llm).describe(prior_report, followup_report, intended_change)
