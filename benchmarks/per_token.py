"""Per-token decode time and peak RSS: resident transformers vs layerstream at several budgets.

Each configuration runs in its own process (so peak RSS is its own), interleaved A B C A B C
over the repetitions, medians reported. Greedy outputs are checked identical in every run.

    .venv/bin/python benchmarks/per_token.py [--reps 3] [--new-tokens 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("benchmarks.per_token")
ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
PRESET = "llama-300m"  # ~300 MB fp32 Llama: GQA, untied head
SYSTEMS = ["resident", "stream:100%", "stream:25%:mmap", "stream:25%:read"]


def prepare() -> tuple[Path, Path]:
    from layerstream.chunker import chunk_checkpoint
    from layerstream.presets import write_random_checkpoint

    source, store = CACHE / "llama300-source", CACHE / "llama300-chunks"
    if not (store / "manifest.json").exists():
        CACHE.mkdir(exist_ok=True)
        write_random_checkpoint(PRESET, source)
        chunk_checkpoint(source, store, "llama300", force=True, progress=False)
    return source, store


def run_one(system: str, source: Path, store: Path, new_tokens: int, threads: int) -> dict:
    probe = ROOT / "probe.py"
    cmd = [
        sys.executable,
        str(probe),
        system,
        str(source),
        str(store),
        str(new_tokens),
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def store_bandwidth(store: Path, passes: int = 3) -> dict[str, float]:
    """Bytes/s of the block chunks through each of the runtime's readers, best of a few
    passes (warm page cache, as in the runs): "read" copies into one reused buffer, "mmap"
    maps (pages populated) and unmaps each file."""
    import torch

    from layerstream.manifest import Manifest
    from layerstream.stores import LocalStore

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    local = LocalStore(store)
    files = [manifest.chunks[b.chunk].file for b in manifest.blocks]
    view = memoryview(torch.empty(max(manifest.block_bytes), dtype=torch.uint8).numpy())

    def mapped(name: str) -> int:
        m = local.map(name)
        m.data.close()
        return m.size

    readers = {"read": lambda name: local.read_into(name, view).size, "mmap": mapped}
    out = {}
    for reader, read in readers.items():
        best = 0.0
        for _ in range(passes):
            start = time.perf_counter()
            total = sum(read(f) for f in files)
            best = max(best, total / (time.perf_counter() - start))
        out[reader] = best
    return out


def add_floor(rows: list[dict], bandwidth: dict[str, float]) -> None:
    """floor = max(resident compute per token, streamed bytes per token / the bandwidth of
    the reader the run used)."""
    compute_ms = rows[0]["per_token_ms"]
    for row in rows:
        reader = row["system"].rsplit(":", 1)[-1] if row["system"].count(":") == 2 else "mmap"
        io_ms = row["bytes_read_per_token_mib"] * 2**20 / bandwidth[reader] * 1e3
        row["floor_ms"] = max(compute_ms, io_ms)
        row["x_floor"] = row["per_token_ms"] / row["floor_ms"]


def print_table(rows: list[dict], runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    base = rows[0]["per_token_ms"]
    model_mib = runs["resident"][0]["model_bytes"] / 2**20
    print(
        f"\nmodel {model_mib:.0f} MiB fp32, {args.new_tokens} new tokens, torch threads "
        f"{args.threads}, median of {args.reps} (page cache warm)"
    )
    columns = (
        "system",
        "ms/token",
        "x resident",
        "floor ms",
        "x floor",
        "ttft ms",
        "peak RSS",
        "RSS-base",
        "weights",
    )
    print(f"{columns[0]:<17}" + "".join(f"{c:>11}" for c in columns[1:]) + "  MiB/token  exact")
    for r in rows:
        print(
            f"{r['system']:<17}{r['per_token_ms']:>11.1f}{r['per_token_ms'] / base:>11.2f}"
            f"{r['floor_ms']:>11.1f}{r['x_floor']:>11.2f}"
            f"{r['ttft_ms']:>11.1f}{r['peak_rss_mib']:>11.0f}{r['rss_over_baseline_mib']:>11.0f}"
            f"{r['weights_held_mib']:>11.0f}{r['bytes_read_per_token_mib']:>11.1f}  "
            f"{r['identical_to_resident']}"
        )


def summarise(system: str, results: list[dict], reference: list[int]) -> dict:
    first = results[0]

    def median(key) -> float:
        return statistics.median(key(r) for r in results)

    return {
        "system": system,
        "per_token_ms": median(lambda r: r["per_token_s"]) * 1e3,
        "ttft_ms": median(lambda r: r["ttft_s"]) * 1e3,
        "peak_rss_mib": median(lambda r: r["peak"]) / 2**20,
        "rss_over_baseline_mib": median(lambda r: r["peak"] - r["baseline"]) / 2**20,
        "weights_held_mib": first.get("weights_held", first["model_bytes"]) / 2**20,
        "bytes_read_per_token_mib": median(lambda r: r.get("bytes_per_token", 0)) / 2**20,
        "identical_to_resident": all(r["ids"] == reference for r in results),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, same for all")
    parser.add_argument("--out", type=Path, default=ROOT / "per_token.json")
    args = parser.parse_args()
    source, store = prepare()
    runs: dict[str, list[dict]] = {s: [] for s in SYSTEMS}
    for rep in range(args.reps):
        for system in SYSTEMS:
            result = run_one(system, source, store, args.new_tokens, args.threads)
            runs[system].append(result)
            log.info("rep %d %-12s %.1f ms/token", rep, system, result["per_token_s"] * 1e3)
    reference = runs["resident"][0]["ids"]
    rows = [summarise(system, runs[system], reference) for system in SYSTEMS]
    bandwidth = store_bandwidth(store)
    add_floor(rows, bandwidth)
    rates = ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in bandwidth.items())
    print(f"\nstore bandwidth of the block chunks (warm page cache): {rates}")
    print_table(rows, runs, args)
    args.out.write_text(
        json.dumps(
            {
                "time": time.time(),
                "preset": PRESET,
                "store_bandwidth": bandwidth,
                "rows": rows,
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
