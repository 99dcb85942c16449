"""ServerMetrics: observations and snapshot gauges, read back through a real scrape."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.metrics import ServerMetrics, Snapshot


def scrape(metrics: ServerMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    """The one sample named `sample` (default: the family's name) with exactly these labels."""
    name = sample or family
    found = [s.value for s in families[family].samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {families[family].samples}"
    return found[0]


def bucket(families: dict, family: str, le: str, **labels) -> float:
    return value(families, family, family + "_bucket", le=le, **labels)


def step(prefill=0, decode=0, adapters=0, seconds=0.01, preempted=0, cache_lookups=()):
    return SimpleNamespace(prefill_tokens=prefill, decode_tokens=decode, adapters=adapters, seconds=seconds,
                           preempted=preempted, cache_lookups=cache_lookups)


@pytest.fixture
def state():
    return {"snap": Snapshot(running=3, waiting=2, kv_cache_usage=0.375,
                             adapters_by_tier={"gpu": 2, "host": 5, "disk": 11},
                             running_adapters=["sql", "chat"], waiting_adapters=["poem"], max_lora=4,
                             gpu_slots=64, adapter_memory={"gpu": (3 << 20, 8 << 20), "host": (5 << 20, 32 << 20)},
                             adapter_pages=(1536, 4096),
                             adapter_bytes=[("sql", "gpu", 1 << 20), ("sql", "host", 1 << 20), ("poem", "host", 4096)])}


@pytest.fixture
def metrics(state) -> ServerMetrics:
    def snapshot() -> Snapshot:
        if isinstance(state["snap"], Exception):
            raise state["snap"]
        return state["snap"]

    return ServerMetrics(snapshot, "llama-base")


def test_requests_tokens_and_latency_histograms(metrics):
    metrics.observe_request("sql", "stop", 100, 20, 2.0, 0.5, 0.25)
    metrics.observe_request("sql", "length", 3000, 64, 4.0, None, 1.5)
    metrics.observe_request("llama-base", "abort", 7, 0, 0.1, 0.05, None)
    for gap in (0.01, 0.02, 0.2):
        metrics.observe_token_gap(gap)
    f = scrape(metrics)

    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="stop") == 1
    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="length") == 1
    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="abort") == 1
    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="error") == 0
    assert value(f, "loraplex_prompt_tokens", "loraplex_prompt_tokens_total") == 3107
    assert value(f, "loraplex_generation_tokens", "loraplex_generation_tokens_total") == 84
    assert value(f, "loraplex_model_requests", "loraplex_model_requests_total", model="sql") == 2
    assert value(f, "loraplex_model_requests", "loraplex_model_requests_total", model="llama-base") == 1
    assert value(f, "loraplex_model_generation_tokens", "loraplex_model_generation_tokens_total", model="sql") == 84

    e2e = "loraplex_request_duration_seconds"
    assert f[e2e].type == "histogram"
    assert value(f, e2e, e2e + "_count") == 3
    assert value(f, e2e, e2e + "_sum") == pytest.approx(6.1)
    assert bucket(f, e2e, "2.5") == 2 and bucket(f, e2e, "1.0") == 1 and bucket(f, e2e, "+Inf") == 3
    # None = not measured: the queue and TTFT histograms count only the requests that had one.
    q, ttft = "loraplex_request_queue_seconds", "loraplex_time_to_first_token_seconds"
    assert value(f, q, q + "_count") == 2 and value(f, q, q + "_sum") == pytest.approx(0.55)
    assert value(f, ttft, ttft + "_count") == 2 and value(f, ttft, ttft + "_sum") == pytest.approx(1.75)
    assert bucket(f, ttft, "0.001") == 0 and bucket(f, ttft, "60.0") == 2
    itl = "loraplex_inter_token_latency_seconds"
    assert value(f, itl, itl + "_count") == 3 and bucket(f, itl, "0.01") == 1 and bucket(f, itl, "0.025") == 2
    prompt = "loraplex_request_prompt_tokens"
    assert bucket(f, prompt, "128.0") == 2 and bucket(f, prompt, "2048.0") == 2 and bucket(f, prompt, "4096.0") == 3
    assert bucket(f, prompt, "32768.0") == 3
    gen = "loraplex_request_generation_tokens"
    assert bucket(f, gen, "1.0") == 1 and bucket(f, gen, "64.0") == 3 and value(f, gen, gen + "_sum") == 84


def test_finish_reason_enum_is_labelled_by_value(metrics):
    from loraplex.engine.request import FinishReason

    metrics.observe_request("a", FinishReason.LENGTH, 1, 1, 0.1, 0.0, 0.05)
    f = scrape(metrics)
    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="length") == 1


def test_errors_by_code(metrics):
    for code in (429, 429, 404, 500):
        metrics.observe_error(code)
    f = scrape(metrics)
    assert value(f, "loraplex_request_errors", "loraplex_request_errors_total", code="429") == 2
    assert value(f, "loraplex_request_errors", "loraplex_request_errors_total", code="404") == 1
    assert value(f, "loraplex_request_errors", "loraplex_request_errors_total", code="500") == 1


def test_adapter_events(metrics):
    metrics.on_adapter_event("load_host", "sql", 0.040)
    metrics.on_adapter_event("load_host", "chat", 2.0)
    metrics.on_adapter_event("load_gpu", "sql", 0.0008)
    metrics.on_adapter_event("evict_gpu", "sql", None)
    metrics.on_adapter_event("evict_gpu", "chat", None)
    metrics.on_adapter_event("evict_host", "poem", None)
    metrics.on_adapter_event("load_failed", "bad", None)
    # Unknown kinds, missing or nonsensical seconds: ignored, never raised (it runs under the registry's lock).
    metrics.on_adapter_event("something_new", "x", 1.0)
    metrics.on_adapter_event("load_gpu", "x", None)
    metrics.on_adapter_event("load_gpu", "x", "not a number")
    f = scrape(metrics)
    load = "loraplex_adapter_load_seconds"
    assert value(f, load, load + "_count", tier="host") == 2
    assert value(f, load, load + "_sum", tier="host") == pytest.approx(2.04)
    assert value(f, load, load + "_count", tier="gpu") == 1
    assert bucket(f, load, "0.001", tier="gpu") == 1 and bucket(f, load, "0.0005", tier="gpu") == 0
    ev = "loraplex_adapter_evictions"
    assert value(f, ev, ev + "_total", tier="gpu") == 2 and value(f, ev, ev + "_total", tier="host") == 1
    assert value(f, "loraplex_adapter_load_failures", "loraplex_adapter_load_failures_total") == 1


def test_engine_steps(metrics):
    metrics.observe_step(step(prefill=512, decode=0, adapters=1, seconds=0.030))
    metrics.observe_step(step(prefill=0, decode=48, adapters=5, seconds=0.012, preempted=2))
    metrics.observe_step(step(prefill=16, decode=64, adapters=0, seconds=0.020, preempted=1))
    f = scrape(metrics)
    ad = "loraplex_step_adapters"
    assert value(f, ad, ad + "_count") == 3 and value(f, ad, ad + "_sum") == 6
    assert bucket(f, ad, "0.0") == 1 and bucket(f, ad, "1.0") == 2 and bucket(f, ad, "4.0") == 2
    assert bucket(f, ad, "8.0") == 3 and bucket(f, ad, "256.0") == 3
    dur = "loraplex_step_duration_seconds"
    assert value(f, dur, dur + "_count") == 3 and value(f, dur, dur + "_sum") == pytest.approx(0.062)
    assert value(f, "loraplex_preemptions", "loraplex_preemptions_total") == 3
    st = "loraplex_step_tokens"
    assert value(f, st, st + "_total", phase="prefill") == 528 and value(f, st, st + "_total", phase="decode") == 112


def test_prefix_cache_queries_and_hits_per_model_and_in_vllm_names(metrics):
    metrics.observe_step(step(prefill=40, cache_lookups=((None, 1024, 992), ("sql", 1030, 0))))
    metrics.observe_step(step(prefill=8, cache_lookups=(("sql", 1040, 1024),)))
    metrics.forget_adapter("chat")  # never seen: nothing to drop
    f = scrape(metrics)
    q, h = "loraplex_prefix_cache_queries", "loraplex_prefix_cache_hits"
    assert value(f, q, q + "_total", model="llama-base") == 1024 and value(f, h, h + "_total", model="llama-base") == 992
    assert value(f, q, q + "_total", model="sql") == 2070 and value(f, h, h + "_total", model="sql") == 1024
    vq, vh = "vllm:prefix_cache_queries", "vllm:prefix_cache_hits"
    assert value(f, vq, vq + "_total", model_name="llama-base") == 3094
    assert value(f, vh, vh + "_total", model_name="llama-base") == 2016
    metrics.forget_adapter("sql")
    f = scrape(metrics)
    assert {s.labels["model"] for s in f[q].samples} == {"llama-base"}
    assert value(f, vq, vq + "_total", model_name="llama-base") == 3094  # the totals keep what it did


def test_snapshot_gauges_and_vllm_names(metrics):
    before = time.time()
    f = scrape(metrics)
    after = time.time()
    assert value(f, "loraplex_requests_running") == 3
    assert value(f, "loraplex_requests_waiting") == 2
    assert value(f, "loraplex_kv_cache_usage_ratio") == 0.375
    assert {s.labels["tier"]: s.value for s in f["loraplex_adapters"].samples} == {"gpu": 2, "host": 5, "disk": 11}
    assert value(f, "loraplex_gpu_adapter_slots") == 64  # slot records; max_lora (4) is what the bytes hold
    assert {s.labels["tier"]: s.value for s in f["loraplex_adapter_memory_bytes"].samples} == {
        "gpu": 3 << 20, "host": 5 << 20}
    assert {s.labels["tier"]: s.value for s in f["loraplex_adapter_memory_limit_bytes"].samples} == {
        "gpu": 8 << 20, "host": 32 << 20}
    assert {s.labels["state"]: s.value for s in f["loraplex_adapter_pages"].samples} == {"used": 1536, "free": 2560}
    assert {(s.labels["model"], s.labels["tier"]): s.value for s in f["loraplex_adapter_resident_bytes"].samples} == {
        ("sql", "gpu"): 1 << 20, ("sql", "host"): 1 << 20, ("poem", "host"): 4096}

    assert f["vllm:num_requests_running"].type == "gauge"
    assert value(f, "vllm:num_requests_running", model_name="llama-base") == 3
    assert value(f, "vllm:num_requests_waiting", model_name="llama-base") == 2
    assert value(f, "vllm:kv_cache_usage_perc", model_name="llama-base") == 0.375   # a fraction, as vLLM
    assert value(f, "vllm:gpu_cache_usage_perc", model_name="llama-base") == 0.375

    lora = f["vllm:lora_requests_info"]
    assert lora.type == "gauge" and len(lora.samples) == 1
    sample = lora.samples[0]
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "sql,chat", "waiting_lora_adapters": "poem"}
    assert before - 1 <= sample.value <= after + 1       # the scrape's unix time: the picker takes the newest


def test_gauges_follow_the_snapshot_and_model_name(metrics, state):
    metrics.model_name = "renamed"   # set by the server once the model has loaded
    state["snap"] = Snapshot(0, 0, 0.0, {"gpu": 0, "host": 0, "disk": 0}, [], [], 8)
    f = scrape(metrics)
    assert value(f, "loraplex_requests_running") == 0
    assert value(f, "vllm:num_requests_waiting", model_name="renamed") == 0
    assert f["vllm:lora_requests_info"].samples[0].labels == {
        "max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert value(f, "loraplex_engine_healthy") == 1 and f["loraplex_engine_step_failures"].type == "counter"
    assert value(f, "loraplex_engine_step_failures", "loraplex_engine_step_failures_total") == 0
    state["snap"] = Snapshot(0, 0, 0.0, {}, [], [], 8, engine_healthy=False, engine_step_failures=5)
    f = scrape(metrics)
    assert value(f, "loraplex_engine_healthy") == 0
    assert value(f, "loraplex_engine_step_failures", "loraplex_engine_step_failures_total") == 5


def test_forget_adapter_drops_its_series(metrics):
    metrics.observe_request("sql", "stop", 10, 5, 1.0, 0.1, 0.2)
    metrics.observe_request("chat", "stop", 10, 7, 1.0, 0.1, 0.2)
    metrics.forget_adapter("sql")
    metrics.forget_adapter("never-seen")      # no series: nothing to do, no error
    f = scrape(metrics)
    models = {s.labels["model"] for s in f["loraplex_model_requests"].samples}
    assert models == {"chat"}
    assert {s.labels["model"] for s in f["loraplex_model_generation_tokens"].samples} == {"chat"}
    # Aggregates keep what the forgotten adapter did.
    assert value(f, "loraplex_generation_tokens", "loraplex_generation_tokens_total") == 12


def test_failing_snapshot_leaves_out_only_the_gauges(metrics, state, caplog):
    metrics.observe_request("sql", "stop", 10, 5, 1.0, 0.1, 0.2)
    state["snap"] = RuntimeError("engine gone")
    with caplog.at_level(logging.DEBUG, logger="loraplex.metrics"):
        f = scrape(metrics)
        scrape(metrics)
    assert value(f, "loraplex_requests", "loraplex_requests_total", finish_reason="stop") == 1
    for gauge in ("loraplex_requests_running", "loraplex_adapters", "vllm:num_requests_waiting",
                  "vllm:lora_requests_info"):
        assert gauge not in f
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1   # logged once, not every scrape
    state["snap"] = Snapshot(1, 0, 0.5, {"gpu": 1}, ["sql"], [], 2)           # recovers on the next scrape
    f = scrape(metrics)
    assert value(f, "vllm:kv_cache_usage_perc", model_name="llama-base") == 0.5
    assert {s.labels["tier"]: s.value for s in f["loraplex_adapters"].samples} == {"gpu": 1, "host": 0, "disk": 0}


def test_malformed_snapshot_is_a_failing_one(metrics, state):
    state["snap"] = Snapshot(1, 0, None, {}, [], [], 2)   # kv_cache_usage None: float() fails
    f = scrape(metrics)
    assert "vllm:kv_cache_usage_perc" not in f and "loraplex_prompt_tokens" in f


def test_registries_are_private():
    import prometheus_client

    a = ServerMetrics(lambda: Snapshot(0, 0, 0.0, {}, [], [], 1), "a")
    b = ServerMetrics(lambda: Snapshot(0, 0, 0.0, {}, [], [], 1), "b")   # same names, no clash
    a.observe_error(500)
    assert not scrape(b)["loraplex_request_errors"].samples
    assert value(scrape(a), "loraplex_request_errors", "loraplex_request_errors_total", code="500") == 1
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith(("loraplex_", "vllm:")) for n in global_names)


def test_no_created_series(metrics):
    metrics.observe_request("sql", "stop", 10, 5, 1.0, 0.1, 0.2)
    body = metrics.render()[0].decode()
    assert "_created" not in body
