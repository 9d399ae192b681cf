"""Whether an entry may join the log: its form and signature (checked before any lock is
taken), then, at the index it would get, its signer and its uniqueness (under the lock).

The rules are the verifier's (audit.verify, audit.keyring), so the store never acknowledges an
entry an auditor then rejects.
"""

from __future__ import annotations

import binascii
import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit import merkle
from audit.entry import Entry, MalformedEntryError
from audit.keyring import Keyring, KeyringError
from audit.signing import canonical, signed_in_this_process
from audit.store.errors import DuplicateEntryError, EntryRefusedError
from audit.verify import decode_signature, envelope_from_json, signing_input_from_line

MAX_ENTRY_BYTES = 1 << 20  # an entry is a statement with commitments, never bulk data
_KIND_CHARS = 128  # the column sizes of audit_entries.kind and .key_id
_KEY_ID_CHARS = 64


@dataclass(frozen=True)
class Prepared:
    """An entry checked for form: its leaf bytes, hash, and the key its signature verified with."""

    entry: Entry
    leaf: bytes
    leaf_hash: bytes
    verified_with: bytes | None  # the public key the signature already verified against


@functools.lru_cache(maxsize=4096)
def verify_key(public_key: bytes) -> VerifyKey:
    return VerifyKey(public_key)


def prepare(position: int, entry: Entry | Mapping[str, Any], known_keys: Keyring) -> Prepared:
    """Check `entry` (at `position` of its append call) for form and encode it once.

    The signature is verified here if `known_keys` (a committed key state, never changed in
    place) knows its signer; `check_entries` verifies the others, and checks for all that the
    signer may sign at the entry's index. Raises EntryRefusedError.
    """
    try:
        if isinstance(entry, Entry):
            # Re-check so that an Entry built by hand gets the same form checks as JSON
            # (the verifier's envelope rules: Entry.from_json's, with a faster time check).
            parsed = envelope_from_json(entry.to_json())
        elif isinstance(entry, Mapping):
            parsed = envelope_from_json(dict(entry))
        else:
            raise MalformedEntryError(f"entry: expected audit.entry.Entry or a JSON object, "
                                      f"got {type(entry).__name__}")
        # An Entry that knows its leaf (signed in this process: audit.entry.sign_entry, or
        # read from a log) is not encoded a second time; `_leaf` cannot outlive a change of
        # any field (it is not carried by dataclasses.replace).
        known = entry._leaf if isinstance(entry, Entry) else b""
        leaf = known or canonical(parsed.to_json())
        # Refused here, one entry at a time, rather than by the database for a whole group.
        for name, limit in (("kind", _KIND_CHARS), ("key_id", _KEY_ID_CHARS)):
            value = getattr(parsed, name)
            if len(value) > limit:
                raise MalformedEntryError(f"{name}: longer than {limit} characters")
            if "\x00" in value:  # PostgreSQL text cannot hold it: refuse it on both
                raise MalformedEntryError(f"{name}: contains a NUL character")
        if len(leaf) > MAX_ENTRY_BYTES:
            raise MalformedEntryError(f"entry: {len(leaf)} bytes encoded, more than the "
                                      f"{MAX_ENTRY_BYTES} a log entry may have")
        # The verifier's own rule (canonical base64, 64 bytes), so the store never
        # acknowledges an entry an auditor then rejects.
        signature = decode_signature(parsed.signature)
    except MalformedEntryError as exc:
        raise EntryRefusedError(position, None, str(exc)) from exc
    except (TypeError, ValueError, RecursionError) as exc:  # out-of-range numbers, nesting
        raise EntryRefusedError(position, None, f"payload: cannot be canonically encoded "
                                                f"({exc})") from exc
    verified_with: bytes | None = None
    record = known_keys.get(parsed.key_id)
    if record is not None:
        # The signed bytes are cut out of the leaf (no second canonical encoding); a key id
        # names one public key forever (it is its hash), so this check stays valid even if
        # the key is revoked before the entry's index is known (check_entries checks that).
        # An exact (key, bytes, signature) triple a Signer of this process just produced
        # verifies by construction (audit.signing._SignatureMemo): not verified again.
        signed = signing_input_from_line(leaf, parsed)
        if not signed_in_this_process(record.public_key, signed, signature):
            try:
                verify_key(record.public_key).verify(signed, signature)
            except (BadSignatureError, binascii.Error, ValueError) as exc:
                raise EntryRefusedError(position, None, f"signature: does not verify with "
                                                        f"key {parsed.key_id}") from exc
        verified_with = record.public_key
    return Prepared(parsed, leaf, merkle.leaf_hash(leaf), verified_with)


def check_unique(entries: Sequence[Prepared], start: int, seen: Mapping[bytes, int]) -> None:
    """Refuse an entry that is byte for byte one already in the log (`seen`: leaf hash ->
    index) or earlier in the same call."""
    first: dict[bytes, int] = {}
    for position, item in enumerate(entries):
        earlier = seen.get(item.leaf_hash)
        if earlier is None and item.leaf_hash in first:
            earlier = start + first[item.leaf_hash]
        if earlier is not None:
            raise DuplicateEntryError(position, start + position,
                                      f"entry: identical to log entry {earlier}; a signed entry "
                                      f"may appear once (the verifier rejects replays)")
        first[item.leaf_hash] = position


def check_entries(keyring: Keyring, entries: Sequence[Prepared], start: int) -> Keyring:
    """Check every entry at indexes start, start+1, ...; return the key state after them.

    Raises EntryRefusedError for the first refused entry; `keyring` is never changed (a call
    with key entries works on a copy, so a refusal leaves nothing behind).
    """
    has_keys = any(p.entry.kind.startswith("key.") for p in entries)
    state = copy.deepcopy(keyring) if has_keys else keyring
    for position, item in enumerate(entries):
        index = start + position
        try:
            record = state.signer_record(item.entry, index)
            state.check(item.entry, index, verify_signature=item.verified_with != record.public_key)
            if has_keys:
                state.apply(item.entry, index)
        except KeyringError as exc:
            raise EntryRefusedError(position, index, exc.reason) from exc
    return state
