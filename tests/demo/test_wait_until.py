"""The consortium's polling waits: a slow coordinator is waited for, not a reason to give up."""

from __future__ import annotations

import httpx
import pytest

from exchange.demo.consortium import DemoError, wait_until


def test_a_poll_that_times_out_is_asked_again() -> None:
    answers: list[object] = [httpx.ReadTimeout("timed out"), None, "done"]

    def condition() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(condition, "the study", timeout=5, interval=0) == "done"
    assert answers == []


def test_the_deadline_names_what_was_awaited_and_the_last_timeout() -> None:
    def condition() -> object:
        raise httpx.ReadTimeout("coordinator busy")

    expected = r"waiting for the study to finish \(the last poll timed out: .*coordinator busy"
    with pytest.raises(DemoError, match=expected):
        wait_until(condition, "the study to finish", timeout=0.05, interval=0.01)


def test_other_errors_are_not_swallowed() -> None:
    def condition() -> object:
        raise httpx.ConnectError("refused")

    with pytest.raises(httpx.ConnectError):
        wait_until(condition, "the coordinator", timeout=5, interval=0)
