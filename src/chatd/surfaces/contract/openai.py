"""The OpenAI-compatible surface: `/v1/chat/completions` and `/v1/models`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from chatd.surfaces.contract.common import (
    MODEL_NAME,
    nullable,
)
from chatd.wire.openai_compat import PART_TYPES


class ModelEntry(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelEntry]


class ChatCompletion(BaseModel):
    """An OpenAI `chat.completion`; from openai-kind vendors, relayed as they sent it."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


# The OpenAI Chat Completions request as chatd checks it (openai_compat.check_body):
# only what chatd reads or translates is constrained; other fields pass through to
# openai-kind vendors, which judge them.


CHAT_COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "ChatCompletionRequest",
    "required": ["model", "messages"],
    "properties": {
        "model": MODEL_NAME,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {
                        "type": "string",
                        "enum": ["assistant", "developer", "function", "system", "tool", "user"],
                    },
                    "content": {
                        "description": "A string, or an array of content parts (only text "
                        "parts can go to Ollama and mock providers: others are a 400).",
                        "anyOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/ContentPart"},
                            },
                            {"type": "null"},
                        ],
                    },
                },
            },
        },
        "stream": {"type": "boolean"},
        # null is "not set" for every optional field chatd reads (OpenAI's SDKs send it)
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number"}),
        "frequency_penalty": nullable({"type": "number"}),
        "presence_penalty": nullable({"type": "number"}),
        "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ]
        },
        "response_format": nullable({"type": "object"}),
        "stream_options": nullable({"type": "object"}),
    },
}


CONTENT_PART: dict[str, Any] = {
    "type": "object",
    "title": "ContentPart",
    "description": '`{"type": "text", "text": ...}`, or any other part an '
    "openai-kind vendor takes (images, audio).",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": list(PART_TYPES)},
        "text": {"type": "string"},
    },
}
