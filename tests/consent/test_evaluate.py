"""Evaluator semantics: nesting as exceptions, deny beats permit, contract-level checks, reasons."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from consent import duo
from consent.evaluate import evaluate
from consent.model import Contract, Period, Provision
from consent.request import StudyRequest

AT = datetime(2026, 6, 1, tzinfo=UTC)


def contract(provision: Provision, **kw: object) -> Contract:
    data: dict[str, object] = {
        "contract_id": "c",
        "pseudonym": "p",
        "hospital": "h",
        "version": 1,
        "issued": datetime(2026, 1, 1, tzinfo=UTC),
        "provision": provision,
    }
    data.update(kw)
    return Contract.model_validate(data)


def study(**kw: object) -> StudyRequest:
    data: dict[str, object] = {
        "purpose": "HMB",
        "organisation": "uni-a",
        "region": "DE",
        "data_categories": ("labs",),
    }
    data.update(kw)
    return StudyRequest.model_validate(data)


def test_nested_permit_is_an_exception_to_a_deny() -> None:
    root = Provision(
        type="deny", provisions=(Provision(type="permit", purposes=(duo.DS,), diseases=("C50",)),)
    )
    assert evaluate(contract(root), study(purpose="DS", disease="C50.1"), AT).permit
    assert not evaluate(contract(root), study(purpose="HMB"), AT).permit


def test_deny_beats_permit_among_siblings_and_exceptions_of_exceptions() -> None:
    root = Provision(
        type="permit",
        purposes=(duo.GRU,),
        provisions=(
            Provision(type="permit", organisations=("uni-a",)),
            Provision(
                type="deny",
                regions=("DE",),
                provisions=(Provision(type="permit", organisations=("uni-a",), data_categories=("labs",)),),
            ),
        ),
    )
    # uni-a in DE: the deny for DE has an exception for uni-a's labs
    assert evaluate(contract(root), study(), AT).permit
    decision = evaluate(contract(root), study(data_categories=("labs", "vitals")), AT)
    assert not decision.permit
    assert [r.path for r in decision.reasons if r.code == "deny"] == ["provision.provisions[1]"]
    assert [r.category for r in decision.reasons if r.code == "deny"] == ["vitals"]
    # uni-b in DE: denied; uni-b in FR: permitted by the root
    assert not evaluate(contract(root), study(organisation="uni-b"), AT).permit
    assert evaluate(contract(root), study(organisation="uni-b", region="FR"), AT).permit


def test_contract_level_checks_list_every_reason() -> None:
    c = contract(
        Provision(type="permit"),
        status="inactive",
        max_epsilon=1.0,
        period=Period(end=datetime(2026, 3, 1, tzinfo=UTC)),
    )
    decision = evaluate(c, study(epsilon=2.0), AT)
    assert not decision.permit
    assert [r.code for r in decision.reasons] == ["inactive", "outside-validity", "privacy-cap"]
    assert decision.exclusion == "inactive"
    early = evaluate(contract(Provision(type="permit")), study(), datetime(2025, 12, 31, tzinfo=UTC))
    assert [r.code for r in early.reasons] == ["not-issued"] and early.exclusion == "not-issued"
    capped = contract(Provision(type="permit"), max_epsilon=1.0)
    assert evaluate(capped, study(epsilon=1.0), AT).permit
    assert evaluate(capped, study(epsilon=1.5), AT).exclusion == "privacy-cap"
    assert evaluate(capped, study(), AT).exclusion == "privacy-cap"  # no epsilon stated


def test_rule_period_and_reasons_name_the_rule() -> None:
    root = Provision(
        type="permit",
        purposes=(duo.HMB,),
        period=Period(start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 12, 31, tzinfo=UTC)),
    )
    assert evaluate(contract(root), study(), AT).permit
    late = evaluate(contract(root), study(), datetime(2027, 1, 1, tzinfo=UTC))
    assert not late.permit and late.exclusion == "no-permit"
    assert any("not in force" in r.detail for r in late.reasons)
    ok = evaluate(contract(root), study(), AT)
    assert ok.reasons[0].to_json() == {
        "code": "permit",
        "path": "provision",
        "category": "labs",
        "term": duo.HMB,
        "detail": "permit rule applies (purposes=DUO:0000006; period)",
    }


def test_pure_and_deterministic() -> None:
    c = contract(
        Provision(type="permit", purposes=(duo.GRU,), provisions=(Provision(type="deny", commercial=True),))
    )
    s = study(commercial=True, data_categories=("labs", "vitals"))
    assert evaluate(c, s, AT) == evaluate(c, s, AT)


def test_naive_instant_refused() -> None:
    with pytest.raises(ValueError, match="instant"):
        evaluate(contract(Provision(type="permit")), study(), datetime(2026, 1, 1))
