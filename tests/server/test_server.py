"""The real server (uvicorn on a loopback port, tiny random model, peft-made adapters) driven by
the official `openai` client and httpx: outputs, streaming, errors, auth, admin, disconnects,
metrics. Outputs are compared with the engine's own greedy outputs for the same token ids.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import contextmanager
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from loraplex.adapters.peft_format import read_peft_adapter
from loraplex.engine.adapters import StaticAdapters
from loraplex.engine.engine import Engine, EngineConfig
from loraplex.engine.request import Request
from loraplex.engine.sampling import SamplingParams
from loraplex.kernels import runtime
from loraplex.model.loader import load_model
from loraplex.server.app import create_app
from loraplex.server.config import ServerConfig
from loraplex.server.state import ServerState
from tests.factory import make_adapter, make_model

API_KEY, ADMIN_KEY = "sk-test-key", "admin-test-key"
PROMPT = [5, 9, 17, 33, 2, 8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(config: ServerConfig):
    """uvicorn serving `config` on a free loopback port, on its own thread, once ready:
    yields (base URL, server state); the references run the kernels (fp32, process-wide)."""
    with runtime.reference_kernels():
        state = ServerState(config)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning",
                                            loop="asyncio", http="h11"))  # as `loraplex serve`
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        assert state.ready.wait(120), state.failed
        while not srv.started:
            time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}", state
        finally:
            srv.should_exit = True
            thread.join(30)


@pytest.fixture(scope="module", params=["process", "thread"])
def server(request, tmp_path_factory):
    """The tiny model's server, with the engine in its own process and then on a thread."""
    root = tmp_path_factory.mktemp("server")
    make_model(root / "base", "llama")
    roots = root / "adapters"
    paths = {name: make_adapter(root / "base", roots / name, name, seed=i + 1)
             for i, name in enumerate(["all", "attn", "pattern"])}
    config = ServerConfig(model=str(root / "base"), served_model_name="tiny", adapters={"all": str(paths["all"])},
                          dtype="fp32", device="cpu", kv_cache_tokens=2048, max_num_seqs=16, max_gpu_adapters=3,
                          max_host_adapters=4, adapter_roots=[str(roots)], api_keys=[API_KEY], admin_key=ADMIN_KEY,
                          max_body_bytes=64 << 10, max_tokens_limit=64, max_n=4,
                          engine_process=request.param == "process")
    with live_server(config) as (url, state):
        oracle = load_model(root / "base", dtype=torch.float32, progress=False)
        yield {"url": url, "state": state, "paths": paths, "root": root, "oracle": oracle}


def client(s, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=s["url"] + "/v1", api_key=key, max_retries=0)


def admin(s) -> httpx.Client:
    return httpx.Client(base_url=s["url"], headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


_oracle: dict = {}


def expected(s, adapter: str | None, prompt=PROMPT, n=8) -> tuple[list[int], str]:
    """Greedy tokens and text of the engine itself for this adapter (path) on the oracle model."""
    path = None if adapter is None else s["paths"][adapter]
    key = (adapter, tuple(prompt), n)
    if key not in _oracle:
        o = s["oracle"]
        adapters = None if path is None else StaticAdapters(o.model, {"x": read_peft_adapter(path)}, max_rank=16)
        engine = Engine(o.model, o.tokenizer, adapters, EngineConfig(kv_cache_tokens=256))
        outs = []
        engine.add_request(Request("o", list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                   None if path is None else "x", on_output=outs.append))
        engine.run_until_done()
        _oracle[key] = ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs))
    return _oracle[key]


def complete(s, model, prompt=PROMPT, n=8, **kw):
    return client(s).completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"ignore_eos": True}, **kw)


# -- inference -------------------------------------------------------------------------------


def test_health_and_ready(server):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    assert httpx.get(server["url"] + "/ready").json()["status"] == "ready"


def test_models_lists_base_and_adapters_root_only_for_admin(server):
    ids = {m.id: m for m in client(server).models.list().data}
    assert set(ids) >= {"tiny", "all"}
    assert ids["all"].model_extra["parent"] == "tiny" and ids["all"].model_extra["root"] is None
    as_admin = {m.id: m for m in client(server, ADMIN_KEY).models.list().data}
    assert as_admin["all"].model_extra["root"] == str(server["paths"]["all"].resolve())


def test_completion_base_and_adapter_equal_engine_outputs(server):
    for model, adapter in (("tiny", None), ("all", "all")):
        out = complete(server, model)
        tokens, text = expected(server, adapter)
        assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == 8
    assert expected(server, None)[0] != expected(server, "all")[0]  # the adapter matters


def test_completion_logprobs_and_n(server):
    out = complete(server, "tiny", n=4, logprobs=2, extra_headers={})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) == 2 and lp.token_logprobs[0] <= 0
    many = client(server).completions.create(model="tiny", prompt=[PROMPT, PROMPT[:3]], n=2, max_tokens=3,
                                             temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == len(PROMPT) + 3 and many.usage.completion_tokens == 12


def test_streaming_equals_non_streaming_and_reports_usage(server):
    chunks = list(complete(server, "all", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected(server, "all")[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_stop_strings_end_the_text_streaming_or_not(server):
    """Stop strings are matched in the engine (their text is made there); the rest in the API
    process: both end at the same place, streamed or not."""
    text = expected(server, "all")[1]
    stop = text[3:5]
    assert stop, text
    want = text[:text.find(stop)]
    out = complete(server, "all", stop=[stop])
    assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
    chunks = [c for c in complete(server, "all", stop=[stop], stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_uses_the_template_and_streams(server):
    c = client(server)
    messages = [{"role": "user", "content": "hello world"}]
    out = c.chat.completions.create(model="all", messages=messages, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=1)
    tok = server["state"].tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    assert out.choices[0].message.content == expected(server, "all", prompt, 6)[1]
    assert out.usage.prompt_tokens == len(prompt) and len(out.choices[0].logprobs.content) == 6
    chunks = list(c.chat.completions.create(model="all", messages=messages, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == out.choices[0].message.content


def test_concurrent_mixed_requests_each_get_their_adapters_output(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)
        models = ["tiny", "all", "tiny", "all"] * 3
        outs = await asyncio.gather(*(c.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0,
                                                           extra_body={"ignore_eos": True}) for m in models))
        return list(zip(models, outs))
    for model, out in asyncio.run(main()):
        assert out.choices[0].text == expected(server, None if model == "tiny" else "all")[1]


# -- errors ------------------------------------------------------------------------------------


def status_of(fn) -> tuple[int, dict]:
    try:
        fn()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body
    raise AssertionError("no error")


def test_error_statuses_in_openai_format(server):
    c = client(server)
    cases = {
        401: lambda: client(server, "wrong").completions.create(model="tiny", prompt="hi"),
        404: lambda: c.completions.create(model="nope", prompt="hi"),
        400: lambda: c.completions.create(model="tiny", prompt="hi", temperature=-1),
    }
    for code, fn in cases.items():
        status, body = status_of(fn)
        assert status == code and set(body) >= {"message", "type", "param", "code"}, (code, body)
    assert status_of(lambda: c.completions.create(model="tiny", prompt="hi", max_tokens=1000))[0] == 400
    assert status_of(lambda: c.completions.create(model="tiny", prompt="hi", n=9))[0] == 400
    status, body = status_of(lambda: c.completions.create(model="tiny", prompt=PROMPT * 60, max_tokens=60))
    assert status == 400 and "at most 256" in body["message"] and body["code"] == "context_length_exceeded"
    status, body = status_of(lambda: c.completions.create(model="tiny", prompt=PROMPT * 40, max_tokens=60))
    assert status == 400 and "maximum context length" in body["message"]
    assert status_of(lambda: c.completions.create(model="tiny", prompt="hi", extra_body={"use_beam_search": True}))[0] == 400
    assert status_of(lambda: c.completions.create(model="tiny", prompt=[10**6]))[0] == 400
    big = httpx.post(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": "tiny", "prompt": "x" * (70 << 10)})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server["url"] + "/nowhere").json()["error"]["message"] == "Not Found"
    state, config = server["state"], server["state"].config
    config.max_queue, saved = 0, config.max_queue
    try:
        assert status_of(lambda: c.completions.create(model="tiny", prompt="hi"))[0] == 429
    finally:
        config.max_queue = saved
    state.draining = True
    try:
        assert status_of(lambda: c.completions.create(model="tiny", prompt="hi"))[0] == 503
        assert httpx.get(server["url"] + "/ready").status_code == 503
    finally:
        state.draining = False


def test_admin_auth(server):
    url = server["url"] + "/admin/adapters"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    assert admin(server).get("/admin/adapters").status_code == 200
    body = {"name": "x", "path": str(server["root"] / "base")}  # outside the adapter roots
    assert admin(server).post("/admin/adapters", json=body).status_code == 403
    escape = server["root"] / "adapters" / "escape"
    escape.symlink_to(server["root"] / "base")
    assert admin(server).post("/admin/adapters", json={"name": "x", "path": str(escape)}).status_code == 403


# -- admin lifecycle -----------------------------------------------------------------------------


def test_admin_register_show_merge_export_delete(server, tmp_path):
    a = admin(server)
    r = a.post("/admin/adapters", json={"name": "attn", "path": str(server["paths"]["attn"])})
    assert r.status_code == 201 and r.json()["rank"] == 4
    assert a.post("/admin/adapters", json={"name": "attn", "path": str(server["paths"]["attn"])}).status_code == 409
    assert a.post("/admin/adapters", json={"name": "tiny", "path": str(server["paths"]["attn"])}).status_code == 409
    assert complete(server, "attn").choices[0].text == expected(server, "attn")[1]
    info = a.get("/admin/adapters/attn").json()
    assert info["state"] == "ready" and info["requests"] == 1 and info["tier"] == "gpu"
    r = a.post("/admin/adapters/merge", json={"name": "mix", "method": "cat",
                                                "sources": [{"name": "all", "weight": 0.5}, {"name": "attn", "weight": 0.5}]})
    assert r.status_code == 201 and r.json()["rank"] == 12
    assert a.post("/admin/adapters/merge", json={"name": "m2", "method": "linear",
                                                 "sources": [{"name": "all"}, {"name": "attn"}]}).status_code == 400
    dest = server["root"] / "adapters" / "exported-mix"
    r = a.post("/admin/adapters/mix/export", json={"path": str(dest)})
    assert r.status_code == 200 and (dest / "adapter_model.safetensors").is_file()
    assert a.post("/admin/adapters/mix/export", json={"path": str(tmp_path / "out")}).status_code == 403
    server["paths"]["mix-export"] = dest
    assert complete(server, "mix").choices[0].text == expected(server, "mix-export")[1]
    assert a.delete("/admin/adapters/mix").json()["state"] in ("draining", "gone")
    assert status_of(lambda: complete(server, "mix"))[0] == 404
    assert a.delete("/admin/adapters/mix").status_code == 404
    assert {i["name"] for i in a.get("/admin/adapters").json()["data"]} >= {"all", "attn"}


def test_vllm_aliases(server):
    a = admin(server)
    r = a.post("/v1/load_lora_adapter", json={"lora_name": "pat", "lora_path": str(server["paths"]["pattern"])})
    assert r.status_code == 200 and "pat" in r.text
    assert complete(server, "pat").choices[0].text == expected(server, "pattern")[1]
    assert a.post("/v1/unload_lora_adapter", json={"lora_name": "pat"}).status_code == 200
    assert a.post("/v1/unload_lora_adapter", json={"lora_name": "pat"}).status_code == 404


def test_unload_during_a_stream_drains_or_aborts(server):
    a = admin(server)
    for force, reason in ((False, "length"), (True, "abort")):
        a.post("/admin/adapters", json={"name": "victim", "path": str(server["paths"]["attn"])}).raise_for_status()
        stream = client(server).completions.create(model="victim", prompt=PROMPT, max_tokens=60, temperature=0,
                                                   extra_body={"ignore_eos": True}, stream=True)
        it = iter(stream)
        next(it)
        assert a.delete(f"/admin/adapters/victim?force={str(force).lower()}").status_code == 200
        rest = [c for c in it if c.choices]
        assert rest[-1].choices[0].finish_reason == reason
        if not force:
            assert len("".join(c.choices[0].text for c in rest)) > 0
        assert status_of(lambda: complete(server, "victim"))[0] == 404


def engine_idle(state) -> bool:
    """No request in the engine and every KV block free (read where the engine runs)."""
    snap = state.snapshot()
    return snap.running == 0 and snap.waiting == 0 and snap.kv_cache_usage == 0.0


def test_client_disconnect_mid_stream_frees_the_request(server):
    state = server["state"]
    assert engine_idle(state)
    with httpx.stream("POST", server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "all", "prompt": PROMPT, "max_tokens": 64, "stream": True, "ignore_eos": True},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while not engine_idle(state) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine_idle(state)


# -- metrics -------------------------------------------------------------------------------------


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(server):
    def hits(model):
        text = httpx.get(server["url"] + "/metrics").text
        samples = {(s.name, tuple(s.labels.items())): s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        return (samples.get(("loraplex_prefix_cache_hits_total", (("model", model),)), 0),
                samples.get(("vllm:prefix_cache_hits_total", (("model_name", "tiny"),)), 0))

    prompt = [(7 * i) % 250 + 3 for i in range(40)]  # 2 full KV blocks of 16, then 8 tokens
    for model in ("tiny", "all"):
        before = hits(model)
        first = complete(server, model, prompt)
        again = complete(server, model, prompt)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert again.usage.prompt_tokens_details.cached_tokens == 32
        assert again.choices[0].text == first.choices[0].text
        after = hits(model)
        assert after[0] - before[0] == 32 and after[1] - before[1] == 32
    stream = client(server).completions.create(model="all", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                               stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [32]


def test_metrics_scrape_parses_and_counts(server):
    complete(server, "all")
    text = httpx.get(server["url"] + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("loraplex_requests_total", (("finish_reason", "length"),))] >= 1
    assert samples[("loraplex_model_requests_total", (("model", "all"),))] >= 1
    assert any(name == "loraplex_request_errors_total" for name, _ in samples)
    assert "vllm:num_requests_waiting" in families and "vllm:lora_requests_info" in families
    assert samples[("loraplex_time_to_first_token_seconds_count", ())] >= 1
    # adapter memory: what "all" holds on the GPU is what the gauges and its info say
    info = httpx.get(server["url"] + "/admin/adapters/all", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert info["tier"] == "gpu" and info["gpu_bytes"] > 0 and info["pages"] > 0 and info["host_bytes"] > 0
    assert samples[("loraplex_adapter_resident_bytes", (("model", "all"), ("tier", "gpu")))] == info["gpu_bytes"]
    assert samples[("loraplex_adapter_memory_bytes", (("tier", "gpu"),))] >= info["gpu_bytes"]
    assert 0 < samples[("loraplex_adapter_pages", (("state", "used"),))] == \
        samples[("loraplex_adapter_memory_bytes", (("tier", "gpu"),))] // (info["gpu_bytes"] // info["pages"])
    assert samples[("loraplex_adapter_memory_limit_bytes", (("tier", "host"),))] >= info["host_bytes"]
