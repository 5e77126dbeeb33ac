"""Offline, deterministic text -> findings: regex mentions, NegEx-style negation, side, zone,
severity and change words over each sentence.

Negation follows NegEx (Chapman WW et al., J Biomed Inform 34(5):301-310, 2001): a
pre-trigger ("no", "without") negates the mentions after it in its sentence until a
terminator ("but", "however") or a mention with its own change word; a post-trigger
("not seen", "has resolved") negates the mention before it and the mentions coordinated
with it ("X and Y have resolved"). The words live in `lexicon.py`.

`sentence_findings` is the machinery shared with `biomedjourney.progression` (the report
differ); `extract` turns its mention records into canonical `Finding` lists.
"""
from __future__ import annotations

import re

from . import lexicon as L
from .schema import Finding

__all__ = ["extract", "canonical", "normalise", "sentences", "sentence_findings", "laterality_of",
           "FINDING_ORDER", "SIDE_ORDER", "ZONE_ORDER"]

FINDING_ORDER = list(L.FINDINGS)
SIDE_ORDER = ["none", "right", "left", "bilateral"]
ZONE_ORDER = ["none", "upper", "middle", "lower", "base", "apex", "perihilar", "costophrenic angle"]
_SEVERITY = {"": "none", "mild": "mild", "moderate": "moderate", "severe": "severe"}


# ---------------------------------------------------------------------------------------
# word-level helpers
# ---------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower-case, 'left and right' -> 'bilateral', NIH-style underscores -> spaces, one space."""
    text = re.sub(r"\b(left|right)\s*(?:and|&|/)\s*(?:left|right)\b", "bilateral", text.lower())
    text = re.sub(r"(?<=\w)_(?=\w)", " ", text)  # NIH labels: Pleural_Thickening
    text = L.BOTH_SIDES.sub("bilateral", text)
    return re.sub(r"[ \t]+", " ", text)


def sentences(text: str) -> list[str]:
    """The normalised sentences of a text."""
    return [s.strip() for s in L.SENTENCE_SPLIT.split(normalise(text or "")) if s.strip()]


def _blank(m: re.Match) -> str:
    return " " * len(m.group())


def change_of(window: str, last: bool) -> str:
    """The change kind in a window: the occurrence nearest the mention (last in a prefix, first in a postfix)."""
    hits = []
    for kind, rx in L.CHANGE_RES:
        hits += [(m.start(), kind) for m in rx.finditer(window)]
        window = rx.sub(_blank, window)  # earlier kinds own their text
    if not hits:
        return ""
    return (max if last else min)(hits)[1]


def severity_of(window: str, mention: str = "") -> str:
    """'' or the highest severity word in the window (adverbs grading a change word excluded)."""
    text = L.ADVERB_BEFORE_CHANGE.sub(" ", window) + " " + mention  # "mildly enlarged heart" keeps its grade
    best = ""
    for kind, rx in L.SEVERITY_RE.items():
        if rx.search(text) and L.SEVERITY_RANK[kind] > L.SEVERITY_RANK[best]:
            best = kind
    return best


def laterality_of(words: list[str]) -> str:
    """'' | 'left' | 'right' | 'bilateral' from side words (left + right -> bilateral)."""
    sides = [L.SIDE_OF_WORD.get(w, "bilateral") for w in words]
    if not sides:
        return ""
    if "bilateral" in sides or {"left", "right"} <= set(sides):
        return "bilateral"
    return sides[-1]


def zone_of(window: str) -> str:
    """'' or the first zone word in the window."""
    m = L.ZONE_RE.search(window)
    return L.ZONE_NAMES[int(m.lastgroup[1:])] if m else ""


def _coordinated(span: str) -> bool:
    return all(w in L.COORD_WORDS for w in re.findall(r"[a-z&/-]+", span))


def _mentions(sentence: str) -> list[tuple[int, int, str]]:
    found = sorted((m.start(), -m.end(), name) for name, rx in L.MENTION_RES for m in rx.finditer(sentence))
    out, end = [], -1
    for start, neg_end, name in found:  # longest match wins where synonyms overlap
        if start >= end:
            out.append((start, -neg_end, name))
            end = -neg_end
    return out


# ---------------------------------------------------------------------------------------
# sentence machinery (shared with biomedjourney.progression)
# ---------------------------------------------------------------------------------------

def _windows(s: str, ms: list) -> tuple[list[str], list[str], list[str]]:
    """Per mention: the whole text before it (back to the previous mention), its prefix and postfix.
    The text between two mentions is split at its last separator: the part before it is the
    earlier mention's postfix, the part after it the later one's prefix."""
    prefix_full, prefix, postfix = [], [], []
    for i, (start, _end, _) in enumerate(ms):
        span = s[ms[i - 1][1] if i else 0:start]
        seps = list(L.SEPARATOR.finditer(span))
        cut = seps[-1].end() if seps else (0 if i == 0 else len(span))
        if i:
            postfix.append(span[:seps[-1].start()] if seps else span)
        prefix_full.append(span)
        prefix.append(span[cut:])
    tail = s[ms[-1][1]:]
    term = L.TERMINATOR.search(tail)
    postfix.append(tail[:term.start()] if term else tail)
    return prefix_full, prefix, postfix


def _location_prefix(span: str) -> str:
    """The prefix for side words, reaching back over separators to coordinated location words:
    "right lower lobe and left lower lobe infiltrates", "bibasilar and right midlung opacities"."""
    chunks = L.SEPARATOR.split(span)
    keep = [chunks[-1]]
    for chunk in reversed(chunks[:-1]):
        if not chunk.strip() or not _coordinated(L.LOCATION_LEAD.sub(" ", chunk)) or not L.LATERALITY_WORD.search(chunk):
            break
        keep.insert(0, chunk)
    return " ".join(keep)


def _side_of(pre: str, mention: str, post: str) -> tuple[str, bool]:
    """(side, from the postfix) of a mention: side words before it, in it, then after it
    (``post`` is '' unless it is a postpositive location); plurals of paired organs mean both."""
    lat = laterality_of(L.LATERALITY_WORD.findall(pre)) or laterality_of(L.LATERALITY_WORD.findall(mention))
    if lat:
        return lat, False
    lat = laterality_of(L.LATERALITY_WORD.findall(post))
    if lat:
        return lat, True
    return ("bilateral" if L.PLURAL_BILATERAL.search(mention + " " + post) else ""), False


def _record(name: str, mention: str, pre: str, post: str, loc_pre: str) -> dict:
    """One mention's own attributes (before negation and coordination are applied)."""
    postpositive = bool(L.POSTPOSITIVE.match(post))
    lat, lat_post = _side_of(loc_pre, mention,
                             post if postpositive else "")
    zone = zone_of(pre) or zone_of(mention) or (zone_of(post) if postpositive else "")
    r = {"finding": name, "laterality": lat, "lat_post": lat_post, "zone": zone,
         "severity": severity_of(pre + " " + post, mention),
         "change": change_of(loc_pre, last=True) or change_of(post, last=False), "neg": "",
         "from_prefix": bool(change_of(loc_pre, last=True))}
    if name == "support devices" and mention.startswith("extubat"):
        r.update(neg="resolved", change="resolved")
    return r


def _pre_events(own: str) -> list[tuple[int, str]]:
    """NegEx pre-trigger, pseudo-trigger ('skip') and terminator ('') events in a prefix."""
    masked = L.PSEUDO_SKIP.sub(lambda m: "@" * len(m.group()), own)
    for _, rx in L.CHANGE_RES[:2]:  # "partially resolved", "no change", "no increase": not negations
        masked = rx.sub(_blank, masked)
    events = [(m.start(), "skip") for m in re.finditer("@+", masked)]
    events += [(m.start(), kind) for kind, rx in L.PRE_NEG for m in rx.finditer(masked)]
    events += [(m.start(), "") for m in L.TERMINATOR.finditer(masked)]
    return sorted(events)


def _own_prefix(i: int, prefix_full: list[str], prefix: list[str]) -> str:
    """Where mention i's pre-triggers count: its own prefix; for the first mention, or with no
    separator since the previous mention, the whole span before it ("effusion without pneumothorax")."""
    return prefix_full[i] if i == 0 or not L.SEPARATOR.search(prefix_full[i]) else prefix[i]


def _pre_negation(out: list[dict], prefix_full: list[str], prefix: list[str]) -> None:
    """NegEx forward scope: triggers count in a mention's own prefix (for the first mention:
    anything before it), terminators anywhere between mentions. 'uncertain' (hedges such as
    "may represent", "versus", "cannot exclude") is scoped the same way (cf. ConText, Harkema
    et al., J Biomed Inform 2009)."""
    active = ""
    for i, r in enumerate(out):
        events = _pre_events(_own_prefix(i, prefix_full, prefix))
        ends_scope = (i and L.TERMINATOR.search(prefix_full[i])) or \
            (not events and r["change"] not in ("", "resolved"))  # its own change word ends the scope
        active = "" if ends_scope else active
        active = events[-1][1] if events else active
        if active and not r["neg"]:
            r["neg"] = active
            r["change"] = "resolved" if active == "resolved" else r["change"]


def _spread_back(out: list[dict], i: int, s: str, ms: list) -> None:
    """Mention i's negation covers the coordinated, change-less mentions before it."""
    j = i
    while j > 0 and _coordinated(s[ms[j - 1][1]:ms[j][0]]) and not out[j - 1]["neg"] and not out[j - 1]["change"]:
        out[j - 1]["neg"], out[j - 1]["change"] = out[i]["neg"], out[i]["change"]
        j -= 1


def _post_negation(out: list[dict], postfix: list[str], s: str, ms: list) -> None:
    """NegEx backward scope: a post-trigger negates its mention and the coordinated ones before it."""
    for i in range(len(out) - 1, -1, -1):
        text = L.CHANGE_RES[0][1].sub(" ", postfix[i])
        hit = next((kind for kind, rx in L.POST_NEG if rx.search(text)), "")
        if not hit or out[i]["neg"]:
            continue
        out[i]["neg"] = hit
        out[i]["change"] = "resolved" if hit == "resolved" else out[i]["change"]
        _spread_back(out, i, s, ms)


def _spread_changes(out: list[dict], coord: list[bool]) -> None:
    """Change words cover coordinated mentions: "Increased X and Y", "X and Y have increased"."""
    for i in range(1, len(out)):
        if not out[i]["change"] and out[i - 1]["from_prefix"] and coord[i - 1]:
            out[i]["change"], out[i]["from_prefix"] = out[i - 1]["change"], True
    for i in range(len(out) - 2, -1, -1):
        nxt = out[i + 1]
        if not out[i]["change"] and nxt["change"] and not nxt["from_prefix"] and coord[i]:
            out[i]["change"] = nxt["change"]


def _spread_location(out: list[dict], coord: list[bool]) -> None:
    """A trailing location covers the list: "effusion and consolidation at the right base"."""
    for i in range(len(out) - 2, -1, -1):
        nxt = out[i + 1]
        if not out[i]["laterality"] and nxt["lat_post"] and coord[i]:
            out[i]["laterality"], out[i]["lat_post"] = nxt["laterality"], True
            out[i]["zone"] = out[i]["zone"] or nxt["zone"]


def _inherit_side(out: list[dict]) -> None:
    """A finding without a side word shares the side of the finding before it in the sentence,
    when both are affirmed alike and it has no change word of its own ("left basilar opacity, probably
    atelectasis"; "right effusion with adjacent atelectasis"; not "right consolidation and new fracture")."""
    for prev, r in zip(out, out[1:]):
        if not r["laterality"] and prev["laterality"] and prev["neg"] == r["neg"] and not r["from_prefix"]:
            r["laterality"] = prev["laterality"]


def sentence_findings(s: str) -> list[dict]:
    """One dict per finding mention in a normalised sentence (NegEx over the sentence):
    finding, laterality, zone, severity, change ('' when no change word), neg ('', 'neg',
    'resolved' or 'skip' for "no new X"), plus bookkeeping keys."""
    ms = _mentions(s)
    if not ms:
        return []
    prefix_full, prefix, postfix = _windows(s, ms)
    out = [_record(name, s[start:end], prefix[i], postfix[i], _location_prefix(prefix_full[i]))
           for i, (start, end, name) in enumerate(ms)]
    _pre_negation(out, prefix_full, prefix)
    _post_negation(out, postfix, s, ms)
    coord = [_coordinated(s[ms[i][1]:ms[i + 1][0]]) for i in range(len(ms) - 1)]
    _spread_changes(out, coord)
    _spread_location(out, coord)
    _inherit_side(out)
    for r in out:
        if r["finding"] in L.NO_LATERALITY:
            r["laterality"], r["zone"] = "", ""
    return out


# ---------------------------------------------------------------------------------------
# records -> canonical findings
# ---------------------------------------------------------------------------------------

def _compatible(a: Finding, b: Finding) -> bool:
    """Same finding, and neither side nor zone contradicts (an unstated value fits any)."""
    return (a.name == b.name and (a.side == b.side or "none" in (a.side, b.side))
            and (a.zone == b.zone or "none" in (a.zone, b.zone)))


def _merge(a: Finding, b: Finding, b_explicit: bool, a_explicit: bool = True) -> Finding:
    """a refined by b: stated side/zone fill unstated ones, the higher severity wins, the first
    explicit change wins."""
    sev = max((a.severity, b.severity), key=lambda v: L.SEVERITY_RANK["" if v == "none" else v])
    change = a.change if a_explicit or not b_explicit else b.change
    return Finding(name=a.name, side=a.side if a.side != "none" else b.side,
                   zone=a.zone if a.zone != "none" else b.zone, severity=sev, change=change)


def _sort_key(f: Finding) -> tuple:
    return (L.CHANGES.index(f.change), FINDING_ORDER.index(f.name), SIDE_ORDER.index(f.side),
            ZONE_ORDER.index(f.zone))


def _accumulate(items: list[tuple[Finding, bool]]) -> list[Finding]:
    """Merge compatible findings (in order), then sort canonically. The result is pairwise
    incompatible, so merging it again changes nothing."""
    merged: list[list] = []  # [finding, change explicit]
    for f, explicit in items:
        if f.name in L.NO_LOCATION:
            f = f.model_copy(update={"side": "none", "zone": "none"})
        for slot in merged:
            if _compatible(slot[0], f):
                slot[0] = _merge(slot[0], f, explicit, slot[1])
                slot[1] = slot[1] or explicit
                break
        else:
            merged.append([f, explicit])
    return sorted((f for f, _ in merged), key=_sort_key)


def canonical(findings: list[Finding]) -> list[Finding]:
    """The canonical form of a finding list (what `extract` returns): compatible findings merged,
    no side/zone for findings without one (cardiomegaly, devices, hernia), sorted by change kind,
    then lexicon order, side and zone."""
    return _accumulate([(f, True) for f in findings])


def _finding(r: dict) -> Finding:
    return Finding(name=r["finding"], side=r["laterality"] or "none", zone=r["zone"] or "none",
                   severity=_SEVERITY[r["severity"]], change=r["change"] or "new")


def extract(text: str) -> list[Finding]:
    """The findings a text affirms, canonical (see `canonical`). Negated mentions ("no
    pneumothorax") give nothing; resolved ones give change 'resolved'; a finding named without
    a change word is 'new'. Offline and deterministic."""
    items = [(_finding(r), bool(r["change"])) for s in sentences(text) for r in sentence_findings(s)
             if r["neg"] in ("", "resolved")]
    return _accumulate(items)
