"""Settings for the coordinator and the hospital node: a TOML file plus environment variables.

Precedence (highest first): explicit keyword arguments, environment variables
(`EXCHANGE_...`, nested with `__`), the TOML file named by `EXCHANGE_CONFIG` (or passed in),
then defaults that work on one machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class LoggingSettings(BaseModel):
    level: str = "INFO"
    json_format: bool = Field(default=True, alias="json")


class CoordinatorSettings(BaseSettings):
    """The operator's coordinator (`exchange serve`)."""

    model_config = SettingsConfigDict(env_prefix="EXCHANGE_", env_nested_delimiter="__",
                                      extra="forbid", populate_by_name=True)
    toml_path: ClassVar[Path | None] = None

    database_url: str = "sqlite:///exchange.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    data_dir: Path = Path("exchange-data")
    operator_key_file: Path = Path("exchange-data/operator.key")
    log_key_file: Path = Path("exchange-data/log.key")
    log_origin: str = "exchange.local/log"
    superlink_address: str = "127.0.0.1:9093"
    max_body_bytes: int = 1_048_576
    logging: LoggingSettings = LoggingSettings()

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
