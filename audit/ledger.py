"""The token ledger: a deterministic fold over the audit log's entries.

Balances are never stored as truth anywhere; they are what folding the log gives. The
coordinator folds its log to serve balances and to build payout entries, and the auditor folds
an export to check them, with this same code, so the two agree to the unit or the log is bad.

`Ledger().apply(entry, index)` validates one entry completely before changing anything, so a
rejected entry (`LedgerError(index, reason)`, the reason naming the field) leaves the state as it
was. Entry kinds, signers and rules: docs/rewards.md.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import Any, cast

from audit.claim_pools import ClaimPool, ClaimPools
from audit.entry import EntryFields, format_time, parse_time
from audit.finished_studies import FinishedStudies
from audit.reward_commitment import (
    CLAIM_ACCOUNT_PREFIX,
    HEX64,
    MAX_SIZE,
    MIN_SIZE,
    ClaimError,
    check_public,
    claim_account,
    claim_amount,
    verify_leaf,
)
from audit.rewards import (
    BPS,
    MAX_AMOUNT,
    PayoutError,
    Receipt,
    StudyTerms,
    compute_payout,
    first_difference,
    payout_credits,
    payout_pools,
)

ACCOUNT_RE = re.compile(r"[a-z][a-z0-9_-]*:\S+")
MAX_ID_CHARS = 200
REWARD_PREFIX = "reward:"

OPERATOR = "operator"
COORDINATOR = "coordinator"
HOSPITAL = "hospital"

#: The entry kinds the fold reads (`study.round` only for a secure round's `aggregate_members`).
TOKEN_KINDS = frozenset({"token.mint", "token.transfer", "study.escrow", "round.receipt",
                         "study.payout", "study.refund", "reward.claim", "reward.sweep",
                         "study.round"})
CLAIM_KIND = "reward.claim"
SWEEP_KIND = "reward.sweep"
SWEEP_FIELDS = ("study_id", "hospital", "round", "amount", "to")
#: The longest claim window a study may set (ten years of 365 days), in seconds.
MAX_CLAIM_WINDOW_S = 10 * 365 * 86_400
CLAIM_FIELDS = ("study_id", "hospital", "round", "holder", "units", "index", "proof", "amount")
_RECEIPT_FIELD_ORDER = ("study_id", "round", "hospital", "records_used", "rewards")
_RECEIPT_FIELDS = frozenset(_RECEIPT_FIELD_ORDER)


class LedgerError(Exception):
    """Entry `index` breaks a ledger rule; `reason` names the field and what is wrong."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"entry {index}: {reason}")
        self.index = index
        self.reason = reason


class _RuleError(Exception):
    """Internal: a rule broken by the entry being applied (turned into LedgerError)."""


class EscrowStatus(StrEnum):
    OPEN = "open"        # escrowed; receipts accepted; may be paid out or refunded
    PAID = "paid"        # paid out in part; only a refund of the remainder is accepted
    CLOSED = "closed"    # nothing held any more


#: What a study that takes no more receipts keeps of them: shared immutable empties, so that a
#: long log's fold (one Escrow per study ever escrowed) holds no containers per finished study.
_DONE_RECEIPTS: tuple[Receipt, ...] = ()
_DONE_SEEN: frozenset[tuple[int, str]] = frozenset()
_DONE_MEMBERS: Mapping[int, frozenset[str]] = MappingProxyType({})


@dataclass(slots=True)
class Escrow:
    """One study's escrow as the fold sees it (receipts are kept only while it is open).

    Slots, and terms shared between studies with the same ones (`_terms`): a ledger holds one
    of these per study ever escrowed, for as long as the process runs, and every object the
    cyclic garbage collector tracks lengthens its full collections (a pause of every request
    in flight in the coordinator)."""

    study_id: str
    account: str
    escrowed: int
    terms: StudyTerms
    #: the receipts and (round, hospital) pairs of an open study; once it takes no more
    #: receipts, the shared empty `_DONE_RECEIPTS` and `_DONE_SEEN` (see `_done`)
    receipts: list[Receipt] | tuple[Receipt, ...] = field(default_factory=list)
    seen: set[tuple[int, str]] | frozenset[tuple[int, str]] = field(default_factory=set)
    #: round -> the hospitals whose inputs formed its secure aggregate (`study.round`'s
    #: `aggregate_members`); a receipt of such a round pays only if its hospital is listed
    members: dict[int, frozenset[str]] | Mapping[int, frozenset[str]] = field(default_factory=dict)
    #: the escrow's `unclaimed` terms: (claim window in seconds, account the rest is swept to);
    #: None for an escrow that set none (its pools stay open for ever)
    sweep: tuple[int, str] | None = None
    paid: int = 0
    refunded: int = 0
    status: EscrowStatus = EscrowStatus.OPEN
    receipt_count: int = 0

    @property
    def held(self) -> int:
        """What the study still holds in escrow."""
        return self.escrowed - self.paid - self.refunded

    def to_json(self) -> dict[str, Any]:
        return {"study_id": self.study_id, "account": self.account, "escrowed": self.escrowed,
                "paid": self.paid, "refunded": self.refunded, "held": self.held,
                "status": str(self.status), "receipts": self.receipt_count,
                "royalty_account": self.terms.royalty_account,
                "royalty_bps": self.terms.royalty_bps, "forward_bps": self.terms.forward_bps,
                "unclaimed": (None if self.sweep is None
                              else {"after_s": self.sweep[0], "to": self.sweep[1]})}


@dataclass
class LedgerState:
    """Totals and balances; `minted == sum(balances) + escrow + unclaimed` after every entry.

    `unclaimed` is what payouts put in reward claim pools that no claim has taken yet."""

    minted: int = 0
    escrow: int = 0
    balances: dict[str, int] = field(default_factory=dict)
    unclaimed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"minted": self.minted, "escrow": self.escrow, "unclaimed": self.unclaimed,
                "balances": {account: self.balances[account] for account in sorted(self.balances)}}

    def check_conservation(self) -> None:
        """Raise AssertionError unless the invariants hold (a full O(accounts) check)."""
        total = sum(self.balances.values())
        if self.minted != total + self.escrow + self.unclaimed:
            raise AssertionError(f"minted {self.minted} != balances {total} + escrow {self.escrow} "
                                 f"+ unclaimed {self.unclaimed}")
        negative = [account for account, value in self.balances.items() if value < 0]
        if negative:
            raise AssertionError(f"negative balance: {negative[0]}")


@dataclass(frozen=True)
class _Key:
    role: str
    owner: str


class Ledger:
    """Folds log entries into balances, escrows and study state (see module docstring)."""

    def __init__(self, root_key_id: str | None = None, *,
                 spill_pools_after: int | None = None,
                 spill_studies_after: int | None = None) -> None:
        """`root_key_id`: the pinned root operator key; if None, the signer of the first entry.

        In a valid log entry 0 can only be signed by the root key (no other is registered yet),
        so inferring it is sound when the keyring has checked signatures first.
        `spill_pools_after`: past that many claim pools, keep them in a temporary SQLite file
        (audit.claim_pools; the auditor's fold of a long export); None keeps them in memory.
        `spill_studies_after`: the same for finished studies (audit.finished_studies). The
        coordinator's fold passes neither: its copy-on-write forks want plain dicts.
        """
        self.state = LedgerState()
        self._finished: FinishedStudies[Escrow] | None = (
            None if spill_studies_after is None
            else FinishedStudies(spill_studies_after, _escrow_row, _escrow_from_row, _ESCROW_COLUMNS))
        self.studies: dict[str, Escrow] = {} if self._finished is None else self._finished
        #: (study_id, hospital, round) -> the claim pool its receipt's commitment opened at payout
        self.claim_pools = ClaimPools(spill_pools_after)
        self._keys: dict[str, _Key] = {}
        self._root = root_key_id
        if root_key_id is not None:
            self._keys[root_key_id] = _Key(OPERATOR, "operator:root")
        self._applied = 0
        #: hospital accounts a receipt named that passed `_account` and the reward-prefix check
        self._hospitals: dict[str, str] = {}
        self._handlers: dict[str, Callable[[EntryFields], None]] = {
            "key.register": self._key_register,
            "key.rotate": self._key_rotate,
            "token.mint": self._mint,
            "token.transfer": self._transfer,
            "study.escrow": self._escrow,
            "round.receipt": self._receipt,
            "study.payout": self._payout,
            "study.refund": self._refund,
            CLAIM_KIND: self._claim,
            SWEEP_KIND: self._sweep,
            "study.round": self._round,
        }

    def apply(self, entry: EntryFields, index: int) -> None:
        """Fold one entry. Raise LedgerError(index, reason) and change nothing if it breaks a rule."""
        if self._root is None and self._applied == 0:
            self._root = entry.key_id
            self._keys[entry.key_id] = _Key(OPERATOR, "operator:root")
        handler = self._handlers.get(entry.kind)
        if handler is None and entry.kind.startswith("token."):
            # The token namespace is the ledger's: a typo must not silently move nothing.
            known = sorted(kind for kind in TOKEN_KINDS if kind.startswith("token."))
            raise LedgerError(index, f"kind: unknown token kind {entry.kind!r} (expected one of {known})")
        if handler is not None:
            try:
                handler(entry)
            except _RuleError as exc:
                raise LedgerError(index, f"{entry.kind}: {exc}") from None
        self._applied += 1

    def reads(self, kind: str) -> bool:
        """Whether `apply` may check or change anything for an entry of `kind`.

        For any other kind `apply` only counts the entry (the count serves to take the first
        entry's signer as the root key when none was pinned): a caller that pinned the root
        (`root_key_id`) may skip such entries altogether. Half of a study's entries are of
        kinds the fold never reads (decisions, round and model records)."""
        return kind in self._handlers or kind.startswith("token.")

    def apply_all(self, entries: Iterable[EntryFields], start: int = 0) -> LedgerState:
        """Fold entries numbered from `start`; return the state."""
        for offset, entry in enumerate(entries):
            self.apply(entry, start + offset)
        return self.state

    def balance(self, account: str) -> int:
        return self.state.balances.get(account, 0)

    def claim_pools_json(self) -> list[dict[str, Any]]:
        """Every reward claim pool: what it was opened with, what claims took, what remains
        (their `remaining` sum to `state.unclaimed`). No reward account appears here."""
        formatted: dict[datetime, str] = {}  # the pools of one payout close at the same instant

        def closes(instant: datetime | None) -> str | None:
            if instant is None:
                return None
            text = formatted.get(instant)
            if text is None:
                text = formatted[instant] = _format(instant)
            return text

        return [{"study_id": study_id, "hospital": hospital, "round": round_number, "root": pool.root,
                 "pool": pool.pool, "paid": pool.paid, "claims": pool.claims,
                 "swept": pool.swept, "remaining": pool.remaining, "closes": closes(pool.closes),
                 "sweep_to": pool.sweep_to}
                for (study_id, hospital, round_number), pool in self.claim_pools.items()]

    def sweepable(self, instant: datetime) -> list[dict[str, Any]]:
        """The `reward.sweep` payloads the fold accepts at `instant`: every claim pool whose
        window has closed, that still holds something and was not swept yet."""
        return [{"study_id": study_id, "hospital": hospital, "round": round_number,
                 "amount": pool.remaining, "to": pool.sweep_to}
                for (study_id, hospital, round_number), pool in self.claim_pools.items()
                if pool.closes is not None and pool.sweep_to is not None and instant >= pool.closes
                and not pool.swept and pool.remaining > 0]

    def expected_claim(self, study_id: str, hospital: str, round_number: int, units: int) -> int:
        """What a leaf of `units` of that receipt's commitment is paid now; PayoutError if there is
        no such claim pool."""
        pool = self.claim_pools.get((study_id, hospital, round_number))
        if pool is None:
            raise PayoutError(f"round: no claim pool for {hospital!r} round {round_number} of "
                              f"{study_id!r} (no receipt, or the study is not paid out)")
        return claim_amount(pool.pool, units)

    def expected_payout(self, study_id: str, amount: int) -> dict[str, Any]:
        """The `study.payout` payload the fold would accept now for paying `amount` of `study_id`.

        For the coordinator: build the entry from this, sign it, append it. Raises PayoutError.
        """
        study = self.studies.get(study_id)
        if study is None:
            raise PayoutError(f"study_id: no study.escrow for {study_id!r}")
        if study.status is not EscrowStatus.OPEN:
            raise PayoutError(f"study_id: study {study_id!r} is {study.status}; "
                              "a study is paid out at most once")
        return compute_payout(study_id, amount, study.terms, _paying(study))

    # --- key view (roles and owners; signature checks are the keyring's) ------------------

    def _key_register(self, entry: EntryFields) -> None:
        payload = entry.payload
        for name in ("key_id", "role", "owner"):
            if not isinstance(payload.get(name), str) or not payload[name]:
                raise _RuleError(f"{name}: must be a non-empty string")
        self._keys[payload["key_id"]] = _Key(payload["role"], payload["owner"])

    def _key_rotate(self, entry: EntryFields) -> None:
        payload = entry.payload
        for name in ("old_key_id", "new_key_id"):
            if not isinstance(payload.get(name), str) or not payload[name]:
                raise _RuleError(f"{name}: must be a non-empty string")
        old = self._keys.get(payload["old_key_id"])
        if old is None:
            raise _RuleError(f"old_key_id: {payload['old_key_id']!r} is not a registered key")
        self._keys[payload["new_key_id"]] = old

    def _signer(self, entry: EntryFields, role: str | None = None) -> _Key:
        key = self._keys.get(entry.key_id)
        if key is None:
            raise _RuleError(f"key_id: {entry.key_id!r} is not registered in this log")
        if role is not None and key.role != role:
            raise _RuleError(f"key_id: must be signed by a {role} key, signer has role {key.role!r}")
        return key

    # --- token kinds -----------------------------------------------------------------------

    def _mint(self, entry: EntryFields) -> None:
        payload = _fields(entry.payload, ("account", "amount"))
        self._signer(entry, OPERATOR)
        account = _account(payload, "account")
        amount = _amount(payload, "amount")
        if self.state.minted + amount > MAX_AMOUNT:
            raise _RuleError(f"amount: total minted would exceed {MAX_AMOUNT}")
        self._commit({account: amount}, minted=amount)

    def _transfer(self, entry: EntryFields) -> None:
        payload = _fields(entry.payload, ("from", "to", "amount"))
        source = _account(payload, "from")
        target = _account(payload, "to")
        amount = _amount(payload, "amount")
        key = self._signer(entry)
        if key.owner != source:
            raise _RuleError(f"key_id: the signer's account is {key.owner!r}, not from={source!r}")
        if target == source:
            raise _RuleError("to: must differ from 'from'")
        self._need(source, amount, "amount")
        self._commit({source: -amount, target: amount})

    def _escrow(self, entry: EntryFields) -> None:
        payload = _fields(entry.payload, ("study_id", "account", "amount", "royalty_account",
                                          "royalty_bps", "forward_bps"), optional=("unclaimed",))
        self._signer(entry, COORDINATOR)
        study_id = _text(payload, "study_id")
        account = _account(payload, "account")
        amount = _amount(payload, "amount")
        royalty_account = None if payload["royalty_account"] is None else _account(payload, "royalty_account")
        royalty_bps = _integer(payload, "royalty_bps", 0, BPS)
        forward_bps = _integer(payload, "forward_bps", 0, BPS)
        if royalty_account is None and royalty_bps:
            raise _RuleError("royalty_bps: must be 0 when royalty_account is null")
        if study_id in self.studies:
            raise _RuleError(f"study_id: {study_id!r} was already escrowed")
        sweep = _sweep_terms(payload["unclaimed"]) if "unclaimed" in payload else None
        self._need(account, amount, "amount")
        terms = _terms(royalty_account, royalty_bps, forward_bps)
        self._commit({account: -amount}, escrow=amount)
        self.studies[study_id] = Escrow(study_id, account, amount, terms, sweep=sweep)

    def _receipt(self, entry: EntryFields) -> None:
        payload = entry.payload
        if not payload.keys() >= _RECEIPT_FIELDS:  # the common case in one set operation
            for name in _RECEIPT_FIELD_ORDER:
                if name not in payload:
                    raise _RuleError(f"{name}: missing")
        key = self._keys.get(entry.key_id)
        if key is None or key.role != HOSPITAL:
            key = self._signer(entry, HOSPITAL)  # raises, naming what is wrong
        # Half of a log is receipts: the common case is checked inline, and anything else goes
        # through the helpers, which name what is wrong (in the same order of checks).
        study_id, round_number = payload["study_id"], payload["round"]
        hospital, records_used = payload["hospital"], payload["records_used"]
        if type(study_id) is not str or not 0 < len(study_id) <= MAX_ID_CHARS:
            study_id = _text(payload, "study_id")
        if type(round_number) is not int or not 1 <= round_number <= MAX_AMOUNT:
            round_number = _integer(payload, "round", 1, MAX_AMOUNT)
        known = self._hospitals.get(hospital)
        if known is not None and key.owner == known:
            hospital = known  # one string object per hospital in what the ledger keeps
        else:
            hospital = _account(payload, "hospital")
            if hospital.startswith(REWARD_PREFIX):
                raise _RuleError(f"hospital: {hospital!r} is a reward account, not a hospital's")
            if key.owner != hospital:
                raise _RuleError(f"hospital: {hospital!r} is not the signing key's owner "
                                 f"{key.owner!r}")
            self._hospitals[hospital] = hospital  # at most one per hospital key's owner
        if type(records_used) is not int or not 0 <= records_used <= MAX_AMOUNT:
            records_used = _integer(payload, "records_used", 0, MAX_AMOUNT)
        given = payload["rewards"]
        root = size = None
        if type(given) is dict and len(given) == 2:
            root, size = given.get("root"), given.get("size")
        if (type(root) is str and type(size) is int and len(root) == 64 and HEX64.fullmatch(root)
                and MIN_SIZE <= size <= MAX_SIZE and not size & (size - 1)):
            rewards: dict[str, object] = {"root": root, "size": size}  # check_public's result
        else:
            try:
                rewards = check_public(given)
            except ValueError as exc:
                raise _RuleError(str(exc)) from None
        study = self.studies.get(study_id)
        if study is None:
            study = self._study(study_id)  # raises, naming what is wrong
        if study.status is not EscrowStatus.OPEN:
            raise _RuleError(f"study_id: study {study_id!r} is {study.status}, no more receipts")
        seen = (round_number, hospital)
        if seen in study.seen:
            raise _RuleError(f"round: {hospital!r} already has a receipt for round {round_number} "
                           f"of {study_id!r}")
        # an open study's containers are its own (`_done` replaces them once it is not open)
        cast(set[tuple[int, str]], study.seen).add(seen)
        cast(list[Receipt], study.receipts).append(
            Receipt(study_id, round_number, hospital, records_used, rewards))
        study.receipt_count += 1

    def _payout(self, entry: EntryFields) -> None:
        payload = entry.payload
        for name in ("study_id", "amount"):
            if name not in payload:
                raise _RuleError(f"{name}: missing")
        self._signer(entry, COORDINATOR)
        study = self._study(_text(payload, "study_id"))
        if study.status is not EscrowStatus.OPEN:
            raise _RuleError(f"study_id: study {study.study_id!r} is {study.status}; "
                           "a study is paid out at most once")
        amount = _amount(payload, "amount")
        if amount > study.held:
            raise _RuleError(f"amount: {amount} exceeds the {study.held} held in escrow for "
                           f"{study.study_id!r}")
        try:
            expected = compute_payout(study.study_id, amount, study.terms, _paying(study))
        except PayoutError as exc:
            raise _RuleError(str(exc)) from None
        difference = first_difference(expected, payload)
        if difference is not None:
            raise _RuleError(difference)
        pools = payout_pools(expected)
        self._commit(payout_credits(expected), escrow=-amount, unclaimed=sum(pools.values()))
        closes, sweep_to = None, None
        if study.sweep is not None:
            closes = _time(entry) + timedelta(seconds=study.sweep[0])
            sweep_to = study.sweep[1]
        study_id = study.study_id
        opened: list[tuple[tuple[str, str, int], ClaimPool]] = []
        for _, round_number, hospital, _, rewards in study.receipts:
            pool = pools.get((hospital, round_number))
            if pool is not None and rewards is not None:
                opened.append(((study_id, hospital, round_number), ClaimPool(
                    str(rewards["root"]), int(rewards["size"]), pool, 0, None, closes, sweep_to)))
        if opened:
            self.claim_pools.add_many(opened)
        study.paid += amount
        study.status = EscrowStatus.CLOSED if study.held == 0 else EscrowStatus.PAID
        # A study is paid out once and takes no receipts after it: forget them, so that a
        # long log's fold keeps only the open studies' receipts in memory.
        _done(study)
        if self._finished is not None:
            self._finished.finished(study_id, study)

    def _round(self, entry: EntryFields) -> None:
        """A secure-aggregation round names its aggregate's members (docs/secure-aggregation.md):
        only their receipts of that round pay. Other `study.round` entries move nothing."""
        payload = entry.payload
        if "aggregate_members" not in payload:
            return
        self._signer(entry, COORDINATOR)
        members = payload["aggregate_members"]
        if not isinstance(members, list) or not all(isinstance(m, str) and m.startswith("hospital:")
                                                    for m in members):
            raise _RuleError("aggregate_members: must be a list of hospital:<id> accounts")
        study = self._study(_text(payload, "study_id"))
        round_number = _integer(payload, "round", 1, MAX_AMOUNT)
        if round_number in study.members:
            raise _RuleError(f"round: round {round_number} of {study.study_id!r} already named its members")
        if study.status is EscrowStatus.OPEN:
            cast(dict[int, frozenset[str]], study.members)[round_number] = frozenset(members)

    def _claim(self, entry: EntryFields) -> None:
        """A leaf of a receipt's reward commitment, shown with its inclusion proof, is paid its
        share of that receipt's claim pool once, into the account named by its holder."""
        payload = _fields(entry.payload, CLAIM_FIELDS)
        self._signer(entry, COORDINATOR)
        study_id = _text(payload, "study_id")
        hospital = _account(payload, "hospital")
        round_number = _integer(payload, "round", 1, MAX_AMOUNT)
        key = (study_id, hospital, round_number)
        pool = self.claim_pools.get(key)
        if pool is None:
            raise _RuleError(f"round: no claim pool for {hospital!r} round {round_number} of "
                             f"{study_id!r} (no receipt, or the study is not paid out)")
        if pool.closes is not None and _time(entry) >= pool.closes:
            raise _RuleError(f"time: the claim window of this pool closed at {_format(pool.closes)}; "
                             f"what was not claimed goes to {pool.sweep_to!r}")
        holder_hex, units = payload["holder"], payload["units"]
        try:
            verify_leaf(pool.root, pool.size, holder_hex, units, index=payload["index"],
                        proof=payload["proof"])
        except ClaimError as exc:
            raise _RuleError(str(exc)) from None
        if self.claim_pools.was_claimed(key, pool, holder_hex):
            raise _RuleError("holder: this leaf was already claimed (a leaf is paid once)")
        due = claim_amount(pool.pool, units)
        amount = payload["amount"]
        if type(amount) is not int or amount != due:
            raise _RuleError(f"amount: the leaf's {units} units of the pool {pool.pool} pay {due}, "
                             f"got {amount!r}")
        if due > pool.remaining:
            raise _RuleError(f"amount: the pool holds {pool.remaining}, less than {due}")
        if due:
            self._commit({claim_account(holder_hex): due}, unclaimed=-due)
        self.claim_pools.record_claim(key, pool, holder_hex, due)

    def _sweep(self, entry: EntryFields) -> None:
        """After a claim pool's window has closed, what no claim took goes, once and whole, to
        the account the study's escrow named; claims of that pool are refused from then on."""
        payload = _fields(entry.payload, SWEEP_FIELDS)
        self._signer(entry, COORDINATOR)
        study_id = _text(payload, "study_id")
        hospital = _account(payload, "hospital")
        round_number = _integer(payload, "round", 1, MAX_AMOUNT)
        target = _account(payload, "to")
        amount = _amount(payload, "amount")
        key = (study_id, hospital, round_number)
        pool = self.claim_pools.get(key)
        if pool is None:
            raise _RuleError(f"round: no claim pool for {hospital!r} round {round_number} of "
                             f"{study_id!r} (no receipt, or the study is not paid out)")
        if pool.closes is None or pool.sweep_to is None:
            raise _RuleError(f"study_id: the escrow of {study_id!r} set no claim window; its pools "
                             "are never swept")
        if _time(entry) < pool.closes:
            raise _RuleError(f"time: the claim window is open until {_format(pool.closes)}")
        if pool.swept:
            raise _RuleError("round: this pool was already swept (a pool is swept once)")
        if target != pool.sweep_to:
            raise _RuleError(f"to: the escrow names {pool.sweep_to!r} for unclaimed rewards, got {target!r}")
        if amount != pool.remaining:
            raise _RuleError(f"amount: a sweep takes exactly what the pool still holds "
                             f"({pool.remaining}), got {amount}")
        self._commit({target: amount}, unclaimed=-amount)
        self.claim_pools.record_sweep(key, pool, amount)

    def _refund(self, entry: EntryFields) -> None:
        payload = _fields(entry.payload, ("study_id", "account", "amount"))
        self._signer(entry, COORDINATOR)
        study = self._study(_text(payload, "study_id"))
        account = _account(payload, "account")
        amount = _amount(payload, "amount")
        if study.status is EscrowStatus.CLOSED:
            raise _RuleError(f"study_id: study {study.study_id!r} is closed; nothing left to refund")
        if account != study.account:
            raise _RuleError(f"account: must be the escrow's account {study.account!r}, got {account!r}")
        if amount != study.held:
            raise _RuleError(f"amount: a refund returns exactly what was not paid out ({study.held}), "
                           f"got {amount}")
        self._commit({account: amount}, escrow=-amount)
        study.refunded += amount
        study.status = EscrowStatus.CLOSED
        _done(study)
        if self._finished is not None:
            self._finished.finished(study.study_id, study)

    # --- helpers ---------------------------------------------------------------------------

    def _study(self, study_id: str) -> Escrow:
        study = self.studies.get(study_id)
        if study is None:
            raise _RuleError(f"study_id: no study.escrow for {study_id!r} before this entry")
        return study

    def _need(self, account: str, amount: int, name: str) -> None:
        have = self.state.balances.get(account, 0)
        if have < amount:
            raise _RuleError(f"{name}: {account!r} holds {have}, less than {amount}")

    def _commit(self, deltas: Mapping[str, int], *, minted: int = 0, escrow: int = 0,
                unclaimed: int = 0) -> None:
        """Apply balance deltas and totals atomically, after checking the invariants they keep.

        Conservation holds after the entry iff it held before and the deltas net to zero
        against the totals, so checking the entry's own deltas is an O(entry) full check.
        """
        balances = self.state.balances
        if sum(deltas.values()) + escrow + unclaimed != minted:
            raise _RuleError("conservation: the movement creates or destroys tokens")
        for account, delta in deltas.items():
            if balances.get(account, 0) + delta < 0:
                raise _RuleError(f"balance: {account!r} would become negative")
        if self.state.escrow + escrow < 0:
            raise _RuleError("escrow: would become negative")
        if self.state.unclaimed + unclaimed < 0:
            raise _RuleError("unclaimed: would become negative")
        for account, delta in deltas.items():
            balances[account] = balances.get(account, 0) + delta
        self.state.minted += minted
        self.state.escrow += escrow
        self.state.unclaimed += unclaimed


def _done(study: Escrow) -> None:
    """A study that takes no more receipts (paid out or refunded) forgets them: it keeps the
    shared immutable empties, which nothing changes (receipts and members are only added to an
    open study)."""
    study.receipts = _DONE_RECEIPTS
    study.seen = _DONE_SEEN
    study.members = _DONE_MEMBERS


#: the columns of a finished study in a spilled store (`_escrow_row`), after its id
_ESCROW_COLUMNS = 11


def _escrow_row(study: Escrow) -> tuple[object, ...]:
    """A finished study's fields for audit.finished_studies (its receipts are forgotten)."""
    terms = study.terms
    sweep_s, sweep_to = (None, None) if study.sweep is None else study.sweep
    return (study.account, study.escrowed, terms.royalty_account, terms.royalty_bps,
            terms.forward_bps, sweep_s, sweep_to, study.paid, study.refunded, str(study.status),
            study.receipt_count)


def _escrow_from_row(study_id: str, row: tuple[object, ...]) -> Escrow:
    (account, escrowed, royalty_account, royalty_bps, forward_bps, sweep_s, sweep_to, paid,
     refunded, status, receipt_count) = row
    assert isinstance(account, str) and isinstance(escrowed, int) and isinstance(paid, int)
    assert isinstance(royalty_bps, int) and isinstance(forward_bps, int)
    assert isinstance(refunded, int) and isinstance(receipt_count, int)
    sweep = None if sweep_s is None else (int(str(sweep_s)), str(sweep_to))
    terms = _terms(None if royalty_account is None else str(royalty_account), royalty_bps, forward_bps)
    return Escrow(study_id, account, escrowed, terms, _DONE_RECEIPTS, _DONE_SEEN, _DONE_MEMBERS,
                  sweep, paid, refunded, EscrowStatus(str(status)), receipt_count)


def _paying(study: Escrow) -> list[Receipt]:
    """The receipts a payout counts: all, except those of a secure-aggregation round from a
    hospital that is not among that round's aggregate members."""
    return [r for r in study.receipts
            if r.round not in study.members or r.hospital in study.members[r.round]]


@functools.lru_cache(maxsize=1024)
def _terms(royalty_account: str | None, royalty_bps: int, forward_bps: int) -> StudyTerms:
    """One (immutable) StudyTerms per distinct terms: most studies share a handful."""
    return StudyTerms(royalty_account, royalty_bps, forward_bps)


def _fields(payload: Mapping[str, Any], names: tuple[str, ...],
            optional: tuple[str, ...] = ()) -> Mapping[str, Any]:
    for name in names:
        if name not in payload:
            raise _RuleError(f"{name}: missing")
    unknown = sorted(set(payload) - set(names) - set(optional))
    if unknown:
        raise _RuleError(f"{unknown[0]}: unknown field")
    return payload


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise _RuleError(f"{name}: must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def _account(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS or not ACCOUNT_RE.fullmatch(value):
        raise _RuleError(f"{name}: {value!r} is not an account '<prefix>:<id>' "
                       f"(at most {MAX_ID_CHARS} characters, no whitespace)")
    return value


def _integer(payload: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = payload[name]
    if type(value) is not int or not low <= value <= high:
        raise _RuleError(f"{name}: must be an integer in [{low}, {high}], got {value!r}")
    return value


def _amount(payload: Mapping[str, Any], name: str) -> int:
    return _integer(payload, name, 1, MAX_AMOUNT)


def _sweep_terms(value: Any) -> tuple[int, str]:
    """An escrow's `unclaimed` terms: {"after_s": claim window in seconds, "to": account}."""
    if not isinstance(value, dict):
        raise _RuleError('unclaimed: must be an object {"after_s": int, "to": account}')
    terms = _fields(value, ("after_s", "to"))
    try:
        window = _integer(terms, "after_s", 1, MAX_CLAIM_WINDOW_S)
        target = _account(terms, "to")
    except _RuleError as exc:
        raise _RuleError(f"unclaimed.{exc}") from None
    if target.startswith((REWARD_PREFIX, CLAIM_ACCOUNT_PREFIX)):
        raise _RuleError(f"unclaimed.to: {target!r} is a patient's account, not an organisation's")
    return window, target


def _time(entry: EntryFields) -> datetime:
    try:
        return parse_time(entry.time)
    except ValueError as exc:
        raise _RuleError(str(exc)) from None


def _format(instant: datetime) -> str:
    return format_time(instant)
