"""Gather the system's own records after a demo run and build the report from them.

Sources (never the demo's own bookkeeping): the coordinator's API (the study with its decisions,
the ledger balances), the audit export the verifier just checked (`DIR/audit/entries.jsonl`),
and each hospital's node (its privacy ledger in the node database; its exported site files,
gated again with the ClientApp's own `Site.gate` at each receipt's instant).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from audit.entry import Entry, parse_time
from exchange.demo.report import HospitalRecords, RoundGating, assemble_report, write_report


def read_export(folder: Path) -> list[Entry]:
    """The entries of an `audit export` folder, in log order."""
    entries = []
    with (folder / "entries.jsonl").open("rb") as handle:
        for line in handle:
            if line.strip():
                entries.append(Entry.from_json(json.loads(line)))
    return entries


def hospital_records(hospital_id: str, db_url: str, site_config: dict[str, str], *, study_id: str,
                     request: Any, receipts: list[Entry]) -> HospitalRecords:
    """What hospital `hospital_id`'s node holds about `study_id` (see the module docstring)."""
    from sqlalchemy import create_engine

    from federated.privacy_ledger import PrivacyLedger
    from federated.runtime.site import Site

    engine = create_engine(db_url)
    try:
        ledger = PrivacyLedger(engine)
        plan = ledger.plan(study_id)
        charges = [{"round": c.round, "epsilon": c.epsilon, "increment": c.increment}
                   for c in ledger.charges(study_id)]
        spent = ledger.spent(study_id)
    finally:
        engine.dispose()
    node_decision = node_decision_of(db_url, study_id)
    site = Site.from_node_config(site_config)
    gating: dict[int, RoundGating] = {}
    train_records = held_out = 0
    if Path(site_config["records-path"]).exists():
        data, _label = site.records()
        train = data.train()
        train_records, held_out = len(train), len(data) - len(train)
        for receipt in receipts:
            at: datetime = parse_time(receipt.time)
            number = int(receipt.payload["round"])
            outcome = site.gate(request, train.pseudonyms, at, (study_id, number))
            gating[number] = RoundGating(
                eligible=len(outcome.eligible), excluded=dict(outcome.excluded),
                commitment=outcome.commitment)
    return HospitalRecords(id=hospital_id, plan=plan.to_dict() if plan is not None else None,
                           charges=charges, epsilon_spent=spent, train_records=train_records,
                           held_out_records=held_out, gating=gating, node_decision=node_decision)


def node_decision_of(db_url: str, study_id: str) -> dict[str, Any] | None:
    """The node's own latest decision on the study (signed and stored before it was posted).
    Read only: a database without the node's decisions table (not a node) gives None."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.orm import Session

    from exchange.node.decisions import latest_decision
    from exchange.node.models import DecisionRow

    engine = create_engine(db_url)
    try:
        if not inspect(engine).has_table(DecisionRow.__tablename__):
            return None
        with Session(engine) as session:
            row = latest_decision(session, study_id)
            if row is None:
                return None
            return {"decision": row.decision, "reasons": list(row.reasons),
                    "eligible_records": row.eligible_records, "decided_by": row.decided_by}
    finally:
        engine.dispose()


def witness_checks(demo: Any, audit: dict[str, Any]) -> list[dict[str, Any]]:
    """The export's checkpoint has the witnesses' quorum (as `audit verify` counted it), and
    each hospital's node proved every entry it signed included, with no alarm."""
    from exchange.node.store import open_store
    from exchange.node.witnessing import inclusion_status, witness_status

    witnesses = audit.get("witnesses") or {}
    signed = sorted(witnesses.get("signed") or {})
    checks = [{"check": "the exported checkpoint is cosigned by a quorum of hospital witnesses",
               "ok": len(signed) >= int(witnesses.get("quorum", 0)) > 0,
               "detail": f"{', '.join(signed)} (quorum {witnesses.get('quorum')})"}]
    for h in demo.hospitals.values():
        settings = demo._settings(h)
        store = open_store(settings.db_url, upgrade=False)
        try:
            inclusion = inclusion_status(store)
        finally:
            store.dispose()
        witness = witness_status(settings)
        checks.append({"check": f"{h.id}: its signed entries are proven included, no witness alarm",
                       "ok": not inclusion["alarm"] and not witness["alarm"]
                       and inclusion["entries_proven"] > 0,
                       "detail": f"{inclusion['entries_proven']} entries proven up to checkpoint size "
                                 f"{inclusion['proven_size']}"})
    return checks


def collect_report(demo: Any, audit: dict[str, Any]) -> dict[str, Any]:
    """Build report.json / report.html for the finished demo `demo` (a Consortium)."""
    from exchange.node.site_export import node_config
    from exchange.study.spec import consent_request

    study_id = str(demo.study_id)
    study = demo.study()
    with demo.operator() as api:
        balances = api.get("/v1/ledger/balances")
    entries = read_export(Path(audit["export"]))
    request = consent_request(demo.accepted_study())
    hospitals = []
    for h in demo.hospitals.values():
        settings = demo._settings(h)
        receipts = [e for e in entries if e.kind == "round.receipt" and e.payload.get("study_id") == study_id
                    and e.payload.get("hospital") == f"hospital:{h.id}"]
        hospitals.append(hospital_records(h.id, settings.db_url, node_config(settings), study_id=study_id,
                                          request=request, receipts=receipts))
    revocations = [{"hospital": h.id, "pseudonyms_revoked": len(h.revoked), "effective_at": h.revoked_at,
                    "imported_at": h.revoke_imported_at} for h in demo.hospitals.values() if h.revoked]
    network, network_checks = demo.network()
    verifier_ledger = audit.get("ledger")
    report = assemble_report(study=study, entries=entries, balances=balances, hospitals=hospitals,
                             audit={k: v for k, v in audit.items() if k != "ledger"},
                             extra={"revocations": revocations,
                                    "timings_s": dict(demo.progress.phases),
                                    "milestones_s": dict(demo.milestones),
                                    "coordinator_database": demo.db_url.split(":", 1)[0],
                                    "network": network})
    report["checks"].extend(network_checks)
    if verifier_ledger is not None:
        report["checks"].append({
            "check": "the auditor's ledger fold equals the coordinator's balances",
            # the verifier also lists the claim pools; their total is `unclaimed`
            "ok": {k: v for k, v in verifier_ledger.items() if k != "claim_pools"}
            == {k: balances[k] for k in ("minted", "escrow", "unclaimed", "balances")},
            "detail": ""})
    if demo.config.witnesses:
        report["checks"].extend(witness_checks(demo, audit))
    report["revoked_records_excluded_after_import"] = _revocations_effective(demo, entries, study_id, request)
    write_report(report, demo.config.out)
    return report


def _revocations_effective(demo: Any, entries: list[Entry], study_id: str,
                           request: Any) -> list[dict[str, Any]]:
    """For each revoking hospital: the rounds trained after the revocation was imported and in
    force, and whether any of them still used a revoked record (the gate at the receipt's
    instant)."""
    from exchange.node.site_export import node_config
    from federated.runtime.site import Site

    out = []
    for h in demo.hospitals.values():
        if not h.revoked or h.revoke_imported_at is None:
            continue
        effective = max(datetime.fromisoformat(h.revoke_imported_at),
                        datetime.fromisoformat(str(h.revoked_at)))
        site = Site.from_node_config(node_config(demo._settings(h)))
        data, _label = site.records()
        rounds_after, still_used = [], []
        for e in entries:
            if (e.kind != "round.receipt" or e.payload.get("study_id") != study_id
                    or e.payload.get("hospital") != f"hospital:{h.id}"):
                continue
            at = parse_time(e.time)
            if at >= effective:
                rounds_after.append(e.payload["round"])
                eligible = site.gate(request, data.train().pseudonyms, at).eligible
                still_used += [p for p in h.revoked if p in eligible]
        out.append({"hospital": h.id, "revoked": len(h.revoked), "rounds_after_revocation": rounds_after,
                    "revoked_still_used": len(still_used)})
    return out
