"""`POST /v1/embeddings`: its request and its answer."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from chatd.surfaces.contract.common import (
    MODEL_NAME,
    nullable,
)

MAX_INPUTS = 2048  # inputs per request
MAX_DIMENSIONS = 65_536  # well past any model's; bounds the mock's work
EMBEDDINGS_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "EmbeddingsRequest",
    "required": ["model", "input"],
    "properties": {
        "model": MODEL_NAME,
        "input": {
            "description": "A string, or a list of strings (token-id arrays are refused).",
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                    "items": {"type": "string", "minLength": 1},
                },
            ],
        },
        "encoding_format": nullable({"type": "string", "enum": ["float", "base64"]}),
        "dimensions": nullable({"type": "integer", "minimum": 1, "maximum": MAX_DIMENSIONS}),
        "user": {"description": "Ignored."},
    },
}


class Embedding(BaseModel):
    object: str
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 LE.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """`POST /v1/embeddings`'s answer, `data` in input order."""

    object: str
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
