"""`loraplex serve` settings: one dataclass, filled from flags or `LORAPLEX_*` environment variables.

Every flag has an environment variable named after it (`--max-gpu-adapters` ->
`LORAPLEX_MAX_GPU_ADAPTERS`); a flag given on the command line wins. Repeatable flags take
a comma-separated list in the environment (`LORAPLEX_API_KEY=k1,k2`; adapter roots are
separated by `os.pathsep`). Secrets are better passed by environment than by flag: command
lines show up in `ps`.

`vllm serve` command lines work too: the model may be given positionally, vLLM's spellings of
the same settings are aliases of ours (`--max-loras` is `--max-gpu-adapters`, ...), `--lora-modules`
registers startup adapters, and vLLM's flags that mean nothing here are accepted (with a logged
warning where a deployment might expect an effect) or refused with the reason when their meaning
cannot be honoured (`--tensor-parallel-size 2`). The table, flag by flag, is in the README
("Coming from vLLM: flags"). vLLM's spellings with underscores (`--max_model_len`) are accepted
as vLLM accepts them (`cli.main`).
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "LORAPLEX_"
log = logging.getLogger("loraplex.server")

# --dtype: ours and vLLM's names -> ours
DTYPES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}
# generation_config.json keys -> request fields, with their neutral value (a key at it is no default)
GENERATION_KEYS = {"temperature": ("temperature", 1.0), "top_p": ("top_p", 1.0), "top_k": ("top_k", (0, -1)),
                   "min_p": ("min_p", 0.0), "repetition_penalty": ("repetition_penalty", 1.0),
                   "max_new_tokens": ("max_tokens", None)}


@dataclass
class ServerConfig:
    model: str | None = None                     # None = the bundled demo model
    adapters: dict[str, str] = field(default_factory=dict)  # registered at startup (trusted paths)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None         # None = the model directory's name
    served_model_aliases: list[str] = field(default_factory=list)  # more names of the base model in `model`
    dtype: str = "auto"                          # auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    kv_cache_tokens: int | None = None
    gpu_memory_fraction: float = 0.90
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048           # tokens per engine step (chunked-prefill budget)
    enforce_eager: bool = False                  # no CUDA graphs
    async_scheduling: str = "auto"               # one engine step in flight: auto (= on CUDA), on, off
    engine_process: bool = True                  # the engine in its own process (False: on a thread here)
    max_gpu_adapters: int = 64                   # adapters resident on the GPU at once (slot records)
    max_host_adapters: int = 256                 # adapters kept in host memory
    max_rank: int = 256                          # largest LoRA rank accepted
    max_gpu_adapter_memory: int | None = None    # bytes of GPU adapter pages; None = AUTO_ADAPTERS_GPU sized ones
    max_host_adapter_memory: int | None = None   # bytes of host adapter copies; None = AUTO_ADAPTERS_HOST sized ones
    adapter_roots: list[str] = field(default_factory=list)
    lora_resolve_roots: list[str] = field(default_factory=list)  # adapters loaded on their first request
    chat_template: str | None = None             # the template's text (--chat-template); None = the tokenizer's
    generation_config: str = "auto"              # auto (the model's generation_config.json), vllm (none) or a dir
    override_generation_config: dict = field(default_factory=dict)  # over the file's values (vLLM's names)
    runtime_lora_updating: bool | None = None    # VLLM_ALLOW_RUNTIME_LORA_UPDATING: None = unset
    enable_prefix_caching: bool = True           # reuse the KV blocks of prompt prefixes (per adapter version)
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    metrics_key: str | None = None               # None = /metrics is open (it names every adapter)
    allow_unauthenticated_admin: bool = False
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None         # None = the context length
    max_tokens_limit: int = 4096
    max_n: int = 8
    max_prompts: int = 64                        # prompts in one /v1/completions request
    max_queue: int = 1024
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    uvicorn_log_level: str | None = None         # None = --log-level
    access_log: bool = True
    access_log_skip: list[str] = field(default_factory=list)  # paths whose requests are not logged
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0                       # ssl.CERT_NONE; 2 = CERT_REQUIRED (client certificates)
    enable_ssl_refresh: bool = False             # reload the key and certificates when their files change
    notes: list[str] = field(default_factory=list)  # warnings to log at startup (accepted vLLM flags, ...)

    def gpu_adapter_bytes(self, model) -> int:
        """--max-gpu-adapter-memory, or room for AUTO_ADAPTERS_GPU adapters of rank AUTO_RANK on
        every linear of `model` (what as many pre-allocated slots took before memory was paged)."""
        return self.max_gpu_adapter_memory or AUTO_ADAPTERS_GPU * auto_adapter_bytes(model)

    def host_adapter_bytes(self, model) -> int:
        return self.max_host_adapter_memory or AUTO_ADAPTERS_HOST * auto_adapter_bytes(model)

    def check(self) -> None:
        """Refuse settings that cannot work, with the flag's name in the message."""
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"--async-scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.admin_key is not None and self.admin_key in self.api_keys:
            raise ValueError("--admin-key must differ from every --api-key")
        if any(not k for k in [*self.api_keys, *(k for k in (self.admin_key, self.metrics_key) if k is not None)]):
            raise ValueError("API and admin keys must not be empty")
        for name in ("max_gpu_adapters", "max_host_adapters", "max_rank", "max_body_bytes", "max_tokens_limit",
                     "max_n", "max_prompts", "max_queue", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")
        if self.max_rank > 1024:
            raise ValueError("--max-rank must be at most 1024")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("--gpu-memory-fraction must be in (0, 1]")
        for root in self.adapter_roots:
            if not Path(root).is_dir():
                raise ValueError(f"--adapter-root {root!r} is not a directory")
        for root in self.lora_resolve_roots:
            if not Path(root).is_dir():
                raise ValueError(f"--lora-resolve-root {root!r} is not a directory")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "fp32" and self.device == "cuda":
            check_fp32_on_cuda()
        base_names = {self.served_model_name, *self.served_model_aliases} - {None}
        for name in self.adapters:
            if name in base_names:
                raise ValueError(f"adapter {name!r} (--adapter or --lora-modules): the base model is served "
                                 f"under that name")
        if self.generation_config not in ("auto", "vllm") and not Path(self.generation_config).is_dir():
            raise ValueError(f"--generation-config must be auto, vllm or a directory, got {self.generation_config!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together")
        for flag_name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
            path = getattr(self, flag_name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{flag_name.replace('_', '-')} {path!r} is not a file")
        if self.enable_ssl_refresh and self.ssl_certfile is None:
            raise ValueError("--enable-ssl-refresh needs --ssl-certfile and --ssl-keyfile")


AUTO_RANK, AUTO_ADAPTERS_GPU, AUTO_ADAPTERS_HOST = 16, 8, 32


def auto_adapter_bytes(model) -> int:
    """Bytes of a rank-AUTO_RANK adapter on every linear of `model` (the adapter memory defaults' unit)."""
    from ..kernels.lora_pool import full_adapter_pages, page_width_for

    projections = [p for _, p in model.lora_projections()]
    return full_adapter_pages(projections, AUTO_RANK) * page_width_for(projections) * model.dtype.itemsize


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """A size: bytes, or a number with K, M, G or T (powers of 1024; "GiB", "GB" and "G" alike)."""
    value = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 512MiB, 8GiB)") from None
    if not number > 0 or number * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return int(number * _UNITS[unit])


def check_fp32_on_cuda() -> None:
    """fp32 activations on CUDA: the NF4 matmul kernels take bf16/fp16 only (the attention, fused
    and LoRA kernels would take fp32); the PyTorch references (LORAPLEX_KERNELS=reference) take any."""
    from ..kernels import runtime

    if not runtime.references_forced():
        raise ValueError("--dtype float32 (fp32) cannot run on CUDA: the NF4 matmul kernels take bfloat16 or "
                         "float16 activations; pass --dtype bfloat16 (or float16), or run the slow PyTorch "
                         "references with LORAPLEX_KERNELS=reference")


def _var(name: str) -> str:
    """The environment variable of flag `name`: max-gpu-adapters -> LORAPLEX_MAX_GPU_ADAPTERS."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def _env(name: str) -> str | None:
    value = os.environ.get(_var(name))
    return value or None  # set but empty (e.g. passed through by compose) = not set


def _parse_bool(value: str | None, default: bool) -> bool:
    """A boolean variable's text: 1/true/yes or 0/false/no (anything else is refused); unset = `default`."""
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError("expected 1, true, yes, 0, false or no")


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _lora_module(text: str) -> tuple[str, str, str | None] | None:
    """One value of vLLM's --lora-modules: NAME=PATH, or a JSON object with name, path and
    optionally base_model_name; (name, path, base_model_name). An empty value is skipped (None)."""
    value = text.strip()
    if not value:
        return None
    if not value.startswith("{"):
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(
                f'expected NAME=PATH or a JSON object {{"name": ..., "path": ..., "base_model_name": ...}}, '
                f"got {text!r}")
        return name, path, None
    module = _json_object(value)
    unknown = sorted(set(module) - {"name", "path", "base_model_name"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown field(s) {', '.join(unknown)} in {text!r}; the fields are "
                                         f"name, path and base_model_name")
    name, path, base = module.get("name"), module.get("path"), module.get("base_model_name")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise argparse.ArgumentTypeError(f'"name" and "path" must be non-empty strings in {text!r}')
    if base is not None and not isinstance(base, str):
        raise argparse.ArgumentTypeError(f'"base_model_name" must be a string in {text!r}')
    return name, path, base


def _parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e.msg} (at character {e.pos})") from None


def _json_object(text: str) -> dict:
    value = _parse_json(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _json_list(text: str) -> list:
    value = _parse_json(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


# -- vLLM's flags without an equivalent: (spellings, argparse options, help, judge) -------------
#
# judge(value) -> None (accepted, nothing to say: loraplex already behaves so), ("warn", why)
# (accepted; logged at startup) or ("refuse", why) (an error: the meaning cannot be honoured).
# They have no environment variables: they exist for vLLM command lines.

def _one(flag: str, what: str):
    return lambda v: None if v == 1 else ("refuse", f"{flag} {v}: {what}; loraplex runs on one GPU (only 1 is "
                                                    f"accepted)")


def _warn(why: str):
    return lambda v: ("warn", why)


def _allowed(flag: str, accepted: tuple, why: str):
    return lambda v: None if v in accepted else ("refuse", f"{flag} {v}: {why}")


def _quiet(v):
    return None


_ONE_GPU = "loraplex serves one model replica on one GPU"
VLLM_FLAGS = [
    (("--tensor-parallel-size", "-tp"), dict(type=int, metavar="N"), "tensor parallelism (1 only)",
     _one("--tensor-parallel-size", "tensor parallelism is not supported")),
    (("--pipeline-parallel-size", "-pp"), dict(type=int, metavar="N"), "pipeline parallelism (1 only)",
     _one("--pipeline-parallel-size", "pipeline parallelism is not supported")),
    (("--data-parallel-size", "-dp"), dict(type=int, metavar="N"), "data parallelism (1 only; run replicas)",
     _one("--data-parallel-size", "data parallelism is not supported; run one server per GPU")),
    (("--data-parallel-size-local", "-dpl"), dict(type=int, metavar="N"), "local data parallel ranks (1 only)",
     _one("--data-parallel-size-local", "data parallelism is not supported; run one server per GPU")),
    (("--data-parallel-address", "-dpa"), dict(metavar="ADDR"), "ignored (no data parallelism)",
     _warn("--data-parallel-address is ignored: no data parallelism")),
    (("--data-parallel-rpc-port", "-dpp"), dict(type=int, metavar="PORT"), "ignored (no data parallelism)",
     _warn("--data-parallel-rpc-port is ignored: no data parallelism")),
    (("--data-parallel-start-rank", "-dpr"), dict(type=int, metavar="N"), "0 only (no data parallelism)",
     _allowed("--data-parallel-start-rank", (0,), "no data parallelism: this server is rank 0")),
    (("--headless",), dict(action="store_true", default=None), "refused: this server always serves the API",
     lambda v: ("refuse", "--headless: loraplex has no API-less engine workers; it always serves the API")),
    (("--api-server-count", "-asc"), dict(type=int, metavar="N"), "API processes (one here)",
     lambda v: None if v == 1 else ("warn", f"--api-server-count {v}: one API server process serves (with the "
                                            f"engine in its own process)")),
    (("--enable-expert-parallel", "-ep"), dict(action="store_true", default=None), "ignored (dense Llama models)",
     _warn("--enable-expert-parallel is ignored: loraplex serves dense (Llama) models")),
    (("--kv-transfer-config",), dict(metavar="JSON"), "refused: no KV cache transfer or offloading",
     lambda v: ("refuse", "--kv-transfer-config: KV cache transfer (P/D disaggregation) and offloading are not "
                          "supported")),
    (("--trust-remote-code",), dict(action="store_true", default=None), "ignored: no model code is run",
     _warn("--trust-remote-code is ignored: loraplex runs no code from checkpoints (Llama architecture only)")),
    (("--download-dir",), dict(metavar="DIR"), "ignored: models are local directories",
     _warn("--download-dir is ignored: loraplex loads local model directories and downloads nothing")),
    (("--revision",), dict(metavar="REV"), "ignored: models are local directories",
     _warn("--revision is ignored: the model is a local directory")),
    (("--tokenizer-revision",), dict(metavar="REV"), "ignored: models are local directories",
     _warn("--tokenizer-revision is ignored: the tokenizer is the model directory's")),
    (("--tokenizer",), dict(metavar="DIR"), "the model directory only: its tokenizer is used",
     _quiet),  # compared with the model in config_from_args
    (("--seed",), dict(type=int, metavar="N"), "accepted: give requests a `seed` for reproducible sampling",
     _warn("--seed is accepted but has no effect: requests without their own `seed` are sampled from fresh "
           "randomness; a request's `seed` makes its sampling reproducible")),
    (("--disable-log-requests",), dict(action="store_true", default=None), "accepted: requests are not logged",
     _quiet),
    (("--enable-log-requests",), dict(action=argparse.BooleanOptionalAction, default=None),
     "accepted: requests are never logged",
     lambda v: None if not v else ("warn", "--enable-log-requests is ignored: loraplex does not log requests")),
    (("--disable-log-stats",), dict(action="store_true", default=None), "accepted: no periodic stats log (see "
                                                                        "/metrics)", _quiet),
    (("--enable-chunked-prefill",), dict(action=argparse.BooleanOptionalAction, default=None),
     "accepted: long prompts are always prefilled in chunks (--max-num-batched-tokens)",
     lambda v: None if v else ("warn", "--no-enable-chunked-prefill is ignored: long prompts are always "
                                       "prefilled in chunks of --max-num-batched-tokens (same outputs)")),
    (("--lora-dtype",), dict(metavar="DTYPE"), "auto only: adapters run in the activation dtype",
     lambda v: None if v == "auto" else ("warn", f"--lora-dtype {v} is ignored: adapter weights are held in the "
                                                 f"activation dtype (--dtype)")),
    (("--fully-sharded-loras",), dict(action="store_true", default=None), "ignored (one GPU)",
     _warn("--fully-sharded-loras is ignored: there is no tensor parallelism to shard over")),
    (("--max-logprobs",), dict(type=int, metavar="N"), "accepted: at most 20 logprobs per token",
     lambda v: None if v == 20 else ("warn", f"--max-logprobs {v} is ignored: requests may ask for at most 20 "
                                             f"logprobs per token")),
    (("--compilation-config", "-O"), dict(metavar="CONFIG"), "ignored: CUDA graphs follow --enforce-eager",
     _warn("--compilation-config is ignored: loraplex does not use torch.compile; CUDA graphs are on unless "
           "--enforce-eager")),
    (("--block-size",), dict(type=int, metavar="N"), "ignored: the KV cache's block size is the engine's",
     _warn("--block-size is ignored: the KV cache's block size is fixed by the engine")),
    (("--swap-space",), dict(type=float, metavar="GIB"), "ignored: sequences are not swapped to host memory",
     _warn("--swap-space is ignored: sequences are not swapped to host memory")),
    (("--kv-cache-dtype",), dict(metavar="DTYPE"), "auto only: the KV cache is in the activation dtype",
     _allowed("--kv-cache-dtype", ("auto",), "the KV cache is held in the activation dtype (--dtype); fp8 KV "
                                             "caches are not supported")),
    (("--quantization", "-q"), dict(metavar="METHOD"), "bitsandbytes only: weights are always NF4",
     _allowed("--quantization", ("bitsandbytes",), "loraplex serves NF4 weights (bitsandbytes format), "
                                                   "quantizing bf16/fp16/fp32 checkpoints while loading")),
    (("--load-format",), dict(metavar="FORMAT"), "auto or safetensors only",
     _allowed("--load-format", ("auto", "safetensors"), "checkpoints are read from safetensors files")),
    (("--limit-mm-per-prompt",), dict(metavar="JSON"), "ignored: text-only models",
     _warn("--limit-mm-per-prompt is ignored: loraplex serves text-only models")),
    (("--enable-auto-tool-choice",), dict(action="store_true", default=None), "refused: no tool-call parsing",
     lambda v: ("refuse", "--enable-auto-tool-choice: tool-call parsing is not supported")),
    (("--tool-call-parser",), dict(metavar="NAME"), "refused: no tool-call parsing",
     lambda v: ("refuse", f"--tool-call-parser {v}: tool-call parsing is not supported")),
    (("--reasoning-parser",), dict(metavar="NAME"), "refused: no reasoning parsing",
     lambda v: ("refuse", f"--reasoning-parser {v}: reasoning-content parsing is not supported")),
    (("--response-role",), dict(metavar="ROLE"), "assistant only",
     _allowed("--response-role", ("assistant",), "chat responses always have the role assistant")),
    (("--disable-fastapi-docs",), dict(action="store_true", default=None), "ignored: /docs stays",
     _warn("--disable-fastapi-docs is ignored: /docs, /redoc and /openapi.json stay available")),
    (("--disable-frontend-multiprocessing",), dict(action="store_true", default=None),
     "ignored: see --engine-in-process",
     _warn("--disable-frontend-multiprocessing is ignored: the engine runs in its own process unless "
           "--engine-in-process")),
]


def _vllm_dest(flags: tuple[str, ...]) -> str:
    return "vllm_" + flags[0].lstrip("-").replace("-", "_")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `loraplex serve`; defaults come from the environment, then ServerConfig."""
    d = ServerConfig()

    def from_env(name: str, parse):
        """parse(the variable's text); a value it refuses is a usage error naming the variable
        (exit 2, as a bad flag is), not a traceback."""
        try:
            return parse(_env(name))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            p.error(f"{_var(name)}={_env(name)!r}: {exc}")

    def flag(name: str, help: str, *, type=str, default=None, repeat: bool = False, sep: str = ",",
             aliases: tuple[str, ...] = (), nargs=None, **kw):
        env, var = _env(name), _var(name)
        also = f" (vLLM: {', '.join(aliases)})" if aliases else ""
        names = (f"--{name}", *aliases)
        dest = name.replace("-", "_")
        if repeat:
            value = from_env(name, lambda env: [type(v) for v in env.split(sep) if v] if env else [])
            listed = "os.pathsep" if sep == os.pathsep else "comma"
            action = "extend" if nargs else "append"
            p.add_argument(*names, dest=dest, type=type, action=action, default=None, nargs=nargs,
                           help=f"{help}{also} [repeatable; env {var}, {listed}-separated]", **kw)
            p.set_defaults(**{f"{dest}_env": value})
        else:
            value = from_env(name, lambda env: type(env) if env is not None else default)
            shown = "" if default is None else f"; default {default}"
            if nargs is not None:
                kw["nargs"] = nargs
            p.add_argument(*names, dest=dest, type=type, default=value, help=f"{help}{also} [env {var}{shown}]", **kw)

    def switch(name: str, help: str):
        """A boolean flag, off unless given or its variable is 1, true or yes."""
        p.add_argument(f"--{name}", action="store_true", default=(_env(name) or "").lower() in ("1", "true", "yes"),
                       help=f"{help} [env {_var(name)}=1]")

    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model directory given positionally, as in `vllm serve MODEL`: the same as --model "
                        "(both given and different is an error)")
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory (bf16/fp16/fp32 is quantized to NF4 while loading; a "
                        "bitsandbytes NF4 checkpoint loads as stored); without it the bundled demo model is "
                        "served with its adapters (upper, reverse, rot13), and its adapter directory is an "
                        f"adapter root [env {_var('model')}]")
    p.set_defaults(model_env=_env("model"))
    flag("adapter", "register an adapter at startup, NAME=PATH (a trusted path: no --adapter-root check)",
         type=_adapter_pair, repeat=True, metavar="NAME=PATH")
    p.add_argument("--lora-modules", dest="lora_modules", type=_lora_module, nargs="+", action="extend",
                   default=None, metavar="MODULE",
                   help="vLLM's startup adapters: NAME=PATH or a JSON object {\"name\": ..., \"path\": ..., "
                        "\"base_model_name\": ...}, several after one flag and repeatable (values add up; vLLM "
                        "keeps the last flag's); the same as --adapter NAME=PATH. A base_model_name that is not "
                        "a name of the served model is logged and ignored, as vLLM ignores it [no env of its own: "
                        f"{_var('adapter')}]")
    flag("host", "address to listen on (vLLM's default is every interface; loraplex's the loopback: pass "
                 "--host 0.0.0.0 in a container)", default=d.host)
    flag("port", "port to listen on", type=int, default=d.port)
    p.add_argument("--served-model-name", dest="served_model_name", nargs="+", default=None, metavar="NAME",
                   help="name(s) of the base model in the API's `model` field, as vLLM: the first is the name in "
                        "responses and /v1/models, the others are aliases accepted in requests (default: the "
                        "model directory's name, and as an alias the --model argument as given, vLLM's default "
                        "name, when it differs and is a relative path; loraplex-demo for the demo) "
                        f"[env {_var('served-model-name')}, comma-separated]")
    flag("dtype", "activation dtype; auto = bf16 on CUDA, fp32 on CPU (vLLM's auto is the checkpoint's dtype). "
                  "vLLM's names: half/float16 = fp16, bfloat16 = bf16, float/float32 = fp32. fp32 runs on CPU "
                  "only (the NF4 kernels take bf16/fp16), or on CUDA with LORAPLEX_KERNELS=reference",
         default=d.dtype, choices=list(DTYPES))
    flag("device", "where to run: auto (cuda when present), cuda or cpu", default=d.device)
    flag("kv-cache-tokens", "KV cache size in tokens (default: from --gpu-memory-fraction on CUDA)", type=int)
    flag("gpu-memory-fraction", "share of GPU memory for weights, adapters and KV cache", type=float,
         default=d.gpu_memory_fraction, aliases=("--gpu-memory-utilization",))
    flag("max-model-len", "longest prompt + generation in tokens (default: the model's)", type=int)
    flag("max-num-seqs", "sequences decoded together at most", type=int, default=d.max_num_seqs)
    flag("max-num-batched-tokens", "tokens one engine step runs at most (decodes plus prompt chunks; longer "
                                   "prompts are prefilled in chunks); at least --max-num-seqs", type=int,
         default=d.max_num_batched_tokens)
    switch("enforce-eager", "run every step eagerly, without CUDA graphs (slower decoding; to debug, or to "
                            "compare with the graphs)")
    flag("async-scheduling", "keep one engine step in flight: the host schedules step N+1 and "
                             "postprocesses step N while the GPU runs; same outputs, faster decoding. "
                             "auto = on for CUDA, off on CPU (where it only adds a step of latency); a "
                             "bare --async-scheduling means on", default=d.async_scheduling,
         choices=["auto", "on", "off"], nargs="?", const="on")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=from_env("enable-prefix-caching", lambda env: _parse_bool(env, d.enable_prefix_caching)),
                   help="reuse the KV cache blocks of prompt prefixes already computed (system prompts, few-shot "
                        "headers, earlier chat turns): only between requests on the same adapter version, or "
                        "between base-model requests; the same outputs, less prefill. On by default, as in vLLM "
                        f"[env {_var('enable-prefix-caching')}=1|0; default on]")
    switch("engine-in-process", "run the engine on a thread of the API server's process instead of its own "
                                "process (they then share one GIL: slower serving; for debugging)")
    flag("max-gpu-adapters", "most adapters resident on the GPU at once (slot records, a few hundred bytes "
                             "each; --max-gpu-adapter-memory is what usually binds)", type=int,
         default=d.max_gpu_adapters, aliases=("--max-loras",))
    flag("max-gpu-adapter-memory", "GPU memory for adapter weights, in pages of real ranks on the linears each "
                                   "adapter targets: a rank-8 q/v adapter costs what it weighs. A size: bytes or "
                                   "K/M/G suffixes (powers of 1024). Default: what 8 adapters of rank 16 on "
                                   "every linear take", type=parse_bytes, default=None, metavar="SIZE")
    flag("max-host-adapters", "most adapters kept in pinned host memory; the rest stay on disk", type=int,
         default=d.max_host_adapters, aliases=("--max-cpu-loras",))
    flag("max-host-adapter-memory", "pinned host memory for adapter copies (same format as on the GPU, so a "
                                    "page-in is one or a few copies). Default: what 32 adapters of rank 16 on "
                                    "every linear take", type=parse_bytes, default=None, metavar="SIZE")
    flag("max-rank", "largest LoRA rank accepted, any rank up to it with no restart (costs only the kernels' "
                     "scratch, not adapter memory); at most 1024", type=int, default=d.max_rank,
         aliases=("--max-lora-rank",))
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's switch, accepted with no effect: adapters are always served (--no-enable-lora "
                        "is refused) [no env: nothing to set]")
    flag("adapter-root", "directory adapters may be registered or exported under, after resolving "
                         "symlinks; none = registering by path over the API is refused",
         repeat=True, sep=os.pathsep, metavar="DIR")
    flag("lora-resolve-root", "directory whose adapter directories are loaded on their first request: a "
                              "request for model NAME (or ORG/NAME) that no adapter has registers DIR/NAME if "
                              "it is an adapter directory (links must stay inside DIR), as vLLM's "
                              "lora_filesystem_resolver; also VLLM_LORA_RESOLVER_CACHE_DIR when "
                              "VLLM_ALLOW_RUNTIME_LORA_UPDATING is true and VLLM_PLUGINS is unset or names "
                              "lora_filesystem_resolver, as vLLM", repeat=True, sep=os.pathsep, metavar="DIR")
    flag("api-key", "key(s) required on /v1/* as 'Authorization: Bearer KEY'; none = /v1/* is open (vLLM's "
                    "VLLM_API_KEY is read when neither is set)", repeat=True, metavar="KEY", nargs="+")
    flag("admin-key", "key required on admin routes, distinct from the API keys. With it, every admin route "
                      "(/admin/*, and vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter) takes only "
                      "this key, whatever VLLM_ALLOW_RUNTIME_LORA_UPDATING says. Without it: /admin/* answers "
                      "403 (unless --allow-unauthenticated-admin); vLLM's two routes follow "
                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING as in vLLM: true (1, true) = they take an API key "
                      "(open when there are no API keys), false (0, false) = 404 (not served), unset = as "
                      "/admin/*", metavar="KEY")
    flag("metrics-key", "key required on /metrics ('Authorization: Bearer KEY'; the admin key works too); "
                        "none = /metrics is open, as Prometheus scrapes expect, and it names every adapter",
         metavar="KEY")
    switch("allow-unauthenticated-admin", "without --admin-key, leave admin routes open instead of answering "
                                          "403, only on a trusted network")
    flag("cors-origin", "allowed CORS origin ('*' for any); none = no CORS headers (vLLM: --allowed-origins "
                        "'[\"...\"]')", repeat=True, metavar="ORIGIN")
    p.add_argument("--allowed-origins", dest="allowed_origins", type=_json_list, default=None, metavar="JSON",
                   help="vLLM's CORS origins, a JSON list: the same as --cors-origin for each (vLLM's default is "
                        f"every origin; loraplex's none) [no env of its own: {_var('cors-origin')}]")
    flag("chat-template", "chat template replacing the tokenizer's: a file, or the Jinja template itself (as "
                          "vLLM: a value with no {, } or newline must be a readable file)", metavar="FILE|TEMPLATE")
    flag("generation-config", "request defaults from the model: auto = its generation_config.json's temperature, "
                              "top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) apply "
                              "when a request sets none, as vLLM; vllm = none (the API's own defaults); or a "
                              "directory to read generation_config.json from", default=d.generation_config,
         metavar="auto|vllm|DIR")
    flag("override-generation-config", "JSON object over the generation config's values, e.g. "
                                       "'{\"temperature\": 0.5}' (vLLM's names)", type=_json_object,
         metavar="JSON")
    flag("max-body-bytes", "largest request body accepted (413 beyond)", type=int, default=d.max_body_bytes)
    flag("max-prompt-tokens", "longest prompt accepted (default: the context length)", type=int)
    flag("max-tokens-limit", "largest max_tokens accepted", type=int, default=d.max_tokens_limit)
    flag("max-n", "largest n (choices per prompt) accepted", type=int, default=d.max_n)
    flag("max-prompts", "most prompts in one /v1/completions request (each prompt x n is one engine "
                        "request, and all of them count against --max-queue)", type=int, default=d.max_prompts)
    flag("max-queue", "engine requests (prompts x n of each API request) waiting at most; beyond, 429",
         type=int, default=d.max_queue)
    flag("shutdown-timeout", "seconds running requests get to finish after SIGTERM before they are aborted",
         type=float, default=d.shutdown_timeout)
    flag("log-level", "logging level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    flag("uvicorn-log-level", "uvicorn's logging level (default: --log-level)",
         choices=["debug", "info", "warning", "error", "critical", "trace"])
    switch("disable-uvicorn-access-log", "no access log line per request")
    flag("disable-access-log-for-endpoints", "comma-separated paths whose requests get no access log line, "
                                             "e.g. /health,/metrics,/ping", metavar="PATHS")
    flag("ssl-keyfile", "TLS private key file: serve HTTPS (with --ssl-certfile)", metavar="FILE")
    flag("ssl-certfile", "TLS certificate (chain) file", metavar="FILE")
    flag("ssl-ca-certs", "CA certificates file for client certificates", metavar="FILE")
    flag("ssl-cert-reqs", "client certificates: 0 = not asked, 1 = optional, 2 = required (ssl.CERT_*)",
         type=int, default=d.ssl_cert_reqs, choices=[0, 1, 2])
    switch("enable-ssl-refresh", "reload the TLS key and certificates when their files change (cert-manager "
                                 "rotations), for new connections")

    g = p.add_argument_group("vLLM flags without an equivalent",
                             "Accepted so that `vllm serve` command lines start unchanged: quietly where loraplex "
                             "already behaves so, with a logged warning where they have no effect here; refused "
                             "with the reason where their meaning cannot be honoured. No environment variables.")
    for flags, options, help, _ in VLLM_FLAGS:
        g.add_argument(*flags, dest=_vllm_dest(flags), help=help, **{"default": None, **options})


def _served_names(args: argparse.Namespace, model: str | None) -> list[str]:
    names = args.served_model_name
    if names is None:
        env = _env("served-model-name")
        names = [n.strip() for n in env.split(",") if n.strip()] if env else []
    if not names and model and Path(model).name != model and not os.path.isabs(model):
        # vLLM's default name is the --model argument as given (Qwen/Qwen3-8B): accepted as an alias of
        # the directory's name; not an absolute path, which would show the server's file system
        names = [Path(model).name, model]
    out: list[str] = []
    for name in names:
        if name not in out:
            out.append(name)
    return out


def _runtime_lora_updating(notes: list[str]) -> bool | None:
    value = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if value not in ("1", "true", "0", "false"):
        notes.append(f"VLLM_ALLOW_RUNTIME_LORA_UPDATING={value!r} is read as false, as vLLM reads anything but "
                     f"1 or true")
    return value in ("1", "true")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    def listed(name: str) -> list:
        given = getattr(args, name)
        return given if given is not None else getattr(args, f"{name}_env")

    notes: list[str] = []
    errors: list[str] = []
    for flags, _, _, judge in VLLM_FLAGS:
        value = getattr(args, _vllm_dest(flags), None)
        if value is None:
            continue
        verdict = judge(value)
        if verdict is not None:
            (errors if verdict[0] == "refuse" else notes).append(verdict[1])
    if args.enable_lora is False:
        errors.append("--no-enable-lora: loraplex always serves adapters; leave the flag out")
    if errors:
        raise ValueError("; ".join(errors))

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(f"the model is given twice, differently: {args.model_tag!r} (positional) and "
                         f"--model {args.model!r}")
    model = args.model_tag or args.model or args.model_env
    if args.vllm_tokenizer is not None and (model is None or
                                            os.path.realpath(args.vllm_tokenizer) != os.path.realpath(model)):
        raise ValueError(f"--tokenizer {args.vllm_tokenizer!r}: only the model directory's own tokenizer is used "
                         f"(leave the flag out, or give the model directory)")
    names = _served_names(args, model)

    adapters = dict(listed("adapter"))
    base_names = set(names) or {Path(model).name if model else "loraplex-demo"}
    for module in args.lora_modules or []:
        if module is None:
            continue
        name, path, base = module
        if adapters.get(name, path) != path:
            raise ValueError(f"adapter {name!r} is given twice with different paths ({adapters[name]!r} and {path!r})")
        adapters[name] = path
        if base is not None and base not in base_names:
            notes.append(f"--lora-modules {name}: base_model_name {base!r} is not a name of the served model "
                         f"({', '.join(sorted(base_names))}); ignored, as vLLM ignores it")

    runtime_updating = _runtime_lora_updating(notes)
    resolve_roots = listed("lora_resolve_root")
    vllm_cache = os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR")
    plugins = os.environ.get("VLLM_PLUGINS")
    if vllm_cache and runtime_updating and (plugins is None or "lora_filesystem_resolver" in plugins.split(",")):
        if vllm_cache not in resolve_roots:
            resolve_roots = [*resolve_roots, vllm_cache]

    api_keys = listed("api_key")
    if not api_keys and os.environ.get("VLLM_API_KEY"):
        api_keys = [os.environ["VLLM_API_KEY"]]
    cors = listed("cors_origin")
    if args.allowed_origins is not None:
        cors = [*cors, *(o for o in args.allowed_origins if o not in cors)]
    skip = [s.strip() for s in (args.disable_access_log_for_endpoints or "").split(",") if s.strip()]

    config = ServerConfig(
        model=model, adapters=adapters, host=args.host, port=args.port,
        served_model_name=names[0] if names else None, served_model_aliases=names[1:],
        dtype=DTYPES.get(args.dtype, args.dtype), device=args.device,
        kv_cache_tokens=args.kv_cache_tokens, gpu_memory_fraction=args.gpu_memory_fraction,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        engine_process=not args.engine_in_process,
        max_gpu_adapters=args.max_gpu_adapters,
        max_host_adapters=args.max_host_adapters, max_rank=args.max_rank,
        max_gpu_adapter_memory=args.max_gpu_adapter_memory, max_host_adapter_memory=args.max_host_adapter_memory,
        adapter_roots=listed("adapter_root"),
        lora_resolve_roots=resolve_roots,
        chat_template=load_chat_template(args.chat_template),
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config or {},
        runtime_lora_updating=runtime_updating,
        enable_prefix_caching=args.enable_prefix_caching,
        api_keys=api_keys, admin_key=args.admin_key, metrics_key=args.metrics_key,
        allow_unauthenticated_admin=args.allow_unauthenticated_admin, cors_origins=cors,
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_prompts=args.max_prompts,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
        uvicorn_log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
        access_log_skip=skip, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
        enable_ssl_refresh=args.enable_ssl_refresh, notes=notes,
    )
    config.check()
    return config


def normalize_vllm_argv(argv: list[str]) -> list[str]:
    """vLLM's parser takes `--max_model_len` for `--max-model-len`: the same here (the flag's name
    only, not its value after '=')."""
    out = []
    for arg in argv:
        if arg == "--":
            out.extend(argv[len(out):])
            break
        if arg.startswith("--") and "_" in arg.partition("=")[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def load_chat_template(value: str | None) -> str | None:
    """--chat-template as vLLM reads it: a file's text, or else the value itself as a Jinja template
    (with its backslash escapes decoded); a value with no {, } or newline must be a readable file.
    The template is parsed here, so that a broken one stops the server at startup."""
    if value is None:
        return None
    template = None
    try:
        if Path(value).is_file():
            template = Path(value).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--chat-template {value!r}: the file is not UTF-8 text") from None
    except (OSError, ValueError):  # a name too long for a path, a NUL: the template itself
        pass
    if template is None:
        if not any(c in value for c in "{}\n"):
            raise ValueError(f"--chat-template {value!r} looks like a file path, but no such file can be read")
        template = value
        if "\\" in value:
            try:
                template = codecs.decode(value, "unicode_escape")
            except (UnicodeError, ValueError):
                template = value
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not a valid Jinja template: line {e.lineno}: {e.message}") from None
    return template


def load_generation_defaults(config: ServerConfig, model_dir: Path) -> dict:
    """The request defaults --generation-config gives (vLLM's keys, `max_new_tokens` as
    `max_tokens`): only the values the file sets that differ from the neutral ones (temperature 1,
    top_p 1, top_k 0 or -1, min_p 0, repetition_penalty 1), then --override-generation-config."""
    values: dict = {}
    if config.generation_config != "vllm":
        directory = model_dir if config.generation_config == "auto" else Path(config.generation_config)
        path = directory / "generation_config.json"
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if config.generation_config != "auto":
                raise ValueError(f"--generation-config {config.generation_config!r}: no generation_config.json "
                                 f"there") from None
        except (OSError, ValueError) as e:
            if config.generation_config != "auto":
                raise ValueError(f"--generation-config: {path.name} cannot be read: {e}") from None
            log.warning("generation_config.json of the model cannot be read (%s); no request defaults from it", e)
        if not isinstance(values, dict):
            values = {}
    values = {**values, **config.override_generation_config}
    defaults = {}
    for key, (field_name, neutral) in GENERATION_KEYS.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (field_name in ("top_k", "max_tokens") and value != int(value)):
            log.warning("generation config: %s = %r is not a number; ignored", key, value)
            continue
        if value == neutral or (isinstance(neutral, tuple) and value in neutral):
            continue
        defaults[field_name] = int(value) if field_name in ("top_k", "max_tokens") else float(value)
    if defaults:
        log.info("request defaults from the generation config: %s", defaults)
    return defaults
