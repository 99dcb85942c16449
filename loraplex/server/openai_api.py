"""OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models.

A request is checked whole before anything is queued (model, limits, context length), so
errors come back as HTTP errors; only a failure after the stream has started is sent as an
error event. Each choice is one engine request; leaving a stream early (client gone) aborts
them all through `AsyncEngine.generate`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response
# JSONResponse(body) is what FastAPI makes of a returned dict, without its jsonable_encoder
# walk over every choice and logprob
from fastapi.responses import JSONResponse

from ..engine.adapters import UnknownAdapterError
from ..engine.async_engine import EngineStoppedError, internal_error
from ..engine.engine import RequestError
from ..engine.grammar import GrammarError
from ..engine.request import FinishReason, RequestOutput
from ..engine.sampling import SamplingParams, TokenLogprob
from . import chat_template, resolver, sse
from .auth import is_admin, require_api_key
from .errors import APIError, documented_errors, error_body, log_unexpected
from .request_params import sampling_params
from .schemas import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                      DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse)
from .state import ServerState

log = logging.getLogger("loraplex.server")
router = APIRouter(dependencies=[require_api_key], responses=documented_errors(400, 401, 404, 413, 429, 500, 503))

MAX_CHARS_PER_TOKEN = 32    # a prompt averaging more characters per token is refused before tokenizing
RELEASE_GIL_CHARS = 16_384  # longer texts are tokenized on a worker thread, with the GIL released


def state_of(request: Request) -> ServerState:
    return request.app.state.loraplex


# ----------------------------------------------------------------------------------------
# checks shared by both routes
# ----------------------------------------------------------------------------------------


def check_serving(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down")
    if not state.ready.is_set():
        raise APIError(503, f"the model is not ready: {state.failed}" if state.failed else "the model is still loading")
    # Only a dead engine thread refuses requests: it never comes back. After failed steps in a
    # row /ready is 503 (routers send traffic elsewhere), but what still arrives is admitted:
    # each request is the only way to find out whether steps succeed again (the failures
    # ended every request, so no step runs without new ones), and refusing them would keep
    # the server unready for good after a passing fault. Under a sticky error each fails
    # fast with a 500.
    if not state.async_engine.running:
        raise APIError(503, f"the model cannot serve: {state.async_engine.health or 'the engine is not running'}; "
                            f"see the server log")
    if state.async_engine.waiting + state.held >= state.config.max_queue:
        raise APIError(429, f"too many requests waiting ({state.config.max_queue}); retry later")


async def adapter_for(state: ServerState, model: str) -> str | None:
    """None for the base model (by its name or an alias), else the adapter name, loading it
    first if it is a directory under a --lora-resolve-root; 404 for anything else."""
    if state.is_base_model(model):
        return None
    if state.registry.has(model) or await resolver.load_on_first_request(state, model):
        return model
    raise APIError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")


async def check_grammar(state: ServerState, params: SamplingParams) -> None:
    """400 for a structured-output schema, regex or grammar that cannot compile, before queuing."""
    if params.grammar is None:
        return
    try:
        await asyncio.to_thread(state.grammar_compiler().check, params.grammar)
    except GrammarError as exc:
        raise APIError(400, f"the structured output cannot be compiled: {exc}") from None


def check_fits(state: ServerState, prompt_len: int, params: SamplingParams, adapter: str | None) -> None:
    try:
        state.async_engine.check_request(prompt_len, params.max_tokens, adapter)
    except RequestError as exc:
        raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
    except UnknownAdapterError as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None


class Room:
    """Places in the queue that a request holds from `check_room` until its engine requests are
    sent (`run_jobs`): the handler yields in between (tokenizing, awaiting its task), and
    without the hold a burst would all pass --max-queue on the same count. Released once,
    whichever comes first: the submission, or the handler's end (a client gone before it)."""

    def __init__(self, state: ServerState, places: int):
        self.state, self.places = state, places
        state.held += places

    def release(self) -> None:
        self.state.held -= self.places
        self.places = 0

    __del__ = release  # a response that never ran


def check_room(state: ServerState, jobs: int) -> Room:
    """Every engine request (prompt x n) counts against --max-queue, not one per API request."""
    most = state.config.max_queue
    if jobs > most:
        raise APIError(400, f"this request makes {jobs} engine requests (prompts x n); at most {most} can "
                            f"wait (--max-queue)", param="n")
    if state.async_engine.waiting + state.held + jobs > most:
        raise APIError(429, f"too many requests waiting ({most}); retry later")
    return Room(state, jobs)


def check_chars(state: ServerState, chars: int, param: str) -> None:
    """Refuse, untokenized, a text that cannot be within the prompt limit (or is absurd): more
    characters than the limit times the longest token, or than MAX_CHARS_PER_TOKEN per token.
    Tokenizing first let a few MB of prompt hold the process for seconds."""
    limit = state.prompt_token_limit
    most = limit * min(state.longest_token_chars, MAX_CHARS_PER_TOKEN)
    if chars > most:
        raise APIError(400, f"the prompt has {chars} characters; a prompt of at most {limit} tokens is accepted, "
                            f"and that is at most {most} characters here", param=param,
                       code="context_length_exceeded")


async def encode(state: ServerState, text: str, template: bool = False) -> list[int]:
    """Token ids of `text` (`template`: without the tokenizer's special tokens, as for a rendered
    chat template); a long text on a worker thread with the GIL released, so that other
    requests and streams go on."""
    if len(text) <= RELEASE_GIL_CHARS:
        return (state.encode_template if template else state.encode)(text)
    return await asyncio.to_thread(state.encode_template_releasing if template else state.encode_releasing, text)


async def tokenize_prompts(state: ServerState, prompt, add_special_tokens: bool = True) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if len(prompt) > state.config.max_prompts and not all(isinstance(p, int) for p in prompt):
        raise APIError(400, f"at most {state.config.max_prompts} prompts per request (--max-prompts), "
                            f"got {len(prompt)}", param="prompt")
    given_ids = True  # token ids from the client are range-checked; the tokenizer's need not be
    if prompt and all(isinstance(p, str) for p in prompt):
        for p in prompt:
            check_chars(state, len(p), "prompt")
        prompts, given_ids = [await encode(state, p, template=not add_special_tokens) for p in prompt], False
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    vocab = state.vocab_size
    for ids in prompts:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if given_ids and any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return prompts


# ----------------------------------------------------------------------------------------
# running the choices
# ----------------------------------------------------------------------------------------


@dataclass
class Job:
    index: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0             # prompt tokens the prefix cache held
    finish: FinishReason | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list | None = None  # from the first output, when asked for
    error: str | None = None
    first_token: float | None = None   # time.monotonic() of its first and latest token
    last_token: float | None = None


async def run_jobs(state: ServerState, jobs: list[Job], adapter: str | None, model: str,
                   arrival: float, room: Room) -> AsyncIterator[list[tuple[Job, RequestOutput]]]:
    """The jobs' outputs in batches, as the engine hands them over (one batch per engine step
    at most); metrics recorded per job. Failures raise APIError. Leaving early aborts the
    jobs' engine requests."""
    by_id = {job.request_id: job for job in jobs}
    metrics = state.metrics
    state.active_jobs += len(jobs)  # what a drain waits for
    left_early = True               # until the last output, or an error: the client hung up
    try:
        room.release()  # the submission below counts them, before anything yields
        async for batch in state.async_engine.submit([(j.request_id, j.prompt_ids, j.params) for j in jobs], adapter):
            now = time.monotonic()
            pairs = []
            for out in batch:
                job = by_id[out.request_id]
                if out.token_ids:
                    if job.first_token is None:
                        job.first_token = now
                    elif job.last_token is not None:
                        metrics.observe_token_gap(now - job.last_token)
                    job.last_token = now
                job.tokens, job.cached_tokens = out.completion_tokens, out.cached_tokens
                if out.prompt_logprobs is not None:
                    job.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    job.finish, job.stop_reason = out.finish_reason, out.stop_reason
                    observe_finished(state, model, out.finish_reason.value, out.prompt_tokens, out.completion_tokens,
                                     now - arrival, out.queue_seconds,
                                     None if job.first_token is None else job.first_token - arrival)
                pairs.append((job, out))
            yield pairs
        left_early = False
    except Exception as exc:  # the adapter vanished before admission, the engine stopped
        left_early = False
        raise as_api_error(exc, jobs[0].request_id) from None
    finally:
        state.active_jobs -= len(jobs)
        if left_early:  # its unfinished jobs were aborted: count them, as the engine's aborts are
            now = time.monotonic()
            for job in (j for j in jobs if j.finish is None):
                observe_finished(state, model, "abort", len(job.prompt_ids), job.tokens, now - arrival, None,
                                 None if job.first_token is None else job.first_token - arrival)


def observe_finished(state: ServerState, model: str, *observation) -> None:
    """metrics.observe_request; for an adapter unloaded meanwhile, its series are dropped again
    after (the unload dropped them, and a request it let finish would bring them back for good)."""
    state.metrics.observe_request(model, *observation)
    if model != state.model_name and not state.registry.has(model):
        state.metrics.forget_adapter(model)


def as_api_error(exc: Exception, request_id: str) -> APIError:
    """The client's error for `exc`. Our own errors keep their message; anything else is logged
    (one line) under `request_id`, and the client gets only that id (the exception's text can
    hold server paths)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc))
    log_unexpected("request failed", request_id, exc)
    return APIError(500, internal_error("internal error", request_id))


def finish_reason(job: Job) -> str:
    return job.finish.value if job.finish is not None else "abort"


def usage(jobs: list[Job], prompts: list[list[int]]) -> dict:
    """OpenAI's usage object. Each prompt counts once whatever `n` is: its cached tokens are
    those of its first choice (the later ones may have found the first one's blocks)."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(j.tokens for j in jobs)
    n = len(jobs) // len(prompts)
    cached = sum(j.cached_tokens for j in jobs if j.index % n == 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def complete(state: ServerState, jobs: list[Job], adapter: str | None, model: str, arrival: float,
                   room: Room) -> None:
    """Run every job to the end, keeping text and logprobs on the jobs; errors raise APIError."""
    async for pairs in run_jobs(state, jobs, adapter, model, arrival, room):
        for job, out in pairs:
            job.text.append(out.text)
            if out.logprobs:
                job.logprobs += out.logprobs
            if out.finished:
                job.error = out.error
    failed = [j for j in jobs if j.finish is FinishReason.ERROR]
    if failed:
        raise APIError(500, failed[0].error or "the engine failed on this request")


async def unless_client_leaves(request: Request, work) -> bool:
    """Await `work`; False if the client hung up first, after cancelling it (which aborts its
    engine requests): a non-streaming request must not run to max_tokens for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(sse.disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this handler is cancelled (shutdown)
            task.cancel()
    if task in done:
        task.result()  # its APIError, if it failed
        return True
    await asyncio.wait({task})  # its cancellation runs to the end: the engine requests are aborted
    return False


def client_gone() -> Response:
    """What a request whose client left gets (sent to no one; 499 as nginx logs it)."""
    return Response(status_code=499)


def make_jobs(prefix: str, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            seed = None if params.seed is None else params.seed + i  # n choices differ, reproducibly
            choice = dataclasses.replace(params, seed=seed) if n > 1 else params
            jobs.append(Job(p * n + i, f"{prefix}-{p * n + i}", ids, choice))
    return jobs


def stream_response(state: ServerState, jobs: list[Job], adapter: str | None, model: str, arrival: float,
                    room: Room, chunks, usage_chunk=None, first: list[dict] = ()) -> sse.EventStream:
    """SSE over the jobs' outputs: `first` chunks, then the events `chunks(job, out)` makes for
    each output (a job the engine failed gets an error event instead), the `usage_chunk()`
    when asked for, an error event if the request fails on the way, and `[DONE]`. The events
    of one engine hand-off go out in one write."""
    async def events():
        if first:
            yield "".join(sse.event(chunk) for chunk in first).encode()
        try:
            async for pairs in run_jobs(state, jobs, adapter, model, arrival, room):
                parts = []
                for job, out in pairs:
                    if out.finished and out.finish_reason is FinishReason.ERROR:
                        parts.append(sse.event(error_body(500, out.error or "the engine failed on this request")))
                        continue
                    parts += chunks(job, out)
                if parts:
                    yield "".join(parts).encode()
            if usage_chunk is not None:
                yield sse.event(usage_chunk()).encode()
        except Exception as exc:
            err = as_api_error(exc, jobs[0].request_id)
            state.metrics.observe_error(err.status)
            yield sse.event(error_body(err.status, err.message, err.param, err.code)).encode()
        yield sse.DONE

    return sse.EventStream(events(), on_close=room.release)


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


# ----------------------------------------------------------------------------------------
# logprobs in the APIs' formats
# ----------------------------------------------------------------------------------------


def completion_logprobs(state: ServerState, lps: list, offset: int, ids: list[int] | None = None) -> dict:
    """/v1/completions' logprobs of `lps` (TokenLogprob, or None where nothing predicts the
    token: the first of an echoed prompt, whose id is then in `ids`)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for i, lp in enumerate(lps):
        text = token_text(state, lp.token_id if lp is not None else ids[i])
        tokens.append(text)
        token_lps.append(None if lp is None else lp.logprob)
        tops.append(None if lp is None else top_by_text(state, lp.top))
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def top_by_text(state: ServerState, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's top_logprobs, keyed by text: of two tokens with one text (partial bytes decode
    alike) the likelier stays."""
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(token_text(state, t), v)
    return out


def join_logprobs(first: dict, then: dict | None) -> dict:
    return first if then is None else {k: first[k] + then[k] for k in first}


def vllm_prompt_logprobs(state: ServerState, lps: list[TokenLogprob | None] | None, k: int) -> list | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} for the prompt's own token and the k likeliest."""
    if lps is None:
        return None
    out = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": token_text(state, t)}
                 for r, (t, v) in enumerate(lp.top[:k])}
        entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": lp.rank,
                                            "decoded_token": token_text(state, lp.token_id)})
        out.append(entry)
    return out


def prompt_logprobs_wanted(*ks: int | None) -> int | None:
    """The engine's prompt_logprobs for several uses (echo's logprobs, prompt_logprobs): the largest."""
    given = [k for k in ks if k is not None]
    return max(given) if given else None


def ok_or_stream(model) -> dict:
    return {200: {"model": model, "description": "the result; with `stream`, server-sent events of chunks "
                                                  "(`data: {chunk}`, last `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


# ----------------------------------------------------------------------------------------
# /v1/completions
# ----------------------------------------------------------------------------------------


def echo_texts(state: ServerState, given, prompts: list[list[int]]) -> list[str]:
    """Each prompt's text, for echo: as given, or decoded from the given token ids."""
    if isinstance(given, str):
        return [given]
    if given and all(isinstance(p, str) for p in given):
        return list(given)
    return [state.tokenizer.decode(ids) for ids in prompts]


@router.post("/v1/completions", responses=ok_or_stream(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    arrival = time.monotonic()
    check_serving(state)
    adapter = await adapter_for(state, body.model)
    prompts = await tokenize_prompts(state, body.prompt, body.add_special_tokens)
    echo_lps = body.logprobs if body.echo else None
    params = sampling_params(state, body, max(map(len, prompts)), body.max_tokens, 16, body.logprobs,
                             prompt_logprobs_wanted(echo_lps, body.prompt_logprobs))
    for ids in prompts:
        check_fits(state, len(ids), params, adapter)
    await check_grammar(state, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    jobs = make_jobs(request_id, prompts, params, body.n)
    room = check_room(state, len(jobs))
    base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}
    echoed = echo_texts(state, body.prompt, prompts) if body.echo else None

    def echo_part(job: Job) -> tuple[str, dict | None]:
        """The echoed prompt's text and, with logprobs, its logprobs (the first token's None)."""
        text = echoed[job.index // body.n]
        if body.logprobs is None:
            return text, None
        lps = job.prompt_logprobs or [None] * len(job.prompt_ids)
        return text, completion_logprobs(state, [None if lp is None else
                                                 dataclasses.replace(lp, top=lp.top[:body.logprobs]) for lp in lps],
                                         0, job.prompt_ids)

    if not body.stream:
        try:
            if not await unless_client_leaves(request, complete(state, jobs, adapter, body.model, arrival, room)):
                return client_gone()
        finally:
            room.release()
        choices = []
        for j in jobs:
            text, lps = "".join(j.text), None
            prefix, prefix_lps = echo_part(j) if body.echo else ("", None)
            if body.logprobs is not None:
                lps = completion_logprobs(state, j.logprobs, len(prefix))
                lps = join_logprobs(prefix_lps, lps) if prefix_lps is not None else lps
            choice = {"index": j.index, "text": prefix + text, "finish_reason": finish_reason(j),
                      "stop_reason": j.stop_reason, "logprobs": lps}
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(state, j.prompt_logprobs, body.prompt_logprobs)
            choices.append(choice)
        return JSONResponse({**base, "choices": choices, "usage": usage(jobs, prompts)})

    offsets = {j.index: 0 for j in jobs}
    to_echo = {j.index for j in jobs} if body.echo else set()
    encoder = sse.ChunkEncoder(base)

    def chunks(job: Job, out: RequestOutput) -> list[str]:
        events = []
        if job.index in to_echo:  # the prompt first, once its logprobs are in (the first output)
            to_echo.discard(job.index)
            text, lps = echo_part(job)
            offsets[job.index] = len(text)
            events.append(encoder.choice({"index": job.index, "text": text, "logprobs": lps, "finish_reason": None}))
        finish = finish_reason(job) if out.finished else None
        lps = None
        if body.logprobs is not None and out.logprobs:
            lps = completion_logprobs(state, out.logprobs, offsets[job.index])
        offsets[job.index] += len(out.text)
        if out.finished:
            events.append(encoder.choice({"index": job.index, "text": out.text, "logprobs": lps,
                                          "finish_reason": finish, "stop_reason": job.stop_reason}))
        elif lps is not None:
            events.append(encoder.choice({"index": job.index, "text": out.text, "logprobs": lps,
                                          "finish_reason": None}))
        elif out.text:
            events.append(encoder.text(job.index, out.text, None))
        return events

    usage_chunk = (lambda: {**base, "choices": [], "usage": usage(jobs, prompts)}) if include_usage(body) else None
    return stream_response(state, jobs, adapter, body.model, arrival, room, chunks, usage_chunk)


# ----------------------------------------------------------------------------------------
# /v1/chat/completions
# ----------------------------------------------------------------------------------------


def chat_logprobs(state: ServerState, lps: list) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


async def chat_prompt(state: ServerState, body) -> list[int]:
    """The conversation's token ids (chat requests and /tokenize's messages)."""
    check_chars(state, sum(m.text_chars + len(m.name or "") for m in body.messages), "messages")
    text = chat_template.render(state.tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt,
                                continue_final_message=body.continue_final_message,
                                template_kwargs=body.chat_template_kwargs)
    special = body.add_special_tokens
    return await encode(state, text, template=not special)


@router.post("/v1/chat/completions", responses=ok_or_stream(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    arrival = time.monotonic()
    check_serving(state)
    adapter = await adapter_for(state, body.model)
    prompt = await chat_prompt(state, body)
    if not prompt:
        raise APIError(400, "the rendered conversation is empty", param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(state, body, len(prompt), max_tokens, state.config.max_tokens_limit, logprobs,
                             body.prompt_logprobs)
    check_fits(state, len(prompt), params, adapter)
    await check_grammar(state, params)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    jobs = make_jobs(request_id, [prompt], params, body.n)
    room = check_room(state, len(jobs))
    base = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model}

    if not body.stream:
        try:
            if not await unless_client_leaves(request, complete(state, jobs, adapter, body.model, arrival, room)):
                return client_gone()
        finally:
            room.release()
        choices = [{"index": j.index, "message": {"role": "assistant", "content": "".join(j.text)},
                    "finish_reason": finish_reason(j), "stop_reason": j.stop_reason,
                    "logprobs": chat_logprobs(state, j.logprobs) if body.logprobs else None} for j in jobs]
        answer = {**base, "choices": choices, "usage": usage(jobs, [prompt])}
        if body.prompt_logprobs is not None:
            answer["prompt_logprobs"] = vllm_prompt_logprobs(state, jobs[0].prompt_logprobs, body.prompt_logprobs)
        return JSONResponse(answer)

    base["object"] = "chat.completion.chunk"
    encoder = sse.ChunkEncoder(base)

    def chunks(job: Job, out: RequestOutput) -> list[str]:
        events = []
        if body.logprobs and out.logprobs:
            events.append(encoder.choice({"index": job.index, "delta": {"content": out.text},
                                          "logprobs": chat_logprobs(state, out.logprobs), "finish_reason": None}))
        elif out.text:
            events.append(encoder.content(job.index, out.text))
        if out.finished:
            events.append(encoder.choice({"index": job.index, "delta": {}, "logprobs": None,
                                          "finish_reason": finish_reason(job), "stop_reason": job.stop_reason}))
        return events

    # the role first, as OpenAI does
    roles = [{**base, "choices": [{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]} for job in jobs]
    usage_chunk = (lambda: {**base, "choices": [], "usage": usage(jobs, [prompt])}) if include_usage(body) else None
    return stream_response(state, jobs, adapter, body.model, arrival, room, chunks, usage_chunk, roles)


# ----------------------------------------------------------------------------------------
# /v1/models, /tokenize, /detokenize
# ----------------------------------------------------------------------------------------


@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading")
    admin = is_admin(request)
    created = int(state.started_at)
    entry = {"object": "model", "owned_by": "loraplex", "max_model_len": state.max_model_len}
    root = str(state.model_dir) if admin and state.model_dir else None
    # every served name of the base model, as vLLM lists them (--served-model-name A B ...)
    data = [{"id": name, **entry, "created": created, "root": root, "parent": None}
            for name in [state.model_name, *state.config.served_model_aliases]]
    for info in await asyncio.to_thread(state.registry.list):  # the engine process may hold the registry
        if info.state != "ready":
            continue
        data.append({"id": info.name, **entry, "created": int(info.registered_at),
                     "root": info.path if admin else None, "parent": state.model_name})
    return {"object": "list", "data": data}


def check_model(state: ServerState, model: str | None) -> None:
    """/tokenize and /detokenize: every adapter shares the base model's tokenizer; a name must exist."""
    if model is not None and not state.is_base_model(model) and not state.registry.has(model):
        raise APIError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""
    state = state_of(request)
    check_serving(state)
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        if body.add_special_tokens is None:
            body.add_special_tokens = False
        ids = await chat_prompt(state, body)
    else:
        check_chars(state, len(body.prompt), "prompt")
        ids = await encode(state, body.prompt, template=body.add_special_tokens is False)
    answer = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        answer["token_strs"] = state.tokenizer.convert_ids_to_tokens(ids)
    return JSONResponse(answer)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request):
    """vLLM's /detokenize: token ids to text."""
    state = state_of(request)
    check_serving(state)
    check_model(state, body.model)
    if len(body.tokens) > state.prompt_token_limit:
        raise APIError(400, f"at most {state.prompt_token_limit} tokens", param="tokens")
    if any(not 0 <= t < state.vocab_size for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {state.vocab_size})", param="tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})
