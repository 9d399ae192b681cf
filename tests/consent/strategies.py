"""Hypothesis strategies for contracts and study requests over small domains (so rules often match)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from consent import duo
from consent.model import Contract, Period, Provision
from consent.request import StudyRequest

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORGS = ("uni-a", "uni-b", "pharma-x")
REGIONS = ("DE", "FR", "US")
CATEGORIES = ("labs", "vitals", "genomics", "diagnoses")
DISEASES = ("C50", "C50.9", "C00-C97", "I21", "E11")
SAFE_MODIFIERS = (duo.NCU, duo.NPU, duo.IRB, duo.GSO, duo.NPOA, duo.PUB, duo.COL)

periods = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 400), st.integers(1, 400)).map(
        lambda t: Period(start=T0 + timedelta(days=t[0]), end=T0 + timedelta(days=t[0] + t[1]))
    ),
)


@st.composite
def provisions(draw: st.DrawFn, depth: int = 0) -> Provision:
    def some(values: tuple[str, ...], max_size: int) -> tuple[str, ...]:
        if draw(st.integers(0, 2)):  # two times in three: no condition
            return ()
        return tuple(draw(st.lists(st.sampled_from(values), min_size=1, max_size=max_size)))

    type_ = draw(st.sampled_from(("permit", "deny") if depth else ("permit", "permit", "permit", "deny")))
    purpose = draw(st.sampled_from((None, None, duo.GRU, duo.HMB, duo.DS, duo.POA, duo.NRES)))
    purposes = () if purpose is None else (purpose,)
    diseases = (
        tuple(draw(st.lists(st.sampled_from(DISEASES), min_size=1, max_size=2))) if purpose == duo.DS else ()
    )
    modifiers = some(SAFE_MODIFIERS, 2) if type_ == "permit" else ()
    commercial = draw(st.sampled_from((None, None, None, True, False)))
    if commercial is True:
        modifiers = tuple(m for m in modifiers if m not in (duo.NCU, duo.NPU))
    children = ()
    if depth < 2:
        children = tuple(draw(st.lists(provisions(depth + 1), max_size=2)))
    return Provision(
        type=type_,
        purposes=purposes,
        diseases=diseases,
        modifiers=modifiers,
        data_categories=some(CATEGORIES, 2),
        organisations=some(ORGS, 1),
        regions=some(REGIONS, 2),
        commercial=commercial,
        period=draw(st.one_of(st.none(), st.none(), periods)),
        provisions=children,
    )


@st.composite
def contracts(draw: st.DrawFn, pseudonym: str | None = None) -> Contract:
    return Contract(
        contract_id=f"c-{draw(st.integers(0, 10**6))}",
        pseudonym=pseudonym or draw(st.sampled_from(("p1", "p2", "p3", "p4"))),
        hospital="h1",
        version=1,
        issued=T0,
        status=draw(st.sampled_from(("active",) * 7 + ("inactive",))),
        period=draw(st.one_of(st.none(), st.none(), st.none(), periods)),
        max_epsilon=draw(st.sampled_from((None, None, None, 1.0, 5.0))),
        reward_account=draw(st.sampled_from((None, "acct-1", "acct-2"))),
        provision=draw(provisions()),
    )


@st.composite
def requests(draw: st.DrawFn) -> StudyRequest:
    purpose = draw(st.sampled_from((duo.GRU, duo.HMB, duo.DS, duo.POA)))
    return StudyRequest(
        purpose=purpose,
        disease=draw(st.sampled_from(DISEASES)) if purpose == duo.DS else None,
        organisation=draw(st.sampled_from(ORGS)),
        region=draw(st.sampled_from(REGIONS)),
        commercial=draw(st.booleans()),
        ethics_approval=draw(st.booleans()),
        data_categories=tuple(draw(st.lists(st.sampled_from(CATEGORIES), min_size=1, max_size=3))),
        epsilon=draw(st.sampled_from((None, 0.5, 2.0, 8.0))),
        accepted_obligations=tuple(draw(st.lists(st.sampled_from((duo.PUB, duo.COL)), max_size=2))),
    )


instants = st.integers(0, 500).map(lambda d: T0 + timedelta(days=d))
