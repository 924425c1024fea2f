"""Exactness sweep: every architecture of tests/architectures.py, chunked and served by the
engine at a 100% and a 25% budget, compared with transformers' ``from_pretrained`` model
on the same weights: the logits of every greedy generation step, the generated ids, and
every hidden state the runtime streams against ``output_hidden_states=True``.

Run once by hand (about a minute on 2 cores; CI runs a smaller sweep in
tests/test_architectures.py):

    .venv/bin/python benchmarks/exactness_sweep.py --json sweep.json --markdown sweep.md

Prints one row per architecture and budget; ``--markdown`` writes the table of
docs/exactness.md. ``--unaligned`` writes chunk files the old way (tensors 8-byte aligned
only) to show what the 64-byte alignment changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ("100%", "25%")
COLUMNS = [
    "architecture",
    "budget",
    "blocks",
    "streamed",
    "ids_equal",
    "distinct_ids",
    "prompt_logits_diff",
    "logits_max_diff",
    "hidden_states",
    "hidden_expected",
    "hidden_in_order",
    "hidden_max_diff",
]


def _unaligned_chunks() -> None:
    """Patch the chunk writer back to safetensors' own 8-byte alignment (measurement only)."""
    import layerstream.format.writer as chunkio

    chunkio._aligned = lambda entries: entries
    chunkio.TENSOR_ALIGNMENT = 8


def _minimum_budget(store: Path) -> int:
    """The non-block weights and one block: the smallest budget that loads."""
    from layerstream.format.manifest import Manifest

    manifest = Manifest.from_json((store / "manifest.json").read_text())
    return manifest.rest_bytes + max(manifest.block_bytes)


def _row(name: str, budget: str, store: Path, reference, steps: int) -> dict:
    from architectures import compare_generation, compare_hidden_states

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.errors import SettingsError
    from layerstream.inference.capabilities import capabilities
    from layerstream.stores import open_store

    def engine_at(budget: str | int) -> Engine:
        return Engine(open_store(str(store)), EngineOptions(memory_budget=budget, read_ahead=1))

    row: dict = {"architecture": name, "budget": budget}
    try:
        engine = engine_at(budget)
    except SettingsError:
        # 25% is below the non-block weights + one block (ALBERT: its shared block is most
        # of the model): the smallest budget that loads instead
        minimum = _minimum_budget(store)
        engine = engine_at(minimum)
        row["budget"] = f"min ({minimum / engine.manifest.total_bytes:.0%})"
    try:
        row.update(blocks=engine.plan.n_blocks, streamed=len(engine.plan.streamed))
        if engine.model.can_generate():
            generation = compare_generation(engine, reference, steps)
            row.update(
                ids_equal=generation.ids_equal,
                distinct_ids=generation.distinct_ids,
                steps=generation.steps,
                logits_max_diff=generation.max_diff,
                prompt_logits_diff=generation.step_diffs[0],
            )
        if "hidden_states" in capabilities(engine).modes:
            hidden = compare_hidden_states(engine, reference)
            row.update(
                hidden_states=hidden.count,
                hidden_expected=hidden.expected,
                hidden_in_order=hidden.layers == list(range(hidden.expected)),
                hidden_max_diff=hidden.max_diff,
            )
        else:
            row["hidden_states"] = "not offered"
    finally:
        engine.close()
    return row


def _fmt(value) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}"
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    """One line per architecture, its budgets side by side where they differ."""
    lines = [
        "| architecture | blocks | budget: streamed blocks | greedy ids equal | distinct ids "
        "| max logits diff, every step | hidden states | max hidden-state diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["architecture"], []).append(row)
    for name, runs in by_name.items():
        refused = [r["refused"] for r in runs if "refused" in r]
        if refused:
            lines.append(f"| {name} | | refused at chunk time: {refused[0]} | | | | | |")
            continue
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            lines.append(f"| {name} | | error: {'; '.join(errors)} | | | | | |")
            continue

        def both(key: str, runs: list[dict] = runs) -> str:
            values = [_fmt(r.get(key)) for r in runs]
            return (values[0] if len(set(values)) == 1 else " / ".join(values)) or "n/a"

        budgets = ", ".join(f"{r['budget']}: {r['streamed']}" for r in runs)
        lines.append(
            f"| {name} | {runs[0]['blocks']} | {budgets} | {both('ids_equal')} "
            f"| {both('distinct_ids')} | {both('logits_max_diff')} | {both('hidden_states')} "
            f"| {both('hidden_max_diff')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--steps", type=int, default=16, help="generated tokens per run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--unaligned", action="store_true", help="8-byte aligned chunks")
    parser.add_argument(
        "--dtypes",
        nargs="*",
        default=["float32"],
        help="checkpoint (and store) dtypes to run, e.g. float32 float16 bfloat16",
    )
    parser.add_argument(
        "--perturb",
        type=float,
        default=0.0,
        help="Gaussian noise added to every 1-D weight (default-init norms are exactly 1)",
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--markdown", type=Path, help="write a table per architecture here")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import transformers
    from architectures import ARCHITECTURES, build, reference_model

    from layerstream.chunker.sinks import ChunkerError

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.unaligned:
        _unaligned_chunks()
    rows = []
    print(" | ".join(COLUMNS))
    with tempfile.TemporaryDirectory(prefix="layerstream-sweep-") as tmp:
        runs = [(name, dtype) for name in args.only or list(ARCHITECTURES) for dtype in args.dtypes]
        for name, dtype in runs:
            label = name if args.dtypes == ["float32"] else f"{name} {dtype}"
            started = time.perf_counter()
            try:
                root = Path(tmp) / f"{name}-{dtype}"
                source, store = build(name, root, dtype=dtype, perturb=args.perturb)
                reference = reference_model(source)
            except ChunkerError as exc:  # refused at chunk time, with the reason
                rows.append({"architecture": label, "refused": str(exc)})
                print(f"{label} | refused at chunk time: {exc}", flush=True)
                continue
            except Exception as exc:  # a sweep reports every architecture, whatever breaks
                rows.append({"architecture": label, "error": f"build: {exc!r}"})
                print(f"{label} | build failed: {exc!r}", flush=True)
                continue
            for budget in BUDGETS:
                try:
                    row = _row(label, budget, store, reference, args.steps)
                except Exception as exc:  # a failing row is a result of the sweep
                    row = {"architecture": label, "budget": budget, "error": repr(exc)}
                row["seconds"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                if "error" in row:
                    print(f"{label} | {budget} | {row['error']}", flush=True)
                else:
                    print(" | ".join(_fmt(row.get(c)) for c in COLUMNS), flush=True)
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "aligned": not args.unaligned,
        "steps": args.steps,
        "dtypes": args.dtypes,
        "perturb": args.perturb,
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows))


if __name__ == "__main__":
    main()
