"""python -m bench.big_metadata [--mb 100]: a worker's peak memory on one oversized payment.

On a fresh database (created and dropped on the test server): a course, a student and one
succeeded payment whose metadata carries a `--mb` megabyte string. A worker process
(`python -m workers run --drain --no-migrate`) takes the job and exits when the queue is
empty; its peak resident set size (ru_maxrss of the waited child) and the payment's outcome
are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

import psycopg

from bench.world import fresh_database
from workers.database.server import test_admin_url
from workers.settings import load_settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=100, help="size of the metadata string")
    args = parser.parse_args()
    admin = os.environ.get("TEST_DATABASE_URL") or test_admin_url(load_settings())
    with fresh_database(admin) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                """
                WITH c AS (INSERT INTO courses (title, category) VALUES ('Big', 'Robotics')
                           RETURNING id),
                     s AS (INSERT INTO students (full_name, home_lat, home_lng)
                           VALUES ('Big', 12.97, 77.59) RETURNING id)
                INSERT INTO payments (student_id, course_id, amount_cents, status, metadata)
                SELECT s.id, c.id, 100, 'succeeded',
                       jsonb_build_object('sessionCount', 10,
                                          'note', repeat('x', %s * 1024 * 1024))
                FROM c, s
                """,
                (args.mb,),
            )
        env = {**os.environ, "DATABASE_URL": url, "KC_LOG_LEVEL": "WARNING"}
        worker = subprocess.run(
            [sys.executable, "-m", "workers", "run", "--drain", "--no-migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                """SELECT (SELECT count(*) FROM student_course_purchases) AS purchases,
                          (SELECT string_agg(e->>'message', '; ')
                             FROM payment_rejections r, jsonb_array_elements(r.errors) e)
                              AS rejection,
                          (SELECT count(*) FROM failed_jobs) AS failed"""
            ).fetchone()
            assert row is not None
    print(f"metadata string: {args.mb} MiB; worker exit code {worker.returncode}")
    print(f"worker peak RSS: {peak_kib / 1024:.1f} MiB")
    print(f"outcome: purchases={row[0]} failed_jobs={row[2]} rejection={row[1]!r}")
    if worker.returncode != 0:
        print(worker.stderr[-3000:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
