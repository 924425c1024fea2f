"""A block-wise fp8 store against the bfloat16 store of the same model (and float32 for
reference), memory-capped at the same budget, in one run.

The model is the ``llama-1b`` preset saved in bfloat16; its fp8 checkpoint is written by
``layerstream chunk --quantize fp8``'s own quantizer (128 x 128 blocks, the layout of the
DeepSeek-V3 and Qwen3 -FP8 releases). Each store is served at the same budget in bytes (a
quarter of the bfloat16 store), in a memory cgroup of import baseline + budget + margin
with the page cache dropped (streaming.py's cold regime), each run its own process
(probe.py). Every row's greedy ids are checked against from_pretrained of its own
checkpoint: the fp8 store's against the fp8 checkpoint as transformers loads it on a CPU
(dequantized to bfloat16), the others' against theirs.

Per row: ms/token, bytes read per token, the floor (max(resident compute of the same
checkpoint, disk bytes per token / the store's best bandwidth)), and for the fp8 store what
dequantizing a streamed block costs against reading one.

    .venv/bin/python benchmarks/quantized.py
    .venv/bin/python benchmarks/quantized.py --stores bf16,fp8 --reps 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import cgroup
import streaming

log = logging.getLogger("benchmarks.quantized")
ROOT = Path(__file__).resolve().parent
PRESET = "llama-1b"


DTYPES = {"bf16": "bfloat16", "fp8": "fp8", "fp32": "float32"}


def prepare(store_kind: str) -> tuple[Path, Path]:
    """(checkpoint, store) of ``store_kind`` (bf16, fp8, fp32), built once under .cache."""
    return streaming.prepare(PRESET, DTYPES[store_kind])


def run_store(kind: str, budget: int, args: argparse.Namespace, work: Path, base: int) -> dict:
    source, store = prepare(kind)
    streaming.warm_page_cache(store)
    resident = streaming.run(
        "resident", "warm", streaming.command("resident", source, store, args, work), None
    )
    if "error" in resident:
        raise SystemExit(f"{kind}: the resident reference failed: {resident['error']}")
    runs = []
    system = ":".join(["ls", str(budget), *filter(None, args.knobs.split(","))])
    for rep in range(args.reps):
        bandwidth = streaming.read_bandwidth(store, cold=True)
        result = streaming.run(
            system,
            "cold",
            streaming.command(system, source, store, args, work),
            base + budget + streaming.MARGIN,
        )
        result["bandwidth"] = bandwidth
        runs.append(result)
        shown = result.get("error") or f"{result['per_token_s'] * 1e3:.1f} ms/token"
        log.info("%s rep %d: %s (best %.2f GB/s)", kind, rep, shown, bandwidth["best"] / 1e9)
    row = streaming.summarise(kind, runs, resident["ids"], args.new_tokens + 1)
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return row
    compute = resident["per_token_s"] * 1e3
    floors = [max(compute, r["disk_read_per_token"] / r["bandwidth"]["best"] * 1e3) for r in ok]
    row |= {
        "store_mib": streaming.model_bytes(store) / 2**20,
        "resident_ms": compute,
        "floor_ms": statistics.median(floors),
        "x_floor": statistics.median(
            r["per_token_s"] * 1e3 / f for r, f in zip(ok, floors, strict=True)
        ),
        "dequantize_ms_per_block": statistics.median(r["dequantize_s_per_install"] for r in ok)
        * 1e3,
        "read_ms_per_block": statistics.median(r["read_s_per_chunk"] for r in ok) * 1e3,
        "bandwidth_gbs": statistics.median(r["bandwidth"]["best"] for r in ok) / 1e9,
        "plan": ok[0].get("plan", ""),
    }
    return row


def print_table(rows: list[dict], budget: int) -> None:
    print(f"\n== cold, memory-capped, budget {budget / 2**20:.0f} MiB (25% of the bf16 store)")
    cols = [
        "store",
        "MiB",
        "ms/tok",
        "x bf16",
        "floor",
        "x floor",
        "MiB/tok",
        "x bf16",
        "deq ms",
        "read ms",
        "peakRSS",
        "exact",
    ]
    print(f"{cols[0]:<8}" + "".join(f"{c:>9}" for c in cols[1:]))
    bf16 = next((r for r in rows if r["system"] == "bf16" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<8}  {r['error'][:110]}")
            continue
        x_time = r["per_token_ms"] / bf16["per_token_ms"] if bf16 else float("nan")
        x_bytes = (
            r["bytes_read_per_token_mib"] / bf16["bytes_read_per_token_mib"]
            if bf16
            else float("nan")
        )
        r["x_bf16_time"], r["x_bf16_bytes"] = x_time, x_bytes
        print(
            f"{r['system']:<8}{r['store_mib']:>9.0f}{r['per_token_ms']:>9.1f}{x_time:>9.2f}"
            f"{r['floor_ms']:>9.1f}{r['x_floor']:>9.2f}{r['bytes_read_per_token_mib']:>9.1f}"
            f"{x_bytes:>9.2f}{r['dequantize_ms_per_block']:>9.2f}{r['read_ms_per_block']:>9.2f}"
            f"{r['peak_rss_mib']:>9.0f}{'yes' if r['identical_to_resident'] else 'NO':>9}"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default="bf16,fp8,fp32")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for all")
    parser.add_argument(
        "--knobs", default="", help="engine settings for every store, e.g. read_ahead=2"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "quantized.json")
    args = parser.parse_args()
    if why := cgroup.available():
        raise SystemExit(f"needs a memory cgroup: {why}")
    budget = streaming.model_bytes(prepare("bf16")[1]) // 4
    base = streaming.baseline_usage()
    work = Path(tempfile.mkdtemp(prefix="layerstream-bench-"))
    rows = [run_store(kind, budget, args, work, base) for kind in args.stores.split(",")]
    print_table(rows, budget)
    report = {"preset": PRESET, "budget": budget, "args": vars(args) | {"out": str(args.out)}}
    args.out.write_text(json.dumps(report | {"rows": rows}, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
