"""The registry: which provider serves a model name, and under which upstream name.

Resolution lives only here. Order: tier alias → `<provider>/<model>` prefix →
`<model>:cloud` suffix → the default provider with the name unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatd.config import AliasOptions, ProviderConfig, Settings, resolve_key
from chatd.errors import InvalidRequest, ProviderDisabled, ProviderNotFound
from chatd.providers import KINDS, Attribution, Provider
from chatd.providers.base import endpoint_name

CLOUD_SUFFIX = ":cloud"
CLOUD_PROVIDER = "ollama_cloud"


@dataclass(frozen=True, slots=True)
class Route:
    """Where one model name goes: the provider and the model name sent upstream."""

    provider: Provider
    model: str


class Registry:
    """Maps model names to registered providers."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        configured: Iterable[str],
        default: str,
        aliases: Mapping[str, list[str]] | None = None,
        endpoints: Mapping[str, list[Provider]] | None = None,
        alias_options: Mapping[str, AliasOptions] | None = None,
    ) -> None:
        self.providers = dict(sorted(providers.items()))
        self.configured = frozenset(configured) | frozenset(providers)
        self.default = default
        self.aliases = dict(aliases or {})
        # the endpoints of providers configured with `endpoints` (the first is
        # also in `providers`, which lists, probes and resolves); others have one, itself.
        self.endpoints = dict(endpoints or {})
        self.alias_options = dict(alias_options or {})
        # Each instance by what made it (name, config, key, ...): a reload reuses those.
        self.built: dict[tuple[object, ...], Provider] = {}

    @classmethod
    def from_settings(cls, settings: Settings, previous: Registry | None = None) -> Registry:
        """Register each configured provider per the `enabled` rules (docs/configuration.md);
        on a reload, a provider whose configuration (and key) did not change is
        `previous`'s own instance, its connection pool and all (docs/reload.md)."""
        chatd = settings.chatd
        attribution = Attribution(app_url=chatd.app_url, app_name=chatd.app_name)
        providers: dict[str, Provider] = {}
        endpoints: dict[str, list[Provider]] = {}
        kept = previous.built if previous is not None else {}
        built: dict[tuple[object, ...], Provider] = {}

        def make(name: str, config: ProviderConfig, key: str = "", **more: Any) -> Provider:
            identity = (name, config.model_dump_json(), key, chatd.timeout_for(name),
                        attribution, chatd.upstream_transport, *sorted(more.items()))  # fmt: skip
            provider = kept.get(identity)
            if provider is None:
                weight = more.pop("weight", None)
                provider = KINDS[config.kind](
                    name,
                    config,
                    key=key,
                    timeout=chatd.timeout_for(name),
                    attribution=attribution,
                    transport=chatd.upstream_transport,
                    **more,
                )
                if weight is not None:
                    provider.weight = weight
            built[identity] = provider
            return provider

        for name, config in chatd.providers.items():
            if config.enabled is False:
                continue
            if config.endpoints:
                found = build_endpoints(name, config, make)
                if found:
                    providers[name] = found[0]
                    endpoints[name] = found
                    continue
                # No endpoint has a key: not registered, unless `enabled = true` (then
                # registered but unavailable → 503, see docs/configuration.md).
                if config.enabled == "auto":
                    continue
                keyed = [e.key_env for e in config.endpoints if e.key_env]
                providers[name] = make(
                    name, config.model_copy(update={"key_env": config.key_env or keyed[0]})
                )
                continue
            key = resolve_key(config)
            if config.needs_key and not key and config.enabled == "auto":
                continue
            providers[name] = make(name, config, key)
        registry = cls(
            providers,
            configured=chatd.providers,
            default=chatd.default_provider,
            aliases=settings.models,
            endpoints=endpoints,
            alias_options=settings.alias_options,
        )
        registry.built = built
        return registry

    def targets(self, model: str) -> list[str]:
        """The model names to try for `model`: an alias's targets in order, else itself."""
        name = model.strip()
        if not name:
            raise InvalidRequest("model must be a non-empty string", param="model")
        return self.aliases.get(name, [name])

    def resolve(self, model: str) -> Route:
        """The route for one (non-alias) model name; raises 400/404/503 sentinels."""
        name = model.strip()
        if not name:
            raise InvalidRequest("model must be a non-empty string", param="model")
        if name in self.aliases:
            name = self.aliases[name][0]
        prefix, slash, rest = name.partition("/")
        if slash and prefix in self.configured:
            if not rest:
                raise InvalidRequest(
                    f'model "{name}" names no model after the prefix', param="model"
                )
            return self._route(prefix, rest, name)
        if name.endswith(CLOUD_SUFFIX) and len(name) > len(CLOUD_SUFFIX):
            return self._route(CLOUD_PROVIDER, name[: -len(CLOUD_SUFFIX)], name)
        return self._route(self.default, name, name)

    def _route(self, provider_name: str, upstream_model: str, asked: str) -> Route:
        provider = self.providers.get(provider_name)
        if provider is None:
            raise ProviderNotFound(
                f'no registered provider for model "{asked}" ({provider_name} is not registered)',
                param="model",
            )
        if not provider.available:
            raise ProviderDisabled(
                f"provider {provider_name} is registered but has no key "
                f"(set {provider.config.key_env or 'its key'})",
                param="model",
            )
        return Route(provider, upstream_model)

    def listing(self) -> dict[str, object]:
        """The `/v1/chat/providers` body: registered providers sorted by name."""
        return {
            "default": self.default,
            "providers": [p.describe() for p in self.providers.values()],
        }

    def instances(self) -> list[Provider]:
        """Every provider instance: one per endpoint."""
        return [p for name, p0 in self.providers.items() for p in self.endpoints.get(name, [p0])]

    async def start(self) -> None:
        for provider in self.instances():
            await provider.start()

    async def aclose(self) -> None:
        for provider in self.instances():
            await provider.aclose()


def build_endpoints(
    name: str, config: ProviderConfig, make: Callable[..., Provider]
) -> list[Provider]:
    """One provider instance per configured endpoint whose key resolves (docs/routing.md).

    Names are fixed by position, so leaving a keyless endpoint out renames no other.
    """
    made: list[Provider] = []
    seen: dict[str, int] = {}
    for entry in config.endpoints:
        base_url = entry.base_url or config.base_url
        label = entry.name or endpoint_name(base_url.rstrip("/"), name)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
        own = config.model_copy(
            update={
                "base_url": base_url,
                "key_env": entry.key_env or config.key_env,
                "key_file": entry.key_file or config.key_file,
                "max_concurrency": (
                    config.max_concurrency
                    if entry.max_concurrency is None
                    else entry.max_concurrency
                ),
                "endpoints": [],
            }
        )
        key = resolve_key(own)
        if own.needs_key and not key:
            continue
        made.append(make(name, own, key, endpoint=label, weight=entry.weight))
    return made
