"""The evaluator: (contract, study request, instant) -> permit or deny, with every reason.

Pure and deterministic: no clock, randomness or I/O; the same inputs give the same decision and
the same reasons in the same order, at the hospital and at the auditor. The rules are listed in
docs/consent.md; in short:

1. Contract level, all checked: the contract must be `active`, issued at or before the instant,
   its validity period must contain the instant, and the study's epsilon must not exceed the
   contract's `max_epsilon`.
2. The study is decided per requested data category; it is permitted only if every category is.
3. For one category, a provision *applies* when all its conditions match. A permit rule's purpose
   condition needs the study purpose to be *covered* by one of its DUO permissions (DUOS matching,
   `duo.covers`; DS: the study's disease is the consented disease or below it in ICD-10); a deny
   rule's purpose condition needs the study purpose to *overlap* one of its terms (a broader study
   might do the denied research, so a deny of DS-C50 also catches HMB and GRU studies).
4. An applicable rule decides unless one of its nested rules (its exceptions) applies and decides;
   among nested rules that decide, deny beats permit. Nothing applicable: deny.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from consent import duo
from consent.codes import icd10_related, icd10_within
from consent.model import Contract, Provision
from consent.request import StudyRequest

ReasonCode = Literal[
    "inactive",
    "not-issued",
    "outside-validity",
    "privacy-cap",
    "permit",
    "deny",
    "not-applicable",
    "no-permit",
]


@dataclass(frozen=True, slots=True)
class Reason:
    """One step of the decision: what (`code`), where (`path`), for which category and DUO term."""

    code: ReasonCode
    path: str
    detail: str
    category: str | None = None
    term: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "path": self.path, "detail": self.detail}
        if self.category is not None:
            out["category"] = self.category
        if self.term is not None:
            out["term"] = self.term
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    permit: bool
    reasons: tuple[Reason, ...]

    @property
    def exclusion(self) -> str | None:
        """The key a denied record is counted under when gating (None when permitted).

        Contract-level failures take precedence (inactive, not-issued, outside-validity,
        privacy-cap), then an applicable deny rule ("denied"), then no applicable permit rule
        ("no-permit").
        """
        if self.permit:
            return None
        codes = {r.code for r in self.reasons}
        for code in ("inactive", "not-issued", "outside-validity", "privacy-cap"):
            if code in codes:
                return code
        return "denied" if "deny" in codes else "no-permit"

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "permit" if self.permit else "deny",
            "reasons": [r.to_json() for r in self.reasons],
        }


def _purpose_failure(node: Provision, request: StudyRequest) -> tuple[str, str] | None:
    """None when the node's purpose condition matches; else (term, why)."""
    if not node.purposes:
        return None
    purpose = request.purpose
    last: tuple[str, str] = ("", "")
    for term in node.purposes:
        if node.type == "permit":
            ok, why = duo.covers(term, purpose)
            if ok and term == duo.DS:
                disease = request.disease
                assert disease is not None  # StudyRequest guarantees it for DS
                if not any(icd10_within(disease, d) for d in node.diseases):
                    ok, why = (
                        False,
                        (f"disease {disease} is not {' or '.join(node.diseases)} nor below it in ICD-10"),
                    )
        else:
            ok, why = _overlaps(term, node.diseases, request)
        if ok:
            return None
        last = (term, why)
    return last


def _overlaps(term: str, diseases: tuple[str, ...], request: StudyRequest) -> tuple[bool, str]:
    purpose = request.purpose
    if term in (duo.NRES, duo.GRU):
        return True, ""
    # methods development alone (MDS) is as broad as general research: it may overlap anything
    if term == duo.HMB:
        return purpose in (duo.GRU, duo.HMB, duo.DS, duo.MDS), "the study does not overlap HMB research"
    if term == duo.POA:
        return purpose in (duo.GRU, duo.POA, duo.MDS), "the study does not overlap POA research"
    # DS
    if purpose in (duo.GRU, duo.HMB, duo.MDS):
        return True, ""
    if purpose == duo.DS:
        disease = request.disease
        assert disease is not None
        return (
            any(icd10_related(disease, d) for d in diseases),
            f"disease {disease} is unrelated to {' or '.join(diseases)}",
        )
    return False, "the study does not overlap disease-specific research"


def _modifier_failures(node: Provision, request: StudyRequest, category: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for term in node.modifiers:
        if term in (duo.NPU, duo.NCU, duo.NPUNCU):
            if request.commercial:
                out.append((term, f"{duo.label(term)} excludes commercial use or for-profit organisations"))
        elif term == duo.IRB:
            if not request.ethics_approval:
                out.append((term, "ethics (IRB/ERB) approval required but not present"))
        elif term == duo.GS:
            if request.region not in node.regions:
                out.append(
                    (term, f"use limited to {', '.join(node.regions)}; study region is {request.region}")
                )
        elif term == duo.IS:
            if request.organisation not in node.organisations:
                out.append((term, f"organisation {request.organisation} is not an approved institution"))
        elif term == duo.PS:
            if request.study_id not in node.projects:
                out.append((term, f"study {request.study_id} is not an approved project"))
        elif term == duo.US:
            if request.researcher not in node.users:
                out.append((term, f"researcher {request.researcher} is not an approved user"))
        elif term == duo.TS:
            assert node.period is not None
            if request.period is None or not request.period.within(node.period):
                out.append((term, "the study period is not within the time limit on use"))
        elif term in duo.OBLIGATIONS:
            if term not in request.accepted_obligations:
                out.append((term, f"the researcher has not accepted {duo.label(term)}"))
        elif term == duo.GSO:
            if "genomics" not in request.data_categories:
                out.append((term, "genetic studies only, and the study reads no genomics data"))
        elif term == duo.NPOA:
            if request.purpose in (duo.POA, duo.GRU):
                out.append((term, "population origins or ancestry research is prohibited"))
        elif term == duo.NMDS and (request.methods_development or request.purpose == duo.MDS):
            disease = request.disease
            if (
                request.purpose != duo.DS
                or disease is None
                or not any(icd10_within(disease, d) for d in node.diseases)
            ):
                out.append((term, "methods development allowed only within the consented disease"))
    return out


def _failures(
    node: Provision, request: StudyRequest, category: str, instant: datetime
) -> list[tuple[str | None, str]]:
    """Every condition of `node` that does not match (empty: the node applies)."""
    out: list[tuple[str | None, str]] = []
    if node.data_categories and category not in node.data_categories:
        out.append((None, f"category {category} not in {', '.join(node.data_categories)}"))
    if node.period is not None and not node.period.contains(instant):
        out.append((None, "rule not in force at this instant"))
    purpose = _purpose_failure(node, request)
    if purpose is not None:
        out.append(purpose)
    if node.organisations and request.organisation not in node.organisations:
        out.append((None, f"organisation {request.organisation} not in {', '.join(node.organisations)}"))
    if node.regions and request.region not in node.regions:
        out.append((None, f"region {request.region} not in {', '.join(node.regions)}"))
    if node.projects and request.study_id not in node.projects:
        out.append((None, f"study {request.study_id} not in {', '.join(node.projects)}"))
    if node.users and request.researcher not in node.users:
        out.append((None, f"researcher {request.researcher} not in {', '.join(node.users)}"))
    if node.commercial is not None and node.commercial != request.commercial:
        out.append(
            (
                None,
                "rule is for commercial use only"
                if node.commercial
                else "rule is for non-commercial use only",
            )
        )
    if node.type == "permit" and node.modifiers:
        out.extend(_modifier_failures(node, request, category))
    return out


def _describe(node: Provision) -> str:
    parts = [
        f"{name}={','.join(values)}"
        for name, values in (
            ("purposes", node.purposes),
            ("diseases", node.diseases),
            ("modifiers", node.modifiers),
            ("categories", node.data_categories),
            ("organisations", node.organisations),
            ("regions", node.regions),
            ("projects", node.projects),
            ("users", node.users),
        )
        if values
    ]
    if node.commercial is not None:
        parts.append(f"commercial={str(node.commercial).lower()}")
    if node.period is not None:
        parts.append("period")
    return f" ({'; '.join(parts)})" if parts else " (unconditional)"


def _decide(
    node: Provision,
    *,
    path: str,
    request: StudyRequest,
    category: str,
    instant: datetime,
    decisive: list[Reason],
    skipped: list[Reason],
) -> Literal["permit", "deny"] | None:
    failures = _failures(node, request, category, instant)
    if failures:
        for term, why in failures:
            skipped.append(
                Reason(
                    "not-applicable", path, f"{node.type} rule does not apply: {why}", category, term or None
                )
            )
        return None
    child_decisive: dict[str, list[Reason]] = {"permit": [], "deny": []}
    for i, child in enumerate(node.provisions):
        found: list[Reason] = []
        result = _decide(
            child,
            path=f"{path}.provisions[{i}]",
            request=request,
            category=category,
            instant=instant,
            decisive=found,
            skipped=skipped,
        )
        if result is not None:
            child_decisive[result].extend(found)
    if child_decisive["deny"]:
        decisive.extend(child_decisive["deny"])
        return "deny"
    if child_decisive["permit"]:
        decisive.extend(child_decisive["permit"])
        return "permit"
    terms = ",".join(node.purposes) or None
    decisive.append(Reason(node.type, path, f"{node.type} rule applies{_describe(node)}", category, terms))
    return node.type


def evaluate(contract: Contract, request: StudyRequest, instant: datetime) -> Decision:
    """Decide whether `contract` lets `request` use its record at `instant` (timezone-aware)."""
    if instant.tzinfo is None:
        raise ValueError("instant: must be timezone-aware")
    reasons: list[Reason] = []
    if contract.status != "active":
        reasons.append(Reason("inactive", "status", f"consent status is {contract.status}, not active"))
    if instant < contract.issued:
        reasons.append(Reason("not-issued", "issued", "the consent was not yet given at this instant"))
    if contract.period is not None and not contract.period.contains(instant):
        reasons.append(Reason("outside-validity", "period", "the instant is outside the consent's validity"))
    if contract.max_epsilon is not None and (
        request.epsilon is None or request.epsilon > contract.max_epsilon
    ):
        asked = "no epsilon" if request.epsilon is None else f"epsilon {request.epsilon}"
        reasons.append(
            Reason(
                "privacy-cap",
                "max_epsilon",
                f"the study asks {asked}; the consent caps it at {contract.max_epsilon}",
            )
        )
    if reasons:
        return Decision(False, tuple(reasons))
    permit = True
    for category in request.data_categories:
        decisive: list[Reason] = []
        skipped: list[Reason] = []
        result = _decide(
            contract.provision,
            path="provision",
            request=request,
            category=category,
            instant=instant,
            decisive=decisive,
            skipped=skipped,
        )
        if result == "permit":
            reasons.extend(decisive)
        elif result == "deny":
            permit = False
            reasons.extend(decisive)
        else:
            permit = False
            reasons.append(Reason("no-permit", "provision", "no permit rule applies", category))
            reasons.extend(r for r in skipped if r.detail.startswith("permit"))
    return Decision(permit, tuple(reasons))
