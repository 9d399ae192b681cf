"""The export folder: what an auditor receives and verifies offline.

Why a folder of plain files: an auditor should need nothing but this package (or any RFC 6962 /
C2SP implementation) to check it; no database, no network. Layout (docs/audit-log.md):

    DIR/entries.jsonl   one envelope per line, in log order: the RFC 8785 canonical encoding of
                        the whole envelope (= the Merkle leaf input), then "\\n". Line i is entry i.
    DIR/checkpoint      the C2SP signed note for the tree of all those entries, signed by the log key
    DIR/trust.json      {"version": 1, "origin": str, "operator_public_key": base64,
                         "log_public_key": base64}: what the auditor pins (normally from a copy
                         obtained out of band, given with `--trust`)

Writing goes through a temporary folder renamed into place, so a crash never leaves a
half-written export that looks complete.
"""

from __future__ import annotations

import binascii
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.checkpoint import CheckpointError, check_origin
from audit.entry import Entry
from audit.signing import b64decode, b64encode
from audit.untrusted import UntrustedJSONError, load_json

ENTRIES_FILE = "entries.jsonl"
CHECKPOINT_FILE = "checkpoint"
TRUST_FILE = "trust.json"
TRUST_VERSION = 1
_TRUST_FIELDS = frozenset({"version", "origin", "operator_public_key", "log_public_key"})


class ExportError(ValueError):
    """The export (or a trust file) is unusable: missing, unreadable or malformed as a whole."""


@dataclass(frozen=True)
class Trust:
    """The pinned roots: the operator key (root of the keyring) and the log (checkpoint) key."""

    origin: str
    operator_public_key: bytes
    log_public_key: bytes

    @property
    def log_key_name(self) -> str:
        """The signed-note key name of the log key: the origin, by this project's convention."""
        return self.origin

    def to_json(self) -> dict[str, Any]:
        return {"version": TRUST_VERSION, "origin": self.origin,
                "operator_public_key": b64encode(self.operator_public_key),
                "log_public_key": b64encode(self.log_public_key)}

    @classmethod
    def from_json(cls, obj: Any) -> Trust:
        if not isinstance(obj, dict):
            raise ExportError("trust: not a JSON object")
        missing = _TRUST_FIELDS - obj.keys()
        extra = obj.keys() - _TRUST_FIELDS
        if missing:
            raise ExportError(f"trust: missing field(s) {sorted(missing)}")
        if extra:
            raise ExportError(f"trust: unknown field(s) {sorted(extra)}")
        if obj["version"] != TRUST_VERSION:
            raise ExportError(f"trust.version: unsupported {obj['version']!r}")
        if not isinstance(obj["origin"], str):
            raise ExportError("trust.origin: must be a string")
        try:
            check_origin(obj["origin"])
        except CheckpointError as exc:
            raise ExportError(f"trust.{exc}") from exc
        keys: dict[str, bytes] = {}
        for name in ("operator_public_key", "log_public_key"):
            value = obj[name]
            try:
                if not isinstance(value, str):
                    raise ValueError
                raw = b64decode(value)
            except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
                raise ExportError(f"trust.{name}: not a base64 string") from exc
            if len(raw) != 32:
                raise ExportError(f"trust.{name}: must be a 32-byte Ed25519 key, got {len(raw)} bytes")
            keys[name] = raw
        return cls(obj["origin"], keys["operator_public_key"], keys["log_public_key"])


def read_trust(path: Path) -> Trust:
    """Load a trust file; ExportError (unusable input) if missing, unreadable or malformed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read trust file ({exc.strerror})") from exc
    try:
        obj = load_json(raw)
    except UntrustedJSONError as exc:
        raise ExportError(f"{path}: trust file: {exc}") from exc
    try:
        return Trust.from_json(obj)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from exc


def read_checkpoint_text(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read checkpoint ({exc.strerror})") from exc


@dataclass(frozen=True)
class ExportPaths:
    folder: Path

    @property
    def entries(self) -> Path:
        return self.folder / ENTRIES_FILE

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    @property
    def trust(self) -> Path:
        return self.folder / TRUST_FILE

    def require(self) -> None:
        """Raise ExportError unless the folder and its entries file exist and are readable."""
        if not self.folder.is_dir():
            raise ExportError(f"{self.folder}: not a folder")
        if not self.entries.is_file():
            raise ExportError(f"{self.entries}: missing")
        if not os.access(self.entries, os.R_OK):
            raise ExportError(f"{self.entries}: not readable")


def iter_lines(path: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield each line of `path` WITH its trailing b"\\n" (the last one may lack it).

    Raw bytes, so that the verifier can compare them with the canonical encoding and use them
    as Merkle leaf input without decoding and re-encoding.
    """
    with path.open("rb", buffering=chunk_size) as handle:
        yield from handle


def write_export(out: Path, leaf_lines: Iterable[bytes], checkpoint_note: str, trust: Trust,
                 *, overwrite: bool = False) -> int:
    """Write an export folder atomically; return the number of entries written.

    `leaf_lines` are the canonical envelopes (Entry.leaf_bytes()), without newline. `out` must
    not exist (or be an empty folder) unless `overwrite` is true.
    """
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        count = 0
        with (staging / ENTRIES_FILE).open("wb", buffering=1 << 20) as handle:
            for line in leaf_lines:
                if b"\n" in line:
                    raise ExportError(f"entry {count}: contains a newline (not canonical JSON)")
                handle.write(line)
                handle.write(b"\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        _write_synced(staging / CHECKPOINT_FILE, checkpoint_note.encode())
        _write_synced(staging / TRUST_FILE,
                      (json.dumps(trust.to_json(), indent=2, sort_keys=True) + "\n").encode())
        if out.exists():
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
        os.replace(staging, out)
        _fsync_dir(out.parent)
        return count
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_entries_export(out: Path, entries: Iterable[Entry], checkpoint_note: str, trust: Trust,
                         *, overwrite: bool = False) -> int:
    return write_export(out, (e.leaf_bytes() for e in entries), checkpoint_note, trust,
                        overwrite=overwrite)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file in the same folder, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
