"""``layerstream chunk``: turn a Hugging Face checkpoint into a chunk store + model-repo entry;
``layerstream size``: the memory a served model needs (Seldon's ``Model.spec.memory``)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

# Nothing heavy at module level: `layerstream --help` and argument errors answer before
# torch and transformers (seconds to import) are loaded; the command imports them itself.

log = logging.getLogger("layerstream")

# presets.PRESETS's names, for the help text (presets.py imports torch);
# tests/test_first_run.py checks the two agree
PRESET_NAMES = (
    "tiny-gpt2",
    "tiny-llama",
    "tiny-qwen2",
    "tiny-bert",
    "llama-300m",
    "llama-1b",
    "llama-4b",
    "qwen3-moe-2b",
    "gpt-oss-2b",
    "mixtral-1b",
    "llama-demo",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chunk = sub.add_parser(
        "chunk",
        help="split a checkpoint into per-block safetensors chunks",
        usage="%(prog)s [options] SOURCE DEST\n"
        "       %(prog)s [options] --random-init PRESET|CONFIG.json DEST",
        description="Split a checkpoint into one safetensors chunk per block, and write "
        "model-repo/NAME/model-settings.json when DEST is model-repo/NAME/chunks.",
    )
    # SOURCE is optional to argparse only because --random-init takes its place;
    # chunk_command checks that exactly one of the two is given.
    chunk.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="a local Hugging Face checkpoint directory or a Hub id (omit it with --random-init)",
    )
    chunk.add_argument(
        "dest",
        metavar="DEST",
        help="the chunk store directory, e.g. model-repo/NAME/chunks, or s3://bucket/prefix "
        "(credentials from the standard AWS chain: environment, profile, IAM role; never on "
        "the command line)",
    )
    chunk.add_argument(
        "--name",
        help="model name served by MLServer (default: NAME when DEST is model-repo/NAME/chunks)",
    )
    chunk.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)"
    )
    chunk.add_argument(
        "--quantize",
        choices=["fp8"],
        help="store the blocks' linear weights in block-wise fp8 (128x128 blocks, the layout "
        "of DeepSeek-V3 and the Qwen3 -FP8 releases): about half the bytes per token of "
        "bfloat16. The store is then exact to that fp8 checkpoint (--save-checkpoint), not "
        "to SOURCE; the chunker reports how far their logits differ",
    )
    chunk.add_argument(
        "--save-checkpoint",
        type=Path,
        metavar="DIR",
        help="with --quantize: keep the fp8 checkpoint the store is exact to in DIR, for "
        "from_pretrained (default: a temporary folder, removed)",
    )
    chunk.add_argument(
        "--model-repo",
        type=Path,
        help="MLServer model repository to write NAME/model-settings.json into "
        "(default: DEST's parent folder when it is named NAME)",
    )
    chunk.add_argument(
        "--random-init",
        metavar="PRESET|CONFIG.json",
        help="build a random-init model offline, with a local tokenizer; presets: "
        + ", ".join(PRESET_NAMES),
    )
    chunk.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="memory_budget written into model-settings.json, e.g. 25%% or 2GiB (default: auto)",
    )
    chunk.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2...)")
    chunk.add_argument("--s3-region", help="S3 region (default: from the AWS configuration)")
    chunk.add_argument("--s3-profile", help="profile in ~/.aws/config")
    chunk.add_argument("--force", action="store_true", help="overwrite an existing store")
    chunk.add_argument("--quiet", action="store_true", help="no progress bar")
    _size_parser(sub)
    return parser


def _size_parser(sub) -> None:
    size = sub.add_parser(
        "size",
        help="print the memory a served model needs (Seldon's Model spec.memory; needs the "
        "server extra)",
        usage="%(prog)s [options] MODEL",
        description="Print each term of the memory a model needs when served (process "
        "baseline, pinned weights, streaming buffers, a quantized store's dequantized "
        "blocks, working set, KV cache budget and its growth slack), their total and the "
        "spec.memory for a Seldon Model. The settings "
        "come from MODEL's model-settings.json when MODEL is a model folder; the options "
        "override them.",
    )
    size.add_argument(
        "model",
        metavar="MODEL",
        help="a model folder (with model-settings.json) or a chunk store: a directory, "
        "s3://bucket/prefix or http(s)://host/path",
    )
    size.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="weights held in memory: 25%%, 2GiB or auto (the whole model); default: the "
        "model's memory_budget",
    )
    size.add_argument(
        "--read-ahead",
        metavar="N",
        help="streamed blocks read ahead (default: the model's, auto = 1)",
    )
    size.add_argument(
        "--max-active-sequences",
        type=int,
        metavar="N",
        help="requests run at once (default: the model's, 8)",
    )
    size.add_argument(
        "--kv-cache-budget",
        metavar="SIZE",
        help="bytes for the KV caches in flight, or auto: N sequences of the full context "
        "(default: the model's, auto)",
    )
    size.add_argument(
        "--expert-streaming",
        choices=("auto", "on", "off"),
        help="a mixture-of-experts model's blocks as base + routed experts, or whole "
        "(default: the model's, auto)",
    )
    size.add_argument(
        "--context",
        type=int,
        metavar="TOKENS",
        help="tokens per sequence for an auto KV cache budget (default: the model's context)",
    )
    size.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2...)")
    size.add_argument("--s3-region", help="S3 region (default: from the AWS configuration)")
    size.add_argument("--s3-profile", help="profile in ~/.aws/config")


def infer_name(dest: str) -> str | None:
    """NAME when DEST is ``.../NAME/chunks`` (a local folder), else None."""
    if "://" in dest:
        return None
    path = Path(dest).resolve()
    if path.name != "chunks" or not path.parent.name:
        return None
    return path.parent.name


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments argparse cannot check; fills in a default --name."""
    if args.random_init and args.source:
        return f"--random-init takes the place of SOURCE; got SOURCE {args.source} too: pass one"
    if not args.random_init and not args.source:
        return "give SOURCE DEST, or --random-init PRESET|CONFIG.json DEST"
    if args.save_checkpoint is not None and not args.quantize:
        return "--save-checkpoint keeps the checkpoint --quantize writes; pass --quantize fp8"
    if args.name is None:
        args.name = infer_name(args.dest)
        if args.name is None:
            return (
                f"cannot tell the model name from DEST {args.dest}: it is inferred only when "
                "DEST is a local model-repo/NAME/chunks; pass --name NAME"
            )
    if args.memory_budget and args.memory_budget != "auto":
        from ..units import parse_size

        try:
            parse_size(args.memory_budget, reference=1)
        except ValueError as exc:
            return f"--memory-budget: {exc}"
    return None


def _model_dir(args: argparse.Namespace, dest: str) -> Path | None:
    if args.model_repo is not None:
        return args.model_repo / args.name
    if "://" not in dest and Path(dest).resolve().parent.name == args.name:
        return Path(dest).resolve().parent
    return None


def _s3_settings(args: argparse.Namespace) -> dict[str, str]:
    """The S3 connection flags, as model-settings.json's names: the server reads the store
    through the same endpoint the chunker wrote it to."""
    pairs = {
        "s3_endpoint_url": args.s3_endpoint_url,
        "s3_region": args.s3_region,
        "s3_profile": args.s3_profile,
    }
    return {k: v for k, v in pairs.items() if v}


def chunk_command(args: argparse.Namespace) -> int:
    problem = _usage_error(args)
    if problem is not None:
        log.error("%s", problem)
        return 2
    from ..errors import LayerStreamError
    from ..stores import StoreOptions
    from .convert import ChunkerError, chunk_checkpoint
    from .source import random_source, resolve_source

    dest = args.dest
    options = StoreOptions(
        endpoint_url=args.s3_endpoint_url, region=args.s3_region, profile=args.s3_profile
    )
    model_dir = _model_dir(args, dest)
    settings_path = model_dir / "model-settings.json" if model_dir else None
    if settings_path is not None and settings_path.exists() and not args.force:
        log.error("%s exists; pass --force to overwrite it", settings_path)
        return 1
    tmp = quantized = None
    try:
        if args.random_init:
            tmp = random_source(args.random_init)
            source = Path(tmp.name)
        else:
            source = resolve_source(args.source)
        if args.quantize:
            original = source
            source, quantized = _quantized_source(source, args.save_checkpoint)
        manifest = chunk_checkpoint(
            source,
            dest,
            args.name,
            dtype=args.dtype,
            force=args.force,
            progress=not args.quiet,
            store_options=options,
        )
        config_text = (source / "config.json").read_text()
        sizing = _chunk_sizing(manifest, config_text, args.memory_budget)
        if args.quantize:
            _report_quantization(original, source)
    except (ChunkerError, ValueError, LayerStreamError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:  # a full disk, a folder not writable...
        log.error(
            "chunking into %s failed: %s. What was written is removed; a store that was "
            "there is as it was",
            dest,
            exc,
        )
        return 1
    finally:
        for folder in (quantized, tmp):
            if folder is not None:
                folder.cleanup()
    print(f"{dest}: {len(manifest.blocks)} blocks, {manifest.total_bytes / 2**20:.1f} MiB")
    if model_dir is None:
        log.warning(
            "no model-settings.json written: pass --model-repo DIR, or chunk into "
            "model-repo/%s/chunks",
            args.name,
        )
        code = 0
    else:
        code = _write_settings(args, manifest, model_dir, config_text)
    if code == 0 and sizing is not None:
        print(sizing.report())
    return code


def _quantized_source(source: Path, keep: Path | None):
    """The fp8 checkpoint of ``source``: in ``keep``, or in a temporary folder (returned
    too, for the caller to remove)."""
    import tempfile

    from .quantize import write_fp8_checkpoint

    if keep is not None:
        return write_fp8_checkpoint(source, keep), None
    tmp = tempfile.TemporaryDirectory(prefix="layerstream-fp8-")
    return write_fp8_checkpoint(source, Path(tmp.name)), tmp


def _report_quantization(original: Path, quantized: Path) -> None:
    from .quantize import compare

    found = compare(original, quantized)
    if found is None:
        return
    print(
        f"fp8 against the original on {found.prompts} prompts ({found.positions} positions): "
        f"max logit difference {found.max_logit_diff:.4g}, same top token at "
        f"{found.top1_agreement:.1%} of positions. The store is exact to the fp8 "
        "checkpoint, not to the original"
    )


def _chunk_sizing(manifest, config_text: str, memory_budget: str | None):
    """What `layerstream size` would print for the new store with default settings; None
    (with the reason logged) where it cannot be told: `_write_settings` reports a budget
    below the model's minimum itself."""
    from ..errors import LayerStreamError
    from .sizing import config_from_json, size_model

    try:
        config = config_from_json(config_text)
        return size_model(manifest, config, memory_budget=memory_budget or "auto")
    except (LayerStreamError, OSError, ValueError) as exc:
        log.warning("cannot size %s: %s", manifest.name, exc)
        return None


def _write_settings(args: argparse.Namespace, manifest, model_dir: Path, config_text: str) -> int:
    from ..errors import LayerStreamError
    from .model_settings import write_model_settings

    if args.memory_budget and args.memory_budget != "auto":
        try:  # what load() will check: a budget below the model's minimum never loads
            _check_budget(manifest, config_text, args.memory_budget)
        except LayerStreamError as exc:
            log.error("%s; %s not written", exc.message, model_dir / "model-settings.json")
            return 1
    extra = _s3_settings(args)
    if args.memory_budget:
        extra = {"memory_budget": args.memory_budget} | extra
    path = write_model_settings(model_dir, args.name, args.dest, force=True, extra=extra)
    print(f"{path}: serve it with `mlserver start {model_dir.parent}`")
    return 0


def _check_budget(manifest, config_text: str, budget: str) -> None:
    from ..engine import tuning
    from ..engine.plan import plan_residency, resolve_budget
    from .sizing import config_from_json, held_sizes

    held = held_sizes(manifest, config_from_json(config_text))
    plan_residency(
        manifest, resolve_budget(budget, held.total), tuning.read_ahead("auto"), held=held
    )


def _size_usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with `size`'s arguments, told before anything heavy is imported."""
    from ..units import parse_size

    for flag, value, reference in (
        ("--memory-budget", args.memory_budget, 1),
        ("--kv-cache-budget", args.kv_cache_budget, None),
    ):
        if value is None or value == "auto":
            continue
        try:
            parse_size(value, reference=reference)
        except ValueError as exc:
            return f"{flag}: {exc}"
    read_ahead = args.read_ahead
    if read_ahead is not None and read_ahead != "auto" and not read_ahead.isdigit():
        return f"--read-ahead must be a whole number or auto, not {args.read_ahead!r}"
    for flag, value in (
        ("--max-active-sequences", args.max_active_sequences),
        ("--context", args.context),
    ):
        if value is not None and value < 1:
            return f"{flag} must be at least 1, not {value}"
    return None


def _served_settings(args: argparse.Namespace):
    """The runtime's settings for MODEL: its model-settings.json extras when MODEL is a model
    folder, else MODEL as the chunk store; the S3 flags over either. Returns the settings
    and the folder relative chunk stores resolve against."""
    import json

    from ..serving.settings import LayerStreamSettings

    folder = Path(args.model)
    settings_file = folder / "model-settings.json"
    extra: dict = {}
    if "://" not in args.model and settings_file.is_file():
        parameters = json.loads(settings_file.read_text()).get("parameters") or {}
        extra = dict(parameters.get("extra") or {})
        base = folder
    else:
        extra["chunk_store"] = args.model
        base = None
    extra.update(_s3_settings(args))
    return LayerStreamSettings.from_extra(extra), base


def size_command(args: argparse.Namespace) -> int:
    problem = _size_usage_error(args)
    if problem is not None:
        log.error("%s", problem)
        return 2
    if importlib.util.find_spec("pydantic_settings") is None:  # found without importing it
        log.error(
            "layerstream size reads a model's server settings, which needs the server extra: "
            "pip install 'layerstream[server]' (or scripts/install.sh)"
        )
        return 2
    import dataclasses

    from ..errors import LayerStreamError
    from ..format.manifest import MANIFEST_NAME, Manifest
    from ..stores import open_store
    from .sizing import config_from_json, size_model

    try:
        settings, base = _served_settings(args)
        # two small files to read: straight from the store, not through a disk cache
        options = dataclasses.replace(settings.store_options(), cache_dir=None, cache_bytes=0)
        store = open_store(settings.chunk_store, base_dir=base, options=options)
        try:
            manifest = Manifest.from_json(store.read(MANIFEST_NAME), f"{store.uri}/{MANIFEST_NAME}")
            config = config_from_json(store.read("config.json"))
        finally:
            store.close()
        sizing = size_model(
            manifest,
            config,
            memory_budget=args.memory_budget or settings.memory_budget,
            read_ahead=args.read_ahead or settings.read_ahead,
            max_active_sequences=args.max_active_sequences or settings.max_active_sequences,
            kv_cache_budget=args.kv_cache_budget or settings.kv_cache_budget,
            context=args.context,
            expert_streaming=args.expert_streaming or settings.expert_streaming,
            expert_prefetch=settings.expert_prefetch,
        )
    except (LayerStreamError, OSError, ValueError) as exc:
        log.error("%s", getattr(exc, "message", None) or exc)
        return 1
    print(sizing.report())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "chunk":
        return chunk_command(args)
    if args.command == "size":
        return size_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
