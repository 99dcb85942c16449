"""Server-sent events for streamed completions, encoded with little work per token.

Every chunk of one response repeats the same `id`, `object`, `created` and `model`; they are
encoded once per response (`ChunkEncoder`), and a token's chunk only adds its choice. The
common choices (text or content without logprobs) are filled into fixed templates, with the
text escaped by the json module's own C escaper; the output is byte for byte what
`json.dumps(chunk, separators=(",", ":"))` gives for the whole chunk.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii as json_str  # json.dumps' own escaper (ensure_ascii)

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
