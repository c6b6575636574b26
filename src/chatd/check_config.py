"""What `chatd check-config` prints: the resolved configuration, keys only as set/unset,
passwords never (docs/getting-started.md)."""

from __future__ import annotations

from chatd.config import Settings, resolve_key
from chatd.state.auth import auth_tokens
from chatd.state.shared import describe_url


def describe_settings(settings: Settings) -> str:
    """A readable dump of the resolved config; keys appear only as set/unset."""
    chatd = settings.chatd
    lines = [
        f"config: {settings.source}",
        f"bind: {chatd.bind}",
        f"default_provider: {chatd.default_provider}",
        f"timeout_secs: {chatd.timeout_secs:g}",
        f"max_body_bytes: {chatd.max_body_bytes}",
        f"shutdown_grace_secs: {chatd.shutdown_grace_secs:g}",
        f"upstream_transport: {chatd.upstream_transport}",
        f"app_name: {chatd.app_name}",
        f"app_url: {chatd.app_url or '-'}",
        f"auth: {describe_auth(settings)}",
        f"allow_unauthenticated: {str(chatd.allow_unauthenticated).lower()}",
        f"max_connections: {chatd.max_connections} (per worker)",
        f"header_timeout_secs: {chatd.header_timeout_secs:g}",
        f"keep_alive_secs: {chatd.keep_alive_secs:g}",
        f"max_header_bytes: {chatd.max_header_bytes}",
        f"ui: {'on (/ui)' if chatd.ui else 'off'}",
        f"usage_db: {describe_usage_db(chatd.usage_db)}",
        f"callers: {', '.join(sorted(chatd.callers)) or '-'}",
        f"redis_url: {describe_url(chatd.redis_url) if chatd.redis_url else '- (in process)'}",
        f"cache: {describe_cache(settings)}",
        "models:",
    ]
    lines += [f"  {alias} = {', '.join(targets)}" for alias, targets in settings.models.items()]
    lines.append("providers:")
    for name, cfg in sorted(chatd.providers.items()):
        key = "n/a"
        if cfg.needs_key:
            key = f"{cfg.key_env} {'set' if resolve_key(cfg) else 'unset'}"
        keyed = not cfg.needs_key or key.endswith(" set")
        endpoint_lines = []
        if cfg.endpoints:  # registered when one endpoint's key resolves
            keyed = False
            for entry in cfg.endpoints:
                key_env = entry.key_env or cfg.key_env
                found = bool(
                    resolve_key(
                        cfg.model_copy(
                            update={"key_env": key_env, "key_file": entry.key_file or cfg.key_file}
                        )
                    )
                )
                keyed = keyed or found or not key_env
                endpoint_key = f"{key_env} {'set' if found else 'unset'}" if key_env else "n/a"
                base_url = entry.base_url or cfg.base_url or "-"
                endpoint_lines.append(
                    f"    endpoint {entry.name or '-'}: base_url={base_url} "
                    f"key={endpoint_key} weight={entry.weight:g}"
                )
        registered = cfg.enabled is True or (cfg.enabled == "auto" and keyed)
        lines.append(
            f"  {name}: kind={cfg.kind} base_url={cfg.base_url or '-'} key={key} "
            f"enabled={str(cfg.enabled).lower()} registered={'yes' if registered else 'no'} "
            f"timeout_secs={chatd.timeout_for(name):g}"
        )
        lines += endpoint_lines
    return "\n".join(lines)


def describe_cache(settings: Settings) -> str:
    cache = settings.chatd.cache
    if not cache.enabled:
        return "off"
    where = "redis" if settings.chatd.redis_url else f"in process, max_bytes={cache.max_bytes}"
    return f"on, ttl_secs={cache.ttl_secs:g}, {where}"


def describe_auth(settings: Settings) -> str:
    """Inbound auth as check-config shows it: on/off and where the tokens come from."""
    tokens = auth_tokens(settings)
    if tokens is None:
        return "off"
    return f"bearer tokens from {settings.chatd.auth_tokens_env} ({'set' if tokens else 'unset'})"


def describe_usage_db(url: str) -> str:
    """The ledger's database, its password (if any) never shown."""
    if not url:
        return "off"
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
    return url
