"""``layerstream chunk``: turn a Hugging Face checkpoint into a chunk store + model-repo entry."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .presets import PRESETS

if TYPE_CHECKING:
    pass

log = logging.getLogger("layerstream")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    chunk = sub.add_parser(
        "chunk",
        help="split a checkpoint into per-block safetensors chunks",
        description="layerstream chunk SOURCE DEST --name NAME, or "
        "layerstream chunk --random-init PRESET|CONFIG.json DEST --name NAME",
    )
    chunk.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE DEST",
        help="SOURCE: a local Hugging Face checkpoint directory or a Hub id (omit it with "
        "--random-init); DEST: the chunk store directory, e.g. model-repo/NAME/chunks, or "
        "s3://bucket/prefix (credentials from the standard AWS chain: environment, profile, "
        "IAM role; never on the command line)",
    )
    chunk.add_argument("--name", required=True, help="model name served by MLServer")
    chunk.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)"
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
        + ", ".join(PRESETS),
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
    return parser


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
    from .convert import ChunkerError, chunk_checkpoint
    from .model_settings import write_model_settings
    from .source import random_source, resolve_source

    expected = 1 if args.random_init else 2
    if len(args.paths) != expected:
        usage = "--random-init SPEC DEST" if args.random_init else "SOURCE DEST"
        log.error("expected %s, got %s", usage, " ".join(args.paths))
        return 2
    if args.memory_budget and args.memory_budget != "auto":
        from ..units import parse_size

        try:
            parse_size(args.memory_budget, reference=1)
        except ValueError as exc:
            log.error("--memory-budget: %s", exc)
            return 2
    from ..errors import LayerStreamError
    from ..stores import StoreOptions

    dest = args.paths[-1]
    s3 = _s3_settings(args)
    options = StoreOptions(
        endpoint_url=args.s3_endpoint_url, region=args.s3_region, profile=args.s3_profile
    )
    model_dir = _model_dir(args, dest)
    settings_path = model_dir / "model-settings.json" if model_dir else None
    if settings_path is not None and settings_path.exists() and not args.force:
        log.error("%s exists; pass --force to overwrite it", settings_path)
        return 1
    tmp = None
    try:
        if args.random_init:
            tmp = random_source(args.random_init)
            source = Path(tmp.name)
        else:
            source = resolve_source(args.paths[0])
        manifest = chunk_checkpoint(
            source,
            dest,
            args.name,
            dtype=args.dtype,
            force=args.force,
            progress=not args.quiet,
            store_options=options,
        )
    except (ChunkerError, ValueError, LayerStreamError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"{dest}: {len(manifest.blocks)} blocks, {manifest.total_bytes / 2**20:.1f} MiB")
    if model_dir is None:
        log.warning(
            "no model-settings.json written: pass --model-repo DIR, or chunk into "
            "model-repo/%s/chunks",
            args.name,
        )
        return 0
    if args.memory_budget and args.memory_budget != "auto":
        try:  # what load() will check: a budget below the model's minimum never loads
            _check_budget(manifest, args.memory_budget)
        except LayerStreamError as exc:
            log.error("%s; %s not written", exc.message, model_dir / "model-settings.json")
            return 1
    extra = ({"memory_budget": args.memory_budget} if args.memory_budget else {}) | s3
    path = write_model_settings(model_dir, args.name, dest, force=True, extra=extra)
    print(f"{path}: serve it with `mlserver start {model_dir.parent}`")
    return 0


def _check_budget(manifest, budget: str) -> None:
    from ..engine import tuning
    from ..engine.plan import plan_residency, resolve_budget

    plan_residency(
        manifest, resolve_budget(budget, manifest.total_bytes), tuning.read_ahead("auto")
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "chunk":
        return chunk_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
