"""Key registration, revocation and rotation replayed from the log (docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from audit.entry import Entry, sign_entry
from audit.keyring import Keyring, KeyringError
from audit.signing import Signer, b64encode


class Log:
    """Entries appended through Keyring.check + apply, as the store and the verifier do."""

    def __init__(self) -> None:
        self.operator = Signer.generate()
        self.keyring = Keyring(self.operator.public_key)
        self.size = 0

    def add(self, entry: Entry) -> None:
        self.keyring.check(entry, self.size)
        self.keyring.apply(entry, self.size)
        self.size += 1

    def refused(self, entry: Entry, match: str) -> None:
        before = [(r.key_id, r.ended_at) for r in self.keyring.records()]
        with pytest.raises(KeyringError, match=match) as caught:
            self.keyring.check(entry, self.size)
        assert caught.value.index == self.size
        assert [(r.key_id, r.ended_at) for r in self.keyring.records()] == before

    def register(self, key: Signer, role: str = "hospital", owner: str = "hospital:a",
                 by: Signer | None = None) -> Entry:
        return sign_entry(by or self.operator, "key.register",
                          {"key_id": key.key_id, "public_key": key.public_key_b64, "role": role,
                           "owner": owner})


def note(signer: Signer, **payload: Any) -> Entry:
    return sign_entry(signer, "study.decision", {"study_id": "s-1", **payload})


def test_root_operator_is_registered_implicitly_and_others_need_registration() -> None:
    log = Log()
    hospital = Signer.generate()
    log.refused(note(hospital), f"key_id: {hospital.key_id} is not registered")
    log.add(log.register(hospital))
    log.add(note(hospital))
    record = log.keyring.get(hospital.key_id)
    assert record is not None and (record.role, record.owner, record.registered_at) == (
        "hospital", "hospital:a", 0)
    assert log.keyring.role(log.operator.key_id) == "operator"


def test_bad_signatures_are_refused() -> None:
    log = Log()
    hospital = Signer.generate()
    log.add(log.register(hospital))
    good = note(hospital)
    forged = replace(good, payload={"study_id": "s-2"})
    log.refused(forged, "signature: does not verify")
    log.refused(replace(good, signature=b64encode(b"\x00" * 64)), "signature: does not verify")
    log.refused(replace(good, signature="not base64!"), "signature: does not verify")


def test_only_operators_register_and_revoke() -> None:
    log = Log()
    hospital, other = Signer.generate(), Signer.generate()
    log.add(log.register(hospital))
    log.refused(log.register(other, by=hospital), "only an operator key may register")
    revoke = sign_entry(hospital, "key.revoke", {"key_id": hospital.key_id, "reason": "x"})
    log.refused(revoke, "only an operator key may revoke")
    second_operator = Signer.generate()
    log.add(log.register(second_operator, role="operator", owner="operator:two"))
    log.add(log.register(other, by=second_operator))


@pytest.mark.parametrize(("change", "match"), [
    ({"key_id": "0" * 32}, "is not the key id of payload.public_key"),
    ({"public_key": b64encode(b"short")}, "must be 32 bytes"),
    ({"public_key": "***"}, "not valid base64"),
    ({"role": "king"}, "payload.role: 'king' is not one of"),
    ({"owner": ""}, "payload.owner: must be a non-empty string"),
    ({"extra": "x"}, r"unknown field\(s\) \['extra'\]"),
    ({"role": None}, "payload.role: must be a non-empty string"),
])
def test_register_payload_errors_name_the_field(change: dict[str, Any], match: str) -> None:
    log = Log()
    key = Signer.generate()
    payload = {"key_id": key.key_id, "public_key": key.public_key_b64, "role": "hospital",
               "owner": "hospital:a", **change}
    log.refused(sign_entry(log.operator, "key.register", payload), match)


def test_missing_fields_and_unknown_key_kinds() -> None:
    log = Log()
    log.refused(sign_entry(log.operator, "key.register", {"key_id": "x"}), "missing field")
    log.refused(sign_entry(log.operator, "key.delete", {"key_id": "x"}), "unknown key kind")


def test_a_key_id_is_registered_once() -> None:
    log = Log()
    key = Signer.generate()
    log.add(log.register(key))
    log.refused(log.register(key, owner="hospital:b"), "already registered")
    log.refused(log.register(log.operator, role="operator"), "already registered")


def test_revoked_keys_sign_nothing_after_and_cannot_be_revived() -> None:
    log = Log()
    key = Signer.generate()
    log.add(log.register(key))
    log.add(note(key))
    log.add(sign_entry(log.operator, "key.revoke", {"key_id": key.key_id, "reason": "stolen"}))
    log.refused(note(key), r"was revoked \(stolen\) at entry 2 and may sign nothing after it")
    log.refused(sign_entry(log.operator, "key.revoke", {"key_id": key.key_id, "reason": "again"}),
                "already revoked")
    log.refused(log.register(key), "already registered")
    log.refused(sign_entry(log.operator, "key.revoke", {"key_id": "f" * 32, "reason": "x"}),
                "is not registered")


def test_rotation_is_signed_by_the_old_key_and_hands_over_role_and_owner() -> None:
    log = Log()
    old, new, third = Signer.generate(), Signer.generate(), Signer.generate()
    log.add(log.register(old, owner="hospital:z"))
    rotate = {"old_key_id": old.key_id, "new_key_id": new.key_id,
              "new_public_key": new.public_key_b64}
    log.refused(sign_entry(log.operator, "key.rotate", rotate), "a rotation is signed by the old key")
    log.refused(sign_entry(old, "key.rotate", {**rotate, "new_key_id": third.key_id}),
                "is not the key id of payload.new_public_key")
    log.add(sign_entry(old, "key.rotate", rotate))
    assert (log.keyring.role(new.key_id), log.keyring.owner(new.key_id)) == ("hospital", "hospital:z")
    log.refused(note(old), f"was rotated to {new.key_id} at entry 1")
    log.add(note(new))
    log.refused(sign_entry(new, "key.rotate", {"old_key_id": new.key_id, "new_key_id": old.key_id,
                                               "new_public_key": old.public_key_b64}),
                "already registered")


def test_apply_validates_even_without_check() -> None:
    log = Log()
    key = Signer.generate()
    bad = sign_entry(log.operator, "key.register", {"key_id": key.key_id, "public_key": "x",
                                                    "role": "hospital", "owner": "h"})
    with pytest.raises(KeyringError):
        log.keyring.apply(bad, 0)
    assert log.keyring.get(key.key_id) is None


# -- witness keys on key.register (payload.witness_vkey) ----------------------------------------

def with_witness(entry_log: Log, key: Signer, vkey: str, role: str = "hospital",
                 owner: str = "hospital:a") -> Entry:
    return sign_entry(entry_log.operator, "key.register",
                      {"key_id": key.key_id, "public_key": key.public_key_b64, "role": role,
                       "owner": owner, "witness_vkey": vkey})


def test_a_hospital_registers_its_witness_key_which_follows_rotation_and_ends_with_revocation(
) -> None:
    from audit.cosignature import CosignatureV1Signer

    log = Log()
    key_a, key_b = Signer.generate(), Signer.generate()
    witness_a = CosignatureV1Signer("a.witness.example", Signer.generate()).vkey
    witness_b = CosignatureV1Signer("b.witness.example", Signer.generate()).vkey
    log.add(with_witness(log, key_a, str(witness_a)))
    log.add(with_witness(log, key_b, str(witness_b), owner="hospital:b"))
    assert log.keyring.witnesses() == {"hospital:a": witness_a, "hospital:b": witness_b}
    rotated = Signer.generate()
    log.add(sign_entry(key_a, "key.rotate", {"old_key_id": key_a.key_id,
                                             "new_key_id": rotated.key_id,
                                             "new_public_key": rotated.public_key_b64}))
    assert log.keyring.witnesses()["hospital:a"] == witness_a
    log.add(sign_entry(log.operator, "key.revoke", {"key_id": key_b.key_id, "reason": "left"}))
    assert set(log.keyring.witnesses()) == {"hospital:a"}
    # Once hospital b's registration ended, its witness key may be registered again.
    log.add(with_witness(log, Signer.generate(), str(witness_b), owner="hospital:b"))
    assert set(log.keyring.witnesses()) == {"hospital:a", "hospital:b"}


def test_witness_keys_that_are_malformed_misplaced_or_taken_are_refused() -> None:
    from audit.cosignature import CosignatureV1Signer
    from audit.note import Vkey

    log = Log()
    taken = CosignatureV1Signer("a.witness.example", Signer.generate())
    log.add(with_witness(log, Signer.generate(), str(taken.vkey)))
    fresh = CosignatureV1Signer("c.witness.example", Signer.generate()).vkey
    plain = Vkey("c.witness.example", 0x01, Signer.generate().public_key)
    same_key = CosignatureV1Signer("other.name", taken.signer).vkey
    same_name = CosignatureV1Signer("a.witness.example", Signer.generate()).vkey
    cases = [
        (with_witness(log, Signer.generate(), "garbage"), "payload.witness_vkey: 'garbage' is not"),
        (with_witness(log, Signer.generate(), str(plain)), "must be a cosignature/v1 key"),
        (with_witness(log, Signer.generate(), str(fresh), role="researcher"),
         "only roles \\['auditor', 'hospital'\\] may register a witness key"),
        (with_witness(log, Signer.generate(), str(same_key), owner="hospital:c"),
         "conflicts with the witness a.witness.example of hospital:a"),
        (with_witness(log, Signer.generate(), str(same_name), owner="hospital:c"),
         "names and keys are unique among active witnesses"),
    ]
    for entry, reason in cases:
        log.refused(entry, reason)
    bad_type = sign_entry(log.operator, "key.register",
                          {"key_id": (k := Signer.generate()).key_id, "public_key": k.public_key_b64,
                           "role": "hospital", "owner": "hospital:d", "witness_vkey": 7})
    log.refused(bad_type, "must be a vkey string")
