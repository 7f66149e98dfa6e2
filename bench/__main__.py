"""python -m bench [--quick]: every figure of `make bench` in one run, on a fresh database.

python -m bench search: only the trainer search timing.
python -m bench scarce: only the scarce-trainer burst (bench/scarce.py; `make bench SCARCE=1`).

The fixed world (bench/world.sql) is the search's; each pipeline phase (idle, rate, every
backlog) adds a district of its own, sized to its payments (bench/district.sql).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import events, pipeline, report, scarce, search, world
from bench.progress import Progress
from workers.database.server import test_admin_url
from workers.settings import REPO_ROOT, load_settings

FULL = {
    "trainers": 1000,
    "students": 20000,
    "booked": 5000,
    "baseline_jobs": 20000,
    "backlogs": [1000, 10000, 100000],
    "rate": 50.0,
    "rate_seconds": 30,
    "idle_samples": 10,
    "idle_samples_pgqueuer": 5,
    "search_samples": 200,
    "scarce": True,
    "outbox_payments": 2000,
    "relay_events": 20000,
    "relay_samples": 200,
}
QUICK = {
    "trainers": 100,
    "students": 2000,
    "booked": 500,
    "baseline_jobs": 2000,
    "backlogs": [100, 300],
    "rate": 50.0,
    "rate_seconds": 4,
    "idle_samples": 3,
    "idle_samples_pgqueuer": 2,
    "search_samples": 30,
    "scarce": False,
    "outbox_payments": 200,
    "relay_events": 3000,
    "relay_samples": 20,
}


def run(size: dict[str, Any], processes: int, batch: int, out: Path) -> dict[str, Any]:
    admin = test_admin_url(load_settings())
    results: dict[str, Any] = {
        "size": size,
        "processes": processes,
        "batch_size": batch,
        "machine": report.machine(),
        "phase_seconds": {},
    }
    took = results["phase_seconds"]

    def phase(label: str, measure: Callable[[Progress], Any]) -> Any:
        """One phase, its line on stderr and its wall time (district seeding included)."""
        _checkpoint(results, out)
        progress = Progress(label)
        progress(0, 1)
        figures = measure(progress)
        took[label] = progress.done()
        return figures

    with world.fresh_database(admin) as url:
        results["server_autovacuum"] = pipeline.autovacuum_on(url)
        results["seed_seconds"] = phase(
            "seeding the world",
            lambda p: round(
                world.seed(
                    url,
                    trainers=size["trainers"],
                    students=size["students"],
                    booked_allocations=size["booked"],
                ),
                1,
            ),
        )
        results["baseline"] = phase(
            "baseline: pgqueuer no-op jobs",
            lambda p: pipeline.baseline(url, size["baseline_jobs"], processes, batch),
        )
        results["search"] = phase(
            "trainer search", lambda p: search.measure(url, size["search_samples"])
        )
        results["idle"] = []
        for driver, samples in (
            ("listening", size["idle_samples"]),
            ("pgqueuer", size["idle_samples_pgqueuer"]),
        ):
            results["idle"].append(
                phase(
                    f"idle latency ({driver} driver)",
                    partial(pipeline.idle_latency, url, driver, samples, 1.0, out),
                )
            )
        results["latency"] = phase(
            f"latency at {size['rate']:.0f} payments/s",
            lambda p: pipeline.latency_at_rate(
                url, size["rate"], size["rate_seconds"], processes, batch, out, p
            ),
        )
        if size["scarce"]:
            results["scarce"] = phase(
                "scarce trainers: the burst",
                partial(scarce.measure, admin, processes, out),
            )
        results["backlog"] = []
        for backlog in size["backlogs"]:
            results["backlog"].append(
                phase(
                    f"throughput, backlog {backlog}",
                    partial(pipeline.backlog_throughput, url, backlog, processes, batch, out),
                )
            )
        results["outbox"] = phase(
            f"outbox cost, backlog {size['outbox_payments']} off/on/on/off",
            partial(events.outbox_cost, url, size["outbox_payments"], processes, batch, out),
        )
        results["relay"] = phase(
            "relay to Redis: catch-up and latency",
            lambda p: events.relay_figures(url, size["relay_events"], size["relay_samples"]),
        )
    return results


def _checkpoint(results: dict[str, Any], out: Path) -> None:
    """What is measured so far, in case a long run is stopped."""
    out.mkdir(parents=True, exist_ok=True)
    latency = {k: v for k, v in results.get("latency", {}).items() if k != "samples_ms"}
    (out / "partial.json").write_text(
        json.dumps(results | {"latency": latency}, indent=2, default=str)
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", nargs="?", choices=["all", "search", "scarce"], default="all")
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke test)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--batch", type=int, default=10, help="jobs claimed per dequeue")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out")
    parser.add_argument("--samples", type=int, default=200, help="searches (search only)")
    parser.add_argument(
        "--backlogs",
        type=int,
        nargs="+",
        metavar="N",
        help="backlog sizes to measure (default 1000 10000 100000)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.what == "search":
        admin = test_admin_url(load_settings())
        with world.fresh_database(admin) as url:
            world.seed(url, trainers=1000, students=20000, booked_allocations=5000)
            print(json.dumps(search.measure(url, args.samples), indent=2))
        return 0

    if args.what == "scarce":
        admin = test_admin_url(load_settings())
        progress = Progress("scarce trainers: the burst")
        figures = scarce.measure(admin, args.processes, args.out, progress)
        progress.done()
        print("\n".join(report.scarce_rows(figures)))
        args.out.mkdir(parents=True, exist_ok=True)
        written = args.out / "scarce.json"
        written.write_text(json.dumps(figures, indent=2, default=str))
        print(f"wrote {written}")
        return 0

    size = dict(QUICK if args.quick else FULL)
    if args.backlogs:
        size["backlogs"] = args.backlogs
    results = run(size, args.processes, args.batch, args.out)
    print(report.table(results))
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    return 0


raise SystemExit(main())
