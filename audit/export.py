"""The export folder: what an auditor receives and verifies offline.

Why a folder of plain files: an auditor should need nothing but this package (or any RFC 6962 /
C2SP implementation) to check it; no database, no network. Layout (docs/audit-log.md):

    DIR/entries.jsonl   one envelope per line, in log order: the RFC 8785 canonical encoding of
                        the whole envelope (= the Merkle leaf input), then "\\n". Line i is entry i.
    DIR/checkpoint      the C2SP signed note for the tree of all those entries, signed by the log key
                        and cosigned by witnesses (audit/cosignature.py)
    DIR/trust.json      the trust policy (audit/trust.py: origin, log and operator keys, witnesses,
                        quorum): what the auditor pins (normally a copy obtained out of band,
                        given with `--trust`)

Writing goes through a temporary folder renamed into place, so a crash never leaves a
half-written export that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from audit.entry import Entry
from audit.trust import TRUST_VERSION, ExportError, Trust, read_trust, trust_json_bytes

__all__ = ["CHECKPOINT_FILE", "ENTRIES_FILE", "TRUST_FILE", "TRUST_VERSION", "ExportError",
           "ExportPaths", "Trust", "atomic_write", "fsync_dir", "iter_lines", "read_checkpoint_text",
           "read_trust", "write_entries_export", "write_export", "write_synced"]

ENTRIES_FILE = "entries.jsonl"
CHECKPOINT_FILE = "checkpoint"
TRUST_FILE = "trust.json"


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


def write_export(out: Path, leaf_lines: Iterable[bytes],
                 checkpoint_note: str | Callable[[], str], trust: Trust,
                 *, overwrite: bool = False) -> int:
    """Write an export folder atomically; return the number of entries written.

    `leaf_lines` are the canonical envelopes (Entry.leaf_bytes()), without newline. `out` must
    not exist (or be an empty folder) unless `overwrite` is true. `checkpoint_note` may be a
    function, called once every line is written (a streaming writer learns the root last).
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
        note = checkpoint_note() if callable(checkpoint_note) else checkpoint_note
        write_synced(staging / CHECKPOINT_FILE, note.encode())
        write_synced(staging / TRUST_FILE, trust_json_bytes(trust))
        replace_synced(staging, out)
        return count
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_entries_export(out: Path, entries: Iterable[Entry], checkpoint_note: str, trust: Trust,
                         *, overwrite: bool = False) -> int:
    return write_export(out, (e.leaf_bytes() for e in entries), checkpoint_note, trust,
                        overwrite=overwrite)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the folder's entry is synced by the caller)."""
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replace_synced(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder at `out` (replacing whatever is there) and make the
    rename durable: a reader sees the old export or the new one, never half of either."""
    if out.exists():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(staging, out)
    fsync_dir(out.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: temp file in the same folder, fsync, rename, fsync dir."""
    atomic_write_pieces(path, (data,))


def atomic_write_pieces(path: Path, pieces: Iterable[bytes]) -> None:
    """`atomic_write` of the concatenated `pieces`, written as they come (a large file need not
    be held in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
