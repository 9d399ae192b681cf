"""trust.json: version 2 (vkeys, witnesses, quorum), version 1 still read, every refusal named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from audit.cosignature import CosignatureV1Signer
from audit.signing import Signer, b64encode
from audit.trust import ExportError, Trust, default_quorum, read_trust

ORIGIN = "exchange.example/log"


def policy(witnesses: int, quorum: int | None = None) -> Trust:
    keys = [CosignatureV1Signer(f"h{i}.witness.example", Signer.generate()).vkey
            for i in range(witnesses)]
    return Trust(ORIGIN, Signer.generate().public_key, Signer.generate().public_key,
                 tuple(keys), quorum)


def test_default_quorum_is_a_majority_and_at_least_two_from_two_witnesses() -> None:
    assert [default_quorum(n) for n in range(7)] == [0, 1, 2, 2, 3, 3, 4]
    assert policy(3).witness_quorum() == 2
    assert policy(3, quorum=3).witness_quorum() == 3
    assert policy(3).witness_quorum(override=1) == 1
    assert policy(3).witness_quorum(override=0) == 0


def test_version_2_round_trips_through_json(tmp_path: Path) -> None:
    trust = policy(3, quorum=2)
    written = trust.to_json()
    assert written["version"] == 2 and written["log_key"].startswith(f"{ORIGIN}+")
    assert written["operator_key"].startswith(f"{ORIGIN}/operator+")
    assert all(w.split("+")[2].startswith("B") for w in written["witnesses"])  # type 0x04
    path = tmp_path / "trust.json"
    path.write_text(json.dumps(written))
    assert read_trust(path) == trust
    assert "quorum" not in policy(2).to_json()  # the default is not written down


def test_version_1_is_read_and_a_quorum_asked_of_it_is_explained(tmp_path: Path) -> None:
    operator, log = Signer.generate(), Signer.generate()
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"version": 1, "origin": ORIGIN,
                                "operator_public_key": b64encode(operator.public_key),
                                "log_public_key": b64encode(log.public_key)}))
    trust = read_trust(path)
    assert trust.anchors() == (ORIGIN, operator.public_key, log.public_key)
    assert trust.witnesses == () and trust.witness_quorum() == 0
    with pytest.raises(ExportError, match=r"pins no witnesses \(a version-1 trust.json, from "
                                          r"before witnesses\).*--witness-quorum 0"):
        trust.witness_quorum(override=2)
    with pytest.raises(ExportError, match="only 3 witness"):
        policy(3).witness_quorum(override=4)


def mutated(**changes: Any) -> dict[str, Any]:
    obj = policy(2).to_json()
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not None}


@pytest.mark.parametrize(("obj", "message"), [
    ([], "not a JSON object"),
    ({"version": 3}, "unsupported 3"),
    (mutated(log_key=None), r"missing field\(s\) \['log_key'\]"),
    (mutated(extra=1), r"unknown field\(s\) \['extra'\]"),
    (mutated(origin="has space"), "origin"),
    (mutated(log_key="nonsense"), "trust.log_key: 'nonsense' is not"),
    (mutated(witnesses="x"), "must be a list"),
    (mutated(witnesses=["w+00000000+AAAA"]), r"trust.witnesses\[0\]"),
    (mutated(quorum=3), "not between 1 and the 2 witness"),
    (mutated(quorum=0), "at least 1 when witnesses are listed"),
    (mutated(quorum="2"), "must be an integer"),
    (mutated(quorum=True), "must be an integer"),
])
def test_malformed_trust_files_name_the_field(obj: Any, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        Trust.from_json(obj)


def test_witness_list_must_hold_cosignature_keys_with_distinct_names() -> None:
    trust = policy(2)
    obj = trust.to_json()
    plain = f"{ORIGIN}+" + obj["log_key"].split("+", 1)[1]
    with pytest.raises(ExportError, match="type 0x01; a witness key must be a cosignature/v1"):
        Trust.from_json({**obj, "witnesses": [plain]})
    with pytest.raises(ExportError, match="appear more than once"):
        Trust.from_json({**obj, "witnesses": [obj["witnesses"][0]] * 2})
    with pytest.raises(ExportError, match="type 0x04, expected 0x01"):
        Trust.from_json({**obj, "log_key": obj["witnesses"][0]})
