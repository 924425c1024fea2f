"""Time from the load request to the first token: ready once the non-block weights are in,
the pinned blocks read in the background (``pin_in_background``, the default), against
ready once every pinned block is in (``pin_in_background=false``, as before).

Each run is its own process (``startup.py --run``), cold where the machine allows it: the
page cache dropped, the run in a memory cgroup of import baseline + budget + margin
(streaming.py's cold regime). A run builds the engine from the store, generates one token
from an 8-token prompt (the time to first token, counted from before the engine is built),
then 8 more while the fill may still run, then waits for the fill and times 8 tokens more
(the steady state). Every run's 17 greedy ids are checked against ``from_pretrained`` of
the checkpoint.

The reference of the target is measured in the same invocation: the same run at the
smallest budget the model can run at, which pins nothing: its time to first token is the
non-block weights' read plus one streamed pass (its prompt's compute included).

Stores: the local directory (cold) and, with ``--http``, the same store behind nginx
limited to ``--rate`` per connection (``bash benchmarks/setup_nginx.sh`` once).

    .venv/bin/python benchmarks/startup.py                     # llama-1b, 25% and 75%, local
    .venv/bin/python benchmarks/startup.py --http --reps 1
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

import cgroup
import streaming

log = logging.getLogger("benchmarks.startup")
ROOT = Path(__file__).resolve().parent
PROMPT = list(range(5, 13))
TOKENS = 8  # after the first, while the fill may run; then as many in the steady state


def run_one(store: str, budget: str, background: bool) -> dict:
    """In the benchmark's child process: one load, first token, fill, steady state."""
    import torch

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import open_store

    torch.set_num_threads(1)
    ids = torch.tensor([PROMPT])
    started = time.perf_counter()
    engine = Engine(
        open_store(store),
        EngineOptions(memory_budget=budget, pin_in_background=background),
    )
    ready = time.perf_counter()
    try:
        with torch.inference_mode(), engine.request():
            first = engine.model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        first_token = time.perf_counter()
        with torch.inference_mode(), engine.request():
            during = engine.model.generate(
                first, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0
            )
        during_s = time.perf_counter() - first_token
        filling = engine.pinned_bytes
        engine.wait_pinned()
        filled = time.perf_counter()
        with torch.inference_mode(), engine.request():
            after = engine.model.generate(
                during, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0
            )
        steady_s = time.perf_counter() - filled
        return {
            "ready_s": ready - started,
            "ttft_s": first_token - started,
            "during_ms_per_token": during_s / TOKENS * 1e3,
            "steady_ms_per_token": steady_s / TOKENS * 1e3,
            "fill_done_s": filled - started,
            "pinned_at_second_call": filling,
            "pinned_blocks": len(engine.plan.resident),
            "blocks": engine.plan.n_blocks,
            "budget": engine.budget,
            "ids": after[0].tolist(),
        }
    finally:
        engine.close()


def reference_ids(source: Path) -> list[int]:
    import torch
    import transformers

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=1 + 2 * TOKENS, do_sample=False, pad_token_id=0
        )
    return out[0].tolist()


def minimum_budget(store: Path) -> int:
    """The smallest budget the model runs at: the non-block weights and two streaming
    buffers (the block computing and one read ahead), nothing pinned."""
    manifest = json.loads((store / "manifest.json").read_text())
    chunks = manifest["chunks"]
    rest = sum(chunks[name]["bytes"] for name in manifest["rest"])
    largest = max(chunks[b["chunk"]]["bytes"] for b in manifest["blocks"])
    return rest + 2 * largest + 4096


def measure(store: str, budget: str, background: bool, limit: int | None) -> dict:
    cmd = [sys.executable, __file__, "--run", store, budget, str(background).lower()]
    if limit is not None:
        done, peak = cgroup.run_capped(cmd, limit, timeout=1800)
    else:
        done, peak = subprocess.run(cmd, capture_output=True, text=True, timeout=1800), None
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-400:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cgroup_peak_mib"] = None if peak is None else peak / 2**20
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        store, budget, background = sys.argv[2:5]
        print(json.dumps(run_one(store, budget, background == "true")))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", default="25%,75%")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--http", action="store_true", help="also over nginx (rate-limited)")
    parser.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    parser.add_argument("--out", type=Path, default=ROOT / "startup.json")
    args = parser.parse_args()

    source, store = streaming.prepare(args.preset, args.dtype)
    expected = reference_ids(source)
    cold = cgroup.available() is None
    base = streaming.baseline_usage() if cold else 0
    total = streaming.model_bytes(store)
    smallest = minimum_budget(store)
    budgets = {"min": smallest} | {
        b: int(total * float(b.rstrip("%")) / 100) for b in args.budgets.split(",")
    }
    log.info("%s: %.0f MiB, cold: %s", args.preset, total / 2**20, cold or cgroup.available())

    stores = {"local": str(store)}
    rows: list[dict] = []
    with _nginx(args, store) as url:
        if url is not None:
            stores["http"] = url
        for where, location in stores.items():
            for name, budget in budgets.items():
                modes = [True] if name == "min" else [False, True]
                for background in modes:
                    runs = []
                    for _rep in range(args.reps):
                        limit = base + budget + streaming.MARGIN if cold else None
                        runs.append(measure(location, str(budget), background, limit))
                    rows.append(summarise(where, name, budget, background, runs, expected))
                    log.info("%s", rows[-1])
    add_ratios(rows)
    print_table(rows, args)
    args.out.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))


class _nginx:
    """The store behind nginx when --http is given, else None."""

    def __init__(self, args: argparse.Namespace, store: Path):
        self.args, self.store, self._context = args, store, None

    def __enter__(self) -> str | None:
        if not self.args.http:
            return None
        import remote

        self._context = remote.nginx(self.store, self.args.rate)
        return self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


def summarise(
    where: str, name: str, budget: int, background: bool, runs: list[dict], expected: list[int]
) -> dict:
    ok = [r for r in runs if "error" not in r]
    row: dict = {"store": where, "budget": name, "budget_bytes": budget, "background": background}
    if not ok:
        return row | {"error": runs[0]["error"]}
    for key in ("ready_s", "ttft_s", "during_ms_per_token", "steady_ms_per_token", "fill_done_s"):
        row[key] = statistics.median(r[key] for r in ok)
    row["pinned_blocks"] = f"{ok[0]['pinned_blocks']}/{ok[0]['blocks']}"
    peaks = [r["cgroup_peak_mib"] for r in ok if r["cgroup_peak_mib"] is not None]
    row["cgroup_peak_mib"] = max(peaks) if peaks else None
    row["exact"] = all(r["ids"] == expected for r in ok)
    row["runs"] = runs
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's time to first token over the reference (the smallest budget, same store)."""
    for row in rows:
        reference = next(
            (r for r in rows if r["store"] == row["store"] and r["budget"] == "min"), None
        )
        if reference is None or "error" in row or "error" in reference:
            continue
        row["x_reference"] = row["ttft_s"] / reference["ttft_s"]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n== {args.preset} ({args.dtype}); reference: the smallest budget (pins nothing)")
    cols = [
        "store",
        "budget",
        "pinned",
        "fill",
        "ready s",
        "TTFT s",
        "x ref",
        "ms/tok fill",
        "ms/tok after",
        "peak MiB",
        "exact",
    ]
    print(
        f"{cols[0]:<7}{cols[1]:<8}{cols[2]:>8}{cols[3]:>7}" + "".join(f"{c:>13}" for c in cols[4:])
    )
    for r in rows:
        head = f"{r['store']:<7}{r['budget']:<8}"
        if "error" in r:
            print(head + f"  {r['error'][:120]}")
            continue
        peak = "" if r["cgroup_peak_mib"] is None else f"{r['cgroup_peak_mib']:.0f}"
        print(
            head
            + f"{r['pinned_blocks']:>8}{'bg' if r['background'] else 'load':>7}"
            + f"{r['ready_s']:>13.2f}{r['ttft_s']:>13.2f}"
            + f"{r.get('x_reference', float('nan')):>13.2f}"
            + f"{r['during_ms_per_token']:>13.1f}{r['steady_ms_per_token']:>13.1f}{peak:>13}"
            + f"{'yes' if r['exact'] else 'NO':>13}"
        )


if __name__ == "__main__":
    main()
