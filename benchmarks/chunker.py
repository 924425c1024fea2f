"""Chunker throughput against `cp` of the same bytes, and its peak RSS for a 1 GB and a
4 GB model (which should be the same: one block in memory at a time).

    .venv/bin/python benchmarks/chunker.py [--presets llama-1b,llama-4b] [--reps 3]

Both the chunker and `cp` read a source in the page cache (one untimed `cp` first), write to
the same file system, and are timed up to a final `sync`; they alternate, one pair per
repetition. The chunker's time starts at `chunk_checkpoint`: the interpreter's start and
its imports (torch, transformers) are reported beside it as "startup s", not counted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timing

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"


def source_for(preset: str) -> Path:
    from layerstream.chunker.presets import write_random_checkpoint

    source = CACHE / f"{preset}-source"
    if not (source / "config.json").exists():
        CACHE.mkdir(exist_ok=True)
        write_random_checkpoint(preset, source)
    return source


def timed_cp(source: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    files = [str(p) for p in source.glob("*.safetensors")]
    start = time.perf_counter()
    subprocess.run(["cp", *files, str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - start


def timed_chunk(source: Path, dest: Path) -> dict:
    """One chunker run in a fresh process (``--probe``): its seconds and its VmHWM."""
    shutil.rmtree(dest, ignore_errors=True)  # as for cp: an empty destination, not timed
    cmd = [
        sys.executable,
        __file__,
        "--probe",
        str(source),
        str(dest),
        "--launched",
        str(time.time()),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(source: Path, dest: Path, launched: float) -> None:
    from layerstream.chunker.convert import chunk_checkpoint

    start = time.time()
    startup = start - launched
    manifest = chunk_checkpoint(source, dest, "bench", force=True, progress=False)
    subprocess.run(["sync"], check=True)
    seconds = time.time() - start
    result = {
        "seconds": seconds,
        "startup": startup,
        "peak": timing.rss("VmHWM"),
        "bytes": manifest.total_bytes,
    }
    print(json.dumps(result))


def measure(preset: str, reps: int) -> dict:
    source = source_for(preset)
    work = CACHE / f"{preset}-chunker-bench"
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    timed_cp(source, work / "cp")  # warm the page cache
    # interleaved, cp then chunker in each repetition, so both see the same machine (its
    # disk and its steal time drift within minutes); the ratio is the median of the pairs'
    cps, runs = [], []
    for _ in range(reps):
        cps.append(timed_cp(source, work / "cp"))
        shutil.rmtree(work / "cp")
        runs.append(timed_chunk(source, work / "chunks"))
        shutil.rmtree(work / "chunks")
    shutil.rmtree(work, ignore_errors=True)
    cp = statistics.median(cps)
    chunk_s = statistics.median(r["seconds"] for r in runs)
    return {
        "preset": preset,
        "source_mib": source_bytes / 2**20,
        "cp_s": cp,
        "cp_mb_s": source_bytes / cp / 1e6,
        "chunk_s": chunk_s,
        "chunk_mb_s": source_bytes / chunk_s / 1e6,
        "ratio_to_cp": statistics.median(c / r["seconds"] for c, r in zip(cps, runs, strict=True)),
        "pairs": [{"cp_s": c, "chunk_s": r["seconds"]} for c, r in zip(cps, runs, strict=True)],
        "startup_s": statistics.median(r["startup"] for r in runs),
        "peak_rss_mib": max(r["peak"] for r in runs) / 2**20,
    }


def print_table(rows: list[dict]) -> None:
    columns = ("MiB", "cp s", "cp MB/s", "chunk s", "MB/s", "vs cp", "peak RSS MiB", "startup s")
    print(f"\n{'model':<10}" + "".join(f"{c:>13}" for c in columns))
    for r in rows:
        values = (r["source_mib"], r["cp_s"], r["cp_mb_s"], r["chunk_s"], r["chunk_mb_s"])
        print(
            f"{r['preset']:<10}"
            + "".join(f"{v:>13.1f}" for v in values)
            + f"{r['ratio_to_cp']:>13.2f}{r['peak_rss_mib']:>13.0f}{r['startup_s']:>13.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="llama-1b,llama-4b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "chunker.json")
    parser.add_argument("--probe", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe, args.launched)
        return
    rows = [measure(preset, args.reps) for preset in args.presets.split(",")]
    print_table(rows)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
