"""Authorization matrix: every endpoint x every kind of caller x organisation.

Callers: nobody, the operator, an auditor, a researcher of the study's organisation (alice,
acme), a researcher of another organisation (bob, globex), a registered hospital (h-one), and
an impostor signing with a key nobody registered (h-four). For each pair the answer must be
the expected class (allowed / 401 / 403 / 404-as-if-missing), and a refused call must change
nothing: the log does not grow and the balances stay the same.

One world per database for the whole module (building one costs more than the checks)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from audit.signing import Signer
from exchange.coordinator.client import decision_entry
from exchange.coordinator.schemas import ApiKeyCreate
from tests.exchange.conftest import World, flower_key, receipt, study_body

CALLERS = ("anonymous", "operator", "auditor", "alice", "bob", "h-one", "h-four")


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    prepare: Callable[[World], tuple[str, dict[str, Any]]]  # -> (path, request kwargs)
    allowed: frozenset[str]
    hidden_from: frozenset[str] = frozenset()  # callers that get 404 (not even told it exists)
    # an allowed caller's answer when authorization passes but the content is refused
    allowed_status: int | None = None


def _fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _open_study(world: World) -> str:
    return world.submit("alice", token_budget=10)["id"]


def _path(template: str, make_id: Callable[[World], str] = lambda w: w.completed) -> Callable[..., Any]:
    def prepare(world: World) -> tuple[str, dict[str, Any]]:
        return template.format(id=make_id(world)), {}
    return prepare


def _json(path: str, body: Callable[[World], Any]) -> Callable[..., Any]:
    def prepare(world: World) -> tuple[str, dict[str, Any]]:
        return path, {"json": body(world)}
    return prepare


def _decision(world: World) -> tuple[str, dict[str, Any]]:
    sid = _open_study(world)
    entry = decision_entry(world.hospitals["h-one"], "h-one", sid, decision="refuse",
                           reasons=["policy: not now"], eligible_records=0)
    return f"/v1/hospital/studies/{sid}/decision", {"json": entry.to_json()}


def _catalog(world: World) -> tuple[str, dict[str, Any]]:
    from audit.entry import sign_entry
    from exchange.study.feasibility import CATALOG_KIND

    entry = sign_entry(world.hospitals["h-one"], CATALOG_KIND, {
        "hospital": "hospital:h-one", "purposes": ["*"], "organisations": ["*"], "regions": ["*"],
        "columns": [{"name": n, "category": c, "type": "number"} for n, c in (
            ("mean_radius", "labs"), ("mean_texture", "labs"), ("label", "outcomes"))],
        "allow_commercial": False, "max_epsilon_per_study": 5.0, "max_delta": 1e-5, "accepts_studies": True})
    return "/v1/hospital/catalog", {"json": entry.to_json()}


def _receipt(world: World) -> tuple[str, dict[str, Any]]:
    entry = receipt(world.hospitals["h-one"], "h-one", world.running, world.next_round(), 3)
    return "/v1/hospital/entries", {"json": entry.to_json()}


def _claim(world: World) -> tuple[str, dict[str, Any]]:
    """A valid, unclaimed leaf of h-one's reward commitment of the completed study."""
    from audit.ledger import Ledger
    from audit.reward_commitment import claim_amount

    mw: MatrixWorld = world  # type: ignore[assignment]
    mw._claims += 1
    sid = mw.completed
    opening = world.runner.openings[(sid, "h-one", 1)].openings[mw._claims]
    ledger = Ledger(world.runtime.journal.operator.key_id)
    ledger.apply_all(world.runtime.audit_log.entries())
    pool = ledger.claim_pools[(sid, "hospital:h-one", 1)].pool
    return "/v1/hospital/rewards/claims", {"json": {
        "study_id": sid, "round": 1, "holder": opening.holder, "units": opening.units,
        "index": opening.index, "proof": list(opening.proof),
        "amount": claim_amount(pool, opening.units)}}


def _cancel(world: World) -> tuple[str, dict[str, Any]]:
    return f"/v1/studies/{_open_study(world)}/cancel", {"json": {"reason": "matrix"}}


ALL = frozenset(CALLERS) - {"anonymous", "h-four"}
RESEARCH_READERS = frozenset({"operator", "auditor", "alice", "bob"})

CASES = [
    Case("create organisation", "POST", _json("/v1/organisations", lambda w: {
        "id": _fresh("org"), "name": _fresh("Org"), "region": "NL"}), frozenset({"operator"})),
    Case("list organisations", "GET", _path("/v1/organisations"), frozenset({"operator", "auditor"})),
    Case("create researcher", "POST", lambda w: ("/v1/organisations/acme/researchers",
                                                 {"json": {"id": _fresh("r"), "name": "R"}}),
         frozenset({"operator"})),
    Case("issue api key", "POST", _json("/v1/api-keys", lambda w: {"role": "auditor"}),
         frozenset({"operator"})),
    Case("list api keys", "GET", _path("/v1/api-keys"), frozenset({"operator"})),
    Case("revoke api key", "DELETE", lambda w: (f"/v1/api-keys/{w.spare_key()}", {}),
         frozenset({"operator"})),
    Case("register hospital", "POST", _json("/v1/hospitals", lambda w: {
        "id": _fresh("h"), "organisation_id": "clinics", "name": "H",
        "signing_public_key": Signer.generate().public_key_b64, "flower_public_key": flower_key()}),
         frozenset({"operator"})),
    Case("list hospitals", "GET", _path("/v1/hospitals"), frozenset({"operator", "auditor"})),
    Case("mint", "POST", _json("/v1/ledger/mint", lambda w: {"account": "org:acme", "amount": 1}),
         frozenset({"operator"})),
    Case("submit study", "POST", _json("/v1/studies", lambda w: study_body(token_budget=10)),
         frozenset({"alice", "bob"})),
    Case("list studies", "GET", _path("/v1/studies"), RESEARCH_READERS),
    Case("get study", "GET", _path("/v1/studies/{id}"), RESEARCH_READERS, frozenset({"bob"})),
    Case("cancel study", "POST", _cancel, frozenset({"operator", "alice"}), frozenset({"bob"})),
    Case("results", "GET", _path("/v1/studies/{id}/results"), frozenset({"alice", "bob"}),
         frozenset({"bob"})),
    Case("model", "GET", _path("/v1/studies/{id}/model"), frozenset({"alice", "bob"}),
         frozenset({"bob"})),
    Case("privacy report", "GET", _path("/v1/studies/{id}/report"), RESEARCH_READERS, frozenset({"bob"})),
    Case("catalogs", "GET", _path("/v1/catalogs"), RESEARCH_READERS),
    Case("hospital catalog", "POST", _catalog, frozenset({"h-one"})),
    Case("hospital me", "GET", _path("/v1/hospital/me"), frozenset({"h-one"})),
    Case("hospital studies", "GET", _path("/v1/hospital/studies"), frozenset({"h-one"})),
    Case("hospital decision", "POST", _decision, frozenset({"h-one"})),
    Case("hospital entries", "POST", _receipt, frozenset({"h-one"})),
    Case("hospital reward claim", "POST", _claim, frozenset({"h-one"})),
    Case("witness checkpoint", "GET", _path("/v1/hospital/witness/checkpoint"), frozenset({"h-one"})),
    # h-one registered no witness key: authorized, then refused for that (422)
    Case("witness cosignature", "POST",
         _json("/v1/hospital/witness/cosignature", lambda w: {"size": 1, "cosignature": "x"}),
         frozenset({"h-one"}), allowed_status=422),
    Case("audit entries", "GET", _path("/v1/audit/entries"), ALL),
    Case("audit checkpoint", "GET", _path("/v1/audit/checkpoint"), ALL),
    Case("inclusion proof", "GET",
         lambda w: ("/v1/audit/proofs/inclusion", {"params": {"index": 0, "size": 1}}), ALL),
    Case("consistency proof", "GET", lambda w: ("/v1/audit/proofs/consistency",
                                                {"params": {"old_size": 1, "new_size": 2}}), ALL),
    Case("audit export", "GET", _path("/v1/audit/export"), ALL),
    Case("audit trust", "GET", _path("/v1/audit/trust"), ALL),
    Case("balances", "GET", _path("/v1/ledger/balances"), ALL),
]


class MatrixWorld(World):
    completed: str
    running: str
    _round: int
    _claims: int

    def next_round(self) -> int:
        self._round += 1
        return self._round

    def spare_key(self) -> str:
        return self.runtime.registry.issue_api_key(ApiKeyCreate(role="auditor"))[0].prefix


def _prepare(world: World) -> MatrixWorld:
    import threading

    world.__class__ = MatrixWorld
    mw: MatrixWorld = world  # type: ignore[assignment]
    world.runner.reward_accounts = {"h-one": {f"reward:m{i}": 1 for i in range(60)}}
    sid = world.submit("alice", min_hospitals=2, rounds=1)["id"]
    world.decide("h-one", sid)
    world.decide("h-two", sid)
    world.wait_runs()
    mw.completed = sid
    world.runner.pause = threading.Event()  # the next run stays in flight
    running = world.submit("alice", min_hospitals=1, rounds=1, token_budget=10)["id"]
    world.decide("h-one", running)
    mw.running = running
    mw._round = 0
    mw._claims = -1
    return mw


@pytest.fixture(scope="module")
def matrix_world(shared_world: World) -> MatrixWorld:
    return _prepare(shared_world)


def test_matrix_covers_every_endpoint(matrix_world: MatrixWorld) -> None:
    """Every route in the OpenAPI document has a row in the matrix (nothing left unchecked)."""
    import re

    document = matrix_world.client.get("/schema/openapi.json").json()
    served = {(method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
              for path, item in document["paths"].items() for method in item
              if path.startswith("/v1/")}
    covered = set()
    for case in CASES:
        path, _ = case.prepare(matrix_world)
        covered.add((case.method, path))
    normalized = {(m, re.sub(r"/(st-[0-9a-f]+|[0-9a-f]{12})(?=/|$)", "/{}", p)) for m, p in covered}
    assert served <= {(m, p.replace("/acme/", "/{}/")) for m, p in normalized}, \
        served - {(m, p.replace("/acme/", "/{}/")) for m, p in normalized}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matrix(matrix_world: MatrixWorld, case: Case, caller: str) -> None:
    world = matrix_world
    path, kwargs = case.prepare(world)
    log_before = world.runtime.audit_log.size()
    balances_before = world.runtime.registry.balances()
    response = world.as_(caller, case.method, path, **kwargs)
    if caller in ("anonymous", "h-four"):
        expected = 401
    elif caller in case.hidden_from:
        expected = 404
    elif caller in case.allowed:
        expected = case.allowed_status
    else:
        expected = 403
    if expected is None:
        assert response.status_code < 300, (case.name, caller, response.status_code, response.text)
        return
    assert response.status_code == expected, (case.name, caller, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    assert world.runtime.audit_log.size() == log_before, "a refused call wrote to the log"
    assert world.runtime.registry.balances() == balances_before


def test_balances_are_scoped_to_the_callers_account(matrix_world: MatrixWorld) -> None:
    world = matrix_world
    alice = world.as_("alice", "GET", "/v1/ledger/balances").json()["balances"]
    assert set(alice) == {"org:acme"}
    bob = world.as_("bob", "GET", "/v1/ledger/balances").json()["balances"]
    assert set(bob) == {"org:globex"}
    hospital = world.as_("h-one", "GET", "/v1/ledger/balances").json()["balances"]
    assert set(hospital) == {"hospital:h-one"}
    everyone = world.as_("auditor", "GET", "/v1/ledger/balances").json()["balances"]
    assert {"org:acme", "org:globex", "hospital:h-one"} <= set(everyone)
    # issue 19, finding 8: the system's totals are the operator's and the auditor's only
    for who in ("alice", "h-one"):
        body = world.as_(who, "GET", "/v1/ledger/balances").json()
        assert body["minted"] is None and body["escrow"] is None and body["unclaimed"] is None, body
    for who in ("operator", "auditor"):
        body = world.as_(who, "GET", "/v1/ledger/balances").json()
        assert body["minted"] >= 55_000 and body["escrow"] >= 0 and body["unclaimed"] >= 0


def test_researchers_list_only_their_organisations_studies(matrix_world: MatrixWorld) -> None:
    world = matrix_world
    bob_study = world.submit("bob", token_budget=5)["id"]
    alice_ids = {s["id"] for s in world.as_("alice", "GET", "/v1/studies",
                                            params={"limit": 200}).json()["items"]}
    bob_ids = {s["id"] for s in world.as_("bob", "GET", "/v1/studies",
                                          params={"limit": 200}).json()["items"]}
    assert bob_study in bob_ids and bob_study not in alice_ids
    assert world.completed in alice_ids and world.completed not in bob_ids
    bob_items = world.as_("bob", "GET", "/v1/studies").json()["items"]
    assert all(s["organisation_id"] == "globex" for s in bob_items)


def test_hospitals_see_requests_not_budgets(matrix_world: MatrixWorld) -> None:
    items = matrix_world.as_("h-two", "GET", "/v1/hospital/studies",
                             params={"status": "all"}).json()["items"]
    assert items and all("token_budget" not in item["spec"] for item in items)
    assert {item["organisation_region"] for item in items} <= {"DE", "FR"}

