"""A realistic, well-formed signed log of any length, for trying the verifier, tests and benchmarks.

Why: the verifier, its tests and its benchmark need logs that look like the real exchange's (key
registrations first, then token mints, study escrows, hospital decisions, round receipts,
payouts and refunds, the odd key rotation and revocation) and that pass every check, including
the token ledger (docs/rewards.md), so that a tampered copy fails for exactly the tampering.
Keys are fresh (from the OS) unless a seed is given, in which case the whole log is
reproducible byte for byte.

The log is an endless, valid story cut after N entries: a study may be left open at the end,
which is a valid state (its escrow is simply still held).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from audit.checkpoint import Checkpoint, parse_note, sign_checkpoint
from audit.cosignature import CosignatureV1Signer
from audit.entry import Entry, sign_entry
from audit.export import Trust, write_export
from audit.keyring import WITNESS_FIELD
from audit.ledger import Ledger
from audit.merkle import MemoryTree, leaf_hash
from audit.note import Note
from audit.rewards import StudyTerms
from audit.signing import Signer

DEFAULT_ORIGIN = "exchange.example/log"
START = datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)


@dataclass
class GeneratedLog:
    """The log plus every private key used, so tests can forge, fork and re-sign."""

    origin: str
    operator: Signer
    log_signer: Signer
    signers: dict[str, Signer]  # account (owner) -> its current key
    entries: list[Entry] = field(default_factory=list)
    # hospital (owner) -> its witness key; registered with its key.register (witness_vkey)
    witnesses: dict[str, CosignatureV1Signer] = field(default_factory=dict)

    @property
    def trust(self) -> Trust:
        """The trust policy: the log's anchors, and its witnesses (default majority quorum)."""
        return Trust(self.origin, self.operator.public_key, self.log_signer.public_key,
                     tuple(w.vkey for w in self.witnesses.values()))

    def lines(self) -> list[bytes]:
        return [entry.leaf_bytes() for entry in self.entries]

    def checkpoint(self, size: int | None = None, lines: list[bytes] | None = None,
                   cosigners: Iterable[str] | None = None) -> str:
        """The log key's signed checkpoint over the first `size` of `lines` (default: all),
        cosigned by the witnesses of the hospitals in `cosigners` (default: every witness)."""
        leaves = self.lines() if lines is None else lines
        count = len(leaves) if size is None else size
        tree = MemoryTree(leaf_hash(line) for line in leaves[:count])
        return self.cosign(self.signed_checkpoint(count, tree.root()), cosigners)

    def signed_checkpoint(self, size: int, root: bytes) -> str:
        return sign_checkpoint(Checkpoint(self.origin, size, root), self.log_signer)

    def cosign(self, note: str, cosigners: Iterable[str] | None = None,
               timestamp: int | None = None) -> str:
        """`note` with cosignatures by the witnesses of `cosigners` (default: all), dated
        `timestamp` (default: the time of the last entry, so a seeded log is reproducible)."""
        chosen = list(self.witnesses) if cosigners is None else list(cosigners)
        if not chosen:
            return note
        if timestamp is None:
            last = self.entries[-1].time if self.entries else None
            timestamp = int((_parse_time(last) if last else START).timestamp())
        parsed = parse_note(note)
        lines = tuple(self.witnesses[owner].cosign(parsed.body, timestamp) for owner in chosen)
        return Note(parsed.body, (*parsed.signatures, *lines)).text()

    def write(self, out: Path, *, overwrite: bool = False) -> int:
        lines = self.lines()
        return write_export(out, lines, self.checkpoint(lines=lines), self.trust, overwrite=overwrite)


def witness_name(owner: str, origin: str) -> str:
    """The witness key name of a hospital: `<id>.witness.<host of the origin>`."""
    return f"{owner.rsplit(':', maxsplit=1)[-1]}.witness.{origin.split('/', maxsplit=1)[0]}"


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _signer(rng: random.Random | None) -> Signer:
    return Signer.generate() if rng is None else Signer.from_seed(rng.randbytes(32))


class _Story:
    """Produces valid entries forever, tracking balances so every movement is allowed."""

    def __init__(self, log: GeneratedLog, rng: random.Random, hospitals: int, researchers: int,
                 key_rng: random.Random | None) -> None:
        self.log = log
        self.rng = rng
        self.key_rng = key_rng
        self.time = START
        self.hospitals = [f"hospital:h{i + 1:02d}" for i in range(hospitals)]
        self.orgs = [f"org:r{i + 1:02d}" for i in range(researchers)]
        self.authors = ["author:lr-team", "author:mlp-team"]
        # The generator folds its own entries, so balances and payouts come from the one
        # implementation the verifier runs (docs/rewards.md), not from a copy of the rules.
        self.ledger = Ledger(root_key_id=log.operator.key_id)
        self.count = 0
        self.rewards = {h: [f"reward:{rng.randbytes(6).hex()}" for _ in range(6)]
                        for h in self.hospitals}
        self.study_counter = 0

    def _entry(self, signer: Signer, kind: str, payload: dict[str, Any]) -> Entry:
        self.time += timedelta(milliseconds=self.rng.randint(1, 900),
                               microseconds=self.rng.randint(0, 999))
        entry = sign_entry(signer, kind, payload, self.time)
        self.ledger.apply(entry, self.count)
        self.count += 1
        return entry

    def _register(self, owner: str, role: str) -> Entry:
        signer = _signer(self.key_rng)
        self.log.signers[owner] = signer
        payload = {"key_id": signer.key_id, "public_key": signer.public_key_b64, "role": role,
                   "owner": owner}
        witness = self.log.witnesses.get(owner)
        if witness is not None:
            payload[WITNESS_FIELD] = str(witness.vkey)
        return self._entry(self.log.operator, "key.register", payload)

    def run(self) -> Iterator[Entry]:
        yield self._register("operator:exchange", "coordinator")
        for hospital in self.hospitals:
            yield self._register(hospital, "hospital")
        for org in self.orgs:
            yield self._register(org, "researcher")
        yield self._register("auditor:regulator", "auditor")
        for org in self.orgs:
            yield from self._mint(org, 5_000_000)
        while True:
            yield from self._study()
            roll = self.rng.random()
            if roll < 0.15:
                yield from self._transfer()
            elif roll < 0.18:
                yield from self._rotate_hospital_key()
            elif roll < 0.20:
                yield from self._revoke_and_replace_researcher()

    def _mint(self, account: str, amount: int) -> Iterator[Entry]:
        yield self._entry(self.log.operator, "token.mint", {"account": account, "amount": amount})

    def _transfer(self) -> Iterator[Entry]:
        source, target = self.rng.sample(self.orgs, 2)
        amount = self.rng.randint(1, 10_000)
        if self.ledger.balance(source) < amount:
            yield from self._mint(source, 1_000_000)
        yield self._entry(self.log.signers[source], "token.transfer",
                          {"from": source, "to": target, "amount": amount})

    def _rotate_hospital_key(self) -> Iterator[Entry]:
        hospital = self.rng.choice(self.hospitals)
        old = self.log.signers[hospital]
        new = _signer(self.key_rng)
        self.log.signers[hospital] = new
        yield self._entry(old, "key.rotate", {"old_key_id": old.key_id, "new_key_id": new.key_id,
                                              "new_public_key": new.public_key_b64})

    def _revoke_and_replace_researcher(self) -> Iterator[Entry]:
        org = self.rng.choice(self.orgs)
        old = self.log.signers[org]
        yield self._entry(self.log.operator, "key.revoke",
                          {"key_id": old.key_id, "reason": "laptop lost"})
        yield self._register(org, "researcher")

    def _study(self) -> Iterator[Entry]:
        rng = self.rng
        self.study_counter += 1
        study_id = f"s-{self.study_counter:06d}"
        org = rng.choice(self.orgs)
        amount = rng.randint(1_000, 200_000)
        if self.ledger.balance(org) < amount:
            yield from self._mint(org, 5_000_000)
        royalty_account = rng.choice([*self.authors, None])
        terms = StudyTerms(royalty_account=royalty_account,
                           royalty_bps=rng.choice([250, 500, 1000]) if royalty_account else 0,
                           forward_bps=rng.choice([0, 1500, 3000, 5000]))
        coordinator = self.log.signers["operator:exchange"]
        rounds = rng.randint(1, 5)
        yield self._entry(coordinator, "study.escrow",
                          {"study_id": study_id, "account": org, "amount": amount,
                           "royalty_account": terms.royalty_account,
                           "royalty_bps": terms.royalty_bps, "forward_bps": terms.forward_bps})
        yield self._entry(coordinator, "study.submitted",
                          {"study_id": study_id, "purpose": rng.choice(["DUO:0000042", "DUO:0000007"]),
                           "template": rng.choice(["logreg", "mlp"]), "rounds": rounds,
                           "epsilon": rng.choice([1.5, 3.25, 8.75]), "delta": 1e-05})
        approved: list[str] = []
        for hospital in self.hospitals:
            decision = "approve" if rng.random() < 0.8 else "refuse"
            reasons = [] if decision == "approve" else ["purpose not allowed by site policy"]
            if decision == "approve":
                approved.append(hospital)
            yield self._entry(self.log.signers[hospital], "study.decision",
                              {"study_id": study_id, "hospital": hospital, "decision": decision,
                               "reasons": reasons})
        receipts: list[dict[str, Any]] = []
        for round_number in range(1, rounds + 1):
            for hospital in approved:
                used = rng.randint(0, 400)
                # How many reward accounts were named (drawn as before, so that seeded logs keep
                # their shape); the receipt commits to them without naming any. Nothing is
                # claimed in a generated log, so a root derived from the draw stands in for a tree.
                named: dict[str, int] = {}
                left = used
                for account in rng.sample(self.rewards[hospital], rng.randint(0, 3)):
                    if left <= 0:
                        break
                    take = rng.randint(1, left)
                    named[account] = take
                    left -= take
                gate_commitment = hashlib.sha256(rng.randbytes(16)).hexdigest()
                rewards = {"root": hashlib.sha256(f"rewards:{gate_commitment}:{len(named)}".encode())
                           .hexdigest(), "size": 1024}
                receipt = {"study_id": study_id, "round": round_number, "hospital": hospital,
                           "records_used": used, "rewards": rewards, "commitment": gate_commitment,
                           "epsilon_spent": round(rng.uniform(0.05, 0.9), 4)}
                receipts.append(receipt)
                yield self._entry(self.log.signers[hospital], "round.receipt", receipt)
            yield self._entry(coordinator, "round.completed",
                              {"study_id": study_id, "round": round_number,
                               "hospitals": len(approved),
                               "loss": round(rng.uniform(0.2, 0.7), 6)})
        paid = 0
        if any(r["records_used"] > 0 for r in receipts) and rng.random() < 0.9:
            paid = amount if rng.random() < 0.85 else rng.randint(1, amount)
            yield self._entry(coordinator, "model.stored",
                              {"study_id": study_id,
                               "sha256": hashlib.sha256(rng.randbytes(16)).hexdigest()})
            payload = self.ledger.expected_payout(study_id, paid)
            yield self._entry(coordinator, "study.payout", payload)
        if paid < amount:
            yield self._entry(coordinator, "study.refund",
                              {"study_id": study_id, "account": org, "amount": amount - paid})


def _start(entries: int, *, seed: int | None, origin: str, hospitals: int, researchers: int,
           witnesses: int) -> tuple[GeneratedLog, _Story]:
    if entries < 0:
        raise ValueError(f"entries: must be >= 0, got {entries}")
    if hospitals < 1 or researchers < 2:
        raise ValueError("hospitals: at least 1; researchers: at least 2")
    if not 0 <= witnesses <= hospitals:
        raise ValueError(f"witnesses: between 0 and the {hospitals} hospitals, got {witnesses}")
    rng = random.Random(seed)
    keyed = rng if seed is not None else None
    log = GeneratedLog(origin=origin, operator=_signer(keyed), log_signer=_signer(keyed), signers={})
    story = _Story(log, rng, hospitals, researchers, keyed)
    for hospital in story.hospitals[:witnesses]:
        log.witnesses[hospital] = CosignatureV1Signer(witness_name(hospital, origin),
                                                      _signer(keyed))
    return log, story


def generate_log(entries: int, *, seed: int | None = None, origin: str = DEFAULT_ORIGIN,
                 hospitals: int = 5, researchers: int = 3, witnesses: int = 0) -> GeneratedLog:
    """A valid log of exactly `entries` entries (>= 0). Fresh keys unless `seed` is given.

    The first `witnesses` hospitals register a witness key with their signing key; the trust
    policy then lists them (default quorum: a majority) and `checkpoint()` is cosigned by all.
    """
    log, story = _start(entries, seed=seed, origin=origin, hospitals=hospitals,
                         researchers=researchers, witnesses=witnesses)
    for entry in story.run():
        if len(log.entries) >= entries:
            break
        log.entries.append(entry)
    return log


def write_generated_log(out: Path, entries: int, *, seed: int | None = None,
                        origin: str = DEFAULT_ORIGIN, hospitals: int = 5, researchers: int = 3,
                        witnesses: int = 0, overwrite: bool = False) -> GeneratedLog:
    """`generate_log` written straight to an export folder, keeping no entry in memory (only
    the leaf hashes), so million-entry logs fit. The returned log holds the keys and the last
    entry only."""
    log, story = _start(entries, seed=seed, origin=origin, hospitals=hospitals,
                         researchers=researchers, witnesses=witnesses)
    tree = MemoryTree()
    last: list[Entry] = []

    def lines() -> Iterator[bytes]:
        for entry in story.run():
            if tree.size >= entries:
                return
            line = entry.leaf_bytes()
            tree.append(leaf_hash(line))
            last[:] = [entry]
            yield line

    def checkpoint() -> str:
        log.entries = last
        return log.cosign(log.signed_checkpoint(tree.size, tree.root()))

    write_export(out, lines(), checkpoint, log.trust, overwrite=overwrite)
    log.entries = last
    return log
