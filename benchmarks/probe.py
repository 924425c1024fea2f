"""One benchmark run in a fresh process: prints a JSON line (timings, peak RSS, ids)."""

from __future__ import annotations

import json
import sys
import time

import timing


def main() -> None:
    system, source, store, new_tokens, threads = sys.argv[1:6]
    new_tokens = int(new_tokens)
    import torch
    import transformers

    from layerstream.engine.engine import Engine
    from layerstream.stores import open_store

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(threads))

    result: dict = {"system": system, "baseline": timing.rss("VmRSS")}
    engine = None
    if system == "resident":
        model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        context = torch.inference_mode
    else:
        options = engine_options(system)
        engine = Engine(open_store(store), options)
        result["reader"] = engine.streamer.reader
        result["read_ahead"] = engine.plan.read_ahead
        result["io_threads"] = engine.io_threads
        result["evict_after_use"] = engine.evict_after_use
        result["plan"] = engine.plan.describe()
        model, context = engine.model, engine.request
        result["weights_held"] = engine.plan.weight_bytes()
        engine.wait_pinned()  # the steady state: every block the plan pins in memory
        if engine.verifier is not None:
            # timed as a server runs once its background pass has hashed every streamed
            # chunk (until then each part read is hashed, and the pass reads every chunk)
            started = time.perf_counter()
            engine.verifier.done.wait(timeout=1800)
            result["verify_wait_s"] = time.perf_counter() - started
    result["model_bytes"] = _model_bytes(store)
    ids = torch.arange(5, 69).unsqueeze(0)  # a 64-token prompt
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    with context():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    # the engine's counters when the prefill has run: what follows is the decode steps'
    clock = timing.clock(engine.streamer.stats.snapshot if engine is not None else None)
    io_before = timing.io_counters()
    with context() as scope:
        start = time.perf_counter()
        out = model.generate(ids, streamer=clock, **kwargs)
    # times[0] is the prompt, times[1] the first new token, then one per decode step
    result["ttft_s"] = clock.times[1] - start
    result["per_token_s"] = (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2)
    if engine is not None:
        stats = scope.stats
        result["bytes_per_token"] = stats.bytes_read / (new_tokens + 1)  # + the prefill sweep
        result["wait_s"] = stats.wait_s
        result["hit_rate"] = stats.resident_runs / max(stats.resident_runs + stats.streamed_runs, 1)
        result["pinned_fraction"] = len(engine.plan.resident) / engine.plan.n_blocks
        result["expert_bytes_per_token"] = stats.expert_bytes / (new_tokens + 1)
        result["experts_read"] = stats.experts_read
        result["experts_routed"] = stats.experts_routed
        result["experts_predicted"] = stats.experts_predicted
        result["experts_predicted_used"] = stats.experts_predicted_used
        result["experts_routed_predicted"] = stats.experts_routed_predicted
        result["expert_cache_hits"] = stats.expert_cache_hits
        if engine.parts:  # computed on kept experts where they lie (at the end)?
            result["in_place"] = engine.placement.in_place
            # the reads of experts (one per experts module run) after which auto switched,
            # and how many there were in all, warm-up and prefill in
            result["placement_switches"] = list(engine.placement.switched_at)
            result["placement_reads"] = engine.placement.reads
        if engine.guessing.fixed is None:  # expert_prefetch auto: passes without and with
            result["guess_passes"] = list(engine.guessing.passes)  # guesses, warm-up in
        decode = engine.streamer.stats.since(clock.first)  # the decode steps alone
        result["decode_bytes_per_token"] = decode.bytes_read / max(new_tokens - 1, 1)
        result["decode_expert_bytes_per_token"] = decode.expert_bytes / max(new_tokens - 1, 1)
        # a quantized store's: dequantizing per streamed install, and reading per chunk read
        result["dequantize_s_per_install"] = decode.dequantize_s / max(decode.streamed_runs, 1)
        result["read_s_per_chunk"] = decode.read_s / max(decode.chunks_read, 1)
        result["read_s_per_install"] = decode.read_s / max(decode.streamed_runs, 1)
    io_after = timing.io_counters()
    result["disk_read_per_token"] = (io_after["disk_read"] - io_before["disk_read"]) / (
        new_tokens + 1
    )
    result["major_faults"] = io_after["major_faults"] - io_before["major_faults"]
    result["ids"] = out[0].tolist()
    result["peak"] = timing.rss("VmHWM")
    print(json.dumps(result))


def engine_options(system: str):
    """``ls:BUDGET[:key=value...]``, e.g. ``ls:25%:read_ahead=0`` or ``ls:25%:reader=read``;
    knobs not named keep the runtime's defaults."""
    from layerstream.engine.engine import EngineOptions

    _, budget, *pairs = system.split(":")
    extra: dict[str, str | bool] = dict(pair.split("=", 1) for pair in pairs)
    for key, value in extra.items():
        if value in ("true", "false"):  # the boolean knobs (expert_prefetch=false)
            extra[key] = value == "true"
    return EngineOptions(memory_budget=budget, **extra)


def _model_bytes(store: str) -> int:
    """From the store's manifest, wherever the store is (a directory, an http(s) URL)."""
    from layerstream.stores import open_store

    opened = open_store(store)
    try:
        manifest = json.loads(opened.read("manifest.json"))
    finally:
        opened.close()
    return sum(c["bytes"] for c in manifest["chunks"].values())


if __name__ == "__main__":
    main()
