"""The library against the server: ``layerstream.load(...).generate()`` in a script against
the same store at the same budget behind a real ``mlserver start``, one client over SSE.

Both run the same engine; what differs is what is around it (MLServer's event loop, the
request contract, encoding every token as an event). Each library run is its own process;
the server is started once per repetition (the tests' harness, tests/mlserver_proc.py), the
two interleaved, the page cache warm, one torch thread each. Per row: ms per decoded token
(the steps after the first token; for the server measured at the client, and as the
server's own final-event stats say) and whether the greedy ids equal ``from_pretrained``'s.

    .venv/bin/python benchmarks/library.py                  # llama-1b (x8 weights), 25% and 100%
    .venv/bin/python benchmarks/library.py --budgets 25% --reps 1
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

import serving_load
import startup
import streaming

log = logging.getLogger("benchmarks.library")
ROOT = Path(__file__).resolve().parent
PROMPT = list(range(5, 69))  # 64 tokens


def run_library(store: str, budget: str, tokens: int) -> dict:
    """In the child process: load, wait for the fill, warm up, time one generate."""
    import torch
    import transformers

    import layerstream

    torch.set_num_threads(1)
    times: list[float] = []

    class Clock(transformers.generation.BaseStreamer):
        def put(self, value) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            return None

    with layerstream.load(store, memory_budget=budget) as model:
        model._layerstream_engine.wait_pinned()
        ids = torch.tensor([PROMPT])
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        out = model.generate(
            ids,
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=Clock(),
        )
    # times[0]: the prompt; [1]: the first new token; then one per decoded token
    return {
        "ms_per_token": (times[-1] - times[1]) / (len(times) - 2) * 1e3,
        "ids": out[0, len(PROMPT) :].tolist(),
    }


def library_row(store: Path, budget: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--run", str(store), budget, str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr[-400:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def server_row(store: Path, budget: str, tokens: int, work: Path) -> dict:
    extra = {"memory_budget": budget, "torch_threads": 1, "max_new_tokens_limit": tokens}
    spec = serving_load.ModelSpec(serving_load.MODEL, store, extra, "raw")
    server = serving_load.Server(Path(tempfile.mkdtemp(dir=work)), [spec], None)
    try:
        server.start()
        server.wait_ready(timeout=600)
        server.wait_pinned(timeout=600)
        with serving_load.sse_transport(server, timeout=600) as stream:
            list(stream(serving_load.request_body(PROMPT, 2)))  # warm-up
            times, ids, stats = [], [], {}
            for token, params in stream(serving_load.request_body(PROMPT, tokens)):
                if token is not None:
                    times.append(time.perf_counter())
                    ids.append(int(token))
                if params.get("finish_reason") is not None:
                    stats = params
        server_ms = (int(stats["total_us"]) - int(stats["ttft_us"])) / (len(ids) - 1) / 1e3
        return {
            "ms_per_token": (times[-1] - times[0]) / (len(times) - 1) * 1e3,
            "server_ms_per_token": server_ms,
            "ids": ids,
        }
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        store, budget, tokens = sys.argv[2:5]
        print(json.dumps(run_library(store, budget, int(tokens))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", default="25%,100%")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "library.json")
    args = parser.parse_args()

    source, store = startup.prepare(args.preset, args.dtype)
    expected = startup.reference_ids(source, [PROMPT], args.tokens)[0][len(PROMPT) :]
    streaming.warm_page_cache(store)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for budget in args.budgets.split(","):
            runs: dict[str, list[dict]] = {"library": [], "server": []}
            for _ in range(args.reps):  # interleaved: library, server, library, server, ...
                runs["library"].append(library_row(store, budget, args.tokens))
                runs["server"].append(server_row(store, budget, args.tokens, Path(work)))
                log.info("%s: %s", budget, {k: v[-1].get("ms_per_token") for k, v in runs.items()})
            rows.append(summarise(budget, runs, expected))
    print(f"\n== {args.preset} ({args.dtype}, weights x8), warm, {args.tokens} tokens")
    print(
        f"{'budget':<8}{'library':>12}{'server':>12}{'server own':>12}{'lib/server':>12}"
        f"{'exact':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['budget']:<8}  {r['error'][:120]}")
            continue
        print(
            f"{r['budget']:<8}{r['library_ms']:>12.1f}{r['server_ms']:>12.1f}"
            f"{r['server_own_ms']:>12.1f}{r['library_over_server']:>12.3f}"
            f"{'yes' if r['exact'] else 'NO':>8}"
        )
    args.out.write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))


def summarise(budget: str, runs: dict[str, list[dict]], expected: list[int]) -> dict:
    failed = [r["error"] for part in runs.values() for r in part if "error" in r]
    if failed:
        return {"budget": budget, "error": failed[0], "runs": runs}
    library = statistics.median(r["ms_per_token"] for r in runs["library"])
    server = statistics.median(r["ms_per_token"] for r in runs["server"])
    return {
        "budget": budget,
        "library_ms": library,
        "server_ms": server,
        "server_own_ms": statistics.median(r["server_ms_per_token"] for r in runs["server"]),
        "library_over_server": library / server,
        "exact": all(r["ids"] == expected for part in runs.values() for r in part),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
