"""Remote chunk store: fetch throughput vs concurrency, and per-token time vs its floor.

nginx serves the chunk store with a per-connection rate limit (``limit_rate``), as a CDN or
object store caps each connection: one connection cannot go faster, so the store's ranged
parallel GETs are what a remote deployment's speed rests on. Two measurements, one run:

1. sustained fetch throughput of the block chunks through ``HTTPStore`` at concurrency
   1, 2, 4, 8, 16 (target: >= 5x the single-connection rate at 8);
2. decode per-token time at a 25% budget over that store, each run in its own process,
   against its floor = max(resident compute per token, streamed bytes per token / the
   throughput measured at the runtime's concurrency), with every run's ids checked against
   the resident model's.

    bash benchmarks/setup_nginx.sh            # apt-get install nginx (once)
    .venv/bin/python benchmarks/remote.py     # ~300 MB Llama, 20 MB/s per connection
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.remote")
ROOT = Path(__file__).resolve().parent
CONCURRENCY = [1, 2, 4, 8, 16]
SYSTEMS = ["resident", "ls:25%", "ls:25%:read_ahead=0", "ls:25%:read_ahead=2"]

NGINX_CONF = """
{user}
daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} sndbuf=64k;  # a small send buffer: no burst past the limit
        root {root};
        limit_rate {rate};
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx(root: Path, rate: str):
    """nginx serving ``root`` on a free port, ``limit_rate`` per connection; stopped by PID."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise SystemExit("nginx is not installed: run benchmarks/setup_nginx.sh")
    prefix = Path(tempfile.mkdtemp(prefix="layerstream-nginx-"))
    port = free_port()
    conf = prefix / "nginx.conf"
    # started as root, nginx's workers would drop to "nobody", who may not read the store
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port, root=root, rate=rate))
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(prefix / 'error.log').read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the master and its workers, by process group
        proc.wait(timeout=10)
        shutil.rmtree(prefix, ignore_errors=True)


def throughput(url: str, files: list[str], sizes: dict[str, int], concurrency: int) -> float:
    """Bytes/s fetching ``files`` one after another, each as ranged GETs in parallel."""
    import torch

    from layerstream.stores import StoreOptions
    from layerstream.stores.http import HTTPStore

    store = HTTPStore(url, StoreOptions(max_concurrency=concurrency))
    buffer = memoryview(torch.empty(max(sizes.values()), dtype=torch.uint8).numpy())
    try:
        # as the runtime reads: with the manifest's size, every part of a chunk at once
        store.read_into(files[0], buffer)  # learns range support, opens connections
        start = time.perf_counter()
        total = sum(store.read_into(f, buffer, sizes[f]).size for f in files)
        return total / (time.perf_counter() - start)
    finally:
        store.close()


def probe(system: str, source: Path, store: str, tokens: int) -> dict:
    cmd = [sys.executable, str(ROOT / "probe.py"), system, str(source), store, str(tokens), "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        return {"system": system, "error": result.stderr[-600:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-300m")
    parser.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "remote.json")
    parser.add_argument("--dtype", default=None, help="the preset saved in this dtype")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS[1:]),
        help="probe.py systems beside the resident model, e.g. ls:25%%:expert_streaming=on",
    )
    args = parser.parse_args()
    systems = ["resident", *args.systems.split(",")]
    sys.path.insert(0, str(ROOT))
    from streaming import prepare

    from layerstream.format.manifest import Manifest

    source, store_dir = prepare(args.preset, dtype=args.dtype)
    manifest = Manifest.from_json((store_dir / "manifest.json").read_text())
    files = [manifest.chunks[b.chunk].file for b in manifest.blocks]
    sizes = {info.file: info.bytes for info in manifest.chunks.values()}
    report: dict = {"preset": args.preset, "rate": args.rate, "args": vars(args) | {"out": ""}}
    with nginx(store_dir, args.rate) as url:
        rates = {}
        for c in CONCURRENCY:
            rates[c] = throughput(url, files[: max(4, min(len(files), 2 * c))], sizes, c)
            log.info("concurrency %2d: %.1f MB/s", c, rates[c] / 1e6)
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for rep in range(args.reps):
            for system in systems:
                runs[system].append(probe(system, source, url, args.new_tokens))
                r = runs[system][-1]
                shown = f"{r['per_token_s'] * 1e3:.1f} ms/token" if "error" not in r else r["error"]
                log.info("rep %d %-22s %s", rep, system, shown)
    report["throughput"] = rates
    report["runs"] = runs
    print_tables(report, rates, runs)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


def print_tables(report: dict, rates: dict[int, float], runs: dict[str, list[dict]]) -> None:
    print(f"\n== fetch throughput, nginx limit_rate {report['rate']} per connection")
    print(f"{'concurrency':>11} {'MB/s':>9} {'x single':>9}")
    for c, rate in rates.items():
        print(f"{c:>11} {rate / 1e6:>9.1f} {rate / rates[1]:>9.2f}")
    resident = [r for r in runs["resident"] if "error" not in r]
    compute_ms = statistics.median(r["per_token_s"] for r in resident) * 1e3
    reference = resident[0]["ids"]
    print(
        f"\n== {report['preset']}, 25% budget over HTTP; resident compute {compute_ms:.1f} ms/token"
    )
    cols = ["system", "ms/tok", "floor", "x floor", "MiB/tok", "wait/tok", "concur.", "exact"]
    print(f"{cols[0]:<22}" + "".join(f"{c:>9}" for c in cols[1:]))
    rows = []
    for system, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if system == "resident" or not ok:
            continue
        concurrency = 8  # the runtime's default store_max_concurrency
        per_token = statistics.median(r["per_token_s"] for r in ok) * 1e3
        # the decode steps' bytes where the probe tells them (the prefill's may differ)
        bytes_tok = statistics.median(
            r.get("decode_bytes_per_token", r["bytes_per_token"]) for r in ok
        )
        floor = max(compute_ms, bytes_tok / rates[concurrency] * 1e3)
        wait = statistics.median(r["wait_s"] for r in ok) * 1e3 / (report["args"]["new_tokens"] + 1)
        exact = all(r["ids"] == reference for r in ok)
        rows.append(dict(system=system, per_token_ms=per_token, floor_ms=floor, exact=exact))
        print(
            f"{system:<22}{per_token:>9.1f}{floor:>9.1f}{per_token / floor:>9.2f}"
            f"{bytes_tok / 2**20:>9.1f}{wait:>9.1f}{concurrency:>9}{exact!s:>9}"
        )
    report["rows"] = rows


if __name__ == "__main__":
    main()
