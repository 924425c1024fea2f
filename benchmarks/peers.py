"""One peer-system benchmark run in a fresh process: prints a JSON line like probe.py's.

    benchmarks/.venv-peers/bin/python benchmarks/peers.py SYSTEM SOURCE_DIR BUDGET_BYTES \
        NEW_TOKENS THREADS OFFLOAD_DIR

SYSTEM is one of

- ``accelerate``: transformers + accelerate big-model inference,
  ``from_pretrained(device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=OFFLOAD_DIR)``;
  what does not fit the budget is offloaded to disk and loaded module by module as it runs.
  For a safetensors checkpoint transformers 5 reads offloaded weights straight from the
  checkpoint's files, so OFFLOAD_DIR stays empty (``offload_files`` counts it).
- ``airllm``: AirLLM's layer-by-layer inference on CPU. It splits the checkpoint once into
  per-layer files under OFFLOAD_DIR/splitted_model (timed as ``prepare_s``, in a child process so
  that neither the time nor the memory of the split counts in this run, as layerstream's chunking
  doesn't count in probe.py's) and streams every layer from them on every forward. It has no
  memory-budget setting: BUDGET is recorded, not used.

SOURCE_DIR is a Hugging Face checkpoint (safetensors); BUDGET_BYTES is bytes or ``N%`` of the
model. The fields are probe.py's (system, baseline, model_bytes, weights_held, bytes_per_token,
ttft_s, per_token_s, ids, peak; model_bytes = the safetensors files' sizes) plus budget, load_s,
weights_resident, rss_anon/rss_file, versions and the system's own (device_map, prepare_s...).
A run that fails prints ``{"system": ..., "error": "<reason>", "traceback": ...}`` and exits 0.

accelerate and airllm live in their own virtualenv (``bash benchmarks/setup_peers.sh``), never in
layerstream's dependencies.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import traceback
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timing

PACKAGES = ("torch", "transformers", "accelerate", "airllm", "safetensors")


def model_bytes(source: Path) -> int:
    return sum(f.stat().st_size for f in source.glob("*.safetensors"))


def parse_budget(spec: str, total: int) -> int:
    return int(total * float(spec[:-1]) / 100) if spec.endswith("%") else int(spec)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def param_bytes(module, materialized_only: bool = False) -> int:
    """Bytes of a module's parameters (shapes are known even on the meta device)."""
    return sum(
        p.numel() * p.element_size()
        for p in module.parameters()
        if not (materialized_only and p.device.type == "meta")
    )


def main() -> None:
    system, source, budget, new_tokens, threads, offload = sys.argv[1:7]
    source, offload, new_tokens = Path(source), Path(offload), int(new_tokens)
    result: dict = {"system": system}
    try:
        # Libraries print progress to stdout (AirLLM does); keep stdout for the one JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            run(result, source, budget, new_tokens, int(threads), offload)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
        result["versions"] = versions()
    print(json.dumps(result))


def run(result: dict, source: Path, budget: str, new_tokens: int, threads: int, offload: Path):
    system = result["system"]
    if system not in ("accelerate", "airllm"):
        raise ValueError(f"unknown system {system!r}: accelerate or airllm")
    import torch
    import transformers

    if system == "accelerate":
        import accelerate  # noqa: F401  (transformers imports it lazily; count it in the baseline)
    else:
        import airllm

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)

    result["baseline"] = timing.rss("VmRSS")
    result["versions"] = versions()
    result["model_bytes"] = model_bytes(source)
    result["budget"] = parse_budget(budget, result["model_bytes"])
    offload.mkdir(parents=True, exist_ok=True)

    if system == "accelerate":
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source,
            device_map="auto",
            max_memory={"cpu": result["budget"]},
            offload_folder=str(offload),
        ).eval()
        result["load_s"] = time.perf_counter() - start
        placement = model.hf_device_map  # top-level module name -> "cpu" | "disk"
        result["device_map"] = dict(Counter(placement.values()))
        result["offload_files"] = sum(1 for f in offload.rglob("*") if f.is_file())
        # weights_held = the modules placed on "cpu" (materialized, resident for the whole run)
        # + the largest disk-offloaded module: accelerate's hooks load a disk module's weights
        # (read from the checkpoint's safetensors, or offload_folder's .dat files) just before
        # it runs and drop them right after, one module at a time, without read-ahead. That is
        # an upper bound: the hooks go per leaf module (one Linear at a time), not per layer.
        # The source file's page cache (mmap) is not counted, as for layerstream.
        on_disk = [param_bytes(model.get_submodule(n)) for n, d in placement.items() if d == "disk"]
        streamed = max(on_disk, default=0)
        per_forward = sum(on_disk)  # every forward reads every disk module once
        generate, context = model.generate, torch.inference_mode
    else:
        split = subprocess.run(
            [sys.executable, __file__, "--airllm-split", str(source), str(offload)],
            capture_output=True,
            text=True,
            check=False,
        )
        sys.stderr.write(split.stderr)
        if split.returncode != 0:
            reason = (split.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"AirLLM's split exited {split.returncode}: {reason}")
        result.update(json.loads(split.stdout.strip().splitlines()[-1]))
        start = time.perf_counter()
        wrapper = airllm.AutoModel.from_pretrained(
            str(source), device="cpu", layer_shards_saving_path=str(offload)
        )
        result["load_s"] = time.perf_counter() - start
        model = wrapper.model
        # weights_held = what stays materialized between forwards (AirLLM keeps every streamed
        # module on the meta device; only a tied embedding or "resident" extras stay), + two
        # streamed modules in flight: the one running and the next, read by its prefetch thread.
        sizes = [param_bytes(wrapper.layers[i]) for i in wrapper._streamed_indices]
        streamed = max(sizes, default=0) * (2 if wrapper.prefetching else 1)
        per_forward = sum(sizes)  # every forward loads every streamed module's file once
        result["streamed_modules"] = len(sizes)
        generate, context = wrapper.generate, torch.inference_mode

    ids = torch.arange(5, 69).unsqueeze(0)  # a 64-token prompt
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    with context():
        generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    clock = timing.clock()
    io_before = timing.io_counters()
    with context():
        start = time.perf_counter()
        out = generate(ids, streamer=clock, **kwargs)
    # times[0] is the prompt, times[1] the first new token, then one per decode step
    result["ttft_s"] = clock.times[1] - start
    result["per_token_s"] = (clock.times[-1] - clock.times[1]) / (len(clock.times) - 2)
    resident = param_bytes(model, materialized_only=True)  # measured, after the run
    result["weights_resident"] = resident
    result["weights_held"] = resident + streamed
    # As probe.py's (bytes read / (new tokens + the prefill)), but from the sizes, not measured.
    result["bytes_per_token"] = per_forward
    io_after = timing.io_counters()
    result["disk_read_per_token"] = (io_after["disk_read"] - io_before["disk_read"]) / (
        new_tokens + 1
    )
    result["major_faults"] = io_after["major_faults"] - io_before["major_faults"]
    result["ids"] = out[0].tolist()
    result["peak"] = timing.rss("VmHWM")
    # What the final RSS is made of: file-backed pages (the mapped checkpoint/layer files,
    # reclaimable page cache) vs anonymous memory (weights copied in, activations, allocator).
    result["rss_anon"], result["rss_file"] = timing.rss("RssAnon"), timing.rss("RssFile")


def airllm_split(source: str, offload: str) -> None:
    """Child process: AirLLM's one-off split into per-layer files, timed; prints a JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        from airllm import auto_model
        from airllm.utils import find_or_create_local_splitted_path

        # The layer names AutoModel's class would split by (as its __init__ passes them).
        _, name = auto_model.AutoModel.get_module_class(source)
        cls = getattr(__import__("airllm"), name)
        probe = object.__new__(cls)
        probe.set_layer_names_dict()
        reused = any((Path(offload) / "splitted_model").glob("*.done"))
        start = time.perf_counter()
        find_or_create_local_splitted_path(
            source, offload, layer_names=probe.layer_names_dict, delete_original=False
        )
        elapsed = time.perf_counter() - start
    print(json.dumps({"prepare_s": elapsed, "prepare_reused": reused}))


if __name__ == "__main__":
    if sys.argv[1] == "--airllm-split":
        airllm_split(*sys.argv[2:4])
    else:
        main()
