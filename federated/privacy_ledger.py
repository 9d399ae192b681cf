"""The hospital's persistent privacy ledger: spend per study, per patient and in total.

Lives in the node's own database (SQLite file by default, PostgreSQL possible); the schema is
created by the node Alembic tree (exchange/migrations/node/versions/0001_privacy_ledger.py and
0003_patient_privacy.py), which spell out the tables defined here (federated never imports
exchange). Every epsilon is per PATIENT (federated.accounting). Nothing in these tables leaves
the hospital: receipts and the log carry study-level figures only, never a patient's spend.

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

Delta. A study's delta must be at most the site maximum (`max_delta`, default 1e-5) and at most
1/n for its n eligible patients; the deltas of all registered studies add up (basic
composition) and must stay within the hospital's delta budget (`total_delta`, default 1e-4).

Patients (individual accounting, a privacy filter in the sense of Feldman and Zrnic 2021 and
Rogers et al. 2016). Every patient has a LIFETIME cap: the `max_epsilon` of their consent
contract, or the hospital's total budget when it names none. `admit` lets a patient into a study
only if the epsilons of every other study they are in (the study's target while it is open, what
it really spent once `close_study` was called) plus this study's target stay within their cap;
otherwise the patient is left out of the study (a record of the refusal is kept nowhere but the
count returned). An admitted patient has a row in `privacy_patient_spend` holding how many DP-SGD
steps (training) or evaluations (hold-out) of the study they took part in; `charge` and
`charge_evaluation` advance them in the same transaction as the study's charge, so a node
restarted mid-study keeps every patient's spend exactly. The filter adds epsilons (basic
composition), which stays valid when studies are chosen adaptively, after earlier results; the
tight PRV composition of the same mechanisms is reported beside it (`composition`), not enforced:
tight composition theorems assume the sequence of mechanisms was fixed in advance.

Evaluation. `charge_evaluation(study, slot, ...)` records one hold-out release per round slot with
its noised values; a second request for the same slot gets the stored release back, unchanged
and uncharged (at most one charged evaluation per round, however many messages ask).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from federated.accounting import DPPlan, compose_epsilon, max_delta

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
#: Site maximum of a study's delta when the steward set none.
DEFAULT_MAX_DELTA = 1e-5
#: The hospital's delta budget (sum over studies) when the steward set none.
DEFAULT_TOTAL_DELTA = 1e-4
Role = Literal["train", "eval"]
ROLES: tuple[str, ...] = ("train", "eval")

privacy_budget = Table(
    "privacy_budget", metadata,
    Column("id", Integer, primary_key=True),
    Column("total_budget", Float, nullable=True),  # NULL: not configured yet -> charges refused
    Column("version", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=True),
    Column("max_delta", Float, nullable=True),  # NULL: DEFAULT_MAX_DELTA
    Column("total_delta", Float, nullable=True),  # NULL: DEFAULT_TOTAL_DELTA
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
    Column("n_patients", Integer, nullable=False),
    Column("accountant", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("eval_noise_multiplier", Float, nullable=True),
    Column("closed_at", DateTime(timezone=True), nullable=True),
)

privacy_charges = Table(
    "privacy_charges", metadata,
    Column("study_id", String(200), ForeignKey("privacy_studies.study_id"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("epsilon", Float, nullable=False),  # cumulative for the study after this round
    Column("increment", Float, nullable=False),  # epsilon - study spend before this charge
    Column("created_at", DateTime(timezone=True), nullable=False),
)

privacy_evaluations = Table(
    "privacy_evaluations", metadata,
    Column("study_id", String(200), ForeignKey("privacy_studies.study_id"), primary_key=True),
    Column("slot", Integer, primary_key=True),  # the round whose model was evaluated
    Column("epsilon", Float, nullable=False),  # cumulative evaluation epsilon after this release
    Column("count", Float, nullable=False),  # the released (noised) values
    Column("score", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # the released (noised) statistics vector as a JSON list (federated.eval_stats); NULL: none
    Column("stats", Text, nullable=True),
)

privacy_patient_spend = Table(
    "privacy_patient_spend", metadata,
    Column("pseudonym", String(256), primary_key=True),
    Column("study_id", String(200), ForeignKey("privacy_studies.study_id"), primary_key=True),
    Column("role", String(8), nullable=False),  # "train" or "eval"
    Column("units", Integer, nullable=False),  # DP-SGD steps or evaluations taken part in
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_privacy_patient_spend_study_id", "study_id"),
)

#: The noised eligible-patient count drawn once per study at decision time (exchange.node.decisions):
#: every threshold the hospital's public decision tests, and the study's default reward capacity
#: and DP plan size, read this count only. Kept so a restarted hospital uses the same draw.
privacy_decisions = Table(
    "privacy_decisions", metadata,
    Column("study_id", String(200), primary_key=True),
    Column("epsilon", Float, nullable=False),  # the count's epsilon, charged to every patient counted
    Column("noisy_count", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # a survival study's noised count of the counted patients with an event (node migration 0008)
    Column("noisy_events", Integer, nullable=True),
)

#: The patients counted (and so charged the decision's epsilon) in each study's decision count.
privacy_decision_patients = Table(
    "privacy_decision_patients", metadata,
    Column("study_id", String(200), ForeignKey("privacy_decisions.study_id"), primary_key=True),
    Column("pseudonym", String(256), primary_key=True),
    Index("ix_privacy_decision_patients_pseudonym", "pseudonym"),
)

#: The openings of each receipt's reward commitment (audit.reward_commitment): the reward
#: account and salt behind each leaf. They never leave the hospital except to the patient who
#: claims that leaf (federated.reward_openings).
reward_openings = Table(
    "reward_openings", metadata,
    Column("study_id", String(200), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("leaf_index", Integer, primary_key=True),
    Column("account", String(256), nullable=False),
    Column("opening", Text, nullable=False),  # audit.reward_commitment.Opening as JSON
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_reward_openings_account", "account"),
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


@dataclass(frozen=True)
class EvaluationCharge:
    """One charged hold-out release: its slot (the round whose model it scored), the
    cumulative evaluation epsilon after it, and the noised values released."""

    study_id: str
    slot: int
    epsilon: float
    count: float
    score: float
    created_at: datetime
    stats: tuple[float, ...] = ()


@dataclass(frozen=True)
class Admission:
    """Which candidates `admit` let into a study, and how many it left out for their cap."""

    admitted: frozenset[str]
    over_cap: int


@dataclass(frozen=True)
class PatientSpend:
    """One patient's lifetime spend at this hospital: the sum of the epsilons of the studies
    they are in (an open study counts its target), and the sum of those studies' deltas."""

    epsilon: float
    delta: float
    studies: int


@dataclass(frozen=True)
class Composition:
    """The hospital's worst-case patient over every study: `epsilon_sum` adds the studies'
    epsilons (basic composition, what the budget enforces) and `epsilon_composed` composes their
    actual mechanisms with the PRV accountant (tighter), both at `delta` (the sum of deltas).
    `patients` is how many patients have a spend row."""

    epsilon_sum: float
    epsilon_composed: float
    delta: float
    patients: int


@dataclass(frozen=True)
class DecisionCount:
    """A study's decision count: the noised number of eligible patients (`noisy_count`, what
    every threshold and the default capacity use), the epsilon charged to each patient counted,
    and `patients`, how many were counted (exact: it stays in the hospital)."""

    study_id: str
    epsilon: float
    noisy_count: int
    patients: int
    created_at: datetime
    #: a survival study's noised count of the counted patients with an event (None: not drawn)
    noisy_events: int | None = None


class NoiseSource(Protocol):
    """Where the decision count's noise comes from (`federated.secure_random.SecureRandom`)."""

    def discrete_laplace(self, epsilon: float) -> int: ...


class PrivacyLedger:
    """Privacy spend of one hospital, persisted in its node database (schema made by migration).

    `total_budget`, when given, is stored (the steward's setting for this hospital's total
    epsilon across all studies); when never set, every charge is refused.
    """

    def __init__(self, engine: Engine, total_budget: float | None = None, *,
                 max_delta: float | None = None, total_delta: float | None = None) -> None:
        self.engine = engine
        try:
            with engine.begin() as conn:
                self._ensure_budget_row(conn)
        except IntegrityError:
            pass  # another process created the row between our check and insert: fine
        if total_budget is not None:
            self.set_total_budget(total_budget)
        if max_delta is not None or total_delta is not None:
            self.set_delta_limits(max_delta=max_delta, total_delta=total_delta)

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

    def set_delta_limits(self, *, max_delta: float | None = None,
                         total_delta: float | None = None) -> None:
        """Set the site maximum of a study's delta and/or the hospital's delta budget."""
        values: dict[str, float] = {}
        for name, value in (("max_delta", max_delta), ("total_delta", total_delta)):
            if value is None:
                continue
            if not (isinstance(value, int | float) and 0.0 < value < 1.0):
                raise LedgerError(f"{name}: must be a number in (0, 1), got {value!r}")
            values[name] = float(value)
        if values:
            with self.engine.begin() as conn:
                conn.execute(update(privacy_budget).where(privacy_budget.c.id == BUDGET_ROW_ID).values(
                    **values, version=privacy_budget.c.version + 1, updated_at=datetime.now(UTC)))

    def delta_limits(self) -> tuple[float, float]:
        """(site maximum of a study's delta, the hospital's delta budget)."""
        with self.engine.connect() as conn:
            return self._delta_limits(conn)

    def delta_spent(self) -> float:
        """Sum of the deltas of every registered study (basic composition)."""
        with self.engine.connect() as conn:
            return self._delta_total(conn)

    # -- studies ---------------------------------------------------------------------------
    def register_study(self, study_id: str, plan: DPPlan) -> DPPlan:
        """Store `plan` for `study_id` (idempotent); returns the stored plan. A different plan
        for a known study is refused. Refused too when the plan's target alone exceeds what is
        left of the total budget (the study could never finish), when its delta is above the
        site maximum or above 1/n for its n patients, or when its delta does not fit in what is
        left of the hospital's delta budget."""
        _check_study_id(study_id)
        with self.engine.begin() as conn:
            self._lock(conn)
            existing = self._plan(conn, study_id)
            if existing is not None:
                if existing != plan:
                    raise LedgerError(f"study_id: {study_id!r} is already registered with a different "
                                      f"plan ({existing}); refusing {plan}")
                return existing
            self._check_target(conn, study_id, plan.target_epsilon)
            site_max, delta_budget = self._delta_limits(conn)
            if plan.delta > site_max * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(f"delta: study {study_id!r} asks {plan.delta:g}, above the site "
                                          f"maximum {site_max:g}")
            if plan.delta > max_delta(plan.n_patients) * (1 + EPS_TOLERANCE):
                # no n in the message: a refusal text leaves the hospital (docs/privacy.md)
                raise BudgetExceededError(f"delta: study {study_id!r} asks {plan.delta:g}, above 1/n for "
                                          "its n patients")
            delta_left = delta_budget - self._delta_total(conn)
            if plan.delta > delta_left * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(
                    f"delta: study {study_id!r} asks {plan.delta:g} but only {max(delta_left, 0.0):.3g} "
                    f"of the hospital's delta budget {delta_budget:g} is left")
            conn.execute(insert(privacy_studies).values(
                study_id=study_id, target_epsilon=plan.target_epsilon, delta=plan.delta,
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                steps_per_round=plan.steps_per_round, rounds=plan.rounds, batch_size=plan.batch_size,
                n_patients=plan.n_patients, accountant=plan.accountant,
                eval_noise_multiplier=plan.eval_noise_multiplier, created_at=datetime.now(UTC)))
            return plan

    def check_target(self, study_id: str, target_epsilon: float) -> None:
        """Raise `BudgetExceededError` as `register_study` would when a study with this target
        does not fit in what is left of the hospital's total budget (nothing is written)."""
        with self.engine.connect() as conn:
            self._check_target(conn, study_id, target_epsilon)

    def _check_target(self, conn: Connection, study_id: str, target: float) -> None:
        budget = self._budget(conn)
        left = budget - self._total(conn)
        if target > left + EPS_TOLERANCE:
            raise BudgetExceededError(
                f"target_epsilon: study {study_id!r} targets {target:.4f} but only "
                f"{max(left, 0.0):.4f} of the hospital's total budget {budget:.4f} is left")

    def close_study(self, study_id: str) -> None:
        """The study is over at this hospital (completed, failed or cancelled): its patients'
        reservations become what it really spent. Idempotent; unknown studies are ignored."""
        with self.engine.begin() as conn:
            self._lock(conn)
            conn.execute(update(privacy_studies).where(privacy_studies.c.study_id == study_id,
                                                       privacy_studies.c.closed_at.is_(None))
                         .values(closed_at=datetime.now(UTC)))

    def is_closed(self, study_id: str) -> bool:
        with self.engine.connect() as conn:
            value = conn.execute(select(privacy_studies.c.closed_at).where(
                privacy_studies.c.study_id == study_id)).first()
        return value is not None and value[0] is not None

    # -- patients --------------------------------------------------------------------------
    def admissible(self, study_id: str, target_epsilon: float, caps: Mapping[str, float | None],
                   default_cap: float) -> Admission:
        """What `admit` would decide for a study with this target, without writing (the
        ClientApp counts the patients to plan a study before registering it)."""
        with self.engine.connect() as conn:
            return self._admit(conn, study_id, None, target=target_epsilon, caps=caps,
                               default_cap=default_cap)

    def admit(self, study_id: str, role: Role, caps: Mapping[str, float | None],
              default_cap: float) -> Admission:
        """Let each candidate patient (pseudonym -> the lifetime cap of their contract, None
        for none: then `default_cap`) into the registered study `study_id` in `role` if their
        cap allows (module docstring), writing a reservation row for each newly admitted one.
        A patient already in the study stays in (in the same role; a training patient is never
        evaluated on and vice versa)."""
        if role not in ROLES:
            raise LedgerError(f"role: must be one of {list(ROLES)}, got {role!r}")
        with self.engine.connect() as conn:  # nobody new to admit: no write, no lock
            plan = self._plan(conn, study_id)
            if plan is None:
                raise LedgerError(f"study_id: {study_id!r} is not registered with this ledger")
            rows = self._spend_rows(conn, study_id)
            if all(p in rows and rows[p] == role for p in caps):
                return Admission(frozenset(caps), 0)
        with self.engine.begin() as conn:
            self._lock(conn)
            return self._admit(conn, study_id, role, target=plan.target_epsilon, caps=caps,
                               default_cap=default_cap)

    def _admit(self, conn: Connection, study_id: str, role: Role | None, *, target: float,
               caps: Mapping[str, float | None], default_cap: float) -> Admission:
        if not (math.isfinite(default_cap) and default_cap >= 0):
            raise LedgerError(f"default_cap: must be a finite number >= 0, got {default_cap!r}")
        rows = self._all_spend_rows(conn)
        costs = self._study_costs(conn)
        decided = self._decision_spend(conn)
        admitted: set[str] = set()
        new: list[str] = []
        over = 0
        for pseudonym, cap in caps.items():
            mine = rows.get(pseudonym, {})
            held = mine.get(study_id)
            if held is not None:
                if role is None or held[0] == role:
                    admitted.add(pseudonym)
                continue
            committed = sum(costs[s](r, u) for s, (r, u) in mine.items()) + decided.get(pseudonym, 0.0)
            limit = default_cap if cap is None else min(float(cap), default_cap)
            if committed + target <= limit * (1 + EPS_TOLERANCE) + EPS_TOLERANCE:
                admitted.add(pseudonym)
                new.append(pseudonym)
            else:
                over += 1
        if role is not None and new:
            now = datetime.now(UTC)
            conn.execute(insert(privacy_patient_spend), [
                {"pseudonym": p, "study_id": study_id, "role": role, "units": 0, "updated_at": now}
                for p in new])
        return Admission(frozenset(admitted), over)

    def patient_spend(self) -> dict[str, PatientSpend]:
        """Every patient with a spend row -> their lifetime spend (open studies at their target).
        Stays in the hospital: for `exchange node status` counts and the lifetime filter."""
        with self.engine.connect() as conn:
            rows = self._all_spend_rows(conn)
            costs = self._study_costs(conn)
            decided = self._decision_spend(conn)
            deltas = {r.study_id: float(r.delta) for r in conn.execute(
                select(privacy_studies.c.study_id, privacy_studies.c.delta))}
        return {p: PatientSpend(epsilon=sum(costs[s](r, u) for s, (r, u) in rows.get(p, {}).items())
                                + decided.get(p, 0.0),
                                delta=sum(deltas[s] for s in rows.get(p, {})), studies=len(rows.get(p, {})))
                for p in set(rows) | set(decided)}

    def composition(self) -> Composition:
        """The worst-case patient's spend over all studies, as the sum of epsilons and as the
        PRV composition of the mechanisms they really took part in (`Composition`). Patients who
        took part in the same studies to the same extent share one accountant call."""
        with self.engine.connect() as conn:
            rows = self._all_spend_rows(conn)
            plans = {r.study_id: self._row_plan(r) for r in conn.execute(select(privacy_studies))}
            decided = self._decision_spend(conn)
        # a decision count is pure epsilon-DP: it adds to both figures (basic composition)
        signatures = {(tuple(sorted((s, r, u) for s, (r, u) in rows.get(p, {}).items())), decided.get(p, 0.0))
                      for p in set(rows) | set(decided)}
        worst_sum = worst_composed = worst_delta = 0.0
        for signature, decision_epsilon in signatures:
            total = decision_epsilon
            delta = 0.0
            mechanisms = []
            for study_id, role, units in signature:
                plan = plans[study_id]
                delta += plan.delta
                if role == "train":
                    total += plan.epsilon_for_steps(units)
                    mechanisms += plan.mechanisms(steps=units)
                else:
                    total += plan.evaluation_epsilon_after(units)
                    mechanisms += plan.mechanisms(steps=0, evaluations=units)
            accountant = plans[signature[0][0]].accountant if signature else "prv"
            composed = decision_epsilon + (compose_epsilon(mechanisms, min(delta, 0.5), accountant)
                                           if mechanisms else 0.0)
            worst_sum = max(worst_sum, total)
            worst_composed = max(worst_composed, composed)
            worst_delta = max(worst_delta, delta)
        return Composition(worst_sum, worst_composed, worst_delta, len(set(rows) | set(decided)))

    def decide(self, study_id: str, epsilon: float, target_epsilon: float,
               caps: Mapping[str, float | None], default_cap: float, *, noise: NoiseSource,
               events: Iterable[str] | None = None) -> DecisionCount:
        """The study's decision count, drawn once: the candidate patients whose lifetime cap can
        take this count's `epsilon` plus `target_epsilon` (what the study's training may still
        spend: the study's epsilon minus this count's, which is part of it) are counted, each is
        charged `epsilon` (a row in `privacy_decision_patients`, part of their lifetime spend
        and of the study's spend from now on), and the count gets discrete Laplace noise of
        scale 1/epsilon (sensitivity 1: a patient is counted once, whatever their number of
        records). With `events` (a survival study: the candidates with an event), the counted
        patients with an event are counted too, and each of the two counts gets noise of scale
        2/epsilon: one patient moves the pair by at most 1 in each (L1 sensitivity 2), so the
        pair is still epsilon-DP and the charge is the same. Asked again, the stored counts are
        returned and nothing is charged or drawn (a restarted hospital keeps its draw)."""
        _check_study_id(study_id)
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
            raise LedgerError(f"decision_epsilon: must be a finite number > 0, got {epsilon!r}")
        stored = self.decision(study_id)
        if stored is not None:
            return stored
        with self.engine.begin() as conn:
            self._lock(conn)
            stored = self._decision(conn, study_id)
            if stored is not None:
                return stored
            counted = self._admit(conn, study_id, None, target=float(target_epsilon) + float(epsilon),
                                  caps=caps, default_cap=default_cap).admitted
            noisy_events: int | None = None
            if events is None:
                noisy = len(counted) + int(noise.discrete_laplace(float(epsilon)))
            else:
                noisy = len(counted) + int(noise.discrete_laplace(float(epsilon) / 2))
                noisy_events = (len(counted & set(events))
                                + int(noise.discrete_laplace(float(epsilon) / 2)))
            now = datetime.now(UTC)
            conn.execute(insert(privacy_decisions).values(study_id=study_id, epsilon=float(epsilon),
                                                          noisy_count=noisy, created_at=now,
                                                          noisy_events=noisy_events))
            if counted:
                conn.execute(insert(privacy_decision_patients),
                             [{"study_id": study_id, "pseudonym": p} for p in sorted(counted)])
            return DecisionCount(study_id, float(epsilon), noisy, len(counted), now, noisy_events)

    def decision(self, study_id: str) -> DecisionCount | None:
        """The study's stored decision count, or None when none was drawn."""
        with self.engine.connect() as conn:
            return self._decision(conn, study_id)

    def decision_patients(self, study_id: str) -> frozenset[str]:
        """The patients charged the study's decision epsilon (hospital-local)."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(select(privacy_decision_patients.c.pseudonym).where(
                privacy_decision_patients.c.study_id == study_id)).scalars())

    @staticmethod
    def _decision(conn: Connection, study_id: str) -> DecisionCount | None:
        row = conn.execute(select(privacy_decisions).where(privacy_decisions.c.study_id == study_id)).first()
        if row is None:
            return None
        patients = conn.execute(select(func.count()).select_from(privacy_decision_patients).where(
            privacy_decision_patients.c.study_id == study_id)).scalar_one()
        return DecisionCount(study_id, float(row.epsilon), int(row.noisy_count), int(patients),
                             _aware(row.created_at),
                             None if row.noisy_events is None else int(row.noisy_events))

    @staticmethod
    def _decision_spend(conn: Connection) -> dict[str, float]:
        """pseudonym -> the sum of the decision epsilons they were charged."""
        out: dict[str, float] = {}
        for pseudonym, epsilon in conn.execute(select(
                privacy_decision_patients.c.pseudonym, privacy_decisions.c.epsilon).join(
                privacy_decisions, privacy_decisions.c.study_id == privacy_decision_patients.c.study_id)
                ).tuples():
            out[pseudonym] = out.get(pseudonym, 0.0) + float(epsilon)
        return out

    def plan(self, study_id: str) -> DPPlan | None:
        """The stored plan of `study_id`, or None."""
        with self.engine.connect() as conn:
            return self._plan(conn, study_id)

    # -- charges ---------------------------------------------------------------------------
    def check(self, study_id: str, round: int, epsilon: float) -> None:
        """Raise exactly as `charge` would, without writing (to refuse a round before training)."""
        self._charge(study_id, round, epsilon, write=False)

    def charge(self, study_id: str, round: int, epsilon: float,
               patients: Iterable[str] | None = None) -> Charge:
        """Record that after `round` the study's cumulative epsilon here is `epsilon` (see module
        docstring), and that each of `patients` (admitted to the study for training) took part
        in this round's steps. Returns the stored charge (the earlier one when repeated, and
        then no patient is advanced again)."""
        charge = self._charge(study_id, round, epsilon, write=True, patients=patients)
        assert charge is not None
        return charge

    def _charge(self, study_id: str, round: int, epsilon: float, *, write: bool,
                patients: Iterable[str] | None = None) -> Charge | None:
        _check_study_id(study_id)
        if not isinstance(round, int) or isinstance(round, bool) or round < 1:
            raise LedgerError(f"round: must be a positive integer, got {round!r}")
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
        epsilon = float(epsilon)
        with self.engine.begin() as conn:
            if write:  # a check only reads: it must not take the write lock (an fsync on SQLite)
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
            if patients is not None:
                self._advance(conn, study_id, "train", patients, units=plan.steps_per_round,
                              limit=plan.total_steps, now=now)
            return Charge(study_id, round, epsilon, increment, now)

    @staticmethod
    def _advance(conn: Connection, study_id: str, role: Role, patients: Iterable[str], *, units: int,
                 limit: int, now: datetime) -> None:
        """Add `units` to each patient's row for the study; every patient must have been
        admitted in `role` and stay within `limit` units (else nothing is written)."""
        wanted = sorted(set(patients))
        if not wanted:
            return
        held = dict(conn.execute(select(privacy_patient_spend.c.pseudonym, privacy_patient_spend.c.units)
                                 .where(privacy_patient_spend.c.study_id == study_id,
                                        privacy_patient_spend.c.role == role)).tuples().all())
        missing = [p for p in wanted if p not in held]
        if missing:
            raise LedgerError(f"patients: some were not admitted to study {study_id!r} for {role}")
        if any(held[p] + units > limit for p in wanted):
            raise LedgerError(f"patients: a patient would take part in more than the {limit} "
                              f"{'steps' if role == 'train' else 'evaluations'} study {study_id!r} planned")
        conn.execute(update(privacy_patient_spend)
                     .where(privacy_patient_spend.c.study_id == study_id,
                            privacy_patient_spend.c.pseudonym == bindparam("p"))
                     .values(units=privacy_patient_spend.c.units + units, updated_at=now),
                     [{"p": p} for p in wanted])

    # -- evaluation ------------------------------------------------------------------------
    def evaluation(self, study_id: str, slot: int) -> EvaluationCharge | None:
        """The release already charged for `slot`, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(select(privacy_evaluations).where(
                privacy_evaluations.c.study_id == study_id, privacy_evaluations.c.slot == slot)).first()
        return None if row is None else _evaluation(row)

    def evaluations(self, study_id: str) -> list[EvaluationCharge]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(privacy_evaluations).where(privacy_evaluations.c.study_id == study_id)
                                .order_by(privacy_evaluations.c.slot)).all()
        return [_evaluation(r) for r in rows]

    def evaluation_spent(self, study_id: str) -> float:
        """A hold-out patient's cumulative evaluation epsilon in the study (0 before any)."""
        with self.engine.connect() as conn:
            return self._eval_spent(conn, study_id)

    def charge_evaluation(self, study_id: str, slot: int, epsilon: float, *, count: float, score: float,
                          patients: Iterable[str], stats: Sequence[float] = ()
                          ) -> tuple[EvaluationCharge, bool]:
        """Record the hold-out release for `slot` (cumulative evaluation epsilon `epsilon`, the
        noised `count`, `score` and `stats`) and advance each evaluated patient by one evaluation.
        Returns (the stored release, True), or (the earlier release, False) when the slot was
        already charged: then nothing is written and the caller must send the earlier values."""
        _check_study_id(study_id)
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 1:
            raise LedgerError(f"slot: must be a positive integer, got {slot!r}")
        if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0):
            raise LedgerError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
        released = tuple(float(v) for v in stats)
        if not all(math.isfinite(v) for v in released):
            raise LedgerError("stats: must be finite numbers")
        with self.engine.begin() as conn:
            self._lock(conn)
            plan = self._plan(conn, study_id)
            if plan is None:
                raise LedgerError(f"study_id: {study_id!r} is not registered with this ledger")
            if slot > plan.rounds:
                raise LedgerError(f"slot: study {study_id!r} planned {plan.rounds} rounds, got {slot}")
            prior = conn.execute(select(privacy_evaluations).where(
                privacy_evaluations.c.study_id == study_id, privacy_evaluations.c.slot == slot)).first()
            if prior is not None:
                return _evaluation(prior), False
            if epsilon > plan.target_epsilon * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(f"epsilon: evaluation {slot} would bring study {study_id!r}'s "
                                          f"hold-out patients to {epsilon:.4f}, above its target "
                                          f"{plan.target_epsilon:.4f}")
            before = max(self._spent(conn, study_id), self._eval_spent(conn, study_id))
            increment = max(0.0, epsilon - before)
            budget, total = self._budget(conn), self._total(conn)
            if total + increment > budget * (1 + EPS_TOLERANCE):
                raise BudgetExceededError(f"epsilon: evaluation {slot} of study {study_id!r} needs "
                                          f"{increment:.4f} more but the hospital has spent {total:.4f} "
                                          f"of its total budget {budget:.4f}")
            now = datetime.now(UTC)
            conn.execute(insert(privacy_evaluations).values(
                study_id=study_id, slot=slot, epsilon=float(epsilon), count=float(count),
                score=float(score), created_at=now, stats=json.dumps(released) if released else None))
            self._advance(conn, study_id, "eval", patients, units=1, limit=plan.rounds, now=now)
            return EvaluationCharge(study_id, slot, float(epsilon), float(count), float(score), now,
                                    released), True

    def spent(self, study_id: str) -> float:
        """The study's cumulative epsilon at this hospital, per patient (0 before its decision
        count and first charge): its decision count's epsilon plus its training epsilon (basic
        composition of a pure epsilon-DP count and the DP-SGD rounds), what its receipts'
        `epsilon_total` says."""
        with self.engine.connect() as conn:
            return self._decision_epsilon(conn, study_id) + self._spent(conn, study_id)

    def training_spent(self, study_id: str) -> float:
        """The study's cumulative DP-SGD epsilon alone (what the ledger's charges hold)."""
        with self.engine.connect() as conn:
            return self._spent(conn, study_id)

    def study_spent(self, study_id: str) -> float:
        """What the study counts against the hospital's total budget: its decision count's
        epsilon plus the larger of its training and evaluation epsilons (disjoint patients)."""
        with self.engine.connect() as conn:
            return self._decision_epsilon(conn, study_id) + max(self._spent(conn, study_id),
                                                                 self._eval_spent(conn, study_id))

    def total_spent(self) -> float:
        """Sum over studies of their spend (basic composition); a study's spend is its decision
        count's epsilon plus the larger of its training and its evaluation epsilon (they concern
        disjoint patients)."""
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
    def _eval_spent(conn: Connection, study_id: str) -> float:
        value = conn.execute(select(func.max(privacy_evaluations.c.epsilon)).where(
            privacy_evaluations.c.study_id == study_id)).scalar_one()
        return 0.0 if value is None else float(value)

    @staticmethod
    def _total(conn: Connection) -> float:
        train = dict(conn.execute(select(privacy_charges.c.study_id, func.max(privacy_charges.c.epsilon))
                                  .group_by(privacy_charges.c.study_id)).tuples().all())
        held = dict(conn.execute(select(privacy_evaluations.c.study_id,
                                        func.max(privacy_evaluations.c.epsilon))
                                 .group_by(privacy_evaluations.c.study_id)).tuples().all())
        decided = dict(conn.execute(select(privacy_decisions.c.study_id, privacy_decisions.c.epsilon))
                       .tuples().all())
        return float(sum(decided.get(s, 0.0) + max(train.get(s, 0.0), held.get(s, 0.0))
                         for s in set(train) | set(held) | set(decided)))

    @staticmethod
    def _decision_epsilon(conn: Connection, study_id: str) -> float:
        value = conn.execute(select(privacy_decisions.c.epsilon).where(
            privacy_decisions.c.study_id == study_id)).scalar_one_or_none()
        return 0.0 if value is None else float(value)

    @staticmethod
    def _delta_limits(conn: Connection) -> tuple[float, float]:
        row = conn.execute(select(privacy_budget.c.max_delta, privacy_budget.c.total_delta).where(
            privacy_budget.c.id == BUDGET_ROW_ID)).first()
        site_max = DEFAULT_MAX_DELTA if row is None or row[0] is None else float(row[0])
        total = DEFAULT_TOTAL_DELTA if row is None or row[1] is None else float(row[1])
        return site_max, total

    @staticmethod
    def _delta_total(conn: Connection) -> float:
        value = conn.execute(select(func.sum(privacy_studies.c.delta))).scalar_one()
        return 0.0 if value is None else float(value)

    @staticmethod
    def _spend_rows(conn: Connection, study_id: str) -> dict[str, str]:
        """pseudonym -> role of every patient admitted to `study_id`."""
        return dict(conn.execute(select(privacy_patient_spend.c.pseudonym, privacy_patient_spend.c.role)
                                 .where(privacy_patient_spend.c.study_id == study_id)).tuples().all())

    @staticmethod
    def _all_spend_rows(conn: Connection) -> dict[str, dict[str, tuple[str, int]]]:
        """pseudonym -> {study id: (role, units)}, the whole (hospital-local) table."""
        out: dict[str, dict[str, tuple[str, int]]] = {}
        for p, s, role, units in conn.execute(select(
                privacy_patient_spend.c.pseudonym, privacy_patient_spend.c.study_id,
                privacy_patient_spend.c.role, privacy_patient_spend.c.units)).tuples():
            out.setdefault(p, {})[s] = (role, int(units))
        return out

    @classmethod
    def _study_costs(cls, conn: Connection) -> dict[str, _Cost]:
        """study id -> what a patient's row in it costs against their cap: the study's target
        while it is open, else the epsilon of the steps (or evaluations) they took part in."""
        costs: dict[str, _Cost] = {}
        for r in conn.execute(select(privacy_studies)):
            costs[r.study_id] = _Cost(cls._row_plan(r), r.closed_at is not None)
        return costs

    @classmethod
    def _plan(cls, conn: Connection, study_id: str) -> DPPlan | None:
        r = conn.execute(select(privacy_studies).where(privacy_studies.c.study_id == study_id)).first()
        return None if r is None else cls._row_plan(r)

    @staticmethod
    def _row_plan(r: object) -> DPPlan:
        return DPPlan(target_epsilon=r.target_epsilon, delta=r.delta, rounds=r.rounds,  # type: ignore[attr-defined]
                      steps_per_round=r.steps_per_round, sample_rate=r.sample_rate,  # type: ignore[attr-defined]
                      noise_multiplier=r.noise_multiplier, batch_size=r.batch_size,  # type: ignore[attr-defined]
                      n_patients=r.n_patients, accountant=r.accountant,  # type: ignore[attr-defined]
                      eval_noise_multiplier=r.eval_noise_multiplier)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Cost:
    """What one of a patient's studies counts against their lifetime cap."""

    plan: DPPlan
    closed: bool

    def __call__(self, role: str, units: int) -> float:
        if not self.closed:
            return self.plan.target_epsilon
        if role == "train":
            return self.plan.epsilon_for_steps(units)
        return self.plan.evaluation_epsilon_after(units)


def _check_study_id(study_id: str) -> None:
    if not isinstance(study_id, str) or not study_id or len(study_id) > 200:
        raise LedgerError(f"study_id: must be a non-empty string of at most 200 characters, got {study_id!r}")


def _evaluation(row: object) -> EvaluationCharge:
    raw = row.stats  # type: ignore[attr-defined]
    stats = tuple(float(v) for v in json.loads(raw)) if raw else ()
    return EvaluationCharge(row.study_id, row.slot, row.epsilon, row.count, row.score,  # type: ignore[attr-defined]
                            _aware(row.created_at), stats)  # type: ignore[attr-defined]


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored here is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
