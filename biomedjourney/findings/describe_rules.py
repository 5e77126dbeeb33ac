"""The offline progression describer: two reports (or a report and an intended change) -> a short
description of the change, deterministically, with no network.

Findings are read per sentence by `findings.rules` (regex synonyms from `findings.lexicon`, NegEx-style
negation, change words, laterality, severity), merged per report (`extract_findings`), then compared
finding by finding (`diff_findings`). `ProgressionResult` and the input check are shared with the
OpenAI backend (`findings.describe_llm`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import NO_CHANGE
from .lexicon import CHANGES, FINDINGS, SENTENCE_SPLIT, SEVERITY_RANK, VERB
from .rules import laterality_of, normalise, sentence_findings

__all__ = ["ProgressionResult", "check_inputs", "extract_findings", "diff_findings", "rule_based_description",
           "FINDINGS"]

_PHRASE_OVERRIDE = {("support devices", "new"): "Support devices placed",
                    ("support devices", "resolved"): "Support devices removed"}


@dataclass
class ProgressionResult:
    text: str                     # the description
    backend: str                  # 'openai' or 'rules'
    model: str = ""               # LLM model name when backend == 'openai'
    cached: bool = False          # answer came from the JSONL cache (no request made)
    usage: dict = field(default_factory=dict)     # prompt/completion tokens for this call
    findings: dict = field(default_factory=dict)  # rules backend: finding -> change, for display/debug


def check_inputs(prior_report, followup_report, intended_change) -> None:
    """ValueError unless there is a prior report and exactly one of a follow-up report or an intended change."""
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
# one report -> findings
# ----------------------------------------------------------------------------------------

def extract_findings(report: str) -> dict[str, dict]:
    """Findings named in a report: ``{finding: {present, laterality, severity, change}}``.

    ``present`` is False for findings that are only mentioned negated ("no pneumothorax")
    or as resolved; findings never mentioned are left out. Several mentions of one finding
    merge: present if any mention is affirmed, lateralities combine ("left" + "right" ->
    "bilateral"), the highest severity wins, the first change word wins.
    """
    out: dict[str, dict] = {}
    for sentence in SENTENCE_SPLIT.split(normalise(report or "")):
        for mention in sentence_findings(sentence.strip()):
            if mention["neg"] != "skip":
                entry = out.setdefault(mention["finding"],
                                       {"present": False, "laterality": "", "severity": "", "change": ""})
                _merge_mention(entry, mention)
    return {k: out[k] for k in FINDINGS if k in out}  # canonical order


def _merge_mention(entry: dict, mention: dict) -> None:
    """Fold one sentence's mention of a finding into the report's entry for it (in place)."""
    present = not mention["neg"]
    if present and not entry["present"]:  # affirmed mentions override negated ones
        entry.update(present=True, laterality="", severity="",
                     change="" if entry["change"] == "resolved" else entry["change"])
    if present != entry["present"]:
        return
    lats = [x for x in (entry["laterality"], mention["laterality"]) if x]
    entry["laterality"] = laterality_of([w for x in lats for w in x.split()]) if lats else ""
    if SEVERITY_RANK[mention["severity"]] > SEVERITY_RANK[entry["severity"]]:
        entry["severity"] = mention["severity"]
    entry["change"] = entry["change"] or mention["change"]


# ----------------------------------------------------------------------------------------
# two reports -> changes
# ----------------------------------------------------------------------------------------

def _phrase(finding: str, change: str, laterality: str) -> str:
    if (finding, change) in _PHRASE_OVERRIDE:
        return _PHRASE_OVERRIDE[finding, change]
    return " ".join(x for x in (VERB[change], laterality, finding) if x)


def _changes(prior: dict, followup: dict) -> dict[str, tuple[str, str]]:
    """finding -> (change, laterality) for every finding present in either report."""
    out = {}
    for f in FINDINGS:
        p, q = prior.get(f) or {}, followup.get(f) or {}
        if p.get("present") or q.get("present"):
            out[f] = (_change(p, q), _laterality(p, q))
    return out


def _laterality(p: dict, q: dict) -> str:
    """The follow-up's side when it has the finding and names one, else the prior's."""
    return (q.get("laterality") or p.get("laterality", "")) if q.get("present") else p.get("laterality", "")


def _change(p: dict, q: dict) -> str:
    """How a finding present in the prior entry ``p`` and/or the follow-up entry ``q`` changed."""
    if not p.get("present"):  # absent -> present; trust the follow-up's own change word when it has one
        return q["change"] if q.get("change") in ("increased", "decreased", "unchanged") else "new"
    if not q.get("present"):
        return "resolved"
    if q.get("change") in ("new", "increased", "decreased"):
        return q["change"]
    return _graded_change(p, q)


def _graded_change(p: dict, q: dict) -> str:
    """Present in both with no change word: compare severity, then spread (one side <-> bilateral)."""
    ps, qs = SEVERITY_RANK[p.get("severity", "")], SEVERITY_RANK[q.get("severity", "")]
    if ps and qs and ps != qs:
        return "increased" if qs > ps else "decreased"
    pl, ql = p.get("laterality", ""), q.get("laterality", "")
    if pl and ql and pl != ql and "bilateral" in (pl, ql):
        return "increased" if ql == "bilateral" else "decreased"
    return "unchanged"


def diff_findings(prior: dict, followup: dict) -> list[str]:
    """Change phrases ("New right pleural effusion", "Resolved consolidation") between two
    ``extract_findings`` results, ordered by change kind then by ``FINDINGS`` order.
    Unchanged findings give no phrase: an empty list means no significant interval change."""
    changes = _changes(prior, followup)
    return [_phrase(f, c, lat) for kind in CHANGES[:-1] for f, (c, lat) in changes.items() if c == kind]


# ----------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------

def _join(phrases: list[str]) -> str:
    return ". ".join(phrases) + "." if phrases else NO_CHANGE


def _clean_text(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip().strip("\"'").strip()
    text = text.rstrip(" .")
    return (text[:1].upper() + text[1:] + ".") if text else ""


def _intended_followup(prior: dict, wanted: dict) -> dict:
    """The follow-up an intended change describes: the prior's present findings, then the wanted ones
    (a wanted finding with no side takes the prior's)."""
    followup = {k: v for k, v in prior.items() if v["present"]}
    for f, w in wanted.items():
        w = dict(w)
        if w["present"] and not w["laterality"]:
            w["laterality"] = prior.get(f, {}).get("laterality", "")
        followup[f] = w
    return followup


def rule_based_description(prior_report: str, followup_report: str | None = None,
                           intended_change: str | None = None) -> ProgressionResult:
    """The offline backend: deterministic, no network."""
    check_inputs(prior_report, followup_report, intended_change)
    prior = extract_findings(prior_report)
    if followup_report is not None:
        followup = extract_findings(followup_report)
    else:
        wanted = extract_findings(intended_change)
        if not wanted:  # nothing we recognise: pass the user's words through, tidied
            return ProgressionResult(text=_clean_text(intended_change), backend="rules")
        followup = _intended_followup(prior, wanted)
    changes = _changes(prior, followup)
    return ProgressionResult(text=_join(diff_findings(prior, followup)), backend="rules",
                             findings={f: c for f, (c, _) in changes.items()})
