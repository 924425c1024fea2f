"""Is layerstream at a full budget slower than resident transformers, or is it the machine?

Separate processes run minutes apart, and this VM's speed drifts by tens of percent within
minutes (steal time), so `streaming.py`'s full-budget row can swing either way. This
benchmark removes the drift: one process holds both models on the same weights and
alternates their generate runs, so each pair of timings sees the same machine. It also
times decode-shaped GEMVs over weight layouts, to test whether layout could explain a gap
at all:

- alignment: tensors inside a safetensors file are only 8-byte aligned (the header is
  padded to 8), torch's own allocations 64-byte;
- page size: layerstream's pinned blocks are copies in anonymous memory, in 4 KiB pages
  where transparent huge pages are `madvise`-only, as on this machine (resident
  transformers maps the checkpoint file instead).

    .venv/bin/python benchmarks/full_budget.py [--pairs 16] [--preset llama-1b]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import mmap
import statistics
import time
from pathlib import Path

log = logging.getLogger("benchmarks.full_budget")
ROOT = Path(__file__).resolve().parent
MADV_HUGEPAGE = 14
GEMV_BLOCKS = 8
# one Llama-1b block's linear layers (out, in): q, k, v, o, gate, up, down
BLOCK_SHAPES = [
    (1024, 1024),
    (256, 1024),
    (256, 1024),
    (1024, 1024),
    (2816, 1024),
    (2816, 1024),
    (1024, 2816),
]


def paired_decode(preset: str, pairs: int, new_tokens: int) -> dict:
    import torch
    import transformers
    from streaming import prepare

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import open_store

    source, store = prepare(preset)
    resident = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    engine = Engine(open_store(str(store)), EngineOptions(memory_budget="100%"))
    ids = torch.arange(5, 69).unsqueeze(0)
    kwargs = dict(do_sample=False, pad_token_id=0)

    def per_token_ms(model, context) -> tuple[float, list[int]]:
        # decode time alone: a run of new_tokens minus a run of 1 (prefill + first token)
        with context():
            start = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs
            )
            middle = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            end = time.perf_counter()
        return ((middle - start) - (end - middle)) / (new_tokens - 1) * 1000, out[0].tolist()

    per_token_ms(resident, torch.inference_mode)
    per_token_ms(engine.model, engine.request)
    rows = []
    for i in range(pairs):
        # alternate which goes first, so neither always follows the other
        order = [("resident", resident, torch.inference_mode), ("ls", engine.model, engine.request)]
        if i % 2:
            order.reverse()
        row = {}
        for name, model, context in order:
            row[name], row[name + "_ids"] = per_token_ms(model, context)
        if row["resident_ids"] != row["ls_ids"]:
            raise AssertionError(f"pair {i}: layerstream's ids differ from resident's")
        rows.append({"resident_ms": row["resident"], "ls_ms": row["ls"]})
        log.info("pair %2d: resident %6.1f ms  layerstream %6.1f ms", i, row["resident"], row["ls"])
    engine.close()
    ratios = [r["resident_ms"] / r["ls_ms"] for r in rows]
    return {
        "pairs": rows,
        "resident_ms": statistics.median(r["resident_ms"] for r in rows),
        "ls_ms": statistics.median(r["ls_ms"] for r in rows),
        "tok_s_ratio": statistics.median(ratios),
        "tok_s_ratio_quartiles": statistics.quantiles(ratios, n=4),
    }


def layout_gemv(rounds: int, blocks: int = GEMV_BLOCKS) -> dict:
    """GB/s of one-row GEMVs over `blocks` blocks' weights, per layout, rounds interleaved."""
    import torch

    libc = ctypes.CDLL(None)
    keep: list[mmap.mmap] = []

    def weights(offset: int, huge: bool) -> list[torch.Tensor]:
        total = sum(a * b * 4 for a, b in BLOCK_SHAPES) * blocks
        region = mmap.mmap(-1, total + 4096 * len(BLOCK_SHAPES) * blocks + (4 << 20))
        keep.append(region)
        buffer = torch.frombuffer(region, dtype=torch.uint8)
        if huge:
            libc.madvise(
                ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(len(region)), MADV_HUGEPAGE
            )
        position = (-buffer.data_ptr()) % (2 << 20)  # start on a 2 MiB boundary
        out = []
        for _ in range(blocks):
            for rows, cols in BLOCK_SHAPES:
                begin = position + offset
                tensor = (
                    buffer[begin : begin + rows * cols * 4].view(torch.float32).view(rows, cols)
                )
                out.append(tensor.normal_())
                position = -(-(begin + rows * cols * 4) // 4096) * 4096
        return out

    layouts = {
        "64-byte aligned, 4 KiB pages": weights(0, False),
        "8-byte aligned, 4 KiB pages": weights(8, False),
        "64-byte aligned, THP": weights(0, True),
        "8-byte aligned, THP": weights(8, True),
    }
    nbytes = sum(t.nbytes for t in next(iter(layouts.values())))
    inputs = {cols: torch.randn(1, cols) for _, cols in BLOCK_SHAPES}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, tensors in layouts.items():
                start = time.perf_counter()
                for w in tensors:
                    torch.nn.functional.linear(inputs[w.shape[1]], w)
                times[name].append(time.perf_counter() - start)
    return {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--gemv-rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "full_budget.json")
    args = parser.parse_args()
    if args.pairs < 2 or args.new_tokens < 2:
        parser.error("--pairs and --new-tokens need at least 2 (quartiles; decode steps)")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    report = {
        "args": vars(args) | {"out": str(args.out)},
        "thp": thp,
        "decode": paired_decode(args.preset, args.pairs, args.new_tokens),
        "gemv_gb_s": layout_gemv(args.gemv_rounds),
    }
    decode = report["decode"]
    low, _, high = decode["tok_s_ratio_quartiles"]
    print(
        f"\n{args.preset}, {args.pairs} alternating pairs in one process, {args.threads} thread(s)"
    )
    print(f"  resident          {decode['resident_ms']:7.1f} ms/token (median)")
    print(f"  layerstream 100%  {decode['ls_ms']:7.1f} ms/token (median)")
    print(f"  tokens/s ratio    {decode['tok_s_ratio']:7.3f}  (quartiles {low:.3f} to {high:.3f})")
    weights = len(BLOCK_SHAPES) * GEMV_BLOCKS
    print(f"\nGEMV over {weights} weights, medians (transparent huge pages: {thp})")
    for name, rate in report["gemv_gb_s"].items():
        print(f"  {name:<30} {rate:6.1f} GB/s")
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
