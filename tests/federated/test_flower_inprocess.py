"""The study's ClientApp and ServerApp logic, in process (no Flower processes).

Hospital side: `train_hospital_round` / `evaluate_hospital` against real sites on disk (records,
signed consent contracts gated by `consent.gate`, a SQLite privacy ledger, an Ed25519 key).
Server side: `run_study_rounds` over `InProcessGrid`, which calls the real ClientApp object per
message. The same behaviours against real SuperLink/SuperNode processes: test_flower_deployment.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from sqlalchemy import create_engine

from audit.reward_commitment import UNITS, verify_leaf
from consent.gate import commitment
from federated import packing
from federated.client_app import evaluate_hospital, train_hospital_round
from federated.data import public_reference
from federated.dp import initial_state
from federated.privacy_ledger import PrivacyLedger
from federated.receipts import verify_receipt
from federated.reward_openings import openings
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites, revoke_all
from federated.runtime.inprocess import InProcessGrid
from federated.server_app import ServerOptions, StudyFailedError, run_study_rounds
from federated.study_spec import StudySpec
from federated.templates import get_template

# Same privacy parameters everywhere: the (cached) noise calibration is then computed once per
# hospital size for the whole module. RDP keeps the calibration fast; the deployment test uses PRV.
PRIVACY: dict[str, Any] = {"epsilon": 3.0, "rounds": 3, "accountant": "rdp"}
NOW = datetime(2026, 6, 1, tzinfo=UTC)


class RecordingObserver:
    """What the coordinator would receive."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, float], list[Any]]] = []
        self.completed: tuple[Path, str] | None = None
        self.failed: list[str] = []
        self.on_round_hook: Any = None

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append((round, dict(metrics), list(receipts)))
        if self.on_round_hook is not None:
            self.on_round_hook(round)

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


def _ledger(demo: DemoSite) -> PrivacyLedger:
    return PrivacyLedger(create_engine(demo.site.ledger_url))


def _spec(study_id: str, **overrides: Any) -> StudySpec:
    return demo_spec(study_id, **{**PRIVACY, **overrides})


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites", consenting={"hospital-c": 0.5})


# -- one hospital, one round -----------------------------------------------------------------------


def test_study_not_approved_is_refused_and_spends_nothing(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    spec = _spec("s-unapproved")
    out = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert out.status == "refused" and "not approved" in out.reason
    assert out.weights is None and out.receipt is None
    assert _ledger(demo).plan("s-unapproved") is None


def test_round_uses_only_consented_records_and_signs_a_receipt(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-c"]  # half of its patients consented
    spec = _spec("s-consent")
    approve(demo.site, "s-consent")
    out = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert out.status == "ok", out.reason
    data, _ = demo.site.records()
    train = data.train()
    consented = [p for p in train.pseudonyms if p in demo.contracts]
    assert 0 < len(consented) < len(train)
    assert out.receipt is not None
    receipt = verify_receipt(out.receipt.to_bytes(), demo.signer.public_key, study_id="s-consent", round=1,
                             hospital_id="hospital-c")
    # the weight comes from the study's public terms, not from how many records consented
    template = get_template(spec.template)
    assert receipt.records_used == (spec.batch_size or template.defaults.batch_size) * (
        spec.local_steps or template.defaults.local_steps)
    # the commitment is the consent engine's, over exactly the records trained on, keyed with the
    # hospital's key for this study and round (what it shows an authorised auditor)
    pairs = [(p, demo.contracts[p].content_hash) for p in consented]
    assert receipt.commitment == commitment(pairs, demo.site.gate_key("s-consent", 1))
    assert receipt.commitment != commitment(pairs)
    expected_rewards: dict[str, int] = {}
    for p in consented:
        account = demo.contracts[p].reward_account
        if account is not None:
            expected_rewards[account] = expected_rewards.get(account, 0) + 1
    # no account in the receipt: a salted Merkle root, and the openings stay in the node database
    assert set(receipt.rewards) == {"root", "size"}
    assert not any(a in out.receipt.to_bytes().decode() for a in expected_rewards)
    kept = openings(_ledger(demo).engine, "s-consent")
    assert {o.account: o.units // (UNITS // o.size) for _, o in kept} == expected_rewards
    for _, o in kept:
        verify_leaf(receipt.rewards["root"], receipt.rewards["size"], o.holder, o.units, index=o.index,
                    proof=list(o.proof))
    ledger = _ledger(demo)
    assert ledger.spent("s-consent") == pytest.approx(receipt.epsilon_total)
    assert receipt.epsilon_spent == pytest.approx(receipt.epsilon_total)  # first round: all of it
    assert receipt.spec_sha256 == spec.sha256()
    assert out.weights is not None and out.weights.shape == (len(spec.columns) + 1,)


def test_revocation_takes_effect_from_the_next_round(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-b"]
    spec = _spec("s-revoke")
    approve(demo.site, "s-revoke")
    w = initial_state(spec.template, len(spec.columns))
    assert train_hospital_round(demo.site, spec, 1, w, NOW).status == "ok"
    revoke_all(demo, NOW + timedelta(hours=1))
    # a round gated before the revocation was issued still sees the consent in force then
    assert evaluate_hospital(demo.site, spec, w, 1, NOW + timedelta(minutes=30)).status == "ok"
    with _ledger(demo).engine.connect() as conn:
        units = dict(conn.exec_driver_sql("SELECT pseudonym, units FROM privacy_patient_spend "
                                          "WHERE study_id = 's-revoke'").all())
    out = train_hospital_round(demo.site, spec, 2, w, NOW + timedelta(hours=2))
    # nobody left: the round still answers ok, on noise alone (a "no data" status would show the
    # last revocation: docs/privacy.md, "Counts"), and no revoked patient takes part
    assert out.status == "ok" and out.reason == "", out.reason
    assert _ledger(demo).rounds_charged("s-revoke") == 2
    with _ledger(demo).engine.connect() as conn:
        assert dict(conn.exec_driver_sql("SELECT pseudonym, units FROM privacy_patient_spend "
                                         "WHERE study_id = 's-revoke'").all()) == units


def test_overspending_round_is_refused_and_nothing_is_charged(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    ledger = _ledger(demo)
    ledger.set_total_budget(1.0)
    spec = _spec("s-overspend")  # targets epsilon 3 > 1 left
    approve(demo.site, "s-overspend")
    out = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert out.status == "refused" and out.reason.startswith("privacy budget"), out.reason
    assert out.weights is None and out.receipt is None
    assert ledger.total_spent() == 0.0 and ledger.plan("s-overspend") is None


def test_a_round_is_never_trained_twice(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    spec = _spec("s-twice")
    approve(demo.site, "s-twice")
    w = initial_state(spec.template, len(spec.columns))
    assert train_hospital_round(demo.site, spec, 1, w, NOW).status == "ok"
    again = train_hospital_round(demo.site, spec, 1, w, NOW)
    assert again.status == "refused" and "already trained" in again.reason
    assert _ledger(demo).rounds_charged("s-twice") == 1


def test_columns_outside_the_declared_categories_are_refused(sites: dict[str, DemoSite]) -> None:
    demo = sites["hospital-a"]
    spec = _spec("s-cats", columns=["mean radius", "worst radius"])  # labs + imaging
    bad = StudySpec.from_json({**spec.to_json(), "request": {**spec.to_json()["request"],
                                                             "data_categories": ["labs"]}})
    approve(demo.site, "s-cats")
    out = train_hospital_round(demo.site, bad, 1, initial_state(bad.template, len(bad.columns)), NOW)
    assert out.status == "refused" and "imaging" in out.reason


class _Exact:
    """A decision-count noise source that adds nothing (tests/node/test_decision_count.py tests
    the mechanism's noise)."""

    def discrete_laplace(self, epsilon: float) -> int:
        return 0


def decide_exactly(demo: DemoSite, spec: StudySpec) -> None:
    """Draw `spec`'s decision count at `demo` without noise, as a node daemon would have: a
    hospital nobody consents at then answers "no-data" (its noised count is 0), deterministically."""
    from federated.client_app import draw_decision

    drawn = draw_decision(demo.site, spec, datetime.now(UTC), noise=_Exact())
    assert not hasattr(drawn, "status"), drawn


def test_hospital_without_consented_records_replies_no_data(tmp_path: Path) -> None:
    """No data by the hospital's NOISED decision count (drawn once: the same answer every round),
    never by an exact count of the patients left."""
    demo = provision_sites(tmp_path, consenting={"hospital-a": 0.0}, hospitals=("hospital-a",))["hospital-a"]
    spec = _spec("s-empty")
    approve(demo.site, "s-empty")
    decide_exactly(demo, spec)
    out = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert out.status == "no-data" and "noised decision count" in out.reason
    assert "no-contract" not in out.reason
    assert out.receipt is None and _ledger(demo).plan("s-empty") is None


# -- the ServerApp over the in-process grid --------------------------------------------------------


def _run(sites: dict[str, DemoSite], spec: StudySpec, tmp_path: Path, *, keys: dict[str, bytes] | None = None,
         hook: Any = None, stop: threading.Event | None = None) -> tuple[RecordingObserver, InProcessGrid]:
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config())
    observer = RecordingObserver()
    observer.on_round_hook = hook(grid) if hook else None
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    options = ServerOptions(output_dir=tmp_path / "out", poll=0.01,
                            hospital_keys=keys if keys is not None else
                            {h: d.signer.public_key for h, d in sites.items()},
                            stop_event=stop or threading.Event())
    with contextlib.suppress(StudyFailedError):
        run_study_rounds(grid, context, observer, options)
    return observer, grid


def test_inprocess_study_completes_and_beats_the_trivial_baseline(sites: dict[str, DemoSite],
                                                                   tmp_path: Path) -> None:
    from federated.templates import get_template
    from federated.weights import sha256_file

    spec = _spec("s-full", round_timeout_s=60)  # InProcessGrid trains inside push_messages
    observer, grid = _run(sites, spec, tmp_path)
    assert observer.failed == []
    assert [r for r, _, _ in observer.rounds] == [1, 2, 3]
    for _, metrics, receipts in observer.rounds:
        assert metrics["contributors"] == 3 and metrics["dropped"] == 0
        assert sorted(r.hospital for r in receipts) == ["hospital:hospital-a", "hospital:hospital-b",
                                                        "hospital:hospital-c"]
    assert observer.completed is not None
    path, sha = observer.completed
    assert path.exists() and sha256_file(path) == sha
    # the global model beats "always predict the majority class" on the PUBLIC reference sample
    # (scored exactly by the server, no privacy spent)
    parts = [d.site.records()[0] for d in sites.values()]
    y_train = np.concatenate([p.train().y for p in parts])
    reference = public_reference(spec.columns, spec.task)
    assert reference is not None
    baseline = get_template(spec.template).trivial_baseline(y_train, reference[0], reference[1])
    final = observer.rounds[-1][1]
    assert final["ref_accuracy"] > baseline["accuracy"] + 0.1
    # the hospitals' hold-out evaluation arrives only as noised sums, one charged release per round
    for _, m, _ in observer.rounds:
        assert m["eval_hospitals"] == 3 and 0 < m["eval_epsilon"] <= spec.epsilon
    assert all(not float(m["eval_examples"]).is_integer() for _, m, _ in observer.rounds)
    for demo in sites.values():
        assert len(_ledger(demo).evaluations(spec.study_id)) == spec.rounds
    # every model message went out packed (`federated.packing`: one ConfigRecord on the wire) and
    # held one flat array and nothing else; one hello per node
    models = [m for m in grid.pushed if m.metadata.message_type != "query"]
    assert models and all(packing.is_packed(m.content) and len(m.content) == 1 for m in models)
    built = [packing.unpack(m.content) for m in models]
    assert all(len(c.array_records) == 1 and not c.config_records for c in built)
    hellos = [m.metadata.dst_node_id for m in grid.pushed if m.metadata.message_type == "query"]
    assert sorted(hellos) == [1, 2, 3]
    # epsilon: each hospital stays within the study's target
    assert max(r.epsilon_total for _, _, rs in observer.rounds for r in rs) <= spec.epsilon + 1e-9


def test_dropout_is_tolerated_down_to_the_minimum(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    def drop_c_after_round_1(grid: InProcessGrid) -> Any:
        return lambda round_: grid.drop(3) if round_ == 1 else None

    # InProcessGrid trains inside push_messages: the timeout must cover three hospitals' rounds
    spec = _spec("s-drop", min_hospitals=2, round_timeout_s=3)
    observer, _ = _run(sites, spec, tmp_path, hook=drop_c_after_round_1)
    assert observer.failed == [] and observer.completed is not None
    last = observer.rounds[-1]
    assert last[1]["contributors"] == 2 and last[1]["dropped"] == 1
    assert "hospital:hospital-c" not in {r.hospital for r in last[2]}


def test_replies_already_there_after_a_long_push_are_not_dropouts(sites: dict[str, DemoSite],
                                                                  tmp_path: Path) -> None:
    """InProcessGrid trains inside push_messages, so every reply is there before the first pull;
    here the round's timeout is shorter than any push. The server still pulls once: nobody is
    dropped (it used to skip the pull loop when the push outlasted the timeout, which made the
    dropout tests fail on a loaded machine)."""
    spec = _spec("s-slow-push", min_hospitals=3, round_timeout_s=0.001)
    observer, _ = _run(sites, spec, tmp_path)
    assert observer.failed == [] and observer.completed is not None
    assert [(m["contributors"], m["dropped"]) for _, m, _ in observer.rounds] == [(3, 0)] * spec.rounds


def test_below_the_minimum_the_study_fails_cleanly(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    def drop_c_after_round_1(grid: InProcessGrid) -> Any:
        return lambda round_: grid.drop(3) if round_ == 1 else None

    spec = _spec("s-fail", min_hospitals=3, round_timeout_s=3, join_timeout_s=0.5)
    observer, _ = _run(sites, spec, tmp_path, hook=drop_c_after_round_1)
    assert observer.completed is None
    assert len(observer.failed) == 1
    assert observer.failed[0].startswith("round 3: only 2 hospital node(s) connected"), observer.failed[0]
    assert "the study needs 3" in observer.failed[0]
    assert [r for r, _, _ in observer.rounds] == [1, 2]  # completed rounds are still reported
    assert not (tmp_path / "out" / "s-fail.safetensors").exists()


def test_no_data_hospital_is_not_a_contribution(tmp_path: Path) -> None:
    sites = provision_sites(tmp_path / "sites", consenting={"hospital-b": 0.0})
    spec = _spec("s-nodata", min_hospitals=2, rounds=3)
    approve(sites["hospital-b"].site, spec.study_id)
    decide_exactly(sites["hospital-b"], spec)
    observer, _ = _run(sites, spec, tmp_path)
    assert observer.completed is not None
    for _, metrics, receipts in observer.rounds:
        assert metrics["no_data"] == 1 and metrics["contributors"] == 2
        assert "hospital:hospital-b" not in {r.hospital for r in receipts}


def test_hospital_whose_key_does_not_verify_gets_no_model(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    """Its signed hello fails against the registered key: it never gets a model message, so its
    update and receipt can never be aggregated."""
    keys = {h: d.signer.public_key for h, d in sites.items()}
    keys["hospital-a"] = sites["hospital-b"].signer.public_key  # the coordinator knows another key
    spec = _spec("s-badkey", min_hospitals=2)
    observer, grid = _run(sites, spec, tmp_path, keys=keys)
    assert observer.completed is not None
    for _, metrics, receipts in observer.rounds:
        assert metrics["contributors"] == 2
        assert "hospital:hospital-a" not in {r.hospital for r in receipts}
    assert [m.metadata.message_type for m in grid.pushed if m.metadata.dst_node_id == 1] == ["query"]


def test_receipt_that_does_not_verify_is_not_aggregated(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    """A node that says hello correctly but replies with a receipt signed by another key."""
    from federated.client_app import app as real_app
    from federated.receipts import make_receipt, parse_receipt

    forger = sites["hospital-b"].signer

    def forged_receipts_from_node_1(message: Any, context: Any) -> Any:
        reply = real_app(message=message, context=context)
        content = packing.unpack(reply.content)  # the reply as the hospital built it
        record = content.config_records.get("reply")
        if context.node_id == 1 and record is not None and "receipt" in record:
            r = parse_receipt(record["receipt"])
            record["receipt"] = make_receipt(
                forger, study_id=r.study_id, round=r.round, hospital_id="hospital-a",
                records_used=r.records_used, commitment=r.commitment, epsilon_spent=r.epsilon_spent,
                epsilon_total=r.epsilon_total, delta=r.delta, spec_sha256=r.spec_sha256,
                rewards=r.rewards).to_bytes()
            reply.content = packing.pack(content)
        return reply

    spec = _spec("s-forged", min_hospitals=2, rounds=1)
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config(), client_app=forged_receipts_from_node_1)
    observer = RecordingObserver()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    run_study_rounds(grid, context, observer, ServerOptions(
        output_dir=tmp_path, poll=0.01, hospital_keys={h: d.signer.public_key for h, d in sites.items()}))
    (_, metrics, receipts), = observer.rounds
    assert metrics["contributors"] == 2 and metrics["dropped"] == 1
    assert "hospital:hospital-a" not in {r.hospital for r in receipts}


def test_bad_spec_and_cancellation_fail_cleanly(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    observer = RecordingObserver()
    grid = InProcessGrid({1: sites["hospital-a"].site.node_config()}, {})
    bad = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"study-id": "x", "study-spec": "{}"})
    with pytest.raises(StudyFailedError, match="bad study spec"):
        run_study_rounds(grid, bad, observer, ServerOptions(output_dir=tmp_path))
    assert observer.failed and observer.failed[0].startswith("bad study spec")

    stop = threading.Event()
    stop.set()
    cancelled, _ = _run(sites, _spec("s-cancel"), tmp_path, stop=stop)
    assert cancelled.failed == ["cancelled before round 1"] and cancelled.completed is None


def test_fab_serverapp_reports_to_an_events_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ServerApp the FAB names (what `flwr run` would start in the plain, fully supported
    path) runs the same rounds and writes its events as JSON lines."""
    import json

    from federated.server_app import app

    sites = provision_sites(tmp_path / "sites", hospitals=("hospital-a", "hospital-b"))
    spec = _spec("s-fab", rounds=1, min_hospitals=2)
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    monkeypatch.setenv("EXCHANGE_STUDY_OUTPUT_DIR", str(tmp_path / "studies"))
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config())
    app(grid=grid, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                   run_config=spec.to_run_config()))
    events_file = tmp_path / "studies" / "s-fab" / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["event"] for e in events] == ["round", "complete"]
    assert len(events[0]["receipts"]) == 2 and events[0]["receipts"][0]["kind"] == "round.receipt"
    assert Path(events[1]["model_path"]).exists()


def test_update_of_the_wrong_shape_is_not_aggregated(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    """A hospital (or anything posing as one) sending an update that does not fit the model is
    counted as invalid, never crashes the aggregation."""
    from federated.client_app import app as real_app
    from federated.server_app import UPDATE_KEY, WEIGHTS_KEY

    def short_updates_from_node_1(message: Any, context: Any) -> Any:
        from flwr.app import Array, ArrayRecord

        reply = real_app(message=message, context=context)
        content = packing.unpack(reply.content)  # the reply as the hospital built it
        if context.node_id == 1 and UPDATE_KEY in content.array_records:
            content[UPDATE_KEY] = ArrayRecord({WEIGHTS_KEY: Array(np.zeros(3, dtype=np.float32))})
            reply.content = packing.pack(content)
        return reply

    spec = _spec("s-shape", rounds=1, min_hospitals=2)
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config(), client_app=short_updates_from_node_1)
    observer = RecordingObserver()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    run_study_rounds(grid, context, observer, ServerOptions(output_dir=tmp_path, poll=0.01))
    (_, metrics, receipts), = observer.rounds
    assert metrics["contributors"] == 2 and metrics["dropped"] == 1
    assert "hospital:hospital-a" not in {r.hospital for r in receipts}


# -- approved hospitals, restarted nodes, failed rounds -------------------------------------------


def _grid_run(sites: dict[str, DemoSite], spec: StudySpec, tmp_path: Path, *,
              approved: set[str] | None = None, keys: bool = True, client_app: Any = None,
              before: Any = None, keys_of_approved_only: bool = False
              ) -> tuple[RecordingObserver, InProcessGrid]:
    for demo in sites.values():
        approve(demo.site, spec.study_id)  # every hospital approved it locally
    grid = InProcessGrid({i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
                         spec.to_run_config(), client_app=client_app)
    if before is not None:
        before(grid)
    observer = RecordingObserver()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    hospital_keys = {h: d.signer.public_key for h, d in sites.items()
                     if keys_of_approved_only is False or approved is None or h in approved
                     } if keys else None
    options = ServerOptions(output_dir=tmp_path / "out", poll=0.01, hospital_keys=hospital_keys,
                            approved_hospitals=frozenset(approved) if approved is not None else None)
    with contextlib.suppress(StudyFailedError):
        run_study_rounds(grid, context, observer, options)
    return observer, grid


def test_only_the_approved_hospitals_nodes_get_the_model(sites: dict[str, DemoSite], tmp_path: Path) -> None:
    """hospital-c is online (and approved the study locally) but not in the coordinator's approved
    set: it gets a hello and nothing else, and spends nothing."""
    spec = _spec("s-approved", rounds=2, min_hospitals=2)
    observer, grid = _grid_run(sites, spec, tmp_path, approved={"hospital-a", "hospital-b"})
    assert observer.failed == [] and observer.completed is not None
    for _, metrics, receipts in observer.rounds:
        assert metrics["contributors"] == 2
        assert sorted(r.hospital for r in receipts) == ["hospital:hospital-a", "hospital:hospital-b"]
    assert [m.metadata.message_type for m in grid.pushed if m.metadata.dst_node_id == 3] == ["query"]
    assert _ledger(sites["hospital-c"]).plan("s-approved") is None


def test_a_hospital_not_approved_at_the_start_is_told_apart_from_a_bad_signature(
        sites: dict[str, DemoSite], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As the coordinator runs it, the run knows only its approved hospitals' keys. Another
    hospital's hello (it approved after the start, say) is not a signature failure: the log says
    it is not one of the run's hospitals, at INFO, and it gets nothing but the hello."""
    spec = _spec("s-late", rounds=1, min_hospitals=2)
    with caplog.at_level(logging.INFO, logger="federated.server"):
        observer, grid = _grid_run(sites, spec, tmp_path, approved={"hospital-a", "hospital-b"},
                                   keys_of_approved_only=True)
    assert observer.completed is not None
    assert [m.metadata.message_type for m in grid.pushed if m.metadata.dst_node_id == 3] == ["query"]
    said = [r for r in caplog.records if "hospital-c" in r.getMessage()]
    assert said and all(r.levelno == logging.INFO for r in said)
    assert any("not one of the hospitals the run was started for" in r.getMessage() for r in said)
    assert not any("signature does not verify" in r.getMessage() for r in caplog.records)


def test_receipt_of_a_hospital_outside_the_approved_set_is_ignored(sites: dict[str, DemoSite],
                                                                    tmp_path: Path) -> None:
    """Without hospital keys a node could say hello as an approved hospital; its receipt still
    names its own hospital, which is not approved: not aggregated."""
    from federated.client_app import app as real_app
    from federated.server_app import HELLO_KEY

    def node_2_claims_to_be_hospital_b(message: Any, context: Any) -> Any:
        reply = real_app(message=message, context=context)
        if context.node_id == 2 and HELLO_KEY in reply.content.config_records:
            reply.content.config_records[HELLO_KEY]["hospital"] = "hospital-b"
        return reply

    spec = _spec("s-impostor", rounds=1, min_hospitals=1)
    sites = {h: sites[h] for h in ("hospital-a", "hospital-c")}  # hospital-c is node 2
    observer, _ = _grid_run(sites, spec, tmp_path, approved={"hospital-a", "hospital-b"}, keys=False,
                            client_app=node_2_claims_to_be_hospital_b)
    assert observer.completed is not None
    (_, metrics, receipts), = observer.rounds
    assert metrics["contributors"] == 1 and metrics["dropped"] == 1
    assert [r.hospital for r in receipts] == ["hospital:hospital-a"]


def test_a_node_restarted_mid_round_gets_its_message_again(sites: dict[str, DemoSite],
                                                           tmp_path: Path) -> None:
    """hospital-c's SuperNode restarts when its round-1 message arrives: it comes back under a new
    node id while the old id stays listed. The server re-reads the node list, says hello to the new
    id and re-sends within the round: all three contribute (the study needs three)."""
    # old id silent / old id answers NODE_UNAVAILABLE / same id back after NODE_UNAVAILABLE (auth)
    for error, same in ((False, False), (True, False), (True, True)):
        study = _spec(f"s-restart-{error}-{same}", rounds=2, min_hospitals=3, round_timeout_s=20)
        def restart_c(grid: InProcessGrid, e: bool = error, s: bool = same) -> None:
            grid.restart_when_messaged(3, "train", error=e, same_id=s)

        observer, grid = _grid_run(sites, study, tmp_path / f"{error}-{same}", before=restart_c)
        assert observer.failed == [], observer.failed
        for _, metrics, receipts in observer.rounds:
            assert metrics["contributors"] == 3 and metrics["dropped"] == 0
            assert "hospital:hospital-c" in {r.hospital for r in receipts}
        trains = [(m.metadata.dst_node_id, m.metadata.group_id) for m in grid.pushed
                  if m.metadata.message_type == "train"]
        if same:
            assert trains.count((3, "1")) == 2 and (3, "2") in trains and 4 not in grid.contexts
        else:
            assert (3, "1") in trains and (4, "1") in trains and (4, "2") in trains and (3, "2") not in trains


def test_receipts_of_a_failed_round_are_still_reported(tmp_path: Path) -> None:
    """hospital-c has no consented records, the study needs 3: round 1 fails, but a and b trained
    and spent privacy, so their receipts reach the observer (round_failed = 1) before on_failed."""
    sites = provision_sites(tmp_path / "sites", consenting={"hospital-c": 0.0})
    spec = _spec("s-failed-round", rounds=2, min_hospitals=3)
    approve(sites["hospital-c"].site, spec.study_id)
    decide_exactly(sites["hospital-c"], spec)
    observer, _ = _grid_run(sites, spec, tmp_path)
    assert observer.completed is None and len(observer.failed) == 1
    assert observer.failed[0].startswith("round 1: 2 hospital(s) contributed")
    (round_, metrics, receipts), = observer.rounds
    assert round_ == 1 and metrics["round_failed"] == 1 and metrics["contributors"] == 2
    assert sorted(r.hospital for r in receipts) == ["hospital:hospital-a", "hospital:hospital-b"]
    for receipt in receipts:
        demo = sites[receipt.hospital.removeprefix("hospital:")]
        assert _ledger(demo).spent("s-failed-round") == pytest.approx(receipt.epsilon_total)


def test_the_hellos_go_out_before_the_servers_set_up(sites: dict[str, DemoSite], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The ServerApp says hello to the listed nodes before its set-up (the public pre-training of
    the initial model), so their replies come back while it runs; no model goes out before a
    node's signed hello names an approved hospital, and the study runs as before."""
    import federated.dp

    pushed: list[str] = []
    seen_at_setup: list[list[str]] = []
    real_push, real_setup = InProcessGrid.push_messages, federated.dp.public_initial_state

    def push(self: InProcessGrid, messages: Any) -> Any:
        messages = list(messages)
        pushed.extend(m.metadata.message_type for m in messages)
        return real_push(self, messages)

    def setup(*args: Any, **kwargs: Any) -> Any:
        seen_at_setup.append(list(pushed))
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(InProcessGrid, "push_messages", push)
    monkeypatch.setattr(federated.dp, "public_initial_state", setup)
    observer, _grid = _run(sites, _spec("s-early-hello"), tmp_path)
    assert observer.failed == [] and observer.completed is not None
    assert seen_at_setup == [[MessageType.QUERY] * len(sites)]  # every hello, nothing else yet
    assert pushed.count(MessageType.QUERY) == len(sites)  # one hello per node, never repeated
    assert MessageType.TRAIN in pushed
