"""The console in a real browser: Debian's Chromium driven by Playwright (no browser download),
against a live coordinator with an in-process scripted consortium.

What a person does: sign in, submit a study (seeing the form's errors first), watch it run
without reloading, download the model; an auditor verifies an entry's inclusion and the log's
consistency in the browser, and sees a tampered proof fail. Every page is checked with axe-core
(WCAG 2 A/AA) and photographed. Without Chromium the tests skip, except when CI is set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import LiveServer, screenshot_dir
from tests.exchange.conftest import World

VECTORS = Path(__file__).resolve().parent.parent / "audit" / "data" / "rfc6962"
OUTSIDE: list[str] = []  # URLs a console page asked for outside the coordinator (must stay empty)


def _chromium() -> str:
    found = (os.environ.get("EXCHANGE_CHROMIUM") or shutil.which("chromium")
             or shutil.which("chromium-browser"))
    problem = None
    if found is None:
        problem = ("Chromium not installed (apt-get install chromium; scripts/bootstrap.sh does it "
                   "when CI is set)")
    else:
        try:
            import playwright  # noqa: F401
        except ImportError:
            problem = "playwright not installed (pip install -e '.[dev]')"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run and CI is set: {problem}")
        pytest.skip(problem)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def live(console_world: World) -> Iterator[str]:
    with LiveServer(console_world) as base:
        yield base


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return screenshot_dir(tmp_path_factory.mktemp("shots"))


def _axe_source() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


def check(page: Any, shots: Path, name: str) -> None:
    """axe-core (WCAG 2 A and AA rules) finds nothing on the page; then a screenshot."""
    page.add_script_tag(content=_axe_source())
    result = page.evaluate("async () => await axe.run(document, "
                           "{runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}})")
    problems = [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]]
    assert problems == [], f"{name}: {problems}"
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def sign_in(browser: Any, live: str, world: World, who: str) -> Any:
    context = browser.new_context(base_url=live, viewport={"width": 1366, "height": 768},
                                  accept_downloads=True)
    page = context.new_page()
    # every request the console makes stays on the coordinator (no CDN, nothing third-party)
    page.on("request", lambda request: request.url.startswith((live, "data:", "blob:"))
            or OUTSIDE.append(request.url))
    page.goto("/console/")
    page.keyboard.press("Tab")  # the first stop is the skip link
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.get_by_label("API key").fill(world.keys[who])
    page.keyboard.press("Enter")  # keyboard only
    page.wait_for_url(lambda url: "/sign-in" not in url)
    return page


def test_researcher_submits_watches_and_downloads(browser: Any, live: str, console_world: World,
                                                  shots: Path) -> None:
    page = browser.new_page(base_url=live, viewport={"width": 1366, "height": 768})
    page.goto("/console/studies")
    assert "/console/sign-in" in page.url
    check(page, shots, "sign-in")
    page.close()
    runner = console_world.runner
    runner.pause = threading.Event()  # runs wait at each round until released
    try:
        page = sign_in(browser, live, console_world, "alice")
        page.goto("/console/studies/new")
        page.get_by_label("Title").fill("")
        page.get_by_label("ε per patient").fill("lots")
        page.get_by_role("button", name="Submit study").click()
        alert = page.locator("#form-errors")
        assert "title" in alert.inner_text() and "epsilon" in alert.inner_text()
        check(page, shots, "submit-errors")
        page.get_by_label("Title").fill("Watched in a browser")
        page.get_by_label("ε per patient").fill("2.0")
        page.get_by_role("button", name="Check feasibility").click()
        assert "ok" in page.locator("#feasibility").inner_text()
        page.get_by_role("button", name="Submit study").click()
        page.wait_for_url("**/console/studies/st-*")
        study_id = page.url.rsplit("/", 1)[1]
        assert page.locator("#study-status").inner_text() == "submitted"
        # the start deadline (the default: seven days after submission), as the API states it
        served = console_world.as_("alice", "GET", f"/v1/studies/{study_id}").json()
        deadline = datetime.fromisoformat(served["start_deadline"])
        submitted = datetime.fromisoformat(served["submitted_at"])
        assert abs(deadline - submitted - timedelta(days=7)) < timedelta(seconds=5)
        shown = page.locator("#start-deadline").inner_text()
        assert shown.startswith(f"{deadline:%Y-%m-%d %H:%M:%S} UTC") and "expires" in shown
        check(page, shots, "study-submitted")
        # the hospitals approve through the API; the open page follows without a reload
        page.evaluate("window.__sameDocument = true")
        for hospital in ("h-one", "h-two"):
            assert console_world.decide(hospital, study_id).status_code == 201
        page.locator("#study-status", has_text="running").wait_for(timeout=20_000)
        assert page.evaluate("window.__sameDocument") is True
        assert page.locator("#approvals").inner_text() == "2"
        runner.pause.set()
        page.locator("#model-download").wait_for(timeout=30_000)
        assert page.locator("#study-status").inner_text() == "completed"
        assert page.locator("svg.chart").count() >= 2
        check(page, shots, "study-completed")
        with page.expect_download() as download:
            page.locator("#model-download").click()
        data = Path(download.value.path()).read_bytes()
        assert hashlib.sha256(data).hexdigest() in page.locator("#model-h + p").inner_text()
        page.goto("/console/studies")
        row = page.locator("tr", has=page.locator(f"a[href='/console/studies/{study_id}']"))
        assert row.locator("td.deadline").inner_text() == f"{deadline:%Y-%m-%d %H:%M} UTC"
        check(page, shots, "studies")
        # CSRF: a form whose token was altered is refused, and nothing happens
        page.locator("form.signout input[name=_csrf_token]").evaluate("e => e.value = 'x' + e.value")
        page.get_by_role("button", name="Sign out").click()
        assert "CSRF" in page.locator("main").inner_text()
        page.goto("/console/hospitals")  # still signed in, and still a researcher
        assert "403" in page.locator("h1").inner_text()
        page.context.close()
        assert OUTSIDE == []
    finally:
        runner.pause = None
        console_world.wait_runs()


def test_operator_pages(browser: Any, live: str, console_world: World, shots: Path) -> None:
    console_world.runtime.audit_log.checkpoint()
    page = sign_in(browser, live, console_world, "operator")
    for path, name in (("/console/operator", "operator-overview"), ("/console/hospitals", "hospitals"),
                       ("/console/organisations", "organisations")):
        page.goto(path)
        assert page.locator("h1").count() == 1
        if name == "hospitals":
            assert "H-ONE" in page.locator("table").inner_text()
        check(page, shots, name)
    page.context.close()
    assert OUTSIDE == []


def _tamper(field: str, mutate: Any) -> Any:
    def handler(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body[field] = mutate(body[field])
        route.fulfill(response=response, body=json.dumps(body))
    return handler


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


def test_auditor_verifies_in_the_browser_and_tampering_fails(browser: Any, live: str,
                                                             console_world: World, shots: Path) -> None:
    log = console_world.runtime.audit_log
    log.checkpoint()  # an earlier checkpoint to check consistency with
    console_world.submit("alice", token_budget=5)  # the log grows past it
    index = log.size() - 1
    page = sign_in(browser, live, console_world, "auditor")
    page.goto("/console/log")
    check(page, shots, "log")
    page.goto(f"/console/log/{index}")
    verdict = page.locator("#verify-verdict")

    def verify() -> str:
        page.get_by_role("button", name=f"Verify entry {index}").click()
        page.wait_for_function(
            "document.getElementById('verifier').dataset.verdict !== undefined && "
            "!document.getElementById('verify-verdict').textContent.startsWith('Verifying')")
        return str(verdict.inner_text())

    assert verify().startswith("VERIFIED"), page.locator("#verify-results").inner_text()
    steps = page.locator("#verify-results li.pass")
    assert steps.count() == 6 and page.locator("#verify-results li.fail").count() == 0
    assert "extends the earlier checkpoint" in page.locator("#verify-results").inner_text()
    check(page, shots, "entry-verified")
    # a proof altered on the way: the browser's own check fails, whatever the server said
    page.route("**/console/log/proof/inclusion*", _tamper("proof", lambda p: [_flip(p[0]), *p[1:]]))
    assert verify().startswith("FAILED")
    assert "does not lead to the checkpoint's root" in page.locator("#verify-results li.fail").inner_text()
    page.screenshot(path=str(shots / "entry-tampered.png"), full_page=True)
    page.unroute("**/console/log/proof/inclusion*")
    page.route("**/console/log/proof/consistency*", _tamper("proof", lambda p: [_flip(p[0]), *p[1:]]))
    assert verify().startswith("FAILED")
    assert "does NOT extend" in page.locator("#verify-results li.fail").inner_text()
    page.unroute("**/console/log/proof/consistency*")
    page.route("**/console/log/checkpoint", _tamper("checkpoint", lambda n: n.replace(
        f"\n{log.size()}\n", f"\n{log.size() + 1}\n", 1)))
    assert verify().startswith("FAILED")
    assert "signature does not verify" in page.locator("#verify-results li.fail").inner_text()
    page.unroute("**/console/log/checkpoint")
    # a key the auditor pinned that is not the log's: nothing verifies
    page.get_by_label("Pinned log key", exact=False).fill(base64.b64encode(bytes(32)).decode())
    assert verify().startswith("FAILED")
    # RFC 6962 / 9162 vectors (transparency-dev/merkle): the browser's verifier agrees with each
    cases = {kind: [json.loads(p.read_text()) for p in sorted((VECTORS / kind).rglob("*.json"))]
             for kind in ("inclusion", "consistency")}
    outcome = page.evaluate("""async (cases) => {
        const v = window.hxVerify, d = (s) => s ? v.b64decode(s) : new Uint8Array(0), out = [];
        for (const c of cases.inclusion) {
            let ok; try { ok = await v.verifyInclusion(c.leafIdx, c.treeSize, d(c.leafHash),
                                                      (c.proof || []).map(d), d(c.root)); }
            catch (e) { ok = false; }
            out.push(ok === !c.wantErr);
        }
        for (const c of cases.consistency) {
            let ok; try { ok = await v.verifyConsistency(c.size1, c.size2, d(c.root1), d(c.root2),
                                                         (c.proof || []).map(d)); }
            catch (e) { ok = false; }
            out.push(ok === !c.wantErr);
        }
        return out;
    }""", cases)
    assert len(outcome) == 196 and all(outcome), [i for i, ok in enumerate(outcome) if not ok]
    # witness cosignatures (C2SP cosignature/v1) made by audit.cosignature, checked by the browser
    from audit.cosignature import CosignatureV1Signer
    from audit.note import add_signatures, parse_note
    from audit.signing import Signer

    signed, absent = (CosignatureV1Signer(n, Signer.generate()) for n in ("h-one.witness", "h-two.witness"))
    note = parse_note(log.checkpoint())
    cosigned = add_signatures(note, [signed.cosign(note.body, timestamp=1_760_000_000)]).text()
    script = "async ([note, keys]) => await window.hxVerify.verifyCosignatures(note, keys)"
    keys = [str(signed.vkey), str(absent.vkey)]
    result = page.evaluate(script, [cosigned, keys])
    assert result == {"signed": ["h-one.witness at 2025-10-09T08:53:20.000Z"], "missing": ["h-two.witness"],
                      "bad": []}
    forged = cosigned.replace(note.body.split("\n")[2], _flip(note.body.split("\n")[2]), 1)
    assert page.evaluate(script, [forged, keys])["bad"] == ["h-one.witness"]
    page.context.close()
    assert OUTSIDE == []


def test_plain_pages_without_javascript(browser: Any, live: str, console_world: World) -> None:
    study_id = console_world.submit("alice", token_budget=5)["id"]
    context = browser.new_context(base_url=live, java_script_enabled=False)
    page = context.new_page()
    page.goto("/console/studies")
    page.get_by_label("API key").fill(console_world.keys["alice"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/sign-in" not in url)
    assert study_id in page.locator("table").inner_text()
    page.goto(f"/console/studies/{study_id}")
    assert page.locator("#study-status").inner_text() == "submitted"
    assert page.locator("#live-note").inner_text() != "Live: updates every 2 seconds."
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/console/sign-in")
    context.close()
