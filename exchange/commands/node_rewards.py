"""`exchange node rewards` and `exchange node gate-key`: what a hospital does for its patients'
payouts and for an auditor it authorises, from its own database and key.

Why here: the reward openings and the consent-commitment keys never leave the hospital except
through these commands, one claim (to the coordinator, without the account) or one study-round
key (to the auditor the steward chose) at a time (docs/rewards.md, docs/privacy.md).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from exchange.commands.node import ConfigOption, _fail, _settings, _study_id

rewards_app = typer.Typer(help="Patients' reward payouts: claim a leaf of a receipt's commitment.",
                          no_args_is_help=True)


@rewards_app.command("claim")
def claim(study_id: Annotated[str, typer.Argument(help="Study id, or a unique prefix of it.")],
          account: Annotated[str, typer.Option(help="The patient's reward account (stays local).")],
          round_number: Annotated[int | None, typer.Option(
              "--round", help="One round (default: all).")] = None,
          dry_run: Annotated[bool, typer.Option(
              help="Print the claims (no amount), contact nobody, send nothing.")] = False,
          config: ConfigOption = None) -> None:
    """Claim the patient's leaves of `study_id` from the coordinator, one per round: each claim
    carries the leaf's holder, units and inclusion proof, never the account or its salt."""
    from sqlalchemy import create_engine

    from audit.reward_commitment import ClaimError, claim_amount
    from audit.signing import Signer
    from exchange.coordinator.client import CoordinatorError, HospitalClient
    from federated.reward_openings import claim_request, openings

    settings = _settings(config)
    study_id = _study_id(settings, study_id)
    engine = create_engine(settings.db_url)
    try:
        mine = [(r, o) for r, o in openings(engine, study_id, account)
                if round_number is None or r == round_number]
    finally:
        engine.dispose()
    if not mine:
        raise _fail(f"account: no leaf of {study_id!r} belongs to that account at this hospital")
    hospital = f"hospital:{settings.hospital_id}"
    if dry_run:  # local only: the leaves and proofs (the amount needs the logged payout)
        for number, opening in mine:
            typer.echo(json.dumps(claim_request(study_id, hospital, number, opening, amount=0,
                                                account=account) | {"amount": None}))
        return
    with HospitalClient(settings.coordinator_url, Signer.load(settings.signing_key_path),
                        settings.hospital_id, verify=settings.coordinator_tls()) as client:
        payout = client.payout(study_id)
        if payout is None:
            raise _fail(f"study_id: {study_id!r} has no payout in the log yet; nothing to claim")
        pools = {item["round"]: item["pool"] for part in payout["hospitals"]
                 if part["hospital"] == hospital for item in part["pools"]}
        for number, opening in mine:
            try:
                due = claim_amount(pools.get(number, 0), opening.units)
                body = claim_request(study_id, hospital, number, opening, amount=due, account=account)
            except ClaimError as exc:
                raise _fail(str(exc)) from exc
            try:
                accepted = client.claim_reward(body)
            except CoordinatorError as exc:
                raise _fail(f"round {number}: {exc}") from exc
            typer.echo(f"round {number}: claimed {body['amount']} into claim:{opening.holder} "
                       f"(log entry {accepted['index']})")


def gate_key(study_id: Annotated[str, typer.Argument(help="Study id, or a unique prefix of it.")],
             round_number: Annotated[int, typer.Argument(help="Round.")],
             config: ConfigOption = None) -> None:
    """Print the key of one study round's consent commitment, for an auditor this hospital
    authorises: with it and the (pseudonym, contract) pairs the hospital shows, the auditor
    recomputes the receipt's commitment (consent.gate.commitment). Other rounds stay hidden."""
    from audit.signing import Signer
    from consent.gate import hospital_secret, round_key

    settings = _settings(config)
    if round_number < 1:
        raise _fail("round: must be >= 1")
    study_id = _study_id(settings, study_id)
    typer.echo(round_key(hospital_secret(Signer.load(settings.signing_key_path).seed), study_id,
                         round_number).hex())
