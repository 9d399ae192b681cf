"""A pseudonym's whole contract history, and the version in force at an instant.

Versions form a chain: version n+1 names the content hash of version n in `supersedes`. Nothing
is ever removed; a revocation is just the newest version. The version in force at an instant is
the newest one issued at or before it (none before the first was issued).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from datetime import datetime

from consent.model import Contract


class HistoryError(ValueError):
    """A version that does not continue the chain it is added to."""


class ContractHistory:
    """All versions of one contract (one pseudonym at one hospital), oldest first."""

    def __init__(self, versions: Iterable[Contract] = ()) -> None:
        self._versions: list[Contract] = []
        for contract in sorted(versions, key=lambda c: c.version):
            self.add(contract)

    def add(self, contract: Contract) -> None:
        """Append the next version; refuse (changing nothing) anything that breaks the chain."""
        if not self._versions:
            if contract.version != 1:
                raise HistoryError(f"version: a history starts at version 1, not {contract.version}")
            self._versions.append(contract)
            return
        last = self._versions[-1]
        if contract.version != last.version + 1:
            raise HistoryError(f"version: expected {last.version + 1}, got {contract.version}")
        if contract.supersedes != last.content_hash:
            raise HistoryError("supersedes: does not name the hash of the previous version")
        for field in ("contract_id", "pseudonym", "hospital"):
            if getattr(contract, field) != getattr(last, field):
                raise HistoryError(f"{field}: differs from the previous version")
        if contract.issued < last.issued:
            raise HistoryError("issued: earlier than the previous version")
        self._versions.append(contract)

    @property
    def versions(self) -> tuple[Contract, ...]:
        return tuple(self._versions)

    @property
    def latest(self) -> Contract:
        return self._versions[-1]

    def in_force(self, instant: datetime) -> Contract | None:
        """The newest version issued at or before `instant`, or None."""
        i = bisect.bisect_right([c.issued for c in self._versions], instant)
        return self._versions[i - 1] if i else None

    def __iter__(self) -> Iterator[Contract]:
        return iter(self._versions)

    def __len__(self) -> int:
        return len(self._versions)


class ContractRegistry:
    """Histories keyed by (hospital, pseudonym), and every version by content hash."""

    def __init__(self, contracts: Iterable[Contract] = ()) -> None:
        self._histories: dict[tuple[str, str], ContractHistory] = {}
        self._by_hash: dict[str, Contract] = {}
        for contract in sorted(contracts, key=lambda c: (c.hospital, c.pseudonym, c.version)):
            self.add(contract)

    def add(self, contract: Contract) -> None:
        key = (contract.hospital, contract.pseudonym)
        history = self._histories.get(key)
        if history is None:
            history = ContractHistory()
            history.add(contract)
            self._histories[key] = history
        else:
            if history.latest.contract_id != contract.contract_id:
                raise HistoryError(
                    f"contract_id: {contract.pseudonym} already has contract {history.latest.contract_id}"
                )
            history.add(contract)
        self._by_hash[contract.content_hash] = contract

    def history(self, hospital: str, pseudonym: str) -> ContractHistory:
        return self._histories[(hospital, pseudonym)]

    @property
    def by_hash(self) -> dict[str, Contract]:
        """Every version ever seen, by content hash (what `gate` needs)."""
        return dict(self._by_hash)

    def in_force(self, instant: datetime) -> dict[str, Contract]:
        """pseudonym -> the version in force at `instant` (pseudonyms with none are left out)."""
        out: dict[str, Contract] = {}
        for (_, pseudonym), history in self._histories.items():
            contract = history.in_force(instant)
            if contract is not None:
                out[pseudonym] = contract
        return out

    def records_at(
        self, pseudonyms: Iterable[str], hospital: str, instant: datetime
    ) -> list[tuple[str, str]]:
        """(pseudonym, hash of the version in force) for gating; a pseudonym with none maps to ""."""
        out = []
        for pseudonym in pseudonyms:
            history = self._histories.get((hospital, pseudonym))
            contract = history.in_force(instant) if history is not None else None
            out.append((pseudonym, contract.content_hash if contract is not None else ""))
        return out

    def __len__(self) -> int:
        return len(self._histories)
