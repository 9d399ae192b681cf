"""Site policy evaluation: what this hospital agrees to, and the decision it signs.

evaluate(policy, study, eligibility, budget) -> Evaluation is a pure function, so the same
inputs always give the same decision and the same reasons, and tests can check each rule
alone. The rules, in order (every failing rule adds a reason; any reason means refuse):

1. purpose allowed (DUO; an allowed term allows what it covers under consent.duo.covers:
   allowing GRU allows HMB, DS and POA),
2. organisation allowed, 3. region allowed, 4. commercial use only if allowed,
5. epsilon <= max_epsilon_per_study and above `decision_epsilon` (the decision count's epsilon
   is part of the study's); delta <= max_delta and delta <= 1/n for the n eligible patients
   (every epsilon and delta here is per PATIENT),
6. epsilon <= what is left of total_privacy_budget (spent in the privacy ledger plus what
   approved, unfinished studies have reserved), delta <= what is left of total_delta_budget,
7. every requested column held here and of the category the study says,
8. the study's decision count (the patients whose consent permits the study, who hold a record
   the study can use, and whose lifetime cap leaves room for the study, plus discrete Laplace
   noise, drawn once per study and charged to each patient counted) at least
   max(min_eligible_records, 1); the 1/n of rule 5 reads the same noised count (docs/privacy.md,
   "Counts"). A record the study can use holds every study column and the label as numbers,
   the label of the kind its task needs (0/1 for binary, an integer 0..classes-1 for
   multi-class, any number for regression, a time >= 0 for survival) and a survival study's
   event 0 or 1 (`exchange.node.outcomes.usable_patients`): a record that does not fit is left
   out, like one missing a column, never refused on (one record is one patient's fact),
9. a survival study: its time and event columns held, enough events for the Cox template in
   the study's NOISED event count (drawn with the decision count, same charge), and a public
   subcohort for its columns (`exchange.node.outcomes`),
10. `label`, when a caller passes one: why the study's label cannot be its target (count-free).

With no reason: mode auto-approve -> approve, auto-refuse -> refuse ("site policy is to
refuse automatically"), ask -> wait for the steward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from exchange.node.outcomes import OutcomeSummary
from exchange.node.settings import WILDCARD, SitePolicy
from exchange.study.feasibility import purpose_allowed
from exchange.study.spec import AcceptedStudy

Decision = Literal["approve", "refuse"]


@dataclass(frozen=True)
class StudyView:
    """The fields of a study the node decides on (from the coordinator's HospitalStudy:
    `{"id", "organisation_id", "organisation_region", "researcher_id", "status", "spec": {...}}`)."""

    study_id: str
    organisation: str
    region: str
    status: str
    purpose: str
    disease: str | None
    commercial: bool
    columns: dict[str, list[str]]
    label: str
    epsilon: float
    delta: float
    rounds: int
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    researcher: str | None = None
    task: str = "binary"
    #: survival studies: the event column (the label is the time)
    event: str | None = None
    #: multi-class studies: the number of classes (labels 0..classes-1)
    classes: int | None = None
    #: "local" (each hospital's DP-SGD) or "distributed" (the aggregate's, calibrated jointly)
    noise: str = "local"

    def spend(self, decision_epsilon: float) -> float:
        """What the study costs each patient counted, decision count included: its epsilon (the
        count's is part of it) for local noise; for distributed noise, whose aggregate noise all
        hospitals calibrate jointly from the study's epsilon, the count's epsilon comes on top
        (federated.client_app.training_epsilon)."""
        return self.epsilon + (decision_epsilon if self.noise == "distributed" else 0.0)

    def training_target(self, decision_epsilon: float) -> float:
        """What the study's training may spend per patient beside the decision count."""
        return max(0.0, self.spend(decision_epsilon) - decision_epsilon)

    @classmethod
    def from_json(cls, study: Mapping[str, Any]) -> StudyView:
        spec: Mapping[str, Any] = study.get("spec") or {}
        columns = spec.get("columns") or {}
        if isinstance(columns, list):  # federated.StudySpec style: flat list + categories
            cats = spec.get("data_categories") or ["?"]
            columns = {cats[0]: list(columns)} if len(cats) == 1 else {"?": list(columns)}
        return cls(
            study_id=str(study.get("id") or study.get("study_id") or spec.get("study_id")),
            organisation=str(study.get("organisation_id") or spec.get("organisation") or ""),
            region=str(study.get("organisation_region") or spec.get("region") or ""),
            status=str(study.get("status") or "submitted"),
            purpose=str(spec.get("purpose") or ""),
            disease=spec.get("disease"),
            commercial=bool(spec.get("commercial", False)),
            columns={str(k): [str(c) for c in v] for k, v in dict(columns).items()},
            label=str(spec.get("label") or "label"),
            epsilon=float(spec.get("epsilon") or 0.0),
            delta=float(spec.get("delta") or 0.0),
            rounds=int(spec.get("rounds") or 0),
            raw=dict(study),
            researcher=study.get("researcher_id") or None,
            task=str(spec.get("task") or "binary"),
            event=str(spec["event"]) if spec.get("event") is not None else None,
            classes=int(spec["classes"]) if isinstance(spec.get("classes"), int) else None,
            noise="distributed" if spec.get("noise") == "distributed" else "local",
        )

    def accepted(self) -> AcceptedStudy:
        """The study as the coordinator accepted it: what `exchange.study.spec` translates into
        the consent request, the same one the study's training gates records with."""
        spec = self.raw.get("spec")
        return AcceptedStudy(study_id=self.study_id, spec=dict(spec) if isinstance(spec, Mapping) else {},
                             organisation_id=self.organisation, region=self.region,
                             researcher_id=self.researcher)


@dataclass(frozen=True)
class Eligibility:
    """How many records consent would let this study use, and why the others are out;
    `patients` how many distinct patients those records belong to whose lifetime cap leaves
    room for the study (None: not counted), `over_lifetime_cap` how many it leaves out."""

    eligible: int
    excluded: dict[str, int] = field(default_factory=dict)
    patients: int | None = None
    over_lifetime_cap: int = 0
    #: the study's decision count (`federated.privacy_ledger.PrivacyLedger.decide`): the eligible
    #: patients with budget left, plus discrete Laplace noise. When given, every count threshold
    #: reads it and nothing else
    noisy_patients: int | None = None


@dataclass(frozen=True)
class Budget:
    """Privacy budget in epsilon: what the ledger says was spent, what approved but
    unfinished studies hold in reserve, and the configured total."""

    spent: float
    reserved: float
    total: float
    delta_spent: float = 0.0
    delta_reserved: float = 0.0
    delta_total: float = 1e-4

    @property
    def left(self) -> float:
        return max(0.0, self.total - self.spent - self.reserved)

    @property
    def delta_left(self) -> float:
        return max(0.0, self.delta_total - self.delta_spent - self.delta_reserved)


@dataclass(frozen=True)
class Evaluation:
    decision: Decision | None  # None: the steward decides (mode "ask")
    reasons: list[str]
    eligible_records: int


def _allowed(value: str, allowed: list[str]) -> bool:
    return WILDCARD in allowed or value in allowed


def _purpose_allowed(purpose: str, allowed: list[str]) -> bool:
    """An allowed purpose works like a consent permission: it allows every purpose it covers
    under the DUO matching rules (consent.duo.covers), e.g. allowing GRU allows HMB and DS. The
    same rule the coordinator applies to this hospital's published catalog."""
    return purpose_allowed(purpose, allowed)


def budget_problems(study: StudyView, budget: Budget, decision_epsilon: float = 0.0) -> list[str]:
    """Why `study` does not fit in what is left of the site's epsilon and delta budgets (none:
    it fits). Checked by `evaluate` and again, under the reservation lock, when an approval is
    stored (exchange/node/decisions.py). `decision_epsilon`: the site's decision count's, which
    a distributed-noise study spends beside its own (`StudyView.spend`)."""
    reasons: list[str] = []
    spend = study.spend(decision_epsilon)
    if spend > budget.left + 1e-12:
        reasons.append(f"epsilon {spend:g} exceeds the privacy budget left ({budget.left:.4g} "
                       f"of {budget.total:g}: {budget.spent:.4g} spent, {budget.reserved:.4g} reserved)")
    if study.delta > budget.delta_left * (1 + 1e-9):
        reasons.append(f"delta {study.delta:g} exceeds the delta budget left ({budget.delta_left:.3g} of "
                       f"{budget.delta_total:g}: {budget.delta_spent:.3g} spent, "
                       f"{budget.delta_reserved:.3g} reserved)")
    return reasons


def evaluate(policy: SitePolicy, study: StudyView, eligibility: Eligibility, budget: Budget,
             held_columns: Mapping[str, str], *, outcome: OutcomeSummary | None = None,
             label: str | None = None) -> Evaluation:
    """Decide on `study` (see the module docstring for the rules). `outcome`: what the eligible
    records hold in a survival study's time and event columns (rule 9); `label`: why the
    study's label cannot be its target here, if it cannot (rule 10)."""
    reasons: list[str] = []
    if not _purpose_allowed(study.purpose, policy.allowed_purposes):
        reasons.append(f"purpose {study.purpose!r} is not allowed by site policy "
                       f"(allowed: {', '.join(policy.allowed_purposes) or 'none'})")
    if not _allowed(study.organisation, policy.allowed_organisations):
        reasons.append(f"organisation {study.organisation!r} is not allowed by site policy")
    if not _allowed(study.region, policy.allowed_regions):
        reasons.append(f"region {study.region or '(none given)'!r} is not allowed by site policy")
    if study.commercial and not policy.allow_commercial:
        reasons.append("commercial use is not allowed by site policy")
    spend = study.spend(policy.decision_epsilon)
    if spend > policy.max_epsilon_per_study:
        reasons.append(f"epsilon {spend:g} exceeds the site maximum per study "
                       f"({policy.max_epsilon_per_study:g})"
                       + (" with the decision count's" if spend != study.epsilon else ""))
    if study.noise != "distributed" and study.epsilon <= policy.decision_epsilon:
        reasons.append(f"epsilon {study.epsilon:g} does not exceed the decision count's epsilon "
                       f"({policy.decision_epsilon:g}), which is part of every study's spend")
    if study.delta > policy.max_delta:
        reasons.append(f"delta {study.delta:g} exceeds the site maximum per study ({policy.max_delta:g})")
    noisy = eligibility.noisy_patients
    n = eligibility.patients if noisy is None else noisy
    if n is not None and n > 0 and study.delta > 1.0 / n:
        # no n in the text: the reasons are posted to the coordinator and logged for good
        reasons.append(f"delta {study.delta:g} exceeds 1/n for this hospital's n eligible patients")
    reasons.extend(budget_problems(study, budget, policy.decision_epsilon))
    wanted = [(category, column) for category, cols in study.columns.items() for column in cols]
    wanted.append(("", study.label))
    if study.event is not None:
        wanted.append(("", study.event))
    missing = [column for _category, column in wanted if column not in held_columns]
    if missing:
        reasons.append(f"column(s) not held at this hospital: {', '.join(sorted(set(missing)))}")
    wrong = [f"{column} is {held_columns[column]}, not {category}" for category, column in wanted
             if category and column in held_columns and held_columns[column] != category]
    if wrong:
        reasons.append("column category mismatch: " + "; ".join(wrong))
    if noisy is not None:
        # One noised count (epsilon-DP per patient, charged) decides every count threshold: no
        # patient's consent or revocation flips the decision outside the accounting.
        if noisy < max(policy.min_eligible_records, 1):
            reasons.append("fewer eligible patients (a noised count) than the site minimum "
                           f"({max(policy.min_eligible_records, 1)}); a patient counts when their "
                           "consent permits the study and they hold a record with every study "
                           "column and a label the study's task can use")
    elif eligibility.eligible < policy.min_eligible_records:
        # The count and the exclusions by reason stay here (`exchange node status`): a reason
        # leaves the hospital in the public log, where an exact count would show one patient
        # revoking between two studies (docs/privacy.md, "Counts").
        reasons.append("fewer records eligible under patients' consent than the site minimum "
                       f"({policy.min_eligible_records})")
    if noisy is None and eligibility.patients == 0 and eligibility.over_lifetime_cap:
        reasons.append(f"no eligible patient has privacy budget left for epsilon {study.epsilon:g} "
                       "(each would exceed their lifetime cap)")
    if study.task == "survival":
        if study.event is None:
            reasons.append("a survival study must name its event column")
        elif outcome is not None and not missing:
            reasons.extend(f"survival outcome: {problem}" for problem in outcome.problems())
    if label is not None and not missing and study.task != "survival":
        reasons.append(f"label: {label}")
    if reasons:
        return Evaluation("refuse", reasons, eligibility.eligible)
    if policy.mode == "auto-approve":
        return Evaluation("approve", ["meets site policy; approved automatically"], eligibility.eligible)
    if policy.mode == "auto-refuse":
        return Evaluation("refuse", ["site policy is to refuse studies automatically"], eligibility.eligible)
    return Evaluation(None, ["meets site policy; waiting for the data steward"], eligibility.eligible)
