"""Operator pages: hospitals (last contact, witness state), organisations and balances, and the
log's latest checkpoint. The API lets operators and auditors list these; so does the console."""

from __future__ import annotations

from collections import Counter
from typing import Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.response import Template

from exchange.console import views
from exchange.coordinator.auth import allow
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Role
from exchange.coordinator.registry import Principal, Registry
from exchange.study.lifecycle import StudyLifecycle

OVERSEERS = (Role.OPERATOR, Role.AUDITOR)  # as GET /v1/hospitals and /v1/organisations
PAGE = 200


class OperatorController(Controller):
    path = "/"

    @get("/operator", sync_to_thread=True)
    def overview(
        self, principal: Principal, journal: Journal, lifecycle: StudyLifecycle, state: State
    ) -> Template:
        allow(principal, *OVERSEERS)
        studies, total = lifecycle.list_studies(principal, None, 0, PAGE)
        by_status = Counter(str(s.status.value) for s in studies)
        log = journal.audit_log
        note = views.cosigned_note(state, log) or log.checkpoint()
        return Template(
            "operator.html",
            context={
                "principal": principal,
                "checkpoint": views.checkpoint_view(note, state.trust.log_key_name),
                "witnesses": [v.name for v in views.current_trust(state).witnesses],
                "studies": studies,
                "total": total,
                "by_status": dict(sorted(by_status.items())),
                "log_size": journal.audit_log.size(),
            },
        )

    @get("/hospitals", sync_to_thread=True)
    def hospitals(self, principal: Principal, registry: Registry, journal: Journal, state: State) -> Template:
        allow(principal, *OVERSEERS)
        rows, total = registry.list_hospitals(0, PAGE)
        contact = views.last_contact(journal, rows)
        items: list[dict[str, Any]] = [
            {
                "id": h.id,
                "name": h.name,
                "organisation_id": h.organisation_id,
                "key_id": h.signing_key_id,
                "registered": h.created_at,
                "last_contact": contact.get(h.id),
                # matched by the witness key the hospital registered in the log, not by its id
                "witness": views.witness_column(state, h.id),
            }
            for h in rows
        ]
        return Template(
            "hospitals.html", context={"principal": principal, "hospitals": items, "total": total}
        )

    @get("/organisations", sync_to_thread=True)
    def organisations(self, principal: Principal, registry: Registry) -> Template:
        allow(principal, *OVERSEERS)
        rows, total = registry.list_organisations(0, PAGE)
        ledger = registry.balances()
        balances = ledger.get("balances", {})
        items = [
            {"id": o.id, "name": o.name, "region": o.region, "balance": balances.get(f"org:{o.id}", 0)}
            for o in rows
        ]
        others = sorted((k, v) for k, v in balances.items() if k.startswith("hospital:"))
        return Template(
            "organisations.html",
            context={
                "principal": principal,
                "organisations": items,
                "total": total,
                "hospital_accounts": others,
                "minted": ledger.get("minted"),
                "escrow": ledger.get("escrow"),
            },
        )
