"""The OpenAI progression describer: two reports (or a report and an intended change) -> a short
description of the change, from any OpenAI-compatible chat-completions server.

The client is `findings.client.make_client` (the openai SDK's own retries and timeout, from
`LLMConfig`); on top of it: a JSONL answer cache (a rerun never pays twice, shared between
processes) and a token and cost tally (`usage_summary`). Report text is never logged or cached.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from .client import NOT_CONFIGURED, LLMConfig, complete, make_client
from .describe_rules import ProgressionResult, check_inputs

try:
    import fcntl  # POSIX advisory locks for the shared answer cache
except ImportError:  # Windows: O_APPEND alone
    fcntl = None

__all__ = ["OpenAIDescriber", "ProgressionError", "SYSTEM_PROMPT", "PROMPT_VERSION", "PRICES_PER_1K"]

logger = logging.getLogger(__name__)


class ProgressionError(RuntimeError):
    """The OpenAI backend could not produce a description (unconfigured, HTTP error, empty answer)."""


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


def _price(model: str) -> tuple[float, float] | None:
    """Price of a model, also for dated names ("gpt-4o-2024-08-06" -> "gpt-4o")."""
    best = None
    for name in PRICES_PER_1K:
        if (model == name or model.startswith(name + "-")) and (best is None or len(name) > len(best)):
            best = name
    return PRICES_PER_1K[best] if best else None


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
    """Chat-completions describer with a JSONL answer cache and a usage tally.

    ``client``: an `openai.OpenAI` (default: `make_client(config, http_client)`); ``http_client``:
    an httpx client for the SDK (a proxy, or a mock transport in tests)."""

    def __init__(self, config: LLMConfig, client=None, *, http_client=None):
        if client is None and http_client is None and not config.configured():
            raise ProgressionError(NOT_CONFIGURED)
        self.config = config
        self.client = client if client is not None else make_client(config, http_client)
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
        complete_lines = data[:data.rfind(b"\n") + 1]
        self._cache_offset += len(complete_lines)
        for line in complete_lines.splitlines():
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

    def _cached(self, key: str) -> dict | None:
        if key not in self._cache:
            self._refresh_cache()
        return self._cache.get(key)

    # -- request ----------------------------------------------------------------------
    def _ask(self, prior_report, followup_report, intended_change) -> tuple[str, dict]:
        """(cleaned answer, token usage) of one request; the SDK retries, failures raise ProgressionError."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": _user_message(prior_report, followup_report, intended_change)}]
        resp, retries = complete(self.client, self.config, ProgressionError, messages)
        u = getattr(resp, "usage", None)
        usage = {"prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
                 "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0)}
        self._stats["calls"] += 1
        self._stats["retries"] += retries
        self._stats["prompt_tokens"] += usage["prompt_tokens"]
        self._stats["completion_tokens"] += usage["completion_tokens"]
        text = _clean_llm_text(resp.choices[0].message.content if resp.choices else "")
        if not text:
            raise ProgressionError(f"model '{self.config.model}' returned an empty answer "
                                   f"(finish_reason={resp.choices[0].finish_reason if resp.choices else None}); "
                                   "try again or use backend='rules'")
        return text, usage

    def describe(self, prior_report, followup_report=None, intended_change=None) -> ProgressionResult:
        check_inputs(prior_report, followup_report, intended_change)
        key = self.cache_key(prior_report, followup_report, intended_change)
        hit = self._cached(key)
        if hit is not None:
            self._stats["cache_hits"] += 1
            return ProgressionResult(text=hit["text"], backend="openai", model=self.config.model,
                                     cached=True, usage={"prompt_tokens": 0, "completion_tokens": 0})
        text, usage = self._ask(prior_report, followup_report, intended_change)
        entry = {"key": key, "model": self.config.model, "prompt_version": PROMPT_VERSION, "text": text,
                 "usage": usage, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._cache[key] = entry
        self._append_cache(entry)
        return ProgressionResult(text=text, backend="openai", model=self.config.model, usage=usage)

    def usage_summary(self) -> dict:
        """Requests made, the SDK's retries, cache hits, tokens, and an ESTIMATED cost (PRICES_PER_1K;
        None for unknown models)."""
        s = {"model": self.config.model, **self._stats}
        price = _price(self.config.model)
        s["estimated_cost_usd"] = (None if price is None else
                                   round((s["prompt_tokens"] * price[0] + s["completion_tokens"] * price[1]) / 1000, 8))
        return s
