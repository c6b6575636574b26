"""Request and response shapes of `POST /v1/chat` (SPEC §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]


class Message(BaseModel):
    """One turn of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Role
    content: str


class ChatRequest(BaseModel):
    """The provider-neutral chat request; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)  # upstreams take int32
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
