"""What the server runs on: the model, the adapter registry, the engine and the metrics.

`ServerState.start()` loads everything in the background (the model with a progress bar, the
startup adapters, a warm-up generation through every kernel), so `/health` answers at once
and `/ready` turns 200 only when the model can serve.

By default the engine runs in its own process (`engine_process.py`: `async_engine` is then an
EngineClient and `registry` a RegistryClient, and `engine` is None); with
`engine_process=False` (`--engine-in-process`) it runs on a thread of this process
(`AsyncEngine`), which tests use to reach into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import torch

from ..adapters.peft_format import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, BaseModelSpec
from ..adapters.registry import AdapterRegistry, RegistryConfig
from ..adapters.safe_files import OutsideRootsError, check_files_inside, resolve_inside
from ..demo import ADAPTERS_DIR, MODEL_DIR, adapter_paths
from ..engine.async_engine import AsyncEngine
from ..engine.engine import Engine, EngineConfig
from ..engine.fast_tokenizer import encoder, releasing_encoder
from ..engine.grammar import GrammarCompiler
from ..kernels import runtime
from ..model.loader import load_model
from .config import ServerConfig, load_generation_defaults
from .metrics import ServerMetrics, Snapshot

log = logging.getLogger("loraplex.server")

DEMO_NAME = "loraplex-demo"


class AdapterPathError(PermissionError):
    """A path a client gave lies outside the adapter roots; the message echoes only that path.
    (A PermissionError from the OS names server paths and is not shown to clients.)"""


def demo_model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no --model given and the bundled demo model is missing ({MODEL_DIR}; "
                                f"`python scripts/make_demo.py` makes it); pass --model DIR")
    return MODEL_DIR


def build_engine(config: ServerConfig, on_adapter_event=None):
    """Load the model, register the startup adapters, build and warm up the engine: the
    (tokenizer, registry, engine, model name) a server runs on, in whichever process."""
    c = config
    model_dir = Path(c.model) if c.model else demo_model_dir()
    model_name = c.served_model_name or (DEMO_NAME if not c.model else model_dir.name)
    device = c.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = c.dtype if c.dtype != "auto" else "bf16" if device == "cuda" else "fp32"
    if dtype == "fp32" and runtime.use_triton(torch.device(device)):
        # the NF4 matmul kernels take bf16/fp16 activations (the PyTorch references take fp32)
        raise ValueError(f"--dtype float32 (fp32) cannot run on {device} with the Triton kernels: the NF4 matmul "
                         f"kernels take bfloat16 or float16 activations; pass --dtype bfloat16 (or float16), or "
                         f"run the slow PyTorch references with LORAPLEX_KERNELS=reference")
    log.info("loading %s on %s (%s)", model_dir, device, dtype)
    loaded = load_model(model_dir, dtype=dtype, device=device, progress=True)
    registry = AdapterRegistry(
        loaded.model, BaseModelSpec.from_hf_config(loaded.hf_config),
        RegistryConfig(gpu_slots=c.max_gpu_adapters, host_slots=c.max_host_adapters, max_rank=c.max_rank,
                       gpu_bytes=c.gpu_adapter_bytes(loaded.model), host_bytes=c.host_adapter_bytes(loaded.model)),
        on_event=on_adapter_event)
    for name, path in c.adapters.items():
        if name == model_name:
            raise ValueError(f"--adapter {name}: the base model is served under that name")
        registry.register(name, path)
    engine = Engine(loaded.model, loaded.tokenizer, registry,
                    EngineConfig(max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens,
                                 kv_cache_tokens=c.kv_cache_tokens, memory_fraction=c.gpu_memory_fraction,
                                 max_model_len=c.max_model_len, enable_prefix_caching=c.enable_prefix_caching,
                                 async_scheduling={"auto": None, "on": True, "off": False}[
                                     c.async_scheduling],
                                 **({"cuda_graph_max_batch": 0} if c.enforce_eager else {})),
                    eos_token_ids=eos_token_ids(model_dir, loaded.tokenizer))
    engine.warm_up(list(c.adapters))
    return loaded.tokenizer, registry, engine, model_name


def take_snapshot(engine: Engine, registry: AdapterRegistry, async_engine: AsyncEngine) -> Snapshot:
    """The gauges' values, read where the engine runs."""
    usage = registry.usage()
    running, waiting = registry.resident_and_waiting()
    held = [(a.name, tier, nbytes) for a in registry.list() if a.state != "loading"
            for tier, nbytes in (("gpu", a.gpu_bytes), ("host", a.host_bytes)) if nbytes]
    return Snapshot(len(engine.scheduler.running), len(engine.scheduler.waiting), engine.allocator.usage(),
                    {t: usage[f"tier_{t}"] for t in ("gpu", "host", "disk")}, running, waiting,
                    usage["capacity"], engine_healthy=async_engine.health is None,
                    engine_step_failures=async_engine.step_failures, block_size=engine.allocator.block_size,
                    num_gpu_blocks=engine.allocator.num_blocks - 1, prefix_caching=engine.prefix_cache is not None,
                    gpu_slots=registry.num_slots,
                    adapter_memory={"gpu": (usage["gpu_bytes_used"], usage["gpu_bytes"]),
                                    "host": (usage["host_bytes_used"], usage["host_bytes"])},
                    adapter_pages=(usage["gpu_pages_used"], usage["gpu_pages"]), adapter_bytes=held)


def idle_snapshot(slots: int, healthy: bool = True, step_failures: int = 0) -> Snapshot:
    """The gauges while no engine answers (loading, or its process is gone): nothing running."""
    return Snapshot(0, 0, 0.0, {"gpu": 0, "host": 0, "disk": 0}, [], [], slots, engine_healthy=healthy,
                    engine_step_failures=step_failures)


def eos_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (Llama 3 lists several, e.g. <|eot_id|>) and the tokenizer."""
    from transformers import GenerationConfig

    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    except OSError:  # no generation_config.json
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class ServerState:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.demo = not config.model
        if self.demo:  # the bundled demo: its adapters come along and may be registered again
            config.adapters = {**{name: str(p) for name, p in adapter_paths().items()}, **config.adapters}
            config.adapter_roots = config.adapter_roots or [str(ADAPTERS_DIR)]
        self.model_dir = Path(config.model) if config.model else None
        self.model_name = config.served_model_name or (DEMO_NAME if self.demo else None)
        self.engine: Engine | None = None
        self.async_engine: AsyncEngine | None = None
        self.registry: AdapterRegistry | None = None
        self.tokenizer = None
        self.encode = self.encode_template = None  # text -> ids, set with the tokenizer
        self.max_model_len = 0
        self.vocab_size = 0
        # request defaults from the model's generation config (--generation-config), set by _load:
        # among temperature, top_p, top_k, min_p, repetition_penalty, max_tokens
        self.generation_defaults: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grammars = None                 # grammar_compiler(), on first use
        self.ready = threading.Event()
        self.draining = False
        self.active_jobs = 0                  # engine requests the API is waiting on (openai_api.run_jobs)
        self.held = 0                         # queue places of requests admitted, not yet sent (openai_api.Room)
        self.started_at = time.time()
        self.failed: str | None = None        # why startup failed, if it did
        self.adapter_roots = [Path(r).resolve() for r in config.adapter_roots]
        self.metrics = ServerMetrics(self.snapshot, self.model_name or "loraplex")
        self._thread: threading.Thread | None = None

    # -- startup / shutdown ---------------------------------------------------------------

    def start(self, background: bool = True) -> None:
        """Load in the background (from the app's startup: the engine process's outputs are
        read on the running event loop), or here and now."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        if self.config.engine_process and self._loop is None:
            raise RuntimeError("the engine process needs a running event loop: start the server from the app "
                               "(create_app), or set engine_process=False")
        if background:
            self._thread = threading.Thread(target=self._load_logged, name="loraplex-startup", daemon=True)
            self._thread.start()
        else:
            self._load()

    def _load_logged(self) -> None:
        try:
            self._load()
        except Exception as exc:
            from .engine_process import EngineStartupError

            # /ready and 503s show this to anyone: the kind of failure, not its text (paths);
            # the engine process's own failure says its kind already
            self.failed = str(exc) if isinstance(exc, EngineStartupError) else \
                f"startup failed ({type(exc).__name__}); see the server log"
            log.exception("startup failed; the server stays up, not ready")

    def _load(self) -> None:
        started = time.monotonic()
        model_dir = self.model_dir or demo_model_dir()
        self.model_name = self.model_name or model_dir.name
        self.metrics.model_name = self.model_name
        self.generation_defaults = load_generation_defaults(self.config, model_dir)
        if self.config.engine_process:
            self._load_process(model_dir)
        else:
            tokenizer, registry, engine, _ = build_engine(self.config, self.metrics.on_adapter_event)
            engine.on_step = self.metrics.observe_step
            self.registry, self.engine = registry, engine
            self._set_tokenizer(tokenizer)
            self.max_model_len, self.vocab_size = engine.max_model_len, engine.model.config.vocab_size
            self.async_engine = AsyncEngine(engine).start()
        self.grammar_compiler().ll_tokenizer  # built now, not on the first structured-output request
        if self.draining:  # shut down while loading: stop what was just started, never turn ready
            self.async_engine.shutdown()
            return
        self.ready.set()
        log.info("ready: %s with %d adapters in %.1f s", self.model_name, len(self.config.adapters),
                 time.monotonic() - started)

    def _set_tokenizer(self, tokenizer) -> None:
        if self.config.chat_template is not None:  # --chat-template replaces the tokenizer's
            tokenizer.chat_template = self.config.chat_template
        self.tokenizer = tokenizer
        self.encode = encoder(tokenizer)                                     # prompts
        self.encode_template = encoder(tokenizer, add_special_tokens=False)  # rendered chat templates
        # the same, releasing the GIL: for long texts, on a worker thread (`openai_api.encode`)
        self.encode_releasing = releasing_encoder(tokenizer)
        self.encode_template_releasing = releasing_encoder(tokenizer, add_special_tokens=False)
        # No token is longer than this in characters (a byte-level entry's length is its bytes):
        # a text over limit x this many characters cannot fit and is refused before tokenizing.
        self.longest_token_chars = max(map(len, tokenizer.get_vocab()), default=1)

    def _load_process(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        from .engine_process import EngineClient, EngineStartupError, RegistryClient

        if self._loop is None:
            raise RuntimeError("the engine process needs the server's event loop: call start() from it")
        self._set_tokenizer(AutoTokenizer.from_pretrained(model_dir))  # here too: prompts in, text out
        client = EngineClient(self.config, self.metrics, self._loop, reference_kernels=runtime.references_forced())
        client.tokenizer = self.tokenizer
        self.async_engine = client
        try:
            info = client.wait_ready()
        except EngineStartupError:
            client.shutdown(5)
            raise
        self.registry = RegistryClient(client)
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]

    async def drain(self, timeout: float) -> None:
        """SIGTERM's first part (new work already gets 503): wait up to `timeout` seconds for
        the running requests; then end those left with finish reason abort, so that each
        response still closes properly (a stream with its last chunk and [DONE])."""
        deadline = time.monotonic() + timeout
        while self.active_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active_jobs and self.async_engine is not None and self.async_engine.running:
            log.warning("shutdown: %d requests still running after %gs; aborting them", self.active_jobs, timeout)
            self.async_engine.abort_all()
            deadline = time.monotonic() + 10  # their last outputs, through to the clients
            while self.active_jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.02)

    def shutdown(self) -> None:
        self.draining = True
        if self.async_engine is not None:
            self.async_engine.shutdown()
        if self.registry is not None:
            self.registry.close()

    # -- queries --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        registry, async_engine = self.registry, self.async_engine
        if registry is None or async_engine is None or not self.ready.is_set():
            return idle_snapshot(self.config.max_gpu_adapters)
        if self.engine is None:  # the engine's own process reads it
            if not async_engine.running:
                return idle_snapshot(registry.num_slots, healthy=False, step_failures=async_engine.step_failures)
            return async_engine.call("snapshot").result(10)
        return take_snapshot(self.engine, registry, async_engine)

    def is_base_model(self, name: str) -> bool:
        """Whether `name` names the base model (--served-model-name and its aliases)."""
        return name == self.model_name or name in self.config.served_model_aliases

    @property
    def prompt_token_limit(self) -> int:
        """The longest prompt accepted, in tokens (--max-prompt-tokens, else the context length)."""
        return self.config.max_prompt_tokens or self.max_model_len

    def grammar_compiler(self):
        """A structured-output compiler on this process's tokenizer, to refuse a schema or
        pattern that cannot compile before its request is queued: the engine's own when it runs
        here (its cache then holds the grammar before the engine thread needs it); the engine
        process compiles its own copy as a request arrives, off its engine thread."""
        if self.engine is not None:
            return self.engine.grammars()
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size,
                                             eos_token_ids(self.model_dir or demo_model_dir(), self.tokenizer))
        return self._grammars

    def resolve_adapter_path(self, path: str) -> Path:
        """The real path of `path`, if it and the adapter files in it (links followed) lie inside
        an allowed adapter root; else AdapterPathError. BadPathError for a malformed path."""
        if not self.adapter_roots:
            raise AdapterPathError("adapters cannot be registered by path: the server has no --adapter-root")
        try:
            real = resolve_inside(path, self.adapter_roots)
            # the directory alone is not enough: its files may be links out of every root
            check_files_inside(real, (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME), self.adapter_roots)
        except OutsideRootsError as exc:
            raise AdapterPathError(str(exc)) from None
        return real
