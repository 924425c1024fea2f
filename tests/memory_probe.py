"""Run in a subprocess by test_memory.py: peak RSS of a streamed or resident model.

usage: python memory_probe.py (stream BUDGET | resident | concurrent BUDGET N | bursts BUDGET N)
    STORE SOURCE
Prints one JSON line: baseline (after imports) and peak RSS in bytes, budget, timings;
``concurrent`` runs N requests at once (shared sweeps) after each alone, and reports both
answers and the KV cache the N sequences were estimated to need; ``bursts`` runs three
bursts of N requests at once and reports the anonymous RSS once the engine is loaded and after each
burst, once the engine has gone idle.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def anon_rss() -> int:
    """Resident anonymous memory: what the allocator holds, without the pages of mapped
    files (chunks, the code of libraries faulted in as new kernels first run)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child
    # of a big pytest process would start with the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def concurrent(budget: str, n: int, store: str) -> dict:
    import threading

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.inference.generation import run_generation
    from layerstream.inference.kv import kv_bytes_per_token
    from layerstream.inference.request import Request
    from layerstream.stores import open_store

    baseline = rss_now()
    engine = Engine(open_store(store), EngineOptions(memory_budget=budget, read_ahead=1))
    request = Request(mode="tokens", max_new_tokens=8, do_sample=False)
    prompts = [list(range(5 + k, 37 + k)) for k in range(n)]

    def generate(prompt: list[int]) -> list[int]:
        events: list = []
        run_generation(engine, request, prompt, events.append, lambda: False)
        return [e.token_id for e in events]

    alone = [generate(p) for p in prompts]
    together: list[list[int] | None] = [None] * n
    threads = [
        threading.Thread(target=lambda k=k: together.__setitem__(k, generate(prompts[k])))
        for k in range(n)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    per_token = kv_bytes_per_token(engine.config, len(engine.prefixes), engine.manifest.dtype)
    result = {
        "baseline": baseline,
        "budget": engine.plan.budget,
        "kv_bytes": n * (32 + 8) * per_token,
        "alone": alone,
        "together": together,
        "peak": peak_rss(),
    }
    engine.close()
    return result


def bursts(budget: str, n: int, store: str) -> dict:
    import threading

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.inference.generation import run_generation
    from layerstream.inference.request import Request
    from layerstream.stores import open_store

    engine = Engine(open_store(store), EngineOptions(memory_budget=budget, read_ahead=1))
    loaded, after = anon_rss(), []
    for burst in range(3):
        request = Request(mode="tokens", max_new_tokens=8 + burst, do_sample=False)
        threads = [
            threading.Thread(
                target=run_generation,
                args=(engine, request, list(range(5 + k, 37 + 7 * k)), lambda e: None),
                kwargs={"cancelled": lambda: False},
            )
            for k in range(n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        # the last request out started the engine's release of free memory: wait for it
        for thread in threading.enumerate():
            if thread.name == "layerstream-trim":
                thread.join(60)
        after.append(anon_rss())
    engine.close()
    return {"loaded": loaded, "after": after}


def main() -> None:
    mode, store, source = sys.argv[1], sys.argv[-2], sys.argv[-1]
    if mode in ("concurrent", "bursts"):
        import torch
        import transformers

        torch.set_num_threads(1)
        transformers.logging.set_verbosity_error()
        run = concurrent if mode == "concurrent" else bursts
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), store)))
        return
    import torch
    import transformers

    from layerstream.engine.engine import Engine, EngineOptions
    from layerstream.stores import open_store

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    ids = torch.arange(5, 37).unsqueeze(0)
    baseline = rss_now()
    result: dict = {"mode": mode, "baseline": baseline, "baseline_peak": peak_rss()}
    if mode == "stream":
        # stream BUDGET [KEY=VALUE ...] STORE SOURCE: engine options beside the budget
        options: dict = {"read_ahead": 1}
        for pair in sys.argv[3:-2]:
            key, value = pair.split("=", 1)
            options[key] = {"true": True, "false": False}.get(value, value)
        engine = Engine(open_store(store), EngineOptions(memory_budget=sys.argv[2], **options))
        model = engine.model
        result["budget"] = engine.plan.budget
        result["expert_cache"] = engine.plan.expert_cache
        result["weights_held"] = engine.plan.weight_bytes()
        context = engine.request
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        context = torch.inference_mode
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with context():
        model.generate(ids, **kwargs)  # warm-up: first call allocates the working set
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        result["per_token_s"] = (time.perf_counter() - start) / 8
    result["ids"] = out[0].tolist()
    result["peak"] = peak_rss()
    if mode == "stream" and engine.parts:
        result["in_place"] = engine.placement.in_place
        result["expert_cache_hits"] = engine.streamer.stats.expert_cache_hits
    print(json.dumps(result))


if __name__ == "__main__":
    main()
