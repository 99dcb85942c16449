"""loraplex on Ray Serve (loraplex/integrations/ray_serve.py), on a local Ray cluster on CPU:
2 replicas of the bundled demo, at most 2 adapters each, 3 adapters in the adapter root.

A mixed concurrent workload through the ingress returns each adapter's transformation, every
request for an adapter lands on the replica that holds it (the x-loraplex-replica header), and
that replica's registry holds exactly the adapters Ray placed there. Then, down to 1 replica,
LRU eviction unloads adapters from the registry, an adapter evicted while a stream uses it is
unloaded only once that stream has finished (it finishes whole), a request without the API key
loads nothing, and a client leaving a stream aborts its engine request. The builder's
arguments (as `serve run` and a Serve config file give them) are checked without a cluster.

Needs `loraplex[ray]`; about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from loraplex.demo import tasks  # noqa: E402
from loraplex.integrations.ray_serve import REPLICA_HEADER, LoraplexRayArgs, app, build_app  # noqa: E402
from loraplex.server.state import DEMO_NAME  # noqa: E402

API_KEY, ADMIN_KEY = "ray-key", "ray-admin"
TEXTS = ["hello world", *tasks.held_out(8, seed=777)]  # texts the demo gets right for every adapter
APP = "loraplex"
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60  # seconds, for any one request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(num_replicas: int) -> LoraplexRayArgs:
    return LoraplexRayArgs(
        num_replicas=num_replicas, max_adapters_per_replica=2, num_gpus=0, num_cpus=0.5, ingress_num_cpus=0.1,
        max_ongoing_requests=128, drain_timeout_s=60,
        server={"device": "cpu", "api_keys": [API_KEY], "admin_key": ADMIN_KEY, "max_num_seqs": 64},
        replica_options={"max_constructor_retry_count": 1})


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster (loopback only) with Serve's proxy on a free port, the app deployed
    with 2 replicas: yields the base URL."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        for var in ("LORAPLEX_API_KEY", "LORAPLEX_ADMIN_KEY", "LORAPLEX_METRICS_KEY", "RAY_ADDRESS"):
            env.delenv(var, raising=False)  # the replicas would read them (keys_from_env); a cluster elsewhere
        # the replicas run the PyTorch references on CPU, not Triton's interpreter (tests/conftest.py)
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"TRITON_INTERPRET": "0", "LORAPLEX_KERNELS": "reference",
                                           "RAY_USAGE_STATS_ENABLED": "0"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(args(2)), name=APP, route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def client(url: str, key: str = API_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                             timeout=httpx.Timeout(TIMEOUT), limits=httpx.Limits(max_connections=200))


async def generate(c: httpx.AsyncClient, model: str, text: str, *, chat: bool, stream: bool, headers=None,
                   **fields) -> dict:
    """One request: {"text", "replica", "finish_reason", "events" (SSE events; 0 unstreamed),
    "ended" (when a stream's last event was read)}."""
    body = {"model": model, "max_tokens": 24, "temperature": 0, "stream": stream, **fields}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = tasks.prompt(text)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        r = await c.post(path, json=body, headers=headers)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"text": choice["message"]["content"] if chat else choice["text"], "events": 0,
                "finish_reason": choice["finish_reason"], "replica": r.headers[REPLICA_HEADER]}
    out = {"text": "", "events": 0, "finish_reason": None}
    async with c.stream("POST", path, json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        out["replica"] = r.headers[REPLICA_HEADER]
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            out["events"] += 1
            for choice in json.loads(line[6:])["choices"]:
                out["text"] += (choice["delta"].get("content") or "") if chat else choice["text"]
                out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    out["ended"] = time.monotonic()
    return out


async def registered(c: httpx.AsyncClient, via: str | None = None) -> tuple[str, set[str]]:
    """(replica, adapters registered there) from /admin/adapters: on the replica holding the
    adapter `via` (routed by the serve_multiplexed_model_id header, which the ingress keeps),
    or on any replica."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", **({"serve_multiplexed_model_id": via} if via else {})}
    r = await c.get("/admin/adapters", headers=headers)
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER], {a["name"] for a in r.json()["data"] if a["state"] == "ready"}


async def metric(c: httpx.AsyncClient, prefix: str) -> float:
    """The sum of the /metrics samples whose line starts with `prefix` (one replica's)."""
    text = (await c.get("/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def expected(model: str, text: str) -> str:
    return tasks.TASKS["copy" if model == DEMO_NAME else model](text)


def test_mixed_workload_lands_on_the_replica_holding_its_adapter(cluster):
    async def main():
        async with client(cluster) as c:
            holder = {}
            for adapter in tasks.ADAPTERS:  # placed one by one: Ray routes each to the replica with fewest
                out = await generate(c, adapter, "hello world", chat=False, stream=False)
                assert out["text"] == expected(adapter, "hello world"), (adapter, out)
                holder[adapter] = out["replica"]
                await asyncio.sleep(1.0)  # the replica's model ids reach the router (pushed every 0.1 s)
            assert len(set(holder.values())) == 2, holder  # the second adapter went to the empty replica

            jobs = []
            for model in (DEMO_NAME, *tasks.ADAPTERS):
                for i, text in enumerate(TEXTS):
                    jobs += [(model, text, False, i % 2 == 0, None), (model, text, True, i % 2 == 1, None)]
                if model != DEMO_NAME:  # the header Ray Serve's clients send, in both spellings
                    jobs += [(model, TEXTS[0], True, True, {"serve_multiplexed_model_id": model}),
                             (model, TEXTS[1], False, False, {"serve-multiplexed-model-id": model})]
            started = time.monotonic()
            outs = await asyncio.gather(*(generate(c, m, t, chat=chat, stream=stream, headers=h)
                                          for m, t, chat, stream, h in jobs))
            took = time.monotonic() - started
            for (model, text, chat, stream, _), out in zip(jobs, outs):
                assert out["text"] == expected(model, text), (model, text, chat, stream, out)
                assert out["finish_reason"] == "stop", out
                if stream:
                    assert out["events"] > 1, out  # token by token, not one buffered answer
                if model != DEMO_NAME:
                    assert out["replica"] == holder[model], (model, out["replica"], holder)
            base = {out["replica"] for (model, *_), out in zip(jobs, outs) if model == DEMO_NAME}
            assert base <= set(holder.values())
            # each replica's registry holds what Ray placed there, nothing else
            for adapter, replica in holder.items():
                seen, names = await registered(c, via=adapter)
                assert seen == replica
                assert names == {a for a, r in holder.items() if r == replica}, (replica, names, holder)
            return len(jobs), took

    n, took = asyncio.run(asyncio.wait_for(main(), 180))
    print(f"{n} concurrent requests in {took:.1f} s")


def test_eviction_unloads_the_adapter_after_its_running_requests(cluster):
    serve.run(build_app(args(1)), name=APP, route_prefix="/")  # down to one replica: it gets every adapter
    deadline = time.monotonic() + 60
    while True:
        states = serve.status().applications[APP].deployments["LoraplexReplica"].replica_states
        if states == {"RUNNING": 1}:
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.2)

    async def main():
        async with client(cluster) as c:
            for adapter in ("reverse", "rot13"):  # whatever it held: now these two, rot13 the latest used
                out = await generate(c, adapter, "hello world", chat=False, stream=False)
                assert out["text"] == expected(adapter, "hello world")
            replica, names = await registered(c)
            assert names == {"reverse", "rot13"}, names

            # upper loads, evicting reverse (least recently used, idle): unloaded at once
            stream = asyncio.ensure_future(generate(c, "upper", "hello world", chat=False, stream=True,
                                                    max_tokens=100, ignore_eos=True))
            while (await registered(c))[1] != {"rot13", "upper"}:
                assert not stream.done() or stream.exception() is None
                await asyncio.sleep(0.02)
            # upper is the least recently used once rot13 is asked for; reverse evicts it while its
            # stream runs: the eviction waits for the stream, then unloads upper, then reverse loads
            await generate(c, "rot13", "hello world", chat=False, stream=False, max_tokens=1)
            asked = time.monotonic()
            out = await generate(c, "reverse", "hello world", chat=False, stream=False)
            answered = time.monotonic()
            assert out["text"] == "dlrow olleh" and out["replica"] == replica
            streamed = await asyncio.wait_for(stream, TIMEOUT)
            assert streamed["text"].startswith("HELLO WORLD"), streamed
            assert streamed["finish_reason"] == "length", streamed
            assert streamed["events"] > 1 and streamed["replica"] == replica
            assert asked < streamed["ended"], "the stream ended before its adapter's eviction: lengthen it"
            assert streamed["ended"] < answered, "reverse was served before upper's stream ended"
            assert (await registered(c)) == (replica, {"rot13", "reverse"})

            # a client without the API key makes nothing load (and so nothing evict)
            async with client(cluster, key="wrong") as anonymous:
                body = {"model": "upper", "prompt": "x", "max_tokens": 1}
                r = await anonymous.post("/v1/completions", json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            assert (await registered(c))[1] == {"rot13", "reverse"}
            assert await metric(c, "loraplex_adapters{") == 2  # by tier: both registered, nothing left over

            # a client leaving a stream early: the replica aborts its engine request
            aborted = await metric(c, 'loraplex_requests_total{finish_reason="abort"}')
            body = {"model": "rot13", "prompt": tasks.prompt("hello world"), "max_tokens": 100,
                    "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # closing the response now closes its connection
            deadline = time.monotonic() + 20
            while await metric(c, 'loraplex_requests_total{finish_reason="abort"}') != aborted + 1:
                assert time.monotonic() < deadline, "the stream's engine request was not aborted"
                await asyncio.sleep(0.1)
            return streamed["ended"] - asked

    margin = asyncio.run(asyncio.wait_for(main(), 120))
    print(f"the stream ran {margin:.2f} s past its adapter's eviction")


# -- the builder, without a cluster ------------------------------------------------------------


def bound(application):
    """(ingress, replicas) deployments of a built application, with their init arguments."""
    ingress = application._bound_deployment
    return ingress, ingress.init_args[0]._bound_deployment


def test_the_builder_takes_serve_run_arguments_as_text():
    ingress, replicas = bound(app({"model": "/m/base", "adapter_root": "/m/adapters", "num_replicas": "3",
                                   "num_gpus": "1", "num_cpus": "2", "max_adapters_per_replica": "4",
                                   "server": '{"max_gpu_adapters": 4, "served_model_name": "base"}'}))
    assert replicas.num_replicas == 3 and replicas.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    config, root, max_adapters, _ = replicas.init_args
    assert (config.model, root, max_adapters, config.max_gpu_adapters) == ("/m/base", "/m/adapters", 4, 4)
    assert replicas.max_ongoing_requests == config.max_num_seqs  # the default: the engine's batch
    assert ingress.init_args[1:] == (["base"], config.max_body_bytes)  # the base model is not multiplexed

    _, demo = bound(build_app({"num_gpus": 0}))  # the bundled demo, its adapters, max_gpu_adapters of them
    config, root, max_adapters, _ = demo.init_args
    assert config.served_model_name == DEMO_NAME and max_adapters == config.max_gpu_adapters
    assert {p.name for p in Path(root).iterdir()} >= set(tasks.ADAPTERS)

    autoscaling = {"autoscaling_config": {"max_replicas": 8}}
    _, scaled = bound(build_app({"num_gpus": 0, "replica_options": autoscaling}))
    assert scaled._deployment_config.autoscaling_config.max_replicas == 8  # num_replicas then left to it


@pytest.mark.parametrize("given, refused", [
    ({"model": "/m/base"}, "adapter_root is required"),
    ({"server": {"adapters": {"a": "/a"}}}, "server.adapters"),
    ({"server": {"lora_resolve_roots": ["/a"]}}, "server.lora_resolve_roots"),
    ({"server": {"no_such_field": 1}}, "no_such_field"),
    ({"max_adapters_per_replica": 0}, "max_adapters_per_replica"),
])
def test_the_builder_refuses(given, refused):
    with pytest.raises(ValueError, match=refused):
        build_app({"num_gpus": 0, **given})


def test_the_example_serve_config_builds():
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    config_file = ROOT / "deploy" / "ray" / "serve_config.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(config_file.read_text()))
    (application,) = schema.applications
    assert application.import_path == "loraplex.integrations.ray_serve:app"
    _, replicas = bound(app(application.args))
    config, _, max_adapters, _ = replicas.init_args
    assert replicas.ray_actor_options["num_gpus"] == 1 and max_adapters == config.max_gpu_adapters
