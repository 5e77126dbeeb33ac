"""Progression text, the offline differ (findings/describe_rules.py) on hand-written report pairs.
The OpenAI backend and the backend choice: tests/test_progression_llm.py."""
from __future__ import annotations

import pytest

from biomedjourney.progression import (NO_CHANGE, describe_progression, diff_findings, extract_findings,
                                       rule_based_description)

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
