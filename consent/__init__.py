"""Consent contracts: model, signing, FHIR Consent import, DUO purpose matching, gating.

A library (no I/O except reading the files it is given, no clock, no global state). The main
entry points are re-exported here; see docs/consent.md.

The gating names (`GateResult`, `RecordColumns`, `commitment`) are loaded on first use: gating
needs pyarrow, and a process that only validates contracts and studies (the node daemon, docs/
benchmarks/scale.md "Memory per hospital") should not pay for it. The gate function itself is
`consent.gate.gate` (`consent.gate` names its module).
"""

from typing import TYPE_CHECKING, Any

from consent.evaluate import Decision, Reason, evaluate
from consent.history import ContractHistory, ContractRegistry
from consent.model import Contract, Period, Provision, SignedContract, next_version, revoke, sign
from consent.request import StudyRequest

if TYPE_CHECKING:
    from consent.gate import GateResult, RecordColumns, commitment

_GATE_NAMES = frozenset({"GateResult", "RecordColumns", "commitment"})


def __getattr__(name: str) -> Any:
    if name in _GATE_NAMES:
        from consent import gate as gate_module

        return getattr(gate_module, name)
    raise AttributeError(f"module 'consent' has no attribute {name!r}")


__all__ = [
    "Contract",
    "ContractHistory",
    "ContractRegistry",
    "Decision",
    "GateResult",
    "Period",
    "Provision",
    "Reason",
    "RecordColumns",
    "SignedContract",
    "StudyRequest",
    "commitment",
    "evaluate",
    "next_version",
    "revoke",
    "sign",
]
