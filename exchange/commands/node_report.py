"""`exchange node report STUDY`: the hospital's own privacy report of one study, for its steward.

Why here: the coordinator's report (`exchange study report`) cannot show the noise multiplier,
the sample rate or the patient count, because they are functions of this hospital's patients
(docs/privacy.md, "Counts"). The steward may see them: this command reads them from the node's
own privacy ledger and prints them; nothing is sent anywhere.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from exchange.commands.node import ConfigOption, _fail, _settings


def study_privacy(ledger: Any, study_id: str) -> dict[str, Any] | None:
    """The study's DP plan, charges and evaluations in the hospital's ledger (None: no plan)."""
    plan = ledger.plan(study_id)
    if plan is None:
        return None
    return {
        "study_id": study_id, "unit": "patient", "accountant": plan.accountant,
        "target_epsilon": plan.target_epsilon, "delta": plan.delta, "rounds": plan.rounds,
        "steps_per_round": plan.steps_per_round, "batch_size": plan.batch_size,
        "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
        "patients_planned": plan.n_patients, "eval_noise_multiplier": plan.eval_noise_multiplier,
        "epsilon_spent": ledger.spent(study_id), "closed": ledger.is_closed(study_id),
        "rounds_trained": [{"round": c.round, "epsilon": c.epsilon, "increment": c.increment,
                            "at": c.created_at.isoformat()} for c in ledger.charges(study_id)],
        "evaluations": [{"round": e.slot, "epsilon": e.epsilon} for e in ledger.evaluations(study_id)],
    }


def report(study_id: Annotated[str, typer.Argument(help="Study id.")], config: ConfigOption = None) -> None:
    """This hospital's privacy accounting of one study (stays local): accountant, noise
    multiplier, sample rate, steps, patients planned, epsilon per round and evaluations."""
    from sqlalchemy import create_engine

    from federated.privacy_ledger import PrivacyLedger

    settings = _settings(config)
    engine = create_engine(settings.db_url)
    try:
        body = study_privacy(PrivacyLedger(engine), study_id)
    finally:
        engine.dispose()
    if body is None:
        raise _fail(f"study {study_id!r} has no privacy plan at this hospital (it never trained here)")
    typer.echo(json.dumps(body, indent=2))
