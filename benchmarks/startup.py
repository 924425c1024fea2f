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

Stores: the local directory (cold); with ``--http`` the same store behind nginx limited to
``--rate`` per connection (``bash benchmarks/setup_nginx.sh`` once); with ``--s3`` the same
store uploaded to moto's S3 server on 127.0.0.1.

``--clients N`` adds rows where N clients start generating as soon as the engine is ready,
each on its own prompt, round after round until the fill has ended and one round more:
every round's ids are checked against its prompt's from_pretrained ids. ``--peers`` adds,
for scale, the time Run:ai Model Streamer (``runai-model-streamer``, if installed) takes to
read the same checkpoint's safetensors into memory and ``from_pretrained``'s load and first
token, each cold.

The model is the preset with its weight matrices scaled by 8 (presets.py: greedy ids then
vary from token to token, so equal ids are a real check).

    .venv/bin/python benchmarks/startup.py                     # llama-1b, 25% and 75%, local
    .venv/bin/python benchmarks/startup.py --http --s3 --clients 8 --peers --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cgroup
import remote
import streaming

log = logging.getLogger("benchmarks.startup")
ROOT = Path(__file__).resolve().parent
PROMPT = list(range(5, 13))
TOKENS = 8  # after the first, while the fill may run; then as many in the steady state
SCALE = 8.0  # the weight matrices' scale (module docstring)
MAX_ROUNDS = 20  # a client's rounds at most (the clients rows)
S3_BUCKET, S3_PREFIX = "models", "startup"


# -- the child process: one run ------------------------------------------------------------


def open_engine(spec: dict):
    """The engine for ``spec``; imported before the clock starts (a server has its imports
    done before it loads a model)."""
    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import StoreOptions, open_store

    options = StoreOptions(endpoint_url=spec["endpoint"]) if spec.get("endpoint") else None
    return Engine(
        open_store(spec["store"], options=options),
        EngineOptions(memory_budget=spec["budget"], pin_in_background=spec["background"]),
    )


def greedy(model, ids, tokens: int):
    return model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)


def run_one(spec: dict) -> dict:
    """One load, its first token, 8 more during the fill, the fill's end, 8 more after."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    engine = open_engine(spec)
    ready = time.perf_counter()
    try:
        with torch.inference_mode(), engine.request():
            first = greedy(engine.model, torch.tensor([PROMPT]), 1)
        first_token = time.perf_counter()
        with torch.inference_mode(), engine.request():
            during = greedy(engine.model, first, TOKENS)
        during_s = time.perf_counter() - first_token
        engine.wait_pinned()
        filled = time.perf_counter()
        with torch.inference_mode(), engine.request():
            after = greedy(engine.model, during, TOKENS)
        steady_s = time.perf_counter() - filled
        return {
            "ready_s": ready - started,
            "ttft_s": first_token - started,
            "during_ms_per_token": during_s / TOKENS * 1e3,
            "steady_ms_per_token": steady_s / TOKENS * 1e3,
            "fill_done_s": filled - started,
            "pinned_blocks": len(engine.plan.resident),
            "blocks": engine.plan.n_blocks,
            "ids": after[0].tolist(),
        }
    finally:
        engine.close()


def run_clients(spec: dict) -> dict:
    """``clients`` threads from the moment the engine is ready, round after round."""
    import threading

    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    engine = open_engine(spec)
    ready = time.perf_counter()
    rounds: list[list[dict]] = [[] for _ in range(spec["clients"])]

    def client(i: int) -> None:
        ids = torch.tensor([client_prompt(i)])
        for _ in range(MAX_ROUNDS):
            filling = engine.fill is not None and not engine.fill.complete
            begun = time.perf_counter()
            with torch.inference_mode(), engine.request():
                out = greedy(engine.model, ids, TOKENS)
            rounds[i].append(
                {
                    "during_fill": filling,
                    "begun_s": begun - started,
                    "ended_s": time.perf_counter() - started,
                    "ids": out[0].tolist(),
                }
            )
            if not filling:
                return

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(spec["clients"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {
            "ready_s": ready - started,
            "fill_s": engine.fill.done_s if engine.fill is not None else 0.0,
            "pinned_blocks": len(engine.plan.resident),
            "blocks": engine.plan.n_blocks,
            "rounds": rounds,
        }
    finally:
        engine.close()


def run_runai(spec: dict) -> dict:
    """Run:ai Model Streamer reading the checkpoint's safetensors into memory."""
    from runai_model_streamer import SafetensorsStreamer, list_safetensors

    started = time.perf_counter()
    total = 0
    kept = []
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(list_safetensors(spec["source"]))
        for _, tensor in streamer.get_tensors():
            kept.append(tensor)
            total += tensor.numel() * tensor.element_size()
    return {"load_s": time.perf_counter() - started, "bytes": total}


def run_from_pretrained(spec: dict) -> dict:
    import torch
    import transformers

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["source"]).eval()
    loaded = time.perf_counter()
    with torch.inference_mode():
        out = greedy(model, torch.tensor([PROMPT]), 1)
    return {
        "load_s": loaded - started,
        "ttft_s": time.perf_counter() - started,
        "ids": out[0].tolist(),
    }


RUNS = {"ls": run_one, "clients": run_clients, "runai": run_runai, "hf": run_from_pretrained}


# -- the parent -----------------------------------------------------------------------------


def client_prompt(i: int) -> list[int]:
    return [t + 7 * i for t in PROMPT]


def prepare(preset: str, dtype: str) -> tuple[Path, Path]:
    """The preset's checkpoint with its weight matrices scaled (module docstring) and its
    store, built once under .cache."""
    from layerstream.chunker.convert import chunk_checkpoint
    from layerstream.chunker.presets import write_random_checkpoint

    name = f"{preset}-{dtype}-x{SCALE:g}"
    source, store = streaming.CACHE / f"{name}-source", streaming.CACHE / f"{name}-chunks"
    if not (store / "manifest.json").exists():
        streaming.CACHE.mkdir(exist_ok=True)
        write_random_checkpoint(preset, source, weight_scale=SCALE, dtype=dtype)
        chunk_checkpoint(source, store, preset, force=True, progress=False)
    return source, store


def reference_ids(source: Path, prompts: list[list[int]], *calls: int) -> list[list[int]]:
    """Each prompt's greedy ids from ``from_pretrained``, generated in the same ``calls``
    as the runs (each call's new tokens; a call goes on from the last one's ids: its
    prefill then covers them, which rounds otherwise than decoding them one by one)."""
    import torch
    import transformers

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for tokens in calls:
                ids = greedy(model, ids, tokens)
            out.append(ids[0].tolist())
    return out


def minimum_budget(store: Path) -> int:
    """The smallest budget the model runs at: the non-block weights and two streaming
    buffers (the block computing and one read ahead), nothing pinned."""
    manifest = json.loads((store / "manifest.json").read_text())
    chunks = manifest["chunks"]
    rest = sum(chunks[name]["bytes"] for name in manifest["rest"])
    largest = max(chunks[b["chunk"]]["bytes"] for b in manifest["blocks"])
    return rest + 2 * largest + 4096


def measure(spec: dict, limit: int | None) -> dict:
    cmd = [sys.executable, __file__, "--run", json.dumps(spec)]
    if limit is not None:
        done, peak = cgroup.run_capped(cmd, limit, timeout=1800)
    else:
        done, peak = subprocess.run(cmd, capture_output=True, text=True, timeout=1800), None
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-400:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cgroup_peak_mib"] = None if peak is None else peak / 2**20
    return result


@contextlib.contextmanager
def s3_store(store: Path) -> Iterator[str]:
    """moto's S3 server on a free port, the store uploaded; stopped by PID."""
    import boto3

    port = remote.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "benchmark")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        for path in sorted(store.iterdir()):
            if path.is_file():
                client.upload_file(str(path), S3_BUCKET, f"{S3_PREFIX}/{path.name}")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--run":
        spec = json.loads(sys.argv[2])
        import torch  # noqa: F401  (the imports a server has done before it loads a model)
        import transformers  # noqa: F401

        import layerstream.engine.engine
        import layerstream.stores  # noqa: F401

        print(json.dumps(RUNS[spec["kind"]](spec)))
        return
    # SIGTERM unwinds as an exception: nginx and moto are stopped, the cgroup removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", default="25%,75%")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-local", action="store_true", help="leave out the local store")
    parser.add_argument("--http", action="store_true", help="also over nginx (rate-limited)")
    parser.add_argument("--rate", default="20m", help="nginx limit_rate per connection")
    parser.add_argument("--s3", action="store_true", help="also from moto's S3 server")
    parser.add_argument("--clients", type=int, default=0, help="rows with N clients at once")
    parser.add_argument("--peers", action="store_true", help="Run:ai streamer, from_pretrained")
    parser.add_argument("--out", type=Path, default=ROOT / "startup.json")
    args = parser.parse_args()

    source, store = prepare(args.preset, args.dtype)
    expected = reference_ids(source, [PROMPT], 1, TOKENS, TOKENS)[0]
    cold = cgroup.available() is None
    base = streaming.baseline_usage() if cold else 0
    total = streaming.memory_bytes(store)  # what the engine takes a percentage of
    budgets = {"min": minimum_budget(store)} | {
        b: int(total * float(b.rstrip("%")) / 100) for b in args.budgets.split(",")
    }
    log.info("%s: %.0f MiB, cold: %s", args.preset, total / 2**20, cold or cgroup.available())

    def limit(budget: int) -> int | None:
        return base + budget + streaming.MARGIN if cold else None

    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        local = {"store": str(store)}
        stores = {} if args.no_local else {"local": local}
        if args.http:
            stores["http"] = {"store": stack.enter_context(remote.nginx(store, args.rate))}
        if args.s3:
            endpoint = stack.enter_context(s3_store(store))
            stores["s3"] = {"store": f"s3://{S3_BUCKET}/{S3_PREFIX}", "endpoint": endpoint}
        for where, location in stores.items():
            for name, budget in budgets.items():
                for background in [True] if name == "min" else [False, True]:
                    spec = location | {
                        "kind": "ls",
                        "budget": str(budget),
                        "background": background,
                    }
                    runs = [measure(spec, limit(budget)) for _ in range(args.reps)]
                    rows.append(summarise(where, name, background, runs, expected))
                    log.info("%s", {k: v for k, v in rows[-1].items() if k != "runs"})
        clients = []
        if args.clients:
            prompts = [client_prompt(i) for i in range(args.clients)]
            wanted = reference_ids(source, prompts, TOKENS)
            for name in args.budgets.split(","):
                spec = local | {
                    "kind": "clients",
                    "budget": str(budgets[name]),
                    "background": True,
                    "clients": args.clients,
                }
                clients.append(summarise_clients(name, measure(spec, limit(budgets[name])), wanted))
                log.info("%s", {k: v for k, v in clients[-1].items() if k != "run"})
    peers = run_peers(source, base, total, cold) if args.peers else []
    add_ratios(rows)
    print_tables(rows, clients, peers, args)
    report = {"preset": args.preset, "rows": rows, "clients": clients, "peers": peers}
    args.out.write_text(json.dumps(report, indent=2))


def run_peers(source: Path, base: int, total: int, cold: bool) -> list[dict]:
    """Run:ai Model Streamer and from_pretrained, cold, in a cgroup with room for the model."""
    limit = base + 2 * total + streaming.MARGIN if cold else None
    peers = []
    for kind in ("runai", "hf"):
        result = measure({"kind": kind, "source": str(source)}, limit)
        peers.append({"system": kind} | result)
        log.info("%s", peers[-1])
    return peers


def summarise(
    where: str, name: str, background: bool, runs: list[dict], expected: list[int]
) -> dict:
    ok = [r for r in runs if "error" not in r]
    row: dict = {"store": where, "budget": name, "background": background}
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


def summarise_clients(name: str, run: dict, wanted: list[list[int]]) -> dict:
    row: dict = {"budget": name}
    if "error" in run:
        return row | {"error": run["error"]}
    rounds = [(i, r) for i, mine in enumerate(run["rounds"]) for r in mine]
    during = [r for _, r in rounds if r["during_fill"]]
    after = [r for _, r in rounds if not r["during_fill"]]

    def tokens_per_s(part: list[dict]) -> float | None:
        if not part:
            return None
        span = max(r["ended_s"] for r in part) - min(r["begun_s"] for r in part)
        return len(part) * TOKENS / span

    return row | {
        "pinned_blocks": f"{run['pinned_blocks']}/{run['blocks']}",
        "ready_s": run["ready_s"],
        "first_answer_s": statistics.median(mine[0]["ended_s"] for mine in run["rounds"]),
        "requests": len(rounds),
        "during_fill": len(during),
        "tokens_per_s_during": tokens_per_s(during),
        "tokens_per_s_after": tokens_per_s(after),
        "wrong": sum(r["ids"] != wanted[i] for i, r in rounds),
        "cgroup_peak_mib": run["cgroup_peak_mib"],
        "run": run,
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's time to first token over the reference (the smallest budget, same store)."""
    for row in rows:
        reference = next(
            (r for r in rows if r["store"] == row["store"] and r["budget"] == "min"), None
        )
        if reference is None or "error" in row or "error" in reference:
            continue
        row["x_reference"] = row["ttft_s"] / reference["ttft_s"]


def _f(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_tables(
    rows: list[dict], clients: list[dict], peers: list[dict], args: argparse.Namespace
) -> None:
    print(f"\n== {args.preset} ({args.dtype}); reference: the smallest budget (pins nothing)")
    cols = ["ready s", "TTFT s", "x ref", "ms/tok fill", "ms/tok after", "peak MiB", "exact"]
    print(f"{'store':<7}{'budget':<8}{'pinned':>8}{'fill':>7}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        head = f"{r['store']:<7}{r['budget']:<8}"
        if "error" in r:
            print(head + f"  {r['error'][:120]}")
            continue
        print(
            head
            + f"{r['pinned_blocks']:>8}{'bg' if r['background'] else 'load':>7}"
            + f"{r['ready_s']:>13.2f}{r['ttft_s']:>13.2f}{_f(r.get('x_reference'), '.2f'):>13}"
            + f"{r['during_ms_per_token']:>13.1f}{r['steady_ms_per_token']:>13.1f}"
            + f"{_f(r['cgroup_peak_mib'], '.0f'):>13}{'yes' if r['exact'] else 'NO':>13}"
        )
    if clients:
        print(f"\n== {args.clients} clients from the moment the engine is ready (local, bg)")
        cols = [
            "ready s",
            "1st answer s",
            "requests",
            "in the fill",
            "tok/s fill",
            "tok/s after",
            "wrong",
            "peak MiB",
        ]
        print(f"{'budget':<8}{'pinned':>8}" + "".join(f"{c:>13}" for c in cols))
        for c in clients:
            if "error" in c:
                print(f"{c['budget']:<8}  {c['error'][:120]}")
                continue
            print(
                f"{c['budget']:<8}{c['pinned_blocks']:>8}{c['ready_s']:>13.2f}"
                + f"{c['first_answer_s']:>13.2f}{c['requests']:>13}{c['during_fill']:>13}"
                + f"{_f(c['tokens_per_s_during'], '.2f'):>13}"
                + f"{_f(c['tokens_per_s_after'], '.2f'):>13}{c['wrong']:>13}"
                + f"{_f(c['cgroup_peak_mib'], '.0f'):>13}"
            )
    for p in peers:
        shown = p.get("error") or ", ".join(
            f"{k} {v:.2f}" for k, v in p.items() if k.endswith("_s")
        )
        print(f"peer {p['system']}: {shown}")


if __name__ == "__main__":
    main()
