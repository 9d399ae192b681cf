"""`exchange admin ...`: the operator's tasks, run on the coordinator's machine.

These work on the coordinator database directly (with the operator key file), not over HTTP:
the very first operator API key has to come from somewhere. Every change goes through the same
service code as the API, so each one is an audit entry in the same transaction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from exchange.commands.serve import app_config_from, load_settings

app = typer.Typer(help="Operator tasks: organisations, researchers, keys, hospitals, tokens.",
                  no_args_is_help=True)

DbOption = Annotated[str | None, typer.Option("--db", help="Coordinator database URL.")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]


class _NoRunner:
    """Admin commands never start studies."""

    def start(self, request: Any, observer: Any) -> Any:
        raise RuntimeError("exchange admin does not run studies; use exchange serve")


def _coordinator(db: str | None, config: Path | None) -> Any:
    from exchange.coordinator.app import build_runtime
    from exchange.db.probe import DatabaseUnavailableError, database_state, describe

    settings = load_settings(config, database_url=db)
    try:
        state = database_state(settings.database_url)
    except DatabaseUnavailableError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    named = db or config or os.environ.get("EXCHANGE_DATABASE_URL") or os.environ.get("EXCHANGE_CONFIG")
    if state != "ready" and not named:
        # nothing says where the exchange is: never start a new, empty one in the working
        # directory (hospitals registered there would be registered nowhere that serves)
        where = "does not exist" if state == "missing" else "holds no exchange"
        typer.echo(f"error: no exchange here: {describe(settings.database_url)} {where}. exchange admin "
                   "works on the coordinator's database: pass --config FILE (the coordinator's settings) "
                   "or --db URL, or set EXCHANGE_CONFIG or EXCHANGE_DATABASE_URL; `exchange serve` "
                   "creates a new exchange", err=True)
        raise typer.Exit(1)
    if state != "ready":
        typer.echo(f"note: {describe(settings.database_url)} holds no exchange yet; creating one", err=True)
    runtime = build_runtime(app_config_from(settings), _NoRunner())
    return runtime


def _run(db: str | None, config: Path | None, action: Any) -> Any:
    from exchange.coordinator.problems import ProblemError

    runtime = _coordinator(db, config)
    try:
        return action(runtime.registry)
    except ProblemError as exc:
        details = "; ".join(f"{e['field']}: {e['reason']}" for e in exc.errors)
        typer.echo(f"refused: {exc.detail}" + (f" ({details})" if details else ""), err=True)
        raise typer.Exit(1) from exc
    finally:
        runtime.close()


def _validate(model: Any, **fields: Any) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        for error in exc.errors():
            typer.echo(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}", err=True)
        raise typer.Exit(2) from exc


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str, sort_keys=True))


@app.command("create-org")
def create_org(org_id: Annotated[str, typer.Argument(help="Organisation id (slug).")],
               name: Annotated[str, typer.Option(help="Display name.")],
               region: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2, e.g. DE.")],
               db: DbOption = None, config: ConfigOption = None) -> None:
    """Register an organisation (researchers' home, or a hospital group)."""
    from exchange.coordinator.schemas import OrganisationCreate, OrganisationOut

    data = _validate(OrganisationCreate, id=org_id, name=name, region=region)
    org = _run(db, config, lambda c: c.create_organisation(data))
    _print(OrganisationOut.model_validate(org).model_dump(mode="json"))


@app.command("add-researcher")
def add_researcher(org_id: Annotated[str, typer.Argument(help="Organisation id.")],
                   researcher_id: Annotated[str, typer.Argument(help="Researcher id (slug).")],
                   name: Annotated[str, typer.Option(help="Display name.")],
                   db: DbOption = None, config: ConfigOption = None) -> None:
    """Register a researcher of an organisation."""
    from exchange.coordinator.schemas import ResearcherCreate, ResearcherOut

    data = _validate(ResearcherCreate, id=researcher_id, name=name)
    row = _run(db, config, lambda c: c.create_researcher(org_id, data))
    _print(ResearcherOut.model_validate(row).model_dump(mode="json"))


@app.command("issue-key")
def issue_key(role: Annotated[str, typer.Option(help="operator, researcher or auditor.")], *,
              org: Annotated[str | None, typer.Option(help="Organisation id (researchers).")] = None,
              researcher: Annotated[str | None, typer.Option(help="Researcher id.")] = None,
              label: Annotated[str, typer.Option(help="A note for the operator.")] = "",
              db: DbOption = None, config: ConfigOption = None) -> None:
    """Issue an API key. The key is printed once (stdout); only its hash is stored."""
    from exchange.coordinator.schemas import ApiKeyCreate

    data = _validate(ApiKeyCreate, role=role, organisation_id=org, researcher_id=researcher, label=label)
    key, token = _run(db, config, lambda c: c.issue_api_key(data))
    typer.echo(f"prefix {key.prefix} role {key.role.value}", err=True)
    typer.echo(token)


@app.command("revoke-key")
def revoke_key(prefix: Annotated[str, typer.Argument(help="The key's prefix.")],
               db: DbOption = None, config: ConfigOption = None) -> None:
    """Revoke an API key (logged; the key stops working at once)."""
    _run(db, config, lambda c: c.revoke_api_key(prefix))
    typer.echo(f"revoked {prefix}")


@app.command("register-hospital")
def register_hospital(
    hospital_id: Annotated[str, typer.Argument(help="Hospital id (slug).")], *,
    org: Annotated[str, typer.Option(help="The hospital's organisation id.")],
    name: Annotated[str, typer.Option(help="Display name.")],
    signing_key: Annotated[str, typer.Option(help="Ed25519 public key, base64 (from `exchange node init`).")],
    flower_key_file: Annotated[Path, typer.Option(help="The SuperNode's public key file.")],
    witness_vkey: Annotated[str | None, typer.Option(
        help="The node's witness key (C2SP vkey, from `exchange node init`): registered in the "
             "log, so the hospital cosigns checkpoints.")] = None,
    db: DbOption = None, config: ConfigOption = None,
) -> None:
    """Register a hospital with its signing key, its Flower node key and its witness key (logged)."""
    from exchange.coordinator.schemas import HospitalCreate, HospitalOut

    if not flower_key_file.is_file():
        raise typer.BadParameter(f"not a file: {flower_key_file}", param_hint="--flower-key-file")
    data = _validate(HospitalCreate, id=hospital_id, organisation_id=org, name=name,
                     signing_public_key=signing_key,
                     flower_public_key=flower_key_file.read_text().strip(), witness_vkey=witness_vkey)
    row = _run(db, config, lambda c: c.register_hospital(data))
    _print(HospitalOut.model_validate(row).model_dump(mode="json"))


@app.command("mint")
def mint(account: Annotated[str, typer.Argument(help="Account, e.g. org:acme.")],
         amount: Annotated[int, typer.Argument(help="Integer token units.")],
         db: DbOption = None, config: ConfigOption = None) -> None:
    """Mint tokens into an account (a token.mint entry signed by the operator key)."""
    from exchange.coordinator.schemas import MintRequest

    data = _validate(MintRequest, account=account, amount=amount)
    index = _run(db, config, lambda c: c.mint(data.account, data.amount))
    typer.echo(f"minted {data.amount} into {data.account} (log entry {index})")


@app.command("balances")
def balances(db: DbOption = None, config: ConfigOption = None) -> None:
    """Print {"minted", "escrow", "balances"} as the coordinator serves them."""
    _print(_run(db, config, lambda c: c.balances()))


@app.command("sweep-rewards")
def sweep_rewards(db: DbOption = None, config: ConfigOption = None) -> None:
    """Sweep the reward claim pools whose claim window has closed to the account each study's
    escrow named (one `reward.sweep` entry per pool); prints what was swept. Safe to run from
    cron: a pool is swept once, and nothing is due before its window closes."""
    from exchange.coordinator.claims import sweep_unclaimed

    runtime = _coordinator(db, config)
    try:
        swept = sweep_unclaimed(runtime.journal)
    finally:
        runtime.close()
    for item in swept:
        typer.echo(f"swept {item['amount']} of {item['hospital']} round {item['round']} of "
                   f"{item['study_id']} to {item['to']}")
    typer.echo(f"{len(swept)} claim pool(s) swept")
