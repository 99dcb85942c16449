"""The engine: owns the model, KV cache, kernel workspace and scheduler; `step()` runs one batch.

    Engine(...)  everything a step uses is allocated at its maximum, from the limits
    warm_up()    every kernel variant compiled and run, a full-budget prefill, then CUDA graphs
    step():      adapters.between_steps() -> scheduler.schedule() -> runner.run() -> draw -> postprocess

With async scheduling (on CUDA by default) one step stays in flight: step() launches step
N+1 on the device first, then waits for step N's tokens and postprocesses them while the
device runs N+1, so the host's work hides behind the device's instead of adding to it. The
results are the same tokens: step N+1 reads N's tokens on the device (`Request.pending`); a
sequence that N finishes (a stop token, a stop string, an abort) has its N+1 token dropped,
and one that reaches max_tokens with N is not scheduled again.

Single-threaded by design: one thread (see `async_engine.py`) calls every method. Results leave
through each request's output channel (`Request.on_output`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels import runtime
from ..model.llama import CausalLM
from . import launches
from .adapters import AdapterProvider, UnknownAdapterError
from .cuda_graphs import DecodeGraphs
from .detokenizer import IncrementalDetokenizer
from .grammar import GrammarCompiler, GrammarError, new_bitmask
from .kv_cache import BlockAllocator, KVCache, blocks_for_memory
from .request import FinishReason, Request, RequestOutput, Status
from .prefix_cache import BASE_VERSION, PrefixCache
from .prompt_logprobs import PromptLogprobs
from .runner import ModelRunner
from .sampling import Draw, SamplingParams, check_vocab, draw, host_to_device, make_generator
from .scheduler import ScheduledStep, Scheduler, SchedulerConfig

log = logging.getLogger("loraplex.engine")


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 256              # running sequences at most
    max_num_batched_tokens: int = 2048   # tokens per step; longer prompts are prefilled in chunks
    block_size: int = 16                 # KV cache positions per block
    kv_cache_tokens: int | None = None   # KV capacity in tokens; None = from memory_fraction (CUDA)
    memory_fraction: float = 0.90        # of GPU memory for weights + adapters + KV cache
    max_model_len: int | None = None     # None = the model's own limit
    cuda_graph_max_batch: int = 256      # decode steps up to this batch replay CUDA graphs; 0 = off
    async_scheduling: bool | None = None  # one step in flight (see above); None = on CUDA only
    enable_prefix_caching: bool = True   # reuse the KV blocks of prompt prefixes already computed

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be at least one block ({self.block_size}), "
                             f"got {self.kv_cache_tokens}")


@dataclass(slots=True)
class StepStats:
    """What one step did, for metrics (`Engine.on_step`)."""

    prefill_tokens: int
    decode_tokens: int
    adapters: int        # distinct adapters among the step's sequences (base model not counted)
    seconds: float       # wall time of the step, scheduling to sampled tokens on the host
    preempted: int
    cache_lookups: tuple[tuple[str | None, int, int], ...] = ()  # prefix cache, per admitted request:
                                                                  # (adapter or None, tokens looked up, found)


@dataclass(slots=True)
class InFlight:
    """A launched step whose tokens are still on the device."""

    sampled: list[Request]   # in the order of draw's rows
    draw: Draw
    stats: StepStats         # seconds filled in when its tokens are in
    started: float           # time.monotonic() when it was scheduled
    prompt: PromptLogprobs | None = None  # the step's prompt logprobs, when a prefill asked for them
    constrained: bool = False  # a row follows a grammar: its next step needs these tokens on the host


class RequestError(ValueError):
    """A request the engine cannot take (too long, bad parameters); safe to show the client."""


def check_limits(prompt_len: int, max_tokens: int, max_model_len: int, capacity_tokens: int) -> None:
    """RequestError for a request that can never fit: empty, past the context length, or
    larger than the whole KV cache."""
    if prompt_len < 1:
        raise RequestError("the prompt is empty")
    if prompt_len + max_tokens > max_model_len:
        raise RequestError(f"this model's maximum context length is {max_model_len} tokens; the "
                           f"request asks for {prompt_len + max_tokens} ({prompt_len} in the prompt, "
                           f"{max_tokens} to generate)")
    if prompt_len + max_tokens > capacity_tokens:
        raise RequestError(f"the request needs {prompt_len + max_tokens} tokens of KV cache; the whole "
                           f"cache holds {capacity_tokens}")


class Engine:
    def __init__(self, model: CausalLM, tokenizer, adapters: AdapterProvider | None = None,
                 config: EngineConfig | None = None, eos_token_ids: set[int] | None = None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.max_model_len = min(config.max_model_len or model.config.max_model_len, model.config.max_model_len)
        if eos_token_ids is None:
            eos_token_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos_token_ids = eos_token_ids
        bs = config.block_size
        # What the kernels of any step can ask for is fixed now, from the limits: the NF4 plans
        # and one frozen workspace at its largest (CUDA graphs bake both in). Before the KV
        # cache, so that its size accounts for them.
        self.limits = launches.StepLimits(max_tokens=config.max_num_batched_tokens, max_decodes=config.max_num_seqs,
                                          max_blocks=-(-self.max_model_len // bs), block_size=bs)
        self.plans = launches.plan_table(model, self.limits)
        self.workspace = launches.size_workspace(model, self.limits, self.plans)
        model.bind_kernels(self.plans, self.workspace)
        if config.kv_cache_tokens is not None:
            num_blocks = -(-config.kv_cache_tokens // bs) + 1  # + the scratch block
        elif model.device.type == "cuda":
            # activations of the largest step, roughly, and never less than 1 GiB (scratch, graphs)
            reserve = max(1 << 30, config.max_num_batched_tokens * model.config.hidden_size * 64)
            num_blocks = blocks_for_memory(model.config, model.dtype, model.device, config.memory_fraction, bs, reserve)
        else:
            num_blocks = -(-min(config.max_num_seqs, 16) * self.max_model_len // bs) + 1
        self.kv_cache = KVCache.allocate(model.config, num_blocks, bs, model.dtype, model.device)
        model.bind_kv_cache(self.kv_cache.k, self.kv_cache.v)
        self.allocator = BlockAllocator(num_blocks, bs)
        self.prefix_cache = PrefixCache(self.allocator) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                   self.allocator, adapters, self.prefix_cache)
        graphs = None
        if model.device.type == "cuda" and config.cuda_graph_max_batch > 0:
            graphs = DecodeGraphs(model, min(config.cuda_graph_max_batch, config.max_num_seqs), self.limits.max_blocks)
        self._capture_pending = graphs is not None  # captured at the end of warm_up(), else before the first step
        self.runner = ModelRunner(model, bs, graphs)
        self.async_scheduling = (model.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._in_flight: InFlight | None = None
        self._grammars = None  # GrammarCompiler, on first use (grammars())
        self.requests: dict[str, Request] = {}
        self.last_step: ScheduledStep | None = None
        self.on_step: Callable[[StepStats], None] | None = None  # called after every step that ran
        log.info("KV cache: %d blocks of %d tokens (%d tokens); kernel workspace %.1f MiB",
                 num_blocks - 1, bs, self.allocator.capacity_tokens, self.workspace.nbytes() / 2**20)

    # -- requests in ----------------------------------------------------------------------

    def check_request(self, prompt_len: int, max_tokens: int, adapter: str | None) -> None:
        """Raise RequestError / UnknownAdapterError for what can never run (before queuing)."""
        check_limits(prompt_len, max_tokens, self.max_model_len, self.allocator.capacity_tokens)
        if adapter is not None and (self.adapters is None or not self.adapters.has(adapter)):
            raise UnknownAdapterError(adapter)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already running")
        self.check_request(len(req.prompt_ids), req.params.max_tokens, req.adapter)
        try:
            check_vocab(req.params, self.model.config.vocab_size)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if (req.params.stop or req.params.grammar is not None) and not req.detokenize:
            raise RequestError("a request with stop strings or a grammar must be detokenized by the engine")
        if req.params.grammar is not None:
            try:
                req.matcher = self.grammars().matcher(req.params.grammar)
            except GrammarError as exc:
                raise RequestError(f"the structured output cannot be compiled: {exc}") from None
        req.generator = make_generator(req.params.seed, self.model.device)
        if req.params.prompt_logprobs is not None:  # nothing predicts the first token
            req.prompt_logprobs, req.prompt_logprobs_done = [None], 0
        if req.detokenize:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, req.prompt_ids, stop=req.params.stop,
                include_stop=req.params.include_stop_str_in_output,
                skip_special_tokens=req.params.skip_special_tokens)
        if req.adapter is not None:  # last: a request refused above holds no adapter reference
            req.adapter_ref = self.adapters.acquire(req.adapter)
            req.cache_version = self.adapters.version(req.adapter_ref)
        else:
            req.cache_version = BASE_VERSION
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> bool:
        """Stop a request wherever it is (client gone, forced unload); frees its KV blocks."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, reason, error=error)
        return True

    def abort_holding(self, adapter_ref, reason: FinishReason, error: str) -> int:
        """End every request holding adapter handle `adapter_ref`; returns how many."""
        doomed = [r.request_id for r in self.requests.values() if r.adapter_ref is adapter_ref]
        for request_id in doomed:
            self.abort(request_id, reason, error)
        return len(doomed)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # -- one step -------------------------------------------------------------------------

    def step(self) -> int:
        """Run one batch; returns the number of tokens it computed (0 when idle). With async
        scheduling the batch is launched, and the outputs are those of the step before."""
        if self.model.layers[0].self_attn.workspace is not self.workspace:
            raise RuntimeError("another Engine was built on this model since this one: its kernels are bound "
                               "to the newer engine's plans and workspace")
        if self._capture_pending:
            log.info("capturing decode CUDA graphs before the first step (call warm_up() before serving)")
            self._capture_graphs()
        if self.adapters is not None:
            for handle, reason, message in self.adapters.between_steps():
                self.abort_holding(handle, reason, message)
            for version in self.adapters.retired_versions():
                if self.prefix_cache is not None:
                    self.prefix_cache.drop(version)
        try:
            started = time.monotonic()
            if self._in_flight is not None and self._in_flight.constrained:
                # a grammar's next mask needs its newest token on the host: no overlap for this step
                done, self._in_flight = self._in_flight, None
                self._land(done)
            sched = self.scheduler.schedule()
            self.last_step = sched
            launched = None if sched.empty else self._launch(sched, started)
            if self.async_scheduling:
                done, self._in_flight = self._in_flight, launched
            else:
                done = launched
            if done is not None:
                self._land(done)
        except BaseException:
            self._in_flight = None  # the caller fails the requests; nothing of it is kept
            self.allocator.clear_cache()  # blocks published by the failed step may be half written
            raise
        return 0 if sched.empty else sum(n for _, n in sched.prefills) + len(sched.decodes)

    def _launch(self, sched: ScheduledStep, started: float) -> InFlight:
        """Queue the step's model run and sampling on the device."""
        pending = None if self._in_flight is None else self._in_flight.draw.tokens
        logits, sampled, prompt = self.runner.run(sched, pending)
        # penalties and min_tokens read each request's tokens, its pending one from `pending`
        constrained = any(r.matcher is not None for r in sampled)
        drawn = draw(logits, [r.params for r in sampled], [r.generator for r in sampled], history=sampled,
                     pending_tokens=pending, eos_token_ids=self.eos_token_ids,
                     bitmask=self._grammar_bitmask(sampled, logits.device) if constrained else None)
        for req, n in sched.prefills:
            req.num_computed += n
        for req in sched.decodes:
            req.num_computed += 1
        for row, req in enumerate(sampled):
            req.pending += 1
            req.pending_row = row
        if self.prefix_cache is not None:  # (the device computes them before any later step reads them)
            self.prefix_cache.publish(req for req, _ in sched.prefills)
            self.prefix_cache.publish(sched.decodes)
        adapters = {r.adapter_ref for r, _ in sched.prefills} | {r.adapter_ref for r in sched.decodes}
        stats = StepStats(sum(n for _, n in sched.prefills), len(sched.decodes), len(adapters - {None}),
                          0.0, len(sched.preempted),
                          tuple((r.adapter, looked, found) for r, looked, found in sched.cache_lookups))
        return InFlight(sampled, drawn, stats, started, prompt, constrained)

    def grammars(self):
        """The structured-output compiler (built on first use: most engines never need one)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _grammar_bitmask(self, sampled: list[Request], device) -> torch.Tensor:
        """The allowed tokens of each row [B, ceil(V/32)] (all allowed for unconstrained rows)."""
        bitmask = new_bitmask(len(sampled), self.model.config.vocab_size)
        for row, req in enumerate(sampled):
            if req.matcher is not None:
                req.matcher.fill_bitmask(bitmask[row])
        return host_to_device(bitmask, device)

    def _land(self, flight: InFlight) -> None:
        """Wait for a launched step's tokens and postprocess them (those of requests that ended
        since it was launched are dropped)."""
        tokens, logprobs = flight.draw.to_host()
        if flight.prompt is not None:  # before the tokens: a request's first output carries them
            flight.prompt.land()
        now = time.monotonic()
        for req, token, lp in zip(flight.sampled, tokens, logprobs):
            req.pending -= 1
            if req.status is not Status.FINISHED:
                self._append(req, token, lp, now)
        if self.on_step is not None:
            flight.stats.seconds = time.monotonic() - flight.started
            self.on_step(flight.stats)

    def _append(self, req: Request, token: int, logprob, now: float) -> None:
        req.output_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        reason, stop_reason, text, hit = None, None, "", False
        grammar_done = False
        if req.matcher is not None:
            if not req.matcher.accept(token):  # the mask allows only what it accepts: a bug if it happens
                self._finish(req, FinishReason.ERROR, error="the output left its structured-output grammar")
                return
            grammar_done = req.matcher.is_finished()
        may_stop = len(req.output_ids) > p.min_tokens  # (the sampler keeps EOS and stop ids out before)
        if may_stop and (token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)):
            reason = FinishReason.STOP  # a stop token's text is not part of the output
            stop_reason = token if token in p.stop_token_ids else None  # None = EOS, as vLLM reports it
        else:
            if req.detokenizer is not None:
                text, hit = req.detokenizer.push(token, may_stop=len(req.output_ids) >= p.min_tokens)
            if hit:
                reason, stop_reason = FinishReason.STOP, req.detokenizer.stop_string
            elif grammar_done:  # nothing but the end can follow (an EOS under ignore_eos, or the grammar's end)
                reason = FinishReason.STOP
            elif (len(req.output_ids) >= p.max_tokens
                  or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len):  # (pending not counted)
                reason = FinishReason.LENGTH
        lps = None if logprob is None else [logprob]
        if reason is None:
            self._emit(req, RequestOutput(req.request_id, [token], text, lps))
        else:
            # after a stop string nothing more is emitted; otherwise release held-back text
            self._finish(req, reason, token_ids=[token], text=text, logprobs=lps, flush=not hit,
                         stop_reason=stop_reason)

    def _finish(self, req: Request, reason: FinishReason, *, token_ids: list[int] | None = None, text: str = "",
                logprobs=None, error: str | None = None, flush: bool = True,
                stop_reason: int | str | None = None) -> None:
        if req.status is Status.FINISHED:
            return
        self.scheduler.remove(req)
        self.requests.pop(req.request_id, None)
        if req.adapter_ref is not None:
            self.adapters.release(req.adapter_ref)
            req.adapter_ref = None
        if flush and req.detokenizer is not None:
            text += req.detokenizer.flush()
            if req.detokenizer.stopped:  # the held-back tail completed a stop string
                reason, stop_reason = FinishReason.STOP, req.detokenizer.stop_string
        req.finish_reason = reason
        queued = None if req.first_scheduled is None else req.first_scheduled - req.arrival
        self._emit(req, RequestOutput(req.request_id, token_ids or [], text, logprobs, finished=True,
                                      finish_reason=reason, error=error, queue_seconds=queued,
                                      stop_reason=stop_reason))

    def _emit(self, req: Request, out: RequestOutput) -> None:
        out.prompt_tokens, out.completion_tokens = len(req.prompt_ids), len(req.output_ids)
        out.cached_tokens = req.num_cached_tokens
        if req.prompt_logprobs is not None and len(req.prompt_logprobs) == len(req.prompt_ids):
            out.prompt_logprobs, req.prompt_logprobs = req.prompt_logprobs, None  # whole, on the first output
        if req.on_output is not None:
            req.on_output(out)

    def abort_all(self, reason: FinishReason = FinishReason.ABORT, error: str | None = None) -> None:
        """End every request (shutdown; or, with ERROR, after an exception in a step, so the
        engine stays usable)."""
        for request_id in list(self.requests):
            self.abort(request_id, reason, error)

    # -- start-up -------------------------------------------------------------------------

    def warm_up(self, adapters: list[str] = ()) -> None:
        """Run once before serving, on an idle engine, so that no client waits for a compiler:
        every kernel variant a step within the limits can select is compiled and run (on
        CUDA or under the interpreter), then a prefill of the whole token budget (the largest
        step: an out-of-memory shows now, not under load), a short generation on the base
        model and on each adapter in `adapters` in one batch, and last the decode CUDA graphs
        are captured (nothing runs between capture and serving). The structured-output
        compiler's view of the tokenizer is built too. The prefix cache starts empty."""
        if self.has_work():
            raise RuntimeError("warm_up() needs an idle engine")
        started = time.perf_counter()
        if runtime.use_triton(self.model.device):
            launches.warm_up_kernels(self.model, self.limits, self.plans, self.workspace)
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        longest = max(1, min(self.limits.max_tokens, self.max_model_len - params.max_tokens,
                             self.allocator.capacity_tokens - params.max_tokens))
        vocab = self.model.config.vocab_size
        self.add_request(Request("warm-up-prefill", [1 + i % (vocab - 1) for i in range(longest)], params))
        self.run_until_done()
        for i, adapter in enumerate([None, *adapters]):
            self.add_request(Request(f"warm-up-{i}", list(range(1, 9)), params, adapter))
        self.run_until_done()
        self.allocator.clear_cache()  # the warm-up's synthetic prompts are nobody's prefix
        self.grammars().ll_tokenizer  # built now (~1 s at a 128k vocabulary), not on a first structured request
        if self._capture_pending:
            self._capture_graphs()
        compiled = f", {runtime.compiled_kernels()} compiled kernels" if self.model.device.type == "cuda" else ""
        log.info("warm-up done in %.1fs%s", time.perf_counter() - started, compiled)

    def _capture_graphs(self) -> None:
        self._capture_pending = False
        self.runner.graphs.capture()

    # -- convenience for tests and scripts --------------------------------------------------

    def run_until_done(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"requests still running after {max_steps} steps")

