"""`exchange consent ...`: a steward's checks of consent contracts (the logic lives in `consent`)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from audit.signing import Signer
from audit.untrusted import printable
from consent.evaluate import evaluate
from consent.files import ContractFileError, load_contract_file
from consent.model import sign
from consent.request import StudyRequest

app = typer.Typer(
    help="Check and validate consent contracts (native or FHIR Consent R4/R5).", no_args_is_help=True
)


def _instant(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 date-time", param_hint="--at") from exc
    if value.tzinfo is None:
        raise typer.BadParameter("needs a time zone (e.g. 2027-01-01T00:00:00Z)", param_hint="--at")
    return value.astimezone(UTC)


@app.command("check")
def check(  # noqa: PLR0917 (Typer maps parameters to options)
    contract_file: Annotated[
        Path, typer.Argument(help="A native contract (signed or not) or a FHIR Consent.")
    ],
    purpose: Annotated[str, typer.Option(help=(
        "Study purpose, a DUO term: DUO:0000042 (GRU), HMB, DS, POA; or MDS (methods development "
        "alone, as the DUOS matcher)."))],
    org: Annotated[str, typer.Option(help="Requesting organisation id.")],
    region: Annotated[str, typer.Option(help="The organisation's region, ISO 3166-1 alpha-2.")],
    disease: Annotated[str | None, typer.Option(help="ICD-10 code, required for DS.")] = None,
    commercial: Annotated[
        bool, typer.Option("--commercial", help="Commercial purpose or for-profit org.")
    ] = False,
    irb: Annotated[bool, typer.Option("--irb", help="Ethics (IRB/ERB) approval present.")] = False,
    methods: Annotated[bool, typer.Option("--methods", help="The study develops methods (with DS: on "
                                          "that disease); an NMDS consent then needs a disease match.")
                       ] = False,
    categories: Annotated[str, typer.Option(help="Comma-separated data categories.")] = "diagnoses",
    epsilon: Annotated[float | None, typer.Option(help="Per-study epsilon asked.")] = None,
    at: Annotated[
        str | None, typer.Option(help="Instant to evaluate at (default: now), ISO 8601 with zone.")
    ] = None,
    hospital: Annotated[
        str | None, typer.Option(help="Hospital id for a FHIR Consent without custodian.")
    ] = None,
) -> None:
    """Evaluate one contract against a study; print {"decision", "reasons"}. Exit 0 for permit or deny."""
    instant = _instant(at)
    try:
        request = StudyRequest(
            purpose=purpose,
            disease=disease,
            organisation=org,
            region=region,
            commercial=commercial,
            ethics_approval=irb,
            methods_development=methods,
            data_categories=tuple(c.strip() for c in categories.split(",") if c.strip()),
            epsilon=epsilon,
        )
    except (ValidationError, ValueError) as exc:
        reasons = (
            [f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()]
            if isinstance(exc, ValidationError)
            else [str(exc)]
        )
        typer.echo("invalid study: " + "; ".join(reasons), err=True)
        raise typer.Exit(2) from exc
    try:
        loaded = load_contract_file(contract_file, hospital=hospital)
    except ContractFileError as exc:
        typer.echo(f"{contract_file}: {printable(str(exc))}", err=True)
        raise typer.Exit(2) from exc
    decision = evaluate(loaded.contract, request, instant)
    out = decision.to_json()
    out["contract"] = loaded.contract.content_hash
    out["kind"] = loaded.kind
    out["at"] = instant.isoformat().replace("+00:00", "Z")
    typer.echo(json.dumps(out, indent=2))


@app.command("validate")
def validate(
    folder: Annotated[Path, typer.Argument(help="A folder of *.json contracts and FHIR Consents.")],
    hospital: Annotated[
        str | None, typer.Option(help="Hospital id for FHIR Consents without custodian.")
    ] = None,
) -> None:
    """Check every *.json file; report each bad one with its reason. Exit 1 if any is bad, 2 if no folder."""
    if not folder.is_dir():
        typer.echo(f"{folder}: not a folder", err=True)
        raise typer.Exit(2)
    files = sorted(folder.rglob("*.json"))
    bad = 0
    for path in files:
        try:
            loaded = load_contract_file(path, hospital=hospital)
        except ContractFileError as exc:
            bad += 1
            typer.echo(f"BAD {path}: {printable(str(exc))}")
            continue
        typer.echo(f"ok  {path}: {loaded.kind} {loaded.contract.content_hash}")
    typer.echo(f"{len(files)} files, {bad} bad")
    if bad:
        raise typer.Exit(1)


@app.command("sign")
def sign_file(
    contract_file: Annotated[Path, typer.Argument(help="A native contract or a FHIR Consent to sign.")],
    key: Annotated[Path, typer.Option(help="The issuer's Ed25519 key file (0600).")],
    out: Annotated[Path, typer.Option(help="Where to write the signed contract (must not exist).")],
    hospital: Annotated[
        str | None, typer.Option(help="Hospital id for a FHIR Consent without custodian.")
    ] = None,
) -> None:
    """Sign a contract (a FHIR Consent is imported first); write the signed contract JSON (0600)."""
    try:
        loaded = load_contract_file(contract_file, hospital=hospital)
    except ContractFileError as exc:
        typer.echo(f"{contract_file}: {printable(str(exc))}", err=True)
        raise typer.Exit(2) from exc
    try:
        signer = Signer.load(key)
    except (OSError, ValueError) as exc:
        typer.echo(f"--key {key}: {exc}", err=True)
        raise typer.Exit(2) from exc
    signed = sign(loaded.contract, signer)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        typer.echo(f"--out {out}: {exc}", err=True)
        raise typer.Exit(2) from exc
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(signed.to_json(), indent=2) + "\n")
    typer.echo(f"signed {signed.contract.content_hash} with key {signer.key_id} -> {out}")
