"""Reading contract files: native contracts (signed or not) or FHIR Consents (R4/R5), told apart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from audit.signing import SignatureInvalidError
from consent.fhir import FhirImportError, detect_version, from_fhir
from consent.model import SIGNED_FORMAT, Contract, SignedContract


class ContractFileError(ValueError):
    """A file that is not a usable contract; the message names the file and every reason."""


@dataclass(frozen=True)
class LoadedContract:
    contract: Contract
    kind: str  # "native", "native-signed", "fhir-R4" or "fhir-R5"


def _pydantic_reasons(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in exc.errors()
    ]


def parse_contract(data: Any, *, hospital: str | None = None) -> LoadedContract:
    """Turn parsed JSON into a contract; raise ContractFileError with every reason otherwise."""
    if not isinstance(data, dict):
        raise ContractFileError("not a JSON object")
    try:
        if data.get("resourceType") == "Consent":
            version = detect_version(data)
            return LoadedContract(from_fhir(data, hospital=hospital, version=version), f"fhir-{version}")
        if data.get("format") == SIGNED_FORMAT:
            signed = SignedContract.model_validate(data)
            return LoadedContract(signed.verify(), "native-signed")
        return LoadedContract(Contract.model_validate(data), "native")
    except FhirImportError as exc:
        raise ContractFileError("; ".join(exc.reasons)) from exc
    except ValidationError as exc:
        raise ContractFileError("; ".join(_pydantic_reasons(exc))) from exc
    except SignatureInvalidError as exc:
        raise ContractFileError(f"signature: {exc}") from exc
    except ValueError as exc:  # key mismatch, bad base64
        raise ContractFileError(str(exc)) from exc


def load_contract_file(path: Path, *, hospital: str | None = None) -> LoadedContract:
    """Read and parse one file. OSError / JSON errors become ContractFileError too."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractFileError(f"cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractFileError(f"not JSON: {exc}") from exc
    return parse_contract(data, hospital=hospital)
