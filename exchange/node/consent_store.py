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
A contract for another hospital is refused.
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
from consent.files import MAX_JSON_DEPTH, parse_contract
from consent.model import SIGNED_FORMAT, Contract, SignedContract, sign
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


def import_consent_folder(session: Session, folder: Path, hospital_id: str | None,
                          signer: Signer) -> ConsentImportReport:
    """Validate every document in `folder`, then add the new versions in the caller's
    transaction; raise ConsentImportRejectedError (nothing written) on any bad document.
    Unsigned documents are signed with `signer` (the node key) as they are stored."""
    documents = _read_folder(folder)
    problems: list[tuple[str, str]] = []
    parsed: list[tuple[str, Contract, dict[str, Any] | None]] = []
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
        parsed.append((name, contract, document if document.get("format") == SIGNED_FORMAT else None))
    # (pseudonym, version) -> (hash as stored, hash as received)
    held: dict[tuple[str, int], tuple[str, str]] = {
        (p, v): (h, src) for p, v, h, src in session.execute(
            select(ConsentContractRow.pseudonym, ConsentContractRow.version,
                   ConsentContractRow.contract_hash, ConsentContractRow.source_hash)).tuples().all()}
    known = dict(held)
    new: list[tuple[str, Contract, SignedContract, str]] = []
    unchanged = 0
    for name, contract, signed_doc in sorted(parsed, key=lambda item: (item[1].pseudonym, item[1].version)):
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
        new.append((name, stored, envelope, digest))
    if problems:
        raise ConsentImportRejectedError(sorted(problems))
    now = datetime.now(UTC)
    for name, stored, envelope, received in new:
        session.add(ConsentContractRow(contract_hash=stored.content_hash, source_hash=received,
                                       pseudonym=stored.pseudonym, version=stored.version,
                                       document=stored.to_json(), signed=envelope.to_json(),
                                       source=f"{folder.name}/{name}", imported_at=now))
    session.flush()
    return ConsentImportReport(new_versions=len(new), unchanged=unchanged,
                               pseudonyms=len({c.pseudonym for _, c, _e, _r in new}))


# --- evaluation -----------------------------------------------------------------------------

def study_request(study: StudyView) -> StudyRequest:
    """The consent engine's view of a study: `exchange.study.spec.consent_request`, the same
    request the study's training evaluates each contract against."""
    return consent_request(study.accepted())
