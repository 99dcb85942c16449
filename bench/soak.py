"""A bounded loopback soak of `loraplex serve`: concurrent mixed traffic over the base model and
adapters while an admin loop registers, serves, unloads and merges, every completed request
checked exact, nothing lost, and the server back to idle with nothing held afterwards.

The real server (`loraplex serve` in a subprocess, on 127.0.0.1 and a free port: the bundled
demo model, CPU, the reference kernels, OMP_NUM_THREADS=1: `bench/serve.py`'s `role_env`) with
2 GPU adapter slots, 3 host rows and a KV cache of a few requests, so that adapters are paged
in and evicted and sequences preempted all along. The demo adapters are copied under a temp
adapter root (`--adapter-root`), and the server's TMPDIR is a temp dir of ours, so the
registry's work_dir (a `loraplex-merged-*` temp dir: no flag names it) is where we can see it.

1. calibrate   each (model, route, text) the clients use, one request at a time: the greedy
               text (temperature 0, --tokens tokens, ignore_eos) is its reference
2. soak        for --duration seconds, --clients asyncio clients (httpx) send requests one after
               another: /v1/completions and /v1/chat/completions, streaming or not, over the base
               model, the demo adapters and the adapters the admin loop has registered; some
               streams are cut after a few events on purpose. Meanwhile the admin loop, over
               and over: registers a copy of a demo adapter under a new name, serves a few
               requests on it, unloads it while they run; merges two demo adapters into a new
               one (methods in turn), calibrates it (one request per route, under load: a merge's
               text is whatever it is, but the same every time after), serves, unloads. Unloads
               alternate forced (?force=true) and draining; after each, one more request for
               the name must be refused at once.
3. checks      every request sent ends in exactly one outcome:
                 exact              finish length/stop, text == reference (streams: the deltas
                                    joined), `length` with --tokens tokens
                 cut                cut on purpose (the text so far a prefix of the reference)
                 refused: unloaded  404 model_not_found (HTTP or stream error event) for an
                                    adapter the admin loop had begun to unload
                 aborted            finish abort after a forced unload of its adapter (the
                                    text so far a prefix of the reference)
                 failure: ...       anything else: a wrong text, 5xx, another status, an error
                                    event, a stream without [DONE], a connection error, no
                                    answer within --request-timeout
               and the server agrees: its finished-request counters grew by exactly the
               requests it answered (200s without an error event), its 404s by the refusals,
               no other error status.
               After the soak, idle: running/waiting gauges (loraplex_ and vllm:) and KV use
               0; `GET /admin/adapters` lists only the demo adapters, none draining, no refs
               held, slots and host rows only theirs; no per-adapter metric series of an
               unloaded adapter; the work_dir empty; no traceback in the server log; SIGTERM
               exits 0 and the work_dir is gone.
Exit status 1 on any failure; a table of counts at the end.

Run:
    python bench/soak.py                    # 120 s of load, 8 clients
    python bench/soak.py --duration 600 --clients 12
    python bench/soak.py --smoke            # CI: about 30 s in all, server start included
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

from bench.serve import free_port, role_env, wait_ready  # noqa: E402

BASE = "loraplex-demo"
DEMO_ADAPTERS = ("upper", "reverse", "rot13")
ADMIN_KEY = "soak-admin-key"
ROUTES = ("completions", "chat")
TEXTS = ("hello world", "soak test", "abc def ghi", "lora")
MERGE_METHODS = ("linear", "svd", "ties", "dare_linear")  # cat: rank 16 + 16 > --max-rank 16
SERVE_CMD = "import sys; from loraplex import cli; sys.exit(cli.main())"


def prompt(text: str) -> str:
    return f"Text: {text}\nOutput: "  # loraplex.demo.tasks.prompt, without importing torch here


@dataclass
class Stats:
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)     # one per request sent
    exact_by_kind: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)        # what was sent: route x stream
    admin: Counter = field(default_factory=Counter)
    calibrations: int = 0                                  # reference requests (all reach the engine)
    answered: int = 0                                      # 200s without an error event: the engine ran them
    admin_failures: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def count(self, outcome: str, detail: str = "") -> None:
        self.outcomes[outcome] += 1
        if outcome.startswith("failure") and detail:
            self.examples.setdefault(outcome, [])
            if len(self.examples[outcome]) < 3:
                self.examples[outcome].append(detail)

    def failures(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k.startswith("failure")) + len(self.admin_failures)


class Soak:
    def __init__(self, args, port: int, adapter_root: Path, tmpdir: Path):
        import httpx

        self.args = args
        self.base_url = f"http://127.0.0.1:{port}"
        self.adapter_root, self.tmpdir = adapter_root, tmpdir
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=httpx.Timeout(args.request_timeout),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        self.stats = Stats()
        self.texts = TEXTS[:args.texts]
        self.refs: dict[tuple[str, str, str], str] = {}   # (reference name, route, text) -> text
        # the names clients may pick now (ordered, so a seed replays the same choices) -> kind
        self.live: dict[str, str] = {BASE: "base", **{n: "demo adapter" for n in DEMO_ADAPTERS}}
        self.ref_names: dict[str, str] = {}                # a copy's name -> its source's (its references)
        self.dynamic: dict[str, str] = {}                  # admin-registered name -> "copy" | "merge"
        self.unloading: set[str] = set()                   # unload begun: a 404 is expected
        self.forced: set[str] = set()                      # forced unload begun: abort is expected
        self.merged_paths: list[Path] = []
        self.tasks: set[asyncio.Task] = set()
        self.rng = random.Random(args.seed)
        self.calibrate_seconds = self.soak_seconds = 0.0
        self.counters: dict[str, float] = {}               # the server's, over the run
        self.work_dir: Path | None = None

    # -- one request ------------------------------------------------------------------------

    def body(self, model: str, route: str, text: str, stream: bool) -> dict:
        body = {"model": model, "max_tokens": self.args.tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if route == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = prompt(text)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def request(self, model: str, route: str, text: str, stream: bool, cut_after: int | None = None,
                      refused: bool = False) -> None:
        """Send one request and count its one outcome (`refused`: it must be refused)."""
        self.stats.sent += 1
        self.stats.modes[f"{route} {'stream' if stream else 'plain'}"] += 1
        try:
            outcome, detail = await asyncio.wait_for(self._request(model, route, text, stream, cut_after),
                                                     self.args.request_timeout + 5)
        except asyncio.TimeoutError:
            outcome, detail = "failure: timeout", f"{model} {route} stream={stream}"
        except Exception as exc:  # httpx's transport errors, a body that is not JSON
            outcome = f"failure: {type(exc).__name__}"
            detail = f"{model} {route} stream={stream}: {exc!r}"[:300]
        if refused and outcome != "refused: unloaded":
            detail = f"{model} {route} stream={stream}: {outcome} {detail}"
            outcome = "failure: served after unload"
        if outcome == "exact":
            self.stats.exact_by_kind[self.kind(model)] += 1
        self.stats.count(outcome, detail)

    def kind(self, model: str) -> str:
        return "base" if model == BASE else self.dynamic.get(model, "demo adapter")

    async def _request(self, model, route, text, stream, cut_after) -> tuple[str, str]:
        url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        body = self.body(model, route, text, stream)
        what = f"{model} {route} stream={stream} {text!r}"
        if not stream:
            r = await self.http.post(url, json=body)
            if r.status_code != 200:
                return self.refusal(model, r.status_code, _code(r.content), what, r.text[:200])
            self.stats.answered += 1
            out = r.json()
            choice = out["choices"][0]
            got = choice["message"]["content"] if route == "chat" else choice["text"]
            return self.judge(model, route, text, got, choice["finish_reason"],
                              out["usage"]["completion_tokens"], what)
        async with self.http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raw = await r.aread()
                detail = raw[:200].decode(errors="replace")
                return self.refusal(model, r.status_code, _code(raw), what, detail)
            parts, finish, tokens, events, done, error = [], None, None, 0, False, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    continue
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event["choices"]:
                    parts.append((choice.get("delta") or {}).get("content") or "" if route == "chat"
                                 else choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
                events += 1
                if cut_after is not None and events >= cut_after and finish is None:
                    self.stats.answered += 1
                    so_far = "".join(parts)
                    if not self.prefix_ok(model, route, text, so_far):
                        return "failure: wrong text", f"{what}: cut stream's text {so_far!r} is not a prefix"
                    return "cut", ""  # leaving the block closes the connection: the server aborts it
        if error is not None:
            return self.refusal(model, 200, error.get("code"), what, json.dumps(error)[:200])
        self.stats.answered += 1
        if not done:
            return "failure: stream without [DONE]", what
        return self.judge(model, route, text, "".join(parts), finish, tokens, what)

    def refusal(self, model: str, status: int, code, what: str, detail: str) -> tuple[str, str]:
        if status in (200, 404) and code == "model_not_found" and model in self.unloading:
            return "refused: unloaded", ""
        kind = f"HTTP {status}" if status != 200 else f"error event ({code})"
        return f"failure: {kind}", f"{what}: {detail}"

    def ref(self, model: str, route: str, text: str) -> str | None:
        return self.refs.get((self.live_ref(model), route, text))

    def live_ref(self, model: str) -> str:
        return self.ref_names.get(model, model)

    def prefix_ok(self, model, route, text, got: str) -> bool:
        ref = self.ref(model, route, text)
        return ref is not None and ref.startswith(got)

    def judge(self, model, route, text, got: str, finish, tokens, what: str) -> tuple[str, str]:
        ref = self.ref(model, route, text)
        if finish in ("length", "stop"):
            if ref is None:
                return "failure: no reference", what
            if got != ref:
                return "failure: wrong text", f"{what}: got {got!r}, reference {ref!r}"
            if finish == "length" and tokens is not None and tokens != self.args.tokens:
                return "failure: wrong token count", f"{what}: {tokens} tokens, finish length"
            return "exact", ""
        if finish == "abort" and model in self.forced:
            if ref is not None and not ref.startswith(got):
                return "failure: wrong text", f"{what}: aborted text {got!r} is not a prefix of {ref!r}"
            return "aborted", ""
        return f"failure: finish {finish}", f"{what}: text {got!r}"

    # -- calibration ------------------------------------------------------------------------

    async def calibrate(self, model: str, routes=ROUTES, texts=None) -> str | None:
        """The references of `model` (one request at a time); an error message, or None."""
        for route in routes:
            for text in texts or self.texts:
                url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
                self.stats.calibrations += 1
                r = await self.http.post(url, json=self.body(model, route, text, False))
                if r.status_code != 200:
                    return f"calibrating {model} {route} {text!r}: HTTP {r.status_code} {r.text[:200]}"
                out = r.json()
                choice = out["choices"][0]
                if choice["finish_reason"] not in ("length", "stop"):
                    return f"calibrating {model} {route} {text!r}: finish {choice['finish_reason']}"
                got = choice["message"]["content"] if route == "chat" else choice["text"]
                self.refs[(model, route, text)] = got
        return None

    # -- the clients ------------------------------------------------------------------------

    def pick(self, rng: random.Random) -> tuple[str, str, str]:
        names = list(self.live)
        dynamic = [n for n in names if n in self.dynamic]
        # the admin loop's adapters a good share of the time, while they exist
        model = rng.choice(dynamic) if dynamic and rng.random() < 0.35 else rng.choice(names)
        ref_name = self.live_ref(model)
        choices = [(route, text) for (name, route, text) in self.refs if name == ref_name]
        route, text = rng.choice(choices)
        return model, route, text

    async def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        while time.monotonic() < deadline:
            model, route, text = self.pick(rng)
            stream = rng.random() < 0.5
            cut = rng.randint(1, 4) if stream and rng.random() < self.args.cut_share else None
            await self.request(model, route, text, stream, cut)

    # -- the admin loop ---------------------------------------------------------------------

    async def admin(self, op: str, method: str, url: str, expect: int, **kw):
        r = await self.http.request(method, url, headers=self.admin_headers, **kw)
        if r.status_code != expect:
            self.stats.admin[f"{op} FAILED"] += 1
            self.stats.admin_failures.append(f"{op} {url}: HTTP {r.status_code} {r.text[:200]}")
            return None
        self.stats.admin[op] += 1
        return r.json()

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve_then_unload(self, name: str, force: bool) -> None:
        """A few requests on `name`, then unload it while they run."""
        rng = self.rng
        for _ in range(3):
            ref_name = self.live_ref(name)
            route, text = rng.choice([(r, t) for (n, r, t) in self.refs if n == ref_name])
            self.spawn(self.request(name, route, text, rng.random() < 0.5))
        await asyncio.sleep(rng.uniform(0.2, self.args.hold))
        self.live.pop(name, None)
        self.unloading.add(name)
        if force:
            self.forced.add(name)
        if await self.admin(f"unload ({'forced' if force else 'drain'})", "DELETE",
                            f"/admin/adapters/{name}" + ("?force=true" if force else ""), 200) is not None:
            # new requests are refused at once, drained or forced
            route, text = rng.choice([(r, t) for (n, r, t) in self.refs if n == ref_name])
            await self.request(name, route, text, rng.random() < 0.5, refused=True)

    async def admin_loop(self, deadline: float) -> None:
        forced, i = True, 0
        while time.monotonic() < deadline:
            src = DEMO_ADAPTERS[i % len(DEMO_ADAPTERS)]
            name = f"copy{i}-{src}"
            if await self.admin("register copy", "POST", "/admin/adapters", 201,
                                json={"name": name, "path": str(self.adapter_root / src)}) is not None:
                self.ref_names[name] = src
                self.dynamic[name] = "copy"
                self.live[name] = "copy"
                await self.serve_then_unload(name, forced)
                forced = not forced
            if time.monotonic() >= deadline:
                break
            method = MERGE_METHODS[i % len(MERGE_METHODS)]
            a, b = DEMO_ADAPTERS[i % 3], DEMO_ADAPTERS[(i + 1) % 3]
            name = f"merge{i}-{method}"
            body = {"name": name, "method": method,
                    "sources": [{"name": a, "weight": 0.6}, {"name": b, "weight": 0.4}]}
            if method == "svd":
                body["rank"] = 16
            if method in ("ties", "dare_linear"):
                body["density"], body["seed"] = 0.7, i
            info = await self.admin("merge", "POST", "/admin/adapters/merge", 201, json=body)
            if info is not None:
                self.merged_paths.append(Path(info["path"]))
                self.dynamic[name] = "merge"
                # its references, under load: the text a merge makes is whatever it is, but it
                # must be the same every time after
                error = await self.calibrate(name, texts=self.texts[:1])
                if error:
                    self.stats.count("failure: merge calibration", error)
                else:
                    self.live[name] = "merge"
                    await self.serve_then_unload(name, forced)
                    forced = not forced
                if name not in self.unloading:  # never left registered
                    self.unloading.add(name)
                    await self.admin("unload (drain)", "DELETE", f"/admin/adapters/{name}", 200)
            await asyncio.sleep(self.rng.uniform(0.1, 0.5))
            i += 1

    # -- after the soak ---------------------------------------------------------------------

    async def metrics(self) -> dict[str, float]:
        r = await self.http.get("/metrics")
        r.raise_for_status()
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    async def wait_idle(self, timeout: float) -> tuple[bool, dict[str, float]]:
        gauges = ("loraplex_requests_running", "loraplex_requests_waiting", "loraplex_kv_cache_usage_ratio",
                  f'vllm:num_requests_running{{model_name="{BASE}"}}',
                  f'vllm:num_requests_waiting{{model_name="{BASE}"}}',
                  f'vllm:kv_cache_usage_perc{{model_name="{BASE}"}}')
        deadline = time.monotonic() + timeout
        while True:
            m = await self.metrics()
            idle = all(m.get(g) == 0 for g in gauges)
            if idle or time.monotonic() > deadline:
                return idle, {g: m.get(g) for g in gauges}
            await asyncio.sleep(0.2)


def _code(raw: bytes):
    try:
        return json.loads(raw)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def run_soak(args, soak: Soak) -> list[tuple[str, bool, str]]:
    """Calibrate, soak, check; the final checks as (what, passed, detail)."""
    checks: list[tuple[str, bool, str]] = []

    def check(what: str, ok: bool, detail: str = "") -> None:
        checks.append((what, bool(ok), detail))

    before = await soak.metrics()
    t0 = time.monotonic()
    for model in (BASE, *DEMO_ADAPTERS):
        error = await soak.calibrate(model)
        check(f"calibrate {model}", error is None, error or "")
    soak.calibrate_seconds = time.monotonic() - t0
    if any(not ok for _, ok, _ in checks):
        return checks
    same = all(soak.refs[(m, "chat", t)] == soak.refs[(m, "completions", t)]
               for m in (BASE, *DEMO_ADAPTERS) for t in soak.texts)
    check("chat and completions references agree (same prompt ids)", same)

    deadline = time.monotonic() + args.duration
    soak.soak_start = time.monotonic()
    workers = [asyncio.ensure_future(soak.client(i, deadline)) for i in range(args.clients)]
    workers.append(asyncio.ensure_future(soak.admin_loop(deadline)))
    await asyncio.gather(*workers)
    while soak.tasks:
        await asyncio.gather(*list(soak.tasks))
    soak.soak_seconds = time.monotonic() - soak.soak_start

    s = soak.stats
    check("every request sent has one outcome", sum(s.outcomes.values()) == s.sent,
          f"{sum(s.outcomes.values())} outcomes for {s.sent} sent")
    check("no failed request", s.failures() == 0, f"{s.failures()} failures")

    idle, gauges = await soak.wait_idle(30)
    check("idle: running, waiting and KV cache gauges 0", idle, "" if idle else json.dumps(gauges))

    r = await soak.http.get("/admin/adapters", headers=soak.admin_headers)
    listing = r.json()
    usage, infos = listing["usage"], listing["data"]
    names = sorted(i["name"] for i in infos)
    check("registered: the demo adapters only", names == sorted(DEMO_ADAPTERS), f"listed {names}")
    busy = [(i["name"], i["state"], i["refcount"], i["running"]) for i in infos
            if i["state"] != "ready" or i["refcount"] or i["running"]]
    check("no adapter draining or holding requests", not busy, f"{busy}")
    tiers = Counter(i["tier"] for i in infos)
    registered = len(infos)
    check("usage: nothing draining or waiting for a slot",
          usage["draining"] == 0 and usage["waiting_for_slot"] == 0, json.dumps(usage))
    check("GPU slots held only by registered adapters", usage["gpu_slots_used"] == tiers["gpu"] <= registered,
          f"gpu_slots_used {usage['gpu_slots_used']}, tier gpu {tiers['gpu']}, registered {registered}")
    held = usage["host_adapters"]
    check("host copies held only by registered adapters, within both bounds",
          tiers["host"] <= held <= min(registered, usage["host_slots"]) and usage["host_claims"] == 0
          and usage["host_bytes_used"] <= usage["host_bytes"],
          f"host copies {held} of {usage['host_slots']}, {usage['host_bytes_used']} of {usage['host_bytes']} "
          f"bytes, claims {usage['host_claims']}, tiers {dict(tiers)}")
    pages = sum(i["pages"] for i in infos if i["gpu_bytes"])
    check("GPU pages held only by resident adapters", usage["gpu_pages_used"] == pages <= usage["gpu_pages"],
          f"pages used {usage['gpu_pages_used']} of {usage['gpu_pages']}, resident adapters' {pages}")

    after = await soak.metrics()
    gauge_tiers = {t: after.get(f'loraplex_adapters{{tier="{t}"}}') for t in ("gpu", "host", "disk")}
    check("loraplex_adapters gauges match the registry", all(gauge_tiers[t] == tiers[t] for t in gauge_tiers),
          f"gauges {gauge_tiers}, listing {dict(tiers)}")
    stale = sorted({k for k in after for n in soak.dynamic if f'model="{n}"' in k})
    stale_names = {n for n in soak.dynamic if any(f'model="{n}"' in k for k in stale)}
    check("no per-adapter series of unloaded adapters", not stale,
          f"{len(stale)} series of {len(stale_names)} of {len(soak.dynamic)} unloaded adapters left, "
          f"e.g. {', '.join(stale[:2])}")
    check("engine healthy, no failed steps", after.get("loraplex_engine_healthy") == 1 and
          delta(after, before, "loraplex_engine_step_failures_total") == 0)

    # the server's count of requests agrees with ours
    finished = {f: delta(after, before, f'loraplex_requests_total{{finish_reason="{f}"}}')
                for f in ("stop", "length", "abort", "error")}
    answered = s.answered + s.calibrations
    check("server finished exactly the requests it answered", sum(finished.values()) == answered,
          f"server {finished}, client {answered} (200s without an error event, calibrations included)")
    errors = {k: v - before.get(k, 0) for k, v in after.items()
              if k.startswith("loraplex_request_errors_total") and v - before.get(k, 0)}
    refused = s.outcomes["refused: unloaded"]
    check("server error responses: only the 404s of unloaded adapters",
          errors.get('loraplex_request_errors_total{code="404"}', 0) == refused and
          all(k.endswith('"404"}') for k in errors), f"server {errors}, client refused {refused}")
    soak.counters = {"preemptions": delta(after, before, "loraplex_preemptions_total"),
                     "GPU evictions": delta(after, before, 'loraplex_adapter_evictions_total{tier="gpu"}'),
                     "host evictions": delta(after, before, 'loraplex_adapter_evictions_total{tier="host"}'),
                     "adapter load failures": delta(after, before, "loraplex_adapter_load_failures_total")}
    check("no adapter page-in failed", soak.counters["adapter load failures"] == 0)

    # the work_dir: merges are written there and removed (on the io thread) once unloaded
    work_dirs = sorted({p.parent for p in soak.merged_paths})
    soak.work_dir = work_dirs[0] if work_dirs else None
    if soak.work_dir is not None:
        inside = soak.work_dir.parent == soak.tmpdir
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(soak.work_dir.iterdir()):
            await asyncio.sleep(0.1)
        left = sorted(p.name for p in soak.work_dir.iterdir())
        check("work_dir empty (merged directories of unloaded adapters removed)",
              inside and len(work_dirs) == 1 and not left, f"{soak.work_dir}: {left}")
    return checks


def server_command(args, port: int, adapter_root: Path) -> list[str]:
    return [sys.executable, "-c", SERVE_CMD, "serve", "--host", "127.0.0.1", "--port", str(port),
            "--device", "cpu", "--log-level", "warning", "--adapter-root", str(adapter_root),
            "--max-gpu-adapters", str(args.gpu_adapters), "--max-host-adapters", str(args.host_adapters),
            "--kv-cache-tokens", str(args.kv_tokens), "--max-num-seqs", str(args.max_num_seqs),
            "--max-num-batched-tokens", "256", "--shutdown-timeout", "5"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--tokens", type=int, default=24,
                   help="max_tokens of every request (ignore_eos; default 24)")
    p.add_argument("--texts", type=int, default=len(TEXTS), help=f"prompt texts used, 1-{len(TEXTS)}")
    p.add_argument("--cut-share", type=float, default=0.25,
                   help="share of streams cut on purpose (default 0.25)")
    p.add_argument("--hold", type=float, default=1.5,
                   help="the admin loop serves an adapter up to this many seconds before unloading it")
    p.add_argument("--gpu-adapters", type=int, default=2, help="--max-gpu-adapters (default 2)")
    p.add_argument("--host-adapters", type=int, default=3, help="--max-host-adapters (default 3)")
    p.add_argument("--kv-tokens", type=int, default=256,
                   help="--kv-cache-tokens (default 256: a few requests)")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may take")
    p.add_argument("--timeout", type=float, default=None,
                   help="hard limit on the whole run in seconds (default duration + 180)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="copy the server log here")
    p.add_argument("--smoke", action="store_true",
                   help="CI: about 30 s in all (12 s of load, 6 clients, 2 texts)")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration, args.clients, args.texts, args.hold = 12.0, 6, 2, 1.0
    args.texts = max(1, min(args.texts, len(TEXTS)))
    timeout = args.timeout or args.duration + 180
    started = time.monotonic()

    work = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    adapter_root, tmpdir = work / "adapters", work / "server-tmp"
    tmpdir.mkdir()
    from loraplex.demo import ADAPTERS_DIR  # torch-free
    for name in DEMO_ADAPTERS:
        shutil.copytree(ADAPTERS_DIR / name, adapter_root / name)
    port = free_port()
    env = {**role_env(), "TMPDIR": str(tmpdir), "LORAPLEX_ADMIN_KEY": ADMIN_KEY}
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(server_command(args, port, adapter_root), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env, cwd=ROOT)
    checks: list[tuple[str, bool, str]] = []
    soak = None
    exit_code = None
    try:
        wait_ready(port, proc, 120)
        ready_seconds = time.monotonic() - started
        soak = Soak(args, port, adapter_root, tmpdir)

        async def go():
            try:
                budget = max(1.0, timeout - ready_seconds - 30)  # 30 s left for the shutdown
                return await asyncio.wait_for(run_soak(args, soak), budget)
            finally:
                await soak.http.aclose()

        try:
            checks = asyncio.run(go())
        except asyncio.TimeoutError:
            checks = [("finished within the hard timeout", False, f"{timeout:.0f} s")]
    except Exception as exc:
        checks.append(("server and soak ran", False, repr(exc)[:500]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                exit_code = proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:
            exit_code = proc.returncode
        log.close()
    checks.append(("SIGTERM: the server exits 0", exit_code == 0, f"exit status {exit_code}"))
    leftover = sorted(p.name for p in tmpdir.glob("loraplex-merged-*"))
    checks.append(("work_dir removed at exit", not leftover, f"{leftover}"))
    log_text = log_path.read_text(errors="replace")
    bad_lines = [ln for ln in log_text.splitlines()
                 if "Traceback" in ln or " ERROR " in ln or ln.startswith("ERROR")]
    checks.append(("no traceback or ERROR line in the server log", not bad_lines, "; ".join(bad_lines[:3])))
    if args.keep:
        args.keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, args.keep)

    report(args, soak, checks, time.monotonic() - started, log_text if bad_lines else "")
    shutil.rmtree(work, ignore_errors=True)
    ok = all(passed for _, passed, _ in checks) and soak is not None and soak.stats.failures() == 0
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def report(args, soak: Soak | None, checks, wall: float, log_text: str) -> None:
    print(f"\nbench/soak.py: demo model on CPU, {args.clients} clients, {args.duration:g} s of load, "
          f"{args.tokens} tokens per request, {args.gpu_adapters} GPU slots / {args.host_adapters} host "
          f"rows / {args.kv_tokens} KV tokens, {wall:.1f} s in all")
    if soak is not None:
        s = soak.stats
        print(f"{'requests':<34} {'count':>7}")
        print(f"{'  sent':<34} {s.sent:>7}")
        for outcome in ("exact", "cut", "refused: unloaded", "aborted"):
            print(f"{'  ' + outcome:<34} {s.outcomes[outcome]:>7}")
        for outcome, n in sorted(s.outcomes.items()):
            if outcome.startswith("failure"):
                print(f"{'  ' + outcome:<34} {n:>7}")
        print(f"{'  failures (all)':<34} {s.failures():>7}")
        for kind, n in sorted(s.exact_by_kind.items()):
            print(f"{'  exact on ' + kind:<34} {n:>7}")
        for mode, n in sorted(s.modes.items()):
            print(f"{'  sent ' + mode:<34} {n:>7}")
        print(f"{'  calibration requests':<34} {s.calibrations:>7}")
        print(f"{'admin operations':<34} {'count':>7}")
        for op, n in sorted(s.admin.items()):
            print(f"{'  ' + op:<34} {n:>7}")
        for name, n in soak.counters.items():
            print(f"{'server: ' + name:<34} {n:>7.0f}")
        if soak.soak_seconds:
            print(f"load {soak.soak_seconds:.1f} s, {s.sent / soak.soak_seconds:.1f} requests/s; "
                  f"calibration {soak.calibrate_seconds:.1f} s; work_dir {soak.work_dir}")
        for outcome, examples in s.examples.items():
            for e in examples:
                print(f"  e.g. {outcome}: {e}")
        for e in s.admin_failures[:5]:
            print(f"  admin failure: {e}")
    print("checks:")
    for what, passed, detail in checks:
        print(f"  {'PASS' if passed else 'FAIL':<5} {what}" + (f"  ({detail})" if detail and not passed else ""))
    if log_text:
        print("server log (tail):\n" + log_text[-3000:])


if __name__ == "__main__":
    sys.exit(main())
