"""`exchange node status` as text lines no wider than the terminal (80 columns unless it is
wider): the node, its privacy budget, the studies waiting for the steward with everything they
ask, then every study on a line or two.

Rendering is apart from collecting (`status.py`) so the JSON form and the text form read the
same report, and so the width can be tested without a terminal.
"""

from __future__ import annotations

import textwrap
from typing import Any

from consent import duo

MIN_WIDTH = 60
SHORT_ID = 8
NAME_WIDTH = 11


def short_ids(ids: list[str]) -> dict[str, str]:
    """Each id's shortest prefix of at least SHORT_ID characters that no other id shares (what
    the steward may type: commands accept a unique prefix)."""
    out: dict[str, str] = {}
    for study_id in ids:
        length = min(SHORT_ID, len(study_id))
        while length < len(study_id) and any(o != study_id and o.startswith(study_id[:length]) for o in ids):
            length += 1
        out[study_id] = study_id[:length]
    return out


def _purpose(code: str) -> str:
    try:
        term = duo.TERMS[duo.normalize(code)]
    except (KeyError, ValueError):
        return code or "-"
    return f"{term.id} ({term.shorthand}, {term.label})" if term.shorthand else term.id


def _yes(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _field(name: str, value: str, width: int) -> list[str]:
    indent = " " * (4 + NAME_WIDTH + 1)
    return textwrap.wrap(value or "-", width=width, initial_indent=f"    {name:<{NAME_WIDTH}} ",
                         subsequent_indent=indent, break_on_hyphens=False) or [f"    {name}"]


def request_lines(study: dict[str, Any], width: int) -> list[str]:
    """The whole request of one study, field by field."""
    req = study["request"]
    title = f'"{req["title"]}"' if req.get("title") else "(no title)"
    lines = textwrap.wrap(f"{study['study_id']}  {title}", width=width, initial_indent="  ",
                          subsequent_indent="    ")
    who = f"{req['organisation'] or '-'} ({req['region'] or '-'})"
    if req.get("researcher"):
        who += f", researcher {req['researcher']}"
    lines += _field("from", who, width)
    purpose = (f"{_purpose(req['purpose'])}; disease {req.get('disease') or '-'}; commercial "
               f"{_yes(req.get('commercial'))}; ethics approval {_yes(req.get('ethics_approval'))}")
    if req.get("methods_development"):
        purpose += "; develops methods"
    lines += _field("purpose", purpose, width)
    asked = (req.get("columns") or {}).items()
    columns = "; ".join(f"{category}: {', '.join(cols)}" for category, cols in asked)
    lines += _field("columns", columns, width)
    label = f"{req.get('label') or '-'} ({req.get('task') or '-'}"
    if req.get("event"):
        label += f", event {req['event']}"
    label += f", template {req['template']})" if req.get("template") else ")"
    lines += _field("label", label, width)
    privacy = f"epsilon {req['epsilon']:.4g}, delta {req['delta']:.3g}, {req.get('rounds') or '-'} rounds"
    if req.get("min_hospitals"):
        privacy += f", hospitals needed {req['min_hospitals']}"
    lines += _field("privacy", privacy, width)
    lines += _field("deadline", f"start by {req['start_deadline']}" if req.get("start_deadline")
                    else "none given", width)
    if study.get("reasons"):
        lines += _field("policy", "; ".join(study["reasons"]), width)
    return lines


def _study_lines(study: dict[str, Any], short: str, width: int) -> list[str]:
    decision = f"{study['decision']}d by {study['decided_by']}" if study["decision"] else "no decision"
    eligible = study["eligible_records"] if study["eligible_records"] is not None else "-"
    head = (f"  {short:<{SHORT_ID}}  {study['status']}, {decision}; eligible {eligible}, rounds "
            f"{study['rounds']}, epsilon spent {study['epsilon_spent']:.4g}")
    lines = textwrap.wrap(head, width=width, subsequent_indent="    ")
    reasons = list(study["reasons"])
    if study.get("rejected"):
        reasons.append(f"REJECTED by the coordinator: {study['rejected']['reason']}")
    if reasons:
        lines += textwrap.wrap("; ".join(reasons), width=width, initial_indent="    ",
                               subsequent_indent="    ", break_on_hyphens=False)
    return lines


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_on_hyphens=False)


def log_lines(report: dict[str, Any]) -> list[str]:
    """The witness and inclusion lines: up to which checkpoint, and any ALARM with its reason."""
    witness, inclusion = report["witness"], report["inclusion"]
    size = witness.get("cosigned_size")
    lines = [f"log witness: {witness['state']}; cosigned checkpoint size {size if size is not None else '-'}"]
    lines += [f"ALARM (witness): {a['reason']}" for a in witness.get("alarms", [])]
    if witness.get("state") == "error":
        lines.append(f"ALARM (witness): {witness.get('reason')}")
    lines.append(f"own entries: {inclusion['entries_proven']} proven included up to checkpoint size "
                 f"{inclusion['proven_size']}")
    lines += [f"ALARM (inclusion): {m['kind']} for study {m['study_id']} is missing from the log"
              for m in inclusion["missing"]]
    lines += [f"ALARM (inclusion): {f}" for f in inclusion["failures"]]
    return lines


def render_status(report: dict[str, Any], width: int = 80) -> list[str]:
    """The status report as lines of at most `width` characters (ids and URLs longer than a
    line are the only exception: they are never cut)."""
    width = max(MIN_WIDTH, width)
    budget, patients = report["privacy"], report["privacy"]["patients"]
    lines = _wrap(f"{report['hospital_id']}  daemon: {report['daemon']['state']}  records: "
                  f"{report['records']}  consent contracts: {report['contracts']}", width)
    lines += _wrap(f"privacy budget (epsilon per patient): spent {budget['spent']:.4g}, reserved "
                   f"{budget['reserved']:.4g}, left {budget['left']:.4g} of {budget['total']:.4g}", width)
    lines += _wrap(f"delta: spent {budget['delta_spent']:.3g}, reserved {budget['delta_reserved']:.3g} of "
                   f"{budget['delta_total']:.3g}, at most {budget['max_delta']:.3g} per study", width)
    lines += _wrap(f"patients: {patients['with_spend']} with privacy spent here, {patients['near_cap']} "
                   f"near and {patients['at_cap']} at their lifetime cap; worst case over all studies: "
                   f"epsilon {budget['patient_epsilon_sum']:.4g} summed, "
                   f"{budget['patient_epsilon_composed']:.4g} composed (PRV) at delta "
                   f"{budget['patient_delta']:.3g}", width)
    studies = report["studies"]
    waiting = [s for s in studies if s["decision"] is None and s["status"] == "pending"]
    if waiting:
        lines += ["", *_wrap(f"Waiting for your decision ({len(waiting)}): exchange node approve|refuse "
                             "ID (a unique prefix of the id will do)", width)]
        for study in waiting:
            lines += request_lines(study, width)
    shorts = short_ids([s["study_id"] for s in studies])
    lines += ["", f"Studies ({len(studies)}):" if studies else "Studies: none seen yet"]
    for study in studies:
        lines += _study_lines(study, shorts[study["study_id"]], width)
    lines += ["", *[w for line in log_lines(report) for w in _wrap(line, width)]]
    if report["errors"]:
        lines += ["", "Last errors:"]
        for error in report["errors"]:
            lines += textwrap.wrap(f"{error['at']}  {error['component']}: {error['message']}", width=width,
                                   initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
    return lines
