"""A hospital's local state as the ClientApp sees it, opened from the SuperNode's node config.

The node config (``flower-supernode --node-config FILE``) names where everything lives; nothing
of it leaves the hospital:

=================  ==========================================================================
key                what
=================  ==========================================================================
hospital-id        the hospital's id (its ledger account is ``hospital:<id>``)
records-path       its records: a file written by `write_records` (NumPy `.npz`)
contracts-path     its consent contracts: JSON lines, one signed contract per line
ledger-url         its privacy ledger: an SQLAlchemy URL of the node database (schema made by
                   the node migrations; `federated.privacy_ledger`)
key-path           its Ed25519 key file (`audit.signing.Signer`, 0600)
approvals-path     its approved studies: JSON ``{"approved": ["study-id", ...]}`` written by the
                   node daemon when the steward (or the site policy) approves a study;
                   optionally ``"specs": {"study-id": StudySpec JSON}``, each approved study's
                   terms, from which the Flower process calibrates its DP plan before the run
                   starts (`Site.approved_specs`, `federated.client_app.plan_approved`)
decision-epsilon   optional: the epsilon of a study's decision count (`policy.decision_epsilon`,
                   default 0.1), drawn by the ClientApp when the node daemon did not draw it
holdout-fraction   optional: the share of patients held out for evaluation
                   (`training.test_fraction`, default 0.2): public, it sizes the DP plan from the
                   decision count (`federated.accounting.plan_patients`)
=================  ==========================================================================

A missing or bad key is refused with an error naming it. Files are re-read when they change
(mtime, size or inode), so an approval withdrawn or a contract revoked takes effect at the next
message, while a warm executor does not re-parse unchanged files every round.
"""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from audit.signing import Signer
from consent.request import StudyRequest
from federated.data import HospitalData

NODE_CONFIG_KEYS = ("hospital-id", "records-path", "contracts-path", "ledger-url", "key-path",
                    "approvals-path")


class SiteConfigError(ValueError):
    """The node config does not describe a usable hospital site; names the key."""


# -- records file ------------------------------------------------------------------------------
#
# The records file is written by the node (`exchange.node.site_export`, in a forked child) and
# read by the hospital's Flower process, which keeps it cached for every round. It is NumPy's
# `.npz` (a zip of `.npy` arrays, read with `allow_pickle=False`): reading it needs numpy only,
# so the Flower process does not import pyarrow (its libraries, ~35-65 MB resident, and its
# Python side: docs/benchmarks/scale.md, "Arrow out of the Flower process"). Arrays:
#   meta       UTF-8 JSON (uint8): dataset, hospital_id, task, label, features, categories,
#              target_scale, target_offset (as the Parquet schema metadata was)
#   pseudonym  the pseudonyms (unicode)
#   is_test    bool
#   x          float32, one column per feature (NaN: missing)
#   y          float32, the label's values (absent when the file names no label)
# A Parquet file from an earlier version (`PAR1` magic) is still read, with pyarrow imported then.

_NPZ_MAGIC = b"PK\x03\x04"
_PARQUET_MAGIC = b"PAR1"


def write_records(path: Path, data: HospitalData, label: str | None) -> Path:
    """Write a hospital's records (`.npz`, above): pseudonym, is_test, the label, the features;
    dataset, task, label name, categories and target scaling in `meta`.

    `label` None: the file holds no target of its own (a node's export): every column is a
    candidate, and each study names the one it predicts (`HospitalData.relabel`). A missing
    value is NaN."""
    if label is not None and (label in data.columns or label in ("pseudonym", "is_test")):
        raise ValueError(f"label: {label!r} clashes with another column")
    meta = {"dataset": data.dataset, "hospital_id": data.hospital_id, "task": data.task, "label": label,
            "features": list(data.columns), "categories": dict(data.categories),
            "target_scale": data.target_scale, "target_offset": data.target_offset}
    n = len(data.pseudonyms)
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "pseudonym": np.asarray(list(data.pseudonyms), dtype=np.str_) if n else np.zeros(0, "<U1"),
        "is_test": np.asarray(data.is_test, dtype=bool),
        "x": np.asarray(data.x, dtype=np.float32).reshape(n, len(data.columns)),
    }
    if label is not None:
        arrays["y"] = np.asarray(data.y, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:  # a file object: np.savez would add ".npz" to a name
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


def _checked(meta: Any, arrays: Mapping[str, np.ndarray]) -> tuple[HospitalData, str | None]:
    """The records from `meta` and the arrays, every shape and type checked."""
    if not isinstance(meta, dict):
        raise ValueError("meta is not an object")
    features = [str(c) for c in meta["features"]]
    label = meta["label"]
    pseudonyms, is_test, x = arrays["pseudonym"], arrays["is_test"], arrays["x"]
    n = len(pseudonyms)
    if pseudonyms.ndim != 1 or (n and pseudonyms.dtype.kind != "U"):
        raise ValueError("pseudonym: not a column of strings")
    if is_test.shape != (n,) or is_test.dtype != np.bool_:
        raise ValueError("is_test: not a boolean column of the records' length")
    if x.shape != (n, len(features)) or x.dtype != np.float32:
        raise ValueError(f"x: shape {x.shape} {x.dtype}, expected ({n}, {len(features)}) float32")
    if label is not None:
        y = arrays["y"]
        if y.shape != (n,) or y.dtype != np.float32:
            raise ValueError("y: not a float32 column of the records' length")
    else:
        y = np.full(n, np.nan, np.float32)
    data = HospitalData(
        dataset=meta["dataset"], hospital_id=meta["hospital_id"], task=meta["task"],
        pseudonyms=tuple(pseudonyms.tolist()), x=x, y=y, columns=tuple(features),
        categories=dict(meta["categories"]), is_test=is_test,
        target_scale=float(meta["target_scale"]), target_offset=float(meta["target_offset"]))
    return data, None if label is None else str(label)


def _read_parquet(path: Path) -> tuple[HospitalData, str | None]:
    """A records file from an earlier version (Parquet, the metadata in the schema)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {})[b"health-exchange.records"])
    features = list(meta["features"])
    arrays = {
        "pseudonym": np.asarray(table.column("pseudonym").to_pylist(), dtype=np.str_)
        if table.num_rows else np.zeros(0, "<U1"),
        "is_test": table.column("is_test").to_numpy().astype(bool),
        "x": (np.column_stack([table.column(c).to_numpy() for c in features]).astype(np.float32)
              if features else np.zeros((table.num_rows, 0), np.float32)),
    }
    if meta["label"] is not None:
        arrays["y"] = table.column(meta["label"]).to_numpy().astype(np.float32)
    return _checked(meta, arrays)


def read_records(path: Path) -> tuple[HospitalData, str | None]:
    """Read a file written by `write_records`; returns the records and the label's name (None: the
    file has no target of its own, y is NaN)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic == _PARQUET_MAGIC:
            return _read_parquet(path)
        if magic != _NPZ_MAGIC:
            raise ValueError("neither a records archive (.npz) nor Parquet")
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays["meta"].tobytes())
        return _checked(meta, arrays)
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise SiteConfigError(f"records-path: {path} is not a records file ({exc})") from None
    except Exception as exc:  # pyarrow's own errors (ArrowException) on an old file
        if type(exc).__module__.startswith("pyarrow"):
            raise SiteConfigError(f"records-path: {path} is not a records file ({exc})") from None
        raise


# -- consent gating ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GateOutcome:
    """Which of the asked records may be used, why the others may not, and a commitment."""

    eligible: frozenset[str]
    excluded: Mapping[str, int]
    commitment: str
    #: reward account named by each eligible record's contract (records naming none are absent)
    reward_accounts: Mapping[str, str]
    #: each eligible patient's lifetime epsilon cap from their contract (absent: none named)
    privacy_caps: Mapping[str, float] = field(default_factory=dict)


def _load_contracts(path: Path) -> Any:
    """Every contract version in the file (signatures checked), as a `consent.ContractRegistry`."""
    from consent.history import ContractRegistry
    from consent.model import SignedContract

    contracts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            contracts.append(SignedContract.model_validate_json(line).verify())
        except Exception as exc:
            raise SiteConfigError(f"contracts-path: {path} line {number}: {exc}") from None
    try:
        return ContractRegistry(contracts)
    except ValueError as exc:
        raise SiteConfigError(f"contracts-path: {path}: {exc}") from None


def gate_records(registry: Any, request: StudyRequest, pseudonyms: Iterable[str], at: datetime,
                 hospital_id: str, *, key: bytes | None = None) -> GateOutcome:
    """Gate `pseudonyms` with `consent.gate` against the contract version of each that is in force
    at `at` (so a revocation issued before `at` excludes the record)."""
    from consent.gate import gate

    pairs = registry.records_at(list(pseudonyms), hospital_id, at)
    result = gate(pairs, registry.by_hash, request, at, key)
    return GateOutcome(frozenset(result.eligible_pseudonyms), dict(result.excluded_by_reason),
                       result.commitment, dict(result.reward_accounts), dict(result.privacy_caps))


# -- the site ----------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_file_cache: dict[tuple[str, str], tuple[tuple[int, int, int], Any]] = {}
_engines: dict[str, Any] = {}


def _cached(kind: str, path: Path, load: Any) -> Any:
    """`load(path)`, re-run only when the file changed (mtime, size or inode: an atomic rewrite is a
    new inode even within the file system's timestamp granularity)."""
    try:
        st = path.stat()
        mtime = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError as exc:
        raise SiteConfigError(f"{kind}: cannot read {path} ({exc.strerror})") from None
    key = (kind, str(path))
    with _cache_lock:
        hit = _file_cache.get(key)
        if hit is not None and hit[0] == mtime:
            return hit[1]
    value = load(path)
    with _cache_lock:
        _file_cache[key] = (mtime, value)
    return value


def reward_capacity(value: object) -> int | None:
    """The optional `reward-capacity` of a node config: a power of two from 8 to 2**20 (Flower
    may hand it over as an int or a string), or None when absent."""
    if value is None or value == "":
        return None
    text = str(value)
    if not text.isdigit() or not 8 <= int(text) <= 2**20 or int(text) & (int(text) - 1):
        raise SiteConfigError(f"reward-capacity: must be a power of two from 8 to 1048576, got {value!r}")
    return int(text)


#: A study's decision-count epsilon and hold-out share when the node config names none (the
#: node's `policy.decision_epsilon` and `training.test_fraction` defaults).
DEFAULT_DECISION_EPSILON = 0.1
DEFAULT_HOLDOUT_FRACTION = 0.2


def _fraction(key: str, value: object, default: float, *, low: float, high: float,
              closed_low: bool) -> float:
    """An optional number of the node config in its range (Flower may hand it over as a string)."""
    if value is None or value == "":
        return default
    try:
        number = float(str(value))
    except ValueError:
        number = float("nan")
    if not ((low <= number if closed_low else low < number) and number <= high):
        raise SiteConfigError(f"{key}: must be a number in {'[' if closed_low else '('}{low:g}, {high:g}], "
                              f"got {value!r}")
    return number


@dataclass(frozen=True)
class Site:
    """One hospital's local state (see module docstring)."""

    hospital_id: str
    records_path: Path
    contracts_path: Path
    ledger_url: str
    key_path: Path
    approvals_path: Path
    #: the site's public reward capacity C (node config `reward-capacity`, optional): every
    #: receipt's reward tree has exactly C leaves and a study trains at most C of this site's
    #: patients per round, so the tree's size says nothing about a count (docs/privacy.md)
    reward_capacity: int | None = None
    #: the epsilon of the study's decision count when the ClientApp must draw it itself
    decision_epsilon: float = DEFAULT_DECISION_EPSILON
    #: the public share of patients held out for evaluation (sizes the DP plan)
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Site:
        values: dict[str, str] = {}
        for key in NODE_CONFIG_KEYS:
            value = node_config.get(key)
            if not isinstance(value, str) or not value:
                raise SiteConfigError(f"{key}: missing from the SuperNode's node config (a non-empty string)")
            values[key] = value
        return cls(hospital_id=values["hospital-id"], records_path=Path(values["records-path"]),
                   contracts_path=Path(values["contracts-path"]), ledger_url=values["ledger-url"],
                   key_path=Path(values["key-path"]), approvals_path=Path(values["approvals-path"]),
                   reward_capacity=reward_capacity(node_config.get("reward-capacity")),
                   decision_epsilon=_fraction("decision-epsilon", node_config.get("decision-epsilon"),
                                              DEFAULT_DECISION_EPSILON, low=0.0, high=1.0, closed_low=False),
                   holdout_fraction=_fraction("holdout-fraction", node_config.get("holdout-fraction"),
                                              DEFAULT_HOLDOUT_FRACTION, low=0.0, high=0.99,
                                              closed_low=True))

    def node_config(self) -> dict[str, str]:
        config = {"hospital-id": self.hospital_id, "records-path": str(self.records_path),
                  "contracts-path": str(self.contracts_path), "ledger-url": self.ledger_url,
                  "key-path": str(self.key_path), "approvals-path": str(self.approvals_path)}
        if self.reward_capacity is not None:
            config["reward-capacity"] = str(self.reward_capacity)
        if self.decision_epsilon != DEFAULT_DECISION_EPSILON:
            config["decision-epsilon"] = repr(self.decision_epsilon)
        if self.holdout_fraction != DEFAULT_HOLDOUT_FRACTION:
            config["holdout-fraction"] = repr(self.holdout_fraction)
        return config

    def approved_studies(self) -> frozenset[str]:
        def load(path: Path) -> frozenset[str]:
            try:
                obj = json.loads(path.read_text())
                approved = obj["approved"]
                if not isinstance(approved, list) or not all(isinstance(s, str) for s in approved):
                    raise ValueError("'approved' must be a list of study ids")
            except (ValueError, KeyError, TypeError) as exc:
                raise SiteConfigError(f"approvals-path: {path}: {exc}") from None
            return frozenset(approved)

        return frozenset(_cached("approvals-path", self.approvals_path, load))

    def approved_specs(self) -> dict[str, Any]:
        """Approved study id -> its `StudySpec`, for the approved studies whose spec the node
        wrote beside their id. Only an optimisation reads them (a plan calibrated ahead,
        `federated.client_app.plan_approved`): an entry that is not a valid spec of its study
        is left out, never an error; what a study trains with is its run's own spec."""
        from federated.study_spec import StudySpec, StudySpecError

        def load(path: Path) -> dict[str, Any]:
            try:
                specs = json.loads(path.read_text()).get("specs")
            except (ValueError, AttributeError):
                return {}
            out: dict[str, Any] = {}
            for study_id, obj in (specs.items() if isinstance(specs, dict) else ()):
                try:
                    spec = StudySpec.from_json(obj)
                except StudySpecError:
                    continue
                if spec.study_id == study_id:
                    out[study_id] = spec
            return out

        specs: dict[str, Any] = _cached("approvals-specs", self.approvals_path, load)
        approved = self.approved_studies()
        return {study_id: spec for study_id, spec in specs.items() if study_id in approved}

    def records(self) -> tuple[HospitalData, str | None]:
        data, label = _cached("records-path", self.records_path, read_records)
        return data, label

    def gate(self, request: StudyRequest, pseudonyms: Iterable[str], at: datetime,
             study_round: tuple[str, int] | None = None) -> GateOutcome:
        """Gate records; the commitment is keyed for `study_round` (study id, round) with the
        hospital's secret (consent.gate.round_key), as every receipt's is."""
        registry = _cached("contracts-path", self.contracts_path, _load_contracts)
        key = None if study_round is None else self.gate_key(*study_round)
        return gate_records(registry, request, pseudonyms, at, self.hospital_id, key=key)

    def warm(self) -> None:
        """Load what every study's first round reads (the records, and the consent contracts with
        every signature verified) into the caches now, so that round does not wait for it; a
        file that changes later is simply loaded again (`_cached`)."""
        self.records()
        _cached("contracts-path", self.contracts_path, _load_contracts)
        self.signer()

    def gate_key(self, study_id: str, round_number: int) -> bytes:
        """The key of one study round's consent commitment: the hospital shows it only to an
        auditor it authorises (`exchange node gate-key`)."""
        from consent.gate import hospital_secret, round_key

        return round_key(hospital_secret(self.signer().seed), study_id, round_number)

    def ledger(self) -> Any:
        """The hospital's `federated.privacy_ledger.PrivacyLedger` (one engine per URL)."""
        from sqlalchemy import create_engine

        from federated.privacy_ledger import PrivacyLedger

        with _cache_lock:
            engine = _engines.get(self.ledger_url)
            if engine is None:
                try:
                    engine = create_engine(self.ledger_url)
                except Exception as exc:
                    raise SiteConfigError(f"ledger-url: {exc}") from None
                _engines[self.ledger_url] = engine
        return PrivacyLedger(engine)

    def signer(self) -> Signer:
        try:
            signer: Signer = _cached("key-path", self.key_path, Signer.load)
            return signer
        except (PermissionError, ValueError) as exc:
            raise SiteConfigError(f"key-path: {exc}") from None
