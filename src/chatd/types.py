"""Request and response shapes of `POST /v1/chat` (docs/http-api.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]


def integral(value: Any) -> Any:
    """JSON has one number type: `64.0` is the integer 64 (JSON Schema says so too);
    `1.5` stays a float and strict validation refuses it."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


class Message(BaseModel):
    """One turn of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Role
    content: str


class ChatRequest(BaseModel):
    """The provider-neutral chat request; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    # Trimmed and checked by the registry (its 400 names the model); the schema says so.
    model: str = Field(json_schema_extra={"minLength": 1, "pattern": r"\S"})
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    # upstreams take int32
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), BeforeValidator(integral)] | None = None
    format: Literal["", "json"] = ""
    think: bool = False
    stream: bool = False


@dataclass(slots=True)
class ChatResult:
    """What a provider returns for one non-streamed call."""

    content: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # Ollama's, as sent (OpenAI surface)
    cost: float | None = None  # USD, when the upstream reports it (OpenRouter's usage.cost)


@dataclass(slots=True)
class StreamEvent:
    """One piece of a streamed answer: a content delta, a thinking delta, or the end.

    The final event has `done=True` and carries the token counts and finish reason.
    """

    delta: str = ""
    thinking: str = ""
    done: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class EmbedResult:
    """What a provider returns for one embeddings call: a vector per input, in order."""

    vectors: list[list[float]]
    input_tokens: int = 0
    # The vectors' own text in the upstream's answer (providers.base.vector_texts), to
    # send as it came when floats are asked for; None: format `vectors`.
    texts: list[bytes] | None = None
