"""The replay protection of signed hospital requests (`Registry.use_nonce_async`): every signed
request records its (key, nonce); a second use is refused. Recorded through the group commit:
nonces arriving together share one transaction (with 25 hospitals polling, one write
transaction and fsync per request was a fifth of the coordinator's CPU, docs/benchmarks/
scale.md), and each call returns only once its nonce is durable, so a replay stays refused after
a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from litestar.testing import TestClient
from sqlalchemy import event, func, select

from exchange.coordinator.app import AppConfig, build_runtime, create_app
from exchange.coordinator.models import Hospital, RequestNonce
from exchange.http_signing import new_nonce, sign_request
from tests.exchange.conftest import World, make_world
from tests.exchange.scripted_runner import ScriptedRunner


def _gather(world: World, uses: list[tuple[str, str]]) -> list[bool]:
    registry = world.runtime.lifecycle.registry

    async def together() -> list[bool]:
        return list(await asyncio.gather(*(registry.use_nonce_async(kid, n) for kid, n in uses)))

    return asyncio.run(together())


def test_nonces_arriving_together_share_one_commit(sqlite_world: World) -> None:
    """Ten signed requests at once: one COMMIT (one fsync) for their ten nonces, every hospital's
    last contact recorded; before, a write transaction each."""
    world = sqlite_world
    journal = world.runtime.lifecycle.journal
    kids = {name: signer.key_id for name, signer in world.hospitals.items() if name != "h-four"}
    commits: list[int] = []
    event.listen(journal.write_engine, "commit", lambda _connection: commits.append(1))
    uses = [(kids[name], new_nonce()) for name in ("h-one", "h-two", "h-three") for _ in range(3)]
    uses.append((kids["h-one"], uses[0][1]))  # the first one again, in the same group: a replay
    results = _gather(world, uses)
    assert results == [True] * 9 + [False]
    assert commits == [1]
    with journal.read() as session:
        recorded = session.execute(select(func.count()).select_from(RequestNonce)
                                   .where(RequestNonce.nonce.in_([n for _k, n in uses]))).scalar_one()
        contacts = session.execute(select(Hospital.id, Hospital.last_contact_at)).tuples().all()
    assert recorded == 9
    assert all(at is not None for name, at in contacts if name in kids)


def test_a_replayed_request_is_refused_also_after_a_restart(db_url: str, tmp_path: Path) -> None:
    """The nonce is durable before the request is served: the same signed request sent again,
    to the same coordinator or to one restarted on the same database, is refused."""
    worlds = make_world(db_url, tmp_path)
    world = next(worlds)
    request = world.client.build_request("GET", "/v1/hospital/me")
    sign_request(request, world.hospitals["h-one"], nonce=new_nonce())
    headers = dict(request.headers)
    try:
        assert world.client.send(request).status_code == 200
        again = world.client.send(world.client.build_request("GET", "/v1/hospital/me", headers=headers))
        assert again.status_code == 401 and "replay" in again.json()["detail"]
        assert _gather(world, [(world.hospitals["h-two"].key_id, "n" * 22)] * 2) in ([True, False],
                                                                                    [False, True])
    finally:
        worlds.close()  # the coordinator stops (its app shuts down, the group commits close)
    config = AppConfig(database_url=db_url, operator_key_file=tmp_path / "keys" / "operator.key",
                       log_key_file=tmp_path / "keys" / "log.key",
                       coordinator_key_file=tmp_path / "keys" / "coordinator.key", access_log=False)
    restarted = build_runtime(config, ScriptedRunner(hospital_keys={}))
    with TestClient(app=create_app(restarted), base_url="http://testserver.local") as client:
        replay = client.send(client.build_request("GET", "/v1/hospital/me", headers=headers))
        assert replay.status_code == 401 and "replay" in replay.json()["detail"]
        fresh = client.build_request("GET", "/v1/hospital/me")
        sign_request(fresh, world.hospitals["h-one"], nonce=new_nonce())
        assert client.send(fresh).status_code == 200
