"""The DUO matching rules' truth table: purpose x restriction x modifier (docs/consent.md, "Rules")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from consent import duo
from consent.evaluate import evaluate
from consent.model import Contract, Period, Provision
from consent.request import StudyRequest

AT = datetime(2026, 6, 1, tzinfo=UTC)


def contract(provision: Provision, **kw: Any) -> Contract:
    return Contract(
        contract_id="c",
        pseudonym="p",
        hospital="h",
        version=1,
        issued=datetime(2026, 1, 1, tzinfo=UTC),
        provision=provision,
        **kw,
    )


def study(purpose: str, disease: str | None = None, **kw: Any) -> StudyRequest:
    base: dict[str, Any] = {"organisation": "uni-a", "region": "DE", "data_categories": ("labs",)}
    base.update(kw)
    return StudyRequest(purpose=purpose, disease=disease, **base)


def permission(term: str, diseases: tuple[str, ...] = ()) -> Provision:
    return Provision(type="permit", purposes=(term,), diseases=diseases)


# (consent permission, its diseases, study purpose, study disease, expected permit)
PURPOSE_TABLE = [
    # NRES and GRU cover every research purpose
    *[(duo.NRES, (), p, d, True) for p, d in [("GRU", None), ("HMB", None), ("DS", "C50.9"), ("POA", None)]],
    *[(duo.GRU, (), p, d, True) for p, d in [("GRU", None), ("HMB", None), ("DS", "C50.9"), ("POA", None)]],
    # HMB: HMB and DS yes; GRU (broader) and POA (excluded by HMB's definition) no
    (duo.HMB, (), "GRU", None, False),
    (duo.HMB, (), "HMB", None, True),
    (duo.HMB, (), "DS", "C50.9", True),
    (duo.HMB, (), "DS", "I21", True),
    (duo.HMB, (), "POA", None, False),
    # DS-C50: the same disease or a descendant only
    (duo.DS, ("C50",), "GRU", None, False),
    (duo.DS, ("C50",), "HMB", None, False),
    (duo.DS, ("C50",), "DS", "C50", True),
    (duo.DS, ("C50",), "DS", "C50.9", True),
    (duo.DS, ("C50",), "DS", "C00-C97", False),  # a parent disease is broader than the consent
    (duo.DS, ("C50",), "DS", "I21", False),
    (duo.DS, ("C50",), "POA", None, False),
    (duo.DS, ("C00-C97",), "DS", "C50.9", True),  # consent to all neoplasms covers breast cancer
    (duo.DS, ("C50", "I21"), "DS", "I21.0", True),
    # POA: only POA
    (duo.POA, (), "GRU", None, False),
    (duo.POA, (), "HMB", None, False),
    (duo.POA, (), "DS", "C50.9", False),
    (duo.POA, (), "POA", None, True),
]


@pytest.mark.parametrize(("term", "diseases", "purpose", "disease", "expected"), PURPOSE_TABLE)
def test_purpose_against_permission(
    term: str, diseases: tuple[str, ...], purpose: str, disease: str | None, expected: bool
) -> None:
    decision = evaluate(contract(permission(term, diseases)), study(purpose, disease), AT)
    assert decision.permit is expected, decision.reasons
    if not expected:
        assert decision.exclusion == "no-permit"
        assert any(r.code == "not-applicable" and r.term == term for r in decision.reasons)


def _gru(*modifiers: str, **kw: Any) -> Provision:
    return Provision(type="permit", purposes=(duo.GRU,), modifiers=modifiers, **kw)


P2026 = Period(start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2027, 12, 31, tzinfo=UTC))
INSIDE = Period(start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2026, 9, 1, tzinfo=UTC))
OUTSIDE = Period(start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2028, 9, 1, tzinfo=UTC))

# (modifier provision, study overrides, expected)
MODIFIER_TABLE = [
    (_gru(duo.NCU), {}, True),
    (_gru(duo.NCU), {"commercial": True}, False),
    (_gru(duo.NPU), {"commercial": True}, False),
    (_gru(duo.NPU), {}, True),
    (_gru(duo.NPUNCU), {"commercial": True}, False),
    (_gru(duo.NPUNCU), {}, True),
    (_gru(duo.IRB), {}, False),
    (_gru(duo.IRB), {"ethics_approval": True}, True),
    (_gru(duo.GS, regions=("DE", "FR")), {"region": "FR"}, True),
    (_gru(duo.GS, regions=("DE", "FR")), {"region": "US"}, False),
    (_gru(duo.IS, organisations=("uni-a",)), {}, True),
    (_gru(duo.IS, organisations=("uni-a",)), {"organisation": "uni-b"}, False),
    (_gru(duo.PS, projects=("study-1",)), {"study_id": "study-1"}, True),
    (_gru(duo.PS, projects=("study-1",)), {"study_id": "study-2"}, False),
    (_gru(duo.PS, projects=("study-1",)), {}, False),
    (_gru(duo.US, users=("dr-who",)), {"researcher": "dr-who"}, True),
    (_gru(duo.US, users=("dr-who",)), {"researcher": "dr-no"}, False),
    (_gru(duo.TS, period=P2026), {"period": INSIDE}, True),
    (_gru(duo.TS, period=P2026), {"period": OUTSIDE}, False),
    (_gru(duo.TS, period=P2026), {}, False),
    (_gru(duo.PUB), {"accepted_obligations": ("PUB",)}, True),
    (_gru(duo.PUB), {}, False),
    (_gru(duo.COL), {"accepted_obligations": ("COL", "PUB")}, True),
    (_gru(duo.COL), {"accepted_obligations": ("PUB",)}, False),
    (_gru(duo.RTN), {"accepted_obligations": ("RTN",)}, True),
    (_gru(duo.RTN), {}, False),
    (
        _gru(duo.MOR, moratorium_until=datetime(2027, 1, 1, tzinfo=UTC)),
        {"accepted_obligations": ("MOR",)},
        True,
    ),
    (_gru(duo.MOR, moratorium_until=datetime(2027, 1, 1, tzinfo=UTC)), {}, False),
    (_gru(duo.GSO), {"data_categories": ("genomics", "labs")}, True),
    (_gru(duo.GSO), {"data_categories": ("labs",)}, False),
    (_gru(duo.NMDS), {"methods_development": True}, False),
    (_gru(duo.NMDS), {}, True),
    (_gru(duo.NCU, duo.IRB), {"ethics_approval": True}, True),
    (_gru(duo.NCU, duo.IRB), {"ethics_approval": True, "commercial": True}, False),
]


@pytest.mark.parametrize(("provision", "overrides", "expected"), MODIFIER_TABLE)
def test_modifier(provision: Provision, overrides: dict[str, Any], expected: bool) -> None:
    decision = evaluate(contract(provision), study("HMB", **overrides), AT)
    assert decision.permit is expected, decision.reasons
    if not expected:
        failing = [r for r in decision.reasons if r.code == "not-applicable"]
        assert any(r.term in provision.modifiers for r in failing)


# NPOA depends on the purpose: it refuses POA research and GRU research (which may include it).
@pytest.mark.parametrize(("purpose", "expected"), [("POA", False), ("GRU", False), ("HMB", True)])
def test_npoa(purpose: str, expected: bool) -> None:
    assert evaluate(contract(_gru(duo.NPOA)), study(purpose), AT).permit is expected


@pytest.mark.parametrize(("disease", "expected"), [("C50.9", True), ("I21", False)])
def test_nmds_methods_within_consented_disease(disease: str, expected: bool) -> None:
    provision = Provision(type="permit", purposes=(duo.DS,), diseases=("C50",), modifiers=(duo.NMDS,))
    assert (
        evaluate(contract(provision), study("DS", disease, methods_development=True), AT).permit is expected
    )


# A deny rule catches every study that may do the denied research (overlap, not coverage).
DENY_TABLE = [
    (Provision(type="deny", purposes=(duo.HMB,)), "GRU", None, False),
    (Provision(type="deny", purposes=(duo.HMB,)), "HMB", None, False),
    (Provision(type="deny", purposes=(duo.HMB,)), "DS", "I21", False),
    (Provision(type="deny", purposes=(duo.HMB,)), "POA", None, True),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "GRU", None, False),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "HMB", None, False),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "DS", "C50.9", False),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "DS", "C00-C97", False),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "DS", "I21", True),
    (Provision(type="deny", purposes=(duo.DS,), diseases=("C50",)), "POA", None, True),
    (Provision(type="deny", purposes=(duo.POA,)), "GRU", None, False),
    (Provision(type="deny", purposes=(duo.POA,)), "POA", None, False),
    (Provision(type="deny", purposes=(duo.POA,)), "HMB", None, True),
    (Provision(type="deny", organisations=("pharma-x",)), "HMB", None, True),
    (Provision(type="deny", commercial=True), "HMB", None, True),
    (Provision(type="deny", regions=("DE",)), "HMB", None, False),
]


@pytest.mark.parametrize(("deny", "purpose", "disease", "expected"), DENY_TABLE)
def test_nested_deny_under_nres(deny: Provision, purpose: str, disease: str | None, expected: bool) -> None:
    root = Provision(type="permit", purposes=(duo.NRES,), provisions=(deny,))
    decision = evaluate(contract(root), study(purpose, disease), AT)
    assert decision.permit is expected, decision.reasons
    if not expected:
        assert decision.exclusion == "denied"
        assert any(r.code == "deny" and r.path == "provision.provisions[0]" for r in decision.reasons)


def test_duo_table_matches_release() -> None:
    # spot checks against duo.owl 2021-02-23: labels and rdfs:subClassOf parents
    assert duo.TERMS[duo.DS].parents == (duo.HMB,)
    assert duo.TERMS[duo.HMB].parents == (duo.GRU,)
    assert duo.TERMS[duo.NPU].parents == (duo.NPUNCU,)
    assert duo.TERMS[duo.NCU].label == "non-commercial use only"
    assert duo.is_a(duo.DS, duo.GRU) and not duo.is_a(duo.POA, duo.GRU)
    assert duo.normalize("http://purl.obolibrary.org/obo/DUO_0000042") == duo.GRU
    assert duo.normalize("ncu") == duo.NCU
    with pytest.raises(duo.UnknownTermError):
        duo.normalize("DUO:9999999")


# Methods development research (issue 21, item 5), as the DUOS matcher decides it: methods
# research ALONE (purpose MDS; DataUseMatchCasesV4.matchMDS) is approved by GRU, HMB and POA
# permissions and by a DS permission only on a disease match, which a study on no disease cannot
# have; an NMDS consent (consent-ontology docs/Algorithms.md, "Methods development/Validation
# study") permits methods research only where its DS-X disease matches.
METHODS_TABLE = [
    # (permission, diseases, modifiers, study purpose, study disease, methods_development, permit)
    (duo.NRES, (), (), "MDS", None, False, True),
    (duo.GRU, (), (), "MDS", None, False, True),
    (duo.HMB, (), (), "MDS", None, False, True),
    (duo.POA, (), (), "MDS", None, False, True),
    (duo.DS, ("C50",), (), "MDS", None, False, False),
    (duo.GRU, (), (duo.NMDS,), "MDS", None, False, False),
    (duo.HMB, (), (duo.NMDS,), "MDS", None, False, False),
    (duo.GRU, (), (duo.NMDS,), "HMB", None, True, False),
    (duo.GRU, (), (), "HMB", None, True, True),
    (duo.GRU, (), (duo.NMDS,), "DS", "C50.9", True, False),  # NMDS with no DS-X: no disease matches
    (duo.DS, ("C50",), (duo.NMDS,), "DS", "C50.9", True, True),
    (duo.DS, ("C50",), (duo.NMDS,), "DS", "I21", True, False),
    (duo.DS, ("C50",), (), "DS", "C50.9", True, True),
    (duo.GRU, (), (duo.NMDS,), "HMB", None, False, True),  # no methods research: NMDS is silent
]


@pytest.mark.parametrize(("term", "diseases", "modifiers", "purpose", "disease", "methods", "expected"),
                         METHODS_TABLE)
def test_methods_development_as_duos_decides(term: str, diseases: tuple[str, ...], modifiers: tuple[str, ...],
                                             purpose: str, disease: str | None, methods: bool,
                                             expected: bool) -> None:
    provision = Provision(type="permit", purposes=(term,), diseases=diseases, modifiers=modifiers)
    decision = evaluate(contract(provision), study(purpose, disease, methods_development=methods), AT)
    assert decision.permit is expected, decision.reasons


def test_mds_is_a_study_purpose_no_consent_can_name() -> None:
    assert duo.normalize("mds") == duo.MDS and duo.MDS in duo.REQUEST_PURPOSES
    assert duo.MDS not in duo.PERMISSIONS and duo.MDS not in duo.SUPPORTED_MODIFIERS
    with pytest.raises(ValueError, match="not a data use permission"):
        Provision(type="permit", purposes=("MDS",))
