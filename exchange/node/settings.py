"""Settings of one hospital node: a TOML file (written by `exchange node init`) plus
environment variables `EXCHANGE_NODE_...` (nested with `__`, e.g.
`EXCHANGE_NODE_POLICY__MODE=ask`); the environment wins over the file.

Relative paths are resolved against `data_dir`, and a relative `data_dir` against the
directory of the config file, so a node directory can be moved or mounted elsewhere
(a container, another disk) without editing the file. The node uses its own prefix
(`EXCHANGE_NODE_`), not the coordinator's `EXCHANGE_`, so that a shell holding both sets
of variables (the one-machine demo) never mixes them up.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from exchange.settings import LoggingSettings, host_of, is_loopback

CONFIG_ENV = "EXCHANGE_NODE_CONFIG"
DEFAULT_CONFIG_NAME = "node.toml"
WILDCARD = "*"
DecisionMode = Literal["auto-approve", "auto-refuse", "ask"]


class SitePolicy(BaseModel):
    """What this hospital agrees to, before any patient's consent is looked at.

    `"*"` in a list means "any". The privacy numbers are PATIENT-level DP epsilons: a study
    asking more than `max_epsilon_per_study`, or more than what is left of
    `total_privacy_budget` after what the privacy ledger already holds, is refused.
    `total_privacy_budget` is also the lifetime cap of every patient whose consent contract
    names none (a contract's `max_epsilon` is that patient's lifetime cap). A study's delta must
    be at most `max_delta` and at most 1/n for its n eligible patients; the deltas of all
    studies add up within `total_delta_budget`.
    """

    model_config = {"extra": "forbid"}

    mode: DecisionMode = "ask"
    allowed_purposes: list[str] = Field(default_factory=lambda: [WILDCARD])
    allowed_organisations: list[str] = Field(default_factory=lambda: [WILDCARD])
    allowed_regions: list[str] = Field(default_factory=lambda: [WILDCARD])
    allow_commercial: bool = False
    max_epsilon_per_study: float = Field(default=5.0, gt=0)
    total_privacy_budget: float = Field(default=20.0, gt=0)
    max_delta: float = Field(default=1e-5, gt=0, lt=1)
    total_delta_budget: float = Field(default=1e-4, gt=0, lt=1)
    min_eligible_records: int = Field(default=1, ge=0)
    #: epsilon of the decision count: the eligible patients are counted once per study with
    #: discrete Laplace noise, charged to each patient counted, and every threshold (site minimum,
    #: 1/delta, budget left) reads only that noised count (docs/privacy.md, "Decision count")
    decision_epsilon: float = Field(default=0.1, gt=0, le=1)
    #: the site's public reward capacity C (None: none): every receipt's reward tree has exactly
    #: C leaves and a study trains at most C of this site's patients per round, so no tree size
    #: tells a count; set it at or above the patients the site may put in one study
    reward_capacity: int | None = Field(default=None, ge=8, le=2**20)

    @model_validator(mode="after")
    def _study_cap_within_budget(self) -> SitePolicy:
        if self.max_epsilon_per_study > self.total_privacy_budget:
            raise ValueError("max_epsilon_per_study: larger than total_privacy_budget "
                             f"({self.max_epsilon_per_study} > {self.total_privacy_budget})")
        if self.max_delta > self.total_delta_budget:
            raise ValueError(f"max_delta: larger than total_delta_budget ({self.max_delta} > "
                             f"{self.total_delta_budget})")
        if self.reward_capacity is not None and self.reward_capacity & (self.reward_capacity - 1):
            raise ValueError(f"reward_capacity: must be a power of two, got {self.reward_capacity}")
        return self


class SuperNodeSettings(BaseModel):
    """How the daemon runs Flower's SuperNode and the ClientApp executor behind it."""

    model_config = {"extra": "forbid"}

    enabled: bool = True
    # Fleet API of the operator's SuperLink (host:port, no scheme).
    superlink_address: str = "127.0.0.1:9093"
    # Runtime (ClientAppIo) API the SuperNode serves to its executor; loopback only.
    clientappio_address: str = "127.0.0.1:9094"
    # Plaintext gRPC (no TLS, hence no node authentication): only to a loopback SuperLink.
    # Unset: plaintext iff no root_certificates, so a remote SuperLink needs the CA bundle.
    insecure: bool | None = None
    root_certificates: Path | None = None
    # "warm": the long-lived executor from federated.runtime (torch loaded once);
    # "plain": Flower's own per-message flwr-clientapp (slow, fully supported fallback).
    executor: Literal["warm", "plain"] = "warm"
    # When the Flower process runs. "approved": from the node's first approved study until none
    # is active (no memory held and no SuperLink connection without a study). "registered": from
    # the node's registration on, so a study's first round never waits for the process to start,
    # import torch and connect (seconds; docs/benchmarks/scale.md, "First round").
    start: Literal["approved", "registered"] = "approved"
    restart_backoff_initial_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    # After SIGKILL the SuperLink keeps the node "online" for a while and a restart inside that
    # window exits with code 305 (docs/node.md); that exit waits at least this long.
    restart_after_305_s: float = Field(default=10.0, ge=0)
    # A warm (hosted) SuperNode whose heartbeats the SuperLink has not accepted for this long,
    # though its process runs, is alive but not online: it is restarted (docs/node.md). Its
    # heartbeats come every ~4 s (10 s interval); a SuperLink down longer than this costs a restart.
    restart_offline_s: float = Field(default=120.0, ge=30)

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> SuperNodeSettings:
        if self.insecure is None:
            self.insecure = self.root_certificates is None
        if self.insecure and not is_loopback(host_of(self.superlink_address)):
            raise ValueError(f"supernode.insecure: plaintext gRPC is allowed only to a loopback SuperLink, "
                             f"not {self.superlink_address!r}; set supernode.root_certificates to the CA "
                             "of its certificate")
        if self.insecure and self.root_certificates is not None:
            raise ValueError("supernode.insecure: true, but supernode.root_certificates is set; choose TLS "
                             "(remove insecure) or plaintext")
        return self


class TrainingSettings(BaseModel):
    """How the node's records are handed to the ClientApp (exchange/node/site_export.py)."""

    model_config = {"extra": "forbid"}

    #: No longer used: each study names the column it predicts (its `label`), and the node
    #: exports every numeric column (exchange/node/site_export.py). Accepted so that a node.toml
    #: written by an older `node init` still loads; never written.
    label_column: str | None = None
    test_fraction: float = Field(default=0.2, ge=0, lt=1)


class WitnessSettings(BaseModel):
    """The node as a witness of the coordinator's log (exchange/node/witnessing.py)."""

    model_config = {"extra": "forbid"}

    enabled: bool = True
    key_file: Path = Path("keys/witness.key")
    # The log's key as a C2SP vkey, pinned out of band; unset: pinned on first contact (the
    # coordinator's /v1/audit/trust), and never changed afterwards.
    log_vkey: str | None = None
    wait_s: float = Field(default=10.0, ge=0, le=25)  # long poll for the next checkpoint
    # An entry this node signed must be in a checkpoint cosigned this long after it was posted.
    inclusion_grace_s: float = Field(default=30.0, gt=0)


class NodeSettings(BaseSettings):
    """One hospital node (`exchange node ...`)."""

    model_config = SettingsConfigDict(env_prefix="EXCHANGE_NODE_", env_nested_delimiter="__",
                                      extra="forbid", populate_by_name=True)
    toml_path: ClassVar[Path | None] = None

    hospital_id: str = Field(default="hospital-1", min_length=1, max_length=128,
                             pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data_dir: Path = Path(".")
    database_url: str | None = None  # default: SQLite file node.db in data_dir
    signing_key_file: Path = Path("keys/node.key")
    flower_key_file: Path = Path("keys/flower-node.key")
    coordinator_url: str = "http://127.0.0.1:8080"
    # CA bundle to verify an https coordinator with; unset: the system's trust store (or
    # SSL_CERT_FILE), as for any HTTPS client.
    coordinator_root_certificates: Path | None = None
    poll_interval_s: float = Field(default=2.0, gt=0)
    # While the coordinator's list of studies comes back unchanged, the daemon asks for it less
    # often: at the next step, then at twice the last wait, up to this many seconds (its local
    # work still runs every poll_interval_s). Every signed request costs the coordinator a write
    # (its replay-protection nonce); 25 idle hospitals asking twice a second were most of its
    # load (docs/benchmarks/scale.md). 0: ask at every step.
    studies_poll_max_s: float = Field(default=4.0, ge=0)
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=8181, ge=0, le=65535)
    supernode: SuperNodeSettings = SuperNodeSettings()
    witness: WitnessSettings = WitnessSettings()
    policy: SitePolicy = SitePolicy()
    training: TrainingSettings = TrainingSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("coordinator_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        host = urlsplit(value).hostname or ""
        if value.startswith("http://") and not is_loopback(host):
            # Requests are signed, but answers (the studies to decide on) would not be authentic.
            raise ValueError(f"plaintext http:// is allowed only to a loopback coordinator, not {host!r}; "
                             "use https:// (with coordinator_root_certificates for a private CA)")
        return value.rstrip("/")

    def coordinator_tls(self) -> ssl.SSLContext | bool:
        """How the node's HTTP client verifies the coordinator (httpx's `verify`).

        Raises ValueError naming the setting when the CA bundle cannot be read."""
        ca = self.coordinator_root_certificates
        if ca is None:
            return True
        try:
            return ssl.create_default_context(cafile=str(self.path(ca)))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"coordinator_root_certificates: cannot read {ca}: {exc}") from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)

    # Resolved paths -------------------------------------------------------------------
    def path(self, value: Path) -> Path:
        return value if value.is_absolute() else self.data_dir / value

    @property
    def signing_key_path(self) -> Path:
        return self.path(self.signing_key_file)

    @property
    def witness_key_path(self) -> Path:
        return self.path(self.witness.key_file)

    @property
    def flower_key_path(self) -> Path:
        return self.path(self.flower_key_file)

    @property
    def flower_public_key_path(self) -> Path:
        return self.flower_key_path.with_name(self.flower_key_path.name + ".pub")

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'node.db'}"


def find_config(config_file: Path | None) -> Path | None:
    """The config file to read: the argument, else `$EXCHANGE_NODE_CONFIG`, else
    `./node.toml` when it exists, else none (defaults only)."""
    if config_file is not None:
        return config_file
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.is_file() else None


def load_node_settings(config_file: Path | None = None, **overrides: Any) -> NodeSettings:
    """Load the node's settings. A missing file raises FileNotFoundError; a bad value raises
    pydantic's ValidationError, which names the field (e.g. `policy.max_epsilon_per_study`)."""
    path = find_config(config_file)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"node config not found: {path}")
        with path.open("rb") as handle:
            tomllib.load(handle)  # a syntax error names the line before pydantic sees it
    NodeSettings.toml_path = path
    try:
        settings = NodeSettings(**overrides)
    finally:
        NodeSettings.toml_path = None
    base = path.parent.resolve() if path is not None else Path.cwd()
    data_dir = settings.data_dir if settings.data_dir.is_absolute() else base / settings.data_dir
    return settings.model_copy(update={"data_dir": data_dir.resolve()})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_toml(settings: NodeSettings) -> str:
    """A commented TOML file holding every setting (what `exchange node init` writes).

    Written by hand rather than with a TOML library because the comments are the steward's
    documentation and no TOML writer in our dependencies keeps them."""
    data = settings.model_dump(mode="json", by_alias=True, exclude={"data_dir"})
    lines = [
        "# Hospital node configuration (exchange node). Environment variables",
        "# EXCHANGE_NODE_<NAME> (nested: EXCHANGE_NODE_POLICY__MODE) override this file.",
        "# Relative paths are relative to data_dir; data_dir is relative to this file.",
        f"data_dir = {_toml_value('.')}",
    ]
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key in tables or value is None:
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    comments = {
        "policy": ["# Site policy: what this hospital agrees to. mode = auto-approve | auto-refuse | ask",
                   '# ("ask" waits for `exchange node approve|refuse STUDY`). "*" means any.'],
        "supernode": ["# Flower SuperNode the daemon supervises (SuperLink address from the operator)."],
        "logging": ["# JSON log lines on stderr."],
        "training": ["# Share of records held out for evaluation (each study names the column it",
                     "# predicts: its label)."],
        "witness": ["# The node cosigns the coordinator's log checkpoints (C2SP tlog-witness) and",
                    "# checks that every entry it signed is included. log_vkey pins the log key",
                    "# (unset: pinned on first use)."],
    }
    for table, values in tables.items():
        lines.append("")
        lines.extend(comments.get(table, []))
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
