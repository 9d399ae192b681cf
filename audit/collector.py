"""The log's side of witnessing: when to checkpoint, and gathering cosignatures into the note.

Why: the coordinator (phase 2) signs a checkpoint every N entries or T seconds, asks each
registered witness for a cosignature (c2sp.org/tlog-witness add-checkpoint, pushed, or
pulled by a node), and serves the note with every valid cosignature it got. This module is that
logic without any transport, so the coordinator only moves bytes:

    schedule = CheckpointSchedule(every_entries=1000, every_seconds=5.0)
    if schedule.due(log_size, now):
        note = log.checkpoint()                              # log-signed note
        cosigning = CheckpointCosigning(note, trust)          # trust: witnesses and quorum
        for each witness: _, body = request_cosignature(http, witness_url, note, old_size,
                                                        proof_for)    (tlog-witness over HTTP)
                          cosigning.add_response(body)          (CosignatureError: why)
        serve(cosigning.note())                               # log signature + cosignatures
        schedule.mark(log_size, now)

A witness response is refused (CosignatureError, nothing added) if it is malformed, from a key
that is not a listed witness, does not verify over this checkpoint, or is dated more than
`max_future_s` ahead of the collector's clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from audit.checkpoint import Checkpoint, parse_checkpoint, verify_checkpoint
from audit.cosignature import (
    DEFAULT_MAX_FUTURE_S,
    CosignatureError,
    CosignatureV1Verifier,
)
from audit.note import Note, NoteError, NoteSignature, add_signatures, parse_note, parse_signature_lines
from audit.trust import Trust
from audit.witness import ADD_CHECKPOINT_PATH, AddCheckpointRequest


def add_checkpoint_request(old_size: int, proof: Sequence[bytes], note: str | bytes) -> bytes:
    """The body of a tlog-witness add-checkpoint request."""
    raw = note.encode() if isinstance(note, str) else note
    return AddCheckpointRequest(old_size, tuple(proof), raw).encode()


def request_cosignature(http: httpx.Client, prefix: str, note: str | bytes, old_size: int,
                        proof_for: Callable[[int], Sequence[bytes]]) -> tuple[int, bytes]:
    """POST `<prefix>/add-checkpoint` for `note`, assuming the witness holds `old_size`.

    On 409 the witness says which size it holds: the request is repeated once with a proof
    from that size (`proof_for(size)`). Returns (the size the witness now holds, its response
    body: the cosignature lines, for `CheckpointCosigning.add_response`). CosignatureError with
    the witness's status and reason otherwise.
    """
    raw = note.encode() if isinstance(note, str) else note
    url = prefix.rstrip("/") + ADD_CHECKPOINT_PATH
    size = old_size
    for _attempt in range(2):
        body = add_checkpoint_request(size, proof_for(size) if size else [], raw)
        try:
            response = http.post(url, content=body)
        except httpx.HTTPError as exc:
            raise CosignatureError(f"POST {url}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code == 200:
            return parse_checkpoint(raw).size, response.content
        if response.status_code == 409 and _attempt == 0:
            text = response.text.strip()
            if text.isdigit():
                size = int(text)
                continue
        raise CosignatureError(f"POST {url}: HTTP {response.status_code}: "
                               f"{response.text.strip()[:300]}")
    raise CosignatureError(f"POST {url}: the witness's size kept changing")


@dataclass
class CheckpointSchedule:
    """A checkpoint is due after `every_entries` new entries or `every_seconds` with new ones.

    0 disables a criterion. Nothing is due while the log has not grown since the last mark
    (an unchanged log needs no new checkpoint; witnesses may be re-asked separately).
    """

    every_entries: int = 0
    every_seconds: float = 5.0
    last_size: int = -1
    last_time: float = field(default=float("-inf"))

    def __post_init__(self) -> None:
        if self.every_entries < 0 or self.every_seconds < 0:
            raise ValueError("every_entries and every_seconds: must be >= 0")
        if self.every_entries == 0 and self.every_seconds == 0:
            raise ValueError("every_entries and every_seconds: at least one must be > 0")

    def due(self, size: int, now: float) -> bool:
        if size == self.last_size:
            return False
        if self.every_entries and size - max(self.last_size, 0) >= self.every_entries:
            return True
        return bool(self.every_seconds) and now - self.last_time >= self.every_seconds

    def mark(self, size: int, now: float) -> None:
        self.last_size = size
        self.last_time = now


class CheckpointCosigning:
    """One log-signed checkpoint and the cosignatures gathered on it so far."""

    def __init__(self, note: str | bytes, trust: Trust, *,
                 clock: Callable[[], float] = time.time,
                 max_future_s: int = DEFAULT_MAX_FUTURE_S) -> None:
        self.trust = trust
        self.checkpoint: Checkpoint = verify_checkpoint(note, trust.log_public_key,
                                                        trust.log_key_name, trust.origin)
        parsed = parse_note(note)
        log_id = trust.log_vkey.key_id
        self._note = Note(parsed.body, tuple(s for s in parsed.signatures
                                             if (s.name, s.key_hash) == (trust.log_key_name,
                                                                         log_id)))
        self._verifiers = {(w.name, w.key_id): CosignatureV1Verifier(w) for w in trust.witnesses}
        self._clock = clock
        self._max_future_s = max_future_s
        self.signed: dict[str, int] = {}  # witness name -> timestamp

    def knows(self, witness: str) -> bool:
        """Whether `witness` is one of this checkpoint's trust policy's witnesses."""
        return any(name == witness for name, _ in self._verifiers)

    def adopt(self, trust: Trust) -> bool:
        """Take a newer trust policy of the same log (witnesses registered since this checkpoint
        was offered), keeping the cosignatures gathered; whether it added a witness."""
        if (trust.log_public_key, trust.origin) != (self.trust.log_public_key, self.trust.origin):
            return False
        added = {(w.name, w.key_id): w for w in trust.witnesses}.keys() - self._verifiers.keys()
        if not added:
            return False
        self.trust = trust
        self._verifiers = {(w.name, w.key_id): CosignatureV1Verifier(w) for w in trust.witnesses}
        return True

    @property
    def required(self) -> int:
        return self.trust.witness_quorum()

    @property
    def quorum_met(self) -> bool:
        return len(self.signed) >= self.required

    @property
    def missing(self) -> list[str]:
        return [w.name for w in self.trust.witnesses if w.name not in self.signed]

    def add_response(self, body: str | bytes) -> list[str]:
        """Add a witness's add-checkpoint response (signature lines); the names accepted.

        All lines are checked before any is added: one bad line refuses the whole response.
        """
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else body
            signatures = parse_signature_lines(text)
        except (UnicodeDecodeError, NoteError) as exc:
            raise CosignatureError(f"witness response: malformed ({exc})") from exc
        accepted: list[tuple[NoteSignature, str, int]] = []
        body_bytes = self._note.body.encode()
        limit = self._clock() + self._max_future_s
        for sig in signatures:
            verifier = self._verifiers.get((sig.name, sig.key_hash))
            if verifier is None:
                raise CosignatureError(f"cosignature by {sig.name}+{sig.key_hash.hex()}: not a "
                                       f"witness of this log's trust policy")
            timestamp = verifier.timestamp(body_bytes, sig.signature)
            if timestamp > limit:
                raise CosignatureError(f"cosignature by {sig.name}: timestamp {timestamp} is in "
                                       f"the future (more than {self._max_future_s} s ahead)")
            accepted.append((sig, sig.name, timestamp))
        for sig, name, timestamp in accepted:
            if name in self.signed:  # a newer cosignature of the same witness replaces it
                self._note = Note(self._note.body, tuple(
                    s for s in self._note.signatures
                    if (s.name, s.key_hash) != (sig.name, sig.key_hash)))
            self._note = add_signatures(self._note, [sig])
            self.signed[name] = timestamp
        return [name for _sig, name, _ts in accepted]

    def note(self) -> str:
        """The checkpoint note: the log's signature, then every accepted cosignature."""
        return self._note.text()
