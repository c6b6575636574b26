"""The OpenAPI document itself: every surface's schemas gathered, FastAPI's 422s removed."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from chatd.state.caller_fields import CallerChange, NewCaller
from chatd.surfaces.contract.anthropic import MESSAGES_SCHEMAS
from chatd.surfaces.contract.embeddings import EMBEDDINGS_REQUEST
from chatd.surfaces.contract.openai import CHAT_COMPLETION_REQUEST, CONTENT_PART
from chatd.types import ChatRequest

REQUEST_SCHEMAS: dict[str, Any] = {
    "NewCaller": NewCaller.model_json_schema(),
    "CallerChange": CallerChange.model_json_schema(),
    "ChatCompletionRequest": CHAT_COMPLETION_REQUEST,
    "ContentPart": CONTENT_PART,
    "EmbeddingsRequest": EMBEDDINGS_REQUEST,
    **MESSAGES_SCHEMAS,
}


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic request model's JSON Schema with its `$defs` moved to the components."""
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def install_openapi(app: FastAPI, extra_schemas: dict[str, Any] | None = None) -> None:
    """Serve an OpenAPI document that also holds the request schemas routes refer to."""
    schemas: dict[str, Any] = dict(REQUEST_SCHEMAS)
    chat = request_schema(ChatRequest)
    schemas.update(chat.pop("$defs", {}))
    schemas["ChatRequest"] = chat
    schemas.update(extra_schemas or {})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=DESCRIPTION,
                routes=app.routes,
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI documents a 422 wherever it validates a parameter; chatd answers
            # those as 400 invalid_request (documented), never 422.
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            for name, schema in schemas.items():
                components.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


DESCRIPTION = (
    "One address for every LLM a platform calls. Errors on every route are the "
    "`ErrorResponse` envelope; an unknown path is `404 not_found`."
)
