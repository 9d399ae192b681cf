"""A study asking for a delta above the site maximum is refused at submission, by field name,
with nothing escrowed or logged."""

from __future__ import annotations

import pytest

from exchange.coordinator.schemas import SITE_MAX_DELTA
from federated.privacy_ledger import DEFAULT_MAX_DELTA
from tests.exchange.conftest import World, study_body
from tests.exchange.test_lifecycle import served_balances


def test_the_coordinators_limit_is_the_hospitals_default() -> None:
    assert SITE_MAX_DELTA == DEFAULT_MAX_DELTA


@pytest.mark.parametrize("delta", [0.4, 2e-5])
def test_delta_above_the_site_maximum_is_refused_at_submission(sqlite_world: World, delta: float) -> None:
    world = sqlite_world
    before = served_balances(world)
    size = world.runtime.audit_log.size()
    response = world.as_("alice", "POST", "/v1/studies", json=study_body(delta=delta))
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert [e["field"] for e in errors] == ["delta"]
    assert "exceeds the site maximum per study (1e-05)" in errors[0]["reason"]
    assert world.runtime.audit_log.size() == size
    assert served_balances(world) == before
    assert world.as_("alice", "POST", "/v1/studies", json=study_body(delta=1e-5)).status_code == 201
