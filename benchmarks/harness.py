"""lm-evaluation-harness's HF model class over a streamed model: ``HFLM(pretrained=model)``
where ``model = layerstream.load(store, memory_budget=...)``, against ``HFLM`` over
``from_pretrained`` of the same checkpoint, on the three request types the harness's tasks
use: loglikelihood (multiple choice), loglikelihood_rolling (perplexity) and generate_until.
Every answer must be equal (floats bit for bit).

The Hugging Face Hub is not reachable here, so the requests are built from local text (no
task datasets); the model is the ``llama-demo`` preset (a random-init Llama with a locally
trained tokenizer, weights x8). lm-eval is not a dependency of the project: install it into
the virtual environment first.

    .venv/bin/pip install lm-eval
    .venv/bin/python benchmarks/harness.py
    .venv/bin/python benchmarks/harness.py --budget 100%
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import startup

log = logging.getLogger("benchmarks.harness")
ROOT = Path(__file__).resolve().parent
CONTEXTS = [
    "The capital of France is",
    "Once upon a time there was a",
    "In 1969 the first people to walk on the moon",
    "A mixture of experts model routes each token to",
]
CHOICES = [" Paris", " London", " a dragon", " an apple", " were astronauts", " experts"]


def requests():
    from lm_eval.api.instance import Instance

    likelihood = [
        Instance("loglikelihood", {}, (context, choice), i)
        for i, (context, choice) in enumerate((c, x) for c in CONTEXTS for x in CHOICES)
    ]
    rolling = [
        Instance("loglikelihood_rolling", {}, (" ".join(CONTEXTS[i:]),), i)
        for i in range(len(CONTEXTS))
    ]
    generate = [
        Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 16}), i)
        for i, c in enumerate(CONTEXTS)
    ]
    return likelihood, rolling, generate


def answers(lm) -> dict[str, list]:
    likelihood, rolling, generate = requests()
    started = time.perf_counter()
    out = {
        "loglikelihood": lm.loglikelihood(likelihood),
        "loglikelihood_rolling": lm.loglikelihood_rolling(rolling),
        "generate_until": lm.generate_until(generate),
    }
    out["seconds"] = time.perf_counter() - started
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-demo")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--out", type=Path, default=ROOT / "harness.json")
    args = parser.parse_args()

    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    import layerstream

    torch.set_num_threads(1)
    source, store = startup.prepare(args.preset, "float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    theirs = answers(HFLM(pretrained=reference, tokenizer=tokenizer, batch_size=1))
    with layerstream.load(store, memory_budget=args.budget) as model:
        engine = model._layerstream_engine
        plan = engine.plan.describe()
        mine = answers(HFLM(pretrained=model, tokenizer=model.tokenizer, batch_size=1))
    report = {"preset": args.preset, "budget": args.budget, "plan": plan}
    print(f"\n== lm-eval HFLM, {args.preset} at {args.budget}: {plan}")
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        equal = [a == b for a, b in zip(mine[kind], theirs[kind], strict=True)]
        report[kind] = {"requests": len(equal), "equal": sum(equal), "examples": mine[kind][:2]}
        print(f"{kind:<24}{sum(equal):>4} of {len(equal):>3} equal to from_pretrained's")
    report["seconds"] = {"layerstream": mine["seconds"], "from_pretrained": theirs["seconds"]}
    print(f"time: layerstream {mine['seconds']:.2f}s, from_pretrained {theirs['seconds']:.2f}s")
    args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
