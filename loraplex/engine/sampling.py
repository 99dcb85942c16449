"""Per-request sampling parameters and one batched sampling step over a [B, V] logits tensor.

Every row has its own temperature, top-k, top-p and (optionally) its own seeded generator.
The step runs on the logits' device for all rows at once: one sort for the top-k/top-p
masks, one softmax, and the exponential race `argmax(p / E)` with E ~ Exponential(1),
which picks token i with probability p_i. A seeded row draws its E from its own generator,
so its tokens do not depend on which other requests share the batch; unseeded rows draw
theirs from the default generator in one call.

Before that, per row and only for the rows that ask (vLLM's order): a structured-output token
bitmask, logit_bias, min_tokens, then the repetition, frequency and presence penalties, all on
the raw logits (so greedy rows see them); min_p after temperature, before top-k and top-p.
"""

from __future__ import annotations

import array
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Protocol

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256     # a stop string is matched against the text's tail at every token
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024           # OpenAI caps logit_bias at 300 tokens; vLLM sets no cap
MAX_REPETITION_PENALTY = 100.0
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_FP32_TINY = torch.finfo(torch.float32).tiny


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops. Invalid values raise ValueError
    with a message fit to return to the client."""

    max_tokens: int = 16            # >= 1
    temperature: float = 1.0        # >= 0; 0 = greedy
    top_p: float = 1.0              # (0, 1]
    top_k: int = 0                  # 0 = off, else >= 1 (-1, vLLM's "off", is read as 0)
    seed: int | None = None         # per-request generator when set
    stop: list[str] = field(default_factory=list)  # up to 16 non-empty stop strings
    stop_token_ids: frozenset[int] = frozenset()  # given as any collection; kept as a set (checked per token)
    ignore_eos: bool = False
    logprobs: int | None = None     # None = off; k >= 0: chosen token's logprob plus top k
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # special tokens left out of the output text
    # Logits processing, per row (vLLM's order: logit_bias, min_tokens, then the penalties, on
    # the raw logits, so greedy rows see them too; min_p after temperature, before top-k/top-p).
    min_tokens: int = 0             # EOS and stop_token_ids cannot end the output before this many tokens
    min_p: float = 0.0              # [0, 1]: drop tokens below min_p x the likeliest token's probability
    repetition_penalty: float = 1.0  # > 0; CTRL's: a seen token's logit / p if > 0, else * p (prompt + output)
    presence_penalty: float = 0.0   # [-2, 2], OpenAI's: minus this once for every token already generated
    frequency_penalty: float = 0.0  # [-2, 2], OpenAI's: minus this times the token's count in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    prompt_logprobs: int | None = None  # None = off; k >= 0: each prompt token's logprob plus top k
    grammar: object | None = None   # structured output: a grammar.GrammarSpec (the output must match it)

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")

        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)

        # NaN fails the comparisons too; below fp32's smallest normal, top_p is 0 where it is used
        if not _is_real(self.top_p) or not _FP32_TINY <= self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] and at least {_FP32_TINY:.3g} (fp32), got {self.top_p!r}")
        self.top_p = float(self.top_p)

        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be 0 (off) or an integer >= 1, got {self.top_k!r}")
        self.top_k = max(self.top_k, 0)

        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

        # A bare string is one stop string, not a sequence of one-character stops.
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = []
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings may be at most {MAX_STOP_STRING_CHARS} characters long, "
                                 f"got one of {len(s)}")
        self.stop = list(stop)

        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple, set, frozenset)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {type(ids).__name__}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold integers >= 0, got {t!r}")
        self.stop_token_ids = frozenset(ids)

        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError("include_stop_str_in_output must be a boolean, "
                             f"got {self.include_stop_str_in_output!r}")

        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer between 0 and {MAX_LOGPROBS}, got {lp!r}")

        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a boolean, got {self.skip_special_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or not 0 < rp <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {rp!r}")
        self.repetition_penalty = float(rp)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
            setattr(self, name, float(v))
        bias = self.logit_bias if self.logit_bias is not None else {}
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
        for t, v in bias.items():
            if not _is_int(t) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not _is_real(v) or not -100 <= v <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v!r} for token {t}")
        self.logit_bias = {t: float(v) for t, v in bias.items()}

    @property
    def processes_logits(self) -> bool:
        """Whether the row's logits change before sampling (bias, min_tokens, penalties, min_p)."""
        return bool(self.logit_bias or self.min_tokens or self.min_p or self.repetition_penalty != 1
                    or self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, and the k most likely tokens."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), most likely first
    rank: int | None = None       # the token's rank in the distribution (1 = likeliest), where computed


class TokenHistory(Protocol):
    """What penalties and min_tokens read of a row's sequence (the engine's Request has it)."""

    prompt_ids: Sequence[int]
    output_ids: Sequence[int]   # generated tokens known on the host
    pending: int                # generated tokens still on the device: 0 or 1 when drawing
    pending_row: int            # the pending token's row in `pending_tokens` (the draw in flight)


@dataclass(slots=True)
class RowHistory:
    """A TokenHistory for callers without a Request."""

    prompt_ids: Sequence[int] = ()
    output_ids: Sequence[int] = ()
    pending: int = 0
    pending_row: int = -1


def check_vocab(params: SamplingParams, vocab_size: int) -> None:
    """ValueError when logit_bias names a token the model does not have (an index past the
    logits would fail on the device, where the error cannot be traced to the request)."""
    outside = sorted(t for t in params.logit_bias if t >= vocab_size)
    if outside:
        raise ValueError(f"logit_bias holds token ids outside the vocabulary (size {vocab_size}): "
                         f"{', '.join(map(str, outside[:10]))}{', ...' if len(outside) > 10 else ''}")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device` (where the noise is drawn), or None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


_TYPECODES = {torch.int32: "i", torch.int64: "q"}


def on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list on `device` without waiting for the device: a plain
    `torch.tensor(values, device="cuda")` synchronizes the stream, which would stall the host
    until the step in flight is done (see Engine's async scheduling). Integer lists of a given
    dtype go through array.array: a third of torch.tensor(list)'s time (the step's index lists)."""
    if dtype in _TYPECODES:
        t = torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype) if values else \
            torch.empty(0, dtype=dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    return host_to_device(t, device)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, through pinned memory on CUDA so that nothing waits."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def device_to_host(t: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of CUDA tensor `t`, queued on the stream (record an event after it
    and wait for that before reading)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass(slots=True)
class Draw:
    """One sampling step's results while still on the device: `to_host()` is its only sync.
    On CUDA their copy to pinned host memory is queued right behind the sampling, and
    `to_host()` waits for that copy alone: a plain `.tolist()` would wait for everything queued
    on the stream by then, the next step too (async scheduling launches it first)."""

    tokens: torch.Tensor                   # [B] int64
    logprob_rows: list[int]                # rows whose params ask for logprobs
    packed: torch.Tensor | None            # [len(logprob_rows), 1 + 2k] fp64: chosen | top values | top ids
    params: Sequence[SamplingParams]
    copied: torch.cuda.Event | None = None  # recorded after the copies to host_tokens / host_packed
    host_tokens: torch.Tensor | None = None
    host_packed: torch.Tensor | None = None

    def start_copy(self) -> Draw:
        """Queue the copy of the results to the host (CUDA; elsewhere they are there already)."""
        if self.tokens.device.type == "cuda":
            self.host_tokens = device_to_host(self.tokens)
            self.host_packed = None if self.packed is None else device_to_host(self.packed)
            self.copied = torch.cuda.Event()
            self.copied.record()
        return self

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens and logprobs as Python values (waits for the device)."""
        tokens, packed = self.tokens, self.packed
        if self.copied is not None:
            self.copied.synchronize()
            tokens, packed = self.host_tokens, self.host_packed
        token_list = tokens.tolist()
        out: list[TokenLogprob | None] = [None] * len(token_list)
        if packed is None:
            return token_list, out
        k = (packed.shape[1] - 1) // 2
        for row, i in zip(packed.tolist(), self.logprob_rows):
            want = self.params[i].logprobs
            top = [(int(row[1 + k + j]), row[1 + j]) for j in range(min(want, k))]
            out[i] = TokenLogprob(token_id=token_list[i], logprob=row[0], top=top)
        return token_list, out


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    **processing,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of `logits` [B, V], and its logprobs where the row's params ask
    (`draw(...).to_host()`; `processing`: draw's keyword arguments)."""
    return draw(logits, params, generators, **processing).to_host()


def draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    history: Sequence[TokenHistory] | None = None,
    pending_tokens: torch.Tensor | None = None,
    eos_token_ids: Collection[int] = frozenset(),
    bitmask: torch.Tensor | None = None,
) -> Draw:
    """Queue the sampling of one token per row of `logits` [B, V] on its device, with the
    logprobs the rows' params ask for; nothing waits for the device until `Draw.to_host()`.

    The logits are first processed (`process_logits`: bitmask, logit_bias, min_tokens,
    penalties; `history`, one per row, is needed when a row has min_tokens or a penalty).
    Greedy rows (temperature 0) then take the argmax (lowest index on ties). The others
    sample from softmax(logits / temperature) restricted by min_p, then top-k, then top-p.
    Logprobs are those of the raw logits (the model's distribution, before any processing,
    temperature and truncation; vLLM's default). All of it is read from `logits` now, so the
    buffer may be overwritten by the next step.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(f"need one params and one generator per row: {batch} rows, "
                         f"{len(params)} params, {len(generators)} generators")

    logits = logits.float()  # no copy when already fp32; nothing below writes into it
    chosen_from = process_logits(logits, params, history, pending_tokens=pending_tokens,
                                 eos_token_ids=eos_token_ids, bitmask=bitmask)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if len(rows) == batch:
        tokens = _sample_rows(chosen_from, params, generators)
    else:
        tokens = chosen_from.argmax(dim=-1)
        if rows:
            index = on_device(rows, logits.device)
            picked = _sample_rows(chosen_from.index_select(0, index),
                                  [params[i] for i in rows], [generators[i] for i in rows])
            tokens = tokens.index_copy(0, index, picked)
    logprob_rows, packed = _logprobs(logits, tokens, params)
    return Draw(tokens, logprob_rows, packed, params).start_copy()


# ---------------------------------------------------------------------------- logits processing


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    history: Sequence[TokenHistory] | None = None,
    *,
    pending_tokens: torch.Tensor | None = None,
    eos_token_ids: Collection[int] = frozenset(),
    bitmask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 logits [B, V] that draw picks tokens from, before temperature: in vLLM's
    order, the bitmask's disallowed tokens at -inf, logit_bias added, EOS and the row's
    stop_token_ids at -inf while it has fewer than min_tokens tokens, then the repetition
    penalty (tokens of the prompt and the output), frequency and presence penalties (tokens
    of the output). `logits` itself (as fp32) when nothing applies; it is never written.

    `history[i]` (needed for rows with min_tokens or a penalty) counts its pending token,
    read on the device from `pending_tokens[history[i].pending_row]`; nothing here waits
    for the device. `eos_token_ids`: the tokens min_tokens blocks besides stop_token_ids
    (not for ignore_eos rows, which EOS does not end).
    """
    logits = logits.float()
    if bitmask is not None:
        logits = apply_token_bitmask(logits, bitmask)  # a new tensor: safe to write below
    if not any(p.processes_logits for p in params):
        return logits
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    penalized = [i for i, p in enumerate(params) if _penalizes(p)]
    if history is None and (penalized or any(p.min_tokens for p in params)):
        raise ValueError("min_tokens and the penalties need each row's token history")
    too_short = [i for i, p in enumerate(params) if p.min_tokens and _generated(history[i]) < p.min_tokens]
    if not (biased or too_short or penalized):  # only min_p, which applies after temperature
        return logits
    if bitmask is None:  # else the bitmask's result is a new tensor, ours to write
        logits = logits.clone(memory_format=torch.contiguous_format)
    logits = logits.contiguous()  # the scatters below write through view(-1)
    if biased:
        _add_logit_bias(logits, params, biased)
    if too_short:
        _block_stop_tokens(logits, params, too_short, eos_token_ids)
    if penalized:
        _apply_penalties(logits, params, history, penalized, pending_tokens)
    return logits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with -inf at the tokens `bitmask` [B, >= ceil(V / 32)] int32 disallows:
    token t is allowed iff (bitmask[b, t // 32] >> (t % 32)) & 1 (llguidance's and xgrammar's
    layout; a row of -1 words allows everything). Returns a new tensor."""
    batch, vocab = logits.shape
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != batch \
            or bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"the token bitmask must be int32 [{batch}, {-(-vocab // 32)}], got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # [B, W, 32]: arithmetic shift, & 1 keeps bit j
    return logits.masked_fill(allowed.flatten(1)[:, :vocab] == 0, -math.inf)


def _penalizes(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or bool(p.frequency_penalty) or bool(p.presence_penalty)


def _generated(h: TokenHistory) -> int:
    return len(h.output_ids) + h.pending


# The indexed updates below are scatters into the flat [B * V] logits: index_put_ with
# accumulate=True checks its index range on the host, which waits for the device.


def _add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams], rows: list[int]) -> None:
    """logits[i, t] += logit_bias[t], in place, in one scatter (the (i, t) are distinct)."""
    vocab = logits.shape[1]
    flat: list[int] = []
    values: list[float] = []
    for i in rows:
        bias = params[i].logit_bias
        check_vocab(params[i], vocab)
        flat += [i * vocab + t for t in bias]
        values += bias.values()
    device = logits.device
    index = on_device(flat, device, torch.int64)
    logits.view(-1).scatter_add_(0, index, on_device(values, device, torch.float32))


def _block_stop_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], rows: list[int],
                       eos_token_ids: Collection[int]) -> None:
    """-inf, in place, at the tokens that would end rows `rows` (stop_token_ids, and EOS unless
    ignore_eos); ids past the vocabulary can never be drawn and are skipped."""
    vocab = logits.shape[1]
    flat: list[int] = []
    for i in rows:
        p = params[i]
        stops = p.stop_token_ids if p.ignore_eos else p.stop_token_ids.union(eos_token_ids)
        flat += [i * vocab + t for t in stops if t < vocab]
    if flat:
        logits.view(-1).scatter_(0, on_device(flat, logits.device, torch.int64), -math.inf)


def _apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: Sequence[TokenHistory],
                     rows: list[int], pending_tokens: torch.Tensor | None) -> None:
    """Rows `rows` of `logits`, in place: a token seen in the prompt or the output gets
    logit / p if logit > 0 else logit * p (p = repetition_penalty), then every token
    logit -= frequency_penalty * count + presence_penalty * (count > 0), count = its
    occurrences in the output (pending token included)."""
    device = logits.device
    chosen = [params[i] for i in rows]
    output_counts, prompt_counts = _token_counts([history[i] for i in rows],
                                                 [p.repetition_penalty != 1 for p in chosen],
                                                 pending_tokens, logits.shape[1], device)
    index = on_device(rows, device, torch.int64)
    x = logits.index_select(0, index)
    if prompt_counts is not None:
        penalty = on_device([p.repetition_penalty for p in chosen], device, torch.float32).unsqueeze(1)
        seen = (output_counts + prompt_counts) > 0
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.frequency_penalty or p.presence_penalty for p in chosen):
        frequency = on_device([p.frequency_penalty for p in chosen], device, torch.float32).unsqueeze(1)
        presence = on_device([p.presence_penalty for p in chosen], device, torch.float32).unsqueeze(1)
        x = x - (frequency * output_counts + presence * (output_counts > 0))
    logits.index_copy_(0, index, x)


def _token_counts(history: Sequence[TokenHistory], with_prompt: Sequence[bool],
                  pending_tokens: torch.Tensor | None, vocab: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, fp32 [n, V]: how often each token occurs in the output (its pending token,
    read from `pending_tokens` on the device, included), and in the prompt where
    `with_prompt[j]` (None when no row needs it), built by one scatter-add over both."""
    n = len(history)
    prompts = any(with_prompt)
    slabs: list[int] = []   # row j's output counts are slab j, its prompt counts slab n + j
    tokens: list[int] = []
    waiting: list[tuple[int, int]] = []  # (slab, row of pending_tokens)
    for j, (h, prompt) in enumerate(zip(history, with_prompt)):
        slabs += [j] * len(h.output_ids)
        tokens += h.output_ids
        if prompt:
            slabs += [n + j] * len(h.prompt_ids)
            tokens += h.prompt_ids
        if h.pending > 1:
            raise RuntimeError("a row can have only one token pending when it is drawn")
        if h.pending:
            waiting.append((j, h.pending_row))
    slab_index = on_device(slabs, device, torch.int64)
    token_index = on_device(tokens, device, torch.int64)
    if waiting:
        if pending_tokens is None:
            raise RuntimeError("a row's latest token is pending but no pending_tokens were given")
        pending_slabs, pending_rows = zip(*waiting)
        slab_index = torch.cat([slab_index, on_device(list(pending_slabs), device, torch.int64)])
        token_index = torch.cat([token_index, pending_tokens.index_select(
            0, on_device(list(pending_rows), device, torch.int64))])
    counts = torch.zeros((2 if prompts else 1) * n, vocab, device=device)
    flat = token_index.add(slab_index, alpha=vocab)  # slab * V + token
    counts.view(-1).scatter_add_(0, flat, torch.ones((), device=device).expand(len(flat)))
    return counts[:n], (counts[n:] if prompts else None)


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row of fp32 `logits` [n, V]; every row has temperature > 0."""
    n, vocab = logits.shape
    device = logits.device
    # Clamped so that a temperature below fp32's range is not 0 (0 / 0 = NaN).
    temperature = on_device([p.temperature for p in params], device, torch.float32)
    temperature.clamp_min_(torch.finfo(torch.float32).tiny)
    # Shift the row maximum to 0 first: a tiny temperature then sends the other logits
    # towards -inf instead of overflowing the maximum to +inf (inf - inf = NaN in softmax).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.unsqueeze(1)
    if any(p.min_p for p in params):
        scaled = apply_min_p(scaled, on_device([p.min_p for p in params], device, torch.float32))

    use_top_k = any(0 < p.top_k < vocab for p in params)
    use_top_p = any(p.top_p < 1 for p in params)
    if use_top_k or use_top_p:
        # Stable descending sort: among equal logits the lowest id ranks first, as in argmax,
        # so top_k=1 or a tiny top_p gives exactly the greedy token.
        ranked, order = scaled.sort(dim=-1, descending=True, stable=True)
        if use_top_k:
            k = on_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device)
            position = torch.arange(vocab, device=device)
            ranked = ranked.masked_fill(position.unsqueeze(0) >= k.unsqueeze(1), -math.inf)
        if use_top_p:
            probs = ranked.softmax(dim=-1)
            # Mass of the strictly more likely tokens: a token stays while that is < top_p,
            # which keeps the smallest prefix reaching top_p and always the first token.
            before = probs.cumsum(dim=-1) - probs
            # Rows with top_p = 1 must keep everything; rounding could push `before` to 1.
            top_p = on_device([p.top_p if p.top_p < 1 else math.inf for p in params], device, torch.float32)
            ranked = ranked.masked_fill(before >= top_p.unsqueeze(1), -math.inf)
        scaled = torch.empty_like(scaled).scatter_(1, order, ranked)

    probs = scaled.softmax(dim=-1)
    noise = _exponential_noise(n, vocab, generators, device)
    return (probs / noise).argmax(dim=-1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`logits` [n, V] with -inf where softmax(logits) < min_p[row] x its largest probability
    (transformers' MinPLogitsWarper; min_p 0 keeps every token)."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def _exponential_noise(n: int, vocab: int, generators: Sequence[torch.Generator | None],
                       device: torch.device) -> torch.Tensor:
    """Exponential(1) noise [n, V]: seeded rows from their own generator, one row each (so a
    row's draws never depend on the batch), the other rows in one default-generator call."""
    noise = torch.empty(n, vocab, device=device)
    free = [i for i, g in enumerate(generators) if g is None]
    if len(free) == n:
        noise.exponential_()
    else:
        if free:
            index = on_device(free, device)
            noise.index_copy_(0, index, torch.empty(len(free), vocab, device=device).exponential_())
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
    # A zero draw would make p / 0 = inf (or 0 / 0 = NaN for a masked token).
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
              ) -> tuple[list[int], torch.Tensor | None]:
    """The rows asking for logprobs, and per row [chosen | top values | top ids] in fp64 (exact
    for fp32 values and any token id), so that one host transfer fetches all of it."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return rows, None
    index = on_device(rows, logits.device)
    logp = torch.log_softmax(logits.index_select(0, index), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, index).unsqueeze(1))
    k = min(max(params[i].logprobs for i in rows), logp.shape[1])
    parts = [chosen]
    if k > 0:
        top_values, top_ids = logp.topk(k, dim=-1)
        parts += [top_values, top_ids]
    return rows, torch.cat([part.double() for part in parts], dim=1)
