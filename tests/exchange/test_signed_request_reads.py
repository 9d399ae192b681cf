"""A signed hospital request reads the hospital's registration once: the row its signature was
verified with is the route's `hospital` (it used to be read again, on a worker thread, for every
one of the polls, cosignatures and decisions the hospitals send; docs/benchmarks/scale.md, "The
coordinator's CPU per round")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from audit.signing import Signer
from exchange.coordinator.client import CoordinatorError, HospitalClient
from tests.exchange.witness_support import HOSPITALS, Served, app_config, populate, serve


@pytest.fixture
def hospitals() -> dict[str, Signer]:
    return {name: Signer.generate() for name in HOSPITALS}


@pytest.fixture
def served(sqlite_url: str, tmp_path: Path, hospitals: dict[str, Signer]) -> Iterator[Served]:
    running = serve(app_config(sqlite_url, tmp_path / "keys"), hospitals)
    try:
        running.keys = populate(running.runtime, hospitals,
                                {name: tmp_path / name / "witness.key" for name in hospitals})
        yield running
    finally:
        running.stop()


def test_a_signed_request_reads_the_hospital_s_registration_once(
        served: Served, hospitals: dict[str, Signer]) -> None:
    reads: list[str] = []
    engine = served.runtime.lifecycle.journal.read_engine

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM hospitals" in statement:
            reads.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with HospitalClient(served.url, hospitals["w-one"], "w-one") as client:
            me = client._http.get("/v1/hospital/me")
            assert me.status_code == 200 and me.json()["id"] == "w-one"
            assert len(reads) == 1, reads  # the signature's key look-up only (2 before)
            studies = client._http.get("/v1/hospital/studies")
            assert studies.status_code == 200
            assert len(reads) == 2, reads
        # another hospital's request gets its own registration, not the last one read
        with HospitalClient(served.url, hospitals["w-two"], "w-two") as other:
            assert other._http.get("/v1/hospital/me").json()["id"] == "w-two"
        # an unsigned request to a hospital route is refused as before
        with served.api() as api, pytest.raises(CoordinatorError) as refused:
            api.get("/v1/hospital/me")
        assert refused.value.status == 403
    finally:
        event.remove(engine, "before_cursor_execute", seen)
