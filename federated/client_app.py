"""The study's ClientApp: what one hospital does with each train and evaluate message.

Run config: the study (`federated.study_spec`). Node config: the hospital's identity and where its
records, contracts, privacy ledger, key and approvals are (`federated.runtime.site`).

Every train message, in this order (each step can end the round with a documented reply):
1. the study must be in the hospital's approved list            -> else ``refused``;
2. every study column must belong to a data category the study declared -> else ``refused``;
   records whose label (or survival event) does not fit the study's task are left out, like
   records missing a column (`usable_records`), never refused on;
3. the hospital's training records are gated against their consent contracts *now*, so a
   revocation takes effect from the next round;
4. the study's decision count is read (the node daemon's draw; drawn and charged here if the
   node drew none, `decision_count`), and on first use the study's DP plan is registered in the
   privacy ledger: sized from that NOISED count (`federated.accounting.plan_patients`), noise
   calibrated so all planned rounds meet the study's epsilon less the count's per PATIENT
   (refused if its delta is above the site maximum or 1/n); this round's cumulative epsilon is
   checked against the study's target and the hospital's total budget
                                                                 -> else ``refused`` (overspend);
5. each consented patient is admitted against their LIFETIME cap (their contract's
   `max_epsilon`, else the hospital's total budget): a patient whose studies would together
   exceed it is left out (`federated.privacy_ledger`);
6. DP-SGD on the admitted patients' records and only the study's columns, one record per sampled
   patient per step, the update scaled by the plan's expected batch (`federated.dp_round.train_round`).
   With no patient left (all revoked, over their cap) the round still takes its steps on noise
   alone: a "no data" reply would show the last revocation (docs/privacy.md, "Counts");
7. the ledger is charged (the study's and every admitted patient's spend, before the weights
   leave), a receipt is signed with the hospital's key (epsilon_total = the decision count's
   epsilon + the rounds', and the plan's public parameters), and the reply carries the flat
   weights, the public weight and the receipt.                   -> ``ok``

Evaluation (`evaluate_hospital`) never runs for a refused, unknown or finished study: a train
message of round r >= 2 that trained (``ok``) also scores the model it carries (round r - 1's) on
the hold-out patients; an evaluate message scores the model of the round it names. Each round's
model is scored at most once: the release is two noised sums charged to the study's budget
(`federated.evaluation`), stored, and sent again unchanged if asked again.
Errors in the hospital's own set-up raise, and Flower turns them into an error reply the server
counts as dropped; the reasons above are normal replies, never crashes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from audit.reward_commitment import DEFAULT_SIZE, Commitment, commit, padded_size
from federated import distributed_noise, eval_stats
from federated.accounting import AccountantName, AccountingError, DPPlan, plan_patients, plan_study
from federated.data import HospitalData, target_fits
from federated.dp_round import PatientIndex, RoundResult, train_round
from federated.evaluation import Release, noised_release, patient_scores, patient_statistics
from federated.numpy_mlp import NumpyMLP
from federated.privacy_ledger import BudgetExceededError, DecisionCount, LedgerError
from federated.receipts import Receipt, make_receipt
from federated.reward_openings import store as store_openings
from federated.runtime.flwr_internals import SECAGG_CONFIGS_KEY
from federated.runtime.site import GateOutcome, Site
from federated.secure_random import SecureRandom
from federated.server_app import (
    EVAL_PREFIX,
    EVAL_STATS_KEY,
    GLOBAL_KEY,
    HELLO_KEY,
    METRIC_PREFIX,
    REPLY_KEY,
    STATUS_NO_DATA,
    STATUS_OK,
    STATUS_REFUSED,
    UPDATE_KEY,
    WEIGHTS_KEY,
    hello_bytes,
)
from federated.study_spec import StudySpec
from federated.templates import get_template

log = logging.getLogger("federated.client")


@dataclass
class HospitalOutcome:
    """What a hospital decided and produced for one message."""

    status: str
    reason: str = ""
    weights: np.ndarray | None = None
    receipt: Receipt | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: hold-out metrics of the global model the message carried (evaluation)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    #: the noised sufficient statistics of that evaluation (`federated.eval_stats`)
    eval_stats: tuple[float, ...] = ()


def _check_study(site: Site, spec: StudySpec) -> HospitalOutcome | HospitalData:
    """Approval and column checks shared by train and evaluate: a refusal, or the site's records."""
    if spec.study_id not in site.approved_studies():
        return HospitalOutcome(STATUS_REFUSED, f"study {spec.study_id!r} is not approved at this hospital")
    data, label = site.records()
    if label != spec.label:
        # a node's records carry every mapped column: the study names the one it predicts
        if spec.label not in data.columns:
            return HospitalOutcome(STATUS_REFUSED, f"label: this hospital holds no column {spec.label!r} "
                                   "(the study's label)")
        data = data.relabel(spec.label)
    missing = [c for c in spec.columns if c not in data.columns]
    if missing:
        return HospitalOutcome(STATUS_REFUSED, f"columns: this hospital has no column(s) {missing}")
    data = usable_records(spec, data.complete([*spec.columns, *([spec.event] if spec.event else [])]))
    undeclared = sorted({data.categories[c] for c in spec.columns} - set(spec.request.data_categories))
    if undeclared:
        return HospitalOutcome(STATUS_REFUSED, f"columns: the study reads data categories {undeclared} it "
                               "did not declare in request.data_categories")
    if spec.task == "survival":
        from federated.clinical_data import public_survival_reference

        if spec.event not in data.columns:
            return HospitalOutcome(STATUS_REFUSED, f"event: this hospital has no column {spec.event!r}")
        if public_survival_reference(spec.columns, "pretrain") is None:
            return HospitalOutcome(STATUS_REFUSED, "columns: no public subcohort holds the study's columns, "
                                   "so a Cox risk set cannot be formed without private patients")
    return data


def usable_records(spec: StudySpec, data: HospitalData) -> HospitalData:
    """The records the study can use: a label that fits its task (`federated.data.target_fits`)
    and, in a survival study, an event that is 0 or 1. The others are left out here, like a
    record missing a column; no round is refused over one record's value, which would tell the
    server something about one patient (docs/privacy.md, "Counts")."""
    keep = target_fits(spec.task, data.y, spec.classes)
    if spec.task == "survival" and spec.event is not None and spec.event in data.columns:
        event = data.select_columns([spec.event]).x[:, 0].astype(np.float64)
        keep &= np.isin(event, (0.0, 1.0))
    return data.where(keep)


def _targets(spec: StudySpec, data: HospitalData) -> np.ndarray:
    """The training targets: the label, or for survival [records, 2] (time, event)."""
    if spec.task == "survival":
        assert spec.event is not None
        return np.column_stack([np.asarray(data.y, dtype=np.float64),
                                data.select_columns([spec.event]).x[:, 0].astype(np.float64)])
    return np.asarray(data.y)


def _subcohort(spec: StudySpec) -> Any:
    if spec.task != "survival":
        return None
    from federated.clinical_data import public_survival_reference

    return public_survival_reference(spec.columns, "pretrain")


def contribution_weight(batch_size: int, steps: int) -> int:
    """A round's `records_used` in the receipt: the expected patient-samples of the round (expected
    batch x steps), from the study's public terms only, so that it reveals no count of this
    hospital's patients (docs/privacy.md, "Counts")."""
    return max(1, int(batch_size) * int(steps))


def reward_commitment(gate: GateOutcome, used: set[str], n_patients: int,
                      capacity: int | None = None) -> Commitment:
    """The salted Merkle commitment to {reward account: patients used who named it}; its tree size
    is the site's reward capacity when it has one (never more patients than that train), else
    fixed per study by the plan's patient count (at least the site constant)."""
    weights: dict[str, int] = {}
    for p in sorted(used):
        account = gate.reward_accounts.get(p)
        if account is not None:
            account = account if account.startswith("reward:") else f"reward:{account}"
            weights[account] = weights.get(account, 0) + 1
    return commit(weights, minimum_size=capacity or padded_size(n_patients, DEFAULT_SIZE))


def within_capacity(site: Site, study_id: str, patients: Iterable[str]) -> set[str]:
    """At most the site's reward capacity of `patients`: the first ones in an order keyed by the
    hospital's secret and the study (`consent.gate.round_key(secret, study, 0)`), so the choice is
    the same every round, unpredictable from outside, and a revocation lets at most one other
    patient in. All of them when the site has no capacity or they fit."""
    chosen = set(patients)
    capacity = site.reward_capacity
    if capacity is None or len(chosen) <= capacity:
        return chosen
    key = site.gate_key(study_id, 0)
    order = sorted(chosen, key=lambda p: hmac.new(key, p.encode(), hashlib.sha256).digest())
    return set(order[:capacity])


def _caps(gate: GateOutcome, candidates: frozenset[str] | set[str]) -> dict[str, float | None]:
    """Candidate patient -> their contract's lifetime epsilon cap (None: none named)."""
    return {p: gate.privacy_caps.get(p) for p in sorted(candidates)}


def _default_cap(site: Site) -> float:
    """A patient whose contract names no cap is capped by the hospital's total budget."""
    return float(site.ledger().total_budget() or 0.0)


def decision_count(site: Site, spec: StudySpec, data: HospitalData, at: datetime,
                   noise: Any = None) -> DecisionCount:
    """The study's decision count: the node daemon's draw, stored in the ledger when it decided
    on the study (`exchange.node.decisions`); when there is none (a hospital run without the
    daemon, e.g. the in-process harness), drawn now the same way, once, over the consented
    patients of the usable records (training and hold-out), with the site's decision epsilon,
    and charged to each patient counted (`PrivacyLedger.decide`). As at the node, the count-free
    limits come first (the site's maximum delta, the hospital's budget left): a study they
    refuse draws no count and charges nobody. `noise`: the draw's source (default the secure
    generator; tests pass one that adds nothing)."""
    ledger = site.ledger()
    stored = ledger.decision(spec.study_id)
    if stored is not None:
        return stored
    epsilon = site.decision_epsilon
    if spec.noise != "distributed" and spec.epsilon <= epsilon:
        raise LedgerError(f"epsilon: the study's epsilon {spec.epsilon:g} does not exceed the decision "
                          f"count's epsilon {epsilon:g}, which is part of it")
    site_max, _delta_budget = ledger.delta_limits()
    if spec.delta > site_max * (1 + 1e-9):
        raise BudgetExceededError(f"delta: study {spec.study_id!r} asks {spec.delta:g}, above the site "
                                  f"maximum {site_max:g}")
    ledger.check_target(spec.study_id, training_epsilon(spec, epsilon) + epsilon)
    gate = site.gate(spec.request, data.pseudonyms, at)
    events = None
    if spec.task == "survival" and spec.event is not None:
        flags = data.select_columns([spec.event]).x[:, 0]
        events = {p for p, e in zip(data.pseudonyms, flags, strict=True) if e == 1.0}
    return ledger.decide(spec.study_id, epsilon, training_epsilon(spec, epsilon), _caps(gate, gate.eligible),
                         _default_cap(site), noise=noise or SecureRandom(), events=events)


def draw_decision(site: Site, spec: StudySpec, at: datetime | None = None,
                  noise: Any = None) -> DecisionCount | HospitalOutcome:
    """The study's decision count as the first train message would draw it (`decision_count`),
    or the refusal that message would get before drawing; for a node without the daemon."""
    checked = _check_study(site, spec)
    if isinstance(checked, HospitalOutcome):
        return checked
    try:
        return decision_count(site, spec, checked, at or datetime.now(UTC), noise)
    except LedgerError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy ledger: {exc}")


def training_epsilon(spec: StudySpec, decision_epsilon: float) -> float:
    """What the study's DP-SGD rounds (and hold-out evaluations) may spend per patient: the
    study's epsilon less its decision count's, which is part of the study's spend (basic
    composition: the count is pure epsilon-DP). A distributed-noise study's aggregate noise is
    calibrated jointly by every hospital from the study's epsilon, so there the count's epsilon
    is charged beside it (docs/privacy.md, "Counts")."""
    if spec.noise == "distributed":
        return spec.epsilon
    return spec.epsilon - decision_epsilon


def train_hospital_round(site: Site, spec: StudySpec, round_: int, global_weights: np.ndarray,
                         at: datetime | None = None) -> HospitalOutcome:
    """One hospital's train step for `round_` (see module docstring); no Flower involved, so the
    in-process harness and unit tests call it directly."""
    at = at or datetime.now(UTC)
    checked = _check_study(site, spec)
    if isinstance(checked, HospitalOutcome):
        return checked
    train = checked.train()
    gate = site.gate(spec.request, train.pseudonyms, at, (spec.study_id, round_))
    # No "no data" reply when nobody is left: the round trains on the patients there are (none:
    # noise alone), so the last patient's revocation is as invisible as any other.
    template = get_template(spec.template)
    defaults = template.defaults
    batch_size = spec.batch_size or defaults.batch_size
    ledger = site.ledger()
    caps, default_cap = _caps(gate, gate.eligible), _default_cap(site)
    try:
        plan = ledger.plan(spec.study_id)
        # a study planned before decision counts existed keeps its plan and has none (0)
        decision = decision_count(site, spec, checked, at) if plan is None else ledger.decision(spec.study_id)
        decided = 0.0 if decision is None else decision.epsilon
        if decision is not None and decision.noisy_count < 1:
            # the node's decision rule (at least one patient, by the noised count): a function of
            # the count drawn once for the study, so the same answer every round
            return HospitalOutcome(STATUS_NO_DATA, "no eligible patients by this hospital's noised "
                                   "decision count (drawn once for the study)", metrics={"num_examples": 0.0})
        if plan is None:
            assert decision is not None
            target = training_epsilon(spec, decided)
            ledger.check_target(spec.study_id, target)
            if spec.noise == "distributed":
                # sized from the noised decision count, never the exact one (plan_patients)
                n_plan = plan_patients(decision.noisy_count, holdout_fraction=site.holdout_fraction,
                                       capacity=site.reward_capacity)
                new_plan = distributed_noise.ledger_plan(
                    _noise(spec, len(global_weights)), epsilon=target, n_patients=n_plan)
            else:
                new_plan = _planned(_plan_terms(site, spec, decision))
            plan = ledger.register_study(spec.study_id, new_plan)
        charges = ledger.charges(spec.study_id)
        if any(c.round == round_ for c in charges):
            return HospitalOutcome(STATUS_REFUSED, f"round {round_} was already trained here; training it "
                                   "again would spend privacy twice")
        if len(charges) >= plan.rounds:
            return HospitalOutcome(STATUS_REFUSED, f"all {plan.rounds} planned rounds already trained here")
        expected = plan.epsilon_after(len(charges) + 1)
        ledger.check(spec.study_id, round_, expected)
        if site.reward_capacity is not None and len(caps) > site.reward_capacity:
            # choose among the patients the lifetime filter lets in, before admitting (admit
            # reserves budget for every patient it lets in)
            room = ledger.admissible(spec.study_id, plan.target_epsilon, caps, default_cap).admitted
            chosen = within_capacity(site, spec.study_id, room)
            caps = {p: c for p, c in caps.items() if p in chosen}
        admission = ledger.admit(spec.study_id, "train", caps, default_cap)
    except BudgetExceededError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy budget: {exc}")
    except (LedgerError, AccountingError, distributed_noise.DistributedNoiseError) as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy ledger: {exc}")
    admitted = train.select_records(admission.admitted)
    used = admitted.select_columns(spec.columns)
    targets = _targets(spec, admitted)
    if spec.noise == "distributed":
        done = len(charges) + 1
        result = _train_distributed(spec, template, global_weights, used.x, targets,
                                    pseudonyms=used.pseudonyms, epsilon=plan.epsilon_after(done),
                                    rounds_done=done)
    else:
        result = train_round(template, global_weights, used.x, targets,
                             noise_multiplier=plan.noise_multiplier,
                             sample_rate=plan.sample_rate, local_steps=plan.steps_per_round,
                             clip=spec.clip or defaults.clip, lr=spec.lr or defaults.lr,
                             momentum=spec.momentum if spec.momentum is not None else defaults.momentum,
                             delta=plan.delta, prior_steps=len(charges) * plan.steps_per_round,
                             accountant=plan.accountant, patients=used.pseudonyms, n_classes=spec.classes,
                             subcohort=_subcohort(spec), plan_patients=plan.n_patients)
    if not result.trained:
        return HospitalOutcome(STATUS_REFUSED, f"training: {result.reason or 'not trained'}")
    try:
        charge = ledger.charge(spec.study_id, round_, result.epsilon, patients=set(used.pseudonyms))
    except BudgetExceededError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy budget: {exc}")
    rewards = reward_commitment(gate, set(used.pseudonyms), plan.n_patients, site.reward_capacity)
    store_openings(site.ledger().engine, spec.study_id, round_, rewards.openings)
    # The study's spend per patient: its decision count's epsilon plus the rounds' (basic
    # composition); the first receipt carries the count's share in its epsilon_spent.
    before = decided + charges[-1].epsilon if charges else 0.0
    total = decided + charge.epsilon
    receipt = make_receipt(site.signer(), study_id=spec.study_id, round=round_, hospital_id=site.hospital_id,
                           records_used=contribution_weight(batch_size, plan.steps_per_round),
                           commitment=gate.commitment, epsilon_spent=max(0.0, total - before),
                           epsilon_total=total, delta=plan.delta, spec_sha256=spec.sha256(),
                           rewards=rewards.public(), instant=at,
                           accounting=receipt_accounting(plan, decided, charge.epsilon))
    # Only study-level figures leave: no patient or record count. The sample rate and noise
    # multiplier (in the receipt) are post-processing of the released decision count.
    metrics = {"num_examples": float(receipt.records_used), "steps": float(result.steps),
               "epsilon": total}
    metrics.update(result.metrics if spec.noise == "distributed" else {})
    return HospitalOutcome(STATUS_OK, "", result.state, receipt, metrics)


@dataclass(frozen=True)
class PlanTerms:
    """Everything a study's DP plan is calibrated from (`federated.accounting.plan_study`)."""

    target_epsilon: float
    delta: float
    rounds: int
    n_patients: int
    batch_size: int
    steps_per_round: int
    accountant: AccountantName

    def plan(self) -> DPPlan:
        return plan_study(self.target_epsilon, self.delta, rounds=self.rounds, n_patients=self.n_patients,
                          batch_size=self.batch_size, steps_per_round=self.steps_per_round,
                          accountant=self.accountant)


def _plan_terms(site: Site, spec: StudySpec, decision: DecisionCount) -> PlanTerms:
    """The terms of a local-noise study's plan at this hospital: the study's training epsilon and
    public parameters, and the patient count sized from the noised decision count, never the
    exact one (`plan_patients`)."""
    defaults = get_template(spec.template).defaults
    n_plan = plan_patients(decision.noisy_count, holdout_fraction=site.holdout_fraction,
                           capacity=site.reward_capacity)
    return PlanTerms(training_epsilon(spec, decision.epsilon), spec.delta, spec.rounds, n_plan,
                     spec.batch_size or defaults.batch_size, spec.local_steps or defaults.local_steps,
                     spec.accountant)


#: Plans being calibrated ahead of a study's first train message (`plan_ahead`), by their terms.
_planning: dict[PlanTerms, Future[DPPlan]] = {}
_planning_lock = threading.Lock()
#: at most this many plans are kept (the oldest goes first; each is a few numbers)
MAX_PLANS_AHEAD = 32


def _calibrate_ahead(terms: PlanTerms, result: Future[DPPlan]) -> None:
    try:
        plan = terms.plan()
        # each round's and each evaluation's epsilon too: the accountant caches them, so no
        # round pays for its own accounting
        for k in range(1, plan.rounds + 1):
            plan.epsilon_after(k)
            plan.evaluation_epsilon_after(k)
    except BaseException as exc:  # handed to the train message, which reports it as without the plan
        result.set_exception(exc)
    else:
        result.set_result(plan)


def plan_ahead(site: Site, spec: StudySpec) -> Future[DPPlan] | None:
    """Start calibrating a local-noise study's DP plan in the background, when the server's hello
    shows the study is about to train here: the calibration (a search over the PRV accountant)
    is the largest part of a first round beyond training, and the hello comes a round trip or
    more before the first train message, which then takes the result (`_planned`). Nothing is
    stored or charged here: only the node daemon's stored decision count is read, so a study
    that is not approved, not yet decided, already planned or of distributed noise starts
    nothing (None)."""
    if spec.noise == "distributed" or spec.study_id not in site.approved_studies():
        return None
    ledger = site.ledger()
    decision = ledger.decision(spec.study_id)
    if decision is None or decision.noisy_count < 1 or ledger.plan(spec.study_id) is not None:
        return None
    terms = _plan_terms(site, spec, decision)
    with _planning_lock:
        running = _planning.get(terms)
        if running is not None:
            return running
        while len(_planning) >= MAX_PLANS_AHEAD:
            _planning.pop(next(iter(_planning)))
        result: Future[DPPlan] = Future()
        _planning[terms] = result
    threading.Thread(target=_calibrate_ahead, args=(terms, result), name=f"plan-{spec.study_id}",
                     daemon=True).start()
    return result


def plan_approved(site: Site) -> list[str]:
    """`plan_ahead` for every study approved here whose spec the node wrote with its approval
    (`Site.approved_specs`): the node writes it once it has decided and drawn the study's count,
    seconds before the study's run starts, so the first round finds its plan calibrated instead
    of calibrating it beside the round's training. The same function of the same terms as the
    hello's and the train message's (`_planned` takes the result only when the terms match the
    run's own spec); nothing is stored or charged. Returns the studies being (or already)
    calibrated ahead."""
    specs = site.approved_specs()
    return [study_id for study_id, spec in specs.items() if plan_ahead(site, spec) is not None]


def _planned(terms: PlanTerms) -> DPPlan:
    """The plan for these terms: the one `plan_ahead` calibrated (waiting for it if it is still
    running; it stays for another hospital of this process with the same terms), else calibrated
    now. Either way the same function of the same terms."""
    with _planning_lock:
        ahead = _planning.get(terms)
    return terms.plan() if ahead is None else ahead.result()


def receipt_accounting(plan: Any, decision_epsilon: float, training_epsilon: float) -> dict[str, Any]:
    """The receipt's `accounting`: how its epsilon_total composes (the decision count's epsilon
    plus the DP-SGD rounds') and the plan's public parameters. The noise multiplier and sample
    rate are post-processing of the released decision count (`federated.accounting.plan_patients`),
    so they reveal no exact count and the researcher's report can show them."""
    return {"decision_epsilon": float(decision_epsilon), "training_epsilon": float(training_epsilon),
            "noise_multiplier": float(plan.noise_multiplier), "sample_rate": float(plan.sample_rate),
            "steps_per_round": int(plan.steps_per_round), "accountant": str(plan.accountant)}


def _noise(spec: StudySpec, n_weights: int) -> distributed_noise.DistributedNoise:
    return distributed_noise.for_study(spec, n_weights)


def _train_distributed(spec: StudySpec, template: Any, global_weights: np.ndarray, x: np.ndarray,
                       targets: np.ndarray, *, pseudonyms: Any, epsilon: float,
                       rounds_done: int) -> RoundResult:
    """This hospital's share of a distributed-noise round (`federated.distributed_noise`): its
    integer vector (clipped per-patient gradients plus its Skellam share, modulo the SecAgg range),
    encoded for secaggplus_mod, in place of the new weights."""
    noise = _noise(spec, len(global_weights))
    model = NumpyMLP.from_flat(template, len(spec.columns), global_weights, spec.classes)
    rng = SecureRandom()
    index = PatientIndex.build(len(x), pseudonyms)
    xa = np.ascontiguousarray(x, dtype=np.float32)
    ya = np.ascontiguousarray(targets, dtype=np.float32).reshape(-1)
    vector = distributed_noise.hospital_vector(model, template, xa, ya, patients=index.sample(1.0, rng),
                                               noise=noise, rng=rng)
    metrics = {distributed_noise.INTEGER_METRIC: 1.0, **noise.guarantees(rounds_done)}
    return RoundResult(status="trained", state=distributed_noise.encode(vector), num_examples=len(x), steps=1,
                       epsilon=epsilon, metrics=metrics, num_patients=index.n_patients)


def evaluate_hospital(site: Site, spec: StudySpec, global_weights: np.ndarray, slot: int,
                      at: datetime | None = None) -> HospitalOutcome:
    """Score the model of round `slot` on the hospital's consented hold-out patients, through
    the accountant (`federated.evaluation`): at most one charged release per slot, none for a
    study that is not approved here, that this hospital never trained in, or that is finished.
    A second request for a charged slot gets the stored release back, whatever weights it
    carries (so crafted weights learn nothing new)."""
    at = at or datetime.now(UTC)
    checked = _check_study(site, spec)
    if isinstance(checked, HospitalOutcome):
        return checked
    template = get_template(spec.template)
    ledger = site.ledger()
    plan = ledger.plan(spec.study_id)
    if plan is None or plan.eval_noise_multiplier is None:
        return HospitalOutcome(STATUS_REFUSED, "evaluation: this hospital has not trained in the study, "
                               "so it has no evaluation plan")
    if ledger.is_closed(spec.study_id):
        return HospitalOutcome(STATUS_REFUSED, "evaluation: the study is finished at this hospital")
    if not isinstance(slot, int) or not 1 <= slot <= plan.rounds:
        return HospitalOutcome(STATUS_REFUSED, f"evaluation: round {slot} is not one of the study's "
                               f"{plan.rounds} rounds")
    prior = ledger.evaluation(spec.study_id, slot)
    if prior is not None:  # asked again: the same release, nothing charged
        release = Release(prior.count, prior.score)
        metrics = release.metrics(template, checked.target_scale, prior.epsilon)
        return HospitalOutcome(STATUS_OK, "", metrics=metrics, eval_stats=prior.stats)
    done = len(ledger.evaluations(spec.study_id))
    if done >= plan.rounds:
        return HospitalOutcome(STATUS_REFUSED, f"evaluation: all {plan.rounds} evaluations were used")
    test = checked.test()
    training = set(checked.train().pseudonyms)  # a patient with training records is not held out
    gate = site.gate(spec.request, test.pseudonyms, at)
    candidates = {p for p in gate.eligible if p not in training}
    try:
        admission = ledger.admit(spec.study_id, "eval", _caps(gate, candidates), _default_cap(site))
    except LedgerError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy ledger: {exc}")
    admitted = test.select_records(admission.admitted)
    used = admitted.select_columns(spec.columns)
    # no hold-out patient left: the release is noise alone, charged as any other (no "no data")
    targets = _targets(spec, admitted)
    model = NumpyMLP.from_flat(template, len(spec.columns), global_weights, spec.classes)
    scores = patient_scores(template, model, used.x, targets, used.pseudonyms, columns=spec.columns)
    try:
        stats = patient_statistics(template, model, used.x, targets, used.pseudonyms, columns=spec.columns,
                                   classes=spec.classes)
    except ValueError as exc:  # a class label outside 0..classes-1, no public survival set-up
        return HospitalOutcome(STATUS_REFUSED, f"evaluation: {exc}")
    release = noised_release(scores, plan.eval_noise_multiplier, SecureRandom(), stats=stats,
                             blocks=eval_stats.blocks(template.task))
    try:
        stored, _fresh = ledger.charge_evaluation(
            spec.study_id, slot, plan.evaluation_epsilon_after(done + 1), count=release.count,
            score=release.score, patients=set(used.pseudonyms), stats=release.stats)
    except BudgetExceededError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy budget: {exc}")
    except (LedgerError, AccountingError) as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy ledger: {exc}")
    return HospitalOutcome(STATUS_OK, "", metrics=Release(stored.count, stored.score).metrics(
        template, checked.target_scale, stored.epsilon), eval_stats=stored.stats)


def _reply(message: Message, site_id: str, outcome: HospitalOutcome, started: float,
           wall_started: float) -> Message:
    reply: dict[str, Any] = {"status": outcome.status, "reason": outcome.reason, "hospital": site_id}
    if outcome.receipt is not None:
        reply["receipt"] = outcome.receipt.to_bytes()
    metrics = dict(outcome.metrics)
    # Timing only (for the per-round breakdown): when the ClientApp started and ended.
    metrics["compute_s"] = time.perf_counter() - started
    metrics["t_start"] = wall_started
    metrics["t_end"] = time.time()
    reply.update({METRIC_PREFIX + name: float(value) for name, value in metrics.items()})
    reply.update({EVAL_PREFIX + name: float(value) for name, value in outcome.eval_metrics.items()})
    if outcome.eval_stats:
        reply[EVAL_STATS_KEY] = [float(v) for v in outcome.eval_stats]
    content = RecordDict({REPLY_KEY: ConfigRecord(reply)})
    if outcome.weights is not None:
        content[UPDATE_KEY] = ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(outcome.weights,
                                                                                   dtype=np.float32))})
    return Message(content, reply_to=message)


def _inputs(message: Message, context: Context) -> tuple[Site, StudySpec, int, np.ndarray]:
    site = Site.from_node_config(context.node_config)
    spec = StudySpec.from_run_config(context.run_config)
    try:
        round_ = int(message.metadata.group_id)
    except ValueError:
        raise ValueError(f"group_id: the server round, got {message.metadata.group_id!r}") from None
    weights = np.asarray(message.content.array_records[GLOBAL_KEY][WEIGHTS_KEY].numpy(), dtype=np.float32)
    return site, spec, round_, weights


def _secagg_mod(message: Message, context: Context, call_next: Any) -> Message:
    from federated.secagg.client import secagg_mod

    return secagg_mod(message, context, call_next)


#: SecAgg+ stage messages go through Flower's secaggplus_mod (federated.secagg.client).
app = ClientApp(mods=[_secagg_mod])


@app.train()
def train(message: Message, context: Context) -> Message:
    started, wall_started = time.perf_counter(), time.time()
    site, spec, round_, weights = _inputs(message, context)
    if spec.secure_aggregation and SECAGG_CONFIGS_KEY not in message.content.config_records:
        # A server that skips SecAgg+ would see this hospital's update in clear: nothing is trained.
        outcome = HospitalOutcome(STATUS_REFUSED, "the study requires secure aggregation; this train message "
                                  "is not part of the SecAgg+ protocol")
        log.warning("study %s round %d: plain train message refused (secure aggregation)", spec.study_id,
                    round_)
        return _reply(message, site.hospital_id, outcome, started, wall_started)
    outcome = train_hospital_round(site, spec, round_, weights)
    # The incoming model is round_ - 1's: scored once, and only when this hospital trained.
    if outcome.status == STATUS_OK and round_ >= 2:
        evaluation = evaluate_hospital(site, spec, weights, round_ - 1)
        if evaluation.status == STATUS_OK:
            outcome.eval_metrics, outcome.eval_stats = evaluation.metrics, evaluation.eval_stats
    log.info("study %s round %d at %s: %s %s", spec.study_id, round_, site.hospital_id, outcome.status,
             outcome.reason)
    return _reply(message, site.hospital_id, outcome, started, wall_started)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    started, wall_started = time.perf_counter(), time.time()
    site, spec, round_, weights = _inputs(message, context)
    outcome = evaluate_hospital(site, spec, weights, round_)
    if outcome.status == STATUS_OK:
        outcome.eval_metrics, outcome.metrics = outcome.metrics, {}
    return _reply(message, site.hospital_id, outcome, started, wall_started)


@app.query()
def hello(message: Message, context: Context) -> Message:
    """The server's hello: name this hospital, signed with its key over the server's nonce, this
    node id and the study (`federated.server_app.NodeDirectory`), so only approved hospitals'
    nodes get the study's model and a node cannot pass for another hospital."""
    site = Site.from_node_config(context.node_config)
    spec = StudySpec.from_run_config(context.run_config)
    record = message.content.config_records.get(HELLO_KEY)
    if record is None or not isinstance(record.get("nonce"), str):
        raise ValueError(f"{HELLO_KEY}: a query message must carry a nonce")
    signature = site.signer().sign(hello_bytes(spec.study_id, site.hospital_id, context.node_id,
                                               str(record["nonce"])))
    reply = ConfigRecord({"hospital": site.hospital_id, "signature": signature})
    try:
        plan_ahead(site, spec)
    except Exception:  # an optimisation only: the first train message calibrates the plan itself
        log.exception("study %s: the DP plan could not be calibrated ahead", spec.study_id)
    return Message(RecordDict({HELLO_KEY: reply}), reply_to=message)
