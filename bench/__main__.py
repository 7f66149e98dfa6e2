"""python -m bench [search|...]: see `make bench`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bench import search, world
from workers.database import test_admin_url
from workers.settings import load_settings


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("what", choices=["search"], help="which measurement")
    parser.add_argument("--trainers", type=int, default=1000)
    parser.add_argument("--students", type=int, default=20000)
    parser.add_argument(
        "--booked", type=int, default=5000, help="already-scheduled allocations (20 sessions each)"
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    admin = test_admin_url(load_settings())
    with world.fresh_database(admin, keep=args.keep) as url:
        seconds = world.seed(
            url, trainers=args.trainers, students=args.students, booked_allocations=args.booked
        )
        print(f"seeded in {seconds:.1f}s", file=sys.stderr)
        result = search.measure(url, args.samples)
    print(json.dumps(result, indent=2))
    return 0


raise SystemExit(main())
