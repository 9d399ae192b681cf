"""Researcher pages: my studies, a study with live progress, results, payouts, the model, and
the submission form. Operators and auditors see the study pages the API lets them see."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Controller, Request, Response, get, post
from litestar.response import Redirect, Template

from exchange.console import forms, plots, views
from exchange.coordinator import problems
from exchange.coordinator.auth import allow
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Role
from exchange.coordinator.registry import Principal, Registry
from exchange.study.feasibility import feasible
from exchange.study.lifecycle import StudyLifecycle

READERS = (Role.RESEARCHER, Role.OPERATOR, Role.AUDITOR)  # as GET /v1/studies
PAGE = 50


def _page(principal: Principal, name: str, **context: Any) -> Template:
    return Template(name, context={"principal": principal, **context})


class ResearchController(Controller):
    path = "/studies"

    @get("/", sync_to_thread=True)
    def studies(
        self, principal: Principal, registry: Registry, lifecycle: StudyLifecycle, offset: int = 0
    ) -> Template:
        allow(principal, *READERS)
        offset = max(0, offset)
        rows, total = lifecycle.list_studies(principal, None, offset, PAGE)
        return _page(
            principal,
            "studies.html",
            studies=rows,
            total=total,
            offset=offset,
            page=PAGE,
            balance=(
                registry.balance(f"org:{principal.organisation_id}")
                if principal.role == Role.RESEARCHER
                else None
            ),
        )

    @get("/new")
    async def new_form(self, principal: Principal) -> Template:
        allow(principal, Role.RESEARCHER)
        return _page(principal, "submit.html", form=dict(forms.DEFAULTS), errors=[], feasibility=None)

    @post("/new", status_code=200)
    async def submit(
        self, request: Request[Any, Any, Any], principal: Principal, registry: Registry,
        lifecycle: StudyLifecycle
    ) -> Response[Any]:
        allow(principal, Role.RESEARCHER)
        raw = await request.form()
        form = {k: str(raw.get(k) or "") for k in (*forms.DEFAULTS, "action")}
        body = forms.study_body(form)
        data, errors = forms.validate(body)
        feasibility = await anyio.to_thread.run_sync(_feasibility, registry, lifecycle, principal, body)
        errors += [
            {"field": item["field"], "reason": item["reason"]}
            for item in feasibility
            if not item["ok"] and item["field"] == "token_budget"
        ]
        if data is None or errors or form["action"] == "check":
            return Template(
                "submit.html",
                status_code=422 if errors else 200,
                context={"principal": principal, "form": form, "errors": errors, "feasibility": feasibility},
            )
        try:
            study = await lifecycle.submit_study_async(principal, data)
        except problems.ProblemError as exc:
            return Template(
                "submit.html",
                status_code=exc.status,
                context={
                    "principal": principal,
                    "form": form,
                    "feasibility": feasibility,
                    "errors": exc.errors or [{"field": "body", "reason": exc.detail}],
                },
            )
        return Redirect(f"/console/studies/{study.id}", status_code=303)

    @get("/{study_id:str}", sync_to_thread=True)
    def study(
        self, principal: Principal, journal: Journal, lifecycle: StudyLifecycle, study_id: str
    ) -> Template:
        allow(principal, *READERS)
        study = lifecycle.get_study(principal, study_id)
        results = lifecycle.results(principal, study_id) if views.can_see_results(principal) else None
        series = plots.metric_series(results["rounds"]) if results else {}
        log = journal.audit_log
        progress_of = views.progress(study)
        return _page(
            principal,
            "study.html",
            study=study,
            progress=progress_of,
            results=results,
            charts={name: plots.line_chart(name, points) for name, points in series.items()},
            privacy=views.privacy_report(study, results),
            payouts=views.payouts(log, study_id) if progress_of["terminal"] else [],
        )

    @get("/{study_id:str}/progress", sync_to_thread=True)
    def progress(self, principal: Principal, lifecycle: StudyLifecycle, study_id: str) -> dict[str, Any]:
        """The study page polls this every few seconds (live progress; a plain reload shows the
        same numbers without JavaScript)."""
        allow(principal, *READERS)
        return views.progress(lifecycle.get_study(principal, study_id))

    @get("/{study_id:str}/model", sync_to_thread=True)
    def model(self, principal: Principal, lifecycle: StudyLifecycle, study_id: str) -> Response[bytes]:
        allow(principal, Role.RESEARCHER)  # as GET /v1/studies/{id}/model
        data, digest = lifecycle.model(principal, study_id)
        return Response(
            content=data,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{study_id}.safetensors"',
                "Digest-SHA256": digest,
            },
        )


def _feasibility(
    registry: Registry, lifecycle: StudyLifecycle, principal: Principal, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """What the exchange can say before submitting: the budget against the organisation's
    balance, and, per registered hospital, whether its published catalog could serve the study
    (each hospital still decides for itself, by its own policy and consent)."""
    checks: list[dict[str, Any]] = []
    budget = body.get("token_budget")
    balance = registry.balance(f"org:{principal.organisation_id}")
    if isinstance(budget, int) and budget > 0:
        problem = lifecycle.budget_problem(principal, budget)
        checks.append(
            {
                "field": "token_budget",
                "ok": problem is None,
                "reason": problem or f"budget {budget} within the balance {balance}",
            }
        )
    # The hospitals' published catalogs (exchange.study.feasibility), as the submission checks
    # them: which registered hospitals might serve the study, and every other one's reasons.
    organisation = registry.organisation(principal)
    catalogs, registered = lifecycle.catalogs.catalogs()
    possible, reasons = feasible(body, organisation.id, organisation.region, catalogs, registered)
    wanted = body.get("min_hospitals")
    if isinstance(wanted, int) and wanted > 0:
        checks.append(
            {
                "field": "min_hospitals",
                "ok": wanted <= possible,
                "reason": f"{possible} of the {len(registered)} registered hospital(s) might serve it, "
                f"{wanted} must approve",
            }
        )
    for hospital_id in registered:
        why = reasons.get(hospital_id, [])
        seen = "its published catalog allows it" if hospital_id in catalogs else "no catalog published yet"
        checks.append({"field": f"hospitals.{hospital_id}", "ok": not why, "reason": "; ".join(why) or seen})
    return checks
