"""What a hospital's data steward does to a node, as functions: create it, import records,
import consent contracts.

The `exchange node` commands and the demo both call these (the commands add only argument
parsing and printing), so a node set up by the demo is set up exactly as a steward's would be.
Each import is one transaction (all or nothing) and is followed by a refresh of the ClientApp's
files, so a revocation applies from the very next round rather than at the daemon's next poll.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path

from audit.signing import Signer
from consent.model import Contract
from exchange.node import keys
from exchange.node.consent_store import (
    ConsentImportReport,
    ConsentSummary,
    current_consents,
    import_consent_folder,
    revoke_consent,
)
from exchange.node.importer import ImportReport, import_records
from exchange.node.mapping import load_mapping
from exchange.node.settings import NodeSettings, load_node_settings, render_toml
from exchange.node.store import NodeStore, open_store
from exchange.study.feasibility import Catalog


class NodeExistsError(FileExistsError):
    """The directory already holds a node (its config or its keys); nothing was changed."""


@dataclass(frozen=True)
class NewNode:
    """A created node: its loaded settings and what to send the operator."""

    settings: NodeSettings
    config_path: Path
    identity: keys.NodeIdentity


def init_node(directory: Path, hospital_id: str, coordinator_url: str, superlink_address: str) -> NewNode:
    """Create the node directory: node.toml, the Ed25519 signing key and the Flower node key
    (both 0600), and the database.

    Raises pydantic's ValidationError naming the field for a bad id or address (nothing is
    written), NodeExistsError when a node is there already."""
    config_path = directory / "node.toml"
    if config_path.exists():
        raise NodeExistsError(f"{config_path} already exists; refusing to overwrite a node's config")
    health_port, appio_port = free_node_ports(directory)
    settings = NodeSettings(
        hospital_id=hospital_id,
        coordinator_url=coordinator_url,
        health_port=health_port,
        supernode={"superlink_address": superlink_address,  # type: ignore[arg-type]
                   "clientappio_address": f"127.0.0.1:{appio_port}"},
    )
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # the database holds patient records, keys/ the private keys
    resolved = settings.model_copy(update={"data_dir": directory.resolve()})
    try:
        keys.create_keys(resolved.signing_key_path, resolved.flower_key_path)
    except FileExistsError as exc:
        raise NodeExistsError(str(exc)) from exc
    config_path.write_text(render_toml(settings))
    loaded = load_node_settings(config_path)
    open_store(loaded.db_url).dispose()
    identity = keys.identity(hospital_id, loaded.signing_key_path, loaded.flower_key_path,
                             loaded.witness_key_path)
    return NewNode(settings=loaded, config_path=config_path, identity=identity)


#: The first node's ports (the settings' defaults); node i gets HEALTH_BASE + i and
#: APPIO_BASE + APPIO_STEP * i (clear of Flower's own 9091-9099).
HEALTH_BASE, APPIO_BASE, APPIO_STEP = 8181, 9094, 100
MAX_NODES_PER_HOST = 200


def _claimed_ports(directory: Path) -> set[int]:
    """Ports named by the other nodes beside `directory` (their node.toml), running or not."""
    claimed: set[int] = set()
    parent = directory.resolve().parent
    for config in parent.glob("*/node.toml"):
        if config.parent == directory.resolve():
            continue
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data.get("health_port"), int):
            claimed.add(data["health_port"])
        appio = (data.get("supernode") or {}).get("clientappio_address")
        if isinstance(appio, str) and appio.rpartition(":")[2].isdigit():
            claimed.add(int(appio.rpartition(":")[2]))
    return claimed


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_node_ports(directory: Path) -> tuple[int, int]:
    """(health port, ClientAppIo port) for a new node: the first pair that no node beside it
    names and that nothing on this host listens on now, so two nodes made on one host (the usual
    trial, or two hospitals' test nodes) never collide."""
    claimed = _claimed_ports(directory)
    for i in range(MAX_NODES_PER_HOST):
        health, appio = HEALTH_BASE + i, APPIO_BASE + APPIO_STEP * i
        if health in claimed or appio in claimed:
            continue
        if _bindable(health) and _bindable(appio):
            return health, appio
    return HEALTH_BASE, APPIO_BASE  # none free: the defaults, and `node run` says what is taken


def import_data(
    settings: NodeSettings, file: Path, fmt: str | None = None, mapping: Path | None = None
) -> ImportReport:
    """Import a records file (CSV, Parquet or FHIR Bundle) in one transaction, then refresh the
    ClientApp's files. Raises importer.ImportRejectedError naming every bad row (nothing
    imported), or ValueError for a bad mapping file."""
    store = open_store(settings.db_url)
    try:
        parsed = load_mapping(mapping) if mapping is not None else None
        with store.transaction() as session:
            report = import_records(session, file, fmt, parsed)
        refresh_site(settings, store)
        return report
    finally:
        store.dispose()


def current_catalog(settings: NodeSettings) -> Catalog:
    """The catalog this node publishes now (its daemon posts it at its next step when it
    changed): lets a steward or the demo see whether the coordinator has caught up."""
    from exchange.node.catalog import build_catalog

    store = open_store(settings.db_url)
    try:
        return build_catalog(store, settings)
    finally:
        store.dispose()


def import_consent(settings: NodeSettings, folder: Path) -> ConsentImportReport:
    """Import a folder of consent contracts (native, signed or FHIR Consent) in one transaction,
    signing unsigned ones with the node key, then refresh the ClientApp's files. Raises
    consent_store.ConsentImportRejectedError listing every bad document (nothing imported)."""
    store = open_store(settings.db_url)
    try:
        with store.transaction() as session:
            report = import_consent_folder(
                session, folder, settings.hospital_id, Signer.load(settings.signing_key_path)
            )
        refresh_site(settings, store)
        return report
    finally:
        store.dispose()


def list_consents(settings: NodeSettings) -> list[ConsentSummary]:
    """Each patient's current consent version (`exchange node consent list`)."""
    store = open_store(settings.db_url)
    try:
        with store.sessions() as session:
            return current_consents(session)
    finally:
        store.dispose()


def revoke_patient_consent(settings: NodeSettings, pseudonym: str) -> Contract:
    """Revoke a patient's consent (a new version that permits nothing, signed with the node
    key), then refresh the ClientApp's files so it applies from the next round. Raises
    consent_store.RevocationError when no contract is held for the pseudonym."""
    store = open_store(settings.db_url)
    try:
        with store.transaction() as session:
            contract = revoke_consent(session, pseudonym, Signer.load(settings.signing_key_path))
        refresh_site(settings, store)
        return contract
    finally:
        store.dispose()


def refresh_site(settings: NodeSettings, store: NodeStore) -> None:
    """Re-export the ClientApp's files now (the daemon would do it at its next poll anyway)."""
    from exchange.node.decisions import approved_active
    from exchange.node.site_export import export_site

    export_site(store, settings, approved_active(store))
