"""What the Kubernetes endpoint picker reads off a live loraplex, read the way it reads it.

The picker is llm-d/llm-d-router's EPP (deploy/kubernetes/epp.yaml). Its metrics data source
GETs `/metrics` with no credentials and parses the body with prometheus/common's classic text
parser; its core metrics extractor then takes, per the engine mapping in our EPP config, the
queue, running and KV-cache gauges and `vllm:lora_requests_info`, which its LoRA affinity scorer
reads. Ported below, line for line where it matters, from:

- llm-d/llm-d-router @ 71f4f0999f95b96c49a9d0c4afbd18dfdb943c26 (tag v0.10.0, the version
  deploy/kubernetes targets; the same logic at main @ ebab687927f5331c1b39defcb579a07951bce56c):
  pkg/epp/framework/plugins/datalayer/source/metrics/datasource.go (parseMetrics: the text parser
  with model.LegacyValidation; source/http/client.go: a plain GET, any status but 200 fails),
  pkg/epp/framework/plugins/datalayer/extractor/metrics/spec.go (parseStringToSpec,
  getLatestMetric, labelsMatch, extractValue), loraspec.go (the LoRA series with the largest value),
  extractor.go (Extract, populateLoRAMetrics, addAdapters), factories.go (the engine mapping),
  pkg/epp/framework/plugins/scheduling/scorer/loraaffinity/lora_affinity.go (Score), and
  pkg/epp/framework/plugins/datalayer/source/models + extractor/models (the /v1/models shape).
- prometheus/common @ 934ff3789ee17026206fe4f7e5f59c0a09fbe511 (v0.67.5, the version llm-d-router
  v0.10.0's go.mod pins): expfmt/text_parse.go (TextParser.TextToMetricFamilies).

The live part runs the bundled demo model (three adapters) with two GPU adapter slots and two
sequences at a time, so that requests queue and an adapter waits for a slot, and checks every
scrape taken while a mixed workload (adapters and the base model) runs.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from loraplex.demo import tasks
from loraplex.server.config import ServerConfig
from loraplex.server.metrics import ServerMetrics, Snapshot
from tests.server.test_server import live_server

ROOT = Path(__file__).resolve().parents[2]
EPP_MANIFEST = ROOT / "deploy" / "kubernetes" / "epp.yaml"
API_KEY = "picker-test-key"


# -- prometheus/common expfmt.TextParser (classic text format, legacy name validation) ----------

class ParseError(ValueError):
    """expfmt.ParseError: the whole scrape fails (the Go parser returns the error, and the
    picker's data source drops the payload)."""


@dataclass
class Metric:
    """dto.Metric: label pairs in the order read, one value by type, an optional timestamp."""

    labels: list[tuple[str, str]] = field(default_factory=list)
    gauge: float | None = None
    counter: float | None = None
    untyped: float | None = None
    histogram: dict | None = None
    summary: dict | None = None
    timestamp_ms: int | None = None

    def label(self, name: str) -> str | None:
        return next((v for n, v in self.labels if n == name), None)


@dataclass
class Family:
    name: str
    type: str | None = None          # COUNTER, GAUGE, UNTYPED, SUMMARY, HISTOGRAM, GAUGE_HISTOGRAM
    help: str | None = None
    metrics: list[Metric] = field(default_factory=list)


LEGACY_METRIC = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")   # model.LegacyValidation.IsValidMetricName
LEGACY_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")      # ... IsValidLabelName
METRIC_TYPES = {"COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM"}  # dto.MetricType_value


def go_parse_float(s: str) -> float:
    """expfmt's parseFloat: strconv.ParseFloat without 'p', 'P' or '_'."""
    if any(c in s for c in "pP_") or not s or s != s.strip():
        raise ValueError(s)
    if s.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(s)
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        raise ValueError(s)
    return float(s)


def go_atoi(s: str) -> int:
    """strconv.Atoi: an optional sign and decimal digits, nothing else."""
    if not re.fullmatch(r"[+-]?\d+", s):
        raise ValueError(f"strconv.Atoi: parsing {s!r}: invalid syntax")
    return int(s)


def _summary_or_histogram_base(name: str, suffixes: tuple[str, ...]) -> str:
    for suffix in suffixes:
        if len(name) > len(suffix) and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def unescape(text: str, allowed: str, line_no: int, fail) -> str:
    """The parser's escape sequences: backslash, 'n' (a line feed) and the quote; others fail."""
    out, escaped = [], False
    for c in text:
        if escaped:
            if c not in allowed:
                fail(line_no, f"invalid escape sequence '\\{c}'")
            out.append("\n" if c == "n" else c)
            escaped = False
        elif c == "\\":
            escaped = True
        else:
            out.append(c)
    if escaped:
        fail(line_no, "invalid escape sequence at the end of the line")
    return "".join(out)


def text_to_metric_families(text: str) -> dict[str, Family]:
    """TextParser.TextToMetricFamilies for what a legacy-named exposition can hold: HELP and TYPE
    comments, samples `name{l="v",...} value [timestamp]`, histograms and summaries grouped by
    their labels. (The `{"quoted.name", ...}` form is for UTF-8 names, which legacy validation
    refuses anyway; it is not ported.) Raises ParseError where the Go parser fails."""
    families: dict[str, Family] = {}
    groups: dict[tuple, Metric] = {}     # the parser's summaries / histograms maps, by signature

    def fail(line_no: int, msg: str):
        raise ParseError(f"text format parsing error in line {line_no}: {msg}")

    def set_or_create(name: str, line_no: int) -> tuple[Family, str]:
        """setOrCreateCurrentMF: the family of `name`, and which part of it the name is."""
        if not LEGACY_METRIC.match(name):
            fail(line_no, f"invalid metric name {name!r}")
        if name in families:
            return families[name], "value"
        base = _summary_or_histogram_base(name, ("_count", "_sum"))
        if base in families and families[base].type == "SUMMARY":
            return families[base], "count" if name.endswith("_count") else "sum"
        base = _summary_or_histogram_base(name, ("_count", "_sum", "_bucket"))
        if base in families and families[base].type in ("HISTOGRAM", "GAUGE_HISTOGRAM"):
            return families[base], "count" if name.endswith("_count") else "sum" if name.endswith("_sum") else "bucket"
        families[name] = Family(name)
        return families[name], "value"

    for line_no, raw in enumerate(text.split("\n"), 1):
        line = raw.lstrip(" \t")
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].lstrip(" \t").split(None, 2)
            if len(parts) < 2 or parts[0] not in ("HELP", "TYPE"):
                continue                  # a generic comment, or a keyword alone
            keyword, name = parts[0], parts[1]
            family, _ = set_or_create(name, line_no)
            rest = parts[2] if len(parts) > 2 else ""
            if not rest:
                continue
            if keyword == "HELP":
                if family.help is not None:
                    fail(line_no, f"second HELP line for metric name {family.name!r}")
                family.help = unescape(rest, '\\n"', line_no, fail)   # readTokenUntilNewline(true)
            else:
                if family.type is not None:
                    fail(line_no, f"second TYPE line for metric name {family.name!r}, or TYPE reported after samples")
                typ = rest.upper()                               # the rest of the line, as it is
                if typ == "GAUGEHISTOGRAM":
                    typ = "GAUGE_HISTOGRAM"
                if typ not in METRIC_TYPES:
                    fail(line_no, f"unknown metric type {rest!r}")
                family.type = typ
            continue
        if line.startswith("{"):
            fail(line_no, "the braces form of a metric name is not ported (legacy names need none)")
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if not m:
            fail(line_no, "invalid metric name")
        name, pos = m.group(0), m.end()
        family, part = set_or_create(name, line_no)
        if family.type is None:
            family.type = "UNTYPED"
        labels: list[tuple[str, str]] = []
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == "{":
            pos += 1
            while True:
                while pos < len(line) and line[pos] in " \t":
                    pos += 1
                if pos < len(line) and line[pos] == "}":
                    pos += 1
                    break
                lm = re.match(r"[a-zA-Z_][a-zA-Z0-9_]*", line[pos:])
                if not lm:
                    fail(line_no, f"invalid label name for metric {family.name!r}")
                label, pos = lm.group(0), pos + lm.end()
                while pos < len(line) and line[pos] in " \t":
                    pos += 1
                if pos >= len(line) or line[pos] != "=":
                    fail(line_no, f"expected '=' after label name, found {line[pos:pos + 1]!r}")
                if label == "__name__":
                    fail(line_no, 'label name "__name__" is reserved')
                if not LEGACY_LABEL.match(label):
                    fail(line_no, f"invalid label name {label!r}")
                if any(n == label for n, _ in labels):
                    fail(line_no, f"duplicate label names for metric {family.name!r}")
                pos += 1
                while pos < len(line) and line[pos] in " \t":
                    pos += 1
                if pos >= len(line) or line[pos] != '"':
                    fail(line_no, "expected '\"' at start of label value")
                pos += 1
                value, escaped = [], False
                while True:
                    if pos >= len(line):
                        fail(line_no, "label value contains unescaped new-line")
                    c = line[pos]
                    pos += 1
                    if escaped:
                        if c in '"\\':
                            value.append(c)
                        elif c == "n":
                            value.append("\n")
                        else:
                            fail(line_no, f"invalid escape sequence '\\{c}'")
                        escaped = False
                    elif c == "\\":
                        escaped = True
                    elif c == '"':
                        break
                    else:
                        value.append(c)
                labels.append((label, "".join(value)))
                while pos < len(line) and line[pos] in " \t":
                    pos += 1
                if pos < len(line) and line[pos] == ",":
                    pos += 1
                    continue
                if pos < len(line) and line[pos] == "}":
                    pos += 1
                    break
                fail(line_no, f"unexpected end of label value {labels[-1][1]!r}")
        # readingValue: the value runs to the next blank or tab; after it, only the end of the line
        # or blanks and an integer timestamp that ends the line (trailing blanks included: Go reads
        # the rest of the line after the timestamp and refuses anything there).
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        vm = re.match(r"[^ \t]*", line[pos:])
        token, pos = vm.group(0), pos + vm.end()
        try:
            value = go_parse_float(token)
        except ValueError:
            fail(line_no, f"expected float as value, got {token!r}")
        timestamp = None
        if pos < len(line):
            rest = line[pos:].lstrip(" \t")
            tm = re.match(r"[^ \t]*", rest)
            if not re.fullmatch(r"[+-]?\d+", tm.group(0)):
                fail(line_no, f"expected integer as timestamp, got {tm.group(0)!r}")
            timestamp = int(tm.group(0))
            if rest[tm.end():]:
                fail(line_no, f"spurious string after timestamp: {rest[tm.end():]!r}")
        kind = family.type
        if kind in ("SUMMARY", "HISTOGRAM", "GAUGE_HISTOGRAM"):
            special = "quantile" if kind == "SUMMARY" else "le"
            real = [(n, v) for n, v in labels if n != special]
            key = (family.name, tuple(sorted(real)))
            metric = groups.get(key)
            if metric is None:
                metric = groups[key] = Metric(labels=real)
                family.metrics.append(metric)
            store = metric.summary if kind == "SUMMARY" else metric.histogram
            if store is None:
                store = {"buckets": [], "quantiles": []}
                if kind == "SUMMARY":
                    metric.summary = store
                else:
                    metric.histogram = store
            if part in ("count", "sum"):
                store[part] = value
            elif kind == "SUMMARY" and dict(labels).get("quantile") is not None:
                store["quantiles"].append((go_parse_float(dict(labels)["quantile"]), value))
            elif kind != "SUMMARY" and dict(labels).get("le") is not None:
                store["buckets"].append((go_parse_float(dict(labels)["le"]), value))
        else:
            metric = Metric(labels=labels)
            setattr(metric, kind.lower(), value)
            family.metrics.append(metric)
        if timestamp is not None:
            metric.timestamp_ms = timestamp
    return {name: f for name, f in families.items() if f.metrics}   # empty families are dropped


# -- llm-d-router's core metrics extractor ----------------------------------------------------

SPEC_RE = re.compile(r"^\s*(\S+?)\s*(?:\{([^}]*)\})?\s*$")        # spec.go metricSpecRE
LABEL_PAIR_RE = re.compile(r'^\s*(\S+?)\s*=\s*"([^"]*)"\s*$')      # labelPairRE
ADD_QUOTES_RE = re.compile(r'(\w+)\s*=\s*([^",}\s]+)')             # addQuotesRE


@dataclass
class Spec:
    name: str
    labels: dict[str, str]


def parse_string_to_spec(spec: str) -> Spec | None:
    """parseStringToSpec: `name{l=v,...}` (values quoted or not); "" disables the metric."""
    if spec == "":
        return None
    quoted = ADD_QUOTES_RE.sub(r'\1="\2"', spec)
    m = SPEC_RE.match(quoted)
    if m is None or not LEGACY_METRIC.match(m.group(1)):
        raise ValueError(f"not a valid metric specification: {spec!r}")
    labels = {}
    block = (m.group(2) or "").strip()
    if block:
        for pair in block.split(","):
            lm = LABEL_PAIR_RE.match(pair)
            if lm is None or not LEGACY_LABEL.match(lm.group(1)):
                raise ValueError(f"invalid label pair {pair!r} in specification: {spec!r}")
            labels[lm.group(1)] = lm.group(2)
    return Spec(m.group(1), labels)


def labels_match(spec: Spec, metric: Metric) -> bool:
    """labelsMatch: every spec label present with that value (the first pair of that name)."""
    return all(metric.label(name) == value for name, value in spec.labels.items())


def extract_value(metric: Metric | None) -> float:
    """extractValue: a gauge's or a counter's value; anything else (untyped too) reads 0."""
    if metric is None:
        return 0.0
    if metric.gauge is not None:
        return metric.gauge
    if metric.counter is not None:
        return metric.counter
    return 0.0


def get_latest_metric(spec: Spec, families: dict[str, Family]) -> Metric:
    """Spec.getLatestMetric: the matching series with the largest timestamp (strictly larger, from
    -1: without timestamps, the first one); errors when the family or a match is missing."""
    family = families.get(spec.name)
    if family is None:
        raise LookupError(f"metric family {spec.name!r} not found")
    if not family.metrics:
        raise LookupError(f"no metrics found for {spec.name!r}")
    latest, recent = None, -1
    for metric in family.metrics:
        if labels_match(spec, metric):
            ts = metric.timestamp_ms or 0
            if ts > recent:
                latest, recent = metric, ts
    if latest is None:
        raise LookupError(f"no matching metric found for {spec.name!r} with labels {spec.labels}")
    return latest


def get_latest_lora_metric(spec: Spec, families: dict[str, Family]) -> Metric | None:
    """LoRASpec.getLatestMetric: the matching series whose value (its creation time) is largest;
    None, not an error, when the family is absent (vLLM has none before an adapter loads)."""
    family = families.get(spec.name)
    if family is None or not family.metrics:
        return None
    latest, recent = None, -1.0
    for metric in family.metrics:
        if labels_match(spec, metric):
            value = extract_value(metric)
            if value > recent:
                latest, recent = metric, value
    return latest


def go_int(x: float) -> int:
    """Go's int(float64): truncation toward zero."""
    return int(math.trunc(x))


@dataclass
class EndpointMetrics:
    """The fwkdl.Metrics fields the extractor fills."""

    waiting_queue_size: int = 0
    running_requests_size: int = 0
    kv_cache_usage_percent: float = 0.0
    active_models: dict[str, int] = field(default_factory=dict)
    waiting_models: dict[str, int] = field(default_factory=dict)
    max_active_models: int = 0
    cache_block_size: int = 0
    cache_num_blocks: int = 0
    errors: list[str] = field(default_factory=list)


def add_adapters(models: dict[str, int], csv: str) -> None:
    """addAdapters: split on ',', trim spaces, skip empty names (an empty label is no adapter)."""
    for name in csv.split(","):
        if name.strip():
            models[name.strip()] = 0


def extract(mapping: dict[str, Spec | None], families: dict[str, Family],
            current: EndpointMetrics | None = None) -> EndpointMetrics:
    """Extractor.Extract for the mapping's queue, running, KV and LoRA specs, on a clone of the
    endpoint's current metrics; errors are collected as the Go code joins them."""
    m = EndpointMetrics(**{**(current or EndpointMetrics()).__dict__, "errors": []})
    for key, attr in (("queue", "waiting_queue_size"), ("running", "running_requests_size")):
        if mapping.get(key) is not None:
            try:
                setattr(m, attr, go_int(extract_value(get_latest_metric(mapping[key], families))))
            except LookupError as e:
                m.errors.append(str(e))
    if mapping.get("kv") is not None:
        try:
            m.kv_cache_usage_percent = extract_value(get_latest_metric(mapping["kv"], families))
        except LookupError as e:
            m.errors.append(str(e))
    if mapping.get("lora") is not None:
        metric = get_latest_lora_metric(mapping["lora"], families)
        if metric is not None:   # populateLoRAMetrics
            m.active_models, m.waiting_models = {}, {}
            for name, value in metric.labels:
                if name == "running_lora_adapters":
                    add_adapters(m.active_models, value)
                elif name == "waiting_lora_adapters":
                    add_adapters(m.waiting_models, value)
                elif name == "max_lora" and value != "":
                    try:
                        m.max_active_models = go_atoi(value)
                    except ValueError as e:
                        m.errors.append(str(e))
    if mapping.get("cache_info") is not None:  # populateCacheInfoMetrics, default label names
        try:
            metric = get_latest_metric(mapping["cache_info"], families)
        except LookupError as e:
            m.errors.append(str(e))
        else:
            m.cache_block_size = 0
            for name, value in metric.labels:
                if name in ("block_size", "num_gpu_blocks") and value != "":
                    try:
                        setattr(m, "cache_block_size" if name == "block_size" else "cache_num_blocks", go_atoi(value))
                    except ValueError as e:
                        m.errors.append(str(e))
    return m


def lora_affinity_score(target: str, m: EndpointMetrics) -> float:
    """LoraAffinityScorer.Score for one endpoint."""
    if target in m.active_models:
        return 1.0
    if len(m.active_models) + len(m.waiting_models) < m.max_active_models:
        return 0.8
    if target in m.waiting_models:
        return 0.6
    return 0.0


def epp_mapping() -> dict[str, Spec | None]:
    """The engine mapping our EPP config gives loraplex pods (deploy/kubernetes/epp.yaml), as
    newCoreMetricsExtractorPlugin builds it: the engine named by the pods' label, else the
    defaultEngine."""
    docs = list(yaml.safe_load_all(EPP_MANIFEST.read_text()))
    config_map = next(d for d in docs if d and d["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["epp-config.yaml"])
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    params = extractor["parameters"]
    engine = next(e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"])
    return {"queue": parse_string_to_spec(engine.get("queuedRequestsSpec", "")),
            "running": parse_string_to_spec(engine.get("runningRequestsSpec", "")),
            "kv": parse_string_to_spec(engine.get("kvUsageSpec", "")),
            "lora": parse_string_to_spec(engine.get("loraSpec", "")),
            "cache_info": parse_string_to_spec(engine.get("cacheInfoSpec", ""))}


# -- the port itself, on fixed inputs ---------------------------------------------------------

def test_text_parser_port_accepts_and_refuses_what_the_go_parser_does():
    ok = text_to_metric_families(
        '# HELP a:b x\n# TYPE a:b gauge\na:b{x="1",y="q\\"\\\\\\n"} 2.5 1700\n'
        "# TYPE h histogram\nh_bucket{le=\"1.0\"} 1.0\nh_bucket{le=\"+Inf\"} 2.0\nh_sum 3.0\nh_count 2.0\n"
        "plain 1e3\n# a generic comment\n\n")
    assert ok["a:b"].type == "GAUGE" and ok["a:b"].metrics[0].gauge == 2.5
    assert ok["a:b"].metrics[0].labels == [("x", "1"), ("y", 'q"\\\n')] and ok["a:b"].metrics[0].timestamp_ms == 1700
    assert ok["h"].metrics[0].histogram == {"buckets": [(1.0, 1.0), (math.inf, 2.0)], "quantiles": [],
                                            "sum": 3.0, "count": 2.0}
    assert ok["plain"].type == "UNTYPED" and extract_value(ok["plain"].metrics[0]) == 0.0
    for bad in ('x{a="1",a="2"} 1', 'x{__name__="y"} 1', "x 1_000", "x 0x1p3", 'x{a="\\t"} 1', "x 1 2 3",
                "# TYPE x gauge\n# TYPE x counter", "x 1\n# TYPE x gauge", "x{a=1} 1", "x{1a=\"1\"} 1",
                "# TYPE x sometype", "x 1 1.5", "x 1 ", "x 1 5 ", "x", "# TYPE x gauge \n", "# HELP x a\\tb"):
        with pytest.raises(ParseError):
            text_to_metric_families(bad)


def test_extractor_port_picks_the_newest_lora_series_and_splits_its_lists():
    families = text_to_metric_families(
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a, b",waiting_lora_adapters=""} 100.0\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="c",waiting_lora_adapters="d,,e"} 200.0\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 150.0\n'
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3.9\n")
    mapping = {"queue": parse_string_to_spec("vllm:num_requests_waiting"),
               "running": parse_string_to_spec("vllm:num_requests_running"),
               "lora": parse_string_to_spec("vllm:lora_requests_info")}
    m = extract(mapping, families)
    assert m.active_models == {"c": 0} and m.waiting_models == {"d": 0, "e": 0} and m.max_active_models == 4
    assert m.waiting_queue_size == 3                                   # int(float64) truncates
    assert m.errors == ["metric family 'vllm:num_requests_running' not found"]
    assert lora_affinity_score("c", m) == 1.0 and lora_affinity_score("d", m) == 0.8
    m.max_active_models = 3
    assert lora_affinity_score("d", m) == 0.6 and lora_affinity_score("z", m) == 0.0
    assert parse_string_to_spec('x{a=b, c="d"}') == Spec("x", {"a": "b", "c": "d"})
    assert parse_string_to_spec("") is None
    with pytest.raises(ValueError):
        parse_string_to_spec("not-a-metric")


def test_the_epp_mapping_names_what_loraplex_exports_as_gauges():
    mapping = epp_mapping()
    assert {k: v.name for k, v in mapping.items() if v} == {
        "queue": "vllm:num_requests_waiting", "running": "vllm:num_requests_running",
        "kv": "vllm:kv_cache_usage_perc", "lora": "vllm:lora_requests_info", "cache_info": "vllm:cache_config_info"}
    metrics = ServerMetrics(lambda: Snapshot(1, 2, 0.25, {"gpu": 1, "host": 0, "disk": 0}, ["sql"], [], 8,
                                             block_size=16, num_gpu_blocks=4096, prefix_caching=True), "m")
    families = text_to_metric_families(metrics.render()[0].decode())
    for spec in (s for s in mapping.values() if s):
        assert families[spec.name].type == "GAUGE", spec.name
    m = extract(mapping, families)
    assert (m.errors, m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent) == ([], 2, 1, 0.25)
    assert (m.active_models, m.waiting_models, m.max_active_models) == ({"sql": 0}, {}, 8)
    assert (m.cache_block_size, m.cache_num_blocks) == (16, 4096)


# -- a live server under a mixed workload -----------------------------------------------------

@dataclass
class Job:
    model: str
    submitted: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    error: str | None = None


def run_job(url: str, job: Job, max_tokens: int) -> None:
    body = {"model": job.model, "prompt": tasks.prompt("hello world"), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    job.submitted = time.monotonic()
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    now = time.monotonic()
                    job.first_token = job.first_token or now
                    job.last_token = now
    except Exception as e:  # reported by the test
        job.error = repr(e)
    job.finished = time.monotonic()


@dataclass
class Scrape:
    start: float
    end: float
    families: dict[str, Family]
    metrics: EndpointMetrics


def test_a_live_server_gives_the_picker_what_it_reads_during_a_mixed_workload():
    mapping = epp_mapping()
    base = "loraplex-demo"
    adapters = set(tasks.ADAPTERS)                    # upper, reverse, rot13
    slots, seqs = 2, 2
    config = ServerConfig(device="cpu", kv_cache_tokens=4096, max_num_seqs=seqs, max_gpu_adapters=slots,
                          max_host_adapters=4, api_keys=[API_KEY])
    with live_server(config) as (url, state):
        # The picker sends no credentials: /metrics must answer without the API key, which /v1 needs.
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401

        # /v1/models as the models data source would decode it (extractor/models ModelResponse).
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert models["object"] == "list"
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id[base].get("parent") is None
        for name in adapters:
            assert by_id[name]["parent"] == base and by_id[name]["object"] == "model"
            assert isinstance(by_id[name]["created"], int) and isinstance(by_id[name]["owned_by"], str)

        idle = extract(mapping, text_to_metric_families(httpx.get(url + "/metrics").text))
        assert idle.errors == [] and idle.max_active_models == slots
        assert (idle.waiting_queue_size, idle.running_requests_size) == (0, 0)

        # Two adapters' requests first (filling both slots and both sequences), then the third
        # adapter's and the base model's, which have to wait.
        jobs = [Job(m) for m in ("upper", "upper", "reverse", "reverse", "rot13", "rot13", base, base)]
        threads = [threading.Thread(target=run_job, args=(url, job, 40), daemon=True) for job in jobs]
        scrapes: list[Scrape] = []
        current = idle
        for i, t in enumerate(threads):
            t.start()
            if i in (1, 3):
                time.sleep(0.05)
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            start = time.monotonic()
            r = httpx.get(url + "/metrics")           # no Authorization header, as the picker
            end = time.monotonic()
            assert r.status_code == 200
            families = text_to_metric_families(r.text)   # the whole body must parse, or the scrape is lost
            current = extract(mapping, families, current)
            scrapes.append(Scrape(start, end, families, current))
            time.sleep(0.02)
        for t in threads:
            t.join(5)
        assert all(j.error is None and j.finished for j in jobs), [j.error for j in jobs]
        deadline = time.monotonic() + 5                # the engine retires the last ones at once
        while True:
            final = extract(mapping, text_to_metric_families(httpx.get(url + "/metrics").text))
            if (final.running_requests_size, final.waiting_queue_size) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)

    assert len(scrapes) >= 5
    seen_waiting_requests = seen_running = seen_waiting_adapter = seen_kv = False
    for s in scrapes:
        m = s.metrics
        assert m.errors == []
        for spec in (v for v in mapping.values() if v):
            assert s.families[spec.name].type == "GAUGE", spec.name
        lora_family = s.families[mapping["lora"].name]
        assert {n for n, _ in lora_family.metrics[0].labels} == {"max_lora", "running_lora_adapters",
                                                                 "waiting_lora_adapters"}
        assert len(lora_family.metrics) == 1 and lora_family.metrics[0].gauge > 1e9   # a unix time
        # Requests that may be in the engine during the scrape: submitted before it ended, not done
        # before it started.
        outstanding = [j for j in jobs if j.submitted < s.end and (j.finished is None or j.finished > s.start)]
        assert 0 <= m.running_requests_size <= seqs
        assert 0 <= m.waiting_queue_size
        assert m.running_requests_size + m.waiting_queue_size <= len(outstanding)
        assert 0.0 <= m.kv_cache_usage_percent <= 1.0
        assert m.max_active_models == slots
        assert (m.cache_block_size, m.cache_num_blocks) == (16, 4096 // 16)  # EngineConfig's block size
        assert set(m.active_models) <= adapters and len(m.active_models) <= slots
        assert set(m.waiting_models) <= adapters and not set(m.active_models) & set(m.waiting_models)
        assert base not in m.active_models and base not in m.waiting_models
        # A waiting adapter has a request in the engine that had not started streaming yet.
        for name in m.waiting_models:
            assert any(j.model == name and (j.first_token is None or j.first_token > s.start) for j in outstanding), \
                (name, s.start)
        # An adapter whose request streamed tokens before the scrape and went on well after it
        # (0.1 s: several engine steps, more than a token's way to the client) was running then,
        # so in a GPU slot.
        for j in jobs:
            if j.model in adapters and j.first_token and j.first_token < s.start and j.last_token > s.end + 0.1:
                assert j.model in m.active_models, (j.model, s.start)
        seen_waiting_requests |= m.waiting_queue_size > 0
        seen_running |= m.running_requests_size > 0
        seen_waiting_adapter |= bool(m.waiting_models)
        seen_kv |= m.kv_cache_usage_percent > 0
    assert seen_waiting_requests and seen_running and seen_kv
    assert seen_waiting_adapter, "no scrape showed an adapter waiting for a GPU slot"
    assert (final.errors, final.waiting_queue_size, final.running_requests_size, final.waiting_models) == ([], 0, 0, {})
    assert set(final.active_models) <= adapters and final.max_active_models == slots
