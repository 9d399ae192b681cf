"""The log's last line of defence: values of secret-looking fields are blanked, in JSON lines."""

from __future__ import annotations

import io
import json
import sys

import pytest

from exchange.logging import configure_logging, get_logger, redact_secrets


@pytest.mark.parametrize("key", ["token", "api_key", "X-Api-Key", "Authorization", "seed_b64",
                                 "db_password", "client_secret", "private_key",
                                 "signature_input"])
def test_secret_looking_fields_are_redacted(key: str) -> None:
    event = {"event": "x", key: "hx_abc_supersecret", "study_id": "st-1"}
    assert redact_secrets(None, "info", event) == {"event": "x", key: "[redacted]",
                                                   "study_id": "st-1"}


def test_other_fields_pass_and_lines_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", json_format=True)
    try:
        log = get_logger("exchange.test")
        for _ in range(2):  # the second time from the per-name cache
            log.info("http.request", path="/v1/studies", status=200, token="hx_a_b")
        log.debug("not shown at INFO")
    finally:
        configure_logging("INFO", json_format=True)  # back to the real stderr
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert all(line["token"] == "[redacted]" and line["path"] == "/v1/studies"
               and line["status"] == 200 and line["level"] == "info" for line in lines)
