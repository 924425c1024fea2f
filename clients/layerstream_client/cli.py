"""``layerstream-client``: stream tokens or hidden states from a layerstream model.

layerstream-client generate --url http://127.0.0.1:8080 --model demo "Once upon a time"
layerstream-client generate --grpc 127.0.0.1:8081 --model demo "Once upon a time"
layerstream-client hidden-states --url http://127.0.0.1:8080 --model enc --layers 0,-1 "text"
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from .events import GENERATION_PARAMS, Final, HiddenState, ModelNotLoadedError, StreamError, Token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerstream-client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "hidden-states"):
        p = sub.add_parser(name)
        target = p.add_mutually_exclusive_group()
        target.add_argument("--url", default="http://127.0.0.1:8080", help="REST base URL (SSE)")
        target.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC ModelStreamInfer")
        p.add_argument("--model", required=True)
        p.add_argument("prompt", nargs="?", help="the prompt text (or use --input-ids)")
        p.add_argument("--input-ids", help="comma-separated token ids instead of a prompt")
        p.add_argument("--json", action="store_true", help="print every event as a JSON line")
        p.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            help="seconds this client waits for the server (the transport's timeout); the "
            "server's own deadline is the request parameter 'timeout', in microseconds",
        )
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int)
            p.add_argument("--temperature", type=float)
            p.add_argument("--top-p", type=float)
            p.add_argument("--top-k", type=int)
            p.add_argument("--do-sample", action="store_true", default=None)
            p.add_argument("--seed", type=int)
            p.add_argument("--stop", action="append", help="stop string (repeatable)")
            p.add_argument("--repetition-penalty", type=float)
        else:
            p.add_argument(
                "--layers", help="e.g. 0,-1 (default: every layer, as the server sends them)"
            )
            p.add_argument("--pooling", choices=["mean", "cls", "last", "pooler"])
            p.add_argument(
                "--mode", choices=["hidden_states", "embedding"], default="hidden_states"
            )
    return parser


def _params(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "generate":
        params = {k: getattr(args, k) for k in GENERATION_PARAMS}
        if params["stop"] and len(params["stop"]) == 1:
            params["stop"] = params["stop"][0]
        params["mode"] = "tokens"
    else:
        params = {"mode": args.mode, "layers": args.layers, "pooling": args.pooling}
        if args.mode == "embedding":
            params.pop("layers")
    return {k: v for k, v in params.items() if v is not None}


def _client(args: argparse.Namespace):
    if args.grpc:
        from .grpc import GRPCClient

        return GRPCClient(args.grpc, timeout=args.timeout)
    from .sse import SSEClient

    return SSEClient(args.url, timeout=args.timeout)


def _summary(values: list[float]) -> str:
    norm = math.sqrt(sum(v * v for v in values))
    head = ", ".join(f"{v:.4f}" for v in values[:4])
    return f"norm {norm:.4f} [{head}, ...]"


def _print(event: Token | HiddenState | Final, as_json: bool) -> None:
    if as_json:
        data = dict(event.__dict__, event=type(event).__name__.lower())
        print(json.dumps(data), flush=True)
    elif isinstance(event, Token):
        print(event.text, end="", flush=True)
    elif isinstance(event, HiddenState):
        print(
            f"layer {event.layer}: shape {list(event.shape)} {_summary(event.values)}", flush=True
        )
    else:
        if event.text:
            print(event.text, end="")
        if event.embedding is not None:
            print(f"embedding: dim {len(event.embedding)} {_summary(event.embedding)}")
        stats = " ".join(f"{k}={v}" for k, v in sorted(event.stats.items()))
        print(f"\n[finish_reason={event.finish_reason} {stats}]", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.prompt is None) == (args.input_ids is None):
        print("give a prompt or --input-ids (not both)", file=sys.stderr)
        return 2
    ids = [int(i) for i in args.input_ids.split(",")] if args.input_ids else None
    client = _client(args)
    try:
        # MLServer answers a stream for a model it does not serve with an empty 200: ask first
        client.check_model(args.model)
        for event in client.generate(args.model, args.prompt, ids, **_params(args)):
            _print(event, args.json)
    except ModelNotLoadedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StreamError as exc:
        print(f"\nerror ({exc.error_type or 'unknown kind'}): {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # connection refused, HTTP status, gRPC status: one clear line
        details = exc.details() if hasattr(exc, "details") else exc
        print(f"\nerror: {type(exc).__name__}: {details}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
