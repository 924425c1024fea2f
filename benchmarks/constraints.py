"""What a JSON-schema constraint costs per token (inference/constraints.py).

One process, one engine with every block in memory (the warm decode step the constraint is
compared with), greedy runs alternated: free text, then the same prompt under a schema. The
constraint's own time is measured where it runs (its logits processor and its stopping
criterion, on the request's thread, in series with the forward), so its share of a step does
not depend on the machine's drift between runs.

    .venv/bin/python benchmarks/constraints.py [--preset llama-1b] [--dtype float32] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "colour": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}},
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
            "required": ["x", "y"],
        },
    },
    "required": ["name", "colour", "sizes", "point"],
}


def timed(cls, method: str, spent: list[float]) -> None:
    """Add the time spent in ``cls.method`` to ``spent``."""
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(cls, method, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--dtype", default="float32", help="the checkpoint's dtype")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=ROOT / "constraints.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from streaming import prepare

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.inference import constraints
    from layerstream.inference.generation import run_generation
    from layerstream.inference.request import Request
    from layerstream.stores import open_store

    _, store = prepare(args.preset, args.dtype)
    engine = Engine(open_store(str(store)), EngineOptions(memory_budget="100%"))
    ids = torch.arange(5, 69).tolist()
    spent: list[float] = []
    timed(constraints.JsonConstraint, "__call__", spent)
    timed(constraints.GrammarDone, "__call__", spent)
    compiled = constraints.grammar(SCHEMA)

    def run(grammar: str | None) -> tuple[float, int, float]:
        """ms per token, tokens, and the constraint's ms per token."""
        before = len(spent)
        request = Request(
            mode="tokens", max_new_tokens=args.tokens, do_sample=False, grammar=grammar
        )
        events: list = []
        started = time.perf_counter()
        run_generation(engine, request, ids, events.append, lambda: False)
        took = time.perf_counter() - started
        tokens = max(len(events), 1)
        return took * 1e3 / tokens, tokens, sum(spent[before:]) * 1e3 / tokens

    run(None), run(compiled)  # warm: first runs build caches
    free, held, own, counts = [], [], [], []
    for _ in range(args.reps):
        free.append(run(None)[0])
        ms, tokens, constraint_ms = run(compiled)
        held.append(ms)
        own.append(constraint_ms)
        counts.append(tokens)
    engine.close()
    row = {
        "preset": args.preset,
        "free_ms_per_token": statistics.median(free),
        "constrained_ms_per_token": statistics.median(held),
        "constraint_ms_per_token": statistics.median(own),
        "constrained_tokens": statistics.median(counts),
    }
    row["constraint_share_of_free_step"] = row["constraint_ms_per_token"] / row["free_ms_per_token"]
    print("preset | free ms/token | constrained ms/token | constraint's own ms/token | share")
    print(
        f"{row['preset']} | {row['free_ms_per_token']:.1f} | {row['constrained_ms_per_token']:.1f}"
        f" | {row['constraint_ms_per_token']:.3f} | {row['constraint_share_of_free_step']:.2%}"
    )
    args.json.write_text(json.dumps({"reps": args.reps, "rows": [row]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
