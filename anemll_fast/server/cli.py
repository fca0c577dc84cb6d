"""`anemll-fast serve`: start the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import socket
import sys
from typing import Any, List

from anemll_fast.errors import AnemllError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run an OpenAI-compatible HTTP server",
                       description="Serve models over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health). Needs: pip install 'anemll_fast[server]'.")
    p.add_argument("--model", "-m", action="append", default=[], metavar="[ALIAS=]PATH_OR_REPO",
                   help="a model directory or Hugging Face repo id, optionally named ALIAS (repeatable; "
                        "requests pick one with `model`; default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port; default 8080)")
    p.add_argument("--max-models", type=int, default=1, help="models kept loaded at once (default 1)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for the engine; more get 429 (default 16)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, waiting included (default 600)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 routes")
    p.add_argument("--cors", nargs="*", metavar="ORIGIN",
                   help="allow cross-origin requests (from the origins given; none given: any)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MB (default 8)")
    p.add_argument("--backend", default="auto", choices=["auto", "coreml", "coremltools", "reference"])
    p.add_argument("--compute-units", default="cpu_and_ne", choices=["cpu_only", "cpu_and_gpu", "cpu_and_ne", "all"])
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for name, value, low in (("--port", args.port, 0), ("--max-models", args.max_models, 1),
                             ("--max-queue", args.max_queue, 0)):
        if value < low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")
    if args.port > 65535:
        raise ValueError(f"--port: must be <= 65535, got {args.port}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout: must be > 0, got {args.timeout}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb: must be > 0, got {args.max_body_mb}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AnemllError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def _banner(url: str, model_ids: List[str], api_key: bool) -> str:
    auth = ' -H "Authorization: Bearer $KEY"' if api_key else ""
    return (f"anemll-fast serve: listening on {url} (models: {', '.join(model_ids)})\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d '{{\"model\": \"{model_ids[0]}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")


def run(args: argparse.Namespace) -> int:
    _check(args)
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "llguidance") if not _importable(m)]
    if missing:
        raise AnemllError(f"anemll-fast serve needs the server extra: pip install 'anemll_fast[server]' "
                          f"(missing: {', '.join(missing)})")
    import uvicorn

    import anemll_fast
    from anemll_fast.server.app import ServerOptions, build_app
    from anemll_fast.server.pool import ModelPool, Worker, parse_model_args

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack: a hang explains itself
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, OSError):  # stderr is no real file (embedded, captured)
            pass
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("anemll_fast").setLevel(args.log_level.upper())
    if args.host not in LOOPBACK:
        print(f"anemll-fast serve: warning: --host {args.host} exposes the server beyond this machine"
              f"{'' if args.api_key else ' with no --api-key'}", file=sys.stderr, flush=True)
    specs = parse_model_args(args.model)
    pool = ModelPool(specs, max_models=args.max_models,
                     loader=lambda source: anemll_fast.load(source, backend=args.backend,
                                                            compute_units=args.compute_units))
    worker = Worker(pool, max_queue=args.max_queue)
    try:
        worker.run_sync(lambda: pool.get(specs[0]))  # fail early, and answer the first request fast
        sock = _bind(args.host, args.port)
        options = ServerOptions(max_queue=args.max_queue, timeout=args.timeout, api_key=args.api_key,
                                cors=(args.cors or ["*"]) if args.cors is not None else None,
                                max_body=int(args.max_body_mb * 1024 * 1024))
        app = build_app(pool, worker, options)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(_banner(f"http://{shown}:{port}", pool.ids, bool(args.api_key)), flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False,
                                               timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        worker.shutdown()
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
