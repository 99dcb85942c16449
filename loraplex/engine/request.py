"""A request as the engine sees it, and what the engine sends back for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .sampling import SamplingParams, TokenLogprob


class FinishReason(str, enum.Enum):
    STOP = "stop"      # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"    # the client went away, or the request was cancelled
    ERROR = "error"    # the engine failed while running it (message in RequestOutput.error)


class Status(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # has KV blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass(slots=True)
class RequestOutput:
    """One increment of a request's result, sent through its output channel."""

    request_id: str
    token_ids: list[int]                 # tokens generated since the previous output
    text: str                            # text safe to emit since the previous output
    logprobs: list[TokenLogprob] | None  # one per token in token_ids, when asked for
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0               # prompt tokens whose KV came from the prefix cache
    error: str | None = None
    queue_seconds: float | None = None   # on the finished output: arrival -> first admission (None: never ran)
    stop_reason: int | str | None = None  # on a STOP output: the stop token id or stop string that ended it (None: EOS)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first output, when asked for: one per
                                                              # prompt token (the first is None, as in vLLM)


@dataclass(eq=False)
class Request:
    """Prompt, adapter and sampling parameters plus the engine's per-sequence state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None                      # registered adapter name, None = base model
    on_output: Callable[[RequestOutput], None] | None = None  # output channel (called on the engine thread)
    arrival: float = field(default_factory=time.monotonic)
    detokenize: bool = True   # False: outputs carry no text (the consumer detokenizes; no stop strings)

    # engine state
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                # tokens whose keys and values are in the cache
    pending: int = 0                     # sampled tokens still on the device (async scheduling: 0-2)
    pending_row: int = -1                # the latest one's row in its step's draw
    block_table: list[int] = field(default_factory=list)
    cache_version: int = 0               # prefix cache: the adapter version its KV is computed under
    block_keys: list[bytes] = field(default_factory=list)  # prefix cache keys of its full blocks so far
    num_published: int = 0               # leading blocks of block_table findable in the prefix cache
    num_cached_tokens: int = 0           # prompt tokens reused from the prefix cache at first admission
    lora_slot: int = -1                  # GPU adapter slot while scheduled, -1 = base model
    adapter_ref: Any = None              # the adapter provider's handle (held until finished)
    generator: torch.Generator | None = None
    detokenizer: Any = None
    matcher: Any = None                  # grammar.Matcher of a structured-output request
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    first_scheduled: float | None = None  # time.monotonic() of the first admission (queue time)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # collected as steps land, when asked for
                                                              # ([None] first); None again once sent
    prompt_logprobs_done: int = 0        # prompt positions whose logprobs were launched (not redone
                                         # when a preempted request is recomputed)

    @property
    def all_ids(self) -> list[int]:
        """Prompt and generated tokens known on the host (not those still pending)."""
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """The newest token; only defined without pending tokens (else it is on the device)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence so far, pending ones included."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def out_of_tokens(self) -> bool:
        """max_tokens reached once the pending tokens land: nothing more to schedule."""
        return len(self.output_ids) + self.pending >= self.params.max_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return (self.status is Status.RUNNING and self.num_uncomputed == 1
                and bool(self.output_ids or self.pending))
