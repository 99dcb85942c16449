"""Server-sent events for streamed completions, encoded with little work per token.

Every chunk of one response repeats the same `id`, `object`, `created` and `model`; they are
encoded once per response (`ChunkEncoder`), and a token's chunk only adds its choice. The
common choices (text or content without logprobs) are filled into fixed templates, with the
text escaped by the json module's own C escaper; the output is byte for byte what
`json.dumps(chunk, separators=(",", ":"))` gives for the whole chunk. `EventStream` is the
response that sends them.
"""

from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring_ascii as json_str  # json.dumps' own escaper (ensure_ascii)
from typing import AsyncIterator

from starlette.responses import Response

DONE = b"data: [DONE]\n\n"


def dumps(data) -> str:
    return json.dumps(data, separators=(",", ":"))


def event(data) -> str:
    """One SSE event for any JSON-able value (join several, then encode once)."""
    return f"data: {dumps(data)}\n\n"


class ChunkEncoder:
    """SSE events of one response whose chunks are `{**base, "choices": [choice]}`."""

    __slots__ = ("_head",)

    def __init__(self, base: dict):
        self._head = "data: " + dumps(base)[:-1] + ',"choices":['

    def choice(self, choice: dict) -> str:
        """The event of a chunk with one choice, as text (join several, then encode once)."""
        return f"{self._head}{dumps(choice)}]}}\n\n"

    def text(self, index: int, text: str, finish_reason: str | None) -> str:
        """A /v1/completions chunk without logprobs."""
        finish = "null" if finish_reason is None else json_str(finish_reason)
        return f'{self._head}{{"index":{index},"text":{json_str(text)},"logprobs":null,"finish_reason":{finish}}}]}}\n\n'

    def content(self, index: int, content: str) -> str:
        """A /v1/chat/completions content delta without logprobs."""
        return (f'{self._head}{{"index":{index},"delta":{{"content":{json_str(content)}}},"logprobs":null,'
                f'"finish_reason":null}}]}}\n\n')


async def disconnected(receive) -> None:
    """Return once the client has hung up (ASGI: after the body, `receive` waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A text/event-stream response over an async iterator of bytes, as Starlette's
    StreamingResponse, but watching for the client's disconnect with one plain asyncio task
    instead of an anyio task group per response (which cost more than the rest of a short
    streamed request's handling). When the client leaves, the stream is cancelled at once,
    waiting or not, so that its engine requests are aborted even while still queued."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close=None):
        self.events = events
        self.on_close = on_close  # called once the response is over, however it ended
        self.status_code = 200
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        gone = False

        async def watch():
            nonlocal gone
            await disconnected(receive)
            gone = True
            task.cancel()
        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:  # not ours (the server is stopping): pass it on
                raise
            if hasattr(task, "uncancel"):  # Python >= 3.11 counts cancellations
                task.uncancel()  # the client left: nothing more to send
        finally:
            watcher.cancel()  # before any further await: it cannot cancel us after this
            if self.on_close is not None:
                self.on_close()
            await self.events.aclose()  # a stream left early aborts its engine requests
