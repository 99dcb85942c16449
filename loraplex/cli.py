"""`loraplex` command line.

    loraplex check      quantize a small random Llama to NF4 and verify format and kernels
    loraplex quantize   write an NF4 (bitsandbytes-format) copy of a Hugging Face checkpoint
    loraplex serve      serve a model and its adapters over an OpenAI-compatible HTTP API
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from . import __version__


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("loraplex check: --device cuda asked for, but no CUDA GPU is visible")
    return torch.device(name)


def _kernel_path(device) -> str:
    from .kernels.runtime import use_triton

    if not use_triton(device):
        return "PyTorch reference (CPU)"
    return "Triton interpreter (CPU)" if device.type == "cpu" else f"Triton on {device}"


def check(args: argparse.Namespace) -> int:
    """Quantize every linear of a random transformers Llama and check it three ways:
    the bitsandbytes export round-trips bit-exactly, the fused kernel matches the
    reference, and the model's logits with NF4 weights stay close to the original."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .kernels.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
    from .kernels.nf4_matmul import nf4_matmul, nf4_matmul_ref

    device = _pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden_size // 64),
        num_key_value_heads=max(1, args.hidden_size // 128), vocab_size=512,
    )
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        logits_before = model(tokens).logits.float()

    print(f"loraplex {__version__}: NF4 check of a random Llama ({args.layers} layers, hidden "
          f"{args.hidden_size}, {args.dtype}) on {device}; kernels: {_kernel_path(device)}")
    print(f"{'linear':<34} {'shape':>11} {'B/weight':>8} {'w err':>7} {'kernel err':>10}  status")
    failures, total_bytes, total_weights = 0, 0, 0
    started = time.perf_counter()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    for name, linear in linears:
        weight = linear.weight.data
        q = quantize_nf4(weight)
        exported = q.to_bnb()
        round_trip = NF4Weight.from_bnb(exported).to_bnb()
        bit_exact = all(torch.equal(exported[k], round_trip[k]) for k in exported)
        dequantized = dequantize_nf4(q)
        w_err = ((dequantized.float() - weight.float()).norm() / weight.float().norm()).item()
        x = torch.randn(3, weight.shape[1], device=device, dtype=dtype)
        ref = nf4_matmul_ref(x.float(), q).float()
        k_err = ((nf4_matmul(x, q).float() - ref).abs().max() / ref.abs().max()).item()
        ok = bit_exact and w_err < 0.15 and k_err < 2e-2
        failures += not ok
        total_bytes += q.resident_bytes()
        total_weights += weight.numel()
        shape = "x".join(map(str, weight.shape))
        status = "ok" if ok else ("FAIL: export" if not bit_exact else "FAIL: error too large")
        print(f"{name:<34} {shape:>11} {q.resident_bytes() / weight.numel():8.4f} {w_err:7.4f} {k_err:10.2e}  {status}")
        linear.weight.data = dequantized  # for the end-to-end comparison below

    with torch.no_grad():
        logits_after = model(tokens).logits.float()
    top1 = (logits_after.argmax(-1) == logits_before.argmax(-1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(logits_after.flatten(), logits_before.flatten(), dim=0).item()
    logits_ok = cos > 0.9
    failures += not logits_ok
    print(f"\nresident NF4 size: {total_bytes / total_weights:.4f} bytes/weight over {total_weights:,} weights")
    print(f"logits with NF4 weights vs original: cosine {cos:.4f}, top-1 agreement {top1:.0%}"
          f"  {'ok' if logits_ok else 'FAIL'}")
    print(f"{len(linears)} linears checked in {time.perf_counter() - started:.1f}s: "
          f"{'all ok' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def quantize(args: argparse.Namespace) -> int:
    """Quantize every decoder linear of a Llama-family checkpoint to NF4 (block size 64, double
    quantization) and write it in the bitsandbytes format, loadable by transformers with
    bitsandbytes and by `loraplex serve`. A checkpoint already in NF4 is copied, not re-quantized."""
    from .model.checkpoint import CheckpointError, write_nf4_checkpoint

    device = _pick_device(args.device)
    started = time.perf_counter()
    try:
        dst = write_nf4_checkpoint(args.src, args.dst, device=device, max_shard_bytes=args.max_shard_mb << 20)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"loraplex quantize: {exc}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({size / 2**20:.1f} MiB of safetensors) in {time.perf_counter() - started:.1f}s")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve the model and its adapters over an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    The model loads in the background after the port is bound: /health answers at once,
    /ready once the model is loaded and warmed. SIGTERM (or Ctrl-C) stops admitting requests
    (503, while still listening), gives running ones --shutdown-timeout seconds, aborts the
    rest (their responses end with finish reason abort) and exits 0; a second signal stops at
    once."""
    import asyncio
    import logging
    import signal

    import uvicorn

    from .server.app import create_app
    from .server.config import config_from_args
    from .server.state import ServerState

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("loraplex.server")
    for note in config.notes:  # accepted vLLM flags that do nothing here, and the like
        log.warning("%s", note)
    if config.dtype == "fp32" and config.device == "auto":
        import torch

        if torch.cuda.is_available():  # fail now rather than after the model loads
            from .server.config import check_fp32_on_cuda

            try:
                check_fp32_on_cuda()
            except ValueError as exc:
                print(f"loraplex serve: {exc}", file=sys.stderr)
                return 2
    state = ServerState(config)

    class Server(uvicorn.Server):
        """uvicorn, whose first SIGTERM/SIGINT drains before the socket closes: new requests get
        503 (and /ready 503, so balancers move away) while running ones have --shutdown-timeout
        to finish; those left are aborted and still end properly. Only then does uvicorn stop
        listening and shut down. A second signal stops at once (uvicorn's own shutdown)."""

        drains: list[asyncio.Task] = []

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if config.enable_ssl_refresh and self.config.ssl is not None:
                threading.Thread(target=_refresh_certificates, args=(self.config.ssl, config, self),
                                 name="loraplex-ssl-refresh", daemon=True).start()

        def handle_exit(self, sig, frame):
            if state.draining:  # a second signal (or shutting down anyway): stop now
                return self.stop(sig, frame)
            state.draining = True
            try:
                loop = asyncio.get_running_loop()  # the signal interrupts the server's loop
            except RuntimeError:  # not serving yet, or any more
                return self.stop(sig, frame)
            # from a signal handler: through the thread-safe call, which also wakes the loop
            loop.call_soon_threadsafe(lambda: self.drains.append(loop.create_task(self.drain_then_stop(sig, frame))))

        async def drain_then_stop(self, sig, frame):
            await state.drain(config.shutdown_timeout)
            self.stop(sig, frame)

        def stop(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown, so the process would
            # die of SIGTERM; a drained SIGTERM is a clean stop: exit 0
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    # connections still open after the drain are idle or finishing their last bytes
    tls = dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, ssl_ca_certs=config.ssl_ca_certs,
               ssl_cert_reqs=config.ssl_cert_reqs) if config.ssl_certfile else {}
    # asyncio and h11 named, not uvicorn's "auto": uvloop and httptools (which an extra such as
    # ray[serve] installs) measured no faster here, and h11's limits are the ones tested
    server = Server(uvicorn.Config(create_app(state), host=config.host, port=config.port,
                                   log_level=config.uvicorn_log_level or config.log_level, access_log=config.access_log,
                                   timeout_graceful_shutdown=5, loop="asyncio", http="h11", **tls))
    if config.access_log_skip:  # after uvicorn.Config, which sets its loggers up
        logging.getLogger("uvicorn.access").addFilter(_SkipPaths(config.access_log_skip))
    server.run()
    return 0 if state.failed is None else 1


class _SkipPaths:
    """An access-log filter: no line for requests to these paths (--disable-access-log-for-endpoints)."""

    def __init__(self, paths):
        self.paths = frozenset(paths)

    def filter(self, record) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = args[2] if len(args) > 2 and isinstance(args[2], str) else ""  # uvicorn: client, method, path, ...
        return path.partition("?")[0] not in self.paths


def _refresh_certificates(context, config, server, period: float = 5.0) -> None:
    """--enable-ssl-refresh: load the key and certificates into the serving TLS context again when
    one of their files changes (new handshakes get them; open connections keep theirs). A half-
    written file fails to load and is retried at the next change check."""
    import logging
    import os

    log = logging.getLogger("loraplex.server")
    files = [f for f in (config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs) if f]

    def stamps():
        out = []
        for f in files:
            try:
                info = os.stat(f)  # follows links: a Kubernetes secret volume swaps a link
                out.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                out.append(None)
        return out

    seen = stamps()
    while not server.should_exit:
        time.sleep(period)
        now = stamps()
        if now == seen:
            continue
        try:
            context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
            if config.ssl_ca_certs:
                context.load_verify_locations(config.ssl_ca_certs)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("TLS files changed but cannot be loaded yet (%s); retrying", exc)
            continue
        seen = now
        log.info("TLS key and certificates reloaded")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA serving on NF4 base models.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("check", help="quantize a small random Llama to NF4 and verify format and kernels",
                            description=check.__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="activation dtype (default: bf16)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width, a multiple of 64 (default: 256)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=check)

    p = commands.add_parser("quantize", help="write an NF4 copy of a Hugging Face checkpoint",
                            description=quantize.__doc__)
    p.add_argument("src", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to quantize (default: cuda if available, else cpu)")
    p.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors shard in MiB (default: 2048)")
    p.set_defaults(func=quantize)

    from .server.config import add_serve_arguments

    p = commands.add_parser("serve", help="serve a model and its LoRA adapters over an OpenAI-compatible API",
                            description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)
    p.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # vLLM's spellings with underscores (--max_model_len), as vLLM takes them
        from .server.config import normalize_vllm_argv

        argv = ["serve", *normalize_vllm_argv(argv[1:])]
    args = build_parser().parse_args(argv)
    if getattr(args, "hidden_size", 64) % 64:
        raise SystemExit("loraplex check: --hidden-size must be a multiple of 64")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
