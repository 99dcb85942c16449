"""`loraplex serve` settings: one dataclass, filled from flags or `LORAPLEX_*` environment variables.

Every flag has an environment variable named after it (`--max-gpu-adapters` ->
`LORAPLEX_MAX_GPU_ADAPTERS`); a flag given on the command line wins. Repeatable flags take
a comma-separated list in the environment (`LORAPLEX_API_KEY=k1,k2`; adapter roots are
separated by `os.pathsep`). Secrets are better passed by environment than by flag: command
lines show up in `ps`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "LORAPLEX_"


@dataclass
class ServerConfig:
    model: str | None = None                     # None = the bundled demo model
    adapters: dict[str, str] = field(default_factory=dict)  # registered at startup (trusted paths)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None         # None = the model directory's name
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
    max_gpu_adapters: int = 8
    max_host_adapters: int = 32
    max_rank: int = 16
    adapter_roots: list[str] = field(default_factory=list)
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
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("--gpu-memory-fraction must be in (0, 1]")
        for root in self.adapter_roots:
            if not Path(root).is_dir():
                raise ValueError(f"--adapter-root {root!r} is not a directory")


def _var(name: str) -> str:
    """The environment variable of flag `name`: max-gpu-adapters -> LORAPLEX_MAX_GPU_ADAPTERS."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def _env(name: str) -> str | None:
    value = os.environ.get(_var(name))
    return value or None  # set but empty (e.g. passed through by compose) = not set


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `loraplex serve`; defaults come from the environment, then ServerConfig."""
    d = ServerConfig()

    def flag(name: str, help: str, *, type=str, default=None, repeat: bool = False, sep: str = ",", **kw):
        env, var = _env(name), _var(name)
        if repeat:
            value = [type(v) for v in env.split(sep) if v] if env else []
            listed = "os.pathsep" if sep == os.pathsep else "comma"
            p.add_argument(f"--{name}", type=type, action="append", default=None,
                           help=f"{help} [repeatable; env {var}, {listed}-separated]", **kw)
            p.set_defaults(**{f"{name.replace('-', '_')}_env": value})
        else:
            value = type(env) if env is not None else default
            shown = "" if default is None else f"; default {default}"
            p.add_argument(f"--{name}", type=type, default=value, help=f"{help} [env {var}{shown}]", **kw)

    def switch(name: str, help: str):
        """A boolean flag, off unless given or its variable is 1, true or yes."""
        p.add_argument(f"--{name}", action="store_true", default=(_env(name) or "").lower() in ("1", "true", "yes"),
                       help=f"{help} [env {_var(name)}=1]")

    flag("model", "Hugging Face model directory (bf16/fp16/fp32 is quantized to NF4 while loading; a "
                  "bitsandbytes NF4 checkpoint loads as stored); without it the bundled demo model is served "
                  "with its adapters (upper, reverse, rot13), and its adapter directory is an adapter root")
    flag("adapter", "register an adapter at startup, NAME=PATH (a trusted path: no --adapter-root check)",
         type=_adapter_pair, repeat=True, metavar="NAME=PATH")
    flag("host", "address to listen on", default=d.host)
    flag("port", "port to listen on", type=int, default=d.port)
    flag("served-model-name", "name of the base model in the API's `model` field (default: the model "
                              "directory's name; loraplex-demo for the demo)")
    flag("dtype", "activation dtype; auto = bf16 on CUDA, fp32 on CPU", default=d.dtype,
         choices=["auto", "bf16", "fp16", "fp32"])
    flag("device", "where to run: auto (cuda when present), cuda or cpu", default=d.device)
    flag("kv-cache-tokens", "KV cache size in tokens (default: from --gpu-memory-fraction on CUDA)", type=int)
    flag("gpu-memory-fraction", "share of GPU memory for weights, adapters and KV cache", type=float,
         default=d.gpu_memory_fraction)
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
    switch("engine-in-process", "run the engine on a thread of the API server's process instead of its own "
                                "process (they then share one GIL: slower serving; for debugging)")
    flag("max-gpu-adapters", "adapters resident on the GPU at once (pre-allocated slots)", type=int,
         default=d.max_gpu_adapters)
    flag("max-host-adapters", "adapters kept in pinned host memory; the rest stay on disk", type=int,
         default=d.max_host_adapters)
    flag("max-rank", "largest LoRA rank accepted (slot capacity)", type=int, default=d.max_rank)
    flag("adapter-root", "directory adapters may be registered or exported under, after resolving "
                         "symlinks; none = registering by path over the API is refused",
         repeat=True, sep=os.pathsep, metavar="DIR")
    flag("api-key", "key required on /v1/* as 'Authorization: Bearer KEY'; none = /v1/* is open",
         repeat=True, metavar="KEY")
    flag("admin-key", "key required on admin routes, distinct from the API keys", metavar="KEY")
    flag("metrics-key", "key required on /metrics ('Authorization: Bearer KEY'; the admin key works too); "
                        "none = /metrics is open, as Prometheus scrapes expect, and it names every adapter",
         metavar="KEY")
    switch("allow-unauthenticated-admin", "without --admin-key, leave admin routes open instead of answering "
                                          "403, only on a trusted network")
    flag("cors-origin", "allowed CORS origin ('*' for any); none = no CORS headers", repeat=True, metavar="ORIGIN")
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    def listed(name: str) -> list:
        given = getattr(args, name)
        return given if given is not None else getattr(args, f"{name}_env")

    config = ServerConfig(
        model=args.model, adapters=dict(listed("adapter")), host=args.host, port=args.port,
        served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        kv_cache_tokens=args.kv_cache_tokens, gpu_memory_fraction=args.gpu_memory_fraction,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        engine_process=not args.engine_in_process,
        max_gpu_adapters=args.max_gpu_adapters,
        max_host_adapters=args.max_host_adapters, max_rank=args.max_rank, adapter_roots=listed("adapter_root"),
        api_keys=listed("api_key"), admin_key=args.admin_key, metrics_key=args.metrics_key,
        allow_unauthenticated_admin=args.allow_unauthenticated_admin, cors_origins=listed("cors_origin"),
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_prompts=args.max_prompts,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
    )
    config.check()
    return config
