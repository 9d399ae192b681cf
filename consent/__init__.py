"""Consent contracts: model, signing, FHIR Consent import, DUO purpose matching, gating.

A library (no I/O except reading the files it is given, no clock, no global state). The main
entry points are re-exported here; see docs/consent.md.
"""

from consent.evaluate import Decision, Reason, evaluate
from consent.gate import GateResult, RecordColumns, commitment, gate
from consent.history import ContractHistory, ContractRegistry
from consent.model import Contract, Period, Provision, SignedContract, next_version, revoke, sign
from consent.request import StudyRequest

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
    "gate",
    "next_version",
    "revoke",
    "sign",
]
