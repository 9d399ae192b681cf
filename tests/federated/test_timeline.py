"""The exchange timeline (`federated.runtime.timeline`) and its report (`tests.bench.timeline_report`):
off it writes nothing; on, one line per step from every process, which the report turns into each
message's steps per exchange."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals, timeline
from tests.bench import timeline_report


@pytest.fixture
def trace(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "timeline.log"
    timeline.configure(path)
    yield path
    timeline.configure(None)


def test_off_it_writes_nothing(tmp_path: Path) -> None:
    timeline.configure(None)
    assert not timeline.enabled()
    timeline.stamp("srv.exchange>", "many", 1, 3)
    calls = []
    wrapped = timeline.traced(lambda x: calls.append(x) or x, "srv.PullMessages")
    assert wrapped(4) == 4 and calls == [4]
    assert list(tmp_path.iterdir()) == []


def test_on_each_stamp_is_one_line_with_time_process_thread_event(trace: Path) -> None:
    assert timeline.enabled()
    timeline.stamp("sn.poll<", "abc")
    ok = timeline.traced(lambda: [1, 2], "srv.PushMessages", len)
    assert ok() == [1, 2]

    def fails() -> None:
        raise ValueError("not yet")

    with pytest.raises(ValueError):
        timeline.traced(fails, "sn.pull_obj")()
    stamps = timeline_report.parse(trace.read_text().splitlines())
    assert [(s.event, s.details) for s in stamps] == [
        ("sn.poll<", ("abc",)), ("srv.PushMessages>", ()), ("srv.PushMessages<", ("2",)),
        ("sn.pull_obj>", ()), ("sn.pull_obj!", ("ValueError",))]
    assert {s.pid for s in stamps} == {os.getpid()} and stamps[0].thread == "MainThread"
    assert [s.ns for s in stamps] == sorted(s.ns for s in stamps)


def test_the_supernode_loop_stamps_its_fleet_calls_only_while_on(trace: Path) -> None:
    message = types.SimpleNamespace(metadata=types.SimpleNamespace(message_id="m" * 64,
                                                                   reply_to_message_id="r" * 64))
    calls: dict[str, Any] = {
        "receive": lambda: (message, None),
        "pull_object": lambda run_id, obj: b"x",
        "send": lambda msg, tree, runtime: ({"o"}, "session"),
        "state": object(),
    }
    traced = flwr_internals._traced_fleet_calls(calls)
    assert traced["state"] is calls["state"]
    traced["receive"]()
    traced["pull_object"](1, "o")
    traced["send"](message, None, 0.0)
    events = [(s.event, s.details) for s in timeline_report.parse(trace.read_text().splitlines())]
    assert events == [("sn.poll>", ()), ("sn.poll<", ("m" * 12,)), ("sn.pull_obj>", ()), ("sn.pull_obj<", ()),
                      ("sn.send>", ("r" * 12,)), ("sn.send<", ())]


def _line(ms: float, pid: int, event: str, *details: object) -> str:
    return " ".join([str(int(1_000_000_000 + ms * 1e6)), str(pid), "t", event, *map(str, details)])


def test_the_report_gives_each_messages_steps_from_the_exchanges_start() -> None:
    server, node = 100, 200
    lines = [
        _line(0, server, "srv.exchange>", "many", 2, 1),
        _line(5, server, "srv.PushMessages<", 1),
        _line(9, server, "srv.pushed", "aaaaaaaaaaaa"),
        _line(10, node, "sn.poll>"), _line(11, node, "sn.poll<", "-"), _line(11, node, "sn.sleep", "0.100"),
        _line(111, node, "sn.poll>"), _line(113, node, "sn.poll<", "aaaaaaaaaaaa"),
        _line(116, node, "sn.pull_obj!", "ObjectUnavailableError"), _line(140, node, "sn.pull_obj<"),
        _line(143, node, "sn.confirm<"), _line(144, node, "sn.stored"), _line(146, node, "ex.task>"),
        _line(148, node, "ex.input", "aaaaaaaaaaaa"), _line(151, node, "ex.app<"),
        _line(153, node, "ex.reply"), _line(160, node, "sn.send>", "aaaaaaaaaaaa"),
        _line(165, node, "sn.send<"), _line(172, node, "sn.pushed"),
        _line(190, server, "srv.PullMessages<", "bbbbbbbbbbbb,aaaaaaaaaaaa"),
        _line(200, server, "srv.reply", "aaaaaaaaaaaa"),
        _line(201, server, "srv.exchange<"),
    ]
    (ex,) = timeline_report.exchanges(timeline_report.parse(lines))
    assert ex.label == "unmask"  # alone in its round: the round's last exchange
    row = ex.rows["aaaaaaaaaaaa"]
    assert row == {"prev_poll": 10.0, "poll": 111.0, "pickup": 113.0, "unavail": 1.0, "objs": 140.0,
                   "confirm": 143.0, "stored": 144.0, "task": 146.0, "input": 148.0, "app": 151.0,
                   "reply": 153.0, "send": 160.0, "sent": 165.0, "pushed": 172.0, "srv_pull": 190.0,
                   "srv_reply": 200.0}
    text = timeline_report.report(timeline_report.parse(lines))
    assert "unmask (1 exchanges): total 201.0, pushed 9.0" in text and "pickup_wait 104.0" in text
