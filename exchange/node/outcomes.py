"""Decision-time checks of a survival study's outcome columns at this hospital.

A Cox study reads two outcome columns: the time to event or censoring (the study's `label`) and
the event indicator (its `event`). If either is missing, not numeric, a time is negative or an
event is not 0/1 in a record the study could use, the hospital's ClientApp would have to refuse
every round; and with too few events the partial likelihood carries too little information to fit
(the usual rule of thumb, at least 10 events per model coefficient, with a floor of 20). So the
node checks this when it DECIDES on the study, over the records whose consent permits it, and
refuses with the reason (`exchange.node.policy` rule 9): the study never becomes a failed run.

No value and no count leaves the node: the reasons name the column and the fault, never a
pseudonym or how many records have it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from exchange.node.models import Record

#: Events-per-coefficient rule of thumb and its floor (docs/survival.md).
EVENTS_PER_FEATURE = 10
MIN_EVENTS = 20


def min_events(n_features: int) -> int:
    """Events a Cox study with `n_features` coefficients needs among the eligible records."""
    return max(MIN_EVENTS, EVENTS_PER_FEATURE * n_features)


@dataclass(frozen=True)
class OutcomeSummary:
    """What the eligible records hold in a survival study's outcome columns (counts only)."""

    time_column: str
    event_column: str
    records: int
    time_missing: int = 0
    time_not_numeric: int = 0
    time_negative: int = 0
    event_missing: int = 0
    event_not_binary: int = 0
    events: int = 0
    needed_events: int = MIN_EVENTS
    #: whether a public subcohort (the Cox risk-set reference) holds the study's feature columns
    subcohort: bool = True
    #: `events` is the study's NOISED event count (drawn with its decision count, charged):
    #: what the decision reads (docs/privacy.md, "Counts")
    noised: bool = False

    def problems(self) -> list[str]:
        """One reason per fault, naming the column and the fault. No count: a reason leaves the
        hospital in the public log, where an exact count could show one patient's change
        between two studies (docs/privacy.md, "Counts"); `exchange node status` shows them."""
        out: list[str] = []
        for count, what in ((self.time_missing, f"time column {self.time_column!r} is missing"),
                            (self.time_not_numeric, f"time column {self.time_column!r} is not numeric"),
                            (self.time_negative, f"time column {self.time_column!r} is negative"),
                            (self.event_missing, f"event column {self.event_column!r} is missing"),
                            (self.event_not_binary,
                             f"event column {self.event_column!r} is not 0 or 1")):
            if count:
                out.append(f"{what} in eligible records")
        if not self.subcohort:
            out.append("no public subcohort holds the study's feature columns, so the Cox template "
                       "cannot form risk sets without private patients (docs/survival.md)")
        if not out and self.events < self.needed_events:
            what = "eligible patients with an event (a noised count)" if self.noised else \
                "events among the eligible records"
            out.append(f"fewer {what} than the Cox template needs ({self.needed_events} for "
                       f"{self.needed_events // EVENTS_PER_FEATURE or 1} coefficient(s))")
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def summarize_survival(session: Session, eligible: Iterable[str], *, time_column: str,
                       event_column: str, columns: list[str]) -> OutcomeSummary:
    """Count the outcome faults and the events among the records of the `eligible` pseudonyms,
    and check that a public subcohort holds the feature `columns`."""
    from federated.clinical_data import public_survival_reference

    subcohort = public_survival_reference(columns, "pretrain") is not None
    wanted = set(eligible)
    counts: dict[str, Any] = {"records": 0, "time_missing": 0, "time_not_numeric": 0, "time_negative": 0,
              "event_missing": 0, "event_not_binary": 0, "events": 0}
    for pseudonym, stored in session.execute(select(Record.pseudonym, Record.values)).tuples():
        if pseudonym not in wanted:
            continue
        counts["records"] += 1
        values: dict[str, Any] = stored or {}
        if values.get(time_column) is None:
            counts["time_missing"] += 1
        else:
            time = _number(values[time_column])
            if time is None:
                counts["time_not_numeric"] += 1
            elif time < 0:
                counts["time_negative"] += 1
        if values.get(event_column) is None:
            counts["event_missing"] += 1
        else:
            event = _number(values[event_column])
            if event not in (0.0, 1.0):
                counts["event_not_binary"] += 1
            elif event == 1.0:
                counts["events"] += 1
    return OutcomeSummary(time_column=time_column, event_column=event_column,
                          needed_events=min_events(len(columns)), subcohort=subcohort, **counts)


def label_problem(session: Session, eligible: Iterable[str], *, label: str, task: str,
                  classes: int | None, columns: list[str]) -> str | None:
    """Whether the study's `label` can be its target here, checked when the node DECIDES (a
    study names its own outcome among the mapped columns; docs/node.md): among the eligible
    records that hold the label and every feature column, at least one, and every label value
    of the kind the task needs (`federated.data.target_problem`). The text names the label and
    the fault, never a count or a value."""
    from federated.data import target_problem

    wanted = set(eligible)
    values: list[float] = []
    for pseudonym, stored in session.execute(select(Record.pseudonym, Record.values)).tuples():
        if pseudonym not in wanted:
            continue
        row: dict[str, Any] = stored or {}
        if row.get(label) is None or any(_number(row.get(c)) is None for c in columns):
            continue  # a record without the label or a feature is not used by the study
        number = _number(row[label])
        if number is None:
            return f"label {label!r} is not numeric in eligible records"
        values.append(number)
    if not values:
        return f"no eligible record holds the label {label!r} with every column the study reads"
    import numpy as np

    return target_problem(task, label, np.asarray(values), classes)


@dataclass(frozen=True)
class Usable:
    """Which eligible patients hold at least one record the study can use (every study column
    and the label present and numeric, the label of the kind the task needs, a survival
    study's event 0 or 1: what the ClientApp trains on, `federated.client_app.usable_records`),
    and, for a survival study, which of them have an event in such a record. Both stay in the
    hospital: the decision count counts `patients`, and the noised event count `events`."""

    patients: frozenset[str]
    events: frozenset[str]


def usable_patients(session: Session, eligible: Iterable[str], *, label: str, task: str,
                    classes: int | None, columns: list[str], event: str | None = None) -> Usable:
    """The `Usable` patients among `eligible`. A record that does not fit is left out like a
    record missing a column, never refused on: whether one record fits is a fact about one
    patient, and a refusal reason is public (docs/privacy.md, "Counts")."""
    import numpy as np

    from federated.data import target_fits

    wanted = set(eligible)
    patients: set[str] = set()
    events: set[str] = set()
    for pseudonym, stored in session.execute(select(Record.pseudonym, Record.values)).tuples():
        if pseudonym not in wanted:
            continue
        row: dict[str, Any] = stored or {}
        if any(_number(row.get(c)) is None for c in columns):
            continue
        target = _number(row.get(label))
        if target is None or not bool(target_fits(task, np.asarray([target]), classes)[0]):
            continue
        if task == "survival":
            flag = _number(row.get(event)) if event is not None else None
            if flag not in (0.0, 1.0):
                continue
            if flag == 1.0:
                events.add(pseudonym)
        patients.add(pseudonym)
    return Usable(frozenset(patients), frozenset(events))
