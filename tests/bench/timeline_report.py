"""Read an `EXCHANGE_TIMELINE` file (`federated.runtime.timeline`): where each exchange's time went.

    EXCHANGE_TIMELINE=/tmp/tl.log python -m tests.bench.bench_secagg --hospitals 3 --no-table
    python -m tests.bench.timeline_report /tmp/tl.log [--raw N]

For every exchange of the ServerApp (a plain round's train exchange; a SecAgg+ stage: the last
two exchanges of a round are its collect and its unmask) one row per message, in ms from the
moment the ServerApp decided to push: the push (its `PushMessages` and the objects), the
SuperNode's poll that picked the message up (and how long after the push its poll before that
one began), the message's object pulls (how many were answered "not yet available"), the
receipt, the hand-off to the executor, the ClientApp, the reply's push, the ServerApp's pull of
it. Then the medians of each step per exchange kind. `--raw N`: also every line of exchange N.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stamp:
    ns: int
    pid: int
    thread: str
    event: str
    details: tuple[str, ...]


def parse(lines: Iterable[str]) -> list[Stamp]:
    """The stamps of a timeline file, in time order (a torn or foreign line is skipped)."""
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        out.append(Stamp(int(parts[0]), int(parts[1]), parts[2], parts[3], tuple(parts[4:])))
    out.sort(key=lambda s: s.ns)
    return out


@dataclass
class Exchange:
    """One exchange of the ServerApp: from its decision to push to its last reply."""

    start: int
    kind: str
    group: str
    end: int = 0
    ids: list[str] = field(default_factory=list)
    label: str = ""
    #: step -> ns (the ServerApp's own)
    server: dict[str, int] = field(default_factory=dict)
    #: message id -> step -> ns
    rows: dict[str, dict[str, float]] = field(default_factory=dict)


#: the steps of a message, in order (column names)
#: the spans between steps that the medians show
SPANS = (("pickup", "objs"), ("objs", "stored"), ("stored", "task"), ("task", "app"), ("app", "reply"),
         ("reply", "send"), ("send", "pushed"), ("pushed", "srv_pull"), ("srv_pull", "srv_reply"))
STEPS = ("prev_poll", "poll", "pickup", "objs", "unavail", "confirm", "stored", "task", "input", "app",
         "reply", "send", "sent", "pushed", "srv_pull", "srv_reply")


def exchanges(stamps: list[Stamp]) -> list[Exchange]:
    """The ServerApp's exchanges, each message's steps filled in from the other processes."""
    out: list[Exchange] = []
    current: Exchange | None = None
    by_pid: dict[int, list[Stamp]] = defaultdict(list)
    for s in stamps:
        by_pid[s.pid].append(s)
        if s.event == "srv.exchange>":
            kind, group = (*s.details, "?", "?")[:2]
            current = Exchange(s.ns, kind, group)
            out.append(current)
        elif current is None:
            continue
        elif s.event == "srv.PushMessages<" and "push_msgs" not in current.server:
            current.server["push_msgs"] = s.ns
        elif s.event == "srv.pushed" and "pushed" not in current.server:
            current.server["pushed"] = s.ns
            current.ids = list(s.details)
        elif s.event == "srv.exchange<":
            current.end = s.ns
            current = None
    # SecAgg+: of one round's exchanges in a row (same group id), the last two are collect and unmask
    runs: list[list[Exchange]] = []
    for ex in out:
        if runs and (runs[-1][-1].kind, runs[-1][-1].group) == (ex.kind, ex.group):
            runs[-1].append(ex)
        else:
            runs.append([ex])
    for run in runs:
        names = ["setup", "share_keys", "collect", "unmask"]
        for ex, name in zip(run, names[-len(run):] if len(run) <= 4 else [], strict=False):
            ex.label = name if ex.kind == "many" else ex.kind
        for ex in run:
            ex.label = ex.label or ex.kind
    for ex in out:
        if not ex.end:
            continue
        for msg in ex.ids:
            ex.rows[msg] = _steps(ex, msg, stamps, by_pid)
    return out


def _first(stamps: list[Stamp], event: str, msg: str, after: int) -> Stamp | None:
    return next((s for s in stamps if s.event == event and s.details[:1] == (msg,) and s.ns >= after), None)


def _steps(ex: Exchange, msg: str, stamps: list[Stamp], by_pid: dict[int, list[Stamp]]) -> dict[str, float]:
    """A message's steps in ms from its exchange's start (absent: not found)."""
    ms = {}

    def at(ns: int) -> float:
        return (ns - ex.start) / 1e6

    pick = _first(stamps, "sn.poll<", msg, ex.start)
    if pick is None:
        return ms
    mine = [s for s in by_pid[pick.pid] if s.ns >= ex.start and s.ns <= (ex.end or pick.ns) + 10**9]
    polls = [s for s in mine if s.event == "sn.poll>" and s.ns <= pick.ns]
    if len(polls) >= 2:
        ms["prev_poll"] = at(polls[-2].ns)
    if polls:
        ms["poll"] = at(polls[-1].ns)
    ms["pickup"] = at(pick.ns)
    after = [s for s in mine if s.ns >= pick.ns]
    ms["unavail"] = 0.0
    for s in after:
        if s.event == "sn.pull_obj!":
            ms["unavail"] += 1
        elif s.event == "sn.pull_obj<":
            ms["objs"] = at(s.ns)
        elif s.event == "sn.confirm<" and "confirm" not in ms:
            ms["confirm"] = at(s.ns)
        elif s.event == "sn.stored" and "stored" not in ms:
            ms["stored"] = at(s.ns)
        elif s.event == "ex.task>" and "task" not in ms:
            ms["task"] = at(s.ns)
        elif s.event == "ex.input" and "input" not in ms:
            ms["input"] = at(s.ns)
        elif s.event == "ex.app<" and "app" not in ms:
            ms["app"] = at(s.ns)
        elif s.event == "ex.reply" and "reply" not in ms:
            ms["reply"] = at(s.ns)
        elif s.event == "sn.send>" and s.details[:1] == (msg,):
            ms["send"] = at(s.ns)
        elif s.event == "sn.send<" and "send" in ms and "sent" not in ms:
            ms["sent"] = at(s.ns)
        elif s.event == "sn.pushed" and "send" in ms:
            ms["pushed"] = at(s.ns)
            break
    pulled = next((s for s in stamps if s.event == "srv.PullMessages<" and s.ns >= ex.start
                   and msg in s.details[0].split(",")), None) if "pushed" in ms else None
    if pulled is not None:
        ms["srv_pull"] = at(pulled.ns)
    reply = _first(stamps, "srv.reply", msg, ex.start)
    if reply is not None:
        ms["srv_reply"] = at(reply.ns)
    return ms


def report(stamps: list[Stamp], raw: int | None = None) -> str:
    lines = []
    all_ex = exchanges(stamps)
    per_label: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for n, ex in enumerate(all_ex):
        if not ex.end:
            continue
        total = (ex.end - ex.start) / 1e6
        push_msgs = (ex.server.get("push_msgs", ex.start) - ex.start) / 1e6
        pushed = (ex.server.get("pushed", ex.start) - ex.start) / 1e6
        lines.append(f"#{n} {ex.label or ex.kind} round {ex.group}: {total:.1f} ms; "
                     f"PushMessages {push_msgs:.1f}, objects pushed {pushed:.1f}")
        lines.append("   " + " ".join(f"{step:>9}" for step in STEPS))
        for msg, row in ex.rows.items():
            cells = (f"{row[step]:9.1f}" if step in row else f"{'-':>9}" for step in STEPS)
            lines.append("   " + " ".join(cells) + f"  {msg}")
        stats = per_label[ex.label or ex.kind]
        stats["total"].append(total)
        stats["pushed"].append(pushed)
        rows = [r for r in ex.rows.values() if "srv_reply" in r and "pickup" in r]
        if rows:
            stats["last_pickup"].append(max(r["pickup"] for r in rows))
            stats["last_srv_reply"].append(max(r["srv_reply"] for r in rows))
            for r in rows:
                stats["pickup_wait"].append(r["pickup"] - pushed)
                for a, b in SPANS:
                    if a in r and b in r:
                        stats[f"{a}->{b}"].append(r[b] - r[a])
                stats["unavail"].append(r.get("unavail", 0.0))
        if raw == n:
            for s in stamps:
                if ex.start <= s.ns <= ex.end:
                    lines.append(f"      {(s.ns - ex.start) / 1e6:8.1f} {s.pid:>7} {s.thread:<16} {s.event} "
                                 + " ".join(s.details))
    lines.append("")
    lines.append("medians per exchange kind, ms (each message's step; pickup_wait: from the push's end to "
                 "the poll that got the message)")
    for label, stats in per_label.items():
        lines.append(f"{label} ({len(stats['total'])} exchanges): "
                     + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stats.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--raw", type=int, default=None, help="print every line of this exchange too")
    args = parser.parse_args()
    print(report(parse(args.file.read_text().splitlines()), args.raw))


if __name__ == "__main__":
    main()
