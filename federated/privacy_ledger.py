"""The hospital's persistent privacy ledger: epsilon spent per study and in total.

Lives in the node's own database (SQLite file by default, PostgreSQL possible); the schema is
created by the node Alembic tree (exchange/migrations/node/versions/0001_privacy_ledger.py), which
imports `metadata` from here (federated never imports exchange).

Semantics (see also federated/accounting.py):
- A study is registered once with its plan (target epsilon, delta, noise multiplier, sample rate,
  steps per round, planned rounds). Registering again with the same plan is a no-op; with a
  different plan it is refused (a restarted node must not silently change the noise).
- `charge(study_id, round, epsilon)` records the study's CUMULATIVE epsilon at this hospital after
  that round (the accountant's epsilon for all steps taken so far, not a per-round increment).
  The study's spend is the largest cumulative epsilon charged; the hospital's total spend is the
  sum over studies (basic composition across studies).
- Idempotent per (study, round): charging a round again with the same epsilon returns the stored
  charge and changes nothing (a node restarted mid-round does not double count); a different
  epsilon for an already charged round is refused.
- A charge that would take the study above its target, or the hospital above its total budget,
  is refused with `BudgetExceededError` and nothing is written. A charge is acknowledged only after
  its transaction committed (durable on SQLite with synchronous=FULL).
- Charges are serialised through a row lock on the budget row (PostgreSQL: the UPDATE takes the
  row lock; SQLite: the first write takes the database write lock), so two studies charging at
  once cannot together pass the total budget.
Call `charge` after training and BEFORE the weights leave the node: privacy is spent when the
model is released, and an unreleased round costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from federated.accounting import DPPlan

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Tolerance for float comparisons against budgets (epsilons are accountant outputs, not money).
EPS_TOLERANCE = 1e-9
BUDGET_ROW_ID = 1

privacy_budget = Table(
    "privacy_budget", metadata,
    Column("id", Integer, primary_key=True),
    Column("total_budget", Float, nullable=True),  # NULL: not configured yet -> charges refused
    Column("version", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=True),
)

privacy_studies = Table(
    "privacy_studies", metadata,
    Column("study_id", String(200), primary_key=True),
    Column("target_epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("noise_multiplier", Float, nullable=False),
    Column("sample_rate", Float, nullable=False),
    Column("steps_per_round", Integer, nullable=False),
    Column("rounds", Integer, nullable=False),
    Column("batch_size", Integer, nullable=False),
    Column("n_records", Integer, nullable=False),
    Column("accountant", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

privacy_charges = Table(
    "privacy_charges", metadata,
    Column("study_id", String(200), ForeignKey("privacy_studies.study_id"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("epsilon", Float, nullable=False),  # cumulative for the study after this round
    Column("increment", Float, nullable=False),  # epsilon - study spend before this charge
    Column("created_at", DateTime(timezone=True), nullable=False),
)


class LedgerError(ValueError):
    """A ledger request is malformed or contradicts what is stored."""


class BudgetExceededError(LedgerError):
    """A charge would overspend the study's target or the hospital's total budget."""


@dataclass(frozen=True)
class Charge:
    study_id: str
    round: int
    epsilon: float
    increment: float
    created_at: datetime


class PrivacyLedger:
    """Privacy spend of one hospital, persisted in its node database (schema made by migration).

    `total_budget`, when given, is stored (the steward's setting for this hospital's total
    epsilon across all studies); when never set, every charge is refused.
    """

    def __init__(self, engine: Engine, total_budget: float | None = None) -> None:
        self.engine = engine
        try:
            with engine.begin() as conn:
                self._ensure_budget_row(conn)
        except IntegrityError:
            pass  # another process created the row between our check and insert: fine
        if total_budget is not None:
            self.set_total_budget(total_budget)

    # -- configuration ---------------------------------------------------------------------
    @staticmethod
    def _ensure_budget_row(conn: Connection) -> None:
        row = conn.execute(select(privacy_budget.c.id).where(privacy_budget.c.id == BUDGET_ROW_ID)).first()
        if row is None:
            conn.execute(insert(privacy_budget).values(id=BUDGET_ROW_ID, total_budget=None, version=0,
                                                       updated_at=datetime.now(UTC)))

    def set_total_budget(self, total_budget: float) -> None:
        """Set the hospital's total epsilon budget (may be below what is spent: then every
        further charge is refused, nothing already spent is undone)."""
        if not (isinstance(total_budget, int | float) and math.isfinite(total_budget) and total_budget >= 0):
            raise LedgerError(f"total_budget: must be a finite number >= 0, got {total_budget!r}")
        with self.engine.begin() as conn:
            conn.execute(update(privacy_budget).where(privacy_budget.c.id == BUDGET_ROW_ID).values(
                total_budget=float(total_budget), version=privacy_budget.c.version + 1,
                updated_at=datetime.now(UTC)))

    def total_budget(self) -> float | None:
        with self.engine.connect() as conn:
            return conn.execute(select(privacy_budget.c.total_budget).where(
                privacy_budget.c.id == BUDGET_ROW_ID)).scalar_one()

    # -- studies ---------------------------------------------------------------------------
    def register_study(self, study_id: str, plan: DPPlan) -> DPPlan:
        """Store `plan` for `study_id` (idempotent); returns the stored plan. A different plan
        for a known study is refused. Refused too when the plan's target alone exceeds what is
        left of the total budget (the study could never finish)."""
        _check_study_id(study_id)
        with self.engine.begin() as conn:
            self._lock(conn)
            existing = self._plan(conn, study_id)
            if existing is not None:
                if existing != plan:
                    raise LedgerError(f"study_id: {study_id!r} is already registered with a different "
                                      f"plan ({existing}); refusing {plan}")
                return existing
            budget = self._budget(conn)
            left = budget - self._total(conn)
            if plan.target_epsilon > left + EPS_TOLERANCE:
                raise BudgetExceededError(
                    f"target_epsilon: study {study_id!r} targets {plan.target_epsilon:.4f} but only "
                    f"{max(left, 0.0):.4f} of the hospital's total budget {budget:.4f} is left")
            conn.execute(insert(privacy_studies).values(
                study_id=study_id, target_epsilon=plan.target_epsilon, delta=plan.delta,
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                steps_per_round=plan.steps_per_round, rounds=plan.rounds, batch_size=plan.batch_size,
                n_records=plan.n_records, accountant=plan.accountant, created_at=datetime.now(UTC)))
            return plan

    def plan(self, study_id: str) -> DPPlan | None:
        """The stored plan of `study_id`, or None."""
        with self.engine.connect() as conn:
            return self._plan(conn, study_id)

    # -- charges ---------------------------------------------------------------------------
    def check(self, study_id: str, round: int, epsilon: float) -> None:
        """Raise exactly as `charge` would, without writing (to refuse a round before training)."""
        self._charge(study_id, round, epsilon, write=False)

    def charge(self, study_id: str, round: int, epsilon: float) -> Charge:
        """Record that after `round` the study's cumulative epsilon here is `epsilon` (see module
        docstring). Returns the stored charge (the earlier one when repeated)."""
        charge = self._charge(study_id, round, epsilon, write=True)
        assert charge is not None
        return charge

    def _charge(self, study_id: str, round: int, epsilon: float, *, write: bool) -> Charge | None:
        _check_study_id(study_id)
        if not isinstance(round, int) or isinstance(round, bool) or round < 1:
            raise LedgerError(f"round: must be a positive integer, got {round!r}")
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
        epsilon = float(epsilon)
        with self.engine.begin() as conn:
            self._lock(conn)
            plan = self._plan(conn, study_id)
            if plan is None:
                raise LedgerError(f"study_id: {study_id!r} is not registered with this ledger")
            if plan.rounds < round:
                raise LedgerError(f"round: study {study_id!r} planned {plan.rounds} rounds, got {round}")
            prior = conn.execute(select(privacy_charges).where(
                privacy_charges.c.study_id == study_id, privacy_charges.c.round == round)).first()
            if prior is not None:
                if abs(prior.epsilon - epsilon) > EPS_TOLERANCE * max(1.0, epsilon):
                    raise LedgerError(
                        f"epsilon: round {round} of study {study_id!r} was already charged "
                        f"{prior.epsilon!r}; refusing a different value {epsilon!r}")
                return Charge(study_id, round, prior.epsilon, prior.increment,
                              _aware(prior.created_at))
            spent = self._spent(conn, study_id)
            if epsilon + EPS_TOLERANCE < spent:
                raise LedgerError(f"epsilon: cumulative epsilon {epsilon!r} for round {round} is below the "
                                  f"study's spend so far {spent!r}; charges are cumulative")
            if epsilon > plan.target_epsilon * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(
                    f"epsilon: round {round} would bring study {study_id!r} to {epsilon:.4f}, above "
                    f"its target {plan.target_epsilon:.4f}")
            increment = max(0.0, epsilon - spent)
            budget = self._budget(conn)
            total = self._total(conn)
            if total + increment > budget * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(
                    f"epsilon: round {round} of study {study_id!r} needs {increment:.4f} more but the "
                    f"hospital has spent {total:.4f} of its total budget {budget:.4f}")
            if not write:
                return None
            now = datetime.now(UTC)
            conn.execute(insert(privacy_charges).values(study_id=study_id, round=round,
                                                        epsilon=epsilon, increment=increment,
                                                        created_at=now))
            return Charge(study_id, round, epsilon, increment, now)

    def spent(self, study_id: str) -> float:
        """The study's cumulative epsilon at this hospital (0 before its first charge)."""
        with self.engine.connect() as conn:
            return self._spent(conn, study_id)

    def total_spent(self) -> float:
        """Sum over studies of their spend (basic composition)."""
        with self.engine.connect() as conn:
            return self._total(conn)

    def remaining(self) -> float | None:
        """Total budget minus total spend (None when no budget is set)."""
        budget = self.total_budget()
        return None if budget is None else budget - self.total_spent()

    def charges(self, study_id: str) -> list[Charge]:
        """The study's charges in round order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(privacy_charges).where(privacy_charges.c.study_id == study_id)
                                .order_by(privacy_charges.c.round)).all()
        return [Charge(r.study_id, r.round, r.epsilon, r.increment, _aware(r.created_at)) for r in rows]

    def rounds_charged(self, study_id: str) -> int:
        """How many rounds of the study were charged (= rounds trained and released here)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(privacy_charges).where(
                privacy_charges.c.study_id == study_id)).scalar_one())

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _lock(conn: Connection) -> None:
        """Serialise budget decisions: a write to the budget row, the transaction's first
        statement, takes PostgreSQL's row lock and SQLite's database write lock."""
        result = conn.execute(update(privacy_budget).where(privacy_budget.c.id == BUDGET_ROW_ID)
                              .values(version=privacy_budget.c.version + 1))
        if result.rowcount != 1:
            raise LedgerError("privacy_budget: budget row missing (run the node migrations)")

    @staticmethod
    def _budget(conn: Connection) -> float:
        budget = conn.execute(select(privacy_budget.c.total_budget).where(
            privacy_budget.c.id == BUDGET_ROW_ID)).scalar_one()
        if budget is None:
            raise BudgetExceededError("total_budget: the hospital's total privacy budget is not set; "
                                 "refusing to spend any")
        return float(budget)

    @staticmethod
    def _spent(conn: Connection, study_id: str) -> float:
        value = conn.execute(select(func.max(privacy_charges.c.epsilon)).where(
            privacy_charges.c.study_id == study_id)).scalar_one()
        return 0.0 if value is None else float(value)

    @staticmethod
    def _total(conn: Connection) -> float:
        sub = (select(func.max(privacy_charges.c.epsilon).label("eps"))
               .group_by(privacy_charges.c.study_id).subquery())
        value = conn.execute(select(func.sum(sub.c.eps))).scalar_one()
        return 0.0 if value is None else float(value)

    @staticmethod
    def _plan(conn: Connection, study_id: str) -> DPPlan | None:
        r = conn.execute(select(privacy_studies).where(privacy_studies.c.study_id == study_id)).first()
        if r is None:
            return None
        return DPPlan(target_epsilon=r.target_epsilon, delta=r.delta, rounds=r.rounds,
                      steps_per_round=r.steps_per_round, sample_rate=r.sample_rate,
                      noise_multiplier=r.noise_multiplier, batch_size=r.batch_size,
                      n_records=r.n_records, accountant=r.accountant)


def _check_study_id(study_id: str) -> None:
    if not isinstance(study_id, str) or not study_id or len(study_id) > 200:
        raise LedgerError(f"study_id: must be a non-empty string of at most 200 characters, got {study_id!r}")


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
