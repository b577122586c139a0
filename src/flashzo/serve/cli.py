"""The `flashzo serve` subcommand: its flags, and the server's start and stop.

SIGINT and SIGTERM stop the server gracefully: uvicorn stops taking requests, the scheduler finishes
its step and checkpoints every running job (app.py's lifespan), then the process exits with status 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys

from flashzo.errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve MeZO fine-tuning and completions behind OpenAI's API (HTTP)",
                       description="MeZO fine-tuning as a service: OpenAI's files, fine_tuning.jobs, models and "
                                   "completions endpoints; every running job on a model advances in one shared "
                                   "forward per step; state in SQLite under --data-dir survives kill -9.")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a base model to serve: NAME (the API's model name) and PATH, a checkpoint directory or a "
                        ".gguf file (any family flashzo.engine.load_model reads); repeat for several")
    p.add_argument("--data-dir", required=True,
                   help="where files, jobs, events, checkpoints and the database live (created if missing; the "
                        "same directory after a restart continues where the server stopped)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); a non-loopback address needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
                        "FLASHZO_API_KEY environment variable; none: no authentication, loopback only)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (default: the checkpoint's)")
    p.add_argument("--quantize", action="append", default=None, metavar="[NAME=]MODE",
                   help="hold a model's linears and token embedding quantized (int8, int4, or MODE-gN[-sym|-asym], "
                        "as for flashzo train): NAME=MODE for the model NAME, MODE alone for every model not named; "
                        "repeat for several (default: none)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest file upload in MiB (default 64)")
    p.add_argument("--max-running-jobs", type=int, default=16,
                   help="jobs training at once; more wait as queued (default 16)")
    p.add_argument("--max-jobs-per-forward", type=int, default=8,
                   help="jobs whose copies share one forward; a bigger group takes turns, least advanced "
                        "first (default 8)")
    p.add_argument("--max-concurrent-uploads", type=int, default=4,
                   help="uploads read at once; one more is answered 429 (default 4)")
    p.add_argument("--max-queued-jobs", type=int, default=64,
                   help="jobs waiting (validating_files or queued); creating one more is answered 429 (default 64)")
    p.add_argument("--completions-per-step", type=int, default=2,
                   help="completion forwards served between two training steps while jobs train, so training "
                        "keeps its share however many completions wait (default 2)")
    p.add_argument("--hold-admission", action="store_true",
                   help="start with the start of jobs held (queued and resumed jobs wait) until POST "
                        "/admin/admission {\"hold\": false}: jobs ready then start together")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="batch-invariant numerics for the jobs that do not set batch_invariant: a job's adapter "
                        "is bit-identical whichever jobs share its forwards (default on; --no-batch-invariant "
                        "turns it off)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default info)")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from .served import load_served, parse_model_flags, parse_quantize_flags

    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty: every request would be refused; give a key, or leave the flag out")
    key = args.api_key if args.api_key is not None else os.environ.get("FLASHZO_API_KEY") or None
    if not is_loopback(args.host) and not key:
        raise InputError(f"--host {args.host} is not a loopback address: refusing to serve without an API key "
                         "(--api-key or FLASHZO_API_KEY)")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_running_jobs", "max_jobs_per_forward", "max_concurrent_uploads", "max_queued_jobs",
                 "completions_per_step"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    paths = parse_model_flags(args.model)
    quantize = parse_quantize_flags(args.quantize or [], paths)

    import torch
    import uvicorn

    from .app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    models = {}
    for name, path in paths.items():
        models[name] = load_served(name, path, dtype=dtype, device=device, quantize=quantize.get(name))
        m = models[name].model
        held = f", {quantize[name].name}" if name in quantize else ""
        print(f"flashzo serve: model {name}: {path} ({m.family}, {m.config.num_hidden_layers} layers, {m.dtype}"
              f"{held}, {m.device}{', no tokenizer' if models[name].tokenizer is None else ''})", flush=True)
    app = create_app(args.data_dir, models, api_key=key, max_upload_bytes=int(args.max_upload_mb * 2**20),
                     max_running=args.max_running_jobs, max_jobs_per_forward=args.max_jobs_per_forward,
                     batch_invariant=args.batch_invariant, max_concurrent_uploads=args.max_concurrent_uploads,
                     max_queued_jobs=args.max_queued_jobs, completions_per_step=args.completions_per_step,
                     hold_admission=args.hold_admission)
    print(f"flashzo serve: http://{args.host}:{args.port} (data in {os.path.abspath(args.data_dir)}, "
          f"{'API key required' if key else 'no API key'})", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, access_log=args.log_level == "debug")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; by then the jobs are
    # checkpointed, so these handlers (restored by uvicorn after its own) just let the process end.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if not server.started:
        print(f"flashzo serve: error: the server did not start (is port {args.port} in use?)", file=sys.stderr)
        return 1
    print("flashzo serve: stopped (running jobs checkpointed)", flush=True)
    return 0
