"""Two radiology reports (prior, follow-up), or a prior report plus an intended change,
-> a short findings-focused description of the change ("New right pleural effusion.").

The description conditions the diffusion model (stage-2 training text) and fills the
app's "write it from reports" panel. Two backends, each in its own module:

* ``openai`` (`findings/describe_llm.py`, ``OpenAIDescriber``): any OpenAI-compatible
  chat-completions server through the one client of `findings/client.py` (the openai
  SDK's own retries and timeout, ``LLMConfig``), with a JSONL answer cache (a rerun never
  pays twice) and a token and cost tally.
* ``rules`` (`findings/describe_rules.py`): an offline, deterministic differ: regex finding
  synonyms (`findings/lexicon.py`), NegEx-style negation (Chapman et al., J Biomed Inform
  2001), change words, laterality and severity (`findings/rules.py`), then a per-finding
  comparison of the two reports.

``describe_progression`` picks between them (``backend='auto'``: OpenAI when an API key
or a base URL is configured, else rules). Report text is never logged or cached.
"""
from __future__ import annotations

from .config import NO_CHANGE
from .findings.client import ENV_HELP, LLMConfig
from .findings.describe_llm import PRICES_PER_1K, PROMPT_VERSION, SYSTEM_PROMPT, OpenAIDescriber, ProgressionError
from .findings.describe_rules import (FINDINGS, ProgressionResult, check_inputs, diff_findings, extract_findings,
                                      rule_based_description)

__all__ = [
    "ProgressionResult", "LLMConfig", "OpenAIDescriber", "ProgressionError", "describe_progression",
    "FINDINGS", "extract_findings", "diff_findings", "rule_based_description",
    "SYSTEM_PROMPT", "PROMPT_VERSION", "NO_CHANGE", "PRICES_PER_1K",
]


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
    check_inputs(prior_report, followup_report, intended_change)
    if backend not in ("auto", "openai", "rules"):
        raise ValueError(f"backend must be 'auto', 'openai' or 'rules', got {backend!r}")
    if backend == "rules":
        return rule_based_description(prior_report, followup_report, intended_change)
    llm = llm or LLMConfig.from_env()
    if not llm.configured():
        if backend == "openai":
            raise ProgressionError(f"backend='openai' but no API key or base URL is configured: set {ENV_HELP} "
                                   "(or pass llm=LLMConfig(...)), or use backend='rules'")
        return rule_based_description(prior_report, followup_report, intended_change)
    return OpenAIDescriber(llm).describe(prior_report, followup_report, intended_change)
