"""OpenAI wire schemas the gateway validates before routing.

Unknown fields are kept (``extra="allow"``) so a remote upstream receives what the caller sent;
local engines use only the fields they understand.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.db.tables import (
    DEFAULT_PRIORITY,
    MAX_DESCRIPTION_CHARS,
    MAX_PRIORITY,
    MAX_RATE_LIMIT,
    MIN_PRIORITY,
)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text, joining the text parts of a multi-part content list."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class _Sampling(_Open):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ResponseTextFormat(_Open):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseTextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class ResponseText(_Open):
    format: ResponseTextFormat = Field(default_factory=ResponseTextFormat)


# The events that end a Responses API stream (no ``[DONE]`` follows them); the last carries the usage.
RESPONSE_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesRequest(_Open):
    """``POST /v1/responses``. Items in ``input`` are checked as they are translated (the error names
    ``input[i]...``): their kinds are many and a provider that speaks this API takes them as sent."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseText | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512.
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return v


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    # The largest embeddings served today have 3,072; a bound keeps absurd values from reaching upstreams.
    dimensions: int | None = Field(None, ge=1, le=16_384)
    user: str | None = None

    def texts(self) -> list[str]:
        """Text inputs; token-id inputs are refused by engines that cannot detokenize."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(x, str) for x in self.input):
            return list(self.input)  # type: ignore[arg-type]
        raise ValueError("token-array input")


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


# --- API keys -------------------------------------------------------------------------------------

Scope = Literal["inference", "admin"]
MAX_EXPIRES_IN_S = 10 * 365 * 86_400  # ten years; beyond that, leave expires_in out (no expiry)


def _default_scopes() -> list[Scope]:
    return ["inference"]


class RateLimit(BaseModel):
    """A key's limits; null (or absent at creation) means no limit of that kind."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=1, le=MAX_RATE_LIMIT)
    tokens_per_minute: int | None = Field(None, ge=1, le=MAX_RATE_LIMIT)


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    priority: int = Field(DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                          description="higher is served first under contention")
    expires_in: int | None = Field(None, gt=0, le=MAX_EXPIRES_IN_S, description="seconds from now")
    scopes: list[Scope] = Field(default_factory=_default_scopes, min_length=1)
    rate_limit: RateLimit | None = None


class ApiKeyUpdate(BaseModel):
    """PATCH: fields left out stay as they are. In ``rate_limit``, null removes a limit, and each limit
    left out of it stays; ``"rate_limit": null`` removes both."""

    model_config = ConfigDict(extra="forbid")
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    priority: int | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    rate_limit: RateLimit | None = None

    @field_validator("description", "priority")
    @classmethod
    def _not_null(cls, v: object) -> object:
        # Runs only for values actually sent (defaults aren't validated): null is meaningless here.
        if v is None:
            raise ValueError("may be left out, but not null")
        return v

    def changes(self) -> dict[str, Any]:
        """Keyword arguments for ``KeyStore.update``: only what the caller sent."""
        sent = self.model_fields_set
        out: dict[str, Any] = {n: getattr(self, n) for n in ("description", "priority") if n in sent}
        if "rate_limit" in sent:
            limits = self.rate_limit or RateLimit(requests_per_minute=None, tokens_per_minute=None)
            fields = {"requests_per_minute": "rate_limit_rpm", "tokens_per_minute": "rate_limit_tpm"}
            out |= {ours: getattr(limits, theirs) for theirs, ours in fields.items()
                    if theirs in limits.model_fields_set}
        return out


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: a chat conversation, or one text as ``input``."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    input: str | None = Field(None, min_length=1, max_length=200_000)

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.messages is None) == (self.input is None):
            raise ValueError("give either 'messages' or 'input'")
        return self


GenerateRequest = ChatCompletionRequest | CompletionRequest
