"""Shared sweeps: N concurrent clients on one streamed model, through a real ``mlserver start``.

Concurrent requests on one model can share each pass ("sweep") over the streamed blocks, so
a block read once serves every sequence in flight, and each output stays exactly its solo
run. This drives a real server (its own process group, a temporary model repository with
``parallel_workers: 0`` and ``gzip_enabled: false``, free ports) with N clients at once, N in
1, 2, 4, 8, 16, all with the same prompt length and new tokens but each its own prompt, all
released together by a barrier. The server is restarted for every row, so its peak RSS is
that row's. Regimes:

- ``cold``: a box smaller than the model. The page cache is dropped before the server
  starts (and again after its warm-up), and the server runs in a memory cgroup (which also
  caps its page cache) of import baseline + weights budget + KV cache + margin, at a 25%
  budget. Needs root and a memory cgroup hierarchy; skipped with the reason otherwise.
- ``http``: the chunk store behind nginx with a per-connection ``limit_rate`` (remote.py),
  25% budget. Skipped with the reason when nginx is missing.
- ``warm25``, ``warm100``: the chunk files in the page cache, 25% and 100% budgets.

Per row: aggregate tokens/s and its ratio to the same regime's 1-client row; time to first
token and inter-token time (p50/p99 over every client, measured at the client); bytes
streamed per generated token (the server's Prometheus counters across the row); sweeps and
mean sweep time (when the server exports ``layerstream_sweeps_total``); the server's peak RSS
(VmHWM) and, cold, the cgroup's peak; whether every client's token ids equal the greedy ids
of a resident transformers model on the same prompt; the slowest ``GET /v2/health/ready``
polled every 50 ms during the row; and the floor of one step (one token for each of the N
clients): max(N x one sequence's compute per token, bytes per step / store bandwidth). One
sequence's compute is the resident model's, measured by probe.py in its own process; the
bandwidth is bandwidth.py's best reader and depth (cold), HTTPStore's fetch rate at the
runtime's 8 parallel GETs (http), or none: the page cache (warm, floor = compute). One more
row per regime repeats ``--grpc-clients`` clients over gRPC ``ModelStreamInfer``. The targets
of the shared-sweeps work are checked at the end.

    .venv/bin/python benchmarks/concurrency.py        # llama-1b, every regime: tens of minutes
    .venv/bin/python benchmarks/concurrency.py --preset tiny-llama --budget 50% \\
        --regimes warm25 --clients 1,2 --tokens 8    # a quick try, a few seconds a row

``--no-concurrency-settings`` leaves out ``max_active_sequences`` (and ``kv_cache_budget``),
which a server without shared sweeps refuses; such a server serves one request at a time.
``--budget`` changes the 25% of the streamed regimes: tiny-llama cannot run below ~48% (its
non-block weights and one block), so try it with ``--budget 50%``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bandwidth
import cgroup
import remote
import streaming
from concurrency_report import check_targets, print_regime, print_targets, regime_header
from serving_load import (  # ModelSpec: serving_load puts the tests' harness on sys.path
    MODEL,
    ClientResult,
    ModelSpec,
    ReadyPoller,
    Server,
    metric_totals,
    proc_field,
    run_clients,
    wait_verified,
    warm_up,
)

log = logging.getLogger("benchmarks.concurrency")
ROOT = Path(__file__).resolve().parent
MARGIN = 128 * 2**20  # activations, allocator slack in the cold cgroup (as streaming.py)
STORE_CONCURRENCY = 8  # the runtime's default store_max_concurrency: its fetch rate is the floor's


@dataclass(frozen=True)
class Regime:
    name: str
    budget: str
    cold: bool = False
    http: bool = False

    @property
    def streams(self) -> bool:
        return self.budget != "100%"


REGIMES = {
    "cold": Regime("cold", "25%", cold=True),
    "http": Regime("http", "25%", http=True),
    "warm25": Regime("warm25", "25%"),
    "warm100": Regime("warm100", "100%"),
}


@dataclass
class Bench:
    """What every row of every regime shares."""

    args: argparse.Namespace
    source: Path
    store: Path
    model_bytes: int
    vocab: int
    kv_per_sequence: int
    prompts: list[list[int]]
    references: list[list[int]]
    compute_s: float  # one sequence's compute per token, resident model
    work: Path


@dataclass
class Setup:
    """One regime's store and what its floor divides by."""

    store_uri: str
    bandwidth: float | None = None  # bytes/s; None: the page cache (no I/O floor)
    bandwidth_by: str = "page cache"
    limit_base: int = 0  # cold: what the server's imports cost inside a cgroup


# -- preparation -------------------------------------------------------------------------


def prompt_ids(index: int, length: int, vocab: int) -> list[int]:
    """Client ``index``'s prompt: deterministic, distinct per client, clear of the special
    ids 0-2 (pad, bos, eos of the presets)."""
    rng = random.Random(1000 + index)
    return [rng.randrange(3, vocab) for _ in range(length)]


def references(
    source: Path, prompts: list[list[int]], tokens: int, threads: int
) -> list[list[int]]:
    """The greedy ids of a resident transformers model, with the generation config the server
    uses (the model's own, greedy, pad = eos when it has none), at the server's thread count
    (exactness is promised at the same thread count)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    config = transformers.GenerationConfig.from_dict(model.generation_config.to_dict())
    config.max_new_tokens, config.max_length, config.do_sample = tokens, None, False
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    out = []
    with torch.inference_mode():
        for ids in prompts:
            tensor = torch.tensor([ids], dtype=torch.long)
            generated = model.generate(
                tensor, attention_mask=torch.ones_like(tensor), generation_config=config
            )
            out.append(generated[0, len(ids) :].tolist())
    del model  # 1 GB at llama-1b: not held while the servers run
    return out


def compute_per_token(source: Path, store: Path, tokens: int, threads: int) -> float:
    """Seconds of one sequence's decode step on the resident model, in its own process
    (probe.py: a 64-token prompt, after a warm-up)."""
    cmd = [
        sys.executable,
        str(ROOT / "probe.py"),
        "resident",
        str(source),
        str(store),
        str(max(tokens, 4)),
        str(threads),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"probe.py resident failed: {result.stderr[-600:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["per_token_s"]


def kv_bytes_per_sequence(store: Path, positions: int) -> int:
    """Keys and values of one sequence at ``positions`` tokens, from the model's config."""
    config = json.loads((store / "config.json").read_text())
    layers = config["num_hidden_layers"]
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(config.get("dtype", "float32"), 4)
    return 2 * layers * heads * head_dim * positions * width


def server_baseline() -> int:
    """What the server's imports cost inside a cgroup (anon + library page cache)."""
    imports = (
        "import torch, transformers, mlserver.cli, mlserver.server, layerstream.serving.runtime"
    )
    _, peak = cgroup.run_capped([sys.executable, "-c", imports], 8 * 2**30, timeout=600)
    return peak or 0


def block_files(store: Path) -> tuple[list[str], dict[str, int], int]:
    from layerstream.format.manifest import Manifest

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    files = [manifest.chunks[b.chunk].file for b in manifest.blocks]
    sizes = {info.file: info.bytes for info in manifest.chunks.values()}
    return files, sizes, max(manifest.block_bytes)


# -- one row -----------------------------------------------------------------------------


def model_extra(args: argparse.Namespace, regime: Regime, clients: int) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "memory_budget": regime.budget,
        "torch_threads": args.torch_threads,
        "max_new_tokens_limit": max(args.tokens, 1024),
        "request_timeout_s": args.request_timeout,
    }
    if not args.no_concurrency_settings:
        extra["max_active_sequences"] = args.max_active or max(clients, 1)
        if args.kv_cache_budget:
            extra["kv_cache_budget"] = args.kv_cache_budget
    return extra


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: p99 of 32 values is the largest, never an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def cgroup_limit(bench: Bench, regime: Regime, setup: Setup, clients: int) -> int:
    """Import baseline + weights budget + the KV cache of the row's sequences (or the
    kv_cache_budget asked for) + margin, as streaming.py sizes its box."""
    from layerstream.units import parse_size

    args = bench.args
    weights = parse_size(regime.budget, bench.model_bytes)
    kv = bench.kv_per_sequence * max(clients, args.max_active or 0)  # what the row needs
    if args.kv_cache_budget and not args.no_concurrency_settings:
        with contextlib.suppress(ValueError):  # "auto": the row's need stands
            kv = parse_size(args.kv_cache_budget)
    return setup.limit_base + weights + kv + args.margin


def run_row(bench: Bench, regime: Regime, setup: Setup, clients: int, transport: str) -> dict:
    """Start a server for this row, warm it up, run the clients, read its counters; the
    server (and the row's cgroup) is gone when this returns."""
    row: dict[str, Any] = {"clients": clients, "transport": transport}
    spec = ModelSpec(MODEL, setup.store_uri, model_extra(bench.args, regime, clients), "raw")
    root = Path(tempfile.mkdtemp(prefix=f"{regime.name}-{transport}-{clients}-", dir=bench.work))
    with contextlib.ExitStack() as stack:
        procs, peak = None, None
        if regime.cold:
            row["cgroup_limit"] = cgroup_limit(bench, regime, setup, clients)
            name = f"layerstream-concurrency-{os.getpid()}-{time.monotonic_ns()}"
            procs, peak = stack.enter_context(cgroup.memory_cgroup(name, row["cgroup_limit"]))
            cgroup.drop_caches()
        server = Server(root, [spec], procs)
        try:
            server.start()
            server.wait_ready(timeout=bench.args.ready_timeout)
            if regime.streams and not regime.http:
                wait_verified(server, bench.args.ready_timeout)
            prompt = prompt_ids(-1, bench.args.prompt_tokens, bench.vocab)  # no client's
            warm_up(server, prompt, bench.args.request_timeout)
            if regime.cold:
                cgroup.drop_caches()
            row |= measure_row(server, bench, clients, transport)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["cause"] = log_cause(server.log_text())
            tail = "" if "log tail" in str(exc) else f"\nlog tail:\n{server.log_tail(30)}"
            log.error(
                "%s %s x%d failed: %s%s",
                regime.name,
                transport,
                clients,
                exc,
                tail,
            )
        finally:
            server.stop()
        if peak is not None:
            row["cgroup_peak"] = peak()
    shutil.rmtree(root, ignore_errors=True)
    return row


def log_cause(text: str) -> str | None:
    """The last exception line of the server's log (``SettingsError: configuration: ...``):
    why a server did not come up, for the table."""
    causes = re.findall(r"^\S*(?:Error|Exception): .+$", text, re.MULTILINE)
    return causes[-1] if causes else None


def measure_row(server: Server, bench: Bench, clients: int, transport: str) -> dict:
    assert server.proc is not None
    pid = server.proc.pid
    before = metric_totals(server.metrics_url)
    disk_before = proc_field(pid, "io", "read_bytes")
    with ReadyPoller(server.http_url) as poller:
        results = run_clients(
            server,
            bench.prompts[:clients],
            bench.args.tokens,
            transport,
            bench.args.request_timeout,
        )
    after = metric_totals(server.metrics_url)
    disk_read = proc_field(pid, "io", "read_bytes") - disk_before
    peak_rss = proc_field(pid, "status", "VmHWM")

    def delta(name: str) -> float | None:
        return after[name] - before.get(name, 0.0) if name in after else None

    ok = [r for r in results if r.error is None]
    started = min((r.started for r in results if r.started), default=0.0)
    ended = max((r.times[-1] for r in ok if r.times), default=started)
    wall = ended - started
    tokens = sum(len(r.ids) for r in ok)
    ttfts = [r.times[0] - r.started for r in ok if r.times]
    gaps = [b - a for r in ok for a, b in zip(r.times, r.times[1:], strict=False)]
    generated = delta("layerstream_generated_tokens_total") or 0.0
    streamed = delta("layerstream_bytes_streamed_total") or 0.0
    sweeps = delta("layerstream_sweeps_total")
    # back to back while any client runs: the row's wall time over its sweeps
    sweep_s = wall / sweeps if sweeps else None
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "itl_p50_ms": ms(percentile(gaps, 50)),
        "itl_p99_ms": ms(percentile(gaps, 99)),
        "generated_tokens": generated,
        "bytes_streamed": streamed,
        "bytes_per_token": streamed / generated if generated else None,
        "disk_read_per_token": disk_read / generated if generated else None,
        "sweeps": sweeps,
        "sequences_per_sweep": sequences_per_sweep(delta, ok),
        "sweep_ms": ms(sweep_s),
        "peak_rss": peak_rss,
        "exact": len(ok) == len(results)
        and all(r.ids == bench.references[r.index] for r in results),
        "ready_max_ms": ms(max(poller.latencies, default=None)),
        "ready_polls": len(poller.latencies),
        "ready_failures": poller.failures,
        "errors": sorted({r.error for r in results if r.error}),
        "per_client": [
            {
                "index": r.index,
                "exact": r.ids == bench.references[r.index],
                "tokens": len(r.ids),
                "finish_reason": r.finish_reason,
                "ttft_ms": ms(r.times[0] - r.started) if r.times else None,
                "stats": r.stats,
                "error": r.error,
            }
            for r in results
        ],
    }


def sequences_per_sweep(
    delta: Callable[[str], float | None], results: list[ClientResult]
) -> float | None:
    """Mean requests on a sweep: the server's histogram ``layerstream_sweep_sequences`` when
    it has one, else the clients' final stats (``sweep_sequences`` / ``sweeps``, the mean
    sharing of the sweeps each rode). 1.0 when nothing is shared, N when every sweep
    carries all N clients."""
    total, count = (
        delta("layerstream_sweep_sequences_sum"),
        delta("layerstream_sweep_sequences_count"),
    )
    if total is not None and count:
        return total / count
    shares = [
        r.stats["sweep_sequences"] / r.stats["sweeps"]
        for r in results
        if r.stats.get("sweeps") and "sweep_sequences" in r.stats
    ]
    return statistics.mean(shares) if shares else None


def add_floor(row: dict, bench: Bench, regime: Regime, setup: Setup) -> None:
    """One step = one token for each of the N clients. Its measured time is N / aggregate
    tokens/s (for a server that runs one request at a time, N solo steps); its floor is
    max(N x one sequence's compute / the sequences that can compute at once, the bytes it
    must read / the store's bandwidth). The server computes as many sequences at once as
    the CPUs hold beside its torch threads (engine/tuning.py compute_slots), so N x one
    sequence's compute alone would be no floor. Cold, the bytes are those the server's
    process read from the disk (/proc/PID/io), not the ones its page cache served."""
    n = row["clients"]
    row["step_ms"] = n / row["tokens_per_s"] * 1e3 if row["tokens_per_s"] else None
    parallel = min(n, max(1, (os.cpu_count() or 1) // bench.args.torch_threads))
    compute_ms = n * bench.compute_s * 1e3 / parallel
    per_token = row["disk_read_per_token"] if regime.cold else row["bytes_per_token"]
    io_ms = None
    if setup.bandwidth and per_token is not None:
        io_ms = n * per_token / setup.bandwidth * 1e3
    row["floor_compute_ms"], row["floor_io_ms"] = compute_ms, io_ms
    row["floor_ms"] = max(compute_ms, io_ms or 0.0)
    row["x_floor"] = row["step_ms"] / row["floor_ms"] if row["step_ms"] else None
    if row["x_floor"] is not None and row["x_floor"] < 1.0:
        log.error(
            "%s %s x%d ran at %.2f x its floor: the floor was measured too low",
            regime.name,
            row["transport"],
            n,
            row["x_floor"],
        )


# -- regimes -----------------------------------------------------------------------------


@contextlib.contextmanager
def regime_setup(bench: Bench, regime: Regime) -> Iterator[Setup]:
    """The regime's store (nginx for http) and the bandwidth its floor uses."""
    store = str(bench.store.resolve())
    files, sizes, largest = block_files(bench.store)
    if regime.http:
        with remote.nginx(bench.store, bench.args.rate) as url:
            files = files[: max(4, min(len(files), 2 * STORE_CONCURRENCY))]  # as remote.py
            rate = remote.throughput(url, files, sizes, STORE_CONCURRENCY)
            yield Setup(url, rate, f"HTTPStore x{STORE_CONCURRENCY}")
        return
    if regime.cold:
        measured = bandwidth.measure(bench.store, files, largest, cold=True)
        yield Setup(store, measured["best"], measured["best_by"], limit_base=server_baseline())
        return
    streaming.warm_page_cache(bench.store)
    yield Setup(store)


def skip_reason(regime: Regime) -> str | None:
    if regime.cold:
        return cgroup.available()
    if regime.http and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        return "nginx is not installed: run benchmarks/setup_nginx.sh"
    return None


def run_regime(bench: Bench, regime: Regime) -> dict:
    args = bench.args
    with regime_setup(bench, regime) as setup:
        log.info(
            "%s: store %s, floor bandwidth %s%s",
            regime.name,
            setup.store_uri,
            f"{setup.bandwidth / 1e9:.3f} GB/s ({setup.bandwidth_by})"
            if setup.bandwidth
            else "n/a",
            f", cgroup base {setup.limit_base / 2**20:.0f} MiB" if regime.cold else "",
        )
        plan = [(n, "sse") for n in args.clients]
        if args.grpc_clients:
            plan.append((args.grpc_clients, "grpc"))
        rows = []
        for clients, transport in plan:
            row = run_row(bench, regime, setup, clients, transport)
            if "error" not in row:
                add_floor(row, bench, regime, setup)
            rows.append(row)
            log.info("%s %s x%d: %s", regime.name, transport, clients, brief(row))
    solo = next((r for r in rows if r["clients"] == 1 and r["transport"] == "sse"), None)
    for row in rows:
        if solo and "error" not in row and "error" not in solo and solo["tokens_per_s"]:
            row["x_one_client"] = row["tokens_per_s"] / solo["tokens_per_s"]
    return {
        "budget": regime.budget,
        "store": setup.store_uri,
        "bandwidth": setup.bandwidth,
        "bandwidth_by": setup.bandwidth_by,
        "limit_base": setup.limit_base,
        "rows": rows,
    }


def brief(row: dict) -> str:
    if "error" in row:
        return row["error"][:200]
    return (
        f"{row['tokens_per_s']:.2f} tokens/s, ttft p99 {row['ttft_p99_ms']:.0f} ms, "
        f"exact {row['exact']}, errors {row['errors'] or 'none'}"
    )


# -- main --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument(
        "--dtype", default=None, help="save and chunk the preset in this dtype (e.g. bfloat16)"
    )
    parser.add_argument("--regimes", default="cold,http,warm25,warm100")
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument(
        "--grpc-clients", type=int, default=8, help="clients of the gRPC row (0: none)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per client")
    parser.add_argument("--torch-threads", type=int, default=1, help="the server's and reference's")
    parser.add_argument(
        "--max-active", type=int, default=0, help="max_active_sequences (0: the row's clients)"
    )
    parser.add_argument(
        "--kv-cache-budget", default=None, help="kv_cache_budget (default: the server's)"
    )
    parser.add_argument(
        "--no-concurrency-settings",
        action="store_true",
        help="leave out max_active_sequences and kv_cache_budget (a server without shared sweeps)",
    )
    parser.add_argument(
        "--budget",
        default="25%",
        help="memory_budget of the streamed regimes (cold, http, warm25); tiny-llama's "
        "smallest workable budget is ~48%%",
    )
    parser.add_argument("--rate", default="20m", help="nginx limit_rate per connection (http)")
    parser.add_argument("--margin", type=int, default=MARGIN, help="bytes of cold cgroup slack")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--request-timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=ROOT / "concurrency.json")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.regimes = args.regimes.split(",")
    unknown = set(args.regimes) - set(REGIMES)
    if unknown:
        parser.error(f"unknown regimes {sorted(unknown)}; known: {', '.join(REGIMES)}")
    return args


def prepare_bench(args: argparse.Namespace, work: Path) -> Bench:
    source, store = streaming.prepare(args.preset, args.dtype)
    vocab = json.loads((store / "config.json").read_text())["vocab_size"]
    count = max([*args.clients, args.grpc_clients])
    prompts = [prompt_ids(i, args.prompt_tokens, vocab) for i in range(count)]
    started = time.perf_counter()
    refs = references(source, prompts, args.tokens, args.torch_threads)
    log.info("reference ids for %d prompts in %.1fs", count, time.perf_counter() - started)
    compute_s = compute_per_token(source, store, args.tokens, args.torch_threads)
    log.info("one sequence's compute: %.1f ms/token (resident, probe.py)", compute_s * 1e3)
    return Bench(
        args=args,
        source=source,
        store=store,
        model_bytes=streaming.model_bytes(store),
        vocab=vocab,
        kv_per_sequence=kv_bytes_per_sequence(store, args.prompt_tokens + args.tokens),
        prompts=prompts,
        references=refs,
        compute_s=compute_s,
        work=work,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="layerstream-concurrency-"))
    try:
        bench = prepare_bench(args, work)
        report: dict[str, Any] = {
            "preset": args.preset,
            "model_bytes": bench.model_bytes,
            "compute_ms_per_token": bench.compute_s * 1e3,
            "args": vars(args) | {"out": str(args.out)},
            "regimes": {},
            "skipped": {},
        }
        for name in args.regimes:
            regime = REGIMES[name]
            if regime.streams:
                regime = dataclasses.replace(regime, budget=args.budget)
            if why := skip_reason(regime):
                log.warning("%s regime skipped: %s", name, why)
                report["skipped"][name] = why
                continue
            report["regimes"][name] = run_regime(bench, regime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, data in report["regimes"].items():
        header = regime_header(args, bench.model_bytes, bench.compute_s, name, data)
        print_regime(name, data, header)
    for name, why in report["skipped"].items():
        print(f"\n### {name}: skipped ({why})")
    report["targets"] = check_targets(report)
    print_targets(report["targets"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
