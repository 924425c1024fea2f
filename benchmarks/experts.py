"""Expert streaming vs whole-block streaming on mixture-of-experts models.

Random-init models of current releases' shapes (``qwen3-moe-2b``: 64 experts, top-8;
``mixtral-1b``: 8 experts, top-2; ``gpt-oss-2b``: 32 experts, top-4), saved and chunked in
bfloat16 (``--dtypes bfloat16,mxfp4``: also with random MXFP4 experts, as gpt-oss ships
them), each at least 4x the budget. Every run is its own process (benchmarks/probe.py),
greedy ids checked against the resident ``from_pretrained`` model. Regimes as in
streaming.py: warm (page cache, no limit) and cold (page cache dropped, a memory cgroup
of import baseline + budget + margin).

Each streaming run is timed once the engine's background pass has hashed every streamed
chunk (a server's steady state; before that, each part is hashed on its first read).

Per row: ms/token and bytes read per token of the decode steps (the prefill's 64 tokens
route to nearly every expert), split into experts and the rest; the guesses' precision and
recall, the expert cache's hit rate, peak RSS, ids. The floor is max(resident compute,
bytes the routing needs per token / the bandwidth the store delivers to single-expert
reads, 16 in flight), where the bytes the routing needs are what expert streaming without
guesses read (each routed expert once per block run, but those the expert cache holds,
plus the blocks' non-expert parts not pinned): every row is held to the same floor.

    .venv/bin/python benchmarks/experts.py                        # both models, both regimes
    .venv/bin/python benchmarks/experts.py --presets mixtral-1b --regimes warm --reps 1
    .venv/bin/python benchmarks/experts.py --presets gpt-oss-2b --dtypes bfloat16,mxfp4 \
        --regimes cold --reps 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import cgroup
import streaming

log = logging.getLogger("benchmarks.experts")
ROOT = Path(__file__).resolve().parent
WHOLE, EXPERTS = "ls:25%:expert_streaming=off", "ls:25%:expert_streaming=on"
# the guesses never, always, and (EXPERTS, the default) where timed passes find them faster
NO_GUESS = "ls:25%:expert_streaming=on:expert_prefetch=false"
GUESS = "ls:25%:expert_streaming=on:expert_prefetch=true"
SYSTEMS = ["resident", WHOLE, NO_GUESS, GUESS, EXPERTS]
# with --peers (benchmarks/.venv-peers, setup_peers.sh): accelerate's disk offload at the
# same budget, and llama.cpp with mmap on a GGUF of the same checkpoint, in the same cgroup
LLAMA_CPP = "llama.cpp"
# the same, in a cgroup of its own imports' baseline + budget + margin: without torch its
# process is ~600 MiB smaller, room the same cgroup as ours leaves to its page cache
LLAMA_CPP_OWN = "llama.cpp:own-baseline"
PEERS = ["accelerate:25%", LLAMA_CPP, LLAMA_CPP_OWN]


def llama_baseline() -> int:
    """What llama-cpp-python's imports cost inside a cgroup, as baseline_usage() for ours."""
    cmd = [str(streaming.PEERS_PYTHON), "-c", "import llama_cpp"]
    _, peak = cgroup.run_capped(cmd, 8 * 2**30, timeout=600)
    return peak or 0


def llama_command(source: Path, args: argparse.Namespace) -> list[str]:
    """llama.cpp's run on the checkpoint converted by llama.cpp's own converter (once)."""
    gguf = source.with_suffix(".gguf")
    if not gguf.exists():
        partial = gguf.with_suffix(".partial")
        subprocess.run(
            [
                str(streaming.PEERS_PYTHON),
                str(ROOT / "llamacpp.py"),
                "convert",
                str(source),
                str(partial),
            ],
            check=True,
        )
        partial.rename(gguf)
    return [
        str(streaming.PEERS_PYTHON),
        str(ROOT / "llamacpp.py"),
        "run",
        str(gguf),
        str(args.new_tokens),
        str(args.threads),
    ]


def expert_bandwidth(store: Path, cold: bool, samples: int = 512, depth: int = 16) -> float:
    """What the store delivers to reads of single experts (each expert's ranges, at random
    across blocks, ``depth`` in flight, past the page cache where the file system allows, as
    the engine reads them when the cache cannot hold the chunks): the bandwidth at the
    access size the routing needs, for the floor."""
    import mmap
    import random
    from concurrent.futures import ThreadPoolExecutor

    from layerstream.format.manifest import Manifest
    from layerstream.format.parts import chunk_parts
    from layerstream.format.safetensors import parse_header
    from layerstream.stores import LocalStore

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    parts = []
    for block in manifest.blocks:
        info = manifest.chunks[block.chunk]
        if info.experts is None:
            continue
        with open(store / info.file, "rb") as f:
            first8 = f.read(8)
            head = first8 + f.read(int.from_bytes(first8, "little"))
        layout = parse_header(info, head, info.bytes)
        parts.append((info, chunk_parts(info, layout)))
    if not parts:
        return 0.0
    rng = random.Random(0)
    reads = []
    for _ in range(samples):
        info, p = rng.choice(parts)
        group = rng.randrange(len(p.groups))
        reads.append((info, p.experts[group][rng.randrange(p.groups[group].count)]))
    local = LocalStore(store)
    size = max(info.bytes for info, _ in parts)
    buffers = [memoryview(mmap.mmap(-1, size)) for _ in range(depth)]
    if cold:
        cgroup.drop_caches()
    start = time.perf_counter()

    def read(i: int) -> int:
        info, ranges = reads[i]
        view = buffers[i % depth]
        return local.read_ranges(info.file, view, ranges, info.bytes, direct=cold).size

    with ThreadPoolExecutor(depth) as pool:
        total = sum(pool.map(read, range(samples)))
    return total / (time.perf_counter() - start)


def run_regime(
    regime: str, source: Path, store: Path, args: argparse.Namespace, work: Path
) -> dict[str, list[dict]]:
    total = streaming.memory_bytes(store)  # the cgroup's budget is the engine's
    base = streaming.baseline_usage() if regime == "cold" else 0
    if regime == "warm":
        streaming.warm_page_cache(store)
    systems = (args.systems.split(",") if args.systems else SYSTEMS) + (PEERS if args.peers else [])
    if args.only:
        systems = [s for s in systems if s in args.only.split(",")]
    own = llama_baseline() if regime == "cold" and LLAMA_CPP_OWN in systems else 0
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(args.reps):
        bandwidth = streaming.read_bandwidth(store, cold=regime == "cold")
        bandwidth["experts"] = expert_bandwidth(store, cold=regime == "cold")
        log.info(
            "%s rep %d: best %.2f GB/s, single experts %.2f GB/s",
            regime,
            rep,
            bandwidth["best"] / 1e9,
            bandwidth["experts"] / 1e9,
        )
        for system in systems:
            floor_of_box = base
            if system in (LLAMA_CPP, LLAMA_CPP_OWN):
                budget = streaming.budget_of(WHOLE, total)  # the same budget as ours
                cmd = llama_command(source, args)
                floor_of_box = own if system == LLAMA_CPP_OWN else base
            else:
                budget = streaming.budget_of(system, total)
                cmd = streaming.command(system, source, store, args, work)
            if regime == "cold" and budget is None:
                continue  # the resident model does not fit the box
            limit = floor_of_box + (budget or 0) + streaming.MARGIN
            result = streaming.run(system, regime, cmd, limit)
            result["cgroup_limit"] = limit
            result["bandwidth"] = bandwidth
            runs[system].append(result)
            shown = result.get("error") or f"{result['per_token_s'] * 1e3:.1f} ms/token"
            log.info("%s rep %d %-30s %s", regime, rep, system, shown)
    return runs


def resident_reference(
    source: Path, store: Path, args: argparse.Namespace, work: Path
) -> tuple[list[int] | None, float]:
    """The ids every row is checked against and the compute floor: the resident model,
    warm, whichever regimes and systems run (so a subset still has both)."""
    streaming.warm_page_cache(store)
    cmd = streaming.command("resident", source, store, args, work)
    result = streaming.run("resident", "warm", cmd, None)
    if "error" in result:
        log.warning("the resident reference failed: %s", result["error"])
        return None, 0.0
    return result["ids"], result["per_token_s"] * 1e3


def rows_of(runs: dict[str, list[dict]], reference: list[int] | None, args) -> list[dict]:
    steps = args.new_tokens + 1  # the prefill and each decode step sweep the blocks once
    rows = []
    for system, results in runs.items():
        if not results:
            continue
        row = streaming.summarise(system, results, reference, steps)
        ok = [r for r in results if "error" not in r]
        # decode steps only: the prefill's 64 tokens route to nearly every expert
        # a peer reports what the disk read per token over its run (prefill included)
        decode = [r.get("decode_bytes_per_token", r.get("disk_read_per_token", 0)) for r in ok]
        experts = [r.get("decode_expert_bytes_per_token", 0) for r in ok]
        row["decode_mib_per_token"] = statistics.median(decode) / 2**20 if ok else 0
        row["expert_mib_per_token"] = statistics.median(experts) / 2**20 if ok else 0
        hits = sum(r.get("expert_cache_hits", 0) for r in ok)
        read = sum(r.get("experts_read", 0) for r in ok)
        row["expert_cache_hit_rate"] = hits / (hits + read) if hits + read else None
        guessed = sum(r.get("experts_predicted", 0) for r in ok)
        used = sum(r.get("experts_predicted_used", 0) for r in ok)
        routed = sum(r.get("experts_routed_predicted", 0) for r in ok)
        row["prediction_precision"] = used / guessed if guessed else None
        row["prediction_recall"] = used / routed if routed else None
        # per streamed install of a decode step: the time its dequantizing and its reads
        # took (each summed over the threads that did them)
        for key, name in (("dequantize_s_per_install", "deq"), ("read_s_per_install", "read")):
            values = [r[key] for r in ok if key in r]
            if values:
                row[f"{name}_ms_per_install"] = statistics.median(values) * 1e3
        places = [r["in_place"] for r in ok if "in_place" in r]
        if places:  # where the experts module computed at the end of each repetition
            row["in_place"] = places
        passes = [r["guess_passes"] for r in ok if "guess_passes" in r]
        if passes:  # passes without guesses and with them, over every repetition
            row["guess_passes"] = [sum(p[0] for p in passes), sum(p[1] for p in passes)]
        rows.append(row)
    return rows


def add_routed_floor(rows: list[dict], runs: dict[str, list[dict]], compute_ms: float) -> None:
    """The floor of every row: max(compute, what expert streaming read per token at the
    best bandwidth), per repetition, medians reported."""
    # the bytes the routing needs: expert streaming without guesses (a wrong guess adds some)
    mine = runs.get(NO_GUESS) or runs.get(EXPERTS, [])
    resident = runs.get("resident", [])
    for row in rows:
        if "error" in row or row["system"] == "resident":
            continue
        floors, ratios = [], []
        for rep, r in enumerate(runs[row["system"]]):
            need = mine[rep] if rep < len(mine) else None
            if "error" in r or need is None or "error" in need:
                continue
            beside = resident[rep] if rep < len(resident) else None
            compute = (
                beside["per_token_s"] * 1e3 if beside and "error" not in beside else compute_ms
            )
            # the routing's bytes at the bandwidth of that access size (single experts)
            io_ms = need["decode_bytes_per_token"] / r["bandwidth"]["experts"] * 1e3
            floors.append(max(compute, io_ms))
            ratios.append(r["per_token_s"] * 1e3 / floors[-1])
        if floors:
            row["floor_ms"] = statistics.median(floors)
            row["x_floor"] = statistics.median(ratios)
    whole = next((r for r in rows if r["system"] == WHOLE and "error" not in r), None)
    for row in rows:
        if whole is not None and "error" not in row:
            row["x_whole_block"] = row["per_token_ms"] / whole["per_token_ms"]


def _share(value: float | None) -> str:
    return f"{'':>9}" if value is None else f"{value:>9.2f}"


def _per_install(row: dict) -> str:
    """A quantized store's ms per install dequantizing / reading (nothing for a plain one)."""
    deq = row.get("deq_ms_per_install")
    return f"{deq:.1f}/{row.get('read_ms_per_install', 0):.1f}" if deq else ""


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    cols = ["system", "ms/tok", "x whole", "floor", "x floor", "MiB/tok", "experts", "rest",
            "peakRSS", "cgroup", "guess P", "guess R", "cached", "off/on", "deq/read",
            "exact"]  # fmt: skip
    print(f"{cols[0]:<30}" + "".join(f"{c:>9}" for c in cols[1:]))
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<30}  {r['error'][:100]}")
            continue
        mib, experts = r["decode_mib_per_token"], r["expert_mib_per_token"]
        print(
            f"{r['system']:<30}{r['per_token_ms']:>9.1f}{r.get('x_whole_block', 0):>9.2f}"
            f"{r.get('floor_ms', 0):>9.1f}{r.get('x_floor', 0):>9.2f}{mib:>9.1f}"
            f"{experts:>9.1f}{mib - experts:>9.1f}{r['peak_rss_mib']:>9.0f}"
            f"{r['cgroup_peak_mib']:>9.0f}{_share(r.get('prediction_precision'))}"
            f"{_share(r.get('prediction_recall'))}{_share(r.get('expert_cache_hit_rate'))}"
            f"{'/'.join(map(str, r.get('guess_passes', ()))):>9}"
            f"{_per_install(r):>11}{r['identical_to_resident']!s:>9}"
        )


def run_store(preset: str, dtype: str, args: argparse.Namespace, work: Path) -> dict:
    """Every regime's rows on one store of ``preset``."""
    source, store = streaming.prepare(preset, dtype=dtype)
    report: dict = {"model_bytes": streaming.model_bytes(store), "dtype": dtype}
    reference, compute_ms = resident_reference(source, store, args, work)
    report["resident_ms_per_token"] = compute_ms
    for regime in args.regimes.split(","):
        if regime == "cold" and (why := cgroup.available()):
            report[regime] = {"skipped": why}
            log.warning("cold regime skipped: %s", why)
            continue
        runs = run_regime(regime, source, store, args, work)
        rows = rows_of(runs, reference, args)
        add_routed_floor(rows, runs, compute_ms)
        title = (
            f"{preset} ({streaming.model_bytes(store) / 2**30:.2f} GiB {dtype}), {regime}, "
            f"25% budget, {args.new_tokens} tokens, {args.reps} rep(s)"
        )
        print_table(title, rows)
        report[regime] = {"rows": rows, "runs": runs}
    return report


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="qwen3-moe-2b,mixtral-1b")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for all")
    parser.add_argument("--regimes", default="warm,cold")
    parser.add_argument("--peers", action="store_true", help="accelerate and llama.cpp rows too")
    parser.add_argument("--only", default="", help="comma-separated systems to run, of those")
    parser.add_argument(
        "--systems", default="", help="comma-separated systems in place of the default ones"
    )
    parser.add_argument(
        "--dtypes", default="bfloat16", help="stores to run: bfloat16, and mxfp4 (gpt-oss-2b)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "experts.json")
    args = parser.parse_args()
    report: dict = {"args": vars(args) | {"out": str(args.out)}}
    work = Path(tempfile.mkdtemp(prefix="layerstream-experts-"))
    for preset in args.presets.split(","):
        for dtype in args.dtypes.split(","):
            name = preset if dtype == "bfloat16" else f"{preset}:{dtype}"
            report[name] = run_store(preset, dtype, args, work)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
