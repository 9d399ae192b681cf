"""Realistic synthetic contract mixes, for demos, tests and benchmarks (deterministic by seed).

`make_contracts(pseudonyms, hospital_id, signer, seed)` returns every version it issues, signed
(issuer key stamped; `make_signed_contracts` also returns the signatures): per pseudonym one
version-1 contract drawn from the mix below, and for about `revoke_fraction` of them a later
revocation (version 2). Feed the list to `ContractRegistry` to get the version in force at an
instant. All version-1 contracts are issued at `issued`; revocations between 30 and 365 days
later (or exactly at `revoked_at` when given).

The mix (weights in %): general research use (30); HMB with a nested deny of commercial use (15);
disease specific for one ICD-10 area with ethics approval required (15); HMB non-commercial
only, NCU (10); HMB with a nested deny for one organisation, `pharma-x` (8); GRU with a nested
deny of genomics data (7); population origins or ancestry only (5); GRU within EU regions only,
GS (5); opt-out, a bare deny (5). On top: 20% carry a privacy cap (max epsilon 1, 3 or 8) and 40%
a pseudonymous reward account (`acct-` + 16 hex characters derived from seed and pseudonym).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from audit.signing import Signer
from consent import duo
from consent.model import Contract, Provision, SignedContract, revoke, sign

ALL_CATEGORIES = (
    "demographics",
    "diagnoses",
    "procedures",
    "labs",
    "vitals",
    "medications",
    "imaging",
    "genomics",
    "notes",
)
DISEASE_AREAS = ("C50", "E11", "I10-I15", "I21", "J45", "C00-C97", "F32", "G30")
EU = ("AT", "BE", "DE", "DK", "ES", "FI", "FR", "IE", "IT", "NL", "PT", "SE")
DEFAULT_ISSUED = datetime(2026, 1, 1, tzinfo=UTC)


def _provision(kind: str, rng: random.Random) -> Provision:
    if kind == "gru":
        return Provision(type="permit", purposes=(duo.GRU,))
    if kind == "hmb-no-commercial-deny":
        return Provision(
            type="permit", purposes=(duo.HMB,), provisions=(Provision(type="deny", commercial=True),)
        )
    if kind == "ds":
        return Provision(
            type="permit", purposes=(duo.DS,), diseases=(rng.choice(DISEASE_AREAS),), modifiers=(duo.IRB,)
        )
    if kind == "hmb-ncu":
        return Provision(type="permit", purposes=(duo.HMB,), modifiers=(duo.NCU,))
    if kind == "hmb-deny-org":
        return Provision(
            type="permit",
            purposes=(duo.HMB,),
            provisions=(Provision(type="deny", organisations=("pharma-x",)),),
        )
    if kind == "gru-no-genomics":
        return Provision(
            type="permit",
            purposes=(duo.GRU,),
            provisions=(Provision(type="deny", data_categories=("genomics",)),),
        )
    if kind == "poa":
        return Provision(type="permit", purposes=(duo.POA,))
    if kind == "gru-eu":
        return Provision(type="permit", purposes=(duo.GRU,), modifiers=(duo.GS,), regions=EU)
    return Provision(type="deny")


_MIX = (
    ("gru", 30),
    ("hmb-no-commercial-deny", 15),
    ("ds", 15),
    ("hmb-ncu", 10),
    ("hmb-deny-org", 8),
    ("gru-no-genomics", 7),
    ("poa", 5),
    ("gru-eu", 5),
    ("opt-out", 5),
)


def make_signed_contracts(
    pseudonyms: Sequence[str],
    hospital_id: str,
    signer: Signer,
    seed: int,
    *,
    issued: datetime = DEFAULT_ISSUED,
    revoke_fraction: float = 0.05,
    revoked_at: datetime | None = None,
) -> list[SignedContract]:
    """Like `make_contracts`, with each contract's signature."""
    rng = random.Random(seed)
    kinds = [k for k, _ in _MIX]
    weights = [w for _, w in _MIX]
    out: list[SignedContract] = []
    revocations: list[SignedContract] = []
    for pseudonym in pseudonyms:
        kind = rng.choices(kinds, weights)[0]
        cap = rng.choice((1.0, 3.0, 8.0)) if rng.random() < 0.2 else None
        account = None
        if rng.random() < 0.4:
            account = "acct-" + hashlib.sha256(f"{seed}:{hospital_id}:{pseudonym}".encode()).hexdigest()[:16]
        contract = Contract(
            contract_id=f"{hospital_id}:{pseudonym}",
            pseudonym=pseudonym,
            hospital=hospital_id,
            version=1,
            issued=issued,
            provision=_provision(kind, rng),
            max_epsilon=cap,
            reward_account=account,
        )
        signed = sign(contract, signer)
        out.append(signed)
        if rng.random() < revoke_fraction:
            when = revoked_at or issued + timedelta(days=rng.randint(30, 365))
            revocations.append(sign(revoke(signed.contract, when), signer))
    return out + revocations


def make_contracts(
    pseudonyms: Sequence[str],
    hospital_id: str,
    signer: Signer,
    seed: int,
    *,
    issued: datetime = DEFAULT_ISSUED,
    revoke_fraction: float = 0.05,
    revoked_at: datetime | None = None,
) -> list[Contract]:
    """A realistic, seeded mix of signed contracts for `pseudonyms` (all versions; see module doc)."""
    return [
        s.contract
        for s in make_signed_contracts(
            pseudonyms,
            hospital_id,
            signer,
            seed,
            issued=issued,
            revoke_fraction=revoke_fraction,
            revoked_at=revoked_at,
        )
    ]
