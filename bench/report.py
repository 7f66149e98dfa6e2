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


def _ms(figures: dict[str, Any]) -> str:
    return f"{figures.get('p50_ms')} / {figures.get('p95_ms')} / {figures.get('p99_ms')}"


def _share(phase: dict[str, Any]) -> str:
    share = phase.get("approved_share")
    if share is None:
        return "-"
    return f"{share:.0%} ({phase['approved']:,} of {phase['payments']:,})"


def _cpu(figures: dict[str, Any]) -> str:
    """Worker CPU s, PostgreSQL CPU s: the whole server (this database's backends)."""
    server, db = figures.get("postgres_cpu_s"), figures.get("postgres_db_cpu_s")
    pg = "not measured" if server is None else f"{server} ({db})"
    return f"{figures['workers_cpu_s']} / {pg}"


def _isolation(phase: dict[str, Any]) -> str:
    return f"{phase['healed_lines']} / {phase['foreign_jobs']} / {phase['failed_attempts']}"


def _log(phase: dict[str, Any]) -> str:
    lines = phase.get("worker_log_lines") or {}
    return f"{lines.get('WARNING', 0)} / {lines.get('ERROR', 0)}"


def table(results: dict[str, Any]) -> str:
    """The issue's figures, one per line; CPU is "workers / PostgreSQL server (this
    database's backends)" in seconds; "healed / foreign / failed" are, in the phase's window,
    'healed' history lines and jobs not the phase's own (both should be 0), and attempts of
    its own jobs that raised and were retried."""
    base = results["baseline"]
    lines = [f"{'measure':<56} {'value':>30}", "-" * 87]

    def row(name: str, value: object) -> None:
        lines.append(f"{name:<56} {value!s:>30}")

    if "server_autovacuum" in results:
        row(
            "server autovacuum",
            "on" if results["server_autovacuum"] else "off (bench vacuums every 20 s)",
        )
    row(f"baseline: pgqueuer no-op jobs/s ({base['processes']} processes)", base["jobs_per_s"])
    row("  CPU s: workers (whole lives) / PostgreSQL", _cpu(base))
    for run in results["backlog"]:
        name = f"backlog {run['payments']:,}"
        row(f"{name}: purchases/s", run["purchases_per_s"])
        row(f"{name}: stage jobs/s", run["stage_jobs_per_s"])
        row(f"{name}: stage jobs / baseline", f"{run['stage_jobs_per_s'] / base['jobs_per_s']:.2f}")
        row(f"{name}: approved", _share(run))
        row(f"{name}: CPU s, workers / PostgreSQL (this db)", _cpu(run))
        row(f"{name}: seconds; healed / foreign / failed", f"{run['seconds']}; {_isolation(run)}")
        row(f"{name}: worker log WARNING / ERROR lines", _log(run))
    rate = results["latency"]
    row(f"latency at {rate['offered_per_s']}/s offered: p50/p95/p99 ms", _ms(rate["overall"]))
    row("  approved", _share(rate))
    for stage, figures in rate["stages"].items():
        row(f"  {stage} stage p50 / p95 / p99 ms", _ms(figures))
    row("  CPU s, workers / PostgreSQL (this db)", _cpu(rate))
    row("  healed / foreign / failed", _isolation(rate))
    row("  worker log WARNING / ERROR lines", _log(rate))
    for idle in results["idle"]:
        row(f"idle lone payment, {idle['driver']} driver: p50/p95/p99 ms", _ms(idle))
        row("  approved; healed / foreign / failed", f"{_share(idle)}; {_isolation(idle)}")
    search = results["search"]
    row(
        f"trainer search ({search['trainers']:,} trainers, {search['booked_sessions']:,} "
        "sessions) p50/p95/p99 ms",
        _ms(search),
    )
    if search.get("when_found"):
        row(
            f"  of them: found a trainer ({search['found_a_trainer']}) / nobody p50/p95/p99 ms",
            f"{_ms(search['when_found'])}; {_ms(search.get('when_nobody', {}))}",
        )
    if "full_search" in search:
        row(
            f"  trainers measured: rank first {search.get('mean_measured', '-')}, full search "
            f"{search['mean_candidates']}; full search p50/p95/p99 ms",
            _ms(search["full_search"]),
        )
    if "scarce" in results:
        lines.extend(scarce_rows(results["scarce"]))
    if len(results["backlog"]) >= 2:
        first, last = results["backlog"][0], results["backlog"][-1]
        row(
            f"throughput at {last['payments']:,} vs {first['payments']:,} backlog",
            f"{last['purchases_per_s'] / first['purchases_per_s']:.0%}",
        )
    if "outbox" in results:
        box = results["outbox"]
        row(
            f"outbox: purchases/s off / on (backlog {box['payments']:,}, off-on-on-off)",
            f"{box['mean_off']} / {box['mean_on']}",
        )
        row("  runs off; runs on", f"{box['purchases_per_s_off']}; {box['purchases_per_s_on']}")
        row(
            "  cost of the outbox; events per purchase",
            f"{box['cost']:.1%}; {box['events_per_purchase']}",
        )
        row(
            "  CPU ms per purchase off / on (workers + this db); cost",
            f"{box['cpu_ms_per_purchase_off']} / {box['cpu_ms_per_purchase_on']}; "
            f"{box['cpu_cost']:.1%}",
        )
    if "relay" in results:
        relay = results["relay"]
        if "skipped" in relay:
            row("relay", relay["skipped"])
        else:
            row(f"relay: events/s catching up {relay['backlog_events']:,}", relay["events_per_s"])
            row("relay: commit -> subscriber p50/p95/p99 ms", _ms(relay))
    lines.append("")
    lines.append("phase seconds (wall, district seeding included):")
    for label, seconds in results.get("phase_seconds", {}).items():
        lines.append(f"  {label:<54} {seconds:>30}")
    return "\n".join(lines)


def scarce_rows(figures: dict[str, Any]) -> list[str]:
    """The scarce-trainer burst (bench/scarce.py), one figure per line."""
    burst, changes = figures["burst"], figures["changes"]
    latency = burst["approval_to_sessions"]
    name = f"scarce: {figures['students']} payments at once, {figures['trainers']} trainers"
    runs, after = burst["per_pending"], changes["per_pending"]
    rows = [
        (f"{name}: approved / pending", f"{burst['approved']} / {burst['pending']}"),
        ("  settled after the burst's commit, s", burst["settle_s"]),
        ("  CPU s until settled, workers / PostgreSQL (this db)", _cpu(burst)),
        (
            "  deadlocks (server) / attempts failed on one",
            (f"{figures['deadlocks']} / {burst['deadlocked_attempts']}"),
        ),
        (
            "  approval -> sessions p50 / p95 / max ms",
            (f"{latency.get('p50_ms')} / {latency.get('p95_ms')} / {latency.get('max_ms')}"),
        ),
        (
            "  runs / enqueued lines per pending purchase",
            (f"{runs.get('runs_mean')} / {runs.get('enqueued_mean')}"),
        ),
        (
            "  after 2 helpful changes: runs / enqueued per pending",
            (
                f"{after.get('runs_mean')} (max {after.get('runs_max')}) / "
                f"{after.get('enqueued_mean')} (max {after.get('enqueued_max')})"
            ),
        ),
        ("  after 2 helpful changes: retries done in s", changes["queue_empty_s"]),
        ("  worker log WARNING / ERROR lines", _log(figures)),
    ]
    return [f"{label:<56} {value!s:>30}" for label, value in rows]


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
