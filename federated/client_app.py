"""The study's ClientApp: what one hospital does with each train and evaluate message.

Run config: the study (`federated.study_spec`). Node config: the hospital's identity and where its
records, contracts, privacy ledger, key and approvals are (`federated.runtime.site`).

Every train message, in this order (each step can end the round with a documented reply):
1. the study must be in the hospital's approved list            -> else ``refused``;
2. every study column must belong to a data category the study declared -> else ``refused``;
3. the hospital's training records are gated against their consent contracts *now*, so a
   revocation takes effect from the next round;                  none left -> ``no-data``;
4. the study's DP plan (noise calibrated so all planned rounds meet the study's epsilon per
   PATIENT, sample rate = batch / eligible patients) is registered in the privacy ledger on first
   use (refused if its delta is above the site maximum or 1/n), and this round's cumulative
   epsilon is checked against the study's target and the hospital's total budget
                                                                 -> else ``refused`` (overspend);
5. each consented patient is admitted against their LIFETIME cap (their contract's
   `max_epsilon`, else the hospital's total budget): a patient whose studies would together
   exceed it is left out (`federated.privacy_ledger`);           none left -> ``no-data``;
6. DP-SGD on the admitted patients' records and only the study's columns, one record per sampled
   patient per step (`federated.dp.train_round`);
7. the ledger is charged (the study's and every admitted patient's spend, before the weights
   leave), a receipt is signed with the hospital's key, and the reply carries the flat weights,
   counts and the receipt.                                       -> ``ok``

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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from audit.reward_commitment import DEFAULT_SIZE, Commitment, commit, padded_size
from federated import distributed_noise, eval_stats
from federated.accounting import AccountingError, plan_study
from federated.data import HospitalData, target_problem
from federated.dp import PatientIndex, RoundResult, train_round
from federated.evaluation import Release, noised_release, patient_scores, patient_statistics
from federated.privacy_ledger import BudgetExceededError, LedgerError
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
from federated.survival import SurvivalError, check_outcome
from federated.templates import get_template
from federated.weights import unpack

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
    data = data.complete([*spec.columns, *([spec.event] if spec.event else [])])
    problem = target_problem(spec.task, spec.label, data.y, spec.classes)
    if problem is not None:
        return HospitalOutcome(STATUS_REFUSED, f"label: {problem}")
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


def _excluded_text(excluded: dict[str, int]) -> str:
    """Why records were left out, WITHOUT counts or reason names: a refusal text leaves the
    hospital, and a count (or a reason appearing) would show one patient revoking between two
    rounds. The steward sees the exact breakdown in `exchange node status`."""
    return "consent, the study's terms or privacy caps exclude the others"


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
    if not gate.eligible:
        return HospitalOutcome(STATUS_NO_DATA, f"no consented training records for this study "
                               f"({_excluded_text(dict(gate.excluded))})",
                               metrics={"num_examples": 0.0})
    template = get_template(spec.template)
    defaults = template.defaults
    batch_size = spec.batch_size or defaults.batch_size
    local_steps = spec.local_steps or defaults.local_steps
    ledger = site.ledger()
    caps, default_cap = _caps(gate, gate.eligible), _default_cap(site)
    try:
        plan = ledger.plan(spec.study_id)
        if plan is None:
            ledger.check_target(spec.study_id, spec.epsilon)
            preview = ledger.admissible(spec.study_id, spec.epsilon, caps, default_cap)
            preview_admitted = within_capacity(site, spec.study_id, preview.admitted)
            if not preview_admitted:
                return HospitalOutcome(STATUS_NO_DATA, "no patient can take part: every consented "
                                       "patient would exceed their lifetime privacy cap",
                                       metrics={"num_examples": 0.0})
            if spec.noise == "distributed":
                new_plan = distributed_noise.ledger_plan(
                    _noise(spec, len(global_weights)), epsilon=spec.epsilon,
                    n_patients=len(preview_admitted))
            else:
                new_plan = plan_study(spec.epsilon, spec.delta, rounds=spec.rounds,
                                      n_patients=len(preview_admitted), batch_size=batch_size,
                                      steps_per_round=local_steps, accountant=spec.accountant)
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
            room = ledger.admissible(spec.study_id, spec.epsilon, caps, default_cap).admitted
            chosen = within_capacity(site, spec.study_id, room)
            caps = {p: c for p, c in caps.items() if p in chosen}
        admission = ledger.admit(spec.study_id, "train", caps, default_cap)
    except BudgetExceededError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy budget: {exc}")
    except (LedgerError, AccountingError, distributed_noise.DistributedNoiseError) as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy ledger: {exc}")
    admitted = train.select_records(admission.admitted)
    used = admitted.select_columns(spec.columns)
    if len(used) == 0:
        excluded = dict(gate.excluded)
        if admission.over_cap:
            excluded["over their lifetime privacy cap"] = admission.over_cap
        return HospitalOutcome(STATUS_NO_DATA, f"no training patient can take part in this round "
                               f"({_excluded_text(excluded)})", metrics={"num_examples": 0.0})
    try:
        targets = _targets(spec, admitted)
        if spec.task == "survival":
            check_outcome(targets[:, 0], targets[:, 1])
    except SurvivalError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"survival outcome: {exc}")
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
                             subcohort=_subcohort(spec))
    if not result.trained:
        return HospitalOutcome(STATUS_NO_DATA, result.reason or "no eligible records",
                               metrics={"num_examples": 0.0})
    try:
        charge = ledger.charge(spec.study_id, round_, result.epsilon, patients=set(used.pseudonyms))
    except BudgetExceededError as exc:
        return HospitalOutcome(STATUS_REFUSED, f"privacy budget: {exc}")
    rewards = reward_commitment(gate, set(used.pseudonyms), plan.n_patients, site.reward_capacity)
    store_openings(site.ledger().engine, spec.study_id, round_, rewards.openings)
    receipt = make_receipt(site.signer(), study_id=spec.study_id, round=round_, hospital_id=site.hospital_id,
                           records_used=contribution_weight(batch_size, plan.steps_per_round),
                           commitment=gate.commitment, epsilon_spent=charge.increment,
                           epsilon_total=result.epsilon, delta=plan.delta, spec_sha256=spec.sha256(),
                           rewards=rewards.public(), instant=at)
    # Only study-level figures leave: the patient and record counts (and the sample rate and
    # noise multiplier, which are functions of the patient count) stay in the node's ledger.
    metrics = {"num_examples": float(receipt.records_used), "steps": float(result.steps),
               "epsilon": result.epsilon}
    metrics.update(result.metrics if spec.noise == "distributed" else {})
    return HospitalOutcome(STATUS_OK, "", result.state, receipt, metrics)


def _noise(spec: StudySpec, n_weights: int) -> distributed_noise.DistributedNoise:
    return distributed_noise.for_study(spec, n_weights)


def _train_distributed(spec: StudySpec, template: Any, global_weights: np.ndarray, x: np.ndarray,
                       targets: np.ndarray, *, pseudonyms: Any, epsilon: float,
                       rounds_done: int) -> RoundResult:
    """This hospital's share of a distributed-noise round (`federated.distributed_noise`): its
    integer vector (clipped per-patient gradients plus its Skellam share, modulo the SecAgg range),
    encoded for secaggplus_mod, in place of the new weights."""
    noise = _noise(spec, len(global_weights))
    model = unpack(template.build(len(spec.columns), 0, spec.classes), global_weights)
    rng = SecureRandom()
    index = PatientIndex.build(len(x), pseudonyms)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32).reshape(-1))
    vector = distributed_noise.hospital_vector(model, template, xt, yt, patients=index.sample(1.0, rng),
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
    if len(used) == 0:
        return HospitalOutcome(STATUS_NO_DATA, "no consented hold-out patients "
                               f"({_excluded_text(dict(gate.excluded))})")
    targets = _targets(spec, admitted)
    if spec.task == "survival":
        try:
            check_outcome(targets[:, 0], targets[:, 1])
        except SurvivalError as exc:
            return HospitalOutcome(STATUS_REFUSED, f"survival outcome: {exc}")
    model = unpack(template.build(len(spec.columns), 0, spec.classes), global_weights)
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
    return Message(RecordDict({HELLO_KEY: reply}), reply_to=message)
