"""The server when the engine fails (the bundled demo, live): clients get errors that name
their request and point to the log, never the exception's text or a server path; /ready turns
503 after UNHEALTHY_AFTER_FAILED_STEPS failed steps and back after one that succeeds; a dead
engine thread ends in-flight requests with an error, /ready stays 503 and /health 200."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
import pytest

from loraplex.demo import tasks
from loraplex.engine.async_engine import UNHEALTHY_AFTER_FAILED_STEPS
from loraplex.server.config import ServerConfig
from loraplex.server.state import DEMO_NAME, ServerState
from tests.server.test_server import live_server

SECRET = "/srv/loraplex/secret/kernels/nf4.cubin"
ADMIN = "failure-admin"
ENGINE_ERROR = r"internal error in the engine; see the server log \(request (cmpl-[0-9a-f]+-0)\)"


@pytest.fixture(scope="module")
def demo():
    with live_server(ServerConfig(device="cpu", admin_key=ADMIN, engine_process=False)) as (url, state):
        yield url, state


def completion(url: str, stream: bool = False, max_tokens: int = 8) -> httpx.Response:
    body = {"model": DEMO_NAME, "prompt": tasks.prompt("hello world"), "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def events(response: httpx.Response) -> list:
    """The SSE data of a stream, JSON decoded ([DONE] kept as the string)."""
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def assert_nothing_raw(text: str) -> None:
    for raw in (SECRET, "/srv", "OSError", "Input/output", "Errno", "Traceback"):
        assert raw not in text, (raw, text)


def metric(url: str, name: str) -> float:
    line = next(line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_failing_steps_answer_500s_without_the_exception_and_ready_follows(demo, monkeypatch, caplog):
    url, state = demo
    failures = state.async_engine.step_failures

    def broken(*args, **kwargs):  # what a kernel's OSError looks like: errno, text, a server path
        raise OSError(5, "Input/output error", SECRET)
    monkeypatch.setattr(state.engine.runner, "run", broken)

    with caplog.at_level(logging.ERROR, logger="loraplex.engine"):
        r = completion(url)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        message = r.json()["error"]["message"]
        request_id = re.fullmatch(ENGINE_ERROR, message).group(1)
        assert_nothing_raw(r.text)
        assert httpx.get(url + "/ready").status_code == 200  # one failure is not yet a broken engine

        stream = completion(url, stream=True)
        assert stream.status_code == 200  # the stream had started: the error comes as an event
        *_, error, done = events(stream)
        assert done == "[DONE]" and re.fullmatch(ENGINE_ERROR, error["error"]["message"])
        assert_nothing_raw(stream.text)

        for _ in range(UNHEALTHY_AFTER_FAILED_STEPS - 2):
            assert completion(url).status_code == 500
    # the operator finds the request id and the whole exception in the log
    line = next(r.getMessage() for r in caplog.records if request_id in r.getMessage())
    assert SECRET in line and "Traceback" in line

    ready = httpx.get(url + "/ready")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unhealthy",
                            "error": f"the last {UNHEALTHY_AFTER_FAILED_STEPS} engine steps failed"}
    assert httpx.get(url + "/health").status_code == 200
    assert metric(url, "loraplex_engine_healthy") == 0
    assert metric(url, "loraplex_engine_step_failures_total") == failures + UNHEALTHY_AFTER_FAILED_STEPS

    monkeypatch.undo()  # the fault passes: the next request is still admitted, runs, and readiness returns
    r = completion(url)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert httpx.get(url + "/ready").json()["status"] == "ready"
    assert metric(url, "loraplex_engine_healthy") == 1


def test_unexpected_errors_outside_the_step_name_only_the_request(demo, monkeypatch, caplog):
    url, state = demo

    def broken(*args, **kwargs):
        raise PermissionError(13, "Permission denied", SECRET)
    monkeypatch.setattr(state.engine, "add_request", broken)  # on the engine thread, before any step
    with caplog.at_level(logging.ERROR, logger="loraplex.server"):
        r = completion(url)
    assert r.status_code == 500
    assert re.fullmatch(r"internal error; see the server log \(request cmpl-[0-9a-f]+-0\)", r.json()["error"]["message"])
    assert_nothing_raw(r.text)
    assert SECRET in caplog.text

    # an OS PermissionError in an admin call is no 403 echoing its path: a 500 with an id to find it
    monkeypatch.setattr(state.registry, "register", broken)
    r = httpx.post(url + "/admin/adapters", json={"name": "x", "path": str(state.adapter_roots[0] / "upper")},
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 500
    assert re.fullmatch(r"internal server error; see the server log \(request err-[0-9a-f]+\)",
                        r.json()["error"]["message"])
    assert_nothing_raw(r.text)
    # the adapter-root check is ours and echoes only the client's own path: kept (a new
    # connection: after an unexpected error uvicorn closes the one it came on)
    r = httpx.post(url + "/admin/adapters", json={"name": "x", "path": "/elsewhere/adapter"},
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 403 and "'/elsewhere/adapter' is outside the allowed adapter roots" in r.text


class Killed(BaseException):
    """Not an Exception: it escapes the step loop's handler and ends the engine thread."""


def test_a_dead_engine_thread_ends_streams_with_an_error_and_ready_stays_503(caplog):
    with live_server(ServerConfig(device="cpu", engine_process=False)) as (url, state):
        engine, real_step = state.engine, state.engine.step
        kill = threading.Event()

        def step():
            if kill.is_set():
                raise Killed
            time.sleep(0.01)  # slow enough that the stream is still running when the kill comes
            return real_step()
        engine.step = step

        body = {"model": DEMO_NAME, "prompt": "a", "max_tokens": 100, "stream": True, "ignore_eos": True}
        with caplog.at_level(logging.CRITICAL, logger="loraplex.engine"):
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                lines = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
                first = json.loads(next(lines))
                kill.set()
                rest = list(lines)
        assert first["choices"][0]["text"] and first["choices"][0]["finish_reason"] is None
        assert rest[-1] == "[DONE]" and len(rest) < 100
        error = json.loads(rest[-2])["error"]
        assert re.fullmatch(r"the engine stopped after an internal error; see the server log "
                            r"\(request cmpl-[0-9a-f]+-0\)", error["message"])
        assert "the engine thread died" in caplog.text and "Killed" in caplog.text

        ready = httpx.get(url + "/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unhealthy", "error": "the engine thread has stopped"}
        assert httpx.get(url + "/health").status_code == 200
        r = completion(url)  # refused at once: a dead thread does not come back
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "the model cannot serve: the engine thread has stopped; " \
                                               "see the server log"
        assert metric(url, "loraplex_engine_healthy") == 0


def test_failed_startup_shows_its_kind_not_its_text(tmp_path):
    from starlette.testclient import TestClient

    from loraplex.server.app import create_app

    missing = tmp_path / "secret-models" / "llama"
    state = ServerState(ServerConfig(model=str(missing), device="cpu", engine_process=False))
    state._load_logged()
    with TestClient(create_app(state, start=False)) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        r = client.post("/v1/completions", json={"model": "llama", "prompt": "hi"})
    assert r.status_code == 503
    for text in (ready.text, r.text):
        assert "startup failed (" in text and "see the server log" in text
        assert "secret-models" not in text and str(tmp_path) not in text
