"""Soak: mixed clients against one real ``mlserver start`` for minutes, then SIGTERM.

Clients loop over SSE and gRPC token streams, unary ``/infer`` and hidden-state streams, a
share of them cancelled after two events; beside them, readers that ask for hidden states of
a long prompt and never read. Every stream that ran to its end must equal that prompt's solo
answer (asked alone before the soak). After the soak: the server's RSS once idle against its
RSS after load and warm-up, then how long SIGTERM takes to end it.

    .venv/bin/python benchmarks/soak.py                    # 16 clients, 4 paused, 10 minutes
    .venv/bin/python benchmarks/soak.py --minutes 1 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # the e2e tests' server harness
from mlserver_proc import MLServerProcess, ModelSpec  # noqa: E402

log = logging.getLogger("benchmarks.soak")
MODEL = "soak"
PROMPTS = [f"Streaming weights layer by layer, take {k}:" for k in range(8)]
TOKENS = 12


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def token_request(prompt: str) -> dict[str, Any]:
    return {
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
        "parameters": {"max_new_tokens": TOKENS, "temperature": 0},
    }


def ids_of(events) -> list[int]:
    from layerstream_client import Token

    return [e.token_id for e in events if isinstance(e, Token)]


def paused_reader(server: MLServerProcess, stop: threading.Event) -> None:
    """Asks for the hidden states of a long prompt and reads nothing, until ``stop``; a
    connection the server closes (at the request's deadline) is opened again."""
    host, port = server.http_url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x " * 60]}],
            "parameters": {"mode": "hidden_states"},
        }
    ).encode()
    while not stop.is_set():
        with socket.create_connection((host, int(port))) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(
                f"POST /v2/models/{MODEL}/generate_stream HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            stop.wait(30)


def client(
    server: MLServerProcess,
    expected: dict[str, list[int]],
    until: float,
    seed: int,
    counts: Counter,
    wrong: list[str],
) -> None:
    from layerstream_client import GRPCClient, SSEClient, StreamError

    rng = random.Random(seed)
    sse, grpc_client = SSEClient(server.http_url, 120), GRPCClient(server.grpc_target, 120)
    while time.monotonic() < until:
        prompt = rng.choice(PROMPTS)
        kind = rng.choice(["sse", "grpc", "unary", "hidden"])
        cancel = kind in ("sse", "grpc") and rng.random() < 0.2
        try:
            if kind == "unary":
                body = sse.infer(MODEL, token_request(prompt))
                outputs = {o["name"]: o for o in body["outputs"]}
                got = outputs["token_ids"]["data"]
            elif kind == "hidden":
                request = token_request(prompt)
                request["parameters"] = {"mode": "hidden_states", "layers": [0, -1]}
                states = [e for e in sse.stream(MODEL, request) if hasattr(e, "layer")]
                counts["hidden" if len(states) == 2 else "hidden wrong"] += 1
                continue
            else:
                stream = (sse if kind == "sse" else grpc_client).stream(
                    MODEL, token_request(prompt)
                )
                if cancel:
                    for _, _ in zip(range(2), stream, strict=False):
                        pass
                    stream.close()
                    counts["cancelled"] += 1
                    continue
                got = ids_of(stream)
        except StreamError as exc:
            counts[f"error {exc.error_type}"] += 1
            continue
        counts[kind] += 1
        if got != expected[prompt]:
            wrong.append(f"{kind} {prompt!r}: {got} != {expected[prompt]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--paused", type=int, default=4)
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from layerstream.chunker.convert import chunk_checkpoint
    from layerstream.chunker.presets import write_random_checkpoint
    from layerstream_client import SSEClient

    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="layerstream-soak-") as tmp:
        source = write_random_checkpoint(args.preset, Path(tmp) / "source", weight_scale=8.0)
        store = Path(tmp) / "chunks"
        chunk_checkpoint(source, store, MODEL, progress=False)
        extra = {
            "memory_budget": "50%",
            "max_active_sequences": 8,
            "request_timeout_s": 60,
            "torch_threads": 1,
        }
        server = MLServerProcess(Path(tmp) / "server", [ModelSpec(MODEL, store, extra)]).start()
        try:
            server.wait_ready([MODEL])
            sse = SSEClient(server.http_url, 120)
            expected = {p: ids_of(sse.stream(MODEL, token_request(p))) for p in PROMPTS}
            loaded = rss(server.proc.pid)
            counts: Counter = Counter()
            wrong: list[str] = []
            until = time.monotonic() + args.minutes * 60
            paused = [
                threading.Thread(target=paused_reader, args=(server, stop), daemon=True)
                for _ in range(args.paused)
            ]
            clients = [
                threading.Thread(target=client, args=(server, expected, until, k, counts, wrong))
                for k in range(args.clients)
            ]
            peak = loaded
            for thread in paused + clients:
                thread.start()
            while any(t.is_alive() for t in clients):
                peak = max(peak, rss(server.proc.pid))
                time.sleep(1)  # sampling interval of the RSS, not a timing assertion
            # idle but for the paused readers, which stay connected through the SIGTERM
            for _ in range(3):
                list(sse.stream(MODEL, token_request(PROMPTS[0])))
            time.sleep(2)  # let the engine's release of free memory run
            idle = rss(server.proc.pid)
            started = time.monotonic()
            os.killpg(server.proc.pid, signal.SIGTERM)
            code = server.wait_exit(120)
            exit_s = time.monotonic() - started if code is not None else None
        finally:
            stop.set()
            server.stop()
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "paused": args.paused,
        "requests": dict(counts),
        "wrong": wrong,
        "rss_loaded_mib": round(loaded / 2**20, 1),
        "rss_peak_mib": round(peak / 2**20, 1),
        "rss_idle_mib": round(idle / 2**20, 1),
        "idle_vs_loaded": round(idle / loaded, 3),
        "sigterm_exit_s": None if exit_s is None else round(exit_s, 1),
    }
    print("| " + " | ".join(result) + " |")
    print("| " + " | ".join(str(v if k != "wrong" else len(v)) for k, v in result.items()) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
