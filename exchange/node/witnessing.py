"""The hospital node as a witness of the coordinator's log, and as a monitor of its own entries.

Why: a log whose checkpoints only its operator signs can show one history to an auditor and
another to a hospital. Each node therefore (1) witnesses the log: it pulls each new checkpoint
with a consistency proof from the checkpoint it holds, checks both with `audit.witness.Witness`
(C2SP tlog-witness add-checkpoint semantics: the log's signature, the proof, never an older or
inconsistent checkpoint), cosigns it (C2SP cosignature/v1) and posts the cosignature back; an
inconsistent checkpoint is refused and both signed notes are kept as evidence (the witness
state file, `witness.json`), which `node status` and `/health` report as an alarm until an
operator clears it; and (2) monitors its own entries: every decision it posted and every round
it was charged for must appear, signed by this node, with an inclusion proof against the
checkpoint it cosigned, `inclusion_grace_s` after it was posted at the latest.

The log key is pinned: from the node's settings (`witness.log_vkey`), else on first contact
(the coordinator's /v1/audit/trust) in `witness-log.json`, never replaced afterwards: a
coordinator that starts signing with another key gets refused (403), not followed.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import select

from audit.checkpoint import parse_checkpoint
from audit.entry import Entry
from audit.export import atomic_write
from audit.merkle import ProofError, leaf_hash, verify_inclusion
from audit.note import NoteError, Vkey
from audit.signing import b64decode
from audit.trust import Trust
from audit.witness import (
    AddCheckpointRequest,
    FileWitnessStore,
    HeldCheckpoint,
    Witness,
    WitnessedLog,
    WitnessRefusalError,
)
from exchange.node.keys import witness_signer
from exchange.node.models import DecisionRow, RoundRow
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore

STATE_FILE = "witness.json"
PINNED_LOG_FILE = "witness-log.json"
ENTRY_PAGE = 200
INCLUSION_STATE = "inclusion"
#: The monitor's progress alone (how far it scanned, the checkpoint its entries are proven in) is
#: written to the node database at most this often; what it found or misses, at once
#: (`InclusionMonitor.step`)
INCLUSION_PROGRESS_S = 60.0


class WitnessLink(Protocol):
    """The coordinator calls the witness and the monitor make (exchange.coordinator.client)."""

    def trust(self) -> dict[str, Any]: ...

    def witness_checkpoint(self, old_size: int, wait_s: float = 0.0) -> tuple[bytes, bool]: ...

    def post_cosignature(self, size: int, lines: str) -> dict[str, Any]: ...

    def log_entries(self, start: int, limit: int) -> dict[str, Any]: ...

    def inclusion_proof(self, index: int, size: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class WitnessStep:
    """What one pull did: cosigned | unchanged | refused, the checkpoint size, and why."""

    outcome: str
    size: int
    reason: str = ""


def pin_log(settings: NodeSettings, link: WitnessLink) -> WitnessedLog:
    """The log this node witnesses: origin and log key, pinned (see module doc)."""
    path = settings.data_dir / PINNED_LOG_FILE
    if path.exists():
        data = json.loads(path.read_text())
        return WitnessedLog(str(data["origin"]), Vkey.parse(str(data["log_key"]), "pinned log key"))
    trust = Trust.from_json(link.trust())
    vkey = trust.log_vkey
    if settings.witness.log_vkey is not None:
        pinned = Vkey.parse(settings.witness.log_vkey, "witness.log_vkey")
        if (pinned.name, pinned.public_key) != (vkey.name, vkey.public_key):
            raise NoteError(f"witness.log_vkey: the coordinator's log key {vkey} is not the "
                            f"pinned {pinned}")
        vkey = pinned
    atomic_write(path, (json.dumps({"origin": trust.origin, "log_key": str(vkey)}) + "\n").encode())
    return WitnessedLog(trust.origin, vkey)


class NodeWitness:
    """Pulls, checks and cosigns the coordinator's checkpoints (one `step` per pull)."""

    def __init__(self, settings: NodeSettings, link: WitnessLink, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.link = link
        self.signer = witness_signer(settings.hospital_id, settings.witness_key_path)
        self.store = FileWitnessStore(settings.data_dir / STATE_FILE)
        self._clock = clock
        self._witness: Witness | None = None
        self._origin = ""
        self.last: WitnessStep | None = None

    def _ready(self) -> Witness:
        if self._witness is None:
            log = pin_log(self.settings, self.link)
            self._origin = log.origin
            self._witness = Witness(self.signer, [log], self.store, clock=self._clock)
        return self._witness

    def held(self) -> HeldCheckpoint | None:
        self._ready()
        return self.store.load().held.get(self._origin)

    def step(self, wait_s: float = 0.0) -> WitnessStep:
        """Pull the newest checkpoint (waiting up to `wait_s` for one), check, cosign, post."""
        witness = self._ready()
        held = self.held()
        old_size = held.size if held is not None else 0
        body, already = self.link.witness_checkpoint(old_size, wait_s)
        try:
            request = AddCheckpointRequest.parse(body)
            offered = parse_checkpoint(request.checkpoint)
        except (WitnessRefusalError, NoteError) as exc:
            self.last = WitnessStep("refused", 0, f"the coordinator's offer is malformed: {exc}")
            return self.last
        if already and held is not None and (offered.size, offered.root) == (held.size, held.root):
            self.last = WitnessStep("unchanged", held.size)
            return self.last
        try:
            cosigned = witness.add_checkpoint(request.old_size, request.proof, request.checkpoint)
        except WitnessRefusalError as refusal:
            self.last = WitnessStep("refused", offered.size, refusal.reason)
            return self.last
        self.link.post_cosignature(cosigned.checkpoint.size, cosigned.lines)
        self.last = WitnessStep("cosigned", cosigned.checkpoint.size)
        return self.last

    def status(self) -> dict[str, Any]:
        """For `node status` and /health: the held checkpoint, alarms, the last refusal."""
        return witness_status(self.settings, self.last)


def witness_status(settings: NodeSettings, last: WitnessStep | None = None) -> dict[str, Any]:
    """The witness's state as read from its files (also for `node status`, with no daemon)."""
    store = FileWitnessStore(settings.data_dir / STATE_FILE)
    try:
        state = store.load()
    except Exception as exc:
        return {"state": "error", "alarm": True, "reason": str(exc)}
    held = next(iter(state.held.values()), None)
    out: dict[str, Any] = {
        "state": "alarm" if state.alarms else ("ok" if held is not None else "waiting"),
        "alarm": bool(state.alarms),
        "cosigned_size": held.size if held is not None else None,
        "cosigned_at": (datetime.fromtimestamp(held.cosigned_at, UTC).isoformat()
                        if held is not None else None),
        "alarms": [{"reason": a.reason, "proven": a.proven,
                    "detected_at": datetime.fromtimestamp(a.detected_at, UTC).isoformat()}
                   for a in state.alarms],
    }
    if last is not None and last.outcome == "refused":
        out["last_refusal"] = {"size": last.size, "reason": last.reason}
    return out


def witness_evidence(settings: NodeSettings, *, clear: bool = False) -> list[dict[str, Any]]:
    """The alarms with their full evidence (both signed checkpoints, the proof), to hand to
    the other hospitals and auditors; `clear` forgets them afterwards (an operator's call)."""
    store = FileWitnessStore(settings.data_dir / STATE_FILE)
    with store.locked():
        state = store.load()
        evidence = [alarm.to_json() for alarm in state.alarms]
        if clear and state.alarms:
            state.alarms = []
            store.save(state)
    return evidence


# -- monitoring this node's own entries --------------------------------------------------------

@dataclass
class InclusionState:
    """What the monitor knows: how far it scanned the log, and where its own entries are."""

    scanned: int = 0
    proven_size: int = 0  # the cosigned checkpoint every found entry is proven included in
    entries: dict[str, int] = field(default_factory=dict)  # leaf hash (hex) -> index
    receipts: list[tuple[str, int]] = field(default_factory=list)  # (study, round) found
    missing: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # an inclusion proof that did not verify

    def to_json(self) -> dict[str, Any]:
        return {"scanned": self.scanned, "proven_size": self.proven_size, "entries": self.entries,
                "receipts": [list(r) for r in self.receipts], "missing": self.missing,
                "failures": self.failures}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None) -> InclusionState:
        if not obj:
            return cls()
        return cls(int(obj["scanned"]), int(obj["proven_size"]), dict(obj["entries"]),
                   [(str(s), int(r)) for s, r in obj["receipts"]], list(obj["missing"]),
                   list(obj.get("failures", [])))


class InclusionMonitor:
    """Checks that every entry this node signed is included in the checkpoint it cosigned."""

    def __init__(self, settings: NodeSettings, store: NodeStore, link: WitnessLink,
                 key_id: str, *, clock: Callable[[], float] = time.time,
                 db_guard: AbstractContextManager[object] | None = None) -> None:
        """`db_guard` is held around each use of the node's database and never around a
        request to the coordinator: the daemon passes its `FORK_GUARD`, so a forked step waits
        for a database call to end (exchange/node/isolated.py), never for a slow page of the log."""
        self.settings = settings
        self.store = store
        self.link = link
        self.key_id = key_id
        self._clock = clock
        self._db_guard: AbstractContextManager[object] = db_guard or nullcontext()
        self._state: InclusionState | None = None  # the state as of the last step
        #: what the node database holds (`InclusionState.to_json`), and when it was written
        self._saved: dict[str, Any] | None = None
        self._saved_at = 0.0

    def state(self) -> InclusionState:
        """The monitor's state: read from the node database at the first step (a restart
        resumes from it), kept in memory after."""
        if self._state is None:
            with self._db_guard:
                saved = self.store.get_state(INCLUSION_STATE)
            self._state = InclusionState.from_json(saved)
            self._saved, self._saved_at = (saved, self._clock()) if saved else (None, 0.0)
        return self._state

    def step(self, held: HeldCheckpoint) -> InclusionState:
        """Scan the log up to the held checkpoint, prove this node's new entries included in
        it, and list what this node signed that is still missing past the grace period.

        Written to the node database when an entry of this node was found or proven, or one is
        missing or failed its proof (what `node status` and its alarms read), else at most every
        `INCLUSION_PROGRESS_S`: at every checkpoint the scan moves on, and the write was a commit
        (an fsync on SQLite) per hospital and checkpoint, which also made the daemon's next
        step re-read its database (`NodeStore.change_token`). A restart resumes from the last
        write: it scans again at most that long a stretch of the log, which holds none of this
        node's entries (finding one is written at once)."""
        state = self.state()
        size, root = held.size, held.root
        while state.scanned < size:
            page = self.link.log_entries(state.scanned, min(ENTRY_PAGE, size - state.scanned))
            items = page.get("items", [])
            if not items:
                break
            for item in items:
                index = int(item["index"])
                if index >= size:
                    break
                entry = Entry.from_json(item["entry"])
                if entry.key_id == self.key_id:
                    self._prove(state, entry, index, size, root)
                state.scanned = index + 1
        if state.scanned >= size and not state.failures:
            state.proven_size = size
        with self._db_guard:
            state.missing = self._missing(state)
            current = state.to_json()
            if self._must_save(current):
                self.store.set_state(INCLUSION_STATE, current)
                # a copy: `current` shares the state's lists and dicts, which the next step extends
                self._saved, self._saved_at = copy.deepcopy(current), self._clock()
        return state

    def _must_save(self, current: dict[str, Any]) -> bool:
        """Whether `current` must be written now (`step`): it differs from what the database
        holds in more than the progress, or the progress written is `INCLUSION_PROGRESS_S` old."""
        saved = self._saved
        if saved is None:
            return True
        progress = ("scanned", "proven_size")
        if any(current.get(key) != saved.get(key) for key in current.keys() - set(progress)):
            return True
        moved = any(current.get(key) != saved.get(key) for key in progress)
        return moved and self._clock() - self._saved_at >= INCLUSION_PROGRESS_S

    def _prove(self, state: InclusionState, entry: Entry, index: int, size: int, root: bytes) -> None:
        leaf = leaf_hash(entry.leaf_bytes())
        proof = self.link.inclusion_proof(index, size)
        try:
            verify_inclusion(leaf, index, size, [b64decode(p) for p in proof["proof"]], root)
        except (ProofError, KeyError, ValueError) as exc:
            state.failures.append(f"entry {index} ({entry.kind}): no valid inclusion proof in the "
                                  f"cosigned checkpoint of size {size} ({exc})")
            return
        state.entries[leaf.hex()] = index
        if entry.kind == "round.receipt":
            state.receipts.append((str(entry.payload.get("study_id")), int(entry.payload.get("round", 0))))

    def _missing(self, state: InclusionState) -> list[dict[str, Any]]:
        """Entries this node signed, posted more than the grace period ago, that are not proven
        included in the checkpoint it cosigned (the coordinator checkpoints every few seconds,
        so a log that stops checkpointing hides nothing either)."""
        cutoff = datetime.fromtimestamp(self._clock() - self.settings.witness.inclusion_grace_s, UTC)
        found_receipts = set(state.receipts)
        missing: list[dict[str, Any]] = []
        with self.store.sessions() as session:
            posted_rows = select(DecisionRow).where(DecisionRow.posted_at.is_not(None))
            for row in session.execute(posted_rows).scalars():
                posted = _aware(row.posted_at)
                if posted is None or posted >= cutoff:
                    continue
                leaf = leaf_hash(Entry.from_json(row.envelope).leaf_bytes()).hex()
                if leaf not in state.entries:
                    missing.append({"kind": "study.decision", "study_id": row.study_id,
                                    "posted_at": posted.isoformat()})
            for study_id, round_number, at in session.execute(
                    select(RoundRow.study_id, RoundRow.round, RoundRow.at)).tuples():
                charged = _aware(at)
                if charged is not None and charged < cutoff \
                        and (study_id, round_number) not in found_receipts:
                    missing.append({"kind": "round.receipt", "study_id": study_id, "round": round_number,
                                    "charged_at": charged.isoformat()})
        return missing


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def inclusion_status(store: NodeStore) -> dict[str, Any]:
    """For `node status` and /health: up to which cosigned checkpoint this node's entries are
    proven included, how many, and an alarm for any missing or unprovable one (as last written
    to the node database: the progress lags by up to `INCLUSION_PROGRESS_S`, an alarm does not)."""
    return inclusion_report(InclusionState.from_json(store.get_state(INCLUSION_STATE)))


def inclusion_report(state: InclusionState) -> dict[str, Any]:
    """`inclusion_status` of a monitor's state (the daemon's /health: the state in memory)."""
    alarm = bool(state.missing or state.failures)
    return {"state": "alarm" if alarm else "ok", "alarm": alarm,
            "proven_size": state.proven_size, "entries_proven": len(state.entries),
            "missing": state.missing, "failures": state.failures}
