"""A checkpoint witness (C2SP tlog-witness), as a pure library: state machine, state, wire format.

Why: hospitals witness the log. Each holds the last checkpoint it cosigned and cosigns a new one
only if the log signed it and a consistency proof shows it extends the held one; a log that
shows two histories to two witnesses is then caught by at least one of them, and no quorum of
cosignatures (audit/trust.py) forms on both histories.

`Witness.add_checkpoint(old_size, proof, note)` follows the `add-checkpoint` call of
c2sp.org/tlog-witness step by step; every refusal is a `WitnessRefusalError` with the HTTP status the
spec gives it, a reason in words, and nothing cosigned or changed (except an alarm):

    400  malformed request or note; old size larger than the checkpoint's size
    403  no valid signature by the log's key (or a log-key line that does not verify)
    404  unknown origin (a log this witness does not follow)
    409  old size is not the size of the checkpoint the witness holds (body: that size, as
         text/x.tlog.size); this is also how a checkpoint OLDER than the held one is refused
    422  a size-0 checkpoint with a root other than SHA-256(""); a proof given with old size 0;
         a consistency proof that does not verify; the same size as the held checkpoint with
         another root
    503  the witness's clock is earlier than its last cosignature (it will not sign a time
         before one it already signed)

A checkpoint the log signed that is inconsistent with the held one (the last two 422 cases) is
evidence of a split view or a rewritten log: the witness records an `Alarm` with both signed
notes and the proof, in its state, before refusing. Same size and another root is a proven
fork (`Alarm.proven`); a failed proof is the log's failure when the log supplied it (a node
pulling from the coordinator), a suspicion only when anyone may push requests. The alarm stays
(status(), the node's `/health` in phase 2) until an operator calls `clear_alarms`; the
witness keeps cosigning checkpoints consistent with the one it holds, since that is all a
cosignature states.

State (the held checkpoint per origin, the alarms) lives in a `WitnessStore`: a small JSON
file (`FileWitnessStore`, atomic replace, an flock around check-and-update so two processes
cannot roll each other back, as the spec warns) or memory. An unreadable state file stops the
witness (WitnessStateError): starting from nothing would let the log roll the witness back.
"""

from __future__ import annotations

import binascii
import fcntl
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from audit.checkpoint import Checkpoint, parse_checkpoint_body
from audit.cosignature import CosignatureV1Signer
from audit.export import atomic_write
from audit.merkle import EMPTY_ROOT, HASH_SIZE, ProofError, verify_consistency
from audit.note import (
    MAX_NOTE_BYTES,
    Ed25519Verifier,
    Note,
    NoteError,
    NoteSignature,
    Vkey,
    open_note,
    parse_note,
)
from audit.signing import b64decode, b64encode

ADD_CHECKPOINT_PATH = "/add-checkpoint"
SIZE_CONTENT_TYPE = "text/x.tlog.size"
COSIGNATURE_CONTENT_TYPE = "text/plain; charset=utf-8"
MAX_PROOF_LINES = 63
MAX_REQUEST_BYTES = MAX_NOTE_BYTES + 64 * (MAX_PROOF_LINES + 1)
STATE_VERSION = 1
MAX_ALARMS = 100
_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


class WitnessStateError(RuntimeError):
    """The witness's state cannot be read or written; it must not cosign until fixed."""


@dataclass(frozen=True)
class WitnessResponse:
    """An HTTP answer to an add-checkpoint request: status, content type, body."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Alarm:
    """Evidence that the log signed a checkpoint inconsistent with one this witness cosigned."""

    origin: str
    reason: str
    held: str  # the checkpoint this witness cosigned (signed note)
    offered: str  # the inconsistent checkpoint the log signed (signed note)
    old_size: int
    proof: tuple[str, ...]  # base64 hashes of the consistency proof that failed
    detected_at: int  # POSIX seconds
    # True: two log-signed checkpoints of one size with different roots, a fork anyone can
    # check from the two notes alone. False: a consistency proof failed; that is the log's
    # failure when the log supplied the proof (a node pulling from the coordinator), but with
    # the push protocol any client may send a bad proof for a good checkpoint.
    proven: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "reason": self.reason, "held": self.held,
                "offered": self.offered, "old_size": self.old_size, "proof": list(self.proof),
                "detected_at": self.detected_at, "proven": self.proven}

    @classmethod
    def from_json(cls, obj: Any) -> Alarm:
        try:
            return cls(str(obj["origin"]), str(obj["reason"]), str(obj["held"]),
                       str(obj["offered"]), int(obj["old_size"]),
                       tuple(str(p) for p in obj["proof"]), int(obj["detected_at"]),
                       bool(obj.get("proven", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise WitnessStateError(f"witness state: malformed alarm ({exc})") from exc


class WitnessRefusalError(Exception):
    """The witness will not cosign; `status` is the tlog-witness HTTP status, `reason` why."""

    def __init__(self, status: int, reason: str, *, known_size: int | None = None,
                 alarm: Alarm | None = None) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.known_size = known_size
        self.alarm = alarm

    def response(self) -> WitnessResponse:
        if self.status == 409 and self.known_size is not None:
            return WitnessResponse(409, SIZE_CONTENT_TYPE, f"{self.known_size}\n".encode())
        return WitnessResponse(self.status, "text/plain; charset=utf-8",
                               (self.reason + "\n").encode())


# -- the add-checkpoint request body ---------------------------------------------------------

@dataclass(frozen=True)
class AddCheckpointRequest:
    """`old <size>\\n`, proof lines (base64 hashes), a blank line, then the checkpoint note."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint: bytes

    def encode(self) -> bytes:
        lines = [f"old {self.old_size}", *(b64encode(h) for h in self.proof)]
        return ("".join(line + "\n" for line in lines) + "\n").encode() + self.checkpoint

    @classmethod
    def parse(cls, body: bytes) -> AddCheckpointRequest:
        """Parse a request body; WitnessRefusalError(400) says what is malformed."""
        if len(body) > MAX_REQUEST_BYTES:
            raise WitnessRefusalError(400, f"request: larger than {MAX_REQUEST_BYTES} bytes")
        head, sep, note = body.partition(b"\n\n")
        if not sep:
            raise WitnessRefusalError(400, "request: no blank line between the proof and the "
                                      "checkpoint")
        try:
            lines = head.decode("ascii").split("\n")
        except UnicodeDecodeError as exc:
            raise WitnessRefusalError(400, "request: the old size and proof lines must be ASCII") from exc
        first = lines[0]
        if not first.startswith("old ") or not _SIZE.fullmatch(first[4:]):
            raise WitnessRefusalError(400, f"request line 1: expected 'old <size>' (decimal, no "
                                      f"leading zeros), got {first[:40]!r}")
        proof_lines = lines[1:]
        if len(proof_lines) > MAX_PROOF_LINES:
            raise WitnessRefusalError(400, f"request: {len(proof_lines)} proof lines, at most "
                                      f"{MAX_PROOF_LINES} are allowed")
        proof: list[bytes] = []
        for number, line in enumerate(proof_lines, start=2):
            try:
                value = b64decode(line)
            except (binascii.Error, ValueError) as exc:
                raise WitnessRefusalError(400, f"request line {number}: proof hash is not valid "
                                          f"base64") from exc
            if len(value) != HASH_SIZE:
                raise WitnessRefusalError(400, f"request line {number}: proof hash has {len(value)} "
                                          f"bytes, expected {HASH_SIZE}")
            proof.append(value)
        return cls(int(first[4:]), tuple(proof), note)


# -- state -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldCheckpoint:
    """The last checkpoint cosigned for one origin: the note as the witness serves it."""

    note: str  # the body, the log's verified signature line(s) and this witness's cosignature
    checkpoint: Checkpoint
    cosigned_at: int

    @property
    def size(self) -> int:
        return self.checkpoint.size

    @property
    def root(self) -> bytes:
        return self.checkpoint.root


@dataclass
class WitnessState:
    held: dict[str, HeldCheckpoint] = field(default_factory=dict)
    alarms: list[Alarm] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION,
                "logs": {origin: {"checkpoint": h.note, "cosigned_at": h.cosigned_at}
                         for origin, h in sorted(self.held.items())},
                "alarms": [a.to_json() for a in self.alarms]}

    @classmethod
    def from_json(cls, obj: Any) -> WitnessState:
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
            raise WitnessStateError("witness state: unsupported or missing version")
        state = cls()
        logs = obj.get("logs")
        if not isinstance(logs, dict):
            raise WitnessStateError("witness state: 'logs' must be an object")
        for origin, record in logs.items():
            try:
                checkpoint = parse_checkpoint_body(parse_note(record["checkpoint"]).body)
                cosigned_at = int(record["cosigned_at"])
            except (NoteError, KeyError, TypeError, ValueError) as exc:
                raise WitnessStateError(f"witness state: log {origin!r}: {exc}") from exc
            if checkpoint.origin != origin:
                raise WitnessStateError(f"witness state: log {origin!r} holds a checkpoint of "
                                        f"{checkpoint.origin!r}")
            state.held[origin] = HeldCheckpoint(record["checkpoint"], checkpoint, cosigned_at)
        alarms = obj.get("alarms", [])
        if not isinstance(alarms, list):
            raise WitnessStateError("witness state: 'alarms' must be a list")
        state.alarms = [Alarm.from_json(a) for a in alarms]
        return state


class WitnessStore(Protocol):
    """Where a witness keeps its state. `locked()` spans a whole check-and-update."""

    def locked(self) -> AbstractContextManager[None]: ...

    def load(self) -> WitnessState: ...

    def save(self, state: WitnessState) -> None: ...


class MemoryWitnessStore:
    """State in memory (tests, or a caller that persists `WitnessState.to_json` itself)."""

    def __init__(self, state: WitnessState | None = None) -> None:
        self._json = json.dumps((state or WitnessState()).to_json())
        self._lock = threading.RLock()

    def locked(self) -> AbstractContextManager[None]:
        return self._locked()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def load(self) -> WitnessState:
        return WitnessState.from_json(json.loads(self._json))

    def save(self, state: WitnessState) -> None:
        self._json = json.dumps(state.to_json())


class FileWitnessStore:
    """State in a JSON file, replaced atomically; an flock on `<file>.lock` serializes writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.RLock()

    def locked(self) -> AbstractContextManager[None]:
        return self._locked()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock_path.open("a") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def load(self) -> WitnessState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return WitnessState()
        except OSError as exc:
            raise WitnessStateError(f"{self.path}: cannot read the witness state "
                                    f"({exc.strerror})") from exc
        try:
            return WitnessState.from_json(json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WitnessStateError(f"{self.path}: witness state is not valid JSON ({exc})") from exc
        except WitnessStateError as exc:
            raise WitnessStateError(f"{self.path}: {exc}") from exc

    def save(self, state: WitnessState) -> None:
        try:
            atomic_write(self.path, (json.dumps(state.to_json(), indent=1) + "\n").encode())
        except OSError as exc:
            raise WitnessStateError(f"{self.path}: cannot write the witness state "
                                    f"({exc.strerror})") from exc


# -- the witness -------------------------------------------------------------------------------

@dataclass(frozen=True)
class WitnessedLog:
    """A log this witness follows: its origin and the Ed25519 vkey that signs its checkpoints."""

    origin: str
    log_key: Vkey


@dataclass(frozen=True)
class Cosigned:
    """A successful add-checkpoint: the witness's cosignature on `checkpoint`."""

    checkpoint: Checkpoint
    signature: NoteSignature
    timestamp: int

    @property
    def lines(self) -> str:
        """The response body: the cosignature line(s), each ending with a newline."""
        return self.signature.line

    def response(self) -> WitnessResponse:
        return WitnessResponse(200, COSIGNATURE_CONTENT_TYPE, self.lines.encode())


def origin_hash(origin: str) -> str:
    """The monitoring path component of a log: lowercase hex SHA-256 of its origin."""
    return hashlib.sha256(origin.encode()).hexdigest()


class Witness:
    """Cosigns checkpoints of the logs it follows, never two inconsistent ones."""

    def __init__(self, signer: CosignatureV1Signer, logs: Iterable[WitnessedLog],
                 store: WitnessStore, *, clock: Callable[[], float] = time.time) -> None:
        self.signer = signer
        self._logs: dict[str, list[Ed25519Verifier]] = {}
        for log in logs:
            self._logs.setdefault(log.origin, []).append(Ed25519Verifier.from_vkey(log.log_key))
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.signer.name

    @property
    def vkey(self) -> Vkey:
        return self.signer.vkey

    # -- queries ---------------------------------------------------------------------------
    def held(self, origin: str) -> HeldCheckpoint | None:
        return self._store.load().held.get(origin)

    def alarms(self) -> list[Alarm]:
        return list(self._store.load().alarms)

    def status(self) -> dict[str, Any]:
        """What a node reports (`node status`, `/health`): held checkpoints and alarms."""
        state = self._store.load()
        return {"name": self.name, "vkey": str(self.vkey), "alarm": bool(state.alarms),
                "logs": {origin: {"size": h.size, "root": b64encode(h.root),
                                  "cosigned_at": h.cosigned_at}
                         for origin, h in sorted(state.held.items())},
                "alarms": [{"origin": a.origin, "reason": a.reason, "proven": a.proven,
                            "detected_at": a.detected_at} for a in state.alarms]}

    def clear_alarms(self) -> list[Alarm]:
        """Forget the recorded alarms (after an operator investigated); returns them."""
        with self._lock, self._store.locked():
            state = self._store.load()
            cleared, state.alarms = state.alarms, []
            self._store.save(state)
            return cleared

    # -- the protocol ----------------------------------------------------------------------
    def handle_add_checkpoint(self, body: bytes) -> WitnessResponse:
        """The HTTP `POST <prefix>/add-checkpoint` call: request body in, response out."""
        try:
            request = AddCheckpointRequest.parse(body)
            return self.add_checkpoint(request.old_size, request.proof,
                                       request.checkpoint).response()
        except WitnessRefusalError as refusal:
            return refusal.response()

    def monitoring_checkpoint(self, hashed_origin: str) -> WitnessResponse:
        """`GET <prefix>/<origin hash>/checkpoint`: the held checkpoint with its cosignature."""
        for origin, held in self._store.load().held.items():
            if origin_hash(origin) == hashed_origin:
                return WitnessResponse(200, COSIGNATURE_CONTENT_TYPE, held.note.encode())
        return WitnessResponse(404, "text/plain; charset=utf-8", b"no checkpoint for that log\n")

    def add_checkpoint(self, old_size: int, proof: Sequence[bytes],
                       note: str | bytes) -> Cosigned:
        """Cosign `note` if it extends the held checkpoint; WitnessRefusalError otherwise."""
        raw = note.encode() if isinstance(note, str) else note
        parsed, log_lines, checkpoint = self._verified(raw)
        if old_size < 0:
            raise WitnessRefusalError(400, f"old size: must be >= 0, got {old_size}")
        if len(proof) > MAX_PROOF_LINES:
            raise WitnessRefusalError(400, f"proof: {len(proof)} hashes, at most {MAX_PROOF_LINES}")
        if old_size > checkpoint.size:
            raise WitnessRefusalError(400, f"old size {old_size} is larger than the checkpoint's size "
                                      f"{checkpoint.size}")
        with self._lock, self._store.locked():
            state = self._store.load()
            held = state.held.get(checkpoint.origin)
            self._check(state, held, old_size=old_size, proof=proof, parsed=parsed,
                        checkpoint=checkpoint)
            now = int(self._clock())
            if held is not None and now < held.cosigned_at:
                raise WitnessRefusalError(503, f"witness clock: now ({now}) is earlier than its last "
                                          f"cosignature ({held.cosigned_at}); it will not sign a "
                                          f"time earlier than one it already signed")
            signature = self.signer.cosign(parsed.body, now)
            kept = Note(parsed.body, (*log_lines, signature)).text()
            state.held[checkpoint.origin] = HeldCheckpoint(kept, checkpoint, now)
            self._store.save(state)  # persisted before the cosignature is handed out
            return Cosigned(checkpoint, signature, now)

    def _verified(self, raw: bytes) -> tuple[Note, tuple[NoteSignature, ...], Checkpoint]:
        """The note verified with the log's key, and its checkpoint (400/403/404 otherwise)."""
        try:
            parsed = parse_note(raw)
        except NoteError as exc:
            raise WitnessRefusalError(400, f"checkpoint: {exc}") from exc
        origin = parsed.body.split("\n", 1)[0]
        verifiers = self._logs.get(origin)
        if verifiers is None:
            raise WitnessRefusalError(404, f"checkpoint origin: {origin[:200]!r} is not a log this "
                                      f"witness follows")
        try:
            opened = open_note(parsed, verifiers)
        except NoteError as exc:
            raise WitnessRefusalError(403, f"checkpoint signature: {exc}") from exc
        try:
            checkpoint = parse_checkpoint_body(parsed.body)
        except NoteError as exc:
            raise WitnessRefusalError(400, f"checkpoint: {exc}") from exc
        return parsed, tuple(sig for sig, _verifier in opened.verified), checkpoint

    def _check(self, state: WitnessState, held: HeldCheckpoint | None, *, old_size: int,
               proof: Sequence[bytes], parsed: Note, checkpoint: Checkpoint) -> None:
        known = 0 if held is None else held.size
        if old_size != known:
            older = (f"; the checkpoint (size {checkpoint.size}) is older than the one this "
                     f"witness holds" if checkpoint.size < known else "")
            raise WitnessRefusalError(409, f"old size {old_size} is not the size of the checkpoint "
                                      f"this witness holds ({known}){older}", known_size=known)
        if checkpoint.size == 0 and checkpoint.root != EMPTY_ROOT:
            raise WitnessRefusalError(422, "checkpoint: size 0 but the root is not SHA-256 of the "
                                      "empty string")
        if old_size == 0:
            if proof:
                raise WitnessRefusalError(422, "proof: must be empty when the old size is 0")
            return
        assert held is not None  # old_size == known > 0
        if old_size == checkpoint.size:
            if checkpoint.root != held.root:
                self._alarm(state, held, parsed, old_size=old_size, proof=proof, proven=True,
                            reason=f"fork: the log signed two checkpoints of size {old_size} with "
                            f"different roots ({b64encode(held.root)} cosigned, "
                            f"{b64encode(checkpoint.root)} offered)")
            if proof:
                raise WitnessRefusalError(422, "proof: must be empty when the sizes are equal")
            return
        try:
            verify_consistency(old_size, checkpoint.size, proof, held.root, checkpoint.root)
        except ProofError as exc:
            self._alarm(state, held, parsed, old_size=old_size, proof=proof,
                        reason=f"inconsistent: the log's checkpoint of size {checkpoint.size} is not "
                        f"proven to extend the cosigned checkpoint of size {old_size} ({exc})")

    def _alarm(self, state: WitnessState, held: HeldCheckpoint, offered: Note, *, old_size: int,
               proof: Sequence[bytes], reason: str, proven: bool = False) -> None:
        alarm = Alarm(held.checkpoint.origin, reason, held.note, offered.text(), old_size,
                      tuple(b64encode(h) for h in proof), int(self._clock()), proven)
        known = {(a.held, a.offered) for a in state.alarms}
        if (alarm.held, alarm.offered) not in known and len(state.alarms) < MAX_ALARMS:
            state.alarms.append(alarm)  # the first pieces of evidence are kept, not the latest
            self._store.save(state)
        raise WitnessRefusalError(422, reason, alarm=alarm)
