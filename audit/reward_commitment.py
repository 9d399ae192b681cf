"""Salted Merkle commitments to a hospital's reward list, and the claims made against them.

Why: a receipt that names each used patient's reward account tells anyone reading the public,
append-only log which patients took part in which study, round by round, and who revoked. So a
receipt carries only the RFC 6962 root of a tree whose leaves hide the accounts; the hospital
keeps the openings in its own database; a patient (or the hospital for one) claims a payout by
showing one leaf and its inclusion proof, which the ledger checks against the logged root.

Definitions (docs/rewards.md, "Reward commitments and claims"):

    holder = SHA-256( b"reward-holder/1\\x00" || salt || account )   (salt: 32 random bytes)
    leaf   = RFC 8785 canonical JSON {"holder": <hex>, "units": <int>}
    root   = RFC 6962 Merkle tree hash over the leaves (audit.merkle), sorted by holder,
             padded with dummy leaves (random holder, 0 units) to `size`, a power of two

`units` are the account's share of the receipt's pool in parts of UNITS (2**20): UNITS // size
per patient who named the account and was used in the round. The per-patient share depends on
the tree size only (a site constant, fixed per study), never on how many patients were used, so
a claim (which shows its units) reveals no count. A leaf of the round's pool P pays
floor(P * units / UNITS); the share of patients naming no account, of the padding and of
rounding stays in the pool (`remaining`, public).
The salt makes the holder hiding (an account cannot be guessed and checked) and unlinkable
across studies and rounds (a fresh salt per leaf).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from audit.merkle import MemoryTree, ProofError, leaf_hash, verify_inclusion
from audit.signing import canonical

UNITS = 2**20
MIN_SIZE = 8
#: The tree size a hospital uses unless it has more patients: a site constant, so the size
#: says nothing about how many patients a study used.
DEFAULT_SIZE = 256
HOLDER_PREFIX = b"reward-holder/1\x00"
SALT_BYTES = 32
CLAIM_ACCOUNT_PREFIX = "claim:"
#: The largest commitment size a receipt may give.
MAX_SIZE = 2**32
#: 64 lowercase hex digits (a SHA-256 digest in hex).
HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX64 = HEX64


class ClaimError(ValueError):
    """A claim does not hold against the commitment; the message names the field and why."""


def holder(salt: bytes, account: str) -> str:
    """The hiding digest that stands for `account` in one leaf."""
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt: must be {SALT_BYTES} bytes, got {len(salt)}")
    return hashlib.sha256(HOLDER_PREFIX + salt + account.encode()).hexdigest()


def leaf_data(holder_hex: str, units: int) -> bytes:
    """The leaf's bytes (hashed as an RFC 6962 leaf)."""
    return canonical({"holder": holder_hex, "units": units})


def claim_account(holder_hex: str) -> str:
    """The ledger account a claim credits: named by the holder, so the reward account stays hidden;
    whoever knows the leaf's (salt, account) opening can show it is theirs."""
    return CLAIM_ACCOUNT_PREFIX + holder_hex


def claim_amount(pool: int, units: int) -> int:
    """What a leaf of `units` is paid out of its round's `pool`."""
    return pool * units // UNITS


def padded_size(leaves: int, minimum: int = MIN_SIZE) -> int:
    """The smallest power of two >= max(leaves, minimum): the tree's size only moves at powers of
    two, and a hospital fixes it per study (`minimum`) so that one patient leaving between two
    rounds never changes it."""
    size = max(minimum, MIN_SIZE, leaves)
    return 1 << (size - 1).bit_length()


@dataclass(frozen=True)
class Opening:
    """What the hospital keeps for one real leaf, and hands to the patient who claims it."""

    account: str
    salt: str  # hex
    holder: str
    units: int
    index: int
    size: int
    root: str
    proof: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"account": self.account, "salt": self.salt, "holder": self.holder, "units": self.units,
                "index": self.index, "size": self.size, "root": self.root, "proof": list(self.proof)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Opening:
        proof = data["proof"]
        if not isinstance(proof, list):
            raise ValueError("proof: must be a list of hex hashes")
        return cls(account=str(data["account"]), salt=str(data["salt"]), holder=str(data["holder"]),
                   units=int(str(data["units"])), index=int(str(data["index"])),
                   size=int(str(data["size"])), root=str(data["root"]),
                   proof=tuple(str(p) for p in proof))


@dataclass(frozen=True)
class Commitment:
    """A receipt's public part (`root`, `size`) and the hospital's private openings."""

    root: str
    size: int
    openings: tuple[Opening, ...]

    def public(self) -> dict[str, object]:
        return {"root": self.root, "size": self.size}


def commit(weights: Mapping[str, int], *, minimum_size: int = DEFAULT_SIZE) -> Commitment:
    """Commit to `weights` ({account: patients used who named it}, each >= 0).

    Accounts are hidden behind fresh 32-byte salts; dummy leaves pad the tree to a power of two
    (at least `minimum_size`), so neither the accounts nor their number leave the hospital. No
    account at all gives a tree of dummies (the receipt looks the same).
    """
    positive = {account: w for account, w in weights.items() if w > 0}
    size = padded_size(sum(positive.values()), minimum_size)
    each = UNITS // size
    units = {account: w * each for account, w in positive.items()}
    rows: list[tuple[str, int, str | None, str]] = []
    for account, share in units.items():
        salt = secrets.token_bytes(SALT_BYTES)
        rows.append((holder(salt, account), share, account, salt.hex()))
    for _ in range(size - len(positive)):
        rows.append((secrets.token_hex(32), 0, None, ""))
    rows.sort()
    tree = MemoryTree([leaf_hash(leaf_data(h, u)) for h, u, _, _ in rows])
    root = tree.root().hex()
    openings = tuple(
        Opening(account=account, salt=salt, holder=h, units=u, index=i, size=size, root=root,
                proof=tuple(p.hex() for p in tree.inclusion_proof(i)))
        for i, (h, u, account, salt) in enumerate(rows) if account is not None)
    return Commitment(root=root, size=size, openings=openings)


def check_public(value: object, name: str = "rewards") -> dict[str, object]:
    """Validate a receipt's `rewards` object {"root": 64 hex, "size": power of two >= MIN_SIZE}."""
    if not isinstance(value, dict) or len(value) != 2 or "root" not in value or "size" not in value:
        raise ValueError(f"{name}: must be an object with exactly 'root' and 'size'")
    root, size = value["root"], value["size"]
    if not isinstance(root, str) or not _HEX64.fullmatch(root):
        raise ValueError(f"{name}.root: must be 64 lowercase hex digits")
    if type(size) is not int or size < MIN_SIZE or size & (size - 1) or size > MAX_SIZE:
        raise ValueError(f"{name}.size: must be a power of two in [{MIN_SIZE}, 2**32], got {size!r}")
    return {"root": root, "size": size}


def verify_leaf(root: str, size: int, holder_hex: str, units: int, *, index: int,
                proof: Sequence[str]) -> None:
    """Check one leaf's inclusion proof against a committed root; raise ClaimError naming why."""
    if not isinstance(holder_hex, str) or not _HEX64.fullmatch(holder_hex):
        raise ClaimError("holder: must be 64 lowercase hex digits")
    if type(units) is not int or not 1 <= units <= UNITS:
        raise ClaimError(f"units: must be an integer in [1, {UNITS}], got {units!r}")
    if type(index) is not int or not 0 <= index < size:
        raise ClaimError(f"index: must be an integer in [0, {size}), got {index!r}")
    if not isinstance(proof, list | tuple) or \
            not all(isinstance(p, str) and _HEX64.fullmatch(p) for p in proof):
        raise ClaimError("proof: must be a list of 64-hex-digit hashes")
    try:
        verify_inclusion(leaf_hash(leaf_data(holder_hex, units)), index, size,
                         [bytes.fromhex(p) for p in proof], bytes.fromhex(root))
    except ProofError as exc:
        raise ClaimError(f"proof: the leaf (holder, units) is not in the committed tree ({exc})") from None


def open_claim(salt_hex: str, account: str, opening_holder: str) -> None:
    """The claimant's own check that (salt, account) opens the holder (wrong account: refused)."""
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        raise ClaimError("salt: must be hex") from None
    if holder(salt, account) != opening_holder:
        raise ClaimError("account: the salt and account do not open this leaf's holder")
