"""`POST /v1/chat`'s answer as the contract publishes it."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ChatResponse(BaseModel):
    """`POST /v1/chat`'s answer."""

    model: str = Field(description="The model sent upstream (prefix stripped).")
    content: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    provider: str
    latency_ms: int
    thinking: str | None = Field(default=None, description="Reasoning text, when returned.")
