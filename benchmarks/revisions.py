"""Per-token decode time of two revisions of layerstream, measured in one run.

For a change that must not move performance (a restructuring, a refactor): each revision is
checked out into a temporary git worktree and runs its own ``benchmarks/probe.py`` in a
fresh process, alternating A B B A over the repetitions so that drift on a shared machine
falls on both. Resident transformers runs beside them as the compute floor. Every run's
greedy ids must equal the resident model's.

    .venv/bin/python benchmarks/revisions.py --base 7e88fb1              # vs the working tree
    .venv/bin/python benchmarks/revisions.py --base v1 --head v2 --budget 50% --reps 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from streaming import prepare, warm_page_cache

log = logging.getLogger("benchmarks.revisions")
ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
WORKTREE = "WORKTREE"  # the working tree as it is, uncommitted changes included


@contextlib.contextmanager
def checkout(rev: str, scratch: Path) -> Iterator[Path]:
    """A directory holding ``rev``'s tree (the repository itself for WORKTREE)."""
    if rev == WORKTREE:
        yield REPO
        return
    path = scratch / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False
        )


def probe(tree: Path, system: str, source: Path, store: Path, args: argparse.Namespace) -> dict:
    """One run of ``tree``'s probe.py, importing ``tree``'s layerstream."""
    env = dict(os.environ, PYTHONPATH=str(tree / "runtime"))
    cmd = [
        sys.executable,
        str(tree / "benchmarks" / "probe.py"),
        system,
        str(source),
        str(store),
        str(args.new_tokens),
        str(args.threads),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{tree} {system}: exit {result.returncode}: {result.stderr[-600:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a git revision")
    parser.add_argument("--head", default=WORKTREE, help="a git revision (default: the tree)")
    parser.add_argument("--preset", default="llama-300m")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "revisions.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    source, store = prepare(args.preset)
    warm_page_cache(store)
    system = f"ls:{args.budget}"
    runs: dict[str, list[dict]] = {args.base: [], args.head: [], "resident": []}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        trees = {
            rev: stack.enter_context(checkout(rev, Path(scratch)))
            for rev in runs
            if rev != "resident"
        }
        for rep in range(args.reps):
            order = [args.base, args.head] if rep % 2 == 0 else [args.head, args.base]
            runs["resident"].append(probe(trees[args.head], "resident", source, store, args))
            for rev in order:
                runs[rev].append(probe(trees[rev], system, source, store, args))
                log.info("rep %d %-10s %.1f ms/token", rep, rev, runs[rev][-1]["per_token_s"] * 1e3)

    reference = runs["resident"][0]["ids"]
    rows = []
    for name, results in runs.items():
        wrong = sum(r["ids"] != reference for r in results)
        per_token = [r["per_token_s"] * 1e3 for r in results]
        rows.append(
            {
                "system": name if name == "resident" else f"{name} {system}",
                "runs": len(results),
                "per_token_ms_median": statistics.median(per_token),
                "per_token_ms_min": min(per_token),
                "per_token_ms_all": per_token,
                "ttft_ms_median": statistics.median(r["ttft_s"] * 1e3 for r in results),
                "wait_s_median": statistics.median(r.get("wait_s", 0.0) for r in results),
                "ids_differ_from_resident": wrong,
            }
        )
    base, head = rows[0]["per_token_ms_median"], rows[1]["per_token_ms_median"]
    print(
        f"\n{args.preset}, warm, budget {args.budget}, {args.new_tokens} tokens, {args.reps} reps"
    )
    print(f"{'system':<28} {'ms/token (median)':>18} {'min':>8} {'ttft ms':>8} {'wrong ids':>9}")
    for row in rows:
        print(
            f"{row['system']:<28} {row['per_token_ms_median']:>18.1f} "
            f"{row['per_token_ms_min']:>8.1f} {row['ttft_ms_median']:>8.1f} "
            f"{row['ids_differ_from_resident']:>9}"
        )
    print(f"head / base per-token time: {head / base:.3f}")
    out = {
        "preset": args.preset,
        "budget": args.budget,
        "rows": rows,
        "head_over_base": head / base,
    }
    args.out.write_text(json.dumps(out, indent=2))
    if any(row["ids_differ_from_resident"] for row in rows):
        sys.exit("some runs generated other ids than the resident model")


if __name__ == "__main__":
    main()
