"""Offline verification of an exported log: the auditor's whole check, in one pass.

What is checked, in log order, stopping at the first bad entry:
1. each line is one JSON object in RFC 8785 canonical form followed by "\\n" (the line bytes
   are then the Merkle leaf input, used as they are: no re-encoding);
2. it is a well-formed envelope (audit.entry rules) with a 64-byte base64 signature;
3. it is not a byte-for-byte replay of an earlier entry (a signed entry can appear once;
   looked for once all leaves are in, which decides the same: `LogVerifier.finish`);
4. its signer is registered and not revoked or rotated away (audit.keyring), and key entries
   are allowed; its Ed25519 signature verifies against that key;
5. the token ledger accepts it (audit.ledger: conservation, escrows, payouts);
then the rebuilt RFC 6962 tree must match the checkpoint (signed by the pinned log key, same
origin, same size, same root), and with a state file the saved checkpoint must be consistent with
the new one (the root of the log's first saved-size entries must be the saved root: with the
whole log at hand, that is what a consistency proof computed from it establishes). Only then is
the new checkpoint saved, atomically.

Memory does not grow with the log (audit/compact.py): the tree keeps its right frontier and the
roots at the checkpoints' sizes, taken as the entries stream by; the leaf hashes go to a
temporary file, read back to find replays, name a fork or save the state; the ledger's claim
pools spill to a temporary SQLite file (audit/claim_pools.py).

Why it is fast: lines are checked a batch at a time (LogVerifier.run): each line is parsed once
in C (msgspec, straight into an envelope record, no `Entry` per line) and checked to be canonical
with the C encoder (see CanonicalParser and `_plain_float` for when that equals RFC 8785; other
lines go one by one through `feed` and the rfc8785 package), times and signatures are checked by
one regular expression per batch, the replay index is looked up per batch (numpy), the line bytes
are the Merkle leaf input as they are, the signed bytes are cut out of the line instead of being
re-encoded, and Ed25519 checks run in batches in worker processes when asked (`workers`; the
`audit` command uses one per spare core, at most two). The result is deterministic: the
reported problem is always the one at the smallest entry index, whatever the timing.

The state file (`--state`) is JSON: {"version": 1, "checkpoint": <signed note>, "leaf_hashes":
<base64 of the 32-byte leaf hashes it covers>}. The consistency proof needs only the checkpoint;
the leaf hashes let a later run name the exact entry where a forked history departs from it.
"""

from __future__ import annotations

import binascii
import gc
import hashlib
import json
import multiprocessing
import multiprocessing.context
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import msgspec
import rfc8785
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from audit.compact import LeafTree, first_repeat
from audit.cosignature import CosignatureReport, check_cosignatures
from audit.entry import (
    ENVELOPE_FIELDS,
    ENVELOPE_VERSION,
    Entry,
    EntryFields,
    MalformedEntryError,
    parse_time,
    signed_part,
)
from audit.export import (
    ExportError,
    ExportPaths,
    Trust,
    atomic_write_pieces,
    iter_lines,
    read_checkpoint_text,
    read_trust,
)
from audit.keyring import Keyring, KeyringError
from audit.ledger import Ledger, LedgerError
from audit.merkle import HASH_SIZE
from audit.signing import b64decode, b64encode, canonical
from audit.untrusted import MAX_INTEGER_DIGITS, DuplicateKeyError, UntrustedJSONError, load_json, printable

STATE_VERSION = 1
SIGNATURE_BYTES = 64
_SIGNATURE_CHARS = 88  # base64 of 64 bytes: 84 characters for 63 bytes, then 2 and "=="
_PADDING_CHAR = 85  # the last data character, before "=="
_MAX_SAFE_DIGITS = 15  # every integer of at most 15 digits is inside +-(2**53 - 1)
_MAX_SAFE_INTEGER = 2**53 - 1
#: The largest line a log may hold: the store refuses larger entries (audit.store.MAX_ENTRY_BYTES).
MAX_LINE_BYTES = 1 << 20
#: Entries between two collections of the young generations while the collector is paused.
GC_EVERY = 1 << 16
#: Past this many reward claim pools, the verifier's ledger keeps them in a temporary SQLite file
#: (audit.claim_pools), so that its memory does not grow with the export's length.
POOLS_IN_MEMORY = 20_000
#: Past this many finished studies, the verifier's ledger keeps them in a temporary SQLite file
#: (audit.finished_studies): one record per study ever escrowed would grow with the log
STUDIES_IN_MEMORY = 20_000
#: The report lists each claim pool up to this many; beyond, their totals (`claim_pools_total`)
#: stand for the list, which would grow with the export (`Ledger.claim_pools_json` lists them).
MAX_LISTED_POOLS = 10_000
#: What a check may raise on content it was not written for (hostile input): the entry is then
#: refused with the exception's text rather than crashing the verifier.
_CONTENT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError)
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode
_sha256 = hashlib.sha256
_PLAIN_ENCODE = msgspec.json.Encoder(order="sorted").encode
# A run of 16 digits or more (it may be an integer outside RFC 8785's range) makes a line not
# plain: found by mapping every digit to "0" and everything else to " " (C speed; a regex
# search costs more than the JSON decode).
_DIGIT_MAP = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_DIGIT_RUN = b"0" * 16
_NOT_PLAIN = object()
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
#: Lines `LogVerifier.run` takes at a time.
RUN_BATCH = 128
#: Entry times in the fixed-width form (audit.entry.format_time), one after another, with the
#: hour, minute and second in range (the date is checked by date.fromisoformat, once per day):
#: each such time is one `parse_time` accepts.
_TIMES = re.compile(r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                    r"\.[0-9]{6}Z)*")
#: Canonical base64 of 64 bytes, one after another: 85 characters, the last data character
#: with its 4 padding bits zero (A, Q, g or w), then "==" (decode_signature's rules).
_SIGNATURES = re.compile(r"(?:[A-Za-z0-9+/]{85}[AQgw]==)*")


class _Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A log line's envelope as the fast path decodes it (an `EntryFields`, not an `Entry`).

    msgspec checks in C what `envelope_from_json` checks in Python: exactly these six members,
    the four strings non-empty, an object payload, `v` the integer 1 (not 1.0, not true). The
    fields are declared in RFC 8785 order (ASCII names, sorted), so the struct encodes back to
    the canonical line. A line this refuses goes the general way, which names the reason.
    """

    key_id: _NonEmpty
    kind: _NonEmpty
    payload: dict[str, Any]
    signature: _NonEmpty
    time: _NonEmpty
    v: Literal[1]


#: What `LogVerifier._run_batch` puts where a line does not decode (that line goes to `feed`).
_PLACEHOLDER = _Envelope(key_id="-", kind="-", payload={}, signature="-",
                         time="2000-01-01T00:00:00.000000Z", v=1)


@dataclass(frozen=True)
class Problem:
    """What is wrong. `index` is the first bad entry, or None for a problem not tied to one."""

    index: int | None
    reason: str

    def __str__(self) -> str:
        return self.reason if self.index is None else f"entry {self.index}: {self.reason}"


@dataclass
class VerifyReport:
    """The outcome of one verification; `problem` is None exactly when the log is valid."""

    entries: int = 0
    origin: str = ""
    root: bytes = b""
    checkpoint: Checkpoint | None = None
    problem: Problem | None = None
    kinds: Counter[str] = field(default_factory=Counter)
    ledger: dict[str, Any] | None = None
    ledger_checked: bool = False
    consistent_with: int | None = None  # size of the saved checkpoint proven consistent
    state_saved: bool = False
    witness_quorum: int = 0  # cosignatures required (trust policy or --witness-quorum)
    cosignatures: CosignatureReport | None = None  # which pinned witnesses cosigned

    @property
    def ok(self) -> bool:
        return self.problem is None


class NotCanonicalError(ValueError):
    """A log line is not one RFC 8785 canonical JSON value."""


class CanonicalParser:
    """Parses log lines and checks they are RFC 8785 canonical, mostly in C.

    Fast path: the C encoder (`sort_keys`, compact, `ensure_ascii=False`) produces exactly the
    RFC 8785 encoding of the parsed value when its output is ASCII (then UTF-16 and code-point
    key order agree, and the string escapes are the same) and every number token is "safe": an
    integer of at most 15 digits (inside +-(2**53 - 1), which RFC 8785 requires) or a float
    written without exponent, not as "<digits>.0", and exactly as Python's repr prints it (then
    ECMAScript number formatting prints the same). The JSON parser's number hooks flag the rest
    (a Python call per number, far cheaper than scanning the text with a regex), and every
    flagged line goes through the rfc8785 package. One parser per thread: it keeps a flag.
    """

    def __init__(self) -> None:
        self._unsafe = False
        self._plain_unsafe = False
        self._plain_raw = False
        self._plain_decode = msgspec.json.Decoder(float_hook=self._plain_float).decode
        self._envelope_decode = msgspec.json.Decoder(_Envelope, float_hook=self._plain_float).decode
        self._decode = json.JSONDecoder(parse_float=self._float, parse_int=self._int,
                                        parse_constant=self._constant).decode

    def _float(self, token: str) -> float:
        value = float(token)
        if "e" in token or "E" in token or token.endswith(".0") or repr(value) != token:
            self._unsafe = True
        return value

    def _int(self, token: str) -> int:
        if len(token) > _MAX_SAFE_DIGITS:
            self._unsafe = True
            digits = len(token.lstrip("-"))
            if digits > MAX_INTEGER_DIGITS:  # int() would refuse over 4,300 digits, RFC 8785 over 16
                raise NotCanonicalError(f"an integer of {digits} digits is out of the range RFC 8785 "
                                        f"allows (|n| <= 2**53 - 1)")
        return int(token)

    @staticmethod
    def _constant(token: str) -> float:
        raise NotCanonicalError(f"not valid JSON ({token} is not a JSON value)")

    def parse(self, line: bytes) -> Any:
        """The value of one line (without its newline); NotCanonicalError says what is wrong."""
        value = self._parse_plain(line)
        if value is not _NOT_PLAIN:
            return value
        self._unsafe = False
        try:
            return self._parse(line)
        except RecursionError as exc:  # the C parser and encoders stop at the recursion limit
            raise NotCanonicalError("nested too deeply for the JSON parser") from exc

    def _plain_float(self, token: str) -> float | msgspec.Raw:
        """A float of the plain path. Safe as `_float` says: the float itself. Otherwise, if the
        token is exactly how RFC 8785 prints its value (ECMAScript's number format, which the
        rfc8785 package implements: "0.00001", "1e-7", "1e+21", where Python prints 1e-05,
        1e-07, 1e+21), a msgspec.Raw of the token, which the encoder writes back verbatim, so
        the comparison with the line still checks everything around it; the caller turns it
        back into the float (`_restore_floats`). Anything else makes the line not plain."""
        value = float(token)
        if "e" in token or "E" in token or token.endswith(".0") or repr(value) != token:
            try:
                canonical_token = rfc8785.dumps(value)
            except (rfc8785.CanonicalizationError, ValueError):  # inf (an overflowing token)
                canonical_token = b""
            if canonical_token != token.encode():
                self._plain_unsafe = True
                return value
            self._plain_raw = True
            return msgspec.Raw(canonical_token)
        return value

    def _parse_plain(self, line: bytes) -> Any:
        """The common line, checked by msgspec's C decoder and sorted-key encoder (about half
        the cost of the json module's): ASCII, no backslash (so no string escape, where
        encoders differ), every float canonical (`_plain_float`), every integer inside
        +-(2**53 - 1) (RFC 8785's range; looked for only in a line with a run of 16 digits).
        Such a line is canonical exactly when msgspec encodes its value back to the same
        bytes: with no escapes and ASCII keys, RFC 8785's encoding is that one. Anything else,
        including every line that is not canonical, returns _NOT_PLAIN and takes the general
        path, which names the reason."""
        if not line.isascii() or b"\\" in line:
            return _NOT_PLAIN
        self._plain_unsafe = self._plain_raw = False
        try:
            value = self._plain_decode(line)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return _NOT_PLAIN
        return self._plain_checked(line, value, value)

    def _plain_checked(self, line: bytes, value: Any, content: Any) -> Any:
        """`value` (decoded from `line` on the plain path; `content` the part of it that may hold
        numbers) if it encodes back to `line` with only safe numbers, else _NOT_PLAIN."""
        if self._plain_unsafe or _PLAIN_ENCODE(value) != line:
            return _NOT_PLAIN
        try:
            if _LONG_DIGIT_RUN in line.translate(_DIGIT_MAP) and _has_unsafe_integer(content):
                return _NOT_PLAIN
            if self._plain_raw:
                restored = _restore_floats(content)
                if content is value:
                    return restored
        except RecursionError:
            return _NOT_PLAIN
        return value

    def envelope(self, line: bytes) -> EntryFields:
        """The envelope of one line (without its newline): canonical and well-formed, else
        NotCanonicalError or MalformedEntryError saying why (the rules of `parse` and
        `envelope_from_json`).

        Fast path: msgspec decodes a plain line (as `_parse_plain`) straight into an `_Envelope`,
        checking the envelope's shape in C; no `Entry` is built. Other lines, and every line
        the fast path refuses, go through `parse` and `envelope_from_json`."""
        envelope = self._envelope_plain(line)
        if envelope is None:
            return envelope_from_json(self.parse(line))
        _check_time(envelope.time)
        return envelope

    def _envelope_plain(self, line: bytes) -> _Envelope | None:
        if not line.isascii() or b"\\" in line:
            return None
        self._plain_unsafe = self._plain_raw = False
        try:
            envelope = self._envelope_decode(line)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        if self._plain_checked(line, envelope, envelope.payload) is _NOT_PLAIN:
            return None
        return envelope

    def _parse(self, line: bytes) -> Any:
        try:
            obj = self._decode(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise NotCanonicalError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise NotCanonicalError(f"not valid JSON ({exc})") from exc
        if not self._unsafe:
            fast = _ENCODE(obj)
            if fast.isascii():
                if fast.encode("ascii") == line:
                    return obj
                raise NotCanonicalError(_not_canonical(line))
        try:
            canon = rfc8785.dumps(obj)
        except rfc8785.CanonicalizationError as exc:
            raise NotCanonicalError(f"cannot be canonicalized ({exc})") from exc
        except UnicodeEncodeError as exc:
            raise NotCanonicalError("cannot be canonicalized (a string holds a lone surrogate, "
                                    "which is not Unicode text)") from exc
        if canon != line:
            raise NotCanonicalError(_not_canonical(line))
        return obj


def _has_unsafe_integer(value: Any) -> bool:
    """Whether a decoded value holds an integer outside +-(2**53 - 1), which RFC 8785 refuses."""
    if type(value) is int:
        return not -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER
    if type(value) is dict:
        return any(_has_unsafe_integer(item) for item in value.values())
    if type(value) is list:
        return any(_has_unsafe_integer(item) for item in value)
    return False


def _restore_floats(value: Any) -> Any:
    """`value` with every msgspec.Raw number of the plain path turned back into its float
    (containers changed in place)."""
    if type(value) is msgspec.Raw:
        return float(bytes(value))
    if type(value) is dict:
        for key, item in value.items():
            if type(item) in (msgspec.Raw, dict, list):
                value[key] = _restore_floats(item)
    elif type(value) is list:
        for position, item in enumerate(value):
            if type(item) in (msgspec.Raw, dict, list):
                value[position] = _restore_floats(item)
    return value


def _not_canonical(line: bytes) -> str:
    """Why a line that parsed is not canonical: named when it repeats a key (which JSON parsers
    resolve differently), else the general reason. Only runs for a refused line."""
    try:
        load_json(line)
    except DuplicateKeyError as exc:
        return f"not in RFC 8785 canonical form ({exc})"
    except UntrustedJSONError:
        pass
    return "not in RFC 8785 canonical form"


def parse_canonical_line(line: bytes) -> Any:
    """Parse one line (without its newline), requiring RFC 8785 canonical form (see CanonicalParser)."""
    return CanonicalParser().parse(line)


def _check_time(text: str) -> None:
    parse_time(text)  # raises MalformedEntryError with the reason


def envelope_from_json(obj: Any) -> Entry:
    """Entry.from_json's rules (plus `v` must be the integer 1), with a faster time check."""
    if not isinstance(obj, dict):
        raise MalformedEntryError("envelope: not a JSON object")
    if obj.keys() != ENVELOPE_FIELDS:
        missing = ENVELOPE_FIELDS - obj.keys()
        extra = obj.keys() - ENVELOPE_FIELDS
        if missing:
            raise MalformedEntryError(f"envelope: missing field(s) {sorted(missing)}")
        raise MalformedEntryError(f"envelope: unknown field(s) {sorted(extra)}")
    if type(obj["v"]) is not int or obj["v"] != ENVELOPE_VERSION:
        raise MalformedEntryError(f"v: unsupported envelope version {obj['v']!r}")
    for name in ("kind", "key_id", "time", "signature"):
        if not isinstance(obj[name], str) or not obj[name]:
            raise MalformedEntryError(f"{name}: must be a non-empty string")
    if not isinstance(obj["payload"], dict):
        raise MalformedEntryError("payload: must be a JSON object")
    _check_time(obj["time"])
    return Entry(kind=obj["kind"], key_id=obj["key_id"], time=obj["time"], payload=obj["payload"],
                 signature=obj["signature"])


def decode_signature(text: str) -> bytes:
    """The 64 signature bytes of an envelope's `signature`, which must be canonical base64.

    The signature field is the one part of a line the signature does not cover: base64 with
    non-zero padding bits (which `base64.b64decode(validate=True)` accepts) would give a copy of
    an entry that still verifies but hashes to a different leaf. The store should refuse what
    this refuses. Raises MalformedEntryError.
    """
    try:  # strict mode: only the alphabet and correct padding (what validate=True checks), in C
        signature = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise MalformedEntryError("signature: not valid base64") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedEntryError(f"signature: must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    # 64 bytes are 88 characters ending in "==" (strict mode refuses other padding); the last
    # data character holds 4 padding bits, all zero exactly for A, Q, g and w (base64 values
    # 0, 16, 32, 48): the same test as encoding the bytes again and comparing, without doing so
    if len(text) != _SIGNATURE_CHARS or text[_PADDING_CHAR] not in "AQgw":
        raise MalformedEntryError("signature: not canonical base64 (non-zero padding bits)")
    return signature


def signing_input_from_line(line: bytes, entry: EntryFields) -> bytes:
    """The signed bytes (canonical envelope without "signature"), cut out of the canonical line.

    In RFC 8785 order the top-level members are key_id, kind, payload, signature, time, v, so a
    canonical line ends with `,"signature":"S","time":"T","v":1}`; removing the signature member
    gives exactly the canonical encoding of the rest. The signature is base64 (already decoded by
    the caller) and the time is validated, so neither needs escaping and the suffix is exact.
    """
    signature = entry.signature.encode()
    tail = b',"signature":"' + signature + b'","time":"' + entry.time.encode() + b'","v":1}'
    if line.endswith(tail):  # what follows the signature: `,"time":"T","v":1}`
        return line[:len(line) - len(tail)] + tail[len(signature) + 15:]
    return canonical(signed_part(entry))


_Check = tuple[int, bytes, bytes]  # (entry index, public key, signature + signed bytes)


def _check_batch(batch: list[_Check], keys: dict[bytes, VerifyKey]) -> int | None:
    """The first index in `batch` whose Ed25519 signature does not verify, or None.

    Each public key is validated once by VerifyKey (cached in `keys`: 32 bytes, or ValueError);
    each signature is then checked by PyNaCl's public binding of libsodium's crypto_sign_open,
    the call `VerifyKey.verify` makes after checking the signature is 64 bytes (decode_signature
    did) and joining signature and message (the caller joined them: `signed` is the signature
    followed by the signed bytes), without that wrapper's Python overhead.
    """
    sign_open = crypto_sign_open
    for index, public_key, signed in batch:
        if public_key not in keys:
            keys[public_key] = VerifyKey(public_key)
        try:
            sign_open(signed, public_key)
        except BadSignatureError:
            return index
    return None


_WORKER_KEYS: dict[bytes, VerifyKey] = {}  # per worker process: VerifyKey objects by public key


def _check_batch_in_worker(batch: list[_Check]) -> int | None:
    return _check_batch(batch, _WORKER_KEYS)


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver with this module preloaded: workers start fast and inherit no threads or locks
    of the caller (plain fork of a threaded process can deadlock)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["audit.verify"])
        return context
    return multiprocessing.get_context("spawn")


class _SignatureChecks:
    """Ed25519 checks in fixed-size batches, in worker processes; the smallest failing index wins.

    Why processes, not threads: libsodium releases the GIL, but a thread that must take the GIL
    back after every signature starves behind the main thread's parsing (the GIL convoy effect),
    so threads gained nothing in practice. Batches go to `processes` workers; when as many
    batches as the workers can hold are in flight, the main thread checks the next batch itself
    rather than wait. With processes == 0 everything runs in the calling thread. The result does
    not depend on timing: it is the minimum over all failing indexes of all batches.
    """

    def __init__(self, processes: int, batch_size: int = 512) -> None:
        if processes < 0 or batch_size < 1:
            raise ValueError("workers: must be >= 0; batch_size: must be >= 1")
        self._processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._limit = 2 * processes
        self.batch_size = batch_size
        #: checks not yet sent: `add`, or append and `flush` once batch_size are pending
        self.pending: list[_Check] = []
        self._pending: deque[Future[int | None]] = deque()
        self._keys: dict[bytes, VerifyKey] = {}
        self.failed: int | None = None

    def add(self, index: int, public_key: bytes, signed: bytes) -> None:
        """Check later that `signed` (the 64 signature bytes, then the signed bytes) verifies."""
        self.pending.append((index, public_key, signed))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Send (or check here) the pending checks; `failed` may be set on return."""
        batch = self.pending[:]
        self.pending.clear()  # the same list object: a caller may hold it
        if not batch:
            return
        while self._pending and self._pending[0].done():
            self._record(self._pending.popleft().result())
        if (self._processes == 0 or len(self._pending) >= self._limit
                or (final and self._pool is None)):  # a short log: not worth starting workers
            self._record(_check_batch(batch, self._keys))
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self._processes, mp_context=_worker_context())
        self._pending.append(self._pool.submit(_check_batch_in_worker, batch))

    def _record(self, failed: int | None) -> None:
        if failed is not None and (self.failed is None or failed < self.failed):
            self.failed = failed

    def finish(self) -> int | None:
        """Wait for every batch; the smallest index whose signature failed, or None."""
        try:
            self.flush(final=True)
            while self._pending:
                self._record(self._pending.popleft().result())
        finally:
            self.close()
        return self.failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


@dataclass
class SavedState:
    """The auditor's record of the last checkpoint it accepted (see the module docstring)."""

    checkpoint_text: str
    checkpoint: Checkpoint
    leaf_hashes: bytes | None


def load_state(path: Path, trust: Trust) -> SavedState | None:
    """The saved state, None if the file does not exist yet; ExportError if it is unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExportError(f"{path}: cannot read state file ({exc.strerror})") from exc
    try:
        obj = load_json(raw)
    except UntrustedJSONError as exc:
        raise ExportError(f"{path}: state file is malformed ({exc})") from exc
    try:
        if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
            raise ExportError(f"{path}: state file: unsupported or missing version")
        text = obj["checkpoint"]
        leaves = obj.get("leaf_hashes")
        if not isinstance(text, str) or not isinstance(leaves, str | None):
            raise ExportError(f"{path}: state file: checkpoint and leaf_hashes must be strings")
        leaf_hashes = None if leaves is None else b64decode(leaves)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(f"{path}: state file is malformed ({exc})") from exc
    try:
        checkpoint = verify_checkpoint(text, trust.log_public_key, trust.log_key_name, trust.origin)
    except CheckpointError as exc:
        raise ExportError(f"{path}: saved checkpoint does not verify with the pinned log key "
                          f"({exc})") from exc
    if leaf_hashes is not None and len(leaf_hashes) != HASH_SIZE * checkpoint.size:
        leaf_hashes = None  # unusable for naming a fork; the proof itself needs only the root
    return SavedState(text, checkpoint, leaf_hashes)


def save_state(path: Path, checkpoint_text: str, tree: LeafTree, size: int) -> None:
    """Save the checkpoint (and the leaf hashes it covers, to name a later fork) atomically.

    The leaf hashes are written as they are read back from the tree, in base64 pieces of whole
    3-byte groups, so that saving does not hold them all in memory."""
    head = json.dumps({"version": STATE_VERSION, "checkpoint": checkpoint_text,
                       "leaf_hashes": ""}, indent=1).encode()
    cut = head.rindex(b'""') + 1  # inside the empty string: the base64 goes there

    def pieces() -> Iterable[bytes]:
        yield head[:cut]
        carry = b""
        for chunk in tree.iter_leaf_bytes(0, size):
            data = carry + chunk
            whole = len(data) - len(data) % 3
            yield binascii.b2a_base64(data[:whole], newline=False)
            carry = data[whole:]
        yield binascii.b2a_base64(carry, newline=False) + head[cut:] + b"\n"

    atomic_write_pieces(path, pieces())


def _first_divergence(saved: SavedState, tree: LeafTree, upto: int) -> int | None:
    """The first index < upto where the saved leaves differ from ours (None: none or unknown).

    The saved leaf hashes are used only if they reproduce the saved (signed) root.
    """
    leaves = saved.leaf_hashes
    if leaves is None:
        return None
    if LeafTree.from_leaf_bytes(leaves).root() != saved.checkpoint.root:
        return None
    limit = min(len(leaves) // HASH_SIZE, upto, tree.size)
    start = 0
    for ours in tree.iter_leaf_bytes(0, limit):  # a chunk at a time: the leaves are on disk
        theirs = leaves[start * HASH_SIZE:start * HASH_SIZE + len(ours)]
        if theirs != ours:
            return start + next(i for i in range(len(ours) // HASH_SIZE)
                                if theirs[i * HASH_SIZE:(i + 1) * HASH_SIZE]
                                != ours[i * HASH_SIZE:(i + 1) * HASH_SIZE])
        start += len(ours) // HASH_SIZE
    return None


def default_workers() -> int:
    """Signature worker processes the CLI uses: one per spare core, at most two (0 on one core).

    Library calls default to none (`workers=0`): worker processes start through multiprocessing's
    forkserver, which re-imports the caller's main module, so a program asking for workers must
    guard its entry point with `if __name__ == "__main__":` (the `audit` command does).
    """
    return max(0, min(2, (os.cpu_count() or 1) - 1))


class LogVerifier:
    """Replays entries one by one; `feed` them in order, then `finish`.

    Kept as a class so the store's crash tests and the CLI share exactly one implementation.
    """

    def __init__(self, trust: Trust, *, workers: int | None = None, with_ledger: bool = True,
                 batch_size: int = 512) -> None:
        self.trust = trust
        self.keyring = Keyring(trust.operator_public_key)
        self.ledger = (Ledger(root_key_id=self.keyring.root_key_id, spill_pools_after=POOLS_IN_MEMORY,
                              spill_studies_after=STUDIES_IN_MEMORY)
                       if with_ledger else None)
        self.tree = LeafTree()
        self.kinds: Counter[str] = Counter()
        self.problem: Problem | None = None
        self._parser = CanonicalParser()
        self._repeat_checked = False
        self._sigs = _SignatureChecks(0 if workers is None else workers, batch_size)
        # bound once: `_feed` runs per entry, and each attribute look-up there counts
        self._envelope = self._parser.envelope
        self._admit = self.keyring.admit
        self._add_signature = self._sigs.add
        self._append = self.tree.append
        self._fold = None if self.ledger is None else self.ledger.apply
        #: kind -> whether the ledger reads it (`Ledger.reads`), filled as kinds appear
        self._folded: dict[str, bool] = {}
        self.ledger_reads: Callable[[str], bool] = (
            (lambda kind: False) if self.ledger is None else self.ledger.reads)
        #: the dates (YYYY-MM-DD) of entry times found valid so far
        self._days: set[str] = set()
        self._plain_unsafe = False
        self._plain_decode = msgspec.json.Decoder(_Envelope, float_hook=self._plain_float).decode
        #: key id -> public key of signers known to be active since the last `key.*` entry
        self._signers: dict[str, bytes] = {}

    @property
    def size(self) -> int:
        return self.tree.size

    def run(self, lines: Iterable[bytes], progress: Callable[[int], None] | None = None,
            collect: bool = False) -> int:
        """Check `lines` (each with its newline) in order, stopping at the first bad entry; the
        bytes of the lines accepted. `progress(bytes)` every 1024 lines or so; with `collect`,
        the young generations of the garbage collector every GC_EVERY lines (see verify_lines).

        Lines are taken RUN_BATCH at a time (`_run_batch`): the common entries go through the
        checks stage by stage over the batch, mostly in C; any other goes through `feed`,
        which decides and names the reason.
        """
        read = 0
        count = 0
        next_progress = 1024
        next_collect = GC_EVERY
        iterator = iter(lines)
        while self.problem is None:
            chunk = list(islice(iterator, RUN_BATCH))
            if not chunk:
                break
            read += self._run_batch(chunk)
            count += len(chunk)
            if count >= next_progress:
                next_progress = count + 1024
                if progress is not None:
                    progress(read)
            if collect and count >= next_collect:
                next_collect = count + GC_EVERY
                gc.collect(1)
        return read

    def _run_batch(self, raws: list[bytes]) -> int:
        """Check and apply `raws` in order up to the first bad entry (`problem`); the bytes
        of the lines accepted.

        An entry is plain (`feed` takes the others) when its line is ASCII, holds no backslash,
        no integer outside +-(2**53 - 1) and no float token in a form other than the one
        msgspec and RFC 8785 share (`_plain_float`), decodes to an envelope that msgspec
        encodes back to the line, has a fixed-width time and a canonical base64 signature,
        a kind other than `key.*` and a signer already known to be active (`_signers`). The
        checks that depend on one line alone run over the whole batch first (mostly in C:
        msgspec, one regular expression over the joined times and signatures, list
        comparisons); then each run of plain entries between two others is applied in log
        order as `feed` does (`_apply_run`), and each other entry goes through `feed`.
        """
        n = len(raws)
        lines = [raw[:-1] for raw in raws]
        odd: set[int] = set()  # the positions `feed` takes
        if not raws[-1].endswith(b"\n"):
            odd.add(n - 1)  # only a file's last line can lack it
        if max(map(len, lines)) > MAX_LINE_BYTES:
            odd.update(i for i, line in enumerate(lines) if len(line) > MAX_LINE_BYTES)
        joined = b"\n".join(lines)
        if not joined.isascii() or b"\\" in joined:
            odd.update(i for i, line in enumerate(lines) if not line.isascii() or b"\\" in line)
        decode = self._plain_decode
        self._plain_unsafe = False
        try:
            entries = list(map(decode, lines))
        except (msgspec.DecodeError, ValueError, RecursionError):
            entries = []
            for i, line in enumerate(lines):
                try:
                    entries.append(decode(line))
                except (msgspec.DecodeError, ValueError, RecursionError):
                    entries.append(_PLACEHOLDER)
                    odd.add(i)
        if self._plain_unsafe:  # a float token in another form than RFC 8785's: which lines?
            odd.update(i for i, line in enumerate(lines) if self._has_unsafe_float(line))
        if list(map(_PLAIN_ENCODE, entries)) != lines:
            odd.update(i for i, (entry, line) in enumerate(zip(entries, lines, strict=True))
                       if _PLAIN_ENCODE(entry) != line)
        digits = joined.translate(_DIGIT_MAP)  # (byte for byte: the offsets are the same)
        at = digits.find(_LONG_DIGIT_RUN)
        while at >= 0:  # a run of 16 digits: maybe an integer out of range, in line i
            i = joined.count(b"\n", 0, at)
            if _has_unsafe_integer(entries[i].payload):
                odd.add(i)
            end = joined.find(b"\n", at)
            at = -1 if end < 0 else digits.find(_LONG_DIGIT_RUN, end)
        times = [entry.time for entry in entries]
        if not _TIMES.fullmatch("".join(times)):
            odd.update(i for i, text in enumerate(times) if not _TIMES.fullmatch(text))
        days = self._days
        for day in {text[:10] for text in times} - days:
            try:
                date.fromisoformat(day)
            except ValueError:
                odd.update(i for i, text in enumerate(times) if text[:10] == day)
            else:
                days.add(day)
        texts = [entry.signature for entry in entries]
        if not _SIGNATURES.fullmatch("".join(texts)):
            odd.update(i for i, text in enumerate(texts) if not _SIGNATURES.fullmatch(text))
        kinds = [entry.kind for entry in entries]
        if any(kind.startswith("key.") for kind in set(kinds)):
            odd.update(i for i, kind in enumerate(kinds) if kind.startswith("key."))
        key_ids = [entry.key_id for entry in entries]
        read = 0
        start = 0
        for stop in [*sorted(odd), n]:
            while start < stop:  # the plain entries [start, stop)
                end = self._apply_run(lines[start:stop], entries[start:stop], texts[start:stop],
                                      kinds[start:stop], key_ids[start:stop])
                read += sum(map(len, raws[start:start + end]))
                start += end
                if self.problem is not None:
                    return read
                if start < stop:  # a signer not known to be active yet: `feed` checks it
                    if not self.feed(raws[start]):
                        return read
                    read += len(raws[start])
                    start += 1
            if stop < n:
                if not self.feed(raws[stop]):
                    return read
                read += len(raws[stop])
                start = stop + 1
        return read

    def _apply_run(self, lines: list[bytes], entries: list[_Envelope], texts: list[str],
                   kinds: list[str], key_ids: list[str]) -> int:
        """Apply plain entries, in order, as `feed` would, up to the first whose signer is not
        known to be active (or the first bad one, setting `problem`); how many were applied."""
        found = list(map(self._signers.get, key_ids))
        n = found.index(None) if None in found else len(found)
        signers = cast(list[bytes], found[:n])
        base = self.tree.size
        leaves = [_sha256(b"\x00" + line).digest() for line in lines[:n]]
        data = b"".join(leaves)
        a2b = binascii.a2b_base64
        sigs = self._sigs
        # the signed bytes: the line without `,"signature":"<88 characters>"`, which in a
        # canonical line with a 27-character time lies from 147 to 44 bytes before its end
        sigs.pending.extend(zip(range(base, base + n), signers[:n],
                                [a2b(text) + line[:-147] + line[-44:]
                                 for text, line in zip(texts[:n], lines[:n], strict=True)],
                                strict=True))
        if len(sigs.pending) >= sigs.batch_size:
            sigs.flush()
        if self._fold is not None:
            fold, folded, reads = self._fold, self._folded, self.ledger_reads
            for position in range(n):
                kind = kinds[position]
                wanted = folded.get(kind)
                if wanted is None:
                    wanted = folded[kind] = reads(kind)
                if not wanted:
                    continue
                reason = None
                try:
                    fold(entries[position], base + position)
                except _REFUSED as exc:
                    reason = _refusal(exc)
                if reason is not None:
                    n = position
                    self.problem = (self._replayed(base + n, leaves[n], leaves[:n])
                                    or Problem(base + n, printable(reason)))
                    break
        self.tree.extend_bytes(data if n == len(leaves) else data[:n * HASH_SIZE])
        self.kinds.update(kinds[:n])
        if self.problem is None and sigs.failed is not None:
            self.problem = Problem(sigs.failed, "signature: does not verify with the signer's "
                                                "registered key")
        return n

    def _active(self, kid: str) -> bool:
        record = self.keyring.get(kid)
        return record is not None and record.active

    def _has_unsafe_float(self, line: bytes) -> bool:
        self._plain_unsafe = False
        self._plain_decode(line)
        return self._plain_unsafe

    def _plain_float(self, token: str) -> float:
        """A float of `_plain_run`'s decoder. msgspec writes a float with neither exponent nor
        a ".0" ending as RFC 8785 does (the shortest digits that round-trip; checked against
        the rfc8785 package in tests/audit/test_verify_fast.py), so a line whose floats are all
        such tokens and which encodes back to itself is canonical; any other float token
        leaves its line to `feed`."""
        if "e" in token or "E" in token or token.endswith(".0"):
            self._plain_unsafe = True
        return float(token)

    def feed(self, raw: bytes) -> bool:
        """Check the next line (with its newline). False once a bad entry has been found."""
        if self.problem is not None:
            return False
        index = self.tree.size
        reason: str | None = None
        try:
            self._feed(index, raw)
        except _REFUSED as exc:
            reason = _refusal(exc)
        if reason is not None:  # quoted content may hold controls, bidi overrides, surrogates
            replayed = (self._replayed(index, _sha256(b"\x00" + raw[:-1]).digest())
                        if raw.endswith(b"\n") else None)
            self.problem = replayed or Problem(index, printable(reason))
        if self.problem is None and self._sigs.failed is not None:
            self.problem = Problem(self._sigs.failed, "signature: does not verify with the "
                                                      "signer's registered key")
        return self.problem is None

    def _feed(self, index: int, raw: bytes) -> None:
        if len(raw) > MAX_LINE_BYTES + 1:
            size = len(raw) - raw.endswith(b"\n")
            raise NotCanonicalError(f"a line of {size} bytes, larger than the {MAX_LINE_BYTES} bytes a "
                                    f"log entry may have")
        if not raw.endswith(b"\n"):
            raise NotCanonicalError("line does not end with a newline (file truncated?)")
        line = raw[:-1]
        entry = self._envelope(line)
        signature = decode_signature(entry.signature)
        leaf = _sha256(b"\x00" + line).digest()
        public_key = self._admit(entry, index)
        if entry.kind.startswith("key."):  # it may have ended a key: forget those
            for kid in [kid for kid in self._signers if not self._active(kid)]:
                del self._signers[kid]
        else:
            self._signers[entry.key_id] = public_key  # active, until the next `key.*` entry
        self._add_signature(index, public_key, signature + signing_input_from_line(line, entry))
        if self._fold is not None:
            try:
                self._fold(entry, index)
            except LedgerError as exc:
                raise _LedgerFailureError(exc.reason) from exc
        self._append(leaf)
        self.kinds[entry.kind] += 1

    def _replayed(self, index: int, leaf: bytes, pending: list[bytes] | None = None,
                  ) -> Problem | None:
        """The replay problem if the entry at `index`, refused for another reason, is a copy of
        an earlier one (the replay check comes first), else None. `pending`: the leaves of
        the entries accepted since the tree was last extended. Reads the leaves back once, on
        this failure path only."""
        earlier = self.tree.find(leaf)
        if earlier is None and pending and leaf in pending:
            earlier = self.tree.size + pending.index(leaf)
        if earlier is None:
            return None
        return _replay_problem(index, earlier)

    def finish(self) -> Problem | None:
        """Wait for the outstanding signature checks and look for replayed entries; the
        problem with the smallest index.

        A replay is found here, once every leaf is in (`audit.compact.first_repeat`, in bounded
        memory), rather than entry by entry against an index that would grow with the log.
        That decides as the check in log order did: the checks of entries after a replay
        cannot hide it (the smallest index wins, and a replay wins a tie, as it came first
        in an entry's checks), and an entry refused for another reason is itself looked up
        (`_replayed`)."""
        failed = self._sigs.finish()
        if failed is not None and (self.problem is None or self.problem.index is None
                                   or failed < self.problem.index):
            self.problem = Problem(failed, "signature: does not verify with the signer's "
                                           "registered key")
        if not self._repeat_checked:
            self._repeat_checked = True
            repeat = first_repeat(self.tree)
            if repeat is not None and (self.problem is None or self.problem.index is None
                                       or repeat[0] <= self.problem.index):
                self.problem = _replay_problem(*repeat)
        return self.problem

    def ledger_json(self) -> dict[str, Any] | None:
        if self.ledger is None:
            return None
        result: dict[str, Any] = self.ledger.state.to_json()
        count = len(self.ledger.claim_pools)
        if count > MAX_LISTED_POOLS:
            result["claim_pools_total"] = self.ledger.claim_pools.totals()
        elif count:
            result["claim_pools"] = self.ledger.claim_pools_json()
        return result


def _replay_problem(index: int, earlier: int) -> Problem:
    return Problem(index, f"duplicate: byte-for-byte the same entry as entry {earlier} "
                          f"(a replayed entry)")


class _LedgerFailureError(Exception):
    """Carries a LedgerError's reason out of the per-entry checks."""


#: What an entry's checks raise to refuse the entry (rather than crash the verifier).
_REFUSED = (LedgerError, _LedgerFailureError, RecursionError, *_CONTENT_ERRORS)


def _refusal(exc: BaseException) -> str:
    """Why an entry was refused, from what its checks raised (one of `_REFUSED`): one wording
    for the batch path and for `feed`'s line-by-line path, so both name the same reason."""
    if isinstance(exc, NotCanonicalError | MalformedEntryError):
        return str(exc)
    if isinstance(exc, KeyringError):
        return exc.reason
    if isinstance(exc, LedgerError):
        return f"ledger: {exc.reason}"
    if isinstance(exc, _LedgerFailureError):
        return f"ledger: {exc}"
    if isinstance(exc, RecursionError):
        return "nested too deeply to be checked"
    return f"cannot be checked ({type(exc).__name__}: {exc})"


def _earliest(*problems: Problem | None) -> Problem | None:
    """The problem at the smallest entry index; one tied to no entry only if there is no other."""
    indexed = [p for p in problems if p is not None and p.index is not None]
    if indexed:
        return min(indexed, key=lambda p: p.index if p.index is not None else -1)
    return next((p for p in problems if p is not None), None)


def verify_export(folder: Path, *, trust_path: Path | None = None, state_path: Path | None = None,
                  progress: Callable[[int], None] | None = None, workers: int | None = None,
                  with_ledger: bool = True, batch_size: int = 512,
                  witness_quorum: int | None = None) -> VerifyReport:
    """Verify the export in `folder` (see the module docstring). ExportError: unusable input.

    `trust_path` defaults to the export's own trust.json (an auditor should pin its own copy).
    `progress(bytes_read)` is called now and then with the bytes of entries.jsonl read so far.
    `witness_quorum` overrides the trust policy's quorum of witness cosignatures.
    """
    paths = ExportPaths(folder)
    paths.require()
    trust = read_trust(trust_path or paths.trust)
    checkpoint_text = read_checkpoint_text(paths.checkpoint)
    state = load_state(state_path, trust) if state_path is not None else None
    return verify_lines(iter_lines(paths.entries), checkpoint_text, trust, state=state,
                        state_path=state_path, progress=progress, workers=workers,
                        with_ledger=with_ledger, batch_size=batch_size,
                        witness_quorum=witness_quorum)


def check_checkpoint(checkpoint_text: bytes | str, trust: Trust, required: int,
                     report: VerifyReport, now: float | None = None,
                     ) -> tuple[Problem | None, Problem | None]:
    """Verify the log's signature and the witnesses' quorum; fill `report`.

    Returns (signature problem, quorum problem): the first when the note itself is not to be
    trusted, the second when it is but too few witnesses cosigned it.

    Required: a valid signature by the pinned log key with the pinned origin, and valid
    cosignatures (audit/cosignature.py) from at least `required` distinct pinned witnesses. A
    known witness's line that does not verify refuses the checkpoint; one dated in the future
    is reported and not counted.
    """
    report.witness_quorum = required
    try:
        report.checkpoint = verify_checkpoint(checkpoint_text, trust.log_public_key,
                                              trust.log_key_name, trust.origin)
        report.cosignatures = check_cosignatures(checkpoint_text, trust.witnesses, now=now)
    except CheckpointError as exc:
        report.checkpoint = None
        return Problem(None, f"checkpoint: {exc}"), None
    cosigned = report.cosignatures
    if len(cosigned.signed) >= required:
        return None, None
    signed = ", ".join(cosigned.signed) or "none"
    unsigned = ", ".join(cosigned.missing) or "none"
    ahead = "".join(f"; {name}'s cosignature is dated in the future ({when}) and not counted"
                    for name, when in cosigned.future.items())
    return None, Problem(None, f"checkpoint: cosigned by {len(cosigned.signed)} of the "
                               f"{len(trust.witnesses)} pinned witnesses, below the quorum of "
                               f"{required}: signed by {signed}; not signed by {unsigned}{ahead}")


def verify_lines(lines: Iterable[bytes], checkpoint_text: bytes | str, trust: Trust, *,
                 state: SavedState | None = None, state_path: Path | None = None,
                 progress: Callable[[int], None] | None = None, workers: int | None = None,
                 with_ledger: bool = True, batch_size: int = 512,
                 witness_quorum: int | None = None,
                 after_entries: Callable[[], Problem | None] | None = None) -> VerifyReport:
    """Verify lines (each with its newline) against a checkpoint note and trust anchors.

    `state` is what `load_state` returned for `state_path` (None: no saved checkpoint yet).
    `after_entries`, called once the lines are exhausted, may return a problem of the source
    the lines came from (e.g. a tile that does not match them); nothing is saved then.
    ExportError (before anything is read) if the witness quorum cannot be met by the trust
    policy at all (e.g. a quorum asked of a trust file that pins no witness).
    """
    report = VerifyReport(origin=trust.origin)
    required = trust.witness_quorum(witness_quorum)
    checkpoint_problem, quorum_problem = check_checkpoint(checkpoint_text, trust, required,
                                                          report)
    checkpoint = report.checkpoint

    verifier = LogVerifier(trust, workers=workers, with_ledger=with_ledger, batch_size=batch_size)
    # The roots the checks below compare are taken as the leaves stream by: the leaves
    # themselves are read back (from the tree's temporary file) only to name a fork.
    if state is not None:
        verifier.tree.watch(state.checkpoint.size)
    if checkpoint is not None:
        verifier.tree.watch(checkpoint.size)
    read = 0
    # The cyclic garbage collector's automatic passes are paused while entries are checked:
    # what a line makes dies with it (no reference cycles), and what lives on (the ledger's
    # state) grows with the log, so those passes would be pure cost (about 5% of the per-entry
    # work; docs/benchmarks/audit-verify.md). Reference counting frees as usual, and the young
    # generations are collected every GC_EVERY entries, so that cycles a source of lines may
    # leave behind (e.g. an HTTP client's) stay bounded.
    collecting = gc.isenabled()
    gc.disable()
    try:
        read = verifier.run(lines, progress, collecting)
    finally:
        if collecting:
            gc.enable()
        entry_problem = verifier.finish()
    source_problem = after_entries() if after_entries is not None else None
    if progress is not None:
        progress(read)
    tree = verifier.tree
    size = tree.size if entry_problem is None else (entry_problem.index or 0)
    report.entries = tree.size
    report.kinds = verifier.kinds
    report.ledger_checked = verifier.ledger is not None
    report.root = tree.root()

    # History against the saved state: computed even if an entry is bad, since a fork earlier
    # than that entry is the first thing wrong.
    fork_problem: Problem | None = None
    if state is not None:
        saved = state.checkpoint
        if entry_problem is not None:
            divergence = _first_divergence(state, tree, size)
            if divergence is not None:
                fork_problem = Problem(divergence, f"history forked: differs from the saved "
                                                   f"checkpoint (size {saved.size}) from this entry on")
        elif saved.size > tree.size:
            divergence = _first_divergence(state, tree, tree.size)
            fork_problem = Problem(
                divergence if divergence is not None else tree.size,
                f"history forked: differs from the saved checkpoint (size {saved.size}) from this "
                f"entry on" if divergence is not None else
                f"missing: the saved checkpoint covers {saved.size} entries but the log has only "
                f"{tree.size} (truncated or rolled back)")
        else:
            # The log is here in full, so the saved checkpoint is consistent with it exactly
            # when the root of its first saved.size entries is the saved root (what an RFC 9162
            # consistency proof computed from this tree would establish); that root was taken
            # as the entries streamed by (`watch`).
            ours = tree.root(saved.size)
            if saved.size == 0 or ours == saved.root:
                report.consistent_with = saved.size
            else:
                divergence = _first_divergence(state, tree, saved.size)
                fork_problem = Problem(divergence, f"history forked: not consistent with the saved "
                                                   f"checkpoint of size {saved.size} (the root of "
                                                   f"its first {saved.size} entries here is "
                                                   f"{b64encode(ours)}, the saved root "
                                                   f"{b64encode(saved.root)})")

    if entry_problem is None and checkpoint is not None and checkpoint_problem is None:
        checkpoint_problem = _match_checkpoint(checkpoint, tree)


    report.problem = _earliest(entry_problem, source_problem, fork_problem, checkpoint_problem,
                               quorum_problem)
    if report.problem is None:
        report.ledger = verifier.ledger_json()
        if state_path is not None:
            save_state(state_path, checkpoint_text if isinstance(checkpoint_text, str)
                       else checkpoint_text.decode(), tree, tree.size)
            report.state_saved = True
    if verifier.ledger is not None:
        verifier.ledger.claim_pools.close()  # a spilled store's temporary file goes now
    tree.close()  # and the tree's leaves
    return report


def _match_checkpoint(checkpoint: Checkpoint, tree: LeafTree) -> Problem | None:
    size = tree.size
    if checkpoint.size > size:
        return Problem(size, f"missing: the checkpoint commits to {checkpoint.size} entries but the "
                             f"log ends after {size} (truncated?)")
    if checkpoint.size < size:
        if tree.root(checkpoint.size) == checkpoint.root:
            return Problem(checkpoint.size, f"not covered by the checkpoint, which commits to only "
                                            f"{checkpoint.size} entries")
        return Problem(None, f"checkpoint: commits to {checkpoint.size} entries but the log has "
                             f"{size}, and its root matches no prefix of it")
    if tree.root() != checkpoint.root:
        return Problem(None, f"checkpoint: root hash {b64encode(checkpoint.root)} does not match the "
                             f"root {b64encode(tree.root())} of the {size} entries (an entry was "
                             f"changed, inserted, deleted or reordered; verify with --state to "
                             f"name it)")
    return None
