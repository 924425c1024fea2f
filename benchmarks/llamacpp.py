"""llama.cpp as a peer: a Hugging Face checkpoint converted to GGUF by llama.cpp's own
converter, run by llama-cpp-python with mmap (the page cache faults in only the expert
pages a token touches), printing a JSON line like probe.py's.

Both live in benchmarks/.venv-peers, built from llama-cpp-python's source distribution by
``bash benchmarks/setup_peers.sh``:

    benchmarks/.venv-peers/bin/python benchmarks/llamacpp.py convert SOURCE_DIR OUT.gguf
    benchmarks/.venv-peers/bin/python benchmarks/llamacpp.py run OUT.gguf NEW_TOKENS THREADS

``convert`` runs ``convert_hf_to_gguf.py`` (bfloat16 out, as the checkpoint) from the
source distribution kept in the venv. A random-init test checkpoint carries the tests'
own tokenizer, whose pre-tokenizer the converter does not know: it is written as
"default" (the runs feed token ids, never text, so the tokenizer plays no part).

``run`` feeds the 64-token prompt probe.py feeds (ids 5..68), warms up with 2 tokens, then
times NEW_TOKENS greedy tokens (top-k 1, no repetition penalty); ``ids`` are prompt +
generated, as probe.py's, for the exactness column (llama.cpp's own kernels: not expected
to match transformers bit for bit). A failed run prints ``{"error": ...}`` and exits 0.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import timing

HERE = Path(__file__).resolve().parent
SOURCES = HERE / ".venv-peers" / "src"


def converter() -> Path:
    found = sorted(SOURCES.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise FileNotFoundError(f"no convert_hf_to_gguf.py under {SOURCES}: run setup_peers.sh")
    return found[-1]


def convert(source: str, out: str) -> None:
    script = converter()
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), source, "--outtype", "bf16", "--outfile", out]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def any_pre_tokenizer(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "default"  # the tests' tokenizer: ids are fed, never text

    TextModel.get_vocab_base_pre = any_pre_tokenizer
    convert_hf_to_gguf.main()


def run(gguf: str, new_tokens: int, threads: int) -> dict:
    result: dict = {"system": "llama.cpp", "baseline": timing.rss("VmRSS")}
    try:
        from importlib.metadata import version

        import llama_cpp

        result["versions"] = {"llama-cpp-python": version("llama-cpp-python")}
        started = time.perf_counter()
        llm = llama_cpp.Llama(
            model_path=gguf,
            n_ctx=256,
            n_batch=64,
            n_threads=threads,
            n_threads_batch=threads,
            use_mmap=True,
            use_mlock=False,
            verbose=False,
        )
        result["load_s"] = time.perf_counter() - started
        result["model_bytes"] = Path(gguf).stat().st_size
        prompt = list(range(5, 69))
        greedy = dict(top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)

        def generate(n: int) -> tuple[list[int], list[float]]:
            llm.reset()
            ids, times = [], [time.perf_counter()]
            for token in llm.generate(prompt, reset=True, **greedy):
                times.append(time.perf_counter())
                ids.append(token)
                if len(ids) == n:
                    break
            return ids, times

        generate(2)  # warm-up
        io_before = timing.io_counters()
        ids, times = generate(new_tokens)
        io_after = timing.io_counters()
        result["ttft_s"] = times[1] - times[0]
        result["per_token_s"] = (times[-1] - times[1]) / (len(times) - 2)
        result["disk_read_per_token"] = (io_after["disk_read"] - io_before["disk_read"]) / (
            new_tokens + 1
        )
        result["bytes_per_token"] = result["disk_read_per_token"]  # what the faults read
        result["major_faults"] = io_after["major_faults"] - io_before["major_faults"]
        result["ids"] = prompt + ids
        result["peak"] = timing.rss("VmHWM")
        result["rss_anon"], result["rss_file"] = timing.rss("RssAnon"), timing.rss("RssFile")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
    return result


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "convert":
        convert(*args)
    elif command == "run":
        gguf, new_tokens, threads = args
        print(json.dumps(run(gguf, int(new_tokens), int(threads))))
    else:
        raise SystemExit(f"unknown command {command!r}: convert or run")


if __name__ == "__main__":
    main()
