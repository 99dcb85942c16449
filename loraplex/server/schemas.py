"""Request bodies (pydantic). Fields OpenAI defines but loraplex cannot honour are refused by
name rather than silently ignored; unknown fields are ignored, as OpenAI clients send extras."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
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
    user: str | None = None

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
    suffix: str | None = None
    best_of: int | None = None

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
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _flatten(cls, v):
        # text parts are joined: templates of text-only models take a string
        return "".join(p.text for p in v) if isinstance(v, list) else v


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
    name: str
    path: str
    replace: bool = False
    pin: bool = False


class MergeSource(_Body):
    name: str
    weight: float = 1.0


class MergeAdapters(_Body):
    name: str
    method: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
    sources: list[MergeSource] = Field(min_length=1)
    rank: int | None = Field(default=None, ge=1)
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: int = 0
    replace: bool = False
    pin: bool = False


class ExportAdapter(_Body):
    path: str


class PinAdapter(_Body):
    pinned: bool = True


class LoadLoraAdapter(_Body):       # vLLM's /v1/load_lora_adapter
    lora_name: str
    lora_path: str


class UnloadLoraAdapter(_Body):     # vLLM's /v1/unload_lora_adapter
    lora_name: str
    lora_int_id: int | None = None
