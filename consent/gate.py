"""Gating a record set: evaluate each distinct contract once, then join the decisions to the records.

A hospital's records point at contracts by content hash, and many records share a contract, so
the cost is (distinct contracts x one evaluation) + (records x a few vectorized array operations,
done in Arrow/NumPy), not records x evaluation.

The commitment (what a contribution receipt carries and an auditor recomputes) is defined as

    SHA-256( b"consent-gate/1\\n" || line_1 || line_2 || ... )

where each line is `pseudonym + "\\t" + contract_hash + "\\n"` in UTF-8, over the *distinct*
(pseudonym, contract hash) pairs of the eligible records, sorted by their line bytes (which, as
pseudonyms contain no control characters, is the lexicographic order of the pairs). Recomputing
it needs only the eligible pairs: `commitment(pairs)` below, or `LC_ALL=C sort -u | sha256sum`
after the prefix line.

Unkeyed, that digest is a deterministic function of low-entropy inputs: given one round's pairs,
the pairs revoked before a later round can be brute-forced from the later commitment, and the
same cohort gives the same value in every study. So a hospital KEYS it (hiding and unlinkable):

    key        = HMAC-SHA256( secret, b"consent-gate-key/1\x00" || study_id || b"\x00" || round )
    commitment = HMAC-SHA256( key, b"consent-gate/2\n" || line_1 || line_2 || ... )

`secret` is the hospital's own (derived from its signing key seed by `hospital_secret`, never
sent anywhere). The hospital discloses one study-round `key` only to an auditor it authorises
(`exchange node gate-key`); with the key and the pairs the hospital shows, the auditor recomputes
`commitment(pairs, key)` and compares it with the receipt. Without the key, commitments of
different rounds or studies cannot be linked and no guess of the pairs can be checked.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from consent.evaluate import Decision, evaluate
from consent.model import Contract
from consent.request import StudyRequest

if TYPE_CHECKING:  # Arrow is imported where columns are gated, not with this module
    import pyarrow as pa

COMMITMENT_PREFIX = b"consent-gate/1\n"
KEYED_PREFIX = b"consent-gate/2\n"
KEY_BYTES = 32
NO_CONTRACT = "no-contract"
PSEUDONYM_MISMATCH = "pseudonym-mismatch"


@dataclass(frozen=True)
class GateResult:
    """Eligible records and why the others were excluded.

    `eligible` is a boolean mask aligned with the input records (which rows to train on);
    `eligible_pseudonyms` the distinct pseudonyms of the eligible records, sorted;
    `excluded_by_reason` counts excluded records by `Decision.exclusion` key (plus `no-contract`
    for a hash with no contract and `pseudonym-mismatch` for a record whose contract is about
    another pseudonym); `commitment` as in the module docstring; `decisions` the one decision
    made per distinct contract hash.
    """

    eligible: npt.NDArray[np.bool_]
    eligible_pseudonyms: list[str]
    excluded_by_reason: dict[str, int]
    commitment: str
    records_used: int
    decisions: dict[str, Decision] = field(repr=False)
    #: eligible pseudonym -> the reward account its contract names (pseudonyms naming none are absent)
    reward_accounts: dict[str, str] = field(default_factory=dict)
    #: eligible pseudonym -> its contract's `max_epsilon`, the patient's LIFETIME privacy cap at
    #: this hospital (pseudonyms whose contract names none are absent)
    privacy_caps: dict[str, float] = field(default_factory=dict)


def hospital_secret(seed: bytes) -> bytes:
    """The hospital's commitment secret, derived from its signing key seed (domain-separated, so
    it reveals nothing about the key and needs no second secret to keep)."""
    return hmac.new(seed, b"consent-gate-secret/1", hashlib.sha256).digest()


def round_key(secret: bytes, study_id: str, round_number: int) -> bytes:
    """The key of one study round's commitment: what the hospital shows an authorised auditor."""
    message = b"consent-gate-key/1\x00" + study_id.encode() + b"\x00" + str(int(round_number)).encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def _digest(key: bytes | None) -> Any:
    if key is None:
        return hashlib.sha256(COMMITMENT_PREFIX)
    if len(key) != KEY_BYTES:
        raise ValueError(f"key: must be {KEY_BYTES} bytes, got {len(key)}")
    return hmac.new(key, KEYED_PREFIX, hashlib.sha256)


def commitment(pairs: Iterable[tuple[str, str]], key: bytes | None = None) -> str:
    """Reference implementation of the commitment over (pseudonym, contract hash) pairs; keyed
    (HMAC) when `key` is given, which is how a hospital always commits."""
    lines = sorted({f"{p}\t{h}\n".encode() for p, h in pairs})
    digest = _digest(key)
    for line in lines:
        digest.update(line)
    return str(digest.hexdigest())


Column: TypeAlias = "Sequence[str] | pa.Array | pa.ChunkedArray"


@dataclass(frozen=True)
class RecordColumns:
    """Records as two aligned columns (the fast path: no per-record Python objects).

    A separate type, so that a short tuple of pairs can never be mistaken for two columns.
    Gated with Arrow (pyarrow imported then); pairs are gated with NumPy and Python alone.
    """

    pseudonyms: Column
    contract_hashes: Column


#: How a record set is joined to its contracts' decisions (`_encode_columns`, `_encode_pairs`):
#: each record's index into the distinct contract hashes (first-seen order), those hashes, and a
#: function that, given each distinct hash's owner (the contract's pseudonym, None for no
#: contract), says which records carry their contract's own pseudonym.
_Encoded: TypeAlias = tuple[
    npt.NDArray[np.int64], list[str], Callable[[list[str | None]], npt.NDArray[np.bool_]]
]


def _column(values: Column, name: str) -> pa.Array:
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    try:
        array = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        return array.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"records.{name}: must be strings: {exc}") from exc


def _encode_columns(records: RecordColumns) -> _Encoded:
    """Arrow: the hash column dictionary-encoded in C++ (the node's path for a million records)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pseudonyms = _column(records.pseudonyms, "pseudonyms")
    hashes = _column(records.contract_hashes, "contract_hashes")
    if len(pseudonyms) != len(hashes):
        raise ValueError("records: pseudonym and contract-hash columns differ in length")
    if pseudonyms.null_count or hashes.null_count:
        raise ValueError("records: a pseudonym or contract hash is missing (null)")
    h_enc = pc.dictionary_encode(hashes)
    h_idx = h_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    def same_owner(owner: list[str | None]) -> npt.NDArray[np.bool_]:
        record_owner = pa.array(owner, pa.string()).take(h_enc.indices)
        same: npt.NDArray[np.bool_] = pc.fill_null(pc.equal(pseudonyms, record_owner), False).to_numpy(
            zero_copy_only=False)
        return same

    return h_idx, h_enc.dictionary.to_pylist(), same_owner


def _checked_pair(i: int, pair: object) -> tuple[str, str]:
    """Record `i` as a (pseudonym, contract hash) pair of strings, or the reason it is not one."""
    if pair is None:
        raise ValueError("records: a record is missing (null)")
    if not isinstance(pair, tuple | list) or len(pair) != 2:
        raise ValueError(f"records: each record must be a (pseudonym, contract hash) pair of strings: "
                         f"record {i} is {type(pair).__name__} of length "
                         f"{len(pair) if isinstance(pair, tuple | list) else '-'}")
    pseudonym, key = pair
    if pseudonym is None or key is None:
        raise ValueError("records: a pseudonym or contract hash is missing (null)")
    if not isinstance(pseudonym, str) or not isinstance(key, str):
        raise ValueError(f"records: each record must be a (pseudonym, contract hash) pair of strings: "
                         f"record {i} holds {type(pseudonym).__name__}, {type(key).__name__}")
    return str(pseudonym), str(key)


def _encode_pairs(records: Iterable[tuple[str, str]]) -> _Encoded:
    """NumPy and Python: the pairs are Python objects already, so one pass over them costs what
    converting them to Arrow would, and a process gating a hospital's own records (the Flower
    process) never imports pyarrow (docs/benchmarks/scale.md, "Arrow out of the Flower process")."""
    pairs = records if isinstance(records, list) else list(records)
    index: dict[str, int] = {}
    pseudonyms: list[str] = []
    codes: list[int] = []
    for i, pair in enumerate(pairs):
        if type(pair) is tuple and len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is str:
            pseudonym, key = pair  # the common case, checked in one line
        else:
            pseudonym, key = _checked_pair(i, pair)
        pseudonyms.append(pseudonym)
        codes.append(index.setdefault(key, len(index)))
    h_idx = np.array(codes, dtype=np.int64)

    def same_owner(owner: list[str | None]) -> npt.NDArray[np.bool_]:
        owners = np.empty(len(owner), dtype=object)
        owners[:] = owner
        records = np.empty(len(pseudonyms), dtype=object)
        records[:] = pseudonyms
        same: npt.NDArray[np.bool_] = (owners[h_idx] == records).astype(np.bool_)  # None: False
        return same

    return h_idx, list(index), same_owner


def gate(
    records: Iterable[tuple[str, str]] | RecordColumns,
    contracts: Mapping[str, Contract],
    request: StudyRequest,
    instant: datetime,
    commit_key: bytes | None = None,
) -> GateResult:
    """Gate records `(pseudonym, contract_hash)` for `request` at `instant`; the commitment is
    keyed with `commit_key` (`round_key`) when given.

    `records` is an iterable of pairs, or `RecordColumns` (Python sequences or Arrow arrays: the
    fast path for a node that reads its records with Arrow). `contracts` maps content hash to
    contract; a mapping whose key is not the contract's own hash is refused.

    The hash column is dictionary-encoded (Arrow, C++, for `RecordColumns`; one Python pass for
    pairs), each distinct contract is evaluated once, and the decisions are joined back with
    NumPy (and Arrow for columns) gathers; the commitment is built from the distinct
    (pseudonym, contract) pairs only, so its cost follows the number of patients, not of
    records. Both encodings give the same result (`tests/consent/test_properties.py`)."""
    h_idx, distinct, same_owner = (_encode_columns(records) if isinstance(records, RecordColumns)
                                   else _encode_pairs(records))

    # one evaluation per distinct contract
    reason_keys: list[str] = []
    code_of = np.full(len(distinct), -1, dtype=np.int64)  # -1: eligible, else index into reason_keys
    owner: list[str | None] = []
    decisions: dict[str, Decision] = {}
    for i, key in enumerate(distinct):
        contract = contracts.get(key)
        if contract is None:
            exclusion: str | None = NO_CONTRACT
            owner.append(None)
        else:
            if contract.content_hash != key:
                raise ValueError(f"contracts[{key}]: the contract's content hash is {contract.content_hash}")
            decision = evaluate(contract, request, instant)
            decisions[key] = decision
            exclusion = decision.exclusion
            owner.append(contract.pseudonym)
        if exclusion is not None:
            if exclusion not in reason_keys:
                reason_keys.append(exclusion)
            code_of[i] = reason_keys.index(exclusion)

    # join: per-record code; a record whose contract is about another pseudonym is excluded
    codes = code_of[h_idx]
    same = same_owner(owner)
    mismatch = (codes == -1) & ~same
    if mismatch.any():
        if PSEUDONYM_MISMATCH not in reason_keys:
            reason_keys.append(PSEUDONYM_MISMATCH)
        codes = np.where(mismatch, reason_keys.index(PSEUDONYM_MISMATCH), codes)
    eligible = codes == -1
    counts = np.bincount(codes[~eligible], minlength=len(reason_keys))
    excluded = {reason_keys[i]: int(n) for i, n in enumerate(counts) if n}

    # an eligible record's pseudonym is its contract's, so the distinct eligible pairs are
    # (owner, hash) for every contract hash with at least one eligible record
    used = np.flatnonzero(np.bincount(h_idx[eligible], minlength=len(distinct)))
    pairs = [(owner[h], distinct[h]) for h in used.tolist()]
    lines = sorted(f"{p}\t{h}\n" for p, h in pairs)
    digest = _digest(commit_key)
    digest.update("".join(lines).encode())
    names = [p for p, _ in pairs if p is not None]
    accounts = {
        p: account for p, h in pairs if p is not None and (account := contracts[h].reward_account) is not None
    }
    caps = {p: cap for p, h in pairs if p is not None and (cap := contracts[h].max_epsilon) is not None}
    return GateResult(
        eligible=eligible,
        eligible_pseudonyms=sorted(set(names)),
        excluded_by_reason=dict(sorted(excluded.items())),
        commitment=str(digest.hexdigest()),
        records_used=int(eligible.sum()),
        decisions=decisions,
        reward_accounts=dict(sorted(accounts.items())),
        privacy_caps=dict(sorted(caps.items())),
    )


def gate_naive(
    records: Iterable[tuple[str, str]],
    contracts: Mapping[str, Contract],
    request: StudyRequest,
    instant: datetime,
    commit_key: bytes | None = None,
) -> GateResult:
    """The obvious per-record loop (one evaluation per record): the reference `gate` must equal."""
    eligible: list[bool] = []
    pseudonyms: list[str] = []
    used: list[tuple[str, str]] = []
    excluded: Counter[str] = Counter()
    decisions: dict[str, Decision] = {}
    accounts: dict[str, str] = {}
    caps: dict[str, float] = {}
    for pseudonym, key in records:
        contract = contracts.get(key)
        if contract is None:
            reason: str | None = NO_CONTRACT
        else:
            decision = evaluate(contract, request, instant)
            decisions[key] = decision
            reason = decision.exclusion
            if reason is None and contract.pseudonym != pseudonym:
                reason = PSEUDONYM_MISMATCH
        eligible.append(reason is None)
        if reason is None and contract is not None and contract.reward_account is not None:
            accounts[pseudonym] = contract.reward_account
        if reason is None and contract is not None and contract.max_epsilon is not None:
            caps[pseudonym] = contract.max_epsilon
        if reason is None:
            pseudonyms.append(pseudonym)
            used.append((pseudonym, key))
        else:
            excluded[reason] += 1
    return GateResult(
        eligible=np.array(eligible, dtype=bool),
        eligible_pseudonyms=sorted(set(pseudonyms)),
        excluded_by_reason=dict(sorted(excluded.items())),
        commitment=commitment(used, commit_key),
        records_used=len(used),
        decisions=decisions,
        reward_accounts=dict(sorted(accounts.items())),
        privacy_caps=dict(sorted(caps.items())),
    )
