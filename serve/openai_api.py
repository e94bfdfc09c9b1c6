"""The OpenAI wire format: request parsing with field-level errors, response and stream-chunk shapes.

Plain Python (pydantic + json), no Ray: the HTTP layer in `serve.app` calls these, and tests call them directly.
Only what the endpoint implements is accepted with meaning (`model`, `prompt`/`messages`, `max_tokens`,
`temperature`, `top_p`, `stop`, `stream`, `stream_options`, `seed`, `n` = 1). OpenAI fields that would change the
answer and are not implemented (`UNSUPPORTED_FIELDS`: logprobs, tools, JSON mode, penalties, ...) are refused with
a 400 unless they hold their no-op value; other fields (`user`, `metadata`, ...) are ignored. Tool turns in a chat
history (role `tool`/`function`, an assistant's `tool_calls`) are refused too: the chat template renders plain text.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import SEED_RANGE, ConfigError, DecodeConfig
from pipeline.decoding import GenerationStats

MAX_STOP_STRINGS = 4  # OpenAI's limit
# Fields this endpoint does not implement, each with the values that ask for nothing (accepted and ignored).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class ApiError(Exception):
    """An error the client caused (or may retry); rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # strict: "5" is not an integer and 1 is not a boolean; clients should learn that from a 400, not by surprise.
    # Extra fields are kept (and checked against UNSUPPORTED_FIELDS by `parse_request`).
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default and range; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])  # what torch.Generator.manual_seed takes
    n: int = Field(1, ge=1, le=1)  # one choice per request: the decoder produces one sequence

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop: stop strings must be non-empty", param="stop")
        return tuple(stops)

    @property
    def max_tokens_field(self) -> str | None:
        """The field the client set the length with (None: the server's default length applies)."""
        if self.max_tokens is not None:
            return "max_tokens"
        return "max_completion_tokens" if self.max_completion_tokens is not None else None

    @property
    def prompt_field(self) -> str:
        return "messages" if isinstance(self, ChatRequest) else "prompt"

    def decode_config(self, defaults: DecodeConfig, *, max_tokens_limit: int) -> DecodeConfig:
        """`defaults` (the server's drafting settings and default length, `ServeConfig.request_defaults`) with this
        request's length, sampling, stop strings and seed."""
        max_tokens = self.max_tokens or self.max_completion_tokens or defaults.max_new_tokens
        if max_tokens > max_tokens_limit:
            field = "max_tokens" if self.max_tokens or not self.max_completion_tokens else "max_completion_tokens"
            raise ApiError(400, f"{field}: {max_tokens} is above this server's limit of {max_tokens_limit}",
                           param=field)
        try:
            return defaults.replace(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                    stop=self.stop_strings(), seed=self.seed)
        except ConfigError as error:  # the pydantic bounds above should make this unreachable
            raise ApiError(400, str(error).removeprefix("decode.")) from error

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


TOOL_ROLES = ("tool", "function")  # the results of tool calls, which the target's plain-text template cannot render
TOOL_CALL_FIELDS = ("tool_calls", "function_call")


class ChatMessage(BaseModel):
    # extra="allow": an assistant turn's tool calls must be seen (and refused), not dropped with the other extras
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None  # null only where OpenAI allows it: an assistant turn

    def as_dict(self, index: int) -> dict[str, str]:
        self._refuse_tools(index)
        if self.content is None and self.role != "assistant":
            raise ApiError(400, f"messages.{index}.content: a {self.role} message needs content",
                           param=f"messages.{index}.content")
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}

    def _refuse_tools(self, index: int) -> None:
        """Tool turns get a 400: served without them, the answer would ignore what the tools returned."""
        if self.role in TOOL_ROLES:
            field = "role"
        else:
            field = next((f for f in TOOL_CALL_FIELDS if (self.model_extra or {}).get(f) not in (None, [], {})), None)
        if field is not None:
            raise ApiError(400, f"messages.{index}.{field}: tools are not supported by this server (it renders "
                                "plain-text turns only); send the conversation without tool calls and tool results",
                           param=f"messages.{index}.{field}")


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)

    def conversation(self) -> list[dict[str, str]]:
        messages = [m.as_dict(index) for index, m in enumerate(self.messages)]
        if not any(m["content"].strip() for m in messages):
            raise ApiError(400, "messages: every message is empty; send some text", param="messages")
        return messages


_Request.model_rebuild()


def parse_request(body: bytes, request_type: type[_Request]) -> _Request:
    """Raw body -> a validated request, or an `ApiError` (400) naming the first bad field."""
    try:
        request = request_type.model_validate_json(body)
    except ValidationError as error:
        raise ApiError(400, _describe(error.errors()[0]), param=_param(error.errors()[0])) from None
    for field, value in (request.model_extra or {}).items():
        if field in UNSUPPORTED_FIELDS and not any(_same(value, allowed) for allowed in UNSUPPORTED_FIELDS[field]):
            raise ApiError(400, f"{field}: not supported by this server (it returns plain generated text); "
                                f"leave it out", param=field)
    return request


UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _same(value: Any, allowed: Any) -> bool:
    """value == allowed, where a boolean equals only a boolean (True == 1 in Python; 0.0 == 0 is fine)."""
    return isinstance(value, bool) == isinstance(allowed, bool) and value == allowed


def _param(error: dict[str, Any]) -> str | None:
    loc = [str(part) for part in error.get("loc", ())]
    # a union reports the member type it tried as the last location part ("str", "list[str]"): drop it
    while loc and (loc[-1] in UNION_MEMBER_TAGS or not (loc[-1].isidentifier() or loc[-1].isdigit())):
        loc.pop()
    return ".".join(loc) or None


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "json_invalid":
        return f"request body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})"
    if error["type"] == "model_type" and not error.get("loc"):
        return "request body must be a JSON object"
    param = _param(error)
    if error["type"] == "missing":
        return f"{param}: this field is required"
    if error["type"] == "string_too_short":
        return f"{param}: must not be empty"
    if error["type"] == "too_short":
        return f"{param}: must hold at least one item"
    return f"{param}: {error['msg'][:1].lower()}{error['msg'][1:]}" if param else error["msg"]


def fit_to_context(request: _Request, decode: DecodeConfig, *, prompt_tokens: int, context_window: int) -> DecodeConfig:
    """`decode` once the prompt's length is known: a 400 `context_length_exceeded` when the prompt and the length the
    client asked for do not fit the target's context window (the generation would otherwise stop at the window with
    a shorter answer than asked); the server's default length, which nobody asked for, shrinks to what fits."""
    room = context_window - prompt_tokens
    asked = request.max_tokens_field
    if room >= 1 and asked is None:
        return decode.replace(max_new_tokens=min(decode.max_new_tokens, room))
    if room >= 1 and decode.max_new_tokens <= room:
        return decode
    completion = f", {decode.max_new_tokens} in {asked}" if asked else ""
    raise ApiError(400, f"this model's context window is {context_window} tokens, but the request needs "
                        f"{prompt_tokens + (decode.max_new_tokens if asked else 1)} ({prompt_tokens} in the "
                        f"{request.prompt_field}{completion}); shorten the {request.prompt_field}"
                        + (f" or lower {asked}" if asked else ""),
                   param=asked if room >= 1 else request.prompt_field, code="context_length_exceeded")


def usage(stats: GenerationStats, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": stats.prompt_tokens + completion_tokens}


def speculative_stats(stats: GenerationStats, *, drafter: bool) -> dict[str, Any]:
    """This request's speculation: tokens the drafter drafted and those of them accepted, tokens only the
    prompt-lookup branch drafted that were accepted, and tau (tokens per target forward pass)."""
    return {"drafter": drafter, "drafted_tokens": stats.draft_tokens, "accepted_tokens": stats.drafter_accepted,
            "lookup_accepted_tokens": stats.lookup_accepted,
            "target_forward_passes": stats.target_forward_passes,
            "acceptance_length": round(stats.acceptance_length, 4)}


class ResponseShape:
    """Ids, timestamps and field names of one request's response, for the completions or the chat API."""

    def __init__(self, *, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, *, usage: dict, speculative: dict) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._envelope("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage, "speculative": speculative}

    def chunk(self, text: str, finish_reason: str | None = None, *, first: bool = False,
              usage: dict | None = None, speculative: dict | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        chunk = {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        if speculative is not None:
            chunk["speculative"] = speculative
        return chunk

    def usage_chunk(self, usage: dict, speculative: dict) -> dict[str, Any]:
        """OpenAI's `stream_options.include_usage` chunk: no choices, only usage."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": usage, "speculative": speculative}


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Event in OpenAI's format: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


SSE_DONE = sse("[DONE]")


class StreamText:
    """Turns growing token ids into text deltas that never need taking back.

    A delta never includes text a stop string might still cut off (a tail that is a prefix of a stop string) or a
    half-decoded multi-byte character (U+FFFD at the end), so the concatenated deltas equal the final text.
    """

    def __init__(self, decode, stop: tuple[str, ...]) -> None:
        self.decode = decode  # token ids -> text
        self.stop = stop
        self.token_ids: list[int] = []
        self.sent = ""

    def add(self, new_ids: list[int]) -> str:
        self.token_ids.extend(new_ids)
        return self._advance(self._safe_text(self.decode(self.token_ids)))

    def finish(self, final_text: str) -> str:
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable: send nothing more early
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _safe_text(self, text: str) -> str:
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return text[:cut]
        # The half-decoded character goes first: a stop string's start before it must be held back too.
        text = text.rstrip("\ufffd")
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return text[: len(text) - hold]
