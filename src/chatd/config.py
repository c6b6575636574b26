"""Configuration: `lakehouse.toml` + `CHATD_*` environment overrides (docs/configuration.md).

Settings are built once at start-up by `load_settings` and passed into
`create_app`; nothing reads the file or the environment at request time.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from chatd.builtin_providers import BUILTIN_PROVIDERS

DEFAULT_CONFIG_FILE = "lakehouse.toml"
PROVIDER_NAME = re.compile(r"^[a-z0-9_-]+$")


class ConfigError(Exception):
    """A configuration that chatd refuses to start with; the message is one line."""


class EndpointConfig(BaseModel):
    """One entry of a provider's `endpoints` (docs/routing.md); what it leaves out, the provider
    gives (`max_concurrency` None = the provider's)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    base_url: str = ""
    key_env: str = ""
    key_file: str = ""
    weight: float = Field(default=1, gt=0)
    max_concurrency: int | None = Field(default=None, ge=0)


class ProviderConfig(BaseModel):
    """One `[chatd.providers.<name>]` table."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ollama", "ollama_cloud", "openai", "mock"]
    base_url: str = ""
    key_env: str = ""
    key_file: str = ""
    timeout_secs: float | None = Field(default=None, gt=0)
    enabled: Literal["auto"] | bool = "auto"
    # mock kind
    reply: str | None = None
    latency_ms: int = Field(default=0, ge=0)
    # resilience (docs/routing.md)
    max_retries: int = Field(default=2, ge=0, le=10)
    max_retry_after_secs: float = Field(default=30, ge=0)
    max_concurrency: int = Field(default=0, ge=0)
    queue_timeout_secs: float = Field(default=30, ge=0)
    cooldown_failures: int = Field(default=5, ge=0)
    cooldown_secs: float = Field(default=30, ge=0)
    # embeddings (docs/http-api.md): most inputs sent upstream in one call
    embed_batch: int = Field(default=256, ge=1)
    # endpoints, balancing, hedging (docs/routing.md)
    balance: Literal["p2c", "round_robin"] = "p2c"
    hedge_after_ms: int = Field(default=0, ge=0)
    endpoints: list[EndpointConfig] = Field(default_factory=list)

    @property
    def needs_key(self) -> bool:
        """A provider needs a key when it names where to find one."""
        return bool(self.key_env)


CALLER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_USAGE_DB = "sqlite:///chatd-usage.sqlite3"


class CallerConfig(BaseModel):
    """One `[chatd.callers.<name>]` table (docs/callers-and-usage.md)."""

    model_config = ConfigDict(extra="forbid")

    token_env: str = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    budget_usd: float = Field(default=0, ge=0)
    budget_period: Literal["day", "week", "month"] = "month"
    max_concurrency: int = Field(default=0, ge=0)
    admin: bool = False


class Price(BaseModel):
    """USD per million tokens, in and out."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(default=0, ge=0)
    output: float = Field(default=0, ge=0)


class CacheConfig(BaseModel):
    """`[chatd.cache]`: the response cache (docs/replicas-and-cache.md), off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    ttl_secs: float = Field(default=600, gt=0)
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)  # in process; Redis has its own


class TracingConfig(BaseModel):
    """`[chatd.tracing]`: OpenTelemetry traces over OTLP/HTTP, off by default (docs/tracing.md)."""

    model_config = ConfigDict(extra="forbid")

    otlp_endpoint: str = ""  # "" = $OTEL_EXPORTER_OTLP_ENDPOINT, else off
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    service_name: str = ""  # "" = $OTEL_SERVICE_NAME, else "chatd"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value


class ChatdConfig(BaseModel):
    """The `[chatd]` table."""

    model_config = ConfigDict(extra="forbid")

    bind: str = "127.0.0.1:3220"
    default_provider: str = "ollama"
    timeout_secs: float = Field(default=180, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    app_url: str = ""
    app_name: str = "chatd"
    auth_tokens_env: str = ""
    admin_token_env: str = Field(
        default="", description="Variable holding an operator token for /admin/* only."
    )
    shutdown_grace_secs: float = Field(default=30, ge=0)
    # docs/exposing.md: an open gateway only when said outright; connections keep moving
    allow_unauthenticated: bool = False
    header_timeout_secs: float = Field(default=10, gt=0)
    keep_alive_secs: float = Field(default=5, gt=0)
    max_connections: int = Field(default=4096, ge=1)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # The read-only dashboard at /ui (ui/); false: no /ui routes and nothing per request.
    ui: bool = True
    # The HTTP transport under the providers' httpx clients (see providers/base.py).
    upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # state replicas share ("" = in process); e.g. "redis://cache:6379/0"
    redis_url: str = ""
    cache: CacheConfig = Field(default_factory=CacheConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    # callers, prices, the usage ledger ("" = no ledger).
    callers: dict[str, CallerConfig] = Field(default_factory=dict)
    prices: dict[str, Price] = Field(default_factory=dict)
    usage_db: str = DEFAULT_USAGE_DB
    usage_buffer_rows: int = Field(default=100_000, ge=1)
    watch_config: bool = Field(False, description="Reload when the config file changes")
    usage_retention_days: int = Field(default=90, ge=0)

    @field_validator("usage_db")
    @classmethod
    def _usage_db_scheme(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH, postgresql://... or empty (no ledger)")
        return value

    @field_validator("usage_retention_days", mode="before")
    @classmethod
    def _retention_is_a_number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # `true` is not a number of days
            raise ValueError("must be an integer >= 0 (0: keep rows forever)")
        return value

    @field_validator("callers")
    @classmethod
    def _caller_names(cls, value: dict[str, CallerConfig]) -> dict[str, CallerConfig]:
        for name in value:
            if not CALLER_NAME.match(name):
                raise ValueError(f"caller name {name!r} must match [A-Za-z0-9_.-]+")
        return value

    @field_validator("bind")
    @classmethod
    def _bind_parses(cls, value: str) -> str:
        parse_bind(value)
        return value

    @field_validator("providers")
    @classmethod
    def _names_are_plain(cls, value: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        for name in value:
            if not PROVIDER_NAME.match(name):
                raise ValueError(f"provider name {name!r} must match [a-z0-9_-]+")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// (or rediss://, unix://) URL")
        return value

    def timeout_for(self, provider: str) -> float:
        return self.providers[provider].timeout_secs or self.timeout_secs


class _EnvChatdConfig(ChatdConfig, BaseSettings):
    """`ChatdConfig` with `CHATD_*` environment variables laid over the file's values."""

    model_config = SettingsConfigDict(
        env_prefix="CHATD_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, **others: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:  # fmt: skip
        return (env_settings, init_settings)  # environment beats the file


@dataclass(frozen=True, slots=True)
class AliasOptions:
    """How a table-form alias (`[models.<alias>]`) uses its targets (docs/routing.md)."""

    mode: Literal["fallback", "balance"] = "fallback"
    hedge_after_ms: int = 0


@dataclass(frozen=True)
class Settings:
    """Everything chatd needs, resolved once at start-up.

    `models` maps every alias to its targets; `alias_options` holds only the table-form
    aliases that ask for more than fallback order.
    """

    chatd: ChatdConfig
    models: dict[str, list[str]] = field(default_factory=dict)
    source: str = "built-in defaults"
    alias_options: dict[str, AliasOptions] = field(default_factory=dict)


def parse_bind(bind: str) -> tuple[str, int]:
    """`"host:port"` → `(host, port)`; raises ValueError on anything else."""
    host, sep, port = bind.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:3220")
    return host.strip("[]"), int(port)


def resolve_key(provider: ProviderConfig, environ: Mapping[str, str] | None = None) -> str:
    """The provider's key: `$key_env`, else that name in the dotenv `key_file`, else ''."""
    if not provider.key_env:
        return ""
    environ = os.environ if environ is None else environ
    key = environ.get(provider.key_env, "").strip()
    if key or not provider.key_file:
        return key
    try:
        values = dotenv_values(provider.key_file)
    except (OSError, UnicodeDecodeError):
        return ""
    return (values.get(provider.key_env) or "").strip()


def build_settings(
    data: Mapping[str, Any] | None = None, *, use_env: bool = False, source: str = "dict"
) -> Settings:
    """Validate a parsed config document (the TOML's shape) into `Settings`.

    Built-in providers are laid under the document's own tables, key by key.
    Raises ConfigError with one line naming the offending key.
    """
    data = dict(data or {})
    chatd = dict(data.get("chatd") or {})
    providers = {name: dict(cfg) for name, cfg in BUILTIN_PROVIDERS.items()}
    for name, table in (chatd.get("providers") or {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"chatd.providers.{name}: must be a table")
        providers[name] = {**providers.get(name, {}), **table}
    chatd["providers"] = providers
    try:
        config = _EnvChatdConfig(**chatd) if use_env else ChatdConfig(**chatd)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "chatd")) from None
    if use_env:
        config = ChatdConfig.model_validate(config.model_dump())
    if config.default_provider not in config.providers:
        raise ConfigError(
            f"chatd.default_provider: {config.default_provider!r} is not a configured provider"
        )
    models, options = _parse_models(data.get("models") or {})
    return Settings(chatd=config, models=models, source=source, alias_options=options)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the config file (`path`, `$LAKEHOUSE_CONFIG`, `./lakehouse.toml`) and the env."""
    explicit = path or os.environ.get("LAKEHOUSE_CONFIG")
    config_path = Path(explicit or DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if config_path.is_file():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: malformed TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read: {exc.__class__.__name__}") from None
        source = str(config_path)
    elif explicit:
        raise ConfigError(f"{config_path}: no such config file")
    return build_settings(data, use_env=True, source=source)


def _parse_models(
    models: Mapping[str, Any],
) -> tuple[dict[str, list[str]], dict[str, AliasOptions]]:
    """`[models]`: a string (one target), a list (fallback order) or a table
    `{targets, mode, hedge_after_ms}` (docs/routing.md)."""
    tiers: dict[str, list[str]] = {}
    options: dict[str, AliasOptions] = {}
    for alias, value in models.items():
        if isinstance(value, Mapping):
            value, option = _alias_table(alias, value)
            if option != AliasOptions():
                options[alias] = option
        targets = [value] if isinstance(value, str) else value
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)
        ):
            raise ConfigError(f"models.{alias}: must be a model ID or a non-empty list of them")
        tiers[alias] = [t.strip() for t in targets]
    return tiers, options


def _alias_table(alias: str, table: Mapping[str, Any]) -> tuple[Any, AliasOptions]:
    unknown = sorted(set(table) - {"targets", "mode", "hedge_after_ms"})
    if unknown:
        raise ConfigError(f"models.{alias}.{unknown[0]}: unknown key")
    targets = table.get("targets")
    if targets is None or targets == [] or targets == "":
        raise ConfigError(f"models.{alias}.targets: required, a model ID or a non-empty list")
    mode = table.get("mode", "fallback")
    if mode not in ("fallback", "balance"):
        raise ConfigError(f'models.{alias}.mode: must be "fallback" or "balance"')
    hedge = table.get("hedge_after_ms", 0)
    if not isinstance(hedge, int) or isinstance(hedge, bool) or hedge < 0:
        raise ConfigError(f"models.{alias}.hedge_after_ms: must be an integer >= 0")
    return targets, AliasOptions(mode=mode, hedge_after_ms=hedge)


def describe_validation_error(exc: ValidationError, prefix: str) -> str:
    """One line naming the first bad key; never echoes the offending value."""
    first = exc.errors(include_input=False, include_url=False)[0]
    loc = ".".join(str(part) for part in (prefix, *first["loc"]))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = len(exc.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more)" if more else "")
