"""`loraplex serve` as users start it: flags and environment, --help, and a graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loraplex.cli import build_parser
from loraplex.engine.engine import EngineConfig
from loraplex.kernels import runtime
from loraplex.server.config import ServerConfig, config_from_args
from loraplex.server.state import ServerState
from tests.factory import make_model
from tests.server.test_server import PROMPT, free_port

ROOT = Path(__file__).resolve().parents[2]


def parse(argv, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_and_environment(monkeypatch, tmp_path):
    c = parse(["--model", "m", "--adapter", "a=/x", "--adapter", "b=/y", "--api-key", "k1", "--port", "9"],
              {"LORAPLEX_PORT": "7", "LORAPLEX_ADMIN_KEY": "adm", "LORAPLEX_API_KEY": "e1,e2",
               "LORAPLEX_ADAPTER_ROOT": f"{tmp_path}{os.pathsep}{tmp_path}", "LORAPLEX_MAX_GPU_ADAPTERS": "3"},
              monkeypatch)
    assert c.model == "m" and c.adapters == {"a": "/x", "b": "/y"} and c.port == 9  # flags win
    assert c.api_keys == ["k1"] and c.admin_key == "adm" and c.max_gpu_adapters == 3
    assert c.adapter_roots == [str(tmp_path)] * 2
    monkeypatch.delenv("LORAPLEX_PORT")
    assert parse([]).port == 8000 and parse([]).api_keys == ["e1", "e2"]
    for argv, message in ((["--admin-key", "e1"], "differ"), (["--max-n", "0"], "max-n"),
                          (["--adapter-root", str(tmp_path / "none")], "not a directory")):
        with pytest.raises(ValueError, match=message):
            parse(argv)
    with pytest.raises(SystemExit):
        parse(["--adapter", "no-equals-sign"])


@pytest.mark.parametrize("var, value, message", [
    ("LORAPLEX_MAX_NUM_SEQS", "abc", "invalid literal for int()"),
    ("LORAPLEX_ENABLE_PREFIX_CACHING", "maybe", "expected 1, true, yes, 0, false or no"),
    ("LORAPLEX_ADAPTER", "no-equals-sign", "expected NAME=PATH"),
    ("LORAPLEX_MAX_GPU_ADAPTER_MEMORY", "lots", "'lots' is not a size"),
])
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(monkeypatch, capsys, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve"])
    assert exit_.value.code == 2
    assert f"{var}='{value}': {message}" in capsys.readouterr().err


def test_adapter_memory_is_sized_in_bytes(monkeypatch, tmp_path):
    c = parse(["--max-gpu-adapter-memory", "512MiB", "--max-host-adapter-memory", "2g"])
    assert (c.max_gpu_adapter_memory, c.max_host_adapter_memory) == (512 << 20, 2 << 30)
    assert parse([], {"LORAPLEX_MAX_GPU_ADAPTER_MEMORY": "1.5GiB"}, monkeypatch).max_gpu_adapter_memory == 3 << 29
    assert parse(["--max-gpu-adapter-memory", "4096"]).max_gpu_adapter_memory == 4096
    monkeypatch.delenv("LORAPLEX_MAX_GPU_ADAPTER_MEMORY")
    d = parse([])
    assert d.max_gpu_adapter_memory is None and (d.max_gpu_adapters, d.max_host_adapters, d.max_rank) == (64, 256, 256)
    for size in ("0", "-1G", "2 parsecs"):
        with pytest.raises(SystemExit):
            parse(["--max-gpu-adapter-memory", size])
    with pytest.raises(ValueError, match="--max-rank must be at most 1024"):
        parse(["--max-rank", "2048"])
    # the default: what 8 (GPU) and 32 (host) adapters of rank 16 on every linear take
    from loraplex.model.loader import load_model

    make_model(tmp_path / "m")
    with runtime.reference_kernels():
        model = load_model(tmp_path / "m", dtype="fp32", progress=False).model
    per_adapter = 16 * 4 * sum(len(lin.parts) * lin.in_features + lin.out_features for lin in model.linears().values())
    assert d.gpu_adapter_bytes(model) == 8 * per_adapter and d.host_adapter_bytes(model) == 32 * per_adapter
    assert c.gpu_adapter_bytes(model) == 512 << 20


def test_prefix_caching_is_on_unless_turned_off(monkeypatch):
    assert parse([]).enable_prefix_caching and not parse(["--no-enable-prefix-caching"]).enable_prefix_caching
    assert not parse([], {"LORAPLEX_ENABLE_PREFIX_CACHING": "0"}, monkeypatch).enable_prefix_caching
    assert parse(["--enable-prefix-caching"]).enable_prefix_caching  # the flag wins


def test_engine_flags_parse_check_and_reach_the_engine(monkeypatch):
    c = parse(["--max-num-batched-tokens", "64", "--max-num-seqs", "8", "--enforce-eager", "--device", "cpu"])
    assert c.max_num_batched_tokens == 64 and c.max_num_seqs == 8 and c.enforce_eager
    d = parse([])
    assert d.max_num_batched_tokens == 2048 == EngineConfig().max_num_batched_tokens and not d.enforce_eager
    e = parse([], {"LORAPLEX_MAX_NUM_BATCHED_TOKENS": "512", "LORAPLEX_ENFORCE_EAGER": "1"}, monkeypatch)
    assert e.max_num_batched_tokens == 512 and e.enforce_eager
    monkeypatch.setenv("LORAPLEX_ENFORCE_EAGER", "0")
    assert not parse([]).enforce_eager
    assert d.async_scheduling == "auto" and parse(["--async-scheduling"]).async_scheduling == "on"
    assert parse(["--async-scheduling", "off"]).async_scheduling == "off"
    for argv, message in ((["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1"),
                          (["--max-num-batched-tokens", "100"],  # under the default --max-num-seqs 256
                           r"--max-num-batched-tokens \(100\) must be >= --max-num-seqs \(256\)")):
        with pytest.raises(ValueError, match=message):
            parse(argv)
    with pytest.raises(ValueError, match="--async-scheduling must be auto, on or off"):
        parse([], {"LORAPLEX_ASYNC_SCHEDULING": "sometimes"}, monkeypatch)
    monkeypatch.delenv("LORAPLEX_ASYNC_SCHEDULING")

    # the bundled demo on CPU: the values are in the engine's config (no graphs on CPU anyway)
    with runtime.reference_kernels():
        c.async_scheduling = "on"
        for config, graph_batch in ((c, 0), (ServerConfig(device="cpu", max_num_seqs=8), 256)):
            config.engine_process = False  # to look inside the engine
            state = ServerState(config)
            state.start(background=False)
            try:
                engine = state.engine
                assert engine.config.cuda_graph_max_batch == graph_batch and engine.runner.graphs is None
                assert engine.config.max_num_batched_tokens == config.max_num_batched_tokens
                assert engine.scheduler.config.max_num_batched_tokens == config.max_num_batched_tokens
                assert engine.async_scheduling is (config is c)  # auto: off on CPU
            finally:
                state.shutdown()


def test_help_documents_every_flag():
    text = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("--model", "--adapter", "--host", "--port", "--served-model-name", "--dtype", "--kv-cache-tokens",
                 "--max-gpu-adapters", "--max-host-adapters", "--max-rank", "--adapter-root", "--api-key",
                 "--admin-key", "--allow-unauthenticated-admin", "--cors-origin", "--log-level", "--max-body-bytes",
                 "--max-tokens-limit", "--max-n", "--max-queue", "--shutdown-timeout", "--max-num-batched-tokens",
                 "--enforce-eager", "--async-scheduling", "--engine-in-process"):
        assert flag in text, flag
    assert "LORAPLEX_MAX_GPU_ADAPTERS" in text and "SIGTERM" in text
    assert "LORAPLEX_ENFORCE_EAGER=1" in text and "LORAPLEX_MAX_NUM_BATCHED_TOKENS" in text


def start_serving(model_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`loraplex serve` on the CPU references, once /ready answers 200: (process, base URL)."""
    port = free_port()
    env = {**os.environ, "LORAPLEX_KERNELS": "reference", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--device", "cpu", "--dtype", "fp32", "--log-level", "warning",
                             *flags], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    return wait_ready(proc, url), url


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 120) -> subprocess.Popen:
    """`proc` once `url`/ready answers 200 (any certificate, for TLS servers); its output as the
    failure if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/ready", verify=False, timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read())
        time.sleep(0.1)


def test_sigterm_finishes_running_streams_then_exits_zero(tmp_path):
    make_model(tmp_path / "base", "llama")
    proc, url = start_serving(tmp_path / "base", "--kv-cache-tokens", "512", "--shutdown-timeout", "30")
    try:
        body = {"model": "base", "prompt": PROMPT, "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_drain_keeps_answering_503_and_ends_cut_streams_properly(tmp_path):
    """The socket used to close at SIGTERM (connection refused, never a 503 for a balancer),
    and streams still running at --shutdown-timeout were cut mid-body with a traceback each."""
    make_model(tmp_path / "base", "llama", max_position_embeddings=4096)
    proc, url = start_serving(tmp_path / "base", "--kv-cache-tokens", "8192", "--shutdown-timeout", "2")
    try:
        body = {"model": "base", "prompt": PROMPT, "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = httpx.get(url + "/ready", timeout=10)  # still listening
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": PROMPT}, timeout=10)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
            rest = [line for line in lines if line.startswith("data:")]
        assert time.monotonic() - signalled >= 1.5  # it ran on through the drain window
        assert rest[-1] == "data: [DONE]" and '"finish_reason":"abort"' in rest[-2], rest[-3:]
        assert proc.wait(60) == 0
        output = proc.stdout.read()
        assert "Traceback" not in output and "CancelledError" not in output, output
        with pytest.raises(httpx.TransportError):  # and only then closed
            httpx.get(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
