"""The scale plot draws rows from several `bench_scale --json` files (3, 10 and 25 hospitals are
measured in separate runs), and `bench_scale` takes the study's minimum, its number of features
and a folder to keep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench import scale_plot
from tests.bench.bench_scale import (
    cpu_by_phase,
    cpu_by_round,
    cpu_in_window,
    default_min_hospitals,
    min_hospitals_arg,
    min_hospitals_for,
    parse_args,
    participation,
)


def _row(hospitals: int, overhead: float, *, secure: bool = False, load: float = 2.0) -> dict[str, Any]:
    return {"hospitals": hospitals, "secure_aggregation": secure, "overhead_s": overhead, "load_start": load,
            "rss_per_hospital_mb": 500.0, "pss_per_hospital_mb": 350.0,
            "first_round": {"overhead_s": overhead * 3},
            "cpu_by_round": [{"round": 2, "superlink_cpu_s": hospitals * 0.1, "coordinator_cpu_s": 1.0,
                              "hospitals_cpu_s": hospitals * 0.5}]}


def test_rows_from_several_files_merge_one_per_size_the_later_file_winning(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([_row(3, 0.7), _row(10, 1.4), _row(3, 2.0, secure=True)]))
    second.write_text(json.dumps([_row(10, 1.6), _row(25, 2.5)]))
    rows = scale_plot.merge_rows([scale_plot.read_rows(first), scale_plot.read_rows(second)])
    assert [(r["hospitals"], r["secure_aggregation"], r["overhead_s"]) for r in rows] == [
        (3, False, 0.7), (3, True, 2.0), (10, False, 1.6), (25, False, 2.5)]


def test_cpu_per_round_is_the_mean_of_the_rounds_after_the_first() -> None:
    rounds = [{"round": r, "superlink_cpu_s": s, "coordinator_cpu_s": c, "hospitals_cpu_s": h}
              for r, s, c, h in ((1, 9.0, 9.0, 9.0), (2, 1.0, 2.0, 3.0), (3, 3.0, 4.0, 5.0))]
    assert scale_plot.cpu_per_round({"cpu_by_round": rounds}) == {"superlink": 2.0, "coordinator": 3.0,
                                                                  "hospitals": 4.0}
    assert scale_plot.cpu_per_round({"cpu_by_round": rounds[:1]})["superlink"] == 9.0  # type: ignore[index]
    assert scale_plot.cpu_per_round({}) is None


def test_a_run_that_never_trained_is_not_drawn(tmp_path: Path) -> None:
    never = {**_row(25, 0.0), "overhead_s": float("nan")}
    rows = scale_plot.merge_rows([[_row(3, 0.7), never, {**_row(10, 0.0), "overhead_s": None}]])
    assert [r["hospitals"] for r in rows] == [3]


def test_the_command_line_draws_every_size_of_every_file(tmp_path: Path) -> None:
    files = []
    for count, overhead in ((3, 0.7), (10, 1.4), (25, 2.6)):
        path = tmp_path / f"h{count}.json"
        path.write_text(json.dumps([_row(count, overhead)]))
        files.append(str(path))
    out, saved = tmp_path / "plot.svg", tmp_path / "rows.json"
    scale_plot.main([*files, str(out), "--save-rows", str(saved)])
    assert [r["hospitals"] for r in json.loads(saved.read_text())] == [3, 10, 25]
    svg_text = out.read_text()
    # a tick for each size (the SVG keeps its text as text); each point carries its run's load
    for tick in (">25<", ">10<", "load 2", "CPU seconds per round", ">superlink<"):
        assert tick in svg_text


def test_bench_scale_takes_the_minimum_and_a_folder_to_keep(tmp_path: Path) -> None:
    args = parse_args(["--hospitals", "25", "--no-secagg", "--min-hospitals", "3", "--keep", str(tmp_path),
                       "--features", "2"])
    assert args.min_hospitals == [3] and args.keep == tmp_path and args.features == 2
    assert min_hospitals_for([3, 10, 25], args.min_hospitals) == [3, 3, 3]
    each = parse_args(["--min-hospitals", "3,10,20"]).min_hospitals
    assert min_hospitals_for([3, 10, 25], each) == [3, 10, 20]
    assert min_hospitals_for([3, 10], None) == [None, None]
    with pytest.raises(SystemExit, match="2 values for 3 hospital counts"):
        min_hospitals_for([3, 10, 25], min_hospitals_arg("3,10"))
    with pytest.raises(SystemExit, match="more than the hospitals"):
        min_hospitals_for([3], min_hospitals_arg("4"))
    default = parse_args([])
    assert default.min_hospitals is None and default.keep is None and default.features is None
    assert default_min_hospitals(25) == 12 and default_min_hospitals(3) == 3


def test_server_cpu_is_split_by_the_phase_each_interval_started_in() -> None:
    # the last field: the hospitals' Flower processes alone (a part of the one before)
    samples = [(0.0, "hospitals decide", 10.0, 5.0, 30.0, 20.0),
               (1.0, "hospitals decide", 10.5, 5.2, 31.0, 20.5),
               (2.0, "training", 11.0, 5.4, 32.0, 21.0), (4.0, "training", 13.0, 6.4, 35.0, 23.0),
               (4.5, "training", 13.5, 6.6, 34.0, 23.2),  # a hospital's forked child ended: its CPU left
               (5.0, "audit", 13.6, 6.7, 34.5, 23.3)]
    phases = cpu_by_phase(samples)
    assert phases["hospitals decide"] == {"wall_s": 2.0, "superlink_cpu_s": 1.0, "coordinator_cpu_s": 0.4,
                                          "hospitals_cpu_s": 2.0, "hospitals_flower_cpu_s": 1.0,
                                          "superlink_cores": 0.5, "coordinator_cores": 0.2,
                                          "hospitals_cores": 1.0, "hospitals_flower_cores": 0.5}
    training = phases["training"]
    assert training["wall_s"] == 3.0 and training["superlink_cpu_s"] == 2.6
    assert training["hospitals_cpu_s"] == 3.5 and training["hospitals_flower_cpu_s"] == 2.3
    assert "audit" not in phases  # the last sample opens no interval
    assert cpu_by_phase(samples[:1]) == {}


def test_trained_counts_the_hospitals_charged_for_a_round_not_the_approvals() -> None:
    """The 25-hospital runs with `min_hospitals` 3: 11 approved, the study started at the third
    approval and only those 3 trained (the others' approvals came after the start)."""
    report = {"hospitals": [{"decision": "approve", "rounds": [{"round": 1}]},
                            {"decision": "approve", "rounds": []}, {"decision": "refuse", "rounds": []},
                            {"decision": "approve"}]}
    assert participation(report) == {"approved": 3, "trained": 1}


def test_a_round_s_cpu_is_what_the_samples_spanning_its_window_gained() -> None:
    from datetime import UTC, datetime

    end = datetime(2026, 12, 5, 21, 0, 10, tzinfo=UTC)
    t = end.timestamp()
    samples = [(t - 12, "training", 0.0, 0.0, 0.0, 0.0), (t - 8, "training", 4.0, 2.0, 8.0, 4.0),
               (t - 4, "training", 6.0, 2.0, 16.0, 6.0),
               (t, "training", 7.0, 3.0, 10.0, 7.0),  # a child exited
               (t + 4, "training", 11.0, 3.0, 14.0, 9.0)]
    window = cpu_in_window(samples, t - 10, t)
    # half of the first interval, all of the next two (the drop counts as nothing)
    assert window == {"superlink_cpu_s": 5.0, "coordinator_cpu_s": 2.0, "hospitals_cpu_s": 12.0,
                      "hospitals_flower_cpu_s": 5.0}
    stamp = end.isoformat().replace("+00:00", "Z")
    rounds: list[dict[str, Any]] = [{"round": 2, "time": stamp, "wall_s": 10.0},
                                    {"round": 3, "wall_s": 1.0}]  # no time: not placed
    assert cpu_by_round(samples, rounds) == [{"round": 2, "wall_s": 10.0, **window}]


def test_a_hospital_s_pages_are_counted_once_at_most_every_ten_seconds(tmp_path: Path) -> None:
    from exchange.demo.consortium import Consortium, DemoConfig
    from tests.bench.bench_scale import UNION_EVERY_S, MemorySampler

    sampler = MemorySampler(Consortium(DemoConfig(out=tmp_path)))
    assert sampler.union_due("hospital-a", 100.0) and sampler.union_due("hospital-b", 100.0)
    assert not sampler.union_due("hospital-a", 100.0 + UNION_EVERY_S / 2)
    assert sampler.union_due("hospital-a", 100.0 + UNION_EVERY_S)


def test_a_process_that_exits_while_its_tree_is_walked_has_no_children(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hospital's forked child can exit while the samplers walk its tree: /proc/PID/task is
    there when looked at and gone when listed, and the CPU sampler's thread died on
    `FileNotFoundError: /proc/PID/task` in a 25-hospital run. Simulated at the OS edge: listing
    this process's task directory fails as it does for a process that just exited."""
    import os

    from tests.bench.bench_scale import _children, tree_pids

    gone = f"/proc/{os.getpid()}/task"
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path: object = ".") -> object:
        if os.fspath(path) == gone:  # type: ignore[call-overload]
            raise FileNotFoundError(2, "No such file or directory", gone)
        return real_scandir(path)  # type: ignore[call-overload]

    def listdir(path: object = ".") -> list[str]:
        if os.fspath(path) == gone:  # type: ignore[call-overload]
            raise FileNotFoundError(2, "No such file or directory", gone)
        return real_listdir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    assert _children(os.getpid()) == [] and tree_pids(os.getpid()) == [os.getpid()]
