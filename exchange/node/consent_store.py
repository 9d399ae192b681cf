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

Versions: every version is kept (never updated, never deleted). A document identical to
one already held (same content hash) is skipped and counted as unchanged. Version N > 1
must name, in `supersedes`, the hash of version N-1 of the same pseudonym (held already or
in the same batch); a different document under a version number already held is refused.
A contract for another hospital is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from consent.evaluate import evaluate
from consent.files import parse_contract
from consent.model import Contract
from consent.request import StudyRequest
from exchange.node.models import ConsentContractRow
from exchange.node.policy import StudyView


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
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append((path.name, f"not readable JSON: {exc}"))
            continue
        if isinstance(data, list):
            documents.extend((f"{path.name}[{i}]", item) for i, item in enumerate(data))
        else:
            documents.append((path.name, data))
    if problems:
        raise ConsentImportRejectedError(problems)
    return documents


def import_consent_folder(session: Session, folder: Path,
                          hospital_id: str | None = None) -> ConsentImportReport:
    """Validate every document in `folder`, then add the new versions in the caller's
    transaction; raise ConsentImportRejectedError (nothing written) on any bad document."""
    documents = _read_folder(folder)
    problems: list[tuple[str, str]] = []
    parsed: list[tuple[str, Contract]] = []
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
        parsed.append((name, contract))
    held: dict[tuple[str, int], str] = {
        (p, v): h for p, v, h in session.execute(select(ConsentContractRow.pseudonym,
                                                        ConsentContractRow.version,
                                                        ConsentContractRow.contract_hash)).tuples().all()}
    known = dict(held)
    new: list[tuple[str, Contract]] = []
    unchanged = 0
    for name, contract in sorted(parsed, key=lambda item: (item[1].pseudonym, item[1].version)):
        key = (contract.pseudonym, contract.version)
        digest = contract.content_hash
        if key in known:
            if known[key] == digest:
                unchanged += key in held
                continue
            problems.append((name, f"version {contract.version} of pseudonym {contract.pseudonym!r} is "
                                   "already held with different content (versions are immutable)"))
            continue
        if contract.version > 1:
            previous = known.get((contract.pseudonym, contract.version - 1))
            if previous is None:
                problems.append((name, f"supersedes: version {contract.version - 1} of pseudonym "
                                       f"{contract.pseudonym!r} is neither held nor in this batch"))
                continue
            if contract.supersedes != previous:
                problems.append((name, f"supersedes: {contract.supersedes} is not the hash of version "
                                       f"{contract.version - 1} ({previous})"))
                continue
        known[key] = digest
        new.append((name, contract))
    if problems:
        raise ConsentImportRejectedError(sorted(problems))
    now = datetime.now(UTC)
    for name, contract in new:
        session.add(ConsentContractRow(contract_hash=contract.content_hash, pseudonym=contract.pseudonym,
                                       version=contract.version, document=contract.to_json(),
                                       source=f"{folder.name}/{name}", imported_at=now))
    session.flush()
    return ConsentImportReport(new_versions=len(new), unchanged=unchanged,
                               pseudonyms=len({c.pseudonym for _, c in new}))


# --- evaluation -----------------------------------------------------------------------------

def study_request(study: StudyView) -> StudyRequest:
    """The consent engine's view of a study."""
    spec = study.raw.get("spec", {}) if isinstance(study.raw.get("spec"), dict) else {}
    return StudyRequest(purpose=study.purpose, disease=study.disease, organisation=study.organisation,
                        region=study.region, commercial=study.commercial,
                        ethics_approval=bool(spec.get("ethics_approval", False)),
                        data_categories=tuple(sorted(study.columns)),
                        epsilon=study.epsilon or None, study_id=study.study_id)


def evaluate_contract(document: dict[str, Any], study: StudyView, at: datetime) -> str | None:
    """None when the contract permits the study at `at`, else the exclusion reason
    (consent.evaluate.Decision.exclusion: inactive, outside-validity, privacy-cap, denied,
    no-permit)."""
    return evaluate(Contract.model_validate(document), study_request(study), at).exclusion
