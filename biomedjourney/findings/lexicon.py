"""The radiology lexicon: finding synonyms, side, zone, severity and change words, negation triggers.

One place for the words; `rules.py` (and, through it, `biomedjourney.progression`) holds the
machinery that applies them. Every pattern is matched on lower-cased text, on whole words.

Negation follows NegEx (Chapman WW et al., "A simple algorithm for identifying negated findings
and diseases in discharge summaries", J Biomed Inform 34(5):301-310, 2001): pre-triggers
("no", "without", ...) negate the mentions after them up to a terminator ("but", "however"),
post-triggers ("... not seen", "... has resolved") the mention before them; pseudo-triggers
("no new", "no change") negate nothing.

Sides are the PATIENT's side, kept as written in the report (radiological convention).
Zones: "lingula"/"lingular" is the left lung's counterpart of the right middle lobe and maps to
side "left", zone "middle"; "retrocardiac" maps to zone "lower" (the left lower lobe hides behind
the heart) without forcing a side.
"""
from __future__ import annotations

import re

# canonical finding -> regex synonyms (matched case-insensitively on whole words; where two
# synonyms overlap the longer match wins, so "consolidative opacity" is a consolidation and
# "Kerley B lines" is edema, not a device). Dict order is the output order of the phrases.
FINDINGS: dict[str, list[str]] = {
    "pleural effusion": [r"(?<!pericardial )(?:pleural )?effusions?", r"hydrothorax", r"pleural fluid",
                         r"blunt(?:ing|ed) of the (?:\w+ )?costophrenic angles?",
                         r"costophrenic (?:angle )?blunting"],
    "pneumothorax": [r"(?:hydro)?pneumothora(?:x|ces)", r"ptx", r"pleural air(?: collections?)?"],
    "consolidation": [r"consolidations?", r"consolidative (?:opacit(?:y|ies)|changes?)", r"consolidated"],
    "opacity": [r"opacit(?:y|ies)", r"opacification", r"air[ -]?space (?:disease|opacit(?:y|ies))",
                r"ground[ -]glass(?: opacit(?:y|ies)| attenuation)?", r"ggos?", r"infiltrat(?:e|es|ion|ions)",
                r"(?:patchy |high[ -]density )*shadow(?:s|ing)?", r"haziness", r"reticulonodular markings"],
    "pulmonary edema": [r"(?:pulmonary |interstitial |alveolar )?o?edema", r"(?:pulmonary )?vascular congestion",
                        r"(?:pulmonary )?venous congestion", r"cephali[sz]ation", r"kerley b? ?lines",
                        r"fluid overload", r"(?:pulmonary |vascular |venous |interstitial )?congestion",
                        r"(?:pulmonary )?venous hypertension", r"(?:vascular|venous) engorgement",
                        r"engorged (?:pulmonary )?(?:vessels|vasculature)",
                        r"(?:increased|prominent|prominence of (?:the )?)(?:central |pulmonary |lung )*"
                        r"vascular(?:ity|ature)", r"(?:central |pulmonary |lung )*vascular prominence",
                        r"(?:pulmonary |lung )?vascularity (?:is |appears )?(?:prominent|increased)"],
    "cardiomegaly": [r"cardiomegaly", r"cardiac enlargement",
                     r"enlarge(?:d|ment of the) (?:cardiac|heart|cardiomediastinal) (?:silhouette|shadow|size)",
                     r"(?:heart|cardiac)(?: size| silhouette| shadow)? (?:is |remains |appears )?"
                     r"(?:(?:mildly|moderately|severely|markedly|slightly|borderline) )?enlarged",
                     r"(?:(?:mildly|moderately|severely|markedly|slightly|borderline) )?enlarged heart",
                     r"heart (?:is |appears )?(?:(?:mildly|moderately|markedly|slightly) )?large",
                     r"borderline (?:heart size|cardiomegaly)"],
    "atelectasis": [r"atelecta(?:sis|ses|tic(?: changes?)?)", r"(?:lobar |segmental )?collapse", r"volume loss"],
    "nodule": [r"nodul(?:e|es|ar opacit(?:y|ies))"],
    "mass": [r"mass(?:es)?", r"tumou?rs?"],
    "pneumonia": [r"(?:broncho)?pneumonias?", r"pneumonitis"],
    "support devices": [
        r"(?:endotracheal|et|tracheostomy|trach|nasogastric|ng|orogastric|og|feeding|dobhoff|enteric|"
        r"chest|thoracostomy) tubes?", r"etts?", r"picc(?: lines?)?",
        r"(?:(?:internal jugular|ij|subclavian|femoral) )?(?:central venous|central|arterial|venous|"
        r"swan[ -]ganz|pulmonary artery|dialysis|midline) (?:lines?|catheters?)",
        r"(?:internal jugular|ij|subclavian) (?:lines?|catheters?)", r"catheters?",
        r"(?:pacemaker|pacer|aicd|icd|defibrillator)(?: (?:leads?|wires?|generator|device))?",
        r"pacing (?:leads?|wires?)", r"port[ -]?a[ -]?cath", r"(?:chest|venous) port",
        r"(?:support|monitoring|medical) devices?", r"lines (?:and|or) tubes", r"tubes (?:and|or) lines",
        r"(?:chest |pleural )?drains?", r"ecmo cannulae?", r"intubat(?:ed|ion)", r"extubat(?:ed|ion)"],
    "fracture": [r"fractures?", r"fractured"],
    "emphysema": [r"emphysema(?:tous(?: changes?)?)?", r"hyperinflat(?:ion|ed)", r"hyperexpan(?:sion|ded)"],
    "subcutaneous emphysema": [r"subcutaneous (?:emphysema|air|gas)", r"surgical emphysema"],
    "pleural thickening": [r"pleural thickening", r"pleural plaques?"],
    "fibrosis": [r"fibros(?:is|es)", r"fibrotic(?: changes?)?", r"scarring"],
    "hernia": [r"(?:hiatal|hiatus|diaphragmatic) hernia", r"hernias?"],
}
# findings whose laterality we never state ("right cardiomegaly" means nothing)
NO_LATERALITY = {"cardiomegaly", "support devices", "hernia"}

CHANGES = ("new", "increased", "decreased", "resolved", "unchanged")  # phrase order (unchanged: no phrase)
VERB = {"new": "New", "increased": "Increased", "decreased": "Decreased", "resolved": "Resolved",
         "unchanged": "Unchanged"}

SEVERITY_RANK = {"": 0, "mild": 1, "moderate": 2, "severe": 3}
SEVERITY_WORDS = {
    "mild": r"minimal|mild|mildly|small|trace|tiny|slight|slightly|subtle|minor|faint",
    "moderate": r"moderate|moderately|moderate-sized|medium",
    "severe": r"severe|severely|large|large-volume|extensive|massive|marked|markedly|substantial|huge|dense",
}
SEVERITY_RE = {k: re.compile(rf"\b(?:{v})\b") for k, v in SEVERITY_WORDS.items()}

# change words, tried in this order on a window; earlier kinds mask their text first so
# "partially resolved" is a decrease and "no interval change" is not a negation
CHANGE_WORDS = [
    ("decreased", r"partial(?:ly)? resol\w+|near(?:ly)? (?:complete(?:ly)? )?resol\w+|almost resolved|resolving"),
    ("unchanged", r"no (?:significant |interval |appreciable |substantial |definite )*(?:change|increase|"
                  r"increased|worsening|progression|decrease)|without (?:significant |interval )*change|"
                  r"unchanged|stable|not (?:significantly )?(?:changed|increased|decreased|worse|enlarged)|"
                  r"persist(?:s|ent|ing|ed)?|similar|"
                  r"again (?:seen|noted|demonstrated)|redemonstrat\w*|remains?|remained|constant"),
    ("resolved", r"(?:has |have )?resolved|resolution|resolves?|no longer|cleared|disappear(?:ed|ance)|"
                 r"removed|removal|remove|withdrawn|extubat\w*"),
    ("new", r"new|newly|interval (?:development|appearance)|develop(?:ed|ment|ing|s)?|appearance of|"
            r"emerg(?:ed|ing|ence)|placed|placement|inserted|insertion|introduced"),
    ("increased", r"increas(?:e|ed|es|ing)|worse|worsen(?:ed|ing|s)?|progress(?:ed|ion|ing|ive|ively)?|"
                  r"enlarg(?:ed|ing|ement)|larger|bigger|more(?! (?:on|in|at|than)\b)|greater|"
                  r"extend(?:ed|ing|s)|extension|spread|"
                  r"grow(?:n|s|ing)?|deteriorat\w*"),
    ("decreased", r"decreas(?:e|ed|es|ing)|improv(?:e|ed|es|ing|ement)|smaller|less(?! (?:on|in|at|than)\b)|lesser|"
                  r"reduc(?:ed|tion|ing)|"
                  r"diminish(?:ed|ing)?|regress(?:ed|ion|ing)?|clearing|waning|lessened|shrink(?:s|ing)?|shrunk"),
]
CHANGE_RES = [(k, re.compile(rf"\b(?:{p})\b")) for k, p in CHANGE_WORDS]
ANY_CHANGE = "|".join(p for _, p in CHANGE_WORDS)
# "slightly increased": the adverb grades the change, not the finding
ADVERB_BEFORE_CHANGE = re.compile(
    rf"\b(?:slight(?:ly)?|mild(?:ly)?|marked(?:ly)?|moderate(?:ly)?|minimal(?:ly)?|significant(?:ly)?|"
    rf"substantial(?:ly)?|much|somewhat|small|large) (?=(?:{ANY_CHANGE})\b)")

# NegEx-style triggers. Pre-triggers negate the mentions after them in the sentence until a
# terminator (or a mention carrying its own change word); post-triggers negate the mention
# before them (and mentions coordinated with it: "X and Y have resolved").
PSEUDO_SKIP = re.compile(r"\bno (?:new|additional|further|other)\b")  # "no new effusion": says nothing
PRE_NEG = [
    ("neg", re.compile(r"\b(?:no|without|negative for|free of|clear of|absence of|rule out|"
                       r"(?:does|did|do) not (?:show|demonstrate|reveal|have|appear(?: to be)?)|"
                       r"evaluation for|(?:evaluate|assess) for)\b")),
    ("resolved", re.compile(r"\b(?:resolved|resolution of|resolve|resolves|removal of|remove|removed|"
                            r"no longer|extubat\w*)\b")),
    # hedges: the mention is neither affirmed nor negated, so it is not extracted
    ("uncertain", re.compile(r"\b(?:(?:may|might|could) (?:represent|reflect|indicate|be|suggest|relate to)|"
                             r"question(?:able)?(?: of| for)?|possibl[ey]|cannot (?:be )?exclud\w*|"
                             r"can ?not be excluded|(?:difficult|unable) to exclude|not (?:be )?excluded|"
                             r"differential(?: diagnos[ie]s| considerations?)?|versus|vs|"
                             r"suspected)\b")),
]
POST_NEG = [
    ("neg", re.compile(r"\b(?:not (?:seen|identified|present|visible|evident|demonstrated|appreciated|detected|"
                       r"noted)|absent|ruled out|excluded|"
                       r"(?:appears? |is |are )?(?:within (?:the )?(?:normal )?limits(?: of normal)?|normal))\b")),
    ("resolved", re.compile(r"\b(?:resolved|no longer|cleared|disappeared|removed|withdrawn)\b")),
]
TERMINATOR = re.compile(r"\b(?:but|however|although|though|except|apart from|aside from|yet|whereas|while)\b")
SEPARATOR = re.compile(r",|;|\b(?:and/or|and|or|with|while|whereas|but|however|as well as)\b")
LATERALITY_WORD = re.compile(r"\b(left|right|bilateral|bilaterally|both|bibasilar|bibasal|bi-?basal|bi-?apical|"
                             r"lingula|lingular)\b")
# side word -> side; words not listed ("bilateral", "both", "bibasilar", ...) mean bilateral
SIDE_OF_WORD = {"left": "left", "right": "right", "lingula": "left", "lingular": "left"}
POSTPOSITIVE = re.compile(r"^\s*(?:(?:is|are|has|have|been|seen|noted|present|identified|demonstrated|projecting|"
                          r"located|again|developed|persists?|remains?|appears?|predominantly|mainly) ){0,3}"
                          r"(?:in|on|at|of|within|involving|affecting|overlying|"
                          r"bilaterally|(?:the )?(?:left|right) (?:lung|base|apex|upper|middle|mid|lower|lobe))\b")
# words allowed between two coordinated mentions ("left effusion and right pneumothorax")
COORD_WORDS = set("""and or & as well the a an left right bilateral bibasilar bibasal both small mild moderate
large minimal trace tiny severe extensive patchy focal diffuse multifocal lower upper mid middle lobe lobes zone
zones lung lungs base bases basilar basal apex apices apical perihilar hilar retrocardiac pleural
lingula lingular costophrenic angle angles field fields midlung sided hemithorax region
in of at within""".split())

# change words that may open a coordinated location ("progressive right mid and lower zone consolidation")
LOCATION_LEAD = re.compile(r"\b(?:new|progressive|progressing|increasing|increased|worsening|worsened|persistent|"
                           r"persisting|improving|improved|decreasing|decreased|developing|enlarging|interval)\b")

MENTION_RES = [(name, re.compile(rf"\b(?:{p})\b")) for name, pats in FINDINGS.items() for p in pats]
SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")

# zone -> words (the first zone word found near a mention wins); upper/middle/lower are lobes or
# zones, "base" the lung bases, "apex" the apices. See the module docstring for lingula/retrocardiac.
ZONE_WORDS: dict[str, str] = {
    "costophrenic angle": r"costophrenic(?: angles?| sulc(?:us|i))?|cp angles?",
    "perihilar": r"(?:peri)?hilar|hil(?:um|a)",
    "apex": r"ap(?:ex|ices)|(?:bi-?)?apical",
    "base": r"bases?|(?:bi-?)?basal|(?:bi-?)?basilar|bibasal",
    "upper": r"upper(?: lobes?| zones?| lungs?| fields?| lung (?:zones?|fields?))",
    "middle": r"middle(?: lobes?| zones?| lungs?| fields?| lung (?:zones?|fields?))|mid[ -]?(?:lungs?|zones?|fields?)|"
              r"lingula|lingular",
    "lower": r"lower(?: lobes?| zones?| lungs?| fields?| lung (?:zones?|fields?))|retrocardiac",
}
ZONE_RE = re.compile("|".join(rf"(?P<z{i}>\b(?:{p})\b)" for i, p in enumerate(ZONE_WORDS.values())))
ZONE_NAMES = list(ZONE_WORDS)
# canonical words the renderer writes for a zone (each one maps back to its zone above)
ZONE_TEXT = {"upper": "upper zone", "middle": "middle zone", "lower": "lower zone", "base": "basal",
             "apex": "apical", "perihilar": "perihilar", "costophrenic angle": "costophrenic angle"}
SEVERITY_TEXT = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
# findings that have no side and no zone in a description ("right cardiomegaly" means nothing)
NO_LOCATION = NO_LATERALITY
# with no side word, these mean both sides: "small effusions", "atelectasis at the bases"
PLURAL_BILATERAL = re.compile(r"\b(?:(?:pleural )?effusions|pneumothoraces|bases|apices|lungs)\b")
# "left greater than right": both sides
BOTH_SIDES = re.compile(r"\b(?:left|right)(?:[- ]sided)? (?:greater|more|worse|larger) than (?:the )?(?:left|right)\b")
