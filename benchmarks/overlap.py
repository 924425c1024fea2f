"""Do cold disk reads and decode compute overlap on this machine? The premise of the floor
max(compute, bytes / bandwidth) is that they do; this measures how far.

Decode compute is a memory-bound GEMV over a block's weights (batch 1); a cold read is the
runtime's mmap reader populating a chunk after the page cache was dropped. Each runs alone,
then both at once (compute on one thread, reads on another, as the engine runs them), for the
same chunk files; /proc/stat shows where the CPU time went (steal = time the hypervisor
took from this VM's vCPUs, e.g. for its own disk emulation).

    .venv/bin/python benchmarks/overlap.py        # needs root (drop_caches)
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import cgroup
import torch

ROOT = Path(__file__).resolve().parent


def cpu_times() -> dict[str, float]:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    ticks = dict(zip(names, (int(x) for x in fields), strict=False))
    return {k: v / 100 for k, v in ticks.items()}  # USER_HZ = 100


def compute(weights: list[torch.Tensor], stop: threading.Event, seconds: float) -> float:
    """GEMVs over ``weights`` until ``stop`` or ``seconds``; returns weight bytes/s swept."""
    x = torch.randn(1, weights[0].shape[1])
    swept = 0
    start = time.perf_counter()
    while not stop.is_set() and time.perf_counter() - start < seconds:
        for w in weights:
            torch.nn.functional.linear(x, w)
            swept += w.numel() * 4
    return swept / (time.perf_counter() - start)


def read_cold(files: list[Path]) -> float:
    from layerstream.stores import LocalStore

    store = LocalStore(files[0].parent)
    cgroup.drop_caches()
    start = time.perf_counter()
    total = 0
    for path in files:
        mapped = store.map(path.name)
        total += mapped.size
        mapped.data.close()
    return total / (time.perf_counter() - start)


def measure(label: str, fn) -> tuple[object, dict[str, float]]:
    before, start = cpu_times(), time.perf_counter()
    value = fn()
    wall = time.perf_counter() - start
    after = cpu_times()
    share = {k: (after[k] - before[k]) / wall for k in ("user", "system", "iowait", "steal")}
    print(f"{label:<28} " + "  ".join(f"{k} {v:.2f} CPU" for k, v in share.items()))
    return value, share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "llama-1b-chunks")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(args.store.glob("block_*.safetensors"))
    # a block's worth of fp32 matrices, resident: 2048x2048 x4 + 2048x5632 x3 ~ 200 MB
    weights = [torch.randn(2048, 2048) for _ in range(4)] + [
        torch.randn(5632, 2048) for _ in range(3)
    ]
    never = threading.Event()
    alone_compute, cpu_c = measure("compute alone", lambda: compute(weights, never, 5.0))
    alone_read, cpu_r = measure("cold read alone", lambda: read_cold(files))

    stop = threading.Event()
    box: dict[str, float] = {}

    def background() -> None:
        box["compute"] = compute(weights, stop, 3600)

    def both() -> float:
        worker = threading.Thread(target=background)
        worker.start()
        rate = read_cold(files)
        stop.set()
        worker.join()
        return rate

    both_read, cpu_b = measure("both at once", both)
    result = {
        "compute_alone_GBps": alone_compute / 1e9,
        "read_alone_GBps": alone_read / 1e9,
        "compute_during_reads_GBps": box["compute"] / 1e9,
        "read_during_compute_GBps": both_read / 1e9,
        "cpu": {"compute": cpu_c, "read": cpu_r, "both": cpu_b},
    }
    print(
        f"\ncompute (weights swept): alone {alone_compute / 1e9:.2f} GB/s, during cold reads "
        f"{box['compute'] / 1e9:.2f} GB/s ({box['compute'] / alone_compute:.2f}x)\n"
        f"cold read:               alone {alone_read / 1e9:.2f} GB/s, during compute "
        f"{both_read / 1e9:.2f} GB/s ({both_read / alone_read:.2f}x)"
    )
    (ROOT / "overlap.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
