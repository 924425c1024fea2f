"""The tables of concurrency.py and the check of the shared-sweeps targets.

They read the report concurrency.py builds (``report["regimes"][name]["rows"]``, one dict a
row, failed rows included): one markdown table per regime, one line per client count and
transport, then the targets, each met, missed or n/a.
"""

from __future__ import annotations

import argparse

READY_TARGET_S = 0.2


# -- targets -----------------------------------------------------------------------------


def find(report: dict, regime: str, clients: int, transport: str = "sse") -> dict | None:
    rows = report.get("regimes", {}).get(regime, {}).get("rows", [])
    row = next((r for r in rows if r["clients"] == clients and r["transport"] == transport), None)
    return None if row is None or "error" in row else row


def check_targets(report: dict) -> list[dict]:
    """The shared-sweeps targets, each met, missed or n/a (its rows were not run)."""
    targets: list[dict] = []

    def add(target: str, regime: str, measured: str, met: bool | None) -> None:
        targets.append({"target": target, "regime": regime, "measured": measured, "met": met})

    def speedup(regime: str, clients: int, at_least: float) -> None:
        row, solo = find(report, regime, clients), find(report, regime, 1)
        if row is None or solo is None:
            add(f"{clients} clients >= {at_least:g}x one", regime, "not run", None)
            return
        ratio = row["tokens_per_s"] / solo["tokens_per_s"]
        add(f"{clients} clients >= {at_least:g}x one", regime, f"{ratio:.2f}x", ratio >= at_least)

    speedup("cold", 8, 5)
    speedup("cold", 16, 7)
    speedup("http", 8, 6)
    for regime in report.get("regimes", {}):
        row, solo = find(report, regime, 8), find(report, regime, 1)
        if row and solo and solo["bytes_per_token"]:
            share = row["bytes_per_token"] / solo["bytes_per_token"]
            add("bytes/token at 8 <= 1/6 of one client's", regime, f"{share:.3f}", share <= 1 / 6)
    if "warm100" in report.get("regimes", {}):
        solo = find(report, "warm100", 1)
        for row in report["regimes"]["warm100"]["rows"]:
            if row["clients"] == 1 or row["transport"] != "sse":
                continue
            target = f"no regression: {row['clients']} clients >= one"
            if solo is None or "error" in row:
                add(target, "warm100", "not run", None)
                continue
            ratio = row["tokens_per_s"] / solo["tokens_per_s"]
            add(target, "warm100", f"{ratio:.2f}x", ratio >= 1.0)
    for regime in report.get("regimes", {}):
        row, solo = find(report, regime, 8), find(report, regime, 1)
        if row is None or solo is None:
            continue
        # a sweep: the server's mean when it counts sweeps, else the row's step time
        sweep = row["sweep_ms"] if row["sweep_ms"] is not None else row["step_ms"]
        bound = 2 * sweep + solo["ttft_p50_ms"]
        add(
            "ttft p99 at 8 <= 2 sweeps + prefill",
            regime,
            f"{row['ttft_p99_ms']:.0f} ms vs {bound:.0f} ms"
            + ("" if row["sweep_ms"] is not None else " (step time as the sweep)"),
            row["ttft_p99_ms"] <= bound,
        )
    rows = [r for data in report.get("regimes", {}).values() for r in data.get("rows", [])]
    if rows:
        exact = [r for r in rows if "error" not in r and r["exact"]]
        add(
            "every output identical to resident",
            "all",
            f"{len(exact)}/{len(rows)} rows",
            len(exact) == len(rows),
        )
        slowest = max((r["ready_max_ms"] or 0.0 for r in rows if "error" not in r), default=None)
        if slowest is None:
            add("/v2/health/ready < 200 ms", "all", "no row ran", None)
        else:
            met = slowest < READY_TARGET_S * 1e3
            add("/v2/health/ready < 200 ms", "all", f"max {slowest:.0f} ms", met)
    return targets


# -- output ------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def mib(value: float | None) -> float | None:
    return None if value is None else value / 2**20


def print_regime(name: str, data: dict, header: str) -> None:
    print(f"\n### {name}: {header}\n")
    cols = [
        "clients",
        "transport",
        "tokens/s",
        "x 1 client",
        "ttft p50 ms",
        "ttft p99 ms",
        "itl p50 ms",
        "itl p99 ms",
        "step ms",
        "floor ms",
        "x floor",
        "MiB/token",
        "disk MiB/token",
        "sweeps",
        "seq/sweep",
        "sweep ms",
        "peak RSS MiB",
        "cgroup peak MiB",
        "exact",
        "ready max ms",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in data["rows"]:
        if "error" in r:
            why = r.get("cause") or r["error"].splitlines()[0]
            print(f"| {r['clients']} | {r['transport']} | error: {why[:300]} |")
            continue
        cells = [
            str(r["clients"]),
            r["transport"],
            fmt(r["tokens_per_s"], ".2f"),
            fmt(r.get("x_one_client"), ".2f"),
            fmt(r["ttft_p50_ms"], ".0f"),
            fmt(r["ttft_p99_ms"], ".0f"),
            fmt(r["itl_p50_ms"]),
            fmt(r["itl_p99_ms"]),
            fmt(r["step_ms"]),
            fmt(r["floor_ms"]),
            fmt(r["x_floor"], ".2f"),
            fmt(mib(r["bytes_per_token"]), ".2f"),
            fmt(mib(r["disk_read_per_token"]), ".2f"),
            fmt(r["sweeps"], ".0f"),
            fmt(r["sequences_per_sweep"], ".2f"),
            fmt(r["sweep_ms"]),
            fmt(mib(r["peak_rss"]), ".0f"),
            fmt(mib(r.get("cgroup_peak")), ".0f"),
            "yes" if r["exact"] else "NO",
            fmt(r["ready_max_ms"], ".0f"),
        ]
        print("| " + " | ".join(cells) + " |")
        if r["errors"]:
            print(f"| | errors: {'; '.join(r['errors'])[:200]} |")


def regime_header(
    args: argparse.Namespace, model_bytes: int, compute_s: float, name: str, data: dict
) -> str:
    """The line under a regime's title: the model, the row's settings and the floor's terms
    (``compute_s``: one sequence's compute per token)."""
    store = (
        f"floor bandwidth {data['bandwidth'] / 1e9:.3f} GB/s ({data['bandwidth_by']})"
        if data["bandwidth"]
        else "page cache: floor = compute"
    )
    cold = (
        f"; cgroup = {data['limit_base'] / 2**20:.0f} MiB imports + budget + KV + "
        f"{args.margin / 2**20:.0f} MiB; the floor's bytes: disk MiB/token"
        if name == "cold"
        else ""
    )
    return (
        f"{args.preset} {model_bytes / 2**20:.0f} MiB, {data['budget']} budget, "
        f"{args.prompt_tokens}-token prompts, {args.tokens} greedy tokens, "
        f"{args.torch_threads} torch thread(s), one sequence's compute "
        f"{compute_s * 1e3:.1f} ms/token; {store}{cold}"
    )


def print_targets(targets: list[dict]) -> None:
    print("\n### targets\n")
    print("| target | regime | measured | |")
    print("|---|---|---|---|")
    for t in targets:
        met = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"| {t['target']} | {t['regime']} | {t['measured']} | {met} |")
