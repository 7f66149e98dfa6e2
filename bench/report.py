"""The benchmark's report: a table on stdout, results.json and a PNG beside it."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import os

    import psycopg

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "psycopg": psycopg.__version__,
    }


def table(results: dict[str, Any]) -> str:
    base = results["baseline"]
    lines = [f"{'measure':<52} {'value':>14}", "-" * 67]

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<52} {value!s:>14}")

    row(f"baseline: pgqueuer no-op jobs/s ({base['processes']} processes)", base["jobs_per_s"])
    for run in results["backlog"]:
        row(f"backlog {run['payments']:>6}: purchases/s", run["purchases_per_s"])
        row(f"backlog {run['payments']:>6}: stage jobs/s", run["stage_jobs_per_s"])
        row(
            f"backlog {run['payments']:>6}: stage jobs / baseline",
            f"{run['stage_jobs_per_s'] / base['jobs_per_s']:.2f}",
        )
    rate = results["latency"]
    row(f"latency at {rate['offered_per_s']}/s offered: p50 ms", rate["overall"]["p50_ms"])
    row("  p95 ms", rate["overall"]["p95_ms"])
    row("  p99 ms", rate["overall"]["p99_ms"])
    for stage, figures in rate["stages"].items():
        row(
            f"  {stage} stage p50 / p95 / p99 ms",
            f"{figures.get('p50_ms')}/{figures.get('p95_ms')}/{figures.get('p99_ms')}",
        )
    for idle in results["idle"]:
        row(f"idle pipeline, driver {idle['driver']}: p50 ms", idle.get("p50_ms"))
        row(f"idle pipeline, driver {idle['driver']}: p95 ms", idle.get("p95_ms"))
    search = results["search"]
    row(
        f"trainer search ({search['trainers']} trainers, {search['booked_sessions']} "
        "sessions) p50 ms",
        search["p50_ms"],
    )
    row("trainer search p95 ms", search["p95_ms"])
    if len(results["backlog"]) >= 2:
        first, last = results["backlog"][0], results["backlog"][-1]
        row(
            f"throughput at {last['payments']} vs {first['payments']} backlog",
            f"{last['purchases_per_s'] / first['purchases_per_s']:.0%}",
        )
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "results.json"
    data.write_text(json.dumps(results, indent=2, default=str))
    written = [data]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed: JSON and table only
        return written
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    samples = results["latency"].pop("samples_ms", [])
    left.hist(samples, bins=40, color="#3b7dd8")
    left.set_title(f"payment -> last stage at {results['latency']['offered_per_s']}/s")
    left.set_xlabel("latency (ms)")
    left.set_ylabel("payments")
    sizes = [r["payments"] for r in results["backlog"]]
    left_rates = [r["purchases_per_s"] for r in results["backlog"]]
    right.plot(sizes, left_rates, marker="o", label="purchases/s")
    right.plot(
        sizes, [r["stage_jobs_per_s"] for r in results["backlog"]], marker="s", label="stage jobs/s"
    )
    right.axhline(
        results["baseline"]["jobs_per_s"],
        color="grey",
        linestyle="--",
        label="pgqueuer no-op jobs/s",
    )
    right.set_xscale("log")
    right.set_xlabel("payments queued at once")
    right.set_title("throughput against backlog")
    right.legend()
    fig.tight_layout()
    png = out / "bench.png"
    fig.savefig(png, dpi=100)
    written.append(png)
    data.write_text(json.dumps(results, indent=2, default=str))
    return written
