"""Request bodies (pydantic). Fields OpenAI defines but loraplex cannot honour are refused by
name rather than silently ignored; unknown fields are ignored, as OpenAI clients send extras."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _unicode(value: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"): no tokenizer, file system or UTF-8 encoder takes it
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate such as \\ud800 is not)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]  # every plain string field of a request body


def _unicode_in(value):
    """_unicode over the strings of a union field (str, or a list of them), which pydantic's
    per-branch errors would otherwise report as "Input should be a valid string"."""
    for item in [value] if isinstance(value, str) else value if isinstance(value, list) else ():
        if isinstance(item, str):
            _unicode(item)
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)            # vLLM's extension; 0 / -1 = off
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None         # vLLM's extension
    ignore_eos: bool = False                        # vLLM's extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    _stop_text = field_validator("stop")(_unicode_in)

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    _prompt_text = field_validator("prompt")(_unicode_in)

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()


class TextPart(_Body):
    type: Literal["text"]
    text: str  # checked once joined (ChatMessage._flatten): a union's per-branch errors say less


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _flatten(cls, v):
        # text parts are joined: templates of text-only models take a string
        return _unicode_in("".join(p.text for p in v) if isinstance(v, list) else v)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()


class RegisterAdapter(_Body):
    name: Text
    path: Text
    replace: bool = False
    pin: bool = False


class MergeSource(_Body):
    name: Text
    weight: float = 1.0


class MergeAdapters(_Body):
    name: Text
    method: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
    sources: list[MergeSource] = Field(min_length=1)
    rank: int | None = Field(default=None, ge=1)
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = 0
    replace: bool = False
    pin: bool = False


class ExportAdapter(_Body):
    path: Text


class PinAdapter(_Body):
    pinned: bool = True


class LoadLoraAdapter(_Body):       # vLLM's /v1/load_lora_adapter
    lora_name: Text
    lora_path: Text


class UnloadLoraAdapter(_Body):     # vLLM's /v1/unload_lora_adapter
    lora_name: Text
    lora_int_id: int | None = None


# -- responses (documented in /openapi.json; the routes build them as plain dicts) --------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "abort"] | None
    logprobs: dict | None = None  # tokens, token_logprobs, top_logprobs, text_offset


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "abort"] | None
    logprobs: dict | None = None  # content: [{token, logprob, bytes, top_logprobs}]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
