"""The console over HTTP (no browser): sessions, CSRF, the same authorization as the API, the
study form's errors, and what a page must never show."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from exchange.console.plots import line_chart, metric_series
from exchange.coordinator.schemas import ApiKeyCreate
from tests.console.conftest import Console
from tests.exchange.conftest import World


def _text(response: Any) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.text)))


def _completed_study(world: World, **overrides: Any) -> str:
    study = world.submit("alice", **overrides)
    assert world.decide("h-one", study["id"]).status_code == 201
    assert world.decide("h-two", study["id"]).status_code == 201
    world.wait_runs()
    return str(study["id"])


def test_sign_in_sets_a_strict_http_only_cookie_secure_off_loopback(console_world: World) -> None:
    response = Console(console_world).sign_in("alice")
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith("hx_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" in cookie  # testserver.local is not a loopback address
    assert console_world.keys["alice"] not in cookie  # only an opaque session id
    assert response.headers["location"] == "/console/studies"


def test_cookie_is_not_secure_on_loopback(console_world: World) -> None:
    console = Console(console_world)
    page = console._send("GET", "http://127.0.0.1/console/sign-in")
    token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
    assert token
    response = console._send(
        "POST",
        "http://127.0.0.1/console/sign-in",
        data={"api_key": console_world.keys["alice"], "_csrf_token": token.group(1)},
    )
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith("hx_console="))
    assert "Secure" not in cookie and "HttpOnly" in cookie


def test_unknown_key_is_refused_without_a_session(console_world: World) -> None:
    console = Console(console_world)
    response = console.post("/console/sign-in", {"api_key": "hx_nope_nothing"})
    assert response.status_code == 401
    assert "api_key: this API key is unknown or revoked" in _text(response)
    assert "hx_console" not in console.cookies
    assert console.get("/console/studies").status_code == 302


def test_pages_need_a_session(console_world: World) -> None:
    response = Console(console_world).get("/console/studies/new")
    assert response.status_code == 302
    assert response.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fstudies%2Fnew"


def test_next_never_leaves_the_console(console_world: World) -> None:
    console = Console(console_world)
    response = console.post(
        "/console/sign-in", {"api_key": console_world.keys["alice"], "next": "//evil.example/x"}
    )
    assert response.headers["location"] == "/console/studies"


def test_csrf_is_refused_on_every_form_and_changes_nothing(console_world: World, as_user: Any) -> None:
    alice = as_user("alice")
    size = console_world.runtime.audit_log.size()
    form = {
        "title": "CSRF",
        "purpose": "DUO:0000007",
        "disease": "C50",
        "data_categories": "labs",
        "columns": "labs: mean_radius",
        "template": "logistic_regression",
        "task": "binary",
        "label": "label",
        "epsilon": "1",
        "delta": "1e-5",
        "rounds": "1",
        "min_hospitals": "1",
        "token_budget": "10",
        "ethics_approval": "on",
        "action": "submit",
    }
    for data in (form, {**form, "_csrf_token": "0" * 128}):
        refused = alice.post("/console/studies/new", data, csrf="_csrf_token" in data)
        assert refused.status_code == 403
        assert "CSRF" in _text(refused)
    assert console_world.runtime.audit_log.size() == size
    # sign-out without the token does not sign out; sign-in without it does not sign in
    assert alice.post("/console/sign-out", {}, csrf=False).status_code == 403
    assert alice.get("/console/studies").status_code == 200
    stranger = Console(console_world)
    assert (
        stranger.post("/console/sign-in", {"api_key": console_world.keys["bob"]}, csrf=False).status_code
        == 403
    )


def test_sign_out_ends_the_session(as_user: Any) -> None:
    alice = as_user("alice")
    session = alice.cookies["hx_console"]
    assert alice.post("/console/sign-out", {}).status_code == 303
    alice.cookies["hx_console"] = session  # a copied cookie is worth nothing afterwards
    assert alice.get("/console/studies").status_code == 302


def test_a_revoked_key_ends_its_sessions(console_world: World) -> None:
    coordinator = console_world.runtime.lifecycle
    key, token = coordinator.registry.issue_api_key(ApiKeyCreate(role="auditor", label="short-lived"))
    console_world.keys["temp-auditor"] = token
    console = Console(console_world)
    console.sign_in("temp-auditor")
    assert console.get("/console/log").status_code == 200
    coordinator.registry.revoke_api_key(key.prefix)
    assert console.get("/console/log").status_code == 302


# (page, who may see it) - the API's rules for the same data
PAGES = [
    ("/console/studies", {"alice", "bob", "operator", "auditor"}),
    ("/console/studies/new", {"alice", "bob"}),
    ("/console/operator", {"operator", "auditor"}),
    ("/console/hospitals", {"operator", "auditor"}),
    ("/console/organisations", {"operator", "auditor"}),
    ("/console/log", {"alice", "bob", "operator", "auditor"}),
    ("/console/log/0", {"alice", "bob", "operator", "auditor"}),
]


@pytest.mark.parametrize(("path", "allowed"), PAGES)
def test_roles_as_in_the_api(as_user: Any, path: str, allowed: set[str]) -> None:
    for who in ("alice", "bob", "operator", "auditor"):
        status = as_user(who).get(path).status_code
        assert status == (200 if who in allowed else 403), (who, path, status)


def test_study_pages_follow_the_api(console_world: World, as_user: Any) -> None:
    study_id = _completed_study(console_world)
    alice, bob = as_user("alice"), as_user("bob")
    operator, auditor = as_user("operator"), as_user("auditor")
    page = alice.get(f"/console/studies/{study_id}")
    assert page.status_code == 200
    text = _text(page)
    assert "completed" in text and "Metrics per round" in text and "study.payout of 1000 tokens" in text
    assert "<svg" in page.text and "loss per round" in page.text
    model = alice.get(f"/console/studies/{study_id}/model")
    assert model.status_code == 200 and model.headers["content-disposition"].endswith('.safetensors"')
    assert (
        model.content
        == console_world.client.get(
            f"/v1/studies/{study_id}/model", headers=console_world.headers("alice")
        ).content
    )
    # another organisation: as if the study did not exist (API: 404)
    for path in (
        f"/console/studies/{study_id}",
        f"/console/studies/{study_id}/model",
        f"/console/studies/{study_id}/progress",
    ):
        assert bob.get(path).status_code == 404
    # operators and auditors see the study but not the results or the model (API: 403)
    for console in (operator, auditor):
        seen = console.get(f"/console/studies/{study_id}")
        assert seen.status_code == 200 and "Metrics per round" not in seen.text
        assert console.get(f"/console/studies/{study_id}/model").status_code == 403
    progress = alice.get(f"/console/studies/{study_id}/progress").json()
    assert progress["status"] == "completed" and progress["rounds_completed"] == 2


def test_payouts_never_show_reward_accounts(console_world: World, as_user: Any) -> None:
    account = "reward:" + "ab" * 16
    runner = console_world.runner
    runner.reward_accounts = {"h-one": {account: 7}}
    try:
        study_id = _completed_study(console_world)
    finally:
        runner.reward_accounts = {}
    page = as_user("alice").get(f"/console/studies/{study_id}")
    assert "Forwarded to patients' reward accounts" in page.text
    assert account not in page.text and "reward:" not in page.text


def test_study_form_shows_every_problem_and_submits_nothing(console_world: World, as_user: Any) -> None:
    alice = as_user("alice")
    size = console_world.runtime.audit_log.size()
    response = alice.post(
        "/console/studies/new",
        {
            "title": "",
            "purpose": "DUO:0000007",
            "disease": "",
            "data_categories": "labs",
            "columns": "labs mean_radius",
            "template": "no_such_model",
            "task": "binary",
            "label": "label",
            "epsilon": "lots",
            "delta": "1e-5",
            "rounds": "2",
            "min_hospitals": "9",
            "token_budget": "999999",
            "ethics_approval": "on",
            "action": "submit",
        },
    )
    assert response.status_code == 422
    text = _text(response)
    for field in ("title", "disease", "columns", "template", "epsilon", "token_budget"):
        assert f"{field} :" in text, field
    assert "exceeds the organisation's balance" in text
    assert ("min_hospitals : not feasible (3 of the 3 registered hospital(s) might serve it, "
            "9 must approve)") in text
    assert 'aria-invalid="true"' in response.text
    assert console_world.runtime.audit_log.size() == size


def test_study_form_checks_then_submits(console_world: World, as_user: Any) -> None:
    alice = as_user("alice")
    form = {
        "title": "From the console",
        "purpose": "DUO:0000007",
        "disease": "C50",
        "data_categories": "labs, diagnoses",
        "columns": "labs: mean_radius, mean_texture",
        "template": "logistic_regression",
        "task": "binary",
        "label": "label",
        "epsilon": "2.5",
        "delta": "1e-5",
        "rounds": "2",
        "min_hospitals": "2",
        "token_budget": "500",
        "ethics_approval": "on",
    }
    checked = alice.post("/console/studies/new", {**form, "action": "check"})
    assert checked.status_code == 200
    assert "token_budget : ok" in _text(checked) and "min_hospitals : ok" in _text(checked)
    assert "hospitals.h-one : ok (no catalog published yet)" in _text(checked)
    submitted = alice.post("/console/studies/new", {**form, "action": "submit"})
    assert submitted.status_code == 303
    study_id = submitted.headers["location"].rsplit("/", 1)[1]
    api = console_world.client.get(f"/v1/studies/{study_id}", headers=console_world.headers("alice")).json()
    assert api["title"] == "From the console" and api["status"] == "submitted"
    assert api["spec"]["epsilon"] == 2.5 and api["token_budget"] == 500


def test_operator_pages_show_the_registry(console_world: World, as_user: Any) -> None:
    operator = as_user("operator")
    console_world.runtime.audit_log.checkpoint()
    hospitals = _text(operator.get("/console/hospitals"))
    assert "H-ONE" in hospitals and "not a witness" in hospitals
    organisations = _text(operator.get("/console/organisations"))
    assert "acme" in organisations and "globex" in organisations
    overview = _text(operator.get("/console/operator"))
    assert "Latest checkpoint" in overview and "No witnesses are pinned" in overview
    log_page = _text(as_user("alice").get("/console/log"))
    assert "Latest checkpoint" in log_page and "no witnesses are pinned" in log_page


def test_log_proofs_are_refused_out_of_range(as_user: Any) -> None:
    auditor = as_user("auditor")
    assert auditor.get("/console/log/proof/inclusion?index=5&size=2").status_code == 422
    assert auditor.get("/console/log/999999").status_code == 404
    assert auditor.get("/console/log/checkpoints/999999").status_code == 404
    assert auditor.get("/console/log/proof/inclusion?index=x&size=2").status_code == 400


def test_line_chart_draws_every_round() -> None:
    series = metric_series(
        [{"round": 1, "metrics": {"loss": 0.5, "ok": True}}, {"round": 2, "metrics": {"loss": 0.25}}]
    )
    assert series == {"loss": [(1, 0.5), (2, 0.25)]}
    svg = str(line_chart("loss", series["loss"]))
    assert svg.count("<circle") == 2 and "round 1: 0.5, round 2: 0.25" in svg and 'role="img"' in svg
    assert "No rounds" in str(line_chart("loss", []))


def test_the_feasibility_check_reads_the_hospitals_catalogs(console_world: World, as_user: Any) -> None:
    """Issue 18 item 2 with issue 21 item 2: "Check feasibility" shows, per hospital, what its
    signed catalog says, and a study no set of hospitals can serve is not submitted."""
    from tests.exchange.test_feasibility import catalog, publish

    assert publish(console_world, "h-one", catalog("h-one", max_epsilon_per_study=2.0)).status_code == 201
    assert publish(console_world, "h-two", catalog("h-two")).status_code == 201
    alice = as_user("alice")
    form = {"title": "Needs two", "purpose": "DUO:0000007", "disease": "C50", "data_categories": "labs",
            "columns": "labs: mean_radius, mean_texture", "template": "logistic_regression",
            "task": "binary", "label": "label", "epsilon": "3", "delta": "1e-5", "rounds": "2",
            "min_hospitals": "3", "token_budget": "500", "ethics_approval": "on"}
    checked = _text(alice.post("/console/studies/new", {**form, "action": "check"}))
    assert "hospitals.h-one : not feasible (epsilon 3 exceeds the site maximum per study (2))" in checked
    assert "hospitals.h-two : ok (its published catalog allows it)" in checked
    assert "min_hospitals : not feasible (2 of the 3 registered hospital(s) might serve it" in checked
    refused = alice.post("/console/studies/new", {**form, "action": "submit"})
    assert refused.status_code == 422 and "hospitals.h-one" in _text(refused)
    listed = console_world.client.get("/v1/studies", headers=console_world.headers("alice")).json()
    assert all(s["title"] != "Needs two" for s in listed["items"])
