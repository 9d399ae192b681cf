"""The auditor's log browser and the raw material the browser verifies on its own.

The JSON routes here hand out only what a verifier needs and must not take on trust: the
entry's exact leaf bytes (the browser hashes them itself), signed checkpoints (the browser
checks the log key's Ed25519 signature), and RFC 9162 proofs (the browser folds them). As in
the API, every signed-in party may read the log; it holds no personal data.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Template

from audit.signing import b64encode
from exchange.console import views
from exchange.coordinator import problems
from exchange.coordinator.journal import Journal
from exchange.coordinator.registry import Principal

PAGE = 50
SCAN = 2000  # a kind filter looks at this many entries from `start` at most
Index = Annotated[int, Parameter(ge=0, le=2**53)]
Size = Annotated[int, Parameter(ge=1, le=2**53)]


def _log_context(state: State) -> dict[str, Any]:
    trust = views.current_trust(state)
    return {
        "log_key_b64": b64encode(trust.log_public_key),
        "log_key_name": trust.log_key_name,
        "origin": trust.origin,
        "witnesses": [str(v) for v in trust.witnesses],
        "quorum": trust.default_quorum,
    }


class LogController(Controller):
    path = "/log"

    @get("/", sync_to_thread=True)
    def browse(
        self,
        principal: Principal,
        journal: Journal,
        state: State,
        start: Annotated[int, Parameter(ge=0, le=2**53)] = 0,
        kind: str = "",
    ) -> Template:
        log = journal.audit_log
        size = log.size()
        rows: list[dict[str, Any]] = []
        position = start
        while position < min(size, start + SCAN) and len(rows) < PAGE:
            stop = min(size, position + PAGE * 4, start + SCAN)
            for offset, entry in enumerate(log.entries(position, stop)):
                if (not kind or entry.kind == kind) and len(rows) < PAGE:
                    rows.append(
                        {
                            "index": position + offset,
                            "kind": entry.kind,
                            "key_id": entry.key_id,
                            "study_id": entry.payload.get("study_id"),
                        }
                    )
            position = stop
        last = rows[-1]["index"] + 1 if rows else position
        note = views.cosigned_note(state, log)
        checkpoint = views.checkpoint_view(note, state.trust.log_key_name) if note else None
        return Template(
            "log.html",
            context={
                "principal": principal,
                "rows": rows,
                "size": size,
                "start": start,
                "kind": kind,
                "next_start": last if last < size else None,
                "prev_start": max(0, start - PAGE) if start else None,
                "checkpoints": views.stored_checkpoints(log),
                "checkpoint": checkpoint,
                **_log_context(state),
            },
        )

    @get("/{index:int}", sync_to_thread=True)
    def entry(self, principal: Principal, journal: Journal, state: State, index: int) -> Template:
        log = journal.audit_log
        size = log.size()
        if not 0 <= index < size:
            raise problems.not_found(f"log entry {index} (the log has {size})")
        entry = log.get(index)
        return Template(
            "entry.html",
            context={
                "principal": principal,
                "index": index,
                "kind": entry.kind,
                "size": size,
                "pretty": json.dumps(entry.to_json(), indent=2, sort_keys=True),
                "checkpoints": views.stored_checkpoints(log),
                **_log_context(state),
            },
        )

    @get("/{index:int}/leaf", sync_to_thread=True)
    def leaf(self, principal: Principal, journal: Journal, index: int) -> dict[str, Any]:
        log = journal.audit_log
        if not 0 <= index < log.size():
            raise problems.not_found(f"log entry {index}")
        return {"index": index, "leaf": b64encode(log.get(index).leaf_bytes())}

    @get("/checkpoint", sync_to_thread=True)
    def checkpoint(self, principal: Principal, journal: Journal) -> dict[str, Any]:
        """A fresh signed checkpoint of the whole log (as GET /v1/audit/checkpoint)."""
        return {"checkpoint": journal.audit_log.checkpoint()}

    @get("/checkpoints/{size:int}", sync_to_thread=True)
    def stored(self, principal: Principal, journal: Journal, size: int) -> dict[str, Any]:
        note = views.stored_checkpoint(journal.audit_log, size)
        if note is None:
            raise problems.not_found(f"stored checkpoint of size {size}")
        return {"checkpoint": note}

    @get("/proof/inclusion", sync_to_thread=True)
    def inclusion(
        self, principal: Principal, journal: Journal, index: Index, size: Size
    ) -> dict[str, Any]:
        log = journal.audit_log
        current = log.size()
        if size > current or index >= size:
            raise problems.unprocessable(
                [
                    {
                        "field": "size" if size > current else "index",
                        "reason": f"need index < size <= {current}",
                    }
                ]
            )
        return {
            "index": index,
            "size": size,
            "proof": [b64encode(p) for p in log.inclusion_proof(index, size)],
        }

    @get("/proof/consistency", sync_to_thread=True)
    def consistency(
        self, principal: Principal, journal: Journal, old_size: Size, new_size: Size
    ) -> dict[str, Any]:
        log = journal.audit_log
        current = log.size()
        if not old_size <= new_size <= current:
            raise problems.unprocessable(
                [{"field": "new_size", "reason": f"need old_size <= new_size <= {current}"}]
            )
        return {
            "old_size": old_size,
            "new_size": new_size,
            "proof": [b64encode(p) for p in log.consistency_proof(old_size, new_size)],
        }
