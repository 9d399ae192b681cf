"""The `exchange` command: one entry point for operator, steward and researcher tasks.

Each sub-command group lives in its own module under `exchange.commands`.
"""

from __future__ import annotations

import typer

from exchange.commands import admin, consent, db, demo, node, node_report, node_rewards, serve, study

app = typer.Typer(help="Consent-gated federated health data exchange.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(db.app, name="db")
app.add_typer(node.app, name="node")
# the hospital's reward-claim and commitment-key commands (their own module: node_rewards)
node.app.add_typer(node_rewards.rewards_app, name="rewards")
node.app.command("gate-key")(node_rewards.gate_key)
# the steward's own privacy report of a study (noise multiplier, sample rate: they stay local)
node.app.command("report")(node_report.report)
app.add_typer(consent.app, name="consent")
app.add_typer(admin.app, name="admin")
app.add_typer(study.app, name="study")
app.command("serve")(serve.serve)
app.command("demo")(demo.demo)


if __name__ == "__main__":
    app()
