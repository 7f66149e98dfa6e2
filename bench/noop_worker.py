"""The baseline: a pgqueuer worker whose only entrypoint does nothing.

Same driver, batch size and database as the pipeline's workers, so the difference between the
two is the pipeline's own work. Runs until the queue is empty (drain mode).
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries
from pgqueuer.types import QueueExecutionMode

from workers.runtime.driver import ListeningDriver


async def main() -> None:
    driver = await ListeningDriver.connect(os.environ["DATABASE_URL"])
    qm = QueueManager(Queries(driver))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        return None

    try:
        await qm.run(
            batch_size=int(os.environ.get("KC_BATCH_SIZE", "10")),
            dequeue_timeout=timedelta(seconds=0.2),
            mode=QueueExecutionMode.drain,
        )
    finally:
        await driver.close()


if __name__ == "__main__":
    asyncio.run(main())
