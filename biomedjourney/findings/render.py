"""Findings -> the canonical description text, one sentence per finding:
"New moderate right basal pleural effusion. Increased bilateral pulmonary edema."

The wording is chosen so that `rules.extract` reads it back: for a canonical list `c`
(`rules.canonical`), ``extract(render(c))`` is ``c`` without its unchanged findings, which
give no sentence (a description names what changes). Nothing but unchanged findings, or
nothing at all, renders as ``NO_CHANGE``.
"""
from __future__ import annotations

from ..config import NO_CHANGE
from .lexicon import SEVERITY_TEXT, VERB, ZONE_TEXT
from .rules import canonical
from .schema import Finding

__all__ = ["render", "phrase", "NO_CHANGE"]


def phrase(f: Finding) -> str:
    """One finding as a phrase: change, severity, side, zone, name ("New mild left apical pneumothorax")."""
    words = [VERB[f.change], SEVERITY_TEXT.get(f.severity, ""), "" if f.side == "none" else f.side,
             ZONE_TEXT.get(f.zone, ""), f.name]
    return " ".join(w for w in words if w)


def render(findings: list[Finding]) -> str:
    """The canonical description of a finding list (canonicalised first; unchanged findings omitted)."""
    phrases = [phrase(f) for f in canonical(list(findings)) if f.change != "unchanged"]
    return ". ".join(phrases) + "." if phrases else NO_CHANGE
