"""What the node hands its Flower SuperNode: the site files `federated.runtime.site` reads.

The ClientApp (federated) never imports `exchange`; it reads a node config naming six things
(see `federated.runtime.site`): the hospital id, a records file (NumPy `.npz`), the consent
contracts as signed JSON lines, the privacy ledger URL (this node's own database, where
migration 0001 made the ledger tables), the Ed25519 key, and the approved-studies file.
The daemon writes these under `<data_dir>/site/` from its store, and rewrites a file only when
what it holds changed, atomically (write + rename) so a ClientApp never reads half a file.

Choices a steward should know (docs/node.md):
- records: every numeric column is exported as stored (scale features before import, e.g. to
  [-1, 1] with public bounds), NaN where a record lacks it; the file names no label: each study
  names the column it predicts (its `label`), checked when the node decides;
  a fixed share (`training.test_fraction`) is held out for federated evaluation, chosen by a
  hash of the pseudonym so the split is stable across exports and restarts.
- contracts: every version, as stored: signed by its issuer, or by this node when it arrived
  unsigned (exchange/node/consent_store.py). The ClientApp takes the one in force.
- approvals: studies this node approved (and the coordinator acknowledged) that have not
  finished. A refused, cancelled or finished study is not in the file, so its ClientApp
  messages are refused. Beside each id, the study's `StudySpec` as its run will carry it
  (`exchange.study.spec.study_spec` of the study this node decided on): the Flower process
  calibrates the study's DP plan from it as soon as the approval is written, before the run
  starts (`federated.client_app.plan_approved`; docs/benchmarks/scale.md, "First round").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from exchange.db.engine import normalize_url
from exchange.node.models import ColumnCategory, ConsentContractRow, ImportBatch, Record, StudyRow
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore

SITE_DIR = "site"


def site_paths(settings: NodeSettings) -> dict[str, Path]:
    base = settings.data_dir / SITE_DIR
    return {"records": base / "records.npz", "contracts": base / "contracts.jsonl",
            "approvals": base / "approvals.json", "node_config": base / "node-config.toml"}


def node_config(settings: NodeSettings) -> dict[str, str]:
    paths = site_paths(settings)
    config = {"hospital-id": settings.hospital_id, "records-path": str(paths["records"]),
              "contracts-path": str(paths["contracts"]), "ledger-url": normalize_url(settings.db_url),
              "key-path": str(settings.signing_key_path), "approvals-path": str(paths["approvals"])}
    if settings.policy.reward_capacity is not None:
        config["reward-capacity"] = str(settings.policy.reward_capacity)
    # public site settings the ClientApp plans with (federated.runtime.site)
    config["decision-epsilon"] = repr(float(settings.policy.decision_epsilon))
    config["holdout-fraction"] = repr(float(settings.training.test_fraction))
    return config


def _atomic_write(path: Path, data: bytes) -> bool:
    """Write `data` to `path` unless it already holds exactly that; True if written."""
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A unique temporary name per writer: the daemon and a steward's command may export at once.
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return True


def _is_test(pseudonym: str, fraction: float) -> bool:
    digest = hashlib.sha256(b"holdout:" + pseudonym.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def export_records(store: NodeStore, settings: NodeSettings, path: Path) -> int:
    """Write the records file; returns the number of records (0: no file written).

    Every mapped column that is a number wherever present is exported (NaN where a record lacks
    it), and the file names no label of its own: each study names the column it predicts, and
    the ClientApp takes it (`HospitalData.relabel`) and the records that hold it and every
    column the study reads (`HospitalData.complete`)."""
    import numpy as np

    from federated.data import HospitalData
    from federated.runtime.site import write_records

    with store.sessions() as session:
        categories = dict(session.execute(select(ColumnCategory.column, ColumnCategory.category))
                          .tuples().all())
        rows = session.execute(select(Record.pseudonym, Record.values).order_by(Record.id)).tuples().all()
    if not rows:
        return 0
    columns = sorted(c for c in categories
                     if any(_number(values.get(c)) for _p, values in rows)
                     and all(values.get(c) is None or _number(values.get(c)) for _p, values in rows))
    x = (np.asarray([[float(v[c]) if _number(v.get(c)) else np.nan for c in columns] for _p, v in rows],
                    dtype=np.float32) if columns else np.zeros((len(rows), 0), np.float32))
    data = HospitalData(dataset="node-store", hospital_id=settings.hospital_id, task="regression",
                        pseudonyms=tuple(p for p, _v in rows), x=x,
                        y=np.full(len(rows), np.nan, np.float32), columns=tuple(columns),
                        categories={c: categories[c] for c in columns},
                        is_test=np.asarray([_is_test(p, settings.training.test_fraction) for p, _v in rows]))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as build:
        staged = Path(build) / path.name
        write_records(staged, data, None)
        _atomic_write(path, staged.read_bytes())
    return len(rows)


def export_contracts(store: NodeStore) -> bytes:
    """Every contract version as a signed JSON line (all are stored signed)."""
    with store.sessions() as session:
        rows = session.execute(select(ConsentContractRow.signed)
                               .order_by(ConsentContractRow.pseudonym, ConsentContractRow.version)).scalars()
        lines = [json.dumps(envelope, sort_keys=True) for envelope in rows]
    return ("\n".join(lines) + ("\n" if lines else "")).encode()


def fingerprint(store: NodeStore) -> list[Any]:
    """Changes whenever records or contracts change (both are append-only)."""
    with store.sessions() as session:
        return [session.execute(select(func.max(ImportBatch.id))).scalar(),
                session.execute(select(func.count()).select_from(ConsentContractRow)).scalar_one(),
                session.execute(select(func.count()).select_from(ColumnCategory)).scalar_one()]


def approved_specs(store: NodeStore, approved: Iterable[str]) -> dict[str, Any]:
    """Study id -> the `StudySpec` (its JSON) the study's run will carry, for each approved
    study whose stored document makes one: the same translation the coordinator runs it with
    (`exchange.study.spec.study_spec`), its timeouts aside. The Flower process calibrates each
    study's DP plan from it ahead of the run (`federated.client_app.plan_approved`); a study
    left out here is calibrated by its first round instead, so nothing is refused over it."""
    from exchange.study.spec import AcceptedStudy, study_spec

    wanted = set(approved)
    if not wanted:
        return {}
    out: dict[str, Any] = {}
    with store.sessions() as session:
        rows = session.execute(select(StudyRow).where(StudyRow.study_id.in_(wanted))).scalars().all()
        documents = {row.study_id: row.document for row in rows}
    for study_id, document in sorted(documents.items()):
        try:
            spec = study_spec(AcceptedStudy.from_hospital_view(document))
        except (KeyError, TypeError, ValueError):
            continue
        out[study_id] = json.loads(spec.canonical_bytes())
    return out


def write_approvals(settings: NodeSettings, approved: list[str],
                    specs: Mapping[str, Any] | None = None) -> Path:
    """The ClientApp's list of the studies approved here, with the specs of those in `specs`
    (`approved_specs`) (atomic: it never reads half a file; rewritten only when it changed)."""
    path = site_paths(settings)["approvals"]
    body: dict[str, Any] = {"approved": sorted(approved)}
    kept = {study_id: specs[study_id] for study_id in sorted(approved) if specs and study_id in specs}
    if kept:
        body["specs"] = kept
    _atomic_write(path, json.dumps(body, sort_keys=True).encode())
    return path


def export_site(store: NodeStore, settings: NodeSettings, approved: list[str], *,
                isolate: bool = False) -> dict[str, Path]:
    """Bring the site files up to date; cheap when nothing changed. `isolate`: write the records
    file in a forked child (`exchange.node.isolated`; the daemon does, so it never imports
    pyarrow and the data code for it)."""
    from federated.runtime.deployment import write_node_config

    paths = site_paths(settings)
    write_approvals(settings, approved, approved_specs(store, approved))
    marker = [*fingerprint(store), "labels-per-study", settings.training.test_fraction]
    if store.get_state("site_export") != marker or not paths["records"].exists():
        if isolate:
            from exchange.node.isolated import run_isolated

            run_isolated(export_records, store, settings, paths["records"], engines=(store.engine,))
        else:
            export_records(store, settings, paths["records"])
        _atomic_write(paths["contracts"], export_contracts(store))
        store.set_state("site_export", marker)
    wanted = node_config(settings)
    if not paths["node_config"].exists() or _read_node_config(paths["node_config"]) != wanted:
        write_node_config(paths["node_config"], wanted)
    return paths


def _read_node_config(path: Path) -> dict[str, str] | None:
    """The node config file as strings (None if unreadable): rewritten when the settings moved
    on, e.g. a steward set `policy.reward_capacity`."""
    try:
        return {key: str(value) for key, value in tomllib.loads(path.read_text()).items()}
    except (OSError, tomllib.TOMLDecodeError):
        return None
