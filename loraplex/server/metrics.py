"""Prometheus metrics of `loraplex serve`, exposed on `/metrics`.

Everything lives in one `CollectorRegistry` per `ServerMetrics` (never the process-global
one), so several servers or tests in one process do not collide.

Histograms
    loraplex_time_to_first_token_seconds        arrival -> first generated token (streamed or not)
    loraplex_inter_token_latency_seconds        gap between consecutive streamed tokens
    loraplex_request_duration_seconds           end to end, arrival -> last token
    loraplex_request_queue_seconds              arrival -> first admission to a step
    loraplex_request_prompt_tokens              prompt length of finished requests
    loraplex_request_generation_tokens          generated tokens of finished requests
    loraplex_adapter_load_seconds{tier}         "host": file -> pinned host row; "gpu": into a GPU slot
                                                (from the file when it follows a read, else from the host row)
    loraplex_step_adapters                      distinct adapters in one engine step (base model not counted)
    loraplex_step_duration_seconds              wall time of one engine step
Counters
    loraplex_requests_total{finish_reason}      finished requests (stop, length, abort, error)
    loraplex_request_errors_total{code}         error responses by HTTP status
    loraplex_prompt_tokens_total                prompt tokens of finished requests
    loraplex_generation_tokens_total            generated tokens of finished requests
    loraplex_step_tokens_total{phase}           tokens run through the model, "prefill" / "decode", per step
                                                (recomputation after preemption included)
    loraplex_adapter_evictions_total{tier}      adapters evicted from GPU slots / host rows
    loraplex_adapter_load_failures_total        adapter page-ins that failed
    loraplex_model_requests_total{model}        finished requests per base model / adapter name
    loraplex_model_generation_tokens_total{model}
    loraplex_preemptions_total                  sequences preempted for KV cache space
    loraplex_prefix_cache_queries_total{model}  prompt tokens looked up in the prefix cache at admission,
                                                per base model / adapter name
    loraplex_prefix_cache_hits_total{model}     of those, tokens whose KV blocks were found and reused
Read from `Snapshot` at scrape time
    loraplex_requests_running, loraplex_requests_waiting, loraplex_kv_cache_usage_ratio (0..1),
    loraplex_adapters{tier="gpu"|"host"|"disk"}, loraplex_gpu_adapter_slots (slot records),
    loraplex_adapter_memory_bytes{tier="gpu"|"host"} and loraplex_adapter_memory_limit_bytes{tier}
    (adapter memory used and its bound), loraplex_adapter_pages{state="used"|"free"} (GPU pages),
    loraplex_adapter_resident_bytes{model, tier} (what each adapter holds where),
    loraplex_engine_healthy (1; 0 once the engine process or thread died or the last
    UNHEALTHY_AFTER_FAILED_STEPS steps all failed, as /ready reports), and one counter,
    loraplex_engine_step_failures_total (engine steps that raised; their requests failed)
vLLM-named gauges, for the Gateway API Inference Extension's endpoint picker (queue depth, KV
use and LoRA affinity routing); same values as above
    vllm:num_requests_running{model_name}, vllm:num_requests_waiting{model_name},
    vllm:kv_cache_usage_perc{model_name} (a 0..1 fraction despite the name, as in vLLM),
    vllm:gpu_cache_usage_perc{model_name} (its older name),
    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters} = unix time
    of the scrape; the adapter labels are comma-joined names (one series, always the latest):
    "running" = adapters in GPU slots, ready at once (the extension's protocol), "waiting" =
    adapters with requests waiting for a slot; max_lora = how many adapters the GPU holds at
    once: the slot records, or as many adapters of the registered ones' mean size as the GPU
    adapter memory holds, whichever is fewer.
    vllm:cache_config_info{block_size, num_gpu_blocks, enable_prefix_caching} = 1 once the engine
    is up (the picker's prefix-cache scorer reads the block size from it), and
    vllm:prefix_cache_queries_total{model_name}, vllm:prefix_cache_hits_total{model_name}: the
    prefix cache's queried and hit tokens over every model, as vLLM counts them (hit rate =
    hits / queries)

Per-adapter series (the `model` label) are dropped by `forget_adapter` when an adapter is
unloaded, so label cardinality follows the registered adapters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("loraplex.metrics")

# The classic text format: what every Prometheus version, and the inference extension's
# parser, reads. (prometheus-client >= 0.22 labels its output 1.0.0, which only differs for
# UTF-8 metric names; ours are all legacy-valid.)
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# 1 ms .. 60 s: time to first token, queue time, adapter loads.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
                   1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0)
# End-to-end requests can run for minutes (thousands of tokens).
REQUEST_BUCKETS = LATENCY_BUCKETS + (90.0, 120.0, 180.0, 300.0, 600.0)
# Finer where decode steps live (a few ms to ~100 ms), up to 10 s for stalls.
TOKEN_GAP_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03,
                     0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A GPU page-in is a single host -> device copy: sub-millisecond for small adapters.
ADAPTER_LOAD_BUCKETS = (0.0001, 0.00025, 0.0005) + LATENCY_BUCKETS
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(16))            # 1 .. 32768
ADAPTERS_PER_STEP_BUCKETS = (0.0,) + tuple(float(2 ** i) for i in range(9))  # 0, 1, 2, 4 .. 256

FINISH_REASONS = ("stop", "length", "abort", "error")
TIERS = ("gpu", "host", "disk")


@dataclass
class Snapshot:
    """The server's state at scrape time, for the gauges."""

    running: int                       # requests running (have KV blocks)
    waiting: int                       # requests queued
    kv_cache_usage: float              # 0..1
    adapters_by_tier: dict[str, int]   # {"gpu": n, "host": n, "disk": n}
    running_adapters: list[str]        # adapters in GPU slots, ready to serve at once
    waiting_adapters: list[str]        # adapters with requests waiting for a slot
    max_lora: int                      # adapters the GPU holds at once (registry `_capacity`)
    engine_healthy: bool = True        # AsyncEngine.health is None (also while the model loads)
    engine_step_failures: int = 0      # engine steps that raised, in all
    block_size: int = 0                # KV cache positions per block (0: no engine yet)
    num_gpu_blocks: int = 0            # KV cache blocks
    prefix_caching: bool = False       # the prefix cache is on
    gpu_slots: int = 0                 # GPU adapter slot records (the count bound)
    adapter_memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # tier -> (bytes used, bytes)
    adapter_pages: tuple[int, int] = (0, 0)  # GPU pages (used, all)
    adapter_bytes: list[tuple[str, str, int]] = field(default_factory=list)  # (adapter, tier, bytes held)


def _label(value) -> str:
    """A label value from a str or a str-valued enum (str() of a str Enum is 'Cls.NAME')."""
    return str(getattr(value, "value", value))


def _joined(names: Iterable[str]) -> str:
    """Comma-joined names, duplicates dropped, order kept (vLLM's label format)."""
    return ",".join(dict.fromkeys(str(n) for n in names))


class _SnapshotCollector:
    """Gauges evaluated at scrape time; a failing snapshot drops only these gauges."""

    def __init__(self, owner: ServerMetrics):
        self.owner = owner
        self._failing = False

    def describe(self) -> list[Metric]:
        # Names only, so the registry can check for clashes without taking a snapshot.
        return self._families(None)

    def collect(self) -> list[Metric]:
        try:
            snap = self.owner.snapshot()
            families = self._families(snap)
        except Exception:
            # Log the first failure of a run of them with its traceback, the rest quietly.
            if not self._failing:
                log.warning("metrics snapshot failed; gauges left out of this scrape", exc_info=True)
            else:
                log.debug("metrics snapshot failed again", exc_info=True)
            self._failing = True
            return []
        self._failing = False
        return families

    def _families(self, snap: Snapshot | None) -> list[Metric]:
        model = [_label(self.owner.model_name)]
        running = GaugeMetricFamily("loraplex_requests_running", "Requests running (holding KV cache blocks).")
        waiting = GaugeMetricFamily("loraplex_requests_waiting", "Requests queued, not yet admitted.")
        kv = GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "Share of KV cache blocks in use (0..1).")
        adapters = GaugeMetricFamily("loraplex_adapters", "Registered adapters by where their weights are "
                                     "(gpu slot, pinned host row, disk only).", labels=["tier"])
        slots = GaugeMetricFamily("loraplex_gpu_adapter_slots", "GPU adapter slot records: the most adapters "
                                  "resident at once (their bytes bind first, see loraplex_adapter_memory_bytes).")
        memory = GaugeMetricFamily("loraplex_adapter_memory_bytes", "Adapter memory in use per tier (gpu: pages "
                                   "held; host: packed copies).", labels=["tier"])
        memory_limit = GaugeMetricFamily("loraplex_adapter_memory_limit_bytes", "Adapter memory per tier "
                                         "(--max-gpu-adapter-memory, --max-host-adapter-memory).", labels=["tier"])
        pages = GaugeMetricFamily("loraplex_adapter_pages", "GPU adapter memory pages by state.", labels=["state"])
        held = GaugeMetricFamily("loraplex_adapter_resident_bytes", "Bytes each adapter holds per tier now "
                                 "(only tiers it is in).", labels=["model", "tier"])
        healthy = GaugeMetricFamily("loraplex_engine_healthy", "1 while the engine serves; 0 once its thread "
                                    "died or its last steps all failed (/ready is 503).")
        step_failures = CounterMetricFamily("loraplex_engine_step_failures", "Engine steps that raised (their "
                                            "requests finished with an error).")
        v_running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution "
                                      "batches (vLLM-compatible name).", labels=["model_name"])
        v_waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed "
                                      "(vLLM-compatible name).", labels=["model_name"])
        v_kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage "
                                 "(vLLM-compatible name).", labels=["model_name"])
        v_gpu_kv = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent "
                                     "usage (older vLLM name of vllm:kv_cache_usage_perc).", labels=["model_name"])
        v_cache = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache config, in its labels "
                                    "(vLLM-compatible; value 1).",
                                    labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        v_lora = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests; the value is "
                                   "the unix time of the scrape (vLLM-compatible).",
                                   labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        if snap is not None:
            usage = float(snap.kv_cache_usage)
            running.add_metric([], float(snap.running))
            waiting.add_metric([], float(snap.waiting))
            kv.add_metric([], usage)
            for tier in dict.fromkeys((*TIERS, *snap.adapters_by_tier)):
                adapters.add_metric([tier], float(snap.adapters_by_tier.get(tier, 0)))
            slots.add_metric([], float(snap.gpu_slots or snap.max_lora))
            for tier, (used, limit) in snap.adapter_memory.items():
                memory.add_metric([tier], float(used))
                memory_limit.add_metric([tier], float(limit))
            used_pages, all_pages = snap.adapter_pages
            if all_pages:
                pages.add_metric(["used"], float(used_pages))
                pages.add_metric(["free"], float(all_pages - used_pages))
            for name, tier, nbytes in snap.adapter_bytes:
                held.add_metric([name, tier], float(nbytes))
            healthy.add_metric([], float(snap.engine_healthy))
            step_failures.add_metric([], float(snap.engine_step_failures))
            v_running.add_metric(model, float(snap.running))
            v_waiting.add_metric(model, float(snap.waiting))
            v_kv.add_metric(model, usage)
            v_gpu_kv.add_metric(model, usage)
            v_lora.add_metric([str(int(snap.max_lora)), _joined(snap.running_adapters),
                               _joined(snap.waiting_adapters)], time.time())
            if snap.block_size:
                v_cache.add_metric([str(snap.block_size), str(snap.num_gpu_blocks), str(snap.prefix_caching)], 1.0)
        return [running, waiting, kv, adapters, slots, memory, memory_limit, pages, held, healthy, step_failures,
                v_running, v_waiting, v_kv, v_gpu_kv, v_lora, v_cache]


class ServerMetrics:
    """The server's metrics: observed by the API and the engine, gauges read from `snapshot()`.

    Every method is thread-safe (prometheus-client metrics lock internally) and cheap;
    `on_adapter_event` never raises, since the adapter registry calls it under its lock.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], model_name: str):
        self.snapshot = snapshot
        self.model_name = model_name   # the served base model; read at each scrape (may be set after loading)
        # No `*_created` series (as vLLM): they double the series count and nothing here reads them.
        prometheus_client.disable_created_metrics()
        self.registry = r = CollectorRegistry()

        def hist(name: str, doc: str, buckets, labels=()) -> Histogram:
            return Histogram(name, doc, labelnames=labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels=()) -> Counter:
            # prometheus-client appends `_total` itself.
            return Counter(name.removesuffix("_total"), doc, labelnames=labels, registry=r)

        self.ttft = hist("loraplex_time_to_first_token_seconds", "Time from arrival to the first generated "
                         "token.", LATENCY_BUCKETS)
        self.itl = hist("loraplex_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
                        TOKEN_GAP_BUCKETS)
        self.e2e = hist("loraplex_request_duration_seconds", "End-to-end request time, arrival to the last "
                        "token.", REQUEST_BUCKETS)
        self.queue = hist("loraplex_request_queue_seconds", "Time from arrival to the first admission to a "
                          "step.", REQUEST_BUCKETS)
        self.prompt_hist = hist("loraplex_request_prompt_tokens", "Prompt tokens per finished request.",
                                TOKEN_BUCKETS)
        self.gen_hist = hist("loraplex_request_generation_tokens", "Generated tokens per finished request.",
                             TOKEN_BUCKETS)
        self.adapter_load = hist("loraplex_adapter_load_seconds", "Adapter load time: tier=host is file -> "
                                 "pinned host row, tier=gpu is into a GPU slot (from the file when it "
                                 "follows a read).", ADAPTER_LOAD_BUCKETS,
                                 ["tier"])
        self.step_adapters = hist("loraplex_step_adapters", "Distinct adapters in one engine step (base model "
                                  "not counted).", ADAPTERS_PER_STEP_BUCKETS)
        self.step_seconds = hist("loraplex_step_duration_seconds", "Wall time of one engine step, scheduling to "
                                 "sampled tokens.", TOKEN_GAP_BUCKETS)

        self.requests = counter("loraplex_requests_total", "Finished requests by finish reason.",
                                ["finish_reason"])
        self.errors = counter("loraplex_request_errors_total", "Error responses by HTTP status code.", ["code"])
        self.prompt_tokens = counter("loraplex_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("loraplex_generation_tokens_total", "Generated tokens of finished "
                                         "requests.")
        self.step_tokens = counter("loraplex_step_tokens_total", "Tokens run through the model by engine steps "
                                   "(phase=prefill|decode; recomputation after preemption included).", ["phase"])
        self.evictions = counter("loraplex_adapter_evictions_total", "Adapters evicted, tier=gpu from a GPU slot, "
                                 "tier=host from a pinned host row.", ["tier"])
        self.load_failures = counter("loraplex_adapter_load_failures_total", "Adapter loads that failed.")
        self.model_requests = counter("loraplex_model_requests_total", "Finished requests per model name (base "
                                      "model or adapter).", ["model"])
        self.model_generation_tokens = counter("loraplex_model_generation_tokens_total", "Generated tokens per "
                                               "model name (base model or adapter).", ["model"])
        self.preemptions = counter("loraplex_preemptions_total", "Sequences preempted to free KV cache blocks.")
        self.cache_queries = counter("loraplex_prefix_cache_queries_total", "Prompt tokens looked up in the "
                                     "prefix cache when a request was admitted, per model name.", ["model"])
        self.cache_hits = counter("loraplex_prefix_cache_hits_total", "Prompt tokens whose KV blocks were found "
                                  "in the prefix cache and reused, per model name.", ["model"])
        self.vllm_cache_queries = counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of the "
                                          "number of queried tokens.", ["model_name"])
        self.vllm_cache_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of the number of "
                                       "cached tokens.", ["model_name"])

        # Series that exist from the start, so rate() and dashboards show 0 rather than nothing.
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        for tier in ("host", "gpu"):
            self.adapter_load.labels(tier)
            self.evictions.labels(tier)
        for phase in ("prefill", "decode"):
            self.step_tokens.labels(phase)

        r.register(_SnapshotCollector(self))

    # -- the API's observations --------------------------------------------------------------

    def observe_request(self, model: str, finish_reason: str, prompt_tokens: int, generation_tokens: int,
                        e2e_seconds: float, queue_seconds: float | None, ttft_seconds: float | None) -> None:
        """One finished request (any finish reason); `model` is the base model's or an adapter's name."""
        model = _label(model)
        self.requests.labels(_label(finish_reason)).inc()
        self.model_requests.labels(model).inc()
        self.prompt_tokens.inc(max(0, prompt_tokens))
        self.generation_tokens.inc(max(0, generation_tokens))
        self.model_generation_tokens.labels(model).inc(max(0, generation_tokens))
        self.prompt_hist.observe(prompt_tokens)
        self.gen_hist.observe(generation_tokens)
        self.e2e.observe(e2e_seconds)
        if queue_seconds is not None:
            self.queue.observe(queue_seconds)
        if ttft_seconds is not None:
            self.ttft.observe(ttft_seconds)

    def observe_token_gap(self, seconds: float) -> None:
        """The time since the previous streamed token (one per token after the first)."""
        self.itl.observe(seconds)

    def observe_error(self, status_code: int) -> None:
        """An error response (4xx/5xx) the API returned."""
        self.errors.labels(str(int(status_code))).inc()

    # -- the adapter registry's and the engine's hooks -------------------------------------------

    def on_adapter_event(self, kind: str, name: str, seconds: float | None) -> None:
        """The adapter registry's event hook: load_host / load_gpu (with seconds), evict_gpu,
        evict_host, load_failed. Runs under the registry's lock on any thread: cheap, never raises."""
        try:
            if kind == "load_host" or kind == "load_gpu":
                if seconds is not None:
                    self.adapter_load.labels("host" if kind == "load_host" else "gpu").observe(seconds)
            elif kind == "evict_gpu":
                self.evictions.labels("gpu").inc()
            elif kind == "evict_host":
                self.evictions.labels("host").inc()
            elif kind == "load_failed":
                self.load_failures.inc()
        except Exception:  # a metric must never break adapter loading
            log.debug("adapter event %r for %r not recorded", kind, name, exc_info=True)

    def observe_step(self, stats) -> None:
        """One engine step (`engine.StepStats`)."""
        self.step_adapters.observe(stats.adapters)
        self.step_seconds.observe(stats.seconds)
        if stats.prefill_tokens:
            self.step_tokens.labels("prefill").inc(stats.prefill_tokens)
        if stats.decode_tokens:
            self.step_tokens.labels("decode").inc(stats.decode_tokens)
        if stats.preempted:
            self.preemptions.inc(stats.preempted)
        for adapter, queried, hit in stats.cache_lookups:
            model = _label(self.model_name if adapter is None else adapter)
            self.cache_queries.labels(model).inc(queried)
            self.cache_hits.labels(model).inc(hit)
            self.vllm_cache_queries.labels(_label(self.model_name)).inc(queried)
            self.vllm_cache_hits.labels(_label(self.model_name)).inc(hit)

    def forget_adapter(self, name: str) -> None:
        """Drop the per-adapter series of `name` (it was unloaded); absent series are fine."""
        for metric in (self.model_requests, self.model_generation_tokens, self.cache_queries, self.cache_hits):
            try:
                metric.remove(_label(name))
            except KeyError:
                pass

    # -- exposition -------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The `/metrics` body and its content type (Prometheus text format 0.0.4)."""
        return prometheus_client.generate_latest(self.registry), CONTENT_TYPE
