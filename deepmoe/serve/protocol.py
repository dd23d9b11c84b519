"""The OpenAI API subset the server speaks: request and response schemas, errors, logprobs shapes.

Requests validate strictly (a string where a number belongs is a 400, not a silent coercion) and ignore
unknown fields, as OpenAI clients send optional fields this server does not model. Parameters that would
change the result but are not implemented (echo, suffix, logit_bias, tools, ...) are rejected, never
ignored. `ignore_eos`, `top_k`, `min_p`, `repetition_penalty` and `stop_token_ids` are vLLM's extras
(send them with the openai client's `extra_body`).

Text must be valid Unicode: JSON can escape a lone UTF-16 surrogate ("\\ud800"), which Python decodes to a
string that no tokenizer can encode, so every text field is checked here and such a request is a 400.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..engine.sequence import SamplingParams

MAX_CHOICES = 128  # n per prompt (the server's limits bound prompts × n as well)
ROLES = ("system", "user", "assistant", "tool", "developer")
SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's seed is a 64-bit integer


def error_json(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class APIError(Exception):
    """An error the client gets as `error_json` with this HTTP status and headers (or as an event, mid-stream)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def json(self) -> dict:
        return error_json(self.status, self.message, self.param, self.code)


# ---- requests ------------------------------------------------------------------------------------
def valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # the only str that cannot be encoded holds a lone surrogate
        raise ValueError(f"the text holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X} at character "
                         f"{e.start}), which is not valid Unicode; send valid UTF-8 (a surrogate only as half "
                         "of a pair)") from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints; None means the SamplingParams default (OpenAI's defaults)."""
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):  # a validator, not Text in the union: a union reports a type error for its first member
        for text in [v] if isinstance(v, str) else v or []:
            valid_unicode(text)
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises APIError(400) with SamplingParams' message on an invalid value."""
        names = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "n", "top_k", "min_p",
                 "repetition_penalty", "stop_token_ids")
        given = {k: v for k in names if (v := getattr(self, k)) is not None}
        try:
            return SamplingParams(**given, stop=self.stop or [], max_tokens=max_tokens, logprobs=logprobs,
                                  ignore_eos=self.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None


def _unsupported(**given: Any) -> None:
    for name, value in given.items():
        if value:
            raise ValueError(f"'{name}' is not supported by this server; remove it")


class CompletionRequest(_Sampling):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked below for one clear message
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        return 16 if v is None else v  # an explicit null means the default, as in OpenAI's API

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        def ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or (isinstance(v, list) and v and (ids(v) or all(isinstance(p, str) for p in v)
                                                                 or all(ids(p) for p in v))):
            for text in [v] if isinstance(v, str) else v:
                if isinstance(text, str):
                    valid_unicode(text)
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "lists of token ids (not empty)")

    @model_validator(mode="after")
    def _supported(self):
        _unsupported(echo=self.echo, suffix=self.suffix, logit_bias=self.logit_bias,
                     best_of=self.best_of not in (None, self.n or 1))
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else p


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):  # the parts' text is checked by TextPart
        return valid_unicode(v) if isinstance(v, str) else v

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        # checked here, not left to the chat template: many templates render any role they are given
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}; a message's role is one of: {', '.join(ROLES)}")
        return v

    def as_template_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # OpenAI's developer messages are what system messages were; chat templates know only "system" (a
        # DeepSeek template would drop the message silently)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        json_mode = self.response_format is not None and self.response_format.get("type") != "text"
        _unsupported(tools=self.tools, functions=self.functions, response_format=json_mode)
        return self


# ---- responses -----------------------------------------------------------------------------------
def _omit_none(*keys: str):
    """A serializer dropping `keys` when None: OpenAI omits these fields rather than sending null."""
    @model_serializer(mode="wrap")
    def drop(self, handler):
        return {k: v for k, v in handler(self).items() if not (k in keys and v is None)}
    return drop


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """The response, and every streamed chunk (OpenAI streams completions as partial text_completions)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    _ser = _omit_none("usage")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    _ser = _omit_none("role", "content")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    _ser = _omit_none("usage")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- logprobs ------------------------------------------------------------------------------------
# entries: the engine's per-token records (token_id, offset: where its text starts in the completion,
# logprobs: {token id: log-prob}, the chosen token first, then the top alternatives)
def _top(entry, k: int) -> list[tuple[int, float]]:
    # the engine keeps the chosen token plus the top k; when the chosen is not among the top k it is the
    # lowest, so the k best of the k (+1) entries are exactly the top k
    return sorted(entry.logprobs.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(entries: list, k: int, token_text) -> CompletionLogprobs:
    def by_text(e) -> dict[str, float]:
        top: dict[str, float] = {}
        for t, lp in _top(e, k):  # tokens with the same text (partial UTF-8 bytes) keep the likeliest
            top.setdefault(token_text(t), lp)
        return top

    return CompletionLogprobs(tokens=[token_text(e.token_id) for e in entries],
                              token_logprobs=[e.logprobs[e.token_id] for e in entries],
                              top_logprobs=[by_text(e) for e in entries], text_offset=[e.offset for e in entries])


def chat_logprobs(entries: list, k: int, token_text) -> ChatLogprobs:
    def one(t: int, lp: float) -> TopLogprob:
        s = token_text(t)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode()))

    return ChatLogprobs(content=[
        TokenLogprob(**one(e.token_id, e.logprobs[e.token_id]).model_dump(),
                     top_logprobs=[one(t, lp) for t, lp in _top(e, k)]) for e in entries])
