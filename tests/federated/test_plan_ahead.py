"""The DP plan calibrated ahead: at the server's hello (`federated.client_app.plan_ahead`), and
earlier, when the node writes the study's approval with its spec (`plan_approved`, the warm
executor's `watch_approvals`).

The calibration is a search over the PRV accountant and was the largest part of a study's first
round beyond training. The hello starts it in the background; the first train message takes the
result. These tests show that it changes nothing but the time: the same plan, one calibration,
nothing stored or charged before the train message, the same refusal when it fails, and nothing
started for a study that must not train here.
"""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict
from sqlalchemy import create_engine

from federated import client_app
from federated.client_app import draw_decision, plan_ahead, plan_approved, train_hospital_round
from federated.dp import initial_state
from federated.privacy_ledger import PrivacyLedger
from federated.runtime import flwr_internals
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
from federated.runtime.inprocess import InProcessGrid
from federated.server_app import ServerOptions, StudyFailedError, run_study_rounds
from federated.study_spec import StudySpec

NOW = datetime(2026, 6, 1, tzinfo=UTC)
PRIVACY: dict[str, Any] = {"epsilon": 3.0, "rounds": 3, "accountant": "rdp"}


class _Exact:
    """A decision-count noise source that adds nothing (the mechanism: tests/node)."""

    def discrete_laplace(self, epsilon: float) -> int:
        return 0


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites", hospitals=("hospital-a", "hospital-b"))


@pytest.fixture
def calibrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every call of the real `plan_study` from the ClientApp: its thread's name, its arguments."""
    calls: list[tuple[Any, ...]] = []
    real = client_app.plan_study

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, args, tuple(sorted(kwargs.items()))))
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "plan_study", counted)
    client_app._planning.clear()
    return calls


def _decided(demo: DemoSite, spec: StudySpec) -> None:
    """What the node daemon does on approval: approve, and draw the decision count."""
    approve(demo.site, spec.study_id)
    draw_decision(demo.site, spec, NOW, noise=_Exact())


def _ledger(demo: DemoSite) -> PrivacyLedger:
    return PrivacyLedger(create_engine(demo.site.ledger_url))


def test_the_first_round_takes_the_plan_calibrated_ahead(sites: dict[str, DemoSite],
                                                          calibrations: list[Any]) -> None:
    demo, spec = sites["hospital-a"], demo_spec("s-ahead", **PRIVACY)
    _decided(demo, spec)
    ahead = plan_ahead(demo.site, spec)
    assert ahead is not None
    planned = ahead.result(timeout=120)
    assert _ledger(demo).plan(spec.study_id) is None  # nothing stored before the train message
    assert _ledger(demo).charges(spec.study_id) == []
    assert plan_ahead(demo.site, spec) is ahead  # asked twice (two hellos): one calibration
    outcome = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert outcome.status == "ok", outcome.reason
    assert _ledger(demo).plan(spec.study_id) == planned
    assert len(calibrations) == 1  # the train message did not calibrate again
    assert calibrations[0][0] == "plan-s-ahead"  # in the background thread the hello started
    # the plan the train message would have calibrated itself (the same terms, the same function)
    decision = _ledger(demo).decision(spec.study_id)
    assert decision is not None
    assert client_app._plan_terms(demo.site, spec, decision).plan() == planned
    assert plan_ahead(demo.site, spec) is None  # planned: nothing more to calibrate


def test_nothing_is_calibrated_for_a_study_that_must_not_train_here(sites: dict[str, DemoSite],
                                                                     calibrations: list[Any]) -> None:
    demo = sites["hospital-a"]
    unapproved = demo_spec("s-unapproved", **PRIVACY)
    assert plan_ahead(demo.site, unapproved) is None
    undecided = demo_spec("s-undecided", **PRIVACY)
    approve(demo.site, undecided.study_id)
    assert plan_ahead(demo.site, undecided) is None  # the daemon has not drawn its count
    distributed = demo_spec("s-distributed", **{**PRIVACY, "noise": "distributed",
                                                "secure_aggregation": True, "min_hospitals": 3})
    _decided(demo, distributed)
    assert plan_ahead(demo.site, distributed) is None
    assert calibrations == []
    assert client_app._planning == {}


def test_a_calibration_that_fails_ahead_refuses_the_round_as_without_it(sites: dict[str, DemoSite],
                                                                         calibrations: list[Any]) -> None:
    # epsilon 0.1002 leaves 0.0002 for training after the 0.1 decision count: no noise reaches it
    results = {}
    for hospital, ahead in (("hospital-a", True), ("hospital-b", False)):
        demo, spec = sites[hospital], demo_spec("s-unreachable", **{**PRIVACY, "epsilon": 0.1002})
        _decided(demo, spec)
        if ahead:
            started = plan_ahead(demo.site, spec)
            assert started is not None
            with pytest.raises(Exception, match="not reachable"):
                started.result(timeout=120)
        weights = initial_state(spec.template, len(spec.columns))
        outcome = train_hospital_round(demo.site, spec, 1, weights, NOW)
        results[hospital] = (outcome.status, outcome.reason)
        assert _ledger(demo).plan(spec.study_id) is None and _ledger(demo).charges(spec.study_id) == []
    assert results["hospital-a"] == results["hospital-b"]
    assert results["hospital-a"][0] == "refused" and "not reachable" in results["hospital-a"][1]


def test_a_study_run_through_the_clientapp_calibrates_once_per_hospital(sites: dict[str, DemoSite],
                                                                       calibrations: list[Any],
                                                                       tmp_path: Path) -> None:
    spec = demo_spec("s-hello", **PRIVACY)
    for demo in sites.values():
        _decided(demo, spec)
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config())
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    options = ServerOptions(output_dir=tmp_path / "out", poll=0.01,
                            hospital_keys={h: d.signer.public_key for h, d in sites.items()},
                            stop_event=threading.Event())

    class _Observer:
        def __init__(self) -> None:
            self.rounds: list[int] = []

        def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
            self.rounds.append(round)

        def on_complete(self, model_path: Path, sha256: str) -> None:
            pass

        def on_failed(self, reason: str) -> None:
            raise AssertionError(reason)

    observer = _Observer()
    with contextlib.suppress(StudyFailedError):
        run_study_rounds(grid, context, observer, options)
    assert observer.rounds == [1, 2, 3]
    # each calibration started by a hello, none repeated by a train message (two hospitals with
    # the same terms in one process share one)
    assert 1 <= len(calibrations) <= len(sites)
    assert {name for name, _, _ in calibrations} == {"plan-s-hello"}
    for demo in sites.values():
        assert _ledger(demo).plan(spec.study_id) is not None


def _approve_with_spec(demo: DemoSite, *specs: StudySpec, approved: tuple[str, ...] = (),
                       extra: dict[str, Any] | None = None) -> None:
    """What the node daemon writes on approval: the ids, and each study's spec beside it."""
    body = {"approved": sorted({*approved, *(s.study_id for s in specs)}),
            "specs": {s.study_id: json.loads(s.canonical_bytes()) for s in specs} | (extra or {})}
    tmp = demo.site.approvals_path.with_name("approvals.json.tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(demo.site.approvals_path)


def test_a_study_approved_with_its_spec_is_calibrated_before_its_run(sites: dict[str, DemoSite],
                                                                      calibrations: list[Any]) -> None:
    demo, spec = sites["hospital-a"], demo_spec("s-approved", **PRIVACY)
    _approve_with_spec(demo, spec)
    draw_decision(demo.site, spec, NOW, noise=_Exact())
    assert plan_approved(demo.site) == [spec.study_id]
    decision = _ledger(demo).decision(spec.study_id)
    assert decision is not None
    ahead = client_app._planning[client_app._plan_terms(demo.site, spec, decision)]
    planned = ahead.result(timeout=120)
    assert _ledger(demo).plan(spec.study_id) is None  # nothing stored before the train message
    assert _ledger(demo).charges(spec.study_id) == []
    assert plan_ahead(demo.site, spec) is ahead  # the run's hello finds it: one calibration
    outcome = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert outcome.status == "ok", outcome.reason
    assert _ledger(demo).plan(spec.study_id) == planned
    assert [name for name, _, _ in calibrations] == ["plan-s-approved"]
    assert plan_approved(demo.site) == []  # planned: nothing more to calibrate


def test_only_valid_specs_of_approved_studies_are_calibrated_ahead(sites: dict[str, DemoSite],
                                                                    calibrations: list[Any]) -> None:
    demo = sites["hospital-a"]
    spec = demo_spec("s-listed", **PRIVACY)
    not_approved = demo_spec("s-not-approved", **PRIVACY)
    _decided(demo, not_approved)  # counted, then no longer approved (its approval withdrawn)
    _approve_with_spec(demo, spec, approved=("s-broken", "s-other"), extra={
        "s-not-approved": json.loads(not_approved.canonical_bytes()),  # its id is not in "approved"
        "s-broken": {"study_id": "s-broken", "epsilon": "many"},  # not a spec
        "s-other": json.loads(spec.canonical_bytes()),  # another study's spec under this id
    })
    assert demo.site.approved_studies() == {"s-listed", "s-broken", "s-other"}
    assert demo.site.approved_specs() == {"s-listed": spec}
    assert plan_approved(demo.site) == []  # approved, but the daemon has not drawn its count yet
    assert calibrations == []
    # an approvals file without specs (an older daemon): nothing to calibrate ahead, no error
    demo.site.approvals_path.write_text(json.dumps({"approved": ["s-listed"]}))
    assert demo.site.approved_specs() == {}
    assert plan_approved(demo.site) == []


def test_the_executor_calibrates_a_study_when_its_approval_is_written(
        sites: dict[str, DemoSite], calibrations: list[Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from federated.runtime.deployment import write_node_config
    from federated.runtime.executor import WarmExecutor

    demo, spec = sites["hospital-a"], demo_spec("s-watched", **PRIVACY)
    config = write_node_config(tmp_path / "node-config.toml", demo.site.node_config())
    # the SuperNode's idle pacing in this process: idle for long, so polling at its slowest
    pacer = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0)
    pacer._active_at -= 3600
    monkeypatch.setattr(flwr_internals, "_supernode_pacers", [pacer])
    assert pacer.next_sleep() > 0.1
    executor = WarmExecutor("127.0.0.1:9", node_config_file=config, approvals_watch_s=0.01)
    watcher = threading.Thread(target=executor.watch_approvals, daemon=True)
    watcher.start()
    try:
        _decided(demo, spec)  # approved without its spec: nothing to calibrate from
        _approve_with_spec(demo, spec)  # the node's approval with the study's spec
        decision = _ledger(demo).decision(spec.study_id)
        assert decision is not None
        terms = client_app._plan_terms(demo.site, spec, decision)
        for _ in range(6000):
            if terms in client_app._planning:
                break
            threading.Event().wait(0.01)
        planned = client_app._planning[terms].result(timeout=120)
    finally:
        executor.stop()
        watcher.join(timeout=10)
    assert not watcher.is_alive()
    assert planned == terms.plan()
    assert next(name for name, _, _ in calibrations) == "plan-s-watched"
    assert pacer.next_sleep() == 0.1  # the run's first message is expected: polling fast
    assert _ledger(demo).plan(spec.study_id) is None  # nothing stored before the train message


def test_the_approvals_watch_interval_must_be_positive() -> None:
    from federated.runtime.executor import WarmExecutor

    with pytest.raises(ValueError, match="approvals_watch_s"):
        WarmExecutor("127.0.0.1:9", approvals_watch_s=0)
