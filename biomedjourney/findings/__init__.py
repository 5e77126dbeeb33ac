"""Structured findings: description or report text -> `Finding` list -> canonical text.

* `extract` (rules, offline, deterministic) and `extract_llm` (GPT-4 through the openai SDK,
  structured outputs validated with pydantic) read findings from text;
* `render` writes the canonical description ("New moderate right basal pleural effusion.");
* `extract_findings_any` picks a backend.

`client` builds the one OpenAI client (the SDK's own retries and timeout) that both LLM paths use:
`llm` here and `describe_llm`, the OpenAI backend of `biomedjourney.progression` (whose offline
backend is `describe_rules`).
"""
from __future__ import annotations

from .render import render
from .rules import canonical, extract
from .schema import Finding, Findings

__all__ = ["Finding", "Findings", "FindingsError", "extract", "extract_llm", "render", "canonical",
           "extract_findings_any", "BACKENDS"]

BACKENDS = ("rules", "openai", "auto")


class FindingsError(RuntimeError):
    """The LLM path could not produce valid findings (unconfigured, HTTP error, invalid answers)."""


def extract_llm(text: str, **kwargs) -> list[Finding]:
    """GPT-4 structured-output extraction; see `biomedjourney.findings.llm.extract_llm`."""
    from .llm import extract_llm as _extract_llm  # lazy: the rules path never imports openai
    return _extract_llm(text, **kwargs)


def extract_findings_any(text: str, backend: str = "rules", **kwargs) -> list[Finding]:
    """Findings from text with the chosen backend: 'rules' (offline), 'openai' (error when
    unconfigured) or 'auto' (OpenAI when OPENAI_API_KEY or OPENAI_BASE_URL is set, else rules).
    An OpenAI failure raises FindingsError; it never falls back to rules silently."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: give a report or a description, e.g. 'New right pleural effusion.'")
    if backend == "rules":
        return extract(text)
    if backend == "auto":
        from .client import LLMConfig
        if not (kwargs.get("config") or LLMConfig.from_env()).configured():
            return extract(text)
    return extract_llm(text, **kwargs)
