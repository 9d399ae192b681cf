"""SecAgg+ rounds in process: the real ClientApp (Flower's secaggplus_mod inside it) and the real
ServerApp over `InProcessGrid`; faults are injected by wrapping the ClientApp or the grid.

The same protocol against real SuperLink/SuperNode processes, with a SIGKILLed node:
test_secagg_deployment.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import federated.client_app as client_app_module
from federated import packing
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
from federated.runtime.flwr_internals import SECAGG_CONFIGS_KEY, SECAGG_KEYS
from federated.runtime.inprocess import InProcessGrid
from federated.secagg.params import SecAggParams, SecAggParamsError
from federated.secagg.server import NEXT_KEY
from federated.server_app import GLOBAL_KEY, WEIGHTS_KEY, ServerOptions, StudyFailedError, run_study_rounds
from federated.study_spec import StudySpec, StudySpecError
from federated.weights import fedavg

PRIVACY: dict[str, Any] = {"epsilon": 3.0, "accountant": "rdp", "secure_aggregation": True}
FOUR = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
#: quantization error bound for a handful of hospitals (Flower's +-8 range, 2**22 levels)
ATOL = 1e-4


class Observer:
    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, float], list[Any]]] = []
        self.completed: tuple[Path, str] | None = None
        self.failed: list[str] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append((round, dict(metrics), list(receipts)))

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


class Updates:
    """Spy on each hospital's clear update (inside the hospital, before masking)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.by_round: dict[int, dict[str, tuple[np.ndarray, int]]] = {}
        real = client_app_module.train_hospital_round

        def spy(site: Any, spec: StudySpec, round_: int, weights: np.ndarray, at: Any = None) -> Any:
            out = real(site, spec, round_, weights, at)
            if out.weights is not None and out.receipt is not None:
                self.by_round.setdefault(round_, {})[site.hospital_id] = (
                    out.weights.copy(),
                    out.receipt.records_used,
                )
            return out

        monkeypatch.setattr(client_app_module, "train_hospital_round", spy)

    def fedavg(self, round_: int, members: set[str]) -> np.ndarray:
        got = self.by_round[round_]
        return fedavg([got[h][0] for h in sorted(members)], [got[h][1] for h in sorted(members)])


def _content(message: Message) -> RecordDict:
    """A message's records as the server or the hospital built them: on the wire (the grid) a
    SecAgg+ message is packed into one ConfigRecord (`federated.packing`)."""
    return packing.unpack(message.content)


def _stage(message: Message) -> str | None:
    record = _content(message).config_records.get(SECAGG_CONFIGS_KEY)
    value = record.get("stage") if record is not None else None
    return value if isinstance(value, str) else None


def _globals(grid: InProcessGrid) -> dict[int, np.ndarray]:
    """The global model each round's collect-stage messages carried."""
    out = {}
    for message in grid.pushed:
        records = _content(message).array_records
        if GLOBAL_KEY in records and message.metadata.message_type == MessageType.TRAIN:
            out[int(message.metadata.group_id)] = records[GLOBAL_KEY][WEIGHTS_KEY].numpy()
    return out


def _run(
    sites: dict[str, DemoSite],
    spec: StudySpec,
    tmp_path: Path,
    *,
    grid_class: type = InProcessGrid,
    client_app: Any = None,
    **grid_kwargs: Any,
) -> tuple[Observer, Any]:
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    grid = grid_class(
        {i + 1: d.site.node_config() for i, d in enumerate(sites.values())},
        spec.to_run_config(),
        client_app=client_app,
        **grid_kwargs,
    )
    observer = Observer()
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=spec.to_run_config()
    )
    options = ServerOptions(
        output_dir=tmp_path / "out",
        poll=0.01,
        hospital_keys={h: d.signer.public_key for h, d in sites.items()},
        stop_event=threading.Event(),
    )
    with contextlib.suppress(StudyFailedError):
        run_study_rounds(grid, context, observer, options)
    return observer, grid


@pytest.fixture
def three(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites")


@pytest.fixture
def four(tmp_path: Path) -> dict[str, DemoSite]:
    return provision_sites(tmp_path / "sites4", hospitals=FOUR)


class RecordingGrid(InProcessGrid):
    """Keeps every reply the server pulls (to check what the coordinator could see)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pulled: list[Message] = []
        #: (message type, packed, records) of every message and reply as it crossed the grid
        self.wire: list[tuple[str, bool, int]] = []

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        self.wire.extend(_on_wire(m) for m in messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(super().pull_messages(message_ids))
        self.wire.extend(_on_wire(r) for r in replies if not r.has_error())
        self.pulled.extend(replies)
        return replies


def _on_wire(message: Message) -> tuple[str, bool, int]:
    return message.metadata.message_type, packing.is_packed(message.content), len(message.content)


# -- the protocol ----------------------------------------------------------------------------------


def test_secure_aggregate_is_the_weighted_average_and_no_update_is_seen_in_clear(
    three: dict[str, DemoSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-3", rounds=2, min_hospitals=3, **PRIVACY)
    observer, grid = _run(three, spec, tmp_path, grid_class=RecordingGrid)
    assert observer.failed == [] and observer.completed is not None
    (r1, m1, receipts1), (r2, m2, _) = observer.rounds
    assert (r1, r2) == (1, 2)
    # round 2's key exchange ran inside round 1's collect and unmask exchanges (pipelining):
    # its setup messages went out with round 1's collect messages, and round 2 had no setup of its own
    assert m1["secagg_pipelined"] == 0.0 and m2["secagg_pipelined"] == 1.0
    assert "secagg_setup_s" in m1 and "secagg_setup_s" not in m2
    # (the stage key itself is popped by the hospital's mod): round 1 alone had setup messages;
    # round 2's setup replies came back inside round 1's collect replies
    sample_key = SECAGG_KEYS["SAMPLE_NUMBER"]
    setups = [int(m.metadata.group_id) for m in grid.pushed if _has(m, sample_key)]
    assert sorted(setups) == [1, 1, 1]
    riding = [r for r in grid.pulled if _has(r, "masked_params") and NEXT_KEY in _content(r).config_records]
    assert len(riding) == 3 and all("pk1" in _content(r).config_records[NEXT_KEY] for r in riding)
    assert m1["secure_aggregation"] == 1.0 and m1["aggregate_members"] == 3 and m1["secagg_threshold"] == 3
    assert {r.hospital for r in receipts1} == {f"hospital:{h}" for h in three}
    # round 2's collect messages carry round 1's aggregate: the weighted FedAvg of the clear updates
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, set(three)), atol=ATOL)
    assert not np.allclose(_globals(grid)[2], _globals(grid)[1])
    # nothing the server pulled holds a model-sized float array: only masked integers
    for reply in grid.pulled:
        assert all(len(record) == 0 for record in _content(reply).array_records.values())
    # on the wire every SecAgg+ message and reply is one ConfigRecord: three objects in all
    # (message, RecordDict, record), each object a request at the sender and at the receiver
    wire = [(packed, records) for kind, packed, records in grid.wire if kind == MessageType.TRAIN]
    assert wire == [(True, 1)] * (2 * 3 * (4 + 2))  # 3 hospitals; round 1: 4 exchanges, round 2: 2
    n = len(spec.columns) + 1
    masked = [r for r in grid.pulled if _has(r, "masked_params")]
    assert len(masked) == 6 and all(_masked(r).shape == (n,) for r in masked)


def _has(reply: Message, key: str) -> bool:
    record = _content(reply).config_records.get(SECAGG_CONFIGS_KEY)
    return record is not None and key in record


def _masked(reply: Message) -> np.ndarray:
    import io

    blobs = _content(reply).config_records[SECAGG_CONFIGS_KEY]["masked_params"]
    assert isinstance(blobs, list) and isinstance(blobs[1], bytes)
    return np.load(io.BytesIO(blobs[1]), allow_pickle=False)


def test_plain_train_message_is_refused_when_the_study_requires_secure_aggregation(
    three: dict[str, DemoSite], task_identity: Any
) -> None:
    """A server skipping SecAgg+ gets no update: the hospital refuses and spends nothing."""
    from federated.client_app import app
    from federated.dp import initial_state
    from federated.runtime.flwr_internals import set_task_identity

    set_task_identity(task_id=1, run_id=1, node_id=0)  # the server's process, sending the message
    demo = three["hospital-a"]
    spec = demo_spec("sa-plain", min_hospitals=3, **PRIVACY)
    approve(demo.site, spec.study_id)
    weights = initial_state(spec.template, len(spec.columns))
    message = Message(
        RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(weights)})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
        group_id="1",
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config=demo.site.node_config(),
        state=RecordDict(),
        run_config=spec.to_run_config(),
    )
    reply = app(message=message, context=context)
    status = _content(reply).config_records["reply"]
    assert status["status"] == "refused" and "secure aggregation" in str(status["reason"])
    assert not _content(reply).array_records
    from sqlalchemy import create_engine

    from federated.privacy_ledger import PrivacyLedger

    assert PrivacyLedger(create_engine(demo.site.ledger_url)).plan(spec.study_id) is None


def test_secure_aggregation_needs_three_hospitals() -> None:
    with pytest.raises(StudySpecError, match="secure_aggregation: needs min_hospitals >= 3"):
        StudySpec.from_json({**demo_spec("x", min_hospitals=2).to_json(), "secure_aggregation": True})
    with pytest.raises(SecAggParamsError, match="at least 3"):
        SecAggParams.for_round(2)
    assert SecAggParams.for_round(4, min_members=3).threshold == 3
    assert SecAggParams.for_round(10).max_dropouts == 4


# -- dropouts ------------------------------------------------------------------------------------


class DropAtStage(InProcessGrid):
    """Drops nodes when their message of `stage` (in `round_`) arrives: that message is lost and
    the node answers nothing more, as a killed SuperNode."""

    def __init__(self, *args: Any, drop: dict[int, str], round_: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_drop, self.round = dict(drop), round_

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        for message in messages:
            node = message.metadata.dst_node_id
            if self.to_drop.get(node) == _stage(message) and message.metadata.group_id == str(self.round):
                self.drop(node)
                self.to_drop.pop(node)
        return super().push_messages(messages)


def test_hospital_lost_after_sharing_keys_does_not_stop_the_round(
    four: dict[str, DemoSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hospital-d shares its keys, then is gone before it sends its masked vector: its pairwise
    masks are removed with its key rebuilt from the others' shares; the aggregate is exactly the
    three members' FedAvg and only they get receipts."""
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-drop", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=DropAtStage, drop={4: "collect_masked_vectors"})
    assert observer.failed == [] and observer.completed is not None
    (_, m1, receipts1), (_, _, receipts2) = observer.rounds
    members = {"hospital-a", "hospital-b", "hospital-c"}
    assert m1["aggregate_members"] == 3 and m1["secagg_sampled"] == 4 and m1["dropped"] >= 1
    assert {r.hospital for r in receipts1} == {f"hospital:{h}" for h in members}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, members), atol=ATOL)
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in members}


def test_fewer_than_the_threshold_fails_cleanly_with_the_reason(
    four: dict[str, DemoSite], tmp_path: Path
) -> None:
    spec = demo_spec("sa-few", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, _ = _run(
        four,
        spec,
        tmp_path,
        grid_class=DropAtStage,
        drop={3: "collect_masked_vectors", 4: "collect_masked_vectors"},
    )
    assert observer.completed is None and len(observer.failed) == 1
    assert "2 hospital(s) contributed, the study needs 3" in observer.failed[0]
    ((_, metrics, receipts),) = observer.rounds  # the two that trained spent privacy: reported, not a model
    assert metrics["round_failed"] == 1.0 and len(receipts) == 2


def test_a_late_joiner_waits_for_the_next_round(four: dict[str, DemoSite], tmp_path: Path) -> None:
    """hospital-d's SuperNode restarts when the setup message arrives: it comes back under a new
    node id after the key exchange started, so it is not part of round 1 (its keys are in no one's
    masks); it takes part in round 2."""
    spec = demo_spec("sa-late", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    for demo in four.values():
        approve(demo.site, spec.study_id)
    grid = InProcessGrid(
        {i + 1: d.site.node_config() for i, d in enumerate(four.values())}, spec.to_run_config()
    )
    grid.restart_when_messaged(4, MessageType.TRAIN)
    observer = Observer()
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=spec.to_run_config()
    )
    run_study_rounds(
        grid,
        context,
        observer,
        ServerOptions(
            output_dir=tmp_path / "out",
            poll=0.01,
            hospital_keys={h: d.signer.public_key for h, d in four.items()},
        ),
    )
    (_, m1, receipts1), (_, m2, receipts2) = observer.rounds
    assert m1["aggregate_members"] == 3 and "hospital:hospital-d" not in {r.hospital for r in receipts1}
    assert m2["aggregate_members"] == 4 and "hospital:hospital-d" in {r.hospital for r in receipts2}


class JoinAtCollect(InProcessGrid):
    """Node 4 connects only when round 1's collect stage is sent, after its key exchange."""

    def __init__(self, node_configs: Any, *args: Any, **kwargs: Any) -> None:
        configs = dict(node_configs)
        self.late = configs.pop(4)
        super().__init__(configs, *args, **kwargs)

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        if 4 not in self.contexts and any(_stage(m) == "collect_masked_vectors" for m in messages):
            self.contexts[4] = Context(
                run_id=self.run_id,
                node_id=4,
                node_config=dict(self.late),
                state=RecordDict(),
                run_config=dict(self.contexts[1].run_config),
            )
        return super().push_messages(messages)


def test_a_hospital_joining_after_the_key_exchange_waits_for_the_next_round(
    four: dict[str, DemoSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hospital-d connects after round 1's keys were shared: round 1 is aggregated from the three
    whose keys are in each other's masks (exactly their FedAvg); round 2 runs a fresh key exchange
    (the pipelined one, made during round 1 for the three, no longer fits) and has all four."""
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-join", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=JoinAtCollect)
    assert observer.failed == [] and observer.completed is not None
    (_, m1, receipts1), (_, m2, receipts2) = observer.rounds
    assert m1["secagg_sampled"] == 3 and m1["aggregate_members"] == 3
    assert "hospital:hospital-d" not in {r.hospital for r in receipts1}
    assert 1 not in updates.by_round or "hospital-d" not in updates.by_round[1]  # nobody asked it to train
    np.testing.assert_allclose(
        _globals(grid)[2], updates.fedavg(1, {"hospital-a", "hospital-b", "hospital-c"}), atol=ATOL
    )
    assert m2["secagg_sampled"] == 4 and m2["aggregate_members"] == 4 and m2["secagg_pipelined"] == 0.0
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in four}


# -- bad input -----------------------------------------------------------------------------------


def _tampering(mutate: Callable[[int, Message, Message], Message | None]) -> Any:
    """A ClientApp that runs the real one, then lets `mutate(node, message, reply)` alter the reply."""
    from federated.client_app import app

    def tampered(message: Message, context: Context) -> Message:
        # a raising ClientApp becomes Flower's error reply in InProcessGrid, as in the executor
        reply = app(message=message, context=context)
        packed = reply.has_content() and packing.is_packed(reply.content)
        if packed:  # tamper with the records themselves, then send them packed as the hospital does
            reply.content = packing.unpack(reply.content)
        out = mutate(context.node_id, message, reply) or reply
        if packed and out.has_content():
            out.content = packing.pack(out.content)
        return out

    return tampered


def _replace_configs(reply: Message, message: Message, **values: Any) -> Message:
    record = _content(reply).config_records[SECAGG_CONFIGS_KEY]
    content = RecordDict({SECAGG_CONFIGS_KEY: ConfigRecord({**dict(record), **values})})
    for key, other in _content(reply).config_records.items():
        if key != SECAGG_CONFIGS_KEY:
            content[key] = other
    return Message(content, reply_to=message)


def test_a_corrupted_ciphertext_drops_its_recipient_and_the_round_goes_on(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node 1's encrypted share for node 2 is corrupted: node 2 cannot decrypt it and fails the
    collect stage; the round completes with the other three, correctly."""
    updates = Updates(monkeypatch)

    def corrupt(node: int, message: Message, reply: Message) -> Message | None:
        if node != 1 or _stage_of_reply(reply) != "share_keys" or message.metadata.group_id != "1":
            return None
        record = _content(reply).config_records[SECAGG_CONFIGS_KEY]
        dsts, ctxts = list(record["dsts"]), list(record["ctxts"])  # type: ignore[arg-type]
        i = dsts.index(2)
        ctxts[i] = bytes(reversed(ctxts[i]))  # type: ignore[arg-type]
        return _replace_configs(reply, message, ctxts=ctxts)

    spec = demo_spec("sa-ctxt", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, client_app=_tampering(corrupt))
    assert observer.failed == [] and observer.completed is not None
    (_, metrics, receipts), (_, metrics2, _) = observer.rounds
    members = {"hospital-a", "hospital-c", "hospital-d"}
    assert metrics["aggregate_members"] == 3 and metrics2["aggregate_members"] == 4
    assert {r.hospital for r in receipts} == {f"hospital:{h}" for h in members}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, members), atol=ATOL)
    # the reason is in the server's log: the recipient's collect reply was Flower's error
    assert any("secagg" in r.getMessage() and "hospital-b" in r.getMessage() for r in caplog.records)


def test_an_encrypted_share_of_another_round_drops_its_recipient_never_a_wrong_model(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node 1 sends node 2, in round 2's key exchange (riding in round 1's unmask reply), the
    encrypted share it sent node 2 in round 1: node 2 cannot decrypt it under round 2's keys and
    fails round 2's collect stage (the reason in the log); round 2 is exactly the other three's
    FedAvg, and round 3 has all four again."""
    updates = Updates(monkeypatch)
    kept: dict[str, bytes] = {}

    def replay(node: int, message: Message, reply: Message) -> Message | None:
        if node != 1 or reply.has_error() or message.metadata.group_id != "1":
            return None
        record = _content(reply).config_records[SECAGG_CONFIGS_KEY]
        if "ctxts" in record:  # round 1's own share-keys stage: keep the share for node 2
            dsts = list(record["dsts"])  # type: ignore[arg-type]
            kept["ctxt"] = list(record["ctxts"])[dsts.index(2)]  # type: ignore[arg-type]
            return None
        riding = _content(reply).config_records.get(NEXT_KEY)
        if riding is None or "ctxts" not in riding:
            return None
        dsts, ctxts = list(riding["dsts"]), list(riding["ctxts"])  # type: ignore[arg-type]
        ctxts[dsts.index(2)] = kept["ctxt"]
        riding["ctxts"] = ctxts
        return reply

    spec = demo_spec("sa-replay", rounds=3, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, client_app=_tampering(replay))
    assert observer.failed == [] and observer.completed is not None and "ctxt" in kept
    (_, m1, _), (_, m2, receipts2), (_, m3, _) = observer.rounds
    members = {"hospital-a", "hospital-c", "hospital-d"}
    assert m1["aggregate_members"] == 4 and m2["secagg_pipelined"] == 1.0
    assert m2["aggregate_members"] == 3 and m3["aggregate_members"] == 4
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in members}
    np.testing.assert_allclose(_globals(grid)[3], updates.fedavg(2, members), atol=ATOL)
    assert any("hospital-b" in r.getMessage() and "InvalidToken" in r.getMessage() for r in caplog.records)


def test_a_malformed_pipelined_key_exchange_falls_back_to_a_fresh_one(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Round 2's key exchange runs during round 1; node 1's setup reply for round 2 there holds a
    public key that does not parse: node 1 is left out of that exchange (the reason in the log),
    which is then not used; round 2 runs its own key exchange and has all four hospitals."""
    updates = Updates(monkeypatch)
    seen: list[int] = []

    def junk_key(node: int, message: Message, reply: Message) -> Message | None:
        riding = None if reply.has_error() else _content(reply).config_records.get(NEXT_KEY)
        if node != 1 or riding is None or "pk1" not in riding or seen:
            return None
        seen.append(node)
        riding["pk1"] = b"not a key"
        return reply

    spec = demo_spec("sa-pipe", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, client_app=_tampering(junk_key))
    assert observer.failed == [] and observer.completed is not None and seen == [1]
    (_, m1, _), (_, m2, receipts2) = observer.rounds
    assert m1["aggregate_members"] == 4 and m2["aggregate_members"] == 4
    assert m2["secagg_pipelined"] == 0.0  # the pipelined exchange lacked node 1: not used
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in four}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, set(four)), atol=ATOL)
    left_out = "secagg setup (round 2, pipelined): hospital hospital-a (node 1) left out"
    assert any(left_out in r.getMessage() for r in caplog.records)


def _stage_of_reply(reply: Message) -> str | None:
    if reply.has_error():
        return None
    record = _content(reply).config_records.get(SECAGG_CONFIGS_KEY)
    if record is None:
        return None
    for key, stage in (
        ("pk1", "setup"),
        ("ctxts", "share_keys"),
        ("masked_params", "collect_masked_vectors"),
        ("shares", "unmask"),
    ):
        if key in record:
            return stage
    return None


@pytest.mark.parametrize("kind", ["garbage", "another-round"])
def test_a_malformed_or_stale_share_fails_the_round_never_a_wrong_model(
    three: dict[str, DemoSite], tmp_path: Path, kind: str
) -> None:
    """Node 1 answers the unmask stage of round 2 with garbage shares, or with its shares of
    round 1: the aggregate fails its integrity check and the study stops with the reason."""
    kept: dict[str, list[Any]] = {}

    def bad(node: int, message: Message, reply: Message) -> Message | None:
        if node != 1 or _stage_of_reply(reply) != "unmask":
            return None
        record = _content(reply).config_records[SECAGG_CONFIGS_KEY]
        if message.metadata.group_id == "1":
            kept["shares"] = list(record["shares"])  # type: ignore[arg-type]
            return None
        fresh = list(record["shares"])  # type: ignore[arg-type]
        shares = [s[:4] + bytes(len(s) - 4) for s in fresh] if kind == "garbage" else kept["shares"]
        return _replace_configs(reply, message, shares=shares)

    spec = demo_spec(f"sa-bad-{kind}", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, _ = _run(three, spec, tmp_path, client_app=_tampering(bad))
    assert observer.completed is None and len(observer.failed) == 1
    assert "secure aggregation failed" in observer.failed[0]
    assert observer.rounds[-1][1]["round_failed"] == 1.0


def test_a_malformed_masked_vector_is_left_out_and_the_round_goes_on(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node 1 sends a masked vector of the wrong shape: it is not aggregated (invalid, with the
    reason), its pairwise masks are removed as for a dropout, and the other three form the model."""
    import io

    updates = Updates(monkeypatch)

    def short(node: int, message: Message, reply: Message) -> Message | None:
        if node != 1 or _stage_of_reply(reply) != "collect_masked_vectors":
            return None
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(3, dtype=np.int64))
        record = _content(reply).config_records[SECAGG_CONFIGS_KEY]
        blobs = list(record["masked_params"])  # type: ignore[arg-type]
        return _replace_configs(reply, message, masked_params=[blobs[0], buffer.getvalue()])

    spec = demo_spec("sa-shape", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, client_app=_tampering(short))
    assert observer.failed == [] and observer.completed is not None
    (_, metrics, receipts), _ = observer.rounds
    members = {"hospital-b", "hospital-c", "hospital-d"}
    assert metrics["aggregate_members"] == 3 and metrics["dropped"] >= 1
    assert {r.hospital for r in receipts} == {f"hospital:{h}" for h in members}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, members), atol=ATOL)
    assert any(
        "hospital-a (node 1) left out: expected an integer array of shape" in r.getMessage()
        for r in caplog.records
    )


def test_a_reply_that_does_not_unpack_is_left_out_and_the_round_goes_on(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Node 1's collect reply arrives packed (`federated.packing`) with a garbled header: it does
    not unpack, so it carries no stage record; node 1 is not aggregated (its masks removed as a
    dropout's) and the other three form the model, exactly."""
    from federated.client_app import app

    updates = Updates(monkeypatch)

    def garbled(message: Message, context: Context) -> Message:
        reply = app(message=message, context=context)
        if context.node_id == 1 and _stage_of_reply(reply) == "collect_masked_vectors":
            reply.content.config_records[packing.PACKED_KEY][packing.PACKED_HEADER] = "{garbled"
        return reply

    spec = demo_spec("sa-unpack", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, client_app=garbled)
    assert observer.failed == [] and observer.completed is not None
    (_, metrics, receipts), _ = observer.rounds
    members = {"hospital-b", "hospital-c", "hospital-d"}
    assert metrics["aggregate_members"] == 3
    assert {r.hospital for r in receipts} == {f"hospital:{h}" for h in members}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, members), atol=ATOL)
    assert any("node 1: its reply does not unpack: packed message: malformed" in r.getMessage()
               for r in caplog.records)


def test_hospitals_lost_in_the_key_exchange_stop_the_round_with_the_protocols_reason(
    four: dict[str, DemoSite], tmp_path: Path
) -> None:
    """Two of four hospitals are gone in the setup stage: 2 remain, the threshold is 3; the
    study fails at once with SecAgg+'s reason, nobody trained."""
    spec = demo_spec("sa-setup", rounds=2, min_hospitals=3, round_timeout_s=2.0, **PRIVACY)
    observer, _ = _run(four, spec, tmp_path, grid_class=DropAtStage, drop={3: "setup", 4: "setup"})
    assert observer.completed is None and len(observer.failed) == 1
    assert (
        "secure aggregation stopped at stage 'setup': 2 of 4 hospitals remain, the threshold is 3"
        in (observer.failed[0])
    )
    ((_, metrics, receipts),) = observer.rounds
    assert metrics["round_failed"] == 1.0 and receipts == []


# -- pipelining: every miss says why -------------------------------------------------------------


def _secagg_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "federated.secagg" and r.levelname == "WARNING"]


def test_a_healthy_study_pipelines_every_round_after_the_first(
    three: dict[str, DemoSite], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing goes wrong: rounds 2, 3 and 4 each use the key exchange made during the round
    before (no setup stage of their own), and the driver has nothing to warn about."""
    spec = demo_spec("sa-pipe4", rounds=4, min_hospitals=3, **PRIVACY)
    observer, grid = _run(three, spec, tmp_path)
    assert observer.failed == [] and observer.completed is not None
    assert [m["secagg_pipelined"] for _, m, _ in observer.rounds] == [0.0, 1.0, 1.0, 1.0]
    assert [m["aggregate_members"] for _, m, _ in observer.rounds] == [3, 3, 3, 3]
    setups = [int(m.metadata.group_id) for m in grid.pushed if _has(m, SECAGG_KEYS["SAMPLE_NUMBER"])]
    assert sorted(setups) == [1, 1, 1]
    assert _secagg_warnings(caplog) == []


class LateUnmaskReply(InProcessGrid):
    """Node 1's reply to round 1's unmask message (which carries round 2's pipelined share-keys
    stage) comes too late: the server never pulls it within the stage's timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.late: set[str] = set()

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, msg_id in zip(messages, ids, strict=True):
            record = _content(message).config_records.get(SECAGG_CONFIGS_KEY)
            if (message.metadata.dst_node_id == 1 and message.metadata.group_id == "1"
                    and record is not None and "active_nids" in record):
                self.late.add(msg_id)
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        return super().pull_messages([i for i in message_ids if i not in self.late])


def test_a_late_pipelined_reply_falls_back_with_the_reason_logged_and_exact_rounds(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Round 1's unmask reply of hospital-a (with its share-keys stage for round 2) misses the
    stage's timeout: round 1 still unmasks exactly from the other three's shares; the log says
    that round 2's prepared exchange lacks hospital-a and why, then that round 2 does not use it
    and why; round 2 runs its own key exchange with all four and is exact; round 3 pipelines
    again."""
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-late-pipe", rounds=3, min_hospitals=3, round_timeout_s=1.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=LateUnmaskReply)
    assert observer.failed == [] and observer.completed is not None and len(grid.late) == 1
    (_, m1, _), (_, m2, receipts2), (_, m3, _) = observer.rounds
    assert m1["aggregate_members"] == 4 and m2["aggregate_members"] == 4
    assert [m1["secagg_pipelined"], m2["secagg_pipelined"], m3["secagg_pipelined"]] == [0.0, 0.0, 1.0]
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in four}
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, set(four)), atol=ATOL)
    np.testing.assert_allclose(_globals(grid)[3], updates.fedavg(2, set(four)), atol=ATOL)
    warnings = _secagg_warnings(caplog)
    assert any("secagg round 1: the key exchange prepared for round 2 lacks hospital-a: share keys: "
               "no reply within the stage's 1 s" in w for w in warnings), warnings
    assert any("secagg round 2: the key exchange prepared during round 1 is not used: hospital "
               "hospital-a (node 1) did not complete it" in w for w in warnings), warnings


class LostMemberAtUnmask(InProcessGrid):
    """Node 4's masked vector arrives in round 1, then its node is lost: its reply to round 1's
    unmask message never comes (a SIGKILL after the collect stage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: set[str] = set()

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, msg_id in zip(messages, ids, strict=True):
            record = _content(message).config_records.get(SECAGG_CONFIGS_KEY)
            if (message.metadata.dst_node_id == 4 and message.metadata.group_id == "1"
                    and record is not None and record.get("stage") == "unmask"):
                self.lost.add(msg_id)
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        return super().pull_messages([i for i in message_ids if i not in self.lost])


def test_a_member_lost_at_unmask_ends_the_stage_once_the_shares_suffice(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hospital-d's masked vector is in, then it never answers the unmask message: the other
    three's shares meet the threshold (3 of 4) for every member's mask seed, so the stage ends
    about a second later instead of waiting out the stage's 30 s; hospital-d is a member (its
    input is in the aggregate, its seed rebuilt from the others' shares), the aggregate is
    exactly the four's FedAvg, and the log says why the stage ended."""
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-unmask-lost", rounds=2, min_hospitals=3, round_timeout_s=30.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=LostMemberAtUnmask)
    assert observer.failed == [] and observer.completed is not None and len(grid.lost) == 1
    (_, m1, receipts1), (_, m2, _) = observer.rounds
    assert m1["aggregate_members"] == 4 and m2["aggregate_members"] == 4
    assert {r.hospital for r in receipts1} == {f"hospital:{h}" for h in four}
    assert m1["secagg_unmask_ended_early"] == 1.0 and m1["secagg_unmask_s"] < 10.0
    assert "secagg_unmask_ended_early" not in m2
    np.testing.assert_allclose(_globals(grid)[2], updates.fedavg(1, set(four)), atol=ATOL)
    warnings = _secagg_warnings(caplog)
    assert any("secagg unmask (round 1): ended after" in w and "hospital hospital-d (node 4)" in w
               and "every secret had its threshold of shares" in w for w in warnings), warnings
    # its riding share-keys stage for round 2 never came: round 2 runs its own key exchange
    assert m2["secagg_pipelined"] == 0.0
    assert any("lacks hospital-d: share keys: no reply before the unmask stage ended" in w
               for w in warnings), warnings


class GoneAfterRound1Grid(InProcessGrid):
    """Node 4 completes round 1 (its shares for round 2 included), then its node is gone."""

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            riding = None if reply.has_error() else _content(reply).config_records.get(NEXT_KEY)
            if reply.metadata.src_node_id == 4 and riding is not None and "ctxts" in riding:
                self.drop(4)  # its unmask reply, with round 2's shares, is in
        return replies


def test_a_hospital_gone_after_the_pipelined_exchange_does_not_cost_the_others_a_key_exchange(
    four: dict[str, DemoSite],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hospital-d's node is gone after round 1: round 2 uses the key exchange prepared during
    round 1 without it (its shares are not forwarded, so no member masks with it), logged; the
    aggregate is exactly the three's FedAvg."""
    updates = Updates(monkeypatch)
    spec = demo_spec("sa-gone", rounds=2, min_hospitals=3, round_timeout_s=1.0, **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=GoneAfterRound1Grid)
    assert observer.failed == [] and observer.completed is not None and 4 in grid.dropped
    (_, m1, _), (_, m2, receipts2) = observer.rounds
    three_left = {"hospital-a", "hospital-b", "hospital-c"}
    assert m1["aggregate_members"] == 4 and m2["secagg_pipelined"] == 1.0 and m2["aggregate_members"] == 3
    assert {r.hospital for r in receipts2} == {f"hospital:{h}" for h in three_left}
    model = _content(grid.pushed[-1]).array_records[GLOBAL_KEY][WEIGHTS_KEY].numpy()  # the final evaluation's
    np.testing.assert_allclose(model, updates.fedavg(2, three_left), atol=ATOL)
    assert any("secagg round 2: hospital hospital-d (node 4) of the prepared key exchange not connected "
               "now: left out of this round" in w for w in _secagg_warnings(caplog))


class SlowFirstHello(InProcessGrid):
    """Node 4 answers its hello only `delay` seconds after it was asked (a busy machine: the
    run's first message at a node fetches the run and its FAB)."""

    delay = 1.5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hello_at: dict[str, float] = {}

    def push_messages(self, messages: Any) -> Any:
        import time

        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message, msg_id in zip(messages, ids, strict=True):
            if message.metadata.dst_node_id == 4 and message.metadata.message_type == MessageType.QUERY:
                self.hello_at[msg_id] = time.monotonic()
        return ids

    def pull_messages(self, message_ids: Any) -> Any:
        import time

        now = time.monotonic()
        ready = [i for i in message_ids
                 if i not in self.hello_at or now - self.hello_at[i] >= self.delay]
        return super().pull_messages(ready)


def test_round_one_waits_for_a_slow_first_hello_so_round_two_pipelines(
    four: dict[str, DemoSite], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """hospital-d's node is listed but answers its hello after the later rounds' short grace:
    round 1 waits for it (up to `join_timeout_s`), so all four share round 1's keys and round 2
    uses the key exchange prepared during round 1 (before: round 1 ran with three, and round 2
    needed its own key exchange for the newcomer)."""
    spec = demo_spec("sa-slow-hello", rounds=2, min_hospitals=3, round_timeout_s=0.5, join_timeout_s=30,
                     **PRIVACY)
    observer, grid = _run(four, spec, tmp_path, grid_class=SlowFirstHello)
    assert observer.failed == [] and observer.completed is not None and grid.hello_at
    (_, m1, _), (_, m2, _) = observer.rounds
    assert m1["secagg_sampled"] == 4 and m1["aggregate_members"] == 4
    assert m2["secagg_pipelined"] == 1.0 and m2["aggregate_members"] == 4
    assert _secagg_warnings(caplog) == []


def test_the_hospital_announces_each_stage_the_server_follows_at_once(
    three: dict[str, DemoSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its reply to setup, share keys or collect (the server sends the round's next stage
    as soon as every reply is in) the hospital tells its SuperNode to poll faster for a while
    (`flwr_internals.supernode_expects_follow_up`); not after the unmask stage (the round's last)
    nor after a pipelined stage riding in another (its reply is this one)."""
    import federated.secagg.client as secagg_client
    from federated.runtime import flwr_internals

    events: list[str] = []
    real_stage = secagg_client._stage

    def stage(message: Message, context: Context, call_next: Any) -> Message:
        events.append(str(message.content.config_records[SECAGG_CONFIGS_KEY].get("stage")))
        return real_stage(message, context, call_next)

    monkeypatch.setattr(secagg_client, "_stage", stage)
    monkeypatch.setattr(flwr_internals, "supernode_expects_follow_up", lambda: events.append("follow-up"))
    spec = demo_spec("sa-follow-up", rounds=2, min_hospitals=3, **PRIVACY)
    observer, _ = _run(three, spec, tmp_path)
    assert observer.failed == [] and observer.completed is not None
    assert [m["secagg_pipelined"] for _, m, _ in observer.rounds] == [0.0, 1.0]
    after = [events[i + 1] if i + 1 < len(events) else None for i in range(len(events))]
    announced = [e for e, nxt in zip(events, after, strict=True) if nxt == "follow-up"]
    # round 1: setup, share keys, collect at each hospital; round 2 (pipelined): collect only
    assert sorted(announced) == sorted(["setup", "share_keys"] * 3 + ["collect_masked_vectors"] * 6)
    assert all(nxt != "follow-up" for e, nxt in zip(events, after, strict=True) if e == "unmask")
