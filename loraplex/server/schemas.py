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


class _Request(BaseModel):
    """A generation request: its extra fields are kept (`model_extra`), so that those vLLM
    defines and this server cannot honour are refused by name (`unsupported`)."""
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (its newer spelling of the guided_* fields): one of them."""
    json_: dict | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    whitespace_pattern: Text | None = None


# vLLM request fields (and OpenAI ones) this server does not honour, with their neutral values:
# set to anything else (null is neutral too), they are refused by name rather than ignored.
REFUSED_FIELDS: dict[str, tuple] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "early_stopping": (False,), "bad_words": ([],),
    "allowed_token_ids": (), "truncate_prompt_tokens": (),
    "guided_decoding_backend": ("auto", "guidance", "llguidance"), "logits_processors": ([],),
    "spaces_between_special_tokens": (True,), "return_tokens_as_token_ids": (False,), "prompt_embeds": (),
    "priority": (0,), "kv_transfer_params": (), "vllm_xargs": (), "mm_processor_kwargs": (),
    "return_token_ids": (False,), "cache_salt": (), "documents": (), "chat_template": (),
    "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "request_id": (),
}


def _neutral(name: str, value) -> bool:
    return value is None or value in REFUSED_FIELDS[name]


class _Sampling(_Request):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)            # vLLM's extension; 0 / -1 = off
    min_p: float = Field(default=0.0, ge=0, le=1)   # vLLM's extension
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None         # vLLM's extension
    include_stop_str_in_output: bool = False        # vLLM's extension
    ignore_eos: bool = False                        # vLLM's extension
    min_tokens: int = Field(default=0, ge=0)        # vLLM's extension
    skip_special_tokens: bool = True                # vLLM's extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None      # token id (as a string, as JSON keys are) -> bias
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's extension
    response_format: dict | None = None             # {"type": "text" | "json_object" | "json_schema", ...}
    guided_json: dict | Text | None = None          # vLLM's structured output fields
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None              # a Lark or GBNF grammar
    guided_whitespace_pattern: Text | None = None   # JSON output: the whitespace allowed between tokens
    structured_outputs: StructuredOutputs | None = None
    user: Text | None = None

    _stop_text = field_validator("stop")(_unicode_in)

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED_FIELDS and not _neutral(name, value):
                return name
        return None

    def ignored_fields(self) -> list[str]:
        """Fields neither OpenAI's, vLLM's nor ours: ignored, as OpenAI clients send extras."""
        return [name for name in (self.model_extra or {}) if name not in REFUSED_FIELDS]


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None
    add_special_tokens: bool = True                 # vLLM's extension: the tokenizer's BOS etc.

    _prompt_text = field_validator("prompt")(_unicode_in)

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()


class ContentPart(_Body):
    type: Literal["text"]
    text: str  # checked in ChatMessage: a union's per-branch errors say less


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        _unicode_in([p.text for p in v] if isinstance(v, list) else v)
        return v

    @property
    def text_chars(self) -> int:
        if isinstance(self.content, list):
            return sum(len(p.text) for p in self.content)
        return len(self.content or "")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list | None = None
    add_generation_prompt: bool = True              # vLLM's extensions, passed to the chat template
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict | None = None
    echo: bool = False

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.echo:
            return "echo"
        return super().unsupported()


class TokenizeRequest(_Body):                        # vLLM's /tokenize: a prompt, or chat messages
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None           # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):                      # vLLM's /detokenize
    model: Text | None = None
    tokens: list[int]


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
    load_inplace: bool = False      # replace a loaded adapter's weights (new requests get the new ones)


class UnloadLoraAdapter(_Body):     # vLLM's /v1/unload_lora_adapter
    lora_name: Text
    lora_int_id: int | None = None


# -- responses (documented in /openapi.json; the routes build them as plain dicts) --------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the prefix cache already held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "abort"] | None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (None: EOS or not stopped)
    logprobs: dict | None = None  # tokens, token_logprobs, top_logprobs, text_offset
    prompt_logprobs: list | None = None   # with prompt_logprobs: per prompt token, None first


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
    stop_reason: int | str | None = None
    logprobs: dict | None = None  # content: [{token, logprob, bytes, top_logprobs}]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list | None = None   # with prompt_logprobs: per prompt token, None first


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
