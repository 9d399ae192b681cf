"""The catalog this hospital publishes to the coordinator (exchange/study/feasibility.py).

What it holds is public by design: the mapped columns with their data categories and value
types, and the site policy's public limits (purposes, organisations, regions, commercial use,
the largest epsilon and delta per study, whether studies are refused automatically). No count
and no value of any record: how many patients consent to a study is decided here, at decision
time, and never published (docs/privacy.md, "Counts"). A column's type is the one the import
mappings declare for it (integer, number, string, boolean; `importer.wider_type` when two
differ), so no record's value can change it; never a value.

The daemon signs the catalog as a `hospital.catalog` log entry with the hospital's key and posts
it (`POST /v1/hospital/catalog`, an RFC 9421-signed request like every hospital POST) when it
differs from the last one the coordinator acknowledged, so the log holds each version once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from audit.entry import Entry, sign_entry
from audit.signing import Signer, canonical, sha256_hex
from exchange.node.models import ColumnCategory, Record
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from exchange.study.feasibility import CATALOG_KIND, Catalog

#: Daemon state key: the hash of what the last acknowledged catalog was built from.
PUBLISHED_STATE = "catalog_published"


def _legacy_value_type(values: list[Any]) -> str:
    """A column imported before the store kept declared types (node migration 0009): the type
    every present value has, boolean, integer, number (integers and decimals), else string.
    One record's value can change it; the next import of the column replaces it with the
    declared type."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "boolean"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "integer"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "number"
    return "string"


def build_catalog(store: NodeStore, settings: NodeSettings) -> Catalog:
    """This hospital's catalog now (columns from the store, limits from the site policy)."""
    policy = settings.policy
    with store.sessions() as session:
        mapped = session.execute(select(ColumnCategory.column, ColumnCategory.category,
                                        ColumnCategory.value_type)).tuples().all()
        categories = {column: category for column, category, _ in mapped}
        types = {column: value_type for column, _, value_type in mapped if value_type is not None}
        legacy: dict[str, list[Any]] = {column: [] for column in categories if column not in types}
        if legacy:
            for (row,) in session.execute(select(Record.values)).tuples():
                for column, value in (row or {}).items():
                    if column in legacy:
                        legacy[column].append(value)
    for column, values in legacy.items():
        types[column] = _legacy_value_type(values)
    columns = [{"name": name, "category": categories[name], "type": types[name]}
               for name in sorted(categories)]
    return Catalog.model_validate({
        "hospital": f"hospital:{settings.hospital_id}", "columns": columns,
        "purposes": list(policy.allowed_purposes), "organisations": list(policy.allowed_organisations),
        "regions": list(policy.allowed_regions), "allow_commercial": policy.allow_commercial,
        "max_epsilon_per_study": policy.max_epsilon_per_study, "max_delta": policy.max_delta,
        "accepts_studies": policy.mode != "auto-refuse"})


def catalog_entry(signer: Signer, catalog: Catalog, instant: datetime | None = None) -> Entry:
    """The signed `hospital.catalog` entry the coordinator logs unchanged."""
    return sign_entry(signer, CATALOG_KIND, catalog.model_dump(mode="json"), instant or datetime.now(UTC))


def publish_catalog(store: NodeStore, settings: NodeSettings, signer: Signer, post: Any) -> bool:
    """Post the catalog (`post(entry)`) if what it is built from (records, mapping, site policy)
    changed since the last one the coordinator acknowledged; True if posted. An error from `post`
    propagates and nothing is recorded, so the next step retries."""
    from exchange.node.site_export import fingerprint

    source = sha256_hex(canonical([*fingerprint(store), settings.hospital_id,
                                   settings.policy.model_dump(mode="json")]))
    if store.get_state(PUBLISHED_STATE) == source:
        return False
    post(catalog_entry(signer, build_catalog(store, settings)))
    store.set_state(PUBLISHED_STATE, source)
    return True
