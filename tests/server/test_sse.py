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
