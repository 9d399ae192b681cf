"""The registry: who may use the exchange and with which keys - organisations, researchers,
API keys (and the authentication cache), hospitals and their signing keys (registration,
rotation, request nonces), and the operator's token minting.

Every change goes through the journal (`Journal.write` + `Journal.append`), so each has its
signed audit entry in the same transaction.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from audit.entry import Entry
from audit.signing import SignatureInvalidError, b64decode, key_id
from exchange.coordinator import problems
from exchange.coordinator.journal import Journal, now
from exchange.coordinator.models import ApiKey, Hospital, Organisation, RequestNonce, Researcher, Role
from exchange.coordinator.schemas import ApiKeyCreate, HospitalCreate, OrganisationCreate, ResearcherCreate

API_KEY_PREFIX_BYTES = 6
API_KEY_SECRET_BYTES = 32


def hospital_key_payload(kid: str, data: HospitalCreate) -> dict[str, Any]:
    """The hospital's `key.register` payload: its signing key and, if given, its witness key
    (audit/keyring.py: the witness is registered in the log with the key it belongs to)."""
    payload: dict[str, Any] = {"key_id": kid, "public_key": data.signing_public_key,
                               "role": "hospital", "owner": f"hospital:{data.id}"}
    if data.witness_vkey is not None:
        payload["witness_vkey"] = data.witness_vkey
    return payload


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `ref` identifies the credential in logs (never the secret)."""

    role: Role
    ref: str
    organisation_id: str | None = None
    researcher_id: str | None = None
    hospital_id: str | None = None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_api_key() -> tuple[str, str]:
    """(prefix, full token). The token is `hx_<prefix>_<secret>`; only its SHA-256 is stored."""
    prefix = secrets.token_hex(API_KEY_PREFIX_BYTES)
    return prefix, f"hx_{prefix}_{secrets.token_urlsafe(API_KEY_SECRET_BYTES)}"


def api_key_prefix(token: str) -> str | None:
    """The public prefix of an API key `hx_<prefix>_<secret>` (its id in logs, rate limits and
    the key table), or None if `token` does not have that form."""
    parts = token.split("_", 2)
    if len(parts) < 3 or parts[0] != "hx":
        return None
    return parts[1]


#: how often a nonce write also deletes the expired ones (older than twice the replay window;
#: a request signed that long ago is refused for its age alone)
NONCE_SWEEP_S = 60.0


@dataclass(frozen=True)
class _NonceUse:
    """One signed request's nonce, as a group-commit write (`GroupCommit`, `LoopGroupCommit`):
    its INSERT fails on the primary key if the (key, nonce) was recorded before (a replay)."""

    kid: str
    nonce: str
    at: datetime
    sweep_before: datetime | None = None  # also delete the nonces created before this

    def __call__(self, connection: Connection) -> bool:
        return _use_nonces(connection, [self])[0]


def _use_nonces(connection: Connection, uses: list[_NonceUse]) -> list[bool]:
    """Record several nonces as one write: one INSERT of all of them and one UPDATE per calling
    key of its hospital's last contact. Raises (IntegrityError) if any was seen before; the
    group commit then makes each on its own, so only the replay is refused."""
    for use in uses:
        if use.sweep_before is not None:
            connection.execute(delete(RequestNonce).where(RequestNonce.created_at < use.sweep_before))
    connection.execute(insert(RequestNonce), [{"key_id": u.kid, "nonce": u.nonce, "created_at": u.at}
                                              for u in uses])
    last: dict[str, datetime] = {}
    for use in uses:
        last[use.kid] = max(use.at, last.get(use.kid, use.at))
    for kid, at in last.items():
        connection.execute(update(Hospital).where(Hospital.signing_key_id == kid).values(last_contact_at=at))
    return [True] * len(uses)


class Registry:
    """Organisations, researchers, API keys, hospitals and their keys; token minting."""

    def __init__(self, journal: Journal, *, replay_window: timedelta = timedelta(seconds=300)) -> None:
        self.journal = journal
        self.replay_window = replay_window
        # token SHA-256 -> (principal, monotonic expiry). A revocation in this process clears it
        # at once; one made by another process (exchange admin) takes effect within the TTL.
        self._key_cache: dict[str, tuple[Principal, float]] = {}
        self._organisations: dict[str, Organisation] = {}  # immutable rows (see `organisation`)
        self._nonces_swept_at = float("-inf")  # monotonic time of the last expired-nonce sweep
        self.key_cache_ttl = 2.0

    def create_organisation(self, data: OrganisationCreate) -> Organisation:
        with self.journal.write() as session:
            if session.get(Organisation, data.id) is not None:
                raise problems.conflict(f"organisation {data.id!r} exists", "id")
            if session.scalar(select(Organisation).where(Organisation.name == data.name)):
                raise problems.conflict(f"an organisation is already named {data.name!r}", "name")
            org = Organisation(id=data.id, name=data.name, region=data.region, created_at=now())
            session.add(org)
            session.flush()
            self.journal.append(session, self.journal.sign("org.register", {"organisation": f"org:{data.id}",
                                                             "name": data.name, "region": data.region}))
        return org

    def list_organisations(self, offset: int, limit: int) -> tuple[list[Organisation], int]:
        with self.journal.read() as session:
            total = session.scalar(select(func.count()).select_from(Organisation)) or 0
            rows = session.scalars(select(Organisation).order_by(Organisation.id)
                                   .offset(offset).limit(limit)).all()
        return list(rows), total

    def create_researcher(self, organisation_id: str, data: ResearcherCreate) -> Researcher:
        with self.journal.write() as session:
            if session.get(Organisation, organisation_id) is None:
                raise problems.not_found(f"organisation {organisation_id!r}")
            if session.get(Researcher, data.id) is not None:
                raise problems.conflict(f"researcher {data.id!r} exists", "id")
            researcher = Researcher(id=data.id, organisation_id=organisation_id, name=data.name,
                                    created_at=now())
            session.add(researcher)
            session.flush()
            self.journal.append(session, self.journal.sign("researcher.register", {
                "researcher": data.id, "organisation": f"org:{organisation_id}"}))
        return researcher

    def issue_api_key(self, data: ApiKeyCreate) -> tuple[ApiKey, str]:
        errors = []
        if data.role == "researcher" and not (data.organisation_id and data.researcher_id):
            errors.append({"field": "researcher_id", "reason": "a researcher key needs organisation_id "
                           "and researcher_id"})
        if data.role != "researcher" and data.researcher_id:
            errors.append({"field": "researcher_id", "reason": f"a {data.role} key has no researcher"})
        if errors:
            raise problems.unprocessable(errors)
        with self.journal.write() as session:
            if data.organisation_id and session.get(Organisation, data.organisation_id) is None:
                raise problems.unprocessable([{"field": "organisation_id",
                                               "reason": f"no organisation {data.organisation_id!r}"}])
            if data.researcher_id:
                researcher = session.get(Researcher, data.researcher_id)
                if researcher is None or researcher.organisation_id != data.organisation_id:
                    raise problems.unprocessable([{"field": "researcher_id", "reason":
                                                   f"no researcher {data.researcher_id!r} in "
                                                   f"organisation {data.organisation_id!r}"}])
            prefix, token = new_api_key()
            key = ApiKey(prefix=prefix, secret_sha256=hash_secret(token), role=Role(data.role),
                         organisation_id=data.organisation_id, researcher_id=data.researcher_id,
                         label=data.label, created_at=now())
            session.add(key)
            session.flush()
            self.journal.append(session, self.journal.sign("apikey.issue", {
                "prefix": prefix, "role": data.role, "organisation": data.organisation_id,
                "researcher": data.researcher_id}))
        return key, token

    def revoke_api_key(self, prefix: str) -> ApiKey:
        with self.journal.write() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if key is None:
                raise problems.not_found(f"API key {prefix!r}")
            if key.revoked_at is not None:
                raise problems.conflict(f"API key {prefix!r} is already revoked")
            key.revoked_at = now()
            self.journal.append(session, self.journal.sign("apikey.revoke", {"prefix": prefix}))
        self._key_cache.clear()
        return key

    def list_api_keys(self, offset: int, limit: int) -> tuple[list[ApiKey], int]:
        with self.journal.read() as session:
            total = session.scalar(select(func.count()).select_from(ApiKey)) or 0
            rows = session.scalars(select(ApiKey).order_by(ApiKey.id).offset(offset).limit(limit)).all()
        return list(rows), total

    def cached_principal(self, token: str) -> Principal | None:
        """A recent successful authentication of this exact token, if still fresh (no I/O)."""
        hit = self._key_cache.get(hash_secret(token))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def authenticate_api_key(self, token: str) -> Principal | None:
        prefix = api_key_prefix(token)
        if prefix is None:
            return None
        with self.journal.read() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if key is None or key.revoked_at is not None:
            return None
        if not secrets.compare_digest(key.secret_sha256, hash_secret(token)):
            return None
        principal = Principal(role=key.role, ref=f"apikey:{prefix}", organisation_id=key.organisation_id,
                              researcher_id=key.researcher_id)
        if len(self._key_cache) > 10_000:
            self._key_cache.clear()
        self._key_cache[key.secret_sha256] = (principal, time.monotonic() + self.key_cache_ttl)
        return principal

    def register_hospital(self, data: HospitalCreate) -> Hospital:
        public = b64decode(data.signing_public_key)
        kid = key_id(public)
        with self.journal.write() as session:
            if session.get(Organisation, data.organisation_id) is None:
                raise problems.unprocessable([{"field": "organisation_id",
                                               "reason": f"no organisation {data.organisation_id!r}"}])
            if session.get(Hospital, data.id) is not None:
                raise problems.conflict(f"hospital {data.id!r} exists", "id")
            if session.scalar(select(Hospital).where(Hospital.signing_key_id == kid)) is not None:
                raise problems.conflict("this signing key is registered to another hospital",
                                        "signing_public_key")
            hospital = Hospital(id=data.id, organisation_id=data.organisation_id, name=data.name,
                                signing_public_key=data.signing_public_key, signing_key_id=kid,
                                flower_public_key=data.flower_public_key, created_at=now())
            session.add(hospital)
            session.flush()
            self.journal.append(
                session,
                self.journal.sign("key.register", hospital_key_payload(kid, data), operator=True),
                self.journal.sign("hospital.register", {
                    "hospital": f"hospital:{data.id}", "organisation": f"org:{data.organisation_id}",
                    "signing_key_id": kid,
                    "flower_public_key_sha256": hashlib.sha256(data.flower_public_key.encode()).hexdigest()}))
        return hospital

    def list_hospitals(self, offset: int, limit: int) -> tuple[list[Hospital], int]:
        with self.journal.read() as session:
            total = session.scalar(select(func.count()).select_from(Hospital)) or 0
            rows = session.scalars(select(Hospital).order_by(Hospital.id).offset(offset).limit(limit)).all()
        return list(rows), total

    def hospital_by_key(self, kid: str) -> Hospital | None:
        with self.journal.read() as session:
            return session.scalar(select(Hospital).where(Hospital.signing_key_id == kid))

    def get_hospital(self, hospital_id: str) -> Hospital:
        with self.journal.read() as session:
            hospital = session.get(Hospital, hospital_id)
        if hospital is None:
            raise problems.not_found(f"hospital {hospital_id!r}")
        return hospital

    def _nonce_use(self, kid: str, nonce: str) -> _NonceUse:
        """The write that records one request nonce (and the hospital's last contact); every
        `NONCE_SWEEP_S` one of them also deletes the nonces past twice the replay window."""
        at = now()
        clock = time.monotonic()
        sweep = None
        if clock - self._nonces_swept_at >= NONCE_SWEEP_S:
            self._nonces_swept_at = clock
            sweep = at - 2 * self.replay_window
        return _NonceUse(kid, nonce, at, sweep)

    async def use_nonce_async(self, kid: str, nonce: str) -> bool:
        """Record a request nonce; False if it was seen before (a replay). Through the group
        commit (SQLite: LoopGroupCommit on the event loop, no thread; PostgreSQL: GroupCommit's
        writer): nonces arriving together share one transaction and one fsync, and the call
        returns once its nonce is durable, so a request replayed after a restart is refused.
        Every signed hospital request records one: with 25 hospitals polling, one write
        transaction (and fsync) each was a fifth of the coordinator's CPU
        (docs/benchmarks/scale.md)."""
        batcher = self.journal.loop_batcher or self.journal.batcher
        try:
            await batcher.submit_async(self._nonce_use(kid, nonce), _use_nonces)
        except IntegrityError:
            return False
        return True

    def rotate_hospital_key(self, hospital: Hospital, entry: Entry) -> int:
        """A hospital replaces its signing key with a `key.rotate` entry signed by the old key."""
        payload = entry.payload
        problems_found = self.entry_problems(entry, "key.rotate", hospital)
        new_b64 = payload.get("new_public_key")
        new_id = payload.get("new_key_id")
        if entry.key_id != hospital.signing_key_id or payload.get("old_key_id") != hospital.signing_key_id:
            problems_found.append({"field": "payload.old_key_id",
                                   "reason": "must be this hospital's current key"})
        if not isinstance(new_b64, str) or not isinstance(new_id, str):
            problems_found.append({"field": "payload", "reason": "needs new_key_id and new_public_key"})
        if problems_found:
            raise problems.unprocessable(problems_found)
        assert isinstance(new_b64, str) and isinstance(new_id, str)
        with self.journal.write() as session:
            row = session.get(Hospital, hospital.id)
            assert row is not None
            if session.scalar(select(Hospital).where(Hospital.signing_key_id == new_id)) is not None:
                raise problems.conflict("the new key is already registered", "payload.new_key_id")
            (index,) = self.journal.append(session, entry)
            row.signing_public_key = new_b64
            row.signing_key_id = new_id
        return index

    # -- tokens (the ledger's own entries) --
    def balance(self, account: str) -> int:
        """`account`'s committed balance: the Ledger fold of the log."""
        with self.journal.read_engine.connect() as connection:
            return self.journal.ledger.balance(connection, account)

    def mint(self, account: str, amount: int) -> int:
        with self.journal.write() as session:
            (index,) = self.journal.append(session, self.journal.sign("token.mint", {"account": account,
                                                                       "amount": amount}, operator=True))
        return index

    def balances(self, accounts: list[str] | None = None) -> dict[str, Any]:
        """minted, escrow and balances (only `accounts` if given): the Ledger fold of the
        committed log, the very numbers an auditor folds from an export."""
        with self.journal.read_engine.connect() as connection:
            return self.journal.ledger.snapshot(connection, accounts)


    def entry_problems(self, entry: Entry, kind: str, hospital: Hospital) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []
        if entry.kind != kind:
            found.append({"field": "kind", "reason": f"expected {kind!r}, got {entry.kind!r}"})
        if entry.key_id != hospital.signing_key_id:
            found.append({"field": "key_id", "reason": "must be the calling hospital's signing key"})
            return found
        try:
            entry.verify_signature(b64decode(hospital.signing_public_key))
        except (SignatureInvalidError, ValueError):
            found.append({"field": "signature", "reason": "does not verify with the hospital's key"})
        return found


    def organisation(self, principal: Principal) -> Organisation:
        """The caller's organisation, from memory once read: organisations are only ever
        created (no update or delete path exists), so a cached row cannot go stale."""
        assert principal.organisation_id is not None
        cached = self._organisations.get(principal.organisation_id)
        if cached is None:
            with self.journal.read() as session:
                cached = session.get(Organisation, principal.organisation_id)
            if cached is None:
                raise problems.forbidden("the caller's organisation does not exist")
            self._organisations[principal.organisation_id] = cached
        return cached
