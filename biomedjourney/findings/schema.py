"""The structured finding: what a description says, as data (names, sides, zones, severity, change).

One `Finding` per finding named in a description. The rule-based extractor and the LLM path
both return these; the renderer turns them back into the canonical description text; the edit
mask is built from them and the prior's anatomy. pydantic gives validation and the JSON schema
for the LLM's structured output.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

# canonical finding names (the keys of the lexicon; progression.FINDINGS uses the same names)
FindingName = Literal[
    "pleural effusion", "pneumothorax", "consolidation", "opacity", "pulmonary edema", "cardiomegaly",
    "atelectasis", "nodule", "mass", "pneumonia", "support devices", "fracture", "emphysema",
    "subcutaneous emphysema", "pleural thickening", "fibrosis", "hernia"]
Side = Literal["right", "left", "bilateral", "none"]          # the PATIENT's side (radiological convention)
Zone = Literal["upper", "middle", "lower", "base", "apex", "perihilar", "costophrenic angle", "none"]
Severity = Literal["mild", "moderate", "severe", "none"]
Change = Literal["new", "increased", "decreased", "resolved", "unchanged"]


class Finding(BaseModel):
    """One finding of a description, e.g. effusion · right · base · moderate · new."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: FindingName
    side: Side = "none"
    zone: Zone = "none"
    severity: Severity = "none"
    change: Change = "new"

    @property
    def receding(self) -> bool:
        """Going away: decreased or resolved."""
        return self.change in ("decreased", "resolved")

    def chip(self) -> str:
        """Short label for the UI: 'pleural effusion · right · base · new'."""
        parts = [self.name] + [v for v in (self.side, self.zone, self.severity) if v != "none"] + [self.change]
        return " · ".join(parts)


class Findings(BaseModel):
    """The LLM's structured-output envelope (a JSON object with one list)."""
    model_config = ConfigDict(extra="forbid")
    findings: list[Finding]
