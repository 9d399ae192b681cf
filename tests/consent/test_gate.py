"""Gating on a realistic synthetic mix; input forms; refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from audit.signing import Signer
from consent.files import ContractFileError, read_signed_jsonl, write_signed_jsonl
from consent.gate import RecordColumns, commitment, gate, gate_naive
from consent.history import ContractRegistry
from consent.request import StudyRequest
from consent.synthetic import make_contracts, make_signed_contracts

SIGNER = Signer.from_seed(bytes(32))
AT = datetime(2026, 9, 1, tzinfo=UTC)


def test_synthetic_mix_is_deterministic_signed_and_varied() -> None:
    pseudonyms = [f"psn-{i:04d}" for i in range(400)]
    a = make_contracts(pseudonyms, "hospital-a", SIGNER, seed=7)
    b = make_contracts(pseudonyms, "hospital-a", SIGNER, seed=7)
    assert [c.content_hash for c in a] == [c.content_hash for c in b]
    assert [c.content_hash for c in a] != [
        c.content_hash for c in make_contracts(pseudonyms, "hospital-a", SIGNER, 8)
    ]
    assert all(c.issuer_key == SIGNER.key_id for c in a)
    for signed in make_signed_contracts(pseudonyms[:20], "hospital-a", SIGNER, seed=7):
        signed.verify(SIGNER.public_key)
    revocations = [c for c in a if c.version == 2]
    assert 5 <= len(revocations) <= 40 and all(c.permits_nothing() for c in revocations)
    assert sum(c.reward_account is not None for c in a if c.version == 1) > 100
    assert sum(c.max_epsilon is not None for c in a if c.version == 1) > 40


def test_gate_on_synthetic_mix_counts_every_reason() -> None:
    pseudonyms = [f"psn-{i:04d}" for i in range(600)]
    registry = ContractRegistry(make_contracts(pseudonyms, "hospital-a", SIGNER, seed=3))
    records = registry.records_at(pseudonyms, "hospital-a", AT)
    request = StudyRequest(
        purpose="DS",
        disease="C50.9",
        organisation="uni-b",
        region="DE",
        data_categories=("labs", "diagnoses"),
        ethics_approval=True,
        epsilon=2.0,
    )
    first_ok = int(gate(records, registry.by_hash, request, AT).eligible.argmax())
    # a record pointing at someone else's (permitting) contract, and one at no contract
    records += [("psn-other", records[first_ok][1]), ("psn-ghost", "e" * 64)]
    result = gate(records, registry.by_hash, request, AT)
    naive = gate_naive(records, registry.by_hash, request, AT)
    assert result.commitment == naive.commitment
    assert result.excluded_by_reason == naive.excluded_by_reason
    assert {"denied", "no-permit", "privacy-cap", "no-contract", "pseudonym-mismatch"} <= set(
        result.excluded_by_reason
    )
    assert result.excluded_by_reason["no-contract"] == 1
    assert result.excluded_by_reason["pseudonym-mismatch"] == 1
    assert 0 < result.records_used < len(records)
    assert result.reward_accounts == naive.reward_accounts
    assert 0 < len(result.reward_accounts) < len(result.eligible_pseudonyms)
    assert set(result.reward_accounts) <= set(result.eligible_pseudonyms)
    assert result.commitment == commitment(
        (p, h) for (p, h), ok in zip(records, result.eligible, strict=True) if ok
    )
    # the revocations in force make fewer records eligible later
    later = datetime(2027, 6, 1, tzinfo=UTC)
    later_result = gate(
        registry.records_at(pseudonyms, "hospital-a", later), registry.by_hash, request, later
    )
    assert later_result.records_used < result.records_used
    # Arrow columns give the same answer
    columns = RecordColumns(pa.array([p for p, _ in records]), pa.chunked_array([[h for _, h in records]]))
    assert gate(columns, registry.by_hash, request, AT).commitment == result.commitment


def test_gate_refuses_a_mapping_under_the_wrong_hash() -> None:
    [contract] = make_contracts(["p1"], "h", SIGNER, seed=1, revoke_fraction=0.0)
    request = StudyRequest(purpose="HMB", organisation="o", region="DE", data_categories=("labs",))
    with pytest.raises(ValueError, match="content hash"):
        gate([("p1", "a" * 64)], {"a" * 64: contract}, request, AT)
    with pytest.raises(ValueError, match="differ in length"):
        gate(
            RecordColumns(["p1", "p2"], [contract.content_hash]),
            {contract.content_hash: contract},
            request,
            AT,
        )
    with pytest.raises(ValueError, match="records: each record must be a"):
        gate([("p1",)], {}, request, AT)  # type: ignore[list-item]
    # pairs are checked without Arrow (the Flower process never imports it), as Arrow checked them
    with pytest.raises(ValueError, match="records: each record must be a"):
        gate([("p1", 7)], {}, request, AT)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="records: each record must be a"):
        gate(["p1"], {}, request, AT)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"records: a record is missing \(null\)"):
        gate([None], {}, request, AT)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="a pseudonym or contract hash is missing"):
        gate([(None, "a")], {}, request, AT)  # type: ignore[list-item]
    as_list = [["p1", contract.content_hash], ("p2", contract.content_hash)]
    result = gate(as_list, {contract.content_hash: contract}, request, AT)  # type: ignore[arg-type]
    assert result.excluded_by_reason == {"pseudonym-mismatch": 1}
    assert result.eligible.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"records\.pseudonyms: must be strings"):
        gate(RecordColumns([1], ["a"]), {}, request, AT)
    # a tuple of two pairs is two records, never two columns
    pairs = (("p1", contract.content_hash), ("p1", contract.content_hash))
    assert gate(pairs, {contract.content_hash: contract}, request, AT).records_used == 2


def test_gate_empty() -> None:
    request = StudyRequest(purpose="HMB", organisation="o", region="DE", data_categories=("labs",))
    result = gate([], {}, request, AT)
    assert (
        result.records_used == 0 and result.excluded_by_reason == {} and result.commitment == commitment([])
    )


def test_signed_jsonl_round_trip(tmp_path: Path) -> None:
    signed = make_signed_contracts([f"p{i}" for i in range(30)], "h", SIGNER, seed=2)
    path = tmp_path / "contracts.jsonl"
    assert write_signed_jsonl(path, signed) == len(signed)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [c.content_hash for c in read_signed_jsonl(path, [SIGNER.public_key])] == [
        s.contract.content_hash for s in signed
    ]
    with pytest.raises(FileExistsError):
        write_signed_jsonl(path, signed)
    with pytest.raises(ContractFileError, match="line 1: public_key: not a trusted issuer key"):
        read_signed_jsonl(path, [Signer.generate().public_key])
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"version":1', '"version":7')
    path.chmod(0o644)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractFileError, match="line 4"):
        read_signed_jsonl(path)
