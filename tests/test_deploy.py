"""The deployment files agree with the code and with each other: the dashboard queries only
metrics the server exports, compose/Prometheus/Grafana point at each other, and the Dockerfile
builds a non-root image that runs `loraplex serve` with a health check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.metrics import ServerMetrics, Snapshot

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"

try:  # a dependency of transformers, so normally there; the text checks below run without it
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML not installed")

METRIC_NAME = re.compile(r"(?<![\w:])(loraplex_[A-Za-z0-9_]+|vllm:[A-Za-z0-9_:]+)")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}


# -- the dashboard against a live exposition ---------------------------------------------------


def exported_families() -> dict:
    """Families of a ServerMetrics that has seen one of everything."""
    m = ServerMetrics(lambda: Snapshot(2, 1, 0.5, {"gpu": 1, "host": 2, "disk": 3}, ["sql"], ["chat"], 4,
                                       adapter_memory={"gpu": (1 << 20, 8 << 20), "host": (2 << 20, 32 << 20)},
                                       adapter_pages=(512, 4096), adapter_bytes=[("sql", "gpu", 1 << 20)]), "base")
    m.observe_request("sql", "stop", 12, 8, 1.2, 0.1, 0.3)
    m.observe_token_gap(0.02)
    m.observe_error(429)
    for kind, seconds in (("load_host", 0.05), ("load_gpu", 0.001), ("evict_gpu", None), ("evict_host", None),
                          ("load_failed", None)):
        m.on_adapter_event(kind, "sql", seconds)
    m.observe_step(SimpleNamespace(prefill_tokens=12, decode_tokens=3, adapters=2, seconds=0.01, preempted=1,
                                   cache_lookups=((None, 32, 16), ("sql", 20, 0))))
    return {f.name: f for f in text_string_to_metric_families(m.render()[0].decode())}


def dashboard_queries() -> list[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    found = []

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key in ("expr", "query", "definition"):
            found.append(node)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def family_of(name: str, families: dict) -> tuple[str, str]:
    """(family name, the series' role) for a PromQL series name; suffixes are stripped only
    where the family's type produces them (a gauge named `x_count` stays itself)."""
    if name in families and families[name].type not in SUFFIXES:
        return name, "value"
    for kind, suffixes in SUFFIXES.items():
        for suffix in suffixes:
            base = name[: -len(suffix)]
            if name.endswith(suffix) and base in families and families[base].type == kind:
                return base, suffix
    raise AssertionError(f"the dashboard queries {name!r}, which the server does not export")


def test_every_dashboard_metric_is_exported():
    families = exported_families()
    samples = {s.name for f in families.values() for s in f.samples}
    queries = dashboard_queries()
    names = {n for q in queries for n in METRIC_NAME.findall(q)}
    assert len(names) >= 20, sorted(names)
    for name in sorted(names):
        family, _ = family_of(name, families)
        assert name in samples, f"{name} ({family}) has no sample in the exposition"
        if family.startswith("vllm:"):
            assert families[family].type == "gauge"
    # The dashboard shows every loraplex_* family (the vllm:* gauges repeat their values).
    used = {family_of(n, families)[0] for n in names}
    missing = {f for f in families if f.startswith("loraplex_")} - used
    assert not missing, f"not on the dashboard: {sorted(missing)}"


def test_dashboard_promql_uses_each_type_correctly():
    families = exported_families()
    for query in dashboard_queries():
        for name in re.findall(r"rate\(\s*([\w:]+)", query):
            family, _ = family_of(name, families)
            assert families[family].type in SUFFIXES, f"rate() over the gauge {name}: {query}"
        for name in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,[^()]*\(\s*rate\(\s*([\w:]+)", query):
            assert family_of(name, families)[1] == "_bucket", query
            assert re.search(r"by \(le\b", query), f"quantile without `by (le ...)`: {query}"
        for name in METRIC_NAME.findall(query):
            family, role = family_of(name, families)
            if families[family].type == "histogram":
                assert role != "value", f"a histogram queried without a suffix: {query}"


def test_dashboard_structure():
    d = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t.get("expr") for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
    exprs = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(loraplex_time_to_first_token_seconds_bucket" in exprs
    assert re.search(r"topk\(\s*\d+\s*,[^\n]*loraplex_model_requests_total", exprs)
    assert "sum by (le, tier) (rate(loraplex_adapter_load_seconds_bucket" in exprs
    assert "sum by (finish_reason)" in exprs and "sum by (code)" in exprs


def test_metric_name_extraction_rejects_unknown_names():
    families = exported_families()
    with pytest.raises(AssertionError):
        family_of("loraplex_no_such_metric_total", families)
    with pytest.raises(AssertionError):       # `_bucket` of a gauge is no series
        family_of("loraplex_requests_running_bucket", families)
    with pytest.raises(AssertionError):       # a counter's family name is not a series name
        family_of("loraplex_requests", families)
    assert family_of("loraplex_requests_total", families) == ("loraplex_requests", "_total")
    assert family_of("vllm:lora_requests_info", families) == ("vllm:lora_requests_info", "value")


# -- compose, Prometheus and Grafana ------------------------------------------------------------


def test_deploy_yaml_files_parse_as_text():
    """Without PyYAML: the files exist, use spaces, and name what the others expect."""
    for path in [DEPLOY / "compose.yaml", DEPLOY / "prometheus.yml",
                 *sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yml"))]:
        text = path.read_text()
        assert "\t" not in text, path
    compose = (DEPLOY / "compose.yaml").read_text()
    for service in ("loraplex", "prometheus", "grafana"):
        assert re.search(rf"^  {service}:\s*$", compose, re.MULTILINE), service
    assert '"loraplex:8000"' in (DEPLOY / "prometheus.yml").read_text()


def load(path: Path):
    return yaml.safe_load(path.read_text())


def option(args: list[str], name: str) -> list[str]:
    """Values of `--name=v` / `--name v` in an argument list."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
        elif a == f"--{name}" and i + 1 < len(args):
            out.append(args[i + 1])
    return out


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        # The source may be a `${VAR:-default}` expression, itself holding a colon.
        m = re.fullmatch(r"(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)(?::(\w+))?", v)
        assert m, f"unexpected volume syntax {v!r}"
        source, target, mode = m.groups()
        default = re.fullmatch(r"\$\{\w+:-([^}]*)\}", source)
        out[target] = (default.group(1) if default else source, mode or "rw")
    return out


def env(service: dict) -> dict[str, str | None]:
    e = service.get("environment", {})
    if isinstance(e, dict):
        return e
    return {k: (v if sep else None) for k, sep, v in (item.partition("=") for item in e)}


@needs_yaml
def test_compose_prometheus_grafana_agree():
    compose = load(DEPLOY / "compose.yaml")
    prom = load(DEPLOY / "prometheus.yml")
    services = compose["services"]
    assert {"loraplex", "prometheus", "grafana"} <= set(services)

    # loraplex: built from the repository's Dockerfile, on a GPU, models read-only.
    lp = services["loraplex"]
    context = (DEPLOY / lp["build"]["context"]).resolve()
    assert (context / lp["build"].get("dockerfile", "Dockerfile")).is_file()
    assert context == ROOT
    devices = lp["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    args = lp["command"]
    port = int(option(args, "port")[0])
    assert option(args, "host") == ["0.0.0.0"]
    _, models_mode = mounts(lp)["/models"]
    assert models_mode == "ro"
    assert option(args, "model")[0].startswith("/models/")
    assert option(args, "adapter-root") and all(r.startswith("/models/") for r in option(args, "adapter-root"))
    assert str(port) in {p.split(":")[-1] for p in lp["ports"]}

    # Prometheus scrapes that service on that port, with the config compose mounts.
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    job = jobs["loraplex"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"loraplex:{port}" in targets
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert (job.get("scrape_interval") or prom["global"]["scrape_interval"]) == "5s"
    pr = services["prometheus"]
    config_path = option(pr["command"], "config.file")[0]
    source, _ = mounts(pr)[config_path]
    assert (DEPLOY / source).resolve() == (DEPLOY / "prometheus.yml").resolve()

    # Grafana: provisioning and dashboards mounted where the provisioning files say.
    gr = services["grafana"]
    gm = mounts(gr)
    prov_source, _ = gm["/etc/grafana/provisioning"]
    prov = DEPLOY / prov_source
    ds = load(prov / "datasources" / "prometheus.yml")["datasources"]
    assert ds[0]["type"] == "prometheus"
    prom_port = {p.split(":")[-1] for p in pr["ports"]}
    assert ds[0]["url"] in {f"http://prometheus:{p}" for p in prom_port}
    providers = load(prov / "dashboards" / "loraplex.yml")["providers"]
    dash_dir = providers[0]["options"]["path"]
    dash_source, _ = gm[dash_dir]
    assert (DEPLOY / dash_source / "loraplex.json").resolve() == DASHBOARD.resolve()
    home = env(gr).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home == f"{dash_dir}/loraplex.json"

    # Every bind-mounted file or directory of the stack exists (the models directory is the user's).
    for name, service in services.items():
        for target, (source, _) in mounts(service).items():
            if source.startswith(".") and target != "/models":
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    # Named volumes are declared.
    for service in services.values():
        for target, (source, _) in mounts(service).items():
            if not source.startswith((".", "/", "$")):
                assert source in compose.get("volumes", {}), source


@needs_yaml
def test_compose_passes_secrets_by_environment_only():
    lp = load(DEPLOY / "compose.yaml")["services"]["loraplex"]
    assert not option(lp["command"], "api-key") and not option(lp["command"], "admin-key")
    e = env(lp)
    # Passed through from the shell or absent: an empty LORAPLEX_ADMIN_KEY would be refused.
    assert e.get("LORAPLEX_API_KEY", None) is None and e.get("LORAPLEX_ADMIN_KEY", None) is None


# -- the Dockerfile -------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        op, _, rest = current.partition(" ")
        lines.append((op.upper(), rest.strip()))
        current = ""
    return lines


def test_dockerfile():
    ins = dockerfile()
    ops = [op for op, _ in ins]
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    base = next(rest for op, rest in ins if op == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.match(r"nvidia/cuda:12\.\d+(\.\d+)?-\w+-ubuntu", base), base
    assert re.search(r"/whl/cu12\d\b", args["TORCH_INDEX"])
    readme_torch = re.search(r"torch==([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert args["TORCH_VERSION"] == readme_torch
    assert any(op == "RUN" and re.search(r"pip install \.(\s|$)", rest) for op, rest in ins)

    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    assert "8000" in next(rest for op, rest in ins if op == "EXPOSE").split()
    assert json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT")) == ["loraplex", "serve"]
    assert json.loads(next(rest for op, rest in ins if op == "CMD")) == ["--host", "0.0.0.0", "--port", "8000"]
    # vLLM manifests: `vllm serve ...` runs loraplex serve, and replaced args still listen everywhere
    shim = next(rest for op, rest in ins if op == "RUN" and "/opt/venv/bin/vllm" in rest)
    assert 'exec loraplex "$@"' in shim and "chmod 755" in shim
    assert any(op == "ENV" and rest == "LORAPLEX_HOST=0.0.0.0" for op, rest in ins)
    health = next(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "/health" in health and "urllib" in health and "curl" not in health
    # The script the entrypoint names exists.
    assert re.search(r'^\[project\.scripts\]\s*\nloraplex\s*=', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)


def healthcheck_command() -> list[str]:
    health = next(rest for op, rest in dockerfile() if op == "HEALTHCHECK")
    return json.loads(health[health.index("CMD") + 3:].strip())


@pytest.mark.parametrize("status,healthy", [(200, True), (503, False)])
def test_healthcheck_command_runs(status, healthy):
    """The HEALTHCHECK's own command, pointed at a local stand-in: exit 0 on 200, not on 503."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd = healthcheck_command()
        assert cmd[0] == "python" and cmd[1] == "-c" and ":8000/" in cmd[2]
        code = cmd[2].replace(":8000/", f":{server.server_port}/")
        rc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert (rc == 0) == healthy


def test_dockerignore():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "bench/out"} <= patterns
    assert any("__pycache__" in p for p in patterns)
    for needed in ("pyproject.toml", "README.md", "loraplex"):   # what the Dockerfile copies
        assert needed not in patterns
