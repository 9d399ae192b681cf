"""Reading contract files: native contracts (signed or not) or FHIR Consents (R4/R5), told apart."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from audit.signing import SignatureInvalidError, b64decode
from audit.untrusted import UntrustedJSONError, load_json
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


#: Contracts nest provisions a few levels deep; far deeper is hostile (parsing recurses).
MAX_JSON_DEPTH = 64


def load_contract_file(path: Path, *, hospital: str | None = None) -> LoadedContract:
    """Read and parse one file. OSError / JSON errors become ContractFileError too."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ContractFileError(f"cannot read: {exc.strerror}") from exc
    try:
        data = load_json(raw, max_depth=MAX_JSON_DEPTH)
    except UntrustedJSONError as exc:
        raise ContractFileError(f"not JSON: {exc}") from exc
    return parse_contract(data, hospital=hospital)


def write_signed_jsonl(path: Path, contracts: Iterable[SignedContract]) -> int:
    """Write signed contracts as JSON lines (one canonical-order JSON object per line); return the count.

    The file is created with 0600 permissions and must not exist yet (contracts are never overwritten).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    count = 0
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for signed in contracts:
            handle.write(json.dumps(signed.to_json(), sort_keys=True, separators=(",", ":")) + "\n")
            count += 1
    return count


def read_signed_jsonl(path: Path, trusted_keys: Iterable[bytes] | None = None) -> list[Contract]:
    """Read and verify a JSON-lines file of signed contracts; errors name the line.

    With `trusted_keys`, each signature must also be by one of those public keys.
    """
    trusted = None if trusted_keys is None else set(trusted_keys)
    out: list[Contract] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractFileError(f"{path}: cannot read: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            signed = SignedContract.model_validate_json(line)
            contract = signed.verify()
            if trusted is not None and b64decode(signed.public_key) not in trusted:
                raise ValueError("public_key: not a trusted issuer key")
        except ValidationError as exc:
            raise ContractFileError(f"{path} line {number}: {'; '.join(_pydantic_reasons(exc))}") from exc
        except (SignatureInvalidError, ValueError) as exc:
            raise ContractFileError(f"{path} line {number}: {exc}") from exc
        out.append(contract)
    return out
