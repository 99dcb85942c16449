"""`loraplex serve` with no --model: the bundled demo, one concurrent mixed batch through the
OpenAI client returns each adapter's transformation; an adapter registered at run time and a
merge of two serve too."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from loraplex.demo import ADAPTERS_DIR, tasks
from loraplex.server.config import ServerConfig
from loraplex.server.state import DEMO_NAME
from tests.server.test_server import live_server

TEXTS = ["hello world", *tasks.held_out(10, seed=777)]  # the README's example and held-out texts
ADMIN = "demo-admin"


@pytest.fixture(scope="module")
def demo():
    with live_server(ServerConfig(device="cpu", admin_key=ADMIN)) as (url, _):
        yield url


def test_concurrent_mixed_batch_returns_each_adapters_transformation(demo):
    c = openai.AsyncOpenAI(base_url=demo + "/v1", api_key="unused", max_retries=0)
    models = {DEMO_NAME: "copy", **{name: name for name in tasks.ADAPTERS}}

    async def one(model, text, chat):
        if chat:
            out = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                  max_tokens=24, temperature=0)
            return out.choices[0].message.content
        out = await c.completions.create(model=model, prompt=tasks.prompt(text), max_tokens=24, temperature=0)
        return out.choices[0].text

    async def main():
        jobs = [(m, t, chat) for m in models for t in TEXTS for chat in (False, True)]
        return jobs, await asyncio.gather(*(one(*job) for job in jobs))

    jobs, answers = asyncio.run(main())
    got = dict(zip(jobs, answers))
    for model, task in models.items():
        for text in TEXTS:  # chat renders the same prompt: the same answer
            assert got[(model, text, True)] == got[(model, text, False)], (model, text)
        right = [got[(model, text, False)] == tasks.TASKS[task](text) for text in TEXTS]
        assert right[0], (model, got[(model, TEXTS[0], False)])  # "hello world" as the README shows
        assert sum(right) / len(right) >= 0.9, (model, [got[(model, t, False)] for t in TEXTS])
    listed = {m.id for m in openai.OpenAI(base_url=demo + "/v1", api_key="unused").models.list().data}
    assert listed == {DEMO_NAME, *tasks.ADAPTERS}


def test_register_at_run_time_and_merge(demo):
    admin = httpx.Client(base_url=demo, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    r = admin.post("/admin/adapters", json={"name": "shout", "path": str(ADAPTERS_DIR / "upper")})
    assert r.status_code == 201, r.text
    # cat stacks both rank-16 adapters into rank 32: any rank up to --max-rank serves, paged by
    # its real size; svd keeps the best rank-16 part instead
    body = {"name": "upper+rot13", "method": "cat", "sources": [{"name": "upper"}, {"name": "rot13"}]}
    r = admin.post("/admin/adapters/merge", json=body)
    assert r.status_code == 201 and r.json()["rank"] == 32, r.text
    assert r.json()["pages"] == 2 * admin.get("/admin/adapters/upper").json()["pages"]
    r = admin.post("/admin/adapters/merge", json={**body, "name": "upper+rot13-svd", "method": "svd", "rank": 16})
    assert r.status_code == 201 and r.json()["rank"] == 16, r.text
    c = openai.OpenAI(base_url=demo + "/v1", api_key="unused", max_retries=0)
    out = c.completions.create(model="shout", prompt=tasks.prompt("hello world"), max_tokens=24, temperature=0)
    assert out.choices[0].text == "HELLO WORLD"
    merged = c.completions.create(model="upper+rot13", prompt=tasks.prompt("hello world"), max_tokens=24,
                                  temperature=0)
    assert merged.choices[0].text  # both deltas at once: no single expected string, but it serves


def test_structured_output_on_the_demo(demo):
    """The adapters under a grammar: the output matches it, and where the adapter's own answer
    is allowed, it is what comes out."""
    import json
    import re

    def ask(model, **fields):
        r = httpx.post(demo + "/v1/completions", json={"model": model, "prompt": tasks.prompt("hello world"),
                                                       "max_tokens": 40, "temperature": 0, **fields}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    assert ask("upper", guided_choice=["hello world", "HELLO WORLD", "dlrow olleh"])["text"] == "HELLO WORLD"
    assert ask("reverse", guided_choice=["hello world", "HELLO WORLD", "dlrow olleh"])["text"] == "dlrow olleh"
    assert ask("upper", guided_regex=r"[A-Z ]+")["text"] == "HELLO WORLD"
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 16}},
              "required": ["answer"], "additionalProperties": False}
    for model in tasks.ADAPTERS:
        out = ask(model, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                  guided_whitespace_pattern="")  # compact: a small model may pad JSON with whitespace
        value = json.loads(out["text"])
        assert set(value) == {"answer"} and isinstance(value["answer"], str) and len(value["answer"]) <= 16
        assert out["finish_reason"] == "stop" and re.match(r"\s*\{", out["text"])
