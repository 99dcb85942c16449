"""`loraplex serve` as a drop-in for `vllm serve` command lines: the argument lists KServe's
LLMInferenceService and llm-d's LoRA deployments pass, started unchanged (but for the paths
and the port); every vLLM flag's mapping; VLLM_ALLOW_RUNTIME_LORA_UPDATING with and without
an admin key; `load_inplace`; adapters loaded on their first request (--lora-resolve-root)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from loraplex.cli import _refresh_certificates, _SkipPaths, build_parser
from loraplex.demo import ADAPTERS_DIR, MODEL_DIR, tasks
from loraplex.server import resolver
from loraplex.server.config import ServerConfig, config_from_args, load_generation_defaults, normalize_vllm_argv
from loraplex.server.errors import APIError
from tests.server.test_serve_command import wait_ready
from tests.server.test_server import free_port, live_server

ROOT = Path(__file__).resolve().parents[2]
UPPER, REVERSE, ROT13 = (str(ADAPTERS_DIR / n) for n in ("upper", "reverse", "rot13"))
PROMPT = tasks.prompt("hello world")
DONE = {"upper": "HELLO WORLD", "reverse": "dlrow olleh", "rot13": "uryyb jbeyq"}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No LORAPLEX_* or VLLM_* variable of the machine leaks into a parse."""
    for name in list(os.environ):
        if name.startswith(("LORAPLEX_", "VLLM_")):
            monkeypatch.delenv(name)


def parse(*argv: str) -> ServerConfig:
    return config_from_args(build_parser().parse_args(["serve", *normalize_vllm_argv(list(argv))]))


# -- (a) the command lines of KServe and llm-d, started unchanged ----------------------------

# KServe's LLMInferenceService: `vllm serve` as the template config/llmisvcconfig/config-llm-template.yaml
# runs it (kserve/kserve @ aaac4e294dae2c7b1aa1886447793f3aa1c30912), after its `eval`: with TLS on
# (GlobalConfig.EnableTLS), a vLLM >= 0.18 detected (--disable-access-log-for-endpoints,
# --shutdown-timeout 15), no KV offloading and no tensor parallelism. Then the container's args ("$@"),
# which pkg/controller/v1alpha2/llmisvc/workload_lora.go (addLoRAVLLMArgs) writes for spec.model.lora
# (its unit test's "all params set with model-routing aliases" case, the single quotes gone in the
# eval), with the model and namespace of docs/samples/llmisvc/lora-adapters/test-examples/02-lora-multi-hf-cpu.yaml.
KSERVE_ARGS = [
    "/mnt/models",
    "--served-model-name", "facebook/opt-125m", "publishers/kserve-ci-e2e-test/models/facebook/opt-125m",
    "--port", "8000",
    "--disable-access-log-for-endpoints", "/health,/metrics,/ping",
    "--shutdown-timeout", "15",
    "--enable-ssl-refresh",
    "--ssl-certfile", "/var/run/kserve/tls/tls.crt",
    "--ssl-keyfile", "/var/run/kserve/tls/tls.key",
    "--enable-lora",
    "--max-lora-rank=64",
    "--max-loras=2",
    "--max-cpu-loras=4",
    "--lora-modules",
    '{"name":"a","path":"/mnt/lora/a"}',
    '{"name":"publishers/kserve-ci-e2e-test/models/a","path":"/mnt/lora/a"}',
    '{"name":"b","path":"/mnt/lora/b"}',
    '{"name":"publishers/kserve-ci-e2e-test/models/b","path":"/mnt/lora/b"}',
]

# llm-d: the vLLM Deployments of llm-d/llm-d-router @ ebab687927f5331c1b39defcb579a07951bce56c
# (command `python3 -m vllm.entrypoints.openai.api_server`, whose flags are `vllm serve`'s).
# config/manifests/vllm/gpu-multilora-deployment.yaml: 15 adapters, tensor parallel over 2 GPUs.
LLMD_MULTILORA_ARGS = [
    "--model", "Qwen/Qwen3-32B-AWQ",
    "--served-model-name", "Qwen/Qwen3-32B",
    "--tensor-parallel-size", "2",
    "--enable-lora",
    "--max-loras", "15",
    "--max-lora-rank", "64",
    "--gpu-memory-utilization", "0.85",
    "--max-model-len", "32768",
    "--lora-modules", *(f"adapter-{i}=/adapters/adapter-{i}" for i in range(15)),
]
# config/manifests/vllm/gpu-deployment.yaml (note vLLM's abbreviation --max-num-seq)
LLMD_GPU_ARGS = [
    "--model", "Qwen/Qwen3-32B", "--tensor-parallel-size", "1", "--port", "8000", "--max-num-seq", "1024",
    "--max-model-len", "16000", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "12",
]
# config/manifests/vllm/cpu-deployment.yaml, whose adapters come from the filesystem resolver
LLMD_CPU_ARGS = ["--model", "Qwen/Qwen3-32B", "--port", "8000", "--enable-lora", "--max-loras", "4",
                 "--max-model-len", "16384"]
LLMD_ENV = {"VLLM_USE_V1": "1", "PORT": "8000", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
            "VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": "/adapters"}


def substitute(args: list[str], paths: dict[str, str]) -> list[str]:
    """The same arguments with the deployment's paths (and port) replaced by local ones."""
    out = []
    for arg in args:
        for old, new in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def start(args: list[str], env: dict[str, str], url: str, timeout: float = 120) -> subprocess.Popen:
    """`loraplex serve ARGS` on the CPU references until /ready answers 200 at `url`."""
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LORAPLEX_", "VLLM_"))},
                "LORAPLEX_KERNELS": "reference", "LORAPLEX_DEVICE": "cpu",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), **env}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_ready(proc, url, timeout)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    return proc.stdout.read()


def self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = directory / "tls.key", directory / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return key, cert


def complete(url: str, model: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 24,
                                                      "temperature": 0}, timeout=60, **kw)


def test_kserve_llminferenceservice_command_line_serves_https(tmp_path):
    key, cert = self_signed(tmp_path)
    port = free_port()
    args = substitute(KSERVE_ARGS, {"/mnt/models": str(MODEL_DIR), "/mnt/lora/a": UPPER, "/mnt/lora/b": REVERSE,
                                    "/var/run/kserve/tls/tls.crt": str(cert),
                                    "/var/run/kserve/tls/tls.key": str(key), "8000": str(port)})
    url = f"https://127.0.0.1:{port}"
    proc = start(args, {}, url)
    try:
        ids = {m["id"] for m in httpx.get(url + "/v1/models", verify=False).json()["data"]}
        assert {"facebook/opt-125m", "a", "b", "publishers/kserve-ci-e2e-test/models/a",
                "publishers/kserve-ci-e2e-test/models/b"} <= ids
        for model, job in (("a", "upper"), ("publishers/kserve-ci-e2e-test/models/b", "reverse")):
            out = complete(url, model, verify=False)
            assert out.status_code == 200 and out.json()["choices"][0]["text"].startswith(DONE[job]), out.text
        alias = complete(url, "publishers/kserve-ci-e2e-test/models/facebook/opt-125m", verify=False)
        assert alias.status_code == 200, alias.text  # the second --served-model-name
        assert httpx.get(url + "/health", verify=False).status_code == 200
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output
    assert "GET /health" not in output and "GET /v1/models" in output  # --disable-access-log-for-endpoints


def test_llmd_multilora_command_line(tmp_path):
    paths = {"Qwen/Qwen3-32B-AWQ": str(MODEL_DIR),
             **{f"/adapters/adapter-{i}": (UPPER, REVERSE, ROT13)[i % 3] for i in range(15)}}
    args = substitute(LLMD_MULTILORA_ARGS, paths)
    # unchanged, it asks for two GPUs: a clear refusal, before anything loads
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2: tensor parallelism is not supported; "
                                         r"loraplex runs on one GPU"):
        parse(*args)
    assert args[4:6] == ["--tensor-parallel-size", "2"]
    c = parse(*args[:5], "1", *args[6:])  # on one GPU
    assert c.served_model_name == "Qwen/Qwen3-32B" and c.max_gpu_adapters == 15 and c.max_rank == 64
    assert c.gpu_memory_fraction == 0.85 and c.max_model_len == 32768 and len(c.adapters) == 15
    assert c.adapters["adapter-4"] == REVERSE
    g = parse(*substitute(LLMD_GPU_ARGS, {"Qwen/Qwen3-32B": str(MODEL_DIR)}))
    assert g.max_num_seqs == 1024 and g.max_gpu_adapters == 2 and g.max_rank == 8 and g.max_host_adapters == 12


def test_llmd_cpu_deployment_loads_adapters_on_first_request(tmp_path):
    adapters = tmp_path / "adapters"  # what its init container clones
    shutil.copytree(UPPER, adapters / "small-segment-lora")
    shutil.copytree(ROT13, adapters / "cad-fabricator")
    port = free_port()
    args = substitute(LLMD_CPU_ARGS, {"Qwen/Qwen3-32B": str(MODEL_DIR), "8000": str(port)})
    url = f"http://127.0.0.1:{port}"
    proc = start(args, {**LLMD_ENV, "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapters)}, url)
    try:
        assert "small-segment-lora" not in {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        for model, job in (("small-segment-lora", "upper"), ("cad-fabricator", "rot13")):
            out = complete(url, model)
            assert out.status_code == 200 and out.json()["choices"][0]["text"].startswith(DONE[job]), out.text
        assert complete(url, "no-such-adapter").status_code == 404
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"small-segment-lora", "cad-fabricator"} <= ids
        # VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and no keys: vLLM's routes are open, /admin/* is not
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "up2", "lora_path": UPPER})
        assert r.status_code == 403 and "no --adapter-root" in r.text, r.text  # past auth: the path is refused
        assert httpx.get(url + "/admin/adapters").status_code == 403
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output


# -- (b) every flag's mapping --------------------------------------------------------------------


def test_model_positional_or_flag():
    assert parse(str(MODEL_DIR)).model == str(MODEL_DIR) == parse("--model", str(MODEL_DIR)).model
    assert parse(str(MODEL_DIR), "--model", str(MODEL_DIR)).model == str(MODEL_DIR)
    with pytest.raises(ValueError, match="the model is given twice"):
        parse("a/model", "--model", "another")
    assert parse().model is None  # the demo


def test_model_positional_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MODEL", "from-env")
    assert parse().model == "from-env" and parse("given").model == "given" and parse("--model", "f").model == "f"


def test_served_model_names():
    c = parse("m", "--served-model-name", "first", "second", "third", "--port", "1")
    assert c.served_model_name == "first" and c.served_model_aliases == ["second", "third"] and c.port == 1
    d = parse("org/models/Qwen3")  # vLLM's default name, the argument as given: an alias
    assert d.served_model_name == "Qwen3" and d.served_model_aliases == ["org/models/Qwen3"]
    assert parse("Qwen3").served_model_aliases == [] and parse("/abs/Qwen3").served_model_aliases == []
    with pytest.raises(ValueError, match="the base model is served under that name"):
        parse("m", "--served-model-name", "x", "y", "--lora-modules", "y=/a")


def test_served_model_names_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_SERVED_MODEL_NAME", "one,two")
    c = parse("m")
    assert c.served_model_name == "one" and c.served_model_aliases == ["two"]


def test_lora_modules_both_forms_several_per_flag_and_repeated(caplog):
    c = parse("m", "--lora-modules", "a=/x", '{"name": "b", "path": "/y"}', "--lora-modules",
              '{"name": "c", "path": "/z", "base_model_name": "m"}', "--adapter", "d=/w")
    assert c.adapters == {"d": "/w", "a": "/x", "b": "/y", "c": "/z"} and c.notes == []
    c = parse("m", "--lora-modules", '{"name": "c", "path": "/z", "base_model_name": "other"}')
    assert c.adapters == {"c": "/z"} and "base_model_name 'other'" in c.notes[0] and "ignored" in c.notes[0]
    assert parse("m", "--lora-modules", "a=/x", "a=/x").adapters == {"a": "/x"}
    with pytest.raises(ValueError, match="given twice with different paths"):
        parse("m", "--lora-modules", "a=/x", "a=/y")
    for bad in ("no-equals", '{"name": "a"}', '{"name": "a", "path": "/x", "extra": 1}', "{not json", '["a"]',
                '{"name": "a", "path": 3}'):
        with pytest.raises(SystemExit):
            parse("m", "--lora-modules", bad)


def test_lora_aliases_of_our_flags():
    c = parse("m", "--enable-lora", "--max-loras", "3", "--max-cpu-loras", "9", "--max-lora-rank", "32",
              "--gpu-memory-utilization", "0.5")
    assert (c.max_gpu_adapters, c.max_host_adapters, c.max_rank, c.gpu_memory_fraction) == (3, 9, 32, 0.5)
    with pytest.raises(ValueError, match="--no-enable-lora"):
        parse("m", "--no-enable-lora")


def test_aliases_take_our_environment_variables(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_GPU_ADAPTERS", "5")
    assert parse("m").max_gpu_adapters == 5 and parse("m", "--max-loras", "2").max_gpu_adapters == 2


@pytest.mark.parametrize("given, ours", [("auto", "auto"), ("half", "fp16"), ("float16", "fp16"), ("fp16", "fp16"),
                                         ("bfloat16", "bf16"), ("bf16", "bf16"), ("float", "fp32"),
                                         ("float32", "fp32"), ("fp32", "fp32")])
def test_dtype_names(given, ours):
    assert parse("m", "--dtype", given).dtype == ours


def test_dtype_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv("LORAPLEX_DTYPE", "bfloat16")
    assert parse("m").dtype == "bf16"
    monkeypatch.setenv("LORAPLEX_DTYPE", "float64")
    with pytest.raises(ValueError, match="--dtype must be one of"):
        parse("m")
    with pytest.raises(SystemExit):
        parse("m", "--dtype", "float64")


def test_fp32_on_cuda_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--dtype float32 \(fp32\) cannot run on CUDA.*--dtype bfloat16"):
        parse("m", "--dtype", "float32", "--device", "cuda")
    from loraplex.kernels import runtime

    with runtime.reference_kernels():  # the PyTorch references take fp32
        assert parse("m", "--dtype", "float32", "--device", "cuda").dtype == "fp32"


def test_fp32_with_the_triton_kernels_is_refused_at_engine_build():
    from loraplex.kernels import runtime
    from loraplex.server.state import build_engine

    if not runtime.use_triton(__import__("torch").device("cpu")):
        pytest.skip("the Triton kernels do not run here (no interpreter)")
    with pytest.raises(ValueError, match=r"--dtype float32 \(fp32\) cannot run on cpu with the Triton kernels"):
        build_engine(ServerConfig(model=str(MODEL_DIR), dtype="fp32", device="cpu"))


def test_engine_flags_with_vllm_spellings():
    c = parse("m", "--max_model_len", "512", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
              "--enforce_eager", "--gpu_memory_utilization=0.7", "--api-key", "k1", "k2", "--host", "0.0.0.0",
              "--port", "9000")
    assert (c.max_model_len, c.max_num_seqs, c.max_num_batched_tokens, c.enforce_eager) == (512, 4, 64, True)
    assert c.gpu_memory_fraction == 0.7 and c.api_keys == ["k1", "k2"] and (c.host, c.port) == ("0.0.0.0", 9000)
    assert normalize_vllm_argv(["--a_b=c_d", "x_y", "--", "--e_f"]) == ["--a-b=c_d", "x_y", "--", "--e_f"]


def test_vllm_api_key_variable(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "vk")
    assert parse("m").api_keys == ["vk"] and parse("m", "--api-key", "k").api_keys == ["k"]
    monkeypatch.setenv("LORAPLEX_API_KEY", "lk")
    assert parse("m").api_keys == ["lk"]


def test_chat_template_file_inline_and_errors(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert parse("m", "--chat-template", str(path)).chat_template == path.read_text()
    inline = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}\\n"
    assert parse("m", "--chat-template", inline).chat_template == inline[:-2] + "\n"  # escapes decoded, as vLLM
    with pytest.raises(ValueError, match="looks like a file path"):
        parse("m", "--chat-template", str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        parse("m", "--chat-template", "{% for x in %}")


def test_generation_config_choices_and_loading(tmp_path):
    assert parse("m").generation_config == "auto"
    assert parse("m", "--generation-config", "vllm").generation_config == "vllm"
    with pytest.raises(ValueError, match="--generation-config must be auto, vllm or a directory"):
        parse("m", "--generation-config", str(tmp_path / "none"))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.0,
         "max_new_tokens": 256, "do_sample": True, "eos_token_id": [1, 2]}))
    c = parse("m", "--generation-config", str(tmp_path))
    assert load_generation_defaults(c, Path("unused")) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                           "max_tokens": 256}
    auto = parse("m", "--override-generation-config", '{"temperature": 0.2, "top_k": -1}')
    assert load_generation_defaults(auto, tmp_path) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 256}
    assert load_generation_defaults(parse("m", "--generation-config", "vllm"), tmp_path) == {}
    assert load_generation_defaults(parse("m"), tmp_path / "no-model") == {}  # auto, no file: none
    assert load_generation_defaults(parse("m"), MODEL_DIR) == {}  # the demo's sets no sampling value
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot", "top_p": true}')
    assert load_generation_defaults(parse("m"), tmp_path) == {}


def test_resolve_roots_flag_environment_and_vllm_variables(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    c = parse("m", "--lora-resolve-root", str(a), "--lora-resolve-root", str(b))
    assert c.lora_resolve_roots == [str(a), str(b)]
    with pytest.raises(ValueError, match="--lora-resolve-root .* is not a directory"):
        parse("m", "--lora-resolve-root", str(tmp_path / "none"))
    monkeypatch.setenv("LORAPLEX_LORA_RESOLVE_ROOT", f"{a}{os.pathsep}{b}")
    assert parse("m").lora_resolve_roots == [str(a), str(b)]
    monkeypatch.delenv("LORAPLEX_LORA_RESOLVE_ROOT")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(a))
    assert parse("m").lora_resolve_roots == []  # vLLM resolves only with runtime updating on
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert parse("m").lora_resolve_roots == [str(a)] and parse("m").runtime_lora_updating is True
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    assert parse("m").lora_resolve_roots == []
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin,lora_filesystem_resolver")
    assert parse("m").lora_resolve_roots == [str(a)]


@pytest.mark.parametrize("value, read", [(None, None), ("", None), ("1", True), ("true", True), ("True", True),
                                         ("0", False), ("false", False), ("yes", False)])
def test_runtime_lora_updating_variable(monkeypatch, value, read):
    if value is not None:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", value)
    c = parse("m")
    assert c.runtime_lora_updating is read and (("read as false" in " ".join(c.notes)) == (value == "yes"))


def test_harmless_vllm_flags_are_accepted_and_warned_about():
    quiet = parse("m", "-tp", "1", "--pipeline-parallel-size", "1", "--data-parallel-size", "1",
                  "--disable-log-requests", "--no-enable-log-requests", "--disable-log-stats",
                  "--no-enable-prefix-caching", "--enable-chunked-prefill", "--lora-dtype", "auto",
                  "--quantization", "bitsandbytes", "--load-format", "safetensors", "--kv-cache-dtype", "auto",
                  "--response-role", "assistant", "--max-logprobs", "20", "--api-server-count", "1",
                  "--tokenizer", "m")
    assert quiet.notes == []
    assert not quiet.enable_prefix_caching and parse("m").enable_prefix_caching  # ours, on by default
    warned = parse("m", "--trust-remote-code", "--download-dir", "/d", "--seed", "0", "--enable-prefix-caching",
                   "--lora-dtype", "bfloat16", "--compilation-config", '{"mode": 3}', "--api-server-count", "8",
                   "--disable-fastapi-docs", "--max-logprobs", "128", "--no-enable-chunked-prefill",
                   "--enable-expert-parallel", "--data-parallel-address", "10.0.0.1", "-O3")
    assert warned.enable_prefix_caching
    text = " ".join(warned.notes)
    for flag in ("--trust-remote-code", "--download-dir", "--seed", "--lora-dtype",
                 "--compilation-config", "--api-server-count", "--disable-fastapi-docs", "--max-logprobs",
                 "--no-enable-chunked-prefill", "--enable-expert-parallel", "--data-parallel-address"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, message", [
    (["-tp", "2"], "--tensor-parallel-size 2: tensor parallelism is not supported"),
    (["--pipeline-parallel-size", "4"], "--pipeline-parallel-size 4"),
    (["--data-parallel-size", "2"], "--data-parallel-size 2: data parallelism is not supported"),
    (["--data-parallel-start-rank", "1"], "--data-parallel-start-rank 1"),
    (["--headless"], "--headless"),
    (["--kv-transfer-config", '{"kv_connector": "NixlConnector"}'], "--kv-transfer-config"),
    (["--quantization", "awq"], "--quantization awq: loraplex serves NF4"),
    (["--load-format", "pt"], "--load-format pt"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
    (["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], "tool-call parsing is not supported"),
    (["--reasoning-parser", "qwen3"], "--reasoning-parser qwen3"),
    (["--tokenizer", "another/dir"], "--tokenizer 'another/dir'"),
    (["--response-role", "system"], "--response-role system"),
])
def test_flags_whose_meaning_cannot_be_honoured_are_refused(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse("m", *argv)


def test_unknown_flags_stay_errors():
    with pytest.raises(SystemExit):
        parse("m", "--no-such-flag")


def test_http_flags(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k"), cert.write_text("c")
    c = parse("m", "--uvicorn-log-level", "critical", "--disable-uvicorn-access-log",
              "--disable-access-log-for-endpoints", "/health,/metrics", "--ssl-keyfile", str(key),
              "--ssl-certfile", str(cert), "--enable-ssl-refresh", "--allowed-origins", '["https://a", "https://b"]',
              "--shutdown-timeout", "15")
    assert c.uvicorn_log_level == "critical" and not c.access_log and c.access_log_skip == ["/health", "/metrics"]
    assert (c.ssl_keyfile, c.ssl_certfile, c.enable_ssl_refresh) == (str(key), str(cert), True)
    assert c.cors_origins == ["https://a", "https://b"] and c.shutdown_timeout == 15
    for argv, message in ((["--ssl-keyfile", str(key)], "go together"),
                          (["--enable-ssl-refresh"], "needs --ssl-certfile"),
                          (["--ssl-keyfile", str(key), "--ssl-certfile", str(tmp_path / "none")], "is not a file")):
        with pytest.raises(ValueError, match=message):
            parse("m", *argv)


def test_access_log_filter_and_certificate_refresh(tmp_path):
    skip = _SkipPaths(["/health"])
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4:5", "GET", "/health?x=1", "1.1", 200), None)
    assert not skip.filter(record)
    record.args = ("1.2.3.4:5", "GET", "/v1/models", "1.1", 200)
    assert skip.filter(record)

    key, cert = tmp_path / "k", tmp_path / "c"
    key.write_text("old"), cert.write_text("old")

    class Context:
        loads = 0

        def load_cert_chain(self, certfile, keyfile):
            if Path(certfile).read_text() != "new certificate":  # the old one is never loaded again
                raise ssl.SSLError("half written")
            Context.loads += 1

    class Server:
        should_exit = False

    config = ServerConfig(ssl_keyfile=str(key), ssl_certfile=str(cert), enable_ssl_refresh=True)
    thread = threading.Thread(target=_refresh_certificates, args=(Context(), config, Server, 0.02), daemon=True)
    thread.start()
    try:
        time.sleep(0.1)
        assert Context.loads == 0  # unchanged files: nothing reloaded
        cert.write_text("broken!")  # a new size: seen as a change, which fails to load...
        cert.write_text("broken")
        time.sleep(0.1)
        assert Context.loads == 0
        cert.write_text("new certificate")  # ...and is retried once complete
        deadline = time.monotonic() + 5
        while Context.loads == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert Context.loads == 1
    finally:
        Server.should_exit = True
        thread.join(5)


def test_help_documents_the_vllm_flags():
    text = subprocess.run([sys.executable, "-m", "loraplex.cli", "serve", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("MODEL", "--lora-modules", "--enable-lora", "--max-loras", "--max-cpu-loras", "--max-lora-rank",
                 "--gpu-memory-utilization", "--served-model-name NAME [NAME ...]", "--chat-template",
                 "--generation-config", "--override-generation-config", "--lora-resolve-root",
                 "LORAPLEX_LORA_RESOLVE_ROOT", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "--tensor-parallel-size",
                 "--enable-prefix-caching", "--ssl-certfile", "--enable-ssl-refresh", "--allowed-origins",
                 "--disable-access-log-for-endpoints", "bfloat16", "float32"):
        assert flag in text, flag


# -- (c) VLLM_ALLOW_RUNTIME_LORA_UPDATING, the admin key, load_inplace ------------------------

ADMIN, KEY = "adm-key", "api-key"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The bundled demo model on a thread of this process, with two resolve roots."""
    tmp = tmp_path_factory.mktemp("vllm")
    roots = [tmp / "resolve-a", tmp / "resolve-b"]
    for root in roots:
        root.mkdir()
    shutil.copytree(UPPER, roots[0] / "shout")
    shutil.copytree(ROT13, roots[1] / "org" / "cipher")
    config = ServerConfig(model=str(MODEL_DIR), device="cpu", adapter_roots=[str(ADAPTERS_DIR)],
                          lora_resolve_roots=[str(r) for r in roots], engine_process=False,
                          served_model_aliases=["demo-alias"])
    with live_server(config) as (url, state):
        yield {"url": url, "state": state, "roots": roots, "tmp": tmp}


def set_auth(state, admin_key, api_keys, updating, open_admin=False):
    c = state.config  # read per request by the auth dependencies
    c.admin_key, c.api_keys, c.runtime_lora_updating, c.allow_unauthenticated_admin = \
        admin_key, api_keys, updating, open_admin


def statuses(url: str, token: str | None) -> tuple[int, int, int]:
    """(load, unload, /admin/adapters) as seen with `token`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    load = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": UPPER},
                      headers=headers, timeout=60)
    unload = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "probe"}, headers=headers, timeout=60)
    listing = httpx.get(url + "/admin/adapters", headers=headers, timeout=60)
    return load.status_code, unload.status_code, listing.status_code


@pytest.mark.parametrize("updating", [None, True, False])
def test_with_an_admin_key_every_admin_route_takes_only_it(demo, updating):
    set_auth(demo["state"], ADMIN, [KEY], updating)
    try:
        assert statuses(demo["url"], ADMIN) == (200, 200, 200)
        assert statuses(demo["url"], KEY) == (401, 401, 401)
        assert statuses(demo["url"], None) == (401, 401, 401)
    finally:
        set_auth(demo["state"], None, [], None)


def test_without_an_admin_key_vllm_routes_follow_the_variable(demo):
    url, state = demo["url"], demo["state"]
    try:
        set_auth(state, None, [KEY], None)  # unset: as today
        assert statuses(url, KEY) == (403, 403, 403)
        set_auth(state, None, [KEY], None, open_admin=True)
        assert statuses(url, None) == (200, 200, 200)
        set_auth(state, None, [KEY], True)  # true: an API key, as vLLM; /admin/* stays closed
        assert statuses(url, KEY) == (200, 200, 403)
        assert statuses(url, None) == (401, 401, 403)
        set_auth(state, None, [], True)  # no API keys: open, as vLLM
        assert statuses(url, None) == (200, 200, 403)
        set_auth(state, None, [KEY], False)  # false: not served, as vLLM
        load = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": UPPER},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert load.status_code == 404 and load.json()["error"]["message"] == "Not Found"
        assert statuses(url, KEY) == (404, 404, 403)
        set_auth(state, None, [KEY], False, open_admin=True)
        assert statuses(url, None) == (404, 404, 200)
    finally:
        set_auth(state, None, [], None)


def test_load_inplace_swaps_weights_for_new_requests(demo):
    url, state = demo["url"], demo["state"]
    set_auth(state, ADMIN, [], None)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": UPPER}, headers=admin)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'swap' added successfully."
        assert complete(url, "swap").json()["choices"][0]["text"].startswith(DONE["upper"])
        again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": REVERSE},
                           headers=admin)
        assert again.status_code == 400, again.text  # as vLLM
        assert again.json()["error"]["message"] == ("The lora adapter 'swap' has already been loaded. If you want to "
                                                    "load the adapter in place, set 'load_inplace' to True.")
        assert complete(url, "swap").json()["choices"][0]["text"].startswith(DONE["upper"])  # unchanged
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": REVERSE,
                                                            "load_inplace": True}, headers=admin)
        assert r.status_code == 200, r.text
        assert complete(url, "swap").json()["choices"][0]["text"].startswith(DONE["reverse"])
        fresh = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "new-inplace", "lora_path": ROT13,
                                                                "load_inplace": True}, headers=admin)
        assert fresh.status_code == 200  # load_inplace of a new name loads it
        base = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "demo-alias", "lora_path": ROT13},
                          headers=admin)
        assert base.status_code == 409  # a name of the base model
    finally:
        for name in ("swap", "new-inplace"):
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=admin)
        set_auth(state, None, [], None)


# -- (d) adapters loaded on their first request -----------------------------------------------


def test_first_request_loads_from_a_resolve_root(demo):
    state = demo["state"]
    assert not state.registry.has("shout")
    assert asyncio.run(resolver.load_on_first_request(state, "shout")) is True
    assert state.registry.has("shout") and complete(demo["url"], "shout").json()["choices"][0]["text"].startswith(
        DONE["upper"])
    info = state.registry.info("shout")
    assert Path(info.path) == (demo["roots"][0] / "shout").resolve()
    assert asyncio.run(resolver.load_on_first_request(state, "org/cipher")) is True  # a nested name, as vLLM
    out = complete(demo["url"], "org/cipher")
    assert out.json()["choices"][0]["text"].startswith(DONE["rot13"])
    assert asyncio.run(resolver.load_on_first_request(state, "nothing-here")) is False
    assert asyncio.run(resolver.load_on_first_request(state, "demo-alias")) is False  # the base model's name


def test_through_the_api_a_first_request_loads_it(demo):
    shutil.copytree(REVERSE, demo["roots"][1] / "backwards")
    out = complete(demo["url"], "backwards")
    assert out.status_code == 200 and out.json()["choices"][0]["text"].startswith(DONE["reverse"])
    assert complete(demo["url"], "still-nothing").status_code == 404


def test_concurrent_first_requests_register_once(demo, monkeypatch):
    state = demo["state"]
    shutil.copytree(UPPER, demo["roots"][0] / "crowd")
    calls = []
    register = state.registry.register

    def counted(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.3)  # a slow read: the others arrive meanwhile
        return register(*args, **kwargs)

    monkeypatch.setattr(state.registry, "register", counted)

    async def crowd():
        return await asyncio.gather(*(resolver.load_on_first_request(state, "crowd") for _ in range(8)))

    assert asyncio.run(crowd()) == [True] * 8
    assert calls == ["crowd"]


def test_first_request_loads_and_client_cancellation(demo, monkeypatch):
    """A first caller that goes away (its client hung up) does not cancel the load for the others."""
    state = demo["state"]
    shutil.copytree(ROT13, demo["roots"][0] / "patient")
    register = state.registry.register
    monkeypatch.setattr(state.registry, "register", lambda *a, **k: (time.sleep(0.3), register(*a, **k))[1])

    async def scenario():
        first = asyncio.ensure_future(resolver.load_on_first_request(state, "patient"))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(resolver.load_on_first_request(state, "patient"))
        await asyncio.sleep(0.05)
        first.cancel()
        return await second

    assert asyncio.run(scenario()) is True and state.registry.has("patient")


@pytest.mark.parametrize("name", ["..", "../x", "../resolve-b/org/cipher", "/etc", "a/../shout", "./shout", "shout/",
                                  "a//b", "x\x00y", "", "org", "shout/adapter_config.json"])
def test_names_that_would_leave_a_root_or_name_no_adapter_dir(demo, name):
    if name == "org":  # a directory, but its adapter is one level down: not an adapter itself
        with pytest.raises(APIError) as e:
            asyncio.run(resolver.load_on_first_request(demo["state"], name))
        assert e.value.status == 404 and "adapter_config.json is missing" in e.value.message
        assert str(demo["roots"][1]) not in e.value.message  # no server path
        return
    assert asyncio.run(resolver.load_on_first_request(demo["state"], name)) is False


def test_links_out_of_the_root(demo):
    state, roots, tmp = demo["state"], demo["roots"], demo["tmp"]
    outside = tmp / "outside-adapter"
    shutil.copytree(UPPER, outside)
    (roots[0] / "escape").symlink_to(outside)  # the directory itself leads out
    assert asyncio.run(resolver.load_on_first_request(state, "escape")) is False
    (roots[0] / "inside-link").symlink_to(roots[0] / "shout")  # a link that stays inside is fine
    assert asyncio.run(resolver.load_on_first_request(state, "inside-link")) is True
    linked = roots[0] / "linked-files"
    linked.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / f).symlink_to(outside / f)  # its files lead out
    with pytest.raises(APIError) as e:
        asyncio.run(resolver.load_on_first_request(state, "linked-files"))
    assert e.value.status == 404 and "outside the allowed adapter roots" in e.value.message
    assert not state.registry.has("linked-files") and not state.registry.has("escape")


def test_an_invalid_adapter_directory_is_a_404_saying_why(demo):
    state, root = demo["state"], demo["roots"][0]
    bad = root / "broken"
    shutil.copytree(UPPER, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 999, "lora_alpha": 1}))
    with pytest.raises(APIError) as e:
        asyncio.run(resolver.load_on_first_request(state, "broken"))
    assert e.value.status == 404 and e.value.code == "model_not_found" and e.value.param == "model"
    assert "'broken' was found under a --lora-resolve-root but cannot be loaded" in e.value.message
    (root / "empty").mkdir()
    with pytest.raises(APIError, match="adapter_config.json is missing"):
        asyncio.run(resolver.load_on_first_request(state, "empty"))
    out = complete(demo["url"], "empty")
    assert out.status_code == 404 and "cannot be loaded" in out.json()["error"]["message"]


def test_without_resolve_roots_nothing_is_resolved(demo, monkeypatch):
    monkeypatch.setattr(demo["state"].config, "lora_resolve_roots", [])
    assert asyncio.run(resolver.load_on_first_request(demo["state"], "shout")) is False
