"""`exchange node ...`: what a hospital's data steward runs (see docs/node.md).

Every command reads the node config (`--config FILE`, else `$EXCHANGE_NODE_CONFIG`, else
`./node.toml`). Errors name the file, the field or the row and the reason, and exit with
code 1 (2 for usage errors); nothing is changed by a command that fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from audit.untrusted import printable
from exchange.node.settings import NodeSettings, load_node_settings

app = typer.Typer(help="Hospital node: set up, import data and consent, decide on studies, run.",
                  no_args_is_help=True)
consent_app = typer.Typer(help="Patients' consent contracts.", no_args_is_help=True)
app.add_typer(consent_app, name="consent")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Node config file (TOML).",
                                                   envvar="EXCHANGE_NODE_CONFIG")]
err = Console(stderr=True, soft_wrap=True)  # one problem per line, however long


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    return typer.Exit(code)


def _settings(config: Path | None) -> NodeSettings:
    try:
        return load_node_settings(config)
    except FileNotFoundError as exc:
        raise _fail(f"{exc} (run `exchange node init` first, or pass --config)") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise _fail(f"node config: {problems}") from exc
    except ValueError as exc:  # TOML syntax
        raise _fail(f"node config: {exc}") from exc


def _study_id(settings: NodeSettings, text: str) -> str:
    """The full id of the study `text` names exactly or by unique prefix (node/study_ids.py);
    text that matches no study here is used as given."""
    from exchange.node.store import open_store
    from exchange.node.study_ids import StudyIdError, resolve_study_id

    store = open_store(settings.db_url)
    try:
        with store.sessions() as session:
            return resolve_study_id(session, text, unknown_ok=True)
    except StudyIdError as exc:
        raise _fail(str(exc)) from exc
    finally:
        store.dispose()


def _check_database(settings: NodeSettings) -> None:
    """A node database that cannot be reached (a PostgreSQL database that does not exist, a
    server that does not answer) is said in words before anything uses it."""
    from exchange.db.probe import DatabaseUnavailableError, database_state

    try:
        database_state(settings.db_url)
    except DatabaseUnavailableError as exc:
        raise _fail(f"node database: {exc}") from exc


@app.command("init")
def init(
    directory: Annotated[Path, typer.Option("--dir", help="Node directory (config, keys, database).")] = Path(
        "node"),
    hospital_id: Annotated[str, typer.Option(help="This hospital's id, as agreed with the operator.")] = (
        "hospital-1"),
    coordinator: Annotated[str, typer.Option(help="Coordinator URL.")] = "http://127.0.0.1:8080",
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port (from the operator).")] = (
        "127.0.0.1:9093"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the registration as JSON.")] = False,
) -> None:
    """Create the node directory: node.toml, the Ed25519 signing key and the Flower node key
    (both 0600), and the database. Prints what to send to the operator."""
    from exchange.node.steward import NodeExistsError, init_node

    config_path = directory / "node.toml"
    try:
        ident = init_node(directory, hospital_id, coordinator, superlink).identity
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise _fail(problems, code=2) from exc
    except NodeExistsError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(ident.to_json(), indent=2))
        return
    typer.echo(f"Node created in {directory} (config {config_path}).")
    typer.echo("Send these to the exchange operator to register this hospital:")
    typer.echo(f"  hospital id:        {ident.hospital_id}")
    typer.echo(f"  signing public key: {ident.public_key_b64}  (Ed25519, base64)")
    typer.echo(f"  key id:             {ident.key_id}")
    typer.echo(f"  flower node key:    {ident.flower_public_key}")
    typer.echo(f"  witness key:        {ident.witness_vkey}  (C2SP cosignature/v1 vkey)")
    typer.echo("Keep the files under keys/ private (mode 0600); never send them.")


@app.command("show-registration")
def show_registration(config: ConfigOption = None) -> None:
    """Print again (JSON) what to send to the operator."""
    from exchange.node import keys

    settings = _settings(config)
    ident = keys.identity(settings.hospital_id, settings.signing_key_path, settings.flower_key_path,
                          settings.witness_key_path)
    typer.echo(json.dumps(ident.to_json(), indent=2))


@app.command("import-data")
def import_data(
    file: Annotated[Path, typer.Argument(help="CSV, Parquet or FHIR Bundle JSON file.")],
    fmt: Annotated[str | None, typer.Option("--format", help="csv | parquet | fhir (default: from the "
                                                              "file name).")] = None,
    mapping: Annotated[Path | None, typer.Option(help="Column -> data category mapping (TOML/JSON).")] = None,
    config: ConfigOption = None,
) -> None:
    """Import records: everything is validated first; a bad file imports nothing and every
    bad row is named."""
    from exchange.node.mapping import ImportRejectedError
    from exchange.node.steward import import_data as import_records_file

    settings = _settings(config)
    try:
        report = import_records_file(settings, file, fmt, mapping)
    except ImportRejectedError as exc:
        err.print(f"error: {printable(exc.source)}: nothing imported; {len(exc.problems)} problem(s):",
                  highlight=False, markup=False)
        for problem in exc.problems[:200]:
            err.print(f"  {printable(str(problem))}", highlight=False, markup=False)
        if len(exc.problems) > 200:
            err.print(f"  ... and {len(exc.problems) - 200} more", highlight=False)
        raise typer.Exit(1) from exc
    known = f", {report.known_patients} of them with records here already" if report.known_patients else ""
    typer.echo(f"imported {report.records} records for {report.patients} patients{known} from {file} "
               f"as batch {report.batch_id} ({len(report.columns)} columns; a patient's records are "
               "one patient in every study)")


@consent_app.command("import")
def consent_import(
    folder: Annotated[Path, typer.Argument(help="Folder of contract JSON files and FHIR Consents.")],
    config: ConfigOption = None,
) -> None:
    """Import consent contracts (native or FHIR Consent R4/R5). All files are validated
    first; one bad file means nothing from the batch is imported."""
    from exchange.node.consent_store import ConsentImportRejectedError
    from exchange.node.steward import import_consent

    settings = _settings(config)
    try:
        report = import_consent(settings, folder)
    except ConsentImportRejectedError as exc:
        err.print(f"error: {printable(str(folder))}: nothing imported; {len(exc.problems)} problem(s):",
                  highlight=False, markup=False)
        for name, reason in exc.problems:
            err.print(f"  {printable(name)}: {printable(reason)}", highlight=False, markup=False)
        raise typer.Exit(1) from exc
    typer.echo(f"imported {report.new_versions} new contract version(s) "
               f"({report.unchanged} already held) for {report.pseudonyms} patient(s)")


@consent_app.command("list")
def consent_list(config: ConfigOption = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False
                 ) -> None:
    """Each patient's current consent version: status, whether it permits anything, how many
    versions are held. Pseudonyms are this hospital's own data: print them only here."""
    from exchange.node.steward import list_consents

    rows = list_consents(_settings(config))
    if as_json:
        typer.echo(json.dumps([{**dataclasses.asdict(row), "imported_at": row.imported_at.isoformat()}
                               for row in rows], indent=2))
        return
    table = Table(title=f"Consent contracts ({len(rows)} patients)")
    for column in ("pseudonym", "contract", "version", "status", "permits", "source"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.pseudonym, row.contract_id, f"{row.version} of {row.versions}", row.status,
                      "yes" if row.permits else "no", row.source)
    Console().print(table)


@consent_app.command("revoke")
def consent_revoke(pseudonym: Annotated[str, typer.Argument(help="The patient's pseudonym.")],
                   config: ConfigOption = None) -> None:
    """Revoke a patient's consent now: a new contract version that permits nothing, signed with
    the node key; it applies from the next round of every running study."""
    from exchange.node.consent_store import RevocationError
    from exchange.node.steward import revoke_patient_consent

    try:
        contract = revoke_patient_consent(_settings(config), pseudonym)
    except RevocationError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"revoked: version {contract.version} of {contract.contract_id} permits nothing "
               "(applies from the next round)")


def _steward_decision(study_id: str, decision: str, reason: str | None, config: Path | None) -> None:
    from exchange.node.decisions import StewardDecisionError, steward_decide
    from exchange.node.store import open_store

    settings = _settings(config)
    store = open_store(settings.db_url)
    try:
        row = steward_decide(store, settings, study_id, decision, reason)
    except StewardDecisionError as exc:
        raise _fail(str(exc)) from exc
    finally:
        store.dispose()
    typer.echo(f"{row.study_id}: {row.decision} (signed; the daemon posts it to the coordinator)")


@app.command("approve")
def approve(study_id: Annotated[str, typer.Argument(help="Study id, or a unique prefix of it.")],
            reason: Annotated[str | None, typer.Option(help="Why (kept with the decision).")] = None,
            config: ConfigOption = None) -> None:
    """Approve a study that waits for the steward (site policy mode "ask")."""
    _steward_decision(study_id, "approve", reason, config)


@app.command("refuse")
def refuse(study_id: Annotated[str, typer.Argument(help="Study id, or a unique prefix of it.")],
           reason: Annotated[str | None, typer.Option(help="Why (sent to the researcher).")] = None,
           config: ConfigOption = None) -> None:
    """Refuse a study that waits for the steward."""
    _steward_decision(study_id, "refuse", reason, config)


@app.command("run")
def run(config: ConfigOption = None) -> None:
    """Run the node daemon until SIGTERM/SIGINT (see docs/node.md)."""
    from exchange.logging import configure_logging
    from exchange.node.daemon import NodeStartError, run_daemon

    settings = _settings(config)
    try:
        settings.coordinator_tls()
    except ValueError as exc:  # names the setting
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    configure_logging(settings.logging.level, settings.logging.json_format)
    _check_database(settings)
    try:
        code = run_daemon(settings)
    except NodeStartError as exc:
        raise _fail(str(exc)) from exc
    sys.exit(code)


@app.command("status")
def status(config: ConfigOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
           errors: Annotated[int, typer.Option(help="How many recent errors to show.")] = 5) -> None:
    """Studies, rounds, privacy budget spent and left, the last errors."""
    from exchange.node.status import collect_status
    from exchange.node.store import open_store

    settings = _settings(config)
    store = open_store(settings.db_url)
    try:
        report = collect_status(store, settings, errors=errors)
    finally:
        store.dispose()
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    _print_status(report)


@app.command("witness-evidence")
def witness_evidence_command(
    config: ConfigOption = None,
    clear: Annotated[bool, typer.Option("--clear", help="Forget the alarms after printing them.")] = False,
) -> None:
    """Print the witness's alarms with their evidence (JSON: both signed checkpoints and the
    proof), e.g. to send to the other hospitals and the auditors; `--clear` once investigated."""
    from exchange.node.witnessing import witness_evidence

    typer.echo(json.dumps(witness_evidence(_settings(config), clear=clear), indent=2))


def _print_status(report: dict[str, Any]) -> None:
    """As text no wider than the terminal (80 columns when it cannot tell)."""
    import shutil

    from exchange.node.status_text import render_status

    for line in render_status(report, shutil.get_terminal_size((80, 24)).columns):
        typer.echo(line)
