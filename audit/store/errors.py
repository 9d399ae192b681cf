"""The audit store's errors: one base class, so a caller can catch everything the store raises."""

from __future__ import annotations


class AuditStoreError(Exception):
    """Base class of the store's errors."""


class EntryRefusedError(AuditStoreError, ValueError):
    """An entry was refused; nothing of its append call was written.

    `position` is the entry's position in the `append_in` call, `index` the log index it
    would have had (None if refused before an index was known), `reason` what is wrong.
    """

    def __init__(self, position: int, index: int | None, reason: str) -> None:
        where = f"entry {position} of the append" if index is None else \
            f"entry {position} of the append (would be log index {index})"
        super().__init__(f"{where} refused: {reason}")
        self.position = position
        self.index = index
        self.reason = reason


class DuplicateEntryError(EntryRefusedError):
    """The entry is byte for byte one already in the log (the verifier rejects replays)."""


class CommitOutcomeUnknownError(AuditStoreError):
    """The connection was lost after the transaction's COMMIT was sent with its last append
    (`AuditLog.append_in(..., last=True)`): the append may or may not be durable. Nothing may
    be acknowledged, and nothing made again blindly (it could be made twice); a caller that
    retries finds its entries stored (a replay refusal) or not."""


class StoreCorruptError(AuditStoreError):
    """The stored log is inconsistent (missing rows, wrong hashes); the message says where."""


class SchemaMissingError(AuditStoreError):
    """The audit tables do not exist: run the coordinator migrations first."""
