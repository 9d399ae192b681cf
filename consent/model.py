"""The consent contract: a versioned, content-addressed, signed document about one pseudonym.

A contract holds one root `Provision` (a rule: permit or deny, under conditions) whose nested
provisions are exceptions to it, as in FHIR `Consent.provision`. Contracts are immutable values;
their content address is SHA-256 over the RFC 8785 canonical encoding of `to_json()`, so the
hospital, the coordinator and the auditor all get the same hash for the same contract.

Every list-valued field is normalized (codes canonicalized, duplicates removed, sorted): two
contracts that mean the same thing encode, and therefore hash, the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from audit.signing import Signer, b64decode, b64encode, canonical, key_id, sha256_hex, verify
from consent import duo
from consent.codes import DATA_CATEGORIES, normalize_category, normalize_icd10, normalize_region

__all__ = [
    "DATA_CATEGORIES",
    "Contract",
    "Period",
    "Provision",
    "SignedContract",
    "next_version",
    "revoke",
    "sign",
]

FORMAT: Literal["consent-contract/1"] = "consent-contract/1"
SIGNED_FORMAT: Literal["consent-contract-signed/1"] = "consent-contract-signed/1"

Status = Literal[
    "active", "inactive", "draft", "proposed", "rejected", "entered-in-error", "not-done", "unknown"
]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


Instant = Annotated[AwareDatetime, AfterValidator(_utc)]
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]*$")]
HexHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class _Model(BaseModel):
    """Immutable, no unknown fields: a typo in a contract is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A validated copy: pydantic's own `model_copy` neither validates `update` nor drops cached
        values, so a copied contract would keep its old `content_hash`."""
        data = self.model_dump()
        data.update(update or {})
        return self.model_validate(data)


class Period(_Model):
    """A closed interval [start, end] (FHIR Period semantics: both ends inclusive, either open)."""

    start: Instant | None = None
    end: Instant | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Period:
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError("period.end is before period.start")
        return self

    def contains(self, instant: datetime) -> bool:
        return (self.start is None or self.start <= instant) and (self.end is None or instant <= self.end)

    def within(self, other: Period) -> bool:
        """True when this whole period lies inside `other` (an open end here fits only an open end there)."""
        start_ok = other.start is None or (self.start is not None and other.start <= self.start)
        end_ok = other.end is None or (self.end is not None and self.end <= other.end)
        return start_ok and end_ok


def _sorted_unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


class Provision(_Model):
    """A rule: `type` applies when every stated condition matches; nested provisions are exceptions.

    An empty condition list means "any". Conditions: purposes (DUO permission terms; a DS term
    needs `diseases`, ICD-10), modifiers (DUO data use modifiers, permit rules only), data
    categories, organisations, regions (ISO 3166-1 alpha-2), projects and users (for the PS/US
    modifiers), commercial (None: either; True: only commercial use; False: only non-commercial
    use), period (when the rule is in force) and, for MOR, the moratorium date.
    """

    type: Literal["permit", "deny"]
    purposes: tuple[str, ...] = ()
    diseases: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    data_categories: tuple[str, ...] = ()
    organisations: tuple[Identifier, ...] = ()
    regions: tuple[str, ...] = ()
    projects: tuple[Identifier, ...] = ()
    users: tuple[Identifier, ...] = ()
    commercial: StrictBool | None = None
    period: Period | None = None
    moratorium_until: Instant | None = None
    provisions: tuple[Provision, ...] = ()

    @field_validator("purposes", mode="after")
    @classmethod
    def _purposes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for value in values:
            term = duo.normalize(value)
            if term not in duo.PERMISSIONS:
                raise ValueError(
                    f"{value!r} is a DUO {duo.TERMS[term].kind}, not a data use permission "
                    f"(one of {', '.join(sorted(duo.label(t) for t in duo.PERMISSIONS))})"
                )
            out.append(term)
        return _sorted_unique(tuple(out))

    @field_validator("modifiers", mode="after")
    @classmethod
    def _modifiers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for value in values:
            term = duo.normalize(value)
            if term in duo.UNSUPPORTED_MODIFIERS:
                raise ValueError(f"{value!r} is not supported: {duo.UNSUPPORTED_MODIFIERS[term]}")
            if term not in duo.SUPPORTED_MODIFIERS:
                raise ValueError(f"{value!r} is a DUO {duo.TERMS[term].kind}, not a data use modifier")
            out.append(term)
        return _sorted_unique(tuple(out))

    @field_validator("diseases", mode="after")
    @classmethod
    def _diseases(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _sorted_unique(tuple(normalize_icd10(v) for v in values))

    @field_validator("regions", mode="after")
    @classmethod
    def _regions(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _sorted_unique(tuple(normalize_region(v) for v in values))

    @field_validator("data_categories", mode="after")
    @classmethod
    def _categories(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _sorted_unique(tuple(normalize_category(v) for v in values))

    @field_validator("organisations", "projects", "users", mode="after")
    @classmethod
    def _identifiers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _sorted_unique(values)

    @model_validator(mode="after")
    def _consistent(self) -> Provision:
        mods = set(self.modifiers)
        if self.diseases and duo.DS not in self.purposes:
            raise ValueError("diseases: only meaningful with the DS purpose (DUO:0000007)")
        if duo.DS in self.purposes and not self.diseases:
            raise ValueError("diseases: the DS purpose (DUO:0000007) needs at least one ICD-10 disease")
        if mods and self.type == "deny":
            raise ValueError("modifiers: DUO modifiers restrict a permission; a deny rule cannot carry them")
        needs = [
            (duo.GS, self.regions, "regions"),
            (duo.IS, self.organisations, "organisations"),
            (duo.PS, self.projects, "projects"),
            (duo.US, self.users, "users"),
        ]
        for term, values, field in needs:
            if term in mods and not values:
                raise ValueError(f"{field}: the {duo.label(term)} modifier needs the allowed {field}")
        if duo.TS in mods and (self.period is None or self.period.end is None):
            raise ValueError("period: the TS (time limit on use) modifier needs a period with an end")
        if duo.MOR in mods and self.moratorium_until is None:
            raise ValueError("moratorium_until: the MOR (publication moratorium) modifier needs a date")
        if self.moratorium_until is not None and duo.MOR not in mods:
            raise ValueError("moratorium_until: only meaningful with the MOR modifier (DUO:0000024)")
        if self.commercial is True and mods & {duo.NPU, duo.NCU, duo.NPUNCU}:
            raise ValueError("commercial: a rule for commercial use contradicts its NPU/NCU modifier")
        return self

    def walk(self, path: str = "provision") -> Iterator[tuple[str, Provision]]:
        """Every node with its path (`provision.provisions[1].provisions[0]`), depth first."""
        yield path, self
        for i, child in enumerate(self.provisions):
            yield from child.walk(f"{path}.provisions[{i}]")


class Contract(_Model):
    """One version of one pseudonym's consent at one hospital.

    `supersedes` is the content hash of the previous version (absent for version 1). Only an
    `active` contract can permit anything; `max_epsilon` is the patient's LIFETIME epsilon cap at
    the hospital (per patient, over every study: a study asking more is denied here, and the
    hospital's privacy ledger leaves the patient out of any study that would take their total
    past it, `federated.privacy_ledger`); `reward_account` is a pseudonymous account for the
    contributor's token share.
    `policy_basis` records the legal or policy references the consent was given under (FHIR
    policy / policyRule / policyBasis); they are informative and do not change any decision.
    """

    format: Literal["consent-contract/1"] = FORMAT
    contract_id: Identifier
    pseudonym: Identifier
    hospital: Identifier
    version: StrictInt = Field(ge=1, le=2**31)
    supersedes: HexHash | None = None
    issued: Instant
    issuer_key: KeyId | None = None
    status: Status = "active"
    period: Period | None = None
    max_epsilon: float | None = Field(default=None, gt=0)
    reward_account: Identifier | None = None
    policy_basis: tuple[str, ...] = ()
    provision: Provision

    @field_validator("max_epsilon", mode="after")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("max_epsilon must be a finite number")
        return value

    @model_validator(mode="after")
    def _chain(self) -> Contract:
        if self.version == 1 and self.supersedes is not None:
            raise ValueError("supersedes: version 1 supersedes nothing")
        if self.version > 1 and self.supersedes is None:
            raise ValueError(
                f"supersedes: version {self.version} must name the hash of the version it replaces"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON form that is hashed and signed (`exclude_none`, so absent and null agree)."""
        return self.model_dump(mode="json", exclude_none=True)

    @cached_property
    def canonical_bytes(self) -> bytes:
        return canonical(self.to_json())

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the RFC 8785 encoding: the contract's address everywhere."""
        return sha256_hex(self.canonical_bytes)

    def permits_nothing(self) -> bool:
        """True for a revocation (or any contract without a permit rule) and for inactive ones."""
        return self.status != "active" or all(node.type == "deny" for _, node in self.provision.walk())

    @classmethod
    def from_json(cls, data: dict[str, Any] | str | bytes) -> Contract:
        if isinstance(data, str | bytes):
            return cls.model_validate_json(data)
        return cls.model_validate(data)


class SignedContract(_Model):
    """A contract with the issuer's Ed25519 signature over its canonical encoding."""

    format: Literal["consent-contract-signed/1"] = SIGNED_FORMAT
    contract: Contract
    public_key: str
    signature: str

    def verify(self, trusted_key: bytes | None = None) -> Contract:
        """Check the signature (and, if given, that it is by `trusted_key`); return the contract.

        Raises `SignatureInvalidError` or ValueError naming what does not match.
        """
        public = b64decode(self.public_key)
        if trusted_key is not None and public != trusted_key:
            raise ValueError("public_key: not the trusted issuer key")
        if self.contract.issuer_key != key_id(public):
            raise ValueError("contract.issuer_key: does not match the signing public key")
        verify(public, self.contract.canonical_bytes, b64decode(self.signature))
        return self.contract

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "contract": self.contract.to_json(),
            "public_key": self.public_key,
            "signature": self.signature,
        }


def sign(contract: Contract, signer: Signer) -> SignedContract:
    """Stamp the issuer key id into the contract and sign its canonical encoding."""
    stamped = contract.model_copy(update={"issuer_key": signer.key_id})
    return SignedContract(
        contract=stamped,
        public_key=signer.public_key_b64,
        signature=b64encode(signer.sign(stamped.canonical_bytes)),
    )


def next_version(previous: Contract, provision: Provision, issued: datetime, **changes: Any) -> Contract:
    """The version after `previous`: same id, pseudonym and hospital, superseding its hash."""
    if issued < previous.issued:
        raise ValueError("issued: a new version cannot predate the one it supersedes")
    data = previous.model_dump()
    data.update(changes)
    data.update(
        version=previous.version + 1,
        supersedes=previous.content_hash,
        issued=issued,
        issuer_key=None,
        provision=provision,
    )
    return Contract.model_validate(data)


def revoke(previous: Contract, issued: datetime) -> Contract:
    """Revocation: a new version whose only rule is an unconditional deny (it permits nothing)."""
    return next_version(previous, Provision(type="deny"), issued)
