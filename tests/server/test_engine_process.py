"""The engine in its own process (the default of `loraplex serve`), where it differs from the
engine on a thread: the test_server suite runs against both; here, what only the process has.
The engine process dying ends every stream with an error and /ready stays 503 (its startup
failing shows the kind of failure), and the API process's requests, adapter calls and metrics
cross the boundary."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time

import httpx

from loraplex.demo import MODEL_DIR, tasks
from loraplex.server.config import ServerConfig
from loraplex.server.state import DEMO_NAME, ServerState
from tests.server.test_server import live_server


def stream_lines(url: str, max_tokens: int):
    body = {"model": DEMO_NAME, "prompt": tasks.prompt("hello world"), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    return httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)


def test_the_engine_process_dying_fails_streams_and_ready_stays_503():
    with live_server(ServerConfig(device="cpu", max_num_seqs=4)) as (url, state):
        pid = state.async_engine.info["pid"]
        assert pid != os.getpid() and state.engine is None
        out = httpx.post(url + "/v1/completions", json={"model": "upper", "prompt": tasks.prompt("hello world"),
                                                        "max_tokens": 24, "temperature": 0}, timeout=60).json()
        assert out["choices"][0]["text"].startswith("HELLO WORLD")
        metrics = httpx.get(url + "/metrics").text
        assert "loraplex_engine_healthy 1.0" in metrics
        assert 'loraplex_step_tokens_total{phase="decode"}' in metrics  # the engine's step stats crossed over
        with stream_lines(url, 100) as r:
            lines = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
            first = json.loads(next(lines))
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)
        assert first["choices"][0]["text"]
        assert rest[-1] == "[DONE]" and len(rest) < 100
        assert json.loads(rest[-2])["error"]["message"] == "the engine process stopped; see the server log"
        deadline = time.monotonic() + 10
        while httpx.get(url + "/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unhealthy", "error": "the engine process has stopped"}
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": DEMO_NAME, "prompt": "a"}, timeout=30)
        assert r.status_code == 503 and "the engine process has stopped" in r.json()["error"]["message"]
        r = httpx.get(url + "/admin/adapters", timeout=30)  # no admin key: 403 before reaching the engine
        assert r.status_code in (401, 403)
        assert "loraplex_engine_healthy 0.0" in httpx.get(url + "/metrics").text


def test_a_failed_engine_startup_shows_its_kind_not_its_text(tmp_path):
    model = tmp_path / "secret-models" / "demo"
    shutil.copytree(MODEL_DIR, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # the tokenizer loads, the weights do not

    async def main():
        state = ServerState(ServerConfig(model=str(model), device="cpu"))
        state.start(background=True)
        deadline = time.monotonic() + 120
        while state.failed is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        state.shutdown()
        return state

    state = asyncio.run(main())
    assert re.fullmatch(r"startup failed \(\w+\); see the server log", state.failed), state.failed
    assert not state.ready.is_set() and not state.async_engine.process.is_alive()
