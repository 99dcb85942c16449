"""The SSE encoder's templates give exactly what json.dumps gives for the whole chunk."""

import json

import pytest

from loraplex.server import sse

BASE = {"id": "cmpl-abc", "object": "text_completion", "created": 1700000000, "model": "upper"}
TEXTS = ["", "a", " Paris", 'say "hi"\n', "tab\there\\", "café 中文 🙂", "\x00\x1f\u2028", "\ud800"]


def dumps(chunk) -> str:
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish", [None, "length", "stop"])
def test_completion_chunks_are_json_dumps_byte_for_byte(text, finish):
    encoder = sse.ChunkEncoder(BASE)
    chunk = {**BASE, "choices": [{"index": 3, "text": text, "logprobs": None, "finish_reason": finish}]}
    assert encoder.text(3, text, finish) == dumps(chunk)
    assert encoder.choice(chunk["choices"][0]) == dumps(chunk)


@pytest.mark.parametrize("text", TEXTS)
def test_chat_content_chunks_are_json_dumps_byte_for_byte(text):
    base = {**BASE, "object": "chat.completion.chunk", "model": 'we"ird\u00e9'}
    chunk = {**base, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}
    assert sse.ChunkEncoder(base).content(0, text) == dumps(chunk)
    assert sse.event(chunk) == dumps(chunk)


# -- EventStream: the streaming response ----------------------------------------------------


def run_stream(events, disconnect_after: float | None, outside_cancel_after: float | None = None):
    """Drive an EventStream as uvicorn would; returns (messages sent, how the call ended)."""
    import asyncio

    sent = []

    async def main():
        async def receive():
            if disconnect_after is None:
                await asyncio.Event().wait()
            await asyncio.sleep(disconnect_after)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        task = asyncio.create_task(sse.EventStream(events)({"type": "http"}, receive, send))
        if outside_cancel_after is not None:
            await asyncio.sleep(outside_cancel_after)
            task.cancel()
        try:
            await asyncio.wait_for(task, 5)
            return "returned"
        except asyncio.CancelledError:
            return "cancelled"
    return sent, asyncio.run(main())


def test_event_stream_sends_every_chunk_then_ends():
    async def events():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"
    sent, how = run_stream(events(), disconnect_after=None)
    assert how == "returned"
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]


def test_a_client_that_leaves_closes_the_stream_even_while_it_waits():
    """A request still queued yields nothing: the disconnect alone must close its stream (whose
    finally aborts the engine requests), and the response ends quietly."""
    import asyncio

    closed = []

    async def events():
        try:
            yield b"data: first\n\n"
            await asyncio.Event().wait()  # queued in the engine: no output for a long time
            yield b"never"
        finally:
            closed.append(True)
    sent, how = run_stream(events(), disconnect_after=0.05)
    assert how == "returned" and closed == [True]
    assert [m.get("body") for m in sent[1:]] == [b"data: first\n\n"]


def test_a_cancellation_from_outside_is_passed_on():
    import asyncio

    closed = []

    async def events():
        try:
            await asyncio.Event().wait()
            yield b"never"
        finally:
            closed.append(True)
    _, how = run_stream(events(), disconnect_after=None, outside_cancel_after=0.05)
    assert how == "cancelled" and closed == [True]
