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
from ..engine.request import FinishReason, RequestOutput
from ..engine.sampling import SEED_MAX, SamplingParams
from . import sse
from .auth import is_admin, require_api_key
from .errors import APIError, documented_errors, error_body, log_unexpected
from .schemas import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
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
    if state.async_engine.waiting >= state.config.max_queue:
        raise APIError(429, f"too many requests waiting ({state.config.max_queue}); retry later")


def adapter_for(state: ServerState, model: str) -> str | None:
    """None for the base model, else the adapter name; 404 for anything else."""
    if model == state.model_name:
        return None
    if state.registry.has(model):
        return model
    raise APIError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")


def sampling_params(state: ServerState, body, prompt_len: int, max_tokens: int | None, default_max: int,
                    logprobs: int | None) -> SamplingParams:
    c = state.config
    if (bad := body.unsupported()) is not None:
        raise APIError(400, f"{bad} is not supported by this server", param=bad)
    if body.n > c.max_n:
        raise APIError(400, f"n must be at most {c.max_n}, got {body.n}", param="n")
    if body.seed is not None and body.seed + body.n - 1 > SEED_MAX:  # choice i is seeded with seed + i
        raise APIError(400, f"seed + n - 1 must be at most 2**64 - 1, got {body.seed} and n = {body.n}",
                       param="seed")
    limit = prompt_token_limit(state)
    if prompt_len > limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens; at most {limit} are accepted",
                       param="prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(default_max, c.max_tokens_limit, state.max_model_len - prompt_len))
    if max_tokens > c.max_tokens_limit:
        raise APIError(400, f"max_tokens must be at most {c.max_tokens_limit}, got {max_tokens}", param="max_tokens")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed, stop=body.stop or [],
                              stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
                              logprobs=logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


def check_fits(state: ServerState, prompt_len: int, params: SamplingParams, adapter: str | None) -> None:
    try:
        state.async_engine.check_request(prompt_len, params.max_tokens, adapter)
    except RequestError as exc:
        raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
    except UnknownAdapterError as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None


def check_room(state: ServerState, jobs: int) -> None:
    """Every engine request (prompt x n) counts against --max-queue, not one per API request."""
    most = state.config.max_queue
    if jobs > most:
        raise APIError(400, f"this request makes {jobs} engine requests (prompts x n); at most {most} can "
                            f"wait (--max-queue)", param="n")
    if state.async_engine.waiting + jobs > most:
        raise APIError(429, f"too many requests waiting ({most}); retry later")


def prompt_token_limit(state: ServerState) -> int:
    return state.config.max_prompt_tokens or state.max_model_len


def check_chars(state: ServerState, chars: int, param: str) -> None:
    """Refuse, untokenized, a text that cannot be within the prompt limit (or is absurd): more
    characters than the limit times the longest token, or than MAX_CHARS_PER_TOKEN per token.
    Tokenizing first let a few MB of prompt hold the process for seconds."""
    limit = prompt_token_limit(state)
    most = limit * min(state.longest_token_chars, MAX_CHARS_PER_TOKEN)
    if chars > most:
        raise APIError(400, f"the prompt has {chars} characters; a prompt of at most {limit} tokens is accepted, "
                            f"and that is at most {most} characters here", param=param,
                       code="context_length_exceeded")


async def encode(state: ServerState, text: str, template: bool = False) -> list[int]:
    """Token ids of `text` (a rendered chat template: no special tokens added); a long text on
    a worker thread with the GIL released, so that other requests and streams go on."""
    if len(text) <= RELEASE_GIL_CHARS:
        return (state.encode_template if template else state.encode)(text)
    return await asyncio.to_thread(state.encode_template_releasing if template else state.encode_releasing, text)


async def tokenize_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if len(prompt) > state.config.max_prompts and not all(isinstance(p, int) for p in prompt):
        raise APIError(400, f"at most {state.config.max_prompts} prompts per request (--max-prompts), "
                            f"got {len(prompt)}", param="prompt")
    given_ids = True  # token ids from the client are range-checked; the tokenizer's need not be
    if prompt and all(isinstance(p, str) for p in prompt):
        for p in prompt:
            check_chars(state, len(p), "prompt")
        prompts, given_ids = [await encode(state, p) for p in prompt], False
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
    finish: FinishReason | None = None
    error: str | None = None
    first_token: float | None = None   # time.monotonic() of its first and latest token
    last_token: float | None = None


async def run_jobs(state: ServerState, jobs: list[Job], adapter: str | None, model: str,
                   arrival: float) -> AsyncIterator[list[tuple[Job, RequestOutput]]]:
    """The jobs' outputs in batches, as the engine hands them over (one batch per engine step
    at most); metrics recorded per job. Failures raise APIError. Leaving early aborts the
    jobs' engine requests."""
    by_id = {job.request_id: job for job in jobs}
    metrics = state.metrics
    state.active_jobs += len(jobs)  # what a drain waits for
    left_early = True               # until the last output, or an error: the client hung up
    try:
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
                job.tokens = out.completion_tokens
                if out.finished:
                    job.finish = out.finish_reason
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
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(j.tokens for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def complete(state: ServerState, jobs: list[Job], adapter: str | None, model: str, arrival: float) -> None:
    """Run every job to the end, keeping text and logprobs on the jobs; errors raise APIError."""
    async for pairs in run_jobs(state, jobs, adapter, model, arrival):
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
                    chunks, usage_chunk=None, first: list[dict] = ()) -> sse.EventStream:
    """SSE over the jobs' outputs: `first` chunks, then the events `chunks(job, out)` makes for
    each output (a job the engine failed gets an error event instead), the `usage_chunk()`
    when asked for, an error event if the request fails on the way, and `[DONE]`. The events
    of one engine hand-off go out in one write."""
    async def events():
        if first:
            yield "".join(sse.event(chunk) for chunk in first).encode()
        try:
            async for pairs in run_jobs(state, jobs, adapter, model, arrival):
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

    return sse.EventStream(events())


def include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


# ----------------------------------------------------------------------------------------
# /v1/completions
# ----------------------------------------------------------------------------------------


def completion_logprobs(state: ServerState, lps: list, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = token_text(state, lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({token_text(state, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def ok_or_stream(model) -> dict:
    return {200: {"model": model, "description": "the result; with `stream`, server-sent events of chunks "
                                                  "(`data: {chunk}`, last `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/v1/completions", responses=ok_or_stream(CompletionResponse))
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    arrival = time.monotonic()
    check_serving(state)
    adapter = adapter_for(state, body.model)
    prompts = await tokenize_prompts(state, body.prompt)
    params = sampling_params(state, body, max(map(len, prompts)), body.max_tokens, 16, body.logprobs)
    for ids in prompts:
        check_fits(state, len(ids), params, adapter)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    jobs = make_jobs(request_id, prompts, params, body.n)
    check_room(state, len(jobs))
    base = {"id": request_id, "object": "text_completion", "created": created, "model": body.model}

    if not body.stream:
        if not await unless_client_leaves(request, complete(state, jobs, adapter, body.model, arrival)):
            return client_gone()
        choices = [{"index": j.index, "text": "".join(j.text), "finish_reason": finish_reason(j),
                    "logprobs": completion_logprobs(state, j.logprobs, 0) if body.logprobs is not None else None}
                   for j in jobs]
        return JSONResponse({**base, "choices": choices, "usage": usage(jobs, prompts)})

    offsets = {j.index: 0 for j in jobs}
    encoder = sse.ChunkEncoder(base)

    def chunks(job: Job, out: RequestOutput) -> list[str]:
        finish = finish_reason(job) if out.finished else None
        if body.logprobs is not None and out.logprobs:
            lps = completion_logprobs(state, out.logprobs, offsets[job.index])
            offsets[job.index] += len(out.text)
            return [encoder.choice({"index": job.index, "text": out.text, "logprobs": lps, "finish_reason": finish})]
        offsets[job.index] += len(out.text)
        return [encoder.text(job.index, out.text, finish)] if out.text or out.finished else []

    usage_chunk = (lambda: {**base, "choices": [], "usage": usage(jobs, prompts)}) if include_usage(body) else None
    return stream_response(state, jobs, adapter, body.model, arrival, chunks, usage_chunk)


# ----------------------------------------------------------------------------------------
# /v1/chat/completions
# ----------------------------------------------------------------------------------------


def chat_logprobs(state: ServerState, lps: list) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


async def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    check_chars(state, sum(len(m.content or "") + len(m.name or "") for m in body.messages), "messages")
    messages = [m.model_dump(exclude_none=True, include={"role", "content", "name"}) for m in body.messages]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        from jinja2 import TemplateError  # there: transformers renders templates with it

        if isinstance(exc, TemplateError):  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None
        log.exception("the chat template failed")  # a fault of the template or tokenizer: not for the client
        raise APIError(400, "the chat template cannot render these messages; see the server log",
                       param="messages") from None
    return await encode(state, text, template=True)


@router.post("/v1/chat/completions", responses=ok_or_stream(ChatCompletionResponse))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    arrival = time.monotonic()
    check_serving(state)
    adapter = adapter_for(state, body.model)
    prompt = await chat_prompt(state, body)
    if not prompt:
        raise APIError(400, "the rendered conversation is empty", param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(state, body, len(prompt), max_tokens, state.config.max_tokens_limit, logprobs)
    check_fits(state, len(prompt), params, adapter)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    jobs = make_jobs(request_id, [prompt], params, body.n)
    check_room(state, len(jobs))
    base = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model}

    if not body.stream:
        if not await unless_client_leaves(request, complete(state, jobs, adapter, body.model, arrival)):
            return client_gone()
        choices = [{"index": j.index, "message": {"role": "assistant", "content": "".join(j.text)},
                    "finish_reason": finish_reason(j),
                    "logprobs": chat_logprobs(state, j.logprobs) if body.logprobs else None} for j in jobs]
        return JSONResponse({**base, "choices": choices, "usage": usage(jobs, [prompt])})

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
                                          "finish_reason": finish_reason(job)}))
        return events

    # the role first, as OpenAI does
    roles = [{**base, "choices": [{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]} for job in jobs]
    usage_chunk = (lambda: {**base, "choices": [], "usage": usage(jobs, [prompt])}) if include_usage(body) else None
    return stream_response(state, jobs, adapter, body.model, arrival, chunks, usage_chunk, roles)


# ----------------------------------------------------------------------------------------
# /v1/models
# ----------------------------------------------------------------------------------------


@router.get("/v1/models")
async def models(request: Request):
    state = state_of(request)
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading")
    admin = is_admin(request)
    created = int(state.started_at)
    data = [{"id": state.model_name, "object": "model", "created": created, "owned_by": "loraplex",
             "root": str(state.model_dir) if admin and state.model_dir else None, "parent": None}]
    for info in await asyncio.to_thread(state.registry.list):  # the engine process may hold the registry
        if info.state != "ready":
            continue
        data.append({"id": info.name, "object": "model", "created": int(info.registered_at), "owned_by": "loraplex",
                     "root": info.path if admin else None, "parent": state.model_name})
    return {"object": "list", "data": data}
