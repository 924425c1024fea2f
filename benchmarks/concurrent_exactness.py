"""Concurrent generate() calls on one shared model: are they exact, and what do they cost?

Groundwork for serving many requests in one pass over the weights: if each request keeps
its own ``generate`` (its own KV cache, sampling, stop criteria) on its own thread while
they all run through the same installed block, is each request's output still bit for bit
what it is alone? This runs the resident transformers model (no streaming, so only the
arithmetic is compared): every request alone, then all at once on threads, several times,
and compares every step's logits bitwise. It also times the two, since the threads share
the CPUs torch uses for one request.

    .venv/bin/python benchmarks/concurrent_exactness.py                       # llama-300m
    .venv/bin/python benchmarks/concurrent_exactness.py --threads 1,2 --concurrency 2,4,8
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import torch
import transformers
from streaming import prepare

log = logging.getLogger("benchmarks.concurrent_exactness")
ROOT = Path(__file__).resolve().parent

Result = tuple[torch.Tensor, torch.Tensor]  # generated ids, per-step logits


def generate(model: transformers.PreTrainedModel, ids: torch.Tensor, tokens: int) -> Result:
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores)


def prompts(count: int) -> list[torch.Tensor]:
    """Prompts of different lengths (16, 25, 34, ... tokens): requests never line up."""
    return [torch.arange(5 + 7 * i, 21 + 16 * i).unsqueeze(0) for i in range(count)]


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """0.0 when bit-identical; else the largest |difference| of the finite logits (inf when
    the -inf masks differ)."""
    if torch.equal(a, b):
        return 0.0
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return float("inf")
    return (a[finite] - b[finite]).abs().max().item()


def measure(
    model: transformers.PreTrainedModel, concurrency: int, tokens: int, trials: int
) -> dict:
    requests = prompts(concurrency)
    started = time.perf_counter()
    alone = [generate(model, ids, tokens) for ids in requests]
    sequential_s = time.perf_counter() - started
    worst, ids_equal, concurrent_s = 0.0, True, []
    for _ in range(trials):
        together: list[Result | None] = [None] * concurrency

        def run(k: int, out: list[Result | None] = together) -> None:
            out[k] = generate(model, requests[k], tokens)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(concurrency)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_s.append(time.perf_counter() - started)
        for solo, shared in zip(alone, together, strict=True):
            assert shared is not None, "a generate thread failed"
            ids_equal &= torch.equal(solo[0], shared[0])
            worst = max(worst, largest_difference(solo[1], shared[1]))
    return {
        "concurrency": concurrency,
        "ids_equal": ids_equal,
        "max_logit_difference": worst,
        "sequential_s": sequential_s,
        "concurrent_s": min(concurrent_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-300m")
    parser.add_argument("--threads", default="1,2", help="torch intra-op threads to try")
    parser.add_argument("--concurrency", default="2,4")
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "concurrent_exactness.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    transformers.logging.set_verbosity_error()

    source, _ = prepare(args.preset)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            row = {
                "torch_threads": threads,
                **measure(model, concurrency, args.tokens, args.trials),
            }
            log.info("%s", row)
            rows.append(row)

    print(
        f"\n{args.preset}, resident, {args.tokens} greedy tokens, {args.trials} concurrent trials"
    )
    print(
        f"{'torch threads':>13} {'requests':>8} {'ids equal':>9} {'max |dlogit|':>12} "
        f"{'alone, s':>9} {'together, s':>11}"
    )
    for r in rows:
        print(
            f"{r['torch_threads']:>13} {r['concurrency']:>8} {r['ids_equal']!s:>9} "
            f"{r['max_logit_difference']:>12.3g} {r['sequential_s']:>9.2f} "
            f"{r['concurrent_s']:>11.2f}"
        )
    args.out.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
