"""The OpenAI wire format: request bodies (validated with pydantic) and errors.

Only what a client sends is modelled here; responses are plain dicts built in app.py,
in the order and shape the OpenAI API uses. Every mistake in a request becomes an
``APIError``, which the app answers with the OpenAI error body:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

>>> req = parse_body(CompletionRequest, b'{"model": "m", "prompt": "Hi", "max_tokens": 4}')
>>> req.prompt, req.max_tokens, req.n
('Hi', 4, 1)
>>> parse_body(CompletionRequest, b'{"model": "m", "prompt": "Hi", "n": 0}')
Traceback (most recent call last):
...
scratchlm.serve.protocol.APIError: n: Input should be greater than or equal to 1
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as the OpenAI API allows
# Below this, logits / temperature overflows float32 (inf - inf = NaN in the softmax); vLLM
# raises smaller temperatures to the same 0.01. 0 itself means greedy.
MIN_TEMPERATURE = 0.01
# The repetition penalty divides (or multiplies) logits: outside [0.01, 100], with a small
# temperature on top, they overflow the same way. 1.0 means no penalty; 1.1-1.5 is usual.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# Seeds seed a torch.Generator (64-bit); choice i of a request draws with seed + i.
SEED_RANGE = (-(2**63), 2**63 - 1)


class APIError(Exception):
    """A request the server will not serve: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies --------------------------------------------------------------------
class _Request(BaseModel):
    """Fields common to both endpoints. Parsed in strict mode: "5" is not a number, true is
    not 1. Unknown fields are ignored, as clients send many optional ones."""

    # allow_inf_nan=False: NaN and Infinity (which Python's and pydantic's JSON accept) are refused.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not part of the OpenAI API; common extensions (vLLM, llama.cpp use the same names).
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    # OpenAI options this server does not implement: refused unless left at their defaults.
    logprobs: bool | int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {v}: smaller "
                             f"temperatures overflow the logits")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def check_supported(self) -> None:
        for name in ("logprobs", "frequency_penalty", "presence_penalty", "logit_bias"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions: continue a prompt (or several)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo", code="unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported by this server", param="best_of",
                           code="unsupported_parameter")


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions: the next message of a conversation."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools",
                           code="unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported (no JSON mode)",
                           param="response_format", code="unsupported_parameter")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_Request.model_rebuild()


def parse_body(model: type[BaseModel], body: bytes):
    """Validate a JSON body against a request model; any problem becomes an APIError(400)
    naming the first offending field, as the OpenAI API reports one problem at a time."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        if first["type"] in ("json_invalid", "json_type"):
            raise APIError(400, "the request body is not valid JSON: " + first["msg"].removeprefix(
                "Invalid JSON: "), code="invalid_json") from None
        raise validation_error(first) from None


def validation_error(error: dict) -> APIError:
    """One pydantic error (a dict of ``ValidationError.errors()``) as an OpenAI-style 400."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    # Drop union-branch names pydantic adds to the path (e.g. "str", "list[str]").
    param = ".".join(p for p in loc if not _is_type_name(p)) or None
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if error["type"] == "missing":
        message = "Field required"
    return APIError(400, f"{param}: {message}" if param else message, param=param,
                    code="missing_required_parameter" if error["type"] == "missing" else None)


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool") or "[" in part or part.startswith(("list", "function-"))

