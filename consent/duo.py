"""GA4GH Data Use Ontology (DUO) terms and their hierarchy, as a data table.

No maintained PyPI package ships the DUO ontology itself (`pyobo`/`bioregistry` fetch it from the
network at run time, which this system must never do), so the terms we use are encoded here with
their official identifiers, shorthands, labels and `rdfs:subClassOf` parents, copied from the DUO
release 2021-02-23 (`duo.owl`, versionIRI http://purl.obolibrary.org/obo/duo/releases/2021-02-23/duo.owl,
and its `duo.csv` flat file; EBISPOT/DUO on GitHub). That release still is the latest one.

Two kinds of term matter here: *data use permissions* (children of DUO:0000001: what research a
consent allows: NRES, GRU, HMB, DS, POA) and *data use modifiers* (children of DUO:0000017:
conditions on that use: NCU, IRB, GS, ...). The matching of a research purpose against a
permission follows the DUOS matching algorithm (DataBiosphere/consent-ontology,
`DataUseMatchCasesV4`); see `covers` and docs/consent.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DUO_RELEASE = "2021-02-23"
DUO_SYSTEM = "http://purl.obolibrary.org/obo/duo"

TermKind = Literal["root", "permission", "modifier", "purpose"]


@dataclass(frozen=True)
class DuoTerm:
    """One DUO class: identifier, shorthand, official label, direct parents."""

    id: str
    shorthand: str
    label: str
    parents: tuple[str, ...]
    kind: TermKind


_TERMS: tuple[DuoTerm, ...] = (
    DuoTerm("DUO:0000001", "", "data use permission", (), "root"),
    DuoTerm("DUO:0000017", "", "data use modifier", (), "root"),
    # permissions
    DuoTerm("DUO:0000004", "NRES", "no restriction", ("DUO:0000001",), "permission"),
    DuoTerm("DUO:0000042", "GRU", "general research use", ("DUO:0000001",), "permission"),
    DuoTerm("DUO:0000006", "HMB", "health or medical or biomedical research", ("DUO:0000042",), "permission"),
    DuoTerm("DUO:0000007", "DS", "disease specific research", ("DUO:0000006",), "permission"),
    DuoTerm(
        "DUO:0000011", "POA", "population origins or ancestry research only", ("DUO:0000001",), "permission"
    ),
    # modifiers
    DuoTerm("DUO:0000012", "RS", "research specific restrictions", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000015", "NMDS", "no general methods research", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000016", "GSO", "genetic studies only", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000018", "NPUNCU", "not for profit, non commercial use only", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000019", "PUB", "publication required", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000020", "COL", "collaboration required", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000021", "IRB", "ethics approval required", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000022", "GS", "geographical restriction", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000024", "MOR", "publication moratorium", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000025", "TS", "time limit on use", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000026", "US", "user specific restriction", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000027", "PS", "project specific restriction", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000028", "IS", "institution specific restriction", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000029", "RTN", "return to database or resource", ("DUO:0000017",), "modifier"),
    DuoTerm("DUO:0000043", "CC", "clinical care use", ("DUO:0000017",), "modifier"),
    # duo.owl spells this IRI DUO_00000044 (an extra zero); duo.csv and the OLS use DUO:0000044.
    DuoTerm(
        "DUO:0000044",
        "NPOA",
        "population origins or ancestry research prohibited",
        ("DUO:0000017",),
        "modifier",
    ),
    DuoTerm("DUO:0000045", "NPU", "not for profit organisation use only", ("DUO:0000018",), "modifier"),
    DuoTerm("DUO:0000046", "NCU", "non-commercial use only", ("DUO:0000018",), "modifier"),
    # Methods development research ALONE (a new model or algorithm, no finding about a disease):
    # a research purpose of the DUOS matcher (DataUseV4 `methodsResearch`, matchMDS) that DUO has
    # no term for (DUO has only the NMDS modifier that restricts it). A study purpose only: no
    # consent can name it (it is neither a permission nor a modifier). Methods development ON a
    # disease is a DS study with `methods_development` (consent.request.StudyRequest).
    DuoTerm("MDS", "MDS", "methods development research (DUOS; no DUO term)", (), "purpose"),
)

TERMS: dict[str, DuoTerm] = {t.id: t for t in _TERMS}
BY_SHORTHAND: dict[str, DuoTerm] = {t.shorthand: t for t in _TERMS if t.shorthand}

NRES = "DUO:0000004"
GRU = "DUO:0000042"
HMB = "DUO:0000006"
DS = "DUO:0000007"
POA = "DUO:0000011"
NMDS = "DUO:0000015"
GSO = "DUO:0000016"
NPUNCU = "DUO:0000018"
PUB = "DUO:0000019"
COL = "DUO:0000020"
IRB = "DUO:0000021"
GS = "DUO:0000022"
MOR = "DUO:0000024"
TS = "DUO:0000025"
US = "DUO:0000026"
PS = "DUO:0000027"
IS = "DUO:0000028"
RTN = "DUO:0000029"
NPOA = "DUO:0000044"
NPU = "DUO:0000045"
NCU = "DUO:0000046"
MDS = "MDS"

#: Permission terms a contract provision may name.
PERMISSIONS: frozenset[str] = frozenset(t.id for t in _TERMS if t.kind == "permission")
#: Purposes a study may declare (NRES describes data, not research, so no study "is" NRES).
REQUEST_PURPOSES: frozenset[str] = frozenset({GRU, HMB, DS, POA, MDS})
#: Modifiers this engine can evaluate; the others are refused rather than ignored.
SUPPORTED_MODIFIERS: frozenset[str] = frozenset(
    {NMDS, GSO, NPUNCU, PUB, COL, IRB, GS, MOR, TS, US, PS, IS, RTN, NPOA, NPU, NCU}
)
#: Modifiers that are obligations the requester must accept (no data to check).
OBLIGATIONS: frozenset[str] = frozenset({PUB, COL, MOR, RTN})
#: Modifiers in DUO but not evaluable against a study request, with the reason.
UNSUPPORTED_MODIFIERS: dict[str, str] = {
    "DUO:0000012": "RS (research specific restrictions) needs a research-type ontology term "
    "that study requests do not carry",
    "DUO:0000043": "CC (clinical care use) widens use to clinical care, which is not research "
    "and not something a study can request",
}


class UnknownTermError(ValueError):
    """A code that is not a DUO term we know."""


def normalize(code: str) -> str:
    """Accept `DUO:0000042`, `DUO_0000042`, the purl IRI or the shorthand (`GRU`); return `DUO:0000042`."""
    text = code.strip()
    if text.startswith("http://purl.obolibrary.org/obo/"):
        text = text.rsplit("/", 1)[-1]
    text = text.replace("_", ":")
    if text.upper() in BY_SHORTHAND:
        return BY_SHORTHAND[text.upper()].id
    if text in TERMS:
        return text
    raise UnknownTermError(f"{code!r} is not a DUO term known to release {DUO_RELEASE}")


def ancestors(term_id: str) -> frozenset[str]:
    """All transitive parents of a term (excluding itself)."""
    seen: set[str] = set()
    stack = list(TERMS[term_id].parents)
    while stack:
        parent = stack.pop()
        if parent not in seen:
            seen.add(parent)
            stack.extend(TERMS[parent].parents)
    return frozenset(seen)


def is_a(term_id: str, ancestor_id: str) -> bool:
    """True when `term_id` is `ancestor_id` or one of its descendants in the DUO hierarchy."""
    return term_id == ancestor_id or ancestor_id in ancestors(term_id)


def label(term_id: str) -> str:
    term = TERMS[term_id]
    if term.id == term.shorthand:  # MDS: a DUOS purpose without a DUO id
        return f"{term.shorthand} ({term.label})"
    return f"{term.shorthand} ({term.id} {term.label})" if term.shorthand else f"{term.id} {term.label}"


def covers(permission: str, purpose: str) -> tuple[bool, str]:
    """Does a consent permission cover a research purpose (disease matching aside)?

    The rules of the DUOS matching algorithm (DataUseMatchCasesV4), stated over DUO terms:
    NRES covers everything; GRU covers GRU, HMB, DS and POA research; HMB covers HMB and DS
    (not GRU: HMB_F1; not POA: HMB excludes ancestry research by its DUO definition, POA_F1);
    DS covers only DS (the diseases are checked by the caller: the purpose's disease must be the
    consented disease or one of its descendants, DS_F2); POA covers only POA (HMB_F3 for HMB,
    and DS research is approved only against GRU, HMB or DS). Returns (covered, why).
    """
    if permission == NRES:
        return True, "NRES permits any use"
    if purpose == MDS:
        # DUOS matchMDS: methods research alone is approved by GRU, HMB and POA permissions, and
        # by a DS permission only on a disease match, which a study on no disease cannot have.
        if permission in (GRU, HMB, POA):
            return True, ("methods research is permitted so long as it is not expressly prohibited "
                          f"(NMDS); within {label(permission)}")
        if permission == DS:
            return False, ("methods development alone does not match a disease-specific (DS) "
                           "permission (a DS study with methods_development can)")
    if permission == GRU:
        return True, f"{label(purpose)} is within general research use"
    if permission == HMB:
        if purpose in (HMB, DS):
            return True, f"{label(purpose)} is within health/medical/biomedical research"
        if purpose == POA:
            return False, "POA research is not covered by an HMB permission (HMB excludes ancestry research)"
        return False, "GRU research is broader than an HMB permission"
    if permission == DS:
        if purpose == DS:
            return True, "disease-specific research against a disease-specific permission"
        return False, f"{label(purpose)} is not covered by a disease-specific (DS) permission"
    if permission == POA:
        if purpose == POA:
            return True, "population origins or ancestry research against a POA permission"
        return False, f"{label(purpose)} is not covered by a POA-only permission"
    raise UnknownTermError(f"{permission!r} is not a DUO data use permission")
