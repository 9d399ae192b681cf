"""`exchange node consent import FOLDER`: patients' consent contracts into the node store.

Input: every `*.json` file in the folder (not recursive), each holding one document or a
JSON list of documents; a document is a native contract (`consent-contract/1`), a signed
contract (`consent-contract-signed/1`, signature checked), or a FHIR Consent resource (R4 or
R5, mapped by `consent.fhir`; what cannot be mapped is refused with the reason). Reading
and validation are consent's own (`consent.files.parse_contract`).

The batch rule: all files are read and validated first; if ANY document is bad, nothing
from the whole batch is imported and every bad document is listed (file name, list index,
reason). A batch is one transaction. Why all-or-nothing: a batch is typically one export
from the hospital's consent system, and importing part of it would leave some patients on an
old version while the steward believes the export is in force.

Signatures: every contract is stored signed. One that arrives signed keeps its issuer's
signature; one that arrives unsigned (native or FHIR) is signed with the node key on import
(which stamps the node's key id into it, so its stored hash differs from the hash it arrived
with; both are kept, and a later unsigned version that names the hash it arrived with is
re-pointed to the stored one). The ClientApp reads only signed contracts.

Versions: every version is kept (never updated, never deleted). A document identical to
one already held (same hash, as received or as stored) is skipped and counted as unchanged. Version N > 1
must name, in `supersedes`, the hash of version N-1 of the same pseudonym (held already or
in the same batch); a different document under a version number already held is refused.
A contract for another hospital is refused (a FHIR Consent naming another hospital's
Organization too: consent.fhir refuses it).

FHIR Consent updates: a Consent exported again after a change (same id, a new
`meta.versionId`, `meta.lastUpdated` or status) is mapped again as the next version of the
pseudonym's chain, so the consent system stays the source of truth and a steward never writes
`supersedes` by hand; status `inactive` or `rejected` makes that version permit nothing (a
revocation). The Consent's meta is kept with the version, so an older copy imported later
changes nothing rather than undoing the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit.signing import Signer
from audit.untrusted import UntrustedJSONError, load_json
from consent.fhir import FhirImportError, from_fhir
from consent.files import MAX_JSON_DEPTH, parse_contract
from consent.model import SIGNED_FORMAT, Contract, SignedContract, revoke, sign
from consent.request import StudyRequest
from exchange.node.models import ConsentContractRow
from exchange.node.policy import StudyView
from exchange.study.spec import consent_request


class ConsentImportRejectedError(Exception):
    """Nothing was imported; `problems` lists (document, reason) for every bad document."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(f"nothing imported: {len(problems)} bad document(s): "
                         + "; ".join(f"{name}: {reason}" for name, reason in problems[:20]))


@dataclass
class ConsentImportReport:
    new_versions: int
    unchanged: int
    pseudonyms: int


def parse_document(document: Any, hospital_id: str | None) -> Contract:
    """One document -> a validated Contract, by consent's reader (native, signed or FHIR
    Consent R4/R5); raises ValueError (consent.files.ContractFileError) naming every problem."""
    return parse_contract(document, hospital=hospital_id).contract


def _read_folder(folder: Path) -> list[tuple[str, Any]]:
    if not folder.is_dir():
        raise ConsentImportRejectedError([(str(folder), "not a folder")])
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ConsentImportRejectedError([(str(folder), "no *.json files")])
    documents: list[tuple[str, Any]] = []
    problems: list[tuple[str, str]] = []
    for path in files:
        try:
            data = load_json(path.read_bytes(), max_depth=MAX_JSON_DEPTH)
        except OSError as exc:
            problems.append((path.name, f"not readable: {exc.strerror}"))
            continue
        except UntrustedJSONError as exc:
            problems.append((path.name, f"not readable JSON: {exc}"))
            continue
        if isinstance(data, list):
            documents.extend((f"{path.name}[{i}]", item) for i, item in enumerate(data))
        else:
            documents.append((path.name, data))
    if problems:
        raise ConsentImportRejectedError(problems)
    return documents


@dataclass(frozen=True)
class _Document:
    """One validated document of a batch; `fhir` is the Consent resource when it was one (an
    update of a Consent already held is rebuilt from it as the next version)."""

    name: str
    contract: Contract
    signed: dict[str, Any] | None
    fhir: dict[str, Any] | None = None
    version_id: str | None = None
    last_updated: datetime | None = None


@dataclass
class _Held:
    """One version of a pseudonym's chain, held or added by this batch."""

    version: int
    contract: Contract
    received: str
    version_id: str | None
    last_updated: datetime | None


def _meta(resource: dict[str, Any]) -> tuple[str | None, datetime | None]:
    """A FHIR resource's meta.versionId and meta.lastUpdated (validated by then)."""
    raw = resource.get("meta")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    version_id = meta.get("versionId")
    updated = meta.get("lastUpdated")
    when = None
    if isinstance(updated, str):
        try:
            when = datetime.fromisoformat(updated.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return (str(version_id) if version_id is not None else None), when


def _meaning(contract: Contract) -> dict[str, Any]:
    """What a contract says, without its place in the chain or its signer: two versions with
    the same meaning are the same consent."""
    data = contract.to_json()
    for key in ("version", "supersedes", "issuer_key"):
        data.pop(key, None)
    return data


def import_consent_folder(session: Session, folder: Path, hospital_id: str | None,
                          signer: Signer) -> ConsentImportReport:
    """Validate every document in `folder`, then add the new versions in the caller's
    transaction; raise ConsentImportRejectedError (nothing written) on any bad document.
    Unsigned documents are signed with `signer` (the node key) as they are stored.

    A FHIR Consent whose pseudonym already has a contract becomes that contract's next version
    when it says something new (a new status, provisions or period; `inactive` or `rejected`
    revokes); one that says what the current version says is unchanged. Its `meta.versionId`
    and `meta.lastUpdated` order the updates of one Consent: a copy older than the version held
    (an old export imported again) changes nothing, and never re-activates a revoked consent."""
    documents = _read_folder(folder)
    problems: list[tuple[str, str]] = []
    parsed: list[_Document] = []
    for name, document in documents:
        try:
            contract = parse_document(document, hospital_id)
        except ValueError as exc:
            problems.append((name, str(exc)))
            continue
        if hospital_id is not None and contract.hospital != hospital_id:
            problems.append((name, f"hospital: contract is for {contract.hospital!r}, this node is "
                                   f"{hospital_id!r}"))
            continue
        if document.get("resourceType") == "Consent":
            version_id, last_updated = _meta(document)
            parsed.append(_Document(name, contract, None, document, version_id, last_updated))
        else:
            parsed.append(_Document(name, contract,
                                    document if document.get("format") == SIGNED_FORMAT else None))
    # (pseudonym, version) -> (hash as stored, hash as received)
    held_rows = session.execute(select(ConsentContractRow)).scalars().all()
    held: dict[tuple[str, int], tuple[str, str]] = {
        (r.pseudonym, r.version): (r.contract_hash, r.source_hash) for r in held_rows}
    known = dict(held)
    fhir_pseudonyms = {d.contract.pseudonym for d in parsed if d.fhir is not None}
    chains: dict[str, list[_Held]] = {}
    for r in sorted(held_rows, key=lambda row: row.version):
        if r.pseudonym in fhir_pseudonyms:
            chains.setdefault(r.pseudonym, []).append(_Held(
                r.version, Contract.model_validate(r.document), r.source_hash, r.fhir_version_id,
                r.fhir_last_updated if r.fhir_last_updated is None or r.fhir_last_updated.tzinfo
                else r.fhir_last_updated.replace(tzinfo=UTC)))
    new: list[tuple[_Document, Contract, SignedContract, str]] = []
    unchanged = 0
    natives = [d for d in parsed if d.fhir is None]
    for doc in sorted(natives, key=lambda d: (d.contract.pseudonym, d.contract.version)):
        contract, signed_doc, name = doc.contract, doc.signed, doc.name
        key = (contract.pseudonym, contract.version)
        digest = contract.content_hash
        if key in known:
            if digest in known[key]:
                unchanged += key in held
                continue
            problems.append((name, f"version {contract.version} of pseudonym {contract.pseudonym!r} is "
                                   "already held with different content (versions are immutable)"))
            continue
        to_store = contract
        if contract.version > 1:
            previous = known.get((contract.pseudonym, contract.version - 1))
            if previous is None:
                problems.append((name, f"supersedes: version {contract.version - 1} of pseudonym "
                                       f"{contract.pseudonym!r} is neither held nor in this batch"))
                continue
            if contract.supersedes not in previous:
                problems.append((name, f"supersedes: {contract.supersedes} is not the hash of version "
                                       f"{contract.version - 1} ({previous[0]})"))
                continue
            if contract.supersedes != previous[0]:
                if signed_doc is not None:
                    problems.append((name, "supersedes: names the previous version as received, but that "
                                           "version was re-signed by this node; re-sign this one too"))
                    continue
                to_store = contract.model_copy(update={"supersedes": previous[0]})
        envelope = (SignedContract.model_validate(signed_doc) if signed_doc is not None
                    else sign(Contract.model_validate(to_store.model_dump()), signer))
        stored = envelope.contract
        known[key] = (stored.content_hash, digest)
        new.append((doc, stored, envelope, digest))
    fhir_docs = sorted((d for d in parsed if d.fhir is not None), key=_fhir_order)
    for doc in fhir_docs:
        chain = chains.setdefault(doc.contract.pseudonym, [])
        outcome = _fhir_version(doc, chain, hospital_id)
        if isinstance(outcome, str):
            problems.append((doc.name, outcome))
            continue
        if outcome is None:
            unchanged += 1
            continue
        envelope = sign(outcome, signer)
        stored = envelope.contract
        chain.append(_Held(stored.version, stored, outcome.content_hash, doc.version_id, doc.last_updated))
        new.append((doc, stored, envelope, outcome.content_hash))
    if problems:
        raise ConsentImportRejectedError(sorted(problems))
    now = datetime.now(UTC)
    for doc, stored, envelope, received in new:
        session.add(ConsentContractRow(contract_hash=stored.content_hash, source_hash=received,
                                       pseudonym=stored.pseudonym, version=stored.version,
                                       document=stored.to_json(), signed=envelope.to_json(),
                                       source=f"{folder.name}/{doc.name}", imported_at=now,
                                       fhir_version_id=doc.version_id,
                                       fhir_last_updated=doc.last_updated))
    session.flush()
    return ConsentImportReport(new_versions=len(new), unchanged=unchanged,
                               pseudonyms=len({c.pseudonym for _, c, _e, _r in new}))


def _fhir_order(doc: _Document) -> tuple[str, datetime, int, str, str]:
    """Updates of one patient's Consent in the order they were made: by meta.lastUpdated, then
    a numeric meta.versionId, then the file name."""
    version_id = doc.version_id or ""
    number = int(version_id) if version_id.isdigit() else -1
    oldest = datetime.min.replace(tzinfo=UTC)
    return (doc.contract.pseudonym, doc.last_updated or oldest, number, version_id, doc.name)


def _older(doc: _Document, held: _Held) -> bool:
    """True when the document is an earlier state of the Consent than `held` by its meta."""
    if doc.last_updated is not None and held.last_updated is not None:
        return doc.last_updated < held.last_updated
    if doc.version_id and held.version_id and doc.version_id.isdigit() and held.version_id.isdigit():
        return int(doc.version_id) < int(held.version_id)
    return False


def _fhir_version(doc: _Document, chain: list[_Held], hospital_id: str | None) -> Contract | str | None:
    """The contract version a FHIR Consent adds to its pseudonym's chain: a Contract to store,
    None when it changes nothing, or the reason it is refused."""
    contract = doc.contract
    if not chain:
        return contract
    latest = chain[-1]
    meaning = _meaning(contract)
    same_consent = [h for h in chain if h.contract.contract_id == contract.contract_id]
    if doc.version_id is not None:
        for h in same_consent:
            if h.version_id == doc.version_id:
                if _meaning(h.contract) == meaning:
                    return None
                return (f"meta.versionId {doc.version_id} of Consent/{contract.contract_id} is already "
                        "held with different content; an update needs a new meta.versionId")
    if meaning == _meaning(latest.contract):
        return None
    if any(_older(doc, h) for h in same_consent):
        if any(_meaning(h.contract) == meaning for h in same_consent):
            return None  # an old export imported again: that state is held already
        newest = same_consent[-1]
        return (f"Consent/{contract.contract_id} is older (meta.lastUpdated "
                f"{doc.last_updated.isoformat() if doc.last_updated else '-'}, versionId "
                f"{doc.version_id or '-'}) than version {newest.version} held (meta.lastUpdated "
                f"{newest.last_updated.isoformat() if newest.last_updated else '-'}, versionId "
                f"{newest.version_id or '-'}); it would undo a newer update")
    earlier = [h for h in chain[:-1] if _meaning(h.contract) == meaning]
    if earlier and doc.version_id is None and doc.last_updated is None:
        return (f"says what version {earlier[-1].version} said, which version {latest.version} replaced; "
                "without a newer meta.versionId or meta.lastUpdated it cannot be told from an old copy "
                "(give it one to make it current again)")
    try:
        assert doc.fhir is not None
        return from_fhir(doc.fhir, hospital=hospital_id, previous=latest.contract)
    except FhirImportError as exc:
        return "; ".join(exc.reasons)


# --- the steward's view and revocation --------------------------------------------------------

@dataclass(frozen=True)
class ConsentSummary:
    """A pseudonym's current contract version, for `exchange node consent list`."""

    pseudonym: str
    contract_id: str
    version: int
    versions: int
    status: str
    permits: bool
    imported_at: datetime
    source: str


def current_consents(session: Session) -> list[ConsentSummary]:
    """Every pseudonym's newest contract version, ordered by pseudonym."""
    rows = session.execute(select(ConsentContractRow).order_by(
        ConsentContractRow.pseudonym, ConsentContractRow.version)).scalars().all()
    latest: dict[str, ConsentContractRow] = {}
    counts: dict[str, int] = {}
    for row in rows:
        latest[row.pseudonym] = row
        counts[row.pseudonym] = counts.get(row.pseudonym, 0) + 1
    out = []
    for pseudonym, row in latest.items():
        contract = Contract.model_validate(row.document)
        out.append(ConsentSummary(pseudonym, contract.contract_id, row.version, counts[pseudonym],
                                  contract.status, not contract.permits_nothing(), row.imported_at,
                                  row.source))
    return out


class RevocationError(ValueError):
    """A revocation that cannot be made (no contract for the pseudonym); nothing was stored."""


def revoke_consent(session: Session, pseudonym: str, signer: Signer,
                   at: datetime | None = None) -> Contract:
    """Store, signed with the node key, a new version of `pseudonym`'s contract that permits
    nothing (consent.model.revoke): what a steward does when a patient withdraws in person."""
    rows = session.execute(select(ConsentContractRow).where(ConsentContractRow.pseudonym == pseudonym)
                           .order_by(ConsentContractRow.version.desc()).limit(1)).scalars().all()
    if not rows:
        raise RevocationError(f"no consent contract is held for pseudonym {pseudonym!r}")
    previous = Contract.model_validate(rows[0].document)
    when = max(at or datetime.now(UTC), previous.issued)
    envelope = sign(revoke(previous, when), signer)
    stored = envelope.contract
    session.add(ConsentContractRow(contract_hash=stored.content_hash, source_hash=stored.content_hash,
                                   pseudonym=pseudonym, version=stored.version, document=stored.to_json(),
                                   signed=envelope.to_json(), source="revoked by the steward",
                                   imported_at=datetime.now(UTC)))
    session.flush()
    return stored


# --- evaluation -----------------------------------------------------------------------------

def study_request(study: StudyView) -> StudyRequest:
    """The consent engine's view of a study: `exchange.study.spec.consent_request`, the same
    request the study's training evaluates each contract against."""
    return consent_request(study.accepted())
