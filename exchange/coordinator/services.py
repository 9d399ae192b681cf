"""The coordinator's state changes, each with its audit entries in the same transaction.

Every method that changes state opens ONE write transaction, makes the change, signs the
entries that record it, appends them with `audit.store.AuditLog.append_in` (same connection), and
commits. If the log refuses an entry or anything fails, the transaction rolls back and nothing
is acknowledged. Reads use a separate engine (no write lock).

Signers: `key.register`/`key.revoke` and `token.mint` need an operator key (the keyring and
the ledger say so); everything else the coordinator states is signed with its own
`coordinator` key, registered by the operator key on first start. Hospitals' decisions and
receipts are their own signed entries, appended unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit.entry import Entry, sign_entry
from audit.ledger import Ledger
from audit.rewards import PayoutError
from audit.signing import SignatureInvalidError, Signer, b64decode, key_id
from audit.store import AuditLog, DuplicateEntryError, EntryRefusedError
from exchange.coordinator import problems
from exchange.coordinator.auditing import LEDGER_KINDS, LedgerFoldError, LedgerView, active_key
from exchange.coordinator.group_commit import GroupCommit, LoopGroupCommit
from exchange.coordinator.models import (
    TERMINAL_STATUSES,
    ApiKey,
    DecisionKind,
    Hospital,
    Organisation,
    ReceiptRow,
    RequestNonce,
    Researcher,
    Role,
    Study,
    StudyDecision,
    StudyRound,
    StudyStatus,
)
from exchange.coordinator.schemas import (
    ApiKeyCreate,
    HospitalCreate,
    OrganisationCreate,
    ResearcherCreate,
    StudyCreate,
)
from exchange.logging import get_logger
from exchange.study.runners import RunHandle, RunHospital, RunRequest, StudyRunner
from exchange.study.spec import AcceptedStudy, study_spec

log = get_logger("exchange.coordinator")
T = TypeVar("T")
API_KEY_PREFIX_BYTES = 6
API_KEY_SECRET_BYTES = 32


def _study_view_statement() -> Any:
    """GET /v1/studies/{id}'s statement, built once: see Coordinator.get_study."""
    t, d, r = Study.__table__.c, StudyDecision.__table__.c, StudyRound.__table__.c
    rounds = (select(func.count()).select_from(StudyRound.__table__)
              .where(r.study_id == t.id, r.failed.is_(False)).scalar_subquery())
    # A failed round (its receipts are logged) is not a completed one.
    return (select(*(t[name] for name in Coordinator._STUDY_COLUMNS),
                   rounds.label("rounds_completed"), d.hospital_id, d.decision, d.reasons,
                   d.eligible_records, d.decided_at, d.late)
            .select_from(Study.__table__.outerjoin(StudyDecision.__table__, d.study_id == t.id))
            .where(t.id == bindparam("study_id"))
            .order_by(d.hospital_id))


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `ref` identifies the credential in logs (never the secret)."""

    role: Role
    ref: str
    organisation_id: str | None = None
    researcher_id: str | None = None
    hospital_id: str | None = None


@dataclass(frozen=True)
class Terms:
    """Payout terms snapshotted into each study's escrow entry (docs/rewards.md)."""

    forward_bps: int = 3000
    royalties: Mapping[str, tuple[str, int]] | None = None  # template -> (account, bps)


def now() -> datetime:
    return datetime.now(UTC)


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


class Coordinator:
    """State changes and queries; the Litestar routes are thin wrappers around these."""

    def __init__(self, read_engine: Engine, write_engine: Engine, audit_log: AuditLog, *,
                 operator: Signer, coordinator: Signer, runner: StudyRunner,
                 terms: Terms | None = None, replay_window: timedelta = timedelta(seconds=300)) -> None:
        self.read_engine = read_engine
        self.write_engine = write_engine
        self.audit_log = audit_log
        self.operator = operator
        self.coordinator = coordinator
        self.runner = runner
        self.terms = terms or Terms()
        self.replay_window = replay_window
        self.handles: dict[str, RunHandle] = {}
        self._handles_lock = threading.Lock()
        self.on_change: Callable[[str], None] = lambda _kind: None
        # token SHA-256 -> (principal, monotonic expiry). A revocation in this process clears it
        # at once; one made by another process (exchange admin) takes effect within the TTL.
        self._key_cache: dict[str, tuple[Principal, float]] = {}
        self._organisations: dict[str, Organisation] = {}  # immutable rows (see _organisation)
        self.key_cache_ttl = 2.0
        # Balances, escrows and payout terms: the auditor's fold of the log (audit.ledger).
        self.ledger = LedgerView(operator.key_id)
        self._batcher = GroupCommit(self.write_engine, after_commit=self._after_commit)
        # SQLite submissions from the event loop: statements on the loop (see LoopGroupCommit).
        self._loop_batcher = (LoopGroupCommit(self.write_engine, after_commit=self._after_commit)
                              if self.write_engine.dialect.name == "sqlite" else None)
        # SQLite reads are in-process work with no network wait: an async route may run them
        # on the event loop instead of handing them to a worker thread (see `read_async`).
        self.reads_on_loop = self.read_engine.dialect.name == "sqlite"

    # ------------------------------------------------------------------ plumbing
    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction (BEGIN IMMEDIATE on SQLite via the write engine)."""
        with Session(self.write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self.read_engine, expire_on_commit=False) as session:
            yield session

    def _append(self, transaction: Session | Connection, *entries: Entry) -> list[int]:
        """Append in the session's (or connection's) transaction; then fold the new ledger
        entries so that one the auditor's Ledger would reject is refused and rolled back here."""
        connection = transaction.connection() if isinstance(transaction, Session) else transaction
        try:
            indexes = self.audit_log.append_in(connection, list(entries))
        except DuplicateEntryError as exc:
            raise problems.ProblemError(409, str(exc), kind="duplicate-entry") from exc
        except EntryRefusedError as exc:
            raise problems.ProblemError(422, str(exc), kind="entry-refused") from exc
        if indexes:
            self.ledger.note_append(connection, indexes[0])
        if any(entry.kind in LEDGER_KINDS for entry in entries) or \
                self.ledger.has_copy(connection):  # keep the copy level with the log
            try:
                self.ledger.in_transaction(connection, (indexes[0], entries) if indexes else None)
            except LedgerFoldError as exc:
                raise problems.ProblemError(422, f"the ledger refuses the entry: {exc}",
                                            kind="ledger-refused") from exc
        return indexes

    def _after_commit(self, connection: Connection, transaction: object) -> None:
        """The writer's transaction committed: its ledger fold and the log's key state and tree
        edge describe the committed log now (the next transaction starts from them)."""
        self.ledger.after_commit(connection)
        self.audit_log.after_commit(connection, transaction)

    def _ledger(self, transaction: Session | Connection) -> Ledger:
        """The ledger fold as this write transaction sees the log (its own appends included)."""
        connection = transaction.connection() if isinstance(transaction, Session) else transaction
        return self.ledger.in_transaction(connection)

    def _sign(self, kind: str, payload: dict[str, Any], *, operator: bool = False) -> Entry:
        return sign_entry(self.operator if operator else self.coordinator, kind, payload, now())

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread (the app's shutdown)."""
        self._batcher.close()
        if self._loop_batcher is not None:
            self._loop_batcher.close()

    def bootstrap(self) -> None:
        """Register the coordinator key in the log (once), signed by the operator key, and fold
        the ledger from the log (the start-up rebuild; later folds are incremental)."""
        with self.read_engine.connect() as connection:
            self.ledger.refresh(connection)
        with self.write() as session:
            if active_key(session.connection(), self.operator.public_key,
                          self.coordinator.key_id) is not None:
                return
            self._append(session, self._sign("key.register", {
                "key_id": self.coordinator.key_id, "public_key": self.coordinator.public_key_b64,
                "role": "coordinator", "owner": "operator:coordinator"}, operator=True))

    # ------------------------------------------------------------------ registry
    def create_organisation(self, data: OrganisationCreate) -> Organisation:
        with self.write() as session:
            if session.get(Organisation, data.id) is not None:
                raise problems.conflict(f"organisation {data.id!r} exists", "id")
            if session.scalar(select(Organisation).where(Organisation.name == data.name)):
                raise problems.conflict(f"an organisation is already named {data.name!r}", "name")
            org = Organisation(id=data.id, name=data.name, region=data.region, created_at=now())
            session.add(org)
            session.flush()
            self._append(session, self._sign("org.register", {"organisation": f"org:{data.id}",
                                                             "name": data.name, "region": data.region}))
        return org

    def list_organisations(self, offset: int, limit: int) -> tuple[list[Organisation], int]:
        with self.read() as session:
            total = session.scalar(select(func.count()).select_from(Organisation)) or 0
            rows = session.scalars(select(Organisation).order_by(Organisation.id)
                                   .offset(offset).limit(limit)).all()
        return list(rows), total

    def create_researcher(self, organisation_id: str, data: ResearcherCreate) -> Researcher:
        with self.write() as session:
            if session.get(Organisation, organisation_id) is None:
                raise problems.not_found(f"organisation {organisation_id!r}")
            if session.get(Researcher, data.id) is not None:
                raise problems.conflict(f"researcher {data.id!r} exists", "id")
            researcher = Researcher(id=data.id, organisation_id=organisation_id, name=data.name,
                                    created_at=now())
            session.add(researcher)
            session.flush()
            self._append(session, self._sign("researcher.register", {
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
        with self.write() as session:
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
            self._append(session, self._sign("apikey.issue", {
                "prefix": prefix, "role": data.role, "organisation": data.organisation_id,
                "researcher": data.researcher_id}))
        return key, token

    def revoke_api_key(self, prefix: str) -> ApiKey:
        with self.write() as session:
            key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
            if key is None:
                raise problems.not_found(f"API key {prefix!r}")
            if key.revoked_at is not None:
                raise problems.conflict(f"API key {prefix!r} is already revoked")
            key.revoked_at = now()
            self._append(session, self._sign("apikey.revoke", {"prefix": prefix}))
        self._key_cache.clear()
        return key

    def list_api_keys(self, offset: int, limit: int) -> tuple[list[ApiKey], int]:
        with self.read() as session:
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
        with self.read() as session:
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
        with self.write() as session:
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
            self._append(
                session,
                self._sign("key.register", {"key_id": kid, "public_key": data.signing_public_key,
                                            "role": "hospital", "owner": f"hospital:{data.id}"},
                           operator=True),
                self._sign("hospital.register", {
                    "hospital": f"hospital:{data.id}", "organisation": f"org:{data.organisation_id}",
                    "signing_key_id": kid,
                    "flower_public_key_sha256": hashlib.sha256(data.flower_public_key.encode()).hexdigest()}))
        return hospital

    def list_hospitals(self, offset: int, limit: int) -> tuple[list[Hospital], int]:
        with self.read() as session:
            total = session.scalar(select(func.count()).select_from(Hospital)) or 0
            rows = session.scalars(select(Hospital).order_by(Hospital.id).offset(offset).limit(limit)).all()
        return list(rows), total

    def hospital_by_key(self, kid: str) -> Hospital | None:
        with self.read() as session:
            return session.scalar(select(Hospital).where(Hospital.signing_key_id == kid))

    def get_hospital(self, hospital_id: str) -> Hospital:
        with self.read() as session:
            hospital = session.get(Hospital, hospital_id)
        if hospital is None:
            raise problems.not_found(f"hospital {hospital_id!r}")
        return hospital

    def use_nonce(self, kid: str, nonce: str) -> bool:
        """Record a request nonce; False if it was seen before (a replay). Old ones expire."""
        try:
            with self.write() as session:
                session.execute(delete(RequestNonce).where(
                    RequestNonce.created_at < now() - 2 * self.replay_window))
                session.add(RequestNonce(key_id=kid, nonce=nonce, created_at=now()))
        except IntegrityError:
            return False
        return True

    def rotate_hospital_key(self, hospital: Hospital, entry: Entry) -> int:
        """A hospital replaces its signing key with a `key.rotate` entry signed by the old key."""
        payload = entry.payload
        problems_found = self._entry_problems(entry, "key.rotate", hospital)
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
        with self.write() as session:
            row = session.get(Hospital, hospital.id)
            assert row is not None
            if session.scalar(select(Hospital).where(Hospital.signing_key_id == new_id)) is not None:
                raise problems.conflict("the new key is already registered", "payload.new_key_id")
            (index,) = self._append(session, entry)
            row.signing_public_key = new_b64
            row.signing_key_id = new_id
        return index

    # ------------------------------------------------------------------ ledger
    def balance(self, account: str) -> int:
        """`account`'s committed balance: the Ledger fold of the log."""
        with self.read_engine.connect() as connection:
            return self.ledger.balance(connection, account)

    def mint(self, account: str, amount: int) -> int:
        with self.write() as session:
            (index,) = self._append(session, self._sign("token.mint", {"account": account,
                                                                       "amount": amount}, operator=True))
        return index

    def balances(self, accounts: list[str] | None = None) -> dict[str, Any]:
        """minted, escrow and balances (only `accounts` if given): the Ledger fold of the
        committed log, the very numbers an auditor folds from an export."""
        with self.read_engine.connect() as connection:
            return self.ledger.snapshot(connection, accounts)

    # ------------------------------------------------------------------ studies
    def budget_problem(self, principal: Principal, budget: int) -> str | None:
        available = self.balance(f"org:{principal.organisation_id}")
        if budget > available:
            return f"token budget {budget} exceeds the organisation's balance {available}"
        return None

    def submit_study(self, principal: Principal, data: StudyCreate) -> SubmittedStudy:
        """Submit with escrow. Concurrent submissions share one commit (group commit): each
        runs in its own savepoint, so one refusal rolls back only itself, and none is
        acknowledged before the shared commit is durable.

        Only what depends on the log's state runs in the shared, serialised writer: the balance
        check, the append (with its ledger fold) and the study row. The checks of the request
        itself and the signing of both entries run first, in the caller's thread, concurrently
        with the writer's commits (their content does not depend on the log: a study id, the
        organisation, the spec, the budget, the payout terms)."""
        write = self._prepare_submission(principal, data, self._organisation(principal))
        study: SubmittedStudy = self._batcher.run(write, self._submit_many_in)
        self.on_change("study.submit")
        return study

    async def submit_study_async(self, principal: Principal, data: StudyCreate) -> SubmittedStudy:
        """`submit_study` for the event loop: the request checks and the two signatures run on
        the loop; the write is awaited without a thread of its own (SQLite: LoopGroupCommit,
        the batch's statements on the loop; PostgreSQL: GroupCommit's writer thread)."""
        org = self._organisations.get(principal.organisation_id or "")
        if org is None:  # first submission of this organisation: one read, off the loop
            org = await asyncio.to_thread(self._organisation, principal)
        write = self._prepare_submission(principal, data, org)
        batcher = self._loop_batcher or self._batcher
        study: SubmittedStudy = await batcher.submit_async(write, self._submit_many_in)
        self.on_change("study.submit")
        return study

    def _prepare_submission(self, principal: Principal, data: StudyCreate,
                            org: Organisation) -> _Submission:
        account = f"org:{org.id}"
        study_id = f"st-{uuid.uuid4().hex[:20]}"
        spec = data.model_dump(mode="json")
        self._check_federated_spec(study_id, spec, org, principal, data)
        royalty = (self.terms.royalties or {}).get(data.template)
        public_spec = {k: v for k, v in spec.items() if k != "token_budget"}
        entries = (
            self._sign("study.submit", {"study_id": study_id, "organisation": account,
                                        "region": org.region, "spec": public_spec}),
            self._sign("study.escrow", {
                "study_id": study_id, "account": account, "amount": data.token_budget,
                "royalty_account": royalty[0] if royalty else None,
                "royalty_bps": royalty[1] if royalty else 0,
                "forward_bps": self.terms.forward_bps}))
        return _Submission(self, principal, data, study_id, spec, entries)

    def _organisation(self, principal: Principal) -> Organisation:
        """The caller's organisation, from memory once read: organisations are only ever
        created (no update or delete path exists), so a cached row cannot go stale."""
        assert principal.organisation_id is not None
        cached = self._organisations.get(principal.organisation_id)
        if cached is None:
            with self.read() as session:
                cached = session.get(Organisation, principal.organisation_id)
            if cached is None:
                raise problems.forbidden("the caller's organisation does not exist")
            self._organisations[principal.organisation_id] = cached
        return cached

    def _submit_in(self, connection: Connection, submission: _Submission) -> SubmittedStudy:
        """One submission in its own savepoint: the balance check with a clear answer, the
        append, the study row."""
        principal, data = submission.principal, submission.data
        account = f"org:{principal.organisation_id}"
        # A first check for a clear answer; the escrow entry's fold (in _append, under the
        # log's write lock) is the one that counts if another escrow raced this one.
        available = self._ledger(connection).balance(account)
        if data.token_budget > available:
            raise problems.unprocessable([{"field": "token_budget", "reason":
                                           f"token budget {data.token_budget} exceeds the "
                                           f"organisation's balance {available}"}])
        indexes = self._append(connection, *submission.entries)
        # The row is inserted after the append, with the entry index it records: one INSERT
        # instead of INSERT + UPDATE. Same transaction (savepoint), so a failure of either
        # still rolls back both.
        row = submission.row(indexes[0])
        # A Core INSERT (far cheaper than the ORM's add + flush unit of work); the caller gets the
        # values it wrote (it only reads them: submitted_view), not an ORM instance.
        connection.execute(_STUDY_INSERT, row)
        return SubmittedStudy(**row)

    def _submit_many_in(self, connection: Connection,
                        submissions: list[_Submission]) -> list[SubmittedStudy]:
        """Several submissions as one write (GroupCommit's `together`): ONE append of all their
        entries, in order, and one INSERT of all their rows.

        No balance pre-check here: the ledger fold of the appended escrows (in `_append`) is
        the rule, and if any escrow overdraws, it raises; the group commit then rolls this back
        and makes each submission on its own (`_submit_in`), which refuses that one with its
        reason. The same happens for anything else that fails."""
        indexes = self._append(connection, *(e for s in submissions for e in s.entries))
        rows, position = [], 0
        for submission in submissions:
            rows.append(submission.row(indexes[position]))
            position += len(submission.entries)
        connection.execute(_STUDY_INSERT, rows)  # executemany (a multi-row VALUES statement
        # is compiled anew on every call by SQLAlchemy: dearer than the executemany)
        return [SubmittedStudy(**row) for row in rows]

    @staticmethod
    def _check_federated_spec(study_id: str, spec: dict[str, Any], org: Organisation,
                              principal: Principal, data: StudyCreate) -> None:
        """Build the run's StudySpec (and its consent StudyRequest) now, so that a study the
        federated runner or a hospital's consent engine would refuse is refused at submission,
        with its reasons, rather than failing when it starts."""
        from pydantic import ValidationError

        try:
            study_spec(AcceptedStudy(study_id=study_id, spec=spec, organisation_id=org.id,
                                     region=org.region, researcher_id=principal.researcher_id))
        except ValidationError as exc:
            raise problems.unprocessable([
                {"field": ".".join(str(p) for p in error["loc"]) or "body", "reason": error["msg"]}
                for error in exc.errors()]) from exc
        except ValueError as exc:
            raise problems.unprocessable([{"field": "body", "reason": str(exc)}]) from exc

    def _visible_study(self, session: Session, principal: Principal, study_id: str) -> Study:
        study = session.get(Study, study_id)
        if study is None:
            raise problems.not_found(f"study {study_id!r}")
        if principal.role == Role.RESEARCHER and study.organisation_id != principal.organisation_id:
            # Same answer as a missing study: no probing of other organisations' ids.
            raise problems.not_found(f"study {study_id!r}")
        return study

    _STUDY_COLUMNS = ("id", "title", "organisation_id", "status", "spec", "token_budget", "min_hospitals",
                      "rounds_planned", "submitted_at", "started_at", "finished_at", "outcome_reason",
                      "model_sha256")

    def submitted_view(self, study: SubmittedStudy) -> dict[str, Any]:
        """What `get_study` answers for a study `submit_study` just committed, without reading it
        back: a new study has no decisions and no rounds yet, and every other field is the row
        this process wrote. Saves a read connection and two queries on the hot POST path;
        tests/exchange/test_lifecycle.py and the benchmark check both give the same StudyOut."""
        out = {name: getattr(study, name) for name in self._STUDY_COLUMNS}
        out.update(rounds_completed=0, decisions=[], approvals=0, refusals=0)
        return out

    async def read_async(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, a short read, from a coroutine: on the loop itself on SQLite (a thread
        hand-off, and the GIL hand-overs that come with it, cost more than an indexed read
        there: docs/benchmarks/api.md), on a worker thread on PostgreSQL (network waits)."""
        if self.reads_on_loop:
            return fn(*args)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    def get_study(self, principal: Principal, study_id: str) -> dict[str, Any]:
        """One study with its decisions and progress: ONE prebuilt Core statement (the hot
        read path: no statement building per call, no ORM identity map, the model blob never
        loaded). The study LEFT JOIN its decisions gives one row per decision (one row with
        NULL decision columns when there is none); the completed rounds come as a scalar
        subquery on each row."""
        with self.read_engine.connect() as connection:
            rows = connection.execute(_STUDY_VIEW, {"study_id": study_id}).all()
        if not rows or (principal.role == Role.RESEARCHER
                        and rows[0].organisation_id != principal.organisation_id):
            # Same answer as a missing study: no probing of other organisations' ids.
            raise problems.not_found(f"study {study_id!r}")
        first = rows[0]
        out = {name: getattr(first, name) for name in self._STUDY_COLUMNS}
        out["rounds_completed"] = first.rounds_completed
        decisions = [{"hospital_id": r.hospital_id, "decision": r.decision, "reasons": r.reasons,
                      "eligible_records": r.eligible_records, "decided_at": r.decided_at,
                      "late": r.late} for r in rows if r.hospital_id is not None]
        out["decisions"] = decisions
        # approvals/refusals: the decisions that counted for the start; late ones are listed
        # (with their reasons) but changed nothing.
        out["approvals"] = sum(x["decision"] == DecisionKind.APPROVE and not x["late"] for x in decisions)
        out["refusals"] = sum(x["decision"] == DecisionKind.REFUSE and not x["late"] for x in decisions)
        return out

    def list_studies(self, principal: Principal, status: StudyStatus | None, offset: int,
                     limit: int) -> tuple[list[Study], int]:
        query = select(Study)
        if principal.role == Role.RESEARCHER:
            query = query.where(Study.organisation_id == principal.organisation_id)
        if status is not None:
            query = query.where(Study.status == status)
        with self.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(Study.submitted_at, Study.id).offset(offset)
                                   .limit(limit)).all()
        return list(rows), total

    def hospital_studies(self, hospital: Hospital, which: str, offset: int,
                         limit: int) -> tuple[list[dict[str, Any]], int]:
        decided = select(StudyDecision.study_id).where(StudyDecision.hospital_id == hospital.id)
        query = select(Study, Organisation.region).join(
            Organisation, Organisation.id == Study.organisation_id)
        if which == "pending":
            query = query.where(Study.status == StudyStatus.SUBMITTED, Study.id.not_in(decided))
        elif which == "open":
            query = query.where(Study.status.in_([StudyStatus.SUBMITTED, StudyStatus.RUNNING]))
        with self.read() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.order_by(Study.submitted_at, Study.id).offset(offset)
                                   .limit(limit)).all()
            mine = {d.study_id: d.decision for d in session.scalars(
                select(StudyDecision).where(StudyDecision.hospital_id == hospital.id,
                                            StudyDecision.study_id.in_([r[0].id for r in rows])))}
        items = [{"id": s.id, "organisation_id": s.organisation_id, "organisation_region": region,
                  "researcher_id": s.researcher_id, "status": s.status,
                  "spec": {k: v for k, v in s.spec.items() if k != "token_budget"},
                  "min_hospitals": s.min_hospitals, "rounds_planned": s.rounds_planned,
                  "submitted_at": s.submitted_at, "my_decision": mine.get(s.id)} for s, region in rows]
        return items, total

    def _entry_problems(self, entry: Entry, kind: str, hospital: Hospital) -> list[dict[str, str]]:
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

    def decide(self, hospital: Hospital, study_id: str, entry: Entry) -> int:
        """Record a hospital's signed `study.decision`; start the run when enough approved."""
        payload = entry.payload
        found = self._entry_problems(entry, "study.decision", hospital)
        expected = {"study_id", "hospital", "decision", "reasons", "eligible_records"}
        if set(payload) != expected:
            found.append({"field": "payload", "reason": f"fields must be exactly {sorted(expected)}"})
        if payload.get("study_id") != study_id:
            found.append({"field": "payload.study_id", "reason": "does not match the study in the URL"})
        if payload.get("hospital") != f"hospital:{hospital.id}":
            found.append({"field": "payload.hospital", "reason": f"must be 'hospital:{hospital.id}'"})
        if payload.get("decision") not in ("approve", "refuse"):
            found.append({"field": "payload.decision", "reason": "must be 'approve' or 'refuse'"})
        reasons = payload.get("reasons")
        if not isinstance(reasons, list) or not all(isinstance(r, str) and 0 < len(r) <= 500
                                                    for r in reasons) or len(reasons) > 50:
            found.append({"field": "payload.reasons", "reason": "must be a list of up to 50 strings"})
        elif payload.get("decision") == "refuse" and not reasons:
            found.append({"field": "payload.reasons", "reason": "a refusal needs at least one reason"})
        eligible = payload.get("eligible_records")
        if eligible is not None and (not isinstance(eligible, int) or isinstance(eligible, bool)
                                     or eligible < 0):
            found.append({"field": "payload.eligible_records", "reason": "must be null or an integer >= 0"})
        if found:
            raise problems.unprocessable(found)
        start = False
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None:
                raise problems.not_found(f"study {study_id!r}")
            # One decision per hospital and study, late or not: a retry or replay is refused.
            if session.scalar(select(StudyDecision).where(StudyDecision.study_id == study_id,
                                                         StudyDecision.hospital_id == hospital.id)):
                raise problems.conflict(f"hospital {hospital.id!r} already decided on {study_id!r}")
            late = study.status != StudyStatus.SUBMITTED
            if late and payload["decision"] != DecisionKind.REFUSE:
                # A late approval cannot join the run, and the node daemon reads this 409 as
                # "not joined" (exchange/node/daemon.py): refused, nothing recorded.
                raise problems.conflict(f"study {study_id!r} is {study.status.value}; decisions are "
                                        "closed")
            # A late refusal is recorded (log entry and row, `late`) so its reasons reach the
            # researcher; it changes nothing about the study.
            (index,) = self._append(session, entry)
            session.add(StudyDecision(study_id=study_id, hospital_id=hospital.id,
                                      decision=DecisionKind(payload["decision"]), reasons=list(reasons or []),
                                      eligible_records=eligible, decided_at=now(), entry_index=index,
                                      late=late))
            session.flush()
            if not late:
                approvals = session.scalar(select(func.count()).select_from(StudyDecision).where(
                    StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                    StudyDecision.late.is_(False))) or 0
                start = approvals >= study.min_hospitals
        if late:
            log.info("study.decision.late", study_id=study_id, hospital=hospital.id,
                     status=study.status.value)
        self.on_change("study.decision")
        if start:
            self.start_study(study_id)
        return index

    def start_study(self, study_id: str) -> None:
        """Mark the study running (with its entry) and hand it to the runner."""
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status != StudyStatus.SUBMITTED:
                return
            approved = session.scalars(select(Hospital).join(
                StudyDecision, StudyDecision.hospital_id == Hospital.id).where(
                StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                StudyDecision.late.is_(False)).order_by(Hospital.id)).all()
            study.status = StudyStatus.RUNNING
            study.started_at = now()
            self._append(session, self._sign("study.start", {
                "study_id": study_id, "hospitals": [f"hospital:{h.id}" for h in approved],
                "rounds": study.rounds_planned}))
            request = RunRequest(study_id=study_id, spec=dict(study.spec),
                                 hospitals=tuple(RunHospital(h.id, h.signing_key_id, h.signing_public_key,
                                                             h.flower_public_key) for h in approved),
                                 rounds=study.rounds_planned, min_hospitals=study.min_hospitals,
                                 organisation_id=study.organisation_id,
                                 region=session.get(Organisation, study.organisation_id).region,  # type: ignore[union-attr]
                                 researcher_id=study.researcher_id)
        try:
            handle = self.runner.start(request, self)
        except Exception as exc:
            self.on_failed(study_id, f"the run could not start: {exc}")
            return
        with self._handles_lock:
            self.handles[study_id] = handle
        log.info("study.start", study_id=study_id, hospitals=len(request.hospitals))

    def cancel_study(self, principal: Principal, study_id: str, reason: str) -> dict[str, Any]:
        with self.write() as session:
            # Lock the row first (PostgreSQL: a completion racing this cancel waits, and the
            # status read below is the committed one), then check who may see it.
            session.get(Study, study_id, with_for_update=True, populate_existing=True)
            study = self._visible_study(session, principal, study_id)
            if study.status in TERMINAL_STATUSES:
                raise problems.conflict(f"study {study_id!r} is already {study.status.value}")
            was_running = study.status == StudyStatus.RUNNING
            self._close(session, study, StudyStatus.CANCELLED, reason, "study.cancel")
        if was_running:
            with self._handles_lock:
                handle = self.handles.pop(study_id, None)
            if handle is not None:
                handle.cancel()
        return self.get_study(principal, study_id)

    def _close(self, session: Session, study: Study, status: StudyStatus, reason: str,
               kind: str) -> None:
        """Failure or cancellation: the entry, then the refund of what was not paid out."""
        study.status = status
        study.finished_at = now()
        study.outcome_reason = reason
        escrow = self._ledger(session).studies.get(study.id)
        entries = [self._sign(kind, {"study_id": study.id, "reason": reason})]
        if escrow is not None and escrow.held > 0:
            entries.append(self._sign("study.refund", {"study_id": study.id, "account": escrow.account,
                                                       "amount": escrow.held}))
        self._append(session, *entries)

    # ------------------------------------------------------------------ observer (runner)
    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Entry]) -> None:
        """Record one round the run reports, with its receipts, in one transaction.

        - Receipts count only from a registered hospital, signed with its current key, that
          APPROVED this study in time (a second line of defence behind GuardedObserver); others
          are skipped with a log line, never appended.
        - A failed round (`metrics["round_failed"] == 1.0`, sent right before `on_failed`):
          receipts and `study.round` are logged as usual, the round row is flagged `failed`
          (not a completed round). The study then fails and is refunded, so they pay nothing.
        - A cancelled study's in-flight round: hospitals trained and spent privacy before the
          stop reached them. The escrow is already refunded (the ledger takes no receipt after
          that), so each receipt is logged wrapped in a coordinator-signed `study.unpaid_receipt`
          entry (the hospital's signed envelope inside, verifiable) and kept as a receipt row
          for the researcher's results; nothing is paid, no round is recorded.
        """
        failed = metrics.get("round_failed") == 1.0
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status not in (StudyStatus.RUNNING, StudyStatus.CANCELLED):
                return
            cancelled = study.status == StudyStatus.CANCELLED
            approved_ids = set(session.scalars(select(StudyDecision.hospital_id).where(
                StudyDecision.study_id == study_id, StudyDecision.decision == DecisionKind.APPROVE,
                StudyDecision.late.is_(False))))
            appended: list[Entry] = []
            hospitals: list[str] = []
            for entry in receipts:
                hospital_id = str(entry.payload.get("hospital", "")).removeprefix("hospital:")
                hospital = session.get(Hospital, hospital_id)
                if hospital is None or entry.key_id != hospital.signing_key_id:
                    log.warning("receipt.ignored", study_id=study_id, round=round_number,
                                reason="unknown hospital or key")
                    continue
                if hospital_id not in approved_ids:
                    log.warning("receipt.ignored", study_id=study_id, round=round_number,
                                hospital=hospital_id, reason="hospital did not approve this study")
                    continue
                if hospital_id in hospitals or session.scalar(select(ReceiptRow.id).where(
                        ReceiptRow.study_id == study_id, ReceiptRow.round == round_number,
                        ReceiptRow.hospital_id == hospital_id)) is not None:
                    continue  # already delivered (by the hospital itself, or twice in this call)
                appended.append(entry)
                hospitals.append(hospital_id)
            if cancelled:
                if not appended:
                    return
                wrappers = [self._sign("study.unpaid_receipt", {
                    "study_id": study_id, "round": round_number, "hospital": f"hospital:{h}",
                    "reason": "the study was cancelled (and refunded) before this round was "
                              "reported: evidence of privacy spent, not paid",
                    "receipt": entry.to_json()}) for entry, h in zip(appended, hospitals, strict=True)]
                indexes = self._append(session, *wrappers)
                for entry, hospital_id, index in zip(appended, hospitals, indexes, strict=True):
                    session.add(_receipt_row(study_id, hospital_id, entry, index))
            else:
                round_entry = self._sign("study.round", {
                    "study_id": study_id, "round": round_number, "metrics": dict(metrics),
                    "hospitals": [f"hospital:{h}" for h in hospitals]})
                indexes = self._append(session, *appended, round_entry)
                for entry, hospital_id, index in zip(appended, hospitals, indexes, strict=False):
                    session.add(_receipt_row(study_id, hospital_id, entry, index))
                session.add(StudyRound(study_id=study_id, round=round_number, metrics=dict(metrics),
                                       finished_at=now(), entry_index=indexes[-1], failed=failed))
        if cancelled:
            log.info("round.after_cancel", study_id=study_id, round=round_number, receipts=len(appended))
        self.on_change("study.round")

    def record_receipt(self, hospital: Hospital, entry: Entry) -> int:
        """A hospital delivers its own signed `round.receipt` (e.g. when the run could not)."""
        from federated.receipts import ReceiptError, parse_receipt

        found = self._entry_problems(entry, "round.receipt", hospital)
        try:
            receipt = parse_receipt(entry, hospital_id=hospital.id)
        except ReceiptError as exc:
            found.append({"field": "payload", "reason": str(exc)})
        if found:
            raise problems.unprocessable(found)
        study_id, round_number = receipt.study_id, receipt.round
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None:
                raise problems.not_found(f"study {study_id!r}")
            if study.status != StudyStatus.RUNNING:
                raise problems.conflict(f"study {study_id!r} is {study.status.value}; receipts are closed")
            approved = session.scalar(select(StudyDecision.id).where(
                StudyDecision.study_id == study_id, StudyDecision.hospital_id == hospital.id,
                StudyDecision.decision == DecisionKind.APPROVE, StudyDecision.late.is_(False)))
            if approved is None:
                raise problems.forbidden(f"hospital {hospital.id!r} did not join study {study_id!r}")
            if session.scalar(select(ReceiptRow.id).where(
                    ReceiptRow.study_id == study_id, ReceiptRow.round == round_number,
                    ReceiptRow.hospital_id == hospital.id)) is not None:
                raise problems.conflict(f"a receipt for round {round_number} is already recorded")
            (index,) = self._append(session, entry)
            session.add(_receipt_row(study_id, hospital.id, entry, index))
        return index

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        digest = hashlib.sha256(model).hexdigest()
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status != StudyStatus.RUNNING:
                return
            study.status = StudyStatus.COMPLETED
            study.finished_at = now()
            study.model = model
            study.model_sha256 = digest
            study.outcome_reason = None
            entries = [self._sign("study.complete", {"study_id": study_id, "model_sha256": digest,
                                                     "metrics": dict(metrics)})]
            # The payout the auditor's fold expects: the terms recorded in the study's
            # study.escrow entry and the receipts in the log, never today's settings.
            ledger = self._ledger(session)
            escrow = ledger.studies.get(study_id)
            try:
                if escrow is None:
                    raise PayoutError(f"study_id: no study.escrow for {study_id!r}")
                payout = ledger.expected_payout(study_id, escrow.held)
            except PayoutError as exc:
                # Nothing was trained on (no records): nothing to pay for, refund instead.
                study.outcome_reason = f"no payout: {exc}"
                if escrow is not None and escrow.held > 0:
                    entries.append(self._sign("study.refund", {
                        "study_id": study_id, "account": escrow.account, "amount": escrow.held}))
            else:
                entries.append(self._sign("study.payout", payout))
            self._append(session, *entries)
        with self._handles_lock:
            self.handles.pop(study_id, None)
        self.on_change("study.complete")
        log.info("study.complete", study_id=study_id, model_sha256=digest)

    def on_failed(self, study_id: str, reason: str) -> None:
        with self.write() as session:
            study = session.get(Study, study_id, with_for_update=True)
            if study is None or study.status in TERMINAL_STATUSES:
                return
            self._close(session, study, StudyStatus.FAILED, reason[:2000], "study.fail")
        with self._handles_lock:
            self.handles.pop(study_id, None)
        self.on_change("study.fail")
        log.warning("study.fail", study_id=study_id, reason=reason[:200])

    # ------------------------------------------------------------------ results
    def results(self, principal: Principal, study_id: str) -> dict[str, Any]:
        with self.read() as session:
            study = self._visible_study(session, principal, study_id)
            rounds = session.scalars(select(StudyRound).where(StudyRound.study_id == study_id)
                                     .order_by(StudyRound.round)).all()
            receipts = session.scalars(select(ReceiptRow).where(ReceiptRow.study_id == study_id)).all()
        per: dict[str, dict[str, Any]] = {}
        for r in receipts:
            item = per.setdefault(r.hospital_id, {"hospital_id": r.hospital_id, "rounds": 0,
                                                  "records_used": 0, "epsilon_spent": None})
            item["rounds"] += 1
            item["records_used"] += r.records_used
            total = r.entry.get("payload", {}).get("epsilon_total")
            if isinstance(total, int | float) and not isinstance(total, bool):
                # epsilon_total: the hospital's spend on this study so far (composed by its
                # accountant, tighter than a sum of rounds): the latest is the study's spend.
                item["epsilon_spent"] = max(item["epsilon_spent"] or 0.0, float(total))
            elif r.epsilon_spent is not None:
                item["epsilon_spent"] = (item["epsilon_spent"] or 0.0) + r.epsilon_spent
        def out(r: StudyRound) -> dict[str, Any]:
            return {"round": r.round, "metrics": r.metrics, "finished_at": r.finished_at}

        # Contributions count every logged receipt (failed and cancelled rounds' too: privacy
        # was spent); `rounds` lists the completed rounds only, `failed_rounds` the others.
        return {"study_id": study.id, "status": study.status, "model_sha256": study.model_sha256,
                "rounds": [out(r) for r in rounds if not r.failed],
                "failed_rounds": [out(r) for r in rounds if r.failed],
                "contributions": [per[k] for k in sorted(per)]}

    def model(self, principal: Principal, study_id: str) -> tuple[bytes, str]:
        with self.read() as session:
            study = self._visible_study(session, principal, study_id)
            if study.status != StudyStatus.COMPLETED or study.model_sha256 is None:
                raise problems.conflict(f"study {study_id!r} has no model (it is {study.status.value})")
            model = session.scalar(select(Study.model).where(Study.id == study_id))
        assert model is not None
        return model, study.model_sha256


@dataclass(frozen=True, slots=True)
class SubmittedStudy:
    """The study row a submission just wrote (a new study: started, finished, outcome and model
    are still empty). Not an ORM instance: building one is a cost the writer thread pays per study."""

    id: str
    organisation_id: str | None
    researcher_id: str | None
    title: str
    status: StudyStatus
    spec: dict[str, Any]
    token_budget: int
    min_hospitals: int
    rounds_planned: int
    submitted_at: datetime
    submit_entry_index: int
    started_at: None = None
    finished_at: None = None
    outcome_reason: None = None
    model_sha256: None = None


@dataclass(frozen=True)
class _Submission:
    """A checked and signed study submission waiting for the writer: `write(connection)`."""

    coordinator: Coordinator
    principal: Principal
    data: StudyCreate
    study_id: str
    spec: dict[str, Any]
    entries: tuple[Entry, Entry]

    def __call__(self, connection: Connection) -> SubmittedStudy:
        return self.coordinator._submit_in(connection, self)

    def row(self, submit_entry_index: int) -> dict[str, Any]:
        data = self.data
        return {"id": self.study_id, "organisation_id": self.principal.organisation_id,
                "researcher_id": self.principal.researcher_id, "title": data.title,
                "status": StudyStatus.SUBMITTED, "spec": self.spec, "token_budget": data.token_budget,
                "min_hospitals": data.min_hospitals, "rounds_planned": data.rounds,
                "submitted_at": now(), "submit_entry_index": submit_entry_index}


def _receipt_row(study_id: str, hospital_id: str, entry: Entry, index: int) -> ReceiptRow:
    payload = entry.payload
    epsilon = payload.get("epsilon_spent")
    return ReceiptRow(study_id=study_id, hospital_id=hospital_id, round=int(payload["round"]),
                   records_used=int(payload["records_used"]),
                   epsilon_spent=float(epsilon) if isinstance(epsilon, int | float) and
                   not isinstance(epsilon, bool) else None,
                   commitment=str(payload.get("commitment", ""))[:128], entry=entry.to_json(),
                   entry_index=index)



_STUDY_VIEW = _study_view_statement()
_STUDY_INSERT = insert(Study)

