"""Serving-stack benchmark: what `loraplex serve` delivers to HTTP clients, against the engine
alone, with the model's forward replaced by a stand-in, so that only the serving stack runs.

The stand-in (`install_stand_in`) replaces `CausalLM.forward`: it returns prebuilt logits at
once (every row one-hot on a printable token, rotating per step, so detokenization does real
work) and models a GPU of `--step-ms` per step: the step is queued on a device clock, and
the engine's one sync point (`Draw.to_host`) sleeps, GIL-free, until it is done. So the
engine overlaps host work with the "device" exactly when it would on a GPU, with
`--async-scheduling` (on by default here: it is the GPU default). Everything else is the real
code: the scheduler, the runner's tensors, sampling, detokenization, the engine process (the
stand-in is installed there too: multiprocessing imports this script in it), the app and
uvicorn, started by `loraplex serve`'s own entry point in a subprocess. The demo model, on
the reference kernels, with OMP_NUM_THREADS=1 in both roles (`role_env`).

In one run, for each stand-in cost:
1. engine alone  a subprocess builds the server's engine from the same flags (ServerState,
                 engine in-process) and runs --engine-waves waves of C requests (the clients'
                 prompt, T tokens each, greedy, ignore_eos, not detokenized: in the server the
                 API side makes their text) with `Engine.step()` until done: tokens / wall
                 time of the median wave, host time per step not hidden behind the device
                 (wall / steps - step_ms, at least 0)
2. server        `loraplex serve` in a subprocess; --clients client processes (raw HTTP/1.1 on
                 asyncio, no HTTP library: the cheapest client Python has) open C keep-alive
                 connections and send one /v1/completions request each per wave, all at once,
                 streaming and not, --waves waves: generated tokens / (last response end -
                 first request sent) of the median wave; TTFT (request sent -> first token
                 event) and inter-token gap (between token events as they arrive) p50 / p99
                 for streams; every response is checked to carry T tokens (usage, and T token
                 events when streaming) or the run fails.
The client processes' CPU time over the wave is printed (a client near a whole core may be
the limit: then raise --clients), and the server's (its processes' user + system time).

Targets (zero-cost stand-in, C = 128): server / engine alone >= 0.5 streaming, >= 0.6 not
streaming. With a few-ms step: server >= 0.8x the step-bound rate (C tokens per step /
step_ms: the "bound" column; "ratio" is against the engine alone with the same stand-in, whose
own host time per step counts too); inter-token p99 <= 2 x step_ms + the engine's own host
time per step.

Run:
    python bench/serve.py                          # full: C = 64,128, step 0 and 4 ms, T = 64
    python bench/serve.py --smoke                  # CI: C = 8, T = 8, 1 wave, step 0 (plumbing only)
    python bench/serve.py --step-ms 4 --concurrency 128 --modes stream --out bench/out/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere in the repo

PROMPT = "Text: hello world\nOutput: "
STAND_IN_TEXT = "abcdefghijklmnopqrstuvwxyz "  # the stand-in's tokens cycle through these


# ----------------------------------------------------------------------------------------
# the stand-in model step
# ----------------------------------------------------------------------------------------


def install_stand_in(step_ms: float, model_dir: Path | None = None) -> None:
    """Replace CausalLM.forward (for this process) by prebuilt logits from a modelled device.

    The device runs one step at a time, `step_ms` each, in launch order: forward() queues a
    step and returns at once (as a CUDA launch does); Draw.to_host(), the engine's one sync
    point, sleeps (GIL-free) until that step is done. A synchronous engine thus waits the
    whole step_ms after each launch; with async scheduling the host's work for the next step
    runs meanwhile, as on a GPU."""
    import collections

    import torch
    from transformers import AutoTokenizer

    from loraplex.demo import MODEL_DIR
    from loraplex.engine import sampling
    from loraplex.model import llama

    tok = AutoTokenizer.from_pretrained(model_dir or MODEL_DIR)
    ids = tok.encode(STAND_IN_TEXT, add_special_tokens=False)
    tables: dict[tuple[int, int], torch.Tensor] = {}
    counter = [0]
    done_at: collections.deque[float] = collections.deque()  # steps queued on the device, oldest first

    def forward(self, input_ids, step):
        start = max(time.monotonic(), done_at[-1] if done_at else 0.0)
        done_at.append(start + step_ms / 1000)
        rows = step.logits_rows.numel()
        key = (self.config.vocab_size, max(rows, 256))
        table = tables.get(key)
        if table is None:  # [len(ids), rows, V]: pattern k, row r is one-hot on ids[(k + r) % len(ids)]
            table = torch.full((len(ids), key[1], key[0]), -10.0)
            for k in range(len(ids)):
                for r in range(key[1]):
                    table[k, r, ids[(k + r) % len(ids)]] = 10.0
            tables[key] = table
        counter[0] += 1
        return table[counter[0] % len(ids), :rows]

    real_to_host = sampling.Draw.to_host

    def to_host(self):
        if done_at:  # the oldest step still queued is this draw's (steps land in launch order)
            wait = done_at.popleft() - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # releases the GIL, as a host waiting for the device does
        return real_to_host(self)

    llama.CausalLM.forward = forward
    sampling.Draw.to_host = to_host


# The server's engine process is spawned by multiprocessing, which imports this script as
# __mp_main__ there: the stand-in goes in before the engine is built.
if __name__ == "__mp_main__" and "LORAPLEX_BENCH_STAND_IN_MS" in os.environ:
    install_stand_in(float(os.environ["LORAPLEX_BENCH_STAND_IN_MS"]))


# ----------------------------------------------------------------------------------------
# subprocess roles: the server, the engine alone
# ----------------------------------------------------------------------------------------


def serve_flags(args, port: int) -> list[str]:
    return ["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
            "--kv-cache-tokens", str(args.max_concurrency * (len(PROMPT) + args.tokens + 16)),
            "--max-num-seqs", str(max(args.max_concurrency, 1)),
            "--max-num-batched-tokens", str(max(2048, args.max_concurrency)),
            "--max-queue", str(4 * args.max_concurrency), "--max-tokens-limit", str(args.tokens),
            "--async-scheduling", args.async_scheduling, *args.serve_arg]


def role_server(args) -> int:
    install_stand_in(args.step_ms)  # for --engine-in-process
    os.environ["LORAPLEX_BENCH_STAND_IN_MS"] = str(args.step_ms)  # for the engine process
    from loraplex import cli

    return cli.main(serve_flags(args, args.port))


def role_engine(args) -> int:
    """Waves of C requests on the engine alone; prints one JSON line per wave."""
    install_stand_in(args.step_ms)
    from loraplex import cli
    from loraplex.engine.async_engine import engine_detokenizes
    from loraplex.engine.request import Request
    from loraplex.engine.sampling import SamplingParams
    from loraplex.server.config import config_from_args
    from loraplex.server.state import ServerState

    # the same flags, the engine on this process's thread (driven from here, not by the server)
    config = config_from_args(cli.build_parser().parse_args([*serve_flags(args, 0), "--engine-in-process"]))
    state = ServerState(config)
    state.start(background=False)
    state.async_engine.shutdown()  # the engine is driven from here, as the engine thread would
    engine = state.engine
    prompt = state.tokenizer.encode(PROMPT)
    for c in args.concurrency:
        for wave in range(args.engine_waves):
            params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
            started = time.monotonic()
            for i in range(c):
                # as in the server: without stop strings the API side makes the text, not the engine
                engine.add_request(Request(f"w{wave}-{i}", list(prompt), params,
                                           detokenize=engine_detokenizes(params)))
            steps = 0
            while engine.has_work():
                steps += engine.step() > 0
            wall = time.monotonic() - started
            wave_result = {"concurrency": c, "tokens": c * args.tokens, "wall": wall, "steps": steps}
            print(json.dumps(wave_result), flush=True)
    state.shutdown()
    return 0


# ----------------------------------------------------------------------------------------
# clients: raw HTTP/1.1 over asyncio protocols, in separate processes
# ----------------------------------------------------------------------------------------


@dataclass
class Result:
    sent: float
    end: float = 0.0
    first: float | None = None      # first token event
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0                 # completion_tokens from usage
    events: int = 0                 # token events seen (streaming)
    error: str | None = None


class Connection(asyncio.Protocol):
    """One keep-alive connection; `request()` sends a body and waits for its whole response."""

    def __init__(self):
        self.transport = None
        self.buffer = bytearray()
        self.done: asyncio.Future | None = None
        self.result: Result | None = None
        self.stream = False
        self.last: float | None = None
        self.scanned = 0

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if self.done is not None and not self.done.done():
            self.result.error = f"connection lost: {exc}"
            self.done.set_result(None)

    async def request(self, raw: bytes, stream: bool) -> Result:
        self.buffer.clear()
        self.stream, self.last, self.scanned = stream, None, 0
        self.result = Result(time.monotonic())
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        await self.done
        return self.result

    def data_received(self, data: bytes):
        now = time.monotonic()
        self.buffer += data
        r = self.result
        if self.stream:
            # complete events since the last look; token events carry "finish_reason", the
            # usage event does not
            end = self.buffer.rfind(b"\n\n")
            n = 0
            if end > self.scanned:
                n = self.buffer.count(b'"finish_reason"', self.scanned, end)
                self.scanned = end
            if n > 0:
                if r.first is None:
                    r.first = now
                    r.gaps.extend([0.0] * (n - 1))
                else:
                    r.gaps.append(now - self.last)
                    r.gaps.extend([0.0] * (n - 1))
                self.last = now
                r.events += n
            if self.buffer.endswith(b"0\r\n\r\n") and b"data: [DONE]" in self.buffer:
                self._finish_stream(now)
        else:
            head, sep, body = bytes(self.buffer).partition(b"\r\n\r\n")
            if not sep:
                return
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                r.end = now
                r.first = now
                try:
                    r.tokens = json.loads(body[:length])["usage"]["completion_tokens"]
                except (ValueError, KeyError) as exc:
                    r.error = f"bad response: {exc}: {body[:200]!r}"
                self.done.set_result(None)

    def _finish_stream(self, now: float):
        r = self.result
        r.end = now
        text = bytes(self.buffer)
        usage = text.rfind(b'"usage":')
        if not text.startswith(b"HTTP/1.1 200"):
            r.error = f"bad response: {text[:300]!r}"
        elif usage < 0:
            r.error = "no usage event"
        else:
            start = text.rfind(b"data: ", 0, usage) + 6
            try:
                r.tokens = json.loads(text[start: text.index(b"\n", usage)])["usage"]["completion_tokens"]
            except (ValueError, KeyError) as exc:
                r.error = f"bad usage event: {exc}"
        self.done.set_result(None)


def http_request(port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def client_process(port: int, conns: int, tokens: int, pipe) -> None:
    """Hold `conns` connections; per (stream, start time) received, one request on each."""
    async def main():
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(conns):
            _, proto = await loop.create_connection(Connection, "127.0.0.1", port)
            connections.append(proto)
        pipe.send("connected")
        while True:
            job = await loop.run_in_executor(None, pipe.recv)
            if job is None:
                return
            stream, start_at = job
            body = {"model": "loraplex-demo", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            raw = http_request(port, body)
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
            cpu = time.process_time()
            results = await asyncio.gather(*(c.request(raw, stream) for c in connections))
            pipe.send(([r.__dict__ for r in results], time.process_time() - cpu))

    asyncio.run(main())


class Clients:
    def __init__(self, port: int, total: int, processes: int, tokens: int):
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for i in range(processes):
            conns = total // processes + (i < total % processes)
            if conns == 0:
                continue
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(port, conns, tokens, child), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        for p in self.pipes:
            if not p.poll(60) or p.recv() != "connected":
                raise RuntimeError("a client process did not connect")

    def wave(self, stream: bool, timeout: float) -> tuple[list[Result], list[float]]:
        start_at = time.monotonic() + 0.2
        for p in self.pipes:
            p.send((stream, start_at))
        results, cpu = [], []
        for p in self.pipes:
            if not p.poll(timeout):
                raise RuntimeError(f"a client wave took more than {timeout:.0f} s")
            rs, seconds = p.recv()
            results += [Result(**r) for r in rs]
            cpu.append(seconds)
        return results, cpu

    def close(self):
        for p in self.pipes:
            try:
                p.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_env() -> dict:
    """The roles' environment: the kernels the stand-in leaves are the references (no
    interpreter: the warm-up's kernel sweep would only cost time), and one intra-op thread
    for torch (OMP_NUM_THREADS=1, unless set): on a GPU the host's torch work is tiny index
    tensors; here a second OpenMP thread spins after each parallel region and takes CPU from
    the server and the clients on a 2-core machine (measured: twice the CPU per token)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {"OMP_NUM_THREADS": "1", **env, "LORAPLEX_KERNELS": "reference", "PYTHONUNBUFFERED": "1"}


def role_args(args, role: str, **extra) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--step-ms", str(extra["step_ms"]),
            "--tokens", str(args.tokens), "--engine-waves", str(args.engine_waves),
            "--max-concurrency", str(args.max_concurrency), "--async-scheduling", args.async_scheduling,
            "--concurrency", ",".join(map(str, args.concurrency))]
    if "port" in extra:
        argv += ["--port", str(extra["port"])]
    for a in args.serve_arg:
        argv.append(f"--serve-arg={a}")
    return argv


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants still running (the engine process)."""
    total, parents = 0.0, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        parents[int(stat.parent.name)] = (int(fields[1]), seconds)
    for p, (ppid, seconds) in parents.items():
        q = p
        while q in parents and q != pid:
            q = parents[q][0]
        if q == pid:
            total += seconds
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def median_wave(waves: list[dict]) -> dict:
    """The wave of median wall time (the faster one of the middle two)."""
    return sorted(waves, key=lambda w: w["wall"])[(len(waves) - 1) // 2]


def engine_alone(args, step_ms: float) -> dict[int, dict]:
    out = subprocess.run(role_args(args, "engine", step_ms=step_ms), capture_output=True, text=True,
                         timeout=args.timeout, env=role_env())
    if out.returncode:
        raise RuntimeError(f"engine-alone run failed:\n{out.stderr[-3000:]}")
    waves: dict[int, list[dict]] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            w = json.loads(line)
            waves.setdefault(w["concurrency"], []).append(w)
    best = {}
    for c, ws in waves.items():
        w = median_wave(ws)
        best[c] = {"tok_s": w["tokens"] / w["wall"], "steps": w["steps"],
                   "host_ms": max(0.0, 1000 * w["wall"] / max(w["steps"], 1) - step_ms)}
    return best


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def server_runs(args, step_ms: float) -> dict[tuple[str, int], dict]:
    port = free_port()
    log = open(args.out / f"server-{step_ms:g}ms.log", "w") if args.out else subprocess.DEVNULL
    proc = subprocess.Popen(role_args(args, "server", step_ms=step_ms, port=port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=role_env())
    rows = {}
    try:
        wait_ready(port, proc, args.timeout)
        for c in args.concurrency:
            clients = Clients(port, c, min(args.clients, c), args.tokens)
            try:
                for mode in args.modes:
                    stream = mode == "stream"
                    waves = []
                    for _ in range(args.waves):
                        cpu_before = cpu_seconds(proc.pid)
                        results, client_cpu = clients.wave(stream, args.timeout)
                        server_cpu = cpu_seconds(proc.pid) - cpu_before
                        bad = [r for r in results if r.error or r.tokens != args.tokens
                               or (stream and r.events != args.tokens)]
                        if bad:
                            example = bad[0].error or f"{bad[0].tokens} tokens, {bad[0].events} events"
                            raise RuntimeError(f"{len(bad)} of {len(results)} responses wrong, e.g. {example}")
                        wall = max(r.end for r in results) - min(r.sent for r in results)
                        waves.append({"wall": wall, "results": results, "client_cpu": max(client_cpu) / wall,
                                      "server_cpu": server_cpu / wall})
                    w = median_wave(waves)
                    rs = w["results"]
                    ttft = [r.first - r.sent for r in rs if r.first is not None]
                    gaps = [g for r in rs for g in r.gaps]
                    rows[(mode, c)] = {"tok_s": c * args.tokens / w["wall"], "ttft": ttft, "gaps": gaps,
                                       "client_cpu": w["client_cpu"], "server_cpu": w["server_cpu"]}
            finally:
                clients.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--concurrency", type=ints, default=[64, 128], help="concurrent requests (default 64,128)")
    p.add_argument("--step-ms", type=floats, default=[0.0, 4.0],
                   help="stand-in step costs in ms (default 0,4)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["stream", "nonstream"])
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--waves", type=int, default=5,
                   help="server waves per point; the median is reported (default 5)")
    p.add_argument("--engine-waves", type=int, default=15, help="engine-alone waves per point (a wave there "
                   "takes tens of ms: more of them for a steady median; default 15)")
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one part may take")
    p.add_argument("--out", type=Path, default=None, help="directory for server logs and results.json")
    p.add_argument("--async-scheduling", choices=["on", "off"], default="on",
                   help="the engine's async scheduling, in both roles (default on, as on a GPU)")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra `loraplex serve` flag (repeatable)")
    p.add_argument("--smoke", action="store_true", help="CI: C = 8, T = 8, one wave, step 0 ms")
    p.add_argument("--role", choices=["server", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-concurrency", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.step_ms, args.tokens, args.waves, args.engine_waves = [8], [0.0], 8, 1, 1
    if args.role:
        args.step_ms = args.step_ms[0]
        return role_server(args) if args.role == "server" else role_engine(args)
    args.max_concurrency = max(args.concurrency)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    lines, record = [], []
    for step_ms in args.step_ms:
        engine = engine_alone(args, step_ms)
        server = server_runs(args, step_ms)
        for (mode, c), row in server.items():
            e = engine[c]
            bound = c * 1000 / step_ms if step_ms > 0 else None
            itl_target = 2 * step_ms + e["host_ms"]
            rec = {"step_ms": step_ms, "mode": mode, "concurrency": c, "server_tok_s": row["tok_s"],
                   "engine_tok_s": e["tok_s"], "ratio": row["tok_s"] / e["tok_s"],
                   "step_bound_tok_s": bound, "engine_host_ms_per_step": e["host_ms"],
                   "ttft_p50_ms": 1000 * pct(row["ttft"], 0.5), "ttft_p99_ms": 1000 * pct(row["ttft"], 0.99),
                   "itl_p50_ms": 1000 * pct(row["gaps"], 0.5), "itl_p99_ms": 1000 * pct(row["gaps"], 0.99),
                   "itl_target_ms": itl_target if mode == "stream" else None,
                   "client_cpu": row["client_cpu"], "server_cpu": row["server_cpu"]}
            record.append(rec)
    if args.out:
        (args.out / "results.json").write_text(json.dumps(record, indent=1))

    print(f"\nbench/serve.py: demo model, stand-in forward, async scheduling {args.async_scheduling}, "
          f"{args.tokens} tokens per request, "
          f"{args.clients} client processes, median of {args.waves} server / {args.engine_waves} "
          f"engine-alone waves, {os.cpu_count()} CPUs")
    head = (f"{'step':>5} {'mode':>9} {'C':>4} {'server tok/s':>12} {'engine tok/s':>12} {'ratio':>6} "
            f"{'bound':>7} {'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15} {'client cpu':>10} "
            f"{'server cpu':>10}")
    print(head)
    for r in record:
        bound = "-" if r["step_bound_tok_s"] is None else f"{r['server_tok_s'] / r['step_bound_tok_s']:.2f}x"
        itl = f"{r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f}" if r["mode"] == "stream" else "-"
        lines.append(f"{r['step_ms']:>4g}ms {r['mode']:>9} {r['concurrency']:>4} {r['server_tok_s']:>12,.0f} "
                     f"{r['engine_tok_s']:>12,.0f} {r['ratio']:>6.2f} {bound:>7} "
                     f"{r['ttft_p50_ms']:>7.1f}/{r['ttft_p99_ms']:<8.1f} {itl:>15} {r['client_cpu']:>10.2f} "
                     f"{r['server_cpu']:>10.2f}")
    print("\n".join(lines))
    print(targets(record))
    return 0


def targets(record: list[dict]) -> str:
    """The issue's targets, each with its verdict (only those this run measured)."""
    out = ["targets:"]
    for r in record:
        c, mode, ms = r["concurrency"], r["mode"], r["step_ms"]
        if ms == 0 and c == 128:
            need = 0.5 if mode == "stream" else 0.6
            out.append(f"  {mode} C=128 0ms: server/engine {r['ratio']:.2f} >= {need}: "
                       f"{'PASS' if r['ratio'] >= need else 'FAIL'}")
        if ms > 0 and c == 128:
            got = r["server_tok_s"] / r["step_bound_tok_s"]
            verdict = "PASS" if got >= 0.8 else "FAIL"
            out.append(f"  {mode} C=128 {ms:g}ms: server / step bound {got:.2f} >= 0.8: {verdict}")
            if mode == "stream":
                ok = r["itl_p99_ms"] <= r["itl_target_ms"]
                out.append(f"  stream C=128 {ms:g}ms: ITL p99 {r['itl_p99_ms']:.1f} ms <= 2 x {ms:g} + "
                           f"{r['engine_host_ms_per_step']:.1f} = {r['itl_target_ms']:.1f} ms: {'PASS' if ok else 'FAIL'}")
    return "\n".join(out) if len(out) > 1 else "targets: none measured at C=128"


if __name__ == "__main__":
    sys.exit(main())
