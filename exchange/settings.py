"""Settings for the coordinator and the hospital node: a TOML file plus environment variables.

Precedence (highest first): explicit keyword arguments, environment variables
(`EXCHANGE_...`, nested with `__`), the TOML file named by `EXCHANGE_CONFIG` (or passed in),
then defaults that work on one machine.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from audit.ledger import MAX_CLAIM_WINDOW_S


class LoggingSettings(BaseModel):
    level: str = "INFO"
    json_format: bool = Field(default=True, alias="json")


class Royalty(BaseModel):
    """A template author's share of each payout of a study using that template (docs/rewards.md)."""

    model_config = {"extra": "forbid"}

    account: str = Field(pattern=r"^[a-z][a-z0-9_-]*:\S+$", max_length=200)
    bps: int = Field(ge=0, le=10_000)


class CoordinatorSettings(BaseSettings):
    """The operator's coordinator (`exchange serve`, `exchange admin`).

    SuperLink connection: TLS when `superlink_root_certificates` (the CA bundle of the
    SuperLink's certificate) is set; plaintext only to a loopback SuperLink. The check is made
    by `superlink_tls()`, which `exchange serve` calls, not at load: `exchange admin` reads the
    same file and never talks to the SuperLink. `superlink_certificate`/`superlink_private_key`
    are the SuperLink's own certificate and key, for deployments that start it from this file.

    HTTPS: `tls_certificate`/`tls_private_key` make `exchange serve` terminate TLS itself (the
    hospitals then verify it with their `coordinator_root_certificates`); without them it serves
    plain HTTP, for loopback or behind a TLS-terminating proxy (deploy/k8s's Ingress).
    """

    model_config = SettingsConfigDict(env_prefix="EXCHANGE_", env_nested_delimiter="__",
                                      extra="forbid", populate_by_name=True)
    toml_path: ClassVar[Path | None] = None

    database_url: str = "sqlite:///exchange.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    data_dir: Path = Path("exchange-data")
    # Private keys: each defaults to a file in data_dir, so setting EXCHANGE_DATA_DIR moves
    # them all (a key never lands in the working directory unless configured there).
    operator_key_file: Path | None = None  # default: data_dir / "operator.key"
    log_key_file: Path | None = None  # default: data_dir / "log.key"
    coordinator_key_file: Path | None = None  # default: data_dir / "coordinator.key"
    log_origin: str = "exchange.local/log"
    superlink_address: str = "127.0.0.1:9093"
    superlink_root_certificates: Path | None = None
    superlink_certificate: Path | None = None
    superlink_private_key: Path | None = None
    superlink_insecure: bool | None = None  # default: insecure iff no root certificates
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    max_body_bytes: int = 1_048_576
    rate_limit_per_minute: int = Field(default=600, ge=1)
    forward_bps: int = Field(default=3000, ge=0, le=10_000)
    # Patients claim their rewards for this long after a study's payout; then what is left of
    # each claim pool is swept (`exchange admin sweep-rewards`) to this account (None: the
    # organisation that paid for the study). Both are snapshotted into each study's escrow.
    claim_window_s: int = Field(default=365 * 86_400, ge=1, le=MAX_CLAIM_WINDOW_S)
    unclaimed_rewards_account: str | None = Field(default=None, pattern=r"^(org|operator|hospital):\S+$",
                                                  max_length=200)
    # Checkpoints for the witnesses: after N new entries (0: off) or T seconds with new ones.
    checkpoint_every_entries: int = Field(default=1000, ge=0)
    checkpoint_every_s: float = Field(default=1.0, gt=0, le=5.0)
    # Web console sessions (exchange/console/session.py): ended server-side after this many
    # seconds without a request, and this many seconds after sign-in however active.
    console_idle_timeout_s: float = Field(default=30 * 60, gt=0, le=7 * 24 * 3600)
    console_session_max_s: float = Field(default=8 * 3600, gt=0, le=30 * 24 * 3600)
    # How often the coordinator looks for studies past their start deadline (they expire).
    deadline_sweep_every_s: float = Field(default=30.0, gt=0, le=3600.0)
    royalties: dict[str, Royalty] = Field(default_factory=dict)
    logging: LoggingSettings = LoggingSettings()

    @field_validator("royalties")
    @classmethod
    def _template_names(cls, value: dict[str, Royalty]) -> dict[str, Royalty]:
        for template in value:
            if not template.strip():
                raise ValueError("a template name must not be empty")
        return value

    def coordinator_key_path(self) -> Path:
        return self.coordinator_key_file or self.data_dir / "coordinator.key"

    def operator_key_path(self) -> Path:
        return self.operator_key_file or self.data_dir / "operator.key"

    def log_key_path(self) -> Path:
        return self.log_key_file or self.data_dir / "log.key"

    def royalty_terms(self) -> dict[str, tuple[str, int]]:
        """template -> (account, bps), as the coordinator's payout terms take them."""
        return {template: (r.account, r.bps) for template, r in self.royalties.items()}

    def https(self) -> tuple[Path, Path] | None:
        """(certificate, key) for `exchange serve` to terminate TLS itself, or None (plain HTTP).

        Raises ValueError naming the setting: half a pair, or a file that cannot be read."""
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_private_key: tls_certificate and tls_private_key go together "
                             "(set both or neither)")
        if self.tls_certificate is None or self.tls_private_key is None:
            return None
        pair = (("tls_certificate", self.tls_certificate), ("tls_private_key", self.tls_private_key))
        for name, path in pair:
            if not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return Path(self.tls_certificate), Path(self.tls_private_key)

    def superlink_tls(self) -> bytes | None:
        """The CA bundle to verify the SuperLink with, or None for plaintext on loopback.

        Raises ValueError naming the setting: plaintext to a non-loopback address, a
        contradiction between `superlink_insecure` and the certificates, half a cert/key pair,
        or a file that cannot be read.
        """
        host = host_of(self.superlink_address)
        ca = self.superlink_root_certificates
        if (self.superlink_certificate is None) != (self.superlink_private_key is None):
            raise ValueError("superlink_private_key: superlink_certificate and superlink_private_key "
                             "go together (set both or neither)")
        insecure = self.superlink_insecure if self.superlink_insecure is not None else ca is None
        if insecure:
            if ca is not None:
                raise ValueError("superlink_insecure: true, but superlink_root_certificates is set; "
                                 "choose TLS (remove superlink_insecure) or plaintext")
            if not is_loopback(host):
                raise ValueError(f"superlink_insecure: plaintext gRPC is allowed only to a loopback "
                                 f"SuperLink, not {self.superlink_address!r}; set "
                                 "superlink_root_certificates to the CA of its certificate")
            return None
        if ca is None:
            raise ValueError("superlink_root_certificates: required when superlink_insecure is false")
        for name in ("superlink_root_certificates", "superlink_certificate", "superlink_private_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path}")
        return Path(ca).read_bytes()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = cls.toml_path or _config_file_from_env()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def host_of(address: str) -> str:
    """`host` of "host:port" or "[v6]:port"."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if ":" in address else address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_file_from_env() -> Path | None:
    value = os.environ.get("EXCHANGE_CONFIG")
    return Path(value) if value else None


def load_coordinator_settings(config_file: Path | None = None, **overrides: Any) -> CoordinatorSettings:
    """Load settings, reading `config_file` (TOML) when given. Bad values raise a
    pydantic ValidationError naming the field."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    CoordinatorSettings.toml_path = config_file
    try:
        return CoordinatorSettings(**overrides)
    finally:
        CoordinatorSettings.toml_path = None
