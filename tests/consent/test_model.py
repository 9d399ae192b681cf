"""Contract model: validation errors name the field, canonical hashing, signing, versions, history."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from audit.signing import SignatureInvalidError, Signer, b64encode, canonical, sha256_hex
from consent import duo
from consent.evaluate import evaluate
from consent.history import ContractHistory, ContractRegistry, HistoryError
from consent.model import Contract, Provision, SignedContract, next_version, revoke, sign
from consent.request import StudyRequest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def base(**kw: object) -> Contract:
    data: dict[str, object] = {
        "contract_id": "c1",
        "pseudonym": "p1",
        "hospital": "h1",
        "version": 1,
        "issued": T0,
        "provision": Provision(type="permit", purposes=("GRU",)),
    }
    data.update(kw)
    return Contract.model_validate(data)


def error_fields(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.errors()]


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"purposes": ("DUO:9999999",)}, "purposes", "not a DUO term"),
        ({"purposes": ("NCU",)}, "purposes", "not a data use permission"),
        ({"modifiers": ("GRU",)}, "modifiers", "not a data use modifier"),
        ({"modifiers": ("CC",)}, "modifiers", "not supported"),
        ({"regions": ("XX",)}, "regions", "ISO 3166"),
        ({"data_categories": ("x-rays",)}, "data_categories", "not a data category"),
        ({"purposes": ("DS",), "diseases": ("Q99.99",)}, "diseases", "ICD-10"),
    ],
)
def test_field_errors_name_the_field(kwargs: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        Provision(type="permit", **kwargs)  # type: ignore[arg-type]
    assert error_fields(info.value)[0].startswith(field)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"purposes": ("DS",)}, "diseases: the DS purpose"),
        ({"diseases": ("C50",)}, "diseases: only meaningful with the DS purpose"),
        ({"modifiers": ("GS",)}, "regions: the GS"),
        ({"modifiers": ("IS",)}, "organisations: the IS"),
        ({"modifiers": ("TS",)}, "period: the TS"),
        ({"modifiers": ("MOR",)}, "moratorium_until"),
        ({"modifiers": ("NCU",), "commercial": True}, "commercial: a rule for commercial use"),
    ],
)
def test_cross_field_errors(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        Provision(type="permit", **kwargs)  # type: ignore[arg-type]


def test_deny_cannot_carry_modifiers() -> None:
    with pytest.raises(ValidationError, match="modifiers: DUO modifiers restrict a permission"):
        Provision(type="deny", modifiers=(duo.NCU,))


def test_contract_errors() -> None:
    with pytest.raises(ValidationError, match="supersedes: version 2 must name"):
        base(version=2)
    with pytest.raises(ValidationError, match="supersedes: version 1 supersedes nothing"):
        base(supersedes="0" * 64)
    with pytest.raises(ValidationError) as info:
        base(issued=datetime(2026, 1, 1))  # naive: refused
    assert error_fields(info.value) == ["issued"]
    with pytest.raises(ValidationError) as info:
        Contract.from_json(json.dumps({**base().to_json(), "colour": "blue"}))
    assert error_fields(info.value) == ["colour"]
    with pytest.raises(ValidationError) as info:
        base(max_epsilon=-1.0)
    assert error_fields(info.value) == ["max_epsilon"]


def test_hash_is_sha256_of_rfc8785_and_normalization_makes_equal_contracts_hash_equal() -> None:
    c = base()
    assert c.content_hash == sha256_hex(canonical(c.to_json()))
    a = base(provision=Provision(type="permit", purposes=("GRU", "HMB"), regions=("fr", "DE"), diseases=()))
    b = base(
        provision=Provision(
            type="permit", purposes=("DUO:0000006", "DUO:0000042", "GRU"), regions=("DE", "FR")
        )
    )
    assert a.content_hash == b.content_hash
    assert base(reward_account="acct-1").content_hash != c.content_hash
    # a different time zone for the same instant is the same contract
    cet = datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert base(issued=cet).content_hash == c.content_hash
    # round trip through JSON keeps the hash
    assert Contract.from_json(json.dumps(c.to_json())).content_hash == c.content_hash


def test_sign_and_verify() -> None:
    signer = Signer.generate()
    signed = sign(base(), signer)
    assert signed.contract.issuer_key == signer.key_id
    assert signed.verify(signer.public_key) == signed.contract
    roundtrip = SignedContract.model_validate(json.loads(json.dumps(signed.to_json())))
    assert roundtrip.verify().content_hash == signed.contract.content_hash
    tampered = signed.model_copy(
        update={"contract": base(issuer_key=signer.key_id, reward_account="acct-evil")}
    )
    with pytest.raises(SignatureInvalidError):
        tampered.verify()
    other = Signer.generate()
    with pytest.raises(ValueError, match="not the trusted issuer key"):
        signed.verify(other.public_key)
    forged = signed.model_copy(
        update={
            "public_key": other.public_key_b64,
            "signature": b64encode(other.sign(signed.contract.canonical_bytes)),
        }
    )
    with pytest.raises(ValueError, match="issuer_key"):
        forged.verify()


def test_versions_revocation_and_history() -> None:
    v1 = base()
    v2 = next_version(v1, Provision(type="permit", purposes=("HMB",)), T0 + timedelta(days=10))
    v3 = revoke(v2, T0 + timedelta(days=20))
    assert (v2.version, v2.supersedes) == (2, v1.content_hash)
    assert v3.supersedes == v2.content_hash and v3.permits_nothing() and not v2.permits_nothing()
    history = ContractHistory([v3, v1, v2])
    assert history.versions == (v1, v2, v3)
    assert history.in_force(T0 - timedelta(seconds=1)) is None
    assert history.in_force(T0) == v1
    assert history.in_force(T0 + timedelta(days=15)) == v2
    assert history.in_force(T0 + timedelta(days=400)) == v3
    with pytest.raises(HistoryError, match="supersedes"):
        ContractHistory([v1, v2.model_copy(update={"supersedes": "0" * 64})])
    with pytest.raises(HistoryError, match="version: expected 2"):
        ContractHistory([v1]).add(v3)
    with pytest.raises(ValueError, match="issued"):
        next_version(v1, v1.provision, T0 - timedelta(days=1))
    registry = ContractRegistry([v1, v2, v3, base(pseudonym="p2", contract_id="c2")])
    assert len(registry) == 2 and len(registry.by_hash) == 4
    assert registry.in_force(T0 + timedelta(days=15))["p1"] == v2
    assert registry.records_at(["p1", "p9"], "h1", T0) == [("p1", v1.content_hash), ("p9", "")]
    study = StudyRequest(purpose="HMB", organisation="o", region="DE", data_categories=("labs",))
    assert not evaluate(v3, study, T0 + timedelta(days=30)).permit


def test_request_errors() -> None:
    with pytest.raises(ValidationError, match="disease: a DS"):
        StudyRequest(purpose="DS", organisation="o", region="DE", data_categories=("labs",))
    with pytest.raises(ValidationError, match="only a DS"):
        StudyRequest(purpose="HMB", disease="C50", organisation="o", region="DE", data_categories=("labs",))
    with pytest.raises(ValidationError, match="cannot be a study purpose"):
        StudyRequest(purpose="NRES", organisation="o", region="DE", data_categories=("labs",))
    with pytest.raises(ValidationError) as info:
        StudyRequest(purpose="HMB", organisation="o", region="DE", data_categories=())
    assert error_fields(info.value) == ["data_categories"]


def test_model_copy_revalidates_and_rehashes() -> None:
    c = base()
    assert c.model_copy(update={"reward_account": "acct-2"}).content_hash != c.content_hash
    with pytest.raises(ValidationError):
        c.model_copy(update={"version": 0})
    with pytest.raises(ValidationError):
        Provision(type="permit").model_copy(update={"modifiers": ("GS",)})
