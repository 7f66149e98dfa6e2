"""python -m bench [--quick]: every figure of `make bench` in one run, on a fresh database.

python -m bench search: only the trainer search timing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bench import pipeline, report, search, world
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
}


def step(label: str) -> Progress:
    progress = Progress(label)
    progress(0, 1)
    return progress


def run(size: dict[str, Any], processes: int, batch: int, out: Path) -> dict[str, Any]:
    admin = test_admin_url(load_settings())
    results: dict[str, Any] = {
        "size": size,
        "processes": processes,
        "batch_size": batch,
        "machine": report.machine(),
    }
    with world.fresh_database(admin) as url:
        p = step("seeding the world")
        results["seed_seconds"] = round(
            world.seed(
                url,
                trainers=size["trainers"],
                students=size["students"],
                booked_allocations=size["booked"],
            ),
            1,
        )
        p.done()
        p = step("baseline: pgqueuer no-op jobs")
        results["baseline"] = pipeline.baseline(url, size["baseline_jobs"], processes, batch)
        p.done()
        p = step("trainer search")
        results["search"] = search.measure(url, size["search_samples"])
        p.done()
        for driver, samples in (
            ("listening", size["idle_samples"]),
            ("pgqueuer", size["idle_samples_pgqueuer"]),
        ):
            p = step(f"idle latency ({driver} driver)")
            results.setdefault("idle", []).append(
                pipeline.idle_latency(url, driver, samples, gap=1.0)
            )
            p.done()
        p = step(f"latency at {size['rate']:.0f} payments/s")
        results["latency"] = pipeline.latency_at_rate(
            url, size["rate"], size["rate_seconds"], processes, batch, p
        )
        p.done()
        results["backlog"] = []
        for backlog in size["backlogs"]:
            _checkpoint(results, out)
            p = step(f"throughput, backlog {backlog}")
            results["backlog"].append(
                pipeline.backlog_throughput(url, backlog, processes, batch, p)
            )
            p.done()
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
    parser.add_argument("what", nargs="?", choices=["all", "search"], default="all")
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

    size = dict(QUICK if args.quick else FULL)
    if args.backlogs:
        size["backlogs"] = args.backlogs
    results = run(size, args.processes, args.batch, args.out)
    print(report.table(results))
    for path in report.write(results, args.out):
        print(f"wrote {path}")
    return 0


raise SystemExit(main())
