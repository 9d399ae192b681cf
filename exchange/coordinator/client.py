"""Small HTTP clients for the coordinator API: one for hospitals (RFC 9421 signed), one for
researchers and operators (API key).

Why here: the hospital node daemon and the `exchange study` / `exchange admin` commands talk
to the same endpoints; the request shapes and the error handling live in one place. Errors
come back as `CoordinatorError` carrying the RFC 9457 problem (status, title, every field
error), never as a bare httpx exception.
"""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime
from typing import Any, Literal

import httpx

from audit.entry import Entry, sign_entry
from audit.signing import Signer
from exchange.http_signing import HospitalAuth

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


class CoordinatorError(Exception):
    """The coordinator refused a request; `problem` is its RFC 9457 body (or a stand-in)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        errors = "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in problem.get("errors", []))
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}"
                         + (f" ({errors})" if errors else ""))


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    raise CoordinatorError(response.status_code, problem)


def decision_entry(signer: Signer, hospital_id: str, study_id: str, *,
                   decision: Literal["approve", "refuse"], reasons: list[str],
                   eligible_records: int | None = None, instant: datetime | None = None) -> Entry:
    """The hospital's signed `study.decision` log entry (see docs/coordinator-api.md)."""
    return sign_entry(signer, "study.decision", {
        "study_id": study_id, "hospital": f"hospital:{hospital_id}", "decision": decision,
        "reasons": list(reasons), "eligible_records": eligible_records,
    }, instant or datetime.now(UTC))


class HospitalClient:
    """The hospital side: every request signed with the hospital's registered Ed25519 key.

    Receipts are made with `federated.receipts.make_receipt` (the format the ServerApp checks)
    and sent with `submit_entry(receipt.entry)`."""

    def __init__(self, base_url: str, signer: Signer, hospital_id: str, *,
                 transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, verify: ssl.SSLContext | bool = True) -> None:
        self.signer = signer
        self.hospital_id = hospital_id
        self._http = httpx.Client(base_url=base_url, auth=HospitalAuth(signer), timeout=timeout,
                                  transport=transport, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HospitalClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def me(self) -> dict[str, Any]:
        return dict(_check(self._http.get("/v1/hospital/me")).json())

    def studies(self, status: Literal["pending", "open", "all"] = "pending", offset: int = 0,
                limit: int = 50) -> dict[str, Any]:
        """Studies this hospital may decide on (`pending`: submitted, not yet decided by it)."""
        response = self._http.get("/v1/hospital/studies",
                                  params={"status": status, "offset": offset, "limit": limit})
        return dict(_check(response).json())

    def decide(self, study_id: str, decision: Literal["approve", "refuse"], reasons: list[str],
               eligible_records: int | None = None) -> dict[str, Any]:
        entry = decision_entry(self.signer, self.hospital_id, study_id, decision=decision,
                               reasons=reasons, eligible_records=eligible_records)
        return self.submit_entry(entry, path=f"/v1/hospital/studies/{study_id}/decision")

    def claim_reward(self, claim: dict[str, Any]) -> dict[str, Any]:
        """Claim one leaf of this hospital's reward commitment (federated.reward_openings.claim_request)."""
        body = {k: v for k, v in claim.items() if k != "hospital"}
        return dict(_check(self._http.post("/v1/hospital/rewards/claims", json=body)).json())

    def payout(self, study_id: str) -> dict[str, Any] | None:
        """The study's `study.payout` payload from the public log (None before the payout)."""
        response = _check(self._http.get("/v1/audit/export"))
        for line in response.text.splitlines():
            entry = json.loads(line)
            if entry.get("kind") == "study.payout" and entry["payload"].get("study_id") == study_id:
                return dict(entry["payload"])
        return None

    def submit_entry(self, entry: Entry, path: str = "/v1/hospital/entries") -> dict[str, Any]:
        """Send an entry the hospital signed (decision, receipt, key rotation) for the log."""
        return dict(_check(self._http.post(path, json=entry.to_json())).json())

    # -- witnessing and monitoring the log (exchange/node/witnessing.py) ----------------------
    def witness_checkpoint(self, old_size: int, wait_s: float = 0.0) -> tuple[bytes, bool]:
        """The newest checkpoint as a tlog-witness add-checkpoint request from `old_size`,
        and whether this hospital's witness already cosigned it (long poll up to `wait_s`)."""
        response = _check(self._http.get("/v1/hospital/witness/checkpoint",
                                         params={"old_size": old_size, "wait_s": wait_s}))
        return response.content, response.headers.get("witness-cosigned") == "1"

    def post_cosignature(self, size: int, lines: str) -> dict[str, Any]:
        body = {"size": size, "cosignature": lines}
        return dict(_check(self._http.post("/v1/hospital/witness/cosignature", json=body)).json())

    def trust(self) -> dict[str, Any]:
        return dict(_check(self._http.get("/v1/audit/trust")).json())

    def log_entries(self, start: int, limit: int) -> dict[str, Any]:
        response = self._http.get("/v1/audit/entries", params={"start": start, "limit": limit})
        return dict(_check(response).json())

    def inclusion_proof(self, index: int, size: int) -> dict[str, Any]:
        response = self._http.get("/v1/audit/proofs/inclusion", params={"index": index, "size": size})
        return dict(_check(response).json())


class ApiClient:
    """Researchers, operators and auditors: `Authorization: Bearer <api key>`."""

    def __init__(self, base_url: str, api_key: str, *, transport: httpx.BaseTransport | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, verify: ssl.SSLContext | bool = True) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, verify=verify,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        return _check(self._http.get(path, params=params or None)).json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return _check(self._http.post(path, json=body if body is not None else {})).json()

    def delete(self, path: str) -> Any:
        return _check(self._http.delete(path)).json()

    def download(self, path: str) -> bytes:
        return _check(self._http.get(path)).content
