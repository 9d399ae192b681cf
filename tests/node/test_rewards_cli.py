"""`exchange node gate-key` and `exchange node rewards claim`: the hospital's own tools for an
authorised auditor and for its patients' claims, from its database and key only."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine
from typer.testing import CliRunner

from audit.reward_commitment import commit, verify_leaf
from audit.signing import Signer
from consent.gate import commitment, hospital_secret, round_key
from exchange.cli import app
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from federated.reward_openings import store


def test_gate_key_is_the_round_key_of_the_nodes_secret(runner: CliRunner, node_dir: Path,
                                                       settings: NodeSettings) -> None:
    config = str(node_dir / "node.toml")
    keys = []
    for study, number in (("s-1", 1), ("s-1", 2), ("s-2", 1)):
        result = runner.invoke(app, ["node", "gate-key", study, str(number), "--config", config])
        assert result.exit_code == 0, result.output
        keys.append(bytes.fromhex(result.output.strip()))
    seed = Signer.load(settings.signing_key_path).seed
    assert keys[0] == round_key(hospital_secret(seed), "s-1", 1)
    assert len(set(keys)) == 3
    pairs = [("p1", "a" * 64), ("p2", "b" * 64)]
    assert commitment(pairs, keys[0]) != commitment(pairs, keys[1]) != commitment(pairs)
    bad = runner.invoke(app, ["node", "gate-key", "s-1", "0", "--config", config])
    assert bad.exit_code != 0 and "round: must be >= 1" in bad.output


def test_rewards_claim_reads_the_openings_and_names_a_wrong_account(
        runner: CliRunner, node_dir: Path, settings: NodeSettings, store: NodeStore) -> None:
    committed = commit({"reward:p1": 1, "reward:p2": 2}, minimum_size=8)
    engine = create_engine(settings.db_url)
    try:
        store_openings(engine, committed)
    finally:
        engine.dispose()
    config = str(node_dir / "node.toml")
    shown = runner.invoke(app, ["node", "rewards", "claim", "s-1", "--account", "reward:p2", "--dry-run",
                                "--config", config])
    assert shown.exit_code == 0, shown.output
    (body,) = [json.loads(line) for line in shown.output.splitlines()]
    assert "reward:p2" not in shown.output and "salt" not in body
    verify_leaf(committed.root, committed.size, body["holder"], body["units"], index=body["index"],
                proof=body["proof"])
    missing = runner.invoke(app, ["node", "rewards", "claim", "s-1", "--account", "reward:p9", "--dry-run",
                                  "--config", config])
    assert missing.exit_code != 0 and "account: no leaf of 's-1'" in missing.output


def store_openings(engine: object, committed: object) -> None:
    store(engine, "s-1", 1, committed.openings)  # type: ignore[arg-type, attr-defined]


def test_gate_key_takes_a_unique_study_id_prefix(runner: CliRunner, node_dir: Path, store: NodeStore) -> None:
    """Issue 21 item 7: the steward's commands take a study id by unique prefix."""
    from datetime import UTC, datetime

    from exchange.node.models import StudyRow

    now = datetime.now(UTC)
    with store.transaction() as session:
        for sid in ("st-abc123", "st-abd456"):
            session.add(StudyRow(study_id=sid, document={"id": sid}, status="pending", first_seen=now,
                                 updated_at=now))
    config = str(node_dir / "node.toml")
    full = runner.invoke(app, ["node", "gate-key", "st-abc123", "1", "--config", config])
    short = runner.invoke(app, ["node", "gate-key", "st-abc", "1", "--config", config])
    assert short.exit_code == 0 and short.output == full.output
    ambiguous = runner.invoke(app, ["node", "gate-key", "st-ab", "1", "--config", config])
    assert ambiguous.exit_code == 1 and "ambiguous" in ambiguous.output and "st-abd456" in ambiguous.output
