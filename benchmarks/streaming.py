"""Decode speed, memory and bytes read: resident transformers vs layerstream vs its peers.

Each run is its own process (so its peak RSS is its own), systems interleaved A B C A B C
over the repetitions, medians reported. Two regimes:

- warm: chunk files in the page cache, no memory limit;
- cold ("a box smaller than the model"): the page cache is dropped before each run and the
  run sits in a memory cgroup (which also caps its page cache) of import baseline + budget
  + margin. Needs root; skipped with the reason where the machine does not allow it.

Every repetition of either regime starts with a reference run, whichever systems are
chosen and not reported as one of them: resident transformers (the whole model in memory,
no memory limit, the page cache as it is). Its greedy ids are what every run must
reproduce ("exact"), its time per token is the "x res" of every row of that repetition
and the compute term of their floors. The table's header and the JSON ("reference") say
so, with the reference runs themselves.

The floor of a streamed run is measured in the same invocation: max(the reference's
compute per token, bytes read from the disk per token / the store's bandwidth), the
bandwidth being the best of several readers and depths (bandwidth.py), measured again just
before each repetition; bytes the page cache served cost no disk time. A run below 1.0 x
its floor is logged as an error: its floor was measured too low.

    .venv/bin/python benchmarks/streaming.py                       # ~1 GB Llama, both regimes
    .venv/bin/python benchmarks/streaming.py --preset llama-300m --regimes warm --reps 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bandwidth
import cgroup

log = logging.getLogger("benchmarks.streaming")
ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MARGIN = 128 * 2**20  # activations, KV cache, allocator slack in the cold cgroup
REFERENCE = "resident"  # the reference run: probe.py's resident transformers model
REFERENCE_SOURCE = (
    "resident transformers (probe.py resident: from_pretrained of the source checkpoint), "
    "run uncapped at the start of every repetition whichever systems are chosen"
)
DEFAULT_SYSTEMS = [
    "resident",
    "ls:100%",
    "ls:50%",
    "ls:25%",
    "ls:10%",
    "ls:25%:read_ahead=2",
    "ls:25%:read_ahead=0",
    "accelerate:25%",
    "airllm:25%",
]


def prepare(preset: str, dtype: str | None = None) -> tuple[Path, Path]:
    """The preset's random-init checkpoint (saved in ``dtype``, else its default) and its
    chunk store, built once under .cache. ``fp8``: the bfloat16 checkpoint quantized to
    block-wise fp8 as `layerstream chunk --quantize fp8` does it, and its store; ``mxfp4``:
    the bfloat16 checkpoint with its experts replaced by random MXFP4 ones, as gpt-oss
    ships them (quantize.write_random_mxfp4_checkpoint)."""
    from layerstream.chunker.convert import chunk_checkpoint
    from layerstream.chunker.presets import write_random_checkpoint
    from layerstream.chunker.quantize import write_fp8_checkpoint, write_random_mxfp4_checkpoint

    name = preset if dtype is None else f"{preset}-{dtype}"
    source, store = CACHE / f"{name}-source", CACHE / f"{name}-chunks"
    if not (store / "manifest.json").exists():
        CACHE.mkdir(exist_ok=True)
        if dtype in ("fp8", "mxfp4"):
            plain, _ = prepare(preset, "bfloat16")
            if not (source / "config.json").exists():
                write = write_fp8_checkpoint if dtype == "fp8" else write_random_mxfp4_checkpoint
                write(plain, source)
        else:
            write_random_checkpoint(preset, source, dtype=dtype)
        chunk_checkpoint(source, store, preset, force=True, progress=False)
    return source, store


def model_bytes(store: Path) -> int:
    manifest = json.loads((store / "manifest.json").read_text())
    return sum(c["bytes"] for c in manifest["chunks"].values())


def memory_bytes(store: Path) -> int:
    """What a percentage ``memory_budget`` is a share of: the model held in memory (a
    quantized store's tensors dequantized; the chunks' bytes otherwise)."""
    from layerstream.chunker.sizing import config_from_json, held_sizes
    from layerstream.format.manifest import Manifest

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    return held_sizes(manifest, config_from_json((store / "config.json").read_text())).total


def command(
    system: str, source: Path, store: Path, args: argparse.Namespace, work: Path
) -> list[str]:
    kind = system.split(":", 1)[0]
    if kind in ("accelerate", "airllm"):
        budget = int(model_bytes(store) * float(system.split(":")[1].rstrip("%")) / 100)
        offload = work / f"offload-{kind}"
        return [
            str(PEERS_PYTHON),
            str(ROOT / "peers.py"),
            kind,
            str(source),
            str(budget),
            str(args.new_tokens),
            str(args.threads),
            str(offload),
        ]
    return [
        sys.executable,
        str(ROOT / "probe.py"),
        system,
        str(source),
        str(store),
        str(args.new_tokens),
        str(args.threads),
    ]


def budget_of(system: str, total: int) -> int | None:
    if system == "resident":
        return None
    return int(total * float(system.split(":")[1].rstrip("%")) / 100)


def run(system: str, regime: str, cmd: list[str], limit: int | None) -> dict:
    started = time.perf_counter()
    if regime == "cold":
        result, cgroup_peak = cgroup.run_capped(cmd, limit, timeout=3600)
    else:
        result, cgroup_peak = (
            subprocess.run(cmd, capture_output=True, text=True, timeout=3600),
            None,
        )
    if result.returncode != 0:
        reason = "killed by the memory limit" if result.returncode == -9 else result.stderr[-400:]
        return {"system": system, "error": f"exit {result.returncode}: {reason}"}
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["cgroup_peak"] = cgroup_peak
    data["wall_s"] = time.perf_counter() - started
    return data


def reference_run(source: Path, store: Path, args: argparse.Namespace, work: Path) -> dict:
    """The reference: the resident model in its own process, with no memory limit whatever
    the regime (the cold box cannot hold it; the reference is about what it computes)."""
    cmd = command(REFERENCE, source, store, args, work)
    return run(REFERENCE, "warm", cmd, None)


def reference_ids(references: list[dict]) -> tuple[list[int] | None, bool]:
    """The reference runs' greedy ids (the first run's; None if none ran), and whether every
    one gave the same (the same model and prompt, in any regime)."""
    ids = [r["ids"] for r in references if "error" not in r]
    return (ids[0] if ids else None), all(other == ids[0] for other in ids[1:])


def baseline_usage() -> int:
    """What the probe's imports cost inside a cgroup (anon + library page cache)."""
    cmd = [sys.executable, "-c", "import torch, transformers, layerstream.engine.engine"]
    _, peak = cgroup.run_capped(cmd, 8 * 2**30, timeout=600)
    return peak or 0


def warm_page_cache(store: Path) -> None:
    """Evict the chunk files, then read each once through the runtime's reader: the page
    cache then holds them as a server that has already served a request finds them (2 MiB
    folios, see LocalStore.map), whatever wrote or read them before (cp, an older chunker)."""
    import os

    from layerstream.stores import LocalStore

    local = LocalStore(store)
    for path in store.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    for path in store.glob("*.safetensors"):
        local.map(path.name).data.close()


def read_bandwidth(store: Path, cold: bool) -> dict:
    """What the store delivers to the best reader at the best depth (bandwidth.py); cold
    drops the page cache before each."""
    from layerstream.format.manifest import Manifest

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    files = [manifest.chunks[b.chunk].file for b in manifest.blocks]
    return bandwidth.measure(store, files, max(manifest.block_bytes), cold)


def summarise(system: str, results: list[dict], reference: list[int] | None, sweeps: int) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"system": system, "error": results[0]["error"]}

    def median(key, default=0.0) -> float:
        values = [key(r) for r in ok if key(r) is not None]
        return statistics.median(values) if values else default

    first = ok[0]
    return {
        "system": system,
        "runs": len(ok),
        "per_token_ms": median(lambda r: r["per_token_s"]) * 1e3,
        "ttft_ms": median(lambda r: r["ttft_s"]) * 1e3,
        "peak_rss_mib": median(lambda r: r["peak"]) / 2**20,
        "rss_over_baseline_mib": median(lambda r: r["peak"] - r["baseline"]) / 2**20,
        "cgroup_peak_mib": median(lambda r: r.get("cgroup_peak")) / 2**20,
        "weights_held_mib": first.get("weights_held", first["model_bytes"]) / 2**20,
        "bytes_read_per_token_mib": median(lambda r: r.get("bytes_per_token", 0)) / 2**20,
        "disk_read_per_token_mib": median(lambda r: r.get("disk_read_per_token", 0)) / 2**20,
        "hit_rate": first.get("hit_rate"),
        "pinned_fraction": first.get("pinned_fraction"),
        "wait_ms_per_token": median(lambda r: r.get("wait_s", 0)) * 1e3 / sweeps,
        "reader": first.get("reader", ""),
        # None: no reference run succeeded, so nothing to compare with
        "identical_to_resident": None
        if reference is None
        else all(r["ids"] == reference for r in ok),
        "errors": [r["error"] for r in results if "error" in r],
    }


def add_floor(rows: list[dict], runs: dict[str, list[dict]], references: list[dict]) -> None:
    """Each run's floor uses the bandwidth measured just before its repetition (the disk
    of a shared machine drifts by tens of percent over minutes) and the compute of that
    repetition's reference run; its "× resident" is likewise against that reference run
    (where it failed, the median of the others). Rows report medians of these
    per-repetition ratios; without any reference run there is no floor."""
    computes = [r["per_token_s"] * 1e3 for r in references if "error" not in r]
    fallback = statistics.median(computes) if computes else None
    for row in rows:
        if "error" in row:
            continue
        row["floor_ms"] = row["x_floor"] = row["x_resident"] = None
        if fallback is None:
            continue
        floors, ratios, x_resident = [], [], []
        for rep, r in enumerate(runs[row["system"]]):
            if "error" in r:
                continue
            ref = references[rep] if rep < len(references) else None
            ok = ref is not None and "error" not in ref
            compute = ref["per_token_s"] * 1e3 if ok else fallback
            # the physical floor: the bytes that really came from the disk (not those the
            # page cache served) at the store's best reader and depth, whatever this run used
            io_ms = r.get("disk_read_per_token", 0) / r["bandwidth"]["best"] * 1e3
            floor = max(compute, io_ms)
            floors.append(floor)
            ratios.append(r["per_token_s"] * 1e3 / floor)
            x_resident.append(r["per_token_s"] * 1e3 / compute)
        row["floor_ms"] = statistics.median(floors)
        row["x_floor"] = statistics.median(ratios)
        if min(ratios) < 1.0:
            # faster than the floor: the bandwidth was measured too low, not a fast run
            log.error(
                "%s ran at %.2f x its floor: the floor's bandwidth is wrong",
                row["system"],
                min(ratios),
            )
        row["x_resident"] = statistics.median(x_resident)


def _cell(value: float | None, spec: str) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9{spec}}"


def print_table(regime: str, rows: list[dict], header: str) -> None:
    print(f"\n== {regime}: {header}")
    cols = [
        "system",
        "ms/tok",
        "tok/s",
        "x res",
        "floor",
        "x floor",
        "ttft ms",
        "peakRSS",
        "RSS-base",
        "cgroup",
        "MiB/tok",
        "disk/tok",
        "hit",
        "wait/tok",
        "exact",
    ]
    print(f"{cols[0]:<22}" + "".join(f"{c:>9}" for c in cols[1:]))
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<22}  {r['error'][:110]}")
            continue
        hit = "" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}"
        exact = "no ref" if r["identical_to_resident"] is None else r["identical_to_resident"]
        print(
            f"{r['system']:<22}{r['per_token_ms']:>9.1f}{1e3 / r['per_token_ms']:>9.2f}"
            f"{_cell(r['x_resident'], '.2f')}{_cell(r['floor_ms'], '.1f')}"
            f"{_cell(r['x_floor'], '.2f')}"
            f"{r['ttft_ms']:>9.0f}{r['peak_rss_mib']:>9.0f}{r['rss_over_baseline_mib']:>9.0f}"
            f"{r['cgroup_peak_mib']:>9.0f}{r['bytes_read_per_token_mib']:>9.1f}"
            f"{r['disk_read_per_token_mib']:>9.1f}{hit:>9}"
            f"{r['wait_ms_per_token']:>9.1f}{exact!s:>9}"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for all")
    parser.add_argument("--regimes", default="warm,cold")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    parser.add_argument(
        "--cold-only",
        default="airllm:25%",
        help="systems run in the cold regime only (AirLLM's warm runs take ~12 minutes and "
        "no target is about them); '' runs every system in both",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "streaming.json")
    args = parser.parse_args()
    source, store = prepare(args.preset)
    total = memory_bytes(store)  # what the engine takes a percentage of
    systems = args.systems.split(",")
    cold_only = set(filter(None, args.cold_only.split(",")))
    if not PEERS_PYTHON.exists():
        skipped = [s for s in systems if s.startswith(("accelerate", "airllm"))]
        systems = [s for s in systems if s not in skipped]
        log.warning("peers %s skipped: run benchmarks/setup_peers.sh first", skipped)
    report: dict = {
        "preset": args.preset,
        "model_bytes": total,
        "args": vars(args) | {"out": str(args.out)},
    }
    work = Path(tempfile.mkdtemp(prefix="layerstream-bench-"))
    all_references: list[dict] = []
    for regime in args.regimes.split(","):
        if regime == "cold" and (why := cgroup.available()):
            log.warning("cold regime skipped: %s", why)
            report[regime] = {"skipped": why}
            continue
        limit_base = baseline_usage() if regime == "cold" else 0
        if regime == "warm":
            warm_page_cache(store)
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        references: list[dict] = []
        bandwidths = []
        for rep in range(args.reps):
            bandwidth = read_bandwidth(store, cold=regime == "cold")
            bandwidths.append(bandwidth)
            log.info(
                "%s rep %d store bandwidth: best %.2f GB/s (%s); %s%s",
                regime,
                rep,
                bandwidth["best"] / 1e9,
                bandwidth["best_by"],
                ", ".join(f"{k} {v / 1e9:.2f}" for k, v in bandwidth["rates"].items()),
                "".join(f"; {k} refused: {v}" for k, v in bandwidth["refused"].items()),
            )
            reference = reference_run(source, store, args, work)
            reference["bandwidth"] = bandwidth
            references.append(reference)
            log.info(
                "%s rep %d %-22s %s",
                regime,
                rep,
                "reference (resident)",
                f"{reference['per_token_s'] * 1e3:.1f} ms/token"
                if "error" not in reference
                else reference["error"][:80],
            )
            for system in systems:
                if regime != "cold" and system in cold_only:
                    continue
                budget = budget_of(system, total)
                if regime == "cold" and budget is None:
                    continue  # the resident model does not fit the box: that is the point
                limit = limit_base + (budget or 0) + MARGIN
                result = run(system, regime, command(system, source, store, args, work), limit)
                result["bandwidth"] = bandwidth
                runs[system].append(result)
                shown = (
                    f"{result['per_token_s'] * 1e3:.1f} ms/token"
                    if "error" not in result
                    else result["error"][:80]
                )
                log.info("%s rep %d %-22s %s", regime, rep, system, shown)
        all_references += references
        ids, agree = reference_ids(all_references)
        if not agree:
            log.error("the reference runs disagree on the greedy ids: 'exact' is against the first")
        ok_refs = [r for r in references if "error" not in r]
        if not ok_refs:
            log.error("%s: no reference run succeeded: no 'exact', no floor", regime)
        reference_ms = (
            statistics.median(r["per_token_s"] for r in ok_refs) * 1e3 if ok_refs else None
        )
        # the prefill and each decode step sweep the blocks once
        rows = [summarise(s, runs[s], ids, args.new_tokens + 1) for s in systems if runs[s]]
        add_floor(rows, runs, references)
        rates = (
            f"{statistics.median(b['best'] for b in bandwidths) / 1e9:.2f} GB/s ("
            + ", ".join(sorted({b["best_by"] for b in bandwidths}))
            + ")"
        )
        header = (
            f"{args.preset} {total / 2**20:.0f} MiB fp32, 64-token prompt, {args.new_tokens} "
            f"greedy tokens, {args.threads} torch thread(s), median of {args.reps}; floor "
            f"bandwidth: the best reader and depth, median of the repetitions, {rates}"
            + (
                f"; cgroup = {limit_base / 2**20:.0f} MiB imports + budget + {MARGIN // 2**20} MiB"
                if regime == "cold"
                else ""
            )
            + f"\n   reference (exact, x res, the floor's compute): {REFERENCE_SOURCE}; "
            + f"{len(ok_refs)} of {len(references)} ran, median "
            + ("-" if reference_ms is None else f"{reference_ms:.1f}")
            + " ms/token"
        )
        print_table(regime, rows, header)
        report[regime] = {
            "bandwidth": bandwidths,
            "limit_base": limit_base,
            "reference": {
                "source": REFERENCE_SOURCE,
                "per_token_ms": reference_ms,
                "runs": references,
            },
            "rows": rows,
            "runs": runs,
        }
    ids, agree = reference_ids(all_references)
    report["reference"] = {"source": REFERENCE_SOURCE, "ids": ids, "runs_agree": agree}
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
